//! The in-process coordination backend.
//!
//! A [`MemoryStore`] plays the part of Redis: keys with expiry on tokio's clock. Several
//! [`MemoryCoordination`] instances may share one store (the contract tests run two
//! "replicas" against it); the embedded default uses one store and one instance.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{CoordError, Coordination, KillSwitch, LockOutcome, LockTiming, StaleReason};
use crate::schedule::CycleId;

#[derive(Debug, Clone)]
struct LockRecord {
    owner: String,
    acquired_at: Instant,
    expires_at: Instant,
}

#[derive(Debug, Default)]
struct State {
    locks: HashMap<String, LockRecord>,
    heartbeats: HashMap<String, Instant>,
    leases: HashMap<String, Instant>,
    claims: HashMap<(String, String), (String, Instant)>,
    kill_switch: Option<KillSwitch>,
}

/// Shared in-process store.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore(Arc<Mutex<State>>);

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One instance on a [`MemoryStore`].
#[derive(Debug, Clone)]
pub struct MemoryCoordination {
    store: MemoryStore,
    instance_id: String,
    timing: LockTiming,
}

impl MemoryCoordination {
    /// Instance `instance_id` on `store`.
    pub fn new(store: MemoryStore, instance_id: &str, timing: LockTiming) -> Self {
        Self {
            store,
            instance_id: instance_id.to_string(),
            timing,
        }
    }

    fn heartbeat_alive(state: &State, owner: &str, now: Instant) -> bool {
        state.heartbeats.get(owner).is_some_and(|exp| *exp > now)
    }
}

#[async_trait]
impl Coordination for MemoryCoordination {
    fn backend(&self) -> &'static str {
        "memory"
    }

    fn instance_id(&self) -> &str {
        &self.instance_id
    }

    async fn acquire_lock(&self, symbol: &str) -> Result<LockOutcome, CoordError> {
        let now = Instant::now();
        let mut st = self.store.lock();
        let fresh = LockRecord {
            owner: self.instance_id.clone(),
            acquired_at: now,
            expires_at: now + self.timing.ttl,
        };
        // As in Redis: a live owner's lock is never taken over, however old; a dead owner's
        // is, and the reason says whether it had also outlived the stale threshold.
        let outcome = match st.locks.get(symbol) {
            None => LockOutcome::Acquired,
            Some(l) if l.expires_at <= now => LockOutcome::Acquired,
            Some(l) if l.owner == self.instance_id => LockOutcome::Held,
            Some(l) if Self::heartbeat_alive(&st, &l.owner, now) => LockOutcome::Held,
            Some(l) if now.duration_since(l.acquired_at) > self.timing.stale_after => {
                LockOutcome::Recovered(StaleReason::Age)
            }
            Some(_) => LockOutcome::Recovered(StaleReason::HeartbeatMissing),
        };
        if outcome != LockOutcome::Held {
            st.locks.insert(symbol.to_string(), fresh);
        }
        Ok(outcome)
    }

    async fn extend_lock(&self, symbol: &str) -> Result<bool, CoordError> {
        let now = Instant::now();
        let mut st = self.store.lock();
        match st.locks.get_mut(symbol) {
            Some(l) if l.owner == self.instance_id && l.expires_at > now => {
                l.expires_at = now + self.timing.ttl;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release_lock(&self, symbol: &str) -> Result<bool, CoordError> {
        let mut st = self.store.lock();
        if st
            .locks
            .get(symbol)
            .is_some_and(|l| l.owner == self.instance_id)
        {
            st.locks.remove(symbol);
            Ok(true)
        } else {
            Ok(false)
        }
    }

    async fn held_locks(&self) -> Result<Vec<String>, CoordError> {
        let now = Instant::now();
        let st = self.store.lock();
        let mut v: Vec<String> = st
            .locks
            .iter()
            .filter(|(_, l)| l.owner == self.instance_id && l.expires_at > now)
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        Ok(v)
    }

    async fn heartbeat(&self) -> Result<(), CoordError> {
        let exp = Instant::now() + self.timing.heartbeat_ttl;
        self.store
            .lock()
            .heartbeats
            .insert(self.instance_id.clone(), exp);
        Ok(())
    }

    async fn remove_heartbeat(&self) -> Result<(), CoordError> {
        self.store.lock().heartbeats.remove(&self.instance_id);
        Ok(())
    }

    async fn live_instances(&self) -> Result<usize, CoordError> {
        let now = Instant::now();
        Ok(self
            .store
            .lock()
            .heartbeats
            .values()
            .filter(|e| **e > now)
            .count())
    }

    async fn try_cycle_lease(&self, cycle: &CycleId, ttl: Duration) -> Result<bool, CoordError> {
        let now = Instant::now();
        let mut st = self.store.lock();
        st.leases.retain(|_, exp| *exp > now);
        let key = cycle.to_string();
        if st.leases.contains_key(&key) {
            return Ok(false);
        }
        st.leases.insert(key, now + ttl);
        Ok(true)
    }

    async fn claim_symbol(
        &self,
        cycle: &CycleId,
        symbol: &str,
        ttl: Duration,
    ) -> Result<bool, CoordError> {
        let now = Instant::now();
        let mut st = self.store.lock();
        st.claims.retain(|_, (_, exp)| *exp > now);
        let key = (cycle.to_string(), symbol.to_string());
        if st.claims.contains_key(&key) {
            return Ok(false);
        }
        st.claims.insert(key, (self.instance_id.clone(), now + ttl));
        Ok(true)
    }

    async fn kill_switch(&self) -> Result<Option<KillSwitch>, CoordError> {
        Ok(self.store.lock().kill_switch.clone())
    }

    async fn set_kill_switch(&self, ks: &KillSwitch) -> Result<(), CoordError> {
        self.store.lock().kill_switch = if ks.active { Some(ks.clone()) } else { None };
        Ok(())
    }

    async fn ping(&self) -> Result<(), CoordError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordination::contract;

    fn pair() -> (MemoryCoordination, MemoryCoordination) {
        let store = MemoryStore::new();
        let t = contract::timing();
        (
            MemoryCoordination::new(store.clone(), "a", t),
            MemoryCoordination::new(store, "b", t),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn contract_suite() {
        contract::run_all(|| async { pair() }).await;
    }
}
