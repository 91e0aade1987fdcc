//! What every LLM backend shares: the rate limit, the circuit breaker, retries within the
//! deadline, the token budget, the degraded-mode fallback, the stage schemas and prompts, and
//! strict parsing of every answer. Backends only move bytes ([`Transport`]).
//!
//! Failure classes:
//! - timeout, 5xx, transport → a breaker failure, retried with backoff within the deadline;
//! - 429 → every caller pauses for `Retry-After` (the shared limiter), not a breaker failure;
//! - 400/401/402/403 → no retry, one log line, counted; 401/402 also flip readiness;
//! - an answer that breaks the schema → rejected with a reason (`invalid_output`), never
//!   clamped or defaulted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::rules::Rules;
use super::{
    Agent, AgentError, Answer, SignalDraft, SignalRequest, validate_advice, validate_summary,
};
use crate::pipeline::{
    Action, Advice, AdvisedSignal, ScoredSignal, Stage, StrategyVerdict, TopStrategy,
};
use crate::resilience::rate_limit::AgentRateLimiter;
use crate::resilience::{Backoff, Breaker, retry_until};
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
    pub cycle_id: &'a str,
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
}

/// A model's structured answer.
#[derive(Debug, Clone)]
pub struct LlmReply {
    /// The parsed JSON (not yet checked against the schema).
    pub json: Value,
    /// Tokens used.
    pub usage: Usage,
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
}

// ---------------------------------------------------------------------------------------------
// Answers as the model must give them (the schemas are generated from these types).

/// The signal stage's answer.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmSignal {
    /// Must be the symbol asked about.
    pub symbol: String,
    /// BUY, SELL or HOLD.
    pub action: Action,
    /// 0–1.
    pub confidence: f64,
    /// Why, at most 2000 characters.
    pub reasoning: String,
    /// Strategies considered.
    pub strategies_analyzed: u32,
    /// Of which bullish.
    pub strategies_bullish: u32,
    /// Of which bearish.
    pub strategies_bearish: u32,
    /// Of which neutral.
    pub strategies_neutral: u32,
    /// The strategy that weighed most.
    pub top_strategy: LlmTopStrategy,
    /// Every strategy's verdict.
    pub strategy_breakdown: Vec<StrategyVerdict>,
}

/// The top strategy in a model's answer.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmTopStrategy {
    /// Name.
    pub name: String,
    /// Hit rate or weight, 0–1.
    pub score: f64,
    /// Its direction.
    pub signal: Action,
}

/// The report stage's answer.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmReport {
    /// Two or three sentences for the dashboard.
    pub summary: String,
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
        Stage::Raw | Stage::Scored => SIGNAL.get_or_init(schema_of::<LlmSignal>),
        Stage::Validated => ADVICE.get_or_init(schema_of::<Advice>),
        Stage::Dashboard => REPORT.get_or_init(schema_of::<LlmReport>),
    }
}

fn schema_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Raw | Stage::Scored => "signal",
        Stage::Validated => "advice",
        Stage::Dashboard => "report",
    }
}

const SIGNAL_SYSTEM: &str = "You are signal-generator, a crypto market analyst. You receive one symbol's market snapshot (price, 1-hour change, volatility, volume) and the verdicts of classic technical strategies computed from its 1-minute candles. Weigh them and decide BUY, SELL or HOLD with a calibrated confidence between 0 and 1. Answer only with the JSON object the schema describes, for exactly the symbol you were given; keep the reasoning under 2000 characters.";
const ADVISE_SYSTEM: &str = "You are portfolio-advisor, a risk manager. You receive a scored trading signal. Decide whether it is valid to act on, the largest position as a fraction of the portfolio (0 to 1; 0 when not valid), and the concrete risks. Answer only with the JSON object the schema describes.";
const REPORT_SYSTEM: &str = "You are report-generator. Write a 2–3 sentence plain-text summary of a trading signal for a dashboard: the call, its confidence and opportunity score, the main reason, and the advisor's view if any. Answer only with the JSON object the schema describes.";

