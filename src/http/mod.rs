//! The HTTP server: health probes, metrics, the JSON API. It only reads runner state through
//! views; it never drives the runner (except the admin endpoints, behind a guard).
//!
//! The server takes its listener and its shutdown future as arguments, so tests bind port 0.
//! [`sse`] serves the signal stream.

mod candles;
pub mod conn;
pub mod gateway;
mod health;
mod history;
pub mod mcp;
pub mod openapi;
pub mod sse;

pub use health::{status_now, watch_status};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::agents::llm::{LlmHealth, TokenBudget, Transport};
use crate::coordination::Coordination;
use crate::pipeline::Stage;
use crate::publish::Publisher;
use crate::resilience::Breaker;
use crate::runner::SharedState;
use crate::schedule::CycleId;
use openapi::ErrorBody;
use serde::Deserialize as _;
use utoipa_axum::{router::OpenApiRouter, routes};

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
    /// `agents.fallback: rules`: an LLM incident degrades the service instead of stopping it.
    pub fallback_rules: bool,
    /// Backends whose own health counts for readiness (OpenCode).
    pub probes: Vec<Arc<dyn Transport>>,
    /// Each LLM backend's learned in-flight limit.
    pub endpoint_limits:
        std::collections::BTreeMap<&'static str, crate::resilience::ConcurrencyLimit>,
    /// Coordination (active locks, ping).
    pub coord: Arc<dyn Coordination>,
    /// `/metrics`.
    pub metrics: PrometheusHandle,
    /// Process start.
    pub started: Instant,
    /// Admin endpoint access.
    pub admin: AdminAccess,
    /// `POST /shutdown` cancels this (as SIGTERM does).
    pub shutdown_request: CancellationToken,
    /// Open SSE streams end when this fires (the server is stopping).
    pub streams_stop: CancellationToken,
    /// The SSE streams' caps, in all and per client address.
    pub sse: Arc<sse::StreamSlots>,
    /// `market_data.source` (`simulated` is said wherever prices appear).
    pub market_source: &'static str,
    /// The market the pipeline reads, for `/api/candles`.
    pub market: Arc<dyn crate::market::MarketSource>,
    /// The configured symbols (the only ones `/api/candles` serves).
    pub symbols: Arc<[String]>,
    /// The horizons the history grades, in seconds (`/api/performance` takes only these;
    /// empty: the history is off).
    pub graded_horizons: Vec<i64>,
    /// The service's clock (what "now" is for `/api/candles`).
    pub clock: crate::schedule::Clock,
    /// The agents' tools, served at `/mcp` (`None`: `mcp.enabled` is false).
    pub tools: Option<Arc<crate::tools::Toolbox>>,
    /// The model gateway for OpenCode, at `/llm/v1/chat/completions` (`None`: no stage uses
    /// OpenCode).
    pub gateway: Option<Arc<gateway::Gateway>>,
}

/// Who may call the admin endpoints.
#[derive(Clone, Debug)]
pub struct AdminAccess {
    /// `Authorization: Bearer` token (empty: none configured).
    pub token: crate::config::Secret,
    /// Loopback peers may call without a token.
    pub loopback: bool,
    /// `Host` names `/mcp` accepts without a token beside the loopback names
    /// (`http.allowed_hosts`).
    pub allowed_hosts: Vec<String>,
}

/// The router.
pub fn router(state: AppState) -> Router {
    let mcp = match &state.tools {
        Some(tools) => Router::new()
            .route_service(
                "/mcp",
                mcp::service(tools.clone(), &state.admin, state.streams_stop.clone()),
            )
            // `route_layer`: the guard covers `/mcp` only. A plain `layer` would also wrap the
            // router's fallback, so every unknown path — `/.well-known/oauth-…` included —
            // answered 401, and OAuth-aware MCP clients began a discovery that cannot succeed.
            .route_layer(axum::middleware::from_fn_with_state(
                state.admin.clone(),
                mcp::guard,
            )),
        None => Router::new(),
    };
    // The same access rule as /mcp: OpenCode runs beside the runner (loopback) or presents
    // the admin token as its provider's API key.
    let gateway = match &state.gateway {
        Some(g) => Router::new()
            .route("/llm/v1/chat/completions", post(gateway::chat_completions))
            .with_state(g.clone())
            .route_layer(axum::middleware::from_fn_with_state(
                state.admin.clone(),
                gateway_guard,
            )),
        None => Router::new(),
    };
    // Every documented route is registered through `routes!`, which reads the handler's
    // `#[utoipa::path]`: what is served and what the document says cannot drift apart.
    let (api, mut doc) =
        OpenApiRouter::with_openapi(<openapi::ApiDoc as utoipa::OpenApi>::openapi())
            .routes(routes!(index))
            .routes(routes!(asset))
            .routes(routes!(health::health))
            .routes(routes!(health::live))
            .routes(routes!(health::ready))
            .routes(routes!(health::detailed))
            .routes(routes!(metrics))
            .routes(routes!(latest))
            .routes(routes!(cycles))
            .routes(routes!(history::history))
            .routes(routes!(history::performance))
            .routes(routes!(candles::candles))
            .routes(routes!(sse::stream))
            .routes(routes!(shutdown))
            .routes(routes!(kill_switch_get, kill_switch_on, kill_switch_off))
            .routes(routes!(openapi::document))
            .split_for_parts();
    openapi::specialize(
        &mut doc,
        &openapi::Facts {
            symbols: &state.symbols,
            horizons: state
                .graded_horizons
                .iter()
                .map(|h| crate::history::grading::horizon_label(*h))
                .collect(),
            assets: ASSETS.iter().map(|(name, _, _)| *name).collect(),
            token_required: !state.admin.token.is_empty(),
        },
    );
    api.with_state(state)
        .merge(mcp)
        .merge(gateway)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::Extension(openapi::render(&doc)))
}

