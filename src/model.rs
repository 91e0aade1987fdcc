//! The leaf data types every layer shares: the stage vocabulary, the stage payloads (signal,
//! score, advice, report), the envelope every published message travels in, and the ids.
//! It imports nothing of the app but the cycle id's clock type, so any module may use it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::schedule::CycleId;

/// Fewest 1-minute candles any analysis runs on (the default MACD's slow EMA of 26 and signal
/// line of 9, plus a few to score hits): the market source must deliver at least these, and
/// `check-config` holds every strategy's periods within them.
pub const MIN_CANDLES: usize = 40;

/// Namespace of the deterministic ids (UUID v5). Fixed forever: changing it changes every id.
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6b1f_0c2e_9a57_4d0e_8f43_2b7c_5e19_a0d4);

/// The four stages — signal, score, advise, report — everywhere: in code, labels, logs and the
/// API. The Redis channel and stream names (raw, scored, validated, dashboard) are only names,
/// kept as the outside contract.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    PartialOrd,
    Ord,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Stage 1: the signal (`channel:raw-signals`). The aliases read what versions before the
    /// one stage vocabulary wrote (an outbox spool left by an older process).
    #[serde(alias = "raw")]
    Signal,
    /// Stage 2: the scored signal (`channel:scored-signals`).
    #[serde(alias = "scored")]
    Score,
    /// Stage 3: the advised signal (`channel:validated-signals`).
    #[serde(alias = "validated")]
    Advise,
    /// Stage 4: the report, what the dashboard shows (`channel:dashboard-signals`).
    #[serde(alias = "dashboard")]
    Report,
}

impl Stage {
    /// Every stage in pipeline order.
    pub const ALL: [Stage; 4] = [Stage::Signal, Stage::Score, Stage::Advise, Stage::Report];

    /// Pub/sub channel name (without the key prefix).
    pub fn channel(self) -> &'static str {
        match self {
            Stage::Signal => "channel:raw-signals",
            Stage::Score => "channel:scored-signals",
            Stage::Advise => "channel:validated-signals",
            Stage::Report => "channel:dashboard-signals",
        }
    }

    /// Stream key (without the key prefix).
    pub fn stream(self) -> &'static str {
        match self {
            Stage::Signal => "stream:raw-signals",
            Stage::Score => "stream:scored-signals",
            Stage::Advise => "stream:validated-signals",
            Stage::Report => "stream:dashboard-signals",
        }
    }

    /// The agent that produces it (`source_agent` of the envelope, a metric label).
    pub fn agent(self) -> &'static str {
        match self {
            Stage::Signal => "signal-generator",
            Stage::Score => "opportunity-scorer",
            Stage::Advise => "portfolio-advisor",
            Stage::Report => "report-generator",
        }
    }

    /// Short name for labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Signal => "signal",
            Stage::Score => "score",
            Stage::Advise => "advise",
            Stage::Report => "report",
        }
    }

    /// The stage named `s` (its lower-case name, as stored by the history).
    pub fn parse(s: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// The "latest per symbol" rule, in one place (the publisher's memory and the API's merge of
/// every replica's messages): a newer cycle wins; within a cycle, the further stage wins.
pub fn supersedes(cycle: CycleId, stage: Stage, than_cycle: CycleId, than_stage: Stage) -> bool {
    (cycle, stage) >= (than_cycle, than_stage)
}

/// Why a symbol's work failed or was not started, and how an LLM request ended: one bounded
/// vocabulary for the `reason`/`outcome` metric labels, `/api/cycles`, the logs and
/// `/health/detailed`, so the same cause has the same name everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// An agent call had no answer within its deadline.
    Timeout,
    /// The LLM endpoint could not be reached (connection refused, DNS, TLS).
    LlmUnreachable,
    /// The LLM endpoint answered 5xx.
    Llm5xx,
    /// The LLM endpoint answered 429.
    LlmRateLimited,
    /// The LLM endpoint refused the request (4xx other than 429).
    LlmRefused,
    /// The agent's answer failed validation after repair.
    InvalidOutput,
    /// The dependency's circuit breaker was open.
    CircuitOpen,
    /// No room: the backend's in-flight limit, or the tick's work could not all fit its
    /// deadline (a symbol left out up front).
    Capacity,
    /// The LLM rate limit had no token before the deadline.
    RateLimitWait,
    /// The LLM token budget was spent.
    BudgetExhausted,
    /// The market data source answered 5xx.
    MarketData5xx,
    /// The market data source refused the request (4xx).
    MarketDataRejected,
    /// The market data source could not be reached.
    MarketDataUnreachable,
    /// The market data source had no answer in time.
    MarketDataTimeout,
    /// The market data source's answer could not be read.
    MarketDataMalformed,
    /// Fewer candles than an analysis needs.
    MarketDataInsufficient,
    /// The newest candle is too old.
    MarketDataStale,
    /// The whole-cycle deadline passed.
    CycleDeadline,
    /// The process is stopping.
    Shutdown,
    /// A bug: a task panicked or a pool closed.
    InternalError,
    /// Another holder took the symbol's lock while it ran.
    LockLost,
    /// The coordination store did not answer.
    CoordinationUnavailable,
    /// Another run holds the symbol's lock.
    Locked,
    /// Another replica claimed the symbol for this tick (work sharing).
    ClaimedElsewhere,
}

