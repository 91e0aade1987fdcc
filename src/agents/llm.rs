//! What every LLM backend shares: the rate limit, the circuit breaker, retries within the
//! deadline, the token budget, the degraded-mode fallback, the stage schemas and prompts, and
//! strict parsing of every answer. Backends only move bytes ([`Transport`]).
//!
//! Failure classes:
//! - timeout, 5xx, transport → a breaker failure, retried with backoff within the deadline;
//! - 429 → every caller pauses for `Retry-After` (the shared limiter), not a breaker failure;
//! - 400/401/402/403 → no retry, one log line, counted; 401/402 also flip readiness;
//! - an answer is read by [`repair`]: derived fields derived, slips repaired,
//!   the untrustworthy rejected with a reason (`invalid_output`), never clamped or defaulted;
//!   every outcome counted (`agent_outputs_total{stage,outcome}`).
//!
//! Time: each request gets the per-call deadline (`timeouts.symbol_timeout_seconds`, the seed's
//! subagent timeout), retries happen within the stage's time (the cycle deadline), and a
//! request that runs past its stage's observed p95 may get one identical backup request
//! (hedging, bounded by `agents.hedge.max_extra_fraction`). Every answer and every timeout is
//! a latency sample for the runner's gate; rate-limit waits are not.
//!
//! Tokens: a call reserves its worst case in the budget before it is sent and settles after,
//! so the budget is never overshot by calls in flight.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::schedule::CycleId;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::repair::{self, Checked, Outcome};
use super::rules::Rules;
use super::{
    Agent, AgentError, Answer, CallLimits, SignalDraft, SignalRequest, validate_advice,
    validate_summary,
};
use crate::config::StructuredOutput;
use crate::model::{Action, Advice, AdvisedSignal, ScoredSignal, Stage, StrategyVerdict};
use crate::resilience::rate_limit::AgentRateLimiter;
use crate::resilience::{
    Backoff, Breaker, CallEnd, CallLatencies, ConcurrencyLimit, HedgeBudget, Permit, Slot,
    retry_until,
};
use crate::telemetry::names;

/// Token counts of one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub input: u64,
    /// Completion tokens.
    pub output: u64,
}

/// One structured request to a model.
#[derive(Debug, Clone)]
pub struct LlmRequest<'a> {
    /// Which stage.
    pub stage: Stage,
    /// The symbol (sessions are titled with it).
    pub symbol: &'a str,
    /// The tick.
    pub cycle_id: CycleId,
    /// System prompt.
    pub system: &'static str,
    /// User prompt.
    pub user: String,
    /// Schema name (`signal`, `advice`, `report`).
    pub schema_name: &'static str,
    /// The JSON schema the answer must follow.
    pub schema: &'static Value,
    /// Model to use.
    pub model: &'a str,
    /// Completion tokens allowed.
    pub max_tokens: u32,
    /// Function definitions the model may call (`agents.tools: mcp`); empty: none.
    pub tools: &'a [Value],
    /// The tool rounds so far: each round's assistant message and the tool results, in
    /// order, sent after the system and user messages.
    pub conversation: Vec<Value>,
    /// How the endpoint is asked for JSON (the OpenAI-compatible transport reads it).
    pub structured: StructuredOutput,
}

/// A model's structured answer.
#[derive(Debug, Clone)]
pub struct LlmReply {
    /// The parsed JSON (not yet checked against the schema); `Null` when the model asked for
    /// tools instead.
    pub json: Value,
    /// Tokens used.
    pub usage: Usage,
    /// Tool calls the model asked for (only when it was offered tools).
    pub tool_calls: Vec<ToolCall>,
    /// The assistant message that asked for them, to send back with their results.
    pub assistant: Value,
}

impl LlmReply {
    /// A plain answer.
    pub fn answer(json: Value, usage: Usage) -> Self {
        LlmReply {
            json,
            usage,
            tool_calls: vec![],
            assistant: Value::Null,
        }
    }
}

/// One function call a model asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The provider's id of the call (echoed with its result).
    pub id: String,
    /// The tool's name.
    pub name: String,
    /// Its arguments, as the model wrote them (JSON text, possibly invalid).
    pub arguments: String,
}

/// Tools a model may call, run in process (`agents.tools: mcp`): the same tools the MCP
/// server offers, implemented above this layer and handed in.
#[async_trait]
pub trait ToolRunner: Send + Sync {
    /// OpenAI-style function definitions of every tool, made once, in the short form a model
    /// is offered: `[{"type": "function", "function": {"name", "description", "parameters"}}]`.
    /// Each stage's agent offers the subset it is configured with.
    fn functions(&self) -> &[Value];
    /// Runs one call. `Err` carries the coded error body the model is shown.
    async fn run(&self, name: &str, arguments: &Value) -> Result<Value, Value>;
}

/// Moves one request to a model and back. Implementations classify failures into
/// [`AgentError`]; they never retry (the caller does, within its deadline).
#[async_trait]
pub trait Transport: Send + Sync {
    /// Backend name (`openrouter`, `opencode`).
    fn backend(&self) -> &'static str;
    /// One call.
    async fn call(&self, req: &LlmRequest<'_>, deadline: Instant) -> Result<LlmReply, AgentError>;
    /// Readiness of the backend itself (`Ok` when it answers).
    async fn health(&self) -> Result<(), String>;
    /// Waits (up to `timeout`) for background work such as session clean-ups (shutdown).
    async fn drain(&self, _timeout: Duration) {}
    /// Whether requests may carry function definitions for in-process tools (OpenCode
    /// reaches the tools itself, over MCP).
    fn takes_tools(&self) -> bool {
        false
    }
}

// ---------------------------------------------------------------------------------------------
// Answers as the model must give them (the schemas are generated from these types).

/// The signal stage's answer: the model's judgment and nothing the runner already holds.
/// The symbol, the strategy breakdown and its counts, the top strategy's score and
/// parameters, the market context and the ids are filled by the runner: a model asked to
/// copy them miscopies them (scores of 1.2, empty names, the symbol as "USD"), and every
/// copied token costs time.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmSignal {
    /// BUY, SELL or HOLD.
    pub action: Action,
    /// The probability, 0–1, that the call is right.
    pub confidence: f64,
    /// Why, in at most 2000 characters.
    pub reasoning: String,
    /// The strategies the call relies on, most important first.
    pub strategies: Vec<String>,
}

/// The report stage's answer.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmReport {
    /// Two or three sentences for the dashboard.
    pub summary: String,
}

