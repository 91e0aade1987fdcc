//! `get_volatility`: the standard deviation of a symbol's returns over the last 60 candles of
//! a timeframe, and its 1-hour volatility (both from [`crate::strategy::indicators`], the one
//! place volatility is computed).

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};

use super::candles::{Timeframe, aggregate};
use super::{Code, ToolError, ToolSpec, Toolbox};
use crate::strategy::indicators::returns_stdev;
use crate::strategy::summarize;

/// Candles behind a volatility figure.
const VOLATILITY_CANDLES: usize = 60;

/// `get_volatility` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Args {
    /// A configured symbol, e.g. `BTC/USD`.
    symbol: String,
    /// Candle width the returns are measured over: `1m`, `5m`, `15m`, `1h` (default `1m`).
    #[serde(default)]
    #[schemars(with = "String", extend("enum" = super::candles::TIMEFRAMES, "default" = "1m"))]
    timeframe: Option<String>,
}

/// The tool.
pub(super) struct GetVolatility;

impl ToolSpec for GetVolatility {
    type Args = Args;
    const NAME: &'static str = "get_volatility";
    const DESCRIPTION: &'static str = "Volatility of a symbol: standard deviation of candle returns over the last 60 candles of the timeframe, and the 1-hour volatility.";
    const BRIEF: &'static str =
        "Stdev of returns over 60 candles of timeframe 1m|5m|15m|1h, and 1-hour volatility.";
    const OUTPUT: &'static [&'static str] = &[
        "symbol",
        "timeframe",
        "candles",
        "stdev_return",
        "volatility_1h",
        "simulated",
    ];

    async fn run(tb: &Toolbox, a: Args, minute: DateTime<Utc>) -> Result<Value, ToolError> {
        tb.symbol(&a.symbol)?;
        let tf = Timeframe::parse(a.timeframe.as_deref())?;
        let raw = tb
            .candles(&a.symbol, (VOLATILITY_CANDLES + 1) * tf.minutes(), minute)
            .await?;
        let c = aggregate(&raw, tf.minutes());
        let stdev = returns_stdev(&c).ok_or_else(|| {
            ToolError::new(
                Code::NoData,
                format!(
                    "too few {} candles of {} for a volatility",
                    tf.label(),
                    a.symbol
                ),
            )
        })?;
        let hour = summarize(&raw[raw.len().saturating_sub(61)..]);
        Ok(json!({
            "symbol": a.symbol,
            "timeframe": tf.label(),
            "candles": c.len(),
            "stdev_return": stdev,
            "volatility_1h": hour.volatility_1h,
            "simulated": tb.simulated(),
        }))
    }
}