/// Any path the service does not serve: 404 with a JSON body, with or without a token (an
/// unknown path is not a secret, and a 401 there sends OAuth-aware clients astray).
async fn not_found(uri: axum::http::Uri) -> Response {
    let path: String = uri.path().chars().take(200).collect();
    (
        StatusCode::NOT_FOUND,
        axum::Json(ErrorBody::new(format!("no such path: {path}"))),
    )
        .into_response()
}

/// A known path asked with a method it does not take: 405 with a JSON body (axum adds the
/// `Allow` header).
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let path: String = uri.path().chars().take(200).collect();
    (
        StatusCode::METHOD_NOT_ALLOWED,
        axum::Json(ErrorBody::new(format!("{path} does not take {method}"))),
    )
        .into_response()
}

/// Admits a model-gateway request under the admin access rule.
async fn gateway_guard(
    State(admin): State<AdminAccess>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match authorize(&admin, peer, req.headers(), "/llm/v1") {
        Ok(_) => next.run(req).await,
        Err(refusal) => refusal.into_response(),
    }
}

/// How long a client may take to send its first byte after connecting, then its request
/// headers (counted from that byte), and again from the end of each response while a
/// keep-alive connection sits idle.
/// Probes and API calls send their headers in milliseconds; a connection that sends nothing,
/// or half a header, is a slow client or an attack, and holds a file descriptor.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// File descriptors kept back from the connection cap for Redis, the LLM, logs and files.
const FDS_RESERVED: u64 = 128;

/// Connections served at once: `http.max_connections`, but never more than the process's
/// file-descriptor limit allows (with a reserve), so a flood can never make `accept` fail
/// with "too many open files".
pub fn connection_cap(configured: usize) -> usize {
    let fds = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    let by_fds = fds.saturating_sub(FDS_RESERVED).max(16);
    configured
        .min(usize::try_from(by_fds).unwrap_or(usize::MAX))
        .max(1)
}

/// The open connections, oldest first: whether each has sent a whole request yet, and its
/// task (aborted to make room at the cap).
#[derive(Default)]
struct Connections {
    next: u64,
    open: std::collections::BTreeMap<
        u64,
        (Arc<std::sync::atomic::AtomicBool>, tokio::task::AbortHandle),
    >,
}