/// System prompt of a stage.
pub fn system_prompt(stage: Stage) -> &'static str {
    match stage {
        Stage::Raw | Stage::Scored => SIGNAL_SYSTEM,
        Stage::Validated => ADVISE_SYSTEM,
        Stage::Dashboard => REPORT_SYSTEM,
    }
}

/// The signal prompt: everything the model needs, without tools.
pub fn signal_prompt(req: &SignalRequest<'_>) -> String {
    let verdicts: Vec<Value> = super::rules::evaluate(req.candles)
        .into_iter()
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

impl TokenBudget {
    /// A budget; zero or `None` means no limit for that window.
    pub fn new(per_hour: Option<u64>, per_day: Option<u64>) -> Self {
        Self {
            per_hour: per_hour.filter(|v| *v > 0),
            per_day: per_day.filter(|v| *v > 0),
            ..Default::default()
        }
    }

    fn roll(&self, st: &mut BudgetState, now: DateTime<Utc>) {
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

    /// The spent window, if any.
    pub fn exhausted(&self, now: DateTime<Utc>) -> Option<BudgetWindow> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.roll(&mut st, now);
        if self.per_day.is_some_and(|l| st.day_used >= l) {
            Some(BudgetWindow::Day)
        } else if self.per_hour.is_some_and(|l| st.hour_used >= l) {
            Some(BudgetWindow::Hour)
        } else {
            None
        }
    }

    /// Records tokens spent.
    pub fn spend(&self, tokens: u64, now: DateTime<Utc>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.roll(&mut st, now);
        st.hour_used += tokens;
        st.day_used += tokens;
    }

    /// `(hour_used, day_used)`.
    pub fn used(&self, now: DateTime<Utc>) -> (u64, u64) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.roll(&mut st, now);
        (st.hour_used, st.day_used)
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
        AgentError::Timeout => "timeout",
        AgentError::Transport(_) => "transport",
        AgentError::Upstream { .. } => "error_5xx",
        AgentError::RateLimited { .. } => "rate_limited",
        AgentError::Refused { .. } => "refused",
        AgentError::InvalidOutput(_) => "invalid_output",
        AgentError::CircuitOpen => "circuit_open",
        AgentError::RateLimitWait => "rate_limit_wait",
        AgentError::BudgetExhausted(_) => "budget_exhausted",
        AgentError::MarketData(_) => "market_data",
    }
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
        }
    }

    /// One structured call with the whole discipline; returns the raw JSON.
    async fn ask(
        &self,
        stage: Stage,
        symbol: &str,
        cycle_id: &str,
        user: String,
        deadline: Instant,
    ) -> Result<Value, AgentError> {
        let deadline = match self.stage_timeout {
            Some(t) => deadline.min(Instant::now() + t),
            None => deadline,
        };
        if let Some(w) = self.shared.budget.exhausted(Utc::now()) {
            metrics::counter!(names::LLM_BUDGET_EXHAUSTED, "window" => w.as_str()).increment(1);
            return Err(AgentError::BudgetExhausted(w.as_str()));
        }
        let req = LlmRequest {
            stage,
            symbol,
            cycle_id,
            system: system_prompt(stage),
            user,
            schema_name: schema_name(stage),
            schema: stage_schema(stage),
            model: &self.model,
        };
        let backoff = self.shared.backoff;
        retry_until(
            self.shared.max_attempts,
            deadline,
            |e: &AgentError, n| match e {
                // The limiter already holds everyone until Retry-After: retry at once.
                AgentError::RateLimited { .. } => Some(Duration::ZERO),
                e if e.is_retryable() => Some(backoff.delay(n)),
                _ => None,
            },
            |_| self.attempt(&req, deadline),
        )
        .await
    }

    async fn attempt(&self, req: &LlmRequest<'_>, deadline: Instant) -> Result<Value, AgentError> {
        let stage = req.stage.as_str();
        let waited = self
            .shared
            .limiter
            .acquire_before(deadline)
            .await
            .map_err(|_| AgentError::RateLimitWait)?;
        metrics::histogram!(names::RATE_LIMIT_WAIT_SECONDS).record(waited.as_secs_f64());
        let permit = self.breaker.try_acquire().map_err(|_| {
            metrics::counter!(names::CIRCUIT_BREAKER_REJECTED, "breaker" => self.breaker.name().to_string()).increment(1);
            AgentError::CircuitOpen
        })?;
        let r = match tokio::time::timeout_at(deadline, self.transport.call(req, deadline)).await {
            Ok(r) => r,
            Err(_) => Err(AgentError::Timeout),
        };

        match r {
            Ok(reply) => {
                permit.success();
                self.shared.health.set_auth_error(None);
                let used = reply.usage.input + reply.usage.output;
                self.shared.budget.spend(used, Utc::now());
                self.shared
                    .health
                    .tokens_total
                    .fetch_add(used, Ordering::Relaxed);
                metrics::counter!(names::LLM_TOKENS, "stage" => stage, "kind" => "input")
                    .increment(reply.usage.input);
                metrics::counter!(names::LLM_TOKENS, "stage" => stage, "kind" => "output")
                    .increment(reply.usage.output);
                Ok(reply.json)
            }
            Err(e) => {
                if e.is_breaker_failure() {
                    permit.failure();
                } else {
                    // 429, refusals, bad answers: the service is up; it proves nothing about
                    // the breaker either way.
                    drop(permit);
                }
                match &e {
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
                    _ => {}
                }
                // Every request that went out is counted once, by what came back.
                metrics::counter!(names::LLM_REQUESTS, "stage" => stage, "outcome" => outcome_label(&e)).increment(1);
                Err(e)
            }
        }
    }

    fn fallback_applies(&self, e: &AgentError) -> bool {
        self.shared.fallback_rules
            && matches!(e, AgentError::CircuitOpen | AgentError::BudgetExhausted(_))
    }

    /// Counts the outcome of a call whose answer was read: `ok`, or why it was rejected.
    fn checked<T>(&self, stage: Stage, r: Result<T, AgentError>) -> Result<Answer<T>, AgentError> {
        let outcome = match &r {
            Ok(_) => "ok",
            Err(e) => outcome_label(e),
        };
        metrics::counter!(names::LLM_REQUESTS, "stage" => stage.as_str(), "outcome" => outcome)
            .increment(1);
        r.map(|value| Answer {
            value,
            model: self.model.clone(),
            degraded: false,
        })
    }
}

