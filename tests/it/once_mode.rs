//! `once` (Kubernetes CronJob mode): exit codes, the lease, health probes, SIGTERM.

use std::time::Duration;

use crate::helpers::{Proc, config};
use crate::market_server::{Behaviour, MarketServer};
use crate::redis_server::RedisServer;

/// A yearly schedule: every `once` started this year belongs to the same tick.
const YEARLY: &str = "0 0 1 1 *";

#[tokio::test]
async fn the_second_once_for_a_tick_finds_the_lease_taken_and_exits_0() {
    let redis = RedisServer::start().await;
    let extra = format!(
        "  symbols: [ETH/USD, BTC/USD]\n  coordination:\n    backend: redis\n    redis_url: {}\n",
        redis.url()
    );
    let mut a = Proc::spawn("once", &config(YEARLY, &extra), &[("INSTANCE_ID", "job-a")]).await;
    assert_eq!(a.wait_exit(Duration::from_secs(30)).await, 0);
    assert_eq!(
        a.logs_matching(|l| l["message"] == "once: cycle ran").len(),
        1
    );
    let mut b = Proc::spawn("once", &config(YEARLY, &extra), &[("INSTANCE_ID", "job-b")]).await;
    assert_eq!(b.wait_exit(Duration::from_secs(30)).await, 0);
    let line = b
        .wait_log(
            |l| l["message"] == "once: nothing to do",
            Duration::from_secs(1),
        )
        .await;
    assert_eq!(line["reason"], "lease_held_elsewhere");
    assert!(
        b.logs_matching(|l| l["message"] == "cycle started")
            .is_empty()
    );
    // One cycle's signals in the stream, not two.
    assert_eq!(redis.stream("stream:raw-signals").await.len(), 2);
}

#[tokio::test]
async fn once_exits_non_zero_when_it_cannot_run() {
    // Nothing listens there: no locks, no lease, no cycle.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let extra = format!(
        "  symbols: [ETH/USD]\n  coordination:\n    backend: redis\n    redis_url: redis://127.0.0.1:{port}\n"
    );
    let mut p = Proc::spawn("once", &config(YEARLY, &extra), &[]).await;
    assert_eq!(p.wait_exit(Duration::from_secs(30)).await, 1);
    let line = p
        .wait_log(
            |l| l["message"] == "once: the cycle could not run",
            Duration::from_secs(1),
        )
        .await;
    assert_eq!(line["reason"], "coordination_unavailable");
}

#[tokio::test]
async fn once_serves_health_probes_while_it_runs() {
    let market = MarketServer::start().await;
    market.set_default(Behaviour {
        delay: Duration::from_secs(3),
        status: None,
    });
    let extra = format!(
        "  symbols: [ETH/USD, BTC/USD]\n  market_data:\n    source: coinbase\n    coinbase_url: {}\n",
        market.url
    );
    let mut p = Proc::spawn("once", &config(YEARLY, &extra), &[]).await;
    p.wait_log(|l| l["message"] == "cycle started", Duration::from_secs(10))
        .await;
    assert_eq!(p.get("/health/live").await.0, 200);
    let (code, ready) = p.get("/health/ready").await;
    assert_eq!(code, 200, "{ready}");
    assert_eq!(p.wait_exit(Duration::from_secs(30)).await, 0);
    assert_eq!(
        p.logs_matching(|l| l["message"] == "cycle finished")[0]["ok"],
        2
    );
}

#[tokio::test]
async fn once_honours_sigterm_within_the_grace_period() {
    let market = MarketServer::start().await;
    market.set_default(Behaviour {
        delay: Duration::from_secs(30),
        status: None,
    });
    let extra = format!(
        "  symbols: [ETH/USD, BTC/USD]\n  market_data:\n    source: coinbase\n    coinbase_url: {}\n  timeouts:\n    symbol_timeout_seconds: 50\n    symbol_timeout_max_seconds: 50\n    total_timeout_seconds: 55\n  graceful_shutdown:\n    timeout_seconds: 1\n",
        market.url
    );
    let mut p = Proc::spawn("once", &config(YEARLY, &extra), &[]).await;
    p.wait_log(|l| l["message"] == "cycle started", Duration::from_secs(10))
        .await;
    p.signal("TERM");
    // The symbols wait 30 s for candles: exiting within 20 s means the 1 s grace was honoured.
    assert_eq!(
        p.wait_exit(Duration::from_secs(20)).await,
        0,
        "the cycle ran (its symbols were cancelled)"
    );
    assert_eq!(
        p.logs_matching(|l| l["message"] == "cancelled by shutdown")
            .len(),
        2
    );
}