/// The signal schema: [`LlmSignal`]'s, with `strategies` an enum of the runner's strategy
/// names (a model picks, it does not spell).
fn signal_schema() -> Value {
    let mut v = schema_of::<LlmSignal>();
    v["properties"]["strategies"]["items"] =
        json!({"type": "string", "enum": super::rules::strategy_names()});
    v
}

fn schema_of<T: schemars::JsonSchema>() -> Value {
    let mut v: Value = schemars::generate::SchemaSettings::draft07()
        .with(|s| s.inline_subschemas = true)
        .into_generator()
        .into_root_schema_for::<T>()
        .into();
    if let Some(o) = v.as_object_mut() {
        // Providers reject or ignore these in `response_format`.
        o.remove("$schema");
        o.remove("title");
    }
    consts_to_enums(&mut v);
    v
}

/// Documented enum variants come out as `oneOf: [{const: …}, …]`; strict structured-output
/// modes accept `enum` but not `oneOf`.
fn consts_to_enums(v: &mut Value) {
    match v {
        Value::Object(o) => {
            let consts: Option<Vec<Value>> = o
                .get("oneOf")
                .and_then(Value::as_array)
                .and_then(|alts| alts.iter().map(|a| a.get("const").cloned()).collect());
            if let Some(values) = consts {
                o.remove("oneOf");
                o.insert("type".into(), json!("string"));
                o.insert("enum".into(), Value::Array(values));
            }
            o.values_mut().for_each(consts_to_enums);
        }
        Value::Array(a) => a.iter_mut().for_each(consts_to_enums),
        _ => {}
    }
}

/// The JSON schema of a stage's answer, generated once from the Rust types.
pub fn stage_schema(stage: Stage) -> &'static Value {
    static SIGNAL: OnceLock<Value> = OnceLock::new();
    static ADVICE: OnceLock<Value> = OnceLock::new();
    static REPORT: OnceLock<Value> = OnceLock::new();
    match stage {
        Stage::Signal | Stage::Score => SIGNAL.get_or_init(signal_schema),
        Stage::Advise => ADVICE.get_or_init(schema_of::<Advice>),
        Stage::Report => REPORT.get_or_init(schema_of::<LlmReport>),
    }
}

fn schema_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Signal | Stage::Score => "signal",
        Stage::Advise => "advice",
        Stage::Report => "report",
    }
}

const SIGNAL_SYSTEM: &str = "You are signal-generator, a crypto market analyst. You receive one symbol's market snapshot (price, 1-hour change, volatility, volume) and the verdicts of classic technical strategies computed from its 1-minute candles. Weigh them and decide BUY, SELL or HOLD with a calibrated confidence between 0 and 1 (the probability that the call is right), and name the strategies your call relies on, most important first. Answer only with the JSON object the schema describes; keep the reasoning under 2000 characters.";
const ADVISE_SYSTEM: &str = "You are portfolio-advisor, a risk manager. You receive a scored trading signal. Decide whether it is valid to act on, the largest position as a fraction of the portfolio (0 to 1; 0 when not valid), and the concrete risks. Answer only with the JSON object the schema describes.";
const REPORT_SYSTEM: &str = "You are report-generator. Write a 2–3 sentence plain-text summary of a trading signal for a dashboard: the call, its confidence and opportunity score, the main reason, and the advisor's view if any. Answer only with the JSON object the schema describes.";

/// System prompt of a stage.
pub fn system_prompt(stage: Stage) -> &'static str {
    match stage {
        Stage::Signal | Stage::Score => SIGNAL_SYSTEM,
        Stage::Advise => ADVISE_SYSTEM,
        Stage::Report => REPORT_SYSTEM,
    }
}

/// The signal prompt: everything the model needs, without tools; `verdicts` are the
/// strategies the runner evaluated on these candles.
pub fn signal_prompt(req: &SignalRequest<'_>, verdicts: &[(StrategyVerdict, Value)]) -> String {
    let verdicts: Vec<Value> = verdicts
        .iter()
        .map(|(v, params)| json!({"strategy": v.name, "signal": v.signal, "hit_rate": round4(v.score), "parameters": params}))
        .collect();
    let recent: Vec<Value> = req
        .candles
        .iter()
        .rev()
        .take(10)
        .map(|c| json!({"time": c.time, "close": c.close, "volume": round4(c.volume)}))
        .collect();
    let ctx = req.context;
    format!(
        "Symbol: {}\nCycle: {}\nMarket snapshot: {}\nStrategy verdicts (hit rate over the last 30 minutes): {}\nLast 10 one-minute candles, newest first: {}",
        req.symbol,
        req.cycle_id,
        json!({
            "current_price": ctx.current_price,
            "price_change_1h": round4(ctx.price_change_1h),
            "volatility_1h": round4(ctx.volatility_1h),
            "volume_ratio": round4(ctx.volume_ratio),
            "candles_analysed": req.candles.len(),
        }),
        Value::Array(verdicts),
        Value::Array(recent),
    )
}

fn round4(v: f64) -> f64 {
    (v * 10_000.0).round() / 10_000.0
}

fn scored_prompt(s: &ScoredSignal) -> String {
    let sig = &s.signal;
    format!(
        "Symbol: {}\nCycle: {}\nSignal: {}",
        sig.symbol,
        sig.cycle_id,
        json!({
            "action": sig.action,
            "confidence": sig.confidence,
            "reasoning": sig.reasoning,
            "strategies_bullish": sig.strategies_bullish,
            "strategies_bearish": sig.strategies_bearish,
            "strategies_neutral": sig.strategies_neutral,
            "market_context": sig.market_context,
            "opportunity_score": s.opportunity_score,
            "opportunity_tier": s.opportunity_tier,
            "market_regime": s.market_regime,
        })
    )
}

fn report_prompt(a: &AdvisedSignal) -> String {
    let mut p = scored_prompt(&a.scored);
    match &a.advice {
        Some(adv) => p.push_str(&format!("\nAdvisor: {}", json!(adv))),
        None => p.push_str("\nAdvisor: not consulted (score below the advisory threshold)."),
    }
    p
}

// ---------------------------------------------------------------------------------------------
// Shared discipline.

/// Token budget per clock hour and per UTC day. `None` = unlimited.
///
/// A call reserves its worst case before it is sent (an upper bound of its prompt plus
/// `max_tokens`) and settles to what the provider reports after. A call is refused when its
/// reservation would not fit beside what was spent and what calls in flight have reserved, so
/// the spent total never exceeds the budget — however many calls run at once — as long as the
/// provider honours `max_tokens`.
#[derive(Debug, Default)]
pub struct TokenBudget {
    per_hour: Option<u64>,
    per_day: Option<u64>,
    state: Mutex<BudgetState>,
}

