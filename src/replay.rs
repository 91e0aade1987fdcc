//! Replay: every tick of the schedule in `[from, to)` through the live code path — the same
//! coordinator, agents, scorer, calibration and grading — on a virtual clock, so a day of
//! ticks takes seconds and a strategy setting can be judged before it goes live.
//!
//! The clock is [`Clock::Virtual`]: the pipeline reads the market and stamps its signals at
//! the tick being replayed, and nothing sleeps. The market source answers only what it would
//! have had then (candles that ended by the tick), so no strategy or agent sees a later
//! candle. Messages go to a history of the replay's own (an SQLite file in `--out`, the live
//! schema) a tick at a time; after each tick the grader grades what has come due by then and
//! the calibration is refitted on the live schedule (`history.calibration.refit_seconds` of
//! virtual time), so calibrated confidence in a replay means what it means live. After the
//! last tick the virtual clock runs on to the longest horizon, so every signal is graded.
//!
//! This version replays the rules agents only: a configuration whose stages use an LLM is
//! refused with an error that says so (a replay that called a paid model for every tick of a
//! day would need the budget and the response cache it does not have yet).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::agents::StageAgents;
use crate::config::{AgentBackend, Config, ReportMode};
use crate::coordination::LockTiming;
use crate::coordination::memory::{MemoryCoordination, MemoryStore};
use crate::coordinator::{Coordinator, CyclePlan, SymbolResult};
use crate::history::calibration::Calibrator;
use crate::history::grading::{Grader, GroupScore, horizon_label, scorecard_of};
use crate::history::sql::SqlStore;
use crate::history::{GroupBy, HistoryStore, Record};
use crate::market::MarketSource;
use crate::model::StageMessage;
use crate::pipeline::PipelineContext;
use crate::publish::hub::Hub;
use crate::publish::{Publisher, Sink};
use crate::schedule::{Clock, CycleId, Schedule, VirtualTime};

/// What to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// First tick at or after this.
    pub from: DateTime<Utc>,
    /// Ticks before this.
    pub to: DateTime<Utc>,
    /// The history file to write (must not exist yet).
    pub history: PathBuf,
}

/// What a replay did, and the scorecard it ended with.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    /// The replayed window.
    pub from: DateTime<Utc>,
    /// Its end (exclusive).
    pub to: DateTime<Utc>,
    /// Ticks run.
    pub ticks: u64,
    /// Symbol ticks (ticks × symbols).
    pub symbol_ticks: u64,
    /// Of which completed every stage.
    pub completed: u64,
    /// The symbol ticks not completed, by reason (failed or skipped).
    pub failed: BTreeMap<String, u64>,
    /// Grades recorded, over every horizon.
    pub graded: u64,
    /// Grades without a price at their horizon (the source had none).
    pub missing_price: u64,
    /// The history file written.
    pub history: PathBuf,
    /// The market source.
    pub market: &'static str,
    /// Per horizon, shortest first, the scorecard grouped by action.
    pub scorecard: Vec<HorizonScore>,
}

/// One horizon's scorecard.
#[derive(Debug, Clone, Serialize)]
pub struct HorizonScore {
    /// `5m`, `15m`, `1h`.
    pub horizon: String,
    /// By action.
    pub groups: Vec<GroupScore>,
}

/// Why a replay cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The options or the configuration do not allow it.
    #[error("{0}")]
    Invalid(String),
    /// The history could not be written or read.
    #[error("replay history: {0}")]
    History(#[from] crate::history::HistoryError),
}

/// The stages' messages of one tick, held until the tick is over and then written in one
/// transaction (one per message would make a day's replay minutes of fsyncs).
#[derive(Default)]
struct TickSink(Mutex<Vec<Record>>);

#[async_trait::async_trait]
impl Sink for TickSink {
    async fn publish(&self, msg: &StageMessage) {
        match Record::from_message(msg) {
            Ok(r) => self.0.lock().unwrap_or_else(|p| p.into_inner()).push(r),
            Err(e) => tracing::warn!(error = %e, "replay: message not stored"),
        }
    }
    async fn flush(&self, _timeout: Duration) {}
}

