//! The `rules` backend: classic strategies over 1-minute candles, the seed's consensus and
//! confidence rules, a volatility-sized advice and a templated report. No LLM, no network.
//!
//! Each strategy's score is its hit rate over the recent window: at each of the last
//! [`HIT_WINDOW`] closed candles, what the strategy would have said, and whether the next
//! candle moved that way.

use async_trait::async_trait;
use serde_json::json;

use super::{Agent, AgentError, Answer, CallLimits, SignalDraft, SignalRequest};
use crate::market::{Candle, MIN_CANDLES, MarketError};
use crate::model::{
    Action, Advice, AdvisedSignal, Regime, ScoredSignal, StrategyVerdict, TopStrategy,
};

/// Candles back over which hit rates are measured.
pub const HIT_WINDOW: usize = 30;

/// A strategy: a name, its parameters, and a verdict on a candle series (oldest first).
struct Strategy {
    name: &'static str,
    params: fn() -> serde_json::Value,
    verdict: fn(&[Candle]) -> Action,
}

fn closes(c: &[Candle]) -> impl Iterator<Item = f64> + '_ {
    c.iter().map(|c| c.close)
}

/// Exponential moving average of the series' last value.
fn ema(values: impl Iterator<Item = f64>, period: usize) -> Option<f64> {
    let k = 2.0 / (period as f64 + 1.0);
    let mut e: Option<f64> = None;
    let mut n = 0;
    for v in values {
        n += 1;
        e = Some(match e {
            None => v,
            Some(prev) => prev + k * (v - prev),
        });
    }
    if n >= period { e } else { None }
}

fn rsi(c: &[Candle], period: usize) -> Option<f64> {
    if c.len() <= period {
        return None;
    }
    // Wilder's smoothing over the whole series.
    let mut gain = 0.0;
    let mut loss = 0.0;
    for (i, w) in c.windows(2).enumerate() {
        let d = w[1].close - w[0].close;
        let (g, l) = if d > 0.0 { (d, 0.0) } else { (0.0, -d) };
        if i < period {
            gain += g / period as f64;
            loss += l / period as f64;
        } else {
            gain = (gain * (period - 1) as f64 + g) / period as f64;
            loss = (loss * (period - 1) as f64 + l) / period as f64;
        }
    }
    if loss == 0.0 {
        return Some(if gain == 0.0 { 50.0 } else { 100.0 });
    }
    Some(100.0 - 100.0 / (1.0 + gain / loss))
}

fn rsi_reversal(c: &[Candle]) -> Action {
    match rsi(c, 14) {
        Some(r) if r < 30.0 => Action::Buy,
        Some(r) if r > 70.0 => Action::Sell,
        _ => Action::Hold,
    }
}

fn macd_hist(c: &[Candle]) -> Option<f64> {
    if c.len() < 35 {
        return None;
    }
    // MACD line at each of the last 9 points, then its EMA(9) as the signal line.
    let start = c.len() - 9;
    let line: Vec<f64> = (start..c.len())
        .filter_map(|end| Some(ema(closes(&c[..=end]), 12)? - ema(closes(&c[..=end]), 26)?))
        .collect();
    let last = *line.last()?;
    Some(last - ema(line.into_iter(), 9)?)
}

fn macd_cross(c: &[Candle]) -> Action {
    let (Some(now), Some(before)) = (macd_hist(c), macd_hist(&c[..c.len().saturating_sub(1)]))
    else {
        return Action::Hold;
    };
    if now > 0.0 && now > before {
        Action::Buy
    } else if now < 0.0 && now < before {
        Action::Sell
    } else {
        Action::Hold
    }
}

fn bollinger_bounce(c: &[Candle]) -> Action {
    const N: usize = 20;
    if c.len() < N {
        return Action::Hold;
    }
    let w: Vec<f64> = closes(&c[c.len() - N..]).collect();
    let mean = w.iter().sum::<f64>() / N as f64;
    let sd = (w.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / N as f64).sqrt();
    let last = w[N - 1];
    if last < mean - 2.0 * sd {
        Action::Buy
    } else if last > mean + 2.0 * sd {
        Action::Sell
    } else {
        Action::Hold
    }
}

