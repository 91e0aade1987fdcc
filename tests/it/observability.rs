//! Metrics (parsed by promtool, scraped by a real Prometheus), the SSE stream, admin endpoints.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::app::{AppOptions, anchored_now, spawn_app, spawn_app_with, unique_prefix};
use crate::helpers::{Proc, config, eventually, free_port, get_json, metric};
use crate::sse_client::SseClient;

/// The metric names DESIGN.md §3 promises.
const DESIGN_NAMES: &[&str] = &[
    "signal_generation_total",
    "signal_generation_skipped_total",
    "mcp_tool_calls_total",
    "cycle_failures_total",
    "cycles_skipped_circuit_open_total",
    "cycles_skipped_high_latency_total",
    "stale_locks_recovered_total",
    "circuit_breaker_rejected_total",
    "backpressure_cooldowns_total",
    "signals_generated_last_cycle",
    "active_locks",
    "symbols_processing",
    "circuit_breaker_state",
    "adaptive_batch_size",
    "current_p95_latency_ms",
    "last_cycle_timestamp_seconds",
    "cycle_duration_seconds",
    "symbol_processing_duration_seconds",
    "llm_latency_seconds",
    // Added by this project.
    "agent_call_duration_seconds",
    "agent_outputs_total",
    "agent_hedges_total",
    "agent_reprompts_total",
    "signals_graded_total",
    "history_rows_written_total",
    "history_dropped_total",
    "history_queue_depth",
];

#[tokio::test]
async fn metrics_parse_and_hold_every_design_name_after_one_cycle() {
    // An LLM backend, so the LLM breaker and its metrics exist.
    let llm = crate::llm_server::LlmServer::start().await;
    let extra = format!(
        "  symbols: [ETH/USD, BTC/USD, SOL/USD]\n  agents:\n    backend: openrouter\n    base_url: {}\n",
        llm.url
    );
    let p = Proc::spawn("run", &config("*/2 * * * * *", &extra), &[]).await;
    p.wait_log(
        |l| l["message"] == "cycle finished",
        Duration::from_secs(20),
    )
    .await;
    let (code, text) = p.get_text("/metrics").await;
    assert_eq!(code, 200);
    // Prometheus's own parser and linter.
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/test installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Exit 1 is a parse error; 3 is lint findings. The one finding allowed is the seed's own
    // name `current_p95_latency_ms` (a contract), which the linter dislikes for its unit.
    assert_ne!(
        out.status.code(),
        Some(1),
        "promtool could not parse /metrics: {report}"
    );
    for line in report.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            line.contains("current_p95_latency_ms"),
            "lint finding: {line}"
        );
    }
    for name in DESIGN_NAMES {
        let full = format!("autonomous_runner_{name}");
        assert!(
            text.contains(&format!("# TYPE {full} ")),
            "{full} missing from /metrics"
        );
        assert!(
            text.contains(&format!("# HELP {full} ")),
            "{full} has no HELP"
        );
    }
    // Durations are histograms with explicit buckets.
    assert!(text.contains("autonomous_runner_cycle_duration_seconds_bucket{le=\"0.005\"}"));
    // Each stage's freshness (tick → publication) was observed (advise runs only for a
    // score above its threshold).
    for stage in ["signal", "score", "report"] {
        let n = metric(
            &text,
            "autonomous_runner_signal_freshness_seconds_count",
            &[("stage", stage)],
        );
        assert!(n >= 1.0, "no {stage} freshness observed");
    }
    // Every label value is from a bounded set: no spaces, no free text.
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('{'))
    {
        let labels = &line[line.find('{').unwrap() + 1..line.rfind('}').unwrap()];
        for kv in labels.split("\",") {
            let v = kv
                .split_once("=\"")
                .map(|(_, v)| v.trim_end_matches('"'))
                .unwrap_or("");
            assert!(
                v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_/.:-+".contains(c)),
                "free-text label value in {line}"
            );
        }
    }
    assert!(
        metric(
            &text,
            "autonomous_runner_signal_generation_total",
            &[("symbol", "ETH/USD")]
        ) >= 1.0
    );
    assert_eq!(metric(&text, "autonomous_runner_build_info", &[]), 1.0);
    // The history writes this process's messages (3 symbols × at least signal, score, report)
    // off the publishing path: waited for, not assumed at the first scrape.
    eventually(
        "9 history rows written",
        Duration::from_secs(10),
        || async {
            let (_, t) = p.get_text("/metrics").await;
            match metric(&t, "autonomous_runner_history_rows_written_total", &[]) {
                n if n >= 9.0 => Ok(()),
                n => Err(format!("{n} written")),
            }
        },
    )
    .await;
}

