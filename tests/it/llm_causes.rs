//! When the model endpoint fails, the failure keeps its cause: a dead URL names the refused
//! `host:port`, a 500 the start of its body, a cut-off answer says it was truncated, and an
//! open breaker says what opened it — in `/api/cycles` and in `/health/detailed`. And an
//! endpoint that behaves like llama.cpp's server (no `json_schema`, no `content: null`, one
//! request at a time) is served by `structured_output: auto` without any setting.

use std::time::Duration;

use serde_json::Value;

use crate::app::spawn_app;
use crate::helpers::{config, free_port, of_symbol};
use crate::llm_server::{LlmServer, Quirks, Reply};

fn llm_yaml(url: &str, symbols: &str, agents_more: &str, more: &str) -> String {
    config(
        "*/2 * * * * *",
        &format!(
            "  symbols: [{symbols}]\n  agents:\n    backend: openrouter\n    base_url: {url}\n    model: test/model-x\n    requests_per_minute: 1000\n    burst: 100\n{agents_more}  retry:\n    max_attempts: 1\n{more}"
        ),
    )
}

/// The first ran cycle's failure for `symbol`, waited for.
async fn first_failure(app: &crate::app::TestApp, symbol: &str) -> Value {
    let cycles = app.wait_cycles(1, Duration::from_secs(30)).await;
    of_symbol(&cycles[0]["failures"], symbol)
        .unwrap_or_else(|| panic!("{symbol} did not fail: {}", cycles[0]))
}

#[tokio::test]
async fn a_dead_url_names_the_refused_host_and_port() {
    let port = free_port();
    let app = spawn_app(llm_yaml(
        &format!("http://127.0.0.1:{port}/v1"),
        "ETH/USD",
        "",
        "",
    ))
    .await;
    let f = first_failure(&app, "ETH/USD").await;
    assert_eq!(f["reason"], "llm_unreachable", "{f}");
    let want = format!("connection refused to 127.0.0.1:{port}");
    assert!(f["error"].as_str().unwrap().contains(&want), "{f}");
    let (_, d) = app.get("/health/detailed").await;
    let last = &d["llm"]["last_errors"]["openrouter"];
    assert_eq!(last["symbol"], "ETH/USD", "{d}");
    assert_eq!(last["stage"], "signal");
    assert_eq!(last["reason"], "llm_unreachable");
    assert!(last["error"].as_str().unwrap().contains(&want), "{last}");
}

#[tokio::test]
async fn a_500_keeps_its_body_and_the_breaker_says_what_opened_it() {
    let llm = LlmServer::start().await;
    llm.set_default(Some(Reply::StatusBody(
        500,
        r#"{"error":{"message":"model 'llama-3' is not loaded","type":"server_error"}}"#.into(),
    )));
    // One failure opens the breaker, for an hour; one symbol at a time, so the second symbol
    // of the tick meets it open.
    let app = spawn_app(llm_yaml(
        &llm.url,
        "ETH/USD, BTC/USD",
        "",
        "  parallel:\n    max_concurrent: 1\n    min_concurrent: 1\n  circuit_breaker:\n    llm_service:\n      failure_threshold: 1\n      recovery_timeout_seconds: 3600\n",
    ))
    .await;
    let cycles = app.wait_cycles(1, Duration::from_secs(30)).await;
    let failures = &cycles[0]["failures"];
    let f = failures[0].clone();
    assert_eq!(f["reason"], "llm_5xx", "{f}");
    assert_eq!(
        f["error"],
        "agent provider answered HTTP 500: model 'llama-3' is not loaded"
    );
    let second = failures[1].clone();
    assert_eq!(second["reason"], "circuit_open", "{second}");
    assert_eq!(
        second["error"],
        "circuit breaker open (it opened after: agent provider answered HTTP 500: model 'llama-3' is not loaded)"
    );
    let (_, d) = app.get("/health/detailed").await;
    let b = &d["circuit_breakers"]["llm_openrouter"];
    assert_eq!(b["state"], "open", "{d}");
    assert_eq!(
        b["opened_because"],
        "agent provider answered HTTP 500: model 'llama-3' is not loaded"
    );
    assert_eq!(
        d["llm"]["last_errors"]["openrouter"]["error"],
        "agent provider answered HTTP 500: model 'llama-3' is not loaded"
    );
    assert_eq!(
        llm.received().len(),
        1,
        "the open breaker sent nothing more"
    );
}

