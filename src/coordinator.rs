//! One cycle: every symbol through the pipeline in a bounded, work-conserving pool.
//!
//! - Concurrency is a semaphore of `concurrency` permits, each moved into the symbol's task:
//!   the moment one symbol finishes the next starts (no batches waiting for their slowest).
//! - A symbol's deadline starts when it gets its permit (time queued is not held against it).
//! - At the whole-cycle deadline, or when the runner cancels (shutdown), unfinished symbols
//!   are cancelled; what finished stays published.
//! - Every symbol holds its lock while it runs, extends it every third of the TTL, stops if
//!   an extension fails (someone else may own it now), and always releases it.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::coordination::{Coordination, LockOutcome};
use crate::pipeline::{PipelineContext, run_symbol};
use crate::publish::SymbolFailure;
use crate::schedule::CycleId;
use crate::telemetry::names;

/// The parameters of one cycle.
#[derive(Debug, Clone)]
pub struct CyclePlan {
    /// The tick.
    pub cycle: CycleId,
    /// The tick after it (for `expires_at`).
    pub next_tick: DateTime<Utc>,
    /// Pool limit.
    pub concurrency: usize,
    /// Per-symbol deadline.
    pub symbol_timeout: Duration,
    /// Whole-cycle deadline.
    pub cycle_deadline: Instant,
}

/// How one symbol ended.
#[derive(Debug, Clone, PartialEq)]
pub enum SymbolResult {
    /// Every stage done.
    Completed {
        /// Time from permit to report.
        latency: Duration,
    },
    /// Stopped with a reason.
    Failed {
        /// Bounded reason.
        reason: &'static str,
        /// Stage it stopped at.
        stage: &'static str,
        /// Whether it counts as a latency sample (a timeout does: it says "slow").
        latency: Option<Duration>,
    },
    /// Not attempted.
    Skipped {
        /// Bounded reason (`locked`, `claimed_elsewhere`).
        reason: &'static str,
    },
}

/// What a cycle did.
#[derive(Debug, Clone, Default)]
pub struct CycleReport {
    /// Per symbol, in configuration order.
    pub results: Vec<(String, SymbolResult)>,
    /// Whether the whole-cycle deadline cut symbols off.
    pub hit_cycle_deadline: bool,
}

impl CycleReport {
    /// Symbols completed.
    pub fn ok(&self) -> u32 {
        self.results
            .iter()
            .filter(|(_, r)| matches!(r, SymbolResult::Completed { .. }))
            .count() as u32
    }
    /// Symbols failed or cancelled.
    pub fn failed(&self) -> u32 {
        self.results
            .iter()
            .filter(|(_, r)| matches!(r, SymbolResult::Failed { .. }))
            .count() as u32
    }
    /// Symbols not attempted.
    pub fn skipped(&self) -> u32 {
        self.results
            .iter()
            .filter(|(_, r)| matches!(r, SymbolResult::Skipped { .. }))
            .count() as u32
    }
    /// Failures for the summary.
    pub fn failures(&self) -> Vec<SymbolFailure> {
        self.results
            .iter()
            .filter_map(|(s, r)| match r {
                SymbolResult::Failed { reason, stage, .. } => Some(SymbolFailure {
                    symbol: s.clone(),
                    reason: reason.to_string(),
                    stage: stage.to_string(),
                }),
                _ => None,
            })
            .collect()
    }
    /// Latency samples (completed symbols and timeouts).
    pub fn latencies(&self) -> impl Iterator<Item = Duration> + '_ {
        self.results.iter().filter_map(|(_, r)| match r {
            SymbolResult::Completed { latency } => Some(*latency),
            SymbolResult::Failed { latency, .. } => *latency,
            SymbolResult::Skipped { .. } => None,
        })
    }
}

/// Runs cycles.
pub struct Coordinator {
    coord: Arc<dyn Coordination>,
    pipeline: Arc<PipelineContext>,
    symbols: Arc<[String]>,
    lock_ttl: Duration,
    work_sharing: bool,
    claim_ttl: Duration,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("symbols", &self.symbols.len())
            .finish_non_exhaustive()
    }
}

enum End {
    Done(SymbolResult),
    CycleDeadline,
    Shutdown,
    LockLost,
}

