//! The Redis sink: every stage message is `PUBLISH`ed on its channel and `XADD`ed to its
//! stream (`MAXLEN ~ publish.stream_max_len`, one field `message` holding the envelope),
//! through an outbox that survives a Redis outage; what waits in the outbox goes out in one
//! script call (a round trip, two commands a message).
//!
//! - **Never blocks the pipeline**: `publish` appends to the outbox and returns.
//! - **In order**: one deliverer drains the outbox front to back, in batches.
//! - **Bounded**: past `publish.outbox_max` the oldest message is dropped and counted.
//! - **Never twice in a stream**: a batch whose outcome is unknown (timeout, reset) is retried
//!   with a script that first looks for the message's deterministic `message_id` among the
//!   stream's newest entries, and skips it if it is there.
//! - **Durable before it is acknowledged**: with a spool file, every message is appended to it
//!   (the journal) as it enters the outbox, and the file is emptied whenever the outbox is:
//!   a process killed at any moment (SIGKILL, OOM) leaves in the file everything it had not
//!   delivered, and the next start delivers it, each message looked for in its stream first.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
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

/// A batch of messages, each XADDed and PUBLISHed once, in one script call: KEYS are the
/// messages' streams, in order; ARGV[1] the streams' max length, then four arguments per
/// message — channel, message, message_id, and scan (0 on a first attempt; on a retry, how
/// many newest entries of its stream to search for its `message_id` before adding it).
/// Returns one 1 (added) or 0 (already there) per message.
///
/// Why one script a batch rather than a script a message: Redis counts every call, the
/// script's own included (`INFO commandstats`), so a script a message costs three commands
/// (EVAL, XADD, PUBLISH) where the batch costs two and one call in all; and the script is
/// sent by its SHA, not its text each time. A batch is applied whole or, if a write fails
/// (a stream key of another type), up to that message — its outcome is then unknown and the
/// retry searches for every message, as it does after a lost reply.
const PUBLISH_BATCH: &str = r"
local maxlen = ARGV[1]
local out = {}
for i = 1, #KEYS do
  local a = 2 + (i - 1) * 4
  local channel, body, id, scan = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  local found = false
  if scan > 0 then
    local recent = redis.call('XREVRANGE', KEYS[i], '+', '-', 'COUNT', scan)
    for _, entry in ipairs(recent) do
      local fields = entry[2]
      for j = 1, #fields, 2 do
        if fields[j] == 'message' then
          local ok, decoded = pcall(cjson.decode, fields[j + 1])
          if ok and type(decoded) == 'table' and decoded['message_id'] == id then
            found = true
          end
        end
      end
      if found then break end
    end
  end
  if found then
    out[i] = 0
  else
    redis.call('XADD', KEYS[i], 'MAXLEN', '~', maxlen, '*', 'message', body)
    redis.call('PUBLISH', channel, body)
    out[i] = 1
  end
end
return out";

/// [`PUBLISH_BATCH`] with its SHA-1, computed once rather than for every batch.
static PUBLISH_BATCH_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(PUBLISH_BATCH));

/// Appends `text` to the file at `path`.
fn append(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(text.as_bytes())
}

/// Messages per round trip.
const BATCH: usize = 128;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Pending {
    stream: String,
    channel: String,
    message_id: String,
    body: Arc<str>,
    /// A delivery of this message may have reached Redis already.
    #[serde(default)]
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
    /// Where what is left at shutdown waits for the next start (`publish.spool_path`).
    spool: std::sync::OnceLock<PathBuf>,
    /// The spool file as a journal of the outbox (see the module doc). Locked after
    /// `outbox`, never before.
    journal: Mutex<Journal>,
}

/// The open spool file and how much of it is already delivered.
#[derive(Debug, Default)]
struct Journal {
    file: Option<std::fs::File>,
    /// Lines in the file for messages delivered since it was last rewritten.
    stale: usize,
    /// Whether the last write failed (warned once per failure streak).
    failing: bool,
}

/// Delivered lines the journal may hold before it is rewritten with only what is pending.
const JOURNAL_STALE_MAX: usize = 4096;

