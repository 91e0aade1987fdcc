//! Typed configuration: the seed's YAML tree under `autonomous_runner:`, `${VAR}` /
//! `${VAR:-default}` expansion, environment overrides, and validation as a separate step that
//! reports every problem with its key path.
//!
//! Loading order: embedded defaults ← the YAML file (if any, with `${…}` expanded from the
//! environment) ← the environment overrides (`REDIS_URL`, `INSTANCE_ID`, …; see the README).
//! Then [`Config::validate`] checks the result as a whole.
//!
//! The parts: the types and loading here; `defaults` the embedded defaults; `env` the
//! environment lookup and overrides; `validate` the checks, every problem with its key.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::resilience::{BreakerMode, BreakerSettings};

mod agents;
mod defaults;
mod env;
mod strategies;
mod validate;

pub use agents::*;
pub use strategies::{
    BollingerBounce, EmaTrend, MacdCross, Momentum, RsiReversal, Strategies, VolumeBreakout,
};

pub use env::{Env, ProcessEnv};
pub use validate::is_valid_symbol;

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
    /// The rules strategies' parameters (read by every backend: the rules agent, the LLM
    /// prompt, the tools).
    pub strategies: Strategies,
    /// Publishing and history.
    pub publish: Publish,
    /// The HTTP server.
    pub http: Http,
    /// The seed's spelling of the history database URL (`postgres.url`); `history.url` wins.
    pub postgres: Postgres,
    /// Every published message stored, every signal graded.
    pub history: History,
    /// Where metrics go besides `/metrics`.
    pub metrics: MetricsConfig,
}

/// `metrics:`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// A Prometheus Pushgateway (`http://pushgateway:9091`): each `once` run pushes its
    /// metrics there as it ends (a CronJob pod lives too briefly to be scraped). Env
    /// `PUSHGATEWAY_URL`. Empty: no push.
    pub pushgateway_url: String,
}

/// `parallel:`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Parallel {
    /// Symbols processed at once (the pool's limit).
    pub max_concurrent: usize,
    /// The floor the limit is halved to during high latency.
    pub min_concurrent: usize,
    /// At most `max_concurrent` symbols start per this many milliseconds: dispatches are
    /// spaced by `batch_delay_ms / concurrency` (the seed's pause between batches as a steady
    /// rate; the pool has no batch barrier). 0 (the default): no spacing.
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
    /// Lock keys are `{coordination.key_prefix}{redis_key_prefix}{symbol}` (default
    /// `signal:lock:`).
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

/// `circuit_breaker:`. Each breaker's keys default one by one to that breaker's defaults, so
/// an override such as `redis: {mode: disabled}` needs nothing else.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(from = "CircuitBreakersFile")]
pub struct CircuitBreakers {
    /// The LLM backend's breaker.
    pub llm_service: BreakerConfig,
    /// The Redis breaker.
    pub redis: BreakerConfig,
}

/// `circuit_breaker:` as written: each breaker's keys are optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct CircuitBreakersFile {
    llm_service: BreakerOverride,
    redis: BreakerOverride,
}

/// The keys of one breaker that a file sets.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct BreakerOverride {
    failure_threshold: Option<u32>,
    recovery_timeout_seconds: Option<f64>,
    half_open_max_calls: Option<u32>,
    success_threshold: Option<u32>,
    mode: Option<BreakerMode>,
}

impl BreakerOverride {
    /// `base` with the keys set here replaced.
    fn over(self, base: BreakerConfig) -> BreakerConfig {
        BreakerConfig {
            failure_threshold: self.failure_threshold.unwrap_or(base.failure_threshold),
            recovery_timeout_seconds: self
                .recovery_timeout_seconds
                .unwrap_or(base.recovery_timeout_seconds),
            half_open_max_calls: self.half_open_max_calls.unwrap_or(base.half_open_max_calls),
            success_threshold: self.success_threshold.unwrap_or(base.success_threshold),
            mode: self.mode.unwrap_or(base.mode),
        }
    }
}

