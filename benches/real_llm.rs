//! The default deployment against a model with a real model's latency, for minutes on end:
//! the 1-minute schedule, the 20 default symbols, every LLM stage on the OpenAI-compatible
//! backend, the test server answering each request after a lognormal delay (median 2.5 s,
//! p95 6 s), 1 % of requests 503 and 2 % stalling 30 s. Two runners side by side on their own
//! servers, both with hedging on: the defaults (a burst of half the limit, a pool of 20, so
//! a tick's calls go out at once), and the seed's burst of 10 with a pool of 10 — the
//! before and the after of issue 25 in the same run.
//! `-- hedging` compares hedging on and off with the defaults instead.
//!
//! `cargo build --release && cargo bench --bench real_llm -- 15` (minutes; default 15).
//!
//! Reported per run: ticks run ÷ ticks due, symbols published ÷ due, p50/p95 of signal
//! freshness (the report's publish time − the tick), LLM requests per published symbol, the
//! extra requests hedging sent, and the most requests the LLM server received in any 60 s
//! window (its own log; the limit is 100).

// A benchmark is a tool run by hand: a failed setup step aborts it with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

#[path = "../tests/it/llm_server.rs"]
#[allow(dead_code)]
mod llm_server;

use std::time::Duration;

use llm_server::{LatencyModel, LlmServer};
use serde_json::Value;

fn main() {
    let minutes: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(15);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let hedging = std::env::args().any(|a| a == "hedging");
    rt.block_on(async move {
        let (a, b) = if hedging {
            tokio::join!(
                run(minutes, "defaults, hedging on", true, ""),
                run(minutes, "defaults, hedging off", false, "")
            )
        } else {
            tokio::join!(
                run(minutes, "defaults (burst 50, pool 20)", true, ""),
                run(
                    minutes,
                    "the seed's burst 10, pool 10",
                    true,
                    "    burst: 10\n  parallel:\n    max_concurrent: 10\n"
                )
            )
        };
        println!("\n| runner | ticks run ÷ due | symbols published ÷ due | freshness p50 | freshness p95 | LLM requests per symbol | extra requests from hedging | most requests in a 60 s window | endpoint in-flight limit at the end |");
        println!("|---|---|---|---|---|---|---|---|---|");
        for r in [a, b] {
            println!("{r}");
        }
    });
}

struct Report {
    name: &'static str,
    max_window: usize,
    ticks_due: usize,
    ticks_run: usize,
    due: usize,
    published: usize,
    fresh_p50: f64,
    fresh_p95: f64,
    requests: usize,
    hedges: f64,
    /// The endpoint's learned in-flight limit when the run ended (the gauge).
    limit_end: Option<f64>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "| {} | {}/{} | {}/{} ({:.1} %) | {:.1} s | {:.1} s | {:.2} | {} ({:.1} %) | {} | {} |",
            self.name,
            self.ticks_run,
            self.ticks_due,
            self.published,
            self.due,
            100.0 * self.published as f64 / self.due.max(1) as f64,
            self.fresh_p50,
            self.fresh_p95,
            self.requests as f64 / self.published.max(1) as f64,
            self.hedges.max(0.0) as u64,
            100.0 * self.hedges.max(0.0) / (self.requests as f64 - self.hedges).max(1.0),
            self.max_window,
            self.limit_end.map_or("-".into(), |l| format!("{l}")),
        )
    }
}

async fn run(minutes: u64, name: &'static str, hedging: bool, extra: &str) -> Report {
    let llm = LlmServer::start().await;
    llm.set_latency(Some(LatencyModel {
        median: Duration::from_millis(2500),
        p95: Duration::from_secs(6),
        error_rate: 0.01,
        stall_rate: 0.02,
        stall: Duration::from_secs(30),
    }));
    let yaml = format!(
        "autonomous_runner:\n  http:\n    bind: 127.0.0.1\n    port: 0\n  agents:\n    backend: openrouter\n    base_url: {}\n    hedge:\n      enabled: {hedging}\n{}",
        llm.url,
        // Under `agents:` when indented by four, a top-level key when by two.
        extra
    );
    let runner = tokio::task::spawn_blocking(move || {
        support::Runner::spawn(&yaml, &[("OPENROUTER_API_KEY", "sk-bench")])
    })
    .await
    .expect("spawn");
    let http = reqwest::Client::new();
    let base = runner.base.replace("0.0.0.0", "127.0.0.1");
    // The first tick after start is the first one due; the run covers `minutes` ticks.
    let first_tick = support::next_minute_tick();
    let end = tokio::time::Instant::now() + Duration::from_secs(60 * minutes + 75);
    let mut seen = support::report_freshness(&http, &base, &first_tick, end).await;
    let cycles: Value = http
        .get(format!("{base}/api/cycles"))
        .send()
        .await
        .expect("cycles")
        .json()
        .await
        .expect("json");
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    runner.stop();
    let ticks: Vec<&Value> = cycles["cycles"]
        .as_array()
        .expect("cycles array")
        .iter()
        .filter(|c| {
            c["cycle_id"]
                .as_str()
                .is_some_and(|id| id >= first_tick.as_str())
        })
        .take(minutes as usize)
        .collect();
    let ticks_run = ticks
        .iter()
        .filter(|c| c["skipped_reason"].is_null())
        .count();
    let ids: Vec<&str> = ticks
        .iter()
        .filter_map(|c| c["cycle_id"].as_str())
        .collect();
    seen.retain(|(_, c), _| ids.contains(&c.as_str()));
    let mut fresh: Vec<f64> = seen.values().copied().collect();
    fresh.sort_by(f64::total_cmp);
    let hedges: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("autonomous_runner_agent_hedges_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let limit_end = metrics
        .lines()
        .filter(|l| l.starts_with("autonomous_runner_llm_concurrency_limit"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(f64::min);
    // Requests made for the measured ticks (the prompt names its cycle), hedges included.
    let requests = llm
        .received()
        .iter()
        .filter(|r| {
            let user = r.body["messages"][1]["content"].as_str().unwrap_or("");
            ids.iter().any(|id| user.contains(&format!("Cycle: {id}")))
        })
        .count();
    for c in &ticks {
        eprintln!(
            "[{name}] {} ok {} failed {} skipped {:?} {:?}",
            c["cycle_id"], c["symbols_ok"], c["symbols_failed"], c["skipped_reason"], c["failures"]
        );
    }
    // The most requests in any 60 s window, from the server's own arrival times (the whole
    // run, hedges included).
    let mut arrivals: Vec<tokio::time::Instant> = llm.received().iter().map(|r| r.at).collect();
    arrivals.sort_unstable();
    let mut max_window = 0;
    let mut j = 0;
    for (i, t) in arrivals.iter().enumerate() {
        while j < arrivals.len() && arrivals[j] < *t + Duration::from_secs(60) {
            j += 1;
        }
        max_window = max_window.max(j - i);
    }
    Report {
        name,
        max_window,
        ticks_due: minutes as usize,
        ticks_run,
        due: 20 * minutes as usize,
        published: seen.len(),
        fresh_p50: support::pct(&fresh, 0.5),
        fresh_p95: support::pct(&fresh, 0.95),
        requests,
        hedges,
        limit_end,
    }
}