/// A `once` run pushes its metrics to a Pushgateway (Debian's `prometheus-pushgateway`) as it
/// ends, grouped by job and instance: the cycle it ran is there after the pod is gone.
#[tokio::test]
async fn once_pushes_its_metrics_to_the_pushgateway() {
    let port = crate::helpers::free_port();
    let _gateway = tokio::process::Command::new("prometheus-pushgateway")
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus-pushgateway (scripts/test installs it)");
    let url = format!("http://127.0.0.1:{port}");
    crate::helpers::wait_http_ok(&url, "/-/ready", Duration::from_secs(30)).await;
    let mut p = Proc::spawn(
        "once",
        &config(YEARLY, "  symbols: [ETH/USD, BTC/USD]\n"),
        &[("INSTANCE_ID", "cron-7"), ("PUSHGATEWAY_URL", url.as_str())],
    )
    .await;
    assert_eq!(p.wait_exit(Duration::from_secs(30)).await, 0);
    p.wait_log(|l| l["message"] == "metrics pushed", Duration::from_secs(1))
        .await;
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let group = [("instance", "cron-7"), ("job", "autonomous-runner")];
    assert_eq!(
        crate::helpers::metric(&text, "autonomous_runner_cycles_total", &group),
        1.0
    );
    for symbol in ["ETH/USD", "BTC/USD"] {
        let produced: f64 = ["BUY", "SELL", "HOLD"]
            .iter()
            .map(|a| {
                crate::helpers::metric(
                    &text,
                    "autonomous_runner_signal_generation_total",
                    &[group[0], group[1], ("symbol", symbol), ("action", a)],
                )
            })
            .sum();
        assert_eq!(produced, 1.0, "{symbol}");
    }
}

/// CronJob mode remembers with Redis: the first `once` opens the LLM breaker (the model
/// answers 503), the next pod starts with it open — it skips the tick without calling the
/// model, as a long-running service would until the recovery timeout. With memory
/// coordination a `once` says it has no memory.
#[tokio::test]
async fn consecutive_once_runs_share_the_gates_through_redis() {
    let redis = RedisServer::start().await;
    let llm = crate::llm_server::LlmServer::start().await;
    llm.set_default(Some(crate::llm_server::Reply::Status(503, None)));
    let extra = format!(
        "  symbols: [ETH/USD]\n  coordination:\n    backend: redis\n    redis_url: {}\n  agents:\n    backend: openrouter\n    base_url: {}\n  retry:\n    max_attempts: 1\n  circuit_breaker:\n    llm_service:\n      failure_threshold: 1\n      recovery_timeout_seconds: 600\n",
        redis.url(),
        llm.url
    );
    // Every second a tick of its own: each pod takes its own lease.
    let yaml = config("* * * * * *", &extra);
    let mut first = Proc::spawn("once", &yaml, &[("INSTANCE_ID", "pod-1")]).await;
    assert_eq!(first.wait_exit(Duration::from_secs(30)).await, 0);
    let asked = llm.received().len();
    assert!(asked >= 1, "the first pod asked the model");
    assert_eq!(redis.keys("runner:gates").await, vec!["runner:gates"]);

    let mut second = Proc::spawn("once", &yaml, &[("INSTANCE_ID", "pod-2")]).await;
    assert_ne!(second.wait_exit(Duration::from_secs(30)).await, 0);
    second
        .wait_log(
            |l| l["message"] == "gate state of the previous run restored" && l["breaker"] == "open",
            Duration::from_secs(1),
        )
        .await;
    let skipped = second
        .wait_log(
            |l| l["message"] == "once: the cycle could not run",
            Duration::from_secs(1),
        )
        .await;
    assert_eq!(skipped["reason"], "circuit_open");
    assert_eq!(
        llm.received().len(),
        asked,
        "the second pod never called the model"
    );

    // Memory coordination: said, not pretended.
    let mut alone = Proc::spawn(
        "once",
        &config("* * * * * *", "  symbols: [ETH/USD]\n"),
        &[],
    )
    .await;
    assert_eq!(alone.wait_exit(Duration::from_secs(30)).await, 0);
    alone
        .wait_log(
            |l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("once with memory coordination: no memory"))
            },
            Duration::from_secs(1),
        )
        .await;
}