/// `entries` as spool lines.
fn spool_text<'a>(entries: impl Iterator<Item = &'a Pending>) -> String {
    let mut text = String::new();
    for p in entries {
        match serde_json::to_string(p) {
            Ok(line) => {
                text.push_str(&line);
                text.push('\n');
            }
            Err(e) => tracing::error!(error = %e, "cannot serialise an outbox message"),
        }
    }
    text
}

/// Replaces the file at `path` with `text` (through a temporary file and a rename, so a
/// crash leaves the old file or the new, never half of one).
fn replace_file(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("jsonl.tmp");
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

impl Journal {
    /// Notes the outcome of a write: a warning when writes start failing, and when they work
    /// again.
    fn noted(&mut self, r: std::io::Result<()>, path: &Path) {
        match r {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!(path = %path.display(), "outbox spool writable again");
            }
            Ok(()) => {}
            Err(e) => {
                if !self.failing {
                    tracing::error!(path = %path.display(), error = %e, "cannot write the outbox spool: messages not yet delivered would not survive a crash");
                }
                self.failing = true;
                // Reopened (and rewritten) at the next compaction.
                self.file = None;
            }
        }
    }

    /// Rewrites the file with exactly `pending` and reopens it for appending.
    fn rewrite<'a>(&mut self, path: &Path, pending: impl Iterator<Item = &'a Pending>) {
        let r = replace_file(path, &spool_text(pending)).and_then(|()| {
            self.file = Some(std::fs::OpenOptions::new().append(true).open(path)?);
            Ok(())
        });
        self.stale = 0;
        self.noted(r, path);
    }
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
            spool: std::sync::OnceLock::new(),
            journal: Mutex::new(Journal::default()),
        })
    }

    fn journal(&self) -> MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `p` to the journal (with `ob`, the outbox, locked by the caller).
    fn journal_append(&self, p: &Pending, ob: &VecDeque<Pending>) {
        let Some(path) = self.spool.get() else {
            return;
        };
        let mut j = self.journal();
        if j.file.is_none() {
            // A write failed: start over from the outbox itself.
            j.rewrite(path, ob.iter().chain(std::iter::once(p)));
            return;
        }
        let line = spool_text(std::iter::once(p));
        let r = match j.file.as_mut() {
            Some(f) => std::io::Write::write_all(f, line.as_bytes()),
            None => Ok(()),
        };
        j.noted(r, path);
    }

    /// After `delivered` messages left the outbox `ob` (locked by the caller): empties the
    /// journal when the outbox is empty, rewrites it when it holds too many delivered lines.
    fn journal_delivered(&self, delivered: usize, ob: &VecDeque<Pending>) {
        let Some(path) = self.spool.get() else {
            return;
        };
        let mut j = self.journal();
        j.stale += delivered;
        if ob.is_empty() {
            let r = match j.file.as_ref() {
                Some(f) => f.set_len(0),
                None => Ok(()),
            };
            j.stale = 0;
            j.noted(r, path);
        } else if j.stale > JOURNAL_STALE_MAX || j.file.is_none() {
            j.rewrite(path, ob.iter());
        }
    }

    /// Spools to `path`: what a previous run left there is queued first (and the file
    /// removed), and what this run cannot deliver by the end of its shutdown is written there.
    /// Returns how many messages were restored. A line that cannot be read is kept in
    /// `{path}.rejected` with a warning naming it, never dropped silently.
    pub fn with_spool(&self, path: PathBuf) -> usize {
        let restored = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let mut good = VecDeque::new();
                let mut bad = String::new();
                for (n, line) in text
                    .lines()
                    .enumerate()
                    .filter(|(_, l)| !l.trim().is_empty())
                {
                    match serde_json::from_str::<Pending>(line) {
                        // It may have been delivered in the last moments before the spool was
                        // written: look before adding.
                        Ok(p) => good.push_back(Pending {
                            uncertain: true,
                            ..p
                        }),
                        Err(e) => {
                            tracing::warn!(path = %path.display(), line = n + 1, error = %e, "unreadable outbox spool line; kept aside");
                            bad.push_str(line);
                            bad.push('\n');
                        }
                    }
                }
                if !bad.is_empty() {
                    let aside = path.with_extension("jsonl.rejected");
                    if let Err(e) = append(&aside, &bad) {
                        tracing::error!(path = %aside.display(), error = %e, "cannot keep the unreadable spool lines");
                    }
                }
                let n = good.len();
                let mut ob = self.outbox();
                for p in good.into_iter().rev() {
                    ob.push_front(p);
                }
                metrics::gauge!(names::OUTBOX_DEPTH).set(ob.len() as f64);
                n
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read the outbox spool; left in place");
                0
            }
        };
        if restored > 0 {
            tracing::info!(path = %path.display(), messages = restored, "outbox restored from the spool of the last run");
            self.wake.notify_one();
        }
        // From here on the file is the outbox's journal: it holds what was restored (until it
        // is delivered) and every message published after.
        let ob = self.outbox();
        self.journal().rewrite(&path, ob.iter());
        drop(ob);
        let _ = self.spool.set(path);
        restored
    }

    /// Writes what is left in the outbox to the spool (replacing the file atomically).
    fn write_spool(&self) {
        let left: Vec<Pending> = self.outbox().iter().cloned().collect();
        let Some(path) = self.spool.get() else {
            tracing::warn!(
                left = left.len(),
                "outbox not empty at shutdown and no spool configured; those messages are lost"
            );
            return;
        };
        let written = replace_file(path, &spool_text(left.iter()));
        match written {
            Ok(()) => tracing::warn!(
                left = left.len(),
                path = %path.display(),
                "Redis unreachable at shutdown: outbox written to the spool, delivered at the next start"
            ),
            Err(e) => tracing::error!(
                left = left.len(),
                path = %path.display(),
                error = %e,
                "cannot write the outbox spool; those messages are lost"
            ),
        }
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
        let invocation = |all_uncertain: bool| {
            let mut inv = PUBLISH_BATCH_SCRIPT.prepare_invoke();
            inv.arg(self.max_len);
            for p in &batch {
                inv.key(&p.stream)
                    .arg(&p.channel)
                    .arg(&*p.body)
                    .arg(&p.message_id)
                    .arg(if p.uncertain || all_uncertain {
                        scan.as_str()
                    } else {
                        "0"
                    });
            }
            inv
        };
        let mut conn = self.conn.clone();
        let mut result = invocation(false).invoke_async::<Vec<i64>>(&mut conn).await;
        // A half-open probe on a dead connection gets a second try on the fresh one (see
        // `coordination::redis`); the first may have been applied, so the retry looks for
        // each message before adding it.
        if let Err(e) = &result
            && permit.is_probe()
            && crate::coordination::redis::is_connection_error(e)
        {
            result = invocation(true).invoke_async::<Vec<i64>>(&mut conn).await;
        }
        match result {
            Ok(results) => {
                permit.success();
                let mut ob = self.outbox();
                // Remove exactly the delivered front entries (the outbox may have grown, or
                // been trimmed from the front by overflow meanwhile).
                let mut delivered = 0;
                for p in &batch {
                    if ob
                        .front()
                        .is_some_and(|f| f.message_id == p.message_id && f.stream == p.stream)
                    {
                        ob.pop_front();
                        delivered += 1;
                    }
                }
                self.journal_delivered(delivered, &ob);
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
            // On disk before `publish` returns: a crash from here on loses nothing.
            self.journal_append(&p, &ob);
            ob.push_back(p);
            metrics::gauge!(names::OUTBOX_DEPTH).set(ob.len() as f64);
        }
        self.wake.notify_one();
    }

    async fn flush(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.depth() > 0 {
            if tokio::time::Instant::now() >= deadline {
                self.write_spool();
                return;
            }
            // A batch cut off by the deadline may have reached Redis: spooled messages are
            // looked for before they are added again.
            match tokio::time::timeout_at(deadline, self.deliver_batch()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "flush: Redis publish failed");
                    tokio::time::sleep(
                        Duration::from_millis(200)
                            .min(deadline.saturating_duration_since(tokio::time::Instant::now())),
                    )
                    .await;
                }
                Err(_) => {}
            }
        }
    }
}
