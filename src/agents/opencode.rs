//! The `opencode` backend: a client of `opencode serve`.
//!
//! One session per (symbol, stage), titled `{symbol} {cycle_id}` (a title saves OpenCode a
//! title-generation call), prompted with the stage's agent and `format: json_schema`. OpenCode
//! implements that as a `StructuredOutput` tool call and does **not** check the arguments
//! against the schema, so `info.structured` is validated here like any other answer. At the
//! deadline the session is aborted; it is always deleted afterwards.
//!
//! OpenCode retries model errors itself (up to five times per step, each after a backoff, and
//! its HTTP client retries again beneath that): against a failing endpoint twenty parallel
//! sessions send hundreds of requests that no limit of the runner's sees. So every session
//! this transport opens is entered in a [`SessionLedger`] with an allowance of model requests,
//! and the shipped `opencode.json` sends OpenCode's model requests through the runner's model
//! gateway (`/llm/v1`, in `http::gateway`), which finds each request's session by the
//! `X-Session-Id` header OpenCode sets, forwards it while the allowance lasts, and charges
//! every request after a session's first to the rate limit and the token budget.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::AgentError;
use super::llm::{LlmReply, LlmRequest, Transport, Usage};
use crate::config::Secret;
use crate::model::Stage;

/// Largest answer read.
const MAX_BODY: usize = 4 << 20;

/// Agent names per stage and the model to ask for.
#[derive(Debug, Clone)]
pub struct OpenCodeAgents {
    /// Signal stage agent.
    pub signal: String,
    /// Advise stage agent.
    pub advise: String,
    /// Report stage agent.
    pub report: String,
    /// `providerID` (empty: the agent's own model).
    pub provider_id: String,
    /// `modelID`.
    pub model_id: String,
}

/// The model requests each open session of the runner's has sent through the gateway.
/// Cloned handles share one ledger.
#[derive(Clone, Debug)]
pub struct SessionLedger {
    sessions: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Ledger>>>,
    allowance: u32,
}

/// One session's entry.
#[derive(Debug, Clone)]
struct Ledger {
    symbol: String,
    stage: &'static str,
    forwarded: u32,
    /// The status the model endpoint gave the session's last request.
    last_status: Option<u16>,
}

/// What the gateway may do with a model request of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Send it on. `first`: the session's first request, covered by the slot and the budget
    /// reservation the runner's own call already took.
    Forward {
        /// The session's first model request.
        first: bool,
        /// The symbol and stage the session works for (for logs).
        symbol: String,
        /// The stage.
        stage: &'static str,
    },
    /// The session has used its allowance: refused, so no retry loop can outspend it.
    OverAllowance {
        /// The allowance.
        allowance: u32,
        /// What the endpoint answered the last request (the cause a refusal passes on).
        last_status: Option<u16>,
        /// The symbol.
        symbol: String,
        /// The stage.
        stage: &'static str,
    },
    /// Not a session this runner opened (or one already closed).
    Unknown,
}

