//! The rules strategies, owned by no agent backend: six classic strategies over 1-minute
//! candles with their parameters from config (`strategies:`), the indicators they read
//! (computed once per candle series, [`indicators`]), the consensus and the seed's confidence
//! rule, and the market context every signal carries. The rules agent, the LLM prompt (and
//! the reader that fills a model's answer in from these verdicts) and the tools all read the
//! same [`StrategySet`]; the pipeline evaluates it once per symbol and tick.
//!
//! Each strategy's score is its hit rate over the recent window: at each of the last
//! [`HIT_WINDOW`] closed candles, what the strategy would have said, and whether the next
//! candle moved that way. With the indicator series computed once, that is a lookup per
//! minute: a day of ticks for twenty symbols evaluates in well under a second
//! (`benches/strategy.rs`), which a replay needs.

pub mod indicators;

use serde_json::Value;

use crate::config::Strategies;
use crate::market::Candle;
use crate::model::{Action, MIN_CANDLES, MarketContext, StrategyVerdict};
use indicators::{Indicators, ema_last, returns_stdev};

/// Candles back over which hit rates are measured.
pub const HIT_WINDOW: usize = 30;

/// Volume over this multiple of the period's mean, without a range break, is followed in the
/// candle's own direction by the volume strategy.
const HEAVY_VOLUME_MULTIPLE: f64 = 2.0;

/// The six strategies, in evaluation order (the order of every signal's breakdown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// RSI oversold/overbought.
    RsiReversal,
    /// The MACD histogram's sign and direction.
    MacdCross,
    /// A close outside the Bollinger band.
    BollingerBounce,
    /// The fast EMA against the slow one.
    EmaTrend,
    /// A range break on heavy volume.
    VolumeBreakout,
    /// The return over a lookback.
    Momentum,
}

impl Kind {
    /// Every strategy, in evaluation order.
    pub const ALL: [Kind; 6] = [
        Kind::RsiReversal,
        Kind::MacdCross,
        Kind::BollingerBounce,
        Kind::EmaTrend,
        Kind::VolumeBreakout,
        Kind::Momentum,
    ];

    /// The name signals, prompts and tools use.
    pub fn name(self) -> &'static str {
        match self {
            Kind::RsiReversal => "rsi_reversal",
            Kind::MacdCross => "macd_cross",
            Kind::BollingerBounce => "bollinger_bounce",
            Kind::EmaTrend => "ema_trend",
            Kind::VolumeBreakout => "volume_breakout",
            Kind::Momentum => "momentum",
        }
    }
}

/// The strategies' names, in evaluation order (the enum a model picks from).
pub fn strategy_names() -> Vec<&'static str> {
    Kind::ALL.iter().map(|k| k.name()).collect()
}

/// One strategy's verdict with the parameters it ran with, as signals and tools report them.
pub type Evaluated = (StrategyVerdict, Value);

/// The strategies under one set of parameters.
#[derive(Debug, Clone)]
pub struct StrategySet {
    p: Strategies,
    /// Each strategy's parameters as JSON (its config section), made once.
    params: [Value; 6],
}

impl Default for StrategySet {
    fn default() -> Self {
        Self::new(Strategies::default())
    }
}

impl StrategySet {
    /// The strategies with the parameters `p` (validated by `check-config`).
    pub fn new(p: Strategies) -> Self {
        let json = |v: Result<Value, serde_json::Error>| v.unwrap_or(Value::Null);
        let params = [
            json(serde_json::to_value(&p.rsi_reversal)),
            json(serde_json::to_value(&p.macd_cross)),
            json(serde_json::to_value(&p.bollinger_bounce)),
            json(serde_json::to_value(&p.ema_trend)),
            json(serde_json::to_value(&p.volume_breakout)),
            json(serde_json::to_value(&p.momentum)),
        ];
        StrategySet { p, params }
    }

    /// Every strategy's verdict on `candles` (oldest first) now, with its hit rate and
    /// parameters.
    pub fn evaluate(&self, candles: &[Candle]) -> Vec<Evaluated> {
        let ind = Indicators::new(candles, &self.p);
        Kind::ALL
            .iter()
            .zip(&self.params)
            .map(|(&k, params)| {
                let signal = match candles.len() {
                    0 => Action::Hold,
                    n => self.verdict(k, &ind, n - 1),
                };
                let verdict = StrategyVerdict {
                    name: k.name().to_string(),
                    signal,
                    score: self.hit_rate(k, &ind),
                };
                (verdict, params.clone())
            })
            .collect()
    }

