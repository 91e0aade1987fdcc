//! Agents: "run agent X on input Y → validated output", one trait and its backends.
//!
//! - [`rules`]: deterministic strategies over candles; every stage works without an LLM.
//! - [`openrouter`]: any OpenAI-compatible chat-completions endpoint (OpenRouter by default).
//! - [`opencode`]: a client of `opencode serve`, one session per (symbol, stage).
//!
//! [`llm`] holds what the LLM backends share: rate limit, breaker, retries, budget, fallback,
//! schemas, prompts and strict parsing.
//!
//! A model's answer is read by [`repair`]: what can be derived is derived (the strategy
//! counts), unambiguous slips are repaired and counted, what cannot be trusted is rejected with
//! a reason. Every agent's answer then passes [`SignalDraft::validate`] / [`validate_advice`] /
//! [`validate_summary`] before it is used: out-of-range values are never clamped or defaulted.

pub mod llm;
pub mod opencode;
pub mod openrouter;
pub mod repair;
pub mod rules;
pub mod setup;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::market::{Candle, MarketError};
use crate::model::{
    Action, Advice, AdvisedSignal, MarketContext, Reason, ScoredSignal, StrategyVerdict,
    TopStrategy,
};
use crate::schedule::CycleId;

/// Longest `reasoning` accepted.
pub const MAX_REASONING_CHARS: usize = 2000;
/// Longest `summary` accepted.
pub const MAX_SUMMARY_CHARS: usize = 1200;
/// Most strategies in a breakdown: more is not a slip but a model that lost the plot.
pub const MAX_STRATEGIES: usize = 64;
/// Longest strategy name.
pub const MAX_STRATEGY_NAME_CHARS: usize = 100;
/// Most risk warnings in an advice.
pub const MAX_WARNINGS: usize = 20;
/// Longest risk warning.
pub const MAX_WARNING_CHARS: usize = 500;

/// What the signal agent is given.
#[derive(Debug, Clone)]
pub struct SignalRequest<'a> {
    /// `BASE/QUOTE`.
    pub symbol: &'a str,
    /// The tick.
    pub cycle_id: CycleId,
    /// 1-minute candles, oldest first.
    pub candles: &'a [Candle],
    /// Their summary.
    pub context: &'a MarketContext,
    /// The strategies evaluated on them, once, by the pipeline: the rules agent votes them,
    /// the LLM prompt shows them and its answer is filled in from them.
    pub verdicts: &'a [crate::strategy::Evaluated],
    /// Now.
    pub now: DateTime<Utc>,
}

/// The time an agent call may take: each request at most `per_call` (the seed's subagent
/// timeout, `timeouts.symbol_timeout_seconds`, stretched in high-latency mode), and the whole
/// stage, retries included, never past `until` (the cycle's deadline).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallLimits {
    /// No request of this stage runs past this instant.
    pub until: Instant,
    /// One request's deadline.
    pub per_call: Duration,
}

impl CallLimits {
    /// The deadline of a request starting now.
    pub fn request_deadline(&self) -> Instant {
        (Instant::now() + self.per_call).min(self.until)
    }
}

/// The signal agent's answer: the part of a [`Signal`](crate::model::Signal) that an
/// agent decides (ids, times and market context are the runner's; the strategy counts are
/// derived from the breakdown).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalDraft {
    /// The call.
    pub action: Action,
    /// 0–1.
    pub confidence: f64,
    /// Why (≤ 2000 characters).
    pub reasoning: String,
    /// The best one.
    pub top_strategy: TopStrategy,
    /// All of them.
    pub strategy_breakdown: Vec<StrategyVerdict>,
}

use repair::unit_interval;

impl SignalDraft {
    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), String> {
        unit_interval("confidence", self.confidence)?;
        let chars = self.reasoning.chars().count();
        if chars > MAX_REASONING_CHARS {
            return Err(format!(
                "reasoning has {chars} characters, at most {MAX_REASONING_CHARS} allowed"
            ));
        }
        if self.reasoning.trim().is_empty() {
            return Err("reasoning is empty".into());
        }
        if self.strategy_breakdown.len() > MAX_STRATEGIES {
            return Err(format!(
                "strategy_breakdown has {} entries, at most {MAX_STRATEGIES}",
                self.strategy_breakdown.len()
            ));
        }
        unit_interval("top_strategy.score", self.top_strategy.score)?;
        for (i, s) in self.strategy_breakdown.iter().enumerate() {
            unit_interval(&format!("strategy_breakdown[{i}].score"), s.score)?;
            if s.name.trim().is_empty() || s.name.chars().count() > MAX_STRATEGY_NAME_CHARS {
                return Err(format!(
                    "strategy_breakdown[{i}].name must be 1–{MAX_STRATEGY_NAME_CHARS} characters"
                ));
            }
        }
        Ok(())
    }
}

