//! The agent-call rate limit across replicas: GCRA state in one Redis key (on Redis's own
//! clock, so replicas with skewed clocks agree), behind the Redis breaker, with a local
//! fallback of `limit ÷ live replicas` while Redis is away.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use redis::aio::ConnectionManager;

use super::CoordError;
use super::redis::guarded;
use crate::resilience::Breaker;

/// GCRA in one key, on Redis's clock. KEYS[1] the key; ARGV: emission interval (ms),
/// tolerance (ms), pause (ms, 0 for a normal request), and the time in ms (-1: Redis's own,
/// as the service asks; a test on a virtual clock passes its own). Returns -1 when admitted,
/// otherwise the milliseconds to wait.
const GCRA: &str = r"
local now = tonumber(ARGV[4])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local pause = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if pause > 0 then
  local held = now + pause + tolerance
  if held > tat then
    redis.call('SET', KEYS[1], held, 'PX', held - now + 1000)
  end
  return 0
end
if tat - now > tolerance then
  return tat - tolerance - now
end
local nxt = tat + interval
redis.call('SET', KEYS[1], nxt, 'PX', nxt - now + 1000)
return -1";

/// The agent-call rate limit shared by every replica: GCRA state in one Redis key, so all
/// replicas together stay under `requests_per_minute`. When Redis cannot be reached it falls
/// back to a local limiter allowed `limit ÷ live replicas` (from the heartbeats last seen) —
/// never to unlimited.
pub struct RedisRateLimiter {
    conn: ConnectionManager,
    breaker: Breaker,
    key: String,
    instances_key: String,
    per_minute: u32,
    burst: u32,
    interval: Duration,
    /// (live replicas the fallback was sized for, the fallback).
    fallback: Mutex<(usize, crate::resilience::RateLimiter)>,
    live: std::sync::atomic::AtomicUsize,
    degraded: std::sync::atomic::AtomicBool,
    heartbeat_ttl: Duration,
}

impl std::fmt::Debug for RedisRateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRateLimiter")
            .field("key", &self.key)
            .field("per_minute", &self.per_minute)
            .finish_non_exhaustive()
    }
}

impl RedisRateLimiter {
    /// A limiter of `per_minute` (bursts of `burst`) under `prefix`.
    pub fn new(
        conn: ConnectionManager,
        breaker: Breaker,
        prefix: &str,
        per_minute: u32,
        burst: u32,
        heartbeat_ttl: Duration,
    ) -> Self {
        let per_minute = per_minute.max(1);
        let burst = burst.clamp(1, per_minute);
        Self {
            conn,
            breaker,
            key: format!("{prefix}runner:ratelimit:agents"),
            instances_key: format!("{prefix}runner:instances"),
            per_minute,
            burst,
            interval: crate::resilience::rate_limit::emission_interval(per_minute, burst),
            fallback: Mutex::new((1, crate::resilience::RateLimiter::new(per_minute, burst))),
            live: std::sync::atomic::AtomicUsize::new(1),
            degraded: std::sync::atomic::AtomicBool::new(false),
            heartbeat_ttl,
        }
    }

    async fn gcra(&self, pause: Duration) -> Result<i64, CoordError> {
        gcra(
            self.conn.clone(),
            &self.breaker,
            &self.key,
            (self.interval, self.burst),
            pause,
            -1,
        )
        .await
    }

    /// One admission decision at `now_ms` on the caller's clock instead of Redis's: `Ok(())`
    /// admitted (the slot is taken), `Err(wait)` not before `wait` from then. The service
    /// never calls this (its replicas share Redis's clock); it lets a test run the shared
    /// limiter on a virtual clock and check every window.
    pub async fn admit_at(&self, now_ms: i64) -> Result<Result<(), Duration>, CoordError> {
        let r = gcra(
            self.conn.clone(),
            &self.breaker,
            &self.key,
            (self.interval, self.burst),
            Duration::ZERO,
            now_ms.max(0),
        )
        .await?;
        Ok(if r == -1 {
            Ok(())
        } else {
            Err(Duration::from_millis(r.max(1) as u64))
        })
    }

