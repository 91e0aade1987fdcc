//! The LLM call: what every LLM backend shares, as layers with one job each. Backends only
//! move bytes ([`Transport`]); everything else a stage call goes through is here, composed in
//! one place ([`LlmAgent::ask`]) in the order it applies, outermost first:
//!
//! | layer | file | its one job |
//! |---|---|---|
//! | prompt | [`prompt`] | the stage's system and user prompt, the schema, the reader of its answer |
//! | conversation | `rounds.rs` | the stage's turns: tool calls run and answered (at most `agents.max_tool_rounds`), one follow-up turn that shows a rejected answer its errors |
//! | cache | [`cache`] | replays only: a turn's reply by the key of what it sends, so a rerun asks the model nothing; `--max-calls` |
//! | retry | `retry.rs` | attempts within the stage's deadline; 429s retried at once (the limiter holds everyone), the rest with backoff; the first cause kept |
//! | admission | `admit.rs` | the token budget reserved → a rate-limit slot → an in-flight slot → the breaker; the breaker's verdict on what came back |
//! | hedge | `hedge.rs` | one identical backup request past the stage's p95, within `agents.hedge.max_extra_fraction` |
//! | send | `send.rs` | the per-call deadline, the latency sample, the reply read and counted, what a failure teaches (a 429 pauses everyone, a 401 flips readiness) |
//! | transport | `openrouter.rs`, `opencode.rs` | bytes |
//!
//! Failure classes:
//! - timeout, 5xx, transport → a breaker failure, retried with backoff within the deadline;
//! - 429 → every caller pauses for `Retry-After` (the shared limiter), not a breaker failure;
//! - 400/401/402/403 → no retry, one log line, counted; 401/402 also flip readiness;
//! - an answer is read by [`repair`](super::repair): derived fields derived, slips repaired,
//!   the untrustworthy rejected with a reason (`invalid_output`), never clamped or defaulted;
//!   every outcome counted (`agent_outputs_total{stage,outcome}`).
//!
//! Every failure has one label, [`AgentError::reason`]: the symbol's failure reason, the
//! backend's last error and the `outcome` of `llm_requests_total` all use it.
//!
//! Time: each request gets the per-call deadline (`timeouts.symbol_timeout_seconds`, the seed's
//! subagent timeout), retries happen within the stage's time (the cycle deadline), and a
//! request that runs past its stage's observed p95 may get one identical backup request.
//! Every answer and every timeout is a latency sample for the runner's gate; rate-limit waits
//! are not.
//!
//! Tokens: a call reserves its worst case in the budget before it is sent and settles after,
//! so the budget is never overshot by calls in flight.

mod admit;
mod budget;
pub mod cache;
mod health;
mod hedge;
mod prompt;
mod request;
mod retry;
mod rounds;
mod send;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

pub use budget::{BudgetWindow, Reservation, TokenBudget};
pub use cache::{CacheStats, ResponseCache};
pub use health::{LastError, LlmHealth, Tallies};
pub use prompt::{
    LlmReport, LlmSignal, advice_from_answer, signal_from_answer, signal_prompt, stage_schema,
    summary_from_answer, system_prompt,
};
pub use request::{
    LlmReply, LlmRequest, ToolCall, ToolRunner, Transport, Usage, strict_json, token_estimate,
};

use super::repair::Checked;
use super::rules::Rules;
use super::{Agent, AgentError, Answer, CallLimits, SignalDraft, SignalRequest};
use crate::config::StructuredOutput;
use crate::model::{Advice, AdvisedSignal, ScoredSignal, Stage};
use crate::resilience::rate_limit::AgentRateLimiter;
use crate::resilience::{Backoff, Breaker, CallLatencies, ConcurrencyLimit, HedgeBudget};
use crate::schedule::CycleId;