#[tokio::test]
async fn a_cut_off_answer_is_reported_as_truncated() {
    let llm = LlmServer::start().await;
    llm.set_default(Some(Reply::Truncated));
    let app = spawn_app(llm_yaml(&llm.url, "ETH/USD", "", "")).await;
    let f = first_failure(&app, "ETH/USD").await;
    assert_eq!(f["reason"], "invalid_output", "{f}");
    assert!(
        f["error"]
            .as_str()
            .unwrap()
            .contains("truncated: the answer hit the completion limit"),
        "{f}"
    );
}

/// A server with llama-cpp-python's habits, the runner on its defaults for the format: the
/// first `json_schema` request is refused, every later one is `json_object` with the schema,
/// and every symbol is published; the schema is in the prompt too.
#[tokio::test]
async fn auto_finds_the_format_a_llama_cpp_like_server_takes() {
    let llm = LlmServer::start().await;
    llm.set_quirks(Quirks::llama_cpp());
    let app = spawn_app(llm_yaml(
        &llm.url,
        "ETH/USD, BTC/USD, SOL/USD",
        "",
        "  pipeline:\n    advise_min_score: 0\n",
    ))
    .await;
    let cycles = app.wait_cycles(2, Duration::from_secs(30)).await;
    for c in &cycles {
        assert_eq!(c["symbols_ok"], 3, "{c}");
    }
    let got = llm.received();
    let kind = |r: &crate::llm_server::Received| {
        r.body["response_format"]["type"]
            .as_str()
            .unwrap_or("none")
            .to_string()
    };
    let refused = got.iter().filter(|r| kind(r) == "json_schema").count();
    // Only calls already on their way when the first refusal came back used json_schema.
    assert!((1..=3).contains(&refused), "{refused} json_schema requests");
    let first_object = got
        .iter()
        .position(|r| kind(r) == "json_object")
        .expect("fell back to json_object");
    assert!(
        got[first_object..].iter().all(|r| kind(r) == "json_object"),
        "once stepped down, it stays down"
    );
    for r in &got {
        let user = r.body["messages"][1]["content"].as_str().unwrap_or("");
        assert!(
            user.contains("JSON Schema"),
            "the schema is described in the prompt"
        );
    }
    let (_, latest) = app.get("/api/signals/latest").await;
    assert_eq!(latest["total"], 3);
}

/// Tools mode against the same server: the assistant message that asked for tools goes back
/// with string content (null is refused), and the symbol is published.
#[tokio::test]
async fn tool_rounds_work_on_a_server_that_refuses_null_content() {
    let llm = LlmServer::start().await;
    llm.set_quirks(Quirks::llama_cpp());
    // The signal stage is the one offered tools (the report stage none).
    llm.always_for(
        "ETH/USD",
        "signal",
        Reply::CallTools {
            calls: vec![(
                "get_volatility".into(),
                serde_json::json!({"symbol": "ETH/USD"}),
            )],
            rounds: 1,
        },
    );
    let app = spawn_app(llm_yaml(
        &llm.url,
        "ETH/USD",
        "    tools: mcp\n    structured_output: json_object\n",
        "",
    ))
    .await;
    let cycles = app.wait_cycles(1, Duration::from_secs(30)).await;
    assert_eq!(cycles[0]["symbols_ok"], 1, "{}", cycles[0]);
    let back = llm
        .received()
        .into_iter()
        .find_map(|r| {
            r.body["messages"]
                .as_array()
                .and_then(|m| m.iter().find(|m| m["role"] == "assistant").cloned())
        })
        .expect("a tool round was sent back");
    assert_eq!(back["content"], "", "{back}");
}

