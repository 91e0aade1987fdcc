//! The in-process harness: [`spawn_app`] builds the service from a YAML config inside the test
//! (HTTP on port 0, the scheduler on an anchored clock, a Redis key prefix of its own) and
//! returns its address and a handle that stops it the way SIGTERM does.
//!
//! Tests that use it assert on what users see — the HTTP API and the Redis contents — never on
//! log text. Counts come from the app's own view in `/health/detailed`, not `/metrics`: the
//! recorder is process-wide, so in-process apps running in parallel would count into one
//! another's series. Whole-binary tests ([`crate::helpers::Proc`]) remain for what only a
//! process can show: the CLI, `once` mode, signals, exit codes, a SIGKILL, the logs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use autonomous_runner::App;
use autonomous_runner::config::Config;
use autonomous_runner::schedule::Clock;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// A per-test key prefix: tests sharing a redis-server never see each other's keys.
pub fn unique_prefix(what: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{what}-{}-{}:",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// How to build one app beyond its YAML.
#[derive(Clone)]
pub struct AppOptions {
    /// Replaces `instance_id` (replicas of one test need distinct ids).
    pub instance_id: Option<String>,
    /// Replaces `coordination.key_prefix`.
    pub key_prefix: Option<String>,
    /// The scheduler's clock; replicas of one test share one so they agree on the ticks.
    pub clock: Clock,
    /// Environment for `${VAR}` expansion and the overrides (`REDIS_URL`, API keys, …); the
    /// process environment is never read, so the machine's variables cannot leak in.
    pub env: HashMap<String, String>,
}

impl Default for AppOptions {
    fn default() -> Self {
        AppOptions {
            instance_id: None,
            key_prefix: None,
            clock: anchored_now(),
            env: HashMap::new(),
        }
    }
}

/// Wall time anchored at this instant to tokio's clock, on a whole second so cycle ids line
/// up with what a reader of the system clock expects.
pub fn anchored_now() -> Clock {
    use chrono::{SubsecRound, Utc};
    Clock::anchored(Utc::now().trunc_subsecs(0))
}

/// A running in-process app.
pub struct TestApp {
    /// `http://127.0.0.1:port`.
    pub base: String,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// Its history database's directory (a temp dir of its own).
    _data: tempfile::TempDir,
}

/// Builds and starts the app described by `yaml` with default options.
pub async fn spawn_app(yaml: impl AsRef<str>) -> TestApp {
    spawn_app_with(yaml, AppOptions::default()).await
}

/// Builds and starts the app described by `yaml`: HTTP on a free port (whatever the YAML
/// says), then `options`.
pub async fn spawn_app_with(yaml: impl AsRef<str>, options: AppOptions) -> TestApp {
    let mut cfg = Config::from_yaml(yaml.as_ref(), &options.env).expect("test config parses");
    cfg.apply_env(&options.env)
        .expect("test environment applies");
    cfg.http.bind = "127.0.0.1".into();
    cfg.http.port = 0;
    if let Some(id) = options.instance_id {
        cfg.instance_id = id;
    }
    if let Some(prefix) = options.key_prefix {
        cfg.coordination.key_prefix = prefix;
    }
    let data = tempfile::tempdir().expect("tempdir");
    if !options.env.contains_key("HISTORY_PATH") {
        cfg.history.path = data.path().join("history.sqlite").display().to_string();
    }
    cfg.validate().expect("test config is valid");
    let app = App::build_with_clock(cfg, options.clock)
        .await
        .expect("app builds");
    let addr = app.local_addr().expect("bound");
    let stop = CancellationToken::new();
    let task = tokio::spawn(app.run_until_stopped(stop.clone()));
    TestApp {
        base: format!("http://{addr}"),
        stop,
        task: Some(task),
        _data: data,
    }
}

impl TestApp {
    /// Its SQLite history database (when the test did not set `HISTORY_PATH` itself).
    pub fn history_path(&self) -> std::path::PathBuf {
        self._data.path().join("history.sqlite")
    }

    /// GET `path`: status and JSON body (`Null` when the body is not JSON).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        crate::helpers::get_json(&format!("{}{path}", self.base)).await
    }

    /// GET `path`: status and body text.
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        crate::helpers::get_text(&format!("{}{path}", self.base)).await
    }

    /// Polls `path` until `pred` holds on its JSON; panics with the last body after `timeout`.
    pub async fn poll(
        &self,
        path: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        crate::helpers::poll_json(&self.base, path, timeout, pred).await
    }

    /// The ticks in `/api/cycles` that ran (not skipped), oldest first.
    pub async fn run_cycles(&self) -> Vec<Value> {
        let (_, v) = self.get("/api/cycles").await;
        let mut c: Vec<Value> = v["cycles"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c["skipped_reason"].is_null())
            .collect();
        c.reverse();
        c
    }

    /// Waits until at least `n` cycles have run.
    pub async fn wait_cycles(&self, n: usize, timeout: Duration) -> Vec<Value> {
        crate::helpers::eventually(format!("{n} cycles to run"), timeout, || async {
            let c = self.run_cycles().await;
            if c.len() >= n {
                Ok(c)
            } else {
                Err(format!(
                    "{} ran; the last: {}",
                    c.len(),
                    c.last().cloned().unwrap_or_default()
                ))
            }
        })
        .await
    }

    /// Stops it as SIGTERM does (no new ticks, drain, release, flush) and returns how
    /// `run_until_stopped` ended.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        match self.task.take() {
            Some(t) => t.await.expect("the app task did not panic"),
            None => Ok(()),
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // A test that fails midway still stops its app; the runtime ends with the test.
        self.stop.cancel();
    }
}
