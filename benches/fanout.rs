//! SSE fan-out: 1,000 clients connected to one runner (20 symbols, 1-second schedule); for
//! every signal each client receives, the time from publication (the envelope's timestamp,
//! taken just before it is published) to arrival. Reports p50/p99/max.
//!
//! `cargo build --release && cargo bench --bench fanout -- 1000 30` (clients, seconds).
//! Needs ~2,100 file descriptors (`ulimit -n`).

// A benchmark is a tool run by hand: a failed setup step aborts it with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let clients = args.first().copied().unwrap_or(1000) as usize;
    let seconds = args.get(1).copied().unwrap_or(30);
    let yaml = "autonomous_runner:\n  schedule: \"* * * * * *\"\n  instance_id: fanout-bench\n  http:\n    bind: 127.0.0.1\n    port: 0\n";
    let r = support::Runner::spawn(yaml, &[]);
    let addr = r.base.trim_start_matches("http://").to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (lat, connected) = rt.block_on(async move {
        let lat = Arc::new(Mutex::new(Vec::<f64>::new()));
        let mut tasks = vec![];
        let ready = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for _ in 0..clients {
            let (addr, lat, ready) = (addr.clone(), lat.clone(), ready.clone());
            tasks.push(tokio::spawn(async move { client(&addr, lat, ready).await }));
        }
        // Measure only once everyone is connected.
        while ready.load(std::sync::atomic::Ordering::Relaxed) < clients {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        lat.lock().unwrap_or_else(|p| p.into_inner()).clear();
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        for t in &tasks {
            t.abort();
        }
        let v = lat.lock().unwrap_or_else(|p| p.into_inner()).clone();
        (v, ready.load(std::sync::atomic::Ordering::Relaxed))
    });
    r.stop();
    let mut lat = lat;
    lat.sort_by(f64::total_cmp);
    println!("clients connected   {connected}");
    println!("deliveries measured {}", lat.len());
    println!("latency p50         {:.1} ms", support::pct(&lat, 0.50));
    println!("latency p99         {:.1} ms", support::pct(&lat, 0.99));
    println!(
        "latency max         {:.1} ms",
        lat.last().copied().unwrap_or(f64::NAN)
    );
}

/// A raw SSE client: reads the stream and records, for each live `signal` event, now − the
/// envelope's `timestamp`.
async fn client(addr: &str, lat: Arc<Mutex<Vec<f64>>>, ready: Arc<std::sync::atomic::AtomicUsize>) {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return;
    };
    let req = format!(
        "GET /api/signals/stream HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return;
    }
    ready.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending = String::new();
    // A new client first gets a snapshot of old signals; measure only what arrives after the
    // first live `cycle` event.
    let mut live = false;
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let now = chrono::Utc::now();
        pending.push_str(&String::from_utf8_lossy(&buf[..n]));
        while let Some(end) = pending.find("\n\n") {
            let block: String = pending.drain(..end + 2).collect();
            if block.contains("event: cycle") {
                live = true;
            }
            if !live || !block.contains("event: signal") {
                continue;
            }
            // The envelope's own timestamp: "timestamp":"…" at its top level comes first.
            if let Some(ts) = block
                .split("\"timestamp\":\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                && let Ok(t) = ts.parse::<chrono::DateTime<chrono::Utc>>()
            {
                let ms = (now - t).num_microseconds().unwrap_or(0) as f64 / 1000.0;
                lat.lock().unwrap_or_else(|p| p.into_inner()).push(ms);
            }
        }
    }
}
