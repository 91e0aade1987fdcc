//! Typed configuration: the seed's YAML tree under `autonomous_runner:`, `${VAR}` /
//! `${VAR:-default}` expansion, environment overrides, and validation as a separate step that
//! reports every problem with its key path.
//!
//! Loading order: embedded defaults ← the YAML file (if any, with `${…}` expanded from the
//! environment) ← the environment overrides of DESIGN.md §3 (`REDIS_URL`, `INSTANCE_ID`, …).
//! Then [`Config::validate`] checks the result as a whole.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::resilience::{BreakerMode, BreakerSettings};
use crate::schedule::Schedule;

/// The seed's 20 symbols, used when the configuration names none.
pub const DEFAULT_SYMBOLS: [&str; 20] = [
    "ETH/USD",
    "BTC/USD",
    "SOL/USD",
    "DOGE/USD",
    "AVAX/USD",
    "MATIC/USD",
    "LINK/USD",
    "UNI/USD",
    "AAVE/USD",
    "SNX/USD",
    "CRV/USD",
    "COMP/USD",
    "MKR/USD",
    "SUSHI/USD",
    "YFI/USD",
    "1INCH/USD",
    "BAL/USD",
    "LDO/USD",
    "RPL/USD",
    "FXS/USD",
];

/// A string that never prints: `Debug`, `Display` and `Serialize` all show a placeholder.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The value, for the one place that must send it (an HTTP header, a connection URL).
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Whether no value is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "Secret(<unset>)"
        } else {
            "Secret(<redacted>)"
        })
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "" } else { "<redacted>" })
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The file's root: everything lives under `autonomous_runner:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    autonomous_runner: Config,
}

/// The whole configuration (`autonomous_runner:`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Cron expression, 5 fields (minute) or 6 (second). Default `*/1 * * * *`.
    pub schedule: String,
    /// IANA time zone the cron is read in. Default `UTC`.
    pub timezone: String,
    /// This replica's identity in locks, heartbeats and logs.
    pub instance_id: String,
    /// Active symbols, `BASE/QUOTE`.
    pub symbols: Vec<String>,
    /// Concurrency.
    pub parallel: Parallel,
    /// Deadlines.
    pub timeouts: Timeouts,
    /// Per-symbol locks.
    pub locks: Locks,
    /// Liveness key for stale-lock recovery.
    pub heartbeat: Heartbeat,
    /// Retries of failed agent calls.
    pub retry: Retry,
    /// Circuit breakers per dependency.
    pub circuit_breaker: CircuitBreakers,
    /// Adaptive concurrency, latency skip and backpressure.
    pub adaptive: Adaptive,
    /// Shutdown behaviour.
    pub graceful_shutdown: GracefulShutdown,
    /// Where locks, leases and the kill switch live.
    pub coordination: Coordination,
    /// Which agent runs each stage.
    pub agents: Agents,
    /// Candle source.
    pub market_data: MarketData,
    /// Stage wiring.
    pub pipeline: Pipeline,
    /// Publishing and history.
    pub publish: Publish,
    /// The HTTP server.
    pub http: Http,
    /// Optional PostgreSQL sink (reserved; the URL is accepted and kept secret).
    pub postgres: Postgres,
}

/// `parallel:`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Parallel {
    /// Symbols processed at once (the pool's limit).
    pub max_concurrent: usize,
    /// The floor the limit is halved to during high latency.
    pub min_concurrent: usize,
    /// Accepted for compatibility with the seed's file; the pool has no batches, so unused.
    pub batch_delay_ms: u64,
}

/// `timeouts:` (seconds; fractions allowed).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Deadline of one agent call (one LLM request or OpenCode prompt: the seed's 10 s per
    /// subagent), from the moment the request can go out (rate-limit waits are not counted).
    /// A symbol's whole pipeline is bounded by `total_timeout_seconds`.
    pub symbol_timeout_seconds: f64,
    /// Cap of the extended call deadline in high-latency mode.
    pub symbol_timeout_max_seconds: f64,
    /// Whole-cycle deadline: unfinished symbols are cancelled, finished ones kept.
    pub total_timeout_seconds: f64,
}

/// `locks:`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Locks {
    /// Lock expiry (Redis `EX`).
    pub ttl_seconds: u64,
    /// A lock older than this is stale and may be taken over.
    pub stale_threshold_seconds: u64,
    /// Accepted for compatibility with the seed's file; keys are fixed by the contract
    /// (`signal:lock:{symbol}`) under `coordination.key_prefix`.
    pub redis_key_prefix: String,
}

/// `heartbeat:`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Heartbeat {
    /// Expiry of the heartbeat key.
    pub ttl_seconds: u64,
    /// Refresh period.
    pub interval_seconds: u64,
}

/// `retry:`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retry {
    /// Attempts per agent call, the first included.
    pub max_attempts: u32,
    /// Backoff before the first retry.
    pub delay_seconds: f64,
    /// Largest backoff.
    pub max_delay_seconds: f64,
    /// Randomise backoffs so symbols do not retry in lock-step.
    pub jitter: bool,
}

/// `circuit_breaker:`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakers {
    /// The LLM backend's breaker.
    pub llm_service: BreakerConfig,
    /// The Redis breaker.
    pub redis: BreakerConfig,
}

/// One breaker's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failures that open it.
    pub failure_threshold: u32,
    /// Seconds open before probing.
    pub recovery_timeout_seconds: f64,
    /// Probes per half-open period.
    #[serde(default = "default_half_open_calls")]
    pub half_open_max_calls: u32,
    /// Probe successes that close it.
    #[serde(default = "default_success_threshold")]
    pub success_threshold: u32,
    /// Operator override: `normal`, `forced_open`, `disabled`.
    #[serde(default)]
    pub mode: BreakerMode,
}

fn default_half_open_calls() -> u32 {
    2
}
fn default_success_threshold() -> u32 {
    1
}

impl BreakerConfig {
    /// The mechanism's settings.
    pub fn settings(&self) -> BreakerSettings {
        BreakerSettings {
            failure_threshold: self.failure_threshold,
            recovery_timeout: secs(self.recovery_timeout_seconds),
            half_open_max_calls: self.half_open_max_calls,
            success_threshold: self.success_threshold,
            mode: self.mode,
        }
    }
}