#[derive(Debug, Default)]
struct BudgetState {
    hour: i64,
    hour_used: u64,
    day: i64,
    day_used: u64,
    /// Reserved by calls in flight (counted against both windows).
    reserved: u64,
    /// The last reservation asked for: a window with less than this left is spent.
    typical: u64,
}

/// Which window is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetWindow {
    /// The clock hour.
    Hour,
    /// The UTC day.
    Day,
}

impl BudgetWindow {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetWindow::Hour => "hour",
            BudgetWindow::Day => "day",
        }
    }
}

/// Tokens set aside for one call in flight; give it back with [`TokenBudget::settle`].
///
/// A reservation dropped unsettled — the call was cancelled in flight, at a deadline or by
/// shutdown — is charged in full: the provider may well bill a request we stopped waiting
/// for, and charging the worst case keeps the budget from being overshot.
#[must_use = "settle a reservation with what the call used"]
pub struct Reservation {
    budget: Option<Arc<TokenBudget>>,
    tokens: u64,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("tokens", &self.tokens)
            .finish()
    }
}

impl PartialEq for Reservation {
    fn eq(&self, other: &Self) -> bool {
        self.tokens == other.tokens
    }
}

impl Reservation {
    /// Tokens reserved.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(b) = self.budget.take() {
            b.finish(self.tokens, self.tokens, Utc::now());
        }
    }
}

impl TokenBudget {
    /// A budget; zero or `None` means no limit for that window.
    pub fn new(per_hour: Option<u64>, per_day: Option<u64>) -> Self {
        Self {
            per_hour: per_hour.filter(|v| *v > 0),
            per_day: per_day.filter(|v| *v > 0),
            ..Default::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn roll(st: &mut BudgetState, now: DateTime<Utc>) {
        let (h, d) = (
            now.timestamp().div_euclid(3600),
            now.timestamp().div_euclid(86_400),
        );
        if st.hour != h {
            st.hour = h;
            st.hour_used = 0;
        }
        if st.day != d {
            st.day = d;
            st.day_used = 0;
        }
    }

    /// The first window in which `tokens` more would not fit.
    fn would_overflow(&self, st: &BudgetState, tokens: u64) -> Option<BudgetWindow> {
        let fits = |limit: Option<u64>, used: u64| {
            limit.is_none_or(|l| used.saturating_add(st.reserved).saturating_add(tokens) <= l)
        };
        if !fits(self.per_day, st.day_used) {
            Some(BudgetWindow::Day)
        } else if !fits(self.per_hour, st.hour_used) {
            Some(BudgetWindow::Hour)
        } else {
            None
        }
    }

    /// Sets `tokens` aside for a call, or says which window cannot hold them.
    pub fn reserve(
        self: &Arc<Self>,
        tokens: u64,
        now: DateTime<Utc>,
    ) -> Result<Reservation, BudgetWindow> {
        let mut st = self.lock();
        Self::roll(&mut st, now);
        st.typical = tokens;
        if let Some(w) = self.would_overflow(&st, tokens) {
            return Err(w);
        }
        st.reserved += tokens;
        Ok(Reservation {
            budget: Some(self.clone()),
            tokens,
        })
    }

    /// The call is over: its reservation is released and `used` tokens are spent.
    pub fn settle(&self, mut r: Reservation, used: u64, now: DateTime<Utc>) {
        r.budget = None;
        self.finish(r.tokens, used, now);
    }

    fn finish(&self, reserved: u64, used: u64, now: DateTime<Utc>) {
        let mut st = self.lock();
        Self::roll(&mut st, now);
        st.reserved = st.reserved.saturating_sub(reserved);
        if used > reserved {
            // Only a provider that ignores `max_tokens` gets here; it is charged all the same.
            tracing::warn!(
                used,
                reserved,
                "an LLM call used more tokens than it reserved"
            );
        }
        st.hour_used += used;
        st.day_used += used;
    }

    /// The spent window, if any: one with less left than a typical call reserves.
    pub fn exhausted(&self, now: DateTime<Utc>) -> Option<BudgetWindow> {
        let mut st = self.lock();
        Self::roll(&mut st, now);
        let typical = st.typical.max(1);
        let saved = std::mem::take(&mut st.reserved);
        let w = self.would_overflow(&st, typical);
        st.reserved = saved;
        w
    }

    /// `(hour_used, day_used)`.
    pub fn used(&self, now: DateTime<Utc>) -> (u64, u64) {
        let mut st = self.lock();
        Self::roll(&mut st, now);
        (st.hour_used, st.day_used)
    }

    /// Tokens reserved by calls in flight.
    pub fn reserved(&self) -> u64 {
        self.lock().reserved
    }

    /// Configured limits `(per_hour, per_day)`.
    pub fn limits(&self) -> (Option<u64>, Option<u64>) {
        (self.per_hour, self.per_day)
    }
}

/// Health facts the LLM path learns and readiness reports.
#[derive(Debug, Default)]
pub struct LlmHealth {
    auth_error: Mutex<Option<String>>,
    tokens_total: AtomicU64,
    /// This process's own tallies: the Prometheus recorder is process-wide, but an operator
    /// comparing replicas (and a test running several apps in one process) wants each one's.
    tallies: Mutex<Tallies>,
    /// The last failed request per backend: what an operator asks first when symbols fail.
    last_errors: Mutex<BTreeMap<&'static str, LastError>>,
}

/// The last failed request of a backend, as `/health/detailed` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LastError {
    /// When it came back.
    pub at: DateTime<Utc>,
    /// The stage (`signal`, `advice`, `report`).
    pub stage: &'static str,
    /// The symbol asked about.
    pub symbol: String,
    /// The tick.
    pub cycle_id: String,
    /// Bounded reason (`timeout`, `llm_5xx`, `llm_unreachable`, …).
    pub reason: &'static str,
    /// What happened, redacted: the status and the start of the body, the refused
    /// `host:port`, the time limit that passed.
    pub error: String,
}

/// Counts since start, by bounded labels only.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Tallies {
    /// Model answers by stage and outcome (`accepted`, `repaired`, `rejected`).
    pub outputs: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
    /// Requests by how they ended (`ok`, `timeout`, `rate_limited`, `refused`, …).
    pub requests: BTreeMap<&'static str, u64>,
    /// Follow-up turns after a rejected answer, by outcome (`fixed`, `still_invalid`,
    /// `failed`).
    pub reprompts: BTreeMap<&'static str, u64>,
}