/// What the LLM agents of a process share.
pub struct LlmShared {
    /// Calls per minute across the process (or the fleet).
    pub limiter: Arc<dyn AgentRateLimiter>,
    /// Token budget.
    pub budget: Arc<TokenBudget>,
    /// Auth failures and token totals.
    pub health: Arc<LlmHealth>,
    /// Attempts per call.
    pub max_attempts: u32,
    /// Backoff between attempts.
    pub backoff: Backoff,
    /// Produce the stage with the rules backend while the breaker is open or the budget is
    /// spent (marked `is_degraded`).
    pub fallback_rules: bool,
    /// Per-call latency, read by the runner's gate and by hedging.
    pub latencies: CallLatencies,
    /// Backup requests for stragglers; `None` = hedging off.
    pub hedge: Option<Arc<HedgeBudget>>,
    /// Completion tokens allowed per call (sent as `max_tokens`, reserved in the budget).
    pub max_tokens: u32,
    /// Tools offered to models of transports that take them (`agents.tools: mcp`).
    pub tools: Option<Arc<dyn ToolRunner>>,
    /// Tool rounds one stage call may use before it must answer (`agents.max_tool_rounds`).
    pub max_tool_rounds: u32,
    /// Replies kept by what was sent (replays; `None` in the service, which always asks).
    pub cache: Option<Arc<ResponseCache>>,
}

impl std::fmt::Debug for LlmShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmShared")
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

/// One stage's LLM agent: a transport, a model, the breaker of its backend, shared discipline.
pub struct LlmAgent {
    transport: Arc<dyn Transport>,
    model: String,
    stage_timeout: Option<Duration>,
    breaker: Breaker,
    shared: Arc<LlmShared>,
    structured: StructuredOutput,
    /// The endpoint's learned in-flight limit (shared by the stages of one backend).
    concurrency: Option<ConcurrencyLimit>,
    /// The function definitions this stage's model is offered (a subset of the runner's
    /// tools; empty: none), and their names, the only calls it may make.
    functions: Vec<Value>,
    offered: Vec<String>,
}

impl std::fmt::Debug for LlmAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmAgent")
            .field("backend", &self.transport.backend())
            .field("model", &self.model)
            .finish()
    }
}

/// Reads a stage's answer (see [`repair`](super::repair)).
type Read<'a, T> = &'a (dyn Fn(&Value) -> Result<Checked<T>, String> + Sync);

/// What one request came back with: the stage's answer, or a request for tools.
enum Step<T> {
    Answer(Checked<T>),
    Tools(LlmReply),
}

impl LlmAgent {
    /// A stage agent.
    pub fn new(
        transport: Arc<dyn Transport>,
        model: String,
        stage_timeout: Option<Duration>,
        breaker: Breaker,
        shared: Arc<LlmShared>,
    ) -> Self {
        Self {
            transport,
            model,
            stage_timeout,
            breaker,
            shared,
            structured: StructuredOutput::Auto,
            concurrency: None,
            functions: vec![],
            offered: vec![],
        }
    }

    /// Offers this stage's model the runner's tools named in `names` (of those the shared
    /// [`ToolRunner`] defines; with no runner, none). Names it does not define are left out.
    pub fn with_tools(mut self, names: &[String]) -> Self {
        let Some(runner) = &self.shared.tools else {
            return self;
        };
        self.functions = runner
            .functions()
            .iter()
            .filter(|f| {
                f["function"]["name"]
                    .as_str()
                    .is_some_and(|n| names.iter().any(|x| x == n))
            })
            .cloned()
            .collect();
        self.offered = self
            .functions
            .iter()
            .filter_map(|f| f["function"]["name"].as_str().map(str::to_string))
            .collect();
        self
    }

    /// Requests to this agent's endpoint wait for a slot of `limit` (learned from latency)
    /// before they go out.
    pub fn with_concurrency_limit(mut self, limit: ConcurrencyLimit) -> Self {
        self.concurrency = Some(limit);
        self
    }

    /// How this stage asks the endpoint for JSON (`agents.structured_output`, or the stage's).
    pub fn with_structured_output(mut self, mode: StructuredOutput) -> Self {
        self.structured = mode;
        self
    }