impl Reason {
    /// The label: the outside contract, unchanged since the reasons were strings.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Timeout => "timeout",
            Reason::LlmUnreachable => "llm_unreachable",
            Reason::Llm5xx => "llm_5xx",
            Reason::LlmRateLimited => "llm_rate_limited",
            Reason::LlmRefused => "llm_refused",
            Reason::InvalidOutput => "invalid_output",
            Reason::CircuitOpen => "circuit_open",
            Reason::Capacity => "capacity",
            Reason::RateLimitWait => "rate_limit_wait",
            Reason::BudgetExhausted => "budget_exhausted",
            Reason::MarketData5xx => "market_data_5xx",
            Reason::MarketDataRejected => "market_data_rejected",
            Reason::MarketDataUnreachable => "market_data_unreachable",
            Reason::MarketDataTimeout => "market_data_timeout",
            Reason::MarketDataMalformed => "market_data_malformed",
            Reason::MarketDataInsufficient => "market_data_insufficient",
            Reason::MarketDataStale => "market_data_stale",
            Reason::CycleDeadline => "cycle_deadline",
            Reason::Shutdown => "shutdown",
            Reason::InternalError => "internal_error",
            Reason::LockLost => "lock_lost",
            Reason::CoordinationUnavailable => "coordination_unavailable",
            Reason::Locked => "locked",
            Reason::ClaimedElsewhere => "claimed_elsewhere",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A string schema with a description (and a format), for the types serialized by hand as
/// strings ([`Reason`], [`FailedAt`], the cycle id): their OpenAPI schema says what the text is.
pub fn string_schema(
    description: &str,
    format: Option<utoipa::openapi::KnownFormat>,
) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .description(Some(description))
        .format(format.map(utoipa::openapi::SchemaFormat::KnownFormat))
        .into()
}

impl utoipa::PartialSchema for Reason {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        string_schema(
            "Why a symbol failed or was not attempted: one bounded vocabulary (timeout, llm_5xx, llm_rate_limited, invalid_output, circuit_open, capacity, market_data_*, cycle_deadline, shutdown, locked, claimed_elsewhere, …), the same as the `reason` metric label.",
            None,
        )
    }
}

impl utoipa::ToSchema for Reason {}

/// Where a symbol's work stopped: a stage, or a step around the stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailedAt {
    /// Waiting for a pool slot.
    Queued,
    /// Taking the symbol's lock.
    Lock,
    /// Between or around the stages (cancelled, deadline, lock lost).
    Pipeline,
    /// In a stage.
    Stage(Stage),
    /// Nowhere known (a task that ended without a result).
    Unknown,
}

impl FailedAt {
    /// The label (`queued`, `lock`, `pipeline`, a stage name, `none`).
    pub fn as_str(self) -> &'static str {
        match self {
            FailedAt::Queued => "queued",
            FailedAt::Lock => "lock",
            FailedAt::Pipeline => "pipeline",
            FailedAt::Stage(s) => s.as_str(),
            FailedAt::Unknown => "none",
        }
    }

    /// Whether an agent was at work (the symbol held its lock and ran stages).
    pub fn ran(self) -> bool {
        !matches!(self, FailedAt::Queued | FailedAt::Lock)
    }
}