impl Coordinator {
    /// A coordinator for `symbols`.
    pub fn new(
        coord: Arc<dyn Coordination>,
        pipeline: Arc<PipelineContext>,
        symbols: Vec<String>,
        lock_ttl: Duration,
        work_sharing: bool,
        claim_ttl: Duration,
    ) -> Self {
        Self {
            coord,
            pipeline,
            symbols: symbols.into(),
            lock_ttl,
            work_sharing,
            claim_ttl,
        }
    }

    /// The configured symbols.
    pub fn symbols(&self) -> &[String] {
        &self.symbols
    }

    /// Runs one cycle. `cancel` is the runner's hard stop (shutdown grace exhausted).
    pub async fn run_cycle(&self, plan: &CyclePlan, cancel: &CancellationToken) -> CycleReport {
        let sem = Arc::new(Semaphore::new(plan.concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for (idx, symbol) in self.symbols.iter().enumerate() {
            let sem = sem.clone();
            let coord = self.coord.clone();
            let pipeline = self.pipeline.clone();
            let symbol = symbol.clone();
            let plan = plan.clone();
            let cancel = cancel.clone();
            let (lock_ttl, work_sharing, claim_ttl) =
                (self.lock_ttl, self.work_sharing, self.claim_ttl);
            tasks.spawn(async move {
                let r = process_symbol(
                    &*coord,
                    &pipeline,
                    &symbol,
                    &plan,
                    &cancel,
                    sem,
                    lock_ttl,
                    work_sharing,
                    claim_ttl,
                )
                .await;
                (idx, symbol, r)
            });
        }
        let mut results: Vec<Option<(String, SymbolResult)>> = vec![None; self.symbols.len()];
        let mut hit_deadline = false;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((idx, symbol, result)) => {
                    hit_deadline |= matches!(
                        result,
                        SymbolResult::Failed {
                            reason: "cycle_deadline",
                            ..
                        }
                    );
                    results[idx] = Some((symbol, result));
                }
                Err(e) => {
                    // A symbol task panicked: a bug, but it must not take the cycle down.
                    tracing::error!(error = %e, "symbol task failed unexpectedly");
                }
            }
        }
        let results = results
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                r.unwrap_or_else(|| {
                    (
                        self.symbols[i].clone(),
                        SymbolResult::Failed {
                            reason: "internal_error",
                            stage: "none",
                            latency: None,
                        },
                    )
                })
            })
            .collect();
        CycleReport {
            results,
            hit_cycle_deadline: hit_deadline,
        }
    }
}

fn skipped(symbol: &str, reason: &'static str) -> SymbolResult {
    metrics::counter!(names::SIGNAL_GENERATION_SKIPPED, "symbol" => symbol.to_string(), "reason" => reason).increment(1);
    SymbolResult::Skipped { reason }
}

fn failed(
    symbol: &str,
    reason: &'static str,
    stage: &'static str,
    latency: Option<Duration>,
) -> SymbolResult {
    metrics::counter!(names::SIGNAL_GENERATION_SKIPPED, "symbol" => symbol.to_string(), "reason" => reason).increment(1);
    SymbolResult::Failed {
        reason,
        stage,
        latency,
    }
}

