//! The model gateway: `POST /llm/v1/chat/completions`, an OpenAI-compatible endpoint that
//! OpenCode's model requests pass through (the shipped `opencode.json` points its provider
//! here), so what OpenCode spends is under the runner's limits.
//!
//! OpenCode retries a failing model itself — five times per step after a backoff, with its
//! HTTP client retrying beneath that — so twenty parallel sessions against a dead or
//! overloaded endpoint send hundreds of requests the runner never sees. Here each request is
//! matched to the runner's call by the `X-Session-Id` header OpenCode sets (the runner created
//! that session and entered it in the [`SessionLedger`]):
//!
//! - a session may send `agents.opencode.max_model_requests`; past that it is refused with a
//!   400, which OpenCode does not retry, so no loop can outspend it;
//! - a session's first request is covered by the rate-limit slot and budget reservation of
//!   the runner's own call; every later one (a tool step, a retry) takes a rate-limit slot
//!   now or is refused 429 with `Retry-After`, and reserves its worst case in the token
//!   budget, settled with the `usage` the endpoint reports;
//! - requests of sessions the runner did not open are refused (403): only its calls spend.
//!
//! Accepted requests go to `agents.base_url` with the runner's `agents.api_key`, so OpenCode
//! needs no key of its own; the answer — a stream or not — is relayed as it arrives.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::agents::llm::{Reservation, TokenBudget};
use crate::agents::opencode::{Admission, SessionLedger};
use crate::config::Secret;
use crate::resilience::rate_limit::AgentRateLimiter;
use crate::telemetry::names;

/// Bytes of a non-streamed answer kept to read its `usage` (answers are relayed whole
/// whatever their size; only the accounting looks at this much).
const USAGE_SCAN_MAX: usize = 1 << 20;

/// What the gateway needs: the ledger the OpenCode transport keeps, the runner's limiter and
/// budget, and where to send accepted requests.
pub struct Gateway {
    sessions: SessionLedger,
    limiter: Arc<dyn AgentRateLimiter>,
    budget: Arc<TokenBudget>,
    upstream: String,
    api_key: Secret,
    max_tokens: u32,
    http: reqwest::Client,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway to the chat-completions endpoint under `base_url` (`agents.base_url`),
    /// authenticated with `api_key` when it is set; `max_tokens` is assumed for requests that
    /// do not say theirs.
    pub fn new(
        sessions: SessionLedger,
        limiter: Arc<dyn AgentRateLimiter>,
        budget: Arc<TokenBudget>,
        base_url: &str,
        api_key: Secret,
        max_tokens: u32,
    ) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("model gateway HTTP client: {e}"))?;
        Ok(Self {
            sessions,
            limiter,
            budget,
            upstream: format!("{}/chat/completions", base_url.trim_end_matches('/')),
            api_key,
            max_tokens,
            http,
        })
    }
}

/// An OpenAI-style error answer, which OpenCode shows as the call's error. OpenCode decides
/// whether to retry by matching the whole body against patterns ("429", "500", "rate limit",
/// "server error", "overloaded", "timed out", …): a refusal meant to end the call never holds
/// one; only the rate-limit refusal (a 429, retried after `Retry-After`) and an unreachable
/// endpoint (a 502) do.
fn refuse(status: StatusCode, outcome: &'static str, message: String) -> Response {
    metrics::counter!(names::OPENCODE_MODEL_REQUESTS, "outcome" => outcome).increment(1);
    let body = json!({"error": {"message": message, "type": "autonomous_runner_gateway", "code": outcome}});
    (status, axum::Json(body)).into_response()
}

/// [`refuse`] boxed, for the steps that return a refusal as their error (a response is
/// too large to travel unboxed in every `Result`).
fn refused(status: StatusCode, outcome: &'static str, message: String) -> Box<Response> {
    Box::new(refuse(status, outcome, message))
}

