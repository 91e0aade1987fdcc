//! The latency window, the adaptive concurrency and timeout policy, and the high-latency skip.
//!
//! The seed skips a cycle while p99 of the last N symbol latencies is above a threshold. A
//! skipped cycle records no latencies, so once that condition holds it holds forever: the
//! runner locks itself out. Two independent guards make recovery certain here:
//!
//! 1. samples expire after `max_sample_age`, so an old slow period cannot rule for ever; and
//! 2. at most `max_consecutive_skips` cycles in a row are skipped; the next one runs as a probe
//!    (at the reduced concurrency), and its latencies decide what happens after it.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// A bounded window of recent latencies with ages.
#[derive(Debug, Clone)]
pub struct LatencyTracker {
    window: usize,
    max_age: Duration,
    samples: VecDeque<(Instant, Duration)>,
}

impl LatencyTracker {
    /// A tracker keeping the last `window` samples, none older than `max_age`.
    pub fn new(window: usize, max_age: Duration) -> Self {
        Self {
            window: window.max(1),
            max_age,
            samples: VecDeque::with_capacity(window.max(1)),
        }
    }

    /// Adds one observation.
    pub fn record(&mut self, latency: Duration) {
        if self.samples.len() == self.window {
            self.samples.pop_front();
        }
        self.samples.push_back((Instant::now(), latency));
    }

    fn expire(&mut self) {
        let now = Instant::now();
        while let Some((at, _)) = self.samples.front() {
            if now.duration_since(*at) > self.max_age {
                self.samples.pop_front();
            } else {
                break;
            }
        }
    }

    /// Number of live samples.
    pub fn len(&mut self) -> usize {
        self.expire();
        self.samples.len()
    }

    /// Whether the window holds no live sample.
    pub fn is_empty(&mut self) -> bool {
        self.len() == 0
    }

    /// The q-quantile (0..=1) by the seed's nearest-rank rule: `sorted[min(floor(n·q), n−1)]`.
    /// Zero when empty.
    pub fn percentile(&mut self, q: f64) -> Duration {
        self.expire();
        if self.samples.is_empty() {
            return Duration::ZERO;
        }
        let mut sorted: Vec<Duration> = self.samples.iter().map(|(_, d)| *d).collect();
        sorted.sort_unstable();
        let n = sorted.len();
        let idx = ((n as f64) * q).floor() as usize;
        sorted[idx.min(n - 1)]
    }

    /// 95th percentile.
    pub fn p95(&mut self) -> Duration {
        self.percentile(0.95)
    }

    /// 99th percentile.
    pub fn p99(&mut self) -> Duration {
        self.percentile(0.99)
    }
}

/// Settings of the adaptive policy (the seed's `adaptive` block plus the recovery guards).
#[derive(Debug, Clone, Copy)]
pub struct AdaptiveSettings {
    /// Normal concurrency (`parallel.max_concurrent`).
    pub max_concurrent: usize,
    /// Concurrency floor during high latency (`parallel.min_concurrent`).
    pub min_concurrent: usize,
    /// Normal per-symbol timeout.
    pub base_timeout: Duration,
    /// Cap of the extended timeout (`timeouts.symbol_timeout_max_seconds`).
    pub max_timeout: Duration,
    /// p95 above this means high-latency mode.
    pub p95_threshold: Duration,
    /// p99 above this skips a cycle (bounded by `max_consecutive_skips`).
    pub p99_threshold: Duration,
    /// Cycles skipped in a row at most before a probe cycle runs.
    pub max_consecutive_skips: u32,
}

/// What the adaptive policy decided for one cycle.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CycleParams {
    /// Symbols processed at once.
    pub concurrency: usize,
    /// Per-symbol deadline.
    pub symbol_timeout: Duration,
    /// Whether high-latency mode is on.
    pub high_latency: bool,
}

