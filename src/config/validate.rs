//! Validation as its own step: every problem reported at once, each naming its key path;
//! every numeric key's range declared once, on one line of one table; then the keys that only
//! make sense together.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::*;
use crate::schedule::Schedule;

impl Config {
    /// Checks the configuration as a whole; every problem is reported, each with its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut v = Validator::default();
        let r = "autonomous_runner";

        self.check_identity(&mut v, r);
        for bound in self.numeric_bounds() {
            bound.check(&mut v, r);
        }
        self.check_strategies(&mut v, r);
        self.check_pool_and_peers(&mut v, r);
        self.check_endpoints(&mut v, r);
        if v.issues.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(v.issues))
        }
    }

    /// The schedule, the replica's name and the symbols.
    fn check_identity(&self, v: &mut Validator, r: &str) {
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
    }

    /// The pool's bounds, the deadlines, heartbeats, breakers, coordination and lock keys that must agree.
    fn check_pool_and_peers(&self, v: &mut Validator, r: &str) {
        let p = &self.parallel;
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
        if self.heartbeat.interval_seconds >= self.heartbeat.ttl_seconds {
            v.bad(
                format!("{r}.heartbeat.interval_seconds"),
                format!(
                    "must be < heartbeat.ttl_seconds ({}), or the heartbeat expires between refreshes",
                    self.heartbeat.ttl_seconds
                ),
            );
        }
        for (name, b) in [
            ("llm_service", &self.circuit_breaker.llm_service),
            ("redis", &self.circuit_breaker.redis),
        ] {
            if b.success_threshold > b.half_open_max_calls {
                v.bad(
                    format!("{r}.circuit_breaker.{name}.success_threshold"),
                    format!(
                        "must be ≤ half_open_max_calls ({}), or the breaker can never close",
                        b.half_open_max_calls
                    ),
                );
            }
        }

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
        let lp = &self.locks.redis_key_prefix;
        if lp.is_empty() || !lp.chars().all(|c| c.is_ascii_graphic()) {
            v.bad(
                format!("{r}.locks.redis_key_prefix"),
                "must be non-empty printable ASCII without spaces (lock keys are {key_prefix}{redis_key_prefix}{symbol})",
            );
        }
    }

    /// What the backends and sources are reached at and what they need, then the keys that only make sense together.
    fn check_endpoints(&self, v: &mut Validator, r: &str) {
        if self
            .agents
            .burst
            .is_some_and(|b| b > self.agents.requests_per_minute)
        {
            v.bad(
                format!("{r}.agents.burst"),
                format!(
                    "must be ≤ agents.requests_per_minute ({})",
                    self.agents.requests_per_minute
                ),
            );
        }
        if self.uses_backend(AgentBackend::Openrouter) && !is_http_url(&self.agents.base_url) {
            v.bad(
                format!("{r}.agents.base_url"),
                "must be an http:// or https:// URL",
            );
        }
        // OpenRouter itself refuses every call without a key: better said at start than as a
        // 401 on the first tick. Other OpenAI-compatible servers (a local model) may need none.
        if self.uses_backend(AgentBackend::Openrouter)
            && self.agents.api_key.is_empty()
            && self.agents.base_url.contains("openrouter.ai")
        {
            v.bad(
                format!("{r}.agents.api_key"),
                "agents.backend is openrouter at openrouter.ai but no API key is set \
                 (set OPENROUTER_API_KEY, or use agents.backend: rules)",
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
        let ix = &self.market_data.influxdb;
        if self.market_data.source == crate::config::MarketSource::Influxdb {
            if !is_http_url(&ix.url) {
                v.bad(
                    format!("{r}.market_data.influxdb.url"),
                    "must be an http:// or https:// URL (or set INFLUXDB_URL)",
                );
            }
            for (key, value) in [
                ("database", &ix.database),
                ("measurement", &ix.measurement),
                ("symbol_tag", &ix.symbol_tag),
            ] {
                if value.is_empty() || value.contains(['"', '\\', '\n']) {
                    v.bad(
                        format!("{r}.market_data.influxdb.{key}"),
                        "must be non-empty, without quotes, backslashes or newlines",
                    );
                }
            }
        }
        let push = &self.metrics.pushgateway_url;
        if !push.is_empty() && !is_http_url(push) {
            v.bad(
                format!("{r}.metrics.pushgateway_url"),
                "must be an http:// or https:// URL (or empty: no push)",
            );
        }
        if !is_http_url(&self.market_data.coinbase_url) {
            v.bad(
                format!("{r}.market_data.coinbase_url"),
                "must be an http:// or https:// URL",
            );
        }

        self.check_relations(v, r);

        if self.http.bind.parse::<IpAddr>().is_err() {
            v.bad(
                format!("{r}.http.bind"),
                format!("{:?} is not an IP address", self.http.bind),
            );
        }
        for (i, h) in self.http.allowed_hosts.iter().enumerate() {
            if let Err(why) = host_name(h) {
                v.bad(format!("{r}.http.allowed_hosts[{i}]"), why);
            }
        }
    }

    /// Every numeric key with its bounds, one line each: the one place a key's range is
    /// declared. Upper bounds matter as much as lower ones: a value past its bound is a typo or
    /// a unit mistake, and some would not survive the run time — a timeout of 1e30 s
    /// overflows a `Duration` and became 0 (every call timed out at once), a buffer of 4e9
    /// entries is memory the process does not have.
    /// The strategies' keys that only make sense together.
    fn check_strategies(&self, v: &mut Validator, r: &str) {
        let s = &self.strategies;
        let k = |key: &str| format!("{r}.strategies.{key}");
        if s.rsi_reversal.oversold >= s.rsi_reversal.overbought {
            v.bad(
                k("rsi_reversal.oversold"),
                format!(
                    "must be below rsi_reversal.overbought ({}), got {}",
                    s.rsi_reversal.overbought, s.rsi_reversal.oversold
                ),
            );
        }
        for (key, fast, slow) in [
            ("macd_cross", s.macd_cross.fast, s.macd_cross.slow),
            ("ema_trend", s.ema_trend.fast, s.ema_trend.slow),
        ] {
            if fast >= slow {
                v.bad(
                    k(&format!("{key}.fast")),
                    format!("must be below {key}.slow ({slow}), got {fast}"),
                );
            }
        }
        let macd = s.macd_cross.slow + s.macd_cross.signal;
        if macd > crate::model::MIN_CANDLES {
            v.bad(
                k("macd_cross.signal"),
                format!(
                    "slow + signal must be at most {} (the fewest candles an analysis runs on), got {macd}",
                    crate::model::MIN_CANDLES
                ),
            );
        }
    }

    fn numeric_bounds(&self) -> Vec<Bound> {
        use Low::{Above, AtLeast};
        const DAY: f64 = 86_400.0;
        const HOUR: f64 = 3_600.0;
        let c = self;
        let (p, t, a, s) = (&c.parallel, &c.timeouts, &c.adaptive, &c.strategies);
        // The fewest candles an analysis runs on: no strategy may need more.
        const W: f64 = crate::model::MIN_CANDLES as f64;
        #[rustfmt::skip]
        let mut b = vec![
            // At least one symbol is its own check, with its own message.
            Bound::new("symbols", c.symbols.len(), AtLeast(0.0), 10_000.0),
            Bound::new("parallel.max_concurrent", p.max_concurrent, AtLeast(1.0), 1_000.0),
            Bound::new("parallel.min_concurrent", p.min_concurrent, AtLeast(1.0), 1_000.0),
            Bound::new("parallel.batch_delay_ms", p.batch_delay_ms, AtLeast(0.0), 60_000.0),
            Bound::new("coordination.claim_spread_ms", c.coordination.claim_spread_ms, AtLeast(0.0), 60_000.0),
            Bound::new("timeouts.symbol_timeout_seconds", t.symbol_timeout_seconds, Above(0.0), HOUR),
            Bound::new("timeouts.symbol_timeout_max_seconds", t.symbol_timeout_max_seconds, Above(0.0), HOUR),
            Bound::new("timeouts.total_timeout_seconds", t.total_timeout_seconds, Above(0.0), DAY),
            Bound::new("locks.ttl_seconds", c.locks.ttl_seconds, AtLeast(1.0), DAY),
            Bound::new("locks.stale_threshold_seconds", c.locks.stale_threshold_seconds, AtLeast(1.0), DAY),
            Bound::new("heartbeat.ttl_seconds", c.heartbeat.ttl_seconds, AtLeast(1.0), HOUR),
            Bound::new("heartbeat.interval_seconds", c.heartbeat.interval_seconds, AtLeast(1.0), HOUR),
            Bound::new("retry.max_attempts", c.retry.max_attempts, AtLeast(1.0), 10.0),
            Bound::new("retry.delay_seconds", c.retry.delay_seconds, AtLeast(0.0), HOUR),
            Bound::new("retry.max_delay_seconds", c.retry.max_delay_seconds, AtLeast(0.0), HOUR),
            Bound::new("adaptive.latency_window_size", a.latency_window_size, AtLeast(1.0), 100_000.0),
            Bound::new("adaptive.p95_threshold_ms", a.p95_threshold_ms, AtLeast(1.0), HOUR * 1000.0),
            Bound::new("adaptive.p99_threshold_ms", a.p99_threshold_ms, AtLeast(1.0), HOUR * 1000.0),
            Bound::new("adaptive.backpressure_max_overruns", a.backpressure_max_overruns, AtLeast(1.0), 1_000.0),
            Bound::new("adaptive.cooldown_cycles", a.cooldown_cycles, AtLeast(0.0), 1_000.0),
            Bound::new("adaptive.max_consecutive_latency_skips", a.max_consecutive_latency_skips, AtLeast(0.0), 1_000.0),
            Bound::new("adaptive.latency_max_age_seconds", a.latency_max_age_seconds, AtLeast(1.0), DAY),
            Bound::new("graceful_shutdown.timeout_seconds", c.graceful_shutdown.timeout_seconds, AtLeast(0.0), HOUR),
            Bound::new("agents.requests_per_minute", c.agents.requests_per_minute, AtLeast(1.0), 1_000_000.0),
            // Unset, it is derived (half the limit, at least 1): only a set value can be wrong.
            Bound::new("agents.burst", c.agents.burst.unwrap_or(1), AtLeast(1.0), 1_000_000.0),
            Bound::new("agents.max_tokens", c.agents.max_tokens, AtLeast(1.0), 1_000_000.0),
            Bound::new("agents.max_tool_rounds", c.agents.max_tool_rounds, AtLeast(1.0), 10.0),
            Bound::new("agents.opencode.max_model_requests", c.agents.opencode.max_model_requests, AtLeast(1.0), 1_000.0),
            Bound::new("agents.hedge.max_extra_fraction", c.agents.hedge.max_extra_fraction, AtLeast(0.0), 1.0),
            Bound::new("market_data.candles", c.market_data.candles, AtLeast(W), 300.0),
            Bound::new("market_data.request_timeout_seconds", c.market_data.request_timeout_seconds, Above(0.0), 300.0),
            Bound::new("market_data.influxdb.max_staleness_seconds", c.market_data.influxdb.max_staleness_seconds, AtLeast(60.0), 86_400.0),
            Bound::new("pipeline.advise_min_score", c.pipeline.advise_min_score, AtLeast(0.0), 100.0),
            Bound::new("pipeline.expiry_grace_seconds", c.pipeline.expiry_grace_seconds, AtLeast(0.0), DAY),
            Bound::new("publish.stream_max_len", c.publish.stream_max_len, AtLeast(1.0), 10_000_000.0),
            Bound::new("publish.outbox_max", c.publish.outbox_max, AtLeast(1.0), 1_000_000.0),
            Bound::new("publish.history_cycles", c.publish.history_cycles, AtLeast(1.0), 100_000.0),
            Bound::new("publish.replay_buffer", c.publish.replay_buffer, AtLeast(1.0), 1_000_000.0),
            Bound::new("http.max_connections", c.http.max_connections, AtLeast(1.0), 1_000_000.0),
            Bound::new("http.max_sse_streams", c.http.max_sse_streams, AtLeast(1.0), 1_000_000.0),
            Bound::new("http.max_sse_streams_per_client", c.http.max_sse_streams_per_client, AtLeast(0.0), 1_000_000.0),
            Bound::new("history.retention_days", c.history.retention_days, AtLeast(1.0), 36_500.0),
            Bound::new("history.queue_max", c.history.queue_max, AtLeast(1.0), 10_000_000.0),
            Bound::new("history.batch_size", c.history.batch_size, AtLeast(1.0), 10_000.0),
            Bound::new("history.grading.threshold_pct", c.history.grading.threshold_pct, AtLeast(0.0), 100.0),
            Bound::new("history.grading.interval_seconds", c.history.grading.interval_seconds, AtLeast(1.0), 86_400.0),
            // Every period fits the fewest candles an analysis runs on.
            Bound::new("strategies.rsi_reversal.period", s.rsi_reversal.period, AtLeast(2.0), W),
            Bound::new("strategies.rsi_reversal.oversold", s.rsi_reversal.oversold, AtLeast(1.0), 99.0),
            Bound::new("strategies.rsi_reversal.overbought", s.rsi_reversal.overbought, AtLeast(1.0), 99.0),
            Bound::new("strategies.macd_cross.fast", s.macd_cross.fast, AtLeast(1.0), W),
            Bound::new("strategies.macd_cross.slow", s.macd_cross.slow, AtLeast(2.0), W),
            Bound::new("strategies.macd_cross.signal", s.macd_cross.signal, AtLeast(1.0), W),
            Bound::new("strategies.bollinger_bounce.period", s.bollinger_bounce.period, AtLeast(2.0), W),
            Bound::new("strategies.bollinger_bounce.std_dev", s.bollinger_bounce.std_dev, Above(0.0), 10.0),
            Bound::new("strategies.ema_trend.fast", s.ema_trend.fast, AtLeast(1.0), W),
            Bound::new("strategies.ema_trend.slow", s.ema_trend.slow, AtLeast(2.0), W),
            Bound::new("strategies.ema_trend.band", s.ema_trend.band, AtLeast(0.0), 0.1),
            Bound::new("strategies.volume_breakout.period", s.volume_breakout.period, AtLeast(1.0), W - 1.0),
            Bound::new("strategies.volume_breakout.volume_multiple", s.volume_breakout.volume_multiple, Above(0.0), 100.0),
            Bound::new("strategies.momentum.lookback", s.momentum.lookback, AtLeast(1.0), W - 1.0),
            Bound::new("strategies.momentum.threshold", s.momentum.threshold, AtLeast(0.0), 1.0),
        ];
        for (name, br) in [
            ("llm_service", &c.circuit_breaker.llm_service),
            ("redis", &c.circuit_breaker.redis),
        ] {
            let k = |key: &str| format!("circuit_breaker.{name}.{key}");
            #[rustfmt::skip]
            b.extend([
                Bound::new(k("failure_threshold"), br.failure_threshold, AtLeast(1.0), 100_000.0),
                Bound::new(k("recovery_timeout_seconds"), br.recovery_timeout_seconds, Above(0.0), DAY),
                Bound::new(k("half_open_max_calls"), br.half_open_max_calls, AtLeast(1.0), 1_000.0),
                Bound::new(k("success_threshold"), br.success_threshold, AtLeast(1.0), 1_000.0),
            ]);
        }
        let cal = &c.history.calibration;
        #[rustfmt::skip]
        b.extend([
            Bound::new("history.calibration.min_grades", cal.min_grades, AtLeast(1.0), 1e9),
            Bound::new("history.calibration.prior_grades", cal.prior_grades, Above(0.0), 1e9),
            Bound::new("history.calibration.refit_seconds", cal.refit_seconds, AtLeast(1.0), DAY),
        ]);
        for (i, m) in c.history.grading.horizons_minutes.iter().enumerate() {
            let key = format!("history.grading.horizons_minutes[{i}]");
            b.push(Bound::new(key, *m, AtLeast(1.0), 7.0 * 24.0 * 60.0));
        }
        for (name, st) in [
            ("signal", &c.agents.stages.signal),
            ("advise", &c.agents.stages.advise),
            ("report", &c.agents.stages.report),
        ] {
            if let Some(secs) = st.timeout_seconds {
                let key = format!("agents.stages.{name}.timeout_seconds");
                b.push(Bound::new(key, secs, Above(0.0), HOUR));
            }
        }
        b
    }

    /// Keys that only make sense together.
    fn check_relations(&self, v: &mut Validator, r: &str) {
        let b = &self.agents.budget;
        if let (Some(hour), Some(day)) = (
            b.tokens_per_hour.filter(|h| *h > 0),
            b.tokens_per_day.filter(|d| *d > 0),
        ) && day < hour
        {
            v.bad(
                format!("{r}.agents.budget.tokens_per_day"),
                format!(
                    "must be ≥ agents.budget.tokens_per_hour ({hour}): a day holds every hour, got {day}"
                ),
            );
        }
        let a = &self.adaptive;
        if a.p99_threshold_ms < a.p95_threshold_ms {
            v.bad(
                format!("{r}.adaptive.p99_threshold_ms"),
                format!(
                    "must be ≥ adaptive.p95_threshold_ms ({}): a p99 is never below the p95, got {}",
                    a.p95_threshold_ms, a.p99_threshold_ms
                ),
            );
        }
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
        if let Some(url) = self.history.postgres_url(&self.postgres) {
            let u = url.expose();
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                // A secret: name the key and the expected form, never the value.
                v.bad(
                    format!("{r}.history.url"),
                    "must start with postgres:// or postgresql:// (from history.url, postgres.url or POSTGRES_URL)",
                );
            }
        }
        if self.history.enabled && self.history.path.trim().is_empty() {
            v.bad(format!("{r}.history.path"), "must name a file");
        }
        if self.history.grading.horizons_minutes.is_empty() {
            v.bad(
                format!("{r}.history.grading.horizons_minutes"),
                "must list at least one horizon",
            );
        }
        let horizon = self.history.calibration_horizon();
        if !self.history.grading.horizons_minutes.contains(&horizon) {
            v.bad(
                format!("{r}.history.calibration.horizon_minutes"),
                format!(
                    "{horizon} is not a grading horizon: use one of history.grading.horizons_minutes {:?}",
                    self.history.grading.horizons_minutes
                ),
            );
        }
        for (name, st) in [
            ("signal", &self.agents.stages.signal),
            ("advise", &self.agents.stages.advise),
            ("report", &self.agents.stages.report),
        ] {
            let mut seen = BTreeSet::new();
            for (i, tool) in st.tools.iter().flatten().enumerate() {
                let key = format!("{r}.agents.stages.{name}.tools[{i}]");
                if !TOOL_NAMES.contains(&tool.as_str()) {
                    v.bad(
                        key,
                        format!(
                            "{tool:?} is not a tool; the tools are {}",
                            TOOL_NAMES.join(", ")
                        ),
                    );
                } else if !seen.insert(tool.as_str()) {
                    v.bad(key, format!("{tool:?} is listed twice"));
                }
            }
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
}

pub(super) fn is_http_url(s: &str) -> bool {
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

/// Collects problems; each check names the key it is about.
#[derive(Default)]
pub(super) struct Validator {
    issues: Vec<ConfigIssue>,
}

impl Validator {
    fn bad(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.issues.push(ConfigIssue {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// The lower end of a key's range.
#[derive(Debug, Clone, Copy)]
pub(super) enum Low {
    /// `value ≥ min`.
    AtLeast(f64),
    /// `value > min` (durations that must not be zero).
    Above(f64),
}

/// One numeric key and its range; NaN and infinities are out of every range.
#[derive(Debug)]
pub(super) struct Bound {
    key: String,
    value: f64,
    low: Low,
    high: f64,
}

impl Bound {
    fn new(key: impl Into<String>, value: impl Into<Number>, low: Low, high: f64) -> Self {
        Bound {
            key: key.into(),
            value: value.into().0,
            low,
            high,
        }
    }

    /// Reports the value if it is outside its range (one issue per key, the nearer end named).
    fn check(&self, v: &mut Validator, r: &str) {
        let x = self.value;
        let message = match self.low {
            _ if x.is_nan() => Some(format!("must be a number, got {x}")),
            Low::AtLeast(min) if x < min => Some(format!("must be ≥ {min}, got {x}")),
            Low::Above(min) if x <= min => Some(format!("must be > {min}, got {x}")),
            _ if x > self.high => Some(format!("must be ≤ {}, got {x}", self.high)),
            _ => None,
        };
        if let Some(m) = message {
            v.bad(format!("{r}.{}", self.key), m);
        }
    }
}

/// Any numeric config value as the f64 its bound is checked in (counts, sizes, seconds).
pub(super) struct Number(f64);

macro_rules! number_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Number {
            #[allow(clippy::cast_precision_loss, clippy::cast_lossless)]
            fn from(v: $t) -> Self {
                Number(v as f64)
            }
        }
    )*};
}
number_from!(u16, u32, u64, usize, f64);

/// Checks a `Host` header value as `http.allowed_hosts` takes it: a name or an IP address,
/// optionally with `:port` — what a client sends, not a URL. Read as the MCP SDK reads it.
fn host_name(h: &str) -> Result<(), String> {
    if h.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if h.contains("://") || h.contains('/') {
        return Err(format!(
            "{h:?} is a URL; give the host as clients send it in `Host`, e.g. \"runner\" or \"runner:8080\""
        ));
    }
    match axum::http::uri::Authority::try_from(h.trim()) {
        Ok(a) if !a.as_str().contains('@') => Ok(()),
        _ => Err(format!(
            "{h:?} is not a host name, an IP address or host:port"
        )),
    }
}
