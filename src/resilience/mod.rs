//! Resilience mechanisms, each standalone and clock-injected (tokio's clock), knowing nothing
//! of Redis, HTTP or the pipeline:
//!
//! - [`breaker`]: the circuit breaker (CLOSED / OPEN / HALF_OPEN) with a hard limit on
//!   half-open probes in flight and operator overrides.
//! - [`latency`]: the latency window, the adaptive concurrency/timeout policy and the
//!   high-latency cycle skip (with guaranteed recovery).
//! - [`backpressure`]: consecutive-overrun detection and cooldown cycles.
//! - [`rate_limit`]: the process-wide rate limiter for agent calls (GCRA via `governor`,
//!   driven by tokio's clock) with a pause for `Retry-After`.
//! - [`retry`]: exponential backoff with jitter that never outlives a deadline.

pub mod backpressure;
pub mod breaker;
pub mod latency;
pub mod rate_limit;
pub mod retry;

pub use backpressure::Backpressure;
pub use breaker::{
    Breaker, BreakerMode, BreakerSettings, BreakerState, Permit, Rejected, TransitionHook,
};
pub use latency::{AdaptivePolicy, LatencyTracker};
pub use rate_limit::RateLimiter;
pub use retry::{Backoff, retry_until};
