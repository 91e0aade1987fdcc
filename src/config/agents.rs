//! `agents:` which backend runs each stage and the discipline of LLM calls — the endpoint
//! and model, the rate limit, the token budget, hedging, the fallback, structured output, the
//! tools each stage's model is offered, and the OpenCode server.

use serde::{Deserialize, Serialize};

use super::Secret;

/// Agent backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentBackend {
    /// Deterministic strategies, no LLM.
    Rules,
    /// An OpenAI-compatible chat-completions endpoint (OpenRouter by default).
    Openrouter,
    /// An `opencode serve` instance.
    Opencode,
}

/// `agents.tools:`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ToolsMode {
    /// The prompt carries a compact snapshot; no tool calls.
    #[default]
    Prompt,
    /// The model may also call the runner's tools (market data, strategies, past decisions).
    Mcp,
}

/// `agents.structured_output:` how an OpenAI-compatible endpoint is asked for JSON. Servers
/// differ: OpenAI and OpenRouter take `response_format: {type: json_schema}`, llama.cpp's
/// Python server only `{type: json_object, schema}`, some nothing at all. The schema is
/// described in the prompt in every mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StructuredOutput {
    /// `json_schema` first; when the endpoint refuses it, `json_object`, then `prompt` —
    /// each step once, logged, and remembered for that endpoint.
    #[default]
    Auto,
    /// `response_format: {type: json_schema, json_schema: {name, strict, schema}}`.
    JsonSchema,
    /// `response_format: {type: json_object, schema}` (the schema where llama.cpp reads it).
    JsonObject,
    /// No `response_format`: the prompt alone asks for the JSON.
    Prompt,
}

/// `agents:`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Agents {
    /// Backend of every stage unless a stage says otherwise.
    pub backend: AgentBackend,
    /// Agent calls per minute across the whole process.
    pub requests_per_minute: u32,
    /// Largest burst of agent calls; unset, half of `requests_per_minute` (read it with
    /// [`Agents::burst`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Chat-completions base URL.
    pub base_url: String,
    /// Model name.
    pub model: String,
    /// API key. Env `OPENROUTER_API_KEY`; never printed.
    pub api_key: Secret,
    /// Per-stage overrides.
    pub stages: Stages,
    /// While the LLM breaker is open or the budget is spent: `none` (the stage fails) or
    /// `rules` (the rules backend produces it, marked `is_degraded`).
    pub fallback: Fallback,
    /// Token budget (off by default).
    pub budget: Budget,
    /// Completion tokens allowed per call (sent as `max_tokens`; reserved in the budget).
    pub max_tokens: u32,
    /// How the OpenAI-compatible backend's models get their data: `prompt` (a snapshot in
    /// the prompt only) or `mcp` (also the runner's tools, as function calls it runs in
    /// process). OpenCode agents reach the tools through `/mcp` whatever this says.
    pub tools: ToolsMode,
    /// Tool rounds one stage call may use before the model must answer (with `tools: mcp`).
    pub max_tool_rounds: u32,
    /// How the OpenAI-compatible backend asks for JSON (`auto` finds what the endpoint takes).
    pub structured_output: StructuredOutput,
    /// Backup requests for straggling calls.
    pub hedge: Hedge,
    /// The OpenCode server and its agents.
    pub opencode: OpenCodeConfig,
}

/// `agents.hedge:` when a call runs past its stage's observed p95, one identical backup
/// request is sent (if the rate limit and the budget allow); the first valid answer wins.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Hedge {
    /// On by default.
    pub enabled: bool,
    /// Extra calls at most, as a fraction of calls (0–1). Default 0.1.
    pub max_extra_fraction: f64,
}

impl Default for Hedge {
    fn default() -> Self {
        Self {
            enabled: true,
            max_extra_fraction: 0.1,
        }
    }
}

/// Degraded-mode fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// No fallback: the stage fails.
    #[default]
    None,
    /// The rules backend.
    Rules,
}

/// `agents.budget:` (0 or absent = unlimited).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Budget {
    /// Tokens per clock hour.
    pub tokens_per_hour: Option<u64>,
    /// Tokens per UTC day.
    pub tokens_per_day: Option<u64>,
}

/// `agents.opencode:`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenCodeConfig {
    /// `opencode serve` URL.
    pub url: String,
    /// Agent names per stage.
    pub agents: OpenCodeAgentNames,
    /// Provider of the model to ask for (empty: the agent's own model).
    pub provider_id: String,
    /// Model id within the provider.
    pub model_id: String,
    /// `OPENCODE_SERVER_PASSWORD` of the server (env `OPENCODE_SERVER_PASSWORD`); never printed.
    pub password: Secret,
    /// Model requests one stage call's session may send through the runner's model gateway
    /// (`/llm/v1`) — its steps, tool rounds and OpenCode's own retries together; past it the
    /// gateway refuses, so no retry loop can run away. Default 10 (the signal agent's 8 steps
    /// and two retries).
    pub max_model_requests: u32,
}