fn ema_trend(c: &[Candle]) -> Action {
    let (Some(fast), Some(slow)) = (ema(closes(c), 9), ema(closes(c), 21)) else {
        return Action::Hold;
    };
    // A 0.05 % band keeps a flat market neutral instead of flipping every minute.
    if fast > slow * 1.0005 {
        Action::Buy
    } else if fast < slow * 0.9995 {
        Action::Sell
    } else {
        Action::Hold
    }
}

fn volume_breakout(c: &[Candle]) -> Action {
    const N: usize = 20;
    if c.len() < N + 1 {
        return Action::Hold;
    }
    let last = c[c.len() - 1];
    let prev = &c[c.len() - 1 - N..c.len() - 1];
    let avg = prev.iter().map(|c| c.volume).sum::<f64>() / N as f64;
    let hi = prev.iter().map(|c| c.high).fold(f64::MIN, f64::max);
    let lo = prev.iter().map(|c| c.low).fold(f64::MAX, f64::min);
    if last.volume > 1.5 * avg && last.close > hi {
        Action::Buy
    } else if last.volume > 1.5 * avg && last.close < lo {
        Action::Sell
    } else if last.volume > 2.0 * avg {
        // Heavy volume without a range break: follow the candle's direction.
        if last.close > last.open {
            Action::Buy
        } else if last.close < last.open {
            Action::Sell
        } else {
            Action::Hold
        }
    } else {
        Action::Hold
    }
}

fn momentum(c: &[Candle]) -> Action {
    const N: usize = 10;
    if c.len() <= N {
        return Action::Hold;
    }
    let now = c[c.len() - 1].close;
    let then = c[c.len() - 1 - N].close;
    let roc = now / then - 1.0;
    if roc > 0.003 {
        Action::Buy
    } else if roc < -0.003 {
        Action::Sell
    } else {
        Action::Hold
    }
}

const STRATEGIES: &[Strategy] = &[
    Strategy {
        name: "rsi_reversal",
        params: || json!({"period": 14, "oversold": 30, "overbought": 70}),
        verdict: rsi_reversal,
    },
    Strategy {
        name: "macd_cross",
        params: || json!({"fast": 12, "slow": 26, "signal": 9}),
        verdict: macd_cross,
    },
    Strategy {
        name: "bollinger_bounce",
        params: || json!({"period": 20, "std_dev": 2.0}),
        verdict: bollinger_bounce,
    },
    Strategy {
        name: "ema_trend",
        params: || json!({"fast": 9, "slow": 21, "band": 0.0005}),
        verdict: ema_trend,
    },
    Strategy {
        name: "volume_breakout",
        params: || json!({"period": 20, "volume_multiple": 1.5}),
        verdict: volume_breakout,
    },
    Strategy {
        name: "momentum",
        params: || json!({"lookback": 10, "threshold": 0.003}),
        verdict: momentum,
    },
];

/// The strategies' names, in evaluation order (the enum a model picks from).
pub fn strategy_names() -> Vec<&'static str> {
    STRATEGIES.iter().map(|s| s.name).collect()
}

