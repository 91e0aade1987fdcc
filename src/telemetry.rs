//! Logging (text or JSON, `LOG_LEVEL` / `LOG_FORMAT`) and every metric name in one place.
//!
//! Metric names follow Prometheus conventions: prefix `autonomous_runner_`, counters end in
//! `_total`, durations are seconds. Label values are always from a fixed set (a stage, an
//! action, a configured symbol, a reason constant) — never free text.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Metric names (full, with prefix).
pub mod names {
    macro_rules! m {
        ($(#[doc = $doc:literal] $id:ident = $name:literal;)*) => {
            $( #[doc = $doc] pub const $id: &str = concat!("autonomous_runner_", $name); )*
            /// Every name with its description (the doc line, which starts with the kind).
            pub const ALL: &[(&str, &str)] = &[$(($id, $doc.trim_ascii())),*];
        };
    }
    m! {
        /// Counter {symbol, action}: signals produced.
        SIGNAL_GENERATION = "signal_generation_total";
        /// Counter {symbol, reason}: symbols that produced nothing this cycle.
        SIGNAL_GENERATION_SKIPPED = "signal_generation_skipped_total";
        /// Counter: cycles that failed as a whole.
        CYCLE_FAILURES = "cycle_failures_total";
        /// Counter: cycles skipped because the LLM breaker was open.
        CYCLES_SKIPPED_CIRCUIT_OPEN = "cycles_skipped_circuit_open_total";
        /// Counter: cycles skipped for high latency.
        CYCLES_SKIPPED_HIGH_LATENCY = "cycles_skipped_high_latency_total";
        /// Counter {reason}: every skipped tick, by reason.
        CYCLES_SKIPPED = "cycles_skipped_total";
        /// Counter: cycles run.
        CYCLES = "cycles_total";
        /// Counter: ticks missed while the process was stalled (not replayed).
        TICKS_MISSED = "ticks_missed_total";
        /// Counter {direction}: steps of the wall clock the scheduler noticed (`forward`, `back`).
        CLOCK_STEPS = "clock_steps_total";
        /// Counter {reason}: stale locks taken over.
        STALE_LOCKS_RECOVERED = "stale_locks_recovered_total";
        /// Counter: locks whose release failed in a Redis outage, released once it answered (instead of expiring).
        LEFTOVER_LOCKS_RELEASED = "leftover_locks_released_total";
        /// Counter: heartbeats that found this instance_id claimed by another process (this one then stops).
        INSTANCE_CONFLICTS = "instance_conflicts_total";
        /// Counter {breaker}: calls rejected by a breaker.
        CIRCUIT_BREAKER_REJECTED = "circuit_breaker_rejected_total";
        /// Counter: backpressure cooldowns started.
        BACKPRESSURE_COOLDOWNS = "backpressure_cooldowns_total";
        /// Gauge: signals (reports) produced by the last cycle.
        SIGNALS_GENERATED_LAST_CYCLE = "signals_generated_last_cycle";
        /// Gauge: locks held by this instance.
        ACTIVE_LOCKS = "active_locks";
        /// Gauge: symbols being processed now.
        SYMBOLS_PROCESSING = "symbols_processing";
        /// Gauge {breaker}: 0 closed, 0.5 half-open, 1 open.
        CIRCUIT_BREAKER_STATE = "circuit_breaker_state";
        /// Gauge: the pool limit in force.
        ADAPTIVE_BATCH_SIZE = "adaptive_batch_size";
        /// Gauge: p95 of recent agent-call latencies, milliseconds (the seed's name).
        CURRENT_P95_LATENCY_MS = "current_p95_latency_ms";
        /// Gauge: the same p95 in seconds, the unit Prometheus's conventions ask for (use this one in new rules and panels).
        CURRENT_P95_LATENCY_SECONDS = "current_p95_latency_seconds";
        /// Gauge: Unix time of the last completed cycle (the start time until one completes).
        LAST_CYCLE_TIMESTAMP_SECONDS = "last_cycle_timestamp_seconds";
        /// Histogram: cycle wall time.
        CYCLE_DURATION_SECONDS = "cycle_duration_seconds";
        /// Histogram {symbol}: one symbol's pipeline wall time.
        SYMBOL_PROCESSING_DURATION_SECONDS = "symbol_processing_duration_seconds";
        /// Histogram {stage}: one stage's LLM agent call, retries and tool rounds included (rules answers and rules fallbacks are not LLM calls and are not recorded).
        LLM_LATENCY_SECONDS = "llm_latency_seconds";
        /// Histogram {stage, backend}: one agent request (an LLM request or an OpenCode prompt), the latency the gate reads.
        AGENT_CALL_DURATION_SECONDS = "agent_call_duration_seconds";
        /// Counter {stage, outcome}: model answers read, by outcome (`accepted`, `repaired`, `rejected`).
        AGENT_OUTPUTS = "agent_outputs_total";
        /// Counter {tool, outcome}: agent tool calls (MCP or in-process), by outcome (`ok` or the error code in lower case, e.g. `invalid_symbol`).
        MCP_TOOL_CALLS = "mcp_tool_calls_total";
        /// Histogram {tool}: one tool call's time, cached answers included.
        MCP_TOOL_DURATION_SECONDS = "mcp_tool_duration_seconds";
        /// Counter {outcome}: OpenCode's model requests at the runner's gateway (`forwarded`, `over_allowance`, `rate_limited`, `budget_exhausted`, `unknown_session`, `upstream_unreachable`).
        OPENCODE_MODEL_REQUESTS = "opencode_model_requests_total";
        /// Counter {stage, outcome}: backup requests sent for stragglers (`won`: the backup's answer was used; `lost`: it was not).
        AGENT_HEDGES = "agent_hedges_total";
        /// Counter {stage, outcome}: follow-up turns that showed a model the errors of its rejected answer (`fixed`: the next answer was good; `still_invalid`: it was not; `failed`: the follow-up request itself failed).
        AGENT_REPROMPTS = "agent_reprompts_total";
        /// Gauge {backend}: requests the backend's endpoint is sent at once, learned from its latency.
        LLM_CONCURRENCY_LIMIT = "llm_concurrency_limit";
        /// Counter {stage}: stage messages published.
        MESSAGES_PUBLISHED = "messages_published_total";
        /// Histogram {stage}: how stale a stage's message is when published — from its tick to its publication; the report stage's is what a dashboard user waits.
        SIGNAL_FRESHNESS_SECONDS = "signal_freshness_seconds";
        /// Gauge: kill switch active (1) or not (0).
        KILL_SWITCH_ACTIVE = "kill_switch_active";
        /// Counter {stage, outcome}: LLM requests by result.
        LLM_REQUESTS = "llm_requests_total";
        /// Counter {stage, kind}: tokens used (`input`, `output`).
        LLM_TOKENS = "llm_tokens_total";
        /// Counter {window}: LLM calls refused because the token budget was spent.
        LLM_BUDGET_EXHAUSTED = "llm_budget_exhausted_total";
        /// Gauge: tokens used by the last cycle.
        LLM_TOKENS_LAST_CYCLE = "llm_tokens_last_cycle";
        /// Histogram: time spent waiting for a rate-limit slot.
        RATE_LIMIT_WAIT_SECONDS = "rate_limit_wait_seconds";
        /// Gauge: messages waiting in the Redis outbox.
        OUTBOX_DEPTH = "outbox_depth";
        /// Counter: messages dropped from a full outbox.
        OUTBOX_DROPPED = "outbox_dropped_total";
        /// Counter {outcome}: cycle lease attempts (`won`, `held_elsewhere`).
        LEASE = "cycle_lease_total";
        /// Gauge: open SSE streams.
        SSE_CLIENTS = "sse_clients";
        /// Counter {reason}: SSE streams refused with 503 (`streams_full`, `client_limit`).
        SSE_REJECTED = "sse_rejected_total";
        /// Counter: SSE clients dropped for being too slow.
        SSE_CLIENTS_DROPPED = "sse_clients_dropped_total";
        /// Gauge {version}: always 1.
        BUILD_INFO = "build_info";
        /// Counter: log lines dropped because stderr was slow or its reader gone.
        LOG_LINES_DROPPED = "log_lines_dropped_total";
        /// Counter: stage messages newly stored in the history (a re-publish adds none).
        HISTORY_WRITTEN = "history_rows_written_total";
        /// Counter {reason}: messages the history never stored (`queue_full`: the oldest, while the database was down too long; `unreadable`).
        HISTORY_DROPPED = "history_dropped_total";
        /// Gauge: messages waiting to be written to the history database.
        HISTORY_QUEUE = "history_queue_depth";
        /// Counter: history batches that failed to write (retried).
        HISTORY_WRITE_FAILURES = "history_write_failures_total";
        /// Counter {horizon, outcome}: (signal, horizon) grades recorded by this replica (`hit`, `miss`, `missing_price`).
        SIGNALS_GRADED = "signals_graded_total";
        /// Gauge {horizon}: share of the last 24 hours' graded signals that hit.
        SIGNAL_HIT_RATE = "signal_hit_rate";
    }
}

/// Histogram buckets for durations in seconds: from 1 ms to 2 minutes.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Registers the HELP text of every metric (Prometheus tools expect it).
fn describe_all() {
    for (name, doc) in names::ALL {
        // "Counter {labels}: what it counts." → "What it counts."
        let help = doc.split_once(": ").map_or(*doc, |(_, h)| h).to_string();
        if doc.starts_with("Counter") {
            metrics::describe_counter!(*name, help);
        } else if doc.starts_with("Histogram") {
            metrics::describe_histogram!(*name, help);
        } else {
            metrics::describe_gauge!(*name, help);
        }
    }
}

/// Creates the series that would otherwise appear only after their first event, so
/// dashboards and alerts see zeros instead of nothing: the counters without labels, the
/// bounded label sets, the per-symbol counters of the configured symbols, and the LLM
/// series of every `(stage, backend)` in `llm_stages` (empty histograms until the first call).
pub fn init_series(symbols: &[String], breakers: &[String], llm_stages: &[(&str, &str)]) {
    use names::*;
    for n in [
        CYCLE_FAILURES,
        CYCLES_SKIPPED_CIRCUIT_OPEN,
        CYCLES_SKIPPED_HIGH_LATENCY,
        BACKPRESSURE_COOLDOWNS,
        TICKS_MISSED,
        CYCLES,
        LOG_LINES_DROPPED,
        SSE_CLIENTS_DROPPED,
        OUTBOX_DROPPED,
    ] {
        metrics::counter!(n).absolute(0);
    }
    // Gauges read as "nothing yet" at zero. Not the hit rate: 0 would read as "always wrong"
    // before anything was graded, so it appears with the first grade.
    for g in [SSE_CLIENTS, LLM_TOKENS_LAST_CYCLE] {
        metrics::gauge!(g).set(0.0);
    }
    for stage in ["signal", "score", "advise", "report"] {
        metrics::counter!(MESSAGES_PUBLISHED, "stage" => stage).absolute(0);
    }
    for outcome in ["won", "held_elsewhere"] {
        metrics::counter!(LEASE, "outcome" => outcome).absolute(0);
    }
    for window in ["hour", "day"] {
        metrics::counter!(LLM_BUDGET_EXHAUSTED, "window" => window).absolute(0);
    }
    for outcome in [
        "forwarded",
        "over_allowance",
        "rate_limited",
        "budget_exhausted",
        "unknown_session",
        "upstream_unreachable",
    ] {
        metrics::counter!(OPENCODE_MODEL_REQUESTS, "outcome" => outcome).absolute(0);
    }
    for stage in ["signal", "advise", "report"] {
        for outcome in ["accepted", "repaired", "rejected"] {
            metrics::counter!(AGENT_OUTPUTS, "stage" => stage, "outcome" => outcome).absolute(0);
        }
        for outcome in ["won", "lost"] {
            metrics::counter!(AGENT_HEDGES, "stage" => stage, "outcome" => outcome).absolute(0);
        }
        for outcome in ["fixed", "still_invalid", "failed"] {
            metrics::counter!(AGENT_REPROMPTS, "stage" => stage, "outcome" => outcome).absolute(0);
        }
    }
    for reason in ["age", "heartbeat_missing"] {
        metrics::counter!(STALE_LOCKS_RECOVERED, "reason" => reason).absolute(0);
    }
    for &(stage, backend) in llm_stages {
        let (stage, backend) = (stage.to_string(), backend.to_string());
        // Registering a histogram is enough for the exporter to render it (count 0).
        let _ = metrics::histogram!(AGENT_CALL_DURATION_SECONDS, "stage" => stage.clone(), "backend" => backend);
        let _ = metrics::histogram!(LLM_LATENCY_SECONDS, "stage" => stage.clone());
        for kind in ["input", "output"] {
            metrics::counter!(LLM_TOKENS, "stage" => stage.clone(), "kind" => kind).absolute(0);
        }
    }
    for b in breakers {
        metrics::counter!(CIRCUIT_BREAKER_REJECTED, "breaker" => b.clone()).absolute(0);
        metrics::gauge!(CIRCUIT_BREAKER_STATE, "breaker" => b.clone()).set(0.0);
    }
    for s in symbols {
        for action in ["BUY", "SELL", "HOLD"] {
            metrics::counter!(SIGNAL_GENERATION, "symbol" => s.clone(), "action" => action)
                .absolute(0);
        }
        metrics::counter!(SIGNAL_GENERATION_SKIPPED, "symbol" => s.clone(), "reason" => "timeout")
            .absolute(0);
    }
    for n in [
        ACTIVE_LOCKS,
        SYMBOLS_PROCESSING,
        SIGNALS_GENERATED_LAST_CYCLE,
        CURRENT_P95_LATENCY_MS,
        CURRENT_P95_LATENCY_SECONDS,
        KILL_SWITCH_ACTIVE,
    ] {
        metrics::gauge!(n).set(0.0);
    }
}

/// Installs the Prometheus recorder once per process and returns its handle (for
/// `/metrics`). Later calls return the same handle.
pub fn metrics_handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), DURATION_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (a test harness); then ours only
            // renders what it sees, which is nothing — acceptable for tests, never in main.
            let _ = metrics::set_global_recorder(recorder);
            describe_all();
            metrics::gauge!(names::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Keeps the log writer's worker alive; dropping it flushes what is queued (bounded wait).
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard(#[allow(dead_code)] tracing_appender::non_blocking::WorkerGuard);

impl std::fmt::Debug for LogGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogGuard")
    }
}

/// Lines the log writer could not keep (the sink was slow or gone).
static DROPPED: OnceLock<tracing_appender::non_blocking::ErrorCounter> = OnceLock::new();

/// Log lines dropped so far because stderr could not keep up (or its reader is gone).
pub fn log_lines_dropped() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Lines queued for stderr at most. A slow or closed sink costs dropped lines, never a
/// stalled runtime: at ~300 bytes a line this is ~3 MB at worst.
const LOG_QUEUE_LINES: usize = 10_000;

/// Initialises tracing from `LOG_LEVEL` (default `info`; any `EnvFilter` directive) and
/// `LOG_FORMAT` (`text` or `json`). Returns an error naming the variable when either is bad.
///
/// Logging never blocks the runtime: lines go through a bounded queue to a writer thread;
/// when stderr is slow or its reader is gone (a log shipper restarting, `| head`), lines
/// are dropped and counted (`log_lines_dropped_total`) instead. Every line passes through
/// [`redact`] on its way out.
pub fn init_tracing(level: Option<&str>, format: Option<&str>) -> Result<LogGuard, String> {
    use tracing_subscriber::EnvFilter;
    let level = level.unwrap_or("info").to_ascii_lowercase();
    let filter = EnvFilter::try_new(&level).map_err(|e| format!("LOG_LEVEL: {e}"))?;
    let format = match format.map(|f| f.to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => return Err(format!("LOG_FORMAT: must be text or json, got {other:?}")),
    };
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let _ = DROPPED.set(writer.error_counter());
    // Colours only for a person at a terminal: a log file, `kubectl logs` or a log shipper
    // would get escape codes in the middle of its text. NO_COLOR (no-color.org) turns them
    // off on a terminal too.
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours)
        .with_writer(Redacting(writer));
    let r = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    r.map_err(|e| format!("cannot initialise logging: {e}"))?;
    Ok(LogGuard(guard))
}

