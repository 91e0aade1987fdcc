//! `strategies:` the parameters of the six rules strategies. Each strategy's section is
//! also what a signal reports as its `parameters` (serialized as is), so a changed setting is
//! visible in every signal that used it.

use serde::{Deserialize, Serialize};

/// `strategies:` one section per strategy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Strategies {
    /// RSI below `oversold` → BUY, above `overbought` → SELL.
    pub rsi_reversal: RsiReversal,
    /// The MACD histogram positive and rising → BUY, negative and falling → SELL.
    pub macd_cross: MacdCross,
    /// A close outside the Bollinger band → the opposite way (a bounce back).
    pub bollinger_bounce: BollingerBounce,
    /// The fast EMA above the slow one by more than `band` → BUY, below → SELL.
    pub ema_trend: EmaTrend,
    /// A close beyond the `period`'s range on volume over `volume_multiple` × its mean → that
    /// way; on more than twice the mean volume without a break, the candle's own direction.
    pub volume_breakout: VolumeBreakout,
    /// The return over `lookback` minutes beyond ±`threshold` → that way.
    pub momentum: Momentum,
}

/// `strategies.rsi_reversal:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RsiReversal {
    /// Wilder's smoothing period, in minutes.
    pub period: usize,
    /// RSI below this is oversold (0–100).
    pub oversold: u32,
    /// RSI above this is overbought (0–100).
    pub overbought: u32,
}

/// `strategies.macd_cross:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MacdCross {
    /// The fast EMA's period.
    pub fast: usize,
    /// The slow EMA's period.
    pub slow: usize,
    /// The signal line's period (an EMA of the MACD line).
    pub signal: usize,
}

/// `strategies.bollinger_bounce:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BollingerBounce {
    /// Closes in the moving window.
    pub period: usize,
    /// The band's half-width in (population) standard deviations.
    pub std_dev: f64,
}

/// `strategies.ema_trend:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmaTrend {
    /// The fast EMA's period.
    pub fast: usize,
    /// The slow EMA's period.
    pub slow: usize,
    /// The fraction the fast EMA must clear the slow one by: a flat market stays neutral
    /// instead of flipping every minute.
    pub band: f64,
}

/// `strategies.volume_breakout:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VolumeBreakout {
    /// Candles whose range and mean volume the last one is compared with.
    pub period: usize,
    /// Volume over this multiple of the mean is a breakout's volume.
    pub volume_multiple: f64,
}

/// `strategies.momentum:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Momentum {
    /// Minutes back the return is measured over.
    pub lookback: usize,
    /// The return (a fraction) it must exceed either way.
    pub threshold: f64,
}

impl Default for RsiReversal {
    fn default() -> Self {
        Self {
            period: 14,
            oversold: 30,
            overbought: 70,
        }
    }
}
impl Default for MacdCross {
    fn default() -> Self {
        Self {
            fast: 12,
            slow: 26,
            signal: 9,
        }
    }
}
impl Default for BollingerBounce {
    fn default() -> Self {
        Self {
            period: 20,
            std_dev: 2.0,
        }
    }
}
impl Default for EmaTrend {
    fn default() -> Self {
        Self {
            fast: 9,
            slow: 21,
            band: 0.0005,
        }
    }
}
impl Default for VolumeBreakout {
    fn default() -> Self {
        Self {
            period: 20,
            volume_multiple: 1.5,
        }
    }
}
impl Default for Momentum {
    fn default() -> Self {
        Self {
            lookback: 10,
            threshold: 0.003,
        }
    }
}
