//! The contract every coordination backend passes. Each backend's tests call [`run_all`]
//! with a factory of two fresh instances ("a" and "b") sharing one store. Public (but hidden)
//! so the integration tests can run it against a real Redis; it panics on a violation.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chrono::TimeZone;

use super::{Coordination, KillSwitch, LockOutcome, LockTiming, StaleReason};
use crate::schedule::CycleId;

/// Short timings so real-clock backends finish quickly.
pub fn timing() -> LockTiming {
    LockTiming {
        ttl: Duration::from_secs(4),
        stale_after: Duration::from_secs(6),
        heartbeat_ttl: Duration::from_secs(2),
    }
}

fn cycle(n: i64) -> CycleId {
    CycleId::new(
        chrono::Utc
            .timestamp_opt(1_800_000_000 + n * 60, 0)
            .single()
            .unwrap_or_default(),
    )
}

/// Runs every contract case, each on a fresh pair.
pub async fn run_all<C, F, Fut>(make: F)
where
    C: Coordination + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = (C, C)>,
{
    lock_exclusion_under_contention(make().await).await;
    release_by_non_owner_is_a_no_op(make().await).await;
    takeover_only_when_stale(make().await).await;
    a_live_owners_old_lock_is_never_taken(make().await).await;
    extend_only_own_lock(make().await).await;
    lease_once_per_cycle(make().await).await;
    claims_once_per_symbol(make().await).await;
    kill_switch_round_trip(make().await).await;
    heartbeat_lifecycle(make().await).await;
}

async fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("coordination call failed: {e}"),
    }
}

/// Two instances contend for 20 symbols from many tasks: at any moment each symbol has at most
/// one holder (checked with a per-symbol occupancy counter that must never exceed 1).
pub async fn lock_exclusion_under_contention<C: Coordination + 'static>((a, b): (C, C)) {
    ok(a.heartbeat().await).await;
    ok(b.heartbeat().await).await;
    let a = Arc::new(a);
    let b = Arc::new(b);
    let symbols: Vec<String> = crate::config::DEFAULT_SYMBOLS
        .iter()
        .map(|s| s.to_string())
        .collect();
    // Both stay alive throughout, as running processes do (heartbeats live 2 s here, and
    // the contention can take longer on a loaded machine): a takeover would be a bug.
    let beating = tokio_util::sync::CancellationToken::new();
    let beat = {
        let (a, b, stop) = (a.clone(), b.clone(), beating.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let _ = a.heartbeat().await;
                let _ = b.heartbeat().await;
            }
        })
    };
    let occupancy: Arc<Vec<AtomicU32>> =
        Arc::new((0..symbols.len()).map(|_| AtomicU32::new(0)).collect());
    let violations = Arc::new(AtomicU32::new(0));
    let acquired = Arc::new(AtomicU32::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for round in 0..5 {
        for (i, s) in symbols.iter().enumerate() {
            for inst in [a.clone(), b.clone()] {
                let (s, occ, viol, acq) = (
                    s.clone(),
                    occupancy.clone(),
                    violations.clone(),
                    acquired.clone(),
                );
                tasks.spawn(async move {
                    let _ = round;
                    if ok(inst.acquire_lock(&s).await).await != LockOutcome::Held {
                        acq.fetch_add(1, Ordering::SeqCst);
                        if occ[i].fetch_add(1, Ordering::SeqCst) != 0 {
                            viol.fetch_add(1, Ordering::SeqCst);
                        }
                        tokio::task::yield_now().await;
                        occ[i].fetch_sub(1, Ordering::SeqCst);
                        assert!(ok(inst.release_lock(&s).await).await, "own lock releases");
                    }
                });
            }
        }
    }
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            panic!("contender panicked: {e}");
        }
    }
    beating.cancel();
    let _ = beat.await;
    assert_eq!(
        violations.load(Ordering::SeqCst),
        0,
        "a symbol had two holders at once"
    );
    assert!(
        acquired.load(Ordering::SeqCst) >= 20,
        "every symbol was acquired at least once"
    );
    assert!(ok(a.held_locks().await).await.is_empty());
    assert!(ok(b.held_locks().await).await.is_empty());
}

/// Releasing someone else's lock changes nothing.
pub async fn release_by_non_owner_is_a_no_op<C: Coordination>((a, b): (C, C)) {
    ok(a.heartbeat().await).await;
    ok(b.heartbeat().await).await;
    assert_eq!(
        ok(a.acquire_lock("ETH/USD").await).await,
        LockOutcome::Acquired
    );
    assert!(!ok(b.release_lock("ETH/USD").await).await);
    assert_eq!(ok(b.acquire_lock("ETH/USD").await).await, LockOutcome::Held);
    assert_eq!(ok(a.held_locks().await).await, vec!["ETH/USD".to_string()]);
    assert!(ok(a.release_lock("ETH/USD").await).await);
    assert_eq!(
        ok(b.acquire_lock("ETH/USD").await).await,
        LockOutcome::Acquired
    );
}