impl LlmHealth {
    /// A 401/402 seen and not yet followed by a success: the key is bad or out of credit.
    pub fn auth_error(&self) -> Option<String> {
        self.auth_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    fn set_auth_error(&self, e: Option<String>) {
        *self.auth_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }
    /// Tokens used since start (per-cycle figures are differences of this).
    pub fn tokens_total(&self) -> u64 {
        self.tokens_total.load(Ordering::Relaxed)
    }
    /// The last failed request of each backend.
    pub fn last_errors(&self) -> BTreeMap<&'static str, LastError> {
        self.last_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    fn set_last_error(&self, backend: &'static str, e: LastError) {
        self.last_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(backend, e);
    }
    /// This process's answers and requests since start.
    pub fn tallies(&self) -> Tallies {
        self.tallies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    fn count_output(&self, stage: &'static str, outcome: &'static str) {
        metrics::counter!(names::AGENT_OUTPUTS, "stage" => stage, "outcome" => outcome)
            .increment(1);
        let mut t = self.tallies.lock().unwrap_or_else(|p| p.into_inner());
        *t.outputs
            .entry(stage)
            .or_default()
            .entry(outcome)
            .or_default() += 1;
    }
    fn count_reprompt(&self, outcome: &'static str) {
        let mut t = self.tallies.lock().unwrap_or_else(|p| p.into_inner());
        *t.reprompts.entry(outcome).or_default() += 1;
    }
    fn count_request(&self, stage: &'static str, outcome: &'static str) {
        metrics::counter!(names::LLM_REQUESTS, "stage" => stage, "outcome" => outcome).increment(1);
        let mut t = self.tallies.lock().unwrap_or_else(|p| p.into_inner());
        *t.requests.entry(outcome).or_default() += 1;
    }
}

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

fn outcome_label(e: &AgentError) -> &'static str {
    match e {
        AgentError::Timeout(_) => "timeout",
        AgentError::Transport(_) => "transport",
        AgentError::Upstream { .. } => "error_5xx",
        AgentError::RateLimited { .. } => "rate_limited",
        AgentError::Refused { .. } => "refused",
        AgentError::InvalidOutput(_) => "invalid_output",
        AgentError::CircuitOpen(_) => "circuit_open",
        AgentError::NoCapacity(_) => "capacity",
        AgentError::RateLimitWait => "rate_limit_wait",
        AgentError::BudgetExhausted(_) => "budget_exhausted",
        AgentError::MarketData(_) => "market_data",
    }
}

/// Reads a stage's answer (see [`repair`](super::repair)).
type Read<'a, T> = &'a (dyn Fn(&Value) -> Result<Checked<T>, String> + Sync);

/// An upper bound of the tokens a request can use: its prompt bytes (a byte-level BPE token
/// covers at least one byte), the schema (which providers add to the prompt), a margin for
/// the chat template, and the completion limit.
pub fn token_estimate(req: &LlmRequest<'_>) -> u64 {
    let tools: usize = req.tools.iter().map(|t| t.to_string().len()).sum();
    let conversation: usize = req.conversation.iter().map(|m| m.to_string().len()).sum();
    let prompt =
        req.system.len() + req.user.len() + req.schema.to_string().len() + tools + conversation;
    prompt as u64 + 64 + u64::from(req.max_tokens)
}

/// The follow-up turn after a rejected answer: what was wrong, and what to do.
fn reprompt_text(reason: &str) -> String {
    format!(
        "Your answer was rejected: {reason}. Answer again with exactly one corrected JSON object that follows the schema, and nothing else."
    )
}

/// What one request came back with: the stage's answer, or a request for tools.
enum Step<T> {
    Answer(Checked<T>),
    Tools(LlmReply),
}

/// Which of two identical requests a result came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leg {
    Primary,
    Backup,
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

