//! What the benchmarks share: the release binary, a config file, JSON logs, percentiles and the
//! clairvoyant list-scheduling reference.

// A benchmark is a tool run by hand: a failed setup step aborts it with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Each benchmark uses only part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The release binary (`cargo bench` builds it).
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/release/deps/<bench> → target/release/autonomous-runner
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .unwrap_or_default();
    dir.join("autonomous-runner")
}

/// A spawned runner and a channel of its JSON log lines.
pub struct Runner {
    pub child: Child,
    pub lines: mpsc::Receiver<serde_json::Value>,
    pub base: String,
    _dir: tempfile::TempDir,
}

impl Runner {
    pub fn spawn(yaml: &str, extra_env: &[(&str, &str)]) -> Runner {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("runner.yaml");
        std::fs::write(&path, yaml).expect("write config");
        let bin = binary();
        assert!(
            bin.exists(),
            "{} missing: run `cargo build --release` first",
            bin.display()
        );
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--config", path.to_str().unwrap_or_default()])
            .env("LOG_FORMAT", "json")
            .env("LOG_LEVEL", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn runner");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && tx.send(v).is_err()
                {
                    return;
                }
            }
        });
        let mut base = String::new();
        while let Ok(v) = rx.recv_timeout(Duration::from_secs(30)) {
            if v["message"] == "HTTP server listening" {
                base = format!("http://{}", v["addr"].as_str().unwrap_or_default());
                break;
            }
        }
        assert!(!base.is_empty(), "runner did not start");
        Runner {
            child,
            lines: rx,
            base,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The number after `key` in `/proc/{pid}/{file}` (kB figures there).
    fn proc_field(&self, file: &str, key: &str) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/{file}", self.pid())).ok()?;
        s.lines()
            .find(|l| l.starts_with(key))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> Option<u64> {
        self.proc_field("status", "VmRSS:")
    }

    /// Resident anonymous memory in KiB (the heap, stacks: RSS without the mapped binary's
    /// code pages, which the kernel can drop and reread).
    pub fn anon_kib(&self) -> Option<u64> {
        self.proc_field("status", "RssAnon:")
    }

    /// Resident pages the process has given back with `MADV_FREE` (KiB, from
    /// `/proc/{pid}/smaps_rollup`): counted in RSS until the kernel needs them, then taken
    /// without a fault or a write-back.
    pub fn lazy_free_kib(&self) -> Option<u64> {
        self.proc_field("smaps_rollup", "LazyFree:")
    }

    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Nearest-rank percentile of sorted values.
pub fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64) * q).ceil() as usize;
    sorted[i.saturating_sub(1).min(sorted.len() - 1)]
}

/// List scheduling with perfect knowledge, longest first, on `slots`: what the best
/// non-preemptive pool could do with these latencies (a tighter reference than the bound).
pub fn lpt(lat: &[f64], slots: usize) -> f64 {
    let mut sorted = lat.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let mut load = vec![0.0f64; slots.max(1)];
    for l in sorted {
        if let Some(min) = load.iter_mut().min_by(|a, b| a.total_cmp(b)) {
            *min += l;
        }
    }
    load.into_iter().fold(0.0, f64::max)
}

/// The next minute boundary, as a cycle id (`2026-12-02T06:41:00Z`): the first tick a run
/// started now measures.
pub fn next_minute_tick() -> String {
    let next = (chrono::Utc::now().timestamp() / 60 + 1) * 60;
    chrono::DateTime::from_timestamp(next, 0)
        .expect("time")
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Polls `/api/signals/latest` every 5 s until `until`: for each (symbol, tick) from
/// `first_tick` on, the freshness of its report (its `published_at` − the tick, seconds), as
/// first seen. The report is a symbol's last stage: its time is when the signal was whole.
pub async fn report_freshness(
    http: &reqwest::Client,
    base: &str,
    first_tick: &str,
    until: tokio::time::Instant,
) -> std::collections::BTreeMap<(String, String), f64> {
    let mut seen = std::collections::BTreeMap::new();
    while tokio::time::Instant::now() < until {
        if let Ok(r) = http.get(format!("{base}/api/signals/latest")).send().await
            && let Ok(v) = r.json::<serde_json::Value>().await
        {
            for s in v["signals"].as_array().into_iter().flatten() {
                let (Some(sym), Some(tick), Some(at)) = (
                    s["symbol"].as_str(),
                    s["cycle_id"].as_str(),
                    s["published_at"].as_str(),
                ) else {
                    continue;
                };
                if tick < first_tick || s["stage"] != "report" {
                    continue;
                }
                if let (Ok(c), Ok(t)) = (
                    chrono::DateTime::parse_from_rfc3339(tick),
                    chrono::DateTime::parse_from_rfc3339(at),
                ) {
                    seen.entry((sym.to_string(), tick.to_string()))
                        .or_insert((t - c).num_milliseconds() as f64 / 1000.0);
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    seen
}