/// `adaptive:`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Adaptive {
    /// Per-call latency samples kept (every agent call of every symbol feeds the window).
    pub latency_window_size: usize,
    /// Per-call p95 above this: high-latency mode (reduced concurrency where the work still
    /// fits, extended call timeout).
    pub p95_threshold_ms: u64,
    /// Per-call p99 above this makes a skip possible; the tick is skipped only if the
    /// predicted makespan also exceeds the cycle deadline (bounded, see
    /// `max_consecutive_latency_skips`).
    pub p99_threshold_ms: u64,
    /// Consecutive overruns that start a cooldown.
    pub backpressure_max_overruns: u32,
    /// Ticks sat out per cooldown.
    pub cooldown_cycles: u32,
    /// At most this many cycles in a row are skipped for latency before a probe cycle runs.
    pub max_consecutive_latency_skips: u32,
    /// Latency samples older than this are forgotten.
    pub latency_max_age_seconds: u64,
}

/// `graceful_shutdown:`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GracefulShutdown {
    /// Time in-flight symbols get to finish after SIGTERM.
    pub timeout_seconds: f64,
    /// Let in-flight work finish (true) or cancel it at once (false).
    pub drain_existing: bool,
}

/// Coordination backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CoordinationBackend {
    /// In-process: one replica only.
    Memory,
    /// Redis: any number of replicas.
    Redis,
}

/// `coordination:`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Coordination {
    /// `memory` or `redis`.
    pub backend: CoordinationBackend,
    /// `redis://` or `rediss://` URL (password and db in the URL). Env `REDIS_URL`.
    pub redis_url: Secret,
    /// Prefix for every key and channel, to share one Redis between deployments.
    pub key_prefix: String,
    /// Every replica runs every tick and claims symbols one by one.
    pub work_sharing: bool,
}

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

/// `agents:`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Agents {
    /// Backend of every stage unless a stage says otherwise.
    pub backend: AgentBackend,
    /// Agent calls per minute across the whole process.
    pub requests_per_minute: u32,
    /// Largest burst of agent calls.
    pub burst: u32,
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
}

/// Candle source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MarketSource {
    /// Deterministic random walk per symbol.
    Simulated,
    /// Coinbase Exchange public candles.
    Coinbase,
}

/// `market_data:`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MarketData {
    /// `simulated` or `coinbase`.
    pub source: MarketSource,
    /// Base URL of the Coinbase Exchange API.
    pub coinbase_url: String,
    /// 1-minute candles fetched per symbol.
    pub candles: usize,
    /// HTTP timeout of one candles request.
    pub request_timeout_seconds: f64,
}

/// How the report stage is produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportMode {
    /// Always the deterministic template (saves an LLM call per symbol).
    Template,
    /// The report stage's backend (for `rules`, that is the template too).
    Agent,
}

/// `pipeline:`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pipeline {
    /// Advise runs only for opportunity scores at or above this.
    pub advise_min_score: f64,
    /// `template` or `agent`.
    pub report_mode: ReportMode,
    /// A signal expires this long after the next tick.
    pub expiry_grace_seconds: u64,
}

/// `publish:`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Publish {
    /// `MAXLEN ~` of each Redis stream.
    pub stream_max_len: u64,
    /// Messages kept while Redis is unreachable; beyond it the oldest are dropped (counted).
    pub outbox_max: usize,
    /// Cycle summaries kept for `/api/cycles`.
    pub history_cycles: usize,
    /// Stage messages kept in memory for SSE replay.
    pub replay_buffer: usize,
}

/// `http:`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http {
    /// Bind address. Default `0.0.0.0`.
    pub bind: String,
    /// Port. Default 8080; 0 picks a free port (tests).
    pub port: u16,
    /// Bearer token for admin endpoints. Env `ADMIN_TOKEN`; never printed.
    pub admin_token: Secret,
    /// Admin endpoints also allowed from loopback peers when no token is configured.
    pub admin_loopback: bool,
    /// Connections served at once (also capped by the file-descriptor limit). At the cap
    /// the oldest connection that never sent a request is closed for a newcomer.
    pub max_connections: usize,
}

/// `postgres:`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Postgres {
    /// Connection URL. Env `POSTGRES_URL`; never printed.
    pub url: Secret,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            schedule: "*/1 * * * *".into(),
            timezone: "UTC".into(),
            instance_id: default_instance_id(),
            symbols: DEFAULT_SYMBOLS.iter().map(|s| s.to_string()).collect(),
            parallel: Parallel::default(),
            timeouts: Timeouts::default(),
            locks: Locks::default(),
            heartbeat: Heartbeat::default(),
            retry: Retry::default(),
            circuit_breaker: CircuitBreakers::default(),
            adaptive: Adaptive::default(),
            graceful_shutdown: GracefulShutdown::default(),
            coordination: Coordination::default(),
            agents: Agents::default(),
            market_data: MarketData::default(),
            pipeline: Pipeline::default(),
            publish: Publish::default(),
            http: Http::default(),
            postgres: Postgres::default(),
        }
    }
}

/// `HOSTNAME` (the pod name in Kubernetes) or `runner-1`, as in the seed's
/// `${HOSTNAME:-runner-1}`.
fn default_instance_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .unwrap_or_else(|| "runner-1".to_string())
}