/// The LLM series are there before the first call (a dashboard or an alert over them sees
/// zeros, not "no data"), and `llm_latency_seconds` counts model answers only: rules
/// fallbacks answer in microseconds and would hide an LLM incident in its percentiles.
#[tokio::test]
async fn llm_series_exist_from_the_start_and_llm_latency_counts_model_answers_only() {
    let llm = crate::llm_server::LlmServer::start().await;
    let agents = format!(
        "  symbols: [ETH/USD]\n  agents:\n    backend: openrouter\n    base_url: {}\n    fallback: rules\n  retry:\n    max_attempts: 1\n",
        llm.url
    );
    // A yearly schedule: no tick, no call.
    let idle = Proc::spawn("run", &config("0 0 1 1 *", &agents), &[]).await;
    let (_, text) = idle.get_text("/metrics").await;
    for stage in ["signal", "advise", "report"] {
        let at = [("stage", stage), ("backend", "openrouter")];
        let checks = [
            (
                "autonomous_runner_agent_call_duration_seconds_count",
                &at[..],
            ),
            ("autonomous_runner_llm_latency_seconds_count", &at[..1]),
        ];
        for (name, labels) in checks {
            assert_eq!(metric(&text, name, labels), 0.0, "{name} {labels:?}");
        }
        for kind in ["input", "output"] {
            let labels = [("stage", stage), ("kind", kind)];
            assert_eq!(
                metric(&text, "autonomous_runner_llm_tokens_total", &labels),
                0.0
            );
        }
    }
    let breaker = [("breaker", "llm_openrouter")];
    assert_eq!(
        metric(&text, "autonomous_runner_circuit_breaker_state", &breaker),
        0.0
    );
    assert_eq!(
        metric(&text, "autonomous_runner_current_p95_latency_seconds", &[]),
        0.0
    );
    drop(idle);
    // Every request fails: the rules fallback answers, and no LLM latency is recorded.
    llm.set_default(Some(crate::llm_server::Reply::Status(503, None)));
    let p = Proc::spawn("run", &config("* * * * * *", &agents), &[]).await;
    p.poll("/api/signals/latest", Duration::from_secs(30), |v| {
        v["signals"][0]["is_degraded"] == true
    })
    .await;
    let (_, text) = p.get_text("/metrics").await;
    assert!(metric(&text, "autonomous_runner_signal_generation_total", &[]) >= 1.0);
    assert_eq!(
        metric(&text, "autonomous_runner_llm_latency_seconds_count", &[]),
        0.0,
        "fallback answers are not LLM latencies"
    );
    assert!(!llm.received().is_empty(), "the model was asked");
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_runner() {
    let p = spawn_app(&config("* * * * * *", "  symbols: [ETH/USD, BTC/USD]\n")).await;
    let target = p.base.trim_start_matches("http://").to_string();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: runner\n    static_configs:\n      - targets: ['{target}']\n"),
    )
    .unwrap();
    let port = free_port();
    let mut prom = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus (scripts/test installs it)");
    let api = format!("http://127.0.0.1:{port}/api/v1/query?query=");
    let query = |q: &str| {
        let url = format!("{api}{}", urlencode(q));
        async move {
            let r = reqwest::get(&url).await.ok()?;
            let v: Value = r.json().await.ok()?;
            v["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok())
        }
    };
    let first = eventually(
        "Prometheus to see the target up with a cycle count",
        Duration::from_secs(60),
        || async {
            let up = query("up{job=\"runner\"}").await;
            match query("autonomous_runner_cycles_total{job=\"runner\"}").await {
                Some(c) if up == Some(1.0) => Ok(c),
                c => Err(format!("up {up:?}, cycles_total {c:?}")),
            }
        },
    )
    .await;
    eventually(
        "the cycle counter to move in Prometheus",
        Duration::from_secs(30),
        || async {
            match query("autonomous_runner_cycles_total{job=\"runner\"}").await {
                Some(now) if now > first => Ok(()),
                now => Err(format!("{now:?}, first {first}")),
            }
        },
    )
    .await;
    let last = query("autonomous_runner_last_cycle_timestamp_seconds{job=\"runner\"}")
        .await
        .unwrap_or(0.0);
    assert!(last > 1.7e9, "last cycle timestamp is a Unix time: {last}");
    // Every query of the shipped Grafana dashboard is valid PromQL for this Prometheus.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/grafana/autonomous-runner.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(|e| e.replace("$instance", ".*")))
        .collect();
    assert!(exprs.len() >= 15);
    for e in &exprs {
        let v: Value = reqwest::get(format!("{api}{}", urlencode(e)))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["status"], "success", "dashboard query {e}: {v}");
    }
    let _ = prom.kill().await;
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn ids(evs: &[crate::sse_client::SseEvent]) -> Vec<String> {
    evs.iter().filter_map(|e| e.id.clone()).collect()
}

#[tokio::test]
async fn sse_resume_delivers_exactly_what_was_missed_in_order() {
    let p = spawn_app(&config(
        "* * * * * *",
        "  symbols: [ETH/USD, BTC/USD, SOL/USD]\n",
    ))
    .await;
    p.wait_cycles(1, Duration::from_secs(10)).await;
    let url = format!("{}/api/signals/stream", p.base);
    // A witness stays connected throughout.
    let witness = SseClient::connect(&url, None).await;
    // A new client first gets the latest signal of every symbol.
    let client = SseClient::connect(&url, None).await;
    let first = client
        .wait(Duration::from_secs(10), |e| {
            e.iter().filter(|e| e.event == "signal").count() >= 3
        })
        .await;
    let symbols: std::collections::BTreeSet<String> = first[..3]
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(&e.data).unwrap()["payload"]["symbol"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        symbols.len(),
        3,
        "the snapshot has each symbol's latest signal"
    );
    let snapshot_ids: std::collections::BTreeSet<String> = ids(&first[..3]).into_iter().collect();
    assert_eq!(
        snapshot_ids.len(),
        3,
        "one id per snapshot event: {first:?}"
    );
    // Read some live events, then disconnect.
    let seen = client.wait(Duration::from_secs(10), |e| e.len() >= 8).await;
    let gone = client.close();
    let last = ids(&gone).last().cloned().unwrap();
    assert!(seen.len() >= 8);
    // Miss a few cycles.
    let n = p.run_cycles().await.len();
    p.wait_cycles(n + 3, Duration::from_secs(15)).await;
    // Reconnect with Last-Event-ID.
    let back = SseClient::connect(&url, Some(&last)).await;
    let w = witness.snapshot();
    let pos = w
        .iter()
        .position(|e| e.id.as_deref() == Some(last.as_str()))
        .expect("witness saw the last id");
    let missed: Vec<String> = ids(&w[pos + 1..]);
    assert!(
        missed.len() >= 6,
        "events happened while disconnected: {}",
        missed.len()
    );
    let got = back
        .wait(Duration::from_secs(10), |e| e.len() >= missed.len())
        .await;
    let got_ids = ids(&got);
    assert_eq!(
        &got_ids[..missed.len()],
        &missed[..],
        "exactly the missed events, in order"
    );
    let unique: std::collections::BTreeSet<&String> = got_ids.iter().collect();
    assert_eq!(unique.len(), got_ids.len(), "none twice");
    assert!(
        !got_ids.contains(&last),
        "the last seen event is not repeated"
    );
    // Same through the query parameter.
    let again = SseClient::connect(&format!("{url}?last_event_id={last}"), None).await;
    let q = again
        .wait(Duration::from_secs(10), |e| e.len() >= missed.len())
        .await;
    assert_eq!(&ids(&q)[..missed.len()], &missed[..]);
    // Cycle events are on the stream too.
    assert!(w.iter().any(|e| e.event == "cycle"));
    // A nonsense id is not refused (a browser would stop reconnecting): see the next test.
    let r = reqwest::Client::new()
        .get(&url)
        .header("last-event-id", "banana")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A `Last-Event-ID` this stream never sent (another server's, garbage) is treated as none:
/// 200 with the snapshot and a status event saying the replay is incomplete — a 400 would
/// make a browser's EventSource give up for good. Every stream opens with a `retry:` field
/// and carries `X-Accel-Buffering: no` (nginx would otherwise buffer it).
#[tokio::test]
async fn sse_treats_an_unknown_last_event_id_as_none_and_says_how_to_reconnect() {
    let app = spawn_app(config("* * * * * *", "")).await;
    app.wait_cycles(1, Duration::from_secs(10)).await;
    let mut resp = reqwest::Client::new()
        .get(format!("{}/api/signals/stream", app.base))
        .header("accept", "text/event-stream")
        .header("last-event-id", "not-an-id")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("x-accel-buffering")
            .and_then(|v| v.to_str().ok()),
        Some("no")
    );
    let mut text = String::new();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(chunk)) = resp.chunk().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
            if text.contains("\"replay\":\"incomplete\"") && text.contains("event: signal") {
                break;
            }
        }
    })
    .await;
    assert!(got.is_ok(), "stream so far: {text}");
    let retry = text.find("retry: 3000").expect("a retry field");
    assert!(
        retry < text.find("event:").unwrap(),
        "retry comes first: {text}"
    );
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn sse_on_replica_a_carries_signals_produced_by_replica_b() {
    let redis = crate::redis_server::RedisServer::start().await;
    let extra = format!(
        "  symbols: [ETH/USD, BTC/USD]\n  coordination:\n    backend: redis\n    redis_url: {}\n",
        redis.url()
    );
    // A runs no tick of its own during the test (yearly schedule): whatever signals it serves
    // were produced by B.
    let (clock, prefix) = (anchored_now(), unique_prefix("sse-ab"));
    let spawn = |schedule: &'static str, id: &'static str| {
        spawn_app_with(
            config(schedule, &extra),
            AppOptions {
                instance_id: Some(id.into()),
                key_prefix: Some(prefix.clone()),
                clock: clock.clone(),
                ..AppOptions::default()
            },
        )
    };
    let a = spawn("0 0 1 1 *", "replica-a").await;
    let b = spawn("* * * * * *", "replica-b").await;
    let client = SseClient::connect(&format!("{}/api/signals/stream", a.base), None).await;
    // Wait until B has run some ticks of its own.
    let b_cycles: std::collections::BTreeSet<String> = b
        .wait_cycles(2, Duration::from_secs(30))
        .await
        .iter()
        .filter(|c| c["symbols_ok"].as_u64() > Some(0))
        .map(|c| c["cycle_id"].as_str().unwrap().to_string())
        .collect();
    assert!(!b_cycles.is_empty(), "B published");
    let evs = client
        .wait(Duration::from_secs(15), |e| {
            e.iter().any(|e| {
                e.event == "signal"
                    && serde_json::from_str::<Value>(&e.data)
                        .ok()
                        .and_then(|v| {
                            v["payload"]["cycle_id"]
                                .as_str()
                                .map(|c| b_cycles.contains(c))
                        })
                        .unwrap_or(false)
            })
        })
        .await;
    assert!(
        evs.iter()
            .all(|e| e.id.as_deref().is_some_and(|i| i.contains('_'))),
        "ids pair the stream position with the local sequence"
    );
    // A's JSON API has B's signals too (a load-balanced client sees every replica's).
    let newest_b = b_cycles.iter().max().unwrap().clone();
    a.poll("/api/signals/latest", Duration::from_secs(10), |v| {
        v["signals"].as_array().is_some_and(|a| {
            a.len() == 2
                && a.iter().all(|s| {
                    s["cycle_id"]
                        .as_str()
                        .is_some_and(|c| c >= newest_b.as_str())
                })
        })
    })
    .await;
    drop(a);
}

