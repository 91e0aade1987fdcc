//! One symbol through every stage. Each stage's message is published the moment it exists,
//! so a symbol's report can be on the dashboard while other symbols are still in stage 1.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use super::scorer::score_signal;
use crate::agents::{
    AgentError, Answer, CallLimits, SignalRequest, StageAgents, validate_advice, validate_summary,
};
use crate::history::calibration::Calibrator;
use crate::market::MarketSource;
use crate::model::*;
use crate::publish::Publisher;
use crate::schedule::CycleId;
use crate::strategy::{StrategySet, summarize};
use crate::telemetry::names;

/// What every symbol of a cycle shares.
pub struct PipelineContext {
    /// Candle source.
    pub market: Arc<dyn MarketSource>,
    /// Stage agents.
    pub agents: StageAgents,
    /// Where messages go.
    pub publisher: Arc<Publisher>,
    /// Candles per symbol.
    pub candles: usize,
    /// What time it is for the stages: the market data is read as of it and signals are
    /// stamped with it (the system clock in service; an anchored or virtual one in tests).
    pub clock: crate::schedule::Clock,
    /// The strategies, evaluated once per symbol and tick for whichever agent runs the signal
    /// stage.
    pub strategies: Arc<StrategySet>,
    /// Advise only at or above this score.
    pub advise_min_score: f64,
    /// A signal expires this long after the next tick.
    pub expiry_grace: Duration,
    /// What stated confidences have meant so far; `None` without a history.
    pub calibrator: Option<Arc<Calibrator>>,
}

impl std::fmt::Debug for PipelineContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineContext")
            .field("agents", &self.agents)
            .finish_non_exhaustive()
    }
}

/// A symbol that went through every stage.
#[derive(Debug, Clone)]
pub struct SymbolOutcome {
    /// The call.
    pub action: Action,
    /// Its opportunity score.
    pub opportunity_score: f64,
    /// Whether the advise stage ran.
    pub advised: bool,
}

/// A symbol that stopped at a stage.
#[derive(Debug, thiserror::Error)]
#[error("{stage:?} stage: {error}")]
pub struct StageFailure {
    /// Where it stopped.
    pub stage: Stage,
    /// Why.
    pub error: AgentError,
}

impl StageFailure {
    /// What happened, for people (the cycle report, the log line): the agent error's own
    /// words, which name the status and body, the endpoint or the time limit.
    pub fn cause(&self) -> String {
        self.error.to_string()
    }
}

/// One symbol's tick as its stages see it: every stage step goes through these three
/// helpers — call the agent (timed), check its answer, publish the stage — so the four stages
/// cannot drift apart in how they are timed, failed or published.
struct Steps<'a> {
    ctx: &'a PipelineContext,
    symbol: &'a str,
    cycle: CycleId,
    signal_id: String,
}

impl Steps<'_> {
    /// Awaits `call`, the stage's agent, and records its latency (`llm_latency_seconds`) when
    /// a model answered: a rules answer or a rules fallback took no LLM call, and its
    /// microseconds would drag the LLM's percentiles down exactly when the LLM is failing.
    async fn ask<T>(
        &self,
        stage: Stage,
        call: impl std::future::Future<Output = Result<Answer<T>, AgentError>>,
    ) -> Result<Answer<T>, StageFailure> {
        let t = Instant::now();
        // Inside the symbol's span (cycle_id, symbol): the stage, for what its agent logs.
        let answer = tracing::Instrument::instrument(
            call,
            tracing::info_span!("stage", stage = stage.as_str()),
        )
        .await
        .map_err(|error| StageFailure { stage, error })?;
        if !answer.degraded && answer.model != "rules" {
            metrics::histogram!(names::LLM_LATENCY_SECONDS, "stage" => stage.as_str())
                .record(Instant::now().duration_since(t).as_secs_f64());
        }
        Ok(answer)
    }

    /// The stage's answer checked after repair: a reason fails the symbol in `stage`.
    fn check(stage: Stage, verdict: Result<(), String>) -> Result<(), StageFailure> {
        verdict.map_err(|r| StageFailure {
            stage,
            error: AgentError::InvalidOutput(r),
        })
    }

    /// Publishes `payload` as its stage's message, timed from `since`.
    async fn publish(
        &self,
        payload: Payload,
        since: Instant,
        model: &str,
        tools_used: &[String],
    ) -> Result<(), StageFailure> {
        let stage = payload.stage();
        let ms = Instant::now().duration_since(since).as_millis() as u64;
        let msg = StageMessage::new(payload, ms, model).with_tools_used(tools_used.to_vec());
        metrics::counter!(names::MESSAGES_PUBLISHED, "stage" => stage.as_str()).increment(1);
        // On the service's clock (a replay's virtual one too), from the scheduled tick.
        let age = self.ctx.clock.now() - self.cycle.time();
        metrics::histogram!(names::SIGNAL_FRESHNESS_SECONDS, "stage" => stage.as_str())
            .record(age.num_milliseconds().max(0) as f64 / 1000.0);
        self.ctx.publisher.publish(msg).await;
        Ok(())
    }
}

