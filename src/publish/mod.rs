//! Publishing: every stage message goes to the in-process bus (which the SSE stream and the
//! JSON API read) and, when a sink is configured, to Redis channels and streams.
//!
//! The publisher also keeps what the HTTP API serves without asking anyone: the latest
//! message per symbol (of the furthest stage reached), a replay ring of recent events, and
//! the recent cycle summaries. None of it depends on a client being connected.

pub mod redis;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::pipeline::{Stage, StageMessage};

/// A finished (or skipped) tick, as `/api/cycles` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CycleSummary {
    /// The tick (RFC 3339).
    pub cycle_id: String,
    /// When the runner started it (or decided to skip it).
    pub started_at: DateTime<Utc>,
    /// Wall time of the cycle; 0 when skipped.
    pub duration_seconds: f64,
    /// Symbols that completed every stage.
    pub symbols_ok: u32,
    /// Symbols that failed or were cancelled.
    pub symbols_failed: u32,
    /// Symbols not attempted (locked elsewhere, claimed by another replica).
    pub symbols_skipped: u32,
    /// Why the whole tick was skipped, if it was.
    pub skipped_reason: Option<String>,
    /// Each failed symbol with its reason.
    pub failures: Vec<SymbolFailure>,
    /// Pool limit used.
    pub concurrency: usize,
    /// Per-symbol deadline used.
    pub symbol_timeout_seconds: f64,
    /// Whether the whole-cycle deadline cut symbols off.
    pub hit_cycle_deadline: bool,
    /// LLM tokens the cycle used.
    pub tokens_used: u64,
}

/// One failed symbol in a summary.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SymbolFailure {
    /// The symbol.
    pub symbol: String,
    /// Bounded reason (`timeout`, `market_data_5xx`, …).
    pub reason: String,
    /// The stage it failed in.
    pub stage: String,
}

/// What the bus carries.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BusEvent {
    /// A stage message.
    Signal(StageMessage),
    /// A cycle summary.
    Cycle(CycleSummary),
    /// A status change (breaker, kill switch, readiness).
    Status(serde_json::Value),
}

/// An event with its resumable id.
#[derive(Debug, Clone)]
pub struct Sequenced {
    /// Monotonic per process, starting at 1.
    pub id: u64,
    /// The event.
    pub event: Arc<BusEvent>,
}

/// Where stage messages go beyond the process (Redis). Returns once the message is handed
/// over or queued; never blocks the pipeline on an outage.
#[async_trait::async_trait]
pub trait Sink: Send + Sync {
    /// Hands one message over.
    async fn publish(&self, msg: &StageMessage);
    /// Delivers what is queued, within `timeout` (graceful shutdown).
    async fn flush(&self, timeout: std::time::Duration);
}

#[derive(Debug, Clone)]
struct Latest {
    stage: Stage,
    cycle_id: String,
    message: StageMessage,
}

/// The publisher.
pub struct Publisher {
    bus: broadcast::Sender<Sequenced>,
    seq: AtomicU64,
    latest: Mutex<BTreeMap<String, Latest>>,
    replay: Mutex<VecDeque<Sequenced>>,
    replay_cap: usize,
    cycles: Mutex<VecDeque<CycleSummary>>,
    cycles_cap: usize,
    sink: Option<Arc<dyn Sink>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Publisher {
    /// A publisher keeping `replay_cap` events and `cycles_cap` cycle summaries.
    pub fn new(replay_cap: usize, cycles_cap: usize, sink: Option<Arc<dyn Sink>>) -> Self {
        // The broadcast buffer only has to cover a subscriber's momentary lag; a subscriber
        // that falls further behind is told so and resumes from the replay ring.
        let (bus, _) = broadcast::channel(1024);
        Self {
            bus,
            seq: AtomicU64::new(0),
            latest: Mutex::new(BTreeMap::new()),
            replay: Mutex::new(VecDeque::with_capacity(replay_cap.min(65_536))),
            replay_cap: replay_cap.max(1),
            cycles: Mutex::new(VecDeque::new()),
            cycles_cap: cycles_cap.max(1),
            sink,
        }
    }

    fn emit(&self, event: BusEvent) {
        // Assign the id and append to the ring under one lock so ids in the ring are ordered.
        let seq = {
            let mut ring = lock(&self.replay);
            let id = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
            let s = Sequenced {
                id,
                event: Arc::new(event),
            };
            if ring.len() == self.replay_cap {
                ring.pop_front();
            }
            ring.push_back(s.clone());
            s
        };
        // No receivers is fine: the dashboard works with nobody connected.
        let _ = self.bus.send(seq);
    }

    /// Publishes a stage message: bus, latest, replay ring, then the sink.
    pub async fn publish(&self, msg: StageMessage) {
        {
            let mut latest = lock(&self.latest);
            let replace = match latest.get(&msg.symbol) {
                None => true,
                // A newer cycle always wins; within a cycle, a later stage wins.
                Some(cur) => {
                    msg.cycle_id > cur.cycle_id
                        || (msg.cycle_id == cur.cycle_id && msg.stage >= cur.stage)
                }
            };
            if replace {
                latest.insert(
                    msg.symbol.clone(),
                    Latest {
                        stage: msg.stage,
                        cycle_id: msg.cycle_id.clone(),
                        message: msg.clone(),
                    },
                );
            }
        }
        if let Some(sink) = &self.sink {
            sink.publish(&msg).await;
        }
        self.emit(BusEvent::Signal(msg));
    }

    /// Records a cycle summary (also on the bus).
    pub fn record_cycle(&self, summary: CycleSummary) {
        {
            let mut c = lock(&self.cycles);
            if c.len() == self.cycles_cap {
                c.pop_front();
            }
            c.push_back(summary.clone());
        }
        self.emit(BusEvent::Cycle(summary));
    }

    /// Emits a status change.
    pub fn status(&self, status: serde_json::Value) {
        self.emit(BusEvent::Status(status));
    }

    /// Subscribes to events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Sequenced> {
        self.bus.subscribe()
    }

