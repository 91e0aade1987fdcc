//! The `openrouter` backend: any OpenAI-compatible chat-completions endpoint (OpenRouter's by
//! default). One request per stage call, with `response_format: json_schema` carrying the
//! stage's schema, the `HTTP-Referer` and `X-OpenRouter-Title` attribution headers, and the
//! usage (tokens) read back. The API key is sent only in the `Authorization` header and never
//! appears in an error or a log line.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::AgentError;
use super::llm::{LlmReply, LlmRequest, ToolCall, Transport, Usage, strict_json};
use crate::config::Secret;

/// Largest answer read (a structured stage answer is a few KB).
const MAX_BODY: usize = 1 << 20;
/// Attribution shown on OpenRouter's dashboards.
const REFERER: &str = "https://github.com/tradestream/autonomous-runner";
const TITLE: &str = "autonomous-runner";

/// The transport.
pub struct OpenRouter {
    http: reqwest::Client,
    url: String,
    api_key: Secret,
}

impl std::fmt::Debug for OpenRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenRouter")
            .field("url", &self.url)
            .field("api_key", &self.api_key)
            .finish()
    }
}

impl OpenRouter {
    /// A client of `{base_url}/chat/completions`.
    pub fn new(base_url: &str, api_key: Secret) -> Result<Self, AgentError> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("autonomous-runner/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| AgentError::Transport(e.to_string()))?;
        Ok(Self {
            http,
            url: format!("{}/chat/completions", base_url.trim_end_matches('/')),
            api_key,
        })
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
        .to_std()
        .ok()
        .or(Some(Duration::ZERO))
}

/// The provider's own message from an error body, shortened; never the request.
fn error_message(body: &Value) -> String {
    let m = body["error"]["message"]
        .as_str()
        .or_else(|| body["message"].as_str())
        .unwrap_or("no message");
    // Some providers echo the request's Authorization header back in their error.
    crate::telemetry::redact(m).chars().take(200).collect()
}

/// Classifies an error status (from the HTTP status, or from an error object in a 200 body).
fn classify(status: u16, body: &Value, retry_after_header: Option<Duration>) -> AgentError {
    match status {
        429 => AgentError::RateLimited {
            retry_after: retry_after_header.or_else(|| {
                body["error"]["metadata"]["retry_after_seconds"]
                    .as_f64()
                    .and_then(|s| Duration::try_from_secs_f64(s).ok())
            }),
        },
        408 | 500..=599 => AgentError::Upstream { status },
        _ => AgentError::Refused {
            status,
            message: error_message(body),
        },
    }
}

/// Reads a chat-completions answer body into the stage's JSON and the usage.
/// `offered_tools`: the request carried function definitions, so a tool call is a step of
/// the conversation rather than a wrong answer.
pub fn parse_completion(body: &[u8], offered_tools: bool) -> Result<LlmReply, AgentError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(AgentError::InvalidOutput("empty answer body".into()));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| AgentError::InvalidOutput(format!("answer body is not JSON: {e}")))?;
    if v.get("error").is_some_and(|e| !e.is_null()) {
        // Errors after generation started arrive inside a 200.
        let code = v["error"]["code"]
            .as_u64()
            .and_then(|c| u16::try_from(c).ok())
            .unwrap_or(502);
        return Err(classify(code, &v, None));
    }
    let msg = &v["choices"][0]["message"];
    let usage = Usage {
        input: v["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
        output: v["usage"]["completion_tokens"].as_u64().unwrap_or(0),
    };
    if offered_tools && msg["tool_calls"].as_array().is_some_and(|c| !c.is_empty()) {
        return tool_calls(msg, usage);
    }
    let content = match &msg["content"] {
        Value::String(s) => s.as_str(),
        Value::Null if msg["tool_calls"].is_array() => {
            return Err(AgentError::InvalidOutput(
                "answered with a tool call instead of JSON content".into(),
            ));
        }
        _ => {
            return Err(AgentError::InvalidOutput(
                "answer has no choices[0].message.content".into(),
            ));
        }
    };
    let json = strict_json(content)?;
    Ok(LlmReply::answer(json, usage))
}

/// Most tool calls one answer may carry: a model asking for more is not gathering data.
const MAX_TOOL_CALLS: usize = 16;

