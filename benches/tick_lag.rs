//! Tick start lag: how long after each cron boundary the cycle actually starts, over 100 ticks
//! of a 1-second schedule (20 symbols, memory coordination, rules agents, release build).
//!
//! `cargo build --release && cargo bench --bench tick_lag -- 100` (ticks; default 100).

// A benchmark is a tool run by hand: a failed setup step aborts it with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

fn main() {
    let ticks: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100);
    let yaml = "autonomous_runner:\n  schedule: \"* * * * * *\"\n  instance_id: lag-bench\n  http:\n    bind: 127.0.0.1\n    port: 0\n";
    let r = support::Runner::spawn(yaml, &[]);
    let mut lags = vec![];
    while lags.len() < ticks {
        let Ok(v) = r.lines.recv_timeout(Duration::from_secs(10)) else {
            eprintln!("no log line for 10 s");
            break;
        };
        if v["message"] != "cycle started" {
            continue;
        }
        let (Some(at), Some(id)) = (v["timestamp"].as_str(), v["cycle_id"].as_str()) else {
            continue;
        };
        let (Ok(at), Ok(id)) = (
            at.parse::<chrono::DateTime<chrono::Utc>>(),
            id.parse::<chrono::DateTime<chrono::Utc>>(),
        ) else {
            continue;
        };
        lags.push((at - id).num_microseconds().unwrap_or(0) as f64 / 1000.0);
    }
    r.stop();
    // The first tick follows start-up; report it apart.
    let first = lags.first().copied().unwrap_or(f64::NAN);
    let mut rest: Vec<f64> = lags.iter().skip(1).copied().collect();
    rest.sort_by(f64::total_cmp);
    println!(
        "ticks measured: {} (first {first:.3} ms, excluded)",
        rest.len()
    );
    println!("lag p50  {:.3} ms", support::pct(&rest, 0.50));
    println!("lag p99  {:.3} ms", support::pct(&rest, 0.99));
    println!(
        "lag max  {:.3} ms",
        rest.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "lag min  {:.3} ms",
        rest.first().copied().unwrap_or(f64::NAN)
    );
}