/// An answer that breaks the schema gets one follow-up turn with its exact errors: the model
/// sees its own answer and what was wrong, and its corrected answer is published; one that is
/// still wrong fails the symbol after exactly two requests.
#[tokio::test]
async fn a_rejected_answer_is_shown_its_errors_once() {
    let llm = LlmServer::start().await;
    let mut bad = crate::llm_server::valid_answer("signal", "ETH/USD");
    bad["confidence"] = serde_json::json!(1.2);
    // ETH/USD: wrong once, then right. BTC/USD: wrong every time.
    llm.next_for("ETH/USD", "signal", vec![Reply::Answer(bad.clone())]);
    let mut bad_btc = crate::llm_server::valid_answer("signal", "BTC/USD");
    bad_btc["confidence"] = serde_json::json!(1.2);
    llm.always_for("BTC/USD", "signal", Reply::Answer(bad_btc));
    let app = spawn_app(llm_yaml(
        &llm.url,
        "ETH/USD, BTC/USD",
        "",
        "  parallel:\n    max_concurrent: 1\n    min_concurrent: 1\n",
    ))
    .await;
    let cycles = app.wait_cycles(1, Duration::from_secs(30)).await;
    let c = &cycles[0];
    assert_eq!(c["symbols_ok"], 1, "{c}");
    let f = of_symbol(&c["failures"], "BTC/USD").expect("BTC/USD failed");
    assert_eq!(f["reason"], "invalid_output");
    assert!(f["error"].as_str().unwrap().contains("confidence"), "{f}");
    let signal_requests = |symbol: &str| -> Vec<Value> {
        llm.received()
            .into_iter()
            .filter(|r| r.symbol == symbol && r.stage == "signal")
            .filter(|r| {
                r.body["messages"][1]["content"]
                    .as_str()
                    .unwrap_or("")
                    .contains(&format!("Cycle: {}", c["cycle_id"].as_str().unwrap()))
            })
            .map(|r| r.body)
            .collect()
    };
    let eth = signal_requests("ETH/USD");
    assert_eq!(eth.len(), 2, "the answer and one follow-up");
    let follow = eth[1]["messages"].as_array().unwrap();
    assert_eq!(follow[2]["role"], "assistant");
    let shown: Value = serde_json::from_str(follow[2]["content"].as_str().unwrap()).unwrap();
    assert_eq!(shown["confidence"], 1.2, "the model sees its own answer");
    assert_eq!(follow[3]["role"], "user");
    let told = follow[3]["content"].as_str().unwrap();
    assert!(told.starts_with("Your answer was rejected: "), "{told}");
    assert!(told.contains("confidence"), "{told}");
    assert_eq!(
        signal_requests("BTC/USD").len(),
        2,
        "one follow-up, no more"
    );
    let (_, latest) = app.get("/api/signals/latest").await;
    let eth_signal = of_symbol(&latest["signals"], "ETH/USD").expect("published");
    assert_eq!(eth_signal["confidence"], 0.9, "the corrected answer");
    let (_, d) = app.get("/health/detailed").await;
    let r = &d["llm"]["since_start"]["reprompts"];
    assert_eq!(r["fixed"], 1, "{d}");
    assert_eq!(r["still_invalid"], 1, "{d}");
}