impl SessionLedger {
    /// A ledger allowing each session `allowance` model requests
    /// (`agents.opencode.max_model_requests`).
    pub fn new(allowance: u32) -> Self {
        Self {
            sessions: Default::default(),
            allowance: allowance.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Ledger>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enters a session the runner just created.
    pub fn open(&self, id: &str, symbol: &str, stage: &'static str) {
        self.lock().insert(
            id.to_string(),
            Ledger {
                symbol: symbol.to_string(),
                stage,
                forwarded: 0,
                last_status: None,
            },
        );
    }

    /// Removes a session; returns how many model requests it sent.
    pub fn close(&self, id: &str) -> Option<u32> {
        self.lock().remove(id).map(|l| l.forwarded)
    }

    /// Decides on one model request of session `id`, counting it when it may go.
    pub fn admit(&self, id: &str) -> Admission {
        let mut sessions = self.lock();
        let Some(l) = sessions.get_mut(id) else {
            return Admission::Unknown;
        };
        if l.forwarded >= self.allowance {
            return Admission::OverAllowance {
                allowance: self.allowance,
                last_status: l.last_status,
                symbol: l.symbol.clone(),
                stage: l.stage,
            };
        }
        l.forwarded += 1;
        Admission::Forward {
            first: l.forwarded == 1,
            symbol: l.symbol.clone(),
            stage: l.stage,
        }
    }

    /// Hands back a request that was admitted but never sent (the rate limit or the budget
    /// refused it at the gateway), so it does not use up the allowance.
    pub fn refund(&self, id: &str) {
        if let Some(l) = self.lock().get_mut(id) {
            l.forwarded = l.forwarded.saturating_sub(1);
        }
    }

    /// Records what the endpoint answered a session's request.
    pub fn note_status(&self, id: &str, status: u16) {
        if let Some(l) = self.lock().get_mut(id) {
            l.last_status = Some(status);
        }
    }

    /// Sessions open now.
    pub fn open_sessions(&self) -> usize {
        self.lock().len()
    }
}

/// The transport.
#[derive(Clone)]
pub struct OpenCode {
    http: reqwest::Client,
    base: String,
    password: Secret,
    agents: OpenCodeAgents,
    /// Session clean-ups still running (a call dropped at its deadline cleans up after it).
    cleanups: tokio_util::task::TaskTracker,
    /// The sessions open now and the model requests each has sent through the gateway.
    ledger: SessionLedger,
}

/// Aborts and deletes its session when dropped while armed: whether the call ended at our own
/// deadline or the caller dropped it (the symbol's or the cycle's deadline), the session never
/// outlives the call.
struct SessionGuard {
    oc: OpenCode,
    id: String,
    symbol: String,
    stage: &'static str,
    armed: bool,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        tracing::warn!(symbol = %self.symbol, stage = self.stage, session = %self.id, "OpenCode call passed its deadline; aborting the session");
        let (oc, id) = (self.oc.clone(), std::mem::take(&mut self.id));
        // The session may send nothing more through the gateway, whatever its abort does.
        oc.ledger.close(&id);
        // Drop cannot wait; the tracker lets shutdown wait for the clean-up instead.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let tracker = oc.cleanups.clone();
            tracker.spawn_on(async move { oc.abort_and_delete(&id, true).await }, &handle);
        }
    }
}

impl std::fmt::Debug for OpenCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenCode")
            .field("base", &self.base)
            .field("agents", &self.agents)
            .finish_non_exhaustive()
    }
}

impl OpenCode {
    /// A client of the server at `url` (e.g. `http://127.0.0.1:4096`).
    pub fn new(
        url: &str,
        password: Secret,
        agents: OpenCodeAgents,
        ledger: SessionLedger,
    ) -> Result<Self, AgentError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .build()
            .map_err(|e| AgentError::Transport(e.to_string()))?;
        Ok(Self {
            http,
            base: url.trim_end_matches('/').to_string(),
            password,
            agents,
            cleanups: tokio_util::task::TaskTracker::new(),
            ledger,
        })
    }

    fn agent(&self, stage: Stage) -> &str {
        match stage {
            Stage::Signal | Stage::Score => &self.agents.signal,
            Stage::Advise => &self.agents.advise,
            Stage::Report => &self.agents.report,
        }
    }

    /// A request to `path` on the server, with Basic auth when a password is set.
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, format!("{}{path}", self.base));
        if self.password.is_empty() {
            rb
        } else {
            rb.basic_auth("opencode", Some(self.password.expose()))
        }
    }

    async fn read(&self, resp: reqwest::Response) -> Result<(u16, Vec<u8>), AgentError> {
        let status = resp.status().as_u16();
        let mut resp = resp;
        let mut buf = Vec::new();
        while let Some(c) = resp
            .chunk()
            .await
            .map_err(|e| super::http_error(&e, &self.base))?
        {
            if buf.len() + c.len() > MAX_BODY {
                return Err(AgentError::InvalidOutput(format!(
                    "OpenCode answer larger than {MAX_BODY} bytes"
                )));
            }
            buf.extend_from_slice(&c);
        }
        Ok((status, buf))
    }

    fn status_error(status: u16, body: &[u8]) -> AgentError {
        let msg: String = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| {
                v["data"]["message"]
                    .as_str()
                    .or_else(|| v["message"].as_str())
                    .map(str::to_string)
            })
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect();
        match status {
            500..=599 => AgentError::Upstream {
                status,
                body: super::body_excerpt(body),
            },
            _ => AgentError::Refused {
                status,
                message: msg,
            },
        }
    }

    async fn create_session(&self, req: &LlmRequest<'_>) -> Result<String, AgentError> {
        let body = json!({"title": format!("{} {}", req.symbol, req.cycle_id), "agent": self.agent(req.stage)});
        let resp = self
            .request(reqwest::Method::POST, "/session")
            .timeout(Duration::from_secs(10))
            .json(&body)
            .send()
            .await
            .map_err(|e| super::http_error(&e, &self.base))?;
        let (status, buf) = self.read(resp).await?;
        if status != 200 {
            return Err(Self::status_error(status, &buf));
        }
        let v: Value = serde_json::from_slice(&buf)
            .map_err(|e| AgentError::InvalidOutput(format!("session answer is not JSON: {e}")))?;
        v["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| AgentError::InvalidOutput("session answer has no id".into()))
    }

    async fn prompt(&self, id: &str, req: &LlmRequest<'_>) -> Result<LlmReply, AgentError> {
        // A fresh session per call: a follow-up turn (the errors of a rejected answer) rides
        // along with the prompt instead of as a second message.
        let mut text = req.user.clone();
        for m in req.conversation.iter().filter(|m| m["role"] == "user") {
            if let Some(t) = m["content"].as_str() {
                text.push_str("\n\n");
                text.push_str(t);
            }
        }
        let mut body = json!({
            "agent": self.agent(req.stage),
            "parts": [{"type": "text", "text": text}],
            "format": {"type": "json_schema", "schema": req.schema, "retryCount": 1},
        });
        if !self.agents.provider_id.is_empty() {
            body["model"] =
                json!({"providerID": self.agents.provider_id, "modelID": self.agents.model_id});
        }
        let resp = self
            .request(reqwest::Method::POST, &format!("/session/{id}/message"))
            .json(&body)
            .send()
            .await
            .map_err(|e| super::http_error(&e, &self.base))?;
        let (status, buf) = self.read(resp).await?;
        if status != 200 {
            return Err(Self::status_error(status, &buf));
        }
        parse_message(&buf)
    }

    async fn abort_and_delete(&self, id: &str, abort: bool) {
        if abort {
            let r = self
                .request(reqwest::Method::POST, &format!("/session/{id}/abort"))
                .timeout(Duration::from_secs(3))
                .send()
                .await;
            if let Err(e) = r {
                tracing::warn!(session = id, error = %e.without_url(), "OpenCode abort failed");
            }
        }
        let r = self
            .request(reqwest::Method::DELETE, &format!("/session/{id}"))
            .timeout(Duration::from_secs(3))
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => {}
            Ok(resp) => tracing::warn!(
                session = id,
                status = resp.status().as_u16(),
                "OpenCode session delete refused"
            ),
            Err(e) => {
                tracing::warn!(session = id, error = %e.without_url(), "OpenCode session delete failed")
            }
        }
    }
}