impl utoipa::PartialSchema for FailedAt {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        string_schema(
            "Where a symbol's work stopped: queued, lock, pipeline, a stage (signal, score, advise, report), or none.",
            None,
        )
    }
}

impl utoipa::ToSchema for FailedAt {}

impl Serialize for FailedAt {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// BUY, SELL or HOLD.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
    utoipa::ToSchema,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// Go long.
    Buy,
    /// Go short / exit.
    Sell,
    /// Do nothing.
    Hold,
}

impl Action {
    /// Upper-case name (a bounded metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Buy => "BUY",
            Action::Sell => "SELL",
            Action::Hold => "HOLD",
        }
    }

    /// The action named `s` (its upper-case name), as stored by the history.
    pub fn parse(s: &str) -> Option<Action> {
        [Action::Buy, Action::Sell, Action::Hold]
            .into_iter()
            .find(|a| a.as_str() == s)
    }
}

/// One strategy's verdict.
#[derive(
    Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema, utoipa::ToSchema,
)]
#[serde(deny_unknown_fields)]
pub struct StrategyVerdict {
    /// Strategy name.
    pub name: String,
    /// Its direction.
    pub signal: Action,
    /// Its hit rate over the recent window, 0–1.
    pub score: f64,
}

/// The strategy counts of a signal, always derived from its breakdown (a model that
/// miscounts cannot publish a signal that disagrees with itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tally {
    /// Strategies in the breakdown.
    pub analyzed: u32,
    /// Of which BUY.
    pub bullish: u32,
    /// Of which SELL.
    pub bearish: u32,
    /// Of which HOLD.
    pub neutral: u32,
}

impl Tally {
    /// Counts `breakdown` by direction.
    pub fn of(breakdown: &[StrategyVerdict]) -> Self {
        let mut t = Tally::default();
        for v in breakdown {
            t.analyzed += 1;
            match v.signal {
                Action::Buy => t.bullish += 1,
                Action::Sell => t.bearish += 1,
                Action::Hold => t.neutral += 1,
            }
        }
        t
    }
}

/// The best strategy.
#[derive(
    Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema, utoipa::ToSchema,
)]
#[serde(deny_unknown_fields)]
pub struct TopStrategy {
    /// Strategy name.
    pub name: String,
    /// Its hit rate, 0–1.
    pub score: f64,
    /// Its direction.
    pub signal: Action,
    /// Its parameters (periods, thresholds).
    #[schema(value_type = Object)]
    pub parameters: serde_json::Map<String, serde_json::Value>,
}

/// Market snapshot that the signal was made from.
#[derive(
    Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema, utoipa::ToSchema,
)]
#[serde(deny_unknown_fields)]
pub struct MarketContext {
    /// Last close.
    pub current_price: f64,
    /// Fractional change over the last hour (0.01 = +1 %).
    pub price_change_1h: f64,
    /// Last candle's volume over the window's mean volume.
    pub volume_ratio: f64,
    /// Standard deviation of 1-minute returns over the last hour, scaled to one hour.
    pub volatility_1h: f64,
}

/// Stage 1 payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Signal {
    /// Deterministic from symbol + cycle id.
    pub signal_id: String,
    /// The tick (RFC 3339 in JSON).
    pub cycle_id: CycleId,
    /// `BASE/QUOTE`.
    pub symbol: String,
    /// The call.
    pub action: Action,
    /// 0–1.
    pub confidence: f64,
    /// Why, ≤ 2000 characters.
    pub reasoning: String,
    /// Strategies evaluated.
    pub strategies_analyzed: u32,
    /// Of which bullish.
    pub strategies_bullish: u32,
    /// Of which bearish.
    pub strategies_bearish: u32,
    /// Of which neutral.
    pub strategies_neutral: u32,
    /// The best one.
    pub top_strategy: TopStrategy,
    /// All of them.
    pub strategy_breakdown: Vec<StrategyVerdict>,
    /// Market snapshot.
    pub market_context: MarketContext,
    /// When the signal was made.
    pub timestamp: DateTime<Utc>,
    /// Next tick + grace: after this the signal is stale.
    pub expires_at: DateTime<Utc>,
    /// Time of the newest candle used.
    pub data_as_of: DateTime<Utc>,
    /// Produced by a fallback rather than the configured agent.
    pub is_degraded: bool,
    /// The probability of a hit at the calibration horizon, learned from the graded signals
    /// of the same model and action at this confidence; null until that group has enough
    /// grades (`calibration` says how many). `confidence` stays what the agent stated.
    #[serde(default)]
    pub calibrated_confidence: Option<f64>,
    /// How `calibrated_confidence` was obtained, or why there is none.
    #[serde(default)]
    pub calibration: CalibrationNote,
}

