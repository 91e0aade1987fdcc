//! Writing the history off the publishing path.
//!
//! `offer` never waits: it appends to a bounded queue (dropping, and counting, the oldest when
//! full — the live channels already carried those messages; the history loses the least recent
//! first) and wakes the writer. The writer takes up to `batch_size` at a time and inserts them
//! in one transaction; on failure the batch goes back to the front and the writer retries with
//! a growing pause, so a database outage delays rows but loses none within the bound.
//!
//! While a cycle runs the writer waits (up to [`MAX_DEFER`] for the oldest queued message):
//! a cycle that is busy computing has the CPU to itself and the history is written in the gap
//! before the next tick; a cycle that is mostly waiting on a model is written during, once the
//! wait is over.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{HistoryStore, Record};
use crate::model::StageMessage;
use crate::telemetry::names;

/// Longest the writer holds back for a running cycle.
pub const MAX_DEFER: Duration = Duration::from_secs(10);

/// Whether a cycle is running now (the writer holds back while it is).
pub type Busy = Arc<dyn Fn() -> bool + Send + Sync>;

/// The queue in front of the database and the task that drains it.
pub struct HistoryWriter {
    store: Arc<dyn HistoryStore>,
    /// Messages as published; made into rows by the writer, off the publishing path.
    queue: Mutex<VecDeque<(Instant, Arc<StageMessage>)>>,
    max: usize,
    batch: usize,
    wake: Notify,
    healthy: AtomicBool,
    busy: Option<Busy>,
}

impl std::fmt::Debug for HistoryWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistoryWriter")
            .field("backend", &self.store.backend())
            .field("queued", &self.queued())
            .finish()
    }
}

impl HistoryWriter {
    /// A writer to `store` holding at most `max` messages, writing `batch` per transaction.
    pub fn new(store: Arc<dyn HistoryStore>, max: usize, batch: usize) -> Arc<HistoryWriter> {
        Arc::new(HistoryWriter {
            store,
            queue: Mutex::new(VecDeque::new()),
            max: max.max(1),
            batch: batch.max(1),
            wake: Notify::new(),
            healthy: AtomicBool::new(true),
            busy: None,
        })
    }

    /// The same writer, holding back while `busy` says a cycle runs.
    pub fn holding_back_for(
        store: Arc<dyn HistoryStore>,
        max: usize,
        batch: usize,
        busy: Busy,
    ) -> Arc<HistoryWriter> {
        let mut w = Self::new(store, max, batch);
        if let Some(w) = Arc::get_mut(&mut w) {
            w.busy = Some(busy);
        }
        w
    }

    /// Whether to wait for the running cycle: one runs, and the oldest queued message has
    /// waited less than [`MAX_DEFER`].
    fn holding_back(&self) -> bool {
        let oldest = self.lock().front().map(|(t, _)| *t);
        match (&self.busy, oldest) {
            (Some(busy), Some(t)) => busy() && t.elapsed() < MAX_DEFER,
            _ => false,
        }
    }

    /// The store it writes to.
    pub fn store(&self) -> &Arc<dyn HistoryStore> {
        &self.store
    }

    /// Queues `msg` for the database; never blocks, does no work beyond the push.
    pub fn offer(&self, msg: Arc<StageMessage>) {
        let len = {
            let mut q = self.lock();
            if q.len() == self.max {
                q.pop_front();
                metrics::counter!(names::HISTORY_DROPPED, "reason" => "queue_full").increment(1);
            }
            q.push_back((Instant::now(), msg));
            q.len()
        };
        metrics::gauge!(names::HISTORY_QUEUE).set(len as f64);
        self.wake.notify_one();
    }

    /// Messages waiting to be written.
    pub fn queued(&self) -> usize {
        self.lock().len()
    }

    /// Whether the last write succeeded (`/health/detailed` reports it; it does not gate
    /// readiness, since signals are still published without the history).
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Instant, Arc<StageMessage>)>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes one batch if there is one; `Ok(0)` when the queue is empty.
    async fn write_batch(&self) -> Result<usize, super::HistoryError> {
        let batch: Vec<(Instant, Arc<StageMessage>)> = {
            let mut q = self.lock();
            let n = q.len().min(self.batch);
            q.drain(..n).collect()
        };
        if batch.is_empty() {
            return Ok(0);
        }
        let records: Vec<Record> = batch
            .iter()
            .filter_map(|(_, m)| match Record::from_message(m) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::error!(error = %e, "message not stored in the history");
                    metrics::counter!(names::HISTORY_DROPPED, "reason" => "unreadable")
                        .increment(1);
                    None
                }
            })
            .collect();
        match self.store.insert(&records).await {
            Ok(added) => {
                metrics::counter!(names::HISTORY_WRITTEN).increment(added);
                metrics::gauge!(names::HISTORY_QUEUE).set(self.queued() as f64);
                Ok(batch.len())
            }
            Err(e) => {
                // Back to the front, in order; what no longer fits is the oldest, dropped.
                let mut q = self.lock();
                for r in batch.into_iter().rev() {
                    if q.len() == self.max {
                        metrics::counter!(names::HISTORY_DROPPED, "reason" => "queue_full")
                            .increment(1);
                        continue;
                    }
                    q.push_front(r);
                }
                Err(e)
            }
        }
    }

    /// Drains the queue until `stop`, then writes what it can within `flush_budget`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken, flush_budget: Duration) {
        let mut pause = Duration::from_millis(500);
        loop {
            if self.holding_back() {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
            match self.write_batch().await {
                Ok(0) => {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = self.wake.notified() => {}
                    }
                }
                Ok(_) => {
                    if !self.healthy.swap(true, Ordering::Relaxed) {
                        tracing::info!(
                            backend = self.store.backend(),
                            "history database back; writing the backlog"
                        );
                    }
                    pause = Duration::from_millis(500);
                }
                Err(e) => {
                    if self.healthy.swap(false, Ordering::Relaxed) {
                        tracing::warn!(error = %e, queued = self.queued(), "history write failed; retrying (signals are still published)");
                    }
                    metrics::counter!(names::HISTORY_WRITE_FAILURES).increment(1);
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(30));
                }
            }
        }
        let flushed = tokio::time::timeout(flush_budget, async {
            loop {
                match self.write_batch().await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        let left = self.queued();
        if flushed.is_err() || left > 0 {
            tracing::warn!(
                left,
                "history messages not written before shutdown (still in Redis streams if configured)"
            );
        }
    }
}