/// Why a session may send no more. The cause travels with the refusal (OpenCode reports
/// only its last error) as a status class: OpenCode retries any error whose text holds
/// "500", "503" and the like, and this refusal must end the call. The log has the status.
fn over_allowance_message(allowance: u32, last_status: Option<u16>) -> String {
    let last = last_status
        .map(|s| format!("; the model's last answer was an HTTP {}xx", s / 100))
        .unwrap_or_default();
    format!(
        "this call has used its {allowance} model requests (agents.opencode.max_model_requests){last}; no more are sent"
    )
}

/// Why the budget refused a request (`window`: `hour` or `day`).
fn budget_message(window: &str) -> String {
    format!("the runner's token budget for this {window} is spent (agents.budget)")
}

/// The session a request belongs to: `X-Session-Id`, else `x-session-affinity` (OpenCode
/// sends both to providers other than its own).
fn session_of(headers: &HeaderMap) -> Option<&str> {
    ["x-session-id", "x-session-affinity"]
        .iter()
        .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
        // OpenCode's ids are ~30 characters; anything long is not one of ours, and is not
        // carried into the logs.
        .filter(|s| !s.is_empty() && s.len() <= 128)
}

/// Tokens a request may use at most: its bytes (a byte-level BPE token covers at least one)
/// and its completion limit.
fn estimate(body: &[u8], default_max_tokens: u32) -> u64 {
    let max_tokens = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.get("max_tokens")
                .or_else(|| v.get("max_completion_tokens"))
                .and_then(Value::as_u64)
        })
        .unwrap_or(u64::from(default_max_tokens));
    body.len() as u64 + max_tokens
}

/// Tokens an answer reports in its `usage` (`prompt_tokens + completion_tokens`), read from
/// a JSON body or from a stream's `data:` lines.
fn usage_in(text: &[u8]) -> Option<u64> {
    let total = |v: &Value| {
        let u = v.get("usage")?;
        let p = u.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0);
        let c = u
            .get("completion_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        (p + c > 0).then_some(p + c)
    };
    if let Ok(v) = serde_json::from_slice::<Value>(text) {
        return total(&v);
    }
    // The last report counts (a stream sends `usage` once, in its final chunk).
    text.split(|b| *b == b'\n')
        .rev()
        .filter_map(|line| line.strip_prefix(b"data:"))
        .filter_map(|d| serde_json::from_slice::<Value>(d.trim_ascii()).ok())
        .find_map(|v| total(&v))
}

/// `POST /llm/v1/chat/completions`.
pub async fn chat_completions(
    State(g): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (session, first, symbol, stage) = match admit(&g, &headers) {
        Ok(admitted) => admitted,
        Err(refusal) => return *refusal,
    };
    let estimate = estimate(&body, g.max_tokens);
    let reservation = match charge(&g, &session, first, estimate).await {
        Ok(r) => r,
        Err(refusal) => return *refusal,
    };
    let mut rb = g
        .http
        .post(&g.upstream)
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            "HTTP-Referer",
            "https://github.com/tradestream/autonomous-runner",
        )
        .header("X-OpenRouter-Title", "autonomous-runner")
        // What OpenCode would have told the provider itself (some use it to route a
        // conversation to the same cache).
        .header("X-Session-Id", &session)
        .header("x-session-affinity", &session)
        .body(body);
    if !g.api_key.is_empty() {
        rb = rb.bearer_auth(g.api_key.expose());
    }
    let resp = match rb.send().await {
        Ok(r) => r,
        Err(e) => {
            // Nothing reached the model: nothing was spent.
            if let Some(r) = reservation {
                g.budget.settle(r, 0, Utc::now());
            }
            let cause = crate::agents::http_error(&e, &g.upstream).to_string();
            tracing::warn!(symbol, stage, session, error = %cause, "model gateway: upstream unreachable");
            return refuse(
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                crate::telemetry::redact(&cause).into_owned(),
            );
        }
    };
    metrics::counter!(names::OPENCODE_MODEL_REQUESTS, "outcome" => "forwarded").increment(1);
    g.sessions.note_status(&session, resp.status().as_u16());
    relay(
        resp,
        Meter {
            budget: g.budget.clone(),
            reservation,
            seen: Vec::new(),
        },
    )
}