impl From<CircuitBreakersFile> for CircuitBreakers {
    fn from(f: CircuitBreakersFile) -> Self {
        let d = CircuitBreakers::default();
        CircuitBreakers {
            llm_service: f.llm_service.over(d.llm_service),
            redis: f.redis.over(d.redis),
        }
    }
}

/// One breaker's settings.
#[derive(Debug, Clone, Serialize)]
pub struct BreakerConfig {
    /// Consecutive failures that open it.
    pub failure_threshold: u32,
    /// Seconds open before probing.
    pub recovery_timeout_seconds: f64,
    /// Probes per half-open period.
    pub half_open_max_calls: u32,
    /// Probe successes that close it.
    pub success_threshold: u32,
    /// Operator override: `normal`, `forced_open`, `disabled`.
    pub mode: BreakerMode,
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
    /// With work sharing, the time over which a replica spreads its claims of a tick (at most
    /// a quarter of the period): each replica claims in an order of its own, the `k`-th of
    /// `n` symbols no sooner than `k/n` of this after the tick, so a symbol goes to the
    /// replica that has it nearest the front and every live replica gets a part — rather
    /// than all of them to whichever replica woke a millisecond first. 0: claim at once.
    pub claim_spread_ms: u64,
}

/// Candle source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MarketSource {
    /// Deterministic random walk per symbol.
    Simulated,
    /// Coinbase Exchange public candles.
    Coinbase,
    /// An InfluxDB measurement of 1-minute candles (TradeStream keeps its candles there).
    Influxdb,
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
    /// The InfluxDB source (`source: influxdb`).
    pub influxdb: InfluxConfig,
}

/// `market_data.influxdb:` 1-minute candles in an InfluxDB measurement, one series per symbol
/// (a tag), fields `open`, `high`, `low`, `close`, `volume`, time = the minute's start; read
/// over the HTTP query API (`/query`, InfluxQL: InfluxDB 1.x, or 2.x's 1.x-compatible API).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InfluxConfig {
    /// Base URL. Env `INFLUXDB_URL`.
    pub url: String,
    /// The database (2.x: the bucket mapped to it).
    pub database: String,
    /// The measurement holding the candles.
    pub measurement: String,
    /// The tag naming the symbol (values like `BTC/USD`).
    pub symbol_tag: String,
    /// API token, sent as `Authorization: Token …`. Env `INFLUXDB_TOKEN`; never printed.
    pub token: Secret,
    /// A newest candle older than this (seconds) makes the symbol fail as stale rather than
    /// be analysed on old prices.
    pub max_staleness_seconds: u64,
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
    /// Where outbox messages that could not reach Redis by the end of a shutdown are written,
    /// to be delivered at the next start. Default: `outbox-spool.jsonl` beside
    /// `history.path`; empty: no spool (they are lost, and counted).
    pub spool_path: Option<String>,
}

impl Config {
    /// The outbox spool file, if any (see [`Publish::spool_path`]).
    pub fn spool_path(&self) -> Option<std::path::PathBuf> {
        match &self.publish.spool_path {
            Some(p) if p.is_empty() => None,
            Some(p) => Some(p.into()),
            None => Some(
                std::path::Path::new(&self.history.path)
                    .parent()
                    .unwrap_or(std::path::Path::new("."))
                    .join("outbox-spool.jsonl"),
            ),
        }
    }
}

