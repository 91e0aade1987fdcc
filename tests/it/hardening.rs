//! Issue 10: what fault injection and hostile input found — on real processes.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::app::{AppOptions, spawn_app, spawn_app_with, unique_prefix};
use crate::helpers::{
    Proc, binary, config, eventually, free_port, get_json, metric, wait_http_ok, write_config,
};
use crate::llm_server::{LlmServer, Reply};

/// Cycles run so far, from the API.
async fn cycles_run(base: &str) -> usize {
    let (_, v) = get_json(&format!("{base}/api/cycles")).await;
    v["cycles"].as_array().map_or(0, |a| {
        a.iter().filter(|c| c["skipped_reason"].is_null()).count()
    })
}

/// Waits until at least `n` cycles have run.
async fn wait_cycles(base: &str, n: usize, timeout: Duration) {
    eventually(format!("{n} cycles to run"), timeout, || async {
        match cycles_run(base).await {
            c if c >= n => Ok(()),
            c => Err(format!("{c} ran")),
        }
    })
    .await
}

/// The runner keeps ticking when its log pipe is closed (its reader gone) or stalled (a
/// reader that never reads): logging drops lines instead of blocking the runtime, and
/// SIGTERM still stops it cleanly.
#[tokio::test]
async fn a_closed_or_stalled_log_pipe_never_freezes_the_service() {
    for closed in [true, false] {
        let port = free_port();
        let cfg = write_config(
            &config("* * * * * *", "  symbols: [ETH/USD, BTC/USD]\n")
                .replace("port: 0", &format!("port: {port}")),
        );
        let mut child = Command::new(binary())
            .args(["run", "--config", cfg.path.to_str().unwrap()])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LOG_FORMAT", "json")
            // Debug: plenty of lines, so a stalled pipe fills within seconds.
            .env("LOG_LEVEL", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let mut lines = BufReader::new(stderr).lines();
        // Read until the server listens, then close the pipe — or keep it and never read.
        let mut seen = 0;
        while let Ok(Some(line)) = lines.next_line().await {
            seen += 1;
            if line.contains("HTTP server listening") {
                break;
            }
        }
        assert!(seen > 0, "no log line at all");
        let kept = if closed {
            drop(lines);
            None
        } else {
            Some(lines)
        };
        let before = cycles_run(&base).await;
        wait_cycles(&base, before + 5, Duration::from_secs(30)).await;
        let (code, live) = get_json(&format!("{base}/health/live")).await;
        assert_eq!(code, 200, "{live}");
        // SIGTERM is obeyed.
        let pid = child.id().unwrap().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status().await;
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .unwrap_or_else(|_| panic!("SIGTERM ignored (pipe closed: {closed})"))
            .unwrap();
        assert_eq!(status.code(), Some(0), "pipe closed: {closed}");
        drop(kept);
    }
}

/// A provider's 401 that echoes the `Authorization` header: the key appears nowhere in the
/// logs (at the default level and at debug), the status events or the health pages.
#[tokio::test]
async fn a_key_echoed_by_the_provider_is_redacted_everywhere() {
    const KEY: &str = "sk-or-v1-ECHOED-BY-THE-PROVIDER-0123456789";
    let llm = LlmServer::start().await;
    llm.set_default(Some(Reply::EchoAuth401));
    for level in ["info", "debug"] {
        let extra = format!(
            "  symbols: [K0/USD, K1/USD]\n  agents:\n    backend: openrouter\n    base_url: {}\n",
            llm.url
        );
        let mut p = Proc::spawn(
            "run",
            &config("*/2 * * * * *", &extra),
            &[("OPENROUTER_API_KEY", KEY), ("LOG_LEVEL", level)],
        )
        .await;
        p.wait_log(
            |l| l["message"] == "LLM provider refused the call; not retrying",
            Duration::from_secs(30),
        )
        .await;
        p.wait_log(
            |l| l["message"] == "cycle finished",
            Duration::from_secs(10),
        )
        .await;
        let (_, ready) = p.get("/health/ready").await;
        let (_, detailed) = p.get("/health/detailed").await;
        let (_, cycles) = p.get("/api/cycles").await;
        let (_, m) = p.get_text("/metrics").await;
        p.signal("TERM");
        assert_eq!(p.wait_exit(Duration::from_secs(20)).await, 0);
        let logs: Vec<String> = p
            .logs
            .lock()
            .unwrap()
            .iter()
            .map(Value::to_string)
            .collect();
        let all = logs.join("\n") + &p.raw.lock().unwrap().join("\n");
        assert!(
            llm.received()
                .iter()
                .any(|r| r.headers["authorization"] == format!("Bearer {KEY}").as_str())
        );
        for (what, text) in [
            ("logs", all.as_str()),
            ("/health/ready", &ready.to_string()),
            ("/health/detailed", &detailed.to_string()),
            ("/api/cycles", &cycles.to_string()),
            ("/metrics", m.as_str()),
        ] {
            assert!(
                !text.contains("ECHOED-BY-THE-PROVIDER"),
                "the key leaked into {what} at {level}"
            );
        }
        assert!(
            all.contains("[REDACTED]"),
            "the provider's message is kept, the key replaced ({level})"
        );
        assert_eq!(
            metric(&m, "autonomous_runner_log_lines_dropped_total", &[]),
            0.0,
            "a healthy pipe drops nothing"
        );
    }
}

/// 300 sockets that send nothing, half a header, or a request and then sit idle, against a
/// process limited to 256 file descriptors: the probes keep answering, and every one of
/// those sockets is closed by the server within the header-read timeout (10 s) plus slack.
#[tokio::test]
async fn an_idle_socket_flood_under_a_low_fd_limit_never_silences_the_probes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = free_port();
    let cfg = write_config(
        &config("*/2 * * * * *", "  symbols: [ETH/USD]\n")
            .replace("port: 0", &format!("port: {port}")),
    );
    let mut child = Command::new("sh")
        .args([
            "-c",
            "ulimit -n 256 && exec \"$0\" run --config \"$1\"",
            binary().to_str().unwrap(),
            cfg.path.to_str().unwrap(),
        ])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    // Until the child has bound its port the connection is refused: waited for, not failed on.
    wait_http_ok(&base, "/health/live", Duration::from_secs(30)).await;
    let addr = format!("127.0.0.1:{port}");
    let mut flood = Vec::new();
    for i in 0..300 {
        let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await else {
            continue;
        };
        match i % 6 {
            // Half a header, never finished.
            0..=1 => {
                let _ = s
                    .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                    .await;
            }
            // A whole request on a keep-alive connection, then silence.
            2 => {
                let _ = s
                    .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await;
            }
            // Nothing at all.
            _ => {}
        }
        flood.push(s);
    }
    assert!(flood.len() >= 250, "only {} sockets opened", flood.len());
    // The probes answer during the flood, on fresh connections.
    for _ in 0..5 {
        let (code, _) = get_json(&format!("{base}/health/live")).await;
        assert_eq!(code, 200);
        let (code, _) = get_json(&format!("{base}/health/ready")).await;
        assert_eq!(code, 200);
    }
    // Every flood socket is closed by the server: EOF (after any response) or a reset.
    let closed_by = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut open = vec![];
    for (i, s) in flood.iter_mut().enumerate() {
        let mut buf = vec![0u8; 4096];
        loop {
            match tokio::time::timeout_at(closed_by, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => continue,
                Err(_) => {
                    open.push(i);
                    break;
                }
            }
        }
    }
    let fds = std::fs::read_dir(format!("/proc/{}/fd", child.id().unwrap()))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(
        open.is_empty(),
        "sockets still open 20 s after the flood: {open:?}; server fds {fds}"
    );
    let (code, _) = get_json(&format!("{base}/health/live")).await;
    assert_eq!(code, 200, "still serving");
    let pid = child.id().unwrap().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status().await;
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// `/api/signals/latest` comes in pages of at most 1,000 symbols in name order; bad
/// parameters are a 400 that names the parameter.
#[tokio::test]
async fn latest_signals_come_in_bounded_pages() {
    let symbols: Vec<String> = (0..25).map(|i| format!("P{i:02}/USD")).collect();
    let p = spawn_app(&config(
        "*/2 * * * * *",
        &format!("  symbols: [{}]\n", symbols.join(", ")),
    ))
    .await;
    p.poll("/api/signals/latest", Duration::from_secs(30), |v| {
        v["total"] == 25
    })
    .await;
    let mut seen = vec![];
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!(
                "/api/signals/latest?limit=10&cursor={}",
                c.replace('/', "%2F")
            ),
            None => "/api/signals/latest?limit=10".to_string(),
        };
        let (code, page) = p.get(&path).await;
        assert_eq!(code, 200, "{page}");
        pages += 1;
        let signals = page["signals"].as_array().unwrap();
        assert!(signals.len() <= 10);
        seen.extend(
            signals
                .iter()
                .map(|s| s["symbol"].as_str().unwrap().to_string()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, symbols, "every symbol once, in name order");
    let (_, one) = p.get("/api/signals/latest?symbol=P07%2FUSD").await;
    assert_eq!(one["signals"].as_array().unwrap().len(), 1);
    for (query, param) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("colour=red", "query"),
    ] {
        let (code, body) = p.get(&format!("/api/signals/latest?{query}")).await;
        assert_eq!(code, 400, "{query}");
        assert_eq!(body["parameter"], param, "{query}: {body}");
    }
}

