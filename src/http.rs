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
    /// The LLM breaker.
    pub llm_breaker: Breaker,
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
    let coord_ok = match s.coord.ping().await {
        Ok(()) => v.coordination_error.is_none(),
        Err(_) => false,
    };
    let checks = json!({
        "scheduler_running": v.ticking && !v.shutting_down,
        "circuit_breaker_closed": s.llm_breaker.state() != BreakerState::Open,
        "not_in_cooldown": v.cooldown_cycles_remaining == 0,
        "coordination_connected": coord_ok,
    });
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
        json!({"status": if ok { "ready" } else { "not_ready" }, "checks": checks, "failing": failing}),
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
    let b = s.llm_breaker.snapshot();
    axum::Json(json!({
        "status": if ready { "healthy" } else { "degraded" },
        "instance_id": s.instance_id,
        "last_cycle": v.last_cycle.as_ref().map(|c| c.cycle_id.clone()),
        "last_cycle_finished_at": v.last_cycle_finished_at,
        "last_cycle_duration_seconds": v.last_cycle.as_ref().map(|c| c.duration_seconds),
        "signals_last_cycle": v.last_cycle.as_ref().map(|c| c.symbols_ok),
        "cycle_running": v.cycle_running,
        "active_locks": active_locks,
        "circuit_breakers": { "llm_service": {
            "state": b.state.as_str(),
            "mode": b.mode,
            "failure_count": b.failure_count,
            "total_failures": b.total_failures,
            "seconds_since_last_failure": b.seconds_since_last_failure,
        }},
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
    // Gauges that are cheapest to read at scrape time.
    metrics::gauge!(crate::telemetry::names::CIRCUIT_BREAKER_STATE, "breaker" => "llm_service")
        .set(s.llm_breaker.state().gauge());
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
