//! Several runner processes on one Redis: one cycle per tick, stale-lock takeover, outage,
//! work sharing, key prefixes, shutdown cleanup.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::app::{AppOptions, TestApp, anchored_now, spawn_app, spawn_app_with, unique_prefix};
use crate::helpers::{Proc, config, eventually};
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
    redis
        .wait_keys("signal:lock:*", n, Duration::from_secs(10))
        .await;
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

/// Starts `n` in-process replicas of `yaml` on one clock and one key prefix.
async fn replicas(yaml: &str, prefix: &str, name: &str, n: usize) -> Vec<TestApp> {
    let clock = anchored_now();
    let mut apps = vec![];
    for i in 0..n {
        apps.push(
            spawn_app_with(
                yaml,
                AppOptions {
                    instance_id: Some(format!("{name}-{i}")),
                    key_prefix: Some(prefix.to_string()),
                    clock: clock.clone(),
                    ..AppOptions::default()
                },
            )
            .await,
        );
    }
    apps
}

/// Waits until `stream` holds `ticks` distinct ticks whose every symbol (of `symbols`) is in.
async fn wait_full_ticks(redis: &RedisServer, stream: &str, symbols: usize, ticks: usize) {
    eventually(
        format!("{ticks} complete ticks in {stream}"),
        Duration::from_secs(120),
        || async {
            let c = counts(redis, stream).await;
            match full_ticks(&c, symbols).len() {
                full if full >= ticks => Ok(()),
                full => Err(format!("{full} complete")),
            }
        },
    )
    .await
}

fn full_ticks(c: &BTreeMap<(String, String), usize>, symbols: usize) -> Vec<String> {
    let ticks: BTreeSet<&String> = c.keys().map(|(t, _)| t).collect();
    ticks
        .into_iter()
        .filter(|t| c.keys().filter(|(x, _)| x == *t).count() == symbols)
        .cloned()
        .collect()
}

/// Symbols a replica completed, by its own `/api/cycles`.
async fn completed_by(app: &TestApp) -> u64 {
    app.run_cycles()
        .await
        .iter()
        .map(|c| c["symbols_ok"].as_u64().unwrap_or(0))
        .sum()
}

