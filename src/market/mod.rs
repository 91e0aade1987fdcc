//! Candle sources for the rules agent and for prompt context.
//!
//! - [`simulated`]: a deterministic random walk per symbol with volatility clustering.
//! - [`coinbase`]: Coinbase Exchange's public 1-minute candles.
//! - [`influxdb`]: 1-minute candles kept in an InfluxDB measurement.
//!
//! What candles mean (indicators, strategies, the `market_context` of a signal) is
//! [`crate::strategy`]'s.

pub mod coinbase;
pub mod file;
pub mod influxdb;
pub mod simulated;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::model::Reason;

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
    pub fn reason(&self) -> Reason {
        match self {
            MarketError::Status { status } if *status >= 500 => Reason::MarketData5xx,
            MarketError::Status { .. } => Reason::MarketDataRejected,
            MarketError::Transport(_) => Reason::MarketDataUnreachable,
            MarketError::Timeout => Reason::MarketDataTimeout,
            MarketError::Malformed(_) => Reason::MarketDataMalformed,
            MarketError::TooFew { .. } => Reason::MarketDataInsufficient,
            MarketError::Stale { .. } => Reason::MarketDataStale,
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

pub use crate::model::MIN_CANDLES;