/// Reads a `POST /session/{id}/message` answer: `info.structured`, `info.error`, `info.tokens`.
pub fn parse_message(body: &[u8]) -> Result<LlmReply, AgentError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(AgentError::InvalidOutput("empty OpenCode answer".into()));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| AgentError::InvalidOutput(format!("OpenCode answer is not JSON: {e}")))?;
    let info = &v["info"];
    if let Some(err) = info.get("error").filter(|e| !e.is_null()) {
        let name = err["name"].as_str().unwrap_or("unknown");
        let message: String =
            crate::telemetry::redact(err["data"]["message"].as_str().unwrap_or(""))
                .chars()
                .take(200)
                .collect();
        return Err(match name {
            "MessageAbortedError" => AgentError::Timeout(None),
            "ProviderAuthError" => AgentError::Refused {
                status: 401,
                message,
            },
            "APIError" => {
                let status = err["data"]["statusCode"]
                    .as_u64()
                    .and_then(|s| u16::try_from(s).ok())
                    .unwrap_or(502);
                match status {
                    429 => AgentError::RateLimited { retry_after: None },
                    408 | 500..=599 => AgentError::Upstream {
                        status,
                        body: message,
                    },
                    s => AgentError::Refused { status: s, message },
                }
            }
            "StructuredOutputError" | "MessageOutputLengthError" | "ContentFilterError" => {
                AgentError::InvalidOutput(format!("OpenCode {name}: {message}"))
            }
            other => {
                tracing::warn!(error = other, "OpenCode reported an unexpected error kind");
                AgentError::Upstream {
                    status: 502,
                    body: format!("OpenCode {other}: {message}"),
                }
            }
        });
    }
    let json = match &info["structured"] {
        Value::Object(_) => info["structured"].clone(),
        Value::Null => {
            return Err(AgentError::InvalidOutput(
                "OpenCode answer has no info.structured".into(),
            ));
        }
        other => {
            return Err(AgentError::InvalidOutput(format!(
                "info.structured is not an object: {other}"
            )));
        }
    };
    let usage = Usage {
        input: info["tokens"]["input"].as_u64().unwrap_or(0),
        output: info["tokens"]["output"].as_u64().unwrap_or(0)
            + info["tokens"]["reasoning"].as_u64().unwrap_or(0),
    };
    Ok(LlmReply::answer(json, usage))
}

