//! The health endpoints: `/health` (liveness with the readiness facts), `/health/live`,
//! `/health/ready` (readiness decided by a pure [`judge`] of the facts, so every rule is
//! tested without a server), `/health/detailed` (what an operator asks first), and the status
//! watcher that turns readiness and kill-switch changes into `status` events.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{AppState, history};
use crate::resilience::BreakerState;

/// `GET /health`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(super) struct Healthy {
    /// Always `healthy`: the process answers.
    status: &'static str,
    /// This replica (`instance_id`).
    instance_id: String,
    /// Seconds since the process started.
    uptime_seconds: f64,
}

/// The process answers (for load balancers that want one cheap path).
#[utoipa::path(
    get,
    path = "/health",
    tag = "health",
    responses((status = 200, description = "The process is up.", body = Healthy))
)]
pub(super) async fn health(State(s): State<AppState>) -> impl IntoResponse {
    axum::Json(Healthy {
        status: "healthy",
        instance_id: s.instance_id.clone(),
        uptime_seconds: Instant::now().duration_since(s.started).as_secs_f64(),
    })
}

/// `GET /health/live`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(super) struct Liveness {
    /// `alive`, or `stalled` when the tick loop has not advanced.
    status: &'static str,
    /// Stalled only: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    /// Stalled only: seconds since the tick loop last advanced.
    #[serde(skip_serializing_if = "Option::is_none")]
    seconds_since_progress: Option<f64>,
}

/// Live while the tick loop moves: a loop frozen for two periods plus the cycle deadline
/// (a blocked runtime thread, a wedged dependency call) fails the probe, and Kubernetes
/// restarts the pod rather than keeping a process that looks healthy and does nothing.
#[utoipa::path(
    get,
    path = "/health/live",
    tag = "health",
    responses(
        (status = 200, description = "The tick loop moves.", body = Liveness),
        (status = 503, description = "The tick loop is frozen: restart the process.", body = Liveness)
    )
)]
pub(super) async fn live(State(s): State<AppState>) -> Response {
    match s.runner.liveness() {
        Ok(()) => axum::Json(Liveness {
            status: "alive",
            reason: None,
            seconds_since_progress: None,
        })
        .into_response(),
        Err(since) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(Liveness {
                status: "stalled",
                reason: Some("the tick loop has not advanced"),
                seconds_since_progress: Some(since.as_secs_f64()),
            }),
        )
            .into_response(),
    }
}

/// Watches readiness and the kill switch every `every`, and puts a `status` event on the SSE
/// stream whenever either differs from the last seen (`first` at start: taken before the
/// server serves anyone), a Redis kill switch set by hand included, until `stop`.
pub async fn watch_status(
    s: AppState,
    first: Value,
    every: std::time::Duration,
    stop: CancellationToken,
) {
    let mut last = first;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let now = status_now(&s).await;
        if now != last {
            s.publisher.status(now.clone());
            last = now;
        }
    }
}

/// Readiness and the kill switch as a `status` event carries them.
pub async fn status_now(s: &AppState) -> Value {
    let r = readiness(s).await;
    let ks = s.coord.kill_switch().await.ok().flatten();
    json!({"readiness": {"status": r.status, "degraded": r.degraded, "failing": r.failing}, "kill_switch": ks})
}

/// What readiness is judged from, gathered from the live parts by [`readiness`].
#[derive(Debug, Clone, Default)]
pub(super) struct ReadinessFacts {
    /// The tick loop runs and shutdown has not begun.
    pub(super) scheduler_running: bool,
    /// No backpressure cooldown.
    pub(super) not_in_cooldown: bool,
    /// The coordination backend answers (or why not).
    pub(super) coordination: Option<String>,
    /// It answers, but a record of ours in it is unusable (which, and why).
    pub(super) coordination_record: Option<String>,
    /// LLM breakers that are open.
    pub(super) open_llm_breakers: Vec<String>,
    /// A 401/402 from the provider, not yet followed by a success.
    pub(super) auth_error: Option<String>,
    /// The spent budget window, if any.
    pub(super) budget_spent: Option<&'static str>,
    /// `agents.fallback: rules`.
    pub(super) fallback_rules: bool,
    /// Backends with a health check of their own (`opencode`), and its result.
    pub(super) probes: Vec<(&'static str, Result<(), String>)>,
}

/// The readiness answer. Fields in name order: the body was a JSON map before it was
/// typed, and its keys keep the order they went out in.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub(super) struct Readiness {
    /// Each check and whether it passes.
    pub(super) checks: BTreeMap<String, bool>,
    /// Up, but serving fallback answers (an LLM problem with the rules fallback on).
    pub(super) degraded: bool,
    /// Why it is degraded, by check.
    pub(super) degraded_reasons: BTreeMap<String, String>,
    /// The checks that fail, in name order.
    pub(super) failing: Vec<String>,
    /// Why they fail, by check (the scheduler and cooldown checks say it by their names).
    pub(super) reasons: BTreeMap<String, String>,
    /// `ready` or `not_ready`.
    pub(super) status: &'static str,
}

