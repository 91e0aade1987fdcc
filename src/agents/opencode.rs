//! The `opencode` backend: a client of `opencode serve`.
//!
//! One session per (symbol, stage), titled `{symbol} {cycle_id}` (a title saves OpenCode a
//! title-generation call), prompted with the stage's agent and `format: json_schema`. OpenCode
//! implements that as a `StructuredOutput` tool call and does **not** check the arguments
//! against the schema, so `info.structured` is validated here like any other answer. At the
//! deadline the session is aborted; it is always deleted afterwards. OpenCode retries LLM
//! errors itself, so the runner's own deadline is what bounds a call.

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

/// The transport.
#[derive(Clone)]
pub struct OpenCode {
    http: reqwest::Client,
    base: String,
    password: Secret,
    agents: OpenCodeAgents,
    /// Session clean-ups still running (a call dropped at its deadline cleans up after it).
    cleanups: tokio_util::task::TaskTracker,
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
    pub fn new(url: &str, password: Secret, agents: OpenCodeAgents) -> Result<Self, AgentError> {
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
