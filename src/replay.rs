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
//! LLM stages (the OpenAI-compatible backend) replay too, under the same budget, rate limit,
//! retries and breaker as live, through a response cache ([`ResponseCache`]) keyed by what
//! each turn sends: a rerun of the same ticks with the same configuration asks the model
//! nothing. `max_calls` bounds the turns that reach the model; when they are spent the replay
//! stops after that tick and the report says where. OpenCode stages are refused: a replay
//! does not run OpenCode sessions (the same model through `openrouter` replays).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::agents::StageAgents;
use crate::agents::llm::{CacheStats, ResponseCache};
use crate::config::{AgentBackend, Config, ReportMode};
use crate::coordination::LockTiming;
use crate::coordination::memory::{MemoryCoordination, MemoryStore};
use crate::coordinator::{Coordinator, CyclePlan, SymbolResult};
use crate::history::calibration::Calibrator;
use crate::history::grading::{Grader, GroupScore, horizon_label, scorecard_of};
use crate::history::sql::{SqlStore, SqliteUse};
use crate::history::{GroupBy, HistoryStore, Record};
use crate::market::MarketSource;
use crate::model::StageMessage;
use crate::pipeline::PipelineContext;
use crate::publish::hub::Hub;
use crate::publish::{Publisher, Sink};
use crate::resilience::{CallLatencies, RateLimiter};
use crate::schedule::{Clock, CycleId, Schedule, VirtualTime};
use crate::tools::Toolbox;

/// What to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// First tick at or after this.
    pub from: DateTime<Utc>,
    /// Ticks before this.
    pub to: DateTime<Utc>,
    /// The history file to write (must not exist yet).
    pub history: PathBuf,
    /// The response cache file for LLM stages (created when missing; unused by the rules
    /// agents).
    pub cache: Option<PathBuf>,
    /// At most this many turns sent to a model (cache misses); `None`: no bound.
    pub max_calls: Option<u64>,
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
    /// The LLM stages' turns: from the cache, sent, refused by `max_calls` (`None`: the rules
    /// agents only).
    pub llm: Option<CacheStats>,
    /// Why the replay ended before `to`, when it did.
    pub stopped_early: Option<String>,
    /// Where the replay's wall time went, in seconds.
    pub seconds: PhaseSeconds,
    /// Per horizon, shortest first, the scorecard grouped by action.
    pub scorecard: Vec<HorizonScore>,
}

