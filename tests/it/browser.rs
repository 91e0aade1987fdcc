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
    // The symbol view: the first symbol's candles from /api/candles, its signals as markers
    // on them. What the chart drew is read back from its canvas (the pixels a screenshot
    // shows): candle bodies in both colours, the BUY marker's green; the labels the axes drew
    // are whole numbers in full and 24-hour UTC times.
    let chart = d
        .wait_js(
            "const c = document.getElementById('chart'); return { canvas: c.querySelectorAll('canvas').length, candles: Number(c.dataset.candles || 0), markers: Number(c.dataset.markers || 0) };",
            Duration::from_secs(20),
            |v| v["markers"].as_u64().unwrap_or(0) >= 1,
        )
        .await;
    assert_eq!(chart["canvas"], 1, "{chart}");
    assert_eq!(chart["candles"], 240, "four hours of minutes: {chart}");
    let drawn = d
        .js(
            "const cv = document.querySelector('#chart canvas'); const ctx = cv.getContext('2d');\
             const px = ctx.getImageData(0, 0, cv.width, cv.height).data;\
             const near = (i, r, g, b) => Math.abs(px[i] - r) < 8 && Math.abs(px[i + 1] - g) < 8 && Math.abs(px[i + 2] - b) < 8;\
             let up = 0, down = 0, marks = 0;\
             for (let i = 0; i < px.length; i += 4) { if (near(i, 0x2e, 0xa0, 0x43)) up++; if (near(i, 0xda, 0x36, 0x33)) down++; if (near(i, 0x3f, 0xb9, 0x50) || near(i, 0xc9, 0xd1, 0xd9)) marks++; }\
             const y = chart.axes[1], x = chart.axes[0]; ctx.font = y.font ? y.font[0] : '12px system-ui';\
             const widest = Math.max(...y._values.map((v) => ctx.measureText(v).width));\
             return { up, down, marks, y: y._values, x: x._values, y_size: y._size, widest, min: chart.scales.y.min, max: chart.scales.y.max,\
                      legend: document.getElementById('chart-legend').textContent };",
        )
        .await;
    assert!(
        drawn["up"].as_u64().unwrap() > 200 && drawn["down"].as_u64().unwrap() > 200,
        "candles of both colours drawn: {drawn}"
    );
    assert!(
        drawn["marks"].as_u64().unwrap() > 10,
        "BUY markers drawn: {drawn}"
    );
    let ys: Vec<&str> = drawn["y"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(ys.len() >= 3, "{drawn}");
    let (lo, hi) = (
        drawn["min"].as_f64().unwrap(),
        drawn["max"].as_f64().unwrap(),
    );
    for (i, label) in ys.iter().enumerate() {
        let v: f64 = label.replace(',', "").parse().expect("a number");
        // The whole price, not its last digits: every label lies in the axis's range.
        assert!(
            v >= lo && v <= hi,
            "label {label} outside {lo}…{hi}: {drawn}"
        );
        assert!(
            ys[..i].iter().all(|other| other != label),
            "labels differ: {ys:?}"
        );
    }
    // Evenly spaced as written: no label rounded into its neighbour's step.
    let vals: Vec<f64> = ys
        .iter()
        .map(|l| l.replace(',', "").parse().unwrap())
        .collect();
    let step = vals[1] - vals[0];
    assert!(
        vals.windows(2)
            .all(|w| ((w[1] - w[0]) - step).abs() < step * 1e-6),
        "labels as exact as their spacing: {ys:?}"
    );
    assert!(
        drawn["widest"].as_f64().unwrap() < drawn["y_size"].as_f64().unwrap(),
        "the axis is wider than its widest label: {drawn}"
    );
    for label in drawn["x"].as_array().unwrap() {
        let t = label.as_str().unwrap();
        // The time, and under it the date where the day changes.
        let mut lines = t.split('\n');
        let hm = lines.next().unwrap();
        if let Some(date) = lines.next() {
            assert!(date.len() == 10 && date.as_bytes()[4] == b'-', "{drawn}");
        }
        assert!(
            hm.len() == 5 && hm.as_bytes()[2] == b':' && hm[..2].parse::<u32>().unwrap() < 24,
            "24-hour UTC time labels: {drawn}"
        );
        assert!(!t.contains("am") && !t.contains("pm"), "{drawn}");
    }
    let legend = drawn["legend"].as_str().unwrap();
    assert!(
        legend.contains("▲") && legend.contains("▼") && legend.contains("▮"),
        "{legend}"
    );
    d.js("document.getElementById('symbol-view').scrollIntoView(); return 1")
        .await;
    d.screenshot(&std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-chart.png"))
        .await;
    // Signals exist: no "No signals yet" over them.
    assert_eq!(
        d.js("return document.getElementById('notice').hidden")
            .await,
        true
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
    // "since" carries its date.
    let note = d
        .js("return document.getElementById('score-note').textContent")
        .await;
    let note = note.as_str().unwrap();
    let since = note.split("since ").nth(1).unwrap_or("");
    assert!(
        since.len() >= 16 && since.as_bytes()[4] == b'-' && since.as_bytes()[10] == b' ',
        "a date and a time: {note}"
    );
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

/// The notice says what the ticks did when they produced nothing (not "the first tick is
/// at …" after ticks ran), and a degraded state is visible at a glance: the notice, a badge
/// and the row's colour, not only a tooltip.
#[tokio::test]
async fn the_notice_tells_failed_ticks_and_degraded_signals_apart() {
    let llm = LlmServer::start().await;
    llm.set_default(Some(Reply::StatusBody(500, "model exploded".into())));
    let failing = format!(
        "  symbols: [ETH/USD, BTC/USD]\n  agents:\n    backend: openrouter\n    base_url: {}\n    fallback: none\n  retry:\n    max_attempts: 1\n  circuit_breaker:\n    llm_service:\n      failure_threshold: 1000\n      recovery_timeout_seconds: 60\n",
        llm.url
    );
    let p = spawn_app(config("*/2 * * * * *", &failing)).await;
    p.poll("/api/cycles", Duration::from_secs(30), |c| {
        c["cycles"]
            .as_array()
            .is_some_and(|a| a.iter().any(|t| t["symbols_failed"] == 2))
    })
    .await;
    let d = Driver::start().await;
    d.goto(&p.base).await;
    let notice = d
        .wait_js(
            "const n = document.getElementById('notice'); return n.hidden ? '' : n.textContent;",
            Duration::from_secs(20),
            |v| v.as_str().is_some_and(|t| t.contains("failed")),
        )
        .await;
    let text = notice.as_str().unwrap();
    assert!(
        text.contains("ran and 2 symbols failed") && text.contains("500"),
        "the cause, not the first tick: {text}"
    );
    assert!(!text.contains("first tick"), "{text}");
    p.stop().await.ok();

    // The rules fallback standing in once the breaker opens: degraded, and said so.
    let degraded = format!(
        "  symbols: [ETH/USD, BTC/USD]\n  agents:\n    backend: openrouter\n    base_url: {}\n    fallback: rules\n  retry:\n    max_attempts: 1\n  circuit_breaker:\n    llm_service:\n      failure_threshold: 1\n      recovery_timeout_seconds: 3600\n",
        llm.url
    );
    let p = spawn_app(config("*/2 * * * * *", &degraded)).await;
    d.goto(&p.base).await;
    let seen = d
        .wait_js(
            "const r = document.querySelector('#signals tbody tr.degraded'); const n = document.getElementById('notice');\
             return { badge: r ? r.querySelector('.badge').textContent : null, notice: n.hidden ? '' : n.textContent,\
                      ready: document.getElementById('ready').textContent };",
            Duration::from_secs(30),
            |v| v["badge"] == "fallback" && v["notice"].as_str().is_some_and(|t| t.starts_with("DEGRADED")),
        )
        .await;
    assert!(
        seen["notice"]
            .as_str()
            .unwrap()
            .contains("came from the rules fallback"),
        "{seen}"
    );
    d.screenshot(&std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-degraded.png"))
        .await;
    d.quit().await;
}
