//! A real HTTP server speaking the OpenAI chat-completions API, scriptable per test: latency,
//! status codes, `Retry-After`, malformed bodies, and tool-call answers to `StructuredOutput`
//! requests as OpenCode sends them (streamed or not). It records every request it receives.
//!
//! By default it answers every structured request with a valid answer for the stage it
//! recognises from the schema (signal / advice / report) and the symbol named in the prompt.
//!
//! [`Quirks`] teach it what real local servers do that OpenAI does not, as seen with
//! llama.cpp's Python server (`llama-cpp-python[server]`): `response_format: json_schema`
//! refused with a 500 (it takes `{type: json_object, schema}`), an assistant message with
//! `content: null` beside its tool calls refused with a 500, one request served at a time.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// One scripted reaction.
#[derive(Debug, Clone)]
pub enum Reply {
    /// The default valid answer.
    Valid,
    /// A valid answer after a delay (the makespan benchmark's scripted latency).
    #[allow(dead_code)]
    Slow(Duration),
    /// An HTTP status with a JSON error body and optional `Retry-After`.
    Status(u16, Option<String>),
    /// An HTTP status with exactly this body (a server that says why it failed).
    #[allow(dead_code)]
    StatusBody(u16, String),
    /// The valid answer cut off halfway, `finish_reason: length` (a model at `max_tokens`).
    #[allow(dead_code)]
    Truncated,
    /// This exact JSON as the structured answer (content or tool-call arguments).
    Answer(Value),
    /// This raw text as the model's content (for prose, fences, broken JSON).
    Content(String),
    /// This raw HTTP body with status 200.
    RawBody(String),
    /// Never answers (until the client gives up).
    Hang,
    /// Asks for these tool calls `(name, arguments)` until the conversation holds `rounds`
    /// rounds of them, then gives the valid answer (a model gathering data first);
    /// `usize::MAX` rounds is a model that never stops asking.
    CallTools {
        calls: Vec<(String, Value)>,
        rounds: usize,
    },
    /// 401 whose error message echoes the request's Authorization header (some providers do).
    #[allow(dead_code)]
    EchoAuth401,
}

/// A received request.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: tokio::time::Instant,
    pub headers: HeaderMap,
    pub body: Value,
    pub stage: String,
    pub symbol: String,
}

/// How the default valid answer is delayed and disturbed: a real model's latency.
#[derive(Debug, Clone, Copy)]
pub struct LatencyModel {
    /// Median of the lognormal answer time.
    pub median: Duration,
    /// Its 95th percentile.
    pub p95: Duration,
    /// Share of requests answered 503 at once.
    pub error_rate: f64,
    /// Share of requests that stall this long before answering.
    pub stall_rate: f64,
    /// How long a stall lasts.
    pub stall: Duration,
}

impl LatencyModel {
    /// A lognormal with this median and p95, nothing else.
    pub fn lognormal(median: Duration, p95: Duration) -> Self {
        LatencyModel {
            median,
            p95,
            error_rate: 0.0,
            stall_rate: 0.0,
            stall: Duration::ZERO,
        }
    }

    /// What one request gets: `Err(())` for a 503, else the delay before the answer.
    fn draw(&self) -> Result<Duration, ()> {
        use rand::Rng;
        use rand_distr::Distribution;
        let mut rng = rand::rng();
        let u: f64 = rng.random();
        if u < self.error_rate {
            return Err(());
        }
        if u < self.error_rate + self.stall_rate {
            return Ok(self.stall);
        }
        let mu = self.median.as_secs_f64().max(1e-6).ln();
        // p95 = median · e^(1.645 σ)
        let sigma =
            ((self.p95.as_secs_f64() / self.median.as_secs_f64().max(1e-6)).ln() / 1.645).max(1e-6);
        let d = rand_distr::LogNormal::new(mu, sigma)
            .map(|ln| ln.sample(&mut rng))
            .unwrap_or(self.median.as_secs_f64());
        Ok(Duration::from_secs_f64(d.min(3600.0)))
    }
}

