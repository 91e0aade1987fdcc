//! A circuit breaker that is safe under concurrency.
//!
//! The seed design lets every caller through in HALF_OPEN until a counter passes the limit,
//! and never gives a slot back when a probe is cancelled. Here a caller must hold a [`Permit`]
//! to call the dependency: in HALF_OPEN at most `half_open_max_calls` permits exist at once,
//! and a permit dropped without an outcome (the caller was cancelled) returns its slot without
//! counting as a success or a failure.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Settings of one breaker, as in the seed's `circuit_breaker.*` tree.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    /// Consecutive failures (in CLOSED) that open the breaker.
    pub failure_threshold: u32,
    /// How long the breaker stays OPEN before it lets probes through.
    pub recovery_timeout: Duration,
    /// Probes allowed in one HALF_OPEN period (and so at most in flight at once).
    pub half_open_max_calls: u32,
    /// Probe successes that close the breaker again.
    pub success_threshold: u32,
    /// Operator override.
    pub mode: BreakerMode,
}

/// Operator override of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerMode {
    /// The state machine decides.
    #[default]
    Normal,
    /// Every call is rejected, whatever the dependency does (maintenance, known outage).
    ForcedOpen,
    /// Every call is let through and nothing is recorded (the breaker is out of the way).
    Disabled,
}

/// The externally visible state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// Calls are rejected until the recovery timeout has passed.
    Open,
    /// A limited number of probes decide whether to close or re-open.
    HalfOpen,
}

impl BreakerState {
    /// The gauge value of the seed: 0 closed, 0.5 half-open, 1 open.
    pub fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 0.5,
            BreakerState::Open => 1.0,
        }
    }

    /// Lower-case name for logs and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// Why a call was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The breaker is open (or forced open).
    #[error("circuit is open")]
    Open,
    /// Half-open and every probe slot is taken.
    #[error("circuit is half-open and all probe slots are in use")]
    ProbesBusy,
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    consecutive_failures: u32,
    total_failures: u64,
    times_opened: u64,
    opened_at: Option<Instant>,
    last_failure: Option<Instant>,
    /// What the last failure was, as the caller described it.
    last_cause: Option<String>,
    /// The failure that opened the breaker last (kept while it is open and after, until the
    /// next opening): "circuit open" alone never says what happened.
    opened_because: Option<String>,
    /// HALF_OPEN bookkeeping: probes admitted in this half-open period (in flight or done).
    probes_admitted: u32,
    probe_successes: u32,
    /// Bumped on every transition, so a permit from an earlier period cannot change this one.
    generation: u64,
}

/// A point-in-time view for health endpoints and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct BreakerSnapshot {
    /// Breaker name (`llm_service`, `redis`).
    pub name: String,
    /// Current state (an OPEN breaker whose timeout has passed reports `half_open`).
    pub state: BreakerState,
    /// Operator override in force.
    pub mode: BreakerMode,
    /// Consecutive failures counted in CLOSED.
    pub failure_count: u32,
    /// Failures since start.
    pub total_failures: u64,
    /// Transitions to OPEN since start: a breaker that flaps shows here even when each scrape
    /// happens to find it closed.
    pub times_opened: u64,
    /// Seconds since the last failure, if any.
    pub seconds_since_last_failure: Option<f64>,
    /// What the last failure was (a timeout, an HTTP status with the body's start, a refused
    /// connection), when the caller said.
    pub last_failure: Option<String>,
    /// The failure that opened it the last time, when the caller said.
    pub opened_because: Option<String>,
}

/// What a breaker carries from one process to the next (CronJob mode): its state, the
/// failures counted towards opening, and how long it has been open.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BreakerMemo {
    /// The state (half-open is carried as open: the next process probes afresh).
    pub state: BreakerState,
    /// Consecutive failures counted in CLOSED.
    pub consecutive_failures: u32,
    /// Seconds since it opened (open only).
    pub open_for_seconds: Option<f64>,
}

/// Which dependency a breaker guards; its name is the `breaker` label of the metrics, the
/// key of `/health/detailed` and the name in the logs (`redis`, `llm_openrouter`,
/// `llm_opencode`), unchanged since breakers were named by strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BreakerKind {
    /// The coordination and publishing Redis.
    Redis,
    /// The OpenAI-compatible LLM endpoint (OpenRouter, a local server).
    LlmOpenrouter,
    /// The OpenCode server.
    LlmOpencode,
}

