//! The history's cost and the scorecard's speed.
//!
//! 1. Cycle time of 1,000 symbols through all four stages (rules agents, memory coordination,
//!    64 at once), one cycle per 2 s tick as the service runs them, with the history off, on
//!    SQLite, and on PostgreSQL — target ≤ 5 % longer cycles. The writer holds back while a
//!    cycle runs (up to 10 s) as in the service; reported too: how long after each cycle its
//!    4,000 messages are all in the database.
//! 2. `/api/performance`'s query (sums per group and confidence bucket, medians per group)
//!    over 1,000,000 stored grades (20 symbols, 30 days at one a minute… and more), the last
//!    seven days, on both backends — target ≤ 100 ms.
//!
//! `cargo bench --bench history -- 5` (measured cycles per configuration; default 5). Starts
//! its own PostgreSQL (initdb into a temp dir, as the tests do).

// A benchmark is a tool run by hand: a failed setup step aborts it with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use autonomous_runner::agents::StageAgents;
use autonomous_runner::coordination::memory::{MemoryCoordination, MemoryStore};
use autonomous_runner::coordination::{Coordination, LockTiming};
use autonomous_runner::coordinator::{Coordinator, CyclePlan};
use autonomous_runner::history::grading::scorecard_of;
use autonomous_runner::history::sql::SqlStore;
use autonomous_runner::history::testing::PostgresServer;
use autonomous_runner::history::writer::HistoryWriter;
use autonomous_runner::history::{GroupBy, HistoryStore};
use autonomous_runner::market::simulated::Simulated;
use autonomous_runner::pipeline::PipelineContext;
use autonomous_runner::publish::Publisher;
use autonomous_runner::publish::hub::Hub;
use autonomous_runner::schedule::CycleId;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const SYMBOLS: usize = 1000;
const CONCURRENCY: usize = 64;
const GRADES: i64 = 1_000_000;

fn main() {
    let cycles: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let pg = PostgresServer::start().await;
        let sqlite: Arc<dyn HistoryStore> =
            Arc::new(SqlStore::sqlite(&dir.path().join("h.sqlite")).await.unwrap());
        let postgres: Arc<dyn HistoryStore> = Arc::new(SqlStore::postgres(&pg.url()).await.unwrap());

        println!("1. cycle of {SYMBOLS} symbols, {cycles} measured cycles each (mean; min–max)");
        let off = cycle_times(None, cycles).await;
        report("history off", &off, None);
        for (name, store) in [("SQLite", sqlite.clone()), ("PostgreSQL", postgres.clone())] {
            let on = cycle_times(Some(store), cycles).await;
            report(name, &on, Some(&off));
        }

        println!("\n2. /api/performance over {GRADES} stored grades, last 7 days (median of 10)");
        let sqlite_pool = sqlx::sqlite::SqlitePoolOptions::new()
            .connect(&format!("sqlite://{}", dir.path().join("h.sqlite").display()))
            .await
            .unwrap();
        sqlx::query(&fill_sql("WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 999999)", "n", false))
            .execute(&sqlite_pool)
            .await
            .unwrap();
        // One connection: the fill runs with the grades' foreign key off (these grades have no
        // messages; the scorecard reads the grades alone), which is a session setting.
        let pg_pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&pg.url()).await.unwrap();
        sqlx::query("SET session_replication_role = replica").execute(&pg_pool).await.unwrap();
        sqlx::query(&fill_sql("WITH n(i) AS (SELECT generate_series(0::bigint, 999999::bigint))", "n", true))
            .execute(&pg_pool)
            .await
            .unwrap();
        sqlx::query("SET session_replication_role = origin").execute(&pg_pool).await.unwrap();
        sqlx::query("ANALYZE").execute(&pg_pool).await.unwrap();
        // Grades written behind the store's back: sum them as an upgrade would.
        for store in [&sqlite, &postgres] {
            let t = Instant::now();
            store.rebuild_sums().await.unwrap();
            println!(
                "  ({} sums rebuilt from {GRADES} grades in {:.1} s)",
                store.backend(),
                t.elapsed().as_secs_f64()
            );
        }
        for (name, store) in [("SQLite", sqlite), ("PostgreSQL", postgres)] {
            for group_by in [GroupBy::Symbol, GroupBy::Action] {
                let mut times = vec![];
                let mut graded = 0;
                for _ in 0..10 {
                    let t = Instant::now();
                    let card = scorecard_of(store.as_ref(), 900, group_by, NOW - 7 * 86_400).await.unwrap();
                    times.push(t.elapsed().as_secs_f64() * 1000.0);
                    graded = card.iter().map(|g| g.graded).sum::<u64>();
                }
                times.sort_by(f64::total_cmp);
                let median = times[times.len() / 2];
                println!(
                    "  {name:<11} group_by={:<7} {median:7.1} ms over {graded} graded in the window ({})",
                    group_by.as_str(),
                    if median <= 100.0 { "target met" } else { "TARGET MISSED (≤ 100 ms)" }
                );
            }
        }
        drop(pg);
    });
}

/// The newest grade's tick: the 1,000,000 grades end here, one every 2.6 s over 30 days.
const NOW: i64 = 1_800_000_000;