/// On a healthy Redis the dashboard-stream follower never fails (its XREAD BLOCK used to be
/// cut short by the client's 500 ms response timeout, a failure every ~45 s).
#[tokio::test]
async fn the_dashboard_stream_follower_is_quiet_on_a_healthy_redis() {
    let redis = crate::redis_server::RedisServer::start().await;
    let extra = format!(
        "  symbols: [ETH/USD]\n  coordination:\n    backend: redis\n    redis_url: {}\n",
        redis.url()
    );
    let app = spawn_app_with(
        config("*/2 * * * * *", &extra),
        AppOptions {
            key_prefix: Some(unique_prefix("follower")),
            ..AppOptions::default()
        },
    )
    .await;
    // Long enough for several idle XREAD BLOCKs (5 s each) to end normally.
    app.wait_cycles(6, Duration::from_secs(30)).await;
    let (_, d) = app.get("/health/detailed").await;
    assert_eq!(d["dashboard_stream"]["follows_redis"], true, "{d}");
    assert_eq!(d["dashboard_stream"]["follow_failures"], 0, "{d}");
    let (_, latest) = app.get("/api/signals/latest").await;
    assert_eq!(latest["total"], 1);
}

fn redis_cfg(url: &str, symbols: &str, more: &str) -> String {
    format!(
        "  symbols: [{symbols}]\n  coordination:\n    backend: redis\n    redis_url: {url}\n{more}"
    )
}

