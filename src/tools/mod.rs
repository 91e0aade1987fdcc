//! The agents' own tools: market data, the rules strategies and past decisions, read-only.
//!
//! One [`Toolbox`] serves two callers with the same definitions and the same answers:
//! - the MCP server at `/mcp` (the HTTP layer serves it), which OpenCode agents (or any MCP client)
//!   reach over Streamable HTTP;
//! - the OpenAI-compatible backend with `agents.tools: mcp`, which gives the model these tools
//!   as function definitions and runs its calls in process
//!   ([`crate::agents::llm::ToolRunner`]).
//!
//! Each tool is a type in its own file implementing [`ToolSpec`] — its name, its descriptions,
//! its argument struct (whose JSON Schema clients see is generated from it, and into which
//! arguments are read strictly: unknown fields and wrong types are refused with the field
//! named) and its handler — and a variant of [`Tool`], whose exhaustive matches tie the two:
//! a tool without a definition, a schema or a handler does not compile. Every limit is
//! enforced here, so no caller can ask for an unbounded answer. Failures are [`ToolError`]s
//! with a stable [`Code`] (`INVALID_SYMBOL`, `NO_DATA`, …) that a model can act on.
//!
//! Answers are cached for the minute they describe: twenty agents asking for the same candles
//! in one cycle cost one fetch, and concurrent identical calls wait for the first one
//! rather than repeat it.

mod candles;
mod current_price;
mod recent_decisions;
mod signal_performance;
mod strategy_consensus;
mod strategy_signal;
mod top_strategies;
mod volatility;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use schemars::JsonSchema;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::history::HistoryStore;
use crate::market::{Candle, MIN_CANDLES, MarketSource};
use crate::schedule::Clock;
use crate::strategy::{Evaluated, StrategySet};
use crate::telemetry::names;

/// Raw 1-minute candles one call may span (a day): `(limit + offset) × timeframe` above this
/// is refused, so no argument can make a call fetch more.
pub const MAX_SPAN_MINUTES: usize = 1440;
/// Candles one `get_candles` answer carries at most.
pub const MAX_CANDLES: u32 = 500;
/// Decisions one `get_recent_decisions` answer carries at most.
pub const MAX_DECISIONS: u32 = 50;
/// Strategies one `get_top_strategies` answer carries at most.
pub const MAX_STRATEGIES: u32 = 10;
/// The longest name (of a tool or a strategy) a caller sent that a refusal repeats: a client
/// may send any string.
pub const MAX_NAME_SHOWN: usize = 64;
/// Candles behind the strategy verdicts: the rules agent's own window (MACD, hit rates).
const STRATEGY_CANDLES: usize = 120;
/// Answers kept per minute before the cache stops adding (hostile callers varying their
/// arguments cannot grow it without bound).
const CACHE_MAX: usize = 4096;
/// Longest arguments (as JSON text) whose answer is cached.
const CACHE_KEY_MAX: usize = 512;

/// A tool error's stable code: what a model (or a person) acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// No tool of that name (or none offered to the stage).
    UnknownTool,
    /// The arguments are not an object of the tool's fields, or a value is out of range.
    InvalidArguments,
    /// Not a symbol this service analyses.
    InvalidSymbol,
    /// Not one of `1m`, `5m`, `15m`, `1h`.
    InvalidTimeframe,
    /// Not minutes or hours.
    InvalidHorizon,
    /// Not a ranking the tool knows.
    InvalidMetric,
    /// No strategy of that name.
    UnknownStrategy,
    /// Asks for more than a call may answer.
    LimitExceeded,
    /// Nothing to answer with (yet).
    NoData,
    /// The service keeps no history.
    HistoryDisabled,
    /// A source did not answer; asking again later may succeed.
    Unavailable,
}

impl Code {
    /// The code as clients see it (`INVALID_SYMBOL`).
    pub fn as_str(self) -> &'static str {
        match self {
            Code::UnknownTool => "UNKNOWN_TOOL",
            Code::InvalidArguments => "INVALID_ARGUMENTS",
            Code::InvalidSymbol => "INVALID_SYMBOL",
            Code::InvalidTimeframe => "INVALID_TIMEFRAME",
            Code::InvalidHorizon => "INVALID_HORIZON",
            Code::InvalidMetric => "INVALID_METRIC",
            Code::UnknownStrategy => "UNKNOWN_STRATEGY",
            Code::LimitExceeded => "LIMIT_EXCEEDED",
            Code::NoData => "NO_DATA",
            Code::HistoryDisabled => "HISTORY_DISABLED",
            Code::Unavailable => "UNAVAILABLE",
        }
    }

    /// The `outcome` label of `mcp_tool_calls_total` (`invalid_symbol`).
    pub fn label(self) -> &'static str {
        match self {
            Code::UnknownTool => "unknown_tool",
            Code::InvalidArguments => "invalid_arguments",
            Code::InvalidSymbol => "invalid_symbol",
            Code::InvalidTimeframe => "invalid_timeframe",
            Code::InvalidHorizon => "invalid_horizon",
            Code::InvalidMetric => "invalid_metric",
            Code::UnknownStrategy => "unknown_strategy",
            Code::LimitExceeded => "limit_exceeded",
            Code::NoData => "no_data",
            Code::HistoryDisabled => "history_disabled",
            Code::Unavailable => "unavailable",
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a tool call failed: a stable code a model (or a person) can act on, and what exactly
/// was wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ToolError {
    /// What kind of failure.
    pub code: Code,
    /// The detail.
    pub message: String,
}

