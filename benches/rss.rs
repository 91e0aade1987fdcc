//! Resident memory of the runner over time: 20 symbols at a 1-second schedule (memory
//! coordination, rules agents), RSS sampled every 10 s.
//!
//! `cargo build --release && cargo bench --bench rss -- 30` (minutes; default 30).

// A benchmark is a tool run by hand: a failed setup step aborts it with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use tokio::time::Instant;

fn main() {
    let minutes: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(30);
    let yaml = "autonomous_runner:\n  schedule: \"* * * * * *\"\n  instance_id: rss-bench\n  http:\n    bind: 127.0.0.1\n    port: 0\n";
    let r = support::Runner::spawn(yaml, &[]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let start = rt.block_on(async { Instant::now() });
    let mut samples = vec![];
    println!("minute  rss_kib");
    while rt.block_on(async { start.elapsed() }) < Duration::from_secs(minutes * 60) {
        rt.block_on(async { tokio::time::sleep(Duration::from_secs(10)).await });
        let Some(kib) = r.rss_kib() else {
            eprintln!("runner exited");
            break;
        };
        let m = start.elapsed().as_secs_f64() / 60.0;
        samples.push((m, kib));
        println!("{m:6.2}  {kib}");
    }
    let first_min: Vec<u64> = samples
        .iter()
        .filter(|(m, _)| *m <= 1.0)
        .map(|s| s.1)
        .collect();
    let last_5: Vec<u64> = samples
        .iter()
        .filter(|(m, _)| *m >= minutes as f64 - 5.0)
        .map(|s| s.1)
        .collect();
    let max = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let avg = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    // Growth: least-squares slope over the second half (after the replay ring has filled).
    let half: Vec<(f64, f64)> = samples
        .iter()
        .filter(|(m, _)| *m >= minutes as f64 / 2.0)
        .map(|(m, k)| (*m, *k as f64))
        .collect();
    let n = half.len() as f64;
    let (sx, sy) = half
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let slope = half.iter().map(|(x, y)| (x - mx) * (y - my)).sum::<f64>()
        / half
            .iter()
            .map(|(x, _)| (x - mx).powi(2))
            .sum::<f64>()
            .max(1e-9);
    println!();
    println!("first minute mean  {:.1} MiB", avg(&first_min) / 1024.0);
    println!("last 5 minutes mean {:.1} MiB", avg(&last_5) / 1024.0);
    println!("max                {:.1} MiB", max as f64 / 1024.0);
    println!("slope, 2nd half    {:+.1} KiB/min", slope);
    r.stop();
}