/// The request's session, if it is one of the runner's calls in progress with allowance
/// left: `(session, first request, symbol, stage)`; otherwise the refusal to answer.
fn admit(
    g: &Gateway,
    headers: &HeaderMap,
) -> Result<(String, bool, String, &'static str), Box<Response>> {
    let Some(session) = session_of(headers) else {
        return Err(refused(
            StatusCode::FORBIDDEN,
            "unknown_session",
            "no X-Session-Id: this gateway serves the runner's own OpenCode sessions only".into(),
        ));
    };
    match g.sessions.admit(session) {
        Admission::Forward {
            first,
            symbol,
            stage,
        } => Ok((session.to_string(), first, symbol, stage)),
        Admission::OverAllowance {
            allowance,
            last_status,
            symbol,
            stage,
        } => {
            tracing::warn!(
                symbol,
                stage,
                session,
                allowance,
                last_status,
                "OpenCode session used its model requests; refusing more"
            );
            Err(refused(
                StatusCode::BAD_REQUEST,
                "over_allowance",
                over_allowance_message(allowance, last_status),
            ))
        }
        Admission::Unknown => Err(refused(
            StatusCode::FORBIDDEN,
            "unknown_session",
            "not a session of a call in progress: this gateway serves the runner's own OpenCode sessions only".into(),
        )),
    }
}

/// The rate limit and budget of a request. The first rides on the runner's own slot and
/// reservation; every further one (a step, a retry) is charged like a call of its own. A
/// refusal gives the session its request back.
async fn charge(
    g: &Gateway,
    session: &str,
    first: bool,
    estimate: u64,
) -> Result<Option<Reservation>, Box<Response>> {
    if first {
        return Ok(None);
    }
    if g.limiter.acquire_before(Instant::now()).await.is_err() {
        g.sessions.refund(session);
        let mut r = refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "rate limit of the runner (agents.requests_per_minute): too many requests".into(),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        return Err(Box::new(r));
    }
    match g.budget.reserve(estimate, Utc::now()) {
        Ok(r) => Ok(Some(r)),
        Err(w) => {
            g.sessions.refund(session);
            metrics::counter!(names::LLM_BUDGET_EXHAUSTED, "window" => w.as_str()).increment(1);
            Err(refused(
                StatusCode::BAD_REQUEST,
                "budget_exhausted",
                budget_message(w.as_str()),
            ))
        }
    }
}

/// The upstream answer relayed as it arrives (a stream stays a stream), with its status,
/// content type and `Retry-After`; the reservation settles when the body ends, or in full if
/// OpenCode hangs up first.
fn relay(resp: reqwest::Response, meter: Meter) -> Response {
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = resp.headers().get(reqwest::header::CONTENT_TYPE).cloned();
    let retry_after = resp.headers().get(reqwest::header::RETRY_AFTER).cloned();
    let stream = futures::stream::unfold((resp, meter), |(mut resp, mut meter)| async move {
        match resp.chunk().await {
            Ok(Some(c)) => {
                meter.saw(&c);
                Some((Ok::<Bytes, std::io::Error>(c), (resp, meter)))
            }
            Ok(None) => {
                meter.finish();
                None
            }
            Err(e) => Some((Err(std::io::Error::other(e.without_url())), (resp, meter))),
        }
    });
    let mut out = Response::new(Body::from_stream(stream));
    *out.status_mut() = status;
    if let Some(ct) = content_type.and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok()) {
        out.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    if let Some(ra) = retry_after.and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok()) {
        out.headers_mut().insert(header::RETRY_AFTER, ra);
    }
    out
}