/// Whether a signal's confidence could be calibrated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CalibrationStatus {
    /// `calibrated_confidence` is the group's observed hit rate at this confidence.
    Calibrated,
    /// The group has fewer grades than `history.calibration.min_grades`: nothing is guessed.
    Insufficient,
    /// No history to learn from (`history.enabled: false`), or a message from before
    /// calibration existed.
    #[default]
    Unavailable,
}

/// How a signal's confidence was calibrated: what a reader needs to weigh the number.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CalibrationNote {
    /// Calibrated, or why not.
    pub status: CalibrationStatus,
    /// The method (`beta_binned_isotonic`); empty when unavailable.
    #[serde(default)]
    pub method: String,
    /// The horizon the probability is of (`15m`); empty when unavailable.
    #[serde(default)]
    pub horizon: String,
    /// The (model, action) group the signal was calibrated in (`rules|HOLD`).
    #[serde(default)]
    pub group: String,
    /// Grades the group has at that horizon.
    #[serde(default)]
    pub graded: u64,
    /// Grades the group needs before it is calibrated.
    #[serde(default)]
    pub needed: u64,
}

/// TIER of an opportunity score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Tier {
    /// ≥ 80.
    Hot,
    /// ≥ 60.
    Good,
    /// ≥ 40.
    Neutral,
    /// < 40.
    Low,
}

impl Tier {
    /// Upper-case name, as published and stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Hot => "HOT",
            Tier::Good => "GOOD",
            Tier::Neutral => "NEUTRAL",
            Tier::Low => "LOW",
        }
    }
}

/// Market regime, which sets the scoring caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Regime {
    /// Caps 0.05 / 0.03.
    Normal,
    /// Caps 0.08 / 0.05.
    HighVolatility,
    /// Caps 0.15 / 0.10.
    Extreme,
}

/// Each term's contribution to the opportunity score (points out of 100).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OpportunityFactors {
    /// 25 % weight.
    pub confidence: f64,
    /// 30 % weight.
    pub expected_return: f64,
    /// 20 % weight.
    pub consensus: f64,
    /// 15 % weight.
    pub volatility: f64,
    /// 10 % weight.
    pub freshness: f64,
    /// The risk-adjusted return that fed `expected_return`.
    pub risk_adjusted_return: f64,
}

/// Stage 2 payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScoredSignal {
    /// Stage 1 fields.
    #[serde(flatten)]
    pub signal: Signal,
    /// 0–100, one decimal.
    pub opportunity_score: f64,
    /// Tier of the score.
    pub opportunity_tier: Tier,
    /// Regime used for the caps.
    pub market_regime: Regime,
    /// Per-term contributions.
    pub opportunity_factors: OpportunityFactors,
}

/// What the advise stage adds.
#[derive(
    Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema, utoipa::ToSchema,
)]
#[serde(deny_unknown_fields)]
pub struct Advice {
    /// Whether to act on the signal.
    pub valid: bool,
    /// Largest position, as a fraction of the portfolio (0–1).
    pub max_position_size: f64,
    /// Risks in words.
    pub risk_warnings: Vec<String>,
}

/// Stage 3 payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdvisedSignal {
    /// Stage 2 fields.
    #[serde(flatten)]
    pub scored: ScoredSignal,
    /// Stage 3 fields, absent when the score was under `pipeline.advise_min_score`.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub advice: Option<Advice>,
}

