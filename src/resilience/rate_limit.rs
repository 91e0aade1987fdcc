//! The process-wide rate limiter for agent calls.
//!
//! GCRA from `governor`, but driven by tokio's clock (a small [`Clock`](governor::clock::Clock)
//! adapter) and waited on with `tokio::time::sleep`, so tests on a paused clock see exact
//! behaviour. A 429's `Retry-After` pauses every caller until that instant: a provider that
//! says "wait" is obeyed by the whole process, not only by the call that got the answer.

use std::num::NonZeroU32;
use std::ops::Add;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::Quota;
use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use tokio::time::Instant;

/// tokio's `Instant` as a governor time reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TokioInstant(Instant);

impl Add<Nanos> for TokioInstant {
    type Output = Self;
    fn add(self, other: Nanos) -> Self {
        TokioInstant(self.0 + Duration::from(other))
    }
}

impl Reference for TokioInstant {
    fn duration_since(&self, earlier: Self) -> Nanos {
        Nanos::from(self.0.saturating_duration_since(earlier.0))
    }
    fn saturating_sub(&self, duration: Nanos) -> Self {
        TokioInstant(
            self.0
                .checked_sub(Duration::from(duration))
                .unwrap_or(self.0),
        )
    }
}

/// tokio's clock for governor.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    type Instant = TokioInstant;
    fn now(&self) -> TokioInstant {
        TokioInstant(Instant::now())
    }
}

type Gcra =
    governor::RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<TokioInstant>>;

/// The GCRA emission interval that keeps every 60-second window at or under `per_minute`
/// calls while allowing bursts of `burst`.
///
/// GCRA with interval T and burst b admits at most `60 s / T + b − 1` calls in any 60 s
/// window. With T = 61 s / (per_minute − b + 1) that is `per_minute`: a burst is paid for with
/// a slightly lower sustained rate, never with a window over the limit providers enforce. The
/// extra second is slack for the network and clock jitter between our admission and the
/// provider's count (without it, the first and the last call of a window can land 59.99 s
/// apart at the provider).
pub fn emission_interval(per_minute: u32, burst: u32) -> Duration {
    let per_minute = per_minute.max(1);
    let burst = burst.clamp(1, per_minute);
    Duration::from_secs(61) / (per_minute - burst + 1)
}

/// What agent backends need from a rate limiter: wait for a slot (not past a deadline), and
/// pause everyone when the provider says so. Implemented in-process ([`RateLimiter`]) and
/// across replicas (the Redis limiter in `coordination::redis`).
#[async_trait::async_trait]
pub trait AgentRateLimiter: Send + Sync {
    /// Waits for a slot; gives up without taking one if it would come after `deadline`.
    /// Returns how long it waited.
    async fn acquire_before(&self, deadline: Instant) -> Result<Duration, NoSlotBeforeDeadline>;
    /// Pauses every caller for `for_` (a 429's `Retry-After`).
    fn pause(&self, for_: Duration);
}

#[async_trait::async_trait]
impl AgentRateLimiter for RateLimiter {
    async fn acquire_before(&self, deadline: Instant) -> Result<Duration, NoSlotBeforeDeadline> {
        RateLimiter::acquire_before(self, deadline).await
    }
    fn pause(&self, for_: Duration) {
        RateLimiter::pause(self, for_)
    }
}

/// A shared limiter: `per_minute` calls a minute with at most `burst` at once.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    gcra: Arc<Gcra>,
    paused_until: Arc<Mutex<Option<Instant>>>,
    per_minute: u32,
    burst: u32,
}

/// Why [`RateLimiter::acquire_before`] gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limit: no slot before the deadline")]
pub struct NoSlotBeforeDeadline;

