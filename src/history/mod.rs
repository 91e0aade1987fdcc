//! The signal history: every published stage message stored once, every signal graded.
//!
//! - [`HistoryStore`] is what the service needs of a database; [`sql::SqlStore`] implements it
//!   for SQLite (the embedded default, zero configuration) and PostgreSQL (`history.url` /
//!   `POSTGRES_URL`) in one SQL dialect, with migrations embedded in the binary and run at start.
//! - [`writer::HistoryWriter`] takes messages off the publishing path: a bounded queue, batched
//!   idempotent inserts (keyed by `message_id`, so replicas and redeliveries never duplicate a
//!   row), retried while the database is down, the oldest dropped and counted past the bound.
//! - [`grading`] grades each signal at its horizons from the market source's prices, once per
//!   (signal, horizon) across replicas (the table's key decides), and computes the scorecard.
//!
//! Schema and queries: `docs/HISTORY.md`.

pub mod calibration;
pub mod grading;
pub mod sql;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod writer;

use serde::{Deserialize, Serialize};

use crate::model::{Action, Stage, StageMessage, Tier};

/// Creates the history's series at zero (a rate over a counter that does not exist yet is
/// no rate at all). The hit-rate gauge appears with the first grades: a 0 would be a claim.
pub fn init_series(horizons_minutes: &[u32]) {
    use crate::telemetry::names::*;
    metrics::counter!(HISTORY_WRITTEN).absolute(0);
    metrics::counter!(HISTORY_WRITE_FAILURES).absolute(0);
    for reason in ["queue_full", "unreadable"] {
        metrics::counter!(HISTORY_DROPPED, "reason" => reason).absolute(0);
    }
    metrics::gauge!(HISTORY_QUEUE).set(0.0);
    for m in horizons_minutes {
        let horizon = grading::horizon_label(i64::from(*m) * 60);
        for outcome in ["hit", "miss", "missing_price"] {
            metrics::counter!(SIGNALS_GRADED, "horizon" => horizon.clone(), "outcome" => outcome)
                .absolute(0);
        }
    }
}

/// Why a history operation failed. The database URL is never part of the text.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The database could not be reached or refused the statement.
    #[error("history database ({backend}): {message}")]
    Database {
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// What went wrong (the driver's words, without the URL).
        message: String,
    },
    /// The schema migrations failed at start.
    #[error("history database ({backend}) migrations failed: {message}")]
    Migration {
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// What went wrong.
        message: String,
    },
    /// A stored row does not read back (written by something else).
    #[error("history row {id} unreadable: {message}")]
    Corrupt {
        /// The row's key.
        id: String,
        /// What is wrong with it.
        message: String,
    },
}

/// One stage message as stored: the envelope plus the columns the queries filter and group by.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Primary key: a re-publish of the same message is the same row.
    pub message_id: String,
    /// The signal the message belongs to.
    pub signal_id: String,
    /// Which stage.
    pub stage: Stage,
    /// The symbol.
    pub symbol: String,
    /// The tick, RFC 3339.
    pub cycle_id: String,
    /// The tick, Unix seconds.
    pub cycle_at: i64,
    /// When it was published, Unix milliseconds.
    pub published_at_ms: i64,
    /// The call.
    pub action: Action,
    /// The signal's confidence.
    pub confidence: f64,
    /// From the score stage on.
    pub tier: Option<Tier>,
    /// `metadata.model_used`.
    pub model: String,
    /// The top strategy's name.
    pub top_strategy: Option<String>,
    /// The price the signal saw (`market_context.current_price`).
    pub price: f64,
    /// That price's time, Unix seconds.
    pub data_as_of: i64,
    /// Produced by a fallback.
    pub is_degraded: bool,
    /// The calibrated confidence it carried, if it was calibrated.
    pub calibrated_confidence: Option<f64>,
    /// The last hour's return it saw (`market_context.price_change_1h`): the momentum
    /// baseline's call.
    pub price_change_1h: f64,
    /// The envelope JSON as published.
    pub envelope: String,
}

