//! Coordinator throughput: 1,000 symbols through all four stages with the rules agents and a
//! real Redis (locks, lease-free cycles, four messages per symbol into channels and streams
//! through the outbox). Reports symbols per second and Redis commands per symbol.
//!
//! `cargo bench --bench throughput -- 5` (measured cycles; default 5). Starts its own
//! `redis-server` on a free port.

// A benchmark is a tool run by hand: a failed setup step aborts it with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The service's own allocator (`src/main.rs`), so the bench measures what the service runs:
/// under glibc's malloc a sixth of this bench's time was `malloc`/`free`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use autonomous_runner::agents::StageAgents;
use autonomous_runner::coordination::LockTiming;
use autonomous_runner::coordination::redis::{RedisCoordination, connect};
use autonomous_runner::coordinator::{Coordinator, CyclePlan};
use autonomous_runner::market::simulated::Simulated;
use autonomous_runner::pipeline::PipelineContext;
use autonomous_runner::publish::hub::Hub;
use autonomous_runner::publish::redis::RedisSink;
use autonomous_runner::publish::{Publisher, Sink};
use autonomous_runner::resilience::{Breaker, BreakerMode, BreakerSettings};
use autonomous_runner::schedule::CycleId;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const SYMBOLS: usize = 1000;
const CONCURRENCY: usize = 64;

fn info(port: u16, section: &str) -> String {
    Command::new("redis-cli")
        .args(["-p", &port.to_string(), "INFO", section])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn commands_processed(port: u16) -> u64 {
    info(port, "stats")
        .lines()
        .find_map(|l| {
            l.strip_prefix("total_commands_processed:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

/// Calls per command, from `INFO commandstats` (a script's own calls included).
fn command_calls(port: u16) -> std::collections::BTreeMap<String, u64> {
    info(port, "commandstats")
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

fn main() {
    let cycles: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(6390);
    let mut redis = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // Ready when it accepts connections.
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        run(port, cycles).await
    });
    let _ = redis.kill();
    let _ = redis.wait();
}

async fn run(port: u16, cycles: usize) {
    let url = format!("redis://127.0.0.1:{port}");
    let conn = connect(&url).expect("redis");
    let breaker = Breaker::new(
        autonomous_runner::resilience::BreakerKind::Redis,
        BreakerSettings {
            failure_threshold: 3,
            recovery_timeout: Duration::from_secs(30),
            half_open_max_calls: 2,
            success_threshold: 1,
            mode: BreakerMode::Normal,
        },
    );
    let timing = LockTiming {
        ttl: Duration::from_secs(90),
        stale_after: Duration::from_secs(120),
        heartbeat_ttl: Duration::from_secs(30),
    };
    let coord = Arc::new(RedisCoordination::new(
        conn.clone(),
        breaker.clone(),
        "",
        "bench",
        timing,
    ));
    let sink = RedisSink::new(conn, breaker, "", 10_000, 100_000);
    let stop = CancellationToken::new();
    tokio::spawn(sink.clone().run(stop.clone()));
    let publisher = Arc::new(Publisher::new(
        Hub::new(1024, None),
        16,
        Some(sink.clone() as Arc<dyn Sink>),
    ));
    let pipeline = Arc::new(PipelineContext {
        market: Arc::new(Simulated::new()),
        agents: StageAgents::rules(),
        publisher: publisher.clone(),
        candles: 120,
        clock: autonomous_runner::schedule::Clock::System,
        strategies: Default::default(),
        advise_min_score: 0.0,
        expiry_grace: Duration::from_secs(30),
        calibrator: None,
    });
    let symbols: Vec<String> = (0..SYMBOLS).map(|i| format!("S{i}/USD")).collect();
    use autonomous_runner::coordination::Coordination;
    coord.heartbeat().await.expect("heartbeat");
    let coordinator = Coordinator::new(coord, pipeline, symbols, timing.ttl, false, timing.ttl);
    let plan = |i: i64| {
        let cycle = CycleId::new(chrono::Utc::now() + chrono::Duration::seconds(i));
        CyclePlan {
            cycle,
            next_tick: cycle.time() + chrono::Duration::minutes(1),
            concurrency: CONCURRENCY,
            call_timeout: Duration::from_secs(60),
            cycle_deadline: Instant::now() + Duration::from_secs(600),
            shed: 0,
        }
    };
    // Warm-up: the simulated market builds each symbol's history on first use.
    let r = coordinator
        .run_cycle(&plan(0), &CancellationToken::new())
        .await;
    publisher.flush(Duration::from_secs(60)).await;
    assert_eq!(r.ok() as usize, SYMBOLS, "warm-up completes every symbol");
    let before = commands_processed(port);
    let calls_before = command_calls(port);
    let t0 = Instant::now();
    let mut ok = 0usize;
    for i in 1..=cycles {
        let r = coordinator
            .run_cycle(&plan(i as i64), &CancellationToken::new())
            .await;
        ok += r.ok() as usize;
    }
    // Every message delivered to Redis is part of the work.
    publisher.flush(Duration::from_secs(60)).await;
    let elapsed = Instant::now().duration_since(t0).as_secs_f64();
    let after = commands_processed(port);
    let calls_after = command_calls(port);
    stop.cancel();
    println!("symbols completed      {ok} of {}", cycles * SYMBOLS);
    println!("elapsed                {elapsed:.2} s (all messages in Redis)");
    println!(
        "throughput             {:.0} symbols/s",
        ok as f64 / elapsed
    );
    println!(
        "Redis commands/symbol  {:.2} (INFO total_commands_processed: every command Redis executed, those inside scripts included)",
        (after - before) as f64 / ok.max(1) as f64
    );
    let by_command: Vec<String> = calls_after
        .iter()
        .filter_map(|(name, n)| {
            let d = n - calls_before.get(name).copied().unwrap_or(0);
            (d > 0 && name != "info").then(|| format!("{name} {:.2}", d as f64 / ok.max(1) as f64))
        })
        .collect();
    println!("by command, per symbol {}", by_command.join(", "));
}