    /// One structured call with the whole discipline: retries within the stage's time, each
    /// request bounded by the per-call deadline, the answer read by `read`.
    async fn ask<T>(
        &self,
        stage: Stage,
        symbol: &str,
        cycle_id: CycleId,
        user: String,
        limits: CallLimits,
        read: Read<'_, T>,
    ) -> Result<Answer<T>, AgentError> {
        let per_call = match self.stage_timeout {
            Some(t) => t,
            None => limits.per_call,
        };
        let limits = CallLimits { per_call, ..limits };
        let functions: &[Value] = if self.transport.takes_tools() {
            &self.functions
        } else {
            &[]
        };
        // The schema in the prompt in every mode: an endpoint that takes no `response_format`
        // (or ignores it) still tells the model what to write.
        let user = format!(
            "{user}\n\nAnswer with exactly one JSON object, no prose and no code fence, that follows this JSON Schema:\n{}",
            stage_schema(stage)
        );
        let mut req = LlmRequest {
            stage,
            symbol,
            cycle_id,
            system: system_prompt(stage),
            user,
            schema_name: schema_name(stage),
            schema: stage_schema(stage),
            model: &self.model,
            max_tokens: self.shared.max_tokens,
            tools: functions,
            conversation: vec![],
            structured: self.structured,
        };
        let backoff = self.shared.backoff;
        let mut tools_used: Vec<String> = vec![];
        let mut round = 0;
        // One follow-up turn per stage call shows the model what was wrong with an answer
        // that was rejected; the answer it rejected is kept here by the reader.
        let mut reprompted = false;
        let rejected: Mutex<Option<Value>> = Mutex::new(None);
        let tracked = |v: &Value| {
            let r = read(v);
            if r.is_err() {
                *rejected.lock().unwrap_or_else(|p| p.into_inner()) = Some(v.clone());
            }
            r
        };
        let read: Read<'_, T> = &tracked;
        loop {
            // Each round is a request like any other: budget, rate limit, breaker, retries,
            // all within the stage's deadline.
            let first_failure: Mutex<Option<AgentError>> = Mutex::new(None);
            let step = retry_until(
                self.shared.max_attempts,
                limits.until,
                |e: &AgentError, n| match e {
                    // The limiter already holds everyone until Retry-After: retry at once.
                    AgentError::RateLimited { .. } => Some(Duration::ZERO),
                    e if e.is_retryable() => Some(backoff.delay(n)),
                    _ => None,
                },
                |_| async {
                    let r = self.attempt(&req, limits, read).await;
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
                // A symbol whose retry found the breaker open (or no rate-limit slot) failed
                // because of what its earlier attempt met: say that, not "circuit open".
                let first = first_failure
                    .into_inner()
                    .unwrap_or_else(|p| p.into_inner());
                match first {
                    Some(cause) if last.is_consequence() => cause,
                    _ => last,
                }
            });
            let stage_name = stage.as_str();
            let step = match step {
                Ok(step) => step,
                Err(AgentError::InvalidOutput(reason)) if !reprompted => {
                    // Said back once, with the exact errors, under the same budget, rate
                    // limit and deadline as any request.
                    reprompted = true;
                    tracing::info!(stage = stage_name, symbol, cycle_id = %cycle_id, reason = %reason, "model answer rejected; asking once more with its errors");
                    let previous = rejected.lock().unwrap_or_else(|p| p.into_inner()).take();
                    if let Some(v) = previous {
                        req.conversation
                            .push(json!({"role": "assistant", "content": v.to_string()}));
                    }
                    req.conversation
                        .push(json!({"role": "user", "content": reprompt_text(&reason)}));
                    continue;
                }
                Err(e) => {
                    if reprompted {
                        let outcome = if matches!(e, AgentError::InvalidOutput(_)) {
                            "still_invalid"
                        } else {
                            "failed"
                        };
                        metrics::counter!(names::AGENT_REPROMPTS, "stage" => stage_name, "outcome" => outcome).increment(1);
                        self.shared.health.count_reprompt(outcome);
                    }
                    return Err(e);
                }
            };
            if reprompted && matches!(step, Step::Answer(_)) {
                metrics::counter!(names::AGENT_REPROMPTS, "stage" => stage_name, "outcome" => "fixed").increment(1);
                self.shared.health.count_reprompt("fixed");
            }
            let reply = match step {
                Step::Answer(checked) => {
                    return Ok(Answer {
                        value: checked.value,
                        model: self.model.clone(),
                        degraded: false,
                        tools_used,
                    });
                }
                Step::Tools(reply) => reply,
            };
            round += 1;
            if round > self.shared.max_tool_rounds {
                // Counted as the answer it stands in for: a rejected one.
                self.shared
                    .health
                    .count_output(stage.as_str(), Outcome::Rejected.as_str());
                return Err(AgentError::InvalidOutput(format!(
                    "the model still asked for tools after {} rounds (agents.max_tool_rounds); no answer",
                    self.shared.max_tool_rounds
                )));
            }
            let Some(runner) = &self.shared.tools else {
                return Err(AgentError::InvalidOutput(
                    "answered with a tool call instead of JSON content".into(),
                ));
            };
            req.conversation.push(reply.assistant.clone());
            for call in &reply.tool_calls {
                let parsed = if self.offered.contains(&call.name) {
                    serde_json::from_str::<Value>(&call.arguments).map_err(|e| {
                        json!({"error": {"code": "INVALID_ARGUMENTS", "message": format!("arguments are not JSON: {e}")}})
                    })
                } else {
                    // Only what was offered runs: a model that guesses another tool's name
                    // is told what it may call, as any other refused call is.
                    Err(json!({"error": {"code": "UNKNOWN_TOOL", "message": format!(
                        "{:?} is not offered to the {} stage; it may call {}",
                        call.name.chars().take(64).collect::<String>(),
                        stage.as_str(),
                        if self.offered.is_empty() { "none".to_string() } else { self.offered.join(", ") }
                    )}}))
                };
                let result = match parsed {
                    // A call the deadline cuts short ends the stage like a slow model would.
                    Ok(args) => {
                        match tokio::time::timeout_at(limits.until, runner.run(&call.name, &args))
                            .await
                        {
                            Ok(r) => r,
                            Err(_) => return Err(AgentError::Timeout(None)),
                        }
                    }
                    Err(refusal) => Err(refusal),
                };
                tracing::debug!(stage = stage.as_str(), symbol, tool = %call.name, ok = result.is_ok(), "model tool call");
                // What ran, not what was asked for: a name the stage was not offered is the
                // model's guess, and a guess is not a source of the signal.
                if self.offered.contains(&call.name)
                    && !tools_used.contains(&call.name)
                    && tools_used.len() < 16
                {
                    tools_used.push(call.name.chars().take(64).collect());
                }
                let content = match result {
                    Ok(v) | Err(v) => v.to_string(),
                };
                req.conversation.push(json!({
                    "role": "tool",
                    "tool_call_id": call.id,
                    "content": content,
                }));
            }
        }
    }

    /// One request, timed: answers and timeouts are latency samples (a fast refusal says
    /// nothing about how slow the model is).
    async fn timed_call(
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
        if let Some(slot) = slot {
            // What the endpoint's in-flight limit learns: an answer and how long it took of
            // the time it had; its own timeout; anything else says nothing about capacity.
            slot.finish(match &r {
                Ok(_) => CallEnd::Answered {
                    took: Instant::now().duration_since(t0),
                },
                Err(AgentError::Timeout(_)) if own_timeout => CallEnd::TimedOut {
                    waited: Instant::now().duration_since(t0),
                },
                Err(_) => CallEnd::Neutral,
            });
        }
        if r.is_ok() || (matches!(r, Err(AgentError::Timeout(_))) && own_timeout) {
            let took = Instant::now().duration_since(t0);
            let stage = req.stage.as_str();
            self.shared.latencies.record(stage, took);
            metrics::histogram!(names::AGENT_CALL_DURATION_SECONDS, "stage" => stage, "backend" => self.transport.backend())
                .record(took.as_secs_f64());
        }
        r
    }

