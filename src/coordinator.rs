//! One cycle: every symbol through the pipeline in a bounded, work-conserving pool.
//!
//! - Concurrency is a semaphore of `concurrency` permits, each moved into the symbol's task:
//!   the moment one symbol finishes the next starts (no batches waiting for their slowest).
//! - Time: each agent call has its own deadline (`call_timeout`, the seed's subagent timeout,
//!   counted from when the request can go out); a symbol as a whole is bounded only by the
//!   cycle deadline, so a three-call pipeline is never cut off for being three calls long.
//! - At the whole-cycle deadline, or when the runner cancels (shutdown), unfinished symbols
//!   are cancelled; what finished stays published.
//! - Every symbol holds its lock while it runs, extends it every third of the TTL, stops if
//!   an extension fails (someone else may own it now), and always releases it.
//! - With work sharing, a replica first claims each symbol for the tick; it claims in an
//!   order of its own, spread over the start of the tick, so the replicas divide the symbols
//!   between them instead of the first one awake taking all ([`Coordinator::sharing_as`]).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::agents::CallLimits;
use crate::coordination::{Coordination, LockOutcome};
use crate::model::{FailedAt, Reason};
use crate::pipeline::{PipelineContext, run_symbol};
use crate::publish::SymbolFailure;
use crate::schedule::CycleId;
use crate::telemetry::names;
use tracing::Instrument;