#[allow(clippy::too_many_arguments)]
async fn process_symbol(
    coord: &dyn Coordination,
    pipeline: &PipelineContext,
    symbol: &str,
    plan: &CyclePlan,
    cancel: &CancellationToken,
    sem: Arc<Semaphore>,
    lock_ttl: Duration,
    work_sharing: bool,
    claim_ttl: Duration,
) -> SymbolResult {
    // Wait for a pool slot, unless the cycle ends first.
    let permit = tokio::select! {
        biased;
        _ = cancel.cancelled() => return failed(symbol, "shutdown", "queued", None),
        _ = tokio::time::sleep_until(plan.cycle_deadline) => {
            tracing::warn!(symbol, "cycle deadline reached before the symbol got a slot");
            return failed(symbol, "cycle_deadline", "queued", None);
        }
        p = sem.acquire_owned() => match p {
            Ok(p) => p,
            Err(_) => return failed(symbol, "internal_error", "queued", None),
        },
    };

    if work_sharing {
        match coord.claim_symbol(&plan.cycle, symbol, claim_ttl).await {
            Ok(true) => {}
            Ok(false) => {
                return SymbolResult::Skipped {
                    reason: "claimed_elsewhere",
                };
            }
            Err(e) => {
                tracing::warn!(symbol, error = %e, "cannot claim symbol");
                return failed(symbol, "coordination_unavailable", "lock", None);
            }
        }
    }

    match coord.acquire_lock(symbol).await {
        Ok(LockOutcome::Acquired) => {}
        Ok(LockOutcome::Recovered(reason)) => {
            tracing::warn!(symbol, reason = reason.as_str(), "recovered a stale lock");
            metrics::counter!(names::STALE_LOCKS_RECOVERED, "reason" => reason.as_str())
                .increment(1);
        }
        Ok(LockOutcome::Held) => {
            tracing::warn!(symbol, "symbol still locked by a live owner, skipping");
            return skipped(symbol, "locked");
        }
        Err(e) => {
            tracing::warn!(symbol, error = %e, "cannot take symbol lock");
            return failed(symbol, "coordination_unavailable", "lock", None);
        }
    }
    metrics::gauge!(names::ACTIVE_LOCKS).increment(1.0);
    metrics::gauge!(names::SYMBOLS_PROCESSING).increment(1.0);

    let start = Instant::now();
    let deadline = (start + plan.symbol_timeout).min(plan.cycle_deadline);
    let work = run_symbol(pipeline, symbol, &plan.cycle, plan.next_tick, deadline);
    // Extend the lock every third of its TTL while the work runs; a failed extension means
    // the lock may be someone else's now, so the work stops.
    let keep_lock = async {
        let every = (lock_ttl / 3).max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(every).await;
            match coord.extend_lock(symbol).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!(symbol, error = %e, "lock extension failed");
                    return;
                }
            }
        }
    };
    let end = tokio::select! {
        r = tokio::time::timeout_at(deadline, work) => End::Done(match r {
            Ok(Ok(out)) => {
                tracing::debug!(symbol, action = out.action.as_str(), score = out.opportunity_score, "symbol done");
                SymbolResult::Completed { latency: Instant::now().duration_since(start) }
            }
            Ok(Err(f)) => {
                tracing::warn!(symbol, stage = f.stage.as_str(), reason = f.error.reason(), error = %f.error, "symbol failed");
                failed(symbol, f.error.reason(), f.stage.as_str(), None)
            }
            Err(_) if deadline >= plan.cycle_deadline && deadline < start + plan.symbol_timeout => {
                // The cycle deadline, not the symbol's own, cut it off.
                End::CycleDeadline.into_result(symbol)
            }
            Err(_) => {
                tracing::warn!(symbol, timeout_s = plan.symbol_timeout.as_secs_f64(), "symbol timed out");
                failed(symbol, "timeout", "pipeline", Some(Instant::now().duration_since(start)))
            }
        }),
        _ = cancel.cancelled() => End::Shutdown,
        _ = keep_lock => End::LockLost,
    };
    let result = end.into_result(symbol);

    match coord.release_lock(symbol).await {
        Ok(_) => {}
        Err(e) => tracing::warn!(symbol, error = %e, "lock release failed; it will expire"),
    }
    metrics::gauge!(names::ACTIVE_LOCKS).decrement(1.0);
    metrics::gauge!(names::SYMBOLS_PROCESSING).decrement(1.0);
    metrics::histogram!(names::SYMBOL_PROCESSING_DURATION_SECONDS)
        .record(Instant::now().duration_since(start).as_secs_f64());
    drop(permit);
    result
}

impl End {
    fn into_result(self, symbol: &str) -> SymbolResult {
        match self {
            End::Done(r) => r,
            End::CycleDeadline => {
                tracing::warn!(symbol, "cancelled at the cycle deadline");
                failed(symbol, "cycle_deadline", "pipeline", None)
            }
            End::Shutdown => {
                tracing::warn!(symbol, "cancelled by shutdown");
                failed(symbol, "shutdown", "pipeline", None)
            }
            End::LockLost => {
                tracing::warn!(symbol, "lost the symbol lock, work stopped");
                failed(symbol, "lock_lost", "pipeline", None)
            }
        }
    }
}