/// In the OpenAPI document: the score's fields and the advice's, which are all present or all
/// absent. Written out because the derived schema of a flattened `Option` is "the advice or
/// null", and the advice's own schema admits no other field: no advised signal would match.
impl utoipa::PartialSchema for AdvisedSignal {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{AllOfBuilder, Schema};
        use utoipa::openapi::{Ref, RefOr};
        let mut all = AllOfBuilder::new()
            .item(Ref::from_schema_name("ScoredSignal"))
            .description(Some("Stage 3 payload: the scored signal, and the advice unless the score was under `pipeline.advise_min_score`."));
        if let RefOr::T(Schema::Object(mut advice)) = <Advice as utoipa::PartialSchema>::schema() {
            advice.required.clear();
            advice.additional_properties = None;
            all = all.item(advice);
        }
        all.into()
    }
}

impl utoipa::ToSchema for AdvisedSignal {
    fn schemas(
        schemas: &mut Vec<(
            String,
            utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
        )>,
    ) {
        schemas.push((
            "ScoredSignal".into(),
            <ScoredSignal as utoipa::PartialSchema>::schema(),
        ));
        <ScoredSignal as utoipa::ToSchema>::schemas(schemas);
    }
}

/// Stage 4 payload: what the dashboard shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReportedSignal {
    /// Stages 1–3.
    #[serde(flatten)]
    pub advised: AdvisedSignal,
    /// 2–3 sentences.
    pub summary: String,
}

/// Envelope metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Metadata {
    /// Time the stage took.
    pub processing_time_ms: u64,
    /// `rules`, or the LLM model name.
    pub model_used: String,
    /// The tools the agent called for this stage (`agents.tools: mcp`), in first-use order;
    /// absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools_used: Vec<String>,
}

/// A stage's payload as its type: what the pipeline publishes travels as this until it is
/// serialized at the boundary (Redis, SSE, HTTP, history), so the history and the dashboard
/// read fields rather than JSON keys.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// Stage 1.
    Signal(Signal),
    /// Stage 2.
    Scored(ScoredSignal),
    /// Stage 3.
    Advised(AdvisedSignal),
    /// Stage 4.
    Reported(ReportedSignal),
}

/// In the OpenAPI document: any one stage's payload (each later stage carries the earlier
/// stages' fields too, so a report also reads as a signal: `anyOf`, not `oneOf`).
impl utoipa::PartialSchema for Payload {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::{Ref, schema::AnyOfBuilder};
        AnyOfBuilder::new()
            .item(Ref::from_schema_name("ReportedSignal"))
            .item(Ref::from_schema_name("AdvisedSignal"))
            .item(Ref::from_schema_name("ScoredSignal"))
            .item(Ref::from_schema_name("Signal"))
            .description(Some(
                "A stage payload: a report, advised, scored or plain signal.",
            ))
            .into()
    }
}

impl utoipa::ToSchema for Payload {}

impl Payload {
    /// The stage fields every later stage carries too.
    pub fn signal(&self) -> &Signal {
        match self {
            Payload::Signal(s) => s,
            Payload::Scored(s) => &s.signal,
            Payload::Advised(a) => &a.scored.signal,
            Payload::Reported(r) => &r.advised.scored.signal,
        }
    }

    /// The score, from stage 2 on.
    pub fn scored(&self) -> Option<&ScoredSignal> {
        match self {
            Payload::Signal(_) => None,
            Payload::Scored(s) => Some(s),
            Payload::Advised(a) => Some(&a.scored),
            Payload::Reported(r) => Some(&r.advised.scored),
        }
    }

    /// The stage that publishes this payload.
    pub fn stage(&self) -> Stage {
        match self {
            Payload::Signal(_) => Stage::Signal,
            Payload::Scored(_) => Stage::Score,
            Payload::Advised(_) => Stage::Advise,
            Payload::Reported(_) => Stage::Report,
        }
    }