impl Default for Parallel {
    fn default() -> Self {
        Self {
            max_concurrent: 10,
            min_concurrent: 3,
            batch_delay_ms: 1000,
        }
    }
}
impl Default for Timeouts {
    fn default() -> Self {
        Self {
            symbol_timeout_seconds: 10.0,
            symbol_timeout_max_seconds: 15.0,
            total_timeout_seconds: 50.0,
        }
    }
}
impl Default for Locks {
    fn default() -> Self {
        Self {
            ttl_seconds: 90,
            stale_threshold_seconds: 120,
            redis_key_prefix: "signal:lock:".into(),
        }
    }
}
impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            ttl_seconds: 30,
            interval_seconds: 10,
        }
    }
}
impl Default for Retry {
    fn default() -> Self {
        Self {
            max_attempts: 2,
            delay_seconds: 5.0,
            max_delay_seconds: 30.0,
            jitter: true,
        }
    }
}
impl Default for CircuitBreakers {
    fn default() -> Self {
        Self {
            llm_service: BreakerConfig {
                failure_threshold: 5,
                recovery_timeout_seconds: 60.0,
                half_open_max_calls: 3,
                success_threshold: 2,
                mode: BreakerMode::Normal,
            },
            redis: BreakerConfig {
                failure_threshold: 3,
                recovery_timeout_seconds: 30.0,
                half_open_max_calls: 2,
                success_threshold: 1,
                mode: BreakerMode::Normal,
            },
        }
    }
}
impl Default for Adaptive {
    fn default() -> Self {
        Self {
            // Per-call samples: 20 symbols make ~50 calls a minute. The seed's 10 (set for a
            // window of symbols) would make p95 the maximum of the last few seconds.
            latency_window_size: 200,
            p95_threshold_ms: 8000,
            p99_threshold_ms: 9000,
            backpressure_max_overruns: 3,
            cooldown_cycles: 2,
            max_consecutive_latency_skips: 1,
            latency_max_age_seconds: 300,
        }
    }
}
impl Default for GracefulShutdown {
    fn default() -> Self {
        Self {
            timeout_seconds: 30.0,
            drain_existing: true,
        }
    }
}
impl Default for Coordination {
    fn default() -> Self {
        Self {
            backend: CoordinationBackend::Memory,
            redis_url: Secret::new("redis://127.0.0.1:6379"),
            key_prefix: String::new(),
            work_sharing: false,
        }
    }
}
impl Default for Agents {
    fn default() -> Self {
        Self {
            backend: AgentBackend::Rules,
            requests_per_minute: 100,
            burst: 10,
            base_url: "https://openrouter.ai/api/v1".into(),
            model: "openai/gpt-4o-mini".into(),
            api_key: Secret::default(),
            stages: Stages::default(),
            fallback: Fallback::None,
            budget: Budget::default(),
            max_tokens: 1024,
            hedge: Hedge::default(),
            opencode: OpenCodeConfig::default(),
        }
    }
}
impl Default for MarketData {
    fn default() -> Self {
        Self {
            source: MarketSource::Simulated,
            coinbase_url: "https://api.exchange.coinbase.com".into(),
            candles: 120,
            request_timeout_seconds: 5.0,
        }
    }
}
impl Default for Pipeline {
    fn default() -> Self {
        Self {
            advise_min_score: 70.0,
            report_mode: ReportMode::Agent,
            expiry_grace_seconds: 30,
        }
    }
}
impl Default for Publish {
    fn default() -> Self {
        Self {
            stream_max_len: 10_000,
            outbox_max: 10_000,
            history_cycles: 100,
            replay_buffer: 1024,
        }
    }
}
impl Default for Http {
    fn default() -> Self {
        Self {
            bind: "0.0.0.0".into(),
            port: 8080,
            admin_token: Secret::default(),
            admin_loopback: true,
            // 1,000 dashboard clients (the SSE benchmark) plus probes and API calls.
            max_connections: 4096,
        }
    }
}

/// One problem, named by its key path (or the environment variable it came from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// `autonomous_runner.parallel.max_concurrent`, or an env var name.
    pub path: String,
    /// What is wrong, in words.
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why configuration could not be loaded; one line per problem when displayed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read config file: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// One or more problems, each with its key path.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigIssue>),
}

impl ConfigError {
    fn one(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid(vec![ConfigIssue {
            path: path.into(),
            message: message.into(),
        }])
    }
}

/// The process environment as a lookup (a map in tests).
pub trait Env {
    /// The variable's value, if set.
    fn var(&self, key: &str) -> Option<String>;
    /// Every variable, for `${…}` expansion.
    fn all(&self) -> HashMap<String, String>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
    fn all(&self) -> HashMap<String, String> {
        std::env::vars().collect()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, key: &str) -> Option<String> {
        self.get(key).cloned()
    }
    fn all(&self) -> HashMap<String, String> {
        self.clone()
    }
}