impl ToolError {
    fn new(code: Code, message: impl Into<String>) -> Self {
        ToolError {
            code,
            message: message.into(),
        }
    }

    /// The error as a tool answer's body: `{"error": {"code", "message"}}`.
    pub fn to_json(&self) -> Value {
        json!({"error": {"code": self.code.as_str(), "message": self.message}})
    }

    /// Whether asking again later could succeed (such errors are not cached).
    fn transient(&self) -> bool {
        self.code == Code::Unavailable
    }
}

/// One tool as clients see it.
#[derive(Debug, Clone)]
pub struct ToolDef {
    /// The tool's name.
    pub name: &'static str,
    /// What it answers, in full (MCP clients show it to people too).
    pub description: &'static str,
    /// What it answers and what its arguments take, in one short line: the form offered to
    /// a model on every call (`agents.tools: mcp`), where every word is a prompt token.
    pub brief: &'static str,
    /// JSON Schema of its arguments (an object schema).
    pub input_schema: serde_json::Map<String, Value>,
    /// JSON Schema of its answers (MCP's `outputSchema`, for the `structuredContent` every
    /// result carries): an object with the tool's keys.
    pub output_schema: serde_json::Map<String, Value>,
}

/// What a tool is: everything a client sees of it and what it does.
trait ToolSpec {
    /// Its arguments, read strictly from the call's JSON; their JSON Schema is the tool's
    /// input schema.
    type Args: DeserializeOwned + JsonSchema;
    /// The name clients call it by.
    const NAME: &'static str;
    /// What it answers, in full.
    const DESCRIPTION: &'static str;
    /// The one line a model is offered (≤ 120 characters).
    const BRIEF: &'static str;
    /// The keys every answer carries (the output schema's `required`; a test calls each
    /// tool and holds its answers to them).
    const OUTPUT: &'static [&'static str];
    /// The answer to `args` for the minute `minute` (cached for that minute by the caller).
    async fn run(tb: &Toolbox, args: Self::Args, minute: DateTime<Utc>)
    -> Result<Value, ToolError>;
}

/// Arguments naming one symbol.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct SymbolArgs {
    /// A configured symbol, e.g. `BTC/USD`.
    symbol: String,
}

/// The tools, in the order clients list them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// `get_candles`.
    GetCandles,
    /// `get_current_price`.
    GetCurrentPrice,
    /// `get_volatility`.
    GetVolatility,
    /// `get_top_strategies`.
    GetTopStrategies,
    /// `get_strategy_signal`.
    GetStrategySignal,
    /// `get_strategy_consensus`.
    GetStrategyConsensus,
    /// `get_recent_decisions`.
    GetRecentDecisions,
    /// `get_signal_performance`.
    GetSignalPerformance,
}

impl Tool {
    /// Every tool, in the order clients list them.
    pub const ALL: [Tool; 8] = [
        Tool::GetCandles,
        Tool::GetCurrentPrice,
        Tool::GetVolatility,
        Tool::GetTopStrategies,
        Tool::GetStrategySignal,
        Tool::GetStrategyConsensus,
        Tool::GetRecentDecisions,
        Tool::GetSignalPerformance,
    ];