impl BreakerKind {
    /// The name (see the type's doc).
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerKind::Redis => "redis",
            BreakerKind::LlmOpenrouter => "llm_openrouter",
            BreakerKind::LlmOpencode => "llm_opencode",
        }
    }

    /// Whether it guards an LLM backend (whose open state readiness and fallback look at).
    pub fn is_llm(self) -> bool {
        !matches!(self, BreakerKind::Redis)
    }
}

/// Called with the breaker's name and new state on every transition.
pub type TransitionHook = Arc<dyn Fn(&str, BreakerState) + Send + Sync>;

/// A circuit breaker. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Breaker {
    kind: BreakerKind,
    settings: BreakerSettings,
    inner: Arc<Mutex<Inner>>,
    on_transition: Option<TransitionHook>,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("kind", &self.kind)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Breaker {
    /// A closed breaker.
    pub fn new(kind: BreakerKind, settings: BreakerSettings) -> Self {
        Self {
            kind,
            settings,
            inner: Arc::new(Mutex::new(Inner {
                state: BreakerState::Closed,
                consecutive_failures: 0,
                total_failures: 0,
                times_opened: 0,
                opened_at: None,
                last_failure: None,
                last_cause: None,
                opened_because: None,
                probes_admitted: 0,
                probe_successes: 0,
                generation: 0,
            })),
            on_transition: None,
        }
    }

    /// Calls `hook(name, new_state)` on every state change (metrics, logs, SSE status events).
    pub fn with_transition_hook(
        mut self,
        hook: impl Fn(&str, BreakerState) + Send + Sync + 'static,
    ) -> Self {
        self.on_transition = Some(Arc::new(hook));
        self
    }

    /// What it guards.
    pub fn kind(&self) -> BreakerKind {
        self.kind
    }

    /// Its name (the kind's).
    pub fn name(&self) -> &'static str {
        self.kind.as_str()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked while holding it; the state
        // inside is still a valid state machine, so keep going rather than cascade the panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn transition(&self, inner: &mut Inner, to: BreakerState, now: Instant) {
        if inner.state == to {
            return;
        }
        inner.state = to;
        inner.generation += 1;
        inner.probes_admitted = 0;
        inner.probe_successes = 0;
        match to {
            BreakerState::Open => {
                inner.opened_at = Some(now);
                inner.times_opened += 1;
                inner.opened_because = inner.last_cause.clone();
                tracing::warn!(
                    breaker = %self.name(),
                    failures = inner.consecutive_failures,
                    cause = inner.last_cause.as_deref().unwrap_or("not said"),
                    "circuit breaker OPEN"
                );
            }
            BreakerState::HalfOpen => {
                tracing::info!(breaker = %self.name(), "circuit breaker HALF_OPEN, probing recovery");
            }
            BreakerState::Closed => {
                inner.consecutive_failures = 0;
                inner.opened_at = None;
                tracing::info!(breaker = %self.name(), "circuit breaker CLOSED, recovered");
            }
        }
        if let Some(hook) = &self.on_transition {
            hook(self.name(), to);
        }
    }

    /// Moves OPEN → HALF_OPEN when the recovery timeout has passed.
    fn refresh(&self, inner: &mut Inner, now: Instant) {
        if inner.state == BreakerState::Open {
            let opened = inner.opened_at.unwrap_or(now);
            if now.duration_since(opened) >= self.settings.recovery_timeout {
                self.transition(inner, BreakerState::HalfOpen, now);
            }
        }
    }

    /// OPEN → HALF_OPEN now, before the recovery timeout: an out-of-band health check saw
    /// the dependency answer again, so waiting out the rest of the timeout would only delay
    /// recovery. Real calls still decide whether it closes. No-op in any other state.
    pub fn probe_now(&self) {
        if self.settings.mode != BreakerMode::Normal {
            return;
        }
        let now = Instant::now();
        let mut inner = self.lock();
        if inner.state == BreakerState::Open {
            self.transition(&mut inner, BreakerState::HalfOpen, now);
        }
    }

    /// Asks to make one call. Hold the permit for the duration of the call and report its
    /// outcome with [`Permit::success`] or [`Permit::failure`].
    pub fn try_acquire(&self) -> Result<Permit, Rejected> {
        match self.settings.mode {
            BreakerMode::ForcedOpen => return Err(Rejected::Open),
            BreakerMode::Disabled => {
                return Ok(Permit {
                    breaker: None,
                    generation: 0,
                    probe: false,
                });
            }
            BreakerMode::Normal => {}
        }
        let now = Instant::now();
        let mut inner = self.lock();
        self.refresh(&mut inner, now);
        match inner.state {
            BreakerState::Closed => Ok(Permit {
                breaker: Some(self.clone()),
                generation: inner.generation,
                probe: false,
            }),
            BreakerState::Open => Err(Rejected::Open),
            BreakerState::HalfOpen => {
                if inner.probes_admitted >= self.settings.half_open_max_calls {
                    return Err(Rejected::ProbesBusy);
                }
                inner.probes_admitted += 1;
                Ok(Permit {
                    breaker: Some(self.clone()),
                    generation: inner.generation,
                    probe: true,
                })
            }
        }
    }

    /// Whether a call would currently be let through (without taking a slot). Used by the
    /// cycle gate: a cycle is skipped only while the breaker is open.
    pub fn is_open(&self) -> bool {
        match self.settings.mode {
            BreakerMode::ForcedOpen => true,
            BreakerMode::Disabled => false,
            BreakerMode::Normal => {
                let now = Instant::now();
                let mut inner = self.lock();
                self.refresh(&mut inner, now);
                inner.state == BreakerState::Open
            }
        }
    }

    /// Current state (after applying the recovery timeout).
    pub fn state(&self) -> BreakerState {
        match self.settings.mode {
            BreakerMode::ForcedOpen => BreakerState::Open,
            BreakerMode::Disabled => BreakerState::Closed,
            BreakerMode::Normal => {
                let now = Instant::now();
                let mut inner = self.lock();
                self.refresh(&mut inner, now);
                inner.state
            }
        }
    }

    /// Its state for the next process.
    pub fn memo(&self) -> BreakerMemo {
        let now = Instant::now();
        let inner = self.lock();
        let open = inner.state != BreakerState::Closed;
        BreakerMemo {
            state: if open {
                BreakerState::Open
            } else {
                BreakerState::Closed
            },
            consecutive_failures: inner.consecutive_failures,
            open_for_seconds: open.then(|| {
                inner
                    .opened_at
                    .map_or(0.0, |t| now.duration_since(t).as_secs_f64())
            }),
        }
    }

    /// Takes on the state a previous process left, `elapsed` ago: an open breaker stays open
    /// for what is left of its recovery timeout (then probes as usual).
    pub fn restore(&self, memo: &BreakerMemo, elapsed: Duration) {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.consecutive_failures = memo.consecutive_failures;
        if memo.state == BreakerState::Closed {
            return;
        }
        let open_for = Duration::from_secs_f64(memo.open_for_seconds.unwrap_or(0.0).max(0.0))
            .saturating_add(elapsed);
        // Before the clock's origin (a young process): as long ago as the clock allows.
        let opened = now.checked_sub(open_for).unwrap_or_else(|| {
            now.checked_sub(self.settings.recovery_timeout)
                .unwrap_or(now)
        });
        self.transition(&mut inner, BreakerState::Open, now);
        inner.opened_at = Some(opened);
        self.refresh(&mut inner, now);
    }

    /// A view for health endpoints.
    pub fn snapshot(&self) -> BreakerSnapshot {
        let state = self.state();
        let now = Instant::now();
        let inner = self.lock();
        BreakerSnapshot {
            name: self.name().to_string(),
            state,
            mode: self.settings.mode,
            failure_count: inner.consecutive_failures,
            total_failures: inner.total_failures,
            times_opened: inner.times_opened,
            seconds_since_last_failure: inner
                .last_failure
                .map(|t| now.duration_since(t).as_secs_f64()),
            last_failure: inner.last_cause.clone(),
            opened_because: inner.opened_because.clone(),
        }
    }

    /// Why the breaker opened the last time (the failure that tipped it), if said.
    pub fn opened_because(&self) -> Option<String> {
        self.lock().opened_because.clone()
    }

    fn record(&self, generation: u64, probe: bool, outcome: Option<bool>, cause: Option<String>) {
        let now = Instant::now();
        let mut inner = self.lock();
        if outcome == Some(false) {
            inner.total_failures += 1;
            inner.last_failure = Some(now);
            if cause.is_some() {
                inner.last_cause = cause;
            }
        }
        if inner.generation != generation {
            // The breaker moved on since this call started (e.g. it opened while a slow call
            // was in flight); a stale outcome must not re-open or close the new period.
            return;
        }
        match (inner.state, outcome) {
            (BreakerState::Closed, Some(true)) => inner.consecutive_failures = 0,
            (BreakerState::Closed, Some(false)) => {
                inner.consecutive_failures += 1;
                if inner.consecutive_failures >= self.settings.failure_threshold {
                    self.transition(&mut inner, BreakerState::Open, now);
                }
            }
            (BreakerState::HalfOpen, Some(true)) if probe => {
                inner.probe_successes += 1;
                if inner.probe_successes >= self.settings.success_threshold {
                    self.transition(&mut inner, BreakerState::Closed, now);
                }
            }
            (BreakerState::HalfOpen, Some(false)) if probe => {
                inner.consecutive_failures += 1;
                self.transition(&mut inner, BreakerState::Open, now);
            }
            (BreakerState::HalfOpen, None) if probe => {
                // Cancelled probe: give its slot back, it proved nothing.
                inner.probes_admitted = inner.probes_admitted.saturating_sub(1);
            }
            _ => {}
        }
    }
}