/// The seed's `AdaptiveScheduler` with the lock-out fixed.
#[derive(Debug, Clone)]
pub struct AdaptivePolicy {
    settings: AdaptiveSettings,
    tracker: LatencyTracker,
    consecutive_skips: u32,
}

impl AdaptivePolicy {
    /// A policy over `tracker`.
    pub fn new(settings: AdaptiveSettings, tracker: LatencyTracker) -> Self {
        Self {
            settings,
            tracker,
            consecutive_skips: 0,
        }
    }

    /// Records one symbol's latency.
    pub fn record(&mut self, latency: Duration) {
        self.tracker.record(latency);
    }

    /// Current p95 of the window.
    pub fn p95(&mut self) -> Duration {
        self.tracker.p95()
    }

    /// Current p99 of the window.
    pub fn p99(&mut self) -> Duration {
        self.tracker.p99()
    }

    /// Whether p95 is above the threshold.
    pub fn is_high_latency(&mut self) -> bool {
        self.tracker.p95() > self.settings.p95_threshold
    }

    /// Concurrency for the next cycle: halved (not below `min_concurrent`) in high latency.
    pub fn concurrency(&mut self) -> usize {
        let base = self.settings.max_concurrent.max(1);
        if self.is_high_latency() {
            (base / 2).max(self.settings.min_concurrent).clamp(1, base)
        } else {
            base
        }
    }

    /// Per-symbol timeout for the next cycle: ×1.5 in high latency, capped.
    pub fn symbol_timeout(&mut self) -> Duration {
        let base = self.settings.base_timeout;
        if self.is_high_latency() {
            base.mul_f64(1.5).min(self.settings.max_timeout.max(base))
        } else {
            base
        }
    }

    /// Both parameters at once.
    pub fn params(&mut self) -> CycleParams {
        CycleParams {
            concurrency: self.concurrency(),
            symbol_timeout: self.symbol_timeout(),
            high_latency: self.is_high_latency(),
        }
    }

