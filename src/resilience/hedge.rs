//! The budget of hedged requests: a backup request for a straggling call is allowed only
//! while hedges stay within a fixed fraction of the calls made.
//!
//! Each call earns `fraction` of a hedge; a hedge spends one. Credit is capped, so a long calm
//! period cannot be saved up and spent as a burst of backups during an incident (exactly
//! when extra load hurts the provider most). Since credit only comes from calls, hedges never
//! exceed `fraction` × calls, over any span that starts with an empty bucket.

use std::sync::Mutex;

/// Hedging credit. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct HedgeBudget {
    fraction: f64,
    cap: f64,
    state: Mutex<HedgeState>,
}

#[derive(Debug, Default, Clone, Copy)]
struct HedgeState {
    credit: f64,
    calls: u64,
    hedges: u64,
}

impl HedgeBudget {
    /// At most `fraction` (0–1) extra calls per call; at most `cap` hedges saved up.
    pub fn new(fraction: f64, cap: f64) -> Self {
        let fraction = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        Self {
            fraction,
            cap: cap.max(1.0),
            state: Mutex::new(HedgeState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HedgeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A primary call was made: it earns `fraction` of a hedge.
    pub fn on_call(&self) {
        let mut s = self.lock();
        s.calls += 1;
        s.credit = (s.credit + self.fraction).min(self.cap);
    }

    /// Takes one hedge if the credit allows it.
    pub fn try_take(&self) -> bool {
        let mut s = self.lock();
        if s.credit >= 1.0 {
            s.credit -= 1.0;
            s.hedges += 1;
            true
        } else {
            false
        }
    }

    /// Gives back a hedge that was taken but could not be sent (no rate-limit slot, no
    /// budget): it was never an extra call.
    pub fn refund(&self) {
        let mut s = self.lock();
        s.credit = (s.credit + 1.0).min(self.cap);
        s.hedges = s.hedges.saturating_sub(1);
    }

    /// `(calls, hedges)` so far.
    pub fn counts(&self) -> (u64, u64) {
        let s = self.lock();
        (s.calls, s.hedges)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hedges_never_exceed_the_fraction_of_calls() {
        let b = HedgeBudget::new(0.1, 5.0);
        assert!(!b.try_take(), "no credit before any call");
        let mut hedges = 0;
        for _ in 0..1000 {
            b.on_call();
            // Every call straggles: ask for a hedge every time.
            if b.try_take() {
                hedges += 1;
            }
        }
        // 1000 calls earn 100 hedges (floating point may round the last one away).
        assert!((99..=100).contains(&hedges), "{hedges}");
        assert_eq!(b.counts(), (1000, hedges));
    }

    #[test]
    fn credit_is_capped_so_calm_periods_do_not_buy_a_burst() {
        let b = HedgeBudget::new(0.1, 5.0);
        for _ in 0..10_000 {
            b.on_call();
        }
        let burst = (0..100).filter(|_| b.try_take()).count();
        assert_eq!(burst, 5);
        b.refund();
        assert!(b.try_take(), "a refunded hedge can be taken again");
        assert_eq!(b.counts().1, 5);
    }

    #[test]
    fn zero_or_nonsense_fractions_never_hedge() {
        for f in [0.0, -1.0, f64::NAN] {
            let b = HedgeBudget::new(f, 5.0);
            for _ in 0..100 {
                b.on_call();
            }
            assert!(!b.try_take(), "{f}");
        }
    }
}
