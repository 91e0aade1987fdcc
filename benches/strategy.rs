//! The strategy layer at replay speed: one pass over a day of 1-minute candles for the
//! default 20 symbols — every minute's 120-candle window evaluated by all six strategies with
//! their hit rates, and summarized into the market context, as the pipeline does each tick:
//! 28,800 evaluations. Target: well under a second (a replay of a day must not be bound by
//! it). Prints the median of the runs and the time per evaluation.
//!
//! `cargo bench --bench strategy -- 7` (runs; default 7). No services needed.

// A benchmark is a tool run by hand: a failed setup step aborts it with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use autonomous_runner::config::Config;
use autonomous_runner::market::MarketSource;
use autonomous_runner::market::simulated::Simulated;
use autonomous_runner::model::Action;
use autonomous_runner::strategy::{StrategySet, summarize};
use chrono::{TimeZone, Utc};
use tokio::time::Instant;

/// The live window (`market_data.candles`' default).
const WINDOW: usize = 120;
/// Minutes in the day replayed.
const DAY: usize = 1440;
/// The target for one pass.
const TARGET_SECONDS: f64 = 0.25;
/// Candles fetched a call while walking the day.
const STEP: usize = 500;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(7);
    let cfg = Config::default();
    let market = Simulated::new();
    let end = Utc.timestamp_opt(1_790_000_000, 0).single().expect("t");
    let mut days = vec![];
    for s in &cfg.symbols {
        // The day plus the window before its first minute, walked forwards in steps (the
        // simulated source answers at most 600 candles a call; its series is continuous).
        let total = DAY + WINDOW - 1;
        let mut c: Vec<autonomous_runner::market::Candle> = vec![];
        let mut at = end - chrono::Duration::minutes(total as i64);
        while c.len() < total {
            at += chrono::Duration::minutes(STEP as i64);
            let part = market.candles(s, at, STEP).await.expect("candles");
            let last = c.last().map(|k| k.time);
            c.extend(part.into_iter().filter(|k| last.is_none_or(|t| k.time > t)));
        }
        c.truncate(total);
        assert_eq!(c.len(), total, "{s}");
        assert!(
            c.windows(2)
                .all(|w| (w[1].time - w[0].time).num_minutes() == 1),
            "{s}: a gap"
        );
        days.push(c);
    }
    let set = StrategySet::new(cfg.strategies.clone());
    let mut times = vec![];
    let mut evaluations = 0;
    let mut calls = [0usize; 3];
    for _ in 0..runs {
        let started = Instant::now();
        evaluations = 0;
        calls = [0; 3];
        for day in &days {
            for t in 0..DAY {
                let w = &day[t..t + WINDOW];
                let ctx = summarize(w);
                let verdicts = set.evaluate(w);
                evaluations += 1;
                // Used, so the work cannot be optimized away; and a sanity figure.
                for (v, _) in &verdicts {
                    calls[match v.signal {
                        Action::Buy => 0,
                        Action::Sell => 1,
                        Action::Hold => 2,
                    }] += usize::from(ctx.current_price > 0.0);
                }
            }
        }
        times.push(started.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{} symbols × {DAY} minutes = {evaluations} evaluations of {} strategies on {WINDOW}-candle windows",
        days.len(),
        6
    );
    println!(
        "one pass: median {:.1} ms (min {:.1}, max {:.1}) over {runs} runs; {:.1} µs an evaluation; verdicts BUY {} / SELL {} / HOLD {}",
        median * 1e3,
        times[0] * 1e3,
        times[times.len() - 1] * 1e3,
        median / evaluations as f64 * 1e6,
        calls[0],
        calls[1],
        calls[2],
    );
    if median > TARGET_SECONDS {
        println!(
            "TARGET MISSED: {:.1} ms > {:.0} ms",
            median * 1e3,
            TARGET_SECONDS * 1e3
        );
    } else {
        println!("target ≤ {:.0} ms: met", TARGET_SECONDS * 1e3);
    }
}
