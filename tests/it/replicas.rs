//! Several runner processes on one Redis: one cycle per tick, stale-lock takeover, outage,
//! work sharing, key prefixes, shutdown cleanup.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::helpers::{Proc, config};
use crate::market_server::{Behaviour, MarketServer};
use crate::redis_server::RedisServer;

fn redis_extra(url: &str, prefix: &str, symbols: &str, more: &str) -> String {
    format!(
        "  symbols: [{symbols}]\n  coordination:\n    backend: redis\n    redis_url: {url}\n    key_prefix: \"{prefix}\"\n{more}"
    )
}

const FIVE: &str = "ETH/USD, BTC/USD, SOL/USD, DOGE/USD, LINK/USD";

/// Waits (up to 10 s) until `n` symbol locks exist.
async fn wait_for_locks(redis: &RedisServer, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while redis.keys("signal:lock:*").await.len() < n {
        assert!(tokio::time::Instant::now() < deadline, "locks never taken");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (cycle_id, symbol) → number of entries in the stream.
async fn counts(redis: &RedisServer, stream: &str) -> BTreeMap<(String, String), usize> {
    let mut m = BTreeMap::new();
    for (_, env) in redis.stream(stream).await {
        let p = &env["payload"];
        let key = (
            p["cycle_id"].as_str().unwrap().to_string(),
            p["symbol"].as_str().unwrap().to_string(),
        );
        *m.entry(key).or_insert(0) += 1;
    }
    m
}

#[tokio::test]
async fn three_replicas_run_every_tick_exactly_once() {
    let redis = RedisServer::start().await;
    let extra = redis_extra(&redis.url(), "", FIVE, "");
    let mut procs = vec![];
    for i in 0..3 {
        procs.push(
            Proc::spawn(
                "run",
                &config("* * * * * *", &extra),
                &[("INSTANCE_ID", &format!("replica-{i}"))],
            )
            .await,
        );
    }
    // 60 ticks.
    for p in &procs {
        p.wait_log(|l| l["message"] == "runner started", Duration::from_secs(5))
            .await;
    }
    tokio::time::sleep(Duration::from_secs(62)).await;
    for p in &procs {
        p.signal("TERM");
    }
    for p in &mut procs {
        assert_eq!(p.wait_exit(Duration::from_secs(30)).await, 0);
    }
    let c = counts(&redis, "stream:raw-signals").await;
    let dup: Vec<_> = c.iter().filter(|(_, n)| **n != 1).collect();
    assert!(dup.is_empty(), "appeared more than once: {dup:?}");
    // Every tick from the first to the last, each with all five symbols.
    let ticks: BTreeSet<String> = c.keys().map(|(t, _)| t.clone()).collect();
    let parsed: Vec<chrono::DateTime<chrono::Utc>> =
        ticks.iter().map(|t| t.parse().unwrap()).collect();
    assert!(parsed.len() >= 55, "only {} ticks", parsed.len());
    for w in parsed.windows(2) {
        assert_eq!(
            (w[1] - w[0]).num_seconds(),
            1,
            "tick missing between {} and {}",
            w[0],
            w[1]
        );
    }
    for t in &ticks {
        let n = c.keys().filter(|(tick, _)| tick == t).count();
        assert_eq!(n, 5, "tick {t} has {n} symbols");
    }
    // All three replicas ran some ticks (the lease spreads them by who wakes first).
    let mut runners = 0;
    for p in &procs {
        if !p
            .logs_matching(|l| l["message"] == "cycle finished")
            .is_empty()
        {
            runners += 1;
        }
    }
    assert_eq!(runners, 3, "only {runners} replica(s) ever ran a tick");
}

#[tokio::test]
async fn a_killed_runners_locks_are_taken_over_after_its_heartbeat_expires() {
    let redis = RedisServer::start().await;
    let slow = MarketServer::start().await;
    slow.set_default(Behaviour {
        delay: Duration::from_secs(60),
        status: None,
    });
    let fast = MarketServer::start().await;
    let more = |market: &str| {
        format!(
            "  heartbeat:\n    ttl_seconds: 3\n    interval_seconds: 1\n  locks:\n    ttl_seconds: 90\n    stale_threshold_seconds: 120\n  market_data:\n    source: coinbase\n    coinbase_url: {market}\n  timeouts:\n    symbol_timeout_seconds: 50\n    symbol_timeout_max_seconds: 50\n    total_timeout_seconds: 55\n"
        )
    };
    let mut a = Proc::spawn(
        "run",
        &config(
            "* * * * * *",
            &redis_extra(&redis.url(), "", FIVE, &more(&slow.url)),
        ),
        &[("INSTANCE_ID", "doomed")],
    )
    .await;
    a.wait_log(|l| l["message"] == "cycle started", Duration::from_secs(10))
        .await;
    // Wait until it holds every lock.
    wait_for_locks(&redis, 5).await;
    a.signal("KILL");
    let killed_at = chrono::Utc::now();
    let _ = a.wait_exit(Duration::from_secs(10)).await;
    let b = Proc::spawn(
        "run",
        &config(
            "* * * * * *",
            &redis_extra(&redis.url(), "", FIVE, &more(&fast.url)),
        ),
        &[("INSTANCE_ID", "heir")],
    )
    .await;
    let recovered = b
        .wait_log(
            |l| l["message"] == "recovered a stale lock" && l["reason"] == "heartbeat_missing",
            Duration::from_secs(20),
        )
        .await;
    let at: chrono::DateTime<chrono::Utc> =
        recovered["timestamp"].as_str().unwrap().parse().unwrap();
    let took = (at - killed_at).to_std().unwrap_or_default();
    // heartbeat.ttl_seconds + heartbeat.interval_seconds = 4 s, plus the tick it happens on.
    assert!(took <= Duration::from_secs(5), "takeover took {took:?}");
    // The same tick publishes every symbol.
    let finished = b
        .wait_log(
            |l| l["message"] == "cycle finished" && l["ok"] == 5,
            Duration::from_secs(10),
        )
        .await;
    let cycle = finished["cycle_id"].as_str().unwrap().to_string();
    let c = counts(&redis, "stream:dashboard-signals").await;
    for s in ["ETH/USD", "BTC/USD", "SOL/USD", "DOGE/USD", "LINK/USD"] {
        assert_eq!(
            c.get(&(cycle.clone(), s.to_string())),
            Some(&1),
            "{s} in {cycle}"
        );
    }
    let (_, m) = b.get_text("/metrics").await;
    assert!(
        crate::helpers::metric(
            &m,
            "autonomous_runner_stale_locks_recovered_total",
            &[("reason", "heartbeat_missing")]
        ) >= 5.0
    );
}

#[tokio::test]
async fn redis_outage_loses_nothing_and_cycles_resume() {
    let mut redis = RedisServer::start().await;
    let market = MarketServer::start().await;
    market.set_default(Behaviour {
        delay: Duration::from_millis(800),
        status: None,
    });
    let more = format!(
        "  circuit_breaker:\n    redis:\n      failure_threshold: 3\n      recovery_timeout_seconds: 2\n      half_open_max_calls: 2\n      success_threshold: 1\n  heartbeat:\n    ttl_seconds: 5\n    interval_seconds: 1\n  market_data:\n    source: coinbase\n    coinbase_url: {}\n",
        market.url
    );
    let mut p = Proc::spawn(
        "run",
        &config("*/2 * * * * *", &redis_extra(&redis.url(), "", FIVE, &more)),
        &[],
    )
    .await;
    p.poll("/health/ready", Duration::from_secs(10), |v| {
        v["status"] == "ready"
    })
    .await;
    p.wait_log(
        |l| l["message"] == "cycle finished",
        Duration::from_secs(10),
    )
    .await;
    // Stop Redis while a cycle is in flight: right after the next one starts.
    let seen = p.logs_matching(|l| l["message"] == "cycle started").len();
    p.wait_log_count(
        |l| l["message"] == "cycle started",
        seen + 1,
        Duration::from_secs(10),
    )
    .await;
    redis.stop();
    let down_at = tokio::time::Instant::now();
    let (code, body) = {
        let mut last = (0, serde_json::Value::Null);
        while tokio::time::Instant::now() < down_at + Duration::from_secs(8) {
            last = p.get("/health/ready").await;
            if last.0 == 503 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        last
    };
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["checks"]["coordination_connected"], false);
    tokio::time::sleep(
        (down_at + Duration::from_secs(10)).saturating_duration_since(tokio::time::Instant::now()),
    )
    .await;
    assert_eq!(p.get("/health/ready").await.0, 503);
    redis.restart().await;
    let back_at = chrono::Utc::now();
    p.poll("/health/ready", Duration::from_secs(20), |v| {
        v["status"] == "ready"
    })
    .await;
    // The first tick after the breaker closes runs a cycle again.
    p.wait_log(
        |l| {
            l["message"] == "cycle finished"
                && l["cycle_id"]
                    .as_str()
                    .and_then(|c| c.parse::<chrono::DateTime<chrono::Utc>>().ok())
                    .is_some_and(|c| c > back_at)
        },
        Duration::from_secs(20),
    )
    .await;
    p.signal("TERM");
    assert_eq!(p.wait_exit(Duration::from_secs(20)).await, 0);
    // Every symbol the runner completed is in the dashboard stream exactly once; nothing is
    // twice in any stream.
    let completed = completed_symbols(&p);
    assert!(completed.len() >= 5, "{completed:?}");
    let dash = counts(&redis, "stream:dashboard-signals").await;
    for key in &completed {
        assert_eq!(dash.get(key), Some(&1), "{key:?} missing or duplicated");
    }
    for stream in [
        "stream:raw-signals",
        "stream:scored-signals",
        "stream:validated-signals",
        "stream:dashboard-signals",
    ] {
        let c = counts(&redis, stream).await;
        assert!(c.values().all(|n| *n == 1), "{stream} has duplicates");
    }
    assert!(
        p.logs_matching(
            |l| l["message"] == "tick skipped" && l["reason"] == "coordination_unavailable"
        )
        .len()
            >= 2
    );
}

/// (cycle_id, symbol) of every symbol that completed, from the runner's own logs and cycles.
fn completed_symbols(p: &Proc) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for l in p.logs_matching(|l| l["message"] == "symbol completed") {
        out.insert((
            l["cycle_id"].as_str().unwrap().to_string(),
            l["symbol"].as_str().unwrap().to_string(),
        ));
    }
    out
}

#[tokio::test]
async fn work_sharing_spreads_symbols_and_keeps_each_once() {
    let redis = RedisServer::start().await;
    let symbols: Vec<String> = (0..30).map(|i| format!("S{i}/USD")).collect();
    let extra = redis_extra(
        &redis.url(),
        "",
        &symbols.join(", "),
        "    work_sharing: true\n",
    );
    let mut procs = vec![];
    for i in 0..3 {
        procs.push(
            Proc::spawn(
                "run",
                &config("* * * * * *", &extra),
                &[("INSTANCE_ID", &format!("share-{i}"))],
            )
            .await,
        );
    }
    tokio::time::sleep(Duration::from_secs(22)).await;
    for p in &procs {
        p.signal("TERM");
    }
    for p in &mut procs {
        assert_eq!(p.wait_exit(Duration::from_secs(30)).await, 0);
    }
    let c = counts(&redis, "stream:raw-signals").await;
    assert!(
        c.values().all(|n| *n == 1),
        "a (cycle, symbol) appeared twice"
    );
    let ticks: BTreeSet<String> = c.keys().map(|(t, _)| t.clone()).collect();
    // Ticks that every replica saw whole: all but possibly the first and last.
    let full: Vec<&String> = ticks
        .iter()
        .filter(|t| c.keys().filter(|(x, _)| x == *t).count() == 30)
        .collect();
    assert!(full.len() >= 18, "only {} complete ticks", full.len());
    let total: usize = c.len();
    for p in &procs {
        let mine: u64 = p
            .logs_matching(|l| l["message"] == "cycle finished")
            .iter()
            .map(|l| l["ok"].as_u64().unwrap())
            .sum();
        assert!(
            mine as f64 >= 0.2 * total as f64,
            "a replica did {mine} of {total}"
        );
    }
}

#[tokio::test]
async fn key_prefix_isolates_deployments() {
    let redis = RedisServer::start().await;
    let a = Proc::spawn(
        "run",
        &config(
            "* * * * * *",
            &redis_extra(&redis.url(), "blue:", "ETH/USD, BTC/USD", ""),
        ),
        &[("INSTANCE_ID", "same")],
    )
    .await;
    let b = Proc::spawn(
        "run",
        &config(
            "* * * * * *",
            &redis_extra(&redis.url(), "green:", "ETH/USD, BTC/USD", ""),
        ),
        &[("INSTANCE_ID", "same")],
    )
    .await;
    a.wait_log(
        |l| l["message"] == "cycle finished",
        Duration::from_secs(10),
    )
    .await;
    b.wait_log(
        |l| l["message"] == "cycle finished",
        Duration::from_secs(10),
    )
    .await;
    // Both ran the same ticks: each deployment has its own lease.
    let ca = counts(&redis, "blue:stream:raw-signals").await;
    let cb = counts(&redis, "green:stream:raw-signals").await;
    assert!(!ca.is_empty() && !cb.is_empty());
    assert!(
        ca.keys().any(|k| cb.contains_key(k)),
        "the same tick ran in both deployments"
    );
    let unprefixed: Vec<String> = redis
        .keys("*")
        .await
        .into_iter()
        .filter(|k| !k.starts_with("blue:") && !k.starts_with("green:"))
        .collect();
    assert!(unprefixed.is_empty(), "{unprefixed:?}");
}

#[tokio::test]
async fn graceful_shutdown_releases_locks_and_deletes_the_heartbeat() {
    let redis = RedisServer::start().await;
    let market = MarketServer::start().await;
    market.set_default(Behaviour {
        delay: Duration::from_secs(30),
        status: None,
    });
    let more = format!(
        "  market_data:\n    source: coinbase\n    coinbase_url: {}\n  timeouts:\n    symbol_timeout_seconds: 50\n    symbol_timeout_max_seconds: 50\n    total_timeout_seconds: 55\n  graceful_shutdown:\n    timeout_seconds: 1\n",
        market.url
    );
    let mut p = Proc::spawn(
        "run",
        &config("* * * * * *", &redis_extra(&redis.url(), "", FIVE, &more)),
        &[("INSTANCE_ID", "leaver")],
    )
    .await;
    wait_for_locks(&redis, 5).await;
    assert_eq!(
        redis.keys("runner:heartbeat:*").await,
        vec!["runner:heartbeat:leaver"]
    );
    p.signal("TERM");
    assert_eq!(p.wait_exit(Duration::from_secs(20)).await, 0);
    assert!(redis.keys("signal:lock:*").await.is_empty());
    assert!(redis.keys("runner:heartbeat:*").await.is_empty());
}