/// Serves `router` on `listener` until `shutdown` fires.
///
/// Connections are bounded: headers must arrive within [`HEADER_READ_TIMEOUT`] (idle
/// keep-alive connections included), and at most `max_connections` are open. At the cap a
/// new connection is still accepted — a probe must get through a flood — and the oldest
/// connection that never sent a whole request is closed to make room.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
    max_connections: usize,
) -> std::io::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};

    let app = router(state);
    let cap = connection_cap(max_connections);
    let conns = Arc::new(std::sync::Mutex::new(Connections::default()));
    let tasks = tokio_util::task::TaskTracker::new();
    let hyper_live = Arc::new(std::sync::atomic::AtomicI64::new(0));
    // HTTP/1.1 only: probes, the API and SSE need nothing more, and protocol
    // auto-detection would wait for a first byte with no timeout at all.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let builder = Arc::new(builder);
    let mut accept_errors_logged: Option<Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: the listener is fine, the process is short of
                    // something for a moment. Say so once in a while, and back off briefly
                    // instead of spinning.
                    if accept_errors_logged.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(error = %e, "accepting an HTTP connection failed");
                        accept_errors_logged = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // An SSE stream writes events one at a time as they come: with Nagle's algorithm a
        // small write may wait for the ACK of the one before, which the client may delay.
        // Every write here is a whole response or a whole event, so nothing gains from
        // holding it back. A socket that refuses the option still serves.
        let _ = stream.set_nodelay(true);
        let served = Arc::new(AtomicBool::new(false));
        let mut c = conns.lock().unwrap_or_else(|p| p.into_inner());
        if c.open.len() >= cap {
            let victim = c
                .open
                .iter()
                .find(|(_, (served, _))| !served.load(Ordering::Relaxed))
                .map(|(id, _)| *id);
            match victim.and_then(|vid| c.open.remove(&vid)) {
                // Dropping the task closes its socket; it held no request.
                Some((_, task)) => task.abort(),
                None => {
                    // Every open connection is busy serving: refuse the newcomer.
                    drop(c);
                    drop(stream);
                    continue;
                }
            }
        }
        c.next += 1;
        let id = c.next;
        let setup = conn::Setup {
            app: app.clone(),
            peer,
            builder: builder.clone(),
            served: served.clone(),
            shutdown: shutdown.clone(),
            hyper_live: hyper_live.clone(),
        };
        let conns_then = conns.clone();
        // Spawned under the lock: the task's last step (removing its entry) cannot come
        // before the entry is there.
        let task = tasks.spawn(async move {
            conn::serve(stream, setup).await;
            conns_then
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .open
                .remove(&id);
        });
        c.open.insert(id, (served, task.abort_handle()));
        drop(c);
    }
    drop(listener);
    // In-flight requests get a moment (each connection saw `shutdown`: idle ones closed, a
    // request being served finishes and closes); open SSE streams already ended on
    // `streams_stop`.
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(5), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some HTTP connections were still open after 5 s; closing them");
    }
    Ok(())
}

/// The dashboard: static assets compiled into the binary (no build step). The content
/// security policy forbids inline and foreign scripts, so even text that slipped into markup
/// could not run; the page itself only ever sets `textContent`.
const DASHBOARD_HTML: &str = include_str!("../../assets/dashboard.html");
/// Every other file the page loads, by the name it is served under. uPlot (MIT, its licence
/// beside it in `assets/vendor/`) draws the charts: vendored, never fetched from a CDN.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "dashboard.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/dashboard.js"),
    ),
    (
        "dashboard.css",
        "text/css; charset=utf-8",
        include_str!("../../assets/dashboard.css"),
    ),
    (
        "uplot.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/vendor/uplot-1.6.32.min.js"),
    ),
    (
        "uplot.css",
        "text/css; charset=utf-8",
        include_str!("../../assets/vendor/uplot-1.6.32.min.css"),
    ),
];
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The live dashboard.
#[utoipa::path(
    get,
    path = "/",
    tag = "dashboard",
    responses((status = 200, description = "The dashboard page (it reads the API and the stream).", content_type = "text/html", body = String))
)]
async fn index() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        DASHBOARD_HTML,
    )
}

/// A file the dashboard loads (its scripts, styles and the vendored chart library).
#[utoipa::path(
    get,
    path = "/assets/{name}",
    tag = "dashboard",
    params(("name" = String, Path, description = "The file's name.")),
    responses(
        (status = 200, description = "The file.", content(
            (String = "text/javascript"),
            (String = "text/css")
        )),
        (status = 404, description = "No such asset.", body = ErrorBody)
    )
)]
async fn asset(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, body)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            *body,
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(ErrorBody::new(format!(
                "no such asset: {}",
                name.chars().take(100).collect::<String>()
            ))),
        )
            .into_response(),
    }
}

/// Equal-time comparison, so a wrong token's timing says nothing about the right one.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why an admin request was refused.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    /// 401: a token is required, or the one presented is wrong.
    Unauthorized(&'static str),
    /// 403: no token is configured and the peer is not a trusted loopback.
    Forbidden,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Unauthorized(why) => {
                // A static token, said plainly: MCP clients that see a 401 otherwise look for
                // an OAuth server that is not there.
                let detail = format!(
                    "{why}: this service takes a static bearer token (the value of ADMIN_TOKEN) as `Authorization: Bearer <token>`; there is no OAuth flow"
                );
                (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, r#"Bearer realm="autonomous-runner""#)],
                    axum::Json(ErrorBody::new(detail)),
                )
                    .into_response()
            }
            Refusal::Forbidden => (
                StatusCode::FORBIDDEN,
                axum::Json(ErrorBody::new("admin endpoints are only open to loopback peers (set ADMIN_TOKEN to allow others)")),
            )
                .into_response(),
        }
    }
}

