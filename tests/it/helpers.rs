//! Spawning the runner binary with a config, reading its JSON logs, talking to its HTTP API,
//! and the waits every test uses: [`eventually`] (poll until a deadline, then say what was
//! awaited and what was last seen) and [`free_port`], both from the library's test support.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;

pub use autonomous_runner::testing::{eventually, free_port};

/// The runner binary: the one cargo built beside this test, or `AUTONOMOUS_RUNNER_BIN` when
/// set (to rerun a copied test binary against its own copy of the runner while the tree is
/// rebuilt).
pub fn binary() -> PathBuf {
    std::env::var_os("AUTONOMOUS_RUNNER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_autonomous-runner")))
}

/// A YAML config file in its own temp dir.
pub struct ConfigFile {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

pub fn write_config(yaml: &str) -> ConfigFile {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("runner.yaml");
    std::fs::write(&path, yaml).expect("write config");
    ConfigFile { _dir: dir, path }
}

/// A running runner process with its captured logs.
pub struct Proc {
    pub child: Child,
    pub logs: Arc<Mutex<Vec<Value>>>,
    /// Raw stderr lines that were not JSON (startup errors).
    pub raw: Arc<Mutex<Vec<String>>>,
    notify: Arc<Notify>,
    /// The stderr reader: it ends when the process has closed its stderr (exited).
    reader: Option<tokio::task::JoinHandle<()>>,
    /// Set by the reader at end of file: nothing more will be logged.
    eof: Arc<std::sync::atomic::AtomicBool>,
    pub base: String,
    _config: Option<ConfigFile>,
    /// Where its history database lives (a temp dir of its own, unless the test says).
    _data: tempfile::TempDir,
}

impl Proc {
    /// Spawns `autonomous-runner <mode> --config <file>` with JSON logs, and waits until its
    /// HTTP server is listening.
    pub async fn spawn(mode: &str, yaml: &str, env: &[(&str, &str)]) -> Proc {
        let cfg = write_config(yaml);
        let mut p = Self::spawn_raw(&[mode, "--config", cfg.path.to_str().expect("utf8")], env);
        p._config = Some(cfg);
        let l = p
            .wait_log(
                |l| l["message"] == "HTTP server listening",
                Duration::from_secs(30),
            )
            .await;
        let addr = l["addr"]
            .as_str()
            .expect("addr")
            .replace("0.0.0.0", "127.0.0.1");
        p.base = format!("http://{addr}");
        p
    }