impl Record {
    /// The record of a message this process publishes. Fails only if the payload lacks the
    /// signal's fields (a bug, reported rather than stored half).
    pub fn from_message(msg: &StageMessage) -> Result<Record, String> {
        let payload = &msg.envelope.payload;
        let p = payload.signal();
        let envelope = serde_json::to_string(&msg.envelope).map_err(|e| e.to_string())?;
        Ok(Record {
            message_id: msg.envelope.message_id.clone(),
            signal_id: p.signal_id.clone(),
            stage: msg.stage,
            symbol: msg.symbol.clone(),
            cycle_id: msg.cycle_id.to_string(),
            cycle_at: msg.cycle_id.time().timestamp(),
            published_at_ms: msg.envelope.timestamp.timestamp_millis(),
            action: p.action,
            confidence: p.confidence,
            tier: payload.scored().map(|s| s.opportunity_tier),
            model: msg.envelope.metadata.model_used.clone(),
            top_strategy: Some(p.top_strategy.name.clone()),
            price: p.market_context.current_price,
            data_as_of: p.data_as_of.timestamp(),
            is_degraded: p.is_degraded,
            calibrated_confidence: p.calibrated_confidence,
            price_change_1h: p.market_context.price_change_1h,
            envelope,
        })
    }
}

/// A page request of `/api/signals/history`: newest first.
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    /// Only this symbol.
    pub symbol: Option<String>,
    /// Only this stage.
    pub stage: Option<Stage>,
    /// Ticks at or after (Unix seconds).
    pub since: Option<i64>,
    /// Ticks before (Unix seconds).
    pub until: Option<i64>,
    /// Continue below this (cycle_at, message_id) — the previous page's last row.
    pub after: Option<(i64, String)>,
    /// Rows per page.
    pub limit: usize,
}

/// One stored message as the API returns it.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct HistoryRow {
    /// The stage.
    pub stage: Stage,
    /// The symbol.
    pub symbol: String,
    /// The tick.
    pub cycle_id: String,
    /// The signal it belongs to (its own column: the grades are joined on it).
    #[serde(skip)]
    pub signal_id: String,
    /// Its position for the next page.
    #[serde(skip)]
    pub key: (i64, String),
    /// The envelope as published (kept as it was stored: an answer shows what went out,
    /// including fields of versions before this one).
    pub message: serde_json::Value,
    /// Signal-stage rows: the grades so far, by horizon (`5m` …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grades: Option<std::collections::BTreeMap<String, GradeView>>,
}

impl HistoryRow {
    /// The decision the row's message carries, read as its type; an error names the field
    /// that is missing or of the wrong kind.
    pub fn decision(&self) -> Result<Decision, String> {
        self.message
            .get("payload")
            .ok_or_else(|| "the stored envelope has no payload".to_string())
            .and_then(|p| Decision::deserialize(p).map_err(|e| format!("payload: {e}")))
    }
}

/// What a signal decided, as the history shows it to a model (`recent_decisions`): the
/// fields every stage's payload has carried since the history began.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The call.
    pub action: Action,
    /// Its confidence.
    pub confidence: f64,
    /// Why.
    pub reasoning: String,
    /// The best strategy.
    pub top_strategy: DecisionStrategy,
    /// The market it saw.
    pub market_context: DecisionPrice,
}

/// The part of the top strategy a decision shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionStrategy {
    /// Its name.
    pub name: String,
}

/// The part of the market context a decision shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionPrice {
    /// The price the signal saw.
    pub current_price: f64,
}

/// A grade as the history API shows it beside its signal.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct GradeView {
    /// Hit or miss; absent when the price was missing.
    pub hit: Option<bool>,
    /// The return at the horizon.
    pub return_fraction: Option<f64>,
    /// The price at the horizon.
    pub price_after: Option<f64>,
}

/// A stage-1 signal whose grade at one horizon is due.
#[derive(Debug, Clone, PartialEq)]
pub struct DueSignal {
    /// The signal.
    pub signal_id: String,
    /// The symbol.
    pub symbol: String,
    /// The call.
    pub action: Action,
    /// Its confidence.
    pub confidence: f64,
    /// The score stage's tier (`NONE` when the signal never reached it).
    pub tier: String,
    /// `metadata.model_used` of the signal stage.
    pub model: String,
    /// Top strategy name (`NONE` when absent).
    pub strategy: String,
    /// The tick, Unix seconds.
    pub cycle_at: i64,
    /// The price the signal saw.
    pub price_then: f64,
    /// That price's time, Unix seconds.
    pub data_as_of: i64,
    /// The calibrated confidence it carried (`None`: not calibrated, or stored before
    /// calibration).
    pub calibrated_confidence: Option<f64>,
    /// The last hour's return it saw (`None`: stored before the baselines).
    pub price_change_1h: Option<f64>,
}

