//! Spawning the runner binary with a config, reading its JSON logs, talking to its HTTP API.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;

/// The built binary.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_autonomous-runner"))
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
        let (l2, r2, n2) = (logs.clone(), raw.clone(), notify.clone());
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) if v.is_object() => l2.lock().unwrap().push(v),
                    _ => r2.lock().unwrap().push(line),
                }
                n2.notify_waiters();
            }
            n2.notify_waiters();
        });
        Proc {
            child,
            logs,
            raw,
            notify,
            base: String::new(),
            _config: None,
            _data: data,
        }
    }

    /// The first log line matching `pred`, waiting up to `timeout` for it.
    pub async fn wait_log(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            if let Some(v) = self.logs.lock().unwrap().iter().find(|l| pred(l)).cloned() {
                return v;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "log line not seen within {timeout:?}; last lines: {:#?}\nraw: {:?}",
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

    /// Waits until at least `n` log lines match `pred`.
    pub async fn wait_log_count(&self, pred: impl Fn(&Value) -> bool, n: usize, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            if self.logs.lock().unwrap().iter().filter(|l| pred(l)).count() >= n {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("fewer than {n} matching log lines within {timeout:?}");
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
        let r = reqwest::get(format!("{}{path}", self.base))
            .await
            .expect("GET");
        let code = r.status().as_u16();
        (code, r.text().await.expect("body"))
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
            .expect("process exits in time")
            .expect("wait");
        // Let the log reader drain the last lines.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                let n = self.notify.notified();
                if tokio::time::timeout(Duration::from_millis(200), n)
                    .await
                    .is_err()
                {
                    break;
                }
            }
        })
        .await;
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

/// GETs `base` + `path` until `pred` holds on its JSON; panics with the last body after
/// `timeout`. The one polling loop of both harnesses (the binary and the in-process app).
pub async fn poll_json(
    base: &str,
    path: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (_, v) = get_json(&format!("{base}{path}")).await;
        if pred(&v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} never satisfied the condition within {timeout:?}; last: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn get_json(url: &str) -> (u16, Value) {
    let r = reqwest::get(url).await.expect("GET");
    let code = r.status().as_u16();
    let v = r.json::<Value>().await.unwrap_or(Value::Null);
    (code, v)
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
