//! The retry layer: attempts of one turn within the stage's deadline. A 429 is retried at
//! once (the shared limiter already holds every caller until `Retry-After`); timeouts, 5xx and
//! transport errors after a backoff; nothing else. The error returned is the cause: a retry
//! that found the breaker open (or no rate-limit slot) failed because of what the earlier
//! attempt met, and says that, not "circuit open".

use std::sync::Mutex;
use std::time::Duration;

use super::{LlmAgent, LlmRequest, Read, Step};
use crate::agents::{AgentError, CallLimits};
use crate::resilience::retry_until;

impl LlmAgent {
    /// One turn, attempted up to `agents.max_attempts` times before `limits.until`.
    pub(super) async fn retrying<T>(
        &self,
        req: &LlmRequest<'_>,
        limits: CallLimits,
        read: Read<'_, T>,
    ) -> Result<Step<T>, AgentError> {
        let backoff = self.shared.backoff;
        let first_failure: Mutex<Option<AgentError>> = Mutex::new(None);
        retry_until(
            self.shared.max_attempts,
            limits.until,
            |e: &AgentError, n| match e {
                AgentError::RateLimited { .. } => Some(Duration::ZERO),
                e if e.is_retryable() => Some(backoff.delay(n)),
                _ => None,
            },
            |_| async {
                let r = self.attempt(req, limits, read).await;
                if let Err(e) = &r {
                    let mut first = first_failure.lock().unwrap_or_else(|p| p.into_inner());
                    if first.is_none() && !e.is_consequence() {
                        *first = Some(e.clone());
                    }
                }
                r
            },
        )
        .await
        .map_err(|last| {
            let first = first_failure
                .into_inner()
                .unwrap_or_else(|p| p.into_inner());
            match first {
                Some(cause) if last.is_consequence() => cause,
                _ => last,
            }
        })
    }
}
