//! The command line: `check-config` errors and output, `once`.

use std::time::Duration;

use crate::helpers::{Proc, binary, config, write_config};

fn check_config(yaml: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let f = write_config(yaml);
    let mut cmd = std::process::Command::new(binary());
    cmd.args(["check-config", "--config", f.path.to_str().unwrap()])
        .env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run check-config");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_rejects_each_bad_input_with_exit_2_naming_the_key() {
    let cases = [
        (
            "unknown key",
            "autonomous_runner:\n  schedul: \"* * * * *\"\n",
            "autonomous_runner.schedul:",
        ),
        (
            "wrong type",
            "autonomous_runner:\n  parallel:\n    max_concurrent: lots\n",
            "autonomous_runner.parallel.max_concurrent:",
        ),
        (
            "min > max",
            "autonomous_runner:\n  parallel:\n    max_concurrent: 2\n    min_concurrent: 4\n",
            "autonomous_runner.parallel.min_concurrent:",
        ),
        (
            "calibration at an ungraded horizon",
            "autonomous_runner:\n  history:\n    calibration:\n      horizon_minutes: 30\n",
            "autonomous_runner.history.calibration.horizon_minutes: 30 is not a grading horizon",
        ),
        (
            "bad cron",
            "autonomous_runner:\n  schedule: \"61 * * * *\"\n",
            "autonomous_runner.schedule:",
        ),
        (
            "an allowed host given as a URL",
            "autonomous_runner:\n  http:\n    allowed_hosts: [runner, \"http://runner:8080/mcp\"]\n",
            "autonomous_runner.http.allowed_hosts[1]:",
        ),
        (
            "empty symbols",
            "autonomous_runner:\n  symbols: []\n",
            "autonomous_runner.symbols:",
        ),
        (
            "malformed symbol",
            "autonomous_runner:\n  symbols: [ETH/USD, \"btc-usd\"]\n",
            "autonomous_runner.symbols[1]:",
        ),
        (
            "negative timeout",
            "autonomous_runner:\n  timeouts:\n    total_timeout_seconds: -3\n",
            "autonomous_runner.timeouts.total_timeout_seconds:",
        ),
        (
            "a step past its field",
            "autonomous_runner:\n  schedule: \"*/61 * * * *\"\n",
            "autonomous_runner.schedule:",
        ),
        (
            "OpenRouter without a key",
            "autonomous_runner:\n  agents:\n    backend: openrouter\n",
            "autonomous_runner.agents.api_key:",
        ),
    ];
    for (name, yaml, key) in cases {
        let (code, stdout, stderr) = check_config(yaml, &[]);
        assert_eq!(code, 2, "{name}: exit code; stderr: {stderr}");
        assert!(
            stderr.lines().any(|l| l.starts_with(key)),
            "{name}: expected a line starting {key:?}, got {stderr:?}"
        );
        assert!(
            stdout.is_empty(),
            "{name}: nothing on stdout for a bad config"
        );
    }
}

/// The port comes from `--port`, else `PORT`, else the config; a bad `PORT` is refused.
#[test]
fn the_port_is_set_by_flag_or_environment() {
    let port_of = |args: &[&str], env: &[(&str, &str)]| {
        let out = std::process::Command::new(binary())
            .arg("check-config")
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .output()
            .expect("run check-config");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let port = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("port: "))
            .map(str::to_string);
        (
            out.status.code(),
            port,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(port_of(&[], &[]).1.as_deref(), Some("8080"));
    assert_eq!(port_of(&[], &[("PORT", "9191")]).1.as_deref(), Some("9191"));
    assert_eq!(
        port_of(&["--port", "7000"], &[("PORT", "9191")])
            .1
            .as_deref(),
        Some("7000")
    );
    let (code, _, stderr) = port_of(&[], &[("PORT", "eighty")]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.starts_with("PORT: must be a port number"),
        "{stderr}"
    );
}

#[test]
fn check_config_prints_the_effective_config_without_secrets() {
    let (code, stdout, stderr) = check_config(
        "autonomous_runner:\n  instance_id: \"${POD_NAME:-x}\"\n",
        &[
            ("POD_NAME", "pod-42"),
            ("OPENROUTER_API_KEY", "sk-or-v1-topsecret"),
            ("ADMIN_TOKEN", "admin-topsecret"),
            ("REDIS_URL", "redis://:redis-topsecret@redis:6379/0"),
            ("MAX_SYMBOLS", "5"),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("instance_id: pod-42"), "{stdout}");
    assert_eq!(
        stdout.matches("/USD").count(),
        5,
        "MAX_SYMBOLS applied: {stdout}"
    );
    for secret in ["sk-or-v1-topsecret", "admin-topsecret", "redis-topsecret"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} leaked"
        );
    }
}

#[test]
fn no_file_means_embedded_defaults() {
    let out = std::process::Command::new(binary())
        .arg("check-config")
        .env_clear()
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("/USD").count(), 20);
    assert!(
        stdout.contains("backend: memory")
            && stdout.contains("backend: rules")
            && stdout.contains("source: simulated")
    );
}

#[tokio::test]
async fn once_runs_one_cycle_and_exits_0() {
    let mut p = Proc::spawn("once", &config("*/1 * * * *", ""), &[]).await;
    let code = p.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(code, 0);
    let finished = p.logs_matching(|l| l["message"] == "cycle finished");
    assert_eq!(finished.len(), 1, "exactly one cycle");
    assert_eq!(finished[0]["ok"], 20);
    // The cycle belongs to the minute boundary at or before the start.
    let id = finished[0]["cycle_id"].as_str().unwrap();
    assert!(id.ends_with(":00Z"), "{id}");
    assert!(
        !p.logs_matching(|l| l["message"] == "once: cycle ran")
            .is_empty()
    );
}

/// A spool path that cannot be written is found at start (exit 2, naming the key and why),
/// not at the shutdown with Redis down that needs it: a directory, and a path under a file.
#[test]
fn an_unwritable_spool_path_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    for (name, spool, why) in [
        ("a directory", dir.path().to_path_buf(), "it is a directory"),
        ("under a file", file.join("spool.jsonl"), "cannot create"),
    ] {
        let yaml = config(
            "* * * * *",
            &format!(
                "  coordination:\n    backend: redis\n    redis_url: redis://127.0.0.1:1\n  publish:\n    spool_path: {}\n",
                spool.display()
            ),
        );
        let f = write_config(&yaml);
        let out = std::process::Command::new(binary())
            .args(["run", "--config", f.path.to_str().unwrap()])
            .env_clear()
            .env("HISTORY_PATH", dir.path().join("h.sqlite"))
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(
            stderr.contains("autonomous_runner.publish.spool_path:") && stderr.contains(why),
            "{name}: {stderr}"
        );
    }
}

#[test]
fn text_logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    // `once` on memory coordination: a whole cycle's log lines, then exit 0. stderr is a pipe
    // here, as under `kubectl logs` or a log shipper.
    let dir = tempfile::tempdir().unwrap();
    let f = write_config(&config("0 0 1 1 *", "  symbols: [ETH/USD]\n"));
    let out = std::process::Command::new(binary())
        .args(["once", "--config", f.path.to_str().unwrap()])
        .env_clear()
        .env("LOG_FORMAT", "text")
        .env("HISTORY_PATH", dir.path().join("h.sqlite"))
        .output()
        .expect("run once");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.lines().filter(|l| l.contains(" INFO ")).count() >= 3,
        "text lines with their level: {stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "an escape code in piped text logs: {stderr:?}"
    );
}
