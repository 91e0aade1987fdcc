//! The Redis sink: every stage message is `PUBLISH`ed on its channel and `XADD`ed to its
//! stream (`MAXLEN ~ publish.stream_max_len`, one field `message` holding the envelope) in one
//! round trip, through an outbox that survives a Redis outage.
//!
//! - **Never blocks the pipeline**: `publish` appends to the outbox and returns.
//! - **In order**: one deliverer drains the outbox front to back, in batches.
//! - **Bounded**: past `publish.outbox_max` the oldest message is dropped and counted.
//! - **Never twice in a stream**: a batch whose outcome is unknown (timeout, reset) is retried
//!   with a script that first looks for the message's deterministic `message_id` among the
//!   stream's newest entries, and skips it if it is there.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Sink;
use crate::model::StageMessage;
use crate::resilience::{Backoff, Breaker};
use crate::telemetry::names;

/// XADD + PUBLISH once. KEYS[1] stream; ARGV: channel, message, message_id, maxlen,
/// scan (0 on a first attempt; on a retry, how many newest entries to search).
const PUBLISH_ONCE: &str = r"
local scan = tonumber(ARGV[5])
if scan > 0 then
  local recent = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', scan)
  for _, entry in ipairs(recent) do
    local fields = entry[2]
    for i = 1, #fields, 2 do
      if fields[i] == 'message' then
        local ok, decoded = pcall(cjson.decode, fields[i + 1])
        if ok and type(decoded) == 'table' and decoded['message_id'] == ARGV[3] then
          return 0
        end
      end
    end
  end
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', 'message', ARGV[2])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1";

/// Messages per round trip.
const BATCH: usize = 128;

#[derive(Debug, Clone)]
struct Pending {
    stream: String,
    channel: String,
    message_id: String,
    body: Arc<str>,
    /// A delivery of this message may have reached Redis already.
    uncertain: bool,
}

/// The sink.
pub struct RedisSink {
    conn: ConnectionManager,
    breaker: Breaker,
    prefix: String,
    max_len: u64,
    cap: usize,
    outbox: Mutex<VecDeque<Pending>>,
    /// Messages dropped from a full outbox since start (also `outbox_dropped_total`).
    dropped: std::sync::atomic::AtomicU64,
    wake: Notify,
    drained: Notify,
}