/// Twenty symbols against a server that answers one request at a time (0.6 s each) on a
/// 10-second tick: the first tick sends ten at once and most of them time out in the
/// server's queue — overload, which shrinks the in-flight limit but never opens the breaker;
/// from then on each tick is planned at the server's real rate, so the symbols that cannot
/// be served are left out up front (`capacity`) instead of timing out.
#[tokio::test]
async fn a_serial_server_is_overloaded_once_and_never_opens_the_breaker() {
    let llm = LlmServer::start().await;
    llm.set_quirks(crate::llm_server::Quirks {
        one_at_a_time: true,
        ..Default::default()
    });
    llm.set_default(Some(Reply::Slow(Duration::from_millis(600))));
    let symbols: Vec<String> = (0..20).map(|i| format!("S{i}/USD")).collect();
    let yaml = llm_yaml(
        &llm.url,
        &symbols.join(", "),
        "",
        "  timeouts:\n    symbol_timeout_seconds: 2.5\n    symbol_timeout_max_seconds: 2.5\n    total_timeout_seconds: 8\n  adaptive:\n    p95_threshold_ms: 5000\n    p99_threshold_ms: 6000\n  pipeline:\n    advise_min_score: 100\n    report_mode: template\n",
    )
    .replace("*/2 * * * * *", "*/10 * * * * *");
    let app = spawn_app(yaml).await;
    let cycles = app.wait_cycles(5, Duration::from_secs(90)).await;
    let line = |c: &Value| {
        let count = |reason: &str| {
            c["failures"]
                .as_array()
                .map_or(0, |f| f.iter().filter(|x| x["reason"] == reason).count())
        };
        format!(
            "{} ok {} capacity {} timeout {} cycle_deadline {} circuit_open {} skipped {:?}",
            c["cycle_id"],
            c["symbols_ok"],
            c["skipped"].as_array().map_or(0, Vec::len),
            count("timeout"),
            count("cycle_deadline"),
            count("circuit_open"),
            c["skipped_reason"]
        )
    };
    let summary: Vec<String> = cycles[..5].iter().map(line).collect();
    println!("{summary:#?}");
    let (_, d) = app.get("/health/detailed").await;
    let breaker = &d["circuit_breakers"]["llm_openrouter"];
    assert_eq!(breaker["times_opened"], 0, "{breaker}\n{summary:#?}");
    for c in &cycles[..5] {
        assert!(c["skipped_reason"].is_null(), "{summary:#?}");
        assert!(
            c["failures"]
                .as_array()
                .is_none_or(|f| f.iter().all(|x| x["reason"] != "circuit_open")),
            "{summary:#?}"
        );
    }
    // Learned: from the third tick on, what cannot be served is left out up front and what
    // is started is published (a straggler at the deadline at most).
    for c in &cycles[2..5] {
        let shed = c["skipped"].as_array().map_or(0, Vec::len);
        let failed = c["failures"].as_array().map_or(0, Vec::len);
        assert!(shed >= 5, "{summary:#?}");
        assert!(c["symbols_ok"].as_u64().unwrap() >= 5, "{summary:#?}");
        assert!(failed <= 1, "{summary:#?}");
    }
    let limit = d["llm"]["concurrency"]["openrouter"]["limit"]
        .as_u64()
        .unwrap();
    assert!(limit <= 3, "in-flight limit {limit} for a serial server");
    app.stop().await.expect("a clean stop");
}

/// A log line raised deep in an agent call — here the 429 pause, which names no symbol of
/// its own — carries the tick, the symbol and the stage it happened in, from the spans the
/// coordinator and the pipeline open (the JSON log's `spans`).
#[tokio::test]
async fn a_rate_limit_in_the_logs_says_which_symbol_tick_and_stage_it_was() {
    let llm = LlmServer::start().await;
    llm.next_for(
        "TWO/USD",
        "signal",
        vec![Reply::Status(429, Some("1".into()))],
    );
    let yaml = llm_yaml(&llm.url, "ONE/USD, TWO/USD", "", "");
    let p = crate::helpers::Proc::spawn("run", &yaml, &[]).await;
    let line = p
        .wait_log(
            |l| l["message"] == "LLM provider rate-limited us; pausing all calls",
            Duration::from_secs(30),
        )
        .await;
    let spans = line["spans"].as_array().cloned().unwrap_or_default();
    let field = |name: &str, key: &str| {
        spans
            .iter()
            .find(|s| s["name"] == name)
            .and_then(|s| s[key].as_str().map(str::to_string))
    };
    assert_eq!(
        field("symbol", "symbol").as_deref(),
        Some("TWO/USD"),
        "{line}"
    );
    let tick = field("symbol", "cycle_id").unwrap_or_default();
    assert!(
        chrono::DateTime::parse_from_rfc3339(&tick).is_ok(),
        "the tick as a cycle id: {line}"
    );
    assert_eq!(field("stage", "stage").as_deref(), Some("signal"), "{line}");
}