/// Checks an advice answer.
pub fn validate_advice(a: &Advice) -> Result<(), String> {
    unit_interval("max_position_size", a.max_position_size)?;
    if !a.valid && a.max_position_size > 0.0 {
        return Err(format!(
            "max_position_size {} with valid = false",
            a.max_position_size
        ));
    }
    if a.risk_warnings.len() > MAX_WARNINGS {
        return Err(format!(
            "{} risk warnings, at most {MAX_WARNINGS}",
            a.risk_warnings.len()
        ));
    }
    if let Some(w) = a
        .risk_warnings
        .iter()
        .find(|w| w.chars().count() > MAX_WARNING_CHARS)
    {
        return Err(format!(
            "a risk warning has {} characters, at most {MAX_WARNING_CHARS}",
            w.chars().count()
        ));
    }
    Ok(())
}

/// Checks a report summary.
pub fn validate_summary(s: &str) -> Result<(), String> {
    let chars = s.chars().count();
    if s.trim().is_empty() {
        return Err("summary is empty".into());
    }
    if chars > MAX_SUMMARY_CHARS {
        return Err(format!(
            "summary has {chars} characters, at most {MAX_SUMMARY_CHARS}"
        ));
    }
    Ok(())
}

/// Why an agent call produced nothing usable. [`reason`](AgentError::reason) is the bounded
/// metric label.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    /// The deadline passed; with the call's own time limit when it was that one.
    #[error("{}", match .0 { Some(d) => format!("no answer within {}", secs_text(*d)), None => "agent call timed out".into() })]
    Timeout(Option<std::time::Duration>),
    /// Connection failed, reset, or similar: the text names the endpoint (`host:port`) and
    /// the cause ("connection refused").
    #[error("agent transport error: {0}")]
    Transport(String),
    /// The provider answered 5xx.
    #[error("agent provider answered HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Upstream {
        /// Status code.
        status: u16,
        /// The start of the body (redacted), which usually says why; may be empty.
        body: String,
    },
    /// The provider answered 429.
    #[error("agent provider rate-limited the call")]
    RateLimited {
        /// How long it asked to wait.
        retry_after: Option<std::time::Duration>,
    },
    /// The provider refused the call (400/401/402/403): retrying will not help.
    #[error("agent provider refused the call with HTTP {status}: {message}")]
    Refused {
        /// Status code.
        status: u16,
        /// What it said (never includes the key).
        message: String,
    },
    /// The answer broke the stage's schema or ranges.
    #[error("agent output rejected: {0}")]
    InvalidOutput(String),
    /// The backend's circuit breaker is open; with the failure that opened it, when known.
    #[error("circuit breaker open{}", match .0 { Some(w) => format!(" (it opened after: {w})"), None => String::new() })]
    CircuitOpen(Option<String>),
    /// No place among the requests the endpoint is sent at once before the deadline (its
    /// learned in-flight limit, given).
    #[error(
        "the endpoint was busy with {0} requests (its learned in-flight limit) until the deadline"
    )]
    NoCapacity(usize),
    /// No rate-limit slot before the deadline.
    #[error("no rate-limit slot before the deadline")]
    RateLimitWait,
    /// The token budget for the window is spent.
    #[error("LLM token budget for this {0} is spent")]
    BudgetExhausted(&'static str),
    /// The input candles could not be had.
    #[error(transparent)]
    MarketData(#[from] MarketError),
}

/// Longest piece of an error body kept in an error: enough to say why, short enough for a
/// log line and the cycle report.
pub const MAX_BODY_EXCERPT: usize = 300;

/// The start of an error body, for people: the provider's own message when the body is JSON
/// with one (`error.message`, `message`, `detail`), else the text itself; whitespace folded,
/// secrets redacted, at most [`MAX_BODY_EXCERPT`] characters.
pub fn body_excerpt(body: &[u8]) -> String {
    let v: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let from_json = v.as_ref().and_then(|v| {
        [
            v.pointer("/error/message"),
            v.get("message"),
            v.get("detail"),
            v.pointer("/data/message"),
            v.get("error"),
        ]
        .into_iter()
        .flatten()
        .find_map(|m| m.as_str().map(str::to_string))
    });
    let text = from_json.unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let folded = text.split_whitespace().collect::<Vec<_>>().join(" ");
    crate::telemetry::redact(&folded)
        .chars()
        .take(MAX_BODY_EXCERPT)
        .collect()
}

/// `host:port` of a URL (the port the scheme implies when it has none), or the URL's start
/// when it does not parse.
pub fn endpoint_of(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!(
            "{}:{}",
            u.host_str().unwrap_or("?"),
            u.port_or_known_default().unwrap_or(0)
        ),
        Err(_) => url.chars().take(60).collect(),
    }
}