    /// The tool called `name`, if there is one.
    pub fn named(name: &str) -> Option<Tool> {
        Tool::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Tool::GetCandles => candles::GetCandles::NAME,
            Tool::GetCurrentPrice => current_price::GetCurrentPrice::NAME,
            Tool::GetVolatility => volatility::GetVolatility::NAME,
            Tool::GetTopStrategies => top_strategies::GetTopStrategies::NAME,
            Tool::GetStrategySignal => strategy_signal::GetStrategySignal::NAME,
            Tool::GetStrategyConsensus => strategy_consensus::GetStrategyConsensus::NAME,
            Tool::GetRecentDecisions => recent_decisions::GetRecentDecisions::NAME,
            Tool::GetSignalPerformance => signal_performance::GetSignalPerformance::NAME,
        }
    }

    /// Its definition, as clients see it.
    pub fn definition(self) -> ToolDef {
        match self {
            Tool::GetCandles => definition::<candles::GetCandles>(),
            Tool::GetCurrentPrice => definition::<current_price::GetCurrentPrice>(),
            Tool::GetVolatility => definition::<volatility::GetVolatility>(),
            Tool::GetTopStrategies => definition::<top_strategies::GetTopStrategies>(),
            Tool::GetStrategySignal => definition::<strategy_signal::GetStrategySignal>(),
            Tool::GetStrategyConsensus => definition::<strategy_consensus::GetStrategyConsensus>(),
            Tool::GetRecentDecisions => definition::<recent_decisions::GetRecentDecisions>(),
            Tool::GetSignalPerformance => definition::<signal_performance::GetSignalPerformance>(),
        }
    }

    /// Reads `args` into its argument type and runs it.
    async fn run(
        self,
        tb: &Toolbox,
        args: &Value,
        minute: DateTime<Utc>,
    ) -> Result<Value, ToolError> {
        match self {
            Tool::GetCandles => run::<candles::GetCandles>(tb, args, minute).await,
            Tool::GetCurrentPrice => run::<current_price::GetCurrentPrice>(tb, args, minute).await,
            Tool::GetVolatility => run::<volatility::GetVolatility>(tb, args, minute).await,
            Tool::GetTopStrategies => {
                run::<top_strategies::GetTopStrategies>(tb, args, minute).await
            }
            Tool::GetStrategySignal => {
                run::<strategy_signal::GetStrategySignal>(tb, args, minute).await
            }
            Tool::GetStrategyConsensus => {
                run::<strategy_consensus::GetStrategyConsensus>(tb, args, minute).await
            }
            Tool::GetRecentDecisions => {
                run::<recent_decisions::GetRecentDecisions>(tb, args, minute).await
            }
            Tool::GetSignalPerformance => {
                run::<signal_performance::GetSignalPerformance>(tb, args, minute).await
            }
        }
    }
}

async fn run<T: ToolSpec>(
    tb: &Toolbox,
    args: &Value,
    minute: DateTime<Utc>,
) -> Result<Value, ToolError> {
    T::run(tb, read(args)?, minute).await
}

/// A tool's definition from its spec: the argument schema generated from its type.
fn definition<T: ToolSpec>() -> ToolDef {
    let schema = schemars::generate::SchemaSettings::draft2020_12()
        .with(|s| s.inline_subschemas = true)
        .into_generator()
        .into_root_schema_for::<T::Args>();
    let mut input_schema = match serde_json::to_value(schema) {
        Ok(Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    // Clients want the object schema itself; the draft marker and the Rust type's title and
    // doc are noise to a model (each field keeps its own description).
    input_schema.remove("$schema");
    input_schema.remove("title");
    input_schema.remove("description");
    let properties: serde_json::Map<String, Value> = T::OUTPUT
        .iter()
        .map(|k| (k.to_string(), json!({})))
        .collect();
    let output_schema = match json!({
        "type": "object",
        "properties": properties,
        "required": T::OUTPUT,
    }) {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    ToolDef {
        name: T::NAME,
        description: T::DESCRIPTION,
        brief: T::BRIEF,
        input_schema,
        output_schema,
    }
}

/// Every tool's definition, in order.
fn definitions() -> Vec<ToolDef> {
    Tool::ALL.iter().map(|t| t.definition()).collect()
}

/// A tool as a model is offered it: the brief line, and the argument schema without the
/// per-field prose (the brief says what the fields take). Measured with SmolLM2's tokenizer
/// (docs/BENCHMARKS.md): all eight full definitions are 1,222 tokens on every call; the
/// signal stage's three compact ones 354, the advise stage's 297.
fn model_function(d: &ToolDef) -> Value {
    let mut parameters = d.input_schema.clone();
    if let Some(Value::Object(props)) = parameters.get_mut("properties") {
        for p in props.values_mut() {
            if let Value::Object(p) = p {
                p.remove("description");
            }
        }
    }
    json!({"type": "function", "function": {
        "name": d.name,
        "description": d.brief,
        "parameters": parameters,
    }})
}

/// A cache entry: concurrent identical calls share one computation.
type Cell = Arc<OnceCell<Answer>>;
/// An answer or a refusal, as cached.
type Answer = Result<Arc<Value>, ToolError>;
/// A symbol's candles of the minute, fetched once however many tools need them.
type CandleCell = Arc<OnceCell<Arc<Vec<Candle>>>>;

/// Answers of the current minute.
#[derive(Default)]
struct Cache {
    minute: Option<DateTime<Utc>>,
    answers: HashMap<String, Cell>,
    candles: HashMap<(String, usize), CandleCell>,
}

/// The tools, their data sources and their cache.
pub struct Toolbox {
    defs: Vec<ToolDef>,
    /// `defs` as OpenAI function definitions, for the in-process path.
    functions: Vec<Value>,
    market: Arc<dyn MarketSource>,
    history: Option<Arc<dyn HistoryStore>>,
    strategies: Arc<StrategySet>,
    symbols: BTreeSet<String>,
    clock: Clock,
    cache: Mutex<Cache>,
    /// The graded horizons in seconds, shortest first (empty: not known, any is asked).
    horizons: Vec<i64>,
}

impl std::fmt::Debug for Toolbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Toolbox")
            .field("market", &self.market.name())
            .field("symbols", &self.symbols.len())
            .finish_non_exhaustive()
    }
}

/// Arguments read strictly into `A`, the field that was wrong named.
fn read<A: DeserializeOwned>(args: &Value) -> Result<A, ToolError> {
    // An absent `arguments` is an empty object (MCP clients may omit it).
    let args = if args.is_null() { &json!({}) } else { args };
    // serde would read an array positionally into a struct; tool arguments are named.
    if !args.is_object() {
        return Err(ToolError::new(
            Code::InvalidArguments,
            "arguments must be a JSON object of named fields",
        ));
    }
    serde_path_to_error::deserialize(args).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        ToolError::new(
            Code::InvalidArguments,
            if path == "." {
                inner
            } else {
                format!("{path}: {inner}")
            },
        )
    })
}

