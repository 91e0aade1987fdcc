//! SIGTERM: in-flight work finishes within the grace period, or is cancelled after it.

use std::time::Duration;

use crate::helpers::{Proc, config};
use crate::market_server::{Behaviour, MarketServer};

fn extra(market: &str, grace: f64) -> String {
    format!(
        "  symbols: [ETH/USD, BTC/USD, SOL/USD, DOGE/USD]\n  market_data:\n    source: coinbase\n    coinbase_url: {market}\n  timeouts:\n    symbol_timeout_seconds: 20\n    symbol_timeout_max_seconds: 20\n    total_timeout_seconds: 30\n  graceful_shutdown:\n    timeout_seconds: {grace}\n"
    )
}

#[tokio::test]
async fn sigterm_lets_in_flight_symbols_finish_and_exits_0() {
    let market = MarketServer::start().await;
    market.set_default(Behaviour {
        delay: Duration::from_secs(2),
        status: None,
    });
    let mut p = Proc::spawn(
        "run",
        &config("*/2 * * * * *", &extra(&market.url, 30.0)),
        &[],
    )
    .await;
    let started = p
        .wait_log(|l| l["message"] == "cycle started", Duration::from_secs(10))
        .await;
    let cycle = started["cycle_id"].as_str().unwrap().to_string();
    p.signal("TERM");
    assert_eq!(p.wait_exit(Duration::from_secs(20)).await, 0);
    let finished =
        p.logs_matching(|l| l["message"] == "cycle finished" && l["cycle_id"] == cycle.as_str());
    assert_eq!(finished.len(), 1, "the in-flight cycle finished");
    assert_eq!(
        finished[0]["ok"], 4,
        "all in-flight symbols completed and were published"
    );
    assert!(
        p.logs_matching(|l| l["message"] == "cancelled by shutdown")
            .is_empty()
    );
    assert!(
        !p.logs_matching(|l| l["message"] == "graceful shutdown complete")
            .is_empty()
    );
    // Every background task stopped with the service.
    assert!(
        p.logs_matching(|l| l["message"] == "background task did not stop within 1 s of shutdown")
            .is_empty()
    );
    // No tick after the signal started a cycle.
    let starts = p.logs_matching(|l| l["message"] == "cycle started");
    assert_eq!(starts.len(), 1, "{starts:?}");
}

#[tokio::test]
async fn grace_exhausted_cancels_in_flight_symbols_and_logs_them() {
    let market = MarketServer::start().await;
    // The work would take a minute; the grace period is 1 s.
    market.set_default(Behaviour {
        delay: Duration::from_secs(60),
        status: None,
    });
    let mut p = Proc::spawn(
        "run",
        &config("*/2 * * * * *", &extra(&market.url, 1.0)),
        &[],
    )
    .await;
    p.wait_log(|l| l["message"] == "cycle started", Duration::from_secs(10))
        .await;
    p.signal("TERM");
    // Exiting at all before the minute of work is over proves it was cut off at the grace
    // period (an event to wait for, not a duration to assert).
    assert_eq!(p.wait_exit(Duration::from_secs(30)).await, 0);
    assert!(
        !p.logs_matching(
            |l| l["message"] == "shutdown grace period exhausted, cancelling in-flight symbols"
        )
        .is_empty()
    );
    let mut cancelled: Vec<String> = p
        .logs_matching(|l| l["message"] == "cancelled by shutdown")
        .iter()
        .map(|l| l["symbol"].as_str().unwrap().to_string())
        .collect();
    cancelled.sort();
    assert_eq!(cancelled, vec!["BTC/USD", "DOGE/USD", "ETH/USD", "SOL/USD"]);
    assert!(
        !p.logs_matching(|l| l["message"] == "graceful shutdown complete")
            .is_empty()
    );
}

