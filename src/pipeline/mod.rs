//! The pipeline's stage types and their wiring: Signal → Score → Advise → Report.
//!
//! - [`types`]: the payloads of DESIGN.md §3 and the message envelope.
//! - [`scorer`]: the deterministic TradeStream opportunity score (no LLM, < 1 ms).
//! - [`stages`]: runs one symbol through every stage, publishing each stage's message as
//!   soon as it exists (no barrier between stages or symbols).

pub mod scorer;
pub mod stages;
pub mod types;

pub use stages::{PipelineContext, SymbolOutcome, run_symbol};
pub use types::*;