/// The parameters of one cycle.
#[derive(Debug, Clone)]
pub struct CyclePlan {
    /// The tick.
    pub cycle: CycleId,
    /// The tick after it (for `expires_at`).
    pub next_tick: DateTime<Utc>,
    /// Pool limit.
    pub concurrency: usize,
    /// Deadline of one agent call (stretched by the adaptive policy in high latency).
    pub call_timeout: Duration,
    /// Whole-cycle deadline.
    pub cycle_deadline: Instant,
    /// Symbols left out for capacity: the last ones of the configured order (the order is
    /// the priority), skipped with reason `capacity` without being started.
    pub shed: usize,
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
        /// Why.
        reason: Reason,
        /// Where it stopped.
        stage: FailedAt,
        /// Whether it counts as a latency sample (a timeout does: it says "slow").
        latency: Option<Duration>,
        /// What happened, for people: the first cause among its attempts (an HTTP status
        /// with the start of the body, "connection refused to host:port", "no answer within
        /// 10 s"), redacted and at most [`MAX_ERROR_CHARS`] characters.
        error: Option<String>,
    },
    /// Not attempted.
    Skipped {
        /// Why (`capacity`, `locked`, `claimed_elsewhere`).
        reason: Reason,
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
    /// Symbols not attempted, with why (`capacity`, `locked`, `claimed_elsewhere`).
    pub fn skips(&self) -> Vec<crate::publish::SymbolSkip> {
        self.results
            .iter()
            .filter_map(|(s, r)| match r {
                SymbolResult::Skipped { reason } => Some(crate::publish::SymbolSkip {
                    symbol: s.clone(),
                    reason: *reason,
                }),
                _ => None,
            })
            .collect()
    }
    /// Failures for the summary.
    pub fn failures(&self) -> Vec<SymbolFailure> {
        self.results
            .iter()
            .filter_map(|(s, r)| match r {
                SymbolResult::Failed {
                    reason,
                    stage,
                    error,
                    ..
                } => Some(SymbolFailure {
                    symbol: s.clone(),
                    reason: *reason,
                    stage: *stage,
                    error: error.clone(),
                }),
                _ => None,
            })
            .collect()
    }
    /// Symbols that got a pool slot and their lock, so their agents were asked.
    pub fn started(&self) -> u32 {
        self.results
            .iter()
            .filter(|(_, r)| match r {
                SymbolResult::Completed { .. } => true,
                SymbolResult::Failed { stage, .. } => stage.ran(),
                SymbolResult::Skipped { .. } => false,
            })
            .count() as u32
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
    /// EWMA of each symbol's processing time (seconds), for the dispatch order.
    expected: std::sync::Mutex<std::collections::HashMap<String, f64>>,
    /// `parallel.batch_delay_ms`: at most a pool's worth of symbols start per this much time.
    batch_delay: Duration,
    /// With work sharing, the order this replica claims symbols in (indices into `symbols`)
    /// and the time its claims spread over; see [`Coordinator::sharing_as`].
    sharing: Option<(Vec<usize>, Duration)>,
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
            expected: Default::default(),
            batch_delay: Duration::ZERO,
            sharing: None,
        }
    }

    /// With work sharing, how this replica (`instance_id`) claims a tick's symbols: in an
    /// order of its own — by a hash of (instance id, symbol), highest first, rendezvous
    /// hashing — the `k`-th of `n` no sooner than `k/n` of `spread` after the tick starts
    /// (`coordination.claim_spread_ms`, at most a quarter of the period).
    ///
    /// Why: claims are first come, first served. Replicas that all claimed every symbol at
    /// once, in the configured order, left each symbol to whichever replica's claim reached
    /// Redis first — with a pool as large as the symbol list, one woken a millisecond early
    /// took them all, and the others only watched. Spread out, a symbol is claimed by the
    /// live replica that has it nearest the front of its order, tens of milliseconds before
    /// any other tries: every replica gets about its share, a symbol tends to stay with the
    /// same replica tick after tick, and a replica that is gone simply leaves its symbols to
    /// the next one in their orders. The cost is the spread itself: a lone replica starts its
    /// last symbol `spread` after the tick. Without work sharing this changes nothing.
    pub fn sharing_as(mut self, instance_id: &str, spread: Duration) -> Self {
        self.sharing = Some((share_order(instance_id, &self.symbols), spread));
        self
    }

    /// Spaces the dispatches so that at most a pool's worth of symbols start per
    /// `batch_delay` (`parallel.batch_delay_ms`): the seed's "a batch, then a pause" as a
    /// steady rate, without the barrier that idles the pool behind a batch's slowest symbol.
    /// It smooths the burst a provider sees at the top of every tick. Zero: no spacing.
    pub fn with_batch_delay(mut self, batch_delay: Duration) -> Self {
        self.batch_delay = batch_delay;
        self
    }

    /// The configured symbols.
    pub fn symbols(&self) -> &[String] {
        &self.symbols
    }

    /// Symbols in dispatch order: longest expected processing time first (LPT), unknown
    /// symbols first of all. With a pool this keeps one slow symbol from starting last and
    /// stretching the cycle: list scheduling in LPT order is within 4/3 of optimal, random
    /// order only within 2.
    ///
    /// With work sharing, the replica's own claim order instead
    /// ([`sharing_as`](Self::sharing_as)): a replica learns the times only of the symbols it
    /// did, so LPT would put first every symbol it did not do — the very ones the others
    /// have at the front of theirs.
    fn dispatch_order(&self) -> Vec<usize> {
        if self.work_sharing
            && let Some((order, _)) = &self.sharing
        {
            return order.clone();
        }
        let expected = lock(&self.expected);
        let mut order: Vec<usize> = (0..self.symbols.len()).collect();
        let key = |i: &usize| {
            expected
                .get(&self.symbols[*i])
                .copied()
                .unwrap_or(f64::INFINITY)
        };
        order.sort_by(|a, b| key(b).total_cmp(&key(a)));
        order
    }

    fn learn(&self, results: &[(String, SymbolResult)]) {
        let mut expected = lock(&self.expected);
        for (symbol, r) in results {
            let sample = match r {
                SymbolResult::Completed { latency } => latency.as_secs_f64(),
                SymbolResult::Failed {
                    latency: Some(l), ..
                } => l.as_secs_f64(),
                _ => continue,
            };
            // EWMA: recent cycles matter most, one outlier does not reorder everything.
            let e = expected.entry(symbol.clone()).or_insert(sample);
            *e = 0.5 * *e + 0.5 * sample;
        }
    }

    /// Runs one cycle. `cancel` is the runner's hard stop (shutdown grace exhausted).
    pub async fn run_cycle(&self, plan: &CyclePlan, cancel: &CancellationToken) -> CycleReport {
        let sem = Arc::new(Semaphore::new(plan.concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        let mut results: Vec<Option<(String, SymbolResult)>> = vec![None; self.symbols.len()];
        let keep = self.symbols.len().saturating_sub(plan.shed);
        if plan.shed > 0 {
            tracing::warn!(cycle_id = %plan.cycle, shed = plan.shed, kept = keep, "the tick's work cannot all fit its deadline at the endpoint's capacity; leaving out the last symbols");
        }
        for (i, symbol) in self.symbols.iter().enumerate().skip(keep) {
            results[i] = Some((symbol.clone(), skipped(symbol, Reason::Capacity)));
        }
        let order: Vec<usize> = self
            .dispatch_order()
            .into_iter()
            .filter(|i| *i < keep)
            .collect();
        let claim_times = self.claim_times(plan, order.len());
        let mut order = order.into_iter().enumerate();
        let spacing = self.batch_delay / u32::try_from(plan.concurrency.max(1)).unwrap_or(u32::MAX);
        let mut next_start: Option<Instant> = None;
        // Dispatch: take a permit (no sooner than the spacing allows), then spawn the symbol
        // with it. A symbol that gets no permit before the cycle ends (deadline or shutdown)
        // is recorded as such, never started.
        while let Some((pos, idx)) = order.next() {
            let not_before = match (next_start, claim_times.as_ref().map(|at| at(pos))) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            let permit = tokio::select! {
                biased;
                _ = cancel.cancelled() => Err(Reason::Shutdown),
                _ = tokio::time::sleep_until(plan.cycle_deadline) => Err(Reason::CycleDeadline),
                p = async {
                    if let Some(at) = not_before {
                        tokio::time::sleep_until(at).await;
                    }
                    sem.clone().acquire_owned().await
                } => p.map_err(|_| Reason::InternalError),
            };
            if !spacing.is_zero() {
                next_start = Some(Instant::now() + spacing);
            }
            let permit = match permit {
                Ok(p) => p,
                Err(reason) => {
                    for i in std::iter::once(idx).chain(order.by_ref().map(|(_, i)| i)) {
                        let symbol = &self.symbols[i];
                        tracing::warn!(symbol = %symbol, reason = reason.as_str(), "cycle ended before the symbol got a pool slot");
                        results[i] = Some((
                            symbol.clone(),
                            failed(symbol, reason, FailedAt::Queued, None, None),
                        ));
                    }
                    break;
                }
            };
            let job = self.job(idx, plan, cancel);
            // Everything logged while this symbol is worked on — an LLM refusal, a 429, a
            // lock lost — says which symbol and tick it was, wherever the event is raised.
            let span = tracing::info_span!("symbol", cycle_id = %plan.cycle, symbol = %job.symbol);
            tasks.spawn(
                async move {
                    let r = job.run().await;
                    drop(permit);
                    (idx, job.symbol, r)
                }
                .instrument(span),
            );
        }
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((idx, symbol, result)) => results[idx] = Some((symbol, result)),
                Err(e) => {
                    // A symbol task panicked: a bug, but it must not take the cycle down.
                    tracing::error!(error = %e, "symbol task failed unexpectedly");
                }
            }
        }
        self.report(results)
    }

    /// The job of the symbol at `idx` in this cycle.
    fn job(&self, idx: usize, plan: &CyclePlan, cancel: &CancellationToken) -> SymbolJob {
        SymbolJob {
            coord: self.coord.clone(),
            pipeline: self.pipeline.clone(),
            symbol: self.symbols[idx].clone(),
            plan: plan.clone(),
            cancel: cancel.clone(),
            lock_ttl: self.lock_ttl,
            work_sharing: self.work_sharing,
            claim_ttl: self.claim_ttl,
        }
    }

    /// With work sharing, when the symbol at each position of this replica's order may be
    /// claimed (see [`sharing_as`](Self::sharing_as)); `None`: at once.
    fn claim_times(&self, plan: &CyclePlan, n: usize) -> Option<impl Fn(usize) -> Instant> {
        let (_, spread) = self.sharing.as_ref().filter(|_| self.work_sharing)?;
        let period = (plan.next_tick - plan.cycle.time())
            .to_std()
            .unwrap_or(Duration::ZERO);
        let spread = (*spread).min(period / 4);
        if spread.is_zero() || n == 0 {
            return None;
        }
        let start = Instant::now();
        Some(move |pos: usize| start + spread.mul_f64(pos as f64 / n as f64))
    }

    /// The cycle's report from each symbol's result; a symbol without one (its task
    /// panicked) is an internal error, named as such. The latencies feed the next order.
    fn report(&self, results: Vec<Option<(String, SymbolResult)>>) -> CycleReport {
        let results: Vec<(String, SymbolResult)> = results
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                r.unwrap_or_else(|| {
                    (
                        self.symbols[i].clone(),
                        SymbolResult::Failed {
                            reason: Reason::InternalError,
                            stage: FailedAt::Unknown,
                            latency: None,
                            error: Some("the symbol's task ended without a result".into()),
                        },
                    )
                })
            })
            .collect();
        self.learn(&results);
        let hit_cycle_deadline = results.iter().any(|(_, r)| {
            matches!(
                r,
                SymbolResult::Failed {
                    reason: Reason::CycleDeadline,
                    ..
                }
            )
        });
        CycleReport {
            results,
            hit_cycle_deadline,
        }
    }
}

