//! The environment: a lookup trait (the process, or a map in tests) and the overrides of
//! the environment variables (`REDIS_URL`, `OPENROUTER_API_KEY`, `INSTANCE_ID`, …), applied
//! after the file.

use std::collections::HashMap;

use super::*;

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
    /// Applies the environment overrides (the README lists them): a set, non-empty variable
    /// wins over the file.
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
            self.history.url = Secret::new(v);
        }
        if let Some(v) = set("HISTORY_PATH") {
            self.history.path = v;
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
        if let Some(v) = set("INFLUXDB_URL") {
            self.market_data.influxdb.url = v;
        }
        if let Some(v) = set("INFLUXDB_TOKEN") {
            self.market_data.influxdb.token = Secret::new(v);
        }
        if let Some(v) = set("PUSHGATEWAY_URL") {
            self.metrics.pushgateway_url = v;
        }
        if let Some(v) = set("PORT") {
            match v.trim().parse::<u16>() {
                Ok(n) => self.http.port = n,
                Err(_) => issues.push(ConfigIssue {
                    path: "PORT".into(),
                    message: format!("must be a port number from 0 to 65535, got {v:?}"),
                }),
            }
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
}
