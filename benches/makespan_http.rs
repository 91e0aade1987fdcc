//! Pool makespan against the test LLM server over real HTTP, in real time: 20 symbols, limit
//! 10, the signal agent's latency drawn lognormal (median 4 s, p95 9 s) per symbol and cycle.
//! Side by side, the seed's fixed-batch algorithm (batches of 10 that wait for their slowest
//! member, 1 s pause between batches) runs the same symbols on the same latencies through the
//! same pipeline.
//!
//! `cargo bench --bench makespan_http -- 6` (cycles per workload; default 6; ≈ 30 s a cycle).

// A benchmark is a tool run by hand: a failed setup step aborts it with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

#[path = "../tests/it/llm_server.rs"]
#[allow(dead_code)]
mod llm_server;

use std::sync::Arc;
use std::time::Duration;

use autonomous_runner::agents::llm::{LlmAgent, LlmHealth, LlmShared, TokenBudget};
use autonomous_runner::agents::openrouter::OpenRouter;
use autonomous_runner::agents::rules::Rules;
use autonomous_runner::agents::{Agent, CallLimits, StageAgents};
use autonomous_runner::config::Secret;
use autonomous_runner::coordination::LockTiming;
use autonomous_runner::coordination::memory::{MemoryCoordination, MemoryStore};
use autonomous_runner::coordinator::{Coordinator, CyclePlan};
use autonomous_runner::market::simulated::Simulated;
use autonomous_runner::pipeline::{PipelineContext, run_symbol};
use autonomous_runner::publish::Publisher;
use autonomous_runner::publish::hub::Hub;
use autonomous_runner::resilience::{
    Backoff, Breaker, BreakerMode, BreakerSettings, CallLatencies, RateLimiter,
};
use autonomous_runner::schedule::CycleId;
use llm_server::{LlmServer, Reply};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, LogNormal};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const LIMIT: usize = 10;

fn main() {
    let cycles: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(6);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(cycles));
}

async fn run(cycles: usize) {
    let llm = LlmServer::start().await;
    let breaker = Breaker::new(
        autonomous_runner::resilience::BreakerKind::LlmOpenrouter,
        BreakerSettings {
            failure_threshold: 5,
            recovery_timeout: Duration::from_secs(60),
            half_open_max_calls: 3,
            success_threshold: 2,
            mode: BreakerMode::Normal,
        },
    );
    let shared = Arc::new(LlmShared {
        limiter: Arc::new(RateLimiter::new(10_000, 1000)),
        budget: Arc::new(TokenBudget::new(None, None)),
        health: Arc::new(LlmHealth::default()),
        max_attempts: 1,
        backoff: Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(1),
            jitter: false,
        },
        fallback_rules: false,
        latencies: CallLatencies::new(200, Duration::from_secs(300)),
        hedge: None,
        max_tokens: 1024,
        tools: None,
        max_tool_rounds: 3,
        cache: None,
    });
    let transport = Arc::new(OpenRouter::new(&llm.url, Secret::default()).expect("client"));
    let signal: Arc<dyn Agent> = Arc::new(LlmAgent::new(
        transport,
        "bench".into(),
        None,
        breaker,
        shared,
    ));
    let rules: Arc<dyn Agent> = Arc::new(Rules);
    let pipeline = Arc::new(PipelineContext {
        market: Arc::new(Simulated::new()),
        agents: StageAgents {
            signal,
            advise: rules.clone(),
            report: rules,
        },
        publisher: Arc::new(Publisher::new(Hub::new(1024, None), 16, None)),
        candles: 120,
        clock: autonomous_runner::schedule::Clock::System,
        strategies: Default::default(),
        advise_min_score: 101.0,
        expiry_grace: Duration::from_secs(30),
        calibrator: None,
    });
    let timing = LockTiming {
        ttl: Duration::from_secs(90),
        stale_after: Duration::from_secs(120),
        heartbeat_ttl: Duration::from_secs(30),
    };
    let symbols: Vec<String> = autonomous_runner::config::DEFAULT_SYMBOLS
        .iter()
        .map(|s| s.to_string())
        .collect();
    let sigma = (9f64.ln() - 4f64.ln()) / 1.645;
    let dist = LogNormal::new(4f64.ln(), sigma).expect("lognormal");

    for persistent in [true, false] {
        let coord = Arc::new(MemoryCoordination::new(MemoryStore::new(), "bench", timing));
        let coordinator = Coordinator::new(
            coord,
            pipeline.clone(),
            symbols.clone(),
            timing.ttl,
            false,
            timing.ttl,
        );
        let mut rng = StdRng::seed_from_u64(7);
        let base: Vec<f64> = symbols.iter().map(|_| dist.sample(&mut rng)).collect();
        println!(
            "== {}",
            if persistent {
                "persistent per-symbol latencies (±10 % per cycle)"
            } else {
                "latencies drawn afresh every cycle"
            }
        );
        println!("cycle  pool_s  bound_s  ratio  lpt_s  fixed_batch_s");
        let (mut sp, mut sb, mut sf, mut sl) = (0.0, 0.0, 0.0, 0.0);
        for i in 0..cycles {
            let lat: Vec<f64> = (0..symbols.len())
                .map(|k| {
                    if persistent {
                        base[k] * rand::Rng::random_range(&mut rng, 0.9..1.1)
                    } else {
                        dist.sample(&mut rng)
                    }
                })
                .collect();
            for (s, d) in symbols.iter().zip(&lat) {
                llm.always_for(s, "signal", Reply::Slow(Duration::from_secs_f64(*d)));
            }
            let bound = lat
                .iter()
                .copied()
                .fold(0.0, f64::max)
                .max(lat.iter().sum::<f64>() / LIMIT as f64);
            let best = support::lpt(&lat, LIMIT);
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
            let r = coordinator
                .run_cycle(&plan, &CancellationToken::new())
                .await;
            let pool = Instant::now().duration_since(t0).as_secs_f64();
            assert_eq!(r.ok() as usize, symbols.len(), "every symbol completes");
            // The seed's algorithm, same symbols, same latencies, same pipeline.
            let t1 = Instant::now();
            let batches: Vec<&[String]> = symbols.chunks(LIMIT).collect();
            for (b, batch) in batches.iter().enumerate() {
                let mut set = tokio::task::JoinSet::new();
                for s in batch.iter() {
                    let (p, s) = (pipeline.clone(), s.clone());
                    let c = CycleId::new(cycle.time() + chrono::Duration::seconds(30));
                    set.spawn(async move {
                        let limits = CallLimits {
                            until: Instant::now() + Duration::from_secs(120),
                            per_call: Duration::from_secs(120),
                        };
                        run_symbol(&p, &s, &c, c.time(), limits).await.is_ok()
                    });
                }
                while set.join_next().await.is_some() {}
                if b + 1 < batches.len() {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            let fixed = Instant::now().duration_since(t1).as_secs_f64();
            println!(
                "{i:>5}  {pool:>6.2}  {bound:>7.2}  {:>5.3}  {best:>5.2}  {fixed:>13.2}",
                pool / bound
            );
            sl += best;
            sp += pool;
            sb += bound;
            sf += fixed;
        }
        let n = cycles as f64;
        println!("mean makespan (pool)          {:.2} s", sp / n);
        println!("mean lower bound              {:.2} s", sb / n);
        println!("mean ratio to the bound       {:.3}", sp / sb);
        println!("mean ratio to clairvoyant LPT {:.3}", sp / sl);
        println!("mean makespan (fixed batches) {:.2} s", sf / n);
        println!("speed-up over fixed batches   {:.2}×", sf / sp);
        println!();
    }
}