/// A failed HTTP exchange with an agent backend at `url`, with its cause: reqwest's own text
/// is "error sending request" and the reason (refused, reset, DNS) is only in its sources.
/// The URL's path and query never appear (they could carry a key), the host and port do.
pub fn http_error(e: &reqwest::Error, url: &str) -> AgentError {
    if e.is_timeout() {
        return AgentError::Timeout(None);
    }
    let mut chain = vec![];
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(c) = cur {
        chain.push(c.to_string());
        cur = c.source();
    }
    // The innermost source is the OS's or the TLS library's own words; reqwest's top-level
    // text would repeat the URL.
    let detail = chain.last().cloned().unwrap_or_else(|| "no detail".into());
    let lower = chain.join(" ").to_lowercase();
    let what = if lower.contains("refused") {
        "connection refused"
    } else if lower.contains("reset") {
        "connection reset"
    } else if lower.contains("dns") || lower.contains("resolve") || lower.contains("lookup") {
        "cannot resolve"
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_body() || e.is_decode() {
        "the answer broke off"
    } else {
        "request failed"
    };
    let detail = crate::telemetry::redact(&detail)
        .chars()
        .take(200)
        .collect::<String>();
    AgentError::Transport(format!("{what} to {} ({detail})", endpoint_of(url)))
}

/// `10 s`, `2.5 s`: a duration as people write it.
fn secs_text(d: std::time::Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

impl AgentError {
    /// Whether a deadline passed (the call's own or an outer one).
    pub fn is_timeout(&self) -> bool {
        matches!(self, AgentError::Timeout(_))
    }

    /// A consequence of earlier failures rather than a cause of its own: an open breaker or
    /// no rate-limit slot in time. A symbol whose last attempt ended so is reported with the
    /// attempt before it, which says what actually went wrong.
    pub fn is_consequence(&self) -> bool {
        matches!(
            self,
            AgentError::CircuitOpen(_) | AgentError::RateLimitWait | AgentError::NoCapacity(_)
        )
    }

    /// Bounded reason label.
    pub fn reason(&self) -> Reason {
        match self {
            AgentError::Timeout(_) => Reason::Timeout,
            AgentError::Transport(_) => Reason::LlmUnreachable,
            AgentError::Upstream { .. } => Reason::Llm5xx,
            AgentError::RateLimited { .. } => Reason::LlmRateLimited,
            AgentError::Refused { .. } => Reason::LlmRefused,
            AgentError::InvalidOutput(_) => Reason::InvalidOutput,
            AgentError::CircuitOpen(_) => Reason::CircuitOpen,
            AgentError::NoCapacity(_) => Reason::Capacity,
            AgentError::RateLimitWait => Reason::RateLimitWait,
            AgentError::BudgetExhausted(_) => Reason::BudgetExhausted,
            AgentError::MarketData(e) => e.reason(),
        }
    }

    /// Whether it counts against the dependency's circuit breaker (timeouts, 5xx, transport).
    pub fn is_breaker_failure(&self) -> bool {
        matches!(
            self,
            AgentError::Timeout(_) | AgentError::Transport(_) | AgentError::Upstream { .. }
        )
    }

    /// Whether another attempt could succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            AgentError::Timeout(_)
                | AgentError::Transport(_)
                | AgentError::Upstream { .. }
                | AgentError::RateLimited { .. }
        )
    }
}

/// An agent's answer with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer<T> {
    /// The validated value.
    pub value: T,
    /// `metadata.model_used`: the model, or `rules`.
    pub model: String,
    /// Produced by the rules fallback instead of the configured agent.
    pub degraded: bool,
    /// The tools the model called on its way to this answer, in first-use order
    /// (`metadata.tools_used`).
    pub tools_used: Vec<String>,
}

impl<T> Answer<T> {
    /// A rules answer.
    pub fn rules(value: T) -> Self {
        Answer {
            value,
            model: "rules".into(),
            degraded: false,
            tools_used: vec![],
        }
    }
}

/// An agent backend: one method per agent stage. Every call is bounded by its [`CallLimits`].
#[async_trait]
pub trait Agent: Send + Sync {
    /// Backend name (`rules`, `openrouter`, `opencode`).
    fn backend(&self) -> &'static str;
    /// Model name for `metadata.model_used`.
    fn model(&self) -> &str;
    /// Stage 1.
    async fn signal(
        &self,
        req: &SignalRequest<'_>,
        limits: CallLimits,
    ) -> Result<Answer<SignalDraft>, AgentError>;
    /// Stage 3.
    async fn advise(
        &self,
        scored: &ScoredSignal,
        limits: CallLimits,
    ) -> Result<Answer<Advice>, AgentError>;
    /// Stage 4: 2–3 sentences.
    async fn report(
        &self,
        advised: &AdvisedSignal,
        limits: CallLimits,
    ) -> Result<Answer<String>, AgentError>;
}

