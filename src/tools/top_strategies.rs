//! `get_top_strategies`: the strategies ranked for a symbol by their live hit rate or by how
//! the signals they led were graded.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Code, MAX_STRATEGIES, ToolError, ToolSpec, Toolbox, bounded};
use crate::history::GroupBy;
use crate::history::grading::scorecard_of;
use crate::strategy::{Evaluated, HIT_WINDOW};

/// The horizon the `graded_hit_rate` ranking reads (15 minutes).
const GRADED_HORIZON_SECONDS: i64 = 900;
/// How far back the `graded_hit_rate` ranking reads.
const GRADED_DAYS: i64 = 7;

/// Strategies returned when `limit` is absent.
const DEFAULT_LIMIT: u32 = 3;

/// `get_top_strategies` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Args {
    /// A configured symbol, e.g. `BTC/USD`.
    symbol: String,
    /// Strategies to return (1–10, default 3).
    #[serde(default, deserialize_with = "super::whole")]
    #[schemars(with = "u32", range(min = 1, max = MAX_STRATEGIES), extend("default" = DEFAULT_LIMIT))]
    limit: Option<u32>,
    /// Ranking: `hit_rate` (each strategy's live hit rate over the last 30 minutes of this
    /// symbol, the default) or `graded_hit_rate` (how signals led by the strategy were graded
    /// at 15 minutes over the last 7 days, all symbols).
    #[serde(default)]
    #[schemars(with = "String", extend("enum" = ["hit_rate", "graded_hit_rate"], "default" = "hit_rate"))]
    metric: Option<String>,
}

/// The tool.
pub(super) struct GetTopStrategies;

impl ToolSpec for GetTopStrategies {
    type Args = Args;
    const NAME: &'static str = "get_top_strategies";
    const DESCRIPTION: &'static str = "The rules strategies ranked for a symbol, each with its current verdict (BUY/SELL/HOLD), its live hit rate and its parameters.";
    const BRIEF: &'static str = "Strategies ranked by metric hit_rate|graded_hit_rate, with verdict and parameters; limit 1-10.";
    const OUTPUT: &'static [&'static str] = &[
        "symbol",
        "metric",
        "strategies",
        "hit_rate_window_minutes",
        "simulated",
    ];

    async fn run(tb: &Toolbox, a: Args, minute: DateTime<Utc>) -> Result<Value, ToolError> {
        tb.symbol(&a.symbol)?;
        let limit = bounded("limit", a.limit, DEFAULT_LIMIT, MAX_STRATEGIES)? as usize;
        let metric = a.metric.as_deref().unwrap_or("hit_rate");
        let verdicts = tb.verdicts(&a.symbol, minute).await?;
        let mut ranked: Vec<(f64, &Evaluated)> = match metric {
            "hit_rate" => verdicts.iter().map(|v| (v.0.score, v)).collect(),
            "graded_hit_rate" => {
                let since = minute.timestamp() - GRADED_DAYS * 86_400;
                let groups = scorecard_of(
                    tb.store()?.as_ref(),
                    GRADED_HORIZON_SECONDS,
                    GroupBy::Strategy,
                    since,
                )
                .await
                .map_err(|e| ToolError::new(Code::Unavailable, e.to_string()))?;
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
                    Code::InvalidMetric,
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
            "hit_rate_window_minutes": HIT_WINDOW,
            "simulated": tb.simulated(),
        }))
    }
}
