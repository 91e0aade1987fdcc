//! Pool makespan benchmark (not a test): 20 symbols, limit 10, per-symbol agent latency drawn
//! lognormal with median 4 s and p95 9 s. Runs the real `Coordinator` on tokio's paused
//! clock, so a "10 s" symbol costs no wall time and makespans are exact.
//!
//! Reports, over N cycles, the mean makespan against the lower bound max(slowest, Σ/limit),
//! next to the seed's fixed-batch algorithm (batches of `limit`, 1 s pause between batches)
//! on the same latencies, for two workloads:
//!
//! - `persistent`: each symbol's latency is drawn once from the lognormal (a symbol's prompt
//!   and tool work make it characteristically fast or slow) and varies ±10 % per cycle;
//! - `iid`: every symbol's latency is drawn afresh each cycle (no history helps).
//!
//! `cargo bench --bench pool` (optional args: cycles, seed).

// A benchmark is a tool run by hand: a failed setup step aborts it with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use autonomous_runner::agents::testing::Timed;
use autonomous_runner::coordination::LockTiming;
use autonomous_runner::coordination::memory::{MemoryCoordination, MemoryStore};
use autonomous_runner::coordinator::{Coordinator, CyclePlan};
use autonomous_runner::pipeline::testing;
use autonomous_runner::publish::Publisher;
use autonomous_runner::schedule::CycleId;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, LogNormal};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const SYMBOLS: usize = 20;
const LIMIT: usize = 10;

/// The seed's algorithm: fixed batches that wait for their slowest member, 1 s between them.
fn fixed_batches(lat: &[Duration], limit: usize) -> Duration {
    let mut total = Duration::ZERO;
    let batches: Vec<&[Duration]> = lat.chunks(limit).collect();
    for (i, b) in batches.iter().enumerate() {
        total += b.iter().copied().max().unwrap_or_default();
        if i + 1 < batches.len() {
            total += Duration::from_secs(1);
        }
    }
    total
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let cycles: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(20);
    let seed: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(42);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            std::process::exit(1);
        }
    };
    rt.block_on(run(cycles, seed));
}

#[derive(Clone, Copy, PartialEq)]
enum Workload {
    Persistent,
    Iid,
}

async fn run(cycles: usize, seed: u64) {
    for w in [Workload::Persistent, Workload::Iid] {
        run_workload(w, cycles, seed).await;
    }
}

async fn run_workload(workload: Workload, cycles: usize, seed: u64) {
    // Median 4 s → μ = ln 4; p95 9 s → σ = (ln 9 − ln 4) / 1.645.
    let sigma = (9f64.ln() - 4f64.ln()) / 1.645;
    let dist = match LogNormal::new(4f64.ln(), sigma) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("distribution: {e}");
            return;
        }
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let base: Vec<f64> = (0..SYMBOLS).map(|_| dist.sample(&mut rng)).collect();
    let symbols: Vec<String> = autonomous_runner::config::DEFAULT_SYMBOLS
        .iter()
        .map(|s| s.to_string())
        .collect();
    let agent = Arc::new(Timed::default());
    let publisher = Arc::new(Publisher::new(
        autonomous_runner::publish::hub::Hub::new(1024, None),
        16,
        None,
    ));
    let pipeline = Arc::new(testing::pipeline(agent.clone(), publisher));
    let timing = LockTiming {
        ttl: Duration::from_secs(90),
        stale_after: Duration::from_secs(120),
        heartbeat_ttl: Duration::from_secs(30),
    };
    let coord = Arc::new(MemoryCoordination::new(MemoryStore::new(), "bench", timing));
    let coordinator = Coordinator::new(
        coord,
        pipeline,
        symbols.clone(),
        timing.ttl,
        false,
        timing.ttl,
    );

    let (mut sum_pool, mut sum_bound, mut sum_fixed, mut worst_ratio) = (0.0, 0.0, 0.0, 0f64);
    let mut sum_lpt = 0.0;
    let name = match workload {
        Workload::Persistent => "persistent per-symbol latencies (±10 % per cycle)",
        Workload::Iid => "latencies drawn afresh every cycle",
    };
    println!("== {name}");
    println!("cycle  pool_s  bound_s  ratio  lpt_s  fixed_batch_s");
    for i in 0..cycles {
        let lat: Vec<Duration> = (0..SYMBOLS)
            .map(|k| {
                let secs = match workload {
                    Workload::Persistent => base[k] * rand::Rng::random_range(&mut rng, 0.9..1.1),
                    Workload::Iid => dist.sample(&mut rng),
                };
                Duration::from_secs_f64(secs)
            })
            .collect();
        for (s, d) in symbols.iter().zip(&lat) {
            agent.set(s, *d);
        }
        let slowest = lat.iter().copied().max().unwrap_or_default().as_secs_f64();
        let bound = slowest.max(lat.iter().map(Duration::as_secs_f64).sum::<f64>() / LIMIT as f64);
        let cycle = CycleId::new(chrono::Utc::now() + chrono::Duration::minutes(i as i64));
        let plan = CyclePlan {
            cycle,
            next_tick: cycle.time() + chrono::Duration::minutes(1),
            concurrency: LIMIT,
            call_timeout: Duration::from_secs(120),
            cycle_deadline: Instant::now() + Duration::from_secs(600),
            shed: 0,
        };
        let t0 = Instant::now();
        let report = coordinator
            .run_cycle(&plan, &CancellationToken::new())
            .await;
        let makespan = Instant::now().duration_since(t0).as_secs_f64();
        assert_eq!(report.ok() as usize, SYMBOLS, "every symbol completes");
        let fixed = fixed_batches(&lat, LIMIT).as_secs_f64();
        let ratio = makespan / bound;
        worst_ratio = worst_ratio.max(ratio);
        let best = support::lpt(
            &lat.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
            LIMIT,
        );
        sum_lpt += best;
        println!("{i:>5}  {makespan:>6.2}  {bound:>7.2}  {ratio:>5.3}  {best:>5.2}  {fixed:>13.2}");
        sum_pool += makespan;
        sum_bound += bound;
        sum_fixed += fixed;
    }
    let n = cycles as f64;
    println!();
    println!("mean makespan (pool)          {:.2} s", sum_pool / n);
    println!("mean lower bound              {:.2} s", sum_bound / n);
    println!(
        "mean ratio to the bound       {:.3} (worst cycle {:.3})",
        sum_pool / sum_bound,
        worst_ratio
    );
    println!("mean ratio to clairvoyant LPT {:.3}", sum_pool / sum_lpt);
    println!("mean makespan (fixed batches) {:.2} s", sum_fixed / n);
    println!("speed-up over fixed batches   {:.2}×", sum_fixed / sum_pool);
    println!();
}
