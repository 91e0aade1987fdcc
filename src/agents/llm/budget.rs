//! The token budget: per clock hour and per UTC day, reserved before a call and settled
//! after, so calls in flight never overshoot it.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

/// Token budget per clock hour and per UTC day. `None` = unlimited.
///
/// A call reserves its worst case before it is sent (an upper bound of its prompt plus
/// `max_tokens`) and settles to what the provider reports after. A call is refused when its
/// reservation would not fit beside what was spent and what calls in flight have reserved, so
/// the spent total never exceeds the budget — however many calls run at once — as long as the
/// provider honours `max_tokens`.
#[derive(Debug, Default)]
pub struct TokenBudget {
    per_hour: Option<u64>,
    per_day: Option<u64>,
    state: Mutex<BudgetState>,
}

#[derive(Debug, Default)]
struct BudgetState {
    hour: i64,
    hour_used: u64,
    day: i64,
    day_used: u64,
    /// Reserved by calls in flight (counted against both windows).
    reserved: u64,
    /// The last reservation asked for: a window with less than this left is spent.
    typical: u64,
}

/// Which window is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetWindow {
    /// The clock hour.
    Hour,
    /// The UTC day.
    Day,
}

impl BudgetWindow {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetWindow::Hour => "hour",
            BudgetWindow::Day => "day",
        }
    }
}

/// Tokens set aside for one call in flight; give it back with [`TokenBudget::settle`].
///
/// A reservation dropped unsettled — the call was cancelled in flight, at a deadline or by
/// shutdown — is charged in full: the provider may well bill a request we stopped waiting
/// for, and charging the worst case keeps the budget from being overshot.
#[must_use = "settle a reservation with what the call used"]
pub struct Reservation {
    budget: Option<Arc<TokenBudget>>,
    tokens: u64,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("tokens", &self.tokens)
            .finish()
    }
}

impl PartialEq for Reservation {
    fn eq(&self, other: &Self) -> bool {
        self.tokens == other.tokens
    }
}

impl Reservation {
    /// Tokens reserved.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(b) = self.budget.take() {
            b.finish(self.tokens, self.tokens, Utc::now());
        }
    }
}

