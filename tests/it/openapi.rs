//! The OpenAPI document against a third-party fuzzer: schemathesis (installed by
//! `scripts/test` into `.test-tools/st`) reads `/api/openapi.json` from a live instance,
//! generates valid and invalid requests for every operation, and checks every answer against
//! the document — no 5xx, every status and body as documented, invalid input refused with a
//! 4xx, valid input accepted, undocumented methods answered 405, and (with `ADMIN_TOKEN`) the
//! admin operations refusing a request without the token.
//!
//! Two operations are left out of the fuzzing, each covered elsewhere: `POST /shutdown`
//! (it would end the instance under test; `shutdown.rs`) and the endless SSE stream
//! (`sse_client.rs`).

use std::time::Duration;

use serde_json::Value;

use crate::app::{AppOptions, TestApp, spawn_app, spawn_app_with};
use crate::helpers::config;
use crate::redis_server::RedisServer;

/// `.test-tools/st`'s schemathesis CLI.
fn schemathesis() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".test-tools/st/bin/st")
}

/// What one schemathesis run reported.
struct Run {
    code: i32,
    generated: u64,
    passed: u64,
    out: String,
}

/// Fuzzes `app` from its own document with every check on (but those in `exclude_checks`),
/// sending `headers`.
async fn fuzz(app: &TestApp, headers: &[String], exclude_checks: &[&str]) -> Run {
    let st = schemathesis();
    assert!(
        st.exists(),
        "{} is missing: scripts/test installs schemathesis into .test-tools/st",
        st.display()
    );
    let mut cmd = tokio::process::Command::new(st);
    cmd.arg("run")
        .arg(format!("{}/api/openapi.json", app.base))
        .args(["--exclude-path", "/shutdown"])
        .args(["--exclude-path", "/api/signals/stream"])
        // A fixed seed: a failure found here is reproduced by the same command.
        .args(["--seed", "20261207", "--max-examples", "60", "--no-color"])
        .args(["--request-timeout", "20"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    if !exclude_checks.is_empty() {
        cmd.args(["--exclude-checks", &exclude_checks.join(",")]);
    }
    let out = cmd
        .env("HOME", std::env::temp_dir())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("schemathesis runs");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // "Test cases:\n  594 generated, 594 passed"
    let counts = text
        .lines()
        .find(|l| l.contains(" generated, "))
        .unwrap_or_default()
        .to_string();
    let number_before = |word: &str| -> u64 {
        counts
            .split(',')
            .find(|part| part.contains(word))
            .and_then(|part| part.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    Run {
        code: out.status.code().unwrap_or(-1),
        generated: number_before("generated"),
        passed: number_before("passed"),
        out: text,
    }
}

/// The document lists every path the service serves, and names its errors.
fn assert_document(doc: &Value) {
    assert_eq!(doc["openapi"], "3.1.0", "{doc}");
    let paths = doc["paths"].as_object().expect("paths");
    for p in [
        "/",
        "/assets/{name}",
        "/health",
        "/health/live",
        "/health/ready",
        "/health/detailed",
        "/metrics",
        "/api/signals/latest",
        "/api/signals/history",
        "/api/signals/stream",
        "/api/performance",
        "/api/candles",
        "/api/cycles",
        "/api/kill-switch",
        "/api/openapi.json",
        "/shutdown",
    ] {
        assert!(paths.contains_key(p), "{p} is not in the document");
    }
    assert_eq!(paths.len(), 16, "{:?}", paths.keys().collect::<Vec<_>>());
    let candles_symbol = &doc["paths"]["/api/candles"]["get"]["parameters"][0];
    assert_eq!(candles_symbol["name"], "symbol");
    assert_eq!(
        candles_symbol["schema"]["enum"],
        serde_json::json!(["ETH/USD", "BTC/USD"]),
        "the configured symbols: {candles_symbol}"
    );
}

#[tokio::test]
async fn schemathesis_finds_nothing_against_the_document_with_memory_coordination() {
    let app = spawn_app(config(
        "*/2 * * * * *",
        "  symbols: [ETH/USD, BTC/USD]\n  history:\n    grading:\n      horizons_minutes: [1, 5]\n",
    ))
    .await;
    // Something in every list, so the bodies are checked with content, not only empty.
    app.poll(
        "/api/signals/history?stage=signal",
        Duration::from_secs(20),
        |v| v["signals"].as_array().is_some_and(|r| !r.is_empty()),
    )
    .await;
    let (code, doc) = app.get("/api/openapi.json").await;
    assert_eq!(code, 200);
    assert_document(&doc);
    assert_eq!(
        doc["paths"]["/api/performance"]["get"]["parameters"][0]["schema"]["enum"],
        serde_json::json!(["1m", "5m"]),
        "the graded horizons"
    );
    // Without a token, loopback peers are admitted to the admin operations by design
    // (`http.admin_loopback`), which the document says with an empty security requirement;
    // `ignored_auth` (a request without credentials must be refused) does not apply.
    let run = fuzz(&app, &[], &["ignored_auth"]).await;
    assert_eq!(run.code, 0, "schemathesis failed:\n{}", run.out);
    assert!(run.generated > 300, "too few cases: {}", run.out);
    assert_eq!(run.generated, run.passed, "{}", run.out);
    eprintln!(
        "schemathesis, memory coordination: {} generated, {} passed",
        run.generated, run.passed
    );
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn schemathesis_finds_nothing_with_redis_and_an_admin_token() {
    const TOKEN: &str = "schemathesis-token-5678";
    let redis = RedisServer::start().await;
    let app = spawn_app_with(
        config(
            "*/2 * * * * *",
            &format!(
                "  symbols: [ETH/USD, BTC/USD]\n  coordination:\n    backend: redis\n    redis_url: {}\n",
                redis.url()
            ),
        ),
        AppOptions {
            env: [("ADMIN_TOKEN".to_string(), TOKEN.to_string())].into(),
            ..Default::default()
        },
    )
    .await;
    app.poll("/api/signals/latest", Duration::from_secs(20), |v| {
        v["total"].as_u64().is_some_and(|n| n > 0)
    })
    .await;
    let (code, doc) = app.get("/api/openapi.json").await;
    assert_eq!(code, 200);
    assert_document(&doc);
    // With a token, the admin operations require it: no empty alternative.
    assert_eq!(
        doc["paths"]["/api/kill-switch"]["post"]["security"],
        serde_json::json!([{"bearer": []}])
    );
    let run = fuzz(&app, &[format!("Authorization: Bearer {TOKEN}")], &[]).await;
    assert_eq!(run.code, 0, "schemathesis failed:\n{}", run.out);
    assert!(run.generated > 300, "too few cases: {}", run.out);
    assert_eq!(run.generated, run.passed, "{}", run.out);
    eprintln!(
        "schemathesis, Redis and ADMIN_TOKEN: {} generated, {} passed",
        run.generated, run.passed
    );
    app.stop().await.expect("clean stop");
}
