//! The coordination contract against a real Redis, and the Redis-only behaviours.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use autonomous_runner::coordination::contract;
use autonomous_runner::coordination::redis::{RedisCoordination, connect};
use autonomous_runner::coordination::{Coordination, LockOutcome};
use autonomous_runner::resilience::{Breaker, BreakerMode, BreakerSettings};

use crate::redis_server::RedisServer;

fn breaker() -> Breaker {
    Breaker::new(
        autonomous_runner::resilience::BreakerKind::Redis,
        BreakerSettings {
            failure_threshold: 3,
            recovery_timeout: Duration::from_secs(1),
            half_open_max_calls: 2,
            success_threshold: 1,
            mode: BreakerMode::Normal,
        },
    )
}

fn instance(url: &str, prefix: &str, id: &str) -> RedisCoordination {
    RedisCoordination::new(
        connect(url).expect("connect"),
        breaker(),
        prefix,
        id,
        contract::timing(),
    )
}

#[tokio::test]
async fn the_contract_holds_on_redis() {
    let redis = RedisServer::start().await;
    let n = AtomicU32::new(0);
    let url = redis.url();
    contract::run_all(|| {
        // Each case gets its own key prefix: cases never see each other's keys.
        let prefix = format!("case{}:", n.fetch_add(1, Ordering::SeqCst));
        let url = url.clone();
        async move { (instance(&url, &prefix, "a"), instance(&url, &prefix, "b")) }
    })
    .await;
}

#[tokio::test]
async fn lock_records_follow_the_seed_shape_and_malformed_ones_are_left_alone() {
    let redis = RedisServer::start().await;
    let a = instance(&redis.url(), "", "runner-a");
    a.heartbeat().await.unwrap();
    assert_eq!(
        a.acquire_lock("ETH/USD").await.unwrap(),
        LockOutcome::Acquired
    );
    let mut c = redis.conn().await;
    let raw: String = redis::cmd("GET")
        .arg("signal:lock:ETH/USD")
        .query_async(&mut c)
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(v["instance_id"], "runner-a");
    assert!(v["acquired_at"].as_f64().unwrap() > 1.7e9);
    assert_eq!(v["pid"].as_u64(), Some(std::process::id() as u64));
    let ttl: i64 = redis::cmd("TTL")
        .arg("signal:lock:ETH/USD")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!((1..=4).contains(&ttl), "EX ttl_seconds: {ttl}");
    // Someone else's unreadable record: never taken over on a guess.
    let _: () = redis::cmd("SET")
        .arg("signal:lock:BTC/USD")
        .arg("garbage")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(a.acquire_lock("BTC/USD").await.unwrap(), LockOutcome::Held);
    let heartbeat: Option<String> = redis::cmd("GET")
        .arg("runner:heartbeat:runner-a")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(heartbeat.is_some());
}

/// `locks.redis_key_prefix` names the lock keys (under the key prefix); every lock operation
/// uses it, and replicas configured alike exclude each other through it.
#[tokio::test]
async fn the_lock_key_prefix_names_the_lock_keys() {
    let redis = RedisServer::start().await;
    let a = instance(&redis.url(), "dep:", "a").with_lock_prefix("locks/");
    let b = instance(&redis.url(), "dep:", "b").with_lock_prefix("locks/");
    a.heartbeat().await.unwrap();
    b.heartbeat().await.unwrap();
    assert_eq!(
        a.acquire_lock("ETH/USD").await.unwrap(),
        LockOutcome::Acquired
    );
    assert_eq!(redis.keys("dep:locks/*").await, vec!["dep:locks/ETH/USD"]);
    assert!(redis.keys("dep:signal:lock:*").await.is_empty());
    assert_eq!(b.acquire_lock("ETH/USD").await.unwrap(), LockOutcome::Held);
    a.release_lock("ETH/USD").await.unwrap();
    assert!(redis.keys("dep:locks/*").await.is_empty());
    assert_eq!(
        b.acquire_lock("ETH/USD").await.unwrap(),
        LockOutcome::Acquired
    );
}

#[tokio::test]
async fn calls_fail_fast_while_redis_is_down_and_recover() {
    let mut redis = RedisServer::start().await;
    let a = instance(&redis.url(), "", "a");
    a.ping().await.unwrap();
    redis.stop();
    let mut errors = 0;
    for _ in 0..5 {
        if a.ping().await.is_err() {
            errors += 1;
        }
    }
    assert_eq!(errors, 5);
    assert!(a.breaker().is_open(), "three failures open the breaker");
    redis.restart().await;
    // Within the recovery timeout the breaker still rejects; after it, one probe closes it.
    crate::helpers::eventually(
        "a ping through the breaker",
        Duration::from_secs(15),
        || async { a.ping().await.map_err(|e| e.to_string()) },
    )
    .await;
    assert!(!a.breaker().is_open());
}