    /// Refreshes the live-replica count the fallback is sized by.
    async fn refresh_live(&self) {
        let now = Utc::now().timestamp_millis() as f64 / 1000.0;
        let since = now - self.heartbeat_ttl.as_secs_f64();
        let mut conn = self.conn.clone();
        if let Ok(n) = redis::cmd("ZCOUNT")
            .arg(&self.instances_key)
            .arg(since)
            .arg("+inf")
            .query_async::<usize>(&mut conn)
            .await
        {
            self.live
                .store(n.max(1), std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn local_share(&self) -> crate::resilience::RateLimiter {
        let live = self.live.load(std::sync::atomic::Ordering::Relaxed).max(1);
        let mut fb = self.fallback.lock().unwrap_or_else(|p| p.into_inner());
        if fb.0 != live {
            let share = (self.per_minute / live as u32).max(1);
            *fb = (
                live,
                crate::resilience::RateLimiter::new(share, self.burst.min(share)),
            );
        }
        fb.1.clone()
    }
}

#[async_trait]
impl crate::resilience::rate_limit::AgentRateLimiter for RedisRateLimiter {
    async fn acquire_before(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<Duration, crate::resilience::rate_limit::NoSlotBeforeDeadline> {
        let start = tokio::time::Instant::now();
        loop {
            match self.gcra(Duration::ZERO).await {
                Ok(-1) => {
                    if self
                        .degraded
                        .swap(false, std::sync::atomic::Ordering::Relaxed)
                    {
                        tracing::info!("Redis reachable again: shared rate limit restored");
                    }
                    // Keep the fallback's sizing current while Redis answers (cheap, rare).
                    if now_and_then() {
                        self.refresh_live().await;
                    }
                    return Ok(tokio::time::Instant::now().duration_since(start));
                }
                Ok(wait_ms) => {
                    let at =
                        tokio::time::Instant::now() + Duration::from_millis(wait_ms.max(1) as u64);
                    if at > deadline {
                        return Err(crate::resilience::rate_limit::NoSlotBeforeDeadline);
                    }
                    tokio::time::sleep_until(at).await;
                }
                Err(_) => {
                    let local = self.local_share();
                    if !self
                        .degraded
                        .swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        tracing::warn!(
                            live_replicas = self.live.load(std::sync::atomic::Ordering::Relaxed),
                            "Redis unreachable: rate limiting locally with this replica's share"
                        );
                    }
                    return local
                        .acquire_before(deadline)
                        .await
                        .map(|_| tokio::time::Instant::now().duration_since(start));
                }
            }
        }
    }

    fn pause(&self, for_: Duration) {
        self.local_share().pause(for_);
        let (conn, breaker, key, interval, burst) = (
            self.conn.clone(),
            self.breaker.clone(),
            self.key.clone(),
            self.interval,
            self.burst,
        );
        // Tell every replica: push the shared schedule past the pause.
        tokio::spawn(async move {
            let pause = for_.max(Duration::from_millis(1));
            if let Err(e) = gcra(conn, &breaker, &key, (interval, burst), pause, -1).await {
                tracing::warn!(error = %e, "could not share a provider's pause through Redis");
            }
        });
    }
}

/// One GCRA request (or, with `pause` > 0, a pause) on the shared key, with the limit's
/// (emission interval, burst), at `now_ms` (-1: Redis's clock).
async fn gcra(
    conn: ConnectionManager,
    breaker: &Breaker,
    key: &str,
    (interval, burst): (Duration, u32),
    pause: Duration,
    now_ms: i64,
) -> Result<i64, CoordError> {
    let tolerance = interval * burst.saturating_sub(1);
    let script = redis::Script::new(GCRA);
    let mut inv = script.key(key);
    inv.arg(interval.as_millis() as u64)
        .arg(tolerance.as_millis() as u64)
        .arg(pause.as_millis() as u64)
        .arg(now_ms);
    match guarded(breaker, "rate limiter", || {
        let mut conn = conn.clone();
        let inv = &inv;
        async move { inv.invoke_async::<i64>(&mut conn).await }
    })
    .await
    {
        // GCRA keeps its theoretical arrival time as a string.
        Err(e) => Err(super::redis::wrong_type(&conn, e, key, "string").await),
        ok => ok,
    }
}

/// True about once in 32 calls: how often the limiter refreshes its replica count.
fn now_and_then() -> bool {
    use rand::Rng;
    rand::rng().random_range(0..32) == 0
}