/// Runs `symbol` for `cycle` through Signal → Score → Advise → Report, publishing each stage.
/// `limits` bound every agent call (each request, and the symbol as a whole by the cycle
/// deadline); the caller also enforces the cycle deadline from outside.
pub async fn run_symbol(
    ctx: &PipelineContext,
    symbol: &str,
    cycle: &CycleId,
    next_tick: DateTime<Utc>,
    limits: CallLimits,
) -> Result<SymbolOutcome, StageFailure> {
    let steps = Steps {
        ctx,
        symbol,
        cycle: *cycle,
        signal_id: signal_id(symbol, cycle),
    };

    let signal = signal_stage(&steps, next_tick, limits).await?;
    let action = signal.action;

    // Stage 2: Score (deterministic).
    let t1 = Instant::now();
    let mut scored = score_signal(signal, ctx.clock.now());
    let score = scored.opportunity_score;
    steps
        .publish(Payload::Scored(scored.clone()), t1, "deterministic", &[])
        .await?;

    // Stage 3: Advise, only for promising scores.
    let advice = if score >= ctx.advise_min_score {
        Some(advise_stage(&steps, &mut scored, limits).await?)
    } else {
        None
    };
    let advised_flag = advice.is_some();
    let mut advised = AdvisedSignal { scored, advice };

    // Stage 4: Report.
    let t3 = Instant::now();
    let answer = steps
        .ask(Stage::Report, ctx.agents.report.report(&advised, limits))
        .await?;
    let summary = answer.value;
    advised.scored.signal.is_degraded |= answer.degraded;
    Steps::check(Stage::Report, validate_summary(&summary))?;
    let report = ReportedSignal { advised, summary };
    steps
        .publish(
            Payload::Reported(report),
            t3,
            &answer.model,
            &answer.tools_used,
        )
        .await?;

    Ok(SymbolOutcome {
        action,
        opportunity_score: score,
        advised: advised_flag,
    })
}

/// Stage 1: the market data as of now, the strategies evaluated once, the signal agent's
/// draft checked and made into the signal (its counts derived from its breakdown), published.
async fn signal_stage(
    steps: &Steps<'_>,
    next_tick: DateTime<Utc>,
    limits: CallLimits,
) -> Result<Signal, StageFailure> {
    let ctx = steps.ctx;
    let t0 = Instant::now();
    let now = ctx.clock.now();
    let candles = ctx
        .market
        .candles(steps.symbol, now, ctx.candles)
        .await
        .map_err(|e| StageFailure {
            stage: Stage::Signal,
            error: e.into(),
        })?;
    let context = summarize(&candles);
    let data_as_of = candles
        .last()
        .map(|c| c.time + chrono::Duration::minutes(1))
        .unwrap_or(now);
    // Evaluated once, whichever backend runs the stage.
    let verdicts = ctx.strategies.evaluate(&candles);
    let req = SignalRequest {
        symbol: steps.symbol,
        cycle_id: steps.cycle,
        candles: &candles,
        context: &context,
        verdicts: &verdicts,
        now,
    };
    let answer = steps
        .ask(Stage::Signal, ctx.agents.signal.signal(&req, limits))
        .await?;
    let draft = answer.value;
    Steps::check(Stage::Signal, draft.validate())?;
    // The counts are derived from the breakdown, whoever produced it: a published signal
    // always agrees with itself.
    let tally = Tally::of(&draft.strategy_breakdown);
    let mut signal = Signal {
        signal_id: steps.signal_id.clone(),
        cycle_id: steps.cycle,
        symbol: steps.symbol.to_string(),
        action: draft.action,
        confidence: draft.confidence,
        reasoning: draft.reasoning,
        strategies_analyzed: tally.analyzed,
        strategies_bullish: tally.bullish,
        strategies_bearish: tally.bearish,
        strategies_neutral: tally.neutral,
        top_strategy: draft.top_strategy,
        strategy_breakdown: draft.strategy_breakdown,
        market_context: context,
        timestamp: now,
        expires_at: next_tick + chrono::Duration::from_std(ctx.expiry_grace).unwrap_or_default(),
        data_as_of,
        is_degraded: answer.degraded,
        calibrated_confidence: None,
        calibration: CalibrationNote::default(),
    };
    if let Some(c) = &ctx.calibrator {
        (signal.calibrated_confidence, signal.calibration) =
            c.calibrate(&answer.model, signal.action, signal.confidence);
    }
    let action = signal.action;
    metrics::counter!(names::SIGNAL_GENERATION, "symbol" => steps.symbol.to_string(), "action" => action.as_str())
        .increment(1);
    steps
        .publish(
            Payload::Signal(signal.clone()),
            t0,
            &answer.model,
            &answer.tools_used,
        )
        .await?;
    Ok(signal)
}

