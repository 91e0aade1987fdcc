//! SSE fan-out: dashboard clients connected to runners on a 1-second schedule (20 symbols); for
//! every live signal each client receives, the time from publication (the envelope's
//! timestamp, taken just before it is published) to arrival. Reports p50/p99/max, and each
//! runner's resident memory while every client is connected.
//!
//! - `cargo bench --bench fanout -- 1000 30` (clients, seconds): one runner, in memory.
//! - `cargo bench --bench fanout -- replicas 10000 30`: two replicas sharing a real
//!   `redis-server` (started on a free port) with `coordination.work_sharing`, the clients
//!   spread over both. Each replica analyses only the symbols it claims; its dashboard shows
//!   every replica's signals through the Redis dashboard stream, so a client also proves the
//!   relay: it must see all 20 symbols.
//!
//! `cargo build --release` first. Needs one file descriptor per client in this process and
//! about as many again spread over the runners (`ulimit -n`).

// A benchmark is a tool run by hand: a failed setup step aborts it with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

#[path = "../tests/it/redis_server.rs"]
#[allow(dead_code)]
mod redis_server;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use memchr::memmem;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// What one client saw while measuring.
struct Seen {
    /// The runner it was connected to.
    replica: usize,
    /// Publish → receive, ms, per live signal.
    latencies: Vec<f64>,
    /// The same, keyed by the envelope's timestamp (µs since the epoch): which event it was.
    by_event: Vec<(i64, f64)>,
    /// Symbols of the live signals.
    symbols: HashSet<String>,
}