/// Every configured secret, longest first (so a secret containing another is replaced whole).
static SECRETS: std::sync::RwLock<Vec<String>> = std::sync::RwLock::new(Vec::new());

/// What a secret is replaced with.
pub const REDACTED: &str = "[REDACTED]";

/// Registers the secrets to strip from every log line, whatever their source (a provider
/// that echoes the `Authorization` header in an error body included). Values shorter than 4
/// characters are ignored: they would redact ordinary words.
pub fn redact_secrets<I: IntoIterator<Item = String>>(secrets: I) {
    let mut v: Vec<String> = secrets.into_iter().filter(|s| s.len() >= 4).collect();
    v.sort_by_key(|s| std::cmp::Reverse(s.len()));
    v.dedup();
    *SECRETS.write().unwrap_or_else(|p| p.into_inner()) = v;
}

/// `text` with every registered secret replaced by [`REDACTED`].
pub fn redact(text: &str) -> std::borrow::Cow<'_, str> {
    let secrets = SECRETS.read().unwrap_or_else(|p| p.into_inner());
    if !secrets.iter().any(|s| text.contains(s.as_str())) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = text.to_string();
    for s in secrets.iter() {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), REDACTED);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A `MakeWriter` whose writers redact secrets from what passes through.
#[derive(Debug, Clone)]
struct Redacting<M>(M);