impl RateLimiter {
    /// `per_minute` ≥ 1 calls per minute, bursts of at most `burst` (≥ 1, ≤ `per_minute`).
    ///
    /// No sliding 60-second window ever holds more than `per_minute` calls: see
    /// [`emission_interval`].
    pub fn new(per_minute: u32, burst: u32) -> Self {
        let per_minute = per_minute.max(1);
        let burst = burst.clamp(1, per_minute);
        let period = emission_interval(per_minute, burst);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_minute(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        Self {
            gcra: Arc::new(governor::RateLimiter::direct_with_clock(quota, TokioClock)),
            paused_until: Arc::new(Mutex::new(None)),
            per_minute,
            burst,
        }
    }

    /// Configured calls per minute.
    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    /// Configured burst.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Pauses every caller for `for_` (a 429's `Retry-After`). A later pause never shortens
    /// an earlier, longer one.
    pub fn pause(&self, for_: Duration) {
        let until = Instant::now() + for_;
        let mut p = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        if p.is_none_or(|cur| cur < until) {
            *p = Some(until);
        }
    }

    /// The instant until which callers are paused, if in the future.
    pub fn paused_until(&self) -> Option<Instant> {
        let p = *self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        p.filter(|t| *t > Instant::now())
    }

    /// Waits for a slot, giving up (without taking one) if it would come after `deadline`.
    /// Returns how long it waited.
    pub async fn acquire_before(
        &self,
        deadline: Instant,
    ) -> Result<Duration, NoSlotBeforeDeadline> {
        let start = Instant::now();
        loop {
            if let Some(until) = self.paused_until() {
                if until > deadline {
                    return Err(NoSlotBeforeDeadline);
                }
                tokio::time::sleep_until(until).await;
                continue;
            }
            match self.gcra.check() {
                Ok(()) => return Ok(Instant::now().duration_since(start)),
                Err(not_until) => {
                    let wait = not_until.wait_time_from(TokioClock.now());
                    let at = Instant::now() + wait;
                    if at > deadline {
                        return Err(NoSlotBeforeDeadline);
                    }
                    tokio::time::sleep_until(at).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_limit_in_any_60s_window() {
        let limiter = RateLimiter::new(30, 1);
        let far = Instant::now() + Duration::from_secs(3600);
        let times = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = tokio::task::JoinSet::new();
        // Demand far above the limit: 200 callers at once.
        for _ in 0..200 {
            let (l, t) = (limiter.clone(), times.clone());
            tasks.spawn(async move {
                if l.acquire_before(far).await.is_ok() {
                    t.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Instant::now());
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        let mut times = times.lock().unwrap_or_else(|e| e.into_inner()).clone();
        times.sort();
        assert_eq!(times.len(), 200);
        for (i, t) in times.iter().enumerate() {
            let in_window = times[i..]
                .iter()
                .take_while(|u| u.duration_since(*t) < Duration::from_secs(60))
                .count();
            assert!(in_window <= 30, "{in_window} calls within 60 s");
        }
        // And it is not slower than needed: 200 calls at 61/30 s spacing (plus at most the
        // timer's 1 ms resolution per wait).
        let span = times[199].duration_since(times[0]);
        let ideal = Duration::from_secs(61) / 30 * 199;
        assert!(
            span >= ideal && span <= ideal + Duration::from_millis(199),
            "{span:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn bursts_never_push_a_window_over_the_limit() {
        let limiter = RateLimiter::new(30, 5);
        let far = Instant::now() + Duration::from_secs(3600);
        let mut times = vec![];
        for _ in 0..100 {
            limiter.acquire_before(far).await.expect("slot");
            times.push(Instant::now());
        }
        // The first five went at once.
        assert_eq!(times[4], times[0]);
        for (i, t) in times.iter().enumerate() {
            let n = times[i..]
                .iter()
                .take_while(|u| u.duration_since(*t) < Duration::from_secs(60))
                .count();
            assert!(n <= 30, "{n} calls within 60 s");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn burst_is_bounded() {
        let limiter = RateLimiter::new(100, 5);
        let now = Instant::now();
        let mut ok = 0;
        for _ in 0..20 {
            if limiter.acquire_before(now).await.is_ok() {
                ok += 1;
            }
        }
        assert_eq!(ok, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn pause_holds_every_caller_until_retry_after() {
        let limiter = RateLimiter::new(600, 10);
        let start = Instant::now();
        limiter.pause(Duration::from_secs(2));
        limiter.pause(Duration::from_secs(1)); // never shortens
        let waited = limiter
            .acquire_before(start + Duration::from_secs(10))
            .await
            .expect("slot");
        assert_eq!(waited, Duration::from_secs(2));
        // A deadline before the pause ends gives up at once without sleeping.
        limiter.pause(Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(
            limiter.acquire_before(t0 + Duration::from_secs(1)).await,
            Err(NoSlotBeforeDeadline)
        );
        assert_eq!(Instant::now(), t0);
    }
}