/// `agents.opencode.agents:`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenCodeAgentNames {
    /// Signal stage.
    pub signal: String,
    /// Advise stage.
    pub advise: String,
    /// Report stage.
    pub report: String,
}

impl Default for OpenCodeAgentNames {
    fn default() -> Self {
        Self {
            signal: "signal-generator".into(),
            advise: "portfolio-advisor".into(),
            report: "report-generator".into(),
        }
    }
}

impl Default for OpenCodeConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:4096".into(),
            agents: OpenCodeAgentNames::default(),
            provider_id: String::new(),
            model_id: String::new(),
            password: Secret::default(),
            max_model_requests: 10,
        }
    }
}

/// `agents.stages:`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Stages {
    /// Signal stage.
    pub signal: StageConfig,
    /// Advise stage.
    pub advise: StageConfig,
    /// Report stage.
    pub report: StageConfig,
}

/// One stage's overrides.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StageConfig {
    /// Backend for this stage.
    pub backend: Option<AgentBackend>,
    /// Model for this stage.
    pub model: Option<String>,
    /// Deadline of one agent call of this stage.
    pub timeout_seconds: Option<f64>,
    /// How this stage asks for JSON (default: `agents.structured_output`).
    pub structured_output: Option<StructuredOutput>,
    /// The runner's tools this stage's model is offered with `agents.tools: mcp` (names of
    /// [`TOOL_NAMES`]; default [`default_stage_tools`]). Every definition costs prompt
    /// tokens on every call, so a stage gets only what it can use.
    pub tools: Option<Vec<String>>,
}

/// The runner's tools, by name (the `tools` module defines them; a test there keeps the two
/// lists equal, so configuration can be checked without building the toolbox).
pub const TOOL_NAMES: [&str; 8] = [
    "get_candles",
    "get_current_price",
    "get_volatility",
    "get_top_strategies",
    "get_strategy_signal",
    "get_strategy_consensus",
    "get_recent_decisions",
    "get_signal_performance",
];

/// The tools a stage's model is offered unless `agents.stages.<stage>.tools` says otherwise.
/// The prompt already carries the price, the market context and every strategy's verdict,
/// so the signal stage gets what it cannot see there (a longer price history, volatility,
/// how past signals turned out), the advise stage what sizes a position, and the report
/// stage, which only words what it is given, nothing.
pub fn default_stage_tools(stage: crate::model::Stage) -> &'static [&'static str] {
    use crate::model::Stage;
    match stage {
        Stage::Signal => &["get_candles", "get_volatility", "get_signal_performance"],
        Stage::Advise => &[
            "get_volatility",
            "get_recent_decisions",
            "get_signal_performance",
        ],
        _ => &[],
    }
}

impl Agents {
    /// The largest burst of agent calls: `agents.burst`, or half of `requests_per_minute`.
    ///
    /// Why half: a tick of the default 20 symbols makes about 42 calls, and a burst of half
    /// the limit admits them all at the tick — what keeps a report's freshness near one
    /// symbol's chain of calls — while the GCRA interval that pays for it
    /// ([`crate::resilience::emission_interval`]) still sustains half the limit a minute, and
    /// no 60 s window holds more than the limit. The seed's burst of 10 spread those calls
    /// over about 20 s (docs/BENCHMARKS.md, f).
    pub fn burst(&self) -> u32 {
        self.burst
            .unwrap_or(self.requests_per_minute / 2)
            .clamp(1, self.requests_per_minute.max(1))
    }

    /// One stage's overrides (`Score` has none: the runner scores).
    pub fn stage(&self, stage: crate::model::Stage) -> Option<&StageConfig> {
        use crate::model::Stage;
        match stage {
            Stage::Signal => Some(&self.stages.signal),
            Stage::Advise => Some(&self.stages.advise),
            Stage::Report => Some(&self.stages.report),
            _ => None,
        }
    }

    /// The tools `stage`'s model is offered (with `agents.tools: mcp`): the stage's list,
    /// else its default.
    pub fn stage_tools(&self, stage: crate::model::Stage) -> Vec<String> {
        match self.stage(stage).and_then(|s| s.tools.as_ref()) {
            Some(names) => names.clone(),
            None => default_stage_tools(stage)
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}
