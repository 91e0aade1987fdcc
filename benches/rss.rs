//! Resident memory of the runner over time: 20 symbols at a 1-second schedule (memory
//! coordination, rules agents), RSS sampled every 10 s.
//!
//! `cargo build --release && cargo bench --bench rss -- 30` (minutes; default 30).
//!
//! `cargo bench --bench rss -- floods [N]`: memory after connection floods instead — the
//! baseline after 20 s, then N floods (default 30) of 2,000 connections that each open a
//! dashboard stream or send nothing, held 2 s and closed, RSS after each, and 30 s after the
//! last. Target: back to the baseline (within 10 %) after the floods.

// A benchmark is a tool run by hand: a failed setup step aborts it with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use tokio::time::Instant;

/// One flood: `n` connections to `base`, every other one opening a dashboard stream (the
/// rest send nothing), held for 2 s, then closed.
async fn flood(base: &str, n: usize) -> usize {
    use tokio::io::AsyncWriteExt;
    let addr: std::net::SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
            continue;
        };
        if i % 2 == 0 {
            let _ = s
                .write_all(b"GET /api/signals/stream HTTP/1.1\r\nHost: b\r\n\r\n")
                .await;
        }
        held.push(s);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    held.len()
}

fn floods(count: usize) {
    // Room for a whole flood: the connection cap above it.
    let yaml = "autonomous_runner:\n  schedule: \"* * * * * *\"\n  instance_id: rss-bench\n  http:\n    bind: 127.0.0.1\n    port: 0\n    max_connections: 4096\n";
    let r = support::Runner::spawn(yaml, &[]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        tokio::time::sleep(Duration::from_secs(20)).await;
        let base = r.rss_kib().unwrap();
        println!("baseline           {:.1} MiB", base as f64 / 1024.0);
        let mut peak = base;
        for i in 1..=count {
            let opened = flood(&r.base, 2_000).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let kib = r.rss_kib().unwrap();
            peak = peak.max(kib);
            println!(
                "flood {i:2} ({opened} connections)  {:.1} MiB",
                kib as f64 / 1024.0
            );
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
        let after = r.rss_kib().unwrap();
        let lazy = r.lazy_free_kib().unwrap_or(0);
        println!(
            "of which given back (MADV_FREE, reclaimable at once) {:.1} MiB: held {:.1} MiB ({:+.0} % of the baseline)",
            lazy as f64 / 1024.0,
            (after - lazy) as f64 / 1024.0,
            ((after - lazy) as f64 / base as f64 - 1.0) * 100.0
        );
        let ratio = after as f64 / base as f64;
        println!(
            "30 s after the last {:.1} MiB ({:+.0} % of the baseline; peak {:.1} MiB)",
            after as f64 / 1024.0,
            (ratio - 1.0) * 100.0,
            peak as f64 / 1024.0
        );
        if ratio > 1.10 {
            println!("TARGET MISSED: more than 10 % above the baseline after the floods");
        } else {
            println!("target met: within 10 % of the baseline");
        }
    });
    r.stop();
}

fn main() {
    if std::env::args().any(|a| a == "floods") {
        let n = std::env::args()
            .skip(1)
            .find_map(|a| a.parse().ok())
            .unwrap_or(30);
        return floods(n);
    }
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