/// Redis down: the shared rate limiter falls back to a local limiter (the limit shared by the
/// live replicas it last saw), never to unlimited and never to nothing.
#[tokio::test]
async fn the_shared_rate_limiter_falls_back_to_a_local_share_while_redis_is_down() {
    use autonomous_runner::coordination::redis::RedisRateLimiter;
    use autonomous_runner::resilience::rate_limit::AgentRateLimiter;
    let mut redis = RedisServer::start().await;
    let breaker = Breaker::new(
        autonomous_runner::resilience::BreakerKind::Redis,
        BreakerSettings {
            failure_threshold: 1,
            recovery_timeout: Duration::from_secs(60),
            half_open_max_calls: 1,
            success_threshold: 1,
            mode: BreakerMode::Normal,
        },
    );
    // 600 a minute, bursts of 1: one call every ~0.1 s.
    let limiter = RedisRateLimiter::new(
        connect(&redis.url()).unwrap(),
        breaker.clone(),
        "",
        600,
        1,
        Duration::from_secs(30),
    );
    redis.stop();
    let start = tokio::time::Instant::now();
    let window = Duration::from_secs(2);
    let mut admitted = 0;
    while tokio::time::Instant::now() < start + window {
        if limiter.acquire_before(start + window).await.is_ok() {
            admitted += 1;
        } else {
            break;
        }
    }
    assert!(breaker.is_open(), "Redis failures opened the breaker");
    // 2 s at one call per ~0.1 s (plus the first at once): about 20, never unlimited, never 0.
    assert!(
        (10..=25).contains(&admitted),
        "{admitted} calls admitted in 2 s"
    );
}

/// Two replicas sharing one Redis limiter, on a virtual clock the test advances (each
/// decision made by the real script on a real `redis-server`, at the time the test gives
/// it): under demand far above the limit — each replica asking again as soon as it is told
/// it may — no 60 s window ever holds more than `requests_per_minute` admissions, for the
/// default split of the burst (half) and the extremes, and a tick's burst is admitted at once.
#[tokio::test]
async fn two_replicas_sharing_redis_never_admit_more_than_the_limit_in_any_window() {
    use autonomous_runner::coordination::redis::RedisRateLimiter;
    let redis = RedisServer::start().await;
    for (limit, burst) in [(100u32, 50u32), (100, 1), (100, 100), (30, 15)] {
        let prefix = format!("rl{limit}-{burst}:");
        let replica = || {
            let breaker = Breaker::new(
                autonomous_runner::resilience::BreakerKind::Redis,
                BreakerSettings {
                    failure_threshold: 3,
                    recovery_timeout: Duration::from_secs(30),
                    half_open_max_calls: 1,
                    success_threshold: 1,
                    mode: BreakerMode::Normal,
                },
            );
            RedisRateLimiter::new(
                connect(&redis.url()).unwrap(),
                breaker,
                &prefix,
                limit,
                burst,
                Duration::from_secs(30),
            )
        };
        let replicas = [replica(), replica()];
        // Virtual time in ms from 10^12 (any origin will do); 10 minutes of demand. Each
        // replica has 60 callers; a caller refused is told when to come back, and comes back
        // exactly then (the hungriest client there can be).
        const MINUTES: i64 = 10;
        let origin: i64 = 1_000_000_000_000;
        let end = origin + MINUTES * 60_000;
        let mut next: Vec<(i64, usize)> = (0..120).map(|c| (origin, c)).collect();
        let mut admitted: Vec<i64> = vec![];
        let mut at_start = 0;
        while let Some(i) = (0..next.len()).min_by_key(|&i| next[i]) {
            let (now, caller) = next[i];
            if now >= end {
                break;
            }
            let r = &replicas[caller % 2];
            match r.admit_at(now).await.unwrap() {
                Ok(()) => {
                    admitted.push(now);
                    if now == origin {
                        at_start += 1;
                    }
                    // Each caller asks again a second after its call was admitted.
                    next[i].0 = now + 1_000;
                }
                Err(wait) => next[i].0 = now + wait.as_millis() as i64,
            }
        }
        admitted.sort_unstable();
        // Every 60 s window [t, t + 60 s) that starts at an admission holds the most any window can.
        let mut worst = 0;
        let mut j = 0;
        for (i, t) in admitted.iter().enumerate() {
            while j < admitted.len() && admitted[j] < t + 60_000 {
                j += 1;
            }
            worst = worst.max(j - i);
        }
        assert!(
            worst <= limit as usize,
            "limit {limit}, burst {burst}: {worst} admissions in one 60 s window"
        );
        // The limiter is not merely stingy: the burst goes at once, and the sustained rate is
        // what the split allows (limit − burst + 1 a minute, 61 s to the minute).
        assert_eq!(at_start, burst as usize, "limit {limit}, burst {burst}");
        let sustained = (admitted.len() - burst as usize) as f64 / MINUTES as f64;
        let expected = f64::from(limit - burst + 1) * 60.0 / 61.0;
        assert!(
            (sustained - expected).abs() <= expected * 0.05 + 1.0,
            "limit {limit}, burst {burst}: {sustained:.1} a minute sustained, expected {expected:.1}"
        );
        eprintln!(
            "limit {limit}, burst {burst}: {} admitted in {MINUTES} min, at most {worst} in any 60 s window, {at_start} at once",
            admitted.len()
        );
    }
}