#[tokio::test]
async fn three_replicas_run_every_tick_exactly_once() {
    let redis = RedisServer::start().await;
    let prefix = unique_prefix("three");
    let yaml = config("* * * * * *", &redis_extra(&redis.url(), "", FIVE, ""));
    let apps = replicas(&yaml, &prefix, "replica", 3).await;
    let stream = format!("{prefix}stream:raw-signals");
    // Twenty complete ticks, waited for in Redis itself.
    wait_full_ticks(&redis, &stream, 5, 20).await;
    let mut done = vec![];
    for a in &apps {
        done.push(completed_by(a).await);
    }
    for a in apps {
        a.stop().await.expect("clean stop");
    }
    let c = counts(&redis, &stream).await;
    let dup: Vec<_> = c.iter().filter(|(_, n)| **n != 1).collect();
    assert!(dup.is_empty(), "appeared more than once: {dup:?}");
    // Every tick from the first to the last, each with all five symbols (the last may have
    // been cut by the stop: it counts only if whole).
    let ticks: BTreeSet<String> = c.keys().map(|(t, _)| t.clone()).collect();
    let parsed: Vec<chrono::DateTime<chrono::Utc>> =
        ticks.iter().map(|t| t.parse().unwrap()).collect();
    assert!(parsed.len() >= 20, "only {} ticks", parsed.len());
    for w in parsed.windows(2) {
        assert_eq!(
            (w[1] - w[0]).num_seconds(),
            1,
            "tick missing between {} and {}",
            w[0],
            w[1]
        );
    }
    let full = full_ticks(&c, 5);
    let last = ticks.iter().next_back().cloned();
    for t in &ticks {
        assert!(
            full.contains(t) || Some(t) == last.as_ref(),
            "tick {t} is not whole"
        );
    }
    // All three replicas ran some ticks (the lease spreads them by who wakes first).
    assert!(
        done.iter().all(|n| *n > 0),
        "symbols completed per replica: {done:?}"
    );
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
    // The dead replica's heartbeat expires (an event in Redis, not a duration).
    eventually(
        "the dead replica's heartbeat to expire",
        Duration::from_secs(20),
        || async {
            match redis.keys("runner:heartbeat:doomed").await {
                k if k.is_empty() => Ok(()),
                k => Err(format!("{k:?} still there")),
            }
        },
    )
    .await;
    let expired_at = chrono::Utc::now();
    let recovered = b
        .wait_log(
            |l| l["message"] == "recovered a stale lock" && l["reason"] == "heartbeat_missing",
            Duration::from_secs(20),
        )
        .await;
    let at: chrono::DateTime<chrono::Utc> =
        recovered["timestamp"].as_str().unwrap().parse().unwrap();
    // Taken over by the heir's first cycle that started once the heartbeat was gone: that
    // cycle had not finished before the recovery.
    let ts = |l: &serde_json::Value| -> chrono::DateTime<chrono::Utc> {
        l["timestamp"].as_str().unwrap().parse().unwrap()
    };
    let first = b
        .wait_log(
            |l| l["message"] == "cycle started" && ts(l) >= expired_at,
            Duration::from_secs(10),
        )
        .await;
    let first_finished = b
        .wait_log(
            |l| l["message"] == "cycle finished" && l["cycle_id"] == first["cycle_id"],
            Duration::from_secs(10),
        )
        .await;
    assert!(
        at <= ts(&first_finished),
        "the heir's cycle {} ran without taking the locks over",
        first["cycle_id"]
    );
    // The same tick publishes every symbol.
    let finished = b
        .wait_log(
            |l| l["message"] == "cycle finished" && l["ok"] == 5,
            Duration::from_secs(10),
        )
        .await;
    let cycle = finished["cycle_id"].as_str().unwrap().to_string();
    // The outbox delivers after the cycle's log line (batched, off the cycle's path): wait
    // for the stream rather than read it once (a read-once saw four of five).
    eventually(
        "every symbol of the heir's whole tick in the stream, once",
        Duration::from_secs(10),
        || async {
            let c = counts(&redis, "stream:dashboard-signals").await;
            let per: Vec<(&str, Option<usize>)> =
                ["ETH/USD", "BTC/USD", "SOL/USD", "DOGE/USD", "LINK/USD"]
                    .into_iter()
                    .map(|s| (s, c.get(&(cycle.clone(), s.to_string())).copied()))
                    .collect();
            if per.iter().all(|(_, n)| *n == Some(1)) {
                Ok(())
            } else {
                Err(format!("{cycle}: {per:?}"))
            }
        },
    )
    .await;
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
    let p = spawn_app(config(
        "*/2 * * * * *",
        &redis_extra(&redis.url(), "", FIVE, &more),
    ))
    .await;
    p.poll("/health/ready", Duration::from_secs(10), |v| {
        v["status"] == "ready"
    })
    .await;
    let before = p.wait_cycles(1, Duration::from_secs(10)).await.len();
    // Stop Redis while a cycle is in flight: once the next one is running.
    p.poll("/health/detailed", Duration::from_secs(10), |d| {
        d["cycle_running"] == true && d["last_cycle"].as_str() > Some("")
    })
    .await;
    assert!(p.run_cycles().await.len() >= before);
    redis.stop();
    let down = p
        .poll("/health/ready", Duration::from_secs(8), |v| {
            v["checks"]["coordination_connected"] == false
        })
        .await;
    assert_eq!(p.get("/health/ready").await.0, 503, "{down}");
    // Down for two ticks skipped for it at least (waited for in /api/cycles).
    let skipped_for_redis = |v: &serde_json::Value| {
        v["cycles"].as_array().map_or(0, |a| {
            a.iter()
                .filter(|c| c["skipped_reason"] == "coordination_unavailable")
                .count()
        })
    };
    p.poll("/api/cycles", Duration::from_secs(20), |v| {
        skipped_for_redis(v) >= 2
    })
    .await;
    assert_eq!(p.get("/health/ready").await.0, 503);
    redis.restart().await;
    let back_at = chrono::Utc::now();
    p.poll("/health/ready", Duration::from_secs(20), |v| {
        v["status"] == "ready"
    })
    .await;
    // The first tick after the breaker closes runs a cycle again.
    p.poll("/api/cycles", Duration::from_secs(20), |v| {
        v["cycles"].as_array().is_some_and(|a| {
            a.iter().any(|c| {
                c["skipped_reason"].is_null()
                    && c["cycle_id"]
                        .as_str()
                        .and_then(|c| c.parse::<chrono::DateTime<chrono::Utc>>().ok())
                        .is_some_and(|c| c > back_at)
            })
        })
    })
    .await;
    // What the runner published, by its own history (every completed symbol's report).
    p.poll("/health/detailed", Duration::from_secs(10), |d| {
        d["history"]["queued"] == 0
    })
    .await;
    let (_, reports) = p.get("/api/signals/history?stage=report&limit=1000").await;
    p.stop().await.expect("clean stop");
    let completed: BTreeSet<(String, String)> = reports["signals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["cycle_id"].as_str().unwrap().to_string(),
                r["symbol"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(completed.len() >= 5, "{completed:?}");
    // Every symbol the runner completed is in the dashboard stream exactly once; nothing is
    // twice in any stream.
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
}

/// Three replicas, Redis stopped while one of them is mid-cycle: that replica's lock
/// releases fail. When Redis is back it releases them at once (it knows which locks it still
/// has there), instead of leaving the other replicas to skip those symbols as "locked by a
/// live owner" until the 90 s TTL runs out: the first tick after the outage is whole on
/// whichever replica wins it.
#[tokio::test]
async fn locks_orphaned_by_an_outage_mid_cycle_are_released_when_redis_returns() {
    let mut redis = RedisServer::start().await;
    let market = MarketServer::start().await;
    // Long enough that every symbol is still in flight when Redis goes.
    market.set_default(Behaviour {
        delay: Duration::from_millis(2500),
        status: None,
    });
    let more = format!(
        "  circuit_breaker:\n    redis:\n      failure_threshold: 3\n      recovery_timeout_seconds: 2\n      half_open_max_calls: 2\n      success_threshold: 1\n  market_data:\n    source: coinbase\n    coinbase_url: {}\n",
        market.url
    );
    let prefix = unique_prefix("orphans");
    let yaml = config("*/6 * * * * *", &redis_extra(&redis.url(), "", FIVE, &more));
    let clock = anchored_now();
    let mut apps = vec![];
    for i in 0..3 {
        let options = AppOptions {
            instance_id: Some(format!("orphans-{i}")),
            key_prefix: Some(prefix.clone()),
            clock: clock.clone(),
            ..AppOptions::default()
        };
        apps.push(spawn_app_with(&yaml, options).await);
    }
    redis
        .wait_keys(
            &format!("{prefix}signal:lock:*"),
            5,
            Duration::from_secs(15),
        )
        .await;
    redis.stop();
    // Down until half a second after the next boundary: that tick is skipped for Redis, and
    // the one after it, 5.5 s after Redis is back, is the first that can run.
    let period = chrono::Duration::seconds(6);
    let now = clock.now();
    let next = chrono::DateTime::from_timestamp((now.timestamp() / 6 + 1) * 6, 0).unwrap();
    let back = next + chrono::Duration::milliseconds(500);
    tokio::time::sleep((back - now).to_std().unwrap()).await;
    redis.restart().await;
    // The leftovers are gone well before that tick (they would stand for the TTL, 90 s).
    redis
        .wait_no_keys(&format!("{prefix}signal:lock:*"), Duration::from_secs(4))
        .await;
    let first = (next + period).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let ran = crate::helpers::eventually(
        format!("tick {first} to run on some replica"),
        Duration::from_secs(30),
        || async {
            for a in &apps {
                if let Some(c) = a
                    .run_cycles()
                    .await
                    .into_iter()
                    .find(|c| c["cycle_id"] == first)
                {
                    return Ok(c);
                }
            }
            Err("not yet".to_string())
        },
    )
    .await;
    assert_eq!(
        ran["symbols_ok"], 5,
        "the first tick after the outage: {ran}"
    );
    assert_eq!(ran["symbols_skipped"], 0, "{ran}");
    let stream = format!("{prefix}stream:raw-signals");
    let c = counts(&redis, &stream).await;
    let of_first = c.keys().filter(|(t, _)| *t == first).count();
    assert_eq!(of_first, 5, "raw signals of {first}: {c:?}");
    for a in apps {
        a.stop().await.expect("clean stop");
    }
}

#[tokio::test]
async fn work_sharing_spreads_symbols_and_keeps_each_once() {
    let redis = RedisServer::start().await;
    // Each symbol's work takes a while (its candles come after 200 ms), and each replica's
    // pool (20) could hold every symbol at once: what spreads the work is the replicas'
    // claims, each in its own order and spread over the tick (a quarter of the 2 s period
    // here), so a symbol goes to the replica that has it first. Claimed all at once, a
    // replica that started a moment earlier took nearly every symbol.
    let market = MarketServer::start().await;
    market.set_default(Behaviour {
        delay: Duration::from_millis(200),
        status: None,
    });
    let prefix = unique_prefix("share");
    let symbols: Vec<String> = (0..30).map(|i| format!("S{i}/USD")).collect();
    let more = format!(
        "    work_sharing: true\n  market_data:\n    source: coinbase\n    coinbase_url: {}\n",
        market.url
    );
    let yaml = config(
        "*/2 * * * * *",
        &redis_extra(&redis.url(), "", &symbols.join(", "), &more),
    );
    let apps = replicas(&yaml, &prefix, "share", 3).await;
    let stream = format!("{prefix}stream:raw-signals");
    wait_full_ticks(&redis, &stream, 30, 12).await;
    // Each replica's count is read before any of them stops, so all three report the same
    // ticks (give or take the one in flight).
    let mut done = vec![];
    for a in &apps {
        done.push(completed_by(a).await);
    }
    for a in apps {
        a.stop().await.expect("clean stop");
    }
    let c = counts(&redis, &stream).await;
    assert!(
        c.values().all(|n| *n == 1),
        "a (cycle, symbol) appeared twice"
    );
    assert!(full_ticks(&c, 30).len() >= 12);
    // Each replica did a fair part of everything reported (the replicas' orders give these
    // 30 symbols 13, 9 and 8 to the three).
    let total: u64 = done.iter().sum();
    eprintln!("work split: {done:?} of {total}");
    for mine in &done {
        assert!(
            *mine as f64 >= 0.2 * total as f64,
            "a replica did {mine} of {total} ({done:?})"
        );
    }
}

#[tokio::test]
async fn key_prefix_isolates_deployments() {
    let redis = RedisServer::start().await;
    let yaml = config(
        "* * * * * *",
        &redis_extra(&redis.url(), "", "ETH/USD, BTC/USD", ""),
    );
    // Two deployments with the same instance id, told apart only by their prefixes.
    let clock = anchored_now();
    let spawn = |prefix: &'static str| {
        spawn_app_with(
            &yaml,
            AppOptions {
                instance_id: Some("same".into()),
                key_prefix: Some(prefix.into()),
                clock: clock.clone(),
                ..AppOptions::default()
            },
        )
    };
    let a = spawn("blue:").await;
    let b = spawn("green:").await;
    a.wait_cycles(1, Duration::from_secs(10)).await;
    b.wait_cycles(1, Duration::from_secs(10)).await;
    a.stop().await.expect("clean stop");
    b.stop().await.expect("clean stop");
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
    let prefix = unique_prefix("leaver");
    let app = spawn_app_with(
        &config("* * * * * *", &redis_extra(&redis.url(), "", FIVE, &more)),
        AppOptions {
            instance_id: Some("leaver".into()),
            key_prefix: Some(prefix.clone()),
            ..AppOptions::default()
        },
    )
    .await;
    let locks = format!("{prefix}signal:lock:*");
    redis.wait_keys(&locks, 5, Duration::from_secs(10)).await;
    assert_eq!(
        redis.keys(&format!("{prefix}runner:heartbeat:*")).await,
        vec![format!("{prefix}runner:heartbeat:leaver")]
    );
    // Stopped mid-cycle (every symbol waits 30 s for candles; the grace is 1 s).
    app.stop().await.expect("clean stop");
    assert!(redis.keys("*signal:lock:*").await.is_empty());
    assert!(redis.keys("runner:heartbeat:*").await.is_empty());
}