/// Allows the request (and says how) or refuses it with 401/403. Never logs the token.
///
/// When a token is configured it is required from every peer, loopback included: behind a
/// same-host proxy or sidecar every outside client arrives from loopback. `admin_loopback`
/// applies only when no token is configured.
fn authorize(
    admin: &AdminAccess,
    peer: SocketAddr,
    headers: &HeaderMap,
    what: &str,
) -> Result<&'static str, Refusal> {
    let configured = !admin.token.is_empty();
    if configured {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        return match presented {
            Some(p) if same(p.as_bytes(), admin.token.expose().as_bytes()) => Ok("token"),
            Some(_) => {
                tracing::warn!(peer = %peer.ip(), endpoint = what, "admin request refused: invalid bearer token");
                Err(Refusal::Unauthorized("invalid token"))
            }
            None => {
                tracing::warn!(peer = %peer.ip(), endpoint = what, "admin request refused: no bearer token");
                Err(Refusal::Unauthorized("a bearer token is required"))
            }
        };
    }
    if admin.loopback && peer.ip().is_loopback() {
        return Ok("loopback");
    }
    tracing::warn!(peer = %peer.ip(), endpoint = what, "admin request refused: not a loopback peer and no token configured");
    Err(Refusal::Forbidden)
}

/// The body of `POST /api/kill-switch`: exactly `{"reason": "…"}`, a non-empty reason.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct KillSwitchOn {
    /// Why generation is paused: shown on the dashboard, in `/health/detailed` and the logs.
    #[schema(min_length = 1, max_length = 500, pattern = r"\S")]
    reason: String,
}

/// The kill switch as the admin endpoints answer it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
struct KillSwitchState {
    /// The switch's record; null when it was never set or has been cleared.
    kill_switch: Option<crate::coordination::KillSwitch>,
}

/// Reads a kill-switch request, or says what is wrong with it.
fn kill_switch_request(body: &[u8]) -> Result<String, String> {
    const FORM: &str = r#"the body must be a JSON object like {"reason": "maintenance"}"#;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(format!("empty body: {FORM}"));
    }
    // serde would read a struct from an array too (`["why"]`): only an object is well formed.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(format!("not a JSON object: {FORM}"));
    }
    let req: KillSwitchOn = serde_json::from_slice(body).map_err(|e| format!("{FORM}: {e}"))?;
    let reason = req.reason.trim();
    if reason.is_empty() {
        return Err("reason must not be empty: say why generation is paused".into());
    }
    // Counted before trimming, as the document's `maxLength` counts.
    let n = req.reason.chars().count();
    if n > 500 {
        return Err(format!("reason has {n} characters, at most 500"));
    }
    Ok(reason.to_string())
}

/// Stops the service gracefully, as SIGTERM does: the running tick finishes (up to its
/// deadline), messages are flushed, locks released.
#[utoipa::path(
    post,
    path = "/shutdown",
    tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Shutting down.", body = ShutdownAccepted),
        (status = 401, description = "A token is configured and none, or a wrong one, was presented.", body = ErrorBody),
        (status = 403, description = "No token is configured and the peer is not loopback.", body = ErrorBody)
    )
)]
async fn shutdown(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    match authorize(&s.admin, peer, &headers, "/shutdown") {
        Ok(via) => {
            tracing::info!(peer = %peer.ip(), via, "shutdown requested over HTTP");
            s.shutdown_request.cancel();
            (
                StatusCode::ACCEPTED,
                axum::Json(ShutdownAccepted {
                    status: "shutting down",
                }),
            )
                .into_response()
        }
        Err(r) => r.into_response(),
    }
}

/// The answer to `POST /shutdown`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
struct ShutdownAccepted {
    /// `shutting down`.
    status: &'static str,
}

/// 503 with the coordination backend's error (it names the operation, never a secret).
fn unavailable(e: &crate::coordination::CoordError) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(ErrorBody::new(e.to_string())),
    )
        .into_response()
}

/// Whether generation is paused, and why. Readable by anyone, as the dashboard shows it.
#[utoipa::path(
    get,
    path = "/api/kill-switch",
    tag = "admin",
    responses(
        (status = 200, description = "The kill switch.", body = KillSwitchState),
        (status = 503, description = "The coordination backend did not answer.", body = ErrorBody)
    )
)]
async fn kill_switch_get(State(s): State<AppState>) -> Response {
    match s.coord.kill_switch().await {
        Ok(kill_switch) => axum::Json(KillSwitchState { kill_switch }).into_response(),
        Err(e) => unavailable(&e),
    }
}