/// Behaviours of real OpenAI-compatible servers that differ from OpenAI's.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quirks {
    /// `response_format.type: json_schema` → HTTP 500 naming the field (llama-cpp-python).
    pub refuse_json_schema: bool,
    /// An assistant message whose `content` is null → HTTP 500 (llama-cpp-python).
    pub refuse_null_content: bool,
    /// One request at a time: the others queue for it (one model, one context).
    pub one_at_a_time: bool,
}

impl Quirks {
    /// All of llama-cpp-python's.
    #[allow(dead_code)]
    pub fn llama_cpp() -> Self {
        Quirks {
            refuse_json_schema: true,
            refuse_null_content: true,
            one_at_a_time: true,
        }
    }
}

#[derive(Default)]
struct Script {
    /// Per `symbol|stage` (or per symbol): the reply for every request.
    always: HashMap<String, Reply>,
    /// For every request not otherwise scripted.
    default: Option<Reply>,
    /// Global queue, used before anything else.
    next: VecDeque<Reply>,
    /// Per `symbol|stage` queues, used before `always`.
    next_for: HashMap<String, VecDeque<Reply>>,
    usage: (u64, u64),
    received: Vec<Received>,
    /// Delays (and disturbs) every default valid answer.
    latency: Option<LatencyModel>,
    /// Answers with these strategy counts instead of the right ones (a model that miscounts).
    miscount: bool,
    quirks: Quirks,
}

#[derive(Clone)]
pub struct LlmServer {
    pub url: String,
    script: Arc<Mutex<Script>>,
}

/// The handler's shared state: the script, and the one-at-a-time gate.
#[derive(Clone)]
struct Shared {
    script: Arc<Mutex<Script>>,
    serial: Arc<tokio::sync::Semaphore>,
}

impl LlmServer {
    pub async fn start() -> LlmServer {
        let script = Arc::new(Mutex::new(Script {
            usage: (100, 20),
            ..Default::default()
        }));
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(completions))
            .route("/chat/completions", post(completions))
            .with_state(Shared {
                script: script.clone(),
                serial: Arc::new(tokio::sync::Semaphore::new(1)),
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        LlmServer {
            url: format!("http://{addr}/v1"),
            script,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Script) -> R) -> R {
        f(&mut self.script.lock().unwrap())
    }

    /// Every request of `stage` (`signal`, `advice`, `report`) for `symbol` gets `r`.
    pub fn always_for(&self, symbol: &str, stage: &str, r: Reply) {
        self.with(|s| s.always.insert(format!("{symbol}|{stage}"), r));
    }

    /// The next requests of `stage` for `symbol` get these, in order (then the usual).
    #[allow(dead_code)]
    pub fn next_for(&self, symbol: &str, stage: &str, rs: Vec<Reply>) {
        self.with(|s| {
            s.next_for
                .entry(format!("{symbol}|{stage}"))
                .or_default()
                .extend(rs)
        });
    }

    /// The next requests (any symbol) get these, in order.
    pub fn next(&self, rs: Vec<Reply>) {
        self.with(|s| s.next.extend(rs));
    }

    /// Every request not scripted otherwise gets `r` (None: the valid answer).
    pub fn set_default(&self, r: Option<Reply>) {
        self.with(|s| s.default = r);
    }

    /// Tokens reported per answer (prompt, completion).
    pub fn set_usage(&self, prompt: u64, completion: u64) {
        self.with(|s| s.usage = (prompt, completion));
    }

    /// Every default valid answer is delayed by `m` (None: at once).
    #[allow(dead_code)]
    pub fn set_latency(&self, m: Option<LatencyModel>) {
        self.with(|s| s.latency = m);
    }

    /// Imitate these quirks of real servers from now on.
    #[allow(dead_code)]
    pub fn set_quirks(&self, q: Quirks) {
        self.with(|s| s.quirks = q);
    }

    /// Valid signal answers carry strategy counts that disagree with their breakdown.
    #[allow(dead_code)]
    pub fn set_miscount(&self, on: bool) {
        self.with(|s| s.miscount = on);
    }

    pub fn received(&self) -> Vec<Received> {
        self.with(|s| s.received.clone())
    }
}

/// Which stage a request is for, from its schema (response_format as json_schema or as
/// llama.cpp's json_object, or the StructuredOutput tool).
fn schema_of(body: &Value) -> Option<&Value> {
    if let Some(s) = body.pointer("/response_format/json_schema/schema") {
        return Some(s);
    }
    if let Some(s) = body.pointer("/response_format/schema") {
        return Some(s);
    }
    body["tools"]
        .as_array()?
        .iter()
        .find(|t| t["function"]["name"] == "StructuredOutput")
        .map(|t| &t["function"]["parameters"])
}

fn stage_of(schema: Option<&Value>, body: &Value) -> &'static str {
    match schema {
        Some(s) if s["properties"].get("action").is_some() => "signal",
        Some(s) if s["properties"].get("max_position_size").is_some() => "advice",
        Some(s) if s["properties"].get("summary").is_some() => "report",
        // No format at all (`structured_output: prompt`): the system prompt says who asks.
        _ => {
            let system = text_of(&body["messages"][0]["content"]);
            if system.starts_with("You are signal-generator") {
                "signal"
            } else if system.starts_with("You are portfolio-advisor") {
                "advice"
            } else if system.starts_with("You are report-generator") {
                "report"
            } else {
                "other"
            }
        }
    }
}

