//! `get_candles`: OHLCV candles of a symbol at a timeframe, paged back in time. Also the
//! candle widths the tools aggregate to, shared with `get_volatility`.

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Code, MAX_CANDLES, MAX_SPAN_MINUTES, ToolError, ToolSpec, Toolbox, bounded};
use crate::market::Candle;

/// Candle widths the tools aggregate to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timeframe {
    M1,
    M5,
    M15,
    H1,
}

impl Timeframe {
    pub(super) fn minutes(self) -> usize {
        match self {
            Timeframe::M1 => 1,
            Timeframe::M5 => 5,
            Timeframe::M15 => 15,
            Timeframe::H1 => 60,
        }
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            Timeframe::M1 => "1m",
            Timeframe::M5 => "5m",
            Timeframe::M15 => "15m",
            Timeframe::H1 => "1h",
        }
    }

    /// The argument's timeframe (`1m` when absent).
    /// (The schema's enum is [`TIMEFRAMES`]; a test holds the two together.)
    pub(super) fn parse(s: Option<&str>) -> Result<Timeframe, ToolError> {
        match s.unwrap_or("1m") {
            "1m" => Ok(Timeframe::M1),
            "5m" => Ok(Timeframe::M5),
            "15m" => Ok(Timeframe::M15),
            "1h" => Ok(Timeframe::H1),
            other => Err(ToolError::new(
                Code::InvalidTimeframe,
                format!("timeframe {other:?} is not one of 1m, 5m, 15m, 1h"),
            )),
        }
    }
}

/// Candles of `width` minutes from 1-minute ones (oldest first), whole buckets only, aligned
/// to the width in UTC.
pub(super) fn aggregate(c: &[Candle], width: usize) -> Vec<Candle> {
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

/// The timeframes a caller may ask for, as the schema lists them.
pub(super) const TIMEFRAMES: [&str; 4] = ["1m", "5m", "15m", "1h"];
/// Candles returned when `limit` is absent.
const DEFAULT_LIMIT: u32 = 60;

/// `get_candles` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Args {
    /// A configured symbol, e.g. `BTC/USD`.
    symbol: String,
    /// Candle width: `1m`, `5m`, `15m` or `1h` (default `1m`).
    #[serde(default)]
    #[schemars(with = "String", extend("enum" = TIMEFRAMES, "default" = "1m"))]
    timeframe: Option<String>,
    /// Candles to return, newest last (1–500, default 60).
    #[serde(default, deserialize_with = "super::whole")]
    #[schemars(with = "u32", range(min = 1, max = MAX_CANDLES), extend("default" = DEFAULT_LIMIT))]
    limit: Option<u32>,
    /// Skip this many newest candles first (paging back in time; default 0).
    #[serde(default, deserialize_with = "super::whole")]
    #[schemars(with = "u32", extend("default" = 0))]
    offset: Option<u32>,
}

/// The tool.
pub(super) struct GetCandles;

impl ToolSpec for GetCandles {
    type Args = Args;
    const NAME: &'static str = "get_candles";
    const DESCRIPTION: &'static str =
        "OHLCV candles of a symbol from the configured market source, oldest first, newest last.";
    const BRIEF: &'static str = "OHLCV candles, oldest first. timeframe 1m|5m|15m|1h, limit 1-500, offset skips the newest.";
    const OUTPUT: &'static [&'static str] =
        &["symbol", "timeframe", "candles", "source", "simulated"];

    async fn run(tb: &Toolbox, a: Args, minute: DateTime<Utc>) -> Result<Value, ToolError> {
        tb.symbol(&a.symbol)?;
        let tf = Timeframe::parse(a.timeframe.as_deref())?;
        let limit = bounded("limit", a.limit, DEFAULT_LIMIT, MAX_CANDLES)? as usize;
        let offset = a.offset.unwrap_or(0) as usize;
        let span = (limit + offset) * tf.minutes();
        if span > MAX_SPAN_MINUTES {
            return Err(ToolError::new(
                Code::LimitExceeded,
                format!(
                    "(limit + offset) × timeframe spans {span} minutes; at most {MAX_SPAN_MINUTES} (one day)"
                ),
            ));
        }
        // One bucket more than asked: the oldest may be partial and is dropped.
        let raw = tb.candles(&a.symbol, span + tf.minutes(), minute).await?;
        let all = aggregate(&raw, tf.minutes());
        let end = all.len().saturating_sub(offset);
        let start = end.saturating_sub(limit);
        let picked = &all[start..end];
        if picked.is_empty() {
            return Err(ToolError::new(
                Code::NoData,
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
            "source": tb.market_source(),
            "simulated": tb.simulated(),
        }))
    }
}
