//! Validation as its own step: every problem reported at once, each naming its key path;
//! lower bounds beside the checks of each section, upper bounds in one table, and the keys
//! that only make sense together.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::*;
use crate::schedule::Schedule;

impl Config {
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
