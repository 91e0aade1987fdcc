//! The dashboard in a real headless Chromium (driven by chromedriver over WebDriver): 20 rows,
//! live updates without reload, agent text shown as text with no script executed.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};

use crate::app::spawn_app;
use crate::helpers::config;
use crate::llm_server::{LlmServer, Reply};

const XSS: &str =
    "<img src=x onerror=\"window.__xss=1\"><script>window.__xss=2</script> Buy the dip.";

struct Driver {
    base: String,
    session: String,
    http: reqwest::Client,
    _child: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    /// A test that failed before `quit` still takes its browser down: every process started
    /// with this driver's own profile directory.
    fn drop(&mut self) {
        let _ = std::process::Command::new("pkill")
            .args(["-f", "--"])
            .arg(format!(
                "--user-data-dir={}",
                self._profile.path().display()
            ))
            .status();
    }
}

impl Driver {
    async fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = tokio::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver (scripts/test installs chromium-driver)");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        crate::helpers::eventually("chromedriver to be ready", Duration::from_secs(30), || {
            let (http, url) = (http.clone(), format!("{base}/status"));
            async move {
                let v: Value = http
                    .get(&url)
                    .send()
                    .await
                    .map_err(|e| crate::helpers::error_chain(&e))?
                    .json()
                    .await
                    .map_err(|e| e.to_string())?;
                if v["value"]["ready"] == true {
                    Ok(())
                } else {
                    Err(v.to_string())
                }
            }
        })
        .await;
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.path().display())
                ]
            }
        }}});
        let v: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        Driver {
            base,
            session,
            http,
            _child: child,
            _profile: profile,
        }
    }

    /// Ends the WebDriver session, which closes the browser. Killing chromedriver alone (its
    /// `kill_on_drop`) would leave the headless Chromium running, ~1 GiB a test run.
    async fn quit(&self) {
        let _ = self
            .http
            .delete(format!("{}/session/{}", self.base, self.session))
            .send()
            .await;
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut req = self.http.request(method.clone(), url);
        if method != reqwest::Method::GET {
            req = req.json(&body);
        }
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", json!({"url": url}))
            .await;
    }

    async fn js(&self, script: &str) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    async fn wait_js(
        &self,
        script: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        crate::helpers::eventually(format!("the page to satisfy {script}"), timeout, || async {
            let v = self.js(script).await;
            if pred(&v) { Ok(v) } else { Err(v.to_string()) }
        })
        .await
    }

    async fn screenshot(&self, path: &std::path::Path) {
        let v = self
            .cmd(reqwest::Method::GET, "/screenshot", Value::Null)
            .await;
        if let Some(data) = v.as_str() {
            let _ = std::fs::write(path, base64_decode(data));
        }
    }
}

/// Standard base64 decoding (for the screenshot; nothing else needs it).
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let bits: Vec<u8> = s.bytes().filter_map(val).collect();
    bits.chunks(4)
        .flat_map(|c| {
            let n = c.iter().fold(0u32, |acc, v| (acc << 6) | u32::from(*v))
                << (6 * (4 - c.len() as u32));
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            bytes[..c.len().saturating_sub(1)].to_vec()
        })
        .collect()
}

fn report_everywhere(llm: &LlmServer, summary: &str) {
    for s in autonomous_runner::config::DEFAULT_SYMBOLS {
        llm.always_for(s, "report", Reply::Answer(json!({ "summary": summary })));
    }
}