impl std::fmt::Debug for RedisSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSink")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisSink {
    /// A sink on `conn`; call [`RedisSink::run`] to start delivering.
    pub fn new(
        conn: ConnectionManager,
        breaker: Breaker,
        prefix: &str,
        max_len: u64,
        outbox_max: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            conn,
            breaker,
            prefix: prefix.to_string(),
            max_len,
            cap: outbox_max.max(1),
            outbox: Mutex::new(VecDeque::new()),
            dropped: std::sync::atomic::AtomicU64::new(0),
            wake: Notify::new(),
            drained: Notify::new(),
        })
    }

    fn outbox(&self) -> MutexGuard<'_, VecDeque<Pending>> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Messages waiting.
    pub fn depth(&self) -> usize {
        self.outbox().len()
    }

    /// Messages dropped from a full outbox since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Delivers until `stop` fires (then returns; `flush` delivers what is left).
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let backoff = Backoff {
            base: Duration::from_millis(200),
            max: Duration::from_secs(5),
            jitter: true,
        };
        let mut failures = 0u32;
        loop {
            if stop.is_cancelled() {
                return;
            }
            let notified = self.wake.notified();
            if self.depth() == 0 {
                self.drained.notify_waiters();
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = notified => continue,
                }
            }
            match self.deliver_batch().await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(50) {
                        tracing::warn!(error = %e, waiting = self.depth(), "Redis publish failed; messages wait in the outbox");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff.delay(failures.min(10))) => {}
                    }
                }
            }
        }
    }

    /// Delivers the front batch; on success removes it from the outbox.
    async fn deliver_batch(&self) -> Result<(), String> {
        let batch: Vec<Pending> = self.outbox().iter().take(BATCH).cloned().collect();
        if batch.is_empty() {
            return Ok(());
        }
        let permit = self.breaker.try_acquire().map_err(|e| {
            metrics::counter!(names::CIRCUIT_BREAKER_REJECTED, "breaker" => "redis").increment(1);
            e.to_string()
        })?;
        // Search as far back as this batch plus a margin could reach.
        let scan = (BATCH * 2).to_string();
        let pipe = |all_uncertain: bool| {
            let mut pipe = redis::pipe();
            for p in &batch {
                pipe.cmd("EVAL")
                    .arg(PUBLISH_ONCE)
                    .arg(1)
                    .arg(&p.stream)
                    .arg(&p.channel)
                    .arg(&*p.body)
                    .arg(&p.message_id)
                    .arg(self.max_len)
                    .arg(if p.uncertain || all_uncertain {
                        scan.as_str()
                    } else {
                        "0"
                    });
            }
            pipe
        };
        let mut conn = self.conn.clone();
        let mut result = pipe(false).query_async::<Vec<i64>>(&mut conn).await;
        // A half-open probe on a dead connection gets a second try on the fresh one (see
        // `coordination::redis`); the first may have been applied, so the retry looks for
        // each message before adding it.
        if let Err(e) = &result
            && permit.is_probe()
            && crate::coordination::redis::is_connection_error(e)
        {
            result = pipe(true).query_async::<Vec<i64>>(&mut conn).await;
        }
        match result {
            Ok(results) => {
                permit.success();
                let mut ob = self.outbox();
                // Remove exactly the delivered front entries (the outbox may have grown, or
                // been trimmed from the front by overflow meanwhile).
                for p in &batch {
                    if ob
                        .front()
                        .is_some_and(|f| f.message_id == p.message_id && f.stream == p.stream)
                    {
                        ob.pop_front();
                    }
                }
                let dup = results.iter().filter(|r| **r == 0).count();
                if dup > 0 {
                    tracing::info!(
                        count = dup,
                        "messages already in their stream were not added again"
                    );
                }
                metrics::gauge!(names::OUTBOX_DEPTH).set(ob.len() as f64);
                Ok(())
            }
            Err(e) => {
                permit.failure();
                let mut ob = self.outbox();
                for p in ob.iter_mut().take(batch.len()) {
                    p.uncertain = true;
                }
                Err(format!("{:?}", e.kind()))
            }
        }
    }
}

#[async_trait]
impl Sink for RedisSink {
    async fn publish(&self, msg: &StageMessage) {
        let body: Arc<str> = match serde_json::to_string(&msg.envelope) {
            Ok(b) => b.into(),
            Err(e) => {
                tracing::error!(error = %e, symbol = %msg.symbol, "cannot serialise a message");
                return;
            }
        };
        let p = Pending {
            stream: format!("{}{}", self.prefix, msg.stage.stream()),
            channel: format!("{}{}", self.prefix, msg.stage.channel()),
            message_id: msg.envelope.message_id.clone(),
            body,
            uncertain: false,
        };
        {
            let mut ob = self.outbox();
            if ob.len() >= self.cap {
                ob.pop_front();
                self.dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                metrics::counter!(names::OUTBOX_DROPPED).increment(1);
                tracing::warn!(cap = self.cap, "outbox full: dropped the oldest message");
            }
            ob.push_back(p);
            metrics::gauge!(names::OUTBOX_DEPTH).set(ob.len() as f64);
        }
        self.wake.notify_one();
    }

    async fn flush(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.depth() > 0 {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    left = self.depth(),
                    "outbox not empty at shutdown; those messages are lost with the process"
                );
                return;
            }
            match self.deliver_batch().await {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "flush: Redis publish failed");
                    tokio::time::sleep(
                        Duration::from_millis(200).min(deadline - tokio::time::Instant::now()),
                    )
                    .await;
                }
            }
        }
    }
}