#[tokio::test]
async fn admin_endpoints_need_loopback_or_the_token_and_never_leak_it() {
    const TOKEN: &str = "admin-tok-3f9c2b7e-never-logged";
    let extra = "  symbols: [ETH/USD]\n  http:\n    bind: 127.0.0.1\n    port: 0\n    admin_loopback: false\n";
    let cfg = config("*/2 * * * * *", "")
        .replace("  http:\n    bind: 127.0.0.1\n    port: 0\n", "")
        + extra;
    let mut p = Proc::spawn("run", &cfg, &[("ADMIN_TOKEN", TOKEN)]).await;
    let c = reqwest::Client::new();
    let ks = format!("{}/api/kill-switch", p.base);
    // No token (loopback not trusted here), wrong token: refused.
    assert_eq!(c.post(&ks).send().await.unwrap().status(), 401);
    assert_eq!(c.delete(&ks).send().await.unwrap().status(), 401);
    assert_eq!(
        c.post(format!("{}/shutdown", p.base))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        c.post(&ks)
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    // With the token: works, and the next tick is skipped for it.
    let r = c
        .post(&ks)
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"reason": "maintenance window"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["kill_switch"]["active"], true);
    assert_eq!(body["kill_switch"]["reason"], "maintenance window");
    p.poll("/api/cycles", Duration::from_secs(10), |v| {
        v["cycles"]
            .as_array()
            .is_some_and(|a| a.iter().any(|c| c["skipped_reason"] == "kill_switch"))
    })
    .await;
    let (_, d) = p.get("/health/detailed").await;
    assert_eq!(d["kill_switch"]["reason"], "maintenance window");
    assert!(!d.to_string().contains(TOKEN));
    // Bad body: a clear 400.
    let r = c
        .post(&ks)
        .bearer_auth(TOKEN)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        c.delete(&ks)
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let (_, d) = p.get("/health/detailed").await;
    assert!(d["kill_switch"].is_null());
    // Shutdown with the token: a graceful exit.
    assert_eq!(
        c.post(format!("{}/shutdown", p.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    assert_eq!(p.wait_exit(Duration::from_secs(20)).await, 0);
    let all: String = p
        .logs
        .lock()
        .unwrap()
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(!all.contains(TOKEN), "token in logs");
    assert!(
        !p.logs_matching(|l| l["message"] == "admin request refused: invalid bearer token")
            .is_empty(),
        "refusals are logged"
    );
}

#[tokio::test]
async fn without_a_token_only_loopback_may_use_admin_endpoints() {
    // Loopback trusted (the default): allowed without a token.
    let p = spawn_app(&config("*/2 * * * * *", "  symbols: [ETH/USD]\n")).await;
    let c = reqwest::Client::new();
    let ks = format!("{}/api/kill-switch", p.base);
    // Only a well-formed request turns it on (issue 10): not an empty body, an array, an
    // empty reason, or an empty chunked body.
    for (what, r) in [
        ("empty body", c.post(&ks)),
        ("array", c.post(&ks).body(r#"["maintenance"]"#)),
        (
            "empty reason",
            c.post(&ks).json(&serde_json::json!({"reason": ""})),
        ),
    ] {
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 400, "{what}");
        let body: Value = r.json().await.unwrap();
        assert!(!body["error"].as_str().unwrap().is_empty(), "{what}");
    }
    // An empty chunked body, written by hand (clients rarely send one).
    let addr = p.base.trim_start_matches("http://").to_string();
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    sock.write_all(
        format!("POST /api/kill-switch HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    sock.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let (_, d) = p.get("/health/detailed").await;
    assert!(
        d["kill_switch"].is_null(),
        "still off: {}",
        d["kill_switch"]
    );
    assert_eq!(
        c.post(&ks)
            .json(&serde_json::json!({"reason": "maintenance"}))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.delete(format!("{}/api/kill-switch", p.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Loopback not trusted and no token configured: forbidden.
    let cfg = config("*/2 * * * * *", "")
        .replace("  http:\n    bind: 127.0.0.1\n    port: 0\n", "")
        + "  symbols: [ETH/USD]\n  http:\n    bind: 127.0.0.1\n    port: 0\n    admin_loopback: false\n";
    let q = spawn_app(&cfg).await;
    assert_eq!(
        c.post(format!("{}/api/kill-switch", q.base))
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        c.post(format!("{}/shutdown", q.base))
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    let (code, _) = get_json(&format!("{}/health/live", q.base)).await;
    assert_eq!(code, 200, "still running");
}

#[tokio::test]
async fn a_configured_token_is_required_from_loopback_too() {
    // Issue 10: behind a same-host proxy every client is loopback; with a token configured,
    // loopback alone is not enough (admin_loopback is at its default, true).
    const TOKEN: &str = "admin-tok-loopback-is-not-enough";
    let p = spawn_app_with(
        config("*/2 * * * * *", "  symbols: [ETH/USD]\n"),
        AppOptions {
            env: [("ADMIN_TOKEN".to_string(), TOKEN.to_string())].into(),
            ..AppOptions::default()
        },
    )
    .await;
    let c = reqwest::Client::new();
    let ks = format!("{}/api/kill-switch", p.base);
    let body = serde_json::json!({"reason": "maintenance"});
    assert_eq!(c.post(&ks).json(&body).send().await.unwrap().status(), 401);
    assert_eq!(
        c.post(format!("{}/shutdown", p.base))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        c.post(&ks)
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn a_kill_switch_set_by_hand_in_redis_reaches_the_stream_as_a_status_event() {
    let redis = crate::redis_server::RedisServer::start().await;
    let extra = format!(
        "  symbols: [ETH/USD]\n  coordination:\n    backend: redis\n    redis_url: {}\n",
        redis.url()
    );
    let p = spawn_app(&config("0 0 1 1 *", &extra)).await;
    let client = SseClient::connect(&format!("{}/api/signals/stream", p.base), None).await;
    let mut c = redis.conn().await;
    let _: () = redis::cmd("SET")
        .arg("autonomous:kill_switch")
        .arg(r#"{"active":true,"reason":"set by hand","activated_by":"ops","activated_at":null}"#)
        .query_async(&mut c)
        .await
        .unwrap();
    let evs = client
        .wait(Duration::from_secs(15), |e| {
            e.iter()
                .any(|e| e.event == "status" && e.data.contains("set by hand"))
        })
        .await;
    let status: Value = serde_json::from_str(
        &evs.iter()
            .find(|e| e.data.contains("set by hand"))
            .unwrap()
            .data,
    )
    .unwrap();
    assert_eq!(status["kill_switch"]["active"], true);
    assert!(status["readiness"]["status"].is_string());
}