    /// Reads a payload written as `stage`'s (a history row, another replica's message).
    pub fn from_value(stage: Stage, v: serde_json::Value) -> Result<Payload, serde_json::Error> {
        Ok(match stage {
            Stage::Signal => Payload::Signal(serde_json::from_value(v)?),
            Stage::Score => Payload::Scored(serde_json::from_value(v)?),
            Stage::Advise => Payload::Advised(serde_json::from_value(v)?),
            Stage::Report => Payload::Reported(serde_json::from_value(v)?),
        })
    }
}

impl Serialize for Payload {
    /// Through a `serde_json::Value`, whose keys are in name order: the payload was a `Value`
    /// before it was typed, so its keys have always gone out sorted, and a consumer that
    /// hashes or diffs the bytes of a message sees the same bytes as before.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v = match self {
            Payload::Signal(p) => serde_json::to_value(p),
            Payload::Scored(p) => serde_json::to_value(p),
            Payload::Advised(p) => serde_json::to_value(p),
            Payload::Reported(p) => serde_json::to_value(p),
        }
        .map_err(serde::ser::Error::custom)?;
        v.serialize(s)
    }
}

/// Every published message: `{message_id, source_agent, timestamp, payload, metadata}`.
/// `P` is [`Payload`] for what this process publishes; a message read from outside (another
/// replica's, a stored one) is read with the payload type its reader needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<P = Payload> {
    /// Deterministic from (stage, signal_id): a re-publish is recognisable.
    pub message_id: String,
    /// The stage's agent name.
    pub source_agent: String,
    /// When the message was made.
    pub timestamp: DateTime<Utc>,
    /// The stage payload.
    pub payload: P,
    /// Timing and model.
    pub metadata: Metadata,
}

/// `signal_id`: UUID v5 of `symbol|cycle_id`.
pub fn signal_id(symbol: &str, cycle: &CycleId) -> String {
    Uuid::new_v5(&ID_NAMESPACE, format!("{symbol}|{cycle}").as_bytes()).to_string()
}

/// `message_id`: UUID v5 of `stage|signal_id`.
pub fn message_id(stage: Stage, signal_id: &str) -> String {
    Uuid::new_v5(
        &ID_NAMESPACE,
        format!("{}|{signal_id}", stage.as_str()).as_bytes(),
    )
    .to_string()
}

/// A message on its way out: the stage, the symbol, the cycle and the envelope.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageMessage {
    /// Which channel/stream.
    pub stage: Stage,
    /// The symbol.
    pub symbol: String,
    /// The tick.
    pub cycle_id: CycleId,
    /// What is published.
    pub envelope: Envelope,
}

impl StageMessage {
    /// Wraps `payload` as its stage's message: the symbol, the tick and the ids are the
    /// payload's own, so a message cannot name another symbol than its signal.
    pub fn new(payload: Payload, processing_time_ms: u64, model_used: &str) -> Self {
        let stage = payload.stage();
        let signal = payload.signal();
        StageMessage {
            stage,
            symbol: signal.symbol.clone(),
            cycle_id: signal.cycle_id,
            envelope: Envelope {
                message_id: message_id(stage, &signal.signal_id),
                source_agent: stage.agent().to_string(),
                timestamp: Utc::now(),
                payload,
                metadata: Metadata {
                    processing_time_ms,
                    model_used: model_used.to_string(),
                    tools_used: vec![],
                },
            },
        }
    }

    /// Records the tools the agent called for it.
    pub fn with_tools_used(mut self, tools: Vec<String>) -> Self {
        self.envelope.metadata.tools_used = tools;
        self
    }
}

/// Well-formed payloads for tests and examples (the integration tests build stage messages
/// with them); the numbers are plausible, not computed from a market.
pub mod examples {
    use super::*;

