//! Builds the stage agents from configuration: which backend and model each stage uses, one
//! circuit breaker per LLM backend, and the shared rate limiter, budget and fallback.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::llm::{
    LlmAgent, LlmHealth, LlmShared, ResponseCache, TokenBudget, ToolRunner, Transport,
};
use super::opencode::{OpenCode, OpenCodeAgents, SessionLedger};
use super::openrouter::OpenRouter;
use super::rules::Rules;
use super::{Agent, AgentError, StageAgents};
use crate::config::{
    AgentBackend, Agents, Config, Fallback, ReportMode, StageConfig, ToolsMode, secs,
};
use crate::model::Stage;
use crate::resilience::rate_limit::AgentRateLimiter;
use crate::resilience::{
    Backoff, Breaker, BreakerKind, CallLatencies, ConcurrencyLimit, HedgeBudget, TransitionHook,
};

/// Everything the runner and the HTTP server need to know about the agents.
pub struct AgentSetup {
    /// The agent of each stage.
    pub agents: StageAgents,
    /// One breaker per LLM backend in use (`llm_openrouter`, `llm_opencode`).
    pub breakers: Vec<Breaker>,
    /// The signal stage's breaker, when it is an LLM and there is no fallback: while it is
    /// open a cycle cannot produce anything, so the tick is skipped.
    pub gate_breaker: Option<Breaker>,
    /// Auth failures and token totals.
    pub health: Arc<LlmHealth>,
    /// The token budget.
    pub budget: Arc<TokenBudget>,
    /// Backends whose own health readiness checks (`opencode`).
    pub probes: Vec<Arc<dyn Transport>>,
    /// Each LLM backend's learned in-flight limit, by backend name.
    pub concurrency: BTreeMap<&'static str, ConcurrencyLimit>,
    /// The OpenCode sessions open now and their model-request allowances, read by the model
    /// gateway (`None`: no stage uses OpenCode).
    pub opencode_sessions: Option<SessionLedger>,
}

impl std::fmt::Debug for AgentSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSetup")
            .field("agents", &self.agents)
            .finish_non_exhaustive()
    }
}

fn backend_name(b: AgentBackend) -> &'static str {
    match b {
        AgentBackend::Rules => "rules",
        AgentBackend::Openrouter => "openrouter",
        AgentBackend::Opencode => "opencode",
    }
}

/// Builds the agents. `on_breaker` is called on every LLM breaker transition.
/// `latencies` is the per-call window every LLM agent records into (the runner's gate reads
/// it). `tools` are offered to the OpenAI-compatible backend's models with `agents.tools: mcp`.
/// `cache` answers the turns it holds (replays; the service passes `None`).
pub fn build(
    cfg: &Config,
    limiter: Arc<dyn AgentRateLimiter>,
    on_breaker: TransitionHook,
    latencies: CallLatencies,
    tools: Arc<dyn ToolRunner>,
    cache: Option<Arc<ResponseCache>>,
) -> Result<AgentSetup, AgentError> {
    let a = &cfg.agents;
    let shared = shared_parts(cfg, limiter, latencies, tools, cache);
    let (health, budget) = (shared.health.clone(), shared.budget.clone());
    let mut transports: BTreeMap<&'static str, (Arc<dyn Transport>, Breaker, ConcurrencyLimit)> =
        BTreeMap::new();
    // At most the pool's worth of requests at once, plus room for the backup requests of
    // hedging; the limit learns down from there when the endpoint cannot take that many.
    let hedge_room = if a.hedge.enabled {
        ((cfg.parallel.max_concurrent as f64 * a.hedge.max_extra_fraction).ceil() as usize).max(1)
    } else {
        0
    };
    let max_in_flight = cfg.parallel.max_concurrent.max(1) + hedge_room;
    let mut probes: Vec<Arc<dyn Transport>> = vec![];
    let mut opencode_sessions: Option<SessionLedger> = None;
    let rules: Arc<dyn Agent> = Arc::new(Rules);

    let mut make = |kind: Stage,
                    stage: &StageConfig,
                    forced_rules: bool|
     -> Result<(Arc<dyn Agent>, Option<Breaker>), AgentError> {
        let backend = if forced_rules {
            AgentBackend::Rules
        } else {
            stage.backend.unwrap_or(a.backend)
        };
        if backend == AgentBackend::Rules {
            return Ok((rules.clone(), None));
        }
        let name = backend_name(backend);
        if !transports.contains_key(name) {
            let t = transport(backend, a, &mut probes, &mut opencode_sessions)?;
            let hook = on_breaker.clone();
            let kind = match backend {
                AgentBackend::Openrouter => BreakerKind::LlmOpenrouter,
                _ => BreakerKind::LlmOpencode,
            };
            let breaker = Breaker::new(kind, cfg.circuit_breaker.llm_service.settings())
                .with_transition_hook(move |n, s| hook(n, s));
            transports.insert(name, (t, breaker, ConcurrencyLimit::new(max_in_flight)));
        }
        let (t, breaker, limit) = transports
            .get(name)
            .cloned()
            .ok_or_else(|| AgentError::Transport("no transport".into()))?;
        let model = model_name(backend, a, stage);
        let timeout = stage
            .timeout_seconds
            .map(secs)
            .filter(|d| *d > Duration::ZERO);
        Ok((
            Arc::new(
                LlmAgent::new(t, model, timeout, breaker.clone(), shared.clone())
                    .with_structured_output(stage.structured_output.unwrap_or(a.structured_output))
                    .with_concurrency_limit(limit)
                    .with_tools(&a.stage_tools(kind)),
            ),
            Some(breaker),
        ))
    };
    let (signal, signal_breaker) = make(Stage::Signal, &a.stages.signal, false)?;
    let (advise, _) = make(Stage::Advise, &a.stages.advise, false)?;
    let (report, _) = make(
        Stage::Report,
        &a.stages.report,
        cfg.pipeline.report_mode == ReportMode::Template,
    )?;
    let breakers = transports.values().map(|(_, b, _)| b.clone()).collect();
    let concurrency = transports
        .iter()
        .map(|(name, (_, _, l))| (*name, l.clone()))
        .collect();
    let gate_breaker = if a.fallback == Fallback::Rules {
        None
    } else {
        signal_breaker
    };
    Ok(AgentSetup {
        agents: StageAgents {
            signal,
            advise,
            report,
        },
        breakers,
        gate_breaker,
        health,
        budget,
        probes,
        concurrency,
        opencode_sessions,
    })
}

