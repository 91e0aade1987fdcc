//! Resilience mechanisms, each standalone and clock-injected (tokio's clock), knowing nothing
//! of Redis, HTTP or the pipeline:
//!
//! - [`breaker`]: the circuit breaker (CLOSED / OPEN / HALF_OPEN) with a hard limit on
//!   half-open probes in flight and operator overrides.
//! - [`latency`]: the per-call latency windows, the adaptive concurrency/timeout policy and
//!   the latency gate (skips only work that cannot fit; recovery guaranteed).
//! - [`hedge`]: the budget of hedged (backup) requests for straggling calls.
//! - [`concurrency`]: the in-flight limit of one endpoint, learned from its latency (AIMD),
//!   so a server that serves one call at a time is not sent ten.
//! - [`backpressure`]: consecutive-overrun detection and cooldown cycles.
//! - [`rate_limit`]: the process-wide rate limiter for agent calls (GCRA via `governor`,
//!   driven by tokio's clock) with a pause for `Retry-After`.
//! - [`retry`]: exponential backoff with jitter that never outlives a deadline.

pub mod backpressure;
pub mod breaker;
pub mod concurrency;
pub mod hedge;
pub mod latency;
pub mod rate_limit;
pub mod retry;

pub use backpressure::Backpressure;
pub use breaker::{
    Breaker, BreakerKind, BreakerMemo, BreakerMode, BreakerSettings, BreakerState, Permit,
    Rejected, TransitionHook,
};
pub use concurrency::{CallEnd, ConcurrencyLimit, Slot};
pub use hedge::HedgeBudget;
pub use latency::{AdaptivePolicy, CallLatencies, LatencyTracker};
pub use rate_limit::RateLimiter;
pub use retry::{Backoff, retry_until};