/// Redis comes back while the breaker is open: a health check on a fresh connection sees it
/// within a second and lets the breaker probe at once (not after its recovery timeout), the
/// first probe succeeds (it gets a second try on a fresh connection), so the breaker closes
/// without opening again — and the locks this replica held when Redis died are re-taken at
/// once, not left to expire.
#[tokio::test]
async fn after_a_redis_outage_the_first_probe_closes_the_breaker_and_our_locks_are_ours() {
    let market = crate::market_server::MarketServer::start().await;
    // Symbols take 2 s, so Redis dies while they hold their locks.
    market.set_default(crate::market_server::Behaviour {
        delay: Duration::from_secs(2),
        status: None,
    });
    let mut redis = crate::redis_server::RedisServer::start().await;
    let extra = redis_cfg(
        &redis.url(),
        "ETH/USD, BTC/USD, SOL/USD",
        &format!(
            "  market_data:\n    source: coinbase\n    coinbase_url: {}\n  circuit_breaker:\n    llm_service:\n      failure_threshold: 5\n      recovery_timeout_seconds: 60\n    redis:\n      failure_threshold: 1\n      recovery_timeout_seconds: 3600\n",
            market.url
        ),
    );
    let prefix = unique_prefix("probe");
    let app = spawn_app_with(
        config("*/5 * * * * *", &extra),
        AppOptions {
            key_prefix: Some(prefix.clone()),
            ..AppOptions::default()
        },
    )
    .await;
    // Every lock is taken; then Redis dies under them.
    let locks = format!("{prefix}signal:lock:*");
    redis.wait_keys(&locks, 3, Duration::from_secs(15)).await;
    redis.stop();
    let breaker = |d: &Value| d["circuit_breakers"]["redis"].clone();
    let d = app
        .poll("/health/detailed", Duration::from_secs(20), |d| {
            breaker(d)["state"] == "open"
        })
        .await;
    let opened = breaker(&d)["times_opened"].as_u64().unwrap();
    // Down until the app's own out-of-band check has seen it gone (readiness says so; the
    // client's reconnect attempts have failed), then back while the breaker is still open:
    // its recovery timeout is an hour.
    app.poll("/health/ready", Duration::from_secs(20), |r| {
        r["checks"]["coordination_connected"] == false
    })
    .await;
    redis.restart().await;
    assert_eq!(
        redis.keys(&locks).await.len(),
        3,
        "the locks held when Redis died survived its restart"
    );
    // Closed long before the hour is up: only the out-of-band health check, seeing Redis
    // answer, can have let the breaker probe.
    let d = app
        .poll("/health/detailed", Duration::from_secs(20), |d| {
            breaker(d)["state"] == "closed"
        })
        .await;
    assert_eq!(
        breaker(&d)["times_opened"].as_u64().unwrap(),
        opened,
        "the breaker opened again after Redis was back: {d}"
    );
    // The next cycle runs every symbol: the locks left from the outage were ours.
    let seen = app.run_cycles().await.len();
    let cycles = app.wait_cycles(seen + 1, Duration::from_secs(20)).await;
    let last = cycles.last().unwrap();
    assert_eq!(
        last["symbols_ok"], 3,
        "a lock of ours blocked its symbol: {last}"
    );
    let (_, d) = app.get("/health/detailed").await;
    assert_eq!(breaker(&d)["times_opened"].as_u64().unwrap(), opened, "{d}");
}