    /// A signal of `symbol` for the tick `cycle` with `action` at `confidence`, priced at
    /// `price` when its data was read (the tick itself).
    pub fn signal(
        symbol: &str,
        cycle: CycleId,
        action: Action,
        confidence: f64,
        price: f64,
    ) -> Signal {
        let at = cycle.time();
        Signal {
            signal_id: signal_id(symbol, &cycle),
            cycle_id: cycle,
            symbol: symbol.to_string(),
            action,
            confidence,
            reasoning: "example".into(),
            strategies_analyzed: 1,
            strategies_bullish: u32::from(action == Action::Buy),
            strategies_bearish: u32::from(action == Action::Sell),
            strategies_neutral: u32::from(action == Action::Hold),
            top_strategy: TopStrategy {
                name: "RSI".into(),
                score: 0.6,
                signal: action,
                parameters: Default::default(),
            },
            strategy_breakdown: vec![],
            market_context: MarketContext {
                current_price: price,
                price_change_1h: 0.0,
                volume_ratio: 1.0,
                volatility_1h: 0.01,
            },
            timestamp: at,
            expires_at: at + chrono::Duration::seconds(90),
            data_as_of: at,
            is_degraded: false,
            calibrated_confidence: None,
            calibration: CalibrationNote::default(),
        }
    }

    /// `signal` as `stage`'s payload, with a GOOD score from stage 2 on.
    pub fn payload(stage: Stage, signal: Signal) -> Payload {
        let scored = ScoredSignal {
            signal,
            opportunity_score: 65.0,
            opportunity_tier: Tier::Good,
            market_regime: Regime::Normal,
            opportunity_factors: OpportunityFactors {
                confidence: 15.0,
                expected_return: 20.0,
                consensus: 15.0,
                volatility: 10.0,
                freshness: 5.0,
                risk_adjusted_return: 0.5,
            },
        };
        let advised = AdvisedSignal {
            scored,
            advice: None,
        };
        match stage {
            Stage::Signal => Payload::Signal(advised.scored.signal),
            Stage::Score => Payload::Scored(advised.scored),
            Stage::Advise => Payload::Advised(advised),
            Stage::Report => Payload::Reported(ReportedSignal {
                advised,
                summary: "example".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let c = CycleId::new(
            Utc.with_ymd_and_hms(2026, 11, 28, 10, 0, 0)
                .single()
                .expect("t"),
        );
        let a = signal_id("ETH/USD", &c);
        assert_eq!(a, signal_id("ETH/USD", &c));
        assert_ne!(a, signal_id("BTC/USD", &c));
        assert_ne!(message_id(Stage::Signal, &a), message_id(Stage::Score, &a));
        assert_eq!(message_id(Stage::Signal, &a), message_id(Stage::Signal, &a));
    }

    /// A price read back from JSON is the number that was written: serde_json's default
    /// parser can be one ulp off (seen: 3128.6920037608274 read as 3128.692003760827, which
    /// failed an exact comparison of an MCP client's answer); `float_roundtrip` is on.
    #[test]
    fn prices_survive_a_json_round_trip_exactly() {
        for x in [
            3128.6920037608274_f64,
            96_612.123_456_789,
            0.362_118_004_5,
            1e-9,
        ] {
            let text = serde_json::to_string(&x).expect("json");
            let back: f64 = serde_json::from_str(&text).expect("parse");
            assert_eq!(back.to_bits(), x.to_bits(), "{text}");
        }
        let v: serde_json::Value = serde_json::from_str("3128.6920037608274").expect("parse");
        assert_eq!(v.as_f64(), Some(3128.6920037608274));
    }

    /// The ids are a contract across versions: deduplication compares them with what is
    /// already in the Redis streams, the spool and the history, so a change of the namespace
    /// or of the hashed text would make every re-publish look new. Pinned to values computed
    /// independently (Python's `uuid.uuid5` with the same namespace and text).
    #[test]
    fn ids_are_pinned_across_versions() {
        let c = CycleId::new(
            Utc.with_ymd_and_hms(2026, 1, 15, 10, 30, 0)
                .single()
                .expect("t"),
        );
        let sid = signal_id("ETH/USD", &c);
        assert_eq!(sid, "db83fba0-169d-50ea-957e-50aef61d9e13");
        for (stage, id) in [
            (Stage::Signal, "603c4a96-dd20-5407-9fee-8b83856ce4be"),
            (Stage::Score, "ca8908b3-2df9-5f09-adf3-1a00c02e27c1"),
            (Stage::Advise, "9e431137-79eb-5e1f-bd92-e4c7351d9d67"),
            (Stage::Report, "856b6988-01dd-511e-bf75-a287642b5f79"),
        ] {
            assert_eq!(message_id(stage, &sid), id, "{stage:?}");
        }
    }
}
