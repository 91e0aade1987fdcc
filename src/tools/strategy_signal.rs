//! `get_strategy_signal`: one strategy's current verdict on a symbol.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Code, MAX_NAME_SHOWN, ToolError, ToolSpec, Toolbox};

/// `get_strategy_signal` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Args {
    /// A strategy's name, as `get_top_strategies` lists them (e.g. `momentum`).
    strategy_id: String,
    /// A configured symbol, e.g. `BTC/USD`.
    symbol: String,
}

/// The tool.
pub(super) struct GetStrategySignal;

impl ToolSpec for GetStrategySignal {
    type Args = Args;
    const NAME: &'static str = "get_strategy_signal";
    const DESCRIPTION: &'static str =
        "One strategy's current verdict on a symbol, with its hit rate and parameters.";
    const BRIEF: &'static str = "One strategy's verdict, hit rate and parameters.";
    const OUTPUT: &'static [&'static str] = &[
        "symbol",
        "strategy_id",
        "signal",
        "hit_rate",
        "parameters",
        "simulated",
    ];

    async fn run(tb: &Toolbox, a: Args, minute: DateTime<Utc>) -> Result<Value, ToolError> {
        tb.symbol(&a.symbol)?;
        let verdicts = tb.verdicts(&a.symbol, minute).await?;
        let (v, p) = verdicts
            .iter()
            .find(|(v, _)| v.name == a.strategy_id)
            .ok_or_else(|| {
                ToolError::new(
                    Code::UnknownStrategy,
                    format!(
                        "no strategy {:?}; the strategies are {}",
                        a.strategy_id
                            .chars()
                            .take(MAX_NAME_SHOWN)
                            .collect::<String>(),
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
            "simulated": tb.simulated(),
        }))
    }
}
