//! A slow symbol and a failing symbol never hold the others back.
//!
//! In process: its symbols are its own, so the process-wide metric series it reads are too.

use std::time::Duration;

use crate::app::spawn_app;
use crate::helpers::{config, metric, of_symbol};
use crate::market_server::{Behaviour, MarketServer};

#[tokio::test]
async fn slow_and_failing_symbols_never_block_the_others() {
    let market = MarketServer::start().await;
    market.set(
        "FSLOW-USD",
        Behaviour {
            delay: Duration::from_secs(30),
            status: None,
        },
    );
    market.set(
        "FFAIL-USD",
        Behaviour {
            delay: Duration::ZERO,
            status: Some(503),
        },
    );
    let extra = format!(
        "  symbols: [FA/USD, FB/USD, FSLOW/USD, FFAIL/USD, FC/USD]\n  market_data:\n    source: coinbase\n    coinbase_url: {}\n    request_timeout_seconds: 0.5\n  timeouts:\n    symbol_timeout_seconds: 0.5\n    symbol_timeout_max_seconds: 0.5\n    total_timeout_seconds: 0.9\n",
        market.url
    );
    let p = spawn_app(&config("* * * * * *", &extra)).await;
    let cycles = p
        .poll("/api/cycles", Duration::from_secs(30), |v| {
            v["cycles"]
                .as_array()
                .is_some_and(|a| a.iter().filter(|c| c["skipped_reason"].is_null()).count() >= 3)
        })
        .await;
    let runs: Vec<_> = cycles["cycles"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["skipped_reason"].is_null())
        .collect();
    for c in &runs {
        assert_eq!(
            c["symbols_ok"], 3,
            "every healthy symbol published in cycle {}",
            c["cycle_id"]
        );
        assert_eq!(c["symbols_failed"], 2);
        let mut failures: Vec<(String, String)> = c["failures"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["symbol"].as_str().unwrap().to_string(),
                    f["reason"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        failures.sort();
        assert_eq!(
            failures,
            vec![
                ("FFAIL/USD".to_string(), "market_data_5xx".to_string()),
                ("FSLOW/USD".to_string(), "market_data_timeout".to_string())
            ]
        );
    }
    // The healthy symbols' dashboard messages are from the newest completed cycle.
    let newest = runs
        .iter()
        .map(|c| c["cycle_id"].as_str().unwrap())
        .max()
        .unwrap()
        .to_string();
    let (_, latest) = p.get("/api/signals/latest").await;
    for s in ["FA/USD", "FB/USD", "FC/USD"] {
        let sig = of_symbol(&latest["signals"], s).unwrap_or_else(|| panic!("{s} missing"));
        assert_eq!(sig["stage"], "report");
        assert!(sig["cycle_id"].as_str().unwrap() >= newest.as_str());
    }
    assert!(of_symbol(&latest["signals"], "FSLOW/USD").is_none());
    assert!(of_symbol(&latest["signals"], "FFAIL/USD").is_none());
    // Both failures are counted, each with its own reason.
    let (_, m) = p.get_text("/metrics").await;
    let name = "autonomous_runner_signal_generation_skipped_total";
    assert!(
        metric(
            &m,
            name,
            &[("symbol", "FSLOW/USD"), ("reason", "market_data_timeout")]
        ) >= 3.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            name,
            &[("symbol", "FFAIL/USD"), ("reason", "market_data_5xx")]
        ) >= 3.0
    );
    assert_eq!(metric(&m, name, &[("symbol", "FA/USD")]), 0.0);
}