    /// The cycle gate: `true` means skip this cycle. Never more than `max_consecutive_skips`
    /// in a row; the cycle after that runs and refreshes the window.
    pub fn should_skip_cycle(&mut self) -> bool {
        let p99 = self.tracker.p99();
        if p99 > self.settings.p99_threshold
            && self.consecutive_skips < self.settings.max_consecutive_skips
        {
            self.consecutive_skips += 1;
            tracing::warn!(
                p99_ms = p99.as_millis() as u64,
                skipped_in_a_row = self.consecutive_skips,
                "p99 latency above threshold, skipping cycle"
            );
            true
        } else {
            if p99 > self.settings.p99_threshold {
                tracing::info!(
                    p99_ms = p99.as_millis() as u64,
                    "p99 still high, running a probe cycle at reduced concurrency"
                );
            }
            self.consecutive_skips = 0;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn settings() -> AdaptiveSettings {
        AdaptiveSettings {
            max_concurrent: 10,
            min_concurrent: 3,
            base_timeout: Duration::from_secs(10),
            max_timeout: Duration::from_secs(15),
            p95_threshold: ms(8000),
            p99_threshold: ms(9000),
            max_consecutive_skips: 1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn percentiles_follow_the_nearest_rank_rule() {
        let mut t = LatencyTracker::new(10, Duration::from_secs(600));
        assert_eq!(t.p95(), Duration::ZERO);
        for i in 1..=10 {
            t.record(ms(i * 100));
        }
        // n = 10: p95 → index 9 (1000 ms); p50 → index 5 (600 ms).
        assert_eq!(t.p95(), ms(1000));
        assert_eq!(t.percentile(0.5), ms(600));
        // The window slides: 11th sample evicts the first.
        t.record(ms(50));
        assert_eq!(t.len(), 10);
        assert_eq!(t.percentile(0.0), ms(50));
        // 20 samples into a window of 20: p95 → index 19.
        let mut t = LatencyTracker::new(20, Duration::from_secs(600));
        for i in 1..=20 {
            t.record(ms(i));
        }
        assert_eq!(t.p95(), ms(20));
        assert_eq!(t.percentile(0.9), ms(19));
    }

    #[tokio::test(start_paused = true)]
    async fn samples_expire_by_age() {
        let mut t = LatencyTracker::new(10, Duration::from_secs(60));
        t.record(ms(9500));
        tokio::time::advance(Duration::from_secs(30)).await;
        t.record(ms(100));
        assert_eq!(t.p99(), ms(9500));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(t.p99(), ms(100));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(t.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_halves_concurrency_and_extends_timeout_with_a_cap() {
        let mut p = AdaptivePolicy::new(
            settings(),
            LatencyTracker::new(10, Duration::from_secs(600)),
        );
        assert_eq!(p.concurrency(), 10);
        assert_eq!(p.symbol_timeout(), Duration::from_secs(10));
        for _ in 0..10 {
            p.record(ms(8500));
        }
        assert_eq!(p.concurrency(), 5);
        assert_eq!(p.symbol_timeout(), Duration::from_secs(15));
        // The floor: max 4 halves to 2, but min_concurrent is 3.
        let mut s = settings();
        s.max_concurrent = 4;
        s.max_timeout = Duration::from_secs(12);
        let mut p = AdaptivePolicy::new(s, LatencyTracker::new(10, Duration::from_secs(600)));
        for _ in 0..10 {
            p.record(ms(8500));
        }
        assert_eq!(p.concurrency(), 3);
        // ×1.5 would be 15 s; the cap is 12 s.
        assert_eq!(p.symbol_timeout(), Duration::from_secs(12));
        // min_concurrent never raises the limit above max_concurrent.
        let mut s = settings();
        s.max_concurrent = 2;
        let mut p = AdaptivePolicy::new(s, LatencyTracker::new(10, Duration::from_secs(600)));
        for _ in 0..10 {
            p.record(ms(8500));
        }
        assert_eq!(p.concurrency(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn latency_skip_recovers_without_new_samples() {
        // The seed's lock-out: p99 high, a skipped cycle records nothing. With the guard the
        // cycle after a skip runs, whatever the window says.
        let mut p = AdaptivePolicy::new(
            settings(),
            LatencyTracker::new(10, Duration::from_secs(600)),
        );
        for _ in 0..10 {
            p.record(ms(9500));
        }
        let decisions: Vec<bool> = (0..6).map(|_| p.should_skip_cycle()).collect();
        assert_eq!(decisions, vec![true, false, true, false, true, false]);
    }

    #[tokio::test(start_paused = true)]
    async fn latency_skip_ends_when_the_probe_cycle_is_fast() {
        let mut p = AdaptivePolicy::new(
            settings(),
            LatencyTracker::new(10, Duration::from_secs(600)),
        );
        for _ in 0..10 {
            p.record(ms(9500));
        }
        assert!(p.should_skip_cycle());
        assert!(!p.should_skip_cycle(), "probe cycle runs");
        assert_eq!(p.concurrency(), 5, "probe runs at reduced concurrency");
        // The probe cycle's symbols were fast: they replace the window.
        for _ in 0..10 {
            p.record(ms(300));
        }
        assert!(!p.should_skip_cycle());
        assert!(!p.should_skip_cycle());
        assert_eq!(p.concurrency(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn latency_skip_recovers_by_age_even_with_more_skips_allowed() {
        let mut s = settings();
        s.max_consecutive_skips = 1000;
        let mut p = AdaptivePolicy::new(s, LatencyTracker::new(10, Duration::from_secs(300)));
        for _ in 0..10 {
            p.record(ms(9500));
        }
        let mut skipped = 0;
        // One tick a minute: after the samples are 5 minutes old the gate opens.
        while p.should_skip_cycle() {
            skipped += 1;
            tokio::time::advance(Duration::from_secs(60)).await;
            assert!(skipped < 10, "runner locked itself out");
        }
        assert_eq!(skipped, 6);
    }
}