/// Why a client never got its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Refused {
    Connect,
    Status,
}

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    let replicas = if args.peek().map(String::as_str) == Some("replicas") {
        args.next();
        2
    } else {
        1
    };
    let nums: Vec<u64> = args.filter_map(|a| a.parse().ok()).collect();
    let clients = nums.first().copied().unwrap_or(1000) as usize;
    let seconds = nums.get(1).copied().unwrap_or(30);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // Kept alive until the runners are stopped.
    let redis = (replicas > 1).then(|| rt.block_on(redis_server::RedisServer::start()));
    let per_replica = clients.div_ceil(replicas);
    let runners: Vec<support::Runner> = (0..replicas)
        .map(|i| support::Runner::spawn(&config(i, per_replica, redis.as_ref()), &[]))
        .collect();
    let addrs: Vec<String> = runners
        .iter()
        .map(|r| r.base.trim_start_matches("http://").to_string())
        .collect();

    // Where the two cores go while measuring: the bench's own clients, each runner, Redis.
    let mut pids: Vec<u32> = vec![std::process::id()];
    pids.extend(runners.iter().map(support::Runner::pid));
    pids.extend(redis.as_ref().and_then(|r| r.pid()));
    let (seen, refused, cpu) = rt.block_on(async {
        let ready = Arc::new(AtomicUsize::new(0));
        // Signals published before this instant (the snapshot a new client gets, and the
        // ones sent while others were still connecting) are not measured.
        let from_ms = Arc::new(AtomicI64::new(i64::MAX));
        let stop = CancellationToken::new();
        let mut tasks = vec![];
        for i in 0..clients {
            let replica = i % replicas;
            let (addr, ready, from_ms, stop) = (
                addrs[replica].clone(),
                ready.clone(),
                from_ms.clone(),
                stop.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let r = client(&addr, replica, ready.clone(), from_ms, stop).await;
                // A refused client is settled too: the wait below is for every client.
                if r.is_err() {
                    ready.fetch_add(1, Ordering::Relaxed);
                }
                r
            }));
        }
        // Measure only once everyone has a stream (or was refused one).
        let mut waited = 0;
        while ready.load(Ordering::Relaxed) < clients && waited < 1200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            waited += 1;
        }
        from_ms.store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
        let cpu_before: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect();
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let cpu: Vec<f64> = pids
            .iter()
            .zip(cpu_before)
            .map(|(p, b)| cpu_seconds(*p) - b)
            .collect();
        stop.cancel();
        let mut seen = vec![];
        let mut refused = std::collections::HashMap::<Refused, usize>::new();
        for t in tasks {
            match t.await {
                Ok(Ok(s)) => seen.push(s),
                Ok(Err(r)) => *refused.entry(r).or_default() += 1,
                Err(_) => *refused.entry(Refused::Connect).or_default() += 1,
            }
        }
        (seen, refused, cpu)
    });
    // Memory while the clients were still connected would be the figure to state; the
    // clients are gone by now, so read it from the runners' peak instead (VmHWM).
    let peaks: Vec<Option<u64>> = runners.iter().map(peak_kib).collect();
    let rss_after: Vec<Option<u64>> = runners.iter().map(|r| r.rss_kib()).collect();
    for r in runners {
        r.stop();
    }
    drop(redis);

    let mut all: Vec<f64> = seen.iter().flat_map(|s| s.latencies.clone()).collect();
    all.sort_by(f64::total_cmp);
    println!(
        "replicas            {replicas}{}",
        if replicas > 1 {
            " (work sharing on one Redis)"
        } else {
            " (memory backend)"
        }
    );
    println!("clients streaming   {} of {clients}", seen.len());
    if !refused.is_empty() {
        println!("clients refused     {refused:?}");
    }
    println!("deliveries measured {} in {seconds} s", all.len());
    println!("latency p50         {:.1} ms", support::pct(&all, 0.50));
    println!("latency p99         {:.1} ms", support::pct(&all, 0.99));
    println!(
        "latency max         {:.1} ms",
        all.last().copied().unwrap_or(f64::NAN)
    );
    // Per event, its first arrival at any client: the relay's share (publish → Redis → each
    // replica's hub); the rest of a delivery's latency is the fan-out to that many sockets.
    let mut first = std::collections::HashMap::<i64, f64>::new();
    for (ev, ms) in seen.iter().flat_map(|s| s.by_event.iter()) {
        let f = first.entry(*ev).or_insert(f64::INFINITY);
        *f = f.min(*ms);
    }
    let mut first: Vec<f64> = first.into_values().collect();
    first.sort_by(f64::total_cmp);
    println!(
        "first arrival       p50 {:.1} ms, p99 {:.1} ms ({} events)",
        support::pct(&first, 0.50),
        support::pct(&first, 0.99),
        first.len()
    );
    let mut names = vec!["the clients (this process)".to_string()];
    names.extend((0..replicas).map(|i| format!("replica {i}")));
    names.push("redis-server".into());
    let cpu: Vec<String> = cpu
        .iter()
        .zip(&names)
        .map(|(c, n)| format!("{n} {:.0} %", c / seconds as f64 * 100.0))
        .collect();
    println!("CPU while measuring {}", cpu.join(", "));
    for (i, (peak, after)) in peaks.iter().zip(&rss_after).enumerate() {
        let mut lat: Vec<f64> = seen
            .iter()
            .filter(|s| s.replica == i)
            .flat_map(|s| s.latencies.clone())
            .collect();
        lat.sort_by(f64::total_cmp);
        let clients_here: Vec<&Seen> = seen.iter().filter(|s| s.replica == i).collect();
        let all_symbols = clients_here
            .iter()
            .filter(|s| s.symbols.len() >= 20)
            .count();
        println!(
            "replica {i}: {} clients, {} saw all 20 symbols, p50 {:.1} ms, p99 {:.1} ms, peak RSS {:.1} MiB, RSS after the clients left {:.1} MiB",
            clients_here.len(),
            all_symbols,
            support::pct(&lat, 0.50),
            support::pct(&lat, 0.99),
            peak.unwrap_or(0) as f64 / 1024.0,
            after.unwrap_or(0) as f64 / 1024.0,
        );
    }
}