/// Reads the tool calls of an assistant message.
fn tool_calls(msg: &Value, usage: Usage) -> Result<LlmReply, AgentError> {
    let calls = msg["tool_calls"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if calls.len() > MAX_TOOL_CALLS {
        return Err(AgentError::InvalidOutput(format!(
            "asked for {} tool calls at once; at most {MAX_TOOL_CALLS}",
            calls.len()
        )));
    }
    let mut out = Vec::with_capacity(calls.len());
    for (i, c) in calls.iter().enumerate() {
        let field = |f: &str| -> Result<String, AgentError> {
            let v = if f == "id" {
                &c["id"]
            } else {
                &c["function"][f]
            };
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| AgentError::InvalidOutput(format!("tool_calls[{i}] has no {f}")))
        };
        out.push(ToolCall {
            id: field("id")?,
            name: field("name")?,
            arguments: field("arguments")?,
        });
    }
    // Sent back as the model wrote it, tool calls only (some providers refuse extra fields).
    let assistant = json!({"role": "assistant", "content": msg["content"], "tool_calls": calls});
    Ok(LlmReply {
        json: Value::Null,
        usage,
        tool_calls: out,
        assistant,
    })
}

#[async_trait]
impl Transport for OpenRouter {
    fn backend(&self) -> &'static str {
        "openrouter"
    }

    async fn call(&self, req: &LlmRequest<'_>, deadline: Instant) -> Result<LlmReply, AgentError> {
        let mut messages = vec![
            json!({"role": "system", "content": req.system}),
            json!({"role": "user", "content": req.user}),
        ];
        messages.extend(req.conversation.iter().cloned());
        let mut body = json!({
            "model": req.model,
            "messages": messages,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": req.schema_name, "strict": true, "schema": req.schema},
            },
            "temperature": 0,
            "max_tokens": req.max_tokens,
        });
        if !req.tools.is_empty() {
            body["tools"] = json!(req.tools);
            body["tool_choice"] = json!("auto");
        }
        let timeout = deadline.saturating_duration_since(Instant::now());
        let mut rb = self
            .http
            .post(&self.url)
            .timeout(timeout)
            .header("HTTP-Referer", REFERER)
            .header("X-OpenRouter-Title", TITLE)
            .header("X-Title", TITLE)
            .json(&body);
        if !self.api_key.is_empty() {
            rb = rb.bearer_auth(self.api_key.expose());
        }
        let mut resp = rb.send().await.map_err(|e| {
            if e.is_timeout() {
                AgentError::Timeout
            } else {
                AgentError::Transport(e.without_url().to_string())
            }
        })?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let mut buf = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    if buf.len() + c.len() > MAX_BODY {
                        return Err(AgentError::InvalidOutput(format!(
                            "answer larger than {MAX_BODY} bytes"
                        )));
                    }
                    buf.extend_from_slice(&c);
                }
                Ok(None) => break,
                Err(e) if e.is_timeout() => return Err(AgentError::Timeout),
                Err(e) => return Err(AgentError::Transport(e.without_url().to_string())),
            }
        }
        if !(200..300).contains(&status) {
            let v: Value = serde_json::from_slice(&buf).unwrap_or(Value::Null);
            return Err(classify(status, &v, retry_after));
        }
        parse_completion(&buf, !req.tools.is_empty())
    }

    fn takes_tools(&self) -> bool {
        true
    }

    async fn health(&self) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        let in_3s = (chrono::Utc::now() + chrono::Duration::seconds(3)).to_rfc2822();
        let d = parse_retry_after(&in_3s).expect("date");
        assert!(
            d <= Duration::from_secs(3) && d >= Duration::from_secs(1),
            "{d:?}"
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn error_classes() {
        assert!(
            matches!(classify(429, &json!({"error":{"metadata":{"retry_after_seconds": 3}}}), None), AgentError::RateLimited { retry_after: Some(d) } if d == Duration::from_secs(3))
        );
        assert!(matches!(
            classify(503, &Value::Null, None),
            AgentError::Upstream { status: 503 }
        ));
        assert!(
            matches!(classify(401, &json!({"error":{"message":"bad key"}}), None), AgentError::Refused { status: 401, ref message } if message == "bad key")
        );
        // An error inside a 200 body.
        let e = parse_completion(
            br#"{"error":{"code":502,"message":"provider down"}}"#,
            false,
        )
        .expect_err("error");
        assert!(matches!(e, AgentError::Upstream { status: 502 }));
    }

    #[test]
    fn completion_parsing() {
        let ok = br#"{"choices":[{"message":{"content":"{\"summary\":\"x\"}"}}],"usage":{"prompt_tokens":12,"completion_tokens":3}}"#;
        let r = parse_completion(ok, false).expect("ok");
        assert_eq!(r.json["summary"], "x");
        assert_eq!(
            r.usage,
            Usage {
                input: 12,
                output: 3
            }
        );
        for bad in [
            &b""[..],
            b"   ",
            b"<html>",
            br#"{"choices":[]}"#,
            br#"{"choices":[{"message":{"content":"Sure! {\"a\":1}"}}]}"#,
        ] {
            assert!(
                matches!(
                    parse_completion(bad, false),
                    Err(AgentError::InvalidOutput(_))
                ),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
