//! The `openrouter` backend: any OpenAI-compatible chat-completions endpoint (OpenRouter's by
//! default). One request per stage call, with the stage's schema as the endpoint takes it
//! (`agents.structured_output`: `json_schema`, llama.cpp's `json_object` with a schema, or
//! the prompt alone — `auto` steps down once when the endpoint refuses a format and
//! remembers it), the `HTTP-Referer` and `X-OpenRouter-Title` attribution headers, and the
//! usage (tokens) read back. The API key is sent only in the `Authorization` header and never
//! appears in an error or a log line.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::AgentError;
use super::llm::{LlmReply, LlmRequest, ToolCall, Transport, Usage, strict_json};
use crate::config::{Secret, StructuredOutput};

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
    /// Where `auto` stands for this endpoint: the index in [`AUTO_STEPS`] of the first format
    /// it has not refused.
    auto_step: AtomicU8,
}

/// The formats `auto` tries, in order.
const AUTO_STEPS: [StructuredOutput; 3] = [
    StructuredOutput::JsonSchema,
    StructuredOutput::JsonObject,
    StructuredOutput::Prompt,
];

fn format_name(f: StructuredOutput) -> &'static str {
    match f {
        StructuredOutput::Auto => "auto",
        StructuredOutput::JsonSchema => "json_schema",
        StructuredOutput::JsonObject => "json_object",
        StructuredOutput::Prompt => "prompt",
    }
}

