//! Test support: a pipeline whose every stage is the timed test agent (for the pool and
//! tick-loop tests and the pool benchmark). Compiled only for tests and with the
//! `test-support` feature.

use std::time::Duration;

use super::PipelineContext;

/// A pipeline on the simulated market whose every stage is `agent`, publishing to `publisher`
/// (advice from a score of 70, 120 candles, 30 s expiry grace: the defaults).
pub fn pipeline(
    agent: std::sync::Arc<crate::agents::testing::Timed>,
    publisher: std::sync::Arc<crate::publish::Publisher>,
) -> PipelineContext {
    PipelineContext {
        market: std::sync::Arc::new(crate::market::simulated::Simulated::new()),
        agents: crate::agents::StageAgents {
            signal: agent.clone(),
            advise: agent.clone(),
            report: agent,
        },
        publisher,
        candles: 120,
        clock: crate::schedule::Clock::System,
        strategies: Default::default(),
        advise_min_score: 70.0,
        expiry_grace: Duration::from_secs(30),
        calibrator: None,
    }
}