    /// Spawns the binary with `args`, capturing stderr.
    pub fn spawn_raw(args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(binary());
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LOG_FORMAT", "json")
            .env("LOG_LEVEL", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // The history database goes to a temp dir of this process, never into the checkout.
        let data = tempfile::tempdir().expect("tempdir");
        cmd.env("HISTORY_PATH", data.path().join("history.sqlite"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn runner");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let notify = Arc::new(Notify::new());
        let stderr = child.stderr.take().expect("stderr");
        let eof = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (l2, r2, n2, e2) = (logs.clone(), raw.clone(), notify.clone(), eof.clone());
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) if v.is_object() => l2.lock().unwrap().push(v),
                    _ => r2.lock().unwrap().push(line),
                }
                n2.notify_waiters();
            }
            e2.store(true, std::sync::atomic::Ordering::SeqCst);
            n2.notify_waiters();
        });
        Proc {
            child,
            logs,
            raw,
            notify,
            reader: Some(reader),
            eof,
            base: String::new(),
            _config: None,
            _data: data,
        }
    }

    /// The first log line matching `pred`, waiting up to `timeout` for it (or until the
    /// process has closed its stderr, when no such line can come any more).
    pub async fn wait_log(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        self.wait_lines(
            |l| l.iter().find(|l| pred(l)).cloned(),
            "a matching log line",
            timeout,
        )
        .await
    }

    /// Waits until at least `n` log lines match `pred`.
    pub async fn wait_log_count(&self, pred: impl Fn(&Value) -> bool, n: usize, timeout: Duration) {
        self.wait_lines(
            |l| (l.iter().filter(|l| pred(l)).count() >= n).then_some(()),
            &format!("{n} matching log lines"),
            timeout,
        )
        .await
    }

    /// Waits, woken by every new line, until `found` finds something in the lines so far;
    /// panics with the last lines when `timeout` passes or the process has stopped logging.
    async fn wait_lines<T>(
        &self,
        found: impl Fn(&[Value]) -> Option<T>,
        what: &str,
        timeout: Duration,
    ) -> T {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            if let Some(v) = found(&self.logs.lock().unwrap()) {
                return v;
            }
            let ended = self.eof.load(std::sync::atomic::Ordering::SeqCst);
            if ended || tokio::time::timeout_at(deadline, notified).await.is_err() {
                let why = if ended {
                    "the process closed its stderr first".to_string()
                } else {
                    format!("not within {timeout:?}")
                };
                panic!(
                    "waited for {what}: {why}; last lines: {:#?}\nraw: {:?}",
                    self.logs
                        .lock()
                        .unwrap()
                        .iter()
                        .rev()
                        .take(15)
                        .collect::<Vec<_>>(),
                    self.raw.lock().unwrap()
                );
            }
        }
    }

    /// Every log line matching `pred`.
    pub fn logs_matching(&self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| pred(l))
            .cloned()
            .collect()
    }

    /// GET a JSON path.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        get_json(&format!("{}{path}", self.base)).await
    }

    /// GET a text path.
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        get_text(&format!("{}{path}", self.base)).await
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`).
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    /// Waits for exit, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let st = tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the process did not exit within {timeout:?}"))
            .expect("wait");
        // The reader ends at the end of stderr, once it has every last line.
        if let Some(reader) = self.reader.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), reader).await;
        }
        st.code().unwrap_or(-1)
    }

    /// Polls `path` until `pred` holds on its JSON, up to `timeout`.
    pub async fn poll(
        &self,
        path: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        poll_json(&self.base, path, timeout, pred).await
    }
}

/// GETs `base` + `path` until `pred` holds on its JSON; panics with the last answer (or the
/// connection error) after `timeout`. A server that is not listening yet is waited for. The
/// one polling loop of both harnesses (the binary and the in-process app).
pub async fn poll_json(
    base: &str,
    path: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let url = format!("{base}{path}");
    eventually(
        format!("{path} to satisfy the condition"),
        timeout,
        || async {
            let (code, v) = try_get_json(&url).await?;
            if pred(&v) {
                Ok(v)
            } else {
                Err(format!("HTTP {code}: {v}"))
            }
        },
    )
    .await
}

/// Waits until `base` + `path` answers 200 (the server has bound its port and is serving).
pub async fn wait_http_ok(base: &str, path: &str, timeout: Duration) {
    let url = format!("{base}{path}");
    eventually(format!("{url} to answer 200"), timeout, || async {
        match try_get_json(&url).await? {
            (200, _) => Ok(()),
            (code, v) => Err(format!("HTTP {code}: {v}")),
        }
    })
    .await
}

/// One client for every test request: a stalled server fails the request (after 30 s) instead
/// of hanging the test.
fn client() -> &'static reqwest::Client {
    static C: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    C.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("an HTTP client")
    })
}

/// GET `url`: its status and JSON body (`Null` when the body is not JSON), or the transport
/// error with its cause (connection refused, reset, timeout) for a wait to report.
pub async fn try_get_json(url: &str) -> Result<(u16, Value), String> {
    let r = client()
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
    let code = r.status().as_u16();
    Ok((code, r.json::<Value>().await.unwrap_or(Value::Null)))
}

/// GET `url` on a server that is known to be up: a transport error fails the test, naming it.
pub async fn get_json(url: &str) -> (u16, Value) {
    try_get_json(url).await.unwrap_or_else(|e| panic!("{e}"))
}

/// GET `url` as text, on a server that is known to be up.
pub async fn get_text(url: &str) -> (u16, String) {
    let r = client()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {}", error_chain(&e)));
    let code = r.status().as_u16();
    (code, r.text().await.unwrap_or_default())
}

/// An error and its sources, `a: b: c` (reqwest's top error alone says only "error sending
/// request").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Base YAML: memory coordination, rules agents, test-friendly timings; `extra` is appended
/// under `autonomous_runner:` (indented by the caller with two spaces).
pub fn config(schedule: &str, extra: &str) -> String {
    format!(
        "autonomous_runner:\n  schedule: \"{schedule}\"\n  instance_id: test-runner\n  http:\n    bind: 127.0.0.1\n    port: 0\n{extra}"
    )
}

/// Parses a metric line value from Prometheus text: the sum over series whose line starts with
/// `name{` and contains every `label="value"` of `labels`.
///
/// Panics when no series of `name` exists at all: a renamed or never-registered metric must
/// fail the test, not read as 0. (A label combination with no series of its own sums to 0:
/// "ETH/USD was never skipped for invalid_output" is a real zero.)
/// The entry for `symbol` in a JSON array of per-symbol objects (`signals` of
/// `/api/signals/latest`, `failures` of a cycle).
pub fn of_symbol(list: &Value, symbol: &str) -> Option<Value> {
    list.as_array()?
        .iter()
        .find(|x| x["symbol"] == symbol)
        .cloned()
}

pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let series: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .collect();
    assert!(!series.is_empty(), "no series named {name} in /metrics");
    series
        .iter()
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
