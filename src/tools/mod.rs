//! The agents' own tools: market data, the rules strategies and past decisions, read-only.
//!
//! One [`Toolbox`] serves two callers with the same definitions and the same answers:
//! - the MCP server at `/mcp` (the HTTP layer serves it), which OpenCode agents (or any MCP client)
//!   reach over Streamable HTTP;
//! - the OpenAI-compatible backend with `agents.tools: mcp`, which gives the model these tools
//!   as function definitions and runs its calls in process
//!   ([`crate::agents::llm::ToolRunner`]).
//!
//! Every argument type is a Rust struct; its JSON Schema (what clients see) is generated from
//! it, and arguments are read into it strictly (unknown fields and wrong types are refused with
//! the field named). Every limit is enforced here, so no caller can ask for an unbounded answer.
//! Failures are [`ToolError`]s with a stable code (`INVALID_SYMBOL`, `NO_DATA`, …) that a model
//! can act on.
//!
//! Answers are cached for the minute they describe: twenty agents asking for the same candles
//! in one cycle cost one fetch, and concurrent identical calls wait for the first one
//! rather than repeat it.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use schemars::JsonSchema;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::agents::rules;
use crate::history::grading::{horizon_label, parse_horizon, scorecard_of};
use crate::history::{GroupBy, HistoryQuery, HistoryStore};
use crate::market::{Candle, MarketSource};
use crate::model::{Action, Stage};
use crate::schedule::Clock;
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
/// Candles behind the strategy verdicts: the rules agent's own window (MACD, hit rates).
const STRATEGY_CANDLES: usize = 120;
/// Candles behind a volatility figure.
const VOLATILITY_CANDLES: usize = 60;
/// Answers kept per minute before the cache stops adding (hostile callers varying their
/// arguments cannot grow it without bound).
const CACHE_MAX: usize = 4096;
/// Longest arguments (as JSON text) whose answer is cached.
const CACHE_KEY_MAX: usize = 512;

/// Why a tool call failed: a stable code a model (or a person) can act on, and what exactly
/// was wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ToolError {
    /// `UNKNOWN_TOOL`, `INVALID_ARGUMENTS`, `INVALID_SYMBOL`, `INVALID_TIMEFRAME`,
    /// `INVALID_HORIZON`, `INVALID_METRIC`, `UNKNOWN_STRATEGY`, `LIMIT_EXCEEDED`, `NO_DATA`,
    /// `HISTORY_DISABLED`, `UNAVAILABLE`.
    pub code: &'static str,
    /// The detail.
    pub message: String,
}

impl ToolError {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        ToolError {
            code,
            message: message.into(),
        }
    }

    /// The error as a tool answer's body: `{"error": {"code", "message"}}`.
    pub fn to_json(&self) -> Value {
        json!({"error": {"code": self.code, "message": self.message}})
    }

    /// Whether asking again later could succeed (such errors are not cached).
    fn transient(&self) -> bool {
        self.code == "UNAVAILABLE"
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
}

/// Candle widths the tools aggregate to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timeframe {
    M1,
    M5,
    M15,
    H1,
}

impl Timeframe {
    fn minutes(self) -> usize {
        match self {
            Timeframe::M1 => 1,
            Timeframe::M5 => 5,
            Timeframe::M15 => 15,
            Timeframe::H1 => 60,
        }
    }
    fn label(self) -> &'static str {
        match self {
            Timeframe::M1 => "1m",
            Timeframe::M5 => "5m",
            Timeframe::M15 => "15m",
            Timeframe::H1 => "1h",
        }
    }
    fn parse(s: &str) -> Result<Timeframe, ToolError> {
        match s {
            "1m" => Ok(Timeframe::M1),
            "5m" => Ok(Timeframe::M5),
            "15m" => Ok(Timeframe::M15),
            "1h" => Ok(Timeframe::H1),
            other => Err(ToolError::new(
                "INVALID_TIMEFRAME",
                format!("timeframe {other:?} is not one of 1m, 5m, 15m, 1h"),
            )),
        }
    }
}

/// `get_candles` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct CandlesArgs {
    /// A configured symbol, e.g. `BTC/USD`.
    symbol: String,
    /// Candle width: `1m`, `5m`, `15m` or `1h` (default `1m`).
    #[serde(default)]
    timeframe: Option<String>,
    /// Candles to return, newest last (1–500, default 60).
    #[serde(default)]
    limit: Option<u32>,
    /// Skip this many newest candles first (paging back in time; default 0).
    #[serde(default)]
    offset: Option<u32>,
}

