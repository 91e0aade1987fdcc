//! Coordination between replicas: per-symbol locks, heartbeat, stale-lock recovery, the cycle
//! lease, per-symbol claims (work sharing) and the kill switch — behind one trait with two
//! backends that pass one contract test suite.
//!
//! - [`memory`]: in-process; one replica (the embedded default), or several instances sharing
//!   one store inside a test.
//! - [`redis`]: Redis (or Redis Cluster); any number of replicas.
//!
//! `contract` is the suite both backends pass (used by their tests; compiled only for tests
//! and with the `test-support` feature).

pub mod memory;
pub mod redis;
mod redis_rate_limit;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::schedule::CycleId;

/// What a lock attempt got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockOutcome {
    /// Free, now ours.
    Acquired,
    /// Held by a dead or stale owner, taken over atomically.
    Recovered(StaleReason),
    /// Held by a live owner.
    Held,
}

/// Why a lock was considered stale (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleReason {
    /// Older than `locks.stale_threshold_seconds`.
    Age,
    /// The owner's heartbeat key is gone.
    HeartbeatMissing,
}

impl StaleReason {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            StaleReason::Age => "age",
            StaleReason::HeartbeatMissing => "heartbeat_missing",
        }
    }
}

/// The kill switch's record (`autonomous:kill_switch`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KillSwitch {
    /// Whether generation is paused.
    pub active: bool,
    /// Why.
    #[serde(default)]
    pub reason: String,
    /// Who.
    #[serde(default)]
    pub activated_by: String,
    /// When.
    #[serde(default)]
    pub activated_at: Option<DateTime<Utc>>,
}

/// Why a coordination call failed.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// The backend is unreachable or answered with an error.
    #[error("coordination backend unavailable: {0}")]
    Unavailable(String),
    /// Its circuit breaker is open.
    #[error("coordination backend circuit open")]
    CircuitOpen,
    /// A record written by someone else is not what the contract says.
    #[error("malformed record at {key}: {reason}")]
    Malformed {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// One of the runner's keys holds a value of another Redis type (something else wrote
    /// it): Redis answers, the record cannot be used.
    #[error(
        "{key} holds a Redis {found} where the runner keeps a {expected} (written by something else? delete the key, or give this deployment its own coordination.key_prefix)"
    )]
    WrongType {
        /// The key.
        key: String,
        /// The type found there (`TYPE key`).
        found: String,
        /// The type the runner keeps there.
        expected: &'static str,
    },
    /// Another live process already uses this instance id.
    #[error(
        "instance_id {instance_id:?} is already used by a live process (pid {pid} on its host); give every replica its own id (INSTANCE_ID, or HOSTNAME in Kubernetes)"
    )]
    DuplicateInstance {
        /// The id.
        instance_id: String,
        /// The other process's pid, as its heartbeat says.
        pid: u64,
    },
}

impl CoordError {
    /// Whether the backend answered, and the problem is a record in it (a malformed or
    /// wrongly typed key) rather than reaching it.
    pub fn is_bad_record(&self) -> bool {
        matches!(
            self,
            CoordError::Malformed { .. } | CoordError::WrongType { .. }
        )
    }
}

/// Locks, leases, claims, heartbeat and kill switch for one instance.
#[async_trait]
pub trait Coordination: Send + Sync {
    /// Backend name (`memory`, `redis`).
    fn backend(&self) -> &'static str;
    /// This instance's id.
    fn instance_id(&self) -> &str;
    /// Takes `symbol`'s lock (or recovers a stale one).
    async fn acquire_lock(&self, symbol: &str) -> Result<LockOutcome, CoordError>;
    /// Extends our lock's expiry; `false` when it is no longer ours.
    async fn extend_lock(&self, symbol: &str) -> Result<bool, CoordError>;
    /// Releases our lock; `false` (a no-op) when it is not ours.
    async fn release_lock(&self, symbol: &str) -> Result<bool, CoordError>;
    /// Releases the locks whose release failed earlier (Redis was unreachable), now that it
    /// may answer: how many were released. A no-op where releases cannot fail.
    async fn release_leftovers(&self) -> Result<usize, CoordError> {
        Ok(0)
    }
    /// Locks held by this instance right now.
    async fn held_locks(&self) -> Result<Vec<String>, CoordError>;
    /// Refreshes this instance's heartbeat.
    async fn heartbeat(&self) -> Result<(), CoordError>;
    /// Deletes this instance's heartbeat (graceful shutdown).
    async fn remove_heartbeat(&self) -> Result<(), CoordError>;
    /// Live instances by heartbeat (including this one).
    async fn live_instances(&self) -> Result<usize, CoordError>;
    /// Tries to win the lease of `cycle` for `ttl`: only the winner runs that tick.
    async fn try_cycle_lease(&self, cycle: &CycleId, ttl: Duration) -> Result<bool, CoordError>;
    /// Claims `symbol` for `cycle` (work sharing): only the claimer analyses it.
    async fn claim_symbol(
        &self,
        cycle: &CycleId,
        symbol: &str,
        ttl: Duration,
    ) -> Result<bool, CoordError>;
    /// The kill switch, if set.
    async fn kill_switch(&self) -> Result<Option<KillSwitch>, CoordError>;
    /// Sets (active) or clears (inactive) the kill switch.
    async fn set_kill_switch(&self, ks: &KillSwitch) -> Result<(), CoordError>;
    /// Whether the backend answers (readiness).
    async fn ping(&self) -> Result<(), CoordError>;
    /// Whether [`save_memo`](Self::save_memo) outlives the process (Redis does; memory
    /// does not).
    fn remembers(&self) -> bool {
        false
    }
    /// The runner's gate state a previous `once` run left, if any.
    async fn load_memo(&self) -> Result<Option<String>, CoordError> {
        Ok(None)
    }
    /// Leaves the runner's gate state for the next `once` run (kept for `ttl`).
    async fn save_memo(&self, _memo: &str, _ttl: Duration) -> Result<(), CoordError> {
        Ok(())
    }
}

/// Lock timing shared by the backends.
#[derive(Debug, Clone, Copy)]
pub struct LockTiming {
    /// Lock expiry.
    pub ttl: Duration,
    /// Age after which a lock is stale.
    pub stale_after: Duration,
    /// Heartbeat expiry.
    pub heartbeat_ttl: Duration,
}

#[doc(hidden)]
#[cfg(any(test, feature = "test-support"))]
pub mod contract;
