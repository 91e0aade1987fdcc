//! The opencode backend against a real `opencode serve` (installed by `scripts/test`, run
//! offline) whose model is the test LLM server.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::app::spawn_app;
use crate::helpers::{Proc, config, of_symbol};
use crate::llm_server::{LlmServer, Reply};

/// `OPENCODE_BIN`, or where `scripts/test` installs it.
fn opencode_bin() -> PathBuf {
    if let Ok(p) = std::env::var("OPENCODE_BIN") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".test-tools/opencode/node_modules/opencode-linux-x64/bin/opencode");
    assert!(
        p.exists(),
        "opencode is not installed: run scripts/test (it installs opencode-ai from npm) or set OPENCODE_BIN"
    );
    p
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let dst = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).expect("copy");
        }
    }
}

pub struct OpenCodeServer {
    pub url: String,
    _child: Child,
    _home: tempfile::TempDir,
}

impl OpenCodeServer {
    /// Serves this repository's `agents/opencode` project (a copy), its model the test LLM,
    /// without the runner's MCP tools.
    pub async fn start(llm: &LlmServer) -> OpenCodeServer {
        Self::start_with(llm, None, None).await
    }

    /// As [`start`](Self::start), on `port` (0: any) and with the runner's tools at `mcp_url`.
    pub async fn start_with(
        llm: &LlmServer,
        port: Option<u16>,
        mcp_url: Option<&str>,
    ) -> OpenCodeServer {
        Self::start_full(&llm.url, port, mcp_url).await
    }

    /// As [`start_with`](Self::start_with), its model requests sent to `model_url` (the test
    /// LLM server, or the runner's model gateway in front of it).
    pub async fn start_full(
        model_url: &str,
        port: Option<u16>,
        mcp_url: Option<&str>,
    ) -> OpenCodeServer {
        let home = tempfile::tempdir().expect("tempdir");
        let project = home.path().join("project");
        copy_dir(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("agents/opencode"),
            &project,
        );
        let overlay = json!({
            "enabled_providers": ["local"],
            "model": "local/test-model",
            "small_model": "local/test-model",
            "provider": {"local": {
                "npm": "@ai-sdk/openai-compatible",
                "options": {"baseURL": model_url},
                "models": {"test-model": {"tool_call": true, "temperature": true, "limit": {"context": 128000, "output": 4096}}}
            }},
            "mcp": {"runner": match mcp_url {
                Some(url) => json!({"type": "remote", "url": url, "enabled": true, "oauth": false}),
                None => json!({"type": "remote", "url": "http://127.0.0.1:9/mcp", "enabled": false}),
            }},
        });
        let port = port.unwrap_or(0).to_string();
        let h = home.path();
        let mut cmd = Command::new(opencode_bin());
        cmd.args(["serve", "--port", &port, "--hostname", "127.0.0.1"])
            .current_dir(&project)
            .env("HOME", h)
            .env("XDG_CONFIG_HOME", h.join("config"))
            .env("XDG_DATA_HOME", h.join("data"))
            .env("XDG_CACHE_HOME", h.join("cache"))
            .env("XDG_STATE_HOME", h.join("state"))
            .env("OPENCODE_CONFIG_CONTENT", overlay.to_string())
            .env("OPENCODE_DISABLE_AUTOUPDATE", "1")
            .env("OPENCODE_DISABLE_MODELS_FETCH", "1")
            .env("OPENCODE_DISABLE_SHARE", "1")
            .env("OPENCODE_DISABLE_LSP_DOWNLOAD", "1")
            .env("OPENCODE_DISABLE_DEFAULT_PLUGINS", "1")
            .env("OPENCODE_DISABLE_CLAUDE_CODE", "1")
            .env("OPENCODE_DISABLE_EXTERNAL_SKILLS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn opencode");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    return rest.trim().to_string();
                }
            }
            panic!("opencode exited before listening");
        })
        .await
        .expect("opencode listening within 60 s");
        // Keep draining stdout so the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        OpenCodeServer {
            url,
            _child: child,
            _home: home,
        }
    }

    pub async fn sessions(&self) -> Vec<Value> {
        let (_, v) = crate::helpers::get_json(&format!("{}/session", self.url)).await;
        v.as_array().cloned().unwrap_or_default()
    }
}

