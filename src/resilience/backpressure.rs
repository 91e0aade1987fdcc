//! Backpressure: after `max_overruns` consecutive overrunning cycles, sit out `cooldown_cycles`
//! ticks so a struggling dependency (and the next tick's budget) can recover.

/// The seed's `BackpressureController`.
#[derive(Debug, Clone)]
pub struct Backpressure {
    max_overruns: u32,
    cooldown_period: u32,
    consecutive_overruns: u32,
    cooldown_remaining: u32,
    cooldowns_entered: u64,
}

impl Backpressure {
    /// `max_overruns` consecutive overruns start a cooldown of `cooldown_cycles` ticks.
    pub fn new(max_overruns: u32, cooldown_cycles: u32) -> Self {
        Self {
            max_overruns: max_overruns.max(1),
            cooldown_period: cooldown_cycles,
            consecutive_overruns: 0,
            cooldown_remaining: 0,
            cooldowns_entered: 0,
        }
    }

    /// Records a finished cycle. Returns `true` when this cycle started a cooldown.
    pub fn on_cycle_complete(&mut self, overrun: bool) -> bool {
        if !overrun {
            self.consecutive_overruns = 0;
            return false;
        }
        self.consecutive_overruns += 1;
        if self.consecutive_overruns >= self.max_overruns && self.cooldown_period > 0 {
            tracing::warn!(
                consecutive_overruns = self.consecutive_overruns,
                cooldown_cycles = self.cooldown_period,
                "backpressure: cooling down"
            );
            self.cooldown_remaining = self.cooldown_period;
            // Start counting afresh after the cooldown, so one more overrun does not
            // immediately trigger another.
            self.consecutive_overruns = 0;
            self.cooldowns_entered += 1;
            return true;
        }
        false
    }

    /// The cycle gate: `false` means sit this tick out (and count one cooldown tick down).
    pub fn should_run_cycle(&mut self) -> bool {
        if self.cooldown_remaining > 0 {
            self.cooldown_remaining -= 1;
            tracing::info!(
                remaining = self.cooldown_remaining,
                "backpressure cooldown, skipping cycle"
            );
            return false;
        }
        true
    }

    /// Overruns in a row so far.
    pub fn consecutive_overruns(&self) -> u32 {
        self.consecutive_overruns
    }

    /// Ticks still to sit out.
    pub fn cooldown_remaining(&self) -> u32 {
        self.cooldown_remaining
    }

    /// `(consecutive overruns, cooldown ticks left)`, for the next process.
    pub fn memo(&self) -> (u32, u32) {
        (self.consecutive_overruns, self.cooldown_remaining)
    }

    /// Takes on what a previous process left (bounded by this one's settings).
    pub fn restore(&mut self, (overruns, cooldown): (u32, u32)) {
        self.consecutive_overruns = overruns.min(self.max_overruns);
        self.cooldown_remaining = cooldown.min(self.cooldown_period);
    }

    /// Cooldowns started since the process began.
    pub fn cooldowns_entered(&self) -> u64 {
        self.cooldowns_entered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_overruns_start_a_two_cycle_cooldown() {
        let mut b = Backpressure::new(3, 2);
        assert!(!b.on_cycle_complete(true));
        assert!(!b.on_cycle_complete(true));
        assert!(b.should_run_cycle());
        assert!(b.on_cycle_complete(true));
        assert_eq!(b.cooldown_remaining(), 2);
        assert!(!b.should_run_cycle());
        assert!(!b.should_run_cycle());
        assert!(b.should_run_cycle());
        assert_eq!(b.cooldowns_entered(), 1);
    }

    #[test]
    fn a_good_cycle_resets_the_count() {
        let mut b = Backpressure::new(3, 2);
        b.on_cycle_complete(true);
        b.on_cycle_complete(true);
        b.on_cycle_complete(false);
        assert_eq!(b.consecutive_overruns(), 0);
        assert!(!b.on_cycle_complete(true));
        assert!(b.should_run_cycle());
    }

    #[test]
    fn after_a_cooldown_it_takes_a_full_streak_again() {
        let mut b = Backpressure::new(2, 1);
        b.on_cycle_complete(true);
        assert!(b.on_cycle_complete(true));
        assert!(!b.should_run_cycle());
        assert!(!b.on_cycle_complete(true));
        assert!(b.should_run_cycle());
    }
}