    /// Hit rate of a strategy over the last [`HIT_WINDOW`] candles; 0.5 when it never
    /// signalled.
    fn hit_rate(&self, k: Kind, ind: &Indicators<'_>) -> f64 {
        let c = ind.candles;
        let n = c.len();
        let from = n.saturating_sub(HIT_WINDOW + 1).max(MIN_CANDLES / 2);
        let (mut signals, mut hits) = (0u32, 0u32);
        for i in from..n.saturating_sub(1) {
            let next = c[i + 1].close - c[i].close;
            match self.verdict(k, ind, i) {
                Action::Buy => {
                    signals += 1;
                    hits += u32::from(next > 0.0);
                }
                Action::Sell => {
                    signals += 1;
                    hits += u32::from(next < 0.0);
                }
                Action::Hold => {}
            }
        }
        if signals == 0 {
            0.5
        } else {
            f64::from(hits) / f64::from(signals)
        }
    }

    /// What strategy `k` says on the candles `..=end`.
    fn verdict(&self, k: Kind, ind: &Indicators<'_>, end: usize) -> Action {
        let p = &self.p;
        let c = ind.candles;
        let len = end + 1;
        let sign = |up: bool, down: bool| {
            if up {
                Action::Buy
            } else if down {
                Action::Sell
            } else {
                Action::Hold
            }
        };
        match k {
            Kind::RsiReversal => match ind.rsi[end] {
                Some(r) => sign(
                    r < f64::from(p.rsi_reversal.oversold),
                    r > f64::from(p.rsi_reversal.overbought),
                ),
                None => Action::Hold,
            },
            Kind::MacdCross => {
                let (Some(now), Some(before)) = (
                    self.macd_hist(ind, end),
                    end.checked_sub(1).and_then(|e| self.macd_hist(ind, e)),
                ) else {
                    return Action::Hold;
                };
                sign(now > 0.0 && now > before, now < 0.0 && now < before)
            }
            Kind::BollingerBounce => {
                let n = p.bollinger_bounce.period;
                if len < n {
                    return Action::Hold;
                }
                let mean = ind.closes(len - n, end).sum::<f64>() / n as f64;
                let var = ind
                    .closes(len - n, end)
                    .map(|v| (v - mean).powi(2))
                    .sum::<f64>()
                    / n as f64;
                let sd = var.sqrt();
                let last = c[end].close;
                let half = p.bollinger_bounce.std_dev * sd;
                sign(last < mean - half, last > mean + half)
            }
            Kind::EmaTrend => {
                let (Some(fast), Some(slow)) = (ind.trend_fast[end], ind.trend_slow[end]) else {
                    return Action::Hold;
                };
                let band = p.ema_trend.band;
                sign(fast > slow * (1.0 + band), fast < slow * (1.0 - band))
            }
            Kind::VolumeBreakout => {
                let n = p.volume_breakout.period;
                if len < n + 1 {
                    return Action::Hold;
                }
                let last = c[end];
                let prev = &c[end - n..end];
                let avg = prev.iter().map(|c| c.volume).sum::<f64>() / n as f64;
                let hi = prev.iter().map(|c| c.high).fold(f64::MIN, f64::max);
                let lo = prev.iter().map(|c| c.low).fold(f64::MAX, f64::min);
                let breakout = last.volume > p.volume_breakout.volume_multiple * avg;
                if breakout && (last.close > hi || last.close < lo) {
                    sign(last.close > hi, last.close < lo)
                } else if last.volume > HEAVY_VOLUME_MULTIPLE * avg {
                    // Heavy volume without a range break: follow the candle's direction.
                    sign(last.close > last.open, last.close < last.open)
                } else {
                    Action::Hold
                }
            }
            Kind::Momentum => {
                let n = p.momentum.lookback;
                if len <= n {
                    return Action::Hold;
                }
                let roc = c[end].close / c[end - n].close - 1.0;
                sign(roc > p.momentum.threshold, roc < -p.momentum.threshold)
            }
        }
    }

    /// The MACD histogram on the candles `..=end`: the MACD line minus its signal line, the
    /// EMA of the line's last `signal` points.
    fn macd_hist(&self, ind: &Indicators<'_>, end: usize) -> Option<f64> {
        let m = &self.p.macd_cross;
        let len = end + 1;
        if len < m.slow + m.signal {
            return None;
        }
        let line = &ind.macd_line[len - m.signal..len];
        let last = (*line.last()?)?;
        Some(last - ema_last(line.iter().filter_map(|v| *v), m.signal)?)
    }
}

/// The seed's confidence rule: consensus ratio ≥ 0.8 → 0.85, ≥ 0.6 → 0.70, else 0.50;
/// × (0.8 + 0.2 × mean strategy score); clamped to [0.30, 0.95].
pub fn confidence(consensus_ratio: f64, mean_score: f64) -> f64 {
    let base = if consensus_ratio >= 0.8 {
        0.85
    } else if consensus_ratio >= 0.6 {
        0.70
    } else {
        0.50
    };
    (base * (0.8 + 0.2 * mean_score)).clamp(0.30, 0.95)
}

