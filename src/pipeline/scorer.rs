//! The TradeStream opportunity score: deterministic, no LLM, microseconds.
//!
//! ```text
//! score = 100 × (0.25·confidence + 0.30·min(rar / cap.max_return, 1) + 0.20·consensus
//!               + 0.15·min(volatility / cap.max_volatility, 1) + 0.10·max(0, 1 − minutes_ago/60))
//! rar   = r·(0.5 + 0.5·min(r/stddev, 2)/2), or r when stddev ≤ 0
//! ```

use chrono::{DateTime, Utc};

use crate::model::{Action, OpportunityFactors, Regime, ScoredSignal, Signal, Tier};

/// Expected return when the signal carries none.
pub const DEFAULT_EXPECTED_RETURN: f64 = 0.01;
/// Volatility when the signal carries none.
pub const DEFAULT_VOLATILITY: f64 = 0.015;

/// The formula's inputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreInputs {
    /// Signal confidence, 0–1.
    pub confidence: f64,
    /// Expected return r (fraction).
    pub expected_return: f64,
    /// Standard deviation of returns, for the risk adjustment.
    pub stddev: f64,
    /// Volatility (fraction).
    pub volatility: f64,
    /// Regime that selects the caps.
    pub regime: Regime,
    /// Share of strategies that agree with the action, 0–1.
    pub consensus: f64,
    /// Age of the data in minutes.
    pub minutes_ago: f64,
}

impl Regime {
    /// `(max_return, max_volatility)` caps.
    pub fn caps(self) -> (f64, f64) {
        match self {
            Regime::Normal => (0.05, 0.03),
            Regime::HighVolatility => (0.08, 0.05),
            Regime::Extreme => (0.15, 0.10),
        }
    }

    /// The regime a 1-hour volatility puts the market in.
    pub fn from_volatility(v: f64) -> Regime {
        if v > 0.05 {
            Regime::Extreme
        } else if v > 0.03 {
            Regime::HighVolatility
        } else {
            Regime::Normal
        }
    }
}

impl Tier {
    /// HOT ≥ 80, GOOD ≥ 60, NEUTRAL ≥ 40, else LOW.
    pub fn of(score: f64) -> Tier {
        if score >= 80.0 {
            Tier::Hot
        } else if score >= 60.0 {
            Tier::Good
        } else if score >= 40.0 {
            Tier::Neutral
        } else {
            Tier::Low
        }
    }
}

fn finite_or(v: f64, default: f64) -> f64 {
    if v.is_finite() { v } else { default }
}

/// The risk-adjusted return.
pub fn risk_adjusted_return(r: f64, stddev: f64) -> f64 {
    if stddev <= 0.0 {
        r
    } else {
        r * (0.5 + 0.5 * (r / stddev).min(2.0) / 2.0)
    }
}

/// The score (one decimal) and each term's contribution.
pub fn score(i: &ScoreInputs) -> (f64, OpportunityFactors) {
    let (max_return, max_vol) = i.regime.caps();
    let conf = finite_or(i.confidence, 0.0).clamp(0.0, 1.0);
    let r = finite_or(i.expected_return, DEFAULT_EXPECTED_RETURN).max(0.0);
    let sd = finite_or(i.stddev, 0.0);
    let vol = finite_or(i.volatility, DEFAULT_VOLATILITY).max(0.0);
    let consensus = finite_or(i.consensus, 0.0).clamp(0.0, 1.0);
    let minutes = finite_or(i.minutes_ago, 0.0).max(0.0);

    let rar = risk_adjusted_return(r, sd);
    let f = OpportunityFactors {
        confidence: 100.0 * 0.25 * conf,
        expected_return: 100.0 * 0.30 * (rar / max_return).min(1.0),
        consensus: 100.0 * 0.20 * consensus,
        volatility: 100.0 * 0.15 * (vol / max_vol).min(1.0),
        freshness: 100.0 * 0.10 * (1.0 - minutes / 60.0).max(0.0),
        risk_adjusted_return: rar,
    };
    let total = f.confidence + f.expected_return + f.consensus + f.volatility + f.freshness;
    ((total * 10.0).round() / 10.0, f)
}