fn extra(oc: &str, symbols: &str, more: &str) -> String {
    format!(
        "  symbols: [{symbols}]\n  agents:\n    backend: opencode\n    requests_per_minute: 1000\n    burst: 100\n    opencode:\n      url: {oc}\n      provider_id: local\n      model_id: test-model\n  pipeline:\n    advise_min_score: 0\n{more}"
    )
}

#[tokio::test]
async fn a_cycle_runs_through_opencode_and_a_stalled_symbol_is_aborted_and_deleted() {
    let llm = LlmServer::start().await;
    llm.always_for("STALL/USD", "signal", Reply::Hang);
    let oc = OpenCodeServer::start(&llm).await;
    let more = "  retry:\n    max_attempts: 1\n  timeouts:\n    symbol_timeout_seconds: 40\n    symbol_timeout_max_seconds: 40\n    total_timeout_seconds: 50\n";
    let cfg = extra(
        &oc.url,
        "ETH/USD, BTC/USD, SOL/USD, DOGE/USD, LINK/USD, STALL/USD",
        more,
    );
    // Every signal call gets 15 s (OpenCode is CPU-bound; a loaded CI machine is slow); the stalled one uses all of it.
    let cfg = cfg.replace(
        "    opencode:\n",
        "    stages:\n      signal:\n        timeout_seconds: 15\n    opencode:\n",
    );
    let mut p = Proc::spawn("once", &config("*/1 * * * *", &cfg), &[]).await;
    assert_eq!(p.wait_exit(Duration::from_secs(120)).await, 0);
    let done = p.logs_matching(|l| l["message"] == "cycle finished");
    assert_eq!(done.len(), 1);
    assert_eq!(
        done[0]["ok"], 5,
        "five symbols through every stage via OpenCode: {done:?}"
    );
    let failed = p.logs_matching(|l| l["message"] == "symbol failed" && l["symbol"] == "STALL/USD");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["reason"], "timeout");
    assert!(
        !p.logs_matching(|l| l["message"]
            == "OpenCode call passed its deadline; aborting the session"
            && l["symbol"] == "STALL/USD")
            .is_empty()
    );
    // Every session was deleted, the stalled one included (cleanup runs just after the
    // deadline; allow it a moment).
    crate::helpers::eventually("every session deleted", Duration::from_secs(10), || async {
        match oc.sessions().await {
            left if left.is_empty() => Ok(()),
            left => Err(format!("sessions left: {left:?}")),
        }
    })
    .await;
    // OpenCode asked the model through StructuredOutput with our schemas, titled per symbol.
    let got = llm.received();
    let structured: Vec<_> = got.iter().filter(|r| r.stage != "other").collect();
    assert!(
        structured.len() >= 15,
        "{} structured calls",
        structured.len()
    );
    for r in &structured {
        let tool = r.body["tools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["function"]["name"] == "StructuredOutput")
            .unwrap();
        assert!(tool["function"]["parameters"]["properties"].is_object());
        let names: Vec<&str> = r.body["tools"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t["function"]["name"].as_str())
            .collect();
        assert!(
            !names.contains(&"bash") && !names.contains(&"edit") && !names.contains(&"write"),
            "tools locked down: {names:?}"
        );
    }
}

#[tokio::test]
async fn hostile_answers_through_opencode_are_rejected_or_kept_as_text() {
    let llm = LlmServer::start().await;
    let cases = crate::llm_agents::hostile_cases();
    for (s, r, _) in &cases {
        llm.always_for(s, "signal", r.clone());
    }
    let oc = OpenCodeServer::start(&llm).await;
    let symbols: Vec<String> = cases.iter().map(|(s, _, _)| s.to_string()).collect();
    let cfg = extra(
        &oc.url,
        &symbols.join(", "),
        "  retry:\n    max_attempts: 1\n  parallel:\n    max_concurrent: 14\n  timeouts:\n    symbol_timeout_seconds: 30\n    symbol_timeout_max_seconds: 30\n    total_timeout_seconds: 45\n",
    );
    let p = spawn_app(config("*/30 * * * * *", &cfg)).await;
    let cycle = p.wait_cycles(1, Duration::from_secs(120)).await[0].clone();
    let (_, latest) = p.get("/api/signals/latest").await;
    let failure = |s: &str| of_symbol(&cycle["failures"], s);
    use crate::llm_agents::Expect;
    for (s, _, expect) in &cases {
        let expect = *expect;
        if expect == Expect::Repaired {
            assert!(failure(s).is_none(), "{s} should be repaired: {cycle}");
            let sig = of_symbol(&latest["signals"], s);
            assert!(sig.is_some(), "{s} not published");
        } else if expect == Expect::Verbatim {
            assert!(failure(s).is_none(), "{s} should be accepted: {cycle}");
            let sig = of_symbol(&latest["signals"], s).expect("published");
            assert!(
                sig["reasoning"].as_str().unwrap().contains("<script>"),
                "kept verbatim as text"
            );
        } else {
            assert!(failure(s).is_some(), "{s} was neither rejected nor counted");
        }
    }
    // The rejected answers that reach `info.structured` (H0 an unknown action, H1/H2 a
    // confidence out of range, H4 a missing field) are rejected by the runner and say so; the
    // rest never get past OpenCode (prose, fences, broken bodies end as timeouts). H6 and
    // H12 are repaired, and so is H5 (a symbol is the runner's, never the model's).
    let invalid = cycle["failures"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["reason"] == "invalid_output")
        .count();
    assert!(invalid >= 4, "{invalid} invalid_output: {cycle}");
    p.stop().await.expect("a clean stop");
}