    /// One stage call through the whole stack (see the module docs): the prompt is made into
    /// a request, the conversation layer runs its turns, each turn is retried within the
    /// stage's time, each attempt is admitted, maybe hedged, and sent. The layers below are
    /// `rounds::converse` → `cache::remembered` → `retry::retrying` → `admit::attempt` → `hedge::hedged` →
    /// `send::timed_call` / `send::read_reply`.
    async fn ask<T>(
        &self,
        stage: Stage,
        symbol: &str,
        cycle_id: CycleId,
        user: String,
        limits: CallLimits,
        read: Read<'_, T>,
    ) -> Result<Answer<T>, AgentError> {
        let limits = CallLimits {
            per_call: self.stage_timeout.unwrap_or(limits.per_call),
            ..limits
        };
        let functions: &[Value] = if self.transport.takes_tools() {
            &self.functions
        } else {
            &[]
        };
        let req = LlmRequest {
            stage,
            symbol,
            cycle_id,
            system: system_prompt(stage),
            user: prompt::with_schema(stage, user),
            schema_name: prompt::schema_name(stage),
            schema: stage_schema(stage),
            model: &self.model,
            max_tokens: self.shared.max_tokens,
            tools: functions,
            conversation: vec![],
            structured: self.structured,
        };
        let (checked, tools_used) = self.converse(req, limits, read).await?;
        Ok(Answer {
            value: checked.value,
            model: self.model.clone(),
            degraded: false,
            tools_used,
        })
    }

    /// Whether the rules backend stands in for a failed call: only for the failures that
    /// say the model is not to be asked now (breaker open, budget spent), and when
    /// configured.
    fn fallback_applies(&self, e: &AgentError) -> bool {
        self.shared.fallback_rules
            && matches!(
                e,
                AgentError::CircuitOpen(_) | AgentError::BudgetExhausted(_)
            )
    }
}

/// The rules backend's answer, marked as standing in for the model.
fn degraded<T>(value: T) -> Answer<T> {
    Answer {
        value,
        model: "rules".into(),
        degraded: true,
        tools_used: vec![],
    }
}

#[async_trait]
impl Agent for LlmAgent {
    fn backend(&self) -> &'static str {
        self.transport.backend()
    }

    fn model(&self) -> &str {
        &self.model
    }

    async fn signal(
        &self,
        req: &SignalRequest<'_>,
        limits: CallLimits,
    ) -> Result<Answer<SignalDraft>, AgentError> {
        // The prompt shows the strategies' verdicts; the reader fills the signal from them.
        let read = |v: &Value| signal_from_answer(v, req.verdicts);
        match self
            .ask(
                Stage::Signal,
                req.symbol,
                req.cycle_id,
                signal_prompt(req, req.verdicts),
                limits,
                &read,
            )
            .await
        {
            Err(e) if self.fallback_applies(&e) => Rules::analyse(req).map(degraded),
            r => r,
        }
    }

    async fn advise(
        &self,
        scored: &ScoredSignal,
        limits: CallLimits,
    ) -> Result<Answer<Advice>, AgentError> {
        let s = &scored.signal;
        match self
            .ask(
                Stage::Advise,
                &s.symbol,
                s.cycle_id,
                prompt::scored_prompt(scored),
                limits,
                &advice_from_answer,
            )
            .await
        {
            Err(e) if self.fallback_applies(&e) => Ok(degraded(Rules::advice(scored))),
            r => r,
        }
    }

    async fn report(
        &self,
        advised: &AdvisedSignal,
        limits: CallLimits,
    ) -> Result<Answer<String>, AgentError> {
        let s = &advised.scored.signal;
        match self
            .ask(
                Stage::Report,
                &s.symbol,
                s.cycle_id,
                prompt::report_prompt(advised),
                limits,
                &summary_from_answer,
            )
            .await
        {
            Err(e) if self.fallback_applies(&e) => Ok(degraded(Rules::summary(advised))),
            r => r,
        }
    }
}