fn parse<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, AgentError> {
    serde_json::from_value(v)
        .map_err(|e| AgentError::InvalidOutput(format!("answer does not match the schema: {e}")))
}

/// Converts and checks a model's signal answer.
pub fn signal_from_answer(symbol: &str, v: Value) -> Result<SignalDraft, AgentError> {
    let a: LlmSignal = parse(v)?;
    if a.symbol != symbol {
        return Err(AgentError::InvalidOutput(format!(
            "answer is for {:?}, asked about {symbol:?}",
            a.symbol
        )));
    }
    let d = SignalDraft {
        action: a.action,
        confidence: a.confidence,
        reasoning: a.reasoning,
        strategies_analyzed: a.strategies_analyzed,
        strategies_bullish: a.strategies_bullish,
        strategies_bearish: a.strategies_bearish,
        strategies_neutral: a.strategies_neutral,
        top_strategy: TopStrategy {
            name: a.top_strategy.name,
            score: a.top_strategy.score,
            signal: a.top_strategy.signal,
            parameters: Default::default(),
        },
        strategy_breakdown: a.strategy_breakdown,
    };
    d.validate().map_err(AgentError::InvalidOutput)?;
    Ok(d)
}

/// Converts and checks a model's advice answer.
pub fn advice_from_answer(v: Value) -> Result<Advice, AgentError> {
    let a: Advice = parse(v)?;
    validate_advice(&a).map_err(AgentError::InvalidOutput)?;
    Ok(a)
}