impl Config {
    /// Loads `path` (or the embedded defaults when `None`), applies the environment, and
    /// validates. The one entry point `main` uses.
    pub fn load(path: Option<&Path>, env: &impl Env) -> Result<Config, ConfigError> {
        let mut cfg = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                Config::from_yaml(&text, env)?
            }
            None => Config::default(),
        };
        cfg.apply_env(env)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a YAML document (with `${VAR}` / `${VAR:-default}` expanded from `env`). Type
    /// errors and unknown keys are reported with their key path and line.
    pub fn from_yaml(text: &str, env: &impl Env) -> Result<Config, ConfigError> {
        if text.trim().is_empty() {
            // An empty file is a mistake (a ConfigMap key that did not mount, a truncated
            // write), not a request for the defaults: they listen on 0.0.0.0 with memory
            // coordination, and replicas would each run every tick.
            return Err(ConfigError::one(
                "config".to_string(),
                "the file is empty; remove --config to run on the embedded defaults".to_string(),
            ));
        }
        let mut options = serde_saphyr::Options::default().with_properties(env.all());
        options.property_syntax = serde_saphyr::PropertySyntax::DockerCompose;
        options.with_snippet = false;
        options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::Error;
        let mut failed_path: Option<String> = None;
        let result = serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
            serde_path_to_error::deserialize::<_, ConfigFile>(de).map_err(|e| {
                failed_path = Some(e.path().to_string());
                e.into_inner()
            })
        });
        match result {
            Ok(file) => Ok(file.autonomous_runner),
            Err(e) => {
                let path = match failed_path.as_deref() {
                    None | Some(".") | Some("") => "config".to_string(),
                    Some(p) => p.to_string(),
                };
                let mut message = e.without_snippet().to_string();
                // The parser names a duplicate key in its message and leaves `?` in the path,
                // with advice meant for programmers: say it in the file's terms.
                if let Some(rest) = message.strip_prefix("duplicate mapping key: ") {
                    let key = rest.split(',').next().unwrap_or("").trim().to_string();
                    let at = e
                        .location()
                        .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
                        .unwrap_or_default();
                    let path = path.trim_end_matches('?').trim_end_matches('.');
                    return Err(ConfigError::one(
                        format!("{path}.{key}"),
                        format!("is set twice; keep one{at}"),
                    ));
                }
                // The location is also in the message for syntax errors; add it where missing.
                if let Some(loc) = e.location()
                    && !message.contains("line")
                {
                    message = format!("{message} (line {}, column {})", loc.line(), loc.column());
                }
                Err(ConfigError::one(path, message.trim().to_string()))
            }
        }
    }

    /// Applies the environment overrides of DESIGN.md §3.
    pub fn apply_env(&mut self, env: &impl Env) -> Result<(), ConfigError> {
        let mut issues = Vec::new();
        let set = |k: &str| env.var(k).filter(|v| !v.trim().is_empty());
        if let Some(v) = set("REDIS_URL") {
            self.coordination.redis_url = Secret::new(v);
        }
        if let Some(v) = set("OPENROUTER_API_KEY") {
            self.agents.api_key = Secret::new(v);
        }
        if let Some(v) = set("POSTGRES_URL") {
            self.postgres.url = Secret::new(v);
        }
        if let Some(v) = set("INSTANCE_ID") {
            self.instance_id = v;
        }
        if let Some(v) = set("OPENCODE_SERVER_PASSWORD") {
            self.agents.opencode.password = Secret::new(v);
        }
        if let Some(v) = set("ADMIN_TOKEN") {
            self.http.admin_token = Secret::new(v);
        }
        if let Some(v) = set("SIGNAL_FREQUENCY_MINUTES") {
            match v.trim().parse::<u32>() {
                Ok(n) if (1..=59).contains(&n) => self.schedule = format!("*/{n} * * * *"),
                _ => issues.push(ConfigIssue {
                    path: "SIGNAL_FREQUENCY_MINUTES".into(),
                    message: format!("must be a whole number of minutes from 1 to 59, got {v:?}"),
                }),
            }
        }
        if let Some(v) = set("MAX_SYMBOLS") {
            match v.trim().parse::<usize>() {
                Ok(n) if n >= 1 => self.symbols.truncate(n),
                _ => issues.push(ConfigIssue {
                    path: "MAX_SYMBOLS".into(),
                    message: format!("must be a whole number ≥ 1, got {v:?}"),
                }),
            }
        }
        if issues.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(issues))
        }
    }

    /// Checks the configuration as a whole; every problem is reported, each with its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut v = Validator::default();
        let r = "autonomous_runner";

        if let Err(e) = Schedule::new(&self.schedule, &self.timezone) {
            match e {
                crate::schedule::ScheduleError::TimeZone(_) => {
                    v.bad(format!("{r}.timezone"), e.to_string())
                }
                _ => v.bad(format!("{r}.schedule"), e.to_string()),
            }
        }
        let id = self.instance_id.trim();
        if id.is_empty()
            || id.len() > 128
            || id.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            v.bad(
                format!("{r}.instance_id"),
                format!(
                    "must be 1–128 characters without spaces, got {:?}",
                    self.instance_id
                ),
            );
        }
        if self.symbols.is_empty() {
            v.bad(format!("{r}.symbols"), "must list at least one symbol");
        }
        let mut seen = BTreeSet::new();
        for (i, s) in self.symbols.iter().enumerate() {
            if !is_valid_symbol(s) {
                v.bad(
                    format!("{r}.symbols[{i}]"),
                    format!("{s:?} is not a symbol of the form BASE/QUOTE (A–Z, 0–9, 1–15 each)"),
                );
            } else if !seen.insert(s.as_str()) {
                v.bad(
                    format!("{r}.symbols[{i}]"),
                    format!("{s:?} is listed twice"),
                );
            }
        }

        let p = &self.parallel;
        v.min(
            format!("{r}.parallel.max_concurrent"),
            p.max_concurrent as f64,
            1.0,
        );
        v.min(
            format!("{r}.parallel.min_concurrent"),
            p.min_concurrent as f64,
            1.0,
        );
        if p.min_concurrent > p.max_concurrent {
            v.bad(
                format!("{r}.parallel.min_concurrent"),
                format!(
                    "must be ≤ parallel.max_concurrent ({}), got {}",
                    p.max_concurrent, p.min_concurrent
                ),
            );
        }

        let t = &self.timeouts;
        v.positive(
            format!("{r}.timeouts.symbol_timeout_seconds"),
            t.symbol_timeout_seconds,
        );
        v.positive(
            format!("{r}.timeouts.symbol_timeout_max_seconds"),
            t.symbol_timeout_max_seconds,
        );
        v.positive(
            format!("{r}.timeouts.total_timeout_seconds"),
            t.total_timeout_seconds,
        );
        if t.symbol_timeout_max_seconds.is_finite()
            && t.symbol_timeout_seconds.is_finite()
            && t.symbol_timeout_max_seconds < t.symbol_timeout_seconds
        {
            v.bad(
                format!("{r}.timeouts.symbol_timeout_max_seconds"),
                format!(
                    "must be ≥ timeouts.symbol_timeout_seconds ({}), got {}",
                    t.symbol_timeout_seconds, t.symbol_timeout_max_seconds
                ),
            );
        }

        v.min(
            format!("{r}.locks.ttl_seconds"),
            self.locks.ttl_seconds as f64,
            1.0,
        );
        v.min(
            format!("{r}.locks.stale_threshold_seconds"),
            self.locks.stale_threshold_seconds as f64,
            1.0,
        );
        v.min(
            format!("{r}.heartbeat.ttl_seconds"),
            self.heartbeat.ttl_seconds as f64,
            1.0,
        );
        v.min(
            format!("{r}.heartbeat.interval_seconds"),
            self.heartbeat.interval_seconds as f64,
            1.0,
        );
        if self.heartbeat.interval_seconds >= self.heartbeat.ttl_seconds {
            v.bad(
                format!("{r}.heartbeat.interval_seconds"),
                format!(
                    "must be < heartbeat.ttl_seconds ({}), or the heartbeat expires between refreshes",
                    self.heartbeat.ttl_seconds
                ),
            );
        }

        v.min(
            format!("{r}.retry.max_attempts"),
            self.retry.max_attempts as f64,
            1.0,
        );
        v.non_negative(format!("{r}.retry.delay_seconds"), self.retry.delay_seconds);
        v.non_negative(
            format!("{r}.retry.max_delay_seconds"),
            self.retry.max_delay_seconds,
        );

        for (name, b) in [
            ("llm_service", &self.circuit_breaker.llm_service),
            ("redis", &self.circuit_breaker.redis),
        ] {
            let k = format!("{r}.circuit_breaker.{name}");
            v.min(
                format!("{k}.failure_threshold"),
                b.failure_threshold as f64,
                1.0,
            );
            v.positive(
                format!("{k}.recovery_timeout_seconds"),
                b.recovery_timeout_seconds,
            );
            v.min(
                format!("{k}.half_open_max_calls"),
                b.half_open_max_calls as f64,
                1.0,
            );
            v.min(
                format!("{k}.success_threshold"),
                b.success_threshold as f64,
                1.0,
            );
            if b.success_threshold > b.half_open_max_calls {
                v.bad(
                    format!("{k}.success_threshold"),
                    format!(
                        "must be ≤ half_open_max_calls ({}), or the breaker can never close",
                        b.half_open_max_calls
                    ),
                );
            }
        }

        let a = &self.adaptive;
        v.min(
            format!("{r}.adaptive.latency_window_size"),
            a.latency_window_size as f64,
            1.0,
        );
        v.min(
            format!("{r}.adaptive.p95_threshold_ms"),
            a.p95_threshold_ms as f64,
            1.0,
        );
        v.min(
            format!("{r}.adaptive.p99_threshold_ms"),
            a.p99_threshold_ms as f64,
            1.0,
        );
        v.min(
            format!("{r}.adaptive.backpressure_max_overruns"),
            a.backpressure_max_overruns as f64,
            1.0,
        );
        v.min(
            format!("{r}.adaptive.latency_max_age_seconds"),
            a.latency_max_age_seconds as f64,
            1.0,
        );

        v.non_negative(
            format!("{r}.graceful_shutdown.timeout_seconds"),
            self.graceful_shutdown.timeout_seconds,
        );

        if self.coordination.backend == CoordinationBackend::Redis {
            let url = self.coordination.redis_url.expose();
            if !(url.starts_with("redis://")
                || url.starts_with("rediss://")
                || url.starts_with("unix://"))
            {
                v.bad(
                    format!("{r}.coordination.redis_url"),
                    "must start with redis://, rediss:// or unix://",
                );
            }
        }
        if !self
            .coordination
            .key_prefix
            .chars()
            .all(|c| c.is_ascii_graphic())
        {
            v.bad(
                format!("{r}.coordination.key_prefix"),
                "must be printable ASCII without spaces",
            );
        }

        v.min(
            format!("{r}.agents.requests_per_minute"),
            self.agents.requests_per_minute as f64,
            1.0,
        );
        v.min(format!("{r}.agents.burst"), self.agents.burst as f64, 1.0);
        if self.agents.burst > self.agents.requests_per_minute {
            v.bad(
                format!("{r}.agents.burst"),
                format!(
                    "must be ≤ agents.requests_per_minute ({})",
                    self.agents.requests_per_minute
                ),
            );
        }
        if !(1..=1_000_000).contains(&self.agents.max_tokens) {
            v.bad(
                format!("{r}.agents.max_tokens"),
                format!("must be 1–1000000, got {}", self.agents.max_tokens),
            );
        }
        let f = self.agents.hedge.max_extra_fraction;
        if !(f.is_finite() && (0.0..=1.0).contains(&f)) {
            v.bad(
                format!("{r}.agents.hedge.max_extra_fraction"),
                format!("must be between 0 and 1, got {f}"),
            );
        }
        for (name, s) in [
            ("signal", &self.agents.stages.signal),
            ("advise", &self.agents.stages.advise),
            ("report", &self.agents.stages.report),
        ] {
            if let Some(t) = s.timeout_seconds {
                v.positive(format!("{r}.agents.stages.{name}.timeout_seconds"), t);
            }
        }
        if self.uses_backend(AgentBackend::Openrouter) && !is_http_url(&self.agents.base_url) {
            v.bad(
                format!("{r}.agents.base_url"),
                "must be an http:// or https:// URL",
            );
        }
        if self.uses_backend(AgentBackend::Opencode) && !is_http_url(&self.agents.opencode.url) {
            v.bad(
                format!("{r}.agents.opencode.url"),
                "must be an http:// or https:// URL",
            );
        }
        let oc = &self.agents.opencode;
        if oc.provider_id.is_empty() != oc.model_id.is_empty() {
            v.bad(
                format!("{r}.agents.opencode.model_id"),
                "provider_id and model_id are set together or not at all",
            );
        }
        if !is_http_url(&self.market_data.coinbase_url) {
            v.bad(
                format!("{r}.market_data.coinbase_url"),
                "must be an http:// or https:// URL",
            );
        }
        v.min(
            format!("{r}.market_data.candles"),
            self.market_data.candles as f64,
            40.0,
        );
        if self.market_data.candles > 300 {
            v.bad(
                format!("{r}.market_data.candles"),
                "must be ≤ 300 (one candles request)",
            );
        }
        v.positive(
            format!("{r}.market_data.request_timeout_seconds"),
            self.market_data.request_timeout_seconds,
        );

        let s = self.pipeline.advise_min_score;
        if !(0.0..=100.0).contains(&s) {
            v.bad(
                format!("{r}.pipeline.advise_min_score"),
                format!("must be within 0–100, got {s}"),
            );
        }
        v.min(
            format!("{r}.publish.stream_max_len"),
            self.publish.stream_max_len as f64,
            1.0,
        );
        v.min(
            format!("{r}.publish.outbox_max"),
            self.publish.outbox_max as f64,
            1.0,
        );
        v.min(
            format!("{r}.publish.history_cycles"),
            self.publish.history_cycles as f64,
            1.0,
        );
        v.min(
            format!("{r}.publish.replay_buffer"),
            self.publish.replay_buffer as f64,
            1.0,
        );

        self.check_upper_bounds(&mut v, r);
        self.check_relations(&mut v, r);

        v.min(
            format!("{r}.http.max_connections"),
            self.http.max_connections as f64,
            1.0,
        );
        if self.http.bind.parse::<IpAddr>().is_err() {
            v.bad(
                format!("{r}.http.bind"),
                format!("{:?} is not an IP address", self.http.bind),
            );
        }

        if v.issues.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(v.issues))
        }
    }

    /// Upper bounds, one line per key. A value past its bound is a typo or a unit mistake,
    /// and some would not even survive the run time: a timeout of 1e30 s overflows a
    /// `Duration` and became 0 (every call timed out at once), a buffer of 4e9 entries is
    /// memory the process does not have.
    fn check_upper_bounds(&self, v: &mut Validator, r: &str) {
        const DAY: f64 = 86_400.0;
        const HOUR: f64 = 3_600.0;
        let c = self;
        let bounds: &[(&str, f64, f64)] = &[
            ("symbols", c.symbols.len() as f64, 10_000.0),
            (
                "parallel.max_concurrent",
                c.parallel.max_concurrent as f64,
                1_000.0,
            ),
            (
                "parallel.batch_delay_ms",
                c.parallel.batch_delay_ms as f64,
                60_000.0,
            ),
            (
                "timeouts.symbol_timeout_seconds",
                c.timeouts.symbol_timeout_seconds,
                HOUR,
            ),
            (
                "timeouts.symbol_timeout_max_seconds",
                c.timeouts.symbol_timeout_max_seconds,
                HOUR,
            ),
            (
                "timeouts.total_timeout_seconds",
                c.timeouts.total_timeout_seconds,
                DAY,
            ),
            ("locks.ttl_seconds", c.locks.ttl_seconds as f64, DAY),
            (
                "locks.stale_threshold_seconds",
                c.locks.stale_threshold_seconds as f64,
                DAY,
            ),
            (
                "heartbeat.ttl_seconds",
                c.heartbeat.ttl_seconds as f64,
                HOUR,
            ),
            (
                "heartbeat.interval_seconds",
                c.heartbeat.interval_seconds as f64,
                HOUR,
            ),
            ("retry.max_attempts", f64::from(c.retry.max_attempts), 10.0),
            ("retry.delay_seconds", c.retry.delay_seconds, HOUR),
            ("retry.max_delay_seconds", c.retry.max_delay_seconds, HOUR),
            (
                "adaptive.latency_window_size",
                c.adaptive.latency_window_size as f64,
                100_000.0,
            ),
            (
                "adaptive.p95_threshold_ms",
                c.adaptive.p95_threshold_ms as f64,
                HOUR * 1000.0,
            ),
            (
                "adaptive.p99_threshold_ms",
                c.adaptive.p99_threshold_ms as f64,
                HOUR * 1000.0,
            ),
            (
                "adaptive.backpressure_max_overruns",
                f64::from(c.adaptive.backpressure_max_overruns),
                1_000.0,
            ),
            (
                "adaptive.cooldown_cycles",
                f64::from(c.adaptive.cooldown_cycles),
                1_000.0,
            ),
            (
                "adaptive.max_consecutive_latency_skips",
                f64::from(c.adaptive.max_consecutive_latency_skips),
                1_000.0,
            ),
            (
                "adaptive.latency_max_age_seconds",
                c.adaptive.latency_max_age_seconds as f64,
                DAY,
            ),
            (
                "graceful_shutdown.timeout_seconds",
                c.graceful_shutdown.timeout_seconds,
                HOUR,
            ),
            (
                "agents.requests_per_minute",
                f64::from(c.agents.requests_per_minute),
                1_000_000.0,
            ),
            (
                "market_data.request_timeout_seconds",
                c.market_data.request_timeout_seconds,
                300.0,
            ),
            (
                "pipeline.expiry_grace_seconds",
                c.pipeline.expiry_grace_seconds as f64,
                DAY,
            ),
            (
                "publish.stream_max_len",
                c.publish.stream_max_len as f64,
                10_000_000.0,
            ),
            (
                "publish.outbox_max",
                c.publish.outbox_max as f64,
                1_000_000.0,
            ),
            (
                "publish.history_cycles",
                c.publish.history_cycles as f64,
                100_000.0,
            ),
            (
                "publish.replay_buffer",
                c.publish.replay_buffer as f64,
                1_000_000.0,
            ),
        ];
        for (key, value, max) in bounds {
            // NaN is refused by the lower-bound checks; here only what is too large.
            if *value > *max {
                v.bad(
                    format!("{r}.{key}"),
                    format!("must be ≤ {max}, got {value}"),
                );
            }
        }
        for (name, b) in [
            ("llm_service", &c.circuit_breaker.llm_service),
            ("redis", &c.circuit_breaker.redis),
        ] {
            for (key, value, max) in [
                (
                    "failure_threshold",
                    f64::from(b.failure_threshold),
                    100_000.0,
                ),
                ("recovery_timeout_seconds", b.recovery_timeout_seconds, DAY),
                (
                    "half_open_max_calls",
                    f64::from(b.half_open_max_calls),
                    1_000.0,
                ),
            ] {
                if value > max {
                    v.bad(
                        format!("{r}.circuit_breaker.{name}.{key}"),
                        format!("must be ≤ {max}, got {value}"),
                    );
                }
            }
        }
        for (name, s) in [
            ("signal", &c.agents.stages.signal),
            ("advise", &c.agents.stages.advise),
            ("report", &c.agents.stages.report),
        ] {
            if let Some(t) = s.timeout_seconds.filter(|t| *t > HOUR) {
                v.bad(
                    format!("{r}.agents.stages.{name}.timeout_seconds"),
                    format!("must be ≤ {HOUR}, got {t}"),
                );
            }
        }
    }

    /// Keys that only make sense together.
    fn check_relations(&self, v: &mut Validator, r: &str) {
        let t = &self.timeouts;
        if t.total_timeout_seconds.is_finite()
            && t.symbol_timeout_seconds.is_finite()
            && t.total_timeout_seconds < t.symbol_timeout_seconds
        {
            v.bad(
                format!("{r}.timeouts.total_timeout_seconds"),
                format!(
                    "must be ≥ timeouts.symbol_timeout_seconds ({}), or no agent call could finish within a cycle, got {}",
                    t.symbol_timeout_seconds, t.total_timeout_seconds
                ),
            );
        }
        // A symbol may hold its lock for a whole cycle: a shorter stale threshold would let
        // another replica take over a lock whose owner is still working.
        if t.total_timeout_seconds.is_finite()
            && (self.locks.stale_threshold_seconds as f64) < t.total_timeout_seconds
        {
            v.bad(
                format!("{r}.locks.stale_threshold_seconds"),
                format!(
                    "must be ≥ timeouts.total_timeout_seconds ({}): a symbol may hold its lock that long, got {}",
                    t.total_timeout_seconds, self.locks.stale_threshold_seconds
                ),
            );
        }
        if self.coordination.backend == CoordinationBackend::Redis
            && let Err(e) = redis::Client::open(self.coordination.redis_url.expose())
        {
            // The URL is a secret (it may carry a password): say what is wrong, not what it is.
            v.bad(
                format!("{r}.coordination.redis_url"),
                format!("is not a valid Redis URL ({:?})", e.kind()),
            );
        }
    }

    /// Every secret value (and the password inside the Redis URL), for log redaction.
    pub fn secrets(&self) -> Vec<String> {
        let mut v: Vec<String> = [
            &self.agents.api_key,
            &self.http.admin_token,
            &self.coordination.redis_url,
            &self.postgres.url,
            &self.agents.opencode.password,
        ]
        .iter()
        .map(|s| s.expose().to_string())
        .filter(|s| !s.is_empty())
        .collect();
        for url in [&self.coordination.redis_url, &self.postgres.url] {
            // scheme://user:password@host — the password alone may appear in an error.
            if let Some((_, rest)) = url.expose().split_once("://")
                && let Some((userinfo, _)) = rest.rsplit_once('@')
                && let Some((_, password)) = userinfo.split_once(':')
                && !password.is_empty()
            {
                v.push(password.to_string());
            }
        }
        v
    }

    /// Whether any stage runs on `backend`.
    pub fn uses_backend(&self, backend: AgentBackend) -> bool {
        let st = &self.agents.stages;
        [&st.signal, &st.advise, &st.report]
            .iter()
            .any(|s| s.backend.unwrap_or(self.agents.backend) == backend)
    }

    /// The effective configuration as YAML, secrets redacted (`check-config`).
    pub fn to_redacted_yaml(&self) -> String {
        #[derive(Serialize)]
        struct Root<'a> {
            autonomous_runner: &'a Config,
        }
        serde_saphyr::to_string(&Root {
            autonomous_runner: self,
        })
        .unwrap_or_else(|e| format!("# could not render the configuration: {e}\n"))
    }

    /// `timeouts.symbol_timeout_seconds` as a duration.
    pub fn symbol_timeout(&self) -> Duration {
        secs(self.timeouts.symbol_timeout_seconds)
    }
    /// `timeouts.symbol_timeout_max_seconds` as a duration.
    pub fn symbol_timeout_max(&self) -> Duration {
        secs(self.timeouts.symbol_timeout_max_seconds)
    }
    /// `timeouts.total_timeout_seconds` as a duration.
    pub fn total_timeout(&self) -> Duration {
        secs(self.timeouts.total_timeout_seconds)
    }
    /// `graceful_shutdown.timeout_seconds` as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        secs(self.graceful_shutdown.timeout_seconds)
    }
}