/// Reads a count that JSON may carry as `2` or `2.0` (JavaScript clients, and some models,
/// write every number as a float): a whole number from 0 to `u32::MAX`. `1.5`, `-1` and
/// `"2"` are refused naming the value; `null` is absent (the default).
fn whole<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    use serde::de::Error;
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let refused = || {
        D::Error::custom(format!(
            "expected a whole number from 0 to {}, got {n}",
            u32::MAX
        ))
    };
    if let Some(u) = n.as_u64() {
        return u32::try_from(u).map(Some).map_err(|_| refused());
    }
    match n.as_f64() {
        Some(f) if f.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&f) => {
            Ok(Some(f as u32))
        }
        _ => Err(refused()),
    }
}

/// The horizon (seconds) a caller gets without asking: 15 minutes when graded (or when the
/// graded ones are not known), else the shortest graded one.
pub(crate) fn default_horizon(graded: &[i64]) -> i64 {
    match graded.first() {
        Some(&first) if !graded.contains(&900) => first,
        _ => 900,
    }
}

/// A count argument within 1..=`max` (`default` when absent).
fn bounded(what: &str, v: Option<u32>, default: u32, max: u32) -> Result<u32, ToolError> {
    match v.unwrap_or(default) {
        0 => Err(ToolError::new(
            Code::InvalidArguments,
            format!("{what} must be at least 1"),
        )),
        n if n > max => Err(ToolError::new(
            Code::LimitExceeded,
            format!("{what} {n} is more than {max}"),
        )),
        n => Ok(n),
    }
}

impl Toolbox {
    /// Tools over `market` and (when history is on) `history`, answering for `symbols` only,
    /// at the time `clock` says, with the strategies `strategies`.
    pub fn new(
        market: Arc<dyn MarketSource>,
        history: Option<Arc<dyn HistoryStore>>,
        strategies: Arc<StrategySet>,
        symbols: &[String],
        clock: Clock,
    ) -> Self {
        let defs = definitions();
        // Every tool's series exists from the start, so a rate over it is defined before the
        // first call (an increment by zero never resets what another instance counted).
        for d in &defs {
            metrics::counter!(names::MCP_TOOL_CALLS, "tool" => d.name, "outcome" => "ok")
                .increment(0);
        }
        let functions = defs.iter().map(model_function).collect();
        Toolbox {
            defs,
            functions,
            market,
            history,
            strategies,
            symbols: symbols.iter().cloned().collect(),
            clock,
            cache: Mutex::new(Cache::default()),
            horizons: vec![],
        }
    }

    /// The horizons the history grades (`history.grading.horizons_minutes`): the only ones
    /// `get_signal_performance` takes — another is `INVALID_HORIZON`, never a `NO_DATA`
    /// that waiting would not cure — listed as its schema's `enum`, with `15m` the default
    /// when graded (else the shortest).
    pub fn with_horizons(mut self, minutes: &[u32]) -> Self {
        let mut h: Vec<i64> = minutes.iter().map(|m| i64::from(*m) * 60).collect();
        h.sort_unstable();
        h.dedup();
        if h.is_empty() {
            return self;
        }
        let labels: Vec<String> = h
            .iter()
            .map(|s| crate::history::grading::horizon_label(*s))
            .collect();
        let default = default_horizon(&h);
        for d in &mut self.defs {
            let prop = d
                .input_schema
                .get_mut("properties")
                .and_then(|p| p.get_mut("horizon"))
                .and_then(Value::as_object_mut);
            if let Some(p) = prop {
                p.insert("enum".into(), json!(labels));
                p.insert(
                    "default".into(),
                    json!(crate::history::grading::horizon_label(default)),
                );
            }
        }
        self.functions = self.defs.iter().map(model_function).collect();
        self.horizons = h;
        self
    }