/// Hit rate of a strategy over the last `HIT_WINDOW` candles; 0.5 when it never signalled.
fn hit_rate(s: &Strategy, c: &[Candle]) -> f64 {
    let n = c.len();
    let from = n.saturating_sub(HIT_WINDOW + 1).max(MIN_CANDLES / 2);
    let (mut signals, mut hits) = (0u32, 0u32);
    for i in from..n.saturating_sub(1) {
        let v = (s.verdict)(&c[..=i]);
        let next = c[i + 1].close - c[i].close;
        match v {
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

/// Every strategy's verdict now, with its hit rate.
pub fn evaluate(c: &[Candle]) -> Vec<(StrategyVerdict, serde_json::Value)> {
    STRATEGIES
        .iter()
        .map(|s| {
            (
                StrategyVerdict {
                    name: s.name.to_string(),
                    signal: (s.verdict)(c),
                    score: hit_rate(s, c),
                },
                (s.params)(),
            )
        })
        .collect()
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

/// The consensus of a set of verdicts: the action and the share of strategies behind it.
/// BUY (SELL) needs more bullish (bearish) strategies than the other side and at least two;
/// anything else is HOLD, backed by the neutral ones.
pub fn consensus(verdicts: &[StrategyVerdict]) -> (Action, u32, u32, u32) {
    let count = |a| verdicts.iter().filter(|v| v.signal == a).count() as u32;
    let (bull, bear, neutral) = (count(Action::Buy), count(Action::Sell), count(Action::Hold));
    let action = if bull > bear && bull >= 2 {
        Action::Buy
    } else if bear > bull && bear >= 2 {
        Action::Sell
    } else {
        Action::Hold
    };
    (action, bull, bear, neutral)
}

fn pct(v: f64) -> String {
    format!("{:+.2}%", v * 100.0)
}

/// The rules agent.
#[derive(Debug, Clone, Default)]
pub struct Rules;

impl Rules {
    /// The signal, synchronously (the benchmark and tests call this directly).
    pub fn analyse(req: &SignalRequest<'_>) -> Result<SignalDraft, AgentError> {
        if req.candles.len() < MIN_CANDLES {
            return Err(AgentError::MarketData(MarketError::TooFew {
                got: req.candles.len(),
                need: MIN_CANDLES,
            }));
        }
        let evaluated = evaluate(req.candles);
        let verdicts: Vec<StrategyVerdict> = evaluated.iter().map(|(v, _)| v.clone()).collect();
        let (action, bull, bear, neutral) = consensus(&verdicts);
        let n = verdicts.len() as u32;
        let backing = match action {
            Action::Buy => bull,
            Action::Sell => bear,
            Action::Hold => neutral,
        };
        let ratio = f64::from(backing) / f64::from(n.max(1));
        let mean_score = verdicts.iter().map(|v| v.score).sum::<f64>() / f64::from(n.max(1));
        let confidence = confidence(ratio, mean_score);
        // The best strategy agreeing with the action, or the best overall when none agrees.
        let best = |agreeing: bool| {
            evaluated
                .iter()
                .filter(|(v, _)| !agreeing || v.signal == action)
                .max_by(|a, b| a.0.score.total_cmp(&b.0.score))
        };
        let (top, params) = best(true)
            .or_else(|| best(false))
            .map(|(v, p)| (v.clone(), p.clone()))
            .ok_or_else(|| AgentError::InvalidOutput("no strategies".into()))?;
        let ctx = req.context;
        let reasoning = format!(
            "{bull} of {n} strategies bullish, {bear} bearish, {neutral} neutral; {} leads with a {:.0}% hit rate over the last {HIT_WINDOW} minutes. Price {} over 1 h, 1 h volatility {:.2}%, volume {:.1}× its hourly mean.",
            top.name,
            top.score * 100.0,
            pct(ctx.price_change_1h),
            ctx.volatility_1h * 100.0,
            ctx.volume_ratio,
        );
        Ok(SignalDraft {
            action,
            confidence,
            reasoning,
            top_strategy: TopStrategy {
                name: top.name.clone(),
                score: top.score,
                signal: top.signal,
                parameters: params.as_object().cloned().unwrap_or_default(),
            },
            strategy_breakdown: verdicts,
        })
    }

    /// Advice: valid when not HOLD and confidence ≥ 0.5; size from volatility.
    pub fn advice(s: &ScoredSignal) -> Advice {
        let sig = &s.signal;
        let vol = sig.market_context.volatility_1h;
        let valid = sig.action != Action::Hold && sig.confidence >= 0.5;
        // 10 % of the portfolio at 2 % hourly volatility or less, shrinking with volatility,
        // scaled by confidence; 1 % floor for any valid signal.
        let size = if valid {
            let vol_scale = if vol > 0.0 {
                (0.02 / vol).min(1.0)
            } else {
                1.0
            };
            ((0.10 * vol_scale * sig.confidence).clamp(0.01, 0.10) * 10_000.0).round() / 10_000.0
        } else {
            0.0
        };
        let mut w = Vec::new();
        if sig.action == Action::Hold {
            w.push("No directional edge: strategies do not agree on a direction.".to_string());
        } else if sig.confidence < 0.5 {
            w.push(format!("Low confidence ({:.0}%).", sig.confidence * 100.0));
        }
        match s.market_regime {
            Regime::Extreme => w.push(format!(
                "Extreme volatility regime (1 h volatility {:.2}%): size down or stay out.",
                vol * 100.0
            )),
            Regime::HighVolatility => w.push(format!(
                "High volatility (1 h volatility {:.2}%).",
                vol * 100.0
            )),
            Regime::Normal => {}
        }
        if sig.market_context.volume_ratio < 0.5 {
            w.push(format!(
                "Thin volume ({:.1}× the hourly mean): fills may slip.",
                sig.market_context.volume_ratio
            ));
        }
        let n = sig.strategies_analyzed.max(1);
        let backing = match sig.action {
            Action::Buy => sig.strategies_bullish,
            Action::Sell => sig.strategies_bearish,
            Action::Hold => sig.strategies_neutral,
        };
        if sig.action != Action::Hold && f64::from(backing) / f64::from(n) < 0.6 {
            w.push(format!(
                "Weak consensus: {backing} of {n} strategies agree."
            ));
        }
        if sig.is_degraded {
            w.push("Produced in degraded mode by the rules fallback.".to_string());
        }
        Advice {
            valid,
            max_position_size: size,
            risk_warnings: w,
        }
    }

    /// The templated summary: two or three sentences.
    pub fn summary(a: &AdvisedSignal) -> String {
        let s = &a.scored;
        let sig = &s.signal;
        let first = format!(
            "{} {} at {:.0}% confidence, opportunity score {:.1} ({:?}).",
            sig.symbol,
            sig.action.as_str(),
            sig.confidence * 100.0,
            s.opportunity_score,
            s.opportunity_tier
        )
        .replace("(Hot)", "(HOT)")
        .replace("(Good)", "(GOOD)")
        .replace("(Neutral)", "(NEUTRAL)")
        .replace("(Low)", "(LOW)");
        let second = format!(
            "{} of {} strategies agree, led by {}; price {} over the last hour at {:.2}% volatility.",
            match sig.action {
                Action::Buy => sig.strategies_bullish,
                Action::Sell => sig.strategies_bearish,
                Action::Hold => sig.strategies_neutral,
            },
            sig.strategies_analyzed,
            sig.top_strategy.name,
            pct(sig.market_context.price_change_1h),
            sig.market_context.volatility_1h * 100.0
        );
        let third = match &a.advice {
            Some(adv) if adv.valid => format!(
                "Advisor: valid, up to {:.1}% of the portfolio.",
                adv.max_position_size * 100.0
            ),
            Some(adv) => format!(
                "Advisor: not actionable{}.",
                adv.risk_warnings
                    .first()
                    .map(|w| format!(" ({})", w.trim_end_matches('.')))
                    .unwrap_or_default()
            ),
            None => "Below the advisory threshold; no position advised.".to_string(),
        };
        format!("{first} {second} {third}")
    }
}

#[async_trait]
impl Agent for Rules {
    fn backend(&self) -> &'static str {
        "rules"
    }
    fn model(&self) -> &str {
        "rules"
    }
    async fn signal(
        &self,
        req: &SignalRequest<'_>,
        _limits: CallLimits,
    ) -> Result<Answer<SignalDraft>, AgentError> {
        Self::analyse(req).map(Answer::rules)
    }
    async fn advise(
        &self,
        scored: &ScoredSignal,
        _limits: CallLimits,
    ) -> Result<Answer<Advice>, AgentError> {
        Ok(Answer::rules(Self::advice(scored)))
    }
    async fn report(
        &self,
        advised: &AdvisedSignal,
        _limits: CallLimits,
    ) -> Result<Answer<String>, AgentError> {
        Ok(Answer::rules(Self::summary(advised)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::market::summarize;
    use chrono::{TimeZone, Utc};

    fn series(f: impl Fn(usize) -> f64, n: usize) -> Vec<Candle> {
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

    #[test]
    fn confidence_rule() {
        assert!((confidence(0.8, 1.0) - 0.85).abs() < 1e-12);
        assert!((confidence(0.6, 0.5) - 0.70 * 0.9).abs() < 1e-12);
        assert!((confidence(0.2, 0.0) - 0.40).abs() < 1e-12);
        // Clamps.
        assert_eq!(confidence(0.0, -10.0), 0.30);
    }

    #[test]
    fn a_steady_uptrend_is_a_buy() {
        // Rising 0.1 % a minute with a small wiggle.
        let c = series(
            |i| 100.0 * 1.001f64.powi(i as i32) * (1.0 + 0.0002 * ((i % 3) as f64 - 1.0)),
            120,
        );
        let ctx = summarize(&c);
        let now = c[119].time;
        let d = Rules::analyse(&SignalRequest {
            symbol: "ETH/USD",
            cycle_id: crate::schedule::CycleId::new(Utc::now()),
            candles: &c,
            context: &ctx,
            now,
        })
        .expect("ok");
        d.validate().expect("valid");
        assert_eq!(d.action, Action::Buy, "{d:?}");
        let t = crate::model::Tally::of(&d.strategy_breakdown);
        assert!(t.bullish >= 2);
        assert_eq!(t.analyzed, STRATEGIES.len() as u32);
        assert_eq!(d.top_strategy.signal, Action::Buy);
        let t = ema_trend(&c);
        assert_eq!(t, Action::Buy);
    }

    #[test]
    fn a_steady_downtrend_is_a_sell() {
        let c = series(
            |i| 100.0 * 0.999f64.powi(i as i32) * (1.0 + 0.0002 * ((i % 3) as f64 - 1.0)),
            120,
        );
        let ctx = summarize(&c);
        let d = Rules::analyse(&SignalRequest {
            symbol: "ETH/USD",
            cycle_id: crate::schedule::CycleId::new(Utc::now()),
            candles: &c,
            context: &ctx,
            now: c[119].time,
        })
        .expect("ok");
        // Trend followers say SELL; the reversal strategies (oversold RSI) disagree, so the
        // consensus may be HOLD but never BUY.
        assert_eq!(ema_trend(&c), Action::Sell);
        assert_eq!(momentum(&c), Action::Sell);
        assert_eq!(rsi_reversal(&c), Action::Buy);
        assert!(
            crate::model::Tally::of(&d.strategy_breakdown).bearish >= 2,
            "{d:?}"
        );
        assert_ne!(d.action, Action::Buy, "{d:?}");
    }

    #[test]
    fn indicators_on_known_inputs() {
        // RSI of a strictly rising series is 100; of a flat one 50.
        let up = series(|i| 10.0 + i as f64, 30);
        assert_eq!(rsi(&up, 14), Some(100.0));
        let flat = series(|_| 10.0, 30);
        assert_eq!(rsi(&flat, 14), Some(50.0));
        // EMA of a constant is the constant.
        assert_eq!(ema([5.0; 30].into_iter(), 9), Some(5.0));
        assert_eq!(ema([5.0; 3].into_iter(), 9), None);
        // A last close far under the band is a bounce buy.
        let mut dip = series(|i| 100.0 + (i % 2) as f64 * 0.1, 40);
        dip[39].close = 90.0;
        assert_eq!(bollinger_bounce(&dip), Action::Buy);
    }

    #[test]
    fn too_few_candles_is_an_error_not_a_guess() {
        let c = series(|i| 100.0 + i as f64, 10);
        let ctx = summarize(&c);
        let e = Rules::analyse(&SignalRequest {
            symbol: "ETH/USD",
            cycle_id: crate::schedule::CycleId::new(Utc::now()),
            candles: &c,
            context: &ctx,
            now: c[9].time,
        })
        .expect_err("too few");
        assert_eq!(e.reason(), "market_data_insufficient");
    }

    #[test]
    fn hit_rate_of_a_perfect_predictor() {
        // In a strict uptrend, momentum says BUY and is always right.
        let c = series(|i| 100.0 * 1.01f64.powi(i as i32), 80);
        let m = STRATEGIES
            .iter()
            .find(|s| s.name == "momentum")
            .expect("momentum");
        assert_eq!(hit_rate(m, &c), 1.0);
    }
}
