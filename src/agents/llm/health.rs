//! What the LLM path learns and reports: an auth failure that flips readiness, the last
//! failed request per backend, tokens spent, and this process's own tallies of answers,
//! requests and follow-up turns (beside the process-wide Prometheus counters).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};

use crate::telemetry::names;

/// Health facts the LLM path learns and readiness reports.
#[derive(Debug, Default)]
pub struct LlmHealth {
    auth_error: Mutex<Option<String>>,
    tokens_total: AtomicU64,
    /// This process's own tallies: the Prometheus recorder is process-wide, but an operator
    /// comparing replicas (and a test running several apps in one process) wants each one's.
    tallies: Mutex<Tallies>,
    /// The last failed request per backend: what an operator asks first when symbols fail.
    last_errors: Mutex<BTreeMap<&'static str, LastError>>,
}

/// The last failed request of a backend, as `/health/detailed` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LastError {
    /// When it came back.
    pub at: DateTime<Utc>,
    /// The stage (`signal`, `advice`, `report`).
    pub stage: &'static str,
    /// The symbol asked about.
    pub symbol: String,
    /// The tick.
    pub cycle_id: String,
    /// Why (`timeout`, `llm_5xx`, `llm_unreachable`, …).
    pub reason: crate::model::Reason,
    /// What happened, redacted: the status and the start of the body, the refused
    /// `host:port`, the time limit that passed.
    pub error: String,
}

/// Counts since start, by bounded labels only.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Tallies {
    /// Model answers by stage and outcome (`accepted`, `repaired`, `rejected`).
    pub outputs: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
    /// Requests by how they ended: `ok`, or the failure's reason ([`AgentError::reason`]:
    /// `timeout`, `llm_rate_limited`, `llm_refused`, …).
    ///
    /// [`AgentError::reason`]: crate::agents::AgentError::reason
    pub requests: BTreeMap<&'static str, u64>,
    /// Follow-up turns after a rejected answer, by outcome (`fixed`, `still_invalid`,
    /// `failed`).
    pub reprompts: BTreeMap<&'static str, u64>,
}

impl LlmHealth {
    /// A 401/402 seen and not yet followed by a success: the key is bad or out of credit.
    pub fn auth_error(&self) -> Option<String> {
        self.auth_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    pub(super) fn set_auth_error(&self, e: Option<String>) {
        *self.auth_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }
    /// Adds what a reply used to the total since start.
    pub(super) fn add_tokens(&self, used: u64) {
        self.tokens_total.fetch_add(used, Ordering::Relaxed);
    }
    /// Tokens used since start (per-cycle figures are differences of this).
    pub fn tokens_total(&self) -> u64 {
        self.tokens_total.load(Ordering::Relaxed)
    }
    /// The last failed request of each backend.
    pub fn last_errors(&self) -> BTreeMap<&'static str, LastError> {
        self.last_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    pub(super) fn set_last_error(&self, backend: &'static str, e: LastError) {
        self.last_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(backend, e);
    }
    /// This process's answers and requests since start.
    pub fn tallies(&self) -> Tallies {
        self.tallies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    pub(super) fn count_output(&self, stage: &'static str, outcome: &'static str) {
        metrics::counter!(names::AGENT_OUTPUTS, "stage" => stage, "outcome" => outcome)
            .increment(1);
        let mut t = self.tallies.lock().unwrap_or_else(|p| p.into_inner());
        *t.outputs
            .entry(stage)
            .or_default()
            .entry(outcome)
            .or_default() += 1;
    }
    pub(super) fn count_reprompt(&self, outcome: &'static str) {
        let mut t = self.tallies.lock().unwrap_or_else(|p| p.into_inner());
        *t.reprompts.entry(outcome).or_default() += 1;
    }
    pub(super) fn count_request(&self, stage: &'static str, outcome: &'static str) {
        metrics::counter!(names::LLM_REQUESTS, "stage" => stage, "outcome" => outcome).increment(1);
        let mut t = self.tallies.lock().unwrap_or_else(|p| p.into_inner());
        *t.requests.entry(outcome).or_default() += 1;
    }
}