/// A runner's config: room for its share of the clients, one address for all of them.
fn config(i: usize, clients: usize, redis: Option<&redis_server::RedisServer>) -> String {
    let streams = clients + 16;
    let coordination = match redis {
        Some(r) => format!(
            "  coordination:\n    backend: redis\n    redis_url: {}\n    work_sharing: true\n",
            r.url()
        ),
        None => String::new(),
    };
    // Every bench client comes from 127.0.0.1: no per-address cap. The history is off: the
    // replicas would otherwise share one SQLite file in the working directory.
    format!(
        "autonomous_runner:\n  schedule: \"* * * * * *\"\n  instance_id: fanout-{i}\n  history:\n    enabled: false\n  http:\n    bind: 127.0.0.1\n    port: 0\n    max_connections: {}\n    max_sse_streams: {streams}\n    max_sse_streams_per_client: 0\n{coordination}",
        streams * 4 / 3 + 64
    )
}

/// The peak resident set (`VmHWM`, KiB) of a runner.
fn peak_kib(r: &support::Runner) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{}/status", r.pid())).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A raw SSE client: waits for the `200` (then counts itself `ready`), then reads the stream and records, for each
/// `signal` event published after `from_ms`, now − the envelope's `timestamp`.
async fn client(
    addr: &str,
    replica: usize,
    ready: Arc<AtomicUsize>,
    from_ms: Arc<AtomicI64>,
    stop: CancellationToken,
) -> Result<Seen, Refused> {
    let mut seen = Seen {
        replica,
        latencies: vec![],
        by_event: vec![],
        symbols: HashSet::new(),
    };
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return Err(Refused::Connect);
    };
    let req = format!(
        "GET /api/signals/stream HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return Err(Refused::Connect);
    }
    // The clients' parsing is most of this process's work (and it shares the cores with the
    // runners): blocks are cut and searched in place, as bytes.
    let mut pending: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut head = true;
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => return Ok(seen),
            r = s.read_buf(&mut pending) => r,
        };
        match n {
            Ok(0) | Err(_) => return if head { Err(Refused::Status) } else { Ok(seen) },
            Ok(_) => {}
        }
        let now = chrono::Utc::now();
        let mut start = 0;
        while let Some(end) = memmem::find(&pending[start..], b"\n\n") {
            let block = &pending[start..start + end + 2];
            start += end + 2;
            if head {
                // The response head ends with \r\n\r\n, which holds no \n\n: the first block
                // is the head together with the first event.
                if !block.starts_with(b"HTTP/1.1 200") {
                    return Err(Refused::Status);
                }
                head = false;
                ready.fetch_add(1, Ordering::Relaxed);
            }
            if memmem::find(block, b"event: signal\n").is_none() {
                continue;
            }
            // The envelope's own timestamp: "timestamp":"…" at its top level comes first.
            let Some(t) = field(block, b"\"timestamp\":\"")
                .and_then(|ts| ts.parse::<chrono::DateTime<chrono::Utc>>().ok())
            else {
                continue;
            };
            if t.timestamp_millis() < from_ms.load(Ordering::Relaxed) {
                continue;
            }
            let ms = (now - t).num_microseconds().unwrap_or(0) as f64 / 1000.0;
            seen.latencies.push(ms);
            seen.by_event.push((t.timestamp_micros(), ms));
            if let Some(sym) = field(block, b"\"symbol\":\"")
                && !seen.symbols.contains(sym)
            {
                seen.symbols.insert(sym.to_string());
            }
        }
        pending.drain(..start);
    }
}

/// The string value after the first `key` (which ends with the opening quote) in `block`.
fn field<'a>(block: &'a [u8], key: &[u8]) -> Option<&'a str> {
    let at = memmem::find(block, key)? + key.len();
    let len = memchr::memchr(b'"', &block[at..])?;
    std::str::from_utf8(&block[at..at + len]).ok()
}

/// User + system CPU seconds a process has used (`/proc/{pid}/stat`, in clock ticks of 1/100 s).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) — utime and stime are the 12th
    // and 13th of them.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<f64>() / 100.0
}