impl<'a, M: tracing_subscriber::fmt::MakeWriter<'a>> tracing_subscriber::fmt::MakeWriter<'a>
    for Redacting<M>
{
    type Writer = RedactingWriter<M::Writer>;
    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter(self.0.make_writer())
    }
}

/// Redacts each write: the fmt layer writes one whole line per event.
struct RedactingWriter<W>(W);

impl<W: std::io::Write> std::io::Write for RedactingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::str::from_utf8(buf) {
            Ok(text) => match redact(text) {
                std::borrow::Cow::Borrowed(_) => self.0.write_all(buf),
                std::borrow::Cow::Owned(clean) => self.0.write_all(clean.as_bytes()),
            },
            Err(_) => self.0.write_all(buf),
        }?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Pushes `text` (the Prometheus exposition) to the Pushgateway at `base`, replacing the group
/// `job="autonomous-runner", instance=<instance>`: a `once` pod ends before any scrape. A
/// failure is logged (naming the host, never credentials in the URL) and does not change the
/// run's outcome.
pub async fn push_metrics(base: &str, instance: &str, text: String) {
    let host = reqwest::Url::parse(base)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default();
    let url = format!(
        "{}/metrics/job/autonomous-runner/instance/{}",
        base.trim_end_matches('/'),
        // A path segment: the id is [A-Za-z0-9._-] in practice, anything else is escaped.
        instance
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() || b"._-".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            })
            .collect::<String>()
    );
    let r = reqwest::Client::new()
        .put(url)
        .timeout(std::time::Duration::from_secs(5))
        .header("content-type", "text/plain; version=0.0.4")
        .body(text)
        .send()
        .await;
    match r {
        Ok(resp) if resp.status().is_success() => {
            tracing::info!(pushgateway = %host, "metrics pushed");
        }
        Ok(resp) => {
            tracing::warn!(pushgateway = %host, status = resp.status().as_u16(), "the Pushgateway refused the metrics");
        }
        Err(e) => {
            tracing::warn!(pushgateway = %host, error = %e.without_url(), "cannot push the metrics");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn secrets_are_redacted_from_every_line_whatever_their_source() {
        redact_secrets(vec![
            "sk-or-v1-abcdef".to_string(),
            "sk-or-v1-abcdef-longer".to_string(),
            "abc".to_string(),
        ]);
        assert_eq!(redact("nothing here"), "nothing here");
        assert_eq!(
            redact(r#"{"error":"Bearer sk-or-v1-abcdef-longer rejected; sk-or-v1-abcdef too"}"#),
            r#"{"error":"Bearer [REDACTED] rejected; [REDACTED] too"}"#
        );
        // Too short to be a secret worth redacting: "abc" stays.
        assert_eq!(redact("abc"), "abc");
        let mut out = Vec::new();
        let mut w = RedactingWriter(&mut out);
        let line = b"provider said: invalid key sk-or-v1-abcdef\n";
        assert_eq!(w.write(line).expect("write"), line.len());
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            "provider said: invalid key [REDACTED]\n"
        );
        redact_secrets(Vec::new());
    }
}
