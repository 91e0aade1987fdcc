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
    Action, Advice, AdvisedSignal, MarketContext, ScoredSignal, StrategyVerdict, TopStrategy,
};
use crate::schedule::CycleId;

/// Longest `reasoning` accepted.
pub const MAX_REASONING_CHARS: usize = 2000;
/// Longest `summary` accepted.
pub const MAX_SUMMARY_CHARS: usize = 1200;

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
        if self.strategy_breakdown.len() > 64 {
            return Err(format!(
                "strategy_breakdown has {} entries, at most 64",
                self.strategy_breakdown.len()
            ));
        }
        unit_interval("top_strategy.score", self.top_strategy.score)?;
        for (i, s) in self.strategy_breakdown.iter().enumerate() {
            unit_interval(&format!("strategy_breakdown[{i}].score"), s.score)?;
            if s.name.trim().is_empty() || s.name.chars().count() > 100 {
                return Err(format!(
                    "strategy_breakdown[{i}].name must be 1–100 characters"
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
    if a.risk_warnings.len() > 20 {
        return Err(format!(
            "{} risk warnings, at most 20",
            a.risk_warnings.len()
        ));
    }
    if let Some(w) = a.risk_warnings.iter().find(|w| w.chars().count() > 500) {
        return Err(format!(
            "a risk warning has {} characters, at most 500",
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
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The deadline passed.
    #[error("agent call timed out")]
    Timeout,
    /// Connection failed, reset, or similar.
    #[error("agent transport error: {0}")]
    Transport(String),
    /// The provider answered 5xx.
    #[error("agent provider answered HTTP {status}")]
    Upstream {
        /// Status code.
        status: u16,
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
    /// The backend's circuit breaker is open.
    #[error("circuit breaker open")]
    CircuitOpen,
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

impl AgentError {
    /// Bounded reason label.
    pub fn reason(&self) -> &'static str {
        match self {
            AgentError::Timeout => "timeout",
            AgentError::Transport(_) => "llm_unreachable",
            AgentError::Upstream { .. } => "llm_5xx",
            AgentError::RateLimited { .. } => "llm_rate_limited",
            AgentError::Refused { .. } => "llm_refused",
            AgentError::InvalidOutput(_) => "invalid_output",
            AgentError::CircuitOpen => "circuit_open",
            AgentError::RateLimitWait => "rate_limit_wait",
            AgentError::BudgetExhausted(_) => "budget_exhausted",
            AgentError::MarketData(e) => e.reason(),
        }
    }

    /// Whether it counts against the dependency's circuit breaker (timeouts, 5xx, transport).
    pub fn is_breaker_failure(&self) -> bool {
        matches!(
            self,
            AgentError::Timeout | AgentError::Transport(_) | AgentError::Upstream { .. }
        )
    }

    /// Whether another attempt could succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            AgentError::Timeout
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
        assert!(AgentError::Timeout.is_breaker_failure());
        assert!(AgentError::Upstream { status: 502 }.is_breaker_failure());
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
            AgentError::MarketData(MarketError::Status { status: 503 }).reason(),
            "market_data_5xx"
        );
    }
}