/// `symbols`' indices by SHA-256 of (`instance_id`, symbol), highest first: an order of its
/// own for each instance id, the same in every process and version (std's hasher promises
/// neither), so a replica keeps its order across restarts and a rolling update.
fn share_order(instance_id: &str, symbols: &[String]) -> Vec<usize> {
    use sha2::{Digest, Sha256};
    let rank = |symbol: &str| {
        let digest = Sha256::new()
            .chain_update(instance_id.as_bytes())
            .chain_update([0u8])
            .chain_update(symbol.as_bytes())
            .finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_be_bytes(first)
    };
    let mut ranked: Vec<(u64, usize)> = symbols
        .iter()
        .enumerate()
        .map(|(i, s)| (rank(s), i))
        .collect();
    ranked.sort_unstable_by(|a, b| b.cmp(a));
    ranked.into_iter().map(|(_, i)| i).collect()
}

/// Extends `symbol`'s lock every third of its TTL while the work runs; returns when an
/// extension fails, which means the lock may be someone else's now, so the work stops.
async fn keep_lock(coord: &dyn Coordination, symbol: &str, lock_ttl: Duration) {
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
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One symbol's work in one cycle (it already holds its pool permit).
struct SymbolJob {
    coord: Arc<dyn Coordination>,
    pipeline: Arc<PipelineContext>,
    symbol: String,
    plan: CyclePlan,
    cancel: CancellationToken,
    lock_ttl: Duration,
    work_sharing: bool,
    claim_ttl: Duration,
}

fn skipped(symbol: &str, reason: Reason) -> SymbolResult {
    metrics::counter!(names::SIGNAL_GENERATION_SKIPPED, "symbol" => symbol.to_string(), "reason" => reason.as_str()).increment(1);
    SymbolResult::Skipped { reason }
}

/// Longest cause kept with a failure: enough for a status, a host:port and the start of an
/// error body; short enough for `/api/cycles` and a log line.
pub const MAX_ERROR_CHARS: usize = 400;

fn failed(
    symbol: &str,
    reason: Reason,
    stage: FailedAt,
    latency: Option<Duration>,
    error: Option<String>,
) -> SymbolResult {
    metrics::counter!(names::SIGNAL_GENERATION_SKIPPED, "symbol" => symbol.to_string(), "reason" => reason.as_str()).increment(1);
    SymbolResult::Failed {
        reason,
        stage,
        latency,
        error: error.map(|e| {
            crate::telemetry::redact(&e)
                .chars()
                .take(MAX_ERROR_CHARS)
                .collect()
        }),
    }
}

impl SymbolJob {
    /// Claims the symbol (work sharing) and takes its lock; `Err` is how the symbol ends
    /// when it cannot (claimed elsewhere, locked by a live owner, coordination down).
    async fn take(&self) -> Result<(), SymbolResult> {
        let (coord, symbol, plan) = (&*self.coord, self.symbol.as_str(), &self.plan);
        let unavailable = |e: String| {
            failed(
                symbol,
                Reason::CoordinationUnavailable,
                FailedAt::Lock,
                None,
                Some(e),
            )
        };
        if self.work_sharing {
            match coord
                .claim_symbol(&plan.cycle, symbol, self.claim_ttl)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    return Err(SymbolResult::Skipped {
                        reason: Reason::ClaimedElsewhere,
                    });
                }
                Err(e) => {
                    tracing::warn!(symbol, error = %e, "cannot claim symbol");
                    return Err(unavailable(e.to_string()));
                }
            }
        }
        match coord.acquire_lock(symbol).await {
            Ok(LockOutcome::Acquired) => Ok(()),
            Ok(LockOutcome::Recovered(reason)) => {
                tracing::warn!(symbol, reason = reason.as_str(), "recovered a stale lock");
                metrics::counter!(names::STALE_LOCKS_RECOVERED, "reason" => reason.as_str())
                    .increment(1);
                Ok(())
            }
            Ok(LockOutcome::Held) => {
                tracing::warn!(symbol, "symbol still locked by a live owner, skipping");
                Err(skipped(symbol, Reason::Locked))
            }
            Err(e) => {
                tracing::warn!(symbol, error = %e, "cannot take symbol lock");
                Err(unavailable(e.to_string()))
            }
        }
    }

    async fn run(&self) -> SymbolResult {
        let (coord, pipeline, symbol, plan, cancel) = (
            &*self.coord,
            &*self.pipeline,
            self.symbol.as_str(),
            &self.plan,
            &self.cancel,
        );
        if let Err(end) = self.take().await {
            return end;
        }
        metrics::gauge!(names::ACTIVE_LOCKS).increment(1.0);
        metrics::gauge!(names::SYMBOLS_PROCESSING).increment(1.0);

        let start = Instant::now();
        let limits = CallLimits {
            until: plan.cycle_deadline,
            per_call: plan.call_timeout,
        };
        let work = run_symbol(pipeline, symbol, &plan.cycle, plan.next_tick, limits);
        let keep_lock = keep_lock(coord, symbol, self.lock_ttl);
        let end = tokio::select! {
            r = tokio::time::timeout_at(plan.cycle_deadline, work) => match r {
                Ok(Ok(out)) => {
                    tracing::info!(
                    symbol,
                    cycle_id = %plan.cycle,
                    action = out.action.as_str(),
                    score = out.opportunity_score,
                    "symbol completed");
                    End::Done(SymbolResult::Completed { latency: Instant::now().duration_since(start) })
                }
                Ok(Err(f)) if f.error.is_timeout()
                    && Instant::now() >= plan.cycle_deadline => End::CycleDeadline,
                Ok(Err(f)) => {
                    let cause = f.cause();
                    tracing::warn!(symbol, cycle_id = %plan.cycle, stage = f.stage.as_str(), reason = f.error.reason().as_str(), error = %cause, "symbol failed");
                    // A timeout says "slow": it feeds the dispatch order like a completion.
                    let latency = f.error.is_timeout()
                        .then(|| Instant::now().duration_since(start));
                    End::Done(failed(symbol, f.error.reason(), FailedAt::Stage(f.stage), latency, Some(cause)))
                }
                Err(_) => End::CycleDeadline,
            },
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
        // Labelled by symbol (bounded by the configured symbols): which symbol is slow is
        // what an operator looking at this asks first.
        metrics::histogram!(names::SYMBOL_PROCESSING_DURATION_SECONDS, "symbol" => symbol.to_string())
            .record(Instant::now().duration_since(start).as_secs_f64());
        result
    }
}

