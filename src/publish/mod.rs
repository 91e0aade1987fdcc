//! Publishing: every stage message goes to the sink (Redis channels and streams, through an
//! outbox) when there is one, and dashboard messages, cycle summaries and status changes go to
//! the [`hub::Hub`] that the SSE stream reads.
//!
//! The publisher also keeps what the JSON API serves without asking anyone: the latest
//! message per symbol (of the furthest stage reached) and the recent cycle summaries. None of
//! it depends on a client being connected.

pub mod hub;
pub mod redis;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::history::writer::HistoryWriter;
use crate::model::{FailedAt, Reason, Stage, StageMessage};
use crate::schedule::CycleId;
use hub::Hub;

/// A finished (or skipped) tick, as `/api/cycles` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct CycleSummary {
    /// The tick (RFC 3339 in JSON).
    pub cycle_id: CycleId,
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
    /// Each symbol not attempted, with its reason (`capacity`: left out up front because
    /// the tick's work could not all fit its deadline; `locked`; `claimed_elsewhere`).
    pub skipped: Vec<SymbolSkip>,
    /// Pool limit used.
    pub concurrency: usize,
    /// Deadline of one agent call used (`timeouts.symbol_timeout_seconds`, possibly
    /// extended); the field keeps its name in `/api/cycles`.
    pub symbol_timeout_seconds: f64,
    /// Whether the whole-cycle deadline cut symbols off.
    pub hit_cycle_deadline: bool,
    /// LLM tokens the cycle used.
    pub tokens_used: u64,
}

/// One symbol a cycle did not attempt.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct SymbolSkip {
    /// The symbol.
    pub symbol: String,
    /// Why (`capacity`, `locked`, `claimed_elsewhere`).
    pub reason: Reason,
}

/// One failed symbol in a summary.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct SymbolFailure {
    /// The symbol.
    pub symbol: String,
    /// Why (`timeout`, `market_data_5xx`, …).
    pub reason: Reason,
    /// Where it stopped (a stage, or `queued`, `lock`, `pipeline`).
    pub stage: FailedAt,
    /// What happened, for people (the first cause among its attempts, redacted); absent
    /// where the reason says it all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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
    cycle_id: CycleId,
    message: Arc<StageMessage>,
}

/// The publisher.
pub struct Publisher {
    hub: Arc<Hub>,
    latest: Mutex<BTreeMap<String, Latest>>,
    cycles: Mutex<VecDeque<CycleSummary>>,
    cycles_cap: usize,
    sink: Option<Arc<dyn Sink>>,
    history: Option<Arc<HistoryWriter>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("hub", &self.hub)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn json_text<T: Serialize>(v: &T) -> Arc<str> {
    Arc::from(serde_json::to_string(v).unwrap_or_else(|_| "null".into()))
}

impl Publisher {
    /// A publisher feeding `hub`, keeping `cycles_cap` cycle summaries, delivering to `sink`.
    pub fn new(hub: Arc<Hub>, cycles_cap: usize, sink: Option<Arc<dyn Sink>>) -> Self {
        Self {
            hub,
            latest: Mutex::new(BTreeMap::new()),
            cycles: Mutex::new(VecDeque::new()),
            cycles_cap: cycles_cap.max(1),
            sink,
            history: None,
        }
    }

    /// Also stores every message in the history (off the publishing path).
    pub fn with_history(mut self, writer: Option<Arc<HistoryWriter>>) -> Self {
        self.history = writer;
        self
    }

    /// The history writer, when the history is on.
    pub fn history(&self) -> Option<&Arc<HistoryWriter>> {
        self.history.as_ref()
    }

