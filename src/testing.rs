//! Test support shared by the unit tests, the integration tests and the benchmarks: free ports
//! that nothing else can take, and the one polling wait every "until X" goes through.
//! Compiled only with the `test-support` feature (never into the shipped binary).
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

/// The first port of the kernel's ephemeral range (`ip_local_port_range`), 32768 when the file
/// cannot be read (Linux's default).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// A loopback port for a server a test starts itself (redis-server, postgres, influxd, a
/// runner child process) and may stop and start again on the same port.
///
/// Why not "bind port 0 and drop it": the kernel hands that same range out to every bind to
/// port 0 and to every outgoing connection's local port, so between our check and the
/// child's bind (or while a test has stopped its Redis for a restart) another test's client
/// socket can take it and the child fails to start. Ports are handed out from a window below
/// the ephemeral range instead, which only this function allocates from, one process-wide
/// counter starting at a per-process offset (so two test binaries running at once rarely
/// meet), each checked free on 127.0.0.1 before it is returned.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let top = ephemeral_start().clamp(12_000, 32_768);
    let bottom = top - 10_000;
    let span = u32::from(top - bottom);
    // A per-process starting point: the pid spreads concurrent test binaries apart.
    let _ = NEXT.compare_exchange(
        0,
        (std::process::id() % span) as u16 + 1,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = bottom + (u32::from(n) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 127.0.0.1:{bottom}..{top}");
}

/// Polls `probe` until it answers `Ok`, for at most `timeout`; then panics naming `what` was
/// awaited and the last thing `probe` reported (its `Err`). The one wait of the test support:
/// a server still starting (connection refused), a key not written yet or a count not reached
/// is waited for, never failed on at the first look, and a real failure says what was last
/// seen. Checks start 10 ms apart and back off to 250 ms.
pub async fn eventually<T, Fut>(
    what: impl Display,
    timeout: Duration,
    mut probe: impl FnMut() -> Fut,
) -> T
where
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut every = Duration::from_millis(10);
    let mut last = String::from("(no check finished)");
    loop {
        match tokio::time::timeout_at(deadline, probe()).await {
            Ok(Ok(v)) => return v,
            Ok(Err(e)) => last = e,
            Err(_) => last = format!("{last} (and the last check was still running)"),
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            panic!("waited {timeout:?} for {what}; last seen: {last}");
        }
        tokio::time::sleep(every.min(deadline - now)).await;
        every = (every * 2).min(Duration::from_millis(250));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "{ports:?}");
        let start = ephemeral_start();
        assert!(ports.iter().all(|p| *p < start), "{ports:?} vs {start}");
        for p in ports.iter().take(5) {
            std::net::TcpListener::bind(("127.0.0.1", *p)).expect("still free");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn eventually_returns_the_first_ok_and_keeps_trying_after_errors() {
        let mut n = 0;
        let v = eventually("the third try", Duration::from_secs(5), || {
            n += 1;
            let k = n;
            async move {
                if k < 3 {
                    Err(format!("try {k}"))
                } else {
                    Ok(k)
                }
            }
        })
        .await;
        assert_eq!(v, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn eventually_names_what_it_waited_for_and_what_it_last_saw() {
        let r = tokio::spawn(eventually("a key", Duration::from_secs(1), || async {
            Err::<(), _>("connection refused".to_string())
        }))
        .await;
        let panic = r.expect_err("gives up").into_panic();
        let msg = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("for a key"), "{msg}");
        assert!(msg.contains("last seen: connection refused"), "{msg}");
    }
}