impl Config {
    /// Checks, on the filesystem, that the files the service writes only in an emergency can
    /// be written: the outbox spool (written at a shutdown with Redis down — the one moment a
    /// failure loses messages) must not be found unwritable then. Does what the spool write
    /// does (creates the directory, writes and removes a temporary file beside it), so run it
    /// at start, not in `check-config`.
    pub fn check_writable_paths(&self) -> Result<(), ConfigError> {
        if self.coordination.backend != CoordinationBackend::Redis {
            return Ok(());
        }
        let Some(path) = self.spool_path() else {
            return Ok(());
        };
        let key = "autonomous_runner.publish.spool_path";
        let bad = |why: String| {
            Err(ConfigError::one(
                key,
                format!(
                    "{} cannot be written ({why}); the outbox spool keeps what Redis has not received at a shutdown: give it a writable file path (a volume in Kubernetes), or \"\" for no spool",
                    path.display()
                ),
            ))
        };
        if path.is_dir() {
            return bad("it is a directory".into());
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            return bad(format!("cannot create {}: {e}", dir.display()));
        }
        let probe = path.with_extension("jsonl.tmp");
        match std::fs::write(&probe, b"") {
            Ok(()) => {
                let _ = std::fs::remove_file(&probe);
                Ok(())
            }
            Err(e) => bad(e.to_string()),
        }
    }
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
    /// Dashboard (SSE) streams open at once; never more than three quarters of the
    /// connection cap, so probes and the API always find a connection. Beyond it: 503 with
    /// `Retry-After`.
    pub max_sse_streams: usize,
    /// Streams one client address may hold (0: no such limit — behind a proxy that hides
    /// client addresses every client shares one).
    pub max_sse_streams_per_client: usize,
    /// `Host` names `/mcp` accepts without a token, beside the loopback names (`localhost`,
    /// `127.0.0.1`, `::1`): e.g. a compose or Kubernetes service name (`runner`,
    /// `runner.signals.svc`), with `:port` to accept that port only. The check keeps a web page
    /// from reaching the tools through DNS rebinding; with `ADMIN_TOKEN` set the token is the
    /// gate and any host is accepted. Default: none.
    pub allowed_hosts: Vec<String>,
}

/// `postgres:` — the seed's key, kept so its files load: `postgres.url` is the history
/// database when `history.url` is not set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Postgres {
    /// PostgreSQL URL of the history store; never printed.
    pub url: Secret,
}

/// `history:` — the signal history and its grading.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct History {
    /// Store and grade at all. Default true.
    pub enabled: bool,
    /// The embedded SQLite file, used when no PostgreSQL URL is set (created with its
    /// directory on first start). Env `HISTORY_PATH`. Default `./data/history.sqlite`.
    pub path: String,
    /// PostgreSQL URL (`postgres://…`); env `POSTGRES_URL`; never printed. Empty: SQLite.
    pub url: Secret,
    /// Rows older than this are deleted (hourly). Default 30.
    pub retention_days: u32,
    /// Messages waiting to be written while the database is slow or down; past it the oldest
    /// are dropped and counted. Default 100,000 (about 80 minutes of 20 symbols).
    pub queue_max: usize,
    /// Messages written per transaction. Default 500.
    pub batch_size: usize,
    /// How signals are graded.
    pub grading: Grading,
    /// How stated confidence is calibrated against the grades.
    pub calibration: Calibration,
}

/// `history.calibration:` every signal's `calibrated_confidence` is the observed hit rate, at
/// one horizon, of the signals of its model and action at its confidence, once the group has
/// enough grades.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Calibration {
    /// The horizon a calibrated confidence is the hit probability at; one of
    /// `grading.horizons_minutes`. Unset: 15 when that is graded, else the first graded
    /// horizon (so a custom list of horizons needs no second setting).
    pub horizon_minutes: Option<u32>,
    /// Grades a (model, action) group needs before its signals are calibrated; until then
    /// `calibrated_confidence` is null and the message says how many there are. Default 1,000:
    /// grades taken every minute at a 15-minute horizon overlap, so a thousand of them are
    /// worth far fewer independent outcomes (see `history::calibration`).
    pub min_grades: u64,
    /// The weight, in grades, of the prior each confidence bin is shrunk by toward its
    /// group's base rate: a bin needs this many grades of its own before it moves halfway
    /// from the group's rate. Default 100.
    pub prior_grades: f64,
    /// How often the calibration is refitted from the grades. Default 60.
    pub refit_seconds: u64,
}

