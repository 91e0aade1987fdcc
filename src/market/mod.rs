//! Candle sources for the rules agent and for prompt context.
//!
//! - [`simulated`]: a deterministic random walk per symbol with volatility clustering.
//! - [`coinbase`]: Coinbase Exchange's public 1-minute candles.
//! - [`influxdb`]: 1-minute candles kept in an InfluxDB measurement.
//!
//! [`summarize`] turns candles into the `market_context` every signal carries.

pub mod coinbase;
pub mod influxdb;
pub mod simulated;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::model::MarketContext;

/// One 1-minute candle.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candle {
    /// Start of the minute.
    pub time: DateTime<Utc>,
    /// Open.
    pub open: f64,
    /// High.
    pub high: f64,
    /// Low.
    pub low: f64,
    /// Close.
    pub close: f64,
    /// Volume in base units.
    pub volume: f64,
}

/// Why candles could not be had. Each variant maps to a bounded metric reason.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MarketError {
    /// The source answered with an HTTP error status.
    #[error("market data source answered HTTP {status}")]
    Status {
        /// The status code.
        status: u16,
    },
    /// The request failed (connect, reset).
    #[error("market data request failed: {0}")]
    Transport(String),
    /// The source did not answer within `market_data.request_timeout_seconds`.
    #[error("market data request timed out")]
    Timeout,
    /// The answer was not the expected shape.
    #[error("market data answer malformed: {0}")]
    Malformed(String),
    /// The newest candle is too old: whatever feeds the source has stopped.
    #[error("market data is stale: the newest candle is {age_seconds} s old")]
    Stale {
        /// Age of the newest candle.
        age_seconds: u64,
    },
    /// Not enough candles to analyse.
    #[error("market data has {got} candles, need at least {need}")]
    TooFew {
        /// Candles received.
        got: usize,
        /// Candles needed.
        need: usize,
    },
}

impl MarketError {
    /// Bounded reason label.
    pub fn reason(&self) -> &'static str {
        match self {
            MarketError::Status { status } if *status >= 500 => "market_data_5xx",
            MarketError::Status { .. } => "market_data_rejected",
            MarketError::Transport(_) => "market_data_unreachable",
            MarketError::Timeout => "market_data_timeout",
            MarketError::Malformed(_) => "market_data_malformed",
            MarketError::TooFew { .. } => "market_data_insufficient",
            MarketError::Stale { .. } => "market_data_stale",
        }
    }
}

/// Candles oldest first, the newest ending at or before `now`.
#[async_trait]
pub trait MarketSource: Send + Sync {
    /// The last `count` 1-minute candles of `symbol` up to `now`.
    async fn candles(
        &self,
        symbol: &str,
        now: DateTime<Utc>,
        count: usize,
    ) -> Result<Vec<Candle>, MarketError>;
    /// Source name for logs.
    fn name(&self) -> &'static str;
}

/// Fewest candles any analysis needs (MACD 26 + signal 9, plus a few to score hits).
pub const MIN_CANDLES: usize = 40;

/// Last close, 1 h change, volume ratio and 1 h volatility of candles (oldest first).
pub fn summarize(candles: &[Candle]) -> MarketContext {
    let n = candles.len();
    let Some(last) = candles.last() else {
        return MarketContext {
            current_price: 0.0,
            price_change_1h: 0.0,
            volume_ratio: 0.0,
            volatility_1h: 0.0,
        };
    };
    let hour_ago = &candles[n.saturating_sub(61)];
    let price_change_1h = if hour_ago.close > 0.0 {
        last.close / hour_ago.close - 1.0
    } else {
        0.0
    };
    let window = &candles[n.saturating_sub(60)..];
    let mean_volume = window.iter().map(|c| c.volume).sum::<f64>() / window.len() as f64;
    let volume_ratio = if mean_volume > 0.0 {
        last.volume / mean_volume
    } else {
        0.0
    };
    let returns: Vec<f64> = window
        .windows(2)
        .filter(|w| w[0].close > 0.0)
        .map(|w| w[1].close / w[0].close - 1.0)
        .collect();
    let volatility_1h = if returns.len() > 1 {
        let mean = returns.iter().sum::<f64>() / returns.len() as f64;
        let var =
            returns.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (returns.len() - 1) as f64;
        // Scale 1-minute deviation to one hour (√60).
        var.sqrt() * 60f64.sqrt()
    } else {
        0.0
    };
    MarketContext {
        current_price: last.close,
        price_change_1h,
        volume_ratio,
        volatility_1h,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn candle(i: i64, close: f64, volume: f64) -> Candle {
        let t = Utc
            .timestamp_opt(1_700_000_000 + i * 60, 0)
            .single()
            .expect("t");
        Candle {
            time: t,
            open: close,
            high: close,
            low: close,
            close,
            volume,
        }
    }

    #[test]
    fn summary_of_a_known_series() {
        // 61 candles rising 100 → 160 by 1 each; last volume double the others.
        let mut cs: Vec<Candle> = (0..61).map(|i| candle(i, 100.0 + i as f64, 10.0)).collect();
        cs[60].volume = 20.0;
        let m = summarize(&cs);
        assert_eq!(m.current_price, 160.0);
        assert!((m.price_change_1h - 0.6).abs() < 1e-12);
        // Mean volume over the last 60: (59·10 + 20)/60.
        assert!((m.volume_ratio - 20.0 / (610.0 / 60.0)).abs() < 1e-12);
        assert!(m.volatility_1h > 0.0);
        // A flat series has no volatility.
        let flat: Vec<Candle> = (0..61).map(|i| candle(i, 5.0, 1.0)).collect();
        assert_eq!(summarize(&flat).volatility_1h, 0.0);
        assert_eq!(summarize(&[]).current_price, 0.0);
    }
}
