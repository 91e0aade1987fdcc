//! An agent for exercising the scheduler, the pool and the benchmarks: the rules agent, but
//! each symbol's signal takes a scripted time, and start times are recorded. Not an LLM
//! stand-in (the LLM tests use a real HTTP server).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::rules::Rules;
use super::{Agent, AgentError, Answer, CallLimits, SignalDraft, SignalRequest};
use crate::model::{Advice, AdvisedSignal, ScoredSignal};

/// Rules with a scripted signal latency per symbol.
#[derive(Debug, Default)]
pub struct Timed {
    latency: Mutex<HashMap<String, Duration>>,
    default: Mutex<Duration>,
    started: Mutex<Vec<(String, Instant)>>,
    latencies: Mutex<Option<crate::resilience::CallLatencies>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Timed {
    /// Every symbol's signal takes `d` unless set otherwise.
    pub fn with_default(d: Duration) -> Self {
        let t = Self::default();
        *lock(&t.default) = d;
        t
    }

    /// `symbol`'s signal takes `d`.
    pub fn set(&self, symbol: &str, d: Duration) {
        lock(&self.latency).insert(symbol.to_string(), d);
    }

    /// Every symbol not set individually takes `d`.
    pub fn set_default(&self, d: Duration) {
        *lock(&self.default) = d;
    }

    /// Records every signal call's latency into `l`, as an LLM agent does.
    pub fn record_into(&self, l: crate::resilience::CallLatencies) {
        *lock(&self.latencies) = Some(l);
    }

    /// (symbol, start) of every signal call so far, in order.
    pub fn started(&self) -> Vec<(String, Instant)> {
        lock(&self.started).clone()
    }

    /// Forgets the recorded starts.
    pub fn clear_started(&self) {
        lock(&self.started).clear();
    }
}

#[async_trait]
impl Agent for Timed {
    fn backend(&self) -> &'static str {
        "timed"
    }
    fn model(&self) -> &str {
        "timed"
    }
    async fn signal(
        &self,
        req: &SignalRequest<'_>,
        limits: CallLimits,
    ) -> Result<Answer<SignalDraft>, AgentError> {
        lock(&self.started).push((req.symbol.to_string(), Instant::now()));
        let d = lock(&self.latency)
            .get(req.symbol)
            .copied()
            .unwrap_or(*lock(&self.default));
        // Like a real call, it gives up at its own deadline, and is a latency sample either way.
        let deadline = limits.request_deadline();
        let l = lock(&self.latencies).clone();
        if let Some(l) = &l {
            l.count_call();
        }
        let t0 = Instant::now();
        let timed_out = t0 + d > deadline;
        tokio::time::sleep_until(if timed_out { deadline } else { t0 + d }).await;
        let own_deadline = deadline < limits.until;
        if let Some(l) = l.as_ref().filter(|_| !timed_out || own_deadline) {
            l.record("signal", Instant::now().duration_since(t0));
        }
        if timed_out {
            return Err(AgentError::Timeout(None));
        }
        Rules::analyse(req).map(Answer::rules)
    }
    async fn advise(
        &self,
        s: &ScoredSignal,
        _limits: CallLimits,
    ) -> Result<Answer<Advice>, AgentError> {
        Ok(Answer::rules(Rules::advice(s)))
    }
    async fn report(
        &self,
        a: &AdvisedSignal,
        _limits: CallLimits,
    ) -> Result<Answer<String>, AgentError> {
        Ok(Answer::rules(Rules::summary(a)))
    }
}
