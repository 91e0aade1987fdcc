//! A slow symbol and a failing symbol never hold the others back.

use std::time::Duration;

use crate::helpers::{Proc, config, metric};
use crate::market_server::{Behaviour, MarketServer};

#[tokio::test]
async fn slow_and_failing_symbols_never_block_the_others() {
    let market = MarketServer::start().await;
    market.set(
        "SOL-USD",
        Behaviour {
            delay: Duration::from_secs(30),
            status: None,
        },
    );
    market.set(
        "DOGE-USD",
        Behaviour {
            delay: Duration::ZERO,
            status: Some(503),
        },
    );
    let extra = format!(
        "  symbols: [ETH/USD, BTC/USD, SOL/USD, DOGE/USD, LINK/USD]\n  market_data:\n    source: coinbase\n    coinbase_url: {}\n    request_timeout_seconds: 0.5\n  timeouts:\n    symbol_timeout_seconds: 0.5\n    symbol_timeout_max_seconds: 0.5\n    total_timeout_seconds: 0.9\n",
        market.url
    );
    let p = Proc::spawn("run", &config("* * * * * *", &extra), &[]).await;
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
                ("DOGE/USD".to_string(), "market_data_5xx".to_string()),
                ("SOL/USD".to_string(), "market_data_timeout".to_string())
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
    let signals = latest["signals"].as_array().unwrap();
    for s in ["ETH/USD", "BTC/USD", "LINK/USD"] {
        let sig = signals
            .iter()
            .find(|x| x["symbol"] == s)
            .unwrap_or_else(|| panic!("{s} missing"));
        assert_eq!(sig["stage"], "report");
        assert!(sig["cycle_id"].as_str().unwrap() >= newest.as_str());
    }
    assert!(
        signals
            .iter()
            .all(|x| x["symbol"] != "SOL/USD" && x["symbol"] != "DOGE/USD")
    );
    // Both failures are counted, each with its own reason.
    let (_, m) = p.get_text("/metrics").await;
    let name = "autonomous_runner_signal_generation_skipped_total";
    assert!(
        metric(
            &m,
            name,
            &[("symbol", "SOL/USD"), ("reason", "market_data_timeout")]
        ) >= 3.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            name,
            &[("symbol", "DOGE/USD"), ("reason", "market_data_5xx")]
        ) >= 3.0
    );
    assert_eq!(metric(&m, name, &[("symbol", "ETH/USD")]), 0.0);
}