/// Permission to make one call through a [`Breaker`]. Report the outcome with
/// [`success`](Permit::success) or [`failure`](Permit::failure); dropping it unreported means
/// the call was cancelled and proves nothing either way.
#[derive(Debug)]
#[must_use = "report the call's outcome with success() or failure()"]
pub struct Permit {
    breaker: Option<Breaker>,
    generation: u64,
    probe: bool,
}

impl Permit {
    /// Whether this call is a half-open probe (its outcome decides whether the breaker
    /// closes).
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// The dependency answered properly.
    pub fn success(mut self) {
        if let Some(b) = self.breaker.take() {
            b.record(self.generation, self.probe, Some(true), None);
        }
    }

    /// The dependency failed (timeout, 5xx, transport error).
    pub fn failure(self) {
        self.failure_because(None::<String>);
    }

    /// The dependency failed, and this is what happened: kept as the breaker's last failure
    /// and, when it is the one that opens it, as the reason it opened.
    pub fn failure_because(mut self, cause: impl Into<Option<String>>) {
        if let Some(b) = self.breaker.take() {
            b.record(self.generation, self.probe, Some(false), cause.into());
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(b) = self.breaker.take() {
            b.record(self.generation, self.probe, None, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            failure_threshold: 3,
            recovery_timeout: Duration::from_secs(30),
            half_open_max_calls: 2,
            success_threshold: 2,
            mode: BreakerMode::Normal,
        }
    }

    fn fail(b: &Breaker, n: u32) {
        for _ in 0..n {
            b.try_acquire().map(Permit::failure).ok();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_consecutive_failures() {
        let b = Breaker::new(BreakerKind::Redis, settings());
        fail(&b, 2);
        assert_eq!(b.state(), BreakerState::Closed);
        // A success resets the consecutive count.
        b.try_acquire().map(Permit::success).ok();
        fail(&b, 2);
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.try_acquire().err(), Some(Rejected::Open));
        assert!(b.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn it_says_which_failure_opened_it_and_keeps_that_through_later_ones() {
        let b = Breaker::new(BreakerKind::Redis, settings());
        assert_eq!(b.opened_because(), None);
        for cause in ["HTTP 500: a", "HTTP 500: b", "no answer within 10 s"] {
            b.try_acquire()
                .expect("closed")
                .failure_because(cause.to_string());
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.opened_because().as_deref(), Some("no answer within 10 s"));
        let snap = b.snapshot();
        assert_eq!(snap.last_failure.as_deref(), Some("no answer within 10 s"));
        // A failed probe reopens it with its own cause.
        tokio::time::advance(Duration::from_secs(30)).await;
        b.try_acquire()
            .expect("probe")
            .failure_because("connection refused to 127.0.0.1:8000".to_string());
        assert_eq!(
            b.opened_because().as_deref(),
            Some("connection refused to 127.0.0.1:8000")
        );
        // A failure reported without a cause keeps the last one said.
        tokio::time::advance(Duration::from_secs(30)).await;
        b.try_acquire().expect("probe").failure();
        assert_eq!(
            b.snapshot().last_failure.as_deref(),
            Some("connection refused to 127.0.0.1:8000")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_after_recovery_timeout_then_closes_on_successes() {
        let b = Breaker::new(BreakerKind::Redis, settings());
        fail(&b, 3);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let p1 = b.try_acquire().expect("probe 1");
        let p2 = b.try_acquire().expect("probe 2");
        p1.success();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        p2.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_failure_reopens_and_restarts_the_timeout() {
        let b = Breaker::new(BreakerKind::Redis, settings());
        fail(&b, 3);
        tokio::time::advance(Duration::from_secs(30)).await;
        b.try_acquire().expect("probe").failure();
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_at_most_max_calls_under_concurrent_callers() {
        let b = Breaker::new(BreakerKind::Redis, settings());
        fail(&b, 3);
        tokio::time::advance(Duration::from_secs(30)).await;
        // 50 concurrent callers race for probe slots while the probes are in flight.
        let in_flight = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let max_seen = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let admitted = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let (b, in_flight, max_seen, admitted) = (
                b.clone(),
                in_flight.clone(),
                max_seen.clone(),
                admitted.clone(),
            );
            tasks.spawn(async move {
                use std::sync::atomic::Ordering::SeqCst;
                if let Ok(permit) = b.try_acquire() {
                    admitted.fetch_add(1, SeqCst);
                    let now = in_flight.fetch_add(1, SeqCst) + 1;
                    max_seen.fetch_max(now, SeqCst);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    in_flight.fetch_sub(1, SeqCst);
                    // Keep the breaker half-open: report nothing (cancelled-like) only after
                    // the others have tried.
                    drop(permit);
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        use std::sync::atomic::Ordering::SeqCst;
        assert_eq!(max_seen.load(SeqCst), 2);
        assert_eq!(admitted.load(SeqCst), 2);
        // Dropped probes gave their slots back: two new probes may go.
        assert!(b.try_acquire().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn stale_outcome_from_an_earlier_period_is_ignored() {
        let b = Breaker::new(BreakerKind::Redis, settings());
        let slow = b.try_acquire().expect("closed");
        fail(&b, 3);
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // The call that started while CLOSED finishes now: it must not close the breaker.
        slow.success();
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn operator_overrides() {
        let mut s = settings();
        s.mode = BreakerMode::ForcedOpen;
        let forced = Breaker::new(BreakerKind::Redis, s);
        assert_eq!(forced.try_acquire().err(), Some(Rejected::Open));
        assert_eq!(forced.state(), BreakerState::Open);
        s.mode = BreakerMode::Disabled;
        let disabled = Breaker::new(BreakerKind::Redis, s);
        fail(&disabled, 10);
        assert_eq!(disabled.state(), BreakerState::Closed);
        assert!(disabled.try_acquire().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn transition_hook_sees_every_state() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let b = Breaker::new(BreakerKind::Redis, settings()).with_transition_hook(move |_, st| {
            s2.lock().unwrap_or_else(|p| p.into_inner()).push(st)
        });
        fail(&b, 3);
        tokio::time::advance(Duration::from_secs(30)).await;
        let p1 = b.try_acquire().expect("probe");
        let p2 = b.try_acquire().expect("probe");
        p1.success();
        p2.success();
        let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(
            seen,
            vec![
                BreakerState::Open,
                BreakerState::HalfOpen,
                BreakerState::Closed
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn probe_now_skips_the_rest_of_the_recovery_timeout_only_when_open() {
        let b = Breaker::new(
            BreakerKind::Redis,
            BreakerSettings {
                failure_threshold: 1,
                recovery_timeout: Duration::from_secs(30),
                half_open_max_calls: 1,
                success_threshold: 1,
                mode: BreakerMode::Normal,
            },
        );
        b.probe_now();
        assert_eq!(b.state(), BreakerState::Closed, "closed stays closed");
        b.try_acquire().expect("closed").failure();
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(
            b.try_acquire().is_err(),
            "still within the recovery timeout"
        );
        b.probe_now();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let p = b.try_acquire().expect("a probe");
        assert!(p.is_probe());
        p.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