/// Pauses generation on every replica until cleared: ticks are skipped (and say why), the
/// probes stay green.
#[utoipa::path(
    post,
    path = "/api/kill-switch",
    tag = "admin",
    security(("bearer" = [])),
    request_body = KillSwitchOn,
    responses(
        (status = 200, description = "The switch is on.", body = KillSwitchState),
        (status = 400, description = "The body is not `{\"reason\": \"…\"}` with a reason of 1–500 characters.", body = ErrorBody),
        (status = 401, description = "A token is configured and none, or a wrong one, was presented.", body = ErrorBody),
        (status = 403, description = "No token is configured and the peer is not loopback.", body = ErrorBody),
        (status = 503, description = "The coordination backend did not answer.", body = ErrorBody)
    )
)]
async fn kill_switch_on(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let via = match authorize(&s.admin, peer, &headers, "POST /api/kill-switch") {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let reason = match kill_switch_request(&body) {
        Ok(r) => r,
        Err(why) => {
            return bad_request("reason", why);
        }
    };
    let ks = crate::coordination::KillSwitch {
        active: true,
        reason,
        activated_by: format!("admin-api ({via}) from {}", peer.ip()),
        activated_at: Some(chrono::Utc::now()),
    };
    match s.coord.set_kill_switch(&ks).await {
        Ok(()) => {
            tracing::warn!(reason = %ks.reason, by = %ks.activated_by, "kill switch ACTIVATED");
            s.publisher.status(json!({"kill_switch": ks}));
            axum::Json(KillSwitchState {
                kill_switch: Some(ks),
            })
            .into_response()
        }
        Err(e) => unavailable(&e),
    }
}

/// Clears the kill switch: generation resumes at the next tick.
#[utoipa::path(
    delete,
    path = "/api/kill-switch",
    tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The switch is off.", body = KillSwitchState),
        (status = 401, description = "A token is configured and none, or a wrong one, was presented.", body = ErrorBody),
        (status = 403, description = "No token is configured and the peer is not loopback.", body = ErrorBody),
        (status = 503, description = "The coordination backend did not answer.", body = ErrorBody)
    )
)]
async fn kill_switch_off(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorize(&s.admin, peer, &headers, "DELETE /api/kill-switch") {
        return r.into_response();
    }
    let off = crate::coordination::KillSwitch {
        active: false,
        reason: String::new(),
        activated_by: String::new(),
        activated_at: None,
    };
    match s.coord.set_kill_switch(&off).await {
        Ok(()) => {
            tracing::warn!(peer = %peer.ip(), "kill switch cleared");
            s.publisher.status(json!({"kill_switch": null}));
            axum::Json(KillSwitchState { kill_switch: None }).into_response()
        }
        Err(e) => unavailable(&e),
    }
}

/// Prometheus metrics (text exposition format 0.0.4).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    responses((status = 200, description = "Every series the service exports.", content_type = "text/plain", body = String))
)]
async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    metrics::counter!(crate::telemetry::names::LOG_LINES_DROPPED)
        .absolute(crate::telemetry::log_lines_dropped());
    // Breaker states can change by time alone (OPEN → HALF_OPEN): read them at scrape time.
    for b in &s.breakers {
        metrics::gauge!(crate::telemetry::names::CIRCUIT_BREAKER_STATE, "breaker" => b.name().to_string())
            .set(b.state().gauge());
    }
    for (backend, l) in &s.endpoint_limits {
        metrics::gauge!(crate::telemetry::names::LLM_CONCURRENCY_LIMIT, "backend" => *backend)
            .set(l.limit() as f64);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

/// One entry of `/api/signals/latest`: the stage payload's fields plus where it stands.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
struct LatestEntry {
    /// The payload of the symbol's furthest stage (a report, or the stage it stopped after).
    #[serde(flatten)]
    #[schema(value_type = crate::model::Payload)]
    payload: serde_json::Map<String, Value>,
    /// The stage the payload is of.
    stage: Stage,
    /// The message's id (UUID v5 of signal, stage and tick).
    message_id: String,
    /// When it was published.
    published_at: chrono::DateTime<chrono::Utc>,
}

/// `envelope` as a latest entry; `None` when its payload is not an object (another writer's
/// message of some other shape), which has no fields to show beside the stage.
fn latest_entry<P: serde::Serialize>(
    stage: Stage,
    envelope: &crate::pipeline::Envelope<P>,
) -> Option<LatestEntry> {
    match serde_json::to_value(&envelope.payload).ok()? {
        Value::Object(payload) => Some(LatestEntry {
            payload,
            stage,
            message_id: envelope.message_id.clone(),
            published_at: envelope.timestamp,
        }),
        _ => None,
    }
}

/// A page of `/api/signals/latest`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
struct LatestPage {
    /// One entry per symbol, in symbol order.
    signals: Vec<LatestEntry>,
    /// Symbols with a signal in all (every page).
    total: usize,
    /// Pass as `cursor` for the next page; null on the last.
    next_cursor: Option<String>,
}

/// `GET /api/signals/latest` parameters: pages of symbols in name order. Read as text and
/// checked by hand, so a wrong value gets a 400 naming the parameter.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct LatestQuery {
    /// Symbols per page.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000, default = 500)]
    limit: Option<String>,
    /// Start after this symbol (the previous page's `next_cursor`).
    #[param(pattern = r"^[A-Z0-9]{1,15}/[A-Z0-9]{1,15}$")]
    cursor: Option<String>,
    /// Only this symbol (`BASE/QUOTE`).
    #[param(pattern = r"^[A-Z0-9]{1,15}/[A-Z0-9]{1,15}$")]
    symbol: Option<String>,
}