/// A live owner's fresh lock is never taken; a dead owner's (heartbeat gone) is.
pub async fn takeover_only_when_stale<C: Coordination>((a, b): (C, C)) {
    ok(a.heartbeat().await).await;
    ok(b.heartbeat().await).await;
    assert_eq!(
        ok(a.acquire_lock("SOL/USD").await).await,
        LockOutcome::Acquired
    );
    // Owner alive: held.
    assert_eq!(ok(b.acquire_lock("SOL/USD").await).await, LockOutcome::Held);
    // Owner dies (heartbeat expires), lock younger than both TTL and stale threshold.
    // tokio::time::sleep: real time for Redis, auto-advanced on a paused clock.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    ok(b.heartbeat().await).await;
    assert_eq!(
        ok(b.acquire_lock("SOL/USD").await).await,
        LockOutcome::Recovered(StaleReason::HeartbeatMissing)
    );
    assert_eq!(ok(b.held_locks().await).await, vec!["SOL/USD".to_string()]);
    // The old owner lost it: it cannot extend or release it.
    assert!(!ok(a.extend_lock("SOL/USD").await).await);
    assert!(!ok(a.release_lock("SOL/USD").await).await);
    assert!(ok(b.release_lock("SOL/USD").await).await);
}

/// However old, a lock whose owner keeps its heartbeat (and its lock) alive is never taken
/// over: a takeover would run the symbol twice (issue 10).
pub async fn a_live_owners_old_lock_is_never_taken<C: Coordination>((a, b): (C, C)) {
    ok(a.heartbeat().await).await;
    ok(b.heartbeat().await).await;
    assert_eq!(
        ok(a.acquire_lock("AVAX/USD").await).await,
        LockOutcome::Acquired
    );
    // Past the stale threshold (6 s), the owner beating and extending all along.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        ok(a.heartbeat().await).await;
        ok(b.heartbeat().await).await;
        assert!(ok(a.extend_lock("AVAX/USD").await).await);
    }
    assert_eq!(
        ok(b.acquire_lock("AVAX/USD").await).await,
        LockOutcome::Held
    );
    assert!(ok(a.release_lock("AVAX/USD").await).await);
}

/// Only the owner extends.
pub async fn extend_only_own_lock<C: Coordination>((a, b): (C, C)) {
    ok(a.heartbeat().await).await;
    assert_eq!(
        ok(a.acquire_lock("BTC/USD").await).await,
        LockOutcome::Acquired
    );
    assert!(ok(a.extend_lock("BTC/USD").await).await);
    assert!(!ok(b.extend_lock("BTC/USD").await).await);
    assert!(!ok(b.extend_lock("NOPE/USD").await).await);
    assert!(ok(a.release_lock("BTC/USD").await).await);
}

/// One lease per cycle across instances.
pub async fn lease_once_per_cycle<C: Coordination>((a, b): (C, C)) {
    let ttl = Duration::from_secs(90);
    assert!(ok(a.try_cycle_lease(&cycle(1), ttl).await).await);
    assert!(!ok(b.try_cycle_lease(&cycle(1), ttl).await).await);
    assert!(!ok(a.try_cycle_lease(&cycle(1), ttl).await).await);
    assert!(ok(b.try_cycle_lease(&cycle(2), ttl).await).await);
}

/// One claim per (cycle, symbol).
pub async fn claims_once_per_symbol<C: Coordination>((a, b): (C, C)) {
    let ttl = Duration::from_secs(90);
    assert!(ok(a.claim_symbol(&cycle(1), "ETH/USD", ttl).await).await);
    assert!(!ok(b.claim_symbol(&cycle(1), "ETH/USD", ttl).await).await);
    assert!(ok(b.claim_symbol(&cycle(1), "BTC/USD", ttl).await).await);
    assert!(ok(b.claim_symbol(&cycle(2), "ETH/USD", ttl).await).await);
}

/// Kill switch set by one is seen by the other; clearing removes it.
pub async fn kill_switch_round_trip<C: Coordination>((a, b): (C, C)) {
    assert_eq!(ok(b.kill_switch().await).await, None);
    let ks = KillSwitch {
        active: true,
        reason: "maintenance".into(),
        activated_by: "ops".into(),
        activated_at: chrono::Utc.timestamp_opt(1_800_000_000, 0).single(),
    };
    ok(a.set_kill_switch(&ks).await).await;
    assert_eq!(ok(b.kill_switch().await).await, Some(ks.clone()));
    ok(b.set_kill_switch(&KillSwitch {
        active: false,
        ..ks
    })
    .await)
    .await;
    assert_eq!(ok(a.kill_switch().await).await, None);
}

/// Heartbeats count live instances and disappear on removal.
pub async fn heartbeat_lifecycle<C: Coordination>((a, b): (C, C)) {
    ok(a.heartbeat().await).await;
    ok(b.heartbeat().await).await;
    assert_eq!(ok(a.live_instances().await).await, 2);
    ok(b.remove_heartbeat().await).await;
    assert_eq!(ok(a.live_instances().await).await, 1);
    ok(a.ping().await).await;
}