    /// The horizon `text` names, checked against the graded ones (the default when absent).
    fn horizon(&self, text: Option<&str>) -> Result<i64, ToolError> {
        let Some(text) = text else {
            return Ok(default_horizon(&self.horizons));
        };
        let shown: String = text.chars().take(16).collect();
        let graded = || {
            self.horizons
                .iter()
                .map(|s| crate::history::grading::horizon_label(*s))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match crate::history::grading::parse_horizon(text) {
            None if self.horizons.is_empty() => Err(ToolError::new(
                Code::InvalidHorizon,
                format!("horizon {shown:?} is not minutes or hours, e.g. 5m, 15m, 1h"),
            )),
            Some(s) if self.horizons.is_empty() || self.horizons.contains(&s) => Ok(s),
            _ => Err(ToolError::new(
                Code::InvalidHorizon,
                format!(
                    "horizon {shown:?} is not graded here; the graded horizons are {}",
                    graded()
                ),
            )),
        }
    }

    /// Every tool's definition.
    pub fn definitions(&self) -> &[ToolDef] {
        &self.defs
    }

    /// The market source's name (`simulated` is said in every price answer).
    pub fn market_source(&self) -> &'static str {
        self.market.name()
    }

    /// Whether the prices are the simulated market's (every answer over prices says so).
    fn simulated(&self) -> bool {
        self.market.name() == "simulated"
    }

    /// Runs `name` with `args`: its JSON answer, or a coded error. Counted and timed under
    /// `mcp_tool_calls_total{tool,outcome}` and `mcp_tool_duration_seconds{tool}`, whichever
    /// client asked.
    pub async fn call(&self, name: &str, args: &Value) -> Result<Arc<Value>, ToolError> {
        let started = Instant::now();
        // Only known names become label values: a client inventing names cannot grow the
        // metric's series.
        let tool = Tool::named(name);
        let label = tool.map_or("unknown", Tool::name);
        let r = match tool {
            Some(t) => self.cached(t, args).await,
            None => Err(ToolError::new(
                Code::UnknownTool,
                format!(
                    "no tool named {:?}; the tools are {}",
                    name.chars().take(MAX_NAME_SHOWN).collect::<String>(),
                    Tool::ALL.map(Tool::name).join(", ")
                ),
            )),
        };
        let outcome = match &r {
            Ok(_) => "ok",
            Err(e) => e.code.label(),
        };
        metrics::counter!(names::MCP_TOOL_CALLS, "tool" => label, "outcome" => outcome)
            .increment(1);
        metrics::histogram!(names::MCP_TOOL_DURATION_SECONDS, "tool" => label)
            .record(started.elapsed().as_secs_f64());
        r
    }

    /// The minute answers are cached for (the newest whole minute).
    fn minute(&self) -> DateTime<Utc> {
        let now = self.clock.now();
        now.duration_trunc(TimeDelta::minutes(1)).unwrap_or(now)
    }

    /// The cache, emptied when a new minute begins.
    fn cache(&self, minute: DateTime<Utc>) -> std::sync::MutexGuard<'_, Cache> {
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.minute != Some(minute) {
            *c = Cache {
                minute: Some(minute),
                ..Cache::default()
            };
        }
        c
    }

    async fn cached(&self, tool: Tool, args: &Value) -> Result<Arc<Value>, ToolError> {
        let minute = self.minute();
        // serde_json's maps are sorted, so equal arguments give equal keys.
        let key = format!("{} {args}", tool.name());
        let cell = {
            let mut c = self.cache(minute);
            match c.answers.get(&key) {
                Some(cell) => Some(cell.clone()),
                // Real arguments are a few dozen bytes; a huge one is answered (refused,
                // mostly) but not kept, so the cache stays small whatever callers send.
                None if c.answers.len() < CACHE_MAX && key.len() <= CACHE_KEY_MAX => {
                    let cell: Cell = Arc::default();
                    c.answers.insert(key, cell.clone());
                    Some(cell)
                }
                None => None,
            }
        };
        // The cell keeps answers and refusals alike (the same arguments are refused the same
        // way); the outer error, which the cell does not keep, is an unavailable source, worth
        // asking again.
        let compute = || async {
            match tool.run(self, args, minute).await {
                Ok(v) => Ok(Ok(Arc::new(v))),
                Err(e) if !e.transient() => Ok(Err(e)),
                Err(e) => Err(e),
            }
        };
        match cell {
            Some(cell) => cell.get_or_try_init(compute).await?.clone(),
            None => compute().await?,
        }
    }

    /// Refuses a symbol this service does not analyse.
    fn symbol(&self, s: &str) -> Result<(), ToolError> {
        if self.symbols.contains(s) {
            return Ok(());
        }
        let shown: String = s.chars().take(32).collect();
        Err(ToolError::new(
            Code::InvalidSymbol,
            format!(
                "{shown:?} is not a symbol this service analyses ({} configured, e.g. {})",
                self.symbols.len(),
                self.symbols
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ))
    }

    /// The last `count` 1-minute candles of `symbol` up to `minute`, fetched once per minute.
    async fn candles(
        &self,
        symbol: &str,
        count: usize,
        minute: DateTime<Utc>,
    ) -> Result<Arc<Vec<Candle>>, ToolError> {
        let cell = self
            .cache(minute)
            .candles
            .entry((symbol.to_string(), count))
            .or_default()
            .clone();
        let c = cell
            .get_or_try_init(|| async {
                self.market
                    .candles(symbol, minute, count)
                    .await
                    .map(Arc::new)
                    .map_err(|e| ToolError::new(Code::Unavailable, e.to_string()))
            })
            .await?
            .clone();
        if c.is_empty() {
            return Err(ToolError::new(
                Code::NoData,
                format!("the market source has no candles for {symbol}"),
            ));
        }
        Ok(c)
    }

    /// The history, or the refusal that says there is none.
    fn store(&self) -> Result<&Arc<dyn HistoryStore>, ToolError> {
        self.history.as_ref().ok_or_else(|| {
            ToolError::new(
                Code::HistoryDisabled,
                "this service keeps no history (history.enabled is false)",
            )
        })
    }

    /// Every strategy's verdict on `symbol` now, with its parameters.
    async fn verdicts(
        &self,
        symbol: &str,
        minute: DateTime<Utc>,
    ) -> Result<Vec<Evaluated>, ToolError> {
        let c = self.candles(symbol, STRATEGY_CANDLES, minute).await?;
        if c.len() < MIN_CANDLES {
            return Err(ToolError::new(
                Code::NoData,
                format!(
                    "{} candles of {symbol}; the strategies need at least {MIN_CANDLES}",
                    c.len(),
                ),
            ));
        }
        Ok(self.strategies.evaluate(&c))
    }
}