/// Scores a signal made at `now` from its own fields: expected return = |1 h change|
/// (default 0.01 when absent), stddev and volatility = the 1 h volatility (default 0.015),
/// regime from volatility, consensus = share of strategies agreeing with the action.
pub fn score_signal(signal: Signal, now: DateTime<Utc>) -> ScoredSignal {
    let ctx = &signal.market_context;
    let r = ctx.price_change_1h.abs();
    let r = if r.is_finite() && r > 0.0 {
        r
    } else {
        DEFAULT_EXPECTED_RETURN
    };
    let vol = if ctx.volatility_1h.is_finite() && ctx.volatility_1h > 0.0 {
        ctx.volatility_1h
    } else {
        DEFAULT_VOLATILITY
    };
    let regime = Regime::from_volatility(vol);
    let agreeing = match signal.action {
        Action::Buy => signal.strategies_bullish,
        Action::Sell => signal.strategies_bearish,
        Action::Hold => signal.strategies_neutral,
    };
    let consensus = if signal.strategies_analyzed == 0 {
        0.0
    } else {
        f64::from(agreeing) / f64::from(signal.strategies_analyzed)
    };
    let minutes_ago = (now - signal.data_as_of).num_milliseconds() as f64 / 60_000.0;
    let (s, factors) = score(&ScoreInputs {
        confidence: signal.confidence,
        expected_return: r,
        stddev: vol,
        volatility: vol,
        regime,
        consensus,
        minutes_ago,
    });
    ScoredSignal {
        signal,
        opportunity_score: s,
        opportunity_tier: Tier::of(s),
        market_regime: regime,
        opportunity_factors: factors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> ScoreInputs {
        ScoreInputs {
            confidence: 0.92,
            expected_return: 0.02,
            stddev: 0.01,
            volatility: 0.02,
            regime: Regime::Normal,
            consensus: 0.8,
            minutes_ago: 0.0,
        }
    }

    #[test]
    fn hand_computed_normal_regime() {
        // rar = 0.02·(0.5 + 0.5·min(2, 2)/2) = 0.02
        // 100·(0.25·0.92 + 0.30·0.4 + 0.20·0.8 + 0.15·(0.02/0.03) + 0.10·1)
        //   = 23 + 12 + 16 + 10 + 10 = 71.0
        let (s, f) = score(&inputs());
        assert_eq!(s, 71.0);
        assert!((f.risk_adjusted_return - 0.02).abs() < 1e-12);
        assert!((f.expected_return - 12.0).abs() < 1e-9);
        assert_eq!(Tier::of(s), Tier::Good);
    }

    #[test]
    fn hand_computed_high_volatility_regime() {
        // rar = 0.01·(0.5 + 0.5·0.5/2) = 0.00625; caps 0.08 / 0.05
        // 100·(0.175 + 0.30·0.078125 + 0.12 + 0.15·0.8 + 0.10·0.5) = 48.84375 → 48.8
        let i = ScoreInputs {
            confidence: 0.7,
            expected_return: 0.01,
            stddev: 0.02,
            volatility: 0.04,
            regime: Regime::HighVolatility,
            consensus: 0.6,
            minutes_ago: 30.0,
        };
        let (s, _) = score(&i);
        assert_eq!(s, 48.8);
        assert_eq!(Tier::of(s), Tier::Neutral);
    }

    #[test]
    fn hand_computed_saturated_terms() {
        // Everything capped, 20 minutes old: 22.5 + 30 + 20 + 15 + 6.667 = 94.1667 → 94.2
        let i = ScoreInputs {
            confidence: 0.9,
            expected_return: 0.2,
            stddev: 0.01,
            volatility: 0.5,
            regime: Regime::Extreme,
            consensus: 1.0,
            minutes_ago: 20.0,
        };
        assert_eq!(score(&i).0, 94.2);
        // Data older than an hour adds nothing; zero stddev means rar = r.
        let old = ScoreInputs {
            minutes_ago: 90.0,
            stddev: 0.0,
            expected_return: 0.03,
            ..inputs()
        };
        // 23 + 0.30·0.6·100 = 18 + 16 + 10 + 0 = 67.0
        assert_eq!(score(&old).0, 67.0);
    }

    #[test]
    fn tiers_at_their_boundaries() {
        assert_eq!(Tier::of(80.0), Tier::Hot);
        assert_eq!(Tier::of(79.9), Tier::Good);
        assert_eq!(Tier::of(60.0), Tier::Good);
        assert_eq!(Tier::of(59.9), Tier::Neutral);
        assert_eq!(Tier::of(40.0), Tier::Neutral);
        assert_eq!(Tier::of(39.9), Tier::Low);
    }

    #[test]
    fn regimes_and_caps() {
        assert_eq!(Regime::from_volatility(0.02), Regime::Normal);
        assert_eq!(Regime::from_volatility(0.04), Regime::HighVolatility);
        assert_eq!(Regime::from_volatility(0.2), Regime::Extreme);
        assert_eq!(Regime::Extreme.caps(), (0.15, 0.10));
    }

    #[test]
    fn non_finite_inputs_never_produce_nan() {
        let i = ScoreInputs {
            confidence: f64::NAN,
            expected_return: f64::INFINITY,
            stddev: f64::NAN,
            volatility: f64::NAN,
            consensus: f64::NAN,
            minutes_ago: f64::NAN,
            regime: Regime::Normal,
        };
        let (s, _) = score(&i);
        assert!(s.is_finite() && (0.0..=100.0).contains(&s), "{s}");
    }
}