impl TickSink {
    fn take(&self) -> Vec<Record> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Refuses what this version cannot replay; the error names the setting.
fn check(cfg: &Config, opts: &ReplayOptions) -> Result<(), ReplayError> {
    if opts.from >= opts.to {
        return Err(ReplayError::Invalid(format!(
            "--from {} is not before --to {}",
            opts.from.to_rfc3339(),
            opts.to.to_rfc3339()
        )));
    }
    let a = &cfg.agents;
    for (name, stage) in [
        ("signal", &a.stages.signal),
        ("advise", &a.stages.advise),
        ("report", &a.stages.report),
    ] {
        let backend = stage.backend.unwrap_or(a.backend);
        let templated = name == "report" && cfg.pipeline.report_mode == ReportMode::Template;
        if backend != AgentBackend::Rules && !templated {
            return Err(ReplayError::Invalid(format!(
                "agents.stages.{name} uses an LLM backend: this version replays the rules agents only (set agents.backend: rules)"
            )));
        }
    }
    if opts.history.exists() {
        return Err(ReplayError::Invalid(format!(
            "{} exists: a replay writes a history of its own; choose another --out or remove it",
            opts.history.display()
        )));
    }
    Ok(())
}

/// Replays `cfg`'s schedule over `market`. `progress(done, total)` is called after each tick.
pub async fn run(
    cfg: &Config,
    market: Arc<dyn MarketSource>,
    opts: &ReplayOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<ReplayReport, ReplayError> {
    check(cfg, opts)?;
    let schedule = Schedule::new(&cfg.schedule, &cfg.timezone)
        .map_err(|e| ReplayError::Invalid(format!("schedule: {e}")))?;
    let ticks = ticks_of(&schedule, opts.from, opts.to);
    if let Some(dir) = opts.history.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| ReplayError::Invalid(format!("{}: {e}", dir.display())))?;
    }
    let store: Arc<dyn HistoryStore> = Arc::new(SqlStore::sqlite(&opts.history).await?);
    let time = VirtualTime::new(opts.from);
    let sink = Arc::new(TickSink::default());
    let publisher = Arc::new(Publisher::new(
        Hub::new(16, None),
        1,
        Some(sink.clone() as Arc<dyn Sink>),
    ));
    let horizon = cfg.history.calibration_horizon();
    let calibrator = Arc::new(Calibrator::new(
        horizon,
        cfg.history.calibration.min_grades,
        cfg.history.calibration.prior_grades,
    ));
    let pipeline = Arc::new(PipelineContext {
        market: market.clone(),
        agents: StageAgents::rules(),
        publisher,
        candles: cfg.market_data.candles,
        clock: Clock::Virtual(time.clone()),
        strategies: Arc::new(crate::strategy::StrategySet::new(cfg.strategies.clone())),
        advise_min_score: cfg.pipeline.advise_min_score,
        expiry_grace: Duration::from_secs(cfg.pipeline.expiry_grace_seconds),
        calibrator: Some(calibrator.clone()),
    });
    let lock_ttl = Duration::from_secs(cfg.locks.ttl_seconds);
    let coord = Arc::new(MemoryCoordination::new(
        MemoryStore::new(),
        "replay",
        LockTiming {
            ttl: lock_ttl,
            stale_after: lock_ttl,
            heartbeat_ttl: lock_ttl,
        },
    ));
    let coordinator = Coordinator::new(
        coord,
        pipeline,
        cfg.symbols.clone(),
        lock_ttl,
        false,
        lock_ttl,
    );
    let g = &cfg.history.grading;
    let mut grader = Grader::new(
        store.clone(),
        market.clone(),
        &g.horizons_minutes,
        g.threshold_pct,
    )
    .without_late_arrivals();
    let mut report = ReplayReport {
        from: opts.from,
        to: opts.to,
        ticks: 0,
        symbol_ticks: 0,
        completed: 0,
        failed: BTreeMap::new(),
        graded: 0,
        missing_price: 0,
        history: opts.history.clone(),
        market: market.name(),
        scorecard: vec![],
    };
    let refit_every = chrono::Duration::seconds(cfg.history.calibration.refit_seconds as i64);
    let mut last_refit: Option<DateTime<Utc>> = None;
    let cancel = CancellationToken::new();
    let total = ticks.len() as u64;
    for (i, &tick) in ticks.iter().enumerate() {
        time.set(tick);
        let next = ticks.get(i + 1).copied().unwrap_or(opts.to);
        // The live deadlines, in real time: a replayed tick has the same room a live one has.
        let plan = CyclePlan {
            cycle: CycleId::new(tick),
            next_tick: next,
            concurrency: cfg.parallel.max_concurrent.max(1),
            call_timeout: cfg.symbol_timeout(),
            cycle_deadline: tokio::time::Instant::now()
                + schedule
                    .period_after(tick)
                    .unwrap_or(Duration::from_secs(60)),
            shed: 0,
        };
        let cycle = coordinator.run_cycle(&plan, &cancel).await;
        report.ticks += 1;
        for (_, r) in &cycle.results {
            report.symbol_ticks += 1;
            match r {
                SymbolResult::Completed { .. } => report.completed += 1,
                SymbolResult::Failed { reason, .. } | SymbolResult::Skipped { reason } => {
                    *report
                        .failed
                        .entry(reason.as_str().to_string())
                        .or_default() += 1;
                }
            }
        }
        store.insert(&sink.take()).await?;
        grade(&mut grader, tick, &mut report).await?;
        if last_refit.is_none_or(|t| tick - t >= refit_every) {
            calibrator.refit(store.as_ref()).await?;
            last_refit = Some(tick);
        }
        progress(report.ticks, total);
    }
    // Run the clock on past the longest horizon (and the source's grace for a late candle),
    // so every replayed signal gets its grades.
    let longest = g.horizons_minutes.iter().copied().max().unwrap_or(0);
    let end = opts.to + chrono::Duration::minutes(i64::from(longest) + 16);
    grade(&mut grader, end, &mut report).await?;
    let mut horizons = g.horizons_minutes.clone();
    horizons.sort_unstable();
    for h in horizons {
        let seconds = i64::from(h) * 60;
        report.scorecard.push(HorizonScore {
            horizon: horizon_label(seconds),
            groups: scorecard_of(store.as_ref(), seconds, GroupBy::Action, 0).await?,
        });
    }
    Ok(report)
}