/// 1,000,000 grades at horizon 15 m over 30 days before `NOW`: 20 symbols, three actions,
/// confidences spread over the buckets, about half hits. `postgres`: in PostgreSQL's types
/// (uuid ids, timestamptz times, boolean hits); else SQLite's integers.
fn fill_sql(numbers: &str, table: &str, postgres: bool) -> String {
    let (id, at, now, hit) = if postgres {
        (
            "md5('g' || i)::uuid".to_string(),
            format!("to_timestamp({NOW} - 2592000 + (i * 2592 / 1000))"),
            format!("to_timestamp({NOW})"),
            "i % 2 = 1",
        )
    } else {
        (
            "'g' || i".to_string(),
            format!("{NOW} - 2592000 + (i * 2592 / 1000)"),
            NOW.to_string(),
            "(i % 2)",
        )
    };
    format!(
        "{numbers} INSERT INTO signal_grades (signal_id, horizon_seconds, symbol, action, confidence, \
            confidence_bucket, tier, backend, model, strategy, cycle_at, price_then, price_after, \
            return_fraction, hit, status, graded_at) \
         SELECT {id}, 900, 'S' || (i % 20) || '/USD', \
            CASE i % 3 WHEN 0 THEN 'BUY' WHEN 1 THEN 'SELL' ELSE 'HOLD' END, \
            (i % 100) / 100.0, (i % 100) / 10, 'GOOD', 'rules', 'rules', 'RSI', \
            {at}, 100.0, 100.0 + (i % 7) - 3, ((i % 7) - 3) / 100.0, \
            {hit}, 'graded', {now} \
         FROM {table}"
    )
}

fn report(name: &str, times: &[f64], base: Option<&[f64]>) {
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let (min, max) = times
        .iter()
        .fold((f64::MAX, 0.0f64), |(a, b), t| (a.min(*t), b.max(*t)));
    let cost = base.map(|b| {
        let base_mean = b.iter().sum::<f64>() / b.len() as f64;
        let pct = (mean / base_mean - 1.0) * 100.0;
        format!(
            " — {pct:+.1} % against off ({})",
            if pct <= 5.0 {
                "target met"
            } else {
                "TARGET MISSED (≤ 5 %)"
            }
        )
    });
    println!(
        "  {name:<11} {mean:7.3} s ({min:.3}–{max:.3}){}",
        cost.unwrap_or_default()
    );
}

/// Cycle times of `cycles` cycles after a warm-up; with a store, its writer runs beside them
/// and the time to have everything written after the last cycle is printed.
async fn cycle_times(store: Option<Arc<dyn HistoryStore>>, cycles: usize) -> Vec<f64> {
    let timing = LockTiming {
        ttl: Duration::from_secs(90),
        stale_after: Duration::from_secs(120),
        heartbeat_ttl: Duration::from_secs(30),
    };
    let coord = Arc::new(MemoryCoordination::new(MemoryStore::new(), "bench", timing));
    coord.heartbeat().await.unwrap();
    let stop = CancellationToken::new();
    let running = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = running.clone();
    let busy: autonomous_runner::history::writer::Busy =
        Arc::new(move || flag.load(std::sync::atomic::Ordering::Relaxed));
    let writer = store.map(|s| HistoryWriter::holding_back_for(s, 1_000_000, 500, busy));
    if let Some(w) = &writer {
        tokio::spawn(w.clone().run(stop.clone(), Duration::from_secs(60)));
    }
    let publisher =
        Arc::new(Publisher::new(Hub::new(1024, None), 16, None).with_history(writer.clone()));
    let pipeline = Arc::new(PipelineContext {
        market: Arc::new(Simulated::new()),
        agents: StageAgents::rules(),
        publisher,
        candles: 120,
        clock: autonomous_runner::schedule::Clock::System,
        strategies: Default::default(),
        advise_min_score: 0.0,
        expiry_grace: Duration::from_secs(30),
        calibrator: None,
    });
    let symbols: Vec<String> = (0..SYMBOLS).map(|i| format!("S{i}/USD")).collect();
    let coordinator = Coordinator::new(coord, pipeline, symbols, timing.ttl, false, timing.ttl);
    let base = chrono::Utc::now();
    let plan = |i: i64| {
        let cycle = CycleId::new(base + chrono::Duration::minutes(i));
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
    assert_eq!(r.ok() as usize, SYMBOLS, "warm-up completes every symbol");
    let mut times = vec![];
    let mut written_after = vec![];
    let start = Instant::now() + Duration::from_secs(2);
    for i in 1..=cycles {
        // The next 2 s tick.
        tokio::time::sleep_until(start + Duration::from_secs(2 * (i as u64 - 1))).await;
        running.store(true, std::sync::atomic::Ordering::Relaxed);
        let t = Instant::now();
        let r = coordinator
            .run_cycle(&plan(i as i64), &CancellationToken::new())
            .await;
        times.push(t.elapsed().as_secs_f64());
        running.store(false, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(r.ok() as usize, SYMBOLS);
        if let Some(w) = &writer {
            let t = Instant::now();
            while w.queued() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            written_after.push(t.elapsed().as_secs_f64());
        }
    }
    if let Some(w) = writer {
        let mean = written_after.iter().sum::<f64>() / written_after.len() as f64;
        let max = written_after.iter().cloned().fold(0.0, f64::max);
        println!(
            "  ({}: each cycle's messages all written {mean:.2} s after it ended on average, {max:.2} s at most)",
            w.store().backend()
        );
    }
    stop.cancel();
    times
}
