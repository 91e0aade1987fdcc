//! `get_signal_performance`: this service's 7-day record for a symbol at one graded horizon.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Code, ToolError, ToolSpec, Toolbox};
use crate::history::GroupBy;
use crate::history::grading::{horizon_label, scorecard_of};

/// How far back the record reaches.
const DAYS: i64 = 7;

/// `get_signal_performance` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Args {
    /// A configured symbol, e.g. `BTC/USD`.
    symbol: String,
    /// Grading horizon, one of those the history grades, e.g. `5m`, `15m`, `1h` (default
    /// `15m` when graded, else the shortest); the schema lists them.
    #[serde(default)]
    #[schemars(with = "String")]
    horizon: Option<String>,
}

/// The tool.
pub(super) struct GetSignalPerformance;

impl ToolSpec for GetSignalPerformance {
    type Args = Args;
    const NAME: &'static str = "get_signal_performance";
    const DESCRIPTION: &'static str = "How this service's signals for a symbol have turned out over the last 7 days at one horizon: hit rate with its 95% interval, mean and median return, Brier score and its skill against the base rate, the calibrated confidence's reliability, and naive baselines (always HOLD, momentum) with the skill against the better one.";
    const BRIEF: &'static str = "This service's 7-day record at one graded horizon (e.g. 15m): hit rate, returns, Brier score.";
    const OUTPUT: &'static [&'static str] = &[
        "symbol",
        "horizon",
        "graded",
        "hits",
        "hit_rate",
        "hit_rate_ci95",
        "mean_return",
        "median_return",
        "brier",
        "brier_skill",
        "calibrated",
        "baselines",
        "simulated",
    ];

    async fn run(tb: &Toolbox, a: Args, minute: DateTime<Utc>) -> Result<Value, ToolError> {
        tb.symbol(&a.symbol)?;
        let horizon = tb.horizon(a.horizon.as_deref())?;
        let since = minute.timestamp() - DAYS * 86_400;
        let groups = scorecard_of(tb.store()?.as_ref(), horizon, GroupBy::Symbol, since)
            .await
            .map_err(|e| ToolError::new(Code::Unavailable, e.to_string()))?;
        let g = groups
            .into_iter()
            .find(|g| g.key == a.symbol)
            .ok_or_else(|| {
                ToolError::new(
                    Code::NoData,
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
            "brier_skill": g.brier_skill,
            "calibrated": g.calibrated,
            "baselines": g.baselines,
            "simulated": tb.simulated(),
        }))
    }
}