/// The 500 llama-cpp-python answers for a field it cannot take (its error handler wraps the
/// request model's validation error).
fn llama_cpp_500(message: &str) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        axum::Json(
            json!({"error": {"message": message, "type": "internal_server_error", "param": null, "code": null}}),
        ),
    )
        .into_response()
}

/// A message's text: its content string, or its text parts joined.
fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(" "),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The symbol named in the last user message (`Symbol: ETH/USD`).
fn symbol_of(body: &Value) -> String {
    let text: String = body["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter(|m| m["role"] == "user")
                .map(|m| text_of(&m["content"]))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default();
    text.split("Symbol: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("")
        .to_string()
}

pub fn valid_answer(stage: &str, symbol: &str) -> Value {
    match stage {
        // Only the judgment: the runner fills the rest.
        "signal" => json!({
            "action": "BUY", "confidence": 0.9,
            "reasoning": format!("{symbol}: momentum and trend agree."),
            "strategies": ["ema_trend", "momentum"]
        }),
        "advice" => {
            json!({"valid": true, "max_position_size": 0.05, "risk_warnings": ["Test warning."]})
        }
        "report" => {
            json!({"summary": format!("{symbol} BUY with high confidence. Trend and momentum agree.")})
        }
        _ => json!({}),
    }
}

/// Tool-call rounds already in a request's conversation (assistant messages with tool calls,
/// other than the final StructuredOutput).
fn tool_rounds(body: &Value) -> usize {
    body["messages"].as_array().map_or(0, |m| {
        m.iter()
            .filter(|m| {
                m["role"] == "assistant"
                    && m["tool_calls"].as_array().is_some_and(|c| {
                        !c.is_empty()
                            && c.iter()
                                .all(|c| c["function"]["name"] != "StructuredOutput")
                    })
            })
            .count()
    })
}

/// The text of the last tool result in a request's conversation.
fn last_tool_result(body: &Value) -> Option<String> {
    let m = body["messages"]
        .as_array()?
        .iter()
        .rev()
        .find(|m| m["role"] == "tool")?;
    Some(text_of(&m["content"]))
}

/// An answer asking for `calls`, as a whole completion or streamed.
fn tool_calls_answer(calls: &[(String, Value)], stream: bool, usage: (u64, u64)) -> Response {
    let listed: Vec<Value> = calls
        .iter()
        .enumerate()
        .map(|(i, (name, args))| {
            json!({"index": i, "id": format!("call_t{i}"), "type": "function",
                   "function": {"name": name, "arguments": args.to_string()}})
        })
        .collect();
    let message = json!({"role": "assistant", "content": null, "tool_calls": listed});
    let usage_json = json!({"prompt_tokens": usage.0, "completion_tokens": usage.1, "total_tokens": usage.0 + usage.1});
    if !stream {
        return axum::Json(json!({
            "id": "chatcmpl-test", "object": "chat.completion", "created": 1, "model": "test-model",
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
            "usage": usage_json,
        }))
        .into_response();
    }
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1, "model": "test-model",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let events = [
        chunk(
            json!({"role": "assistant", "tool_calls": listed}),
            Value::Null,
        ),
        chunk(json!({}), json!("tool_calls")),
        json!({"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1, "model": "test-model", "choices": [], "usage": usage_json}),
    ];
    sse_response(&events)
}

fn chat_completion(content: Option<&str>, tool_args: Option<&str>, usage: (u64, u64)) -> Value {
    let message = match tool_args {
        Some(args) => json!({"role": "assistant", "content": null, "tool_calls": [{
            "id": "call_1", "type": "function", "function": {"name": "StructuredOutput", "arguments": args}
        }]}),
        None => json!({"role": "assistant", "content": content.unwrap_or("")}),
    };
    json!({
        "id": "chatcmpl-test", "object": "chat.completion", "created": 1, "model": "test-model",
        "choices": [{"index": 0, "message": message, "finish_reason": if tool_args.is_some() { "tool_calls" } else { "stop" }}],
        "usage": {"prompt_tokens": usage.0, "completion_tokens": usage.1, "total_tokens": usage.0 + usage.1}
    })
}

/// Chunks as a chat-completions stream: one `data:` event each, then `[DONE]`.
fn sse_response(events: &[Value]) -> Response {
    let mut body = String::new();
    for e in events {
        body.push_str(&format!("data: {e}\n\n"));
    }
    body.push_str("data: [DONE]\n\n");
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .body(Body::from(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The same answer as server-sent chunks (OpenCode streams).
fn streamed(content: Option<&str>, tool_args: Option<&str>, usage: (u64, u64)) -> Response {
    let mut events = vec![];
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1, "model": "test-model",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    match tool_args {
        Some(args) => {
            events.push(chunk(json!({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "StructuredOutput", "arguments": ""}}]}), Value::Null));
            events.push(chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": args}}]}),
                Value::Null,
            ));
            events.push(chunk(json!({}), json!("tool_calls")));
        }
        None => {
            events.push(chunk(
                json!({"role": "assistant", "content": content.unwrap_or("")}),
                Value::Null,
            ));
            events.push(chunk(json!({}), json!("stop")));
        }
    }
    events.push(json!({"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1, "model": "test-model", "choices": [],
                       "usage": {"prompt_tokens": usage.0, "completion_tokens": usage.1, "total_tokens": usage.0 + usage.1}}));
    sse_response(&events)
}

async fn completions(
    State(shared): State<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !shared.script.lock().unwrap().quirks.one_at_a_time {
        return handle(shared, headers, body, None).await;
    }
    // One at a time, as llama.cpp's servers serve: a queued request waits for its turn, its
    // client's deadline running, and a request its client gave up on is still worked on to
    // the end (the task outlives the connection), so the ones behind it wait for that too.
    let task = tokio::spawn(async move {
        let turn = shared.serial.clone().acquire_owned().await.ok();
        handle(shared, headers, body, turn).await
    });
    task.await
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Answers one request; `_turn` is its place at a one-at-a-time server, held to the end.
async fn handle(
    shared: Shared,
    headers: HeaderMap,
    body: axum::body::Bytes,
    _turn: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Response {
    let script = shared.script.clone();
    let quirks = script.lock().unwrap().quirks;
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let schema = schema_of(&body);
    let stage = stage_of(schema, &body).to_string();
    let symbol = symbol_of(&body);
    let tool_mode = body["tools"].as_array().is_some_and(|t| {
        t.iter()
            .any(|t| t["function"]["name"] == "StructuredOutput")
    });
    let stream = body["stream"] == true;
    let refusal = if quirks.refuse_json_schema && body["response_format"]["type"] == "json_schema" {
        Some(
            // As llama-cpp-python 0.3.36 words it (its route handler's wrapped validation error).
            "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), 'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema', 'ctx': {'expected': \"'text' or 'json_object'\"}}",
        )
    } else if quirks.refuse_null_content
        && body["messages"].as_array().is_some_and(|m| {
            m.iter()
                .any(|m| m["role"] == "assistant" && m["content"].is_null())
        })
    {
        Some(
            "7 validation errors:\n  {'type': 'string_type', 'loc': ('body', 'messages', 2, 'ChatCompletionRequestAssistantMessage', 'content'), 'msg': 'Input should be a valid string', 'input': None}",
        )
    } else {
        None
    };
    let (reply, usage, latency, miscount) = {
        let mut s = script.lock().unwrap();
        s.received.push(Received {
            at: tokio::time::Instant::now(),
            headers: headers.clone(),
            body: body.clone(),
            stage: stage.clone(),
            symbol: symbol.clone(),
        });
        if let Some(why) = refusal {
            drop(s);
            return llama_cpp_500(why);
        }
        let key = format!("{symbol}|{stage}");
        let r = s
            .next
            .pop_front()
            .or_else(|| s.next_for.get_mut(&key).and_then(VecDeque::pop_front))
            .or_else(|| s.always.get(&key).cloned())
            .or_else(|| s.always.get(&symbol).cloned())
            .or_else(|| s.default.clone())
            .unwrap_or(Reply::Valid);
        (r, s.usage, s.latency, s.miscount)
    };
    if stage == "other" {
        // A request we do not structure (e.g. a title): plain text.
        return if stream {
            streamed(Some("ok"), None, usage)
        } else {
            axum::Json(chat_completion(Some("ok"), None, usage)).into_response()
        };
    }
    // The model's text, as content or as StructuredOutput tool-call arguments, streamed or not.
    let respond = |text: &str| match (tool_mode, stream) {
        (true, true) => streamed(None, Some(text), usage),
        (true, false) => axum::Json(chat_completion(None, Some(text), usage)).into_response(),
        (false, true) => streamed(Some(text), None, usage),
        (false, false) => axum::Json(chat_completion(Some(text), None, usage)).into_response(),
    };
    let answer = |v: &Value| respond(&v.to_string());
    let valid = || {
        let mut v = valid_answer(&stage, &symbol);
        if miscount && stage == "signal" {
            v["strategies_analyzed"] = json!(0);
            v["strategies_bullish"] = json!(5);
        }
        v
    };
    match reply {
        Reply::Valid => {
            if let Some(m) = latency {
                match m.draw() {
                    Ok(d) => tokio::time::sleep(d).await,
                    Err(()) => {
                        return (
                            StatusCode::SERVICE_UNAVAILABLE,
                            axum::Json(
                                json!({"error": {"code": 503, "message": "scripted overload"}}),
                            ),
                        )
                            .into_response();
                    }
                }
            }
            answer(&valid())
        }
        Reply::Slow(d) => {
            tokio::time::sleep(d).await;
            answer(&valid_answer(&stage, &symbol))
        }
        Reply::Status(code, retry_after) => {
            let mut b = Response::builder()
                .status(code)
                .header("content-type", "application/json");
            if let Some(ra) = retry_after {
                b = b.header("retry-after", ra);
            }
            b.body(Body::from(
                json!({"error": {"code": code, "message": format!("scripted {code}")}}).to_string(),
            ))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
        Reply::StatusBody(code, text) => Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(text))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()),
        Reply::Truncated => {
            let full = valid().to_string();
            let half: String = full.chars().take(full.chars().count() / 2).collect();
            let mut v = chat_completion(Some(&half), None, usage);
            v["choices"][0]["finish_reason"] = json!("length");
            axum::Json(v).into_response()
        }
        Reply::Answer(v) => answer(&v),
        Reply::Content(text) => respond(&text),
        Reply::RawBody(raw) => Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Body::from(raw))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()),
        Reply::EchoAuth401 => {
            let auth = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            (
                StatusCode::UNAUTHORIZED,
                axum::Json(json!({"error": {"code": 401, "message": format!("Invalid credentials in header '{auth}'")}})),
            )
                .into_response()
        }
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        Reply::CallTools { calls, rounds } => {
            if tool_rounds(&body) < rounds {
                tool_calls_answer(&calls, stream, usage)
            } else {
                // A model that read its tools' answers says what it saw.
                let mut v = valid();
                if let Some(data) = last_tool_result(&body) {
                    let said: String = data.chars().take(1500).collect();
                    v["reasoning"] = json!(format!("{symbol}: the tools said {said}"));
                }
                answer(&v)
            }
        }
    }
}