/// How a set of verdicts votes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Consensus {
    /// The consensus action.
    pub action: Action,
    /// Strategies saying BUY.
    pub bullish: u32,
    /// Strategies saying SELL.
    pub bearish: u32,
    /// Strategies saying HOLD.
    pub neutral: u32,
}

impl Consensus {
    /// BUY (SELL) needs more bullish (bearish) strategies than the other side and at least
    /// two; anything else is HOLD, backed by the neutral ones.
    pub fn of(verdicts: &[StrategyVerdict]) -> Self {
        let count = |a| verdicts.iter().filter(|v| v.signal == a).count() as u32;
        let (bullish, bearish, neutral) =
            (count(Action::Buy), count(Action::Sell), count(Action::Hold));
        let action = if bullish > bearish && bullish >= 2 {
            Action::Buy
        } else if bearish > bullish && bearish >= 2 {
            Action::Sell
        } else {
            Action::Hold
        };
        Consensus {
            action,
            bullish,
            bearish,
            neutral,
        }
    }

    /// The strategies behind the action.
    pub fn backing(&self) -> u32 {
        match self.action {
            Action::Buy => self.bullish,
            Action::Sell => self.bearish,
            Action::Hold => self.neutral,
        }
    }

    /// The share of all strategies behind the action.
    pub fn ratio(&self) -> f64 {
        let n = self.bullish + self.bearish + self.neutral;
        f64::from(self.backing()) / f64::from(n.max(1))
    }
}

/// The mean hit rate of a set of verdicts (0 for none).
pub fn mean_score(verdicts: &[StrategyVerdict]) -> f64 {
    verdicts.iter().map(|v| v.score).sum::<f64>() / verdicts.len().max(1) as f64
}

/// Last close, 1 h change, volume ratio and 1 h volatility of candles (oldest first): the
/// `market_context` every signal carries.
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
    // The 1-minute deviation scaled to one hour (√60).
    let volatility_1h = returns_stdev(window).map_or(0.0, |sd| sd * 60f64.sqrt());
    MarketContext {
        current_price: last.close,
        price_change_1h,
        volume_ratio,
        volatility_1h,
    }
}

/// Candle series for the unit tests of every module that reads candles.
#[cfg(test)]
pub(crate) mod testing {
    use chrono::{TimeZone, Utc};

    use crate::market::Candle;

