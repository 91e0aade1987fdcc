//! The openrouter backend against the test LLM server: every stage, schemas and headers, the
//! key never logged, hostile answers, 429 pauses, the rate limit, budget, fallback, bad keys.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::app::{AppOptions, TestApp, anchored_now, spawn_app, spawn_app_with, unique_prefix};
use crate::helpers::{Proc, config, metric, of_symbol};
use crate::llm_server::{LlmServer, Reply, valid_answer};

const KEY: &str = "sk-or-v1-THIS-KEY-MUST-NEVER-BE-LOGGED-0123456789";

fn llm_extra(url: &str, symbols: &[String], agents_more: &str, more: &str) -> String {
    format!(
        "  symbols: [{}]\n  agents:\n    backend: openrouter\n    base_url: {url}\n    model: test/model-x\n{agents_more}  pipeline:\n    advise_min_score: 0\n{more}",
        symbols.join(", ")
    )
}

fn syms(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}/USD")).collect()
}

fn all_log_text(p: &Proc) -> String {
    let mut s: Vec<String> = p
        .logs
        .lock()
        .unwrap()
        .iter()
        .map(Value::to_string)
        .collect();
    s.extend(p.raw.lock().unwrap().iter().cloned());
    s.join("\n")
}

#[tokio::test]
async fn openrouter_runs_every_stage_with_schemas_and_headers_and_never_logs_the_key() {
    let llm = LlmServer::start().await;
    let symbols: Vec<String> = autonomous_runner::config::DEFAULT_SYMBOLS
        .iter()
        .map(|s| s.to_string())
        .collect();
    let extra = llm_extra(
        &llm.url,
        &symbols,
        "    requests_per_minute: 1000\n    burst: 200\n",
        "",
    );
    let mut p = Proc::spawn(
        "run",
        &config("*/3 * * * * *", &extra),
        &[("OPENROUTER_API_KEY", KEY), ("LOG_LEVEL", "debug")],
    )
    .await;
    let done = p
        .wait_log(
            |l| l["message"] == "cycle finished",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(done["ok"], 20, "every symbol through every stage");
    let (_, latest) = p.get("/api/signals/latest").await;
    let signals = latest["signals"].as_array().unwrap();
    assert_eq!(signals.len(), 20);
    for s in signals {
        assert_eq!(s["stage"], "report");
        assert_eq!(s["is_degraded"], false);
        assert!(
            s["summary"]
                .as_str()
                .unwrap()
                .contains("Trend and momentum agree"),
            "{s}"
        );
        assert_eq!(s["valid"], true, "advice from the model");
    }
    let (_, detailed) = p.get("/health/detailed").await;
    assert!(!detailed.to_string().contains(KEY));
    p.signal("TERM");
    assert_eq!(p.wait_exit(Duration::from_secs(20)).await, 0);

    let received = llm.received();
    let stages: BTreeSet<String> = received.iter().map(|r| r.stage.clone()).collect();
    assert_eq!(
        stages,
        ["advice", "report", "signal"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    for r in &received {
        assert_eq!(r.headers["authorization"], format!("Bearer {KEY}").as_str());
        assert!(r.headers.contains_key("http-referer"));
        assert_eq!(r.headers["x-openrouter-title"], "autonomous-runner");
        let rf = &r.body["response_format"];
        assert_eq!(rf["type"], "json_schema");
        assert_eq!(
            rf["json_schema"]["name"],
            match r.stage.as_str() {
                "advice" => "advice",
                s => s,
            }
        );
        assert_eq!(rf["json_schema"]["strict"], true);
        assert_eq!(rf["json_schema"]["schema"]["additionalProperties"], false);
        assert_eq!(r.body["model"], "test/model-x");
    }
    let sig = received.iter().find(|r| r.stage == "signal").unwrap();
    let user = sig.body["messages"][1]["content"].as_str().unwrap();
    for needle in [
        "Symbol: ",
        "price_change_1h",
        "volatility_1h",
        "volume_ratio",
        "ema_trend",
        "hit_rate",
    ] {
        assert!(user.contains(needle), "prompt lacks {needle}: {user}");
    }
    let logs = all_log_text(&p);
    assert!(logs.len() > 1000, "debug logs were captured");
    assert!(
        !logs.contains(KEY) && !logs.contains("THIS-KEY-MUST-NEVER"),
        "the API key leaked into the logs"
    );
}

#[tokio::test]
async fn a_429_with_retry_after_pauses_calls_for_that_long() {
    let llm = LlmServer::start().await;
    llm.next(vec![Reply::Status(429, Some("2".into()))]);
    let extra = llm_extra(
        &llm.url,
        &["ETH/USD".to_string()],
        "",
        // A backoff far past the call's deadline: only the provider's Retry-After can bring
        // the retry in time, so a completed symbol proves it was obeyed.
        "  retry:\n    max_attempts: 3\n    delay_seconds: 60\n",
    );
    let app = spawn_app(config("*/15 * * * * *", &extra)).await;
    let first = app.wait_cycles(1, Duration::from_secs(40)).await;
    // …in time: the symbol completed (the 60 s backoff would have missed its deadline).
    assert_eq!(first[0]["symbols_ok"], 1, "{}", first[0]);
    let r = llm.received();
    assert!(
        r.len() >= 4,
        "429, then signal, advice, report: {}",
        r.len()
    );
    let gap = r[1].at.duration_since(r[0].at);
    // Retry-After: 2 → the next call no sooner than 2 s later…
    assert!(gap >= Duration::from_secs(2), "gap {gap:?}");
    let (_, d) = app.get("/health/detailed").await;
    assert_eq!(
        d["llm"]["since_start"]["requests"]["llm_rate_limited"], 1,
        "{d}"
    );
}

/// The most of these instants that fall in any window of length `w`.
fn max_in_any_window(times: &[tokio::time::Instant], w: Duration) -> usize {
    let mut t = times.to_vec();
    t.sort();
    (0..t.len())
        .map(|i| {
            t[i..]
                .iter()
                .take_while(|u| u.duration_since(t[i]) < w)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// What GCRA allows in any window of `w` for `per_minute` with bursts of `burst`: the burst,
/// then one call per emission interval — plus one call of slack for the gap between our
/// admission and the server's receipt. (The limit providers enforce, `per_minute` in any
/// 60 s window, follows from the same interval; the paused-clock unit tests check it exactly.)
fn gcra_allows(per_minute: u32, burst: u32, w: Duration) -> usize {
    let t = autonomous_runner::resilience::rate_limit::emission_interval(per_minute, burst);
    burst as usize + (w.as_secs_f64() / t.as_secs_f64()).floor() as usize + 1
}

/// Waits until the test LLM server has received `n` requests.
async fn wait_requests(llm: &LlmServer, n: usize, timeout: Duration) {
    crate::helpers::eventually(format!("{n} LLM requests"), timeout, || async {
        match llm.received().len() {
            got if got >= n => Ok(()),
            got => Err(format!("{got} received")),
        }
    })
    .await
}

/// Whether any ran cycle of `app` lost a symbol to the rate limit (demand really exceeded it).
async fn limited(app: &TestApp) -> bool {
    app.run_cycles().await.iter().any(|c| {
        c["failures"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["reason"] == "rate_limit_wait"))
    })
}

#[tokio::test]
async fn rate_limit_holds_in_every_window_under_far_higher_demand() {
    let llm = LlmServer::start().await;
    // 30 symbols every 3 s want ~30 calls a second; the limit is 240 a minute (4 a second,
    // bursts of 5).
    let extra = llm_extra(
        &llm.url,
        &syms("R", 30),
        "    requests_per_minute: 240\n    burst: 5\n",
        "  timeouts:\n    symbol_timeout_seconds: 2.5\n    symbol_timeout_max_seconds: 2.5\n    total_timeout_seconds: 2.5\n",
    );
    let app = spawn_app(&config("*/3 * * * * *", &extra)).await;
    wait_requests(&llm, 80, Duration::from_secs(60)).await;
    let was_limited = limited(&app).await;
    app.stop().await.expect("clean stop");
    let times: Vec<_> = llm.received().iter().map(|r| r.at).collect();
    for w in [1, 5, 10] {
        let w = Duration::from_secs(w);
        let (worst, allowed) = (max_in_any_window(&times, w), gcra_allows(240, 5, w));
        assert!(
            worst <= allowed,
            "{worst} calls in one {w:?} window (GCRA allows {allowed})"
        );
    }
    assert!(was_limited, "demand really exceeded the limit");
}

#[tokio::test]
async fn shared_rate_limit_across_three_replicas() {
    let redis = crate::redis_server::RedisServer::start().await;
    let llm = LlmServer::start().await;
    let extra = format!(
        "{}  coordination:\n    backend: redis\n    redis_url: {}\n    work_sharing: true\n",
        llm_extra(
            &llm.url,
            &syms("W", 30),
            "    requests_per_minute: 240\n    burst: 5\n",
            "  timeouts:\n    symbol_timeout_seconds: 2.5\n    symbol_timeout_max_seconds: 2.5\n    total_timeout_seconds: 2.5\n",
        ),
        redis.url()
    );
    let (clock, prefix) = (anchored_now(), unique_prefix("shared-rl"));
    let mut apps = vec![];
    for i in 0..3 {
        apps.push(
            spawn_app_with(
                &config("*/3 * * * * *", &extra),
                AppOptions {
                    instance_id: Some(format!("rl-{i}")),
                    key_prefix: Some(prefix.clone()),
                    clock: clock.clone(),
                    ..AppOptions::default()
                },
            )
            .await,
        );
    }
    wait_requests(&llm, 80, Duration::from_secs(60)).await;
    let mut asked = vec![];
    for a in apps {
        // Every replica was asking (so the limit really was shared, not one replica's own).
        asked.push(!a.run_cycles().await.is_empty());
        a.stop().await.expect("clean stop");
    }
    assert_eq!(asked, [true, true, true]);
    let times: Vec<_> = llm.received().iter().map(|r| r.at).collect();
    // One limit for the three: a replica's own would allow three times as many.
    for w in [1, 5, 10] {
        let w = Duration::from_secs(w);
        let (worst, allowed) = (max_in_any_window(&times, w), gcra_allows(240, 5, w));
        assert!(
            worst <= allowed,
            "{worst} agent calls across the replicas in one {w:?} window (GCRA allows {allowed})"
        );
    }
}

/// What the runner must make of a hostile answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Not trusted: the symbol fails with `invalid_output`.
    Rejected,
    /// An unambiguous slip: published after repair, counted `repaired`.
    Repaired,
    /// Fine as it is: published with its text verbatim (markup stays text).
    Verbatim,
}

/// (symbol, hostile answer, what must happen).
pub fn hostile_cases() -> Vec<(&'static str, Reply, Expect)> {
    use Expect::*;
    let good = |s: &str| valid_answer("signal", s);
    let with = |s: &str, k: &str, v: Value| {
        let mut a = good(s);
        a[k] = v;
        a
    };
    let without = |s: &str, k: &str| {
        let mut a = good(s);
        a.as_object_mut().unwrap().remove(k);
        a
    };
    vec![
        (
            "H0/USD",
            Reply::Answer(with("H0/USD", "action", json!("STRONG_BUY"))),
            Rejected,
        ),
        (
            "H1/USD",
            Reply::Answer(with("H1/USD", "confidence", json!(1.5))),
            Rejected,
        ),
        (
            "H2/USD",
            Reply::Answer(with("H2/USD", "confidence", json!(-0.2))),
            Rejected,
        ),
        (
            "H3/USD",
            Reply::Content(good("H3/USD").to_string().replace("0.9", "NaN")),
            Rejected,
        ),
        (
            "H4/USD",
            Reply::Answer(without("H4/USD", "reasoning")),
            Rejected,
        ),
        // The symbol is the runner's: a model that still sends one, even a wrong one, is not
        // trusted with it (ignored, a repair), and its judgment is kept.
        (
            "H5/USD",
            Reply::Answer(with("H5/USD", "symbol", json!("BTC/USD"))),
            Repaired,
        ),
        (
            "H6/USD",
            Reply::Answer(with("H6/USD", "reasoning", json!("x".repeat(2001)))),
            Repaired,
        ),
        (
            "H7/USD",
            Reply::Content(format!("Sure! Here is the signal: {}", good("H7/USD"))),
            Rejected,
        ),
        (
            "H8/USD",
            Reply::Content(format!("```json\n{}\n```", good("H8/USD"))),
            Rejected,
        ),
        (
            "H9/USD",
            Reply::RawBody(format!(
                "{{\"choices\":[{{\"message\":{{\"content\":\"{}\"}}}}]}}",
                "A".repeat(2 * 1024 * 1024)
            )),
            Rejected,
        ),
        ("H10/USD", Reply::RawBody(String::new()), Rejected),
        (
            "H11/USD",
            Reply::RawBody("<html><body>502 Bad Gateway</body></html>".into()),
            Rejected,
        ),
        (
            "H12/USD",
            Reply::Answer(with("H12/USD", "extra_field", json!(true))),
            Repaired,
        ),
        (
            "H13/USD",
            Reply::Answer(with(
                "H13/USD",
                "reasoning",
                json!("<img src=x onerror=alert(1)><script>alert('x')</script> & more"),
            )),
            Verbatim,
        ),
        (
            "H14/USD",
            Reply::Answer(with("H14/USD", "action", json!(" buy "))),
            Repaired,
        ),
    ]
}

#[tokio::test]
async fn hostile_answers_are_rejected_repaired_or_kept_as_text() {
    let llm = LlmServer::start().await;
    let cases = hostile_cases();
    for (s, r, _) in &cases {
        llm.always_for(s, "signal", r.clone());
    }
    let symbols: Vec<String> = cases.iter().map(|(s, _, _)| s.to_string()).collect();
    let extra = llm_extra(
        &llm.url,
        &symbols,
        "    requests_per_minute: 1000\n    burst: 100\n",
        "  retry:\n    max_attempts: 1\n",
    );
    let app = spawn_app(config("*/2 * * * * *", &extra)).await;
    let cycle = app.wait_cycles(1, Duration::from_secs(30)).await[0].clone();
    let (_, latest) = app.get("/api/signals/latest").await;
    let published = |s: &str| of_symbol(&latest["signals"], s);
    let failure = |s: &str| of_symbol(&cycle["failures"], s);
    for (s, _, expect) in &cases {
        match expect {
            Expect::Rejected => {
                let f = failure(s).unwrap_or_else(|| panic!("{s} not failed: {cycle}"));
                assert_eq!(f["reason"], "invalid_output", "{s}: {f}");
                assert_eq!(f["stage"], "signal", "{s}: {f}");
                assert!(published(s).is_none(), "{s} was published");
            }
            Expect::Repaired => {
                assert!(failure(s).is_none(), "{s} should be repaired: {cycle}");
                let sig = published(s).unwrap_or_else(|| panic!("{s} not published"));
                assert_eq!(sig["action"], "BUY");
                assert!(sig["reasoning"].as_str().unwrap().chars().count() <= 2000);
            }
            Expect::Verbatim => {
                assert!(failure(s).is_none(), "{s} should be accepted: {cycle}");
                let sig = published(s).expect("published");
                assert_eq!(
                    sig["reasoning"],
                    "<img src=x onerror=alert(1)><script>alert('x')</script> & more",
                    "kept verbatim as text"
                );
            }
        }
    }
    let h6 = published("H6/USD").unwrap();
    assert!(
        h6["reasoning"].as_str().unwrap().ends_with(" […]"),
        "a truncated text says so"
    );
    let count = |e: Expect| cases.iter().filter(|c| c.2 == e).count() as u64;
    // Every answer is counted by outcome, those the transport could not read as JSON too:
    // this app's own tallies, taken after its first cycle (later cycles only add).
    let (_, d) = app.get("/health/detailed").await;
    let tallies = &d["llm"]["since_start"];
    let outputs = |o: &str| tallies["outputs"]["signal"][o].as_u64().unwrap_or(0);
    assert!(outputs("repaired") >= count(Expect::Repaired), "{tallies}");
    assert!(outputs("rejected") >= count(Expect::Rejected), "{tallies}");
    assert!(
        tallies["requests"]["invalid_output"].as_u64().unwrap_or(0) >= count(Expect::Rejected),
        "{tallies}"
    );
    // The service took all of it in its stride: it is still running cycles, and stops cleanly.
    let seen = app.run_cycles().await.len();
    app.wait_cycles(seen + 1, Duration::from_secs(20)).await;
    app.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn miscounted_strategies_are_repaired_and_the_signal_agrees_with_its_breakdown() {
    let llm = LlmServer::start().await;
    llm.set_miscount(true);
    let extra = llm_extra(&llm.url, &syms("M", 3), "", "");
    let p = spawn_app(&config("*/2 * * * * *", &extra)).await;
    let latest = p
        .poll("/api/signals/latest", Duration::from_secs(30), |v| {
            v["signals"].as_array().is_some_and(|a| a.len() == 3)
        })
        .await;
    for s in latest["signals"].as_array().unwrap() {
        let breakdown = s["strategy_breakdown"].as_array().unwrap();
        let n = |dir: &str| breakdown.iter().filter(|b| b["signal"] == dir).count();
        assert_eq!(s["strategies_analyzed"], breakdown.len(), "{s}");
        assert_eq!(s["strategies_bullish"], n("BUY"));
        assert_eq!(s["strategies_bearish"], n("SELL"));
        assert_eq!(s["strategies_neutral"], n("HOLD"));
        // The runner's six strategies, not the model's 0.
        assert_eq!(
            s["strategies_analyzed"],
            autonomous_runner::strategy::strategy_names().len(),
            "not the model's 0"
        );
    }
    let (_, m) = p.get_text("/metrics").await;
    assert!(
        metric(
            &m,
            "autonomous_runner_agent_outputs_total",
            &[("stage", "signal"), ("outcome", "repaired")]
        ) >= 3.0
    );
    // None of this test's symbols was lost to its answers (the series are per symbol, so
    // other tests in this process do not count here).
    for sym in syms("M", 3) {
        assert_eq!(
            metric(
                &m,
                "autonomous_runner_signal_generation_skipped_total",
                &[("symbol", sym.as_str()), ("reason", "invalid_output")]
            ),
            0.0
        );
    }
}

#[tokio::test]
async fn a_spent_budget_stops_llm_calls_and_shows_in_readiness() {
    let llm = LlmServer::start().await;
    // Every answer reports 1,000 + 200 tokens; each call reserves its prompt's bytes + 64 +
    // max_tokens (100) before it goes out. One call at a time, so the count is exact.
    llm.set_usage(1000, 200);
    const BUDGET: u64 = 20_000;
    let extra = llm_extra(
        &llm.url,
        &syms("B", 3),
        &format!("    max_tokens: 100\n    budget:\n      tokens_per_hour: {BUDGET}\n"),
        "  parallel:\n    max_concurrent: 1\n    min_concurrent: 1\n",
    );
    let p = spawn_app(config("*/2 * * * * *", &extra)).await;
    let ready = p
        .poll("/health/ready", Duration::from_secs(60), |v| {
            v["checks"]["llm_budget_available"] == false
        })
        .await;
    assert!(
        ready["reasons"]["llm_budget_available"]
            .as_str()
            .unwrap()
            .contains("hour")
    );
    assert_eq!(
        p.get("/health/ready").await.0,
        503,
        "no fallback: not ready"
    );
    // Two more cycles: no more calls, each symbol skipped with the reason.
    let seen = p.run_cycles().await.len();
    let calls = llm.received().len() as u64;
    let cycles = p.wait_cycles(seen + 2, Duration::from_secs(20)).await;
    assert!(
        cycles.iter().rev().take(2).all(|c| c["failures"]
            .as_array()
            .is_some_and(|f| f.len() == 3 && f.iter().all(|f| f["reason"] == "budget_exhausted"))),
        "{cycles:?}"
    );
    assert_eq!(
        llm.received().len() as u64,
        calls,
        "no LLM call after the budget was spent"
    );
    let (_, d) = p.get("/health/detailed").await;
    let used = d["llm"]["budget"]["used_this_hour"].as_u64().unwrap();
    // Exactly what the provider reported, call by call, and never over the budget.
    assert_eq!(used, calls * 1200);
    assert!(used <= BUDGET, "{used} tokens spent of {BUDGET}");
    // Each reservation is under 6,000 tokens, so calls stop only within 6,000 of the budget.
    assert!(used + 6000 > BUDGET, "stopped early: {used} of {BUDGET}");
    assert_eq!(d["llm"]["budget"]["exhausted"], "hour");
    let (_, m) = p.get_text("/metrics").await;
    assert!(
        metric(
            &m,
            "autonomous_runner_llm_budget_exhausted_total",
            &[("window", "hour")]
        ) >= 1.0
    );
    for s in syms("B", 3) {
        assert!(
            metric(
                &m,
                "autonomous_runner_signal_generation_skipped_total",
                &[("symbol", s.as_str()), ("reason", "budget_exhausted")]
            ) >= 2.0
        );
    }
    // The tokens this app counted are the provider's, call by call (per app: the metrics
    // recorder is shared by the tests running in this process).
    assert_eq!(d["llm"]["tokens_total"], calls * 1200);
}

#[tokio::test]
async fn fallback_produces_degraded_signals_while_the_breaker_is_open_then_real_ones() {
    let llm = LlmServer::start().await;
    llm.set_default(Some(Reply::Status(503, None)));
    let extra = llm_extra(
        &llm.url,
        &syms("F", 4),
        "    fallback: rules\n",
        "  retry:\n    max_attempts: 1\n  circuit_breaker:\n    llm_service:\n      failure_threshold: 2\n      recovery_timeout_seconds: 3\n      half_open_max_calls: 1\n      success_threshold: 1\n  parallel:\n    max_concurrent: 1\n    min_concurrent: 1\n",
    );
    let p = spawn_app(&config("*/2 * * * * *", &extra)).await;
    // While open: degraded signals, produced by rules, published.
    let latest = p
        .poll("/api/signals/latest", Duration::from_secs(30), |v| {
            v["signals"]
                .as_array()
                .is_some_and(|a| a.iter().any(|s| s["is_degraded"] == true))
        })
        .await;
    let degraded = latest["signals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["is_degraded"] == true)
        .unwrap()
        .clone();
    assert!(degraded["summary"].as_str().unwrap().len() > 10);
    // Degraded, not down: the dashboard and SSE stay in the load balancer.
    let (code, ready) = p.get("/health/ready").await;
    assert_eq!(code, 200, "{ready}");
    assert_eq!(ready["degraded"], true);
    assert!(
        ready["degraded_reasons"]["circuit_breaker_closed"]
            .as_str()
            .unwrap()
            .contains("llm_openrouter")
    );
    let (_, d) = p.get("/health/detailed").await;
    assert_eq!(d["status"], "degraded");
    // The provider recovers; after the recovery timeout a probe closes the breaker.
    llm.set_default(None);
    let healed = p
        .poll("/api/signals/latest", Duration::from_secs(40), |v| {
            v["signals"].as_array().is_some_and(|a| {
                a.len() == 4
                    && a.iter().all(|s| {
                        s["is_degraded"] == false
                            && s["summary"]
                                .as_str()
                                .unwrap_or("")
                                .contains("Trend and momentum agree")
                    })
            })
        })
        .await;
    assert_eq!(healed["signals"].as_array().unwrap().len(), 4);
    let ready = p
        .poll("/health/ready", Duration::from_secs(10), |v| {
            v["degraded"] == false
        })
        .await;
    assert_eq!(ready["status"], "ready");
}

#[tokio::test]
async fn a_rejected_key_is_not_retried_and_flips_readiness() {
    let llm = LlmServer::start().await;
    llm.set_default(Some(Reply::Status(401, None)));
    let extra = llm_extra(
        &llm.url,
        &syms("K", 2),
        "",
        "  retry:\n    max_attempts: 3\n    delay_seconds: 0.1\n",
    );
    let app = spawn_app_with(
        config("*/2 * * * * *", &extra),
        AppOptions {
            env: [("OPENROUTER_API_KEY".to_string(), "sk-bad".to_string())].into(),
            ..AppOptions::default()
        },
    )
    .await;
    let r = app
        .poll("/health/ready", Duration::from_secs(20), |v| {
            v["checks"]["llm_credentials_valid"] == false
        })
        .await;
    assert!(
        r["reasons"]["llm_credentials_valid"]
            .as_str()
            .unwrap()
            .contains("401")
    );
    let cycles = app.wait_cycles(1, Duration::from_secs(10)).await.len();
    // One request per symbol per cycle: a 401 is not retried (one more cycle may have begun).
    let per_symbol = llm
        .received()
        .iter()
        .filter(|r| r.symbol == "K0/USD")
        .count();
    assert!(
        per_symbol <= cycles + 1,
        "{per_symbol} requests over {cycles} cycles"
    );
    let (_, d) = app.get("/health/detailed").await;
    let refused = d["llm"]["since_start"]["requests"]["llm_refused"]
        .as_u64()
        .unwrap_or(0);
    assert!(refused >= 2, "{d}");
    // The refused key is named by what happened to it, never by its value, on any page.
    for path in [
        "/health/ready",
        "/health/detailed",
        "/api/cycles",
        "/metrics",
    ] {
        let (_, text) = app.get_text(path).await;
        assert!(!text.contains("sk-bad"), "{path} shows the key");
    }
}