/// `history.grading:`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Grading {
    /// Horizons after `data_as_of` at which each signal is graded. Default 5, 15, 60.
    pub horizons_minutes: Vec<u32>,
    /// A move within ± this (percent) is flat: HOLD hits, BUY and SELL miss. Default 0.1.
    pub threshold_pct: f64,
    /// How often due grades are looked for. Default 30.
    pub interval_seconds: u64,
}

impl History {
    /// The calibration horizon in force (see [`Calibration::horizon_minutes`]).
    pub fn calibration_horizon(&self) -> u32 {
        let graded = &self.grading.horizons_minutes;
        match self.calibration.horizon_minutes {
            Some(m) => m,
            None if graded.contains(&15) || graded.is_empty() => 15,
            None => graded[0],
        }
    }

    /// The PostgreSQL URL in force (`history.url`, else the seed's `postgres.url`), if any.
    pub fn postgres_url<'a>(&'a self, seed: &'a Postgres) -> Option<&'a Secret> {
        [&self.url, &seed.url].into_iter().find(|u| !u.is_empty())
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

    /// Every secret value (and the password inside the Redis URL), for log redaction.
    pub fn secrets(&self) -> Vec<String> {
        let mut v: Vec<String> = [
            &self.agents.api_key,
            &self.http.admin_token,
            &self.coordination.redis_url,
            &self.postgres.url,
            &self.history.url,
            &self.agents.opencode.password,
            &self.market_data.influxdb.token,
        ]
        .iter()
        .map(|s| s.expose().to_string())
        .filter(|s| !s.is_empty())
        .collect();
        for url in [
            &self.coordination.redis_url,
            &self.postgres.url,
            &self.history.url,
        ] {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

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
    fn a_partial_breaker_override_keeps_that_breakers_other_defaults() {
        let text = "autonomous_runner:\n  circuit_breaker:\n    redis:\n      mode: disabled\n    llm_service:\n      failure_threshold: 9\n";
        assert_eq!(issues(text), Vec::<String>::new());
        let c = Config::from_yaml(text, &env(&[])).expect("a partial override is valid");
        let d = CircuitBreakers::default();
        assert_eq!(c.circuit_breaker.redis.mode, BreakerMode::Disabled);
        assert_eq!(
            c.circuit_breaker.redis.failure_threshold,
            d.redis.failure_threshold
        );
        assert_eq!(
            c.circuit_breaker.redis.recovery_timeout_seconds,
            d.redis.recovery_timeout_seconds
        );
        assert_eq!(c.circuit_breaker.llm_service.failure_threshold, 9);
        assert_eq!(
            c.circuit_breaker.llm_service.half_open_max_calls,
            d.llm_service.half_open_max_calls
        );
        assert_eq!(c.circuit_breaker.llm_service.mode, d.llm_service.mode);
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
        let text = include_str!("../../config/seed.yaml");
        let c = Config::from_yaml(text, &env(&[("HOSTNAME", "pod-7")])).expect("parses");
        c.validate().expect("valid");
        assert_eq!(c.instance_id, "pod-7");
        assert_eq!(c.symbols.len(), 20);
        assert_eq!(c.circuit_breaker.redis.failure_threshold, 3);
        let c = Config::from_yaml(text, &env(&[])).expect("parses");
        assert_eq!(c.instance_id, "runner-1");
    }

    /// Unset, the burst is half the rate limit (a tick's calls at once, half the limit
    /// sustained); set, it is taken as written and checked against the limit.
    #[test]
    fn the_burst_follows_the_rate_limit_unless_set() {
        let burst = |yaml: &str| {
            let c = Config::from_yaml(yaml, &env(&[])).expect("parses");
            c.validate().expect("valid");
            c.agents.burst()
        };
        assert_eq!(burst("autonomous_runner: {}\n"), 50);
        assert_eq!(
            burst("autonomous_runner:\n  agents:\n    requests_per_minute: 30\n"),
            15
        );
        assert_eq!(
            burst("autonomous_runner:\n  agents:\n    requests_per_minute: 1\n"),
            1
        );
        assert_eq!(burst("autonomous_runner:\n  agents:\n    burst: 10\n"), 10);
        let bad = issues("autonomous_runner:\n  agents:\n    burst: 0\n");
        assert!(
            bad.iter()
                .any(|i| i.contains("agents.burst") && i.contains("≥ 1")),
            "{bad:?}"
        );
        let bad =
            issues("autonomous_runner:\n  agents:\n    requests_per_minute: 20\n    burst: 30\n");
        assert!(
            bad.iter()
                .any(|i| i.contains("agents.burst") && i.contains("requests_per_minute (20)")),
            "{bad:?}"
        );
    }

    /// Unset, the calibration horizon follows the grading: 15 minutes when graded, else the
    /// first graded horizon, so a custom list of horizons needs no second setting.
    #[test]
    fn the_calibration_horizon_follows_the_graded_horizons_unless_set() {
        let horizon = |yaml: &str| {
            let c = Config::from_yaml(yaml, &env(&[])).expect("parses");
            (c.history.calibration_horizon(), c.validate().is_ok())
        };
        assert_eq!(horizon("autonomous_runner: {}\n"), (15, true));
        let custom =
            "autonomous_runner:\n  history:\n    grading:\n      horizons_minutes: [5, 60]\n";
        assert_eq!(horizon(custom), (5, true));
        let set = "autonomous_runner:\n  history:\n    grading:\n      horizons_minutes: [5, 60]\n    calibration:\n      horizon_minutes: 60\n";
        assert_eq!(horizon(set), (60, true));
        let ungraded =
            "autonomous_runner:\n  history:\n    calibration:\n      horizon_minutes: 30\n";
        assert_eq!(horizon(ungraded), (30, false));
    }

    #[test]
    fn stage_tools_are_checked_by_name_and_default_per_stage() {
        let got = issues(
            "autonomous_runner:\n  agents:\n    stages:\n      advise:\n        tools: [get_volatility, get_volatilty, get_volatility]\n",
        );
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(
            got[0].starts_with("autonomous_runner.agents.stages.advise.tools[1]: \"get_volatilty\" is not a tool; the tools are get_candles,"),
            "{got:?}"
        );
        assert_eq!(
            got[1],
            "autonomous_runner.agents.stages.advise.tools[2]: \"get_volatility\" is listed twice"
        );
        let c = Config::from_yaml(
            "autonomous_runner:\n  agents:\n    stages:\n      report:\n        tools: [get_candles]\n",
            &env(&[]),
        )
        .expect("parses");
        assert_eq!(
            c.agents.stage_tools(crate::model::Stage::Report),
            ["get_candles"]
        );
        assert_eq!(
            c.agents.stage_tools(crate::model::Stage::Signal),
            default_stage_tools(crate::model::Stage::Signal)
        );
        assert!(c.agents.stage_tools(crate::model::Stage::Score).is_empty());
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
            // Issue 23: relations that were not checked.
            (
                "autonomous_runner:\n  agents:\n    budget:\n      tokens_per_hour: 50000\n      tokens_per_day: 20000\n",
                "autonomous_runner.agents.budget.tokens_per_day",
            ),
            (
                "autonomous_runner:\n  adaptive:\n    p95_threshold_ms: 20000\n    p99_threshold_ms: 15000\n",
                "autonomous_runner.adaptive.p99_threshold_ms",
            ),
            (
                "autonomous_runner:\n  circuit_breaker:\n    redis:\n      mode: sideways\n",
                "autonomous_runner.circuit_breaker.redis.mode",
            ),
            (
                "autonomous_runner:\n  circuit_breaker:\n    redis:\n      failure_treshold: 3\n",
                "autonomous_runner.circuit_breaker.redis.failure_treshold",
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