    /// Events with id > `after` still in the ring, oldest first, and whether the ring still
    /// reached back that far (false: some were already dropped).
    pub fn replay_after(&self, after: u64) -> (Vec<Sequenced>, bool) {
        let ring = lock(&self.replay);
        let complete = ring.front().is_none_or(|f| f.id <= after + 1);
        (
            ring.iter().filter(|s| s.id > after).cloned().collect(),
            complete,
        )
    }

    /// The newest message per symbol (furthest stage of the newest cycle), by symbol.
    pub fn latest(&self) -> Vec<StageMessage> {
        lock(&self.latest)
            .values()
            .map(|l| l.message.clone())
            .collect()
    }

    /// Recent cycle summaries, newest tick first (a skipped tick is recorded at once, a run
    /// one when it ends, so recording order is not tick order).
    pub fn cycles(&self) -> Vec<CycleSummary> {
        let mut v: Vec<CycleSummary> = lock(&self.cycles).iter().cloned().collect();
        v.sort_by(|a, b| b.cycle_id.cmp(&a.cycle_id));
        v
    }

    /// The last id handed out.
    pub fn last_id(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    /// Flushes the sink (graceful shutdown).
    pub async fn flush(&self, timeout: std::time::Duration) {
        if let Some(sink) = &self.sink {
            sink.flush(timeout).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(symbol: &str, cycle: &str, stage: Stage) -> StageMessage {
        StageMessage::new(
            stage,
            symbol,
            cycle,
            &format!("{symbol}{cycle}"),
            serde_json::json!({"symbol": symbol}),
            1,
            "rules",
        )
    }

    #[tokio::test]
    async fn latest_keeps_the_furthest_stage_of_the_newest_cycle() {
        let p = Publisher::new(100, 10, None);
        p.publish(msg("ETH/USD", "2026-11-28T10:00:00Z", Stage::Dashboard))
            .await;
        p.publish(msg("ETH/USD", "2026-11-28T10:01:00Z", Stage::Raw))
            .await;
        p.publish(msg("ETH/USD", "2026-11-28T10:01:00Z", Stage::Scored))
            .await;
        // A late message of an older cycle does not replace it.
        p.publish(msg("ETH/USD", "2026-11-28T10:00:00Z", Stage::Dashboard))
            .await;
        let l = p.latest();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].stage, Stage::Scored);
        assert_eq!(l[0].cycle_id, "2026-11-28T10:01:00Z");
    }

    #[tokio::test]
    async fn replay_ring_is_bounded_and_ordered() {
        let p = Publisher::new(3, 10, None);
        let mut rx = p.subscribe();
        for i in 0..5 {
            p.publish(msg(&format!("S{i}/USD"), "c", Stage::Raw)).await;
        }
        let (after1, complete) = p.replay_after(1);
        assert!(!complete, "ids 2 was dropped from a ring of 3");
        assert_eq!(
            after1.iter().map(|s| s.id).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        let (after3, complete) = p.replay_after(3);
        assert!(complete);
        assert_eq!(after3.iter().map(|s| s.id).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(rx.recv().await.expect("event").id, 1);
    }

    #[test]
    fn cycles_newest_first_and_bounded() {
        let p = Publisher::new(10, 2, None);
        for i in 0..3 {
            p.record_cycle(CycleSummary {
                cycle_id: format!("c{i}"),
                started_at: Utc::now(),
                duration_seconds: 0.0,
                symbols_ok: 0,
                symbols_failed: 0,
                symbols_skipped: 0,
                skipped_reason: None,
                failures: vec![],
                concurrency: 1,
                symbol_timeout_seconds: 1.0,
                hit_cycle_deadline: false,
                tokens_used: 0,
            });
        }
        let c = p.cycles();
        assert_eq!(
            c.iter().map(|c| c.cycle_id.as_str()).collect::<Vec<_>>(),
            vec!["c2", "c1"]
        );
    }
}