/// Most signals one answer carries: ~2 KB each, so a page stays near 1 MB however many
/// symbols are configured (10,000 symbols made an 18.9 MB answer before pages).
const LATEST_MAX_LIMIT: usize = 1000;
const LATEST_DEFAULT_LIMIT: usize = 500;

/// A count parameter (`limit`, `minutes`): absent → `default`, else a whole number from 1 to
/// `max`; `Err` says what it must be (the caller's 400 names the parameter) — one rule for
/// every endpoint.
fn count_param(raw: Option<&str>, default: usize, max: usize) -> Result<usize, String> {
    match raw.map(str::parse::<usize>) {
        None => Ok(default),
        Some(Ok(n)) if (1..=max).contains(&n) => Ok(n),
        Some(_) => Err(format!("must be a whole number from 1 to {max}")),
    }
}

fn bad_request(param: &str, why: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(ErrorBody {
            error: format!("{param}: {why}"),
            parameter: Some(param.to_string()),
        }),
    )
        .into_response()
}

/// The newest signal of every symbol: its furthest stage of its newest tick, from this
/// replica and (with Redis) every other one.
#[utoipa::path(
    get,
    path = "/api/signals/latest",
    tag = "signals",
    params(LatestQuery),
    responses(
        (status = 200, description = "A page of symbols.", body = LatestPage),
        (status = 400, description = "A parameter is wrong; `parameter` names it.", body = ErrorBody)
    )
)]
async fn latest(
    State(s): State<AppState>,
    query: Result<axum::extract::Query<LatestQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match query {
        Ok(axum::extract::Query(q)) => q,
        Err(e) => return bad_request("query", e.body_text()),
    };
    let limit = match count_param(q.limit.as_deref(), LATEST_DEFAULT_LIMIT, LATEST_MAX_LIMIT) {
        Ok(n) => n,
        Err(why) => return bad_request("limit", why),
    };
    // The same rule as the history's: a value that cannot be a symbol is a mistake to name,
    // not a filter that matches nothing (the cursor is a symbol too: the last one sent).
    for (param, v) in [("symbol", &q.symbol), ("cursor", &q.cursor)] {
        if let Some(v) = v
            && !crate::config::is_valid_symbol(v)
        {
            let shown: String = v.chars().take(40).collect();
            return bad_request(
                param,
                format!("{shown:?} is not a symbol of the form BASE/QUOTE"),
            );
        }
    }
    // Per symbol, the newest cycle's furthest stage: this replica's own messages, and — with
    // Redis — every replica's dashboard messages, so a load-balanced client sees everything.
    let mut best: std::collections::BTreeMap<String, (CycleId, Stage, LatestEntry)> =
        Default::default();
    let mut offer = |symbol: String, cycle: CycleId, stage: Stage, entry: Option<LatestEntry>| {
        let Some(entry) = entry else { return };
        let newer = best
            .get(&symbol)
            .is_none_or(|(c, st, _)| crate::pipeline::supersedes(cycle, stage, *c, *st));
        if newer {
            best.insert(symbol, (cycle, stage, entry));
        }
    };
    for m in s.publisher.latest() {
        offer(
            m.symbol.clone(),
            m.cycle_id,
            m.stage,
            latest_entry(m.stage, &m.envelope),
        );
    }
    for event in s.publisher.hub().latest_signals() {
        let data = event.data();
        // Another replica's message is offered only when it names its symbol and tick; a
        // message that does not (written by something else) cannot be placed, so it is left out.
        let Ok(env) = serde_json::from_str::<crate::pipeline::Envelope<Value>>(data) else {
            continue;
        };
        if let Ok(key) = SignalKey::deserialize(&env.payload) {
            offer(
                key.symbol,
                key.cycle_id,
                Stage::Report,
                latest_entry(Stage::Report, &env),
            );
        }
    }
    let total = best.len();
    let after = q.cursor.unwrap_or_default();
    let mut page: Vec<(String, LatestEntry)> = best
        .into_iter()
        .filter(|(sym, _)| q.symbol.as_deref().is_none_or(|want| want == sym))
        .filter(|(sym, _)| after.is_empty() || sym.as_str() > after.as_str())
        .take(limit + 1)
        .map(|(sym, (_, _, v))| (sym, v))
        .collect();
    let next_cursor = if page.len() > limit {
        page.truncate(limit);
        page.last().map(|(sym, _)| sym.clone())
    } else {
        None
    };
    axum::Json(LatestPage {
        signals: page.into_iter().map(|(_, v)| v).collect(),
        total,
        next_cursor,
    })
    .into_response()
}