    /// Reads a reply: counts the outcome and spends its tokens.
    fn read_reply<T>(
        &self,
        req: &LlmRequest<'_>,
        reply: &LlmReply,
        read: Read<'_, T>,
    ) -> Result<Step<T>, AgentError> {
        let stage = req.stage.as_str();
        let used = reply.usage.input + reply.usage.output;
        self.shared
            .health
            .tokens_total
            .fetch_add(used, Ordering::Relaxed);
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
                self.shared.health.count_request(stage, outcome_label(&e));
                Err(e)
            }
        }
    }

    /// What a failed request means beyond its own result: a 429 pauses everyone, a refusal
    /// of the key flips readiness; every failed request is counted once by what came back.
    fn on_request_error(&self, req: &LlmRequest<'_>, e: &AgentError) {
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
        self.shared.health.count_request(stage, outcome_label(e));
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
                    .take(super::MAX_BODY_EXCERPT + 100)
                    .collect(),
            },
        );
    }

    /// Takes a backup request's slot, budget and hedge credit, all or nothing.
    async fn try_start_backup(&self, estimate: u64) -> Option<(Reservation, Option<Slot>)> {
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
        // A slot now or not at all: a backup that waits for the limiter is no longer early.
        match self.shared.limiter.acquire_before(Instant::now()).await {
            Ok(_) => Some((r, slot)),
            Err(_) => {
                self.shared.budget.settle(r, 0, Utc::now());
                hedge.refund();
                None
            }
        }
    }

    /// One attempt: budget, rate limit and breaker, then the request — and, when it runs past
    /// the stage's observed p95 and the hedge budget allows, one identical backup request. The
    /// first answer that reads well wins; the other request is dropped (cancelled).
    async fn attempt<T>(
        &self,
        req: &LlmRequest<'_>,
        limits: CallLimits,
        read: Read<'_, T>,
    ) -> Result<Step<T>, AgentError> {
        let stage = req.stage.as_str();
        let estimate = token_estimate(req);
        let reservation = self
            .shared
            .budget
            .reserve(estimate, Utc::now())
            .map_err(|w| {
                metrics::counter!(names::LLM_BUDGET_EXHAUSTED, "window" => w.as_str()).increment(1);
                AgentError::BudgetExhausted(w.as_str())
            })?;
        let waited = match self.shared.limiter.acquire_before(limits.until).await {
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
            Some(c) => match c.acquire_before(limits.until).await {
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
        self.shared.latencies.count_call();
        if let Some(h) = &self.shared.hedge {
            h.on_call();
        }
        // The per-call deadline starts once the request can go: rate-limit waits are not the
        // model's latency.
        let deadline = limits.request_deadline();
        let started = Instant::now();
        let hedge_at = self
            .shared
            .hedge
            .as_ref()
            .and_then(|_| self.shared.latencies.stage_p95(stage))
            .map(|p95| started + p95)
            .filter(|at| *at < deadline);

        // Sent beside others to an endpoint with a learned limit, or while it works off calls
        // given up on: if it times out, that may be the endpoint's queue (overload), which the
        // limit answers, not the breaker.
        let crowded = slot.as_ref().is_some_and(Slot::queued_behind_others);
        let primary = self.timed_call(req, limits, deadline, slot);
        tokio::pin!(primary);
        let mut backup_reservation: Option<Reservation> = None;
        let mut backup_slot: Option<Slot> = None;
        let first = match hedge_at {
            None => Some(primary.as_mut().await),
            Some(at) => tokio::select! {
                // A primary that answers at the hedge instant needs no backup.
                biased;
                r = primary.as_mut() => Some(r),
                _ = tokio::time::sleep_until(at) => {
                    if let Some((r, s)) = self.try_start_backup(estimate).await {
                        backup_reservation = Some(r);
                        backup_slot = s;
                    }
                    if backup_reservation.is_none() {
                        Some(primary.as_mut().await)
                    } else {
                        tracing::info!(stage, symbol = req.symbol, after_ms = Instant::now().duration_since(started).as_millis() as u64, "agent call past the stage's p95; sending a backup request");
                        None
                    }
                }
            },
        };
        let mut reservations = vec![(Leg::Primary, reservation)];
        if let Some(r) = backup_reservation {
            reservations.push((Leg::Backup, r));
        }
        let settle_all = |reservations: Vec<(Leg, Reservation)>, used: &dyn Fn(Leg) -> u64| {
            for (leg, r) in reservations {
                self.shared.budget.settle(r, used(leg), Utc::now());
            }
        };

        // Without a backup: one result.
        if let Some(r) = first {
            let (out, used) = match r {
                Ok(reply) => {
                    let used = reply.usage.input + reply.usage.output;
                    (self.read_reply(req, &reply, read), used)
                }
                Err(e) => {
                    self.on_request_error(req, &e);
                    // A call given up on was still being worked on: the endpoint spent what
                    // was reserved for it, as far as anyone can tell.
                    let spent = if e.is_timeout() { estimate } else { 0 };
                    (Err(e), spent)
                }
            };
            settle_all(reservations, &|_| used);
            return self.finish(permit, out, crowded);
        }

        // With a backup: race them; a failed or unreadable result waits for the other.
        let backup_sent = std::sync::atomic::AtomicBool::new(false);
        let backup = async {
            backup_sent.store(true, Ordering::Relaxed);
            self.timed_call(req, limits, deadline, backup_slot).await
        };
        tokio::pin!(backup);
        let (mut primary_done, mut backup_done) = (false, false);
        let mut used_by: [Option<u64>; 2] = [None, None];
        let mut last_err: Option<AgentError> = None;
        let mut winner: Option<(Leg, Step<T>)> = None;
        while winner.is_none() && !(primary_done && backup_done) {
            let (leg, r) = tokio::select! {
                r = primary.as_mut(), if !primary_done => { primary_done = true; (Leg::Primary, r) }
                r = backup.as_mut(), if !backup_done => { backup_done = true; (Leg::Backup, r) }
            };
            let idx = usize::from(leg == Leg::Backup);
            match r {
                Ok(reply) => {
                    used_by[idx] = Some(reply.usage.input + reply.usage.output);
                    match self.read_reply(req, &reply, read) {
                        Ok(c) => winner = Some((leg, c)),
                        Err(e) => last_err = Some(e),
                    }
                }
                Err(e) => {
                    self.on_request_error(req, &e);
                    used_by[idx] = Some(if e.is_timeout() { estimate } else { 0 });
                    last_err = Some(e);
                }
            }
        }
        let won = winner.as_ref().map(|(leg, _)| *leg);
        if backup_sent.load(Ordering::Relaxed) {
            let hedge_outcome = if won == Some(Leg::Backup) {
                "won"
            } else {
                "lost"
            };
            metrics::counter!(names::AGENT_HEDGES, "stage" => stage, "outcome" => hedge_outcome)
                .increment(1);
        } else {
            // The primary answered before the backup was ever sent: it was no extra call.
            if let Some(h) = &self.shared.hedge {
                h.refund();
            }
            used_by[1] = Some(0);
        }
        // A request dropped in flight is charged what its twin used: the provider bills it
        // all the same, and the identical request is the best estimate there is.
        let twin = used_by.iter().flatten().copied().max().unwrap_or(0);
        settle_all(reservations, &|leg| {
            used_by[usize::from(leg == Leg::Backup)].unwrap_or(twin)
        });
        let out = match winner {
            Some((_, c)) => Ok(c),
            None => Err(last_err.unwrap_or(AgentError::Timeout(None))),
        };
        self.finish(permit, out, crowded)
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
    fn finish<T>(
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

    fn fallback_applies(&self, e: &AgentError) -> bool {
        self.shared.fallback_rules
            && matches!(
                e,
                AgentError::CircuitOpen(_) | AgentError::BudgetExhausted(_)
            )
    }
}

fn degraded<T>(value: T) -> Answer<T> {
    Answer {
        value,
        model: "rules".into(),
        degraded: true,
        tools_used: vec![],
    }
}

/// Reads and checks a model's signal answer against the strategies the runner evaluated.
pub fn signal_from_answer(
    v: &Value,
    verdicts: &[(StrategyVerdict, Value)],
) -> Result<Checked<SignalDraft>, String> {
    let c = repair::judgment(v, verdicts)?;
    c.value.validate()?;
    Ok(c)
}

/// Reads and checks a model's advice answer.
pub fn advice_from_answer(v: &Value) -> Result<Checked<Advice>, String> {
    let c = repair::advice(v)?;
    validate_advice(&c.value)?;
    Ok(c)
}

/// Reads and checks a model's report answer.
pub fn summary_from_answer(v: &Value) -> Result<Checked<String>, String> {
    let c = repair::summary(v)?;
    validate_summary(&c.value)?;
    Ok(c)
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
        // Evaluated once: the prompt shows them, the reader fills the signal from them.
        let verdicts = super::rules::evaluate(req.candles);
        let read = |v: &Value| signal_from_answer(v, &verdicts);
        match self
            .ask(
                Stage::Signal,
                req.symbol,
                req.cycle_id,
                signal_prompt(req, &verdicts),
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
                scored_prompt(scored),
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
                report_prompt(advised),
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

/// Parses a model's text content that must be exactly one JSON object (whitespace around it
/// is fine; prose or code fences are not).
pub fn strict_json(content: &str) -> Result<Value, AgentError> {
    let t = content.trim();
    if !t.starts_with('{') {
        return Err(AgentError::InvalidOutput(format!(
            "answer is not a bare JSON object (starts with {:?})",
            t.chars().take(20).collect::<String>()
        )));
    }
    serde_json::from_str(t)
        .map_err(|e| AgentError::InvalidOutput(format!("answer is not valid JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemas_come_from_the_types_and_are_strict() {
        let s = stage_schema(Stage::Signal);
        let props = s["properties"].as_object().expect("properties");
        // Only the judgment: what the runner holds is not asked for.
        let keys: Vec<&str> = props.keys().map(String::as_str).collect();
        assert_eq!(keys, ["action", "confidence", "reasoning", "strategies"]);
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(props["action"]["enum"], json!(["BUY", "SELL", "HOLD"]));
        assert_eq!(
            props["strategies"]["items"]["enum"],
            json!([
                "rsi_reversal",
                "macd_cross",
                "bollinger_bounce",
                "ema_trend",
                "volume_breakout",
                "momentum"
            ]),
            "a model picks the strategies' names from the runner's"
        );
        assert!(!s.to_string().contains("$ref"), "subschemas inlined");
        let required = s["required"].as_array().expect("required");
        assert_eq!(required.len(), props.len(), "every field required");
        assert!(
            stage_schema(Stage::Advise)["properties"]
                .get("max_position_size")
                .is_some()
        );
        assert!(
            stage_schema(Stage::Report)["properties"]
                .get("summary")
                .is_some()
        );
    }

    #[test]
    fn budget_windows_roll() {
        let b = Arc::new(TokenBudget::new(Some(100), Some(250)));
        let t: DateTime<Utc> = "2026-11-28T10:59:00Z".parse().expect("t");
        assert_eq!(b.exhausted(t), None);
        let r = b.reserve(100, t).expect("fits exactly");
        b.settle(r, 100, t);
        assert_eq!(b.exhausted(t), Some(BudgetWindow::Hour));
        assert_eq!(b.reserve(1, t), Err(BudgetWindow::Hour));
        let next_hour: DateTime<Utc> = "2026-11-28T11:00:00Z".parse().expect("t");
        assert_eq!(b.exhausted(next_hour), None);
        let r = b.reserve(100, next_hour).expect("fits");
        b.settle(r, 100, next_hour);
        assert_eq!(b.used(next_hour), (100, 200));
        // 50 left today: less than a typical call (100) reserves.
        assert_eq!(b.exhausted(next_hour), Some(BudgetWindow::Day));
        let next_day: DateTime<Utc> = "2026-11-29T00:00:00Z".parse().expect("t");
        assert_eq!(b.exhausted(next_day), None);
        assert_eq!(
            TokenBudget::new(None, Some(0)).exhausted(t),
            None,
            "0 = unlimited"
        );
    }

    #[test]
    fn reservations_keep_calls_in_flight_from_overshooting() {
        let t: DateTime<Utc> = "2026-11-28T10:00:00Z".parse().expect("t");
        let b = Arc::new(TokenBudget::new(Some(1000), None));
        // Three calls at once, each reserving 400: the third would not fit beside the two.
        let r1 = b.reserve(400, t).expect("first");
        let r2 = b.reserve(400, t).expect("second");
        assert_eq!(b.reserve(400, t), Err(BudgetWindow::Hour));
        assert_eq!(b.reserved(), 800);
        // They used 120 each: 240 spent, nothing reserved, 760 left.
        b.settle(r1, 120, t);
        b.settle(r2, 120, t);
        assert_eq!((b.used(t).0, b.reserved()), (240, 0));
        let mut spent = 240;
        // Calls one after another until the next reservation cannot fit: 240 + 400 + 120 × k.
        while let Ok(r) = b.reserve(400, t) {
            b.settle(r, 120, t);
            spent += 120;
        }
        // 240 + 4 × 120 = 720; a fifth needs 720 + 400 > 1000.
        assert_eq!(spent, 720);
        assert_eq!(b.used(t).0, 720);
        assert_eq!(b.exhausted(t), Some(BudgetWindow::Hour));
        // A call given up before it was sent gives its whole reservation back.
        let b = Arc::new(TokenBudget::new(Some(500), None));
        let r = b.reserve(500, t).expect("fits");
        b.settle(r, 0, t);
        assert_eq!((b.used(t).0, b.reserved()), (0, 0));
        // A call cancelled in flight (its reservation dropped unsettled) is charged in full.
        let r = b.reserve(300, Utc::now()).expect("fits");
        drop(r);
        assert_eq!((b.used(Utc::now()).0, b.reserved()), (300, 0));
    }

    #[test]
    fn the_estimate_bounds_the_prompt_and_the_completion() {
        let req = LlmRequest {
            stage: Stage::Report,
            symbol: "ETH/USD",
            cycle_id: crate::schedule::CycleId::new(Utc::now()),
            system: "sys",
            user: "é".repeat(100),
            schema_name: "report",
            schema: stage_schema(Stage::Report),
            model: "m",
            max_tokens: 512,
            tools: &[],
            conversation: vec![],
            structured: StructuredOutput::Auto,
        };
        let schema_len = stage_schema(Stage::Report).to_string().len() as u64;
        // 3 + 200 bytes of prompt (é is two bytes), the schema, 64 of template, 512 completion.
        assert_eq!(token_estimate(&req), 3 + 200 + schema_len + 64 + 512);
    }

    /// An in-process transport with scripted answer times, for the hedging mechanism on the
    /// paused clock (the HTTP path is tested against the test LLM server).
    struct Scripted {
        delays: Mutex<std::collections::VecDeque<Duration>>,
        default: Duration,
        calls: AtomicU64,
    }

    #[async_trait]
    impl Transport for Scripted {
        fn backend(&self) -> &'static str {
            "scripted"
        }
        async fn call(&self, _: &LlmRequest<'_>, _: Instant) -> Result<LlmReply, AgentError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let d = self
                .delays
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(self.default);
            tokio::time::sleep(d).await;
            Ok(LlmReply::answer(
                json!({"summary": "Fine."}),
                Usage {
                    input: 10,
                    output: 5,
                },
            ))
        }
        async fn health(&self) -> Result<(), String> {
            Ok(())
        }
    }

    fn hedging_agent(
        t: Arc<Scripted>,
        hedge: Option<Arc<HedgeBudget>>,
    ) -> (LlmAgent, Arc<LlmShared>) {
        let shared = Arc::new(LlmShared {
            limiter: Arc::new(crate::resilience::RateLimiter::new(10_000, 1_000)),
            budget: Arc::new(TokenBudget::new(None, None)),
            health: Arc::new(LlmHealth::default()),
            max_attempts: 1,
            backoff: Backoff {
                base: Duration::from_secs(1),
                max: Duration::from_secs(1),
                jitter: false,
            },
            fallback_rules: false,
            latencies: CallLatencies::new(200, Duration::from_secs(3600)),
            hedge,
            max_tokens: 100,
            tools: None,
            max_tool_rounds: 3,
        });
        let breaker = Breaker::new(
            "llm_scripted",
            crate::resilience::BreakerSettings {
                failure_threshold: 100,
                recovery_timeout: Duration::from_secs(1),
                half_open_max_calls: 1,
                success_threshold: 1,
                mode: crate::resilience::BreakerMode::Normal,
            },
        );
        let agent = LlmAgent::new(t, "m".into(), None, breaker, shared.clone());
        (agent, shared)
    }

    async fn report_once(agent: &LlmAgent) -> Result<Checked<String>, AgentError> {
        let limits = CallLimits {
            until: Instant::now() + Duration::from_secs(600),
            per_call: Duration::from_secs(60),
        };
        let req = LlmRequest {
            stage: Stage::Report,
            symbol: "ETH/USD",
            cycle_id: crate::schedule::CycleId::new(Utc::now()),
            system: "s",
            user: "u".into(),
            schema_name: "report",
            schema: stage_schema(Stage::Report),
            model: "m",
            max_tokens: 100,
            tools: &[],
            conversation: vec![],
            structured: StructuredOutput::Auto,
        };
        match agent.attempt(&req, limits, &summary_from_answer).await? {
            Step::Answer(c) => Ok(c),
            Step::Tools(_) => Err(AgentError::InvalidOutput("tool call".into())),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_straggler_gets_one_backup_past_the_stages_p95_and_the_first_answer_wins() {
        let t = Arc::new(Scripted {
            delays: Mutex::new(Default::default()),
            default: Duration::from_secs(1),
            calls: AtomicU64::new(0),
        });
        let (agent, shared) = hedging_agent(t.clone(), Some(Arc::new(HedgeBudget::new(0.1, 20.0))));
        // 20 calls of 1 s: the stage's p95 is 1 s, and 2 hedges are earned.
        for _ in 0..20 {
            report_once(&agent).await.expect("answer");
        }
        assert_eq!(
            shared.latencies.stage_p95("report"),
            Some(Duration::from_secs(1))
        );
        // The next call stalls 30 s; at 1 s a backup goes out and answers 1 s later.
        t.delays
            .lock()
            .unwrap()
            .extend([Duration::from_secs(30), Duration::from_secs(1)]);
        let t0 = Instant::now();
        let c = report_once(&agent).await.expect("the backup's answer");
        assert_eq!(c.value, "Fine.");
        assert_eq!(Instant::now().duration_since(t0), Duration::from_secs(2));
        assert_eq!(t.calls.load(Ordering::Relaxed), 22);
        assert_eq!(shared.hedge.as_ref().unwrap().counts(), (21, 1));
        // Both requests are charged: the cancelled one at what its twin used.
        assert_eq!(shared.budget.used(Utc::now()).0, 21 * 15 + 15);
        assert_eq!(shared.budget.reserved(), 0);
        // A call that answers before its p95 sends nothing extra.
        let before = t.calls.load(Ordering::Relaxed);
        t.delays
            .lock()
            .unwrap()
            .push_back(Duration::from_millis(900));
        report_once(&agent).await.expect("answer");
        assert_eq!(t.calls.load(Ordering::Relaxed), before + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn hedges_stay_within_their_fraction_and_off_means_off() {
        let t = Arc::new(Scripted {
            delays: Mutex::new(vec![Duration::from_secs(1); 20].into()),
            // After the first 20, every call straggles (3 s against a p95 of 1 s at first).
            default: Duration::from_secs(3),
            calls: AtomicU64::new(0),
        });
        let (agent, shared) = hedging_agent(t.clone(), Some(Arc::new(HedgeBudget::new(0.1, 20.0))));
        for _ in 0..200 {
            report_once(&agent).await.expect("answer");
        }
        let (calls, hedges) = shared.hedge.as_ref().unwrap().counts();
        assert_eq!(calls, 200);
        assert!(
            hedges >= 1 && hedges <= calls / 10,
            "{hedges} hedges for {calls} calls"
        );
        assert_eq!(t.calls.load(Ordering::Relaxed), calls + hedges);

        let t = Arc::new(Scripted {
            delays: Mutex::new(vec![Duration::from_secs(1); 20].into()),
            default: Duration::from_secs(30),
            calls: AtomicU64::new(0),
        });
        let (agent, _) = hedging_agent(t.clone(), None);
        for _ in 0..25 {
            report_once(&agent).await.expect("answer");
        }
        assert_eq!(
            t.calls.load(Ordering::Relaxed),
            25,
            "hedging off: no backup ever"
        );
    }

    #[test]
    fn strict_json_rejects_prose_and_fences() {
        assert!(strict_json(" {\"a\":1}\n").is_ok());
        assert!(strict_json("Here you go: {\"a\":1}").is_err());
        assert!(strict_json("```json\n{\"a\":1}\n```").is_err());
        assert!(strict_json("{\"a\":1} and more").is_err());
        assert!(strict_json("").is_err());
    }
}