/// Arguments naming one symbol.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct SymbolArgs {
    /// A configured symbol, e.g. `BTC/USD`.
    symbol: String,
}

/// `get_volatility` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct VolatilityArgs {
    /// A configured symbol, e.g. `BTC/USD`.
    symbol: String,
    /// Candle width the returns are measured over: `1m`, `5m`, `15m`, `1h` (default `1m`).
    #[serde(default)]
    timeframe: Option<String>,
}

/// `get_top_strategies` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct TopStrategiesArgs {
    /// A configured symbol, e.g. `BTC/USD`.
    symbol: String,
    /// Strategies to return (1–10, default 3).
    #[serde(default)]
    limit: Option<u32>,
    /// Ranking: `hit_rate` (each strategy's live hit rate over the last 30 minutes of this
    /// symbol, the default) or `graded_hit_rate` (how signals led by the strategy were graded
    /// at 15 minutes over the last 7 days, all symbols).
    #[serde(default)]
    metric: Option<String>,
}

/// `get_strategy_signal` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct StrategySignalArgs {
    /// A strategy's name, as `get_top_strategies` lists them (e.g. `momentum`).
    strategy_id: String,
    /// A configured symbol, e.g. `BTC/USD`.
    symbol: String,
}

/// `get_recent_decisions` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct DecisionsArgs {
    /// A configured symbol, e.g. `BTC/USD`.
    symbol: String,
    /// Decisions to return, newest first (1–50, default 10).
    #[serde(default)]
    limit: Option<u32>,
}

/// `get_signal_performance` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct PerformanceArgs {
    /// A configured symbol, e.g. `BTC/USD`.
    symbol: String,
    /// Grading horizon, e.g. `5m`, `15m`, `1h` (default `15m`).
    #[serde(default)]
    horizon: Option<String>,
}

/// The tools: name, description, argument type.
fn definitions() -> Vec<ToolDef> {
    fn def<A: JsonSchema>(
        name: &'static str,
        description: &'static str,
        brief: &'static str,
    ) -> ToolDef {
        let schema = schemars::generate::SchemaSettings::draft2020_12()
            .with(|s| s.inline_subschemas = true)
            .into_generator()
            .into_root_schema_for::<A>();
        let mut input_schema = match serde_json::to_value(schema) {
            Ok(Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        // Clients want the object schema itself; the draft marker and the Rust type's title and
        // doc are noise to a model (each field keeps its own description).
        input_schema.remove("$schema");
        input_schema.remove("title");
        input_schema.remove("description");
        ToolDef {
            name,
            description,
            brief,
            input_schema,
        }
    }
    vec![
        def::<CandlesArgs>(
            "get_candles",
            "OHLCV candles of a symbol from the configured market source, oldest first, newest last.",
            "OHLCV candles, oldest first. timeframe 1m|5m|15m|1h, limit 1-500, offset skips the newest.",
        ),
        def::<SymbolArgs>(
            "get_current_price",
            "The latest close of a symbol, its change over the last hour, and when it was taken.",
            "Latest close, 1-hour change, and its time.",
        ),
        def::<VolatilityArgs>(
            "get_volatility",
            "Volatility of a symbol: standard deviation of candle returns over the last 60 candles of the timeframe, and the 1-hour volatility.",
            "Stdev of returns over 60 candles of timeframe 1m|5m|15m|1h, and 1-hour volatility.",
        ),
        def::<TopStrategiesArgs>(
            "get_top_strategies",
            "The rules strategies ranked for a symbol, each with its current verdict (BUY/SELL/HOLD), its live hit rate and its parameters.",
            "Strategies ranked by metric hit_rate|graded_hit_rate, with verdict and parameters; limit 1-10.",
        ),
        def::<StrategySignalArgs>(
            "get_strategy_signal",
            "One strategy's current verdict on a symbol, with its hit rate and parameters.",
            "One strategy's verdict, hit rate and parameters.",
        ),
        def::<SymbolArgs>(
            "get_strategy_consensus",
            "How the strategies vote on a symbol now: bullish, bearish and neutral counts, the consensus action and the rules agent's confidence for it.",
            "Bullish/bearish/neutral counts, consensus action and confidence.",
        ),
        def::<DecisionsArgs>(
            "get_recent_decisions",
            "This service's most recent signals for a symbol, newest first, each with how it was graded so far (hit or miss at each horizon).",
            "This service's latest signals, newest first, with their grades; limit 1-50.",
        ),
        def::<PerformanceArgs>(
            "get_signal_performance",
            "How this service's signals for a symbol have turned out over the last 7 days at one horizon: hit rate with its 95% interval, mean and median return, Brier score.",
            "This service's 7-day record at one graded horizon (e.g. 15m): hit rate, returns, Brier score.",
        ),
    ]
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
    symbols: BTreeSet<String>,
    clock: Clock,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for Toolbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Toolbox")
            .field("market", &self.market.name())
            .field("symbols", &self.symbols.len())
            .finish_non_exhaustive()
    }
}

fn read<A: DeserializeOwned>(args: &Value) -> Result<A, ToolError> {
    // An absent `arguments` is an empty object (MCP clients may omit it).
    let args = if args.is_null() { &json!({}) } else { args };
    // serde would read an array positionally into a struct; tool arguments are named.
    if !args.is_object() {
        return Err(ToolError::new(
            "INVALID_ARGUMENTS",
            "arguments must be a JSON object of named fields",
        ));
    }
    serde_path_to_error::deserialize(args).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        ToolError::new(
            "INVALID_ARGUMENTS",
            if path == "." {
                inner
            } else {
                format!("{path}: {inner}")
            },
        )
    })
}