/// What places a message in the "latest per symbol" merge.
#[derive(serde::Deserialize)]
struct SignalKey {
    symbol: String,
    cycle_id: CycleId,
}

/// `GET /api/cycles` parameters.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct CyclesQuery {
    /// The newest this many (default: every one kept, `publish.cycle_history`).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
}

/// `GET /api/cycles`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
struct CyclesPage {
    /// Newest tick first.
    cycles: Vec<crate::publish::CycleSummary>,
}

/// Most cycles one answer may ask for (the buffer keeps fewer unless configured otherwise).
const CYCLES_MAX_LIMIT: usize = 1000;

/// The recent ticks of this replica: what each did, skipped or failed, and why.
#[utoipa::path(
    get,
    path = "/api/cycles",
    tag = "signals",
    params(CyclesQuery),
    responses(
        (status = 200, description = "The kept cycle summaries.", body = CyclesPage),
        (status = 400, description = "A parameter is wrong; `parameter` names it.", body = ErrorBody)
    )
)]
async fn cycles(
    State(s): State<AppState>,
    query: Result<axum::extract::Query<CyclesQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match query {
        Ok(axum::extract::Query(q)) => q,
        Err(e) => return bad_request("query", e.body_text()),
    };
    let limit = match count_param(q.limit.as_deref(), usize::MAX, CYCLES_MAX_LIMIT) {
        Ok(n) => n,
        Err(why) => return bad_request("limit", why),
    };
    let mut cycles = s.publisher.cycles();
    cycles.truncate(limit);
    axum::Json(CyclesPage { cycles }).into_response()
}

#[cfg(test)]
mod tests {
    use super::health::{ReadinessFacts, judge};
    use super::*;

    #[test]
    fn readiness_as_a_table() {
        let healthy = ReadinessFacts {
            scheduler_running: true,
            not_in_cooldown: true,
            ..Default::default()
        };
        let open = vec!["llm_openrouter".to_string()];
        // (facts, ready, degraded, failing checks)
        let table: Vec<(ReadinessFacts, bool, bool, Vec<&str>)> = vec![
            (healthy.clone(), true, false, vec![]),
            (
                ReadinessFacts {
                    scheduler_running: false,
                    ..healthy.clone()
                },
                false,
                false,
                vec!["scheduler_running"],
            ),
            (
                ReadinessFacts {
                    not_in_cooldown: false,
                    ..healthy.clone()
                },
                false,
                false,
                vec!["not_in_cooldown"],
            ),
            (
                ReadinessFacts {
                    coordination: Some("redis down".into()),
                    ..healthy.clone()
                },
                false,
                false,
                vec!["coordination_connected"],
            ),
            // An LLM incident without a fallback: not ready.
            (
                ReadinessFacts {
                    open_llm_breakers: open.clone(),
                    ..healthy.clone()
                },
                false,
                false,
                vec!["circuit_breaker_closed"],
            ),
            (
                ReadinessFacts {
                    budget_spent: Some("hour"),
                    ..healthy.clone()
                },
                false,
                false,
                vec!["llm_budget_available"],
            ),
            // With the rules fallback: degraded, still ready.
            (
                ReadinessFacts {
                    open_llm_breakers: open.clone(),
                    fallback_rules: true,
                    ..healthy.clone()
                },
                true,
                true,
                vec![],
            ),
            (
                ReadinessFacts {
                    budget_spent: Some("day"),
                    fallback_rules: true,
                    ..healthy.clone()
                },
                true,
                true,
                vec![],
            ),
            // A rejected key is not something a fallback hides.
            (
                ReadinessFacts {
                    auth_error: Some("401".into()),
                    fallback_rules: true,
                    ..healthy.clone()
                },
                false,
                false,
                vec!["llm_credentials_valid"],
            ),
            (
                ReadinessFacts {
                    probes: vec![("opencode", Err("down".into()))],
                    ..healthy.clone()
                },
                false,
                false,
                vec!["opencode_healthy"],
            ),
            (
                ReadinessFacts {
                    probes: vec![("opencode", Ok(()))],
                    ..healthy.clone()
                },
                true,
                false,
                vec![],
            ),
        ];
        for (i, (facts, ready, degraded, failing)) in table.into_iter().enumerate() {
            let judged = judge(&facts);
            assert_eq!(judged.ready(), ready, "row {i}: {judged:?}");
            let body = serde_json::to_value(&judged).expect("json");
            assert_eq!(body["degraded"], degraded, "row {i}: {body}");
            assert_eq!(body["failing"], json!(failing), "row {i}: {body}");
            for key in failing {
                assert!(
                    body["reasons"].get(key).is_some()
                        || key == "scheduler_running"
                        || key == "not_in_cooldown",
                    "row {i}: no reason for {key}: {body}"
                );
            }
            if degraded {
                assert!(
                    !body["degraded_reasons"]
                        .as_object()
                        .expect("map")
                        .is_empty()
                );
            }
        }
    }