/// A second process with the same `instance_id` refuses to start, naming the id; the first
/// keeps its heartbeat and its locks.
#[tokio::test]
async fn a_duplicated_instance_id_is_refused_at_start() {
    let redis = crate::redis_server::RedisServer::start().await;
    let extra = redis_cfg(
        &redis.url(),
        "ETH/USD",
        "  heartbeat:\n    ttl_seconds: 6\n    interval_seconds: 2\n",
    );
    let first = Proc::spawn(
        "run",
        &config("*/2 * * * * *", &extra),
        &[("INSTANCE_ID", "twin")],
    )
    .await;
    first
        .wait_log(
            |l| l["message"] == "cycle finished",
            Duration::from_secs(10),
        )
        .await;
    let cfg = write_config(&config("*/2 * * * * *", &extra));
    let mut second = Proc::spawn_raw(
        &["run", "--config", cfg.path.to_str().unwrap()],
        &[("INSTANCE_ID", "twin")],
    );
    let code = second.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(code, 1, "the twin must not run");
    let err = second
        .wait_log(|l| l["message"] == "cannot start", Duration::from_secs(1))
        .await;
    let text = err["error"].as_str().unwrap();
    assert!(
        text.contains("\"twin\"") && text.contains("already used by a live process"),
        "{text}"
    );
    // The first is untouched: its heartbeat is there, and it keeps running cycles.
    assert_eq!(
        redis.keys("runner:heartbeat:*").await,
        vec!["runner:heartbeat:twin"]
    );
    let n = first
        .logs_matching(|l| l["message"] == "cycle finished")
        .len();
    first
        .wait_log_count(
            |l| l["message"] == "cycle finished",
            n + 1,
            Duration::from_secs(10),
        )
        .await;
    // After a SIGKILL of the first, a process with the same id may start (its heartbeat is
    // not refreshed any more) and takes over at once.
    let mut first = first;
    first.signal("KILL");
    let _ = first.wait_exit(Duration::from_secs(10)).await;
    let third = Proc::spawn(
        "run",
        &config("*/2 * * * * *", &extra),
        &[("INSTANCE_ID", "twin")],
    )
    .await;
    third
        .wait_log(
            |l| l["message"] == "cycle finished" && l["ok"] == 1,
            Duration::from_secs(30),
        )
        .await;
}

