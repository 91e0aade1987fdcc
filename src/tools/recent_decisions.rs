//! `get_recent_decisions`: this service's latest signals for a symbol, newest first, with
//! how each was graded so far.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Code, MAX_DECISIONS, ToolError, ToolSpec, Toolbox, bounded};
use crate::history::HistoryQuery;
use crate::model::Stage;

/// Decisions returned when `limit` is absent.
const DEFAULT_LIMIT: u32 = 10;

/// `get_recent_decisions` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Args {
    /// A configured symbol, e.g. `BTC/USD`.
    symbol: String,
    /// Decisions to return, newest first (1–50, default 10).
    #[serde(default, deserialize_with = "super::whole")]
    #[schemars(with = "u32", range(min = 1, max = MAX_DECISIONS), extend("default" = DEFAULT_LIMIT))]
    limit: Option<u32>,
}

/// The tool.
pub(super) struct GetRecentDecisions;

impl ToolSpec for GetRecentDecisions {
    type Args = Args;
    const NAME: &'static str = "get_recent_decisions";
    const DESCRIPTION: &'static str = "This service's most recent signals for a symbol, newest first, each with how it was graded so far (hit or miss at each horizon).";
    const BRIEF: &'static str =
        "This service's latest signals, newest first, with their grades; limit 1-50.";
    const OUTPUT: &'static [&'static str] = &["symbol", "decisions"];

    async fn run(tb: &Toolbox, a: Args, _minute: DateTime<Utc>) -> Result<Value, ToolError> {
        tb.symbol(&a.symbol)?;
        let limit = bounded("limit", a.limit, DEFAULT_LIMIT, MAX_DECISIONS)? as usize;
        let rows = tb
            .store()?
            .page(&HistoryQuery {
                symbol: Some(a.symbol.clone()),
                stage: Some(Stage::Signal),
                limit,
                ..HistoryQuery::default()
            })
            .await
            .map_err(|e| ToolError::new(Code::Unavailable, e.to_string()))?;
        if rows.is_empty() {
            return Err(ToolError::new(
                Code::NoData,
                format!("no decisions recorded for {} yet", a.symbol),
            ));
        }
        // A stored row this version cannot read (another writer's, a damaged one) is left
        // out and counted, rather than failing the whole answer or showing nulls.
        let mut unreadable = 0usize;
        let decisions: Vec<Value> = rows
            .iter()
            .filter_map(|r| match r.decision() {
                Ok(d) => Some(json!({
                    "cycle_id": r.cycle_id,
                    "action": d.action,
                    "confidence": d.confidence,
                    "price": d.market_context.current_price,
                    "top_strategy": d.top_strategy.name,
                    "reasoning": d.reasoning,
                    "grades": r.grades,
                })),
                Err(why) => {
                    unreadable += 1;
                    tracing::warn!(cycle_id = %r.cycle_id, symbol = %r.symbol, "recent_decisions: stored signal left out: {why}");
                    None
                }
            })
            .collect();
        if unreadable > 0 {
            return Ok(
                json!({"symbol": a.symbol, "decisions": decisions, "unreadable": unreadable}),
            );
        }
        Ok(json!({"symbol": a.symbol, "decisions": decisions}))
    }
}