    #[test]
    fn who_may_call_the_admin_endpoints() {
        let local: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        let remote: SocketAddr = "10.1.2.3:5000".parse().expect("addr");
        let access = |token: &str, loopback: bool| AdminAccess {
            token: crate::config::Secret::new(token),
            loopback,
            allowed_hosts: vec![],
        };
        let bearer = |t: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                header::AUTHORIZATION,
                format!("Bearer {t}").parse().expect("header"),
            );
            h
        };
        let none = HeaderMap::new();
        /// (token configured, admin_loopback, peer, headers, expected: how admitted or the status)
        type Row = (
            &'static str,
            bool,
            SocketAddr,
            HeaderMap,
            Result<&'static str, u16>,
        );
        let table: Vec<Row> = vec![
            // A token is configured: it is required from everyone, loopback included.
            ("s3cret", true, local, none.clone(), Err(401)),
            ("s3cret", true, local, bearer("wrong"), Err(401)),
            ("s3cret", true, local, bearer("s3cret"), Ok("token")),
            ("s3cret", false, remote, bearer("s3cret"), Ok("token")),
            ("s3cret", true, remote, none.clone(), Err(401)),
            ("s3cret", true, remote, bearer("s3cre"), Err(401)),
            // No token: loopback only, and only when allowed.
            ("", true, local, none.clone(), Ok("loopback")),
            ("", true, local, bearer("anything"), Ok("loopback")),
            ("", true, remote, none.clone(), Err(403)),
            ("", false, local, none.clone(), Err(403)),
            ("", false, remote, bearer("anything"), Err(403)),
        ];
        for (i, (token, loopback, peer, headers, want)) in table.into_iter().enumerate() {
            let got =
                authorize(&access(token, loopback), peer, &headers, "test").map_err(|r| match r {
                    Refusal::Unauthorized(_) => 401,
                    Refusal::Forbidden => 403,
                });
            assert_eq!(
                got, want,
                "row {i}: token {token:?}, loopback {loopback}, peer {peer}"
            );
        }
    }

    #[test]
    fn only_a_well_formed_kill_switch_request_is_taken() {
        assert_eq!(
            kill_switch_request(br#"{"reason": " maintenance "}"#),
            Ok("maintenance".to_string())
        );
        for (body, needle) in [
            (&b""[..], "empty body"),
            (b"  \n", "empty body"),
            (b"[]", "JSON object"),
            (b"[\"reason\"]", "JSON object"),
            (b"{}", "missing field `reason`"),
            (br#"{"reason": ""}"#, "must not be empty"),
            (br#"{"reason": "   "}"#, "must not be empty"),
            (br#"{"reason": 3}"#, "invalid type"),
            (br#"{"reason": "x", "active": false}"#, "unknown field"),
            (b"{not json", "JSON object"),
        ] {
            let e = kill_switch_request(body).expect_err(needle);
            assert!(e.contains(needle), "{}: {e}", String::from_utf8_lossy(body));
        }
        let long = format!(r#"{{"reason": "{}"}}"#, "x".repeat(501));
        assert!(kill_switch_request(long.as_bytes()).is_err());
    }
}
