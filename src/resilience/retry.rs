//! Retry with exponential backoff and full jitter, bounded by attempts *and* by a deadline:
//! a retry that could not finish before the symbol's deadline is not started.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// Backoff schedule: `base · 2^(attempt−1)`, capped at `max`, with optional full jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Delay before the first retry (before jitter).
    pub base: Duration,
    /// Largest delay.
    pub max: Duration,
    /// Full jitter (uniform in `[delay/2, delay]`), off in tests for exact timings.
    pub jitter: bool,
}

impl Backoff {
    /// Delay before retry number `retry` (1-based).
    pub fn delay(&self, retry: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(2u32.saturating_pow(retry.saturating_sub(1)));
        let d = exp.min(self.max);
        if self.jitter && !d.is_zero() {
            // Half fixed, half random: spreads retries of many symbols apart while keeping a
            // floor so a retry never comes back instantly.
            let half = d / 2;
            half + rand::rng().random_range(Duration::ZERO..=half)
        } else {
            d
        }
    }
}

/// Runs `op` up to `max_attempts` times. `delay(error, retry_number)` says how long to wait
/// before retrying after `error`, or `None` when it is not worth another try. A retry whose
/// wait would end after `deadline` is not made (the last error is returned instead), so
/// retries never outlive the caller's deadline.
pub async fn retry_until<T, E, F, Fut>(
    max_attempts: u32,
    deadline: Instant,
    delay: impl Fn(&E, u32) -> Option<Duration>,
    mut op: F,
) -> Result<T, E>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 1;
    loop {
        match op(attempt).await {
            Ok(v) => return Ok(v),
            Err(e) => {
                if attempt >= max_attempts.max(1) {
                    return Err(e);
                }
                let Some(wait) = delay(&e, attempt) else {
                    return Err(e);
                };
                if Instant::now() + wait >= deadline {
                    return Err(e);
                }
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff() -> Backoff {
        Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(5),
            jitter: false,
        }
    }

    #[test]
    fn exponential_and_capped() {
        let b = backoff();
        let d: Vec<u64> = (1..=5).map(|i| b.delay(i).as_secs()).collect();
        assert_eq!(d, vec![1, 2, 4, 5, 5]);
        let j = Backoff { jitter: true, ..b };
        for i in 1..=5 {
            let d = j.delay(i);
            assert!(d >= b.delay(i) / 2 && d <= b.delay(i), "{d:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_success() {
        let start = Instant::now();
        let r: Result<u32, &str> = retry_until(
            5,
            start + Duration::from_secs(60),
            |_, n| Some(backoff().delay(n)),
            |attempt| async move {
                if attempt < 3 {
                    Err("boom")
                } else {
                    Ok(attempt)
                }
            },
        )
        .await;
        assert_eq!(r, Ok(3));
        assert_eq!(Instant::now().duration_since(start), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn never_sleeps_past_the_deadline() {
        let start = Instant::now();
        let calls = std::sync::atomic::AtomicU32::new(0);
        let r: Result<(), &str> = retry_until(
            10,
            start + Duration::from_millis(3500),
            |_, n| Some(backoff().delay(n)),
            |_| {
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { Err("boom") }
            },
        )
        .await;
        assert_eq!(r, Err("boom"));
        // Attempts at 0 s, 1 s, 3 s; the next would wait 4 s and end at 7 s > 3.5 s.
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert_eq!(Instant::now().duration_since(start), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn non_retryable_errors_return_at_once() {
        let start = Instant::now();
        let r: Result<(), &str> = retry_until(
            5,
            start + Duration::from_secs(60),
            |e, n| (*e != "fatal").then(|| backoff().delay(n)),
            |_| async { Err("fatal") },
        )
        .await;
        assert_eq!(r, Err("fatal"));
        assert_eq!(Instant::now(), start);
    }
}
