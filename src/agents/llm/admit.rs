//! The admission layer: what a request must hold before it goes out, taken in this order —
//! its worst case reserved in the token budget, a rate-limit slot, a place among the requests
//! the endpoint is sent at once (the learned in-flight limit), and the breaker's permit — and
//! the breaker's verdict on what came back. Whatever is refused gives back what was taken.

use chrono::Utc;
use tokio::time::Instant;

use super::{LlmAgent, LlmRequest, Read, Reservation, Step, token_estimate};
use crate::agents::{AgentError, CallLimits};
use crate::resilience::{Permit, Slot};
use crate::telemetry::names;

/// What an admitted request holds while it is out.
pub(super) struct Admitted {
    /// Its worst case in the token budget, settled to what it used.
    pub reservation: Reservation,
    /// Its place under the endpoint's in-flight limit (none without a limit).
    pub slot: Option<Slot>,
    /// The breaker's permit, told the result.
    pub permit: Permit,
}

impl LlmAgent {
    /// One attempt: admitted, sent (maybe hedged), and judged by the breaker.
    pub(super) async fn attempt<T>(
        &self,
        req: &LlmRequest<'_>,
        limits: CallLimits,
        read: Read<'_, T>,
    ) -> Result<Step<T>, AgentError> {
        let estimate = token_estimate(req);
        let Admitted {
            reservation,
            slot,
            permit,
        } = self.admit(estimate, limits.until).await?;
        self.shared.latencies.count_call();
        if let Some(h) = &self.shared.hedge {
            h.on_call();
        }
        // Sent beside others to an endpoint with a learned limit, or while it works off calls
        // given up on: if it times out, that may be the endpoint's queue (overload), which the
        // limit answers, not the breaker.
        let crowded = slot.as_ref().is_some_and(Slot::queued_behind_others);
        let out = self
            .hedged(req, limits, read, estimate, reservation, slot)
            .await;
        self.judge(permit, out, crowded)
    }

    /// Budget, rate limit, in-flight slot, breaker — all or nothing.
    async fn admit(&self, estimate: u64, until: Instant) -> Result<Admitted, AgentError> {
        let reservation = self
            .shared
            .budget
            .reserve(estimate, Utc::now())
            .map_err(|w| {
                metrics::counter!(names::LLM_BUDGET_EXHAUSTED, "window" => w.as_str()).increment(1);
                AgentError::BudgetExhausted(w.as_str())
            })?;
        let waited = match self.shared.limiter.acquire_before(until).await {
            Ok(w) => w,
            Err(_) => {
                self.shared.budget.settle(reservation, 0, Utc::now());
                return Err(AgentError::RateLimitWait);
            }
        };
        metrics::histogram!(names::RATE_LIMIT_WAIT_SECONDS).record(waited.as_secs_f64());
        // A place among the requests the endpoint is sent at once, waited for here — where
        // no per-call deadline runs — rather than in the server's queue, where it would.
        let slot = match &self.concurrency {
            Some(c) => match c.acquire_before(until).await {
                Some(s) => Some(s),
                None => {
                    self.shared.budget.settle(reservation, 0, Utc::now());
                    return Err(AgentError::NoCapacity(c.limit()));
                }
            },
            None => None,
        };
        let permit = match self.breaker.try_acquire() {
            Ok(p) => p,
            Err(_) => {
                self.shared.budget.settle(reservation, 0, Utc::now());
                metrics::counter!(names::CIRCUIT_BREAKER_REJECTED, "breaker" => self.breaker.name().to_string()).increment(1);
                return Err(AgentError::CircuitOpen(self.breaker.opened_because()));
            }
        };
        Ok(Admitted {
            reservation,
            slot,
            permit,
        })
    }

    /// A backup request's slot, budget and hedge credit, all or nothing, and at once: a
    /// backup that waits is no longer early. It needs no permit of its own: the breaker
    /// judges the attempt, not each of its requests.
    pub(super) async fn admit_backup(&self, estimate: u64) -> Option<(Reservation, Option<Slot>)> {
        let hedge = self.shared.hedge.as_ref()?;
        // A backup to an endpoint already at its limit would only queue behind the primary.
        let slot = match &self.concurrency {
            Some(c) => Some(c.try_acquire()?),
            None => None,
        };
        if !hedge.try_take() {
            return None;
        }
        let Ok(r) = self.shared.budget.reserve(estimate, Utc::now()) else {
            hedge.refund();
            return None;
        };
        match self.shared.limiter.acquire_before(Instant::now()).await {
            Ok(_) => Some((r, slot)),
            Err(_) => {
                self.shared.budget.settle(r, 0, Utc::now());
                hedge.refund();
                None
            }
        }
    }

    /// The breaker learns from the attempt's result: an answer (even an unreadable one) means
    /// the service is up; timeouts, 5xx and transport errors count against it; 429s and
    /// refusals prove nothing either way — and neither does the timeout of a request that was
    /// queued behind others (`crowded`: sent beside others, or while the endpoint still works
    /// off calls given up on): an endpoint that serves one call at a time times out the calls
    /// queued behind the first, which is overload. The in-flight limit shrinks for it; the
    /// breaker would stop everything, the working calls too, and publish nothing. A hanging
    /// endpoint still opens it: once the limit is one and the backlog has drained, its calls
    /// go out alone and their timeouts count.
    fn judge<T>(
        &self,
        permit: Permit,
        out: Result<T, AgentError>,
        crowded: bool,
    ) -> Result<T, AgentError> {
        match &out {
            Ok(_) | Err(AgentError::InvalidOutput(_)) => {
                permit.success();
                self.shared.health.set_auth_error(None);
            }
            Err(e) if crowded && e.is_timeout() => drop(permit),
            Err(e) if e.is_breaker_failure() => permit.failure_because(e.to_string()),
            Err(_) => drop(permit),
        }
        out
    }
}