/// Seconds (validated finite and non-negative) as a duration; anything else is zero.
pub fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::ZERO)
}

fn is_http_url(s: &str) -> bool {
    (s.starts_with("http://") || s.starts_with("https://")) && s.len() > "https://".len()
}

/// `BASE/QUOTE`, each 1–15 of `A–Z0–9`.
pub fn is_valid_symbol(s: &str) -> bool {
    let ok = |p: &str| {
        (1..=15).contains(&p.len())
            && p.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    };
    match s.split_once('/') {
        Some((b, q)) => ok(b) && ok(q),
        None => false,
    }
}

#[derive(Default)]
struct Validator {
    issues: Vec<ConfigIssue>,
}

impl Validator {
    fn bad(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.issues.push(ConfigIssue {
            path: path.into(),
            message: message.into(),
        });
    }
    fn min(&mut self, path: String, value: f64, min: f64) {
        if value < min {
            self.bad(path, format!("must be ≥ {min}, got {value}"));
        }
    }
    fn positive(&mut self, path: String, value: f64) {
        if !(value.is_finite() && value > 0.0) {
            self.bad(
                path,
                format!("must be a positive number of seconds, got {value}"),
            );
        }
    }
    fn non_negative(&mut self, path: String, value: f64) {
        if !(value.is_finite() && value >= 0.0) {
            self.bad(path, format!("must be ≥ 0 seconds, got {value}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn issues(text: &str) -> Vec<String> {
        let e = env(&[]);
        let r = Config::from_yaml(text, &e).and_then(|c| c.validate().map(|_| c));
        match r {
            Ok(_) => vec![],
            Err(ConfigError::Invalid(v)) => v.iter().map(ToString::to_string).collect(),
            Err(other) => vec![other.to_string()],
        }
    }

    #[test]
    fn defaults_are_the_seed() {
        let c = Config::default();
        c.validate().expect("defaults valid");
        assert_eq!(c.symbols.len(), 20);
        assert_eq!(c.schedule, "*/1 * * * *");
        assert_eq!(c.coordination.backend, CoordinationBackend::Memory);
        assert_eq!(c.agents.backend, AgentBackend::Rules);
        assert_eq!(c.agents.requests_per_minute, 100);
        assert_eq!(c.pipeline.advise_min_score, 70.0);
        assert_eq!(c.http.port, 8080);
        assert_eq!(c.http.bind, "0.0.0.0");
    }

    #[test]
    fn the_seed_file_is_accepted_as_written() {
        let text = include_str!("../config/seed.yaml");
        let c = Config::from_yaml(text, &env(&[("HOSTNAME", "pod-7")])).expect("parses");
        c.validate().expect("valid");
        assert_eq!(c.instance_id, "pod-7");
        assert_eq!(c.symbols.len(), 20);
        assert_eq!(c.circuit_breaker.redis.failure_threshold, 3);
        let c = Config::from_yaml(text, &env(&[])).expect("parses");
        assert_eq!(c.instance_id, "runner-1");
    }

    #[test]
    fn each_bad_input_names_its_key() {
        let cases: &[(&str, &str)] = &[
            (
                "autonomous_runner:\n  paralel:\n    max_concurrent: 3\n",
                "autonomous_runner.paralel",
            ),
            (
                "autonomous_runner:\n  parallel:\n    max_concurrent: ten\n",
                "autonomous_runner.parallel.max_concurrent",
            ),
            (
                "autonomous_runner:\n  parallel:\n    max_concurrent: 2\n    min_concurrent: 5\n",
                "autonomous_runner.parallel.min_concurrent",
            ),
            (
                "autonomous_runner:\n  schedule: \"every minute\"\n",
                "autonomous_runner.schedule",
            ),
            (
                "autonomous_runner:\n  symbols: []\n",
                "autonomous_runner.symbols",
            ),
            (
                "autonomous_runner:\n  symbols: [ETH/USD, ethusd]\n",
                "autonomous_runner.symbols[1]",
            ),
            (
                "autonomous_runner:\n  timeouts:\n    symbol_timeout_seconds: -5\n",
                "autonomous_runner.timeouts.symbol_timeout_seconds",
            ),
            (
                "autonomous_runner:\n  locks:\n    ttl_seconds: -1\n",
                "autonomous_runner.locks.ttl_seconds",
            ),
            (
                "autonomous_runner:\n  timezone: Mars/Base\n",
                "autonomous_runner.timezone",
            ),
            (
                "autonomous_runner:\n  parallel:\n    max_concurrent: 0\n",
                "autonomous_runner.parallel.max_concurrent",
            ),
            (
                "autonomous_runner:\n  coordination:\n    backend: zookeeper\n",
                "autonomous_runner.coordination.backend",
            ),
            (
                "autonomous_runner:\n  http:\n    port: 70000\n",
                "autonomous_runner.http.port",
            ),
            ("runner:\n  schedule: x\n", "runner"),
            // Issue 10: values that passed and then broke the service.
            (
                "autonomous_runner:\n  timeouts:\n    symbol_timeout_seconds: 2e19\n    symbol_timeout_max_seconds: 2e19\n    total_timeout_seconds: 2e19\n",
                "autonomous_runner.timeouts.symbol_timeout_seconds",
            ),
            (
                "autonomous_runner:\n  circuit_breaker:\n    llm_service:\n      failure_threshold: 5\n      recovery_timeout_seconds: 1e30\n",
                "autonomous_runner.circuit_breaker.llm_service.recovery_timeout_seconds",
            ),
            (
                "autonomous_runner:\n  locks:\n    stale_threshold_seconds: 20\n",
                "autonomous_runner.locks.stale_threshold_seconds",
            ),
            (
                "autonomous_runner:\n  timeouts:\n    total_timeout_seconds: 5\n",
                "autonomous_runner.timeouts.total_timeout_seconds",
            ),
            (
                "autonomous_runner:\n  schedule: \"*/61 * * * *\"\n",
                "autonomous_runner.schedule",
            ),
            (
                "autonomous_runner:\n  publish:\n    outbox_max: 4000000000\n",
                "autonomous_runner.publish.outbox_max",
            ),
            (
                "autonomous_runner:\n  publish:\n    replay_buffer: 4000000000\n",
                "autonomous_runner.publish.replay_buffer",
            ),
            ("", "config"),
            ("   \n", "config"),
            (
                "autonomous_runner:\n  coordination:\n    backend: redis\n    redis_url: \"redis://:pw@[::1\"\n",
                "autonomous_runner.coordination.redis_url",
            ),
            (
                "autonomous_runner:\n  parallel:\n    max_concurrent: 3\n    max_concurrent: 4\n",
                "autonomous_runner.parallel.max_concurrent",
            ),
        ];
        for (text, key) in cases {
            let got = issues(text);
            assert!(
                got.iter().any(|l| l.starts_with(&format!("{key}:"))),
                "{text:?}: expected an issue at {key}, got {got:?}"
            );
        }
    }

    #[test]
    fn secrets_in_bad_values_are_not_echoed() {
        let got = issues(
            "autonomous_runner:\n  coordination:\n    backend: redis\n    redis_url: \"redis://:hunter2-secret@[::1\"\n",
        );
        assert!(!got.is_empty());
        assert!(got.iter().all(|l| !l.contains("hunter2")), "{got:?}");
        let dup = issues("autonomous_runner:\n  symbols: [ETH/USD]\n  symbols: [BTC/USD]\n");
        assert_eq!(dup.len(), 1, "{dup:?}");
        assert!(
            dup[0].starts_with("autonomous_runner.symbols: is set twice")
                && !dup[0].contains("DuplicateKeyPolicy"),
            "{dup:?}"
        );
    }

    #[test]
    fn every_problem_is_reported_not_just_the_first() {
        let got = issues(
            "autonomous_runner:\n  symbols: []\n  parallel:\n    max_concurrent: 0\n  timeouts:\n    total_timeout_seconds: 0\n",
        );
        // symbols, max_concurrent, min > max, total timeout not positive, and below the call
        // timeout.
        assert_eq!(got.len(), 5, "{got:?}");
    }

    #[test]
    fn variables_expand_with_defaults() {
        let text = "autonomous_runner:\n  instance_id: \"${POD:-fallback}\"\n  http:\n    port: ${PORT:-9000}\n";
        let c = Config::from_yaml(text, &env(&[("POD", "pod-3")])).expect("parses");
        assert_eq!(c.instance_id, "pod-3");
        assert_eq!(c.http.port, 9000);
        let c = Config::from_yaml(text, &env(&[("PORT", "7000")])).expect("parses");
        assert_eq!(c.instance_id, "fallback");
        assert_eq!(c.http.port, 7000);
    }

    #[test]
    fn env_overrides_apply_and_bad_values_are_named() {
        let mut c = Config::default();
        c.apply_env(&env(&[
            ("SIGNAL_FREQUENCY_MINUTES", "5"),
            ("MAX_SYMBOLS", "3"),
            ("INSTANCE_ID", "replica-a"),
            ("REDIS_URL", "redis://:hunter2@redis:6379/2"),
            ("ADMIN_TOKEN", "tok-123"),
        ]))
        .expect("applies");
        assert_eq!(c.schedule, "*/5 * * * *");
        assert_eq!(c.symbols, vec!["ETH/USD", "BTC/USD", "SOL/USD"]);
        assert_eq!(c.instance_id, "replica-a");
        assert_eq!(
            c.coordination.redis_url.expose(),
            "redis://:hunter2@redis:6379/2"
        );
        let err = Config::default()
            .apply_env(&env(&[("SIGNAL_FREQUENCY_MINUTES", "soon")]))
            .expect_err("rejected");
        assert!(
            err.to_string().starts_with("SIGNAL_FREQUENCY_MINUTES:"),
            "{err}"
        );
    }

    #[test]
    fn secrets_never_print() {
        let mut c = Config::default();
        c.apply_env(&env(&[
            ("OPENROUTER_API_KEY", "sk-or-secret-value"),
            ("ADMIN_TOKEN", "admin-secret-value"),
            ("REDIS_URL", "redis://:redis-secret-value@h:6379"),
        ]))
        .expect("applies");
        let yaml = c.to_redacted_yaml();
        let debug = format!("{c:?}");
        for s in [
            "sk-or-secret-value",
            "admin-secret-value",
            "redis-secret-value",
        ] {
            assert!(!yaml.contains(s), "{s} in yaml");
            assert!(!debug.contains(s), "{s} in debug");
        }
        assert!(yaml.contains("<redacted>"));
    }

    #[test]
    fn redacted_yaml_round_trips_for_non_secret_keys() {
        let c = Config::default();
        let yaml = c.to_redacted_yaml();
        let back = Config::from_yaml(&yaml, &env(&[])).expect("re-parses");
        assert_eq!(back.schedule, c.schedule);
        assert_eq!(back.symbols, c.symbols);
    }

    #[test]
    fn symbols_shape() {
        assert!(is_valid_symbol("1INCH/USD"));
        assert!(!is_valid_symbol("ETH-USD"));
        assert!(!is_valid_symbol("eth/usd"));
        assert!(!is_valid_symbol("/USD"));
        assert!(!is_valid_symbol("ETH/USD/X"));
    }
}