/// A grade to record.
#[derive(Debug, Clone, PartialEq)]
pub struct Grade {
    /// Which signal.
    pub signal: DueSignal,
    /// Which horizon, seconds.
    pub horizon_seconds: i64,
    /// The price at `data_as_of + horizon`, if the source had one.
    pub price_after: Option<f64>,
    /// `(after − then) / then`.
    pub return_fraction: Option<f64>,
    /// Whether the call was right; `None` when the price is missing.
    pub hit: Option<bool>,
    /// Whether always-HOLD would have been right at the same price.
    pub hold_hit: Option<bool>,
    /// Whether momentum (BUY after a rising hour, SELL after a falling one, else HOLD) would
    /// have been right; `None` without the last hour's return.
    pub momentum_hit: Option<bool>,
    /// When it was graded, Unix seconds.
    pub graded_at: i64,
}

/// What `/api/performance` groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, utoipa::ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum GroupBy {
    /// Per symbol.
    Symbol,
    /// BUY / SELL / HOLD.
    Action,
    /// The opportunity tier.
    Tier,
    /// rules / llm.
    Backend,
    /// The model.
    Model,
    /// The top strategy.
    Strategy,
    /// `model|action`: the groups confidence is calibrated in (the model names the backend
    /// too: `rules`, or an LLM's name).
    Calibration,
}

impl GroupBy {
    /// Every value, for error messages.
    pub const ALL: [GroupBy; 7] = [
        GroupBy::Symbol,
        GroupBy::Action,
        GroupBy::Tier,
        GroupBy::Backend,
        GroupBy::Model,
        GroupBy::Strategy,
        GroupBy::Calibration,
    ];

    /// The query parameter's spelling, which is also the grades table's column.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Symbol => "symbol",
            GroupBy::Action => "action",
            GroupBy::Tier => "tier",
            GroupBy::Backend => "backend",
            GroupBy::Model => "model",
            GroupBy::Strategy => "strategy",
            GroupBy::Calibration => "calibration",
        }
    }

    /// The SQL expression of the group's key over the grades table (a closed set: never
    /// text from a request). SQLite and PostgreSQL both concatenate with `||`.
    pub fn column(self) -> &'static str {
        match self {
            GroupBy::Calibration => "model || '|' || action",
            g => g.as_str(),
        }
    }

    /// Parses the query parameter.
    pub fn parse(s: &str) -> Option<GroupBy> {
        GroupBy::ALL.into_iter().find(|g| g.as_str() == s)
    }
}

/// One graded (signal, horizon) as the scorecard reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct GradedRow {
    /// The group's key.
    pub group: String,
    /// The signal's confidence.
    pub confidence: f64,
    /// Hit or miss.
    pub hit: bool,
    /// The return.
    pub return_fraction: f64,
    /// The calibrated confidence, if the signal carried one.
    pub calibrated: Option<f64>,
    /// Always-HOLD's hit at the same price, when known.
    pub hold_hit: Option<bool>,
    /// Momentum's hit, when known.
    pub momentum_hit: Option<bool>,
}

/// One (group, confidence bucket) of graded rows, summed in the database: the scorecard is
/// computed from these without moving the rows themselves.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BucketSums {
    /// The group's key.
    pub group: String,
    /// `floor(confidence × 10)`, 0–9.
    pub bucket: i64,
    /// Rows.
    pub n: u64,
    /// Of which hits.
    pub hits: u64,
    /// Σ confidence.
    pub confidence: f64,
    /// Σ return.
    pub returns: f64,
    /// Σ (confidence − hit)².
    pub squared_error: f64,
    /// Rows with a calibrated confidence.
    pub calibrated_n: u64,
    /// Of which hits.
    pub calibrated_hits: u64,
    /// Σ calibrated confidence.
    pub calibrated_sum: f64,
    /// Σ (calibrated − hit)².
    pub calibrated_squared_error: f64,
    /// Rows where both baselines are known.
    pub baseline_n: u64,
    /// The signal's own hits among them.
    pub baseline_hits: u64,
    /// Always-HOLD's hits among them.
    pub hold_hits: u64,
    /// Rows where always-HOLD and the signal disagree (one hit, the other missed).
    pub hold_differ: u64,
    /// Momentum's hits among them.
    pub momentum_hits: u64,
    /// Rows where momentum and the signal disagree.
    pub momentum_differ: u64,
}