#[tokio::test]
async fn the_dashboard_shows_20_rows_updates_live_and_never_runs_agent_text() {
    let llm = LlmServer::start().await;
    report_everywhere(&llm, XSS);
    let extra = format!(
        "  agents:\n    backend: openrouter\n    base_url: {}\n    requests_per_minute: 1000\n    burst: 200\n  pipeline:\n    advise_min_score: 100\n",
        llm.url
    );
    let p = spawn_app(config("*/3 * * * * *", &extra)).await;
    p.poll("/api/cycles", Duration::from_secs(30), |c| {
        c["cycles"]
            .as_array()
            .is_some_and(|a| a.iter().any(|t| t["symbols_ok"] == 20))
    })
    .await;

    let d = Driver::start().await;
    d.goto(&p.base).await;
    d.wait_js(
        "return document.querySelectorAll('#signals tbody tr:not(.detail)').length",
        Duration::from_secs(20),
        |v| v == 20,
    )
    .await;
    d.js("window.__marker = 42; return 1").await;
    let row = d
        .js(
            "const tr = document.querySelector('#signals tbody tr[data-symbol=\"ETH/USD\"]');\
             return { summary: tr.nextElementSibling.querySelector('.summary').textContent,\
                      detail_hidden: tr.nextElementSibling.hidden,\
                      action: tr.children[1].textContent, tier: tr.children[6].textContent,\
                      calibrated: tr.querySelector('td.calibrated').textContent,\
                      calibrated_title: tr.querySelector('td.calibrated').title,\
                      price: tr.querySelector('td.price').textContent,\
                      market: document.getElementById('market').textContent,\
                      imgs: document.querySelectorAll('#signals img').length,\
                      scripts: document.querySelectorAll('#signals script').length,\
                      xss: typeof window.__xss };",
        )
        .await;
    assert_eq!(row["summary"], XSS, "agent text is shown literally");
    assert_eq!(row["detail_hidden"], true, "the summary is shown on demand");
    // A fresh history has no grades: the calibrated column says so rather than guessing.
    assert_eq!(row["calibrated"], "—", "{row}");
    assert!(
        row["calibrated_title"]
            .as_str()
            .is_some_and(|t| t.starts_with("not calibrated yet: 0 of 1,000 grades at 15m")),
        "{row}"
    );
    assert!(
        row["price"].as_str().unwrap().ends_with("(sim)"),
        "a price column, marked simulated: {row}"
    );
    assert!(
        row["market"].as_str().unwrap().contains("SIMULATED"),
        "{row}"
    );
    // A click opens the summary and the strategy breakdown.
    let opened = d
        .js("const tr = document.querySelector('#signals tbody tr[data-symbol=\"ETH/USD\"]'); tr.click();\
             return { hidden: tr.nextElementSibling.hidden, strategies: tr.nextElementSibling.querySelectorAll('li').length };")
        .await;
    assert_eq!(opened["hidden"], false);
    assert!(opened["strategies"].as_u64().unwrap() >= 3, "{opened}");
    // The symbol view: a uPlot chart of the first symbol with its signals as markers.
    let chart = d
        .wait_js(
            "const c = document.getElementById('chart'); return { canvas: c.querySelectorAll('canvas').length, signals: Number(c.dataset.signals || 0), markers: Number(c.dataset.markers || 0) };",
            Duration::from_secs(20),
            |v| v["signals"].as_u64().unwrap_or(0) >= 1,
        )
        .await;
    assert_eq!(chart["canvas"], 1, "{chart}");
    assert_eq!(
        chart["markers"], chart["signals"],
        "every BUY is a marker: {chart}"
    );
    assert_eq!(row["imgs"], 0);
    assert_eq!(row["scripts"], 0);
    assert_eq!(row["xss"], "undefined", "no injected script ran");
    assert_eq!(row["action"], "BUY");
    assert!(["HOT", "GOOD", "NEUTRAL", "LOW"].contains(&row["tier"].as_str().unwrap()));
    d.screenshot(&std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png"))
        .await;

    // The next cycle's values arrive without a reload.
    report_everywhere(&llm, "Second cycle: fresh values.");
    let v = d
        .wait_js(
            "return { s: document.querySelector('#signals tbody tr[data-symbol=\"ETH/USD\"]').nextElementSibling.querySelector('.summary').textContent, m: window.__marker };",
            Duration::from_secs(20),
            |v| v["s"] == "Second cycle: fresh values.",
        )
        .await;
    assert_eq!(v["m"], 42, "same page, no reload");
    // The second cycle's row arrives with its `cycle` event, which may come after that
    // cycle's signals: waited for, not read once.
    d.wait_js(
        "return document.querySelectorAll('#cycles tbody tr').length",
        Duration::from_secs(20),
        |v| v.as_u64().unwrap_or(0) >= 2,
    )
    .await;
    assert_eq!(d.js("return typeof window.__xss").await, "undefined");
    let status = d
        .js("return document.getElementById('conn').textContent")
        .await;
    assert_eq!(status, "live");

    // The scorecard updates live: grades recorded in the history (here by the test, as a
    // grader of another replica would) appear after the next tick without a reload.
    assert_eq!(
        d.js("return document.querySelectorAll('#scorecard tbody tr').length")
            .await,
        0
    );
    let store = autonomous_runner::history::sql::SqlStore::sqlite(&p.history_path())
        .await
        .expect("the app's history");
    use autonomous_runner::history::HistoryStore;
    let due = store
        .due(900, 0..chrono::Utc::now().timestamp() + 1, 5)
        .await
        .unwrap();
    assert!(!due.is_empty(), "signals are in the history");
    for (i, s) in due.iter().enumerate() {
        let hit = i % 2 == 0;
        store
            .record_grade(&autonomous_runner::history::Grade {
                signal: s.clone(),
                horizon_seconds: 900,
                price_after: Some(s.price_then * if hit { 1.01 } else { 0.99 }),
                return_fraction: Some(if hit { 0.01 } else { -0.01 }),
                hit: Some(hit),
                hold_hit: Some(false),
                momentum_hit: Some(!hit),
                graded_at: chrono::Utc::now().timestamp(),
            })
            .await
            .unwrap();
    }
    let card = d
        .wait_js(
            "return { rows: document.querySelectorAll('#scorecard tbody tr').length, buckets: Number(document.getElementById('calibration').dataset.buckets || 0), canvas: document.querySelectorAll('#calibration canvas').length, m: window.__marker, baseline: (document.querySelector('#scorecard tbody tr td:nth-child(10)') || {}).textContent, baseline_title: (document.querySelector('#scorecard tbody tr td:nth-child(10)') || {}).title };",
            Duration::from_secs(20),
            |v| v["rows"].as_u64().unwrap_or(0) >= 1,
        )
        .await;
    assert_eq!(card["m"], 42, "same page, no reload");
    // Graded with both baselines: the skill against the better one is shown with its interval.
    assert!(
        card["baseline"]
            .as_str()
            .is_some_and(|t| t.contains('%') && t.contains('(')),
        "{card}"
    );
    assert!(
        card["baseline_title"]
            .as_str()
            .is_some_and(|t| t.starts_with("against ") && t.contains("momentum")),
        "{card}"
    );
    assert!(
        card["buckets"].as_u64().unwrap() >= 1 && card["canvas"] == 1,
        "{card}"
    );
    assert_eq!(d.js("return typeof window.__xss").await, "undefined");
    d.screenshot(
        &std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-scorecard.png"),
    )
    .await;
    d.quit().await;
}