#[async_trait::async_trait]
impl crate::agents::llm::ToolRunner for Toolbox {
    fn functions(&self) -> &[Value] {
        &self.functions
    }

    async fn run(&self, name: &str, arguments: &Value) -> Result<Value, Value> {
        self.call(name, arguments)
            .await
            .map(|v| v.as_ref().clone())
            .map_err(|e| e.to_json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The simulated market, counting fetches.
    struct Counting {
        inner: crate::market::simulated::Simulated,
        fetches: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl MarketSource for Counting {
        async fn candles(
            &self,
            symbol: &str,
            now: DateTime<Utc>,
            count: usize,
        ) -> Result<Vec<Candle>, crate::market::MarketError> {
            self.fetches.fetch_add(1, Ordering::Relaxed);
            self.inner.candles(symbol, now, count).await
        }
        fn name(&self) -> &'static str {
            "simulated"
        }
    }

    fn toolbox() -> (Arc<Counting>, Arc<Toolbox>) {
        let market = Arc::new(Counting {
            inner: crate::market::simulated::Simulated::new(),
            fetches: AtomicUsize::new(0),
        });
        let clock = Clock::anchored(
            DateTime::parse_from_rfc3339("2026-11-29T10:00:30Z")
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or_default(),
        );
        let tools = Arc::new(Toolbox::new(
            market.clone(),
            None,
            Arc::default(),
            &["ETH/USD".to_string()],
            clock,
        ));
        (market, tools)
    }

    #[test]
    fn the_configurable_names_are_the_defined_tools() {
        let names: Vec<&str> = definitions().iter().map(|d| d.name).collect();
        assert_eq!(names, crate::config::TOOL_NAMES);
        for stage in crate::model::Stage::ALL {
            for n in crate::config::default_stage_tools(stage) {
                assert!(names.contains(n), "{n}");
            }
        }
    }

    #[test]
    fn a_model_is_offered_the_short_form() {
        for d in definitions() {
            let f = model_function(&d);
            let full =
                json!({"name": d.name, "description": d.description, "parameters": d.input_schema});
            assert!(
                f.to_string().len() < full.to_string().len(),
                "{}: the model's form is not shorter",
                d.name
            );
            assert!(d.brief.len() <= 120, "{}: {}", d.name, d.brief);
            // The argument names and types are all still there.
            assert_eq!(
                f["function"]["parameters"]["properties"]
                    .as_object()
                    .map(|p| p.keys().cloned().collect::<Vec<_>>()),
                d.input_schema["properties"]
                    .as_object()
                    .map(|p| p.keys().cloned().collect::<Vec<_>>()),
            );
            assert_eq!(
                f["function"]["parameters"]["required"],
                d.input_schema["required"]
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn twenty_agents_asking_the_same_question_cost_one_fetch() {
        let (market, tools) = toolbox();
        let args = json!({"symbol": "ETH/USD"});
        let answers =
            futures::future::join_all((0..20).map(|_| tools.call("get_strategy_consensus", &args)))
                .await;
        assert!(answers.iter().all(|a| a.is_ok()));
        assert!(answers.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(market.fetches.load(Ordering::Relaxed), 1);
        // Other tools over the same candles reuse them; a new minute fetches again.
        tools
            .call("get_top_strategies", &args)
            .await
            .expect("answers");
        assert_eq!(market.fetches.load(Ordering::Relaxed), 1);
        tokio::time::advance(std::time::Duration::from_secs(60)).await;
        tools
            .call("get_strategy_consensus", &args)
            .await
            .expect("answers");
        assert_eq!(market.fetches.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_name_what_was_wrong_and_are_cached_too() {
        let (market, tools) = toolbox();
        let cases = [
            (
                "get_candles",
                json!({"symbol": "ETH/USD", "limit": 0}),
                "INVALID_ARGUMENTS",
                "limit",
            ),
            (
                "get_candles",
                json!({"symbol": "ETH/USD", "limit": 501}),
                "LIMIT_EXCEEDED",
                "500",
            ),
            (
                "get_candles",
                json!({"symbol": "ETH/USD", "timeframe": "1h", "limit": 25}),
                "LIMIT_EXCEEDED",
                "1440",
            ),
            (
                "get_candles",
                json!({"symbol": "ETH/USD", "limit": "9"}),
                "INVALID_ARGUMENTS",
                "limit",
            ),
            (
                "get_candles",
                json!({"symbol": "ETH/USD", "sql": "1"}),
                "INVALID_ARGUMENTS",
                "sql",
            ),
            ("get_candles", json!([1, 2]), "INVALID_ARGUMENTS", "object"),
            (
                "get_current_price",
                json!({}),
                "INVALID_ARGUMENTS",
                "symbol",
            ),
            (
                "get_current_price",
                json!({"symbol": "eth/usd"}),
                "INVALID_SYMBOL",
                "eth/usd",
            ),
            (
                "get_recent_decisions",
                json!({"symbol": "ETH/USD"}),
                "HISTORY_DISABLED",
                "history",
            ),
        ];
        for (tool, args, code, says) in cases {
            let e = tools.call(tool, &args).await.expect_err(tool);
            assert_eq!(e.code.as_str(), code, "{tool} {args}: {e}");
            assert!(e.message.contains(says), "{tool} {args}: {e}");
        }
        // None of them needed the market.
        assert_eq!(market.fetches.load(Ordering::Relaxed), 0);
    }

    /// Every property of every input schema against what the code does: one JSON type each
    /// (no `["integer", "null"]`), a default the code really uses, bounds the code really
    /// enforces (the minimum and maximum pass, one beyond each is refused), every listed
    /// value accepted.
    #[tokio::test(start_paused = true)]
    async fn input_schemas_say_what_the_code_enforces() {
        let (_, tools) = toolbox();
        let base = json!({"symbol": "ETH/USD"});
        for d in tools.definitions() {
            let props = d.input_schema["properties"]
                .as_object()
                .expect("properties");
            for (name, p) in props {
                assert!(
                    p["type"].is_string(),
                    "{}.{name}: one JSON type, got {}",
                    d.name,
                    p["type"]
                );
            }
            // The history tools cannot answer here; their bounds are checked below by code.
            if d.name == "get_recent_decisions" || d.name == "get_signal_performance" {
                continue;
            }
            let mut args = base.clone();
            if props.contains_key("strategy_id") {
                args["strategy_id"] = json!("momentum");
            }
            let plain = tools.call(d.name, &args).await.expect(d.name);
            for (name, p) in props {
                if let Some(default) = p.get("default") {
                    let mut with = args.clone();
                    with[name.as_str()] = default.clone();
                    let explicit = tools.call(d.name, &with).await.expect(d.name);
                    assert_eq!(
                        plain, explicit,
                        "{}.{name}: the default is what the code uses",
                        d.name
                    );
                }
                for v in p
                    .get("enum")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let mut with = args.clone();
                    with[name.as_str()] = v.clone();
                    // Taken: answered, or refused for something else (1h × 60 candles
                    // is over a day; the graded ranking needs the history).
                    if let Err(e) = tools.call(d.name, &with).await {
                        assert!(
                            matches!(e.code, Code::LimitExceeded | Code::HistoryDisabled),
                            "{}.{name} = {v}: {e}",
                            d.name
                        );
                    }
                }
                if p.get("enum").is_some() {
                    let mut with = args.clone();
                    with[name.as_str()] = json!("2d");
                    assert!(
                        tools.call(d.name, &with).await.is_err(),
                        "{}.{name} = 2d",
                        d.name
                    );
                }
            }
        }
        // Bounds, on every tool that has them (the history tools refuse out-of-range
        // counts before they look for the history).
        for (tool, max) in [
            ("get_candles", MAX_CANDLES),
            ("get_top_strategies", MAX_STRATEGIES),
            ("get_recent_decisions", MAX_DECISIONS),
        ] {
            let limit = &tools
                .definitions()
                .iter()
                .find(|d| d.name == tool)
                .expect("tool")
                .input_schema["properties"]["limit"];
            assert_eq!(
                (limit["minimum"].clone(), limit["maximum"].clone()),
                (json!(1), json!(max)),
                "{tool}"
            );
            let code = |n: u32| {
                let tools = tools.clone();
                async move {
                    let args = json!({"symbol": "ETH/USD", "limit": n, "timeframe": "1m"});
                    let args = if tool == "get_candles" {
                        args
                    } else {
                        json!({"symbol": "ETH/USD", "limit": n})
                    };
                    tools.call(tool, &args).await.err().map(|e| e.code)
                }
            };
            assert_eq!(code(0).await, Some(Code::InvalidArguments), "{tool} 0");
            assert_eq!(
                code(max + 1).await,
                Some(Code::LimitExceeded),
                "{tool} max + 1"
            );
            for n in [1, max] {
                let c = code(n).await;
                assert!(
                    c.is_none() || c == Some(Code::HistoryDisabled),
                    "{tool} {n}: {c:?}"
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_whole_number_written_as_a_float_is_a_count() {
        let (_, tools) = toolbox();
        let two = tools
            .call("get_candles", &json!({"symbol": "ETH/USD", "limit": 2.0}))
            .await
            .expect("2.0 is 2");
        assert_eq!(two["candles"].as_array().map(Vec::len), Some(2));
        for bad in [json!(2.5), json!(-1), json!(1e12)] {
            let e = tools
                .call("get_candles", &json!({"symbol": "ETH/USD", "limit": bad}))
                .await
                .expect_err("refused");
            assert_eq!(e.code, Code::InvalidArguments, "{bad}: {e}");
            assert!(e.message.contains("limit"), "{e}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn only_graded_horizons_are_offered_and_taken() {
        let (market, _) = toolbox();
        let clock = Clock::anchored(DateTime::<Utc>::default());
        let tools = Toolbox::new(
            market,
            None,
            Arc::default(),
            &["ETH/USD".to_string()],
            clock,
        )
        .with_horizons(&[60, 5, 15]);
        let perf = tools
            .definitions()
            .iter()
            .find(|d| d.name == "get_signal_performance")
            .expect("tool");
        let h = &perf.input_schema["properties"]["horizon"];
        assert_eq!(h["enum"], json!(["5m", "15m", "1h"]));
        assert_eq!(h["default"], "15m");
        let args = |h: &str| json!({"symbol": "ETH/USD", "horizon": h});
        // Never graded: a horizon error now, not NO_DATA that waiting would not cure.
        let e = tools
            .call("get_signal_performance", &args("30m"))
            .await
            .expect_err("30m");
        assert_eq!(e.code, Code::InvalidHorizon, "{e}");
        assert!(e.message.contains("5m, 15m, 1h"), "{e}");
        // A graded one goes on to the history (there is none here).
        let e = tools
            .call("get_signal_performance", &args("1h"))
            .await
            .expect_err("1h");
        assert_eq!(e.code, Code::HistoryDisabled, "{e}");
        // The model's function definitions list them too.
        let f = tools
            .functions
            .iter()
            .find(|f| f["function"]["name"] == "get_signal_performance")
            .expect("function");
        assert_eq!(
            f["function"]["parameters"]["properties"]["horizon"]["enum"],
            h["enum"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn answers_carry_every_key_their_output_schema_requires() {
        let (_, tools) = toolbox();
        for d in tools.definitions() {
            if d.name == "get_recent_decisions" || d.name == "get_signal_performance" {
                continue; // no history here; the MCP integration test covers them
            }
            let args = if d.name == "get_strategy_signal" {
                json!({"symbol": "ETH/USD", "strategy_id": "momentum"})
            } else {
                json!({"symbol": "ETH/USD"})
            };
            let answer = tools.call(d.name, &args).await.expect(d.name);
            for key in d.output_schema["required"].as_array().expect("required") {
                let key = key.as_str().expect("key");
                assert!(
                    answer.get(key).is_some(),
                    "{}: no {key} in {answer}",
                    d.name
                );
            }
            assert_eq!(
                answer.as_object().map(|o| o.len()),
                d.output_schema["required"].as_array().map(Vec::len),
                "{}: every key is declared",
                d.name
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn candles_aggregate_to_whole_aligned_buckets() {
        let (_, tools) = toolbox();
        let one = tools
            .call("get_candles", &json!({"symbol": "ETH/USD", "limit": 15}))
            .await
            .expect("1m");
        let five = tools
            .call(
                "get_candles",
                &json!({"symbol": "ETH/USD", "timeframe": "5m", "limit": 3}),
            )
            .await
            .expect("5m");
        let ones = one["candles"].as_array().expect("candles");
        let fives = five["candles"].as_array().expect("candles");
        assert_eq!((ones.len(), fives.len()), (15, 3));
        // The clock is 10:00:30, so the newest closed minute is 09:59 and the newest whole
        // 5-minute bucket 09:55–09:59: the three buckets are the fifteen minutes.
        assert_eq!(fives[2]["time"], "2026-11-29T09:55:00+00:00");
        for (b, chunk) in fives.iter().zip(ones.chunks(5)) {
            assert_eq!(b["time"], chunk[0]["time"]);
            assert_eq!(b["open"], chunk[0]["open"]);
            assert_eq!(b["close"], chunk[4]["close"]);
            let high = chunk
                .iter()
                .map(|c| c["high"].as_f64().unwrap_or(f64::NAN))
                .fold(f64::MIN, f64::max);
            assert_eq!(b["high"].as_f64(), Some(high));
        }
    }
}