/// Grading rounds at `now` until nothing more is due.
async fn grade(
    grader: &mut Grader,
    now: DateTime<Utc>,
    report: &mut ReplayReport,
) -> Result<(), ReplayError> {
    loop {
        let r = grader.round(now).await?;
        report.graded += r.graded;
        report.missing_price += r.missing;
        if r.graded + r.missing == 0 {
            return Ok(());
        }
    }
}

/// The schedule's ticks in `[from, to)`.
fn ticks_of(schedule: &Schedule, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let mut out = vec![];
    let mut t = schedule
        .latest_at_or_before(from)
        .filter(|t| *t == from)
        .or_else(|| schedule.next_after(from));
    while let Some(tick) = t.filter(|t| *t < to) {
        out.push(tick);
        t = schedule.next_after(tick);
    }
    out
}

/// The report as a table for people: per horizon and action, graded count, hit rate with its
/// interval, Brier and its skill, the calibrated Brier, and the skill against the best
/// baseline.
pub fn table(report: &ReplayReport) -> String {
    let mut out = format!(
        "replayed {} ticks ({} symbol ticks) from {} to {} on {} market data: {} completed, {} graded, {} without a price\n",
        report.ticks,
        report.symbol_ticks,
        report.from.to_rfc3339(),
        report.to.to_rfc3339(),
        report.market,
        report.completed,
        report.graded,
        report.missing_price
    );
    for (reason, n) in &report.failed {
        out.push_str(&format!("  not completed, {reason}: {n}\n"));
    }
    out.push_str(&format!(
        "{:<8} {:<6} {:>7} {:>8} {:>17} {:>7} {:>7} {:>10} {:>24}\n",
        "horizon",
        "action",
        "graded",
        "hit",
        "95 % interval",
        "Brier",
        "skill",
        "cal. Brier",
        "vs best baseline"
    ));
    for HorizonScore { horizon: h, groups } in &report.scorecard {
        for g in groups {
            let opt = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.3}"));
            let baseline = g.baselines.as_ref().map_or("—".to_string(), |b| {
                format!(
                    "{:+.1} pts ({:+.1}…{:+.1}) {}",
                    b.skill * 100.0,
                    b.skill_ci95[0] * 100.0,
                    b.skill_ci95[1] * 100.0,
                    b.best
                )
            });
            out.push_str(&format!(
                "{:<8} {:<6} {:>7} {:>7.1}% {:>7.1}%–{:>6.1}% {:>7.3} {:>7} {:>10} {:>24}\n",
                h,
                g.key,
                g.graded,
                g.hit_rate * 100.0,
                g.hit_rate_ci95[0] * 100.0,
                g.hit_rate_ci95[1] * 100.0,
                g.brier,
                opt(g.brier_skill),
                opt(g.calibrated.as_ref().map(|c| c.brier)),
                baseline
            ));
        }
    }
    out
}

/// `DIR/history.sqlite`.
pub fn history_in(dir: &Path) -> PathBuf {
    dir.join("history.sqlite")
}
