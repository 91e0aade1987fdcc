//! Indicator series over one candle series, each computed once, in one pass, and read by
//! every strategy at any point of the series. A value at index `i` depends only on candles
//! `..=i`, and is computed by the same operations in the same order as it would be over that
//! prefix alone: evaluating a strategy at each of the last minutes (its hit rate) costs a
//! lookup per minute, not a pass per minute.
//!
//! Volatility is here too, once: the sample standard deviation of close-to-close returns
//! ([`returns_stdev`]), which the market context (scaled to an hour) and the tools (per
//! timeframe) both report.

use crate::config::Strategies;
use crate::market::Candle;

/// The indicator series the six strategies read, for one candle series (oldest first).
#[derive(Debug)]
pub struct Indicators<'a> {
    /// The series itself.
    pub candles: &'a [Candle],
    /// RSI of each prefix (Wilder's smoothing), `None` while the prefix is no longer than the
    /// period.
    pub rsi: Vec<Option<f64>>,
    /// The MACD line (fast EMA − slow EMA) of each prefix.
    pub macd_line: Vec<Option<f64>>,
    /// The trend strategy's fast and slow EMAs of each prefix.
    pub trend_fast: Vec<Option<f64>>,
    /// See `trend_fast`.
    pub trend_slow: Vec<Option<f64>>,
}

impl<'a> Indicators<'a> {
    /// Every series of `candles` under the parameters `p`.
    pub fn new(candles: &'a [Candle], p: &Strategies) -> Self {
        let fast = ema_series(candles, p.macd_cross.fast);
        let slow = ema_series(candles, p.macd_cross.slow);
        let macd_line = fast
            .iter()
            .zip(&slow)
            .map(|(f, s)| Some((*f)? - (*s)?))
            .collect();
        Indicators {
            candles,
            rsi: rsi_series(candles, p.rsi_reversal.period),
            macd_line,
            trend_fast: ema_series(candles, p.ema_trend.fast),
            trend_slow: ema_series(candles, p.ema_trend.slow),
        }
    }

    /// Closes of candles `from..=to`.
    pub fn closes(&self, from: usize, to: usize) -> impl Iterator<Item = f64> + '_ {
        self.candles[from..=to].iter().map(|c| c.close)
    }
}

/// Exponential moving average of each prefix, seeded with the first close; `None` until the
/// prefix holds `period` closes.
pub fn ema_series(c: &[Candle], period: usize) -> Vec<Option<f64>> {
    ema_of(c.iter().map(|c| c.close), period)
}

/// [`ema_series`] of any values.
pub fn ema_of(values: impl Iterator<Item = f64>, period: usize) -> Vec<Option<f64>> {
    let k = 2.0 / (period as f64 + 1.0);
    let mut e: Option<f64> = None;
    values
        .enumerate()
        .map(|(i, v)| {
            let next = match e {
                None => v,
                Some(prev) => prev + k * (v - prev),
            };
            e = Some(next);
            (i + 1 >= period).then_some(next)
        })
        .collect()
}

/// The EMA of `values`' last one (`None` with fewer than `period` values): [`ema_of`]'s last
/// value, without the series.
pub fn ema_last(values: impl Iterator<Item = f64>, period: usize) -> Option<f64> {
    let k = 2.0 / (period as f64 + 1.0);
    let (mut e, mut n) = (None, 0);
    for v in values {
        n += 1;
        e = Some(match e {
            None => v,
            Some(prev) => prev + k * (v - prev),
        });
    }
    if n >= period { e } else { None }
}

/// RSI of each prefix: Wilder's smoothing over the whole prefix (the first `period` moves
/// averaged, the rest smoothed in).
fn rsi_series(c: &[Candle], period: usize) -> Vec<Option<f64>> {
    let mut out = vec![None; c.len()];
    let p = period as f64;
    let (mut gain, mut loss) = (0.0, 0.0);
    for (i, w) in c.windows(2).enumerate() {
        let d = w[1].close - w[0].close;
        let (g, l) = if d > 0.0 { (d, 0.0) } else { (0.0, -d) };
        if i < period {
            gain += g / p;
            loss += l / p;
        } else {
            gain = (gain * (p - 1.0) + g) / p;
            loss = (loss * (p - 1.0) + l) / p;
        }
        // The prefix ending at candle i + 1 holds i + 2 candles.
        if i + 2 > period {
            out[i + 1] = Some(if loss == 0.0 {
                if gain == 0.0 { 50.0 } else { 100.0 }
            } else {
                100.0 - 100.0 / (1.0 + gain / loss)
            });
        }
    }
    out
}

/// Sample standard deviation of successive close-to-close returns (a close of zero or less
/// starts no return); `None` with fewer than two returns.
pub fn returns_stdev(c: &[Candle]) -> Option<f64> {
    // Two passes over the candles rather than a vector of returns: this runs every tick for
    // every symbol, and in a replay for every minute of a day.
    let returns = || {
        c.windows(2)
            .filter(|w| w[0].close > 0.0)
            .map(|w| w[1].close / w[0].close - 1.0)
    };
    let n = returns().count();
    if n < 2 {
        return None;
    }
    let mean = returns().sum::<f64>() / n as f64;
    Some((returns().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt())
}