    /// `n` 1-minute candles closing at `f(i)`, each opening at the previous close, with a
    /// narrow range and a constant volume.
    pub(crate) fn series(f: impl Fn(usize) -> f64, n: usize) -> Vec<Candle> {
        (0..n)
            .map(|i| {
                let close = f(i);
                let open = if i == 0 { close } else { f(i - 1) };
                Candle {
                    time: Utc
                        .timestamp_opt(1_700_000_000 + 60 * i as i64, 0)
                        .single()
                        .expect("t"),
                    open,
                    high: open.max(close) * 1.0001,
                    low: open.min(close) * 0.9999,
                    close,
                    volume: 100.0,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::testing::series;
    use super::*;

    fn verdict(c: &[Candle], k: Kind) -> StrategyVerdict {
        StrategySet::default()
            .evaluate(c)
            .into_iter()
            .map(|(v, _)| v)
            .find(|v| v.name == k.name())
            .expect("every strategy is evaluated")
    }

    #[test]
    fn confidence_rule() {
        assert!((confidence(0.8, 1.0) - 0.85).abs() < 1e-12);
        assert!((confidence(0.6, 0.5) - 0.70 * 0.9).abs() < 1e-12);
        assert!((confidence(0.2, 0.0) - 0.40).abs() < 1e-12);
        // Clamps.
        assert_eq!(confidence(0.0, -10.0), 0.30);
    }

    #[test]
    fn indicators_on_known_inputs() {
        let p = Strategies::default();
        // RSI of a strictly rising series is 100; of a flat one 50.
        let up = series(|i| 10.0 + i as f64, 30);
        assert_eq!(Indicators::new(&up, &p).rsi[29], Some(100.0));
        let flat = series(|_| 10.0, 30);
        let flat_rsi = Indicators::new(&flat, &p).rsi;
        assert_eq!(flat_rsi[29], Some(50.0));
        // Not before the prefix is longer than the period.
        assert_eq!(flat_rsi[13], None);
        assert_eq!(flat_rsi[14], Some(50.0));
        // EMA of a constant is the constant, and none before the period.
        let e = indicators::ema_series(&flat, 9);
        assert_eq!((e[7], e[8], e[29]), (None, Some(10.0), Some(10.0)));
        // A last close far under the band is a bounce buy.
        let mut dip = series(|i| 100.0 + (i % 2) as f64 * 0.1, 40);
        dip[39].close = 90.0;
        assert_eq!(verdict(&dip, Kind::BollingerBounce).signal, Action::Buy);
        // The volatility of a series with no moves is zero; of too short a one, none.
        assert_eq!(returns_stdev(&flat), Some(0.0));
        assert_eq!(returns_stdev(&flat[..2]), None);
    }

    #[test]
    fn hit_rate_of_a_perfect_predictor() {
        // In a strict uptrend, momentum says BUY and is always right.
        let c = series(|i| 100.0 * 1.01f64.powi(i as i32), 80);
        let m = verdict(&c, Kind::Momentum);
        assert_eq!((m.signal, m.score), (Action::Buy, 1.0));
    }

    /// The series are computed once over the whole window; a verdict read at minute `i` must
    /// be what the strategy says on the candles up to `i` alone, or every hit rate is wrong.
    #[test]
    fn a_verdict_inside_the_series_is_the_verdict_on_its_prefix() {
        let c = series(
            |i| 100.0 * (1.0 + 0.01 * ((i as f64) / 7.0).sin() + 0.002 * ((i * 31 % 17) as f64)),
            120,
        );
        let set = StrategySet::default();
        let whole = Indicators::new(&c, &set.p);
        let mut seen = std::collections::BTreeSet::new();
        for end in 0..c.len() {
            let alone = Indicators::new(&c[..=end], &set.p);
            for k in Kind::ALL {
                let v = set.verdict(k, &whole, end);
                assert_eq!(v, set.verdict(k, &alone, end), "{k:?} at {end}");
                seen.insert(format!("{k:?} {v:?}"));
            }
        }
        // The series moves both ways: more than one verdict was compared per strategy.
        assert!(seen.len() > 8, "{seen:?}");
    }

    #[test]
    fn parameters_come_from_config_and_change_the_verdicts() {
        let c = series(|i| 100.0 * 1.0005f64.powi(i as i32), 120);
        let default = StrategySet::default().evaluate(&c);
        assert_eq!(
            default[5].1,
            serde_json::json!({"lookback": 10, "threshold": 0.003})
        );
        // 0.05 % a minute: 0.5 % over 10 minutes clears 0.3 %, not 1 %.
        assert_eq!(default[5].0.signal, Action::Buy);
        let mut p = Strategies::default();
        p.momentum.threshold = 0.01;
        let strict = StrategySet::new(p).evaluate(&c);
        assert_eq!(strict[5].0.signal, Action::Hold);
        assert_eq!(
            strict[5].1,
            serde_json::json!({"lookback": 10, "threshold": 0.01})
        );
    }

    #[test]
    fn consensus_needs_two_and_a_majority() {
        let v = |s: &[Action]| -> Vec<StrategyVerdict> {
            s.iter()
                .map(|a| StrategyVerdict {
                    name: "x".into(),
                    signal: *a,
                    score: 0.5,
                })
                .collect()
        };
        use Action::*;
        let c = Consensus::of(&v(&[Buy, Buy, Sell, Hold, Hold, Hold]));
        assert_eq!((c.action, c.backing()), (Buy, 2));
        assert!((c.ratio() - 2.0 / 6.0).abs() < 1e-12);
        assert_eq!(Consensus::of(&v(&[Buy, Hold, Hold])).action, Hold);
        assert_eq!(Consensus::of(&v(&[Buy, Buy, Sell, Sell])).action, Hold);
        assert_eq!(Consensus::of(&v(&[Sell, Sell, Hold])).action, Sell);
    }

    #[test]
    fn summary_of_a_known_series() {
        // 61 candles rising 100 → 160 by 1 each; last volume double the others.
        let mut cs: Vec<Candle> = (0..61)
            .map(|i| {
                let mut k = series(|_| 100.0 + i as f64, 1)[0];
                k.time = Utc
                    .timestamp_opt(1_700_000_000 + i * 60, 0)
                    .single()
                    .expect("t");
                k.volume = 10.0;
                k
            })
            .collect();
        cs[60].volume = 20.0;
        let m = summarize(&cs);
        assert_eq!(m.current_price, 160.0);
        assert!((m.price_change_1h - 0.6).abs() < 1e-12);
        // Mean volume over the last 60: (59·10 + 20)/60.
        assert!((m.volume_ratio - 20.0 / (610.0 / 60.0)).abs() < 1e-12);
        assert!(m.volatility_1h > 0.0);
        // A flat series has no volatility.
        let flat = series(|_| 5.0, 61);
        assert_eq!(summarize(&flat).volatility_1h, 0.0);
        assert_eq!(summarize(&[]).current_price, 0.0);
    }
}