/// An OpenCode agent calls the runner's `/mcp`: the model (scripted) asks for
/// `runner_get_current_price`, OpenCode calls the runner's tool, the model reads the answer
/// and its published reasoning carries the runner's price.
#[tokio::test]
async fn an_opencode_agent_calls_the_runners_tools_over_mcp() {
    let llm = LlmServer::start().await;
    llm.always_for(
        "ETH/USD",
        "signal",
        Reply::CallTools {
            calls: vec![(
                "runner_get_current_price".into(),
                json!({"symbol": "ETH/USD"}),
            )],
            rounds: 1,
        },
    );
    // OpenCode's port first: the runner is configured with it, and OpenCode with the runner's
    // /mcp, so the runner starts first and its first cycles may find OpenCode not up yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let cfg = extra(
        &format!("http://127.0.0.1:{port}"),
        "ETH/USD",
        "  retry:\n    max_attempts: 1\n  timeouts:\n    symbol_timeout_seconds: 25\n    symbol_timeout_max_seconds: 25\n    total_timeout_seconds: 28\n",
    );
    let app = spawn_app(config("*/30 * * * * *", &cfg)).await;
    let _oc =
        OpenCodeServer::start_with(&llm, Some(port), Some(&format!("{}/mcp", app.base))).await;
    app.poll("/api/cycles", Duration::from_secs(150), |c| {
        c["cycles"]
            .as_array()
            .is_some_and(|a| a.iter().any(|t| t["symbols_ok"] == 1))
    })
    .await;
    // The model was sent the runner's answer…
    let asked: Vec<_> = llm
        .received()
        .into_iter()
        .filter(|r| r.symbol == "ETH/USD" && r.stage == "signal")
        .collect();
    let offered: Vec<String> = asked[0].body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["function"]["name"].as_str().map(str::to_string))
        .collect();
    assert!(
        offered.contains(&"runner_get_current_price".to_string())
            && offered.contains(&"runner_get_recent_decisions".to_string()),
        "the signal agent is offered the runner's tools: {offered:?}"
    );
    assert!(
        !offered
            .iter()
            .any(|t| t == "bash" || t == "edit" || t == "write"),
        "{offered:?}"
    );
    // …and its published answer carries the price the runner's tool gave.
    let (_, latest) = app.get("/api/signals/latest").await;
    let sig = of_symbol(&latest["signals"], "ETH/USD").expect("published");
    let reasoning = sig["reasoning"].as_str().unwrap();
    assert!(reasoning.contains("the tools said"), "{reasoning}");
    let said: Value = serde_json::from_str(
        reasoning
            .split("the tools said ")
            .nth(1)
            .unwrap_or("")
            .trim(),
    )
    .unwrap_or_else(|e| panic!("{e}: {reasoning}"));
    assert_eq!(said["symbol"], "ETH/USD", "{said}");
    assert!(said["price"].as_f64().unwrap_or(0.0) > 0.0, "{said}");
    assert_eq!(said["simulated"], true, "{said}");
    app.stop().await.expect("clean stop");
}

