//! A real model's latency (issue 9): the runner against the test LLM server answering every
//! request after a lognormal delay, on a fast schedule with deadlines and thresholds scaled to
//! it (÷ 10 of a 1-minute deployment: median 250 ms, p95 600 ms per call, call timeout 1 s,
//! cycle deadline 8 s, thresholds 800/900 ms). Every tick must run and nearly every symbol be
//! published; under truly overloaded latency the gate skips ticks, and when the model
//! recovers so does the runner.

use std::time::Duration;

use serde_json::Value;

use crate::app::{TestApp, spawn_app};
use crate::helpers::config;
use crate::llm_server::{LatencyModel, LlmServer};

fn yaml(url: &str) -> String {
    let symbols: Vec<String> = (0..20).map(|i| format!("L{i}/USD")).collect();
    format!(
        "  symbols: [{}]
  agents:
    backend: openrouter
    base_url: {url}
    requests_per_minute: 2000
    burst: 200
  parallel:
    max_concurrent: 5
    min_concurrent: 3
  timeouts:
    symbol_timeout_seconds: 1
    symbol_timeout_max_seconds: 1.5
    total_timeout_seconds: 8
  retry:
    delay_seconds: 0.2
    max_delay_seconds: 0.5
  adaptive:
    p95_threshold_ms: 800
    p99_threshold_ms: 900
    latency_max_age_seconds: 20
  circuit_breaker:
    llm_service:
      failure_threshold: 10000
      recovery_timeout_seconds: 5
",
        symbols.join(", ")
    )
}

/// Every tick recorded so far, oldest first.
async fn ticks(p: &TestApp) -> Vec<Value> {
    let (_, c) = p.get("/api/cycles").await;
    let mut v = c["cycles"].as_array().cloned().unwrap_or_default();
    v.reverse();
    v
}

/// Waits until `n` more ticks than `after` have been recorded (run or skipped).
async fn wait_ticks(p: &TestApp, after: usize, n: usize, timeout: Duration) -> Vec<Value> {
    let t = p
        .poll("/api/cycles", timeout, |c| {
            c["cycles"].as_array().is_some_and(|a| a.len() >= after + n)
        })
        .await;
    let mut v = t["cycles"].as_array().cloned().unwrap_or_default();
    v.reverse();
    v
}

#[tokio::test]
async fn every_tick_runs_under_a_real_models_latency_and_the_gate_acts_only_on_overload() {
    let llm = LlmServer::start().await;
    llm.set_latency(Some(LatencyModel::lognormal(
        Duration::from_millis(250),
        Duration::from_millis(600),
    )));
    let p = spawn_app(config("*/10 * * * * *", &yaml(&llm.url))).await;

    // Phase 1: a healthy model. Six ticks in a row: all run, ≥ 95 % of symbols each.
    let healthy = wait_ticks(&p, 0, 6, Duration::from_secs(90)).await;
    for t in &healthy[..6] {
        assert!(t["skipped_reason"].is_null(), "tick skipped: {t}");
        let ok = t["symbols_ok"].as_u64().unwrap();
        assert!(
            ok >= 19,
            "only {ok} of 20 symbols in {}: failed {}, skipped {}",
            t["cycle_id"],
            t["failures"],
            t["skipped"]
        );
    }
    assert!(
        ticks(&p)
            .await
            .iter()
            .all(|t| t["skipped_reason"] != "high_latency"),
        "the gate acted on a healthy model"
    );
    // Latency is per call: samples of every stage, well under a second each.
    let (_, d) = p.get("/health/detailed").await;
    for stage in ["signal", "report"] {
        let answers: u64 = d["llm"]["since_start"]["outputs"][stage]
            .as_object()
            .map(|o| o.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0);
        assert!(answers >= 100, "{stage}: {answers} answers");
    }
    let (_, d) = p.get("/health/detailed").await;
    let p95 = d["adaptive"]["p95_latency_ms"].as_f64().unwrap();
    assert!(p95 > 100.0 && p95 < 800.0, "per-call p95 {p95} ms");
    let cps = d["adaptive"]["calls_per_symbol"].as_f64().unwrap();
    assert!((2.0..=3.5).contains(&cps), "{cps} calls per symbol");

    // Phase 2: overloaded. Each call takes ~1.2 s: 20 symbols × ~3 calls over 5 slots need
    // ~14 s of an 8 s deadline. Once the window has seen it, ticks run the symbols that fit
    // and leave the last ones out up front (`capacity`) instead of timing them all out.
    llm.set_latency(Some(LatencyModel::lognormal(
        Duration::from_millis(1200),
        Duration::from_millis(1400),
    )));
    let start = healthy.len();
    // (The first such tick may still overrun: its window mixed fast and slow samples.)
    let left_out = |t: &Value| {
        t["skipped"].as_array().map_or(0, |s| {
            s.iter().filter(|s| s["reason"] == "capacity").count() as u64
        })
    };
    let served = |t: &Value| {
        let shed = left_out(t);
        shed > 0
            && shed < 20
            && t["skipped_reason"].is_null()
            && t["symbols_ok"].as_u64().unwrap_or(0) + shed >= 19
    };
    let overloaded = p
        .poll("/api/cycles", Duration::from_secs(120), |c| {
            c["cycles"]
                .as_array()
                .is_some_and(|a| a.iter().take(a.len() - start).any(&served))
        })
        .await;
    assert!(
        overloaded["cycles"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["skipped_reason"] != "high_latency"),
        "no whole tick skipped while part of its work fits"
    );

    // Phase 3: the model recovers; fast samples replace the slow ones and ticks run whole.
    llm.set_latency(Some(LatencyModel::lognormal(
        Duration::from_millis(250),
        Duration::from_millis(600),
    )));
    // Fast samples replace the slow ones within a few ticks.
    let recovered = p
        .poll("/api/cycles", Duration::from_secs(180), |c| {
            c["cycles"].as_array().is_some_and(|a| {
                a.iter().take(2).all(|t| {
                    t["skipped_reason"].is_null() && t["symbols_ok"].as_u64().unwrap_or(0) >= 19
                })
            })
        })
        .await;
    assert!(!recovered["cycles"].as_array().unwrap().is_empty());
    p.stop().await.expect("a clean stop");
}
