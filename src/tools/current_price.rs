//! `get_current_price`: the latest close of a symbol, its change over the last hour, and
//! when it was taken.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::{SymbolArgs, ToolError, ToolSpec, Toolbox};
use crate::strategy::summarize;

/// The tool.
pub(super) struct GetCurrentPrice;

impl ToolSpec for GetCurrentPrice {
    type Args = SymbolArgs;
    const NAME: &'static str = "get_current_price";
    const DESCRIPTION: &'static str =
        "The latest close of a symbol, its change over the last hour, and when it was taken.";
    const BRIEF: &'static str = "Latest close, 1-hour change, and its time.";
    const OUTPUT: &'static [&'static str] = &[
        "symbol",
        "price",
        "change_1h",
        "as_of",
        "source",
        "simulated",
    ];

    async fn run(tb: &Toolbox, a: SymbolArgs, minute: DateTime<Utc>) -> Result<Value, ToolError> {
        tb.symbol(&a.symbol)?;
        let c = tb.candles(&a.symbol, 61, minute).await?;
        let ctx = summarize(&c);
        let last = c.last().map(|k| k.time.to_rfc3339());
        Ok(json!({
            "symbol": a.symbol,
            "price": ctx.current_price,
            "change_1h": ctx.price_change_1h,
            "as_of": last,
            "source": tb.market_source(),
            "simulated": tb.simulated(),
        }))
    }
}