impl TokenBudget {
    /// A budget; zero or `None` means no limit for that window.
    pub fn new(per_hour: Option<u64>, per_day: Option<u64>) -> Self {
        Self {
            per_hour: per_hour.filter(|v| *v > 0),
            per_day: per_day.filter(|v| *v > 0),
            ..Default::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn roll(st: &mut BudgetState, now: DateTime<Utc>) {
        let (h, d) = (
            now.timestamp().div_euclid(3600),
            now.timestamp().div_euclid(86_400),
        );
        if st.hour != h {
            st.hour = h;
            st.hour_used = 0;
        }
        if st.day != d {
            st.day = d;
            st.day_used = 0;
        }
    }

    /// The first window in which `tokens` more would not fit.
    fn would_overflow(&self, st: &BudgetState, tokens: u64) -> Option<BudgetWindow> {
        let fits = |limit: Option<u64>, used: u64| {
            limit.is_none_or(|l| used.saturating_add(st.reserved).saturating_add(tokens) <= l)
        };
        if !fits(self.per_day, st.day_used) {
            Some(BudgetWindow::Day)
        } else if !fits(self.per_hour, st.hour_used) {
            Some(BudgetWindow::Hour)
        } else {
            None
        }
    }

    /// Sets `tokens` aside for a call, or says which window cannot hold them.
    pub fn reserve(
        self: &Arc<Self>,
        tokens: u64,
        now: DateTime<Utc>,
    ) -> Result<Reservation, BudgetWindow> {
        let mut st = self.lock();
        Self::roll(&mut st, now);
        st.typical = tokens;
        if let Some(w) = self.would_overflow(&st, tokens) {
            return Err(w);
        }
        st.reserved += tokens;
        Ok(Reservation {
            budget: Some(self.clone()),
            tokens,
        })
    }

    /// The call is over: its reservation is released and `used` tokens are spent.
    pub fn settle(&self, mut r: Reservation, used: u64, now: DateTime<Utc>) {
        r.budget = None;
        self.finish(r.tokens, used, now);
    }

    fn finish(&self, reserved: u64, used: u64, now: DateTime<Utc>) {
        let mut st = self.lock();
        Self::roll(&mut st, now);
        st.reserved = st.reserved.saturating_sub(reserved);
        if used > reserved {
            // Only a provider that ignores `max_tokens` gets here; it is charged all the same.
            tracing::warn!(
                used,
                reserved,
                "an LLM call used more tokens than it reserved"
            );
        }
        st.hour_used += used;
        st.day_used += used;
    }

    /// The spent window, if any: one with less left than a typical call reserves.
    pub fn exhausted(&self, now: DateTime<Utc>) -> Option<BudgetWindow> {
        let mut st = self.lock();
        Self::roll(&mut st, now);
        let typical = st.typical.max(1);
        let saved = std::mem::take(&mut st.reserved);
        let w = self.would_overflow(&st, typical);
        st.reserved = saved;
        w
    }

    /// `(hour_used, day_used)`.
    pub fn used(&self, now: DateTime<Utc>) -> (u64, u64) {
        let mut st = self.lock();
        Self::roll(&mut st, now);
        (st.hour_used, st.day_used)
    }

    /// Tokens reserved by calls in flight.
    pub fn reserved(&self) -> u64 {
        self.lock().reserved
    }

    /// Configured limits `(per_hour, per_day)`.
    pub fn limits(&self) -> (Option<u64>, Option<u64>) {
        (self.per_hour, self.per_day)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_windows_roll() {
        let b = Arc::new(TokenBudget::new(Some(100), Some(250)));
        let t: DateTime<Utc> = "2026-11-28T10:59:00Z".parse().expect("t");
        assert_eq!(b.exhausted(t), None);
        let r = b.reserve(100, t).expect("fits exactly");
        b.settle(r, 100, t);
        assert_eq!(b.exhausted(t), Some(BudgetWindow::Hour));
        assert_eq!(b.reserve(1, t), Err(BudgetWindow::Hour));
        let next_hour: DateTime<Utc> = "2026-11-28T11:00:00Z".parse().expect("t");
        assert_eq!(b.exhausted(next_hour), None);
        let r = b.reserve(100, next_hour).expect("fits");
        b.settle(r, 100, next_hour);
        assert_eq!(b.used(next_hour), (100, 200));
        // 50 left today: less than a typical call (100) reserves.
        assert_eq!(b.exhausted(next_hour), Some(BudgetWindow::Day));
        let next_day: DateTime<Utc> = "2026-11-29T00:00:00Z".parse().expect("t");
        assert_eq!(b.exhausted(next_day), None);
        assert_eq!(
            TokenBudget::new(None, Some(0)).exhausted(t),
            None,
            "0 = unlimited"
        );
    }

    #[test]
    fn reservations_keep_calls_in_flight_from_overshooting() {
        let t: DateTime<Utc> = "2026-11-28T10:00:00Z".parse().expect("t");
        let b = Arc::new(TokenBudget::new(Some(1000), None));
        // Three calls at once, each reserving 400: the third would not fit beside the two.
        let r1 = b.reserve(400, t).expect("first");
        let r2 = b.reserve(400, t).expect("second");
        assert_eq!(b.reserve(400, t), Err(BudgetWindow::Hour));
        assert_eq!(b.reserved(), 800);
        // They used 120 each: 240 spent, nothing reserved, 760 left.
        b.settle(r1, 120, t);
        b.settle(r2, 120, t);
        assert_eq!((b.used(t).0, b.reserved()), (240, 0));
        let mut spent = 240;
        // Calls one after another until the next reservation cannot fit: 240 + 400 + 120 × k.
        while let Ok(r) = b.reserve(400, t) {
            b.settle(r, 120, t);
            spent += 120;
        }
        // 240 + 4 × 120 = 720; a fifth needs 720 + 400 > 1000.
        assert_eq!(spent, 720);
        assert_eq!(b.used(t).0, 720);
        assert_eq!(b.exhausted(t), Some(BudgetWindow::Hour));
        // A call given up before it was sent gives its whole reservation back.
        let b = Arc::new(TokenBudget::new(Some(500), None));
        let r = b.reserve(500, t).expect("fits");
        b.settle(r, 0, t);
        assert_eq!((b.used(t).0, b.reserved()), (0, 0));
        // A call cancelled in flight (its reservation dropped unsettled) is charged in full.
        let r = b.reserve(300, Utc::now()).expect("fits");
        drop(r);
        assert_eq!((b.used(Utc::now()).0, b.reserved()), (300, 0));
    }
}