/// Converts and checks a model's report answer.
pub fn summary_from_answer(v: Value) -> Result<String, AgentError> {
    let a: LlmReport = parse(v)?;
    validate_summary(&a.summary).map_err(AgentError::InvalidOutput)?;
    Ok(a.summary)
}

fn degraded<T>(value: T) -> Answer<T> {
    Answer {
        value,
        model: "rules".into(),
        degraded: true,
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
        deadline: Instant,
    ) -> Result<Answer<SignalDraft>, AgentError> {
        match self
            .ask(
                Stage::Raw,
                req.symbol,
                req.cycle_id,
                signal_prompt(req),
                deadline,
            )
            .await
        {
            Ok(v) => self.checked(Stage::Raw, signal_from_answer(req.symbol, v)),
            Err(e) if self.fallback_applies(&e) => Rules::analyse(req).map(degraded),
            Err(e) => Err(e),
        }
    }

    async fn advise(
        &self,
        scored: &ScoredSignal,
        deadline: Instant,
    ) -> Result<Answer<Advice>, AgentError> {
        let s = &scored.signal;
        match self
            .ask(
                Stage::Validated,
                &s.symbol,
                &s.cycle_id,
                scored_prompt(scored),
                deadline,
            )
            .await
        {
            Ok(v) => self.checked(Stage::Validated, advice_from_answer(v)),
            Err(e) if self.fallback_applies(&e) => Ok(degraded(Rules::advice(scored))),
            Err(e) => Err(e),
        }
    }

    async fn report(
        &self,
        advised: &AdvisedSignal,
        deadline: Instant,
    ) -> Result<Answer<String>, AgentError> {
        let s = &advised.scored.signal;
        match self
            .ask(
                Stage::Dashboard,
                &s.symbol,
                &s.cycle_id,
                report_prompt(advised),
                deadline,
            )
            .await
        {
            Ok(v) => self.checked(Stage::Dashboard, summary_from_answer(v)),
            Err(e) if self.fallback_applies(&e) => Ok(degraded(Rules::summary(advised))),
            Err(e) => Err(e),
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
        let s = stage_schema(Stage::Raw);
        let props = s["properties"].as_object().expect("properties");
        for k in [
            "symbol",
            "action",
            "confidence",
            "reasoning",
            "top_strategy",
            "strategy_breakdown",
        ] {
            assert!(props.contains_key(k), "{k}");
        }
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(props["action"]["enum"], json!(["BUY", "SELL", "HOLD"]));
        assert!(!s.to_string().contains("$ref"), "subschemas inlined");
        let required = s["required"].as_array().expect("required");
        assert_eq!(required.len(), props.len(), "every field required");
        assert!(
            stage_schema(Stage::Validated)["properties"]
                .get("max_position_size")
                .is_some()
        );
        assert!(
            stage_schema(Stage::Dashboard)["properties"]
                .get("summary")
                .is_some()
        );
    }

    #[test]
    fn budget_windows_roll() {
        let b = TokenBudget::new(Some(100), Some(150));
        let t: DateTime<Utc> = "2026-11-28T10:59:00Z".parse().expect("t");
        assert_eq!(b.exhausted(t), None);
        b.spend(100, t);
        assert_eq!(b.exhausted(t), Some(BudgetWindow::Hour));
        let next_hour: DateTime<Utc> = "2026-11-28T11:00:00Z".parse().expect("t");
        assert_eq!(b.exhausted(next_hour), None);
        b.spend(60, next_hour);
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
    fn strict_json_rejects_prose_and_fences() {
        assert!(strict_json(" {\"a\":1}\n").is_ok());
        assert!(strict_json("Here you go: {\"a\":1}").is_err());
        assert!(strict_json("```json\n{\"a\":1}\n```").is_err());
        assert!(strict_json("{\"a\":1} and more").is_err());
        assert!(strict_json("").is_err());
    }
}