/// Time by phase, on tokio's clock (the wall clock in a replay, which never pauses it): what
/// to look at when a replay is slow.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PhaseSeconds {
    /// The ticks' pipelines (market data, strategies, agents, scoring).
    pub pipeline: f64,
    /// Writing each tick's messages to the history.
    pub store: f64,
    /// Grading what came due.
    pub grading: f64,
    /// Refitting the calibration.
    pub calibration: f64,
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
    for (name, backend) in stage_backends(cfg) {
        if backend == AgentBackend::Opencode {
            return Err(ReplayError::Invalid(format!(
                "agents.stages.{name} uses OpenCode: a replay does not run OpenCode sessions (replay the same model with agents.backend: openrouter and its base_url)"
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

/// The backend each stage runs on (a templated report runs none).
fn stage_backends(cfg: &Config) -> Vec<(&'static str, AgentBackend)> {
    let a = &cfg.agents;
    [
        ("signal", &a.stages.signal),
        ("advise", &a.stages.advise),
        ("report", &a.stages.report),
    ]
    .into_iter()
    .filter(|(name, _)| !(*name == "report" && cfg.pipeline.report_mode == ReportMode::Template))
    .map(|(name, stage)| (name, stage.backend.unwrap_or(a.backend)))
    .collect()
}

/// The stage agents of a replay: the rules agents, or the configured ones with the response
/// cache in their stack, tools reading the market at the replayed tick.
async fn replay_agents(
    cfg: &Config,
    opts: &ReplayOptions,
    market: &Arc<dyn MarketSource>,
    store: &Arc<dyn HistoryStore>,
    clock: Clock,
) -> Result<(StageAgents, Option<Arc<ResponseCache>>), ReplayError> {
    if stage_backends(cfg)
        .iter()
        .all(|(_, b)| *b == AgentBackend::Rules)
    {
        return Ok((StageAgents::rules(), None));
    }
    let path = opts
        .cache
        .clone()
        .ok_or_else(|| ReplayError::Invalid("an LLM replay needs a response cache file".into()))?;
    let cache = Arc::new(
        ResponseCache::open(&path, opts.max_calls)
            .await
            .map_err(|e| ReplayError::Invalid(e.to_string()))?,
    );
    let tools = Arc::new(
        Toolbox::new(
            market.clone(),
            Some(store.clone()),
            Arc::new(crate::strategy::StrategySet::new(cfg.strategies.clone())),
            &cfg.symbols,
            clock,
        )
        .with_horizons(&cfg.history.grading.horizons_minutes),
    );
    let latencies = CallLatencies::new(
        cfg.adaptive.latency_window_size,
        Duration::from_secs(cfg.adaptive.latency_max_age_seconds),
    );
    let limiter = Arc::new(RateLimiter::new(
        cfg.agents.requests_per_minute,
        cfg.agents.burst(),
    ));
    let setup = crate::agents::setup::build(
        cfg,
        limiter,
        Arc::new(|_: &str, _| {}),
        latencies,
        tools,
        Some(cache.clone()),
    )
    .map_err(|e| ReplayError::Invalid(format!("agents: {e}")))?;
    Ok((setup.agents, Some(cache)))
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
    let sql = Arc::new(SqlStore::sqlite_with(&opts.history, SqliteUse::Replay).await?);
    let store: Arc<dyn HistoryStore> = sql.clone();
    let time = VirtualTime::new(opts.from);
    let sink = Arc::new(TickSink::default());
    let publisher = Arc::new(Publisher::new(
        Hub::new(16, None),
        1,
        Some(sink.clone() as Arc<dyn Sink>),
    ));
    let horizon = cfg.history.calibration_horizon();
    let clock = Clock::Virtual(time.clone());
    let (agents, cache) = replay_agents(cfg, opts, &market, &store, clock.clone()).await?;
    let calibrator = Arc::new(Calibrator::new(
        horizon,
        cfg.history.calibration.min_grades,
        cfg.history.calibration.prior_grades,
    ));
    let pipeline = Arc::new(PipelineContext {
        market: market.clone(),
        agents,
        publisher,
        candles: cfg.market_data.candles,
        clock,
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
        llm: None,
        stopped_early: None,
        seconds: PhaseSeconds::default(),
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
        let t0 = tokio::time::Instant::now();
        let cycle = coordinator.run_cycle(&plan, &cancel).await;
        report.seconds.pipeline += t0.elapsed().as_secs_f64();
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
        let t0 = tokio::time::Instant::now();
        store.insert(&sink.take()).await?;
        let t1 = tokio::time::Instant::now();
        grade(&mut grader, tick, &mut report).await?;
        let t2 = tokio::time::Instant::now();
        if last_refit.is_none_or(|t| tick - t >= refit_every) {
            calibrator.refit(store.as_ref()).await?;
            last_refit = Some(tick);
        }
        report.seconds.store += (t1 - t0).as_secs_f64();
        report.seconds.grading += (t2 - t1).as_secs_f64();
        report.seconds.calibration += t2.elapsed().as_secs_f64();
        progress(report.ticks, total);
        if let Some(c) = cache.as_ref().filter(|c| c.stats().refused > 0) {
            report.stopped_early = Some(format!(
                "--max-calls {} reached at the tick of {}: {} of {} ticks replayed",
                opts.max_calls.unwrap_or(0),
                tick.to_rfc3339(),
                report.ticks,
                total,
            ));
            report.to = next;
            tracing::warn!(
                calls = c.stats().calls,
                "replay stopped: --max-calls reached"
            );
            break;
        }
    }
    report.llm = cache.as_ref().map(|c| c.stats());
    // Run the clock on past the longest horizon (and the source's grace for a late candle),
    // so every replayed signal gets its grades.
    let longest = g.horizons_minutes.iter().copied().max().unwrap_or(0);
    let end = report.to + chrono::Duration::minutes(i64::from(longest) + 16);
    let t0 = tokio::time::Instant::now();
    grade(&mut grader, end, &mut report).await?;
    report.seconds.grading += t0.elapsed().as_secs_f64();
    let mut horizons = g.horizons_minutes.clone();
    horizons.sort_unstable();
    for h in horizons {
        let seconds = i64::from(h) * 60;
        report.scorecard.push(HorizonScore {
            horizon: horizon_label(seconds),
            groups: scorecard_of(store.as_ref(), seconds, GroupBy::Action, 0).await?,
        });
    }
    // Closed, so SQLite folds its write-ahead log into the file: the history is one file a
    // user can copy, not a file and a `-wal` beside it holding the last minutes.
    sql.close().await;
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
        // A round that looked at everything due leaves nothing for another.
        if !r.more || r.graded + r.missing == 0 {
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
    if let Some(s) = &report.llm {
        out.push_str(&format!(
            "  model turns: {} from the cache, {} sent, {} refused by --max-calls\n",
            s.hits, s.calls, s.refused
        ));
    }
    if let Some(why) = &report.stopped_early {
        out.push_str(&format!("  stopped early: {why}\n"));
    }
    let t = &report.seconds;
    out.push_str(&format!(
        "  wall time: pipeline {:.1} s, history writes {:.1} s, grading {:.1} s, calibration {:.1} s\n",
        t.pipeline, t.store, t.grading, t.calibration
    ));
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

/// Two replays of the same ticks side by side: per horizon and action, each one's graded
/// count and hit rate, and the difference of the hit rates (A − B) with its 95 % interval.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The first configuration's name (its file) and report.
    pub a: (String, ReplayReport),
    /// The second's.
    pub b: (String, ReplayReport),
    /// The rows, per horizon (shortest first) and action.
    pub rows: Vec<ComparisonRow>,
}

/// One (horizon, action) of a [`Comparison`].
#[derive(Debug, Clone, Serialize)]
pub struct ComparisonRow {
    /// `5m`, `15m`, `1h`.
    pub horizon: String,
    /// BUY, SELL or HOLD.
    pub action: String,
    /// A's graded signals and hit rate (`None`: A made no such call).
    pub a: Option<(u64, f64)>,
    /// B's.
    pub b: Option<(u64, f64)>,
    /// A's hit rate − B's, when both made the call.
    pub difference: Option<f64>,
    /// Its 95 % interval (Newcombe's, from the two Wilson intervals): an interval that holds
    /// zero says the two are not told apart by these ticks.
    pub difference_ci95: Option<[f64; 2]>,
}

impl Comparison {
    /// Compares two reports of the same ticks.
    pub fn of(a: (String, ReplayReport), b: (String, ReplayReport)) -> Comparison {
        let mut rows = vec![];
        for ha in &a.1.scorecard {
            let hb = b.1.scorecard.iter().find(|h| h.horizon == ha.horizon);
            let mut actions: Vec<&str> = ha.groups.iter().map(|g| g.key.as_str()).collect();
            for g in hb.map_or(&[][..], |h| &h.groups[..]) {
                if !actions.contains(&g.key.as_str()) {
                    actions.push(&g.key);
                }
            }
            actions.sort_unstable();
            for action in actions {
                let ga = ha.groups.iter().find(|g| g.key == action);
                let gb = hb.and_then(|h| h.groups.iter().find(|g| g.key == action));
                let (difference, difference_ci95) = match (ga, gb) {
                    (Some(x), Some(y)) => {
                        let d = x.hit_rate - y.hit_rate;
                        let [lx, ux] = x.hit_rate_ci95;
                        let [ly, uy] = y.hit_rate_ci95;
                        let lo = d - ((x.hit_rate - lx).powi(2) + (uy - y.hit_rate).powi(2)).sqrt();
                        let hi = d + ((ux - x.hit_rate).powi(2) + (y.hit_rate - ly).powi(2)).sqrt();
                        (Some(d), Some([lo.max(-1.0), hi.min(1.0)]))
                    }
                    _ => (None, None),
                };
                rows.push(ComparisonRow {
                    horizon: ha.horizon.clone(),
                    action: action.to_string(),
                    a: ga.map(|g| (g.graded, g.hit_rate)),
                    b: gb.map(|g| (g.graded, g.hit_rate)),
                    difference,
                    difference_ci95,
                });
            }
        }
        Comparison { a, b, rows }
    }

    /// The comparison as a table for people.
    pub fn table(&self) -> String {
        let mut out = format!(
            "A = {}: {} completed, {} graded\nB = {}: {} completed, {} graded\n",
            self.a.0,
            self.a.1.completed,
            self.a.1.graded,
            self.b.0,
            self.b.1.completed,
            self.b.1.graded
        );
        for (name, r) in [(&self.a.0, &self.a.1), (&self.b.0, &self.b.1)] {
            if let Some(why) = &r.stopped_early {
                out.push_str(&format!("  {name} stopped early: {why}\n"));
            }
        }
        out.push_str(&format!(
            "{:<8} {:<6} {:>8} {:>7} {:>8} {:>7} {:>10} {:>19}\n",
            "horizon", "action", "A graded", "A hit", "B graded", "B hit", "A − B", "95 % interval"
        ));
        let cell = |v: Option<(u64, f64)>| {
            v.map_or(("—".to_string(), "—".to_string()), |(n, h)| {
                (n.to_string(), format!("{:.1}%", h * 100.0))
            })
        };
        for r in &self.rows {
            let (an, ah) = cell(r.a);
            let (bn, bh) = cell(r.b);
            let d = r
                .difference
                .map_or("—".to_string(), |d| format!("{:+.1} pts", d * 100.0));
            let ci = r.difference_ci95.map_or("—".to_string(), |[lo, hi]| {
                format!("{:+.1}…{:+.1} pts", lo * 100.0, hi * 100.0)
            });
            out.push_str(&format!(
                "{:<8} {:<6} {:>8} {:>7} {:>8} {:>7} {:>10} {:>19}\n",
                r.horizon, r.action, an, ah, bn, bh, d, ci
            ));
        }
        out
    }
}
