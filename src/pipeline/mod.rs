//! The pipeline's wiring: Signal → Score → Advise → Report (the payload types are in
//! [`crate::model`], re-exported here).
//!
//! - [`scorer`]: the deterministic TradeStream opportunity score (no LLM, < 1 ms).
//! - [`stages`]: runs one symbol through every stage, publishing each stage's message as
//!   soon as it exists (no barrier between stages or symbols).

pub mod scorer;
pub mod stages;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;

pub use stages::{PipelineContext, SymbolOutcome, run_symbol};
// The leaf data types live in `model`; re-exported here so `pipeline::Signal` still reads
// naturally where the pipeline is the subject.
pub use crate::model::*;