/// OpenCode's model requests through the runner's gateway (`/llm/v1`, as the shipped
/// `opencode.json` routes them): against an endpoint that fails every request, OpenCode's own
/// retries stop at the call's allowance instead of running away; the requests reach the model
/// with the runner's key (OpenCode holds none); a request of no call of the runner's is
/// refused; a healthy symbol beside it is published through the same gateway.
#[tokio::test]
async fn opencode_retries_stop_at_the_allowance_of_the_runners_gateway() {
    let llm = LlmServer::start().await;
    llm.always_for("RUN/USD", "signal", Reply::Status(500, None));
    let port = crate::helpers::free_port();
    let cfg = extra(
        &format!("http://127.0.0.1:{port}"),
        "OK/USD, RUN/USD",
        "  retry:\n    max_attempts: 1\n  timeouts:\n    symbol_timeout_seconds: 40\n    symbol_timeout_max_seconds: 40\n    total_timeout_seconds: 45\n",
    )
    .replace(
        "    opencode:\n",
        &format!(
            "    base_url: {}\n    api_key: sk-runner-key-for-gateway-test\n    opencode:\n      max_model_requests: 3\n",
            llm.url
        ),
    );
    let app = spawn_app(config("*/30 * * * * *", &cfg)).await;
    let _oc = OpenCodeServer::start_full(&format!("{}/llm/v1", app.base), Some(port), None).await;
    let cycles = app
        .poll("/api/cycles", Duration::from_secs(150), |c| {
            c["cycles"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|t| t["symbols_ok"] == 1 && of_symbol(&t["failures"], "RUN/USD").is_some())
            })
        })
        .await;
    let cycle = cycles["cycles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["symbols_ok"] == 1 && of_symbol(&t["failures"], "RUN/USD").is_some())
        .unwrap()
        .clone();
    // The failing symbol's sessions: each sent at most its allowance, and at least one was
    // cut off there (OpenCode would have gone on retrying).
    let got = llm.received();
    let mut per_session: std::collections::BTreeMap<String, usize> = Default::default();
    for r in got.iter().filter(|r| r.symbol == "RUN/USD") {
        let s = r
            .headers
            .get("x-session-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none");
        *per_session.entry(s.to_string()).or_default() += 1;
    }
    println!("RUN/USD model requests per session: {per_session:?}");
    assert!(!per_session.is_empty(), "RUN/USD never reached the model");
    assert!(
        per_session.values().all(|n| *n <= 3),
        "a session sent more than its allowance: {per_session:?}"
    );
    assert!(
        per_session.values().any(|n| *n == 3),
        "OpenCode retried less than the allowance, so the cut-off was never tested: {per_session:?}"
    );
    // Every request reached the model with the runner's key, none without a session.
    for r in &got {
        assert_eq!(
            r.headers.get("authorization").and_then(|v| v.to_str().ok()),
            Some("Bearer sk-runner-key-for-gateway-test"),
            "{:?}",
            r.headers
        );
        assert!(r.headers.contains_key("x-session-id"), "{:?}", r.headers);
    }
    // The symbol failed with the cause the gateway gave, not a bare status.
    let failure = of_symbol(&cycle["failures"], "RUN/USD").unwrap();
    let error = failure["error"].as_str().unwrap_or("");
    println!("RUN/USD failure: {failure}");
    assert!(
        error.contains("used its 3 model requests (agents.opencode.max_model_requests)")
            && error.contains("the model's last answer was an HTTP 5xx"),
        "{failure}"
    );
    // Counted.
    let (_, text) = app.get_text("/metrics").await;
    let over = crate::helpers::metric(
        &text,
        "autonomous_runner_opencode_model_requests_total",
        &[("outcome", "over_allowance")],
    );
    let forwarded = crate::helpers::metric(
        &text,
        "autonomous_runner_opencode_model_requests_total",
        &[("outcome", "forwarded")],
    );
    assert!(over >= 1.0, "over_allowance {over}");
    assert!(
        forwarded as usize >= got.len(),
        "forwarded {forwarded}, received {}",
        got.len()
    );
    // Only the runner's calls spend: a request of no session it opened is refused.
    let stray = reqwest::Client::new()
        .post(format!("{}/llm/v1/chat/completions", app.base))
        .header("x-session-id", "ses_not_the_runners")
        .json(&json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(stray.status().as_u16(), 403);
    assert!(
        llm.received().iter().all(
            |r| r.headers.get("x-session-id").and_then(|v| v.to_str().ok())
                != Some("ses_not_the_runners")
        ),
        "the stray request reached the model"
    );
    app.stop().await.expect("clean stop");
}