/// Stage 3: the advisor's view of a promising signal, checked and published; a degraded
/// answer marks the signal degraded too.
async fn advise_stage(
    steps: &Steps<'_>,
    scored: &mut ScoredSignal,
    limits: CallLimits,
) -> Result<Advice, StageFailure> {
    let t2 = Instant::now();
    let answer = steps
        .ask(
            Stage::Advise,
            steps.ctx.agents.advise.advise(scored, limits),
        )
        .await?;
    let advice = answer.value;
    scored.signal.is_degraded |= answer.degraded;
    Steps::check(Stage::Advise, validate_advice(&advice))?;
    let advised = AdvisedSignal {
        scored: scored.clone(),
        advice: Some(advice.clone()),
    };
    steps
        .publish(
            Payload::Advised(advised.clone()),
            t2,
            &answer.model,
            &answer.tools_used,
        )
        .await?;
    Ok(advice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::market::simulated::Simulated;

    /// Records every message handed to it.
    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<StageMessage>>);

    #[async_trait::async_trait]
    impl crate::publish::Sink for Recorder {
        async fn publish(&self, msg: &StageMessage) {
            self.0.lock().unwrap().push(msg.clone());
        }
        async fn flush(&self, _timeout: Duration) {}
    }

    #[tokio::test]
    async fn one_symbol_publishes_every_stage_in_order() {
        let recorder = Arc::new(Recorder::default());
        let hub = crate::publish::hub::Hub::new(100, None);
        let publisher = Arc::new(Publisher::new(hub.clone(), 10, Some(recorder.clone())));
        let ctx = PipelineContext {
            market: Arc::new(Simulated::new()),
            agents: StageAgents::rules(),
            publisher: publisher.clone(),
            candles: 120,
            clock: crate::schedule::Clock::System,
            strategies: Arc::default(),
            // Advise everything so all four stages appear.
            advise_min_score: 0.0,
            expiry_grace: Duration::from_secs(30),
            calibrator: None,
        };
        let cycle = CycleId::new(Utc::now());
        let next = cycle.time() + chrono::Duration::minutes(1);
        let out = run_symbol(
            &ctx,
            "ETH/USD",
            &cycle,
            next,
            CallLimits {
                until: Instant::now() + Duration::from_secs(10),
                per_call: Duration::from_secs(10),
            },
        )
        .await
        .expect("completes");
        assert!(out.advised);
        let got = recorder.0.lock().unwrap().clone();
        let stages: Vec<Stage> = got.iter().map(|m| m.stage).collect();
        assert_eq!(stages, Stage::ALL.to_vec());
        for m in &got {
            assert_eq!(
                m.envelope.message_id,
                message_id(m.stage, &signal_id("ETH/USD", &cycle))
            );
        }
        // The dashboard message reached the SSE hub.
        let sub = hub.subscribe_fresh();
        assert_eq!(sub.backlog.len(), 1);
        assert_eq!(sub.backlog[0].kind, "signal");
        let latest = publisher.latest();
        // What goes out on the wire: the payload as it serializes.
        let p = serde_json::to_value(&latest[0].envelope.payload).expect("json");
        for key in [
            "action",
            "confidence",
            "opportunity_score",
            "opportunity_tier",
            "summary",
            "valid",
            "expires_at",
        ] {
            assert!(p.get(key).is_some(), "missing {key} in {p}");
        }
        let expires: chrono::DateTime<Utc> = p["expires_at"]
            .as_str()
            .expect("expires_at")
            .parse()
            .expect("time");
        assert_eq!(expires, next + chrono::Duration::seconds(30));
    }
}