/// One (group, calibrated-confidence bucket) of graded rows: the calibrated value's own
/// reliability table.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CalibratedSums {
    /// The group's key.
    pub group: String,
    /// `floor(calibrated × 10)`, 0–9.
    pub bucket: i64,
    /// Rows.
    pub n: u64,
    /// Of which hits.
    pub hits: u64,
    /// Σ calibrated confidence.
    pub calibrated: f64,
}

/// What the service needs of a history database. One implementation serves SQLite and
/// PostgreSQL; the contract suite (`tests/it/history.rs`) runs on both.
#[async_trait::async_trait]
pub trait HistoryStore: Send + Sync {
    /// `sqlite` or `postgres` (labels, health).
    fn backend(&self) -> &'static str;
    /// Stores `batch`; a message already stored is skipped. Returns the rows added.
    async fn insert(&self, batch: &[Record]) -> Result<u64, HistoryError>;
    /// One page, newest first.
    async fn page(&self, q: &HistoryQuery) -> Result<Vec<HistoryRow>, HistoryError>;
    /// Up to `limit` stage-1 signals priced within `priced` (Unix seconds) without a grade at
    /// `horizon_seconds`, oldest first. The grader narrows the range's start to what it has
    /// graded through, so the scan does not walk the graded past every round.
    async fn due(
        &self,
        horizon_seconds: i64,
        priced: std::ops::Range<i64>,
        limit: usize,
    ) -> Result<Vec<DueSignal>, HistoryError>;
    /// The grades of these signals: (signal_id, horizon_seconds, grade).
    async fn grades_of(
        &self,
        signal_ids: &[String],
    ) -> Result<Vec<(String, i64, GradeView)>, HistoryError>;
    /// Records a grade unless one exists; `true` when this call recorded it.
    async fn record_grade(&self, g: &Grade) -> Result<bool, HistoryError>;
    /// Records each grade unless it exists, in one transaction; per grade, whether this call
    /// recorded it.
    async fn record_grades(&self, grades: &[Grade]) -> Result<Vec<bool>, HistoryError>;
    /// Graded (not missing) rows of one horizon from `since`, with their group key.
    async fn graded(
        &self,
        horizon_seconds: i64,
        group_by: GroupBy,
        since: i64,
    ) -> Result<Vec<GradedRow>, HistoryError>;
    /// The graded rows of one horizon from the UTC day of `since`, summed per (group,
    /// confidence bucket) — read from the running sums kept as grades are recorded.
    async fn sums(
        &self,
        horizon_seconds: i64,
        group_by: GroupBy,
        since: i64,
    ) -> Result<Vec<BucketSums>, HistoryError>;
    /// The graded rows with a calibrated confidence, summed per (group, calibrated bucket).
    async fn calibrated_sums(
        &self,
        horizon_seconds: i64,
        group_by: GroupBy,
        since: i64,
    ) -> Result<Vec<CalibratedSums>, HistoryError>;
    /// Each group's median return (exact to the basis point).
    async fn medians(
        &self,
        horizon_seconds: i64,
        group_by: GroupBy,
        since: i64,
    ) -> Result<std::collections::BTreeMap<String, f64>, HistoryError>;
    /// Grades of one horizon from `since` whose price was missing.
    async fn missing_prices(&self, horizon_seconds: i64, since: i64) -> Result<u64, HistoryError>;
    /// Deletes messages and grades of ticks before `before`; returns the rows deleted.
    async fn prune(&self, before: i64) -> Result<u64, HistoryError>;
    /// Recomputes the scorecard's running sums from the grades themselves (after an upgrade,
    /// or grades written by other means). One transaction: readers see the old sums or the
    /// new, never a half.
    async fn rebuild_sums(&self) -> Result<(), HistoryError>;
    /// Whether the database answers.
    async fn ping(&self) -> Result<(), HistoryError>;
}