impl Readiness {
    /// Whether every check passes.
    pub(super) fn ready(&self) -> bool {
        self.failing.is_empty()
    }
}

/// Readiness from its facts. Pure, so every combination is testable.
pub(super) fn judge(f: &ReadinessFacts) -> Readiness {
    let mut reasons = BTreeMap::new();
    let mut degraded = BTreeMap::new();
    if let Some(e) = &f.coordination {
        reasons.insert("coordination_connected".to_string(), e.clone());
    }
    if let Some(e) = &f.coordination_record {
        reasons.insert("coordination_records_valid".to_string(), e.clone());
    }
    // With the rules fallback serving, an LLM incident degrades the signals but the service
    // is up: the dashboard and SSE must stay in the load balancer. Without one, nothing can be
    // produced, and the probe says so.
    let mut llm_problem = |key: &str, why: String| {
        if f.fallback_rules {
            degraded.insert(
                key.to_string(),
                format!("{why}; the rules fallback is serving"),
            );
        } else {
            reasons.insert(key.to_string(), why);
        }
    };
    if !f.open_llm_breakers.is_empty() {
        llm_problem(
            "circuit_breaker_closed",
            format!("open: {}", f.open_llm_breakers.join(", ")),
        );
    }
    if let Some(w) = f.budget_spent {
        llm_problem(
            "llm_budget_available",
            format!("the token budget for this {w} is spent"),
        );
    }
    if let Some(a) = &f.auth_error {
        reasons.insert("llm_credentials_valid".to_string(), a.clone());
    }
    let mut checks: BTreeMap<String, bool> = [
        ("scheduler_running", f.scheduler_running),
        (
            "circuit_breaker_closed",
            f.open_llm_breakers.is_empty() || f.fallback_rules,
        ),
        ("not_in_cooldown", f.not_in_cooldown),
        ("coordination_connected", f.coordination.is_none()),
        (
            "coordination_records_valid",
            f.coordination_record.is_none(),
        ),
        ("llm_credentials_valid", f.auth_error.is_none()),
        (
            "llm_budget_available",
            f.budget_spent.is_none() || f.fallback_rules,
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (backend, r) in &f.probes {
        if let Err(e) = r {
            reasons.insert(format!("{backend}_healthy"), e.clone());
        }
        checks.insert(format!("{backend}_healthy"), r.is_ok());
    }
    let failing: Vec<String> = checks
        .iter()
        .filter(|(_, ok)| !**ok)
        .map(|(k, _)| k.clone())
        .collect();
    Readiness {
        status: if failing.is_empty() {
            "ready"
        } else {
            "not_ready"
        },
        degraded: !degraded.is_empty(),
        checks,
        failing,
        reasons,
        degraded_reasons: degraded,
    }
}

pub(super) async fn readiness(s: &AppState) -> Readiness {
    let v = s.runner.view();
    let (coordination, coordination_record) = match s.coord.ping().await {
        Ok(()) if v.coordination_bad_record => (None, v.coordination_error.clone()),
        Ok(()) => (v.coordination_error.clone(), None),
        Err(e) => (Some(e.to_string()), None),
    };
    let mut probes = vec![];
    for p in &s.probes {
        probes.push((p.backend(), p.health().await));
    }
    judge(&ReadinessFacts {
        scheduler_running: v.ticking && !v.shutting_down,
        not_in_cooldown: v.cooldown_cycles_remaining == 0,
        coordination,
        coordination_record,
        open_llm_breakers: s
            .breakers
            .iter()
            .filter(|b| b.kind().is_llm() && b.state() == BreakerState::Open)
            .map(|b| b.name().to_string())
            .collect(),
        auth_error: s.llm_health.auth_error(),
        budget_spent: s.budget.exhausted(chrono::Utc::now()).map(|w| w.as_str()),
        fallback_rules: s.fallback_rules,
        probes,
    })
}

/// Whether this replica should get traffic: every check and why it fails.
#[utoipa::path(
    get,
    path = "/health/ready",
    tag = "health",
    responses(
        (status = 200, description = "Ready (possibly degraded: serving rules fallbacks).", body = Readiness),
        (status = 503, description = "Not ready; `failing` and `reasons` say why.", body = Readiness)
    )
)]
pub(super) async fn ready(State(s): State<AppState>) -> Response {
    let body = readiness(&s).await;
    let code = if body.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

/// What an operator asks first: the last cycle, breakers, LLM budget and limits, adaptive
/// state, backpressure, the kill switch, coordination and readiness. A diagnostic document:
/// its fields may grow between versions.
#[utoipa::path(
    get,
    path = "/health/detailed",
    tag = "health",
    responses((status = 200, description = "The diagnostic document (`status`: healthy, degraded or unhealthy).", body = Object))
)]
pub(super) async fn detailed(State(s): State<AppState>) -> impl IntoResponse {
    let v = s.runner.view();
    let readiness = readiness(&s).await;
    let active_locks = s.coord.held_locks().await.map(|l| l.len()).ok();
    let breakers: serde_json::Map<String, Value> = s
        .breakers
        .iter()
        .map(|b| {
            let snap = b.snapshot();
            (
                b.name().to_string(),
                json!({
                    "state": snap.state.as_str(),
                    "mode": snap.mode,
                    "failure_count": snap.failure_count,
                    "total_failures": snap.total_failures,
                    "times_opened": snap.times_opened,
                    "seconds_since_last_failure": snap.seconds_since_last_failure,
                    "last_failure": snap.last_failure,
                    "opened_because": snap.opened_because,
                }),
            )
        })
        .collect();
    let (hour_used, day_used) = s.budget.used(chrono::Utc::now());
    let (per_hour, per_day) = s.budget.limits();
    axum::Json(json!({
        "status": if !readiness.ready() { "unhealthy" } else if readiness.degraded { "degraded" } else { "healthy" },
        "instance_id": s.instance_id,
        "last_cycle": v.last_cycle.as_ref().map(|c| c.cycle_id),
        "last_cycle_finished_at": v.last_cycle_finished_at,
        "last_cycle_duration_seconds": v.last_cycle.as_ref().map(|c| c.duration_seconds),
        "signals_last_cycle": v.last_cycle.as_ref().map(|c| c.symbols_ok),
        "cycle_running": v.cycle_running,
        "next_tick": v.next_tick,
        "active_locks": active_locks,
        "market_data": history::market_note(&s),
        "history": s.publisher.history().map(|w| json!({
            "backend": w.store().backend(),
            "queued": w.queued(),
            "writing": w.healthy(),
        })),
        "circuit_breakers": breakers,
        "dashboard_stream": {
            "follows_redis": s.publisher.hub().follows_redis(),
            "follow_failures": s.publisher.hub().follow_failures(),
        },
        "llm": {
            "tokens_total": s.llm_health.tokens_total(),
            "budget": {
                "tokens_per_hour": per_hour,
                "tokens_per_day": per_day,
                "used_this_hour": hour_used,
                "used_today": day_used,
                "exhausted": s.budget.exhausted(chrono::Utc::now()).map(|w| w.as_str()),
            },
            "credentials_error": s.llm_health.auth_error(),
            "last_errors": s.llm_health.last_errors(),
            // Requests each endpoint is sent at once, as learned from its latency.
            "concurrency": s.endpoint_limits.iter().map(|(b, l)| (b.to_string(), json!({"limit": l.limit(), "in_flight": l.in_flight()}))).collect::<serde_json::Map<String, Value>>(),
            "since_start": s.llm_health.tallies(),
        },
        "adaptive": {
            "current_batch_size": v.current_batch_size,
            "current_timeout": v.current_timeout,
            "p95_latency_ms": v.p95_latency_ms,
            "high_latency_mode": v.high_latency_mode,
            "calls_per_symbol": v.calls_per_symbol,
            "predicted_makespan_seconds": v.predicted_makespan_seconds,
        },
        "backpressure": {
            "consecutive_overruns": v.consecutive_overruns,
            "cooldown_cycles_remaining": v.cooldown_cycles_remaining,
        },
        // Read live: an operator who just flipped it wants to see it, not the last tick's view.
        "kill_switch": s.coord.kill_switch().await.ok().flatten(),
        "coordination": { "backend": s.coord.backend(), "error": v.coordination_error },
        "redis_connected": if s.coord.backend() == "redis" { Some(readiness.checks.get("coordination_connected") == Some(&true)) } else { None },
        "readiness": readiness,
        "uptime_seconds": Instant::now().duration_since(s.started).as_secs_f64(),
    }))
}
