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