/// The agent of each stage (they may differ).
#[derive(Clone)]
pub struct StageAgents {
    /// Produces signals.
    pub signal: Arc<dyn Agent>,
    /// Produces advice.
    pub advise: Arc<dyn Agent>,
    /// Produces summaries.
    pub report: Arc<dyn Agent>,
}

impl std::fmt::Debug for StageAgents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageAgents")
            .field("signal", &self.signal.backend())
            .field("advise", &self.advise.backend())
            .field("report", &self.report.backend())
            .finish()
    }
}

impl StageAgents {
    /// Every stage on the rules backend.
    pub fn rules() -> Self {
        let r: Arc<dyn Agent> = Arc::new(rules::Rules);
        Self {
            signal: r.clone(),
            advise: r.clone(),
            report: r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft() -> SignalDraft {
        SignalDraft {
            action: Action::Buy,
            confidence: 0.7,
            reasoning: "because".into(),
            top_strategy: TopStrategy {
                name: "ema".into(),
                score: 0.6,
                signal: Action::Buy,
                parameters: Default::default(),
            },
            strategy_breakdown: vec![StrategyVerdict {
                name: "ema".into(),
                signal: Action::Buy,
                score: 0.6,
            }],
        }
    }

    #[test]
    fn validation_rejects_with_reasons() {
        assert!(draft().validate().is_ok());
        let cases: Vec<(SignalDraft, &str)> = vec![
            (
                SignalDraft {
                    confidence: 1.2,
                    ..draft()
                },
                "outside [0, 1]",
            ),
            (
                SignalDraft {
                    confidence: -0.1,
                    ..draft()
                },
                "outside [0, 1]",
            ),
            (
                SignalDraft {
                    confidence: f64::NAN,
                    ..draft()
                },
                "not a finite",
            ),
            (
                SignalDraft {
                    reasoning: "x".repeat(2001),
                    ..draft()
                },
                "2001 characters",
            ),
            (
                SignalDraft {
                    reasoning: " ".into(),
                    ..draft()
                },
                "empty",
            ),
        ];
        for (d, needle) in cases {
            let e = d.validate().expect_err("rejected");
            assert!(e.contains(needle), "{e}");
        }
        // Exactly 2000 characters (multi-byte) is fine: the limit counts characters.
        assert!(
            SignalDraft {
                reasoning: "é".repeat(2000),
                ..draft()
            }
            .validate()
            .is_ok()
        );
    }

    #[test]
    fn advice_and_summary_validation() {
        let ok = Advice {
            valid: true,
            max_position_size: 0.05,
            risk_warnings: vec![],
        };
        assert!(validate_advice(&ok).is_ok());
        assert!(
            validate_advice(&Advice {
                max_position_size: 1.5,
                ..ok.clone()
            })
            .is_err()
        );
        assert!(
            validate_advice(&Advice {
                valid: false,
                ..ok.clone()
            })
            .is_err()
        );
        assert!(validate_summary("").is_err());
        assert!(validate_summary("<script>alert(1)</script> is kept as text").is_ok());
    }

    #[test]
    fn error_classes() {
        assert!(AgentError::Timeout(None).is_breaker_failure());
        assert!(
            AgentError::Upstream {
                status: 502,
                body: String::new()
            }
            .is_breaker_failure()
        );
        assert_eq!(
            AgentError::Timeout(Some(std::time::Duration::from_secs(10))).to_string(),
            "no answer within 10 s"
        );
        assert_eq!(
            AgentError::Upstream {
                status: 500,
                body: "boom".into()
            }
            .to_string(),
            "agent provider answered HTTP 500: boom"
        );
        assert_eq!(
            AgentError::CircuitOpen(Some("no answer within 10 s".into())).to_string(),
            "circuit breaker open (it opened after: no answer within 10 s)"
        );
        assert!(!AgentError::RateLimited { retry_after: None }.is_breaker_failure());
        assert!(!AgentError::InvalidOutput("x".into()).is_breaker_failure());
        assert!(
            !AgentError::Refused {
                status: 401,
                message: String::new()
            }
            .is_retryable()
        );
        assert_eq!(
            AgentError::MarketData(MarketError::Status { status: 503 })
                .reason()
                .as_str(),
            "market_data_5xx"
        );
    }
}
