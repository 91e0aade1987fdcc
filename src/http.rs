//! The HTTP server: health probes, metrics, the JSON API. It only reads runner state through
//! views; it never drives the runner (except the admin endpoints, behind a guard).
//!
//! The server takes its listener and its shutdown future as arguments, so tests bind port 0.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::agents::llm::{LlmHealth, TokenBudget, Transport};
use crate::coordination::Coordination;
use crate::publish::Publisher;
use crate::resilience::{Breaker, BreakerState};
use crate::runner::SharedState;

/// What the handlers read.
#[derive(Clone)]
pub struct AppState {
    /// This replica.
    pub instance_id: String,
    /// Runner views.
    pub runner: SharedState,
    /// Latest signals, cycles.
    pub publisher: Arc<Publisher>,
    /// Every breaker (LLM backends, Redis).
    pub breakers: Vec<Breaker>,
    /// LLM auth failures and token totals.
    pub llm_health: Arc<LlmHealth>,
    /// The token budget.
    pub budget: Arc<TokenBudget>,
    /// Backends whose own health counts for readiness (OpenCode).
    pub probes: Vec<Arc<dyn Transport>>,
    /// Coordination (active locks, ping).
    pub coord: Arc<dyn Coordination>,
    /// `/metrics`.
    pub metrics: PrometheusHandle,
    /// Process start.
    pub started: Instant,
}

/// The router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/health", get(health))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/health/detailed", get(detailed))
        .route("/metrics", get(metrics))
        .route("/api/signals/latest", get(latest))
        .route("/api/cycles", get(cycles))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn index() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "autonomous-runner\n\nGET /api/signals/latest   latest signal per symbol\nGET /api/cycles           recent cycles\nGET /health/ready         readiness\nGET /health/detailed      details\nGET /metrics              Prometheus metrics\n",
    )
}

async fn health(State(s): State<AppState>) -> impl IntoResponse {
    axum::Json(json!({
        "status": "healthy",
        "instance_id": s.instance_id,
        "uptime_seconds": Instant::now().duration_since(s.started).as_secs_f64(),
    }))
}

async fn live() -> impl IntoResponse {
    axum::Json(json!({"status": "alive"}))
}

async fn readiness(s: &AppState) -> (bool, Value) {
    let v = s.runner.view();
    let mut reasons = serde_json::Map::new();
    let coord_ok = match s.coord.ping().await {
        Ok(()) => v.coordination_error.is_none(),
        Err(e) => {
            reasons.insert("coordination_connected".into(), json!(e.to_string()));
            false
        }
    };
    if let Some(e) = &v.coordination_error {
        reasons.insert("coordination_connected".into(), json!(e));
    }
    let open: Vec<String> = s
        .breakers
        .iter()
        .filter(|b| b.name().starts_with("llm_") && b.state() == BreakerState::Open)
        .map(|b| b.name().to_string())
        .collect();
    if !open.is_empty() {
        reasons.insert(
            "circuit_breaker_closed".into(),
            json!(format!("open: {}", open.join(", "))),
        );
    }
    let auth = s.llm_health.auth_error();
    if let Some(a) = &auth {
        reasons.insert("llm_credentials_valid".into(), json!(a));
    }
    let spent = s.budget.exhausted(chrono::Utc::now());
    if let Some(w) = spent {
        reasons.insert(
            "llm_budget_available".into(),
            json!(format!("the token budget for this {} is spent", w.as_str())),
        );
    }
    let mut checks = json!({
        "scheduler_running": v.ticking && !v.shutting_down,
        "circuit_breaker_closed": open.is_empty(),
        "not_in_cooldown": v.cooldown_cycles_remaining == 0,
        "coordination_connected": coord_ok,
        "llm_credentials_valid": auth.is_none(),
        "llm_budget_available": spent.is_none(),
    });
    for p in &s.probes {
        let r = p.health().await;
        if let Err(e) = &r {
            reasons.insert(format!("{}_healthy", p.backend()), json!(e));
        }
        checks[format!("{}_healthy", p.backend())] = json!(r.is_ok());
    }
    let ok = checks
        .as_object()
        .is_some_and(|m| m.values().all(|v| v.as_bool() == Some(true)));
    let failing: Vec<&String> = checks
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, v)| v.as_bool() != Some(true))
                .map(|(k, _)| k)
                .collect()
        })
        .unwrap_or_default();
    (
        ok,
        json!({"status": if ok { "ready" } else { "not_ready" }, "checks": checks, "failing": failing, "reasons": reasons}),
    )
}

async fn ready(State(s): State<AppState>) -> Response {
    let (ok, body) = readiness(&s).await;
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

async fn detailed(State(s): State<AppState>) -> impl IntoResponse {
    let v = s.runner.view();
    let (ready, readiness) = readiness(&s).await;
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
                    "seconds_since_last_failure": snap.seconds_since_last_failure,
                }),
            )
        })
        .collect();
    let (hour_used, day_used) = s.budget.used(chrono::Utc::now());
    let (per_hour, per_day) = s.budget.limits();
    axum::Json(json!({
        "status": if ready { "healthy" } else { "degraded" },
        "instance_id": s.instance_id,
        "last_cycle": v.last_cycle.as_ref().map(|c| c.cycle_id.clone()),
        "last_cycle_finished_at": v.last_cycle_finished_at,
        "last_cycle_duration_seconds": v.last_cycle.as_ref().map(|c| c.duration_seconds),
        "signals_last_cycle": v.last_cycle.as_ref().map(|c| c.symbols_ok),
        "cycle_running": v.cycle_running,
        "active_locks": active_locks,
        "circuit_breakers": breakers,
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
        },
        "adaptive": {
            "current_batch_size": v.current_batch_size,
            "current_timeout": v.current_timeout,
            "p95_latency_ms": v.p95_latency_ms,
            "high_latency_mode": v.high_latency_mode,
        },
        "backpressure": {
            "consecutive_overruns": v.consecutive_overruns,
            "cooldown_cycles_remaining": v.cooldown_cycles_remaining,
        },
        "kill_switch": v.kill_switch,
        "coordination": { "backend": s.coord.backend(), "error": v.coordination_error },
        "redis_connected": if s.coord.backend() == "redis" { Some(readiness["checks"]["coordination_connected"].as_bool() == Some(true)) } else { None },
        "readiness": readiness,
        "uptime_seconds": Instant::now().duration_since(s.started).as_secs_f64(),
    }))
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    // Breaker states can change by time alone (OPEN → HALF_OPEN): read them at scrape time.
    for b in &s.breakers {
        metrics::gauge!(crate::telemetry::names::CIRCUIT_BREAKER_STATE, "breaker" => b.name().to_string())
            .set(b.state().gauge());
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn latest(State(s): State<AppState>) -> impl IntoResponse {
    let signals: Vec<Value> = s
        .publisher
        .latest()
        .into_iter()
        .map(|m| {
            let mut p = m.envelope.payload;
            if let Some(obj) = p.as_object_mut() {
                obj.insert("stage".into(), json!(m.stage.as_str()));
                obj.insert("message_id".into(), json!(m.envelope.message_id));
                obj.insert("published_at".into(), json!(m.envelope.timestamp));
            }
            p
        })
        .collect();
    axum::Json(json!({ "signals": signals }))
}

async fn cycles(State(s): State<AppState>) -> impl IntoResponse {
    axum::Json(json!({ "cycles": s.publisher.cycles() }))
}
