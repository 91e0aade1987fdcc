//! What crosses between the runner and a model: the request, the reply, the tool calls a
//! model may make, the [`Transport`] that moves them, the token estimate a request is
//! reserved at, and the strict reading of a model's text as one JSON object.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::time::Instant;

use crate::agents::AgentError;
use crate::config::StructuredOutput;
use crate::model::Stage;
use crate::schedule::CycleId;

/// Token counts of one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub input: u64,
    /// Completion tokens.
    pub output: u64,
}

/// One structured request to a model.
#[derive(Debug, Clone)]
pub struct LlmRequest<'a> {
    /// Which stage.
    pub stage: Stage,
    /// The symbol (sessions are titled with it).
    pub symbol: &'a str,
    /// The tick.
    pub cycle_id: CycleId,
    /// System prompt.
    pub system: &'static str,
    /// User prompt.
    pub user: String,
    /// Schema name (`signal`, `advice`, `report`).
    pub schema_name: &'static str,
    /// The JSON schema the answer must follow.
    pub schema: &'static Value,
    /// Model to use.
    pub model: &'a str,
    /// Completion tokens allowed.
    pub max_tokens: u32,
    /// Function definitions the model may call (`agents.tools: mcp`); empty: none.
    pub tools: &'a [Value],
    /// The tool rounds so far: each round's assistant message and the tool results, in
    /// order, sent after the system and user messages.
    pub conversation: Vec<Value>,
    /// How the endpoint is asked for JSON (the OpenAI-compatible transport reads it).
    pub structured: StructuredOutput,
}

/// A model's structured answer.
#[derive(Debug, Clone)]
pub struct LlmReply {
    /// The parsed JSON (not yet checked against the schema); `Null` when the model asked for
    /// tools instead.
    pub json: Value,
    /// Tokens used.
    pub usage: Usage,
    /// Tool calls the model asked for (only when it was offered tools).
    pub tool_calls: Vec<ToolCall>,
    /// The assistant message that asked for them, to send back with their results.
    pub assistant: Value,
}

impl LlmReply {
    /// A plain answer.
    pub fn answer(json: Value, usage: Usage) -> Self {
        LlmReply {
            json,
            usage,
            tool_calls: vec![],
            assistant: Value::Null,
        }
    }
}

/// One function call a model asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The provider's id of the call (echoed with its result).
    pub id: String,
    /// The tool's name.
    pub name: String,
    /// Its arguments, as the model wrote them (JSON text, possibly invalid).
    pub arguments: String,
}

/// Tools a model may call, run in process (`agents.tools: mcp`): the same tools the MCP
/// server offers, implemented above this layer and handed in.
#[async_trait]
pub trait ToolRunner: Send + Sync {
    /// OpenAI-style function definitions of every tool, made once, in the short form a model
    /// is offered: `[{"type": "function", "function": {"name", "description", "parameters"}}]`.
    /// Each stage's agent offers the subset it is configured with.
    fn functions(&self) -> &[Value];
    /// Runs one call. `Err` carries the coded error body the model is shown.
    async fn run(&self, name: &str, arguments: &Value) -> Result<Value, Value>;
}

/// Moves one request to a model and back. Implementations classify failures into
/// [`AgentError`]; they never retry (the caller does, within its deadline).
#[async_trait]
pub trait Transport: Send + Sync {
    /// Backend name (`openrouter`, `opencode`).
    fn backend(&self) -> &'static str;
    /// One call.
    async fn call(&self, req: &LlmRequest<'_>, deadline: Instant) -> Result<LlmReply, AgentError>;
    /// Readiness of the backend itself (`Ok` when it answers).
    async fn health(&self) -> Result<(), String>;
    /// Waits (up to `timeout`) for background work such as session clean-ups (shutdown).
    async fn drain(&self, _timeout: Duration) {}
    /// Whether requests may carry function definitions for in-process tools (OpenCode
    /// reaches the tools itself, over MCP).
    fn takes_tools(&self) -> bool {
        false
    }
}

/// An upper bound of the tokens a request can use: its prompt bytes (a byte-level BPE token
/// covers at least one byte), the schema (which providers add to the prompt), a margin for
/// the chat template, and the completion limit.
pub fn token_estimate(req: &LlmRequest<'_>) -> u64 {
    let tools: usize = req.tools.iter().map(|t| t.to_string().len()).sum();
    let conversation: usize = req.conversation.iter().map(|m| m.to_string().len()).sum();
    let prompt =
        req.system.len() + req.user.len() + req.schema.to_string().len() + tools + conversation;
    prompt as u64 + 64 + u64::from(req.max_tokens)
}

/// Parses a model's text content that must be exactly one JSON object (whitespace around it
/// is fine; prose or code fences are not).
pub fn strict_json(content: &str) -> Result<Value, AgentError> {
    let t = content.trim();
    if !t.starts_with('{') {
        return Err(AgentError::InvalidOutput(format!(
            "answer is not a bare JSON object (starts with {:?})",
            t.chars().take(20).collect::<String>()
        )));
    }
    serde_json::from_str(t)
        .map_err(|e| AgentError::InvalidOutput(format!("answer is not valid JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::super::stage_schema;
    use super::*;

    #[test]
    fn the_estimate_bounds_the_prompt_and_the_completion() {
        let req = LlmRequest {
            stage: Stage::Report,
            symbol: "ETH/USD",
            cycle_id: crate::schedule::CycleId::new(Utc::now()),
            system: "sys",
            user: "é".repeat(100),
            schema_name: "report",
            schema: stage_schema(Stage::Report),
            model: "m",
            max_tokens: 512,
            tools: &[],
            conversation: vec![],
            structured: StructuredOutput::Auto,
        };
        let schema_len = stage_schema(Stage::Report).to_string().len() as u64;
        // 3 + 200 bytes of prompt (é is two bytes), the schema, 64 of template, 512 completion.
        assert_eq!(token_estimate(&req), 3 + 200 + schema_len + 64 + 512);
    }

    #[test]
    fn strict_json_rejects_prose_and_fences() {
        assert!(strict_json(" {\"a\":1}\n").is_ok());
        assert!(strict_json("Here you go: {\"a\":1}").is_err());
        assert!(strict_json("```json\n{\"a\":1}\n```").is_err());
        assert!(strict_json("{\"a\":1} and more").is_err());
        assert!(strict_json("").is_err());
    }
}