/// Reads what a relayed answer reports it used and settles its reservation with that.
struct Meter {
    budget: Arc<TokenBudget>,
    reservation: Option<Reservation>,
    seen: Vec<u8>,
}

impl Meter {
    fn saw(&mut self, chunk: &[u8]) {
        if self.reservation.is_some() && self.seen.len() + chunk.len() <= USAGE_SCAN_MAX {
            self.seen.extend_from_slice(chunk);
        }
    }

    /// The body ended: settle with the reported usage; without one, the worst case stays
    /// charged (the reservation's drop).
    fn finish(&mut self) {
        if let Some(r) = self.reservation.take() {
            match usage_in(&self.seen) {
                Some(used) => self.budget.settle(r, used, Utc::now()),
                None => drop(r),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What OpenCode 1.18's retry rule looks for in an error's message and body (its
    /// `SessionRetry` patterns, lower-cased): a refusal that must end the call holds none.
    const RETRIED: &[&str] = &[
        "429",
        "500",
        "502",
        "503",
        "504",
        "524",
        "rate limit",
        "rate-limit",
        "rate_limit",
        "too many requests",
        "rate increased",
        "overloaded",
        "service unavailable",
        "service_unavailable",
        "internal error",
        "internal_error",
        "server error",
        "server_error",
        "provider returned error",
        "terminated",
        "fetch failed",
        "network error",
        "connection",
        "socket",
        "econn",
        "etimedout",
        "timed out",
        "time out",
        "try your request again",
        "retry your request",
        "resource exhausted",
        "resource_exhausted",
        "try again",
        "at capacity",
    ];

    #[test]
    fn refusals_that_end_a_call_are_not_worded_as_retryable() {
        for status in [None, Some(500), Some(503), Some(524), Some(429), Some(404)] {
            for allowance in [1, 10, 500, 503] {
                let body = json!({"error": {"message": over_allowance_message(allowance, status), "type": "autonomous_runner_gateway", "code": "over_allowance"}}).to_string().to_lowercase();
                for p in RETRIED {
                    // The configured number itself is the operator's choice; the rest is ours.
                    if allowance.to_string().contains(p) {
                        continue;
                    }
                    assert!(!body.contains(p), "{p:?} in {body}");
                }
            }
        }
        for w in ["hour", "day"] {
            let body = json!({"error": {"message": budget_message(w), "type": "autonomous_runner_gateway", "code": "budget_exhausted"}}).to_string().to_lowercase();
            for p in RETRIED {
                assert!(!body.contains(p), "{p:?} in {body}");
            }
        }
    }

    #[test]
    fn usage_is_read_from_a_body_or_a_stream() {
        assert_eq!(
            usage_in(br#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5}}"#),
            Some(17)
        );
        let sse = b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":40,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n";
        assert_eq!(usage_in(sse), Some(42));
        assert_eq!(usage_in(b"data: {\"choices\":[]}\n\n"), None);
        assert_eq!(usage_in(b"not json"), None);
    }

    #[test]
    fn a_request_is_estimated_at_its_bytes_and_completion_limit() {
        assert_eq!(estimate(br#"{"max_tokens":100}"#, 7), 18 + 100);
        assert_eq!(estimate(br#"{"messages":[]}"#, 7), 15 + 7);
        assert_eq!(estimate(b"garbage", 7), 7 + 7);
    }

    #[test]
    fn the_session_is_read_from_either_header() {
        let mut h = HeaderMap::new();
        assert_eq!(session_of(&h), None);
        h.insert("x-session-affinity", HeaderValue::from_static("ses_a"));
        assert_eq!(session_of(&h), Some("ses_a"));
        h.insert("x-session-id", HeaderValue::from_static("ses_b"));
        assert_eq!(session_of(&h), Some("ses_b"));
        let long = "s".repeat(129);
        h.insert("x-session-id", HeaderValue::from_str(&long).unwrap());
        h.remove("x-session-affinity");
        assert_eq!(session_of(&h), None);
    }
}