/// Whether `e` is the endpoint refusing the `response_format` it was sent (as opposed to a
/// failure of the model or the server): a 400/422 or a 500/501 whose body names the field or
/// the format. llama.cpp's Python server answers a `json_schema` format with a 500 naming
/// `response_format`; vLLM and others answer 400.
fn refuses_format(e: &AgentError) -> bool {
    let text = match e {
        AgentError::Upstream {
            status: 500 | 501,
            body,
        } => body,
        AgentError::Refused {
            status: 400 | 422,
            message,
        } => message,
        _ => return false,
    };
    let t = text.to_lowercase();
    t.contains("response_format") || t.contains("json_schema") || t.contains("json schema")
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
            auto_step: AtomicU8::new(0),
        })
    }

    /// The format a request of mode `mode` is sent in now.
    fn format_for(&self, mode: StructuredOutput) -> StructuredOutput {
        match mode {
            StructuredOutput::Auto => {
                let i = usize::from(self.auto_step.load(Ordering::Relaxed));
                AUTO_STEPS[i.min(AUTO_STEPS.len() - 1)]
            }
            m => m,
        }
    }

    /// `auto` steps past `refused` for good (once, whichever call saw it first); whether
    /// there is a format left to try.
    fn step_down(&self, refused: StructuredOutput, why: &AgentError) -> bool {
        let Some(i) = AUTO_STEPS.iter().position(|f| *f == refused) else {
            return false;
        };
        if i + 1 >= AUTO_STEPS.len() {
            return false;
        }
        let (from, to) = (i as u8, i as u8 + 1);
        if self
            .auto_step
            .compare_exchange(from, to, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::warn!(
                endpoint = %super::endpoint_of(&self.url),
                refused = format_name(refused),
                now_using = format_name(AUTO_STEPS[usize::from(to)]),
                error = %why,
                "the endpoint refused this structured-output format; using the next one from now on (agents.structured_output: auto)"
            );
        }
        true
    }

    /// The request body for `req` with its JSON asked for as `format`.
    fn body(req: &LlmRequest<'_>, format: StructuredOutput) -> Value {
        let mut messages = vec![
            json!({"role": "system", "content": req.system}),
            json!({"role": "user", "content": req.user}),
        ];
        messages.extend(req.conversation.iter().cloned());
        let mut body = json!({
            "model": req.model,
            "messages": messages,
            "temperature": 0,
            "max_tokens": req.max_tokens,
        });
        match format {
            StructuredOutput::JsonSchema | StructuredOutput::Auto => {
                body["response_format"] = json!({
                    "type": "json_schema",
                    "json_schema": {"name": req.schema_name, "strict": true, "schema": req.schema},
                });
            }
            StructuredOutput::JsonObject => {
                body["response_format"] = json!({"type": "json_object", "schema": req.schema});
            }
            StructuredOutput::Prompt => {}
        }
        if !req.tools.is_empty() {
            body["tools"] = json!(req.tools);
            body["tool_choice"] = json!("auto");
        }
        body
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

/// Classifies an error status (from the HTTP status, or from an error object in a 200 body);
/// `raw` is the body as it came, for the excerpt the error keeps.
fn classify(status: u16, raw: &[u8], retry_after_header: Option<Duration>) -> AgentError {
    let body: Value = serde_json::from_slice(raw).unwrap_or(Value::Null);
    match status {
        429 => AgentError::RateLimited {
            retry_after: retry_after_header.or_else(|| {
                body["error"]["metadata"]["retry_after_seconds"]
                    .as_f64()
                    .and_then(|s| Duration::try_from_secs_f64(s).ok())
            }),
        },
        408 | 500..=599 => AgentError::Upstream {
            status,
            body: super::body_excerpt(raw),
        },
        _ => AgentError::Refused {
            status,
            // Some providers echo the request's Authorization header back in their error:
            // the excerpt is redacted.
            message: match super::body_excerpt(raw) {
                m if m.is_empty() => "no message".into(),
                m => m,
            },
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
        return Err(classify(code, body, None));
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
    match strict_json(content) {
        Ok(json) => Ok(LlmReply::answer(json, usage)),
        // A model stopped by `max_tokens` mid-object wrote no bad JSON: it ran out of room.
        Err(_) if v["choices"][0]["finish_reason"] == "length" => {
            Err(AgentError::InvalidOutput(format!(
                "truncated: the answer hit the completion limit after {} tokens before its JSON was complete (agents.max_tokens)",
                usage.output
            )))
        }
        Err(e) => Err(e),
    }
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
    // `content` is a string even when the model gave none: OpenAI accepts null beside tool
    // calls, llama.cpp's server refuses it with a 500.
    let content = msg["content"].as_str().unwrap_or("");
    let assistant = json!({"role": "assistant", "content": content, "tool_calls": calls});
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
        let mut format = self.format_for(req.structured);
        loop {
            match self.send(&Self::body(req, format), req, deadline).await {
                Err(e)
                    if req.structured == StructuredOutput::Auto
                        && refuses_format(&e)
                        && self.step_down(format, &e) =>
                {
                    format = self.format_for(StructuredOutput::Auto);
                }
                r => return r,
            }
        }
    }

    fn takes_tools(&self) -> bool {
        true
    }

    async fn health(&self) -> Result<(), String> {
        Ok(())
    }
}

impl OpenRouter {
    /// One exchange: the body out, the answer (or its error, classified) back.
    async fn send(
        &self,
        body: &Value,
        req: &LlmRequest<'_>,
        deadline: Instant,
    ) -> Result<LlmReply, AgentError> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        let mut rb = self
            .http
            .post(&self.url)
            .timeout(timeout)
            .header("HTTP-Referer", REFERER)
            .header("X-OpenRouter-Title", TITLE)
            .header("X-Title", TITLE)
            .json(body);
        if !self.api_key.is_empty() {
            rb = rb.bearer_auth(self.api_key.expose());
        }
        let mut resp = rb
            .send()
            .await
            .map_err(|e| super::http_error(&e, &self.url))?;
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
                Err(e) => return Err(super::http_error(&e, &self.url)),
            }
        }
        if !(200..300).contains(&status) {
            return Err(classify(status, &buf, retry_after));
        }
        parse_completion(&buf, !req.tools.is_empty())
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
            matches!(classify(429, br#"{"error":{"metadata":{"retry_after_seconds": 3}}}"#, None), AgentError::RateLimited { retry_after: Some(d) } if d == Duration::from_secs(3))
        );
        assert!(matches!(
            classify(503, b"", None),
            AgentError::Upstream { status: 503, ref body } if body.is_empty()
        ));
        assert!(
            matches!(classify(401, br#"{"error":{"message":"bad key"}}"#, None), AgentError::Refused { status: 401, ref message } if message == "bad key")
        );
        // A 500's body says why; llama.cpp's server answers so when it cannot take a field.
        let e = classify(
            500,
            br#"{"error":{"code":500,"message":"Unrecognized response_format type: json_schema","type":"server_error"}}"#,
            None,
        );
        assert_eq!(
            e.to_string(),
            "agent provider answered HTTP 500: Unrecognized response_format type: json_schema"
        );
        // A proxy's HTML page is kept as folded text.
        let e = classify(502, b"<html>\n  <h1>Bad   Gateway</h1>\n</html>", None);
        assert_eq!(
            e.to_string(),
            "agent provider answered HTTP 502: <html> <h1>Bad Gateway</h1> </html>"
        );
        // An error inside a 200 body.
        let e = parse_completion(
            br#"{"error":{"code":502,"message":"provider down"}}"#,
            false,
        )
        .expect_err("error");
        assert!(
            matches!(e, AgentError::Upstream { status: 502, ref body } if body == "provider down")
        );
    }

    #[test]
    fn a_truncated_answer_is_called_truncated() {
        let cut = br#"{"choices":[{"message":{"content":"{\"summary\": \"BTC is"},"finish_reason":"length"}],"usage":{"prompt_tokens":12,"completion_tokens":64}}"#;
        let e = parse_completion(cut, false).expect_err("cut off");
        assert!(
            e.to_string()
                .contains("truncated: the answer hit the completion limit after 64 tokens"),
            "{e}"
        );
        // The same broken JSON without `length` is a broken answer, not a truncated one.
        let bad = br#"{"choices":[{"message":{"content":"{\"summary\": \"BTC is"},"finish_reason":"stop"}]}"#;
        let e = parse_completion(bad, false).expect_err("broken");
        assert!(!e.to_string().contains("truncated"), "{e}");
    }

    #[test]
    fn tool_calls_are_sent_back_with_string_content() {
        let body = br#"{"choices":[{"message":{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"get_current_price","arguments":"{}"}}]},"finish_reason":"tool_calls"}]}"#;
        let r = parse_completion(body, true).expect("tool call");
        assert_eq!(r.tool_calls.len(), 1);
        assert_eq!(r.assistant["content"], "");
    }

    #[test]
    fn auto_steps_down_once_per_refused_format_and_stops_at_prompt() {
        let t = OpenRouter::new("http://127.0.0.1:1/v1", Secret::default()).expect("client");
        let refused = AgentError::Upstream {
            status: 500,
            body:
                "1 validation error: response_format.type Input should be 'text' or 'json_object'"
                    .into(),
        };
        assert!(refuses_format(&refused));
        assert!(!refuses_format(&AgentError::Upstream {
            status: 500,
            body: "CUDA out of memory".into()
        }));
        assert_eq!(
            t.format_for(StructuredOutput::Auto),
            StructuredOutput::JsonSchema
        );
        assert!(t.step_down(StructuredOutput::JsonSchema, &refused));
        assert_eq!(
            t.format_for(StructuredOutput::Auto),
            StructuredOutput::JsonObject
        );
        // A second call that still saw json_schema refused does not step twice.
        assert!(t.step_down(StructuredOutput::JsonSchema, &refused));
        assert_eq!(
            t.format_for(StructuredOutput::Auto),
            StructuredOutput::JsonObject
        );
        assert!(t.step_down(StructuredOutput::JsonObject, &refused));
        assert_eq!(
            t.format_for(StructuredOutput::Auto),
            StructuredOutput::Prompt
        );
        assert!(!t.step_down(StructuredOutput::Prompt, &refused));
        // An explicit mode is what it says.
        assert_eq!(
            t.format_for(StructuredOutput::JsonSchema),
            StructuredOutput::JsonSchema
        );
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
