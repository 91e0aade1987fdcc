//! Tick alignment and the overlap policy, on the real binary.

use std::time::Duration;

use chrono::{DateTime, Timelike, Utc};
use serde_json::Value;

use crate::app::spawn_app;
use crate::helpers::{config, metric};
use crate::market_server::{Behaviour, MarketServer};

fn run_cycles(cycles: &Value) -> Vec<Value> {
    cycles["cycles"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["skipped_reason"].is_null())
        .cloned()
        .collect()
}

#[tokio::test]
async fn five_second_schedule_aligns_ticks_and_skips_overlaps() {
    // Every candles request takes 7 s, so every cycle outlasts the 5 s period.
    let market = MarketServer::start().await;
    market.set_default(Behaviour {
        delay: Duration::from_secs(7),
        status: None,
    });
    let extra = format!(
        "  symbols: [ETH/USD, BTC/USD, SOL/USD]\n  market_data:\n    source: coinbase\n    coinbase_url: {}\n  timeouts:\n    symbol_timeout_seconds: 10\n    symbol_timeout_max_seconds: 10\n    total_timeout_seconds: 20\n",
        market.url
    );
    let p = spawn_app(&config("*/5 * * * * *", &extra)).await;
    let cycles = p
        .poll("/api/cycles", Duration::from_secs(60), |v| {
            let all = v["cycles"].as_array().map(|a| a.len()).unwrap_or(0);
            let overlaps = v["cycles"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|c| c["skipped_reason"] == "overlap")
                        .count()
                })
                .unwrap_or(0);
            run_cycles(v).len() >= 2 && overlaps >= 1 && all >= 4
        })
        .await;

    let all = cycles["cycles"].as_array().unwrap();
    for c in all {
        let id: DateTime<Utc> = c["cycle_id"].as_str().unwrap().parse().unwrap();
        assert_eq!(id.second() % 5, 0, "cycle id {id} not on a 5 s boundary");
        assert_eq!(id.nanosecond(), 0);
        let started: DateTime<Utc> = c["started_at"].as_str().unwrap().parse().unwrap();
        assert!(
            started >= id,
            "tick {id} handled before its boundary ({started})"
        );
    }
    // Run cycles never overlap: each ends before the next begins.
    let mut runs = run_cycles(&cycles);
    runs.sort_by_key(|c| c["cycle_id"].as_str().unwrap().to_string());
    for w in runs.windows(2) {
        let start: DateTime<Utc> = w[0]["started_at"].as_str().unwrap().parse().unwrap();
        let end = start
            + chrono::Duration::milliseconds(
                (w[0]["duration_seconds"].as_f64().unwrap() * 1000.0) as i64,
            );
        let next: DateTime<Utc> = w[1]["started_at"].as_str().unwrap().parse().unwrap();
        assert!(
            end <= next,
            "cycle {} ran until {end}, next started {next}",
            w[0]["cycle_id"]
        );
        assert!(
            w[0]["duration_seconds"].as_f64().unwrap() > 5.0,
            "the cycle really outlasted the period"
        );
    }
    // The skipped ticks are counted (the counter is process-wide: at least this test's).
    let (_, metrics) = p.get_text("/metrics").await;
    let overlap_skips = metric(
        &metrics,
        "autonomous_runner_cycles_skipped_total",
        &[("reason", "overlap")],
    );
    let listed = all
        .iter()
        .filter(|c| c["skipped_reason"] == "overlap")
        .count() as f64;
    assert!(
        overlap_skips >= listed && listed >= 1.0,
        "metric {overlap_skips}, listed {listed}"
    );
}