fn bounded(what: &str, v: Option<u32>, default: u32, max: u32) -> Result<u32, ToolError> {
    match v.unwrap_or(default) {
        0 => Err(ToolError::new(
            "INVALID_ARGUMENTS",
            format!("{what} must be at least 1"),
        )),
        n if n > max => Err(ToolError::new(
            "LIMIT_EXCEEDED",
            format!("{what} {n} is more than {max}"),
        )),
        n => Ok(n),
    }
}

/// Candles of `width` minutes from 1-minute ones (oldest first), whole buckets only, aligned
/// to the width in UTC.
fn aggregate(c: &[Candle], width: usize) -> Vec<Candle> {
    if width <= 1 {
        return c.to_vec();
    }
    let w = TimeDelta::minutes(width as i64);
    let mut out: Vec<(Candle, usize)> = vec![];
    for k in c {
        let start = k.time.duration_trunc(w).unwrap_or(k.time);
        match out.last_mut() {
            Some((b, n)) if b.time == start => {
                b.high = b.high.max(k.high);
                b.low = b.low.min(k.low);
                b.close = k.close;
                b.volume += k.volume;
                *n += 1;
            }
            _ => out.push((Candle { time: start, ..*k }, 1)),
        }
    }
    // A bucket missing minutes at either end (the window's edge) would misstate its range.
    out.into_iter()
        .filter(|(_, n)| *n == width)
        .map(|(b, _)| b)
        .collect()
}

fn candle_json(c: &Candle) -> Value {
    json!({
        "time": c.time.to_rfc3339(),
        "open": c.open, "high": c.high, "low": c.low, "close": c.close, "volume": c.volume,
    })
}

/// Standard deviation of successive close-to-close returns.
fn stdev_of_returns(c: &[Candle]) -> Option<f64> {
    let r: Vec<f64> = c
        .windows(2)
        .filter(|w| w[0].close > 0.0)
        .map(|w| w[1].close / w[0].close - 1.0)
        .collect();
    if r.len() < 2 {
        return None;
    }
    let mean = r.iter().sum::<f64>() / r.len() as f64;
    Some((r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (r.len() - 1) as f64).sqrt())
}

