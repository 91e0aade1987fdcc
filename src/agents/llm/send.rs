//! The send layer: one request to the transport under its per-call deadline, timed (answers
//! and the call's own timeouts are latency samples; a fast refusal says nothing about how slow
//! the model is), and what comes back read and counted — the answer checked, the tokens spent,
//! and a failure's lesson: a 429 pauses every caller, a refused key flips readiness.

use std::time::Duration;

use chrono::Utc;
use tokio::time::Instant;

use super::prompt::schema_name;
use super::{LastError, LlmAgent, LlmReply, LlmRequest, Read, Step};
use crate::agents::repair::Outcome;
use crate::agents::{AgentError, CallLimits};
use crate::resilience::{CallEnd, Slot};
use crate::telemetry::names;

impl LlmAgent {
    /// One request, timed; its in-flight slot learns how it ended.
    pub(super) async fn timed_call(
        &self,
        req: &LlmRequest<'_>,
        limits: CallLimits,
        deadline: Instant,
        slot: Option<Slot>,
    ) -> Result<LlmReply, AgentError> {
        let t0 = Instant::now();
        let r = match tokio::time::timeout_at(deadline, self.transport.call(req, deadline)).await {
            Ok(r) => r,
            Err(_) => Err(AgentError::Timeout(None)),
        };
        // A timeout is a sample only when it was the call's own: one cut short by the cycle
        // deadline would understate how slow the model is.
        let own_timeout = deadline < limits.until;
        // Said with the time it had: "no answer within 10 s" tells an operator which limit
        // to look at; "timed out" does not.
        let r = match r {
            Err(AgentError::Timeout(None)) => Err(AgentError::Timeout(Some(
                deadline.saturating_duration_since(t0),
            ))),
            r => r,
        };
        let took = Instant::now().duration_since(t0);
        if let Some(slot) = slot {
            // What the endpoint's in-flight limit learns: an answer and how long it took of
            // the time it had; its own timeout; anything else says nothing about capacity.
            slot.finish(match &r {
                Ok(_) => CallEnd::Answered { took },
                Err(AgentError::Timeout(_)) if own_timeout => CallEnd::TimedOut { waited: took },
                Err(_) => CallEnd::Neutral,
            });
        }
        if r.is_ok() || (matches!(r, Err(AgentError::Timeout(_))) && own_timeout) {
            let stage = req.stage.as_str();
            self.shared.latencies.record(stage, took);
            metrics::histogram!(names::AGENT_CALL_DURATION_SECONDS, "stage" => stage, "backend" => self.transport.backend())
                .record(took.as_secs_f64());
        }
        r
    }

    /// Reads a reply: spends its tokens, counts the outcome, checks the answer.
    pub(super) fn read_reply<T>(
        &self,
        req: &LlmRequest<'_>,
        reply: &LlmReply,
        read: Read<'_, T>,
    ) -> Result<Step<T>, AgentError> {
        let stage = req.stage.as_str();
        self.shared
            .health
            .add_tokens(reply.usage.input + reply.usage.output);
        metrics::counter!(names::LLM_TOKENS, "stage" => stage, "kind" => "input")
            .increment(reply.usage.input);
        metrics::counter!(names::LLM_TOKENS, "stage" => stage, "kind" => "output")
            .increment(reply.usage.output);
        if !reply.tool_calls.is_empty() {
            self.shared.health.count_request(stage, "ok");
            return Ok(Step::Tools(reply.clone()));
        }
        let r = read(&reply.json);
        let outcome = match &r {
            Ok(c) => c.outcome(),
            Err(_) => Outcome::Rejected,
        };
        self.shared.health.count_output(stage, outcome.as_str());
        match r {
            Ok(c) => {
                if !c.repairs.is_empty() {
                    tracing::info!(stage, symbol = req.symbol, repairs = %c.repairs.join("; "), "model answer repaired");
                }
                self.shared.health.count_request(stage, "ok");
                Ok(Step::Answer(c))
            }
            Err(reason) => {
                tracing::warn!(stage, symbol = req.symbol, reason = %reason, "model answer rejected");
                let e = AgentError::InvalidOutput(reason);
                self.remember_error(req, &e);
                self.shared.health.count_request(stage, e.reason().as_str());
                Err(e)
            }
        }
    }

    /// What a failed request means beyond its own result: a 429 pauses everyone, a refusal
    /// of the key flips readiness; every failed request is counted once by its reason.
    pub(super) fn on_request_error(&self, req: &LlmRequest<'_>, e: &AgentError) {
        let stage = req.stage.as_str();
        self.remember_error(req, e);
        match e {
            AgentError::RateLimited { retry_after } => {
                let pause = retry_after.unwrap_or(Duration::from_secs(1));
                tracing::warn!(
                    stage,
                    pause_s = pause.as_secs_f64(),
                    "LLM provider rate-limited us; pausing all calls"
                );
                self.shared.limiter.pause(pause);
            }
            AgentError::Refused { status, message } => {
                tracing::error!(stage, status, provider_message = %message, backend = self.transport.backend(), "LLM provider refused the call; not retrying");
                if *status == 401 || *status == 402 {
                    self.shared.health.set_auth_error(Some(format!(
                        "{} answered HTTP {status}: {}",
                        self.transport.backend(),
                        if *status == 401 {
                            "the API key was rejected"
                        } else {
                            "the account is out of credit"
                        }
                    )));
                }
            }
            AgentError::InvalidOutput(reason) => {
                // An answer the transport could not even read as JSON (prose, a fence, HTML,
                // an oversized or empty body): rejected like any other.
                tracing::warn!(stage, reason = %reason, "model answer rejected");
                self.shared
                    .health
                    .count_output(stage, Outcome::Rejected.as_str());
            }
            _ => {}
        }
        self.shared.health.count_request(stage, e.reason().as_str());
    }

    /// Keeps `e` as the backend's last error, with the symbol and tick it was for.
    fn remember_error(&self, req: &LlmRequest<'_>, e: &AgentError) {
        self.shared.health.set_last_error(
            self.transport.backend(),
            LastError {
                at: Utc::now(),
                stage: schema_name(req.stage),
                symbol: req.symbol.to_string(),
                cycle_id: req.cycle_id.to_string(),
                reason: e.reason(),
                error: crate::telemetry::redact(&e.to_string())
                    .chars()
                    .take(crate::agents::MAX_BODY_EXCERPT + 100)
                    .collect(),
            },
        );
    }
}
