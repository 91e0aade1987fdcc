//! The `rules` backend: the consensus of the strategies the pipeline evaluated
//! ([`crate::strategy`]) with the seed's confidence rule, a volatility-sized advice and a
//! templated report. No LLM, no network.

use async_trait::async_trait;

use super::{Agent, AgentError, Answer, CallLimits, SignalDraft, SignalRequest};
use crate::market::{MIN_CANDLES, MarketError};
use crate::model::{
    Action, Advice, AdvisedSignal, Regime, ScoredSignal, StrategyVerdict, TopStrategy,
};
use crate::strategy::{Consensus, HIT_WINDOW, confidence, mean_score};

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
        let evaluated = req.verdicts;
        let verdicts: Vec<StrategyVerdict> = evaluated.iter().map(|(v, _)| v.clone()).collect();
        let vote = Consensus::of(&verdicts);
        let (action, bull, bear, neutral) = (vote.action, vote.bullish, vote.bearish, vote.neutral);
        let n = verdicts.len() as u32;
        let confidence = confidence(vote.ratio(), mean_score(&verdicts));
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
    use crate::market::Candle;
    use crate::strategy::testing::series;
    use crate::strategy::{StrategySet, summarize};
    use chrono::Utc;

    /// The rules agent's signal on `c`, with the strategies evaluated as the pipeline does.
    fn analyse(c: &[Candle]) -> Result<SignalDraft, AgentError> {
        let ctx = summarize(c);
        let verdicts = StrategySet::default().evaluate(c);
        Rules::analyse(&SignalRequest {
            symbol: "ETH/USD",
            cycle_id: crate::schedule::CycleId::new(Utc::now()),
            candles: c,
            context: &ctx,
            verdicts: &verdicts,
            now: c.last().map_or_else(Utc::now, |k| k.time),
        })
    }

    fn said(d: &SignalDraft, strategy: &str) -> Action {
        d.strategy_breakdown
            .iter()
            .find(|v| v.name == strategy)
            .map_or(Action::Hold, |v| v.signal)
    }

    #[test]
    fn a_steady_uptrend_is_a_buy() {
        // Rising 0.1 % a minute with a small wiggle.
        let c = series(
            |i| 100.0 * 1.001f64.powi(i as i32) * (1.0 + 0.0002 * ((i % 3) as f64 - 1.0)),
            120,
        );
        let d = analyse(&c).expect("ok");
        d.validate().expect("valid");
        assert_eq!(d.action, Action::Buy, "{d:?}");
        let t = crate::model::Tally::of(&d.strategy_breakdown);
        assert!(t.bullish >= 2);
        assert_eq!(t.analyzed, 6);
        assert_eq!(d.top_strategy.signal, Action::Buy);
        assert_eq!(said(&d, "ema_trend"), Action::Buy);
        // The top strategy's parameters are its config section.
        assert_eq!(
            serde_json::Value::Object(d.top_strategy.parameters.clone()),
            StrategySet::default()
                .evaluate(&c)
                .into_iter()
                .find(|(v, _)| v.name == d.top_strategy.name)
                .map(|(_, p)| p)
                .expect("top strategy")
        );
    }

    #[test]
    fn a_steady_downtrend_is_a_sell() {
        let c = series(
            |i| 100.0 * 0.999f64.powi(i as i32) * (1.0 + 0.0002 * ((i % 3) as f64 - 1.0)),
            120,
        );
        let d = analyse(&c).expect("ok");
        // Trend followers say SELL; the reversal strategies (oversold RSI) disagree, so the
        // consensus may be HOLD but never BUY.
        assert_eq!(said(&d, "ema_trend"), Action::Sell);
        assert_eq!(said(&d, "momentum"), Action::Sell);
        assert_eq!(said(&d, "rsi_reversal"), Action::Buy);
        assert!(
            crate::model::Tally::of(&d.strategy_breakdown).bearish >= 2,
            "{d:?}"
        );
        assert_ne!(d.action, Action::Buy, "{d:?}");
    }

    #[test]
    fn too_few_candles_is_an_error_not_a_guess() {
        let c = series(|i| 100.0 + i as f64, 10);
        let e = analyse(&c).expect_err("too few");
        assert_eq!(e.reason().as_str(), "market_data_insufficient");
    }
}