impl Toolbox {
    /// Tools over `market` and (when history is on) `history`, answering for `symbols` only,
    /// at the time `clock` says.
    pub fn new(
        market: Arc<dyn MarketSource>,
        history: Option<Arc<dyn HistoryStore>>,
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
            symbols: symbols.iter().cloned().collect(),
            clock,
            cache: Mutex::new(Cache::default()),
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

    /// Runs `name` with `args`: its JSON answer, or a coded error. Counted and timed under
    /// `mcp_tool_calls_total{tool,outcome}` and `mcp_tool_duration_seconds{tool}`, whichever
    /// client asked.
    pub async fn call(&self, name: &str, args: &Value) -> Result<Arc<Value>, ToolError> {
        let started = Instant::now();
        // Only known names become label values: a client inventing names cannot grow the
        // metric's series.
        let tool: &'static str = self
            .defs
            .iter()
            .find(|d| d.name == name)
            .map(|d| d.name)
            .unwrap_or("unknown");
        let r = if tool == "unknown" {
            Err(ToolError::new(
                "UNKNOWN_TOOL",
                format!(
                    "no tool named {:?}; the tools are {}",
                    name.chars().take(64).collect::<String>(),
                    self.defs
                        .iter()
                        .map(|d| d.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ))
        } else {
            self.cached(tool, args).await
        };
        let outcome = match &r {
            Ok(_) => "ok".to_string(),
            Err(e) => e.code.to_ascii_lowercase(),
        };
        metrics::counter!(names::MCP_TOOL_CALLS, "tool" => tool, "outcome" => outcome).increment(1);
        metrics::histogram!(names::MCP_TOOL_DURATION_SECONDS, "tool" => tool)
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

    async fn cached(&self, tool: &'static str, args: &Value) -> Result<Arc<Value>, ToolError> {
        let minute = self.minute();
        // serde_json's maps are sorted, so equal arguments give equal keys.
        let key = format!("{tool} {args}");
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
            match self.run(tool, args, minute).await {
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

    fn symbol(&self, s: &str) -> Result<(), ToolError> {
        if self.symbols.contains(s) {
            return Ok(());
        }
        let shown: String = s.chars().take(32).collect();
        Err(ToolError::new(
            "INVALID_SYMBOL",
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
                    .map_err(|e| ToolError::new("UNAVAILABLE", e.to_string()))
            })
            .await?
            .clone();
        if c.is_empty() {
            return Err(ToolError::new(
                "NO_DATA",
                format!("the market source has no candles for {symbol}"),
            ));
        }
        Ok(c)
    }

    fn store(&self) -> Result<&Arc<dyn HistoryStore>, ToolError> {
        self.history.as_ref().ok_or_else(|| {
            ToolError::new(
                "HISTORY_DISABLED",
                "this service keeps no history (history.enabled is false)",
            )
        })
    }

    async fn run(
        &self,
        tool: &'static str,
        args: &Value,
        minute: DateTime<Utc>,
    ) -> Result<Value, ToolError> {
        let simulated = self.market.name() == "simulated";
        match tool {
            "get_candles" => {
                let a: CandlesArgs = read(args)?;
                self.symbol(&a.symbol)?;
                let tf = Timeframe::parse(a.timeframe.as_deref().unwrap_or("1m"))?;
                let limit = bounded("limit", a.limit, 60, MAX_CANDLES)? as usize;
                let offset = a.offset.unwrap_or(0) as usize;
                let span = (limit + offset) * tf.minutes();
                if span > MAX_SPAN_MINUTES {
                    return Err(ToolError::new(
                        "LIMIT_EXCEEDED",
                        format!(
                            "(limit + offset) × timeframe spans {span} minutes; at most {MAX_SPAN_MINUTES} (one day)"
                        ),
                    ));
                }
                // One bucket more than asked: the oldest may be partial and is dropped.
                let raw = self.candles(&a.symbol, span + tf.minutes(), minute).await?;
                let all = aggregate(&raw, tf.minutes());
                let end = all.len().saturating_sub(offset);
                let start = end.saturating_sub(limit);
                let picked = &all[start..end];
                if picked.is_empty() {
                    return Err(ToolError::new(
                        "NO_DATA",
                        format!(
                            "no {} candles of {} at offset {offset}",
                            tf.label(),
                            a.symbol
                        ),
                    ));
                }
                Ok(json!({
                    "symbol": a.symbol,
                    "timeframe": tf.label(),
                    "candles": picked.iter().map(candle_json).collect::<Vec<_>>(),
                    "source": self.market.name(),
                    "simulated": simulated,
                }))
            }
            "get_current_price" => {
                let a: SymbolArgs = read(args)?;
                self.symbol(&a.symbol)?;
                let c = self.candles(&a.symbol, 61, minute).await?;
                let ctx = crate::market::summarize(&c);
                let last = c.last().map(|k| k.time.to_rfc3339());
                Ok(json!({
                    "symbol": a.symbol,
                    "price": ctx.current_price,
                    "change_1h": ctx.price_change_1h,
                    "as_of": last,
                    "source": self.market.name(),
                    "simulated": simulated,
                }))
            }
            "get_volatility" => {
                let a: VolatilityArgs = read(args)?;
                self.symbol(&a.symbol)?;
                let tf = Timeframe::parse(a.timeframe.as_deref().unwrap_or("1m"))?;
                let raw = self
                    .candles(&a.symbol, (VOLATILITY_CANDLES + 1) * tf.minutes(), minute)
                    .await?;
                let c = aggregate(&raw, tf.minutes());
                let stdev = stdev_of_returns(&c).ok_or_else(|| {
                    ToolError::new(
                        "NO_DATA",
                        format!(
                            "too few {} candles of {} for a volatility",
                            tf.label(),
                            a.symbol
                        ),
                    )
                })?;
                let hour = crate::market::summarize(&raw[raw.len().saturating_sub(61)..]);
                Ok(json!({
                    "symbol": a.symbol,
                    "timeframe": tf.label(),
                    "candles": c.len(),
                    "stdev_return": stdev,
                    "volatility_1h": hour.volatility_1h,
                    "simulated": simulated,
                }))
            }
            "get_top_strategies" => {
                let a: TopStrategiesArgs = read(args)?;
                self.symbol(&a.symbol)?;
                let limit = bounded("limit", a.limit, 3, MAX_STRATEGIES)? as usize;
                let metric = a.metric.as_deref().unwrap_or("hit_rate");
                let verdicts = self.verdicts(&a.symbol, minute).await?;
                let mut ranked: Vec<(f64, &(crate::model::StrategyVerdict, Value))> = match metric {
                    "hit_rate" => verdicts.iter().map(|v| (v.0.score, v)).collect(),
                    "graded_hit_rate" => {
                        let since = minute.timestamp() - 7 * 86_400;
                        let groups =
                            scorecard_of(self.store()?.as_ref(), 900, GroupBy::Strategy, since)
                                .await
                                .map_err(|e| ToolError::new("UNAVAILABLE", e.to_string()))?;
                        verdicts
                            .iter()
                            .map(|v| {
                                let graded = groups
                                    .iter()
                                    .find(|g| g.key == v.0.name)
                                    .map_or(-1.0, |g| g.hit_rate);
                                (graded, v)
                            })
                            .collect()
                    }
                    other => {
                        return Err(ToolError::new(
                            "INVALID_METRIC",
                            format!("metric {other:?} is not one of hit_rate, graded_hit_rate"),
                        ));
                    }
                };
                ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.0.name.cmp(&b.1.0.name)));
                Ok(json!({
                    "symbol": a.symbol,
                    "metric": metric,
                    "strategies": ranked.iter().take(limit).map(|(m, (v, p))| json!({
                        "strategy_id": v.name,
                        "signal": v.signal,
                        "hit_rate": v.score,
                        // The ranking figure; null when the strategy has no grades yet.
                        "rank_value": if *m < 0.0 { Value::Null } else { json!(m) },
                        "parameters": p,
                    })).collect::<Vec<_>>(),
                    "hit_rate_window_minutes": rules::HIT_WINDOW,
                    "simulated": simulated,
                }))
            }
            "get_strategy_signal" => {
                let a: StrategySignalArgs = read(args)?;
                self.symbol(&a.symbol)?;
                let verdicts = self.verdicts(&a.symbol, minute).await?;
                let (v, p) = verdicts
                    .iter()
                    .find(|(v, _)| v.name == a.strategy_id)
                    .ok_or_else(|| {
                        ToolError::new(
                            "UNKNOWN_STRATEGY",
                            format!(
                                "no strategy {:?}; the strategies are {}",
                                a.strategy_id.chars().take(64).collect::<String>(),
                                verdicts
                                    .iter()
                                    .map(|(v, _)| v.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        )
                    })?;
                Ok(json!({
                    "symbol": a.symbol,
                    "strategy_id": v.name,
                    "signal": v.signal,
                    "hit_rate": v.score,
                    "parameters": p,
                    "simulated": simulated,
                }))
            }
            "get_strategy_consensus" => {
                let a: SymbolArgs = read(args)?;
                self.symbol(&a.symbol)?;
                let verdicts = self.verdicts(&a.symbol, minute).await?;
                let vs: Vec<_> = verdicts.iter().map(|(v, _)| v.clone()).collect();
                let (action, bull, bear, neutral) = rules::consensus(&vs);
                let n = vs.len().max(1) as f64;
                let backing = match action {
                    Action::Buy => bull,
                    Action::Sell => bear,
                    Action::Hold => neutral,
                };
                let mean = vs.iter().map(|v| v.score).sum::<f64>() / n;
                let ratio = f64::from(backing) / n;
                Ok(json!({
                    "symbol": a.symbol,
                    "action": action,
                    "bullish": bull,
                    "bearish": bear,
                    "neutral": neutral,
                    "consensus_ratio": ratio,
                    "confidence": rules::confidence(ratio, mean),
                    "simulated": simulated,
                }))
            }
            "get_recent_decisions" => {
                let a: DecisionsArgs = read(args)?;
                self.symbol(&a.symbol)?;
                let limit = bounded("limit", a.limit, 10, MAX_DECISIONS)? as usize;
                let rows = self
                    .store()?
                    .page(&HistoryQuery {
                        symbol: Some(a.symbol.clone()),
                        stage: Some(Stage::Signal),
                        limit,
                        ..HistoryQuery::default()
                    })
                    .await
                    .map_err(|e| ToolError::new("UNAVAILABLE", e.to_string()))?;
                if rows.is_empty() {
                    return Err(ToolError::new(
                        "NO_DATA",
                        format!("no decisions recorded for {} yet", a.symbol),
                    ));
                }
                let decisions: Vec<Value> = rows
                    .iter()
                    .map(|r| {
                        let p = &r.message["payload"];
                        json!({
                            "cycle_id": r.cycle_id,
                            "action": p["action"],
                            "confidence": p["confidence"],
                            "price": p["market_context"]["current_price"],
                            "top_strategy": p["top_strategy"]["name"],
                            "reasoning": p["reasoning"],
                            "grades": r.grades,
                        })
                    })
                    .collect();
                Ok(json!({"symbol": a.symbol, "decisions": decisions}))
            }
            "get_signal_performance" => {
                let a: PerformanceArgs = read(args)?;
                self.symbol(&a.symbol)?;
                let horizon_text = a.horizon.as_deref().unwrap_or("15m");
                let horizon = parse_horizon(horizon_text).ok_or_else(|| {
                    ToolError::new(
                        "INVALID_HORIZON",
                        format!(
                            "horizon {:?} is not minutes or hours, e.g. 5m, 15m, 1h",
                            horizon_text.chars().take(16).collect::<String>()
                        ),
                    )
                })?;
                let since = minute.timestamp() - 7 * 86_400;
                let groups = scorecard_of(self.store()?.as_ref(), horizon, GroupBy::Symbol, since)
                    .await
                    .map_err(|e| ToolError::new("UNAVAILABLE", e.to_string()))?;
                let g = groups
                    .into_iter()
                    .find(|g| g.key == a.symbol)
                    .ok_or_else(|| {
                        ToolError::new(
                            "NO_DATA",
                            format!(
                                "no graded signals of {} at {} in the last 7 days",
                                a.symbol,
                                horizon_label(horizon)
                            ),
                        )
                    })?;
                Ok(json!({
                    "symbol": a.symbol,
                    "horizon": horizon_label(horizon),
                    "graded": g.graded,
                    "hits": g.hits,
                    "hit_rate": g.hit_rate,
                    "hit_rate_ci95": g.hit_rate_ci95,
                    "mean_return": g.mean_return,
                    "median_return": g.median_return,
                    "brier": g.brier,
                    "simulated": simulated,
                }))
            }
            _ => Err(ToolError::new("UNKNOWN_TOOL", tool)),
        }
    }

    /// Every strategy's verdict on `symbol` now, with its parameters.
    async fn verdicts(
        &self,
        symbol: &str,
        minute: DateTime<Utc>,
    ) -> Result<Vec<(crate::model::StrategyVerdict, Value)>, ToolError> {
        let c = self.candles(symbol, STRATEGY_CANDLES, minute).await?;
        if c.len() < crate::market::MIN_CANDLES {
            return Err(ToolError::new(
                "NO_DATA",
                format!(
                    "{} candles of {symbol}; the strategies need at least {}",
                    c.len(),
                    crate::market::MIN_CANDLES
                ),
            ));
        }
        Ok(rules::evaluate(&c))
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
            assert_eq!(e.code, code, "{tool} {args}: {e}");
            assert!(e.message.contains(says), "{tool} {args}: {e}");
        }
        // None of them needed the market.
        assert_eq!(market.fetches.load(Ordering::Relaxed), 0);
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
