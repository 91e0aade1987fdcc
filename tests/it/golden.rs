//! The outside contracts byte for byte: a published envelope (as it lands in the Redis
//! stream), a history row (as `/api/signals/history` answers it) and an `/api/performance`
//! answer, compared with `tests/golden/contracts.json`. The run is deterministic — a fixed
//! tick on an anchored clock, the simulated market (a pure function of symbol and minute),
//! the rules agents — except for the instants and durations a run cannot fix (when a message
//! was made, how long a stage took), which are replaced by `"<varies>"` before comparing.
//! Refactors of the inside must leave this file unchanged; a deliberate contract change
//! rewrites it with `GOLDEN_UPDATE=1` and shows up in the diff.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::app::{AppOptions, spawn_app_with};
use crate::helpers::config;
use crate::redis_server::RedisServer;
use autonomous_runner::schedule::Clock;

/// Keys whose values are instants or durations of this run.
const VARYING: &[&str] = &["timestamp", "processing_time_ms"];

fn normalize(v: &mut Value) {
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                if VARYING.contains(&k.as_str()) {
                    *x = json!("<varies>");
                } else {
                    normalize(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(normalize),
        _ => {}
    }
}

#[tokio::test]
async fn published_envelopes_history_rows_and_the_scorecard_keep_their_shape_and_values() {
    let redis = RedisServer::start().await;
    let yaml = config(
        // One tick only (10:01:00 on 2026-11-29), so what is read later cannot include a
        // second one.
        "0 1 10 29 11 *",
        &format!(
            "  symbols: [ETH/USD]\n  coordination:\n    backend: redis\n    redis_url: {}\n  history:\n    grading:\n      horizons_minutes: [1]\n      interval_seconds: 1\n",
            redis.url()
        ),
    );
    // Two seconds before the tick, whatever day the test runs on.
    let anchor: DateTime<Utc> = "2026-11-29T10:00:58Z".parse().expect("anchor");
    let app = spawn_app_with(
        yaml,
        AppOptions {
            clock: Clock::anchored(anchor),
            ..AppOptions::default()
        },
    )
    .await;
    app.wait_cycles(1, Duration::from_secs(60)).await;
    // Graded at one minute: the signal's data runs to 10:01:00, its grade is due at 10:02.
    let history = app
        .poll(
            "/api/signals/history?stage=signal&symbol=ETH/USD",
            Duration::from_secs(120),
            |v| v["signals"][0]["grades"]["1m"].is_object(),
        )
        .await;
    let row = history["signals"][0].clone();
    let stream = redis.stream("stream:raw-signals").await;
    assert_eq!(stream.len(), 1, "one tick, one symbol: {stream:?}");
    let envelope = stream[0].1.clone();
    let (code, performance) = app
        .get("/api/performance?horizon=1m&since=2026-11-29T00:00:00Z")
        .await;
    assert_eq!(code, 200, "{performance}");
    app.stop().await.expect("a clean stop");

    let mut got = json!({
        "published_envelope": envelope,
        "history_row": row,
        "performance": performance,
    });
    normalize(&mut got);
    let text = serde_json::to_string_pretty(&got).expect("json") + "\n";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/contracts.json");
    if std::env::var_os("GOLDEN_UPDATE").is_some() {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(&path, &text).expect("write golden");
        return;
    }
    let want = std::fs::read_to_string(&path).expect("tests/golden/contracts.json");
    assert!(
        text == want,
        "the outside contracts changed (GOLDEN_UPDATE=1 rewrites the file when that is meant):\n--- want\n{want}\n--- got\n{text}"
    );
}