#[async_trait]
impl Transport for OpenCode {
    fn backend(&self) -> &'static str {
        "opencode"
    }

    async fn call(&self, req: &LlmRequest<'_>, deadline: Instant) -> Result<LlmReply, AgentError> {
        let id = tokio::time::timeout_at(deadline, self.create_session(req))
            .await
            .map_err(|_| AgentError::Timeout(None))??;
        self.ledger.open(&id, req.symbol, req.stage.as_str());
        let mut guard = SessionGuard {
            oc: self.clone(),
            id,
            symbol: req.symbol.to_string(),
            stage: req.stage.as_str(),
            armed: true,
        };
        // At the deadline the guard (still armed) aborts and deletes the session.
        let reply = tokio::time::timeout_at(deadline, self.prompt(&guard.id, req))
            .await
            .map_err(|_| AgentError::Timeout(None))?;
        guard.armed = false;
        if let Some(n) = self.ledger.close(&guard.id) {
            tracing::debug!(
                symbol = req.symbol,
                stage = req.stage.as_str(),
                model_requests = n,
                "OpenCode call ended"
            );
        }
        self.abort_and_delete(&guard.id, false).await;
        reply
    }

    async fn drain(&self, timeout: Duration) {
        self.cleanups.close();
        if tokio::time::timeout(timeout, self.cleanups.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.cleanups.len(),
                "OpenCode session clean-ups still running at shutdown"
            );
        }
    }

    async fn health(&self) -> Result<(), String> {
        let r = self
            .request(reqwest::Method::GET, "/global/health")
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => match resp.json::<Value>().await {
                Ok(v) if v["healthy"] == true => Ok(()),
                Ok(v) => Err(format!("OpenCode reports unhealthy: {v}")),
                Err(e) => Err(format!(
                    "OpenCode health answer unreadable: {}",
                    e.without_url()
                )),
            },
            Ok(resp) => Err(format!(
                "OpenCode health answered HTTP {}",
                resp.status().as_u16()
            )),
            Err(e) => Err(format!("OpenCode unreachable: {}", e.without_url())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_may_send_its_allowance_and_no_more() {
        let l = SessionLedger::new(3);
        assert_eq!(l.admit("ses_x"), Admission::Unknown);
        l.open("ses_x", "ETH/USD", "signal");
        let first = l.admit("ses_x");
        assert!(
            matches!(first, Admission::Forward { first: true, .. }),
            "{first:?}"
        );
        assert!(matches!(
            l.admit("ses_x"),
            Admission::Forward { first: false, .. }
        ));
        // A request refused at the gateway (rate limit) is handed back.
        assert!(matches!(
            l.admit("ses_x"),
            Admission::Forward { first: false, .. }
        ));
        l.refund("ses_x");
        assert!(matches!(
            l.admit("ses_x"),
            Admission::Forward { first: false, .. }
        ));
        l.note_status("ses_x", 500);
        for _ in 0..100 {
            assert!(matches!(
                l.admit("ses_x"),
                Admission::OverAllowance {
                    allowance: 3,
                    last_status: Some(500),
                    ..
                }
            ));
        }
        assert_eq!(l.close("ses_x"), Some(3));
        assert_eq!(l.admit("ses_x"), Admission::Unknown);
        assert_eq!(l.open_sessions(), 0);
    }

    #[test]
    fn message_parsing() {
        let ok = br#"{"info":{"structured":{"summary":"x"},"tokens":{"input":10,"output":5,"reasoning":1}},"parts":[]}"#;
        let r = parse_message(ok).expect("ok");
        assert_eq!(r.json["summary"], "x");
        assert_eq!(
            r.usage,
            Usage {
                input: 10,
                output: 6
            }
        );
        let aborted =
            br#"{"info":{"error":{"name":"MessageAbortedError","data":{"message":"aborted"}}}}"#;
        assert!(matches!(
            parse_message(aborted),
            Err(AgentError::Timeout(_))
        ));
        let api =
            br#"{"info":{"error":{"name":"APIError","data":{"message":"busy","statusCode":503}}}}"#;
        assert!(matches!(
            parse_message(api),
            Err(AgentError::Upstream { status: 503, .. })
        ));
        let rl = br#"{"info":{"error":{"name":"APIError","data":{"message":"slow down","statusCode":429}}}}"#;
        assert!(matches!(
            parse_message(rl),
            Err(AgentError::RateLimited { .. })
        ));
        for bad in [
            &b""[..],
            b"nope",
            br#"{"info":{}}"#,
            br#"{"info":{"structured":42}}"#,
        ] {
            assert!(matches!(
                parse_message(bad),
                Err(AgentError::InvalidOutput(_))
            ));
        }
    }
}