/// What every LLM agent shares: the rate limit, the token budget, the health tallies, the
/// retry policy, the fallback, the latency window, the hedging budget and the tools.
fn shared_parts(
    cfg: &Config,
    limiter: Arc<dyn AgentRateLimiter>,
    latencies: CallLatencies,
    tools: Arc<dyn ToolRunner>,
    cache: Option<Arc<ResponseCache>>,
) -> Arc<LlmShared> {
    let a = &cfg.agents;
    Arc::new(LlmShared {
        limiter,
        budget: Arc::new(TokenBudget::new(
            a.budget.tokens_per_hour,
            a.budget.tokens_per_day,
        )),
        health: Arc::new(LlmHealth::default()),
        max_attempts: cfg.retry.max_attempts,
        backoff: Backoff {
            base: secs(cfg.retry.delay_seconds),
            max: secs(cfg.retry.max_delay_seconds),
            jitter: cfg.retry.jitter,
        },
        fallback_rules: a.fallback == Fallback::Rules,
        latencies,
        // At most 20 hedges saved up: enough for one bad minute of a default deployment.
        hedge: a
            .hedge
            .enabled
            .then(|| Arc::new(HedgeBudget::new(a.hedge.max_extra_fraction, 20.0))),
        max_tokens: a.max_tokens,
        tools: (a.tools == ToolsMode::Mcp).then_some(tools),
        max_tool_rounds: a.max_tool_rounds,
        cache,
    })
}

/// The transport of an LLM backend. OpenCode's is also probed by readiness (`probes`) and
/// keeps the ledger of its sessions' model requests (`sessions`), which the gateway charges.
fn transport(
    backend: AgentBackend,
    a: &Agents,
    probes: &mut Vec<Arc<dyn Transport>>,
    sessions: &mut Option<SessionLedger>,
) -> Result<Arc<dyn Transport>, AgentError> {
    if backend == AgentBackend::Openrouter {
        return Ok(Arc::new(OpenRouter::new(&a.base_url, a.api_key.clone())?));
    }
    let oc = &a.opencode;
    let ledger = SessionLedger::new(oc.max_model_requests);
    *sessions = Some(ledger.clone());
    let t: Arc<dyn Transport> = Arc::new(OpenCode::new(
        &oc.url,
        oc.password.clone(),
        OpenCodeAgents {
            signal: oc.agents.signal.clone(),
            advise: oc.agents.advise.clone(),
            report: oc.agents.report.clone(),
            provider_id: oc.provider_id.clone(),
            model_id: oc.model_id.clone(),
        },
        ledger,
    )?);
    probes.push(t.clone());
    Ok(t)
}

/// The model a stage asks for, as `metadata.model_used` names it.
fn model_name(backend: AgentBackend, a: &Agents, stage: &StageConfig) -> String {
    match backend {
        AgentBackend::Opencode if !a.opencode.model_id.is_empty() => {
            format!("{}/{}", a.opencode.provider_id, a.opencode.model_id)
        }
        AgentBackend::Opencode => "opencode".to_string(),
        _ => stage.model.clone().unwrap_or_else(|| a.model.clone()),
    }
}