    /// The SSE hub.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Publishes a stage message: latest-per-symbol, the sink, and (report stage) the hub.
    pub async fn publish(&self, msg: StageMessage) {
        // Shared, not copied, by the latest-per-symbol map and the history queue.
        let msg = Arc::new(msg);
        {
            let mut latest = lock(&self.latest);
            let replace = match latest.get(&msg.symbol) {
                None => true,
                Some(cur) => {
                    crate::model::supersedes(msg.cycle_id, msg.stage, cur.cycle_id, cur.stage)
                }
            };
            if replace {
                latest.insert(
                    msg.symbol.clone(),
                    Latest {
                        stage: msg.stage,
                        cycle_id: msg.cycle_id,
                        message: Arc::clone(&msg),
                    },
                );
            }
        }
        if let Some(history) = &self.history {
            history.offer(Arc::clone(&msg));
        }
        if let Some(sink) = &self.sink {
            sink.publish(&msg).await;
        }
        // With Redis the hub reads signals back from the stream (every replica's); without,
        // it gets them here.
        if msg.stage == Stage::Report && !self.hub.follows_redis() {
            self.hub.push_local("signal", json_text(&msg.envelope));
        }
    }

    /// Records a cycle summary (also a `cycle` event).
    pub fn record_cycle(&self, summary: CycleSummary) {
        {
            let mut c = lock(&self.cycles);
            if c.len() == self.cycles_cap {
                c.pop_front();
            }
            c.push_back(summary.clone());
        }
        self.hub.push_local("cycle", json_text(&summary));
    }

    /// Emits a `status` event.
    pub fn status(&self, status: serde_json::Value) {
        self.hub.push_local("status", json_text(&status));
    }

    /// The newest message per symbol (furthest stage of the newest cycle), by symbol.
    pub fn latest(&self) -> Vec<StageMessage> {
        lock(&self.latest)
            .values()
            .map(|l| StageMessage::clone(&l.message))
            .collect()
    }

    /// Recent cycle summaries, newest tick first (a skipped tick is recorded at once, a run
    /// one when it ends, so recording order is not tick order).
    pub fn cycles(&self) -> Vec<CycleSummary> {
        let mut v: Vec<CycleSummary> = lock(&self.cycles).iter().cloned().collect();
        v.sort_by_key(|c| std::cmp::Reverse(c.cycle_id));
        v
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

    fn cycle(text: &str) -> CycleId {
        text.parse().expect("a test cycle id")
    }

    fn msg(symbol: &str, cycle_id: &str, stage: Stage) -> StageMessage {
        let cycle = cycle(cycle_id);
        let signal =
            crate::model::examples::signal(symbol, cycle, crate::model::Action::Hold, 0.5, 1.0);
        StageMessage::new(crate::model::examples::payload(stage, signal), 1, "rules")
    }

    #[tokio::test]
    async fn latest_keeps_the_furthest_stage_of_the_newest_cycle() {
        let p = Publisher::new(Hub::new(100, None), 10, None);
        p.publish(msg("ETH/USD", "2026-11-28T10:00:00Z", Stage::Report))
            .await;
        p.publish(msg("ETH/USD", "2026-11-28T10:01:00Z", Stage::Signal))
            .await;
        p.publish(msg("ETH/USD", "2026-11-28T10:01:00Z", Stage::Score))
            .await;
        // A late message of an older cycle does not replace it.
        p.publish(msg("ETH/USD", "2026-11-28T10:00:00Z", Stage::Report))
            .await;
        let l = p.latest();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].stage, Stage::Score);
        assert_eq!(l[0].cycle_id, cycle("2026-11-28T10:01:00Z"));
    }

    #[test]
    fn cycles_newest_first_and_bounded() {
        let p = Publisher::new(Hub::new(10, None), 2, None);
        for i in 0..3 {
            p.record_cycle(CycleSummary {
                cycle_id: cycle(&format!("2026-11-28T10:0{i}:00Z")),
                started_at: Utc::now(),
                duration_seconds: 0.0,
                symbols_ok: 0,
                symbols_failed: 0,
                symbols_skipped: 0,
                skipped_reason: None,
                failures: vec![],
                skipped: vec![],
                concurrency: 1,
                symbol_timeout_seconds: 1.0,
                hit_cycle_deadline: false,
                tokens_used: 0,
            });
        }
        let c = p.cycles();
        assert_eq!(
            c.iter().map(|c| c.cycle_id.to_string()).collect::<Vec<_>>(),
            vec!["2026-11-28T10:02:00Z", "2026-11-28T10:01:00Z"]
        );
    }
}
