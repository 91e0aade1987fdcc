//! `get_strategy_consensus`: how the strategies vote on a symbol now, and the confidence the
//! rules agent would give the consensus.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::{SymbolArgs, ToolError, ToolSpec, Toolbox};
use crate::model::StrategyVerdict;
use crate::strategy::{Consensus, confidence, mean_score};

/// The tool.
pub(super) struct GetStrategyConsensus;

impl ToolSpec for GetStrategyConsensus {
    type Args = SymbolArgs;
    const NAME: &'static str = "get_strategy_consensus";
    const DESCRIPTION: &'static str = "How the strategies vote on a symbol now: bullish, bearish and neutral counts, the consensus action and the rules agent's confidence for it.";
    const BRIEF: &'static str = "Bullish/bearish/neutral counts, consensus action and confidence.";
    const OUTPUT: &'static [&'static str] = &[
        "symbol",
        "action",
        "bullish",
        "bearish",
        "neutral",
        "consensus_ratio",
        "confidence",
        "simulated",
    ];

    async fn run(tb: &Toolbox, a: SymbolArgs, minute: DateTime<Utc>) -> Result<Value, ToolError> {
        tb.symbol(&a.symbol)?;
        let verdicts = tb.verdicts(&a.symbol, minute).await?;
        let vs: Vec<StrategyVerdict> = verdicts.iter().map(|(v, _)| v.clone()).collect();
        let vote = Consensus::of(&vs);
        let ratio = vote.ratio();
        Ok(json!({
            "symbol": a.symbol,
            "action": vote.action,
            "bullish": vote.bullish,
            "bearish": vote.bearish,
            "neutral": vote.neutral,
            "consensus_ratio": ratio,
            "confidence": confidence(ratio, mean_score(&vs)),
            "simulated": tb.simulated(),
        }))
    }
}