/// Two processes with one `instance_id` started at the same instant: exactly one runs, every
/// time (the claim is one `SET`-if-absent script, not a read then a write). And when the id is
/// claimed by another process later, the one running notices at its next heartbeat and stops,
/// leaving the other's claim in place.
#[tokio::test]
async fn of_twins_started_together_exactly_one_runs() {
    let redis = crate::redis_server::RedisServer::start().await;
    let extra = redis_cfg(
        &redis.url(),
        "ETH/USD",
        "  heartbeat:\n    ttl_seconds: 6\n    interval_seconds: 2\n",
    );
    let cfg = write_config(&config("*/2 * * * * *", &extra));
    let args = ["run", "--config", cfg.path.to_str().unwrap()];
    let started_or_refused =
        |l: &serde_json::Value| l["message"] == "cannot start" || l["message"] == "cycle finished";
    let mut winners = vec![];
    for round in 0..6 {
        let id = format!("twin-{round}");
        let a = Proc::spawn_raw(&args, &[("INSTANCE_ID", &id)]);
        let b = Proc::spawn_raw(&args, &[("INSTANCE_ID", &id)]);
        let (la, lb) = tokio::join!(
            a.wait_log(started_or_refused, Duration::from_secs(30)),
            b.wait_log(started_or_refused, Duration::from_secs(30)),
        );
        let mut outcome = [la["message"].clone(), lb["message"].clone()];
        outcome.sort_by_key(|m| m.to_string());
        assert_eq!(
            outcome,
            ["cannot start", "cycle finished"],
            "round {round}: {la} / {lb}"
        );
        let (mut winner, mut loser) = if la["message"] == "cycle finished" {
            (a, b)
        } else {
            (b, a)
        };
        assert_eq!(loser.wait_exit(Duration::from_secs(10)).await, 1);
        // The winner's claim stands: its heartbeat is the one under the id.
        let hb: String = redis::cmd("GET")
            .arg(format!("runner:heartbeat:{id}"))
            .query_async(&mut redis.conn().await)
            .await
            .unwrap();
        let hb: serde_json::Value = serde_json::from_str(&hb).unwrap();
        assert_eq!(
            hb["pid"].as_u64(),
            winner.child.id().map(u64::from),
            "round {round}"
        );
        if round < 5 {
            winner.signal("TERM");
            assert_eq!(winner.wait_exit(Duration::from_secs(30)).await, 0);
        } else {
            winners.push(winner);
        }
    }
    // Someone else takes the last winner's id: it stops at its next beat, non-zero, and does
    // not delete the other's claim on the way out.
    let mut survivor = winners.pop().unwrap();
    let other = r#"{"timestamp": 1, "pid": 4242, "token": "someone-else"}"#;
    let _: () = redis::cmd("SET")
        .arg("runner:heartbeat:twin-5")
        .arg(other)
        .arg("EX")
        .arg(60)
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    assert_eq!(survivor.wait_exit(Duration::from_secs(30)).await, 1);
    let why = survivor
        .wait_log(
            |l| l["message"] == "another process holds this instance_id; stopping",
            Duration::from_secs(1),
        )
        .await;
    assert!(why["error"].as_str().unwrap().contains("pid 4242"), "{why}");
    let hb: String = redis::cmd("GET")
        .arg("runner:heartbeat:twin-5")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    assert_eq!(hb, other);
}

/// The API answers a bad parameter the same way everywhere — 400 naming it — and paths and
/// methods it does not serve with JSON bodies (issue 24, item 3).
#[tokio::test]
async fn every_endpoint_names_a_bad_parameter_and_unknown_paths_are_json_404s() {
    let app = spawn_app(config("* * * * * *", "  symbols: [ETH/USD, BTC/USD]\n")).await;
    app.wait_cycles(2, Duration::from_secs(15)).await;
    for (path, param) in [
        ("/api/signals/latest?symbol=NOPE", "symbol"),
        ("/api/signals/latest?cursor=%00garbage", "cursor"),
        ("/api/signals/latest?limit=0", "limit"),
        ("/api/signals/history?symbol=NOPE", "symbol"),
        ("/api/candles?symbol=NOPE", "symbol"),
        ("/api/candles?symbol=DOGE/USD", "symbol"),
        ("/api/cycles?limit=abc", "limit"),
        ("/api/cycles?limit=0", "limit"),
        ("/api/cycles?colour=red", "query"),
    ] {
        let (code, body) = app.get(path).await;
        assert_eq!(
            (code, body["parameter"].as_str()),
            (400, Some(param)),
            "{path}: {body}"
        );
    }
    // A well-formed symbol is a filter (another replica may have it): 200.
    let (code, body) = app.get("/api/signals/latest?symbol=DOGE/USD").await;
    assert_eq!(
        (code, body["signals"].as_array().map(Vec::len)),
        (200, Some(0))
    );
    let (code, body) = app.get("/api/cycles?limit=1").await;
    assert_eq!(
        (code, body["cycles"].as_array().map(Vec::len)),
        (200, Some(1))
    );
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{}/no/such/thing", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let v: Value = r.json().await.expect("a JSON 404");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("/no/such/thing")),
        "{v}"
    );
    let r = http
        .delete(format!("{}/api/cycles", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert!(
        r.headers().get("allow").is_some(),
        "405 says what is allowed"
    );
    let v: Value = r.json().await.expect("a JSON 405");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("DELETE")),
        "{v}"
    );
    app.stop().await.expect("clean stop");
}