impl End {
    fn into_result(self, symbol: &str) -> SymbolResult {
        match self {
            End::Done(r) => r,
            End::CycleDeadline => {
                tracing::warn!(symbol, "cancelled at the cycle deadline");
                failed(
                    symbol,
                    Reason::CycleDeadline,
                    FailedAt::Pipeline,
                    None,
                    Some("the cycle deadline passed first".into()),
                )
            }
            End::Shutdown => {
                tracing::warn!(symbol, "cancelled by shutdown");
                failed(
                    symbol,
                    Reason::Shutdown,
                    FailedAt::Pipeline,
                    None,
                    Some("cancelled by shutdown".into()),
                )
            }
            End::LockLost => {
                tracing::warn!(symbol, "lost the symbol lock, work stopped");
                failed(
                    symbol,
                    Reason::LockLost,
                    FailedAt::Pipeline,
                    None,
                    Some("the symbol lock was lost; work stopped".into()),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::testing::Timed;
    use crate::coordination::LockTiming;
    use crate::coordination::memory::{MemoryCoordination, MemoryStore};
    use crate::pipeline::testing;
    use crate::publish::Publisher;
    use std::collections::HashMap;

    fn timing() -> LockTiming {
        LockTiming {
            ttl: Duration::from_secs(90),
            stale_after: Duration::from_secs(120),
            heartbeat_ttl: Duration::from_secs(30),
        }
    }

    fn setup(lat: &[(&str, u64)], store: MemoryStore) -> (Coordinator, Arc<Timed>, Arc<Publisher>) {
        let agent = Arc::new(Timed::default());
        for (s, ms) in lat {
            agent.set(s, Duration::from_millis(*ms));
        }
        let publisher = Arc::new(Publisher::new(
            crate::publish::hub::Hub::new(1000, None),
            10,
            None,
        ));
        let pipeline = Arc::new(testing::pipeline(agent.clone(), publisher.clone()));
        let coord = Arc::new(MemoryCoordination::new(store, "me", timing()));
        let symbols = lat.iter().map(|(s, _)| s.to_string()).collect();
        (
            Coordinator::new(coord, pipeline, symbols, timing().ttl, false, timing().ttl),
            agent,
            publisher,
        )
    }

    fn plan(concurrency: usize, call_timeout_ms: u64, cycle_ms: u64) -> CyclePlan {
        let cycle = CycleId::new(chrono::Utc::now());
        CyclePlan {
            cycle,
            next_tick: cycle.time() + chrono::Duration::minutes(1),
            concurrency,
            call_timeout: Duration::from_millis(call_timeout_ms),
            cycle_deadline: Instant::now() + Duration::from_millis(cycle_ms),
            shed: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pool_is_work_conserving() {
        // Limit 2: A takes 5 s; B, C, D take 1 s each. Fixed batches would start C and D
        // only after A finished (5 s); the pool starts C at 1 s and D at 2 s.
        let (c, agent, _) = setup(
            &[
                ("A/USD", 5000),
                ("B/USD", 1000),
                ("C/USD", 1000),
                ("D/USD", 1000),
            ],
            MemoryStore::new(),
        );
        let t0 = Instant::now();
        let r = c
            .run_cycle(&plan(2, 10_000, 60_000), &CancellationToken::new())
            .await;
        assert_eq!(r.ok(), 4);
        assert_eq!(Instant::now().duration_since(t0), Duration::from_secs(5));
        let started: HashMap<String, Duration> = agent
            .started()
            .iter()
            .map(|(s, t)| (s.clone(), t.duration_since(t0)))
            .collect();
        assert_eq!(started["A/USD"], Duration::ZERO);
        assert_eq!(started["B/USD"], Duration::ZERO);
        assert_eq!(started["C/USD"], Duration::from_secs(1));
        assert_eq!(started["D/USD"], Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn batch_delay_spaces_the_starts_and_keeps_the_pool_full() {
        // Pool of 2, batch delay 1 s: a start every 500 ms at most, whatever the pool allows.
        let (c, agent, _) = setup(
            &[
                ("A/USD", 100),
                ("B/USD", 100),
                ("C/USD", 100),
                ("D/USD", 3000),
            ],
            MemoryStore::new(),
        );
        let c = c.with_batch_delay(Duration::from_secs(1));
        let t0 = Instant::now();
        let r = c
            .run_cycle(&plan(2, 10_000, 60_000), &CancellationToken::new())
            .await;
        assert_eq!(r.ok(), 4);
        let mut starts: Vec<Duration> = agent
            .started()
            .iter()
            .map(|(_, t)| t.duration_since(t0))
            .collect();
        starts.sort();
        assert_eq!(
            starts,
            [0, 500, 1000, 1500].map(Duration::from_millis).to_vec()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn call_timeout_and_cycle_deadline_keep_what_finished() {
        let (c, _, publisher) = setup(
            &[
                ("A/USD", 100),
                ("SLOW/USD", 60_000),
                ("B/USD", 100),
                ("C/USD", 2_500),
            ],
            MemoryStore::new(),
        );
        // Call timeout 3 s, cycle deadline 2 s: C is cut off by the cycle, SLOW too.
        let r = c
            .run_cycle(&plan(4, 3000, 2000), &CancellationToken::new())
            .await;
        let by: HashMap<&str, &SymbolResult> =
            r.results.iter().map(|(s, r)| (s.as_str(), r)).collect();
        assert!(matches!(by["A/USD"], SymbolResult::Completed { .. }));
        assert!(matches!(by["B/USD"], SymbolResult::Completed { .. }));
        assert!(matches!(
            by["C/USD"],
            SymbolResult::Failed {
                reason: Reason::CycleDeadline,
                ..
            }
        ));
        assert!(matches!(
            by["SLOW/USD"],
            SymbolResult::Failed {
                reason: Reason::CycleDeadline,
                ..
            }
        ));
        assert!(r.hit_cycle_deadline);
        let published: Vec<String> = publisher.latest().into_iter().map(|m| m.symbol).collect();
        assert!(
            published.contains(&"A/USD".to_string()) && published.contains(&"B/USD".to_string())
        );
        // With a generous cycle deadline the call's own timeout applies.
        let r = c
            .run_cycle(&plan(4, 3000, 60_000), &CancellationToken::new())
            .await;
        let slow = r
            .results
            .iter()
            .find(|(s, _)| s == "SLOW/USD")
            .map(|(_, r)| r.clone());
        assert!(matches!(
            slow,
            Some(SymbolResult::Failed {
                reason: Reason::Timeout,
                latency: Some(_),
                ..
            })
        ));
        assert!(!r.hit_cycle_deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn queued_symbols_never_start_after_the_cycle_deadline() {
        let (c, agent, _) = setup(
            &[("A/USD", 5000), ("B/USD", 5000), ("C/USD", 10)],
            MemoryStore::new(),
        );
        let r = c
            .run_cycle(&plan(1, 10_000, 3000), &CancellationToken::new())
            .await;
        // Only one slot: the first symbol runs into the deadline, the others never start.
        assert_eq!(agent.started().len(), 1);
        assert_eq!(
            r.failures()
                .iter()
                .filter(|f| f.stage == FailedAt::Queued)
                .count(),
            2
        );
    }

    #[tokio::test(start_paused = true)]
    async fn slowest_symbols_go_first_once_known() {
        let (c, agent, _) = setup(
            &[("FAST/USD", 100), ("MID/USD", 1000), ("SLOW/USD", 3000)],
            MemoryStore::new(),
        );
        c.run_cycle(&plan(1, 10_000, 60_000), &CancellationToken::new())
            .await;
        agent.clear_started();
        c.run_cycle(&plan(1, 10_000, 60_000), &CancellationToken::new())
            .await;
        let order: Vec<String> = agent.started().iter().map(|(s, _)| s.clone()).collect();
        assert_eq!(order, vec!["SLOW/USD", "MID/USD", "FAST/USD"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_symbol_locked_elsewhere_is_skipped_and_locks_are_released() {
        let store = MemoryStore::new();
        let other = MemoryCoordination::new(store.clone(), "other", timing());
        other.heartbeat().await.unwrap();
        assert_eq!(
            other.acquire_lock("B/USD").await.unwrap(),
            LockOutcome::Acquired
        );
        let (c, _, _) = setup(&[("A/USD", 10), ("B/USD", 10)], store.clone());
        let r = c
            .run_cycle(&plan(2, 1000, 5000), &CancellationToken::new())
            .await;
        assert_eq!(r.ok(), 1);
        assert_eq!(r.skipped(), 1);
        let me = MemoryCoordination::new(store, "me", timing());
        assert!(
            me.held_locks().await.unwrap().is_empty(),
            "every lock released after the cycle"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lock_lost_mid_symbol_stops_the_work_and_publishes_nothing_more() {
        // A takes 60 s; its lock (TTL 90 s) is extended every 30 s. At 10 s another instance
        // takes it over (our heartbeat is missing, as after a long pause of this process):
        // the extension at 30 s fails and A stops there, B is unaffected.
        let store = MemoryStore::new();
        let (c, _, publisher) = setup(&[("A/USD", 60_000), ("B/USD", 10)], store.clone());
        let thief = MemoryCoordination::new(store.clone(), "thief", timing());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            thief.heartbeat().await.unwrap();
            assert_eq!(
                thief.acquire_lock("A/USD").await.unwrap(),
                LockOutcome::Recovered(crate::coordination::StaleReason::HeartbeatMissing)
            );
        });
        let t0 = Instant::now();
        let r = c
            .run_cycle(&plan(2, 120_000, 200_000), &CancellationToken::new())
            .await;
        let a = r
            .results
            .iter()
            .find(|(s, _)| s == "A/USD")
            .map(|(_, r)| r.clone());
        assert!(
            matches!(
                a,
                Some(SymbolResult::Failed {
                    reason: Reason::LockLost,
                    ..
                })
            ),
            "{a:?}"
        );
        assert_eq!(Instant::now().duration_since(t0), Duration::from_secs(30));
        assert_eq!(r.ok(), 1, "B completed");
        let published: Vec<String> = publisher.latest().into_iter().map(|m| m.symbol).collect();
        assert!(
            !published.contains(&"A/USD".to_string()),
            "A published after losing its lock"
        );
        // Its lock is the thief's now, untouched by A's release.
        let thief = MemoryCoordination::new(store, "thief", timing());
        assert_eq!(thief.held_locks().await.unwrap(), vec!["A/USD".to_string()]);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_cancels_in_flight_and_releases_locks() {
        let store = MemoryStore::new();
        let (c, _, _) = setup(&[("A/USD", 10_000), ("B/USD", 10)], store.clone());
        let cancel = CancellationToken::new();
        let canceller = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            canceller.cancel();
        });
        let r = c.run_cycle(&plan(2, 60_000, 60_000), &cancel).await;
        let a = r
            .results
            .iter()
            .find(|(s, _)| s == "A/USD")
            .map(|(_, r)| r.clone());
        assert!(matches!(
            a,
            Some(SymbolResult::Failed {
                reason: Reason::Shutdown,
                ..
            })
        ));
        assert_eq!(r.ok(), 1);
        let me = MemoryCoordination::new(store, "me", timing());
        assert!(me.held_locks().await.unwrap().is_empty());
    }

    /// Replicas `replica-0`… sharing one store, each with work sharing over `symbols` (each
    /// 100 ms of work), a pool as large as the list, and claims spread over `spread`.
    fn sharing_replicas(symbols: &[String], n: usize, spread: Duration) -> Vec<Coordinator> {
        let store = MemoryStore::new();
        (0..n)
            .map(|i| {
                let agent = Arc::new(Timed::default());
                for s in symbols {
                    agent.set(s, Duration::from_millis(100));
                }
                let publisher = Arc::new(Publisher::new(
                    crate::publish::hub::Hub::new(1000, None),
                    10,
                    None,
                ));
                let pipeline = Arc::new(testing::pipeline(agent, publisher));
                let id = format!("replica-{i}");
                let coord = Arc::new(MemoryCoordination::new(store.clone(), &id, timing()));
                Coordinator::new(
                    coord,
                    pipeline,
                    symbols.to_vec(),
                    timing().ttl,
                    true,
                    timing().ttl,
                )
                .sharing_as(&id, spread)
            })
            .collect()
    }

    /// One tick run by every replica at once: the symbols each completed.
    async fn shared_tick(replicas: &[Coordinator], p: &CyclePlan) -> Vec<Vec<String>> {
        let cancel = CancellationToken::new();
        let reports =
            futures::future::join_all(replicas.iter().map(|c| c.run_cycle(p, &cancel))).await;
        reports
            .iter()
            .map(|r| {
                r.results
                    .iter()
                    .filter(|(_, r)| matches!(r, SymbolResult::Completed { .. }))
                    .map(|(s, _)| s.clone())
                    .collect()
            })
            .collect()
    }

    fn symbols(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("S{i}/USD")).collect()
    }

    #[test]
    fn each_instance_has_an_order_of_its_own_that_does_not_depend_on_the_configured_order() {
        let symbols = symbols(30);
        let names = |order: &[usize], of: &[String]| -> Vec<String> {
            order.iter().map(|i| of[*i].clone()).collect()
        };
        let a = share_order("replica-0", &symbols);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..30).collect::<Vec<_>>(), "a permutation");
        assert_ne!(
            a,
            share_order("replica-1", &symbols),
            "two instances, one order"
        );
        assert_eq!(a, share_order("replica-0", &symbols), "the same every time");
        // The configured order reversed and a symbol removed: the rest keep their sequence.
        let mut other: Vec<String> = symbols.iter().rev().cloned().collect();
        other.retain(|s| s != "S7/USD");
        let mut expected = names(&a, &symbols);
        expected.retain(|s| s != "S7/USD");
        assert_eq!(names(&share_order("replica-0", &other), &other), expected);
    }

    #[tokio::test(start_paused = true)]
    async fn spread_claims_give_each_symbol_to_the_replica_that_has_it_first() {
        let symbols = symbols(20);
        // Claimed all at once, the replica that dispatches first takes every symbol.
        let at_once = shared_tick(
            &sharing_replicas(&symbols, 2, Duration::ZERO),
            &plan(20, 60_000, 60_000),
        )
        .await;
        let mut sizes: Vec<usize> = at_once.iter().map(Vec::len).collect();
        sizes.sort_unstable();
        assert_eq!(sizes, vec![0, 20], "at once: {at_once:?}");

        // Spread over a second: each symbol goes to the replica whose order has it first.
        let spread = shared_tick(
            &sharing_replicas(&symbols, 2, Duration::from_secs(1)),
            &plan(20, 60_000, 60_000),
        )
        .await;
        assert_eq!(spread[0].len() + spread[1].len(), 20, "{spread:?}");
        let position = |id: &str, symbol: &String| {
            let order = share_order(id, &symbols);
            order.iter().position(|i| symbols[*i] == *symbol)
        };
        for (mine, other) in [("replica-0", "replica-1"), ("replica-1", "replica-0")] {
            let done = &spread[if mine == "replica-0" { 0 } else { 1 }];
            for s in done {
                assert!(
                    position(mine, s) <= position(other, s),
                    "{mine} did {s}, which {other} has earlier ({spread:?})"
                );
            }
        }
        assert!(
            spread.iter().all(|d| d.len() >= 4),
            "each replica gets a part: {spread:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_replica_starts_its_last_claim_within_the_spread_capped_at_a_quarter_period() {
        let symbols = symbols(20);
        for (spread_s, period_s, starts_by) in [(1, 60, 950), (10, 4, 950)] {
            let replica = sharing_replicas(&symbols, 1, Duration::from_secs(spread_s));
            let mut p = plan(20, 60_000, 60_000);
            p.next_tick = p.cycle.time() + chrono::Duration::seconds(period_s);
            let t0 = Instant::now();
            let done = shared_tick(&replica, &p).await;
            assert_eq!(done[0].len(), 20);
            // The 20th claim at 19/20 of the spread, then its 100 ms of work (timers are
            // whole milliseconds, rounded up).
            let took = t0.elapsed().as_millis();
            assert!(
                (starts_by + 100..=starts_by + 102).contains(&took),
                "{took} ms with a spread of {spread_s} s and a period of {period_s} s"
            );
        }
    }
}