/// Redis dies under a cycle; the cycle's messages wait in the outbox; SIGTERM. The process
/// exits within grace + 5 s (its own measure), writing what it could not deliver to the spool
/// beside its history; the next start, with Redis back, delivers each of those messages once.
#[tokio::test]
async fn redis_down_at_sigterm_spools_the_outbox_and_the_next_start_delivers_it() {
    let market = MarketServer::start().await;
    // Symbols take 2 s, so Redis can die while they run.
    market.set_default(Behaviour {
        delay: Duration::from_secs(2),
        status: None,
    });
    let mut redis = crate::redis_server::RedisServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let history = data.path().join("history.sqlite");
    let spool = data.path().join("outbox-spool.jsonl");
    let grace = 3.0;
    let yaml = config(
        "*/5 * * * * *",
        &format!(
            "{}  coordination:\n    backend: redis\n    redis_url: {}\n",
            extra(&market.url, grace).replace(
                "[ETH/USD, BTC/USD, SOL/USD, DOGE/USD]",
                "[ETH/USD, BTC/USD]"
            ),
            redis.url()
        ),
    );
    let history_env = history.to_str().unwrap();
    let mut p = Proc::spawn(
        "run",
        &yaml,
        &[("HISTORY_PATH", history_env), ("INSTANCE_ID", "first")],
    )
    .await;
    p.wait_log(|l| l["message"] == "cycle started", Duration::from_secs(15))
        .await;
    redis
        .wait_keys("signal:lock:*", 2, Duration::from_secs(10))
        .await;
    redis.stop();
    // The symbols finish and publish into the outbox, which cannot deliver.
    p.wait_log(
        |l| l["message"] == "cycle finished" && l["ok"] == 2,
        Duration::from_secs(20),
    )
    .await;
    p.signal("TERM");
    assert_eq!(p.wait_exit(Duration::from_secs(30)).await, 0);
    let done = p
        .wait_log(
            |l| l["message"] == "graceful shutdown complete",
            Duration::from_secs(1),
        )
        .await;
    let took = done["took_s"].as_f64().unwrap();
    assert!(took <= grace + 5.0, "shutdown took {took} s");
    let text = std::fs::read_to_string(&spool).expect("the outbox was spooled");
    let spooled: Vec<String> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["message_id"].as_str().unwrap().to_string()
        })
        .collect();
    // Signal, score and report of both symbols at least (advise is conditional).
    assert!(spooled.len() >= 6, "{} spooled", spooled.len());

    // Redis back (empty: it keeps nothing on disk); the next start delivers the spool.
    redis.restart().await;
    let second = Proc::spawn(
        "run",
        &yaml,
        &[("HISTORY_PATH", history_env), ("INSTANCE_ID", "second")],
    )
    .await;
    let stages = [
        "stream:raw-signals",
        "stream:scored-signals",
        "stream:validated-signals",
        "stream:dashboard-signals",
    ];
    let delivered = |all: &[(String, serde_json::Value)], id: &str| {
        all.iter().filter(|(_, v)| v["message_id"] == id).count()
    };
    let all = crate::helpers::eventually(
        "every spooled message in the streams",
        Duration::from_secs(20),
        || async {
            let mut all = vec![];
            for s in stages {
                all.extend(redis.stream(s).await);
            }
            let seen = spooled.iter().filter(|id| delivered(&all, id) >= 1).count();
            if seen == spooled.len() {
                Ok(all)
            } else {
                Err(format!("{seen} of {} delivered", spooled.len()))
            }
        },
    )
    .await;
    for id in &spooled {
        assert_eq!(delivered(&all, id), 1, "{id} delivered more than once");
    }
    assert_eq!(
        std::fs::read_to_string(&spool).unwrap(),
        "",
        "the spool (the outbox's journal) is empty once everything is delivered"
    );
    drop(second);
}

/// SIGHUP, SIGUSR1 and SIGUSR2 are logged and ignored (their default action would kill the
/// process with no graceful shutdown); SIGQUIT shuts down gracefully, as SIGTERM does.
#[tokio::test]
async fn stray_signals_are_ignored_and_sigquit_stops_gracefully() {
    let mut p = Proc::spawn(
        "run",
        &config("*/2 * * * * *", "  symbols: [ETH/USD]\n"),
        &[],
    )
    .await;
    p.wait_log(
        |l| l["message"] == "cycle finished",
        Duration::from_secs(15),
    )
    .await;
    for sig in ["HUP", "USR1", "USR2"] {
        p.signal(sig);
        let name = format!("SIG{sig}");
        let seen = p
            .wait_log(|l| l["signal"] == name.as_str(), Duration::from_secs(10))
            .await;
        assert_eq!(seen["level"], "WARN", "{seen}");
        let (status, _) = p.get("/health/live").await;
        assert_eq!(status, 200, "still serving after SIG{sig}");
    }
    // The scheduler keeps ticking after them.
    let before = p.logs_matching(|l| l["message"] == "cycle finished").len();
    p.wait_log_count(
        |l| l["message"] == "cycle finished",
        before + 1,
        Duration::from_secs(10),
    )
    .await;
    p.signal("QUIT");
    assert_eq!(
        p.wait_exit(Duration::from_secs(20)).await,
        0,
        "a graceful exit"
    );
    assert!(
        !p.logs_matching(|l| l["message"] == "graceful shutdown complete")
            .is_empty(),
        "the graceful path ran"
    );
}
