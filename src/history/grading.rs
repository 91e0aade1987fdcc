//! Grading signals against what the market did, and the scorecard.
//!
//! A signal priced at `data_as_of` (the close of its last candle) is graded at each horizon
//! from the close of the candle ending at `data_as_of + horizon`: the return, and hit or miss —
//! BUY hits when the return exceeds +threshold, SELL when it is below −threshold, HOLD when it
//! stays within ±threshold. A price the source does not have is recorded as missing, never
//! guessed; a source that is merely failing (timeout, 5xx) is asked again next round.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::calibration::Calibrator;
use super::{
    BucketSums, CalibratedSums, DueSignal, Grade, GradedRow, GroupBy, HistoryError, HistoryStore,
};
use crate::market::{MarketError, MarketSource};
use crate::model::Action;
use crate::telemetry::names;

/// Return and hit of a call: `then` → `after` with a flat band of ±`threshold` (a fraction).
pub fn judge(action: Action, then: f64, after: f64, threshold: f64) -> (f64, bool) {
    let r = (after - then) / then;
    let hit = match action {
        Action::Buy => r > threshold,
        Action::Sell => r < -threshold,
        Action::Hold => r.abs() <= threshold,
    };
    (r, hit)
}

/// The momentum baseline's call: the direction of the last hour's return (BUY after a
/// rise, SELL after a fall, HOLD when it did not move).
pub fn momentum_call(price_change_1h: f64) -> Action {
    if price_change_1h > 0.0 {
        Action::Buy
    } else if price_change_1h < 0.0 {
        Action::Sell
    } else {
        Action::Hold
    }
}

/// Wilson score interval (95 %) of `hits` in `n`: honest at small counts, where the normal
/// approximation gives intervals outside 0–1.
pub fn wilson95(hits: u64, n: u64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_963_984_540_054_f64;
    let (n, p) = (n as f64, hits as f64 / n as f64);
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * ((p * (1.0 - p) / n) + z * z / (4.0 * n * n)).sqrt() / denom;
    // At 0 or n hits the interval touches 0 or 1 exactly (the float formula misses by 1e-17).
    let lo = if hits == 0 {
        0.0
    } else {
        (centre - half).max(0.0)
    };
    let hi = if hits as f64 == n {
        1.0
    } else {
        (centre + half).min(1.0)
    };
    (lo, hi)
}

/// One confidence bucket of the calibration table.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct CalibrationBucket {
    /// `0.6-0.7`.
    pub bucket: String,
    /// Signals in it.
    pub count: u64,
    /// Their mean confidence.
    pub mean_confidence: f64,
    /// How often they hit.
    pub hit_rate: f64,
}

/// One group of the scorecard.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct GroupScore {
    /// The group's key (a symbol, an action, …).
    pub key: String,
    /// Graded signals.
    pub graded: u64,
    /// Of which hits.
    pub hits: u64,
    /// hits ÷ graded.
    pub hit_rate: f64,
    /// Wilson 95 % interval of the hit rate.
    pub hit_rate_ci95: [f64; 2],
    /// Mean return (fraction).
    pub mean_return: f64,
    /// Median return (fraction).
    pub median_return: f64,
    /// Mean of (confidence − hit)²: 0 is perfect, 0.25 is a coin flip stated at 0.5.
    pub brier: f64,
    /// Confidence buckets against observed hit rate.
    pub calibration: Vec<CalibrationBucket>,
    /// Brier skill of the stated confidence against the base rate (the group's own hit rate
    /// stated for every signal): above 0 is better than knowing only the base rate; `None`
    /// when every signal hit or every one missed (no forecast can beat that).
    pub brier_skill: Option<f64>,
    /// The same for `calibrated_confidence`, over the grades that carried one.
    pub calibrated: Option<CalibratedScore>,
    /// The naive baselines on the same graded (symbol, tick, horizon) set, and the group's
    /// skill against the best of them.
    pub baselines: Option<Baselines>,
}

/// The reliability of the calibrated confidence in a group.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct CalibratedScore {
    /// Graded signals that carried a calibrated confidence.
    pub graded: u64,
    /// Their hit rate.
    pub hit_rate: f64,
    /// Mean of (calibrated − hit)².
    pub brier: f64,
    /// Against the base rate of the same signals (see [`GroupScore::brier_skill`]).
    pub brier_skill: Option<f64>,
    /// Calibrated-confidence buckets against observed hit rate.
    pub calibration: Vec<CalibrationBucket>,
}

/// Naive baselines judged like the signals, at the same horizon and prices.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Baselines {
    /// Graded signals where every baseline is known (those that saw the last hour's return).
    pub graded: u64,
    /// The group's own hit rate on them.
    pub hit_rate: f64,
    /// Always HOLD's hit rate.
    pub always_hold: f64,
    /// Momentum's hit rate (the sign of the last hour's return).
    pub momentum: f64,
    /// The better of the two (`always_hold` or `momentum`).
    pub best: &'static str,
    /// `hit_rate` − the best baseline's: above 0, the signals beat it.
    pub skill: f64,
    /// 95 % interval of the skill, from the paired differences (the same signals judged
    /// both ways).
    pub skill_ci95: [f64; 2],
}

/// `1 − brier / (p(1 − p))` with `p` the hit rate of the same forecasts.
fn brier_skill(brier: f64, hits: u64, n: u64) -> Option<f64> {
    let p = hits as f64 / n as f64;
    let reference = p * (1.0 - p);
    (n > 0 && reference > 0.0).then(|| 1.0 - brier / reference)
}

/// The baselines of a group's summed buckets, `None` without a row that has them.
fn baselines(bs: &[&BucketSums]) -> Option<Baselines> {
    let n: u64 = bs.iter().map(|b| b.baseline_n).sum();
    if n == 0 {
        return None;
    }
    let nf = n as f64;
    let own: u64 = bs.iter().map(|b| b.baseline_hits).sum();
    let hold: u64 = bs.iter().map(|b| b.hold_hits).sum();
    let momentum: u64 = bs.iter().map(|b| b.momentum_hits).sum();
    let (best, best_hits, differ) = if momentum > hold {
        (
            "momentum",
            momentum,
            bs.iter().map(|b| b.momentum_differ).sum::<u64>(),
        )
    } else {
        (
            "always_hold",
            hold,
            bs.iter().map(|b| b.hold_differ).sum::<u64>(),
        )
    };
    // Paired: d = own hit − baseline hit ∈ {−1, 0, 1}; Σd² is the rows where they differ.
    let mean = (own as f64 - best_hits as f64) / nf;
    let var = if n > 1 {
        ((differ as f64 - nf * mean * mean) / (nf - 1.0)).max(0.0)
    } else {
        0.0
    };
    let half = 1.959_963_984_540_054 * (var / nf).sqrt();
    Some(Baselines {
        graded: n,
        hit_rate: own as f64 / nf,
        always_hold: hold as f64 / nf,
        momentum: momentum as f64 / nf,
        best,
        skill: mean,
        // A difference of two hit rates lies in [−1, 1] whatever a small sample's normal
        // approximation says.
        skill_ci95: [(mean - half).max(-1.0), (mean + half).min(1.0)],
    })
}

/// The calibrated score of a group, `None` when none of its grades carried a calibrated
/// confidence.
fn calibrated(bs: &[&BucketSums], cal: &[&CalibratedSums]) -> Option<CalibratedScore> {
    let n: u64 = bs.iter().map(|b| b.calibrated_n).sum();
    if n == 0 {
        return None;
    }
    let hits: u64 = bs.iter().map(|b| b.calibrated_hits).sum();
    let brier = bs.iter().map(|b| b.calibrated_squared_error).sum::<f64>() / n as f64;
    Some(CalibratedScore {
        graded: n,
        hit_rate: hits as f64 / n as f64,
        brier,
        brier_skill: brier_skill(brier, hits, n),
        calibration: cal
            .iter()
            .filter(|c| c.n > 0)
            .map(|c| CalibrationBucket {
                bucket: bucket_label(c.bucket),
                count: c.n,
                mean_confidence: c.calibrated / c.n as f64,
                hit_rate: c.hits as f64 / c.n as f64,
            })
            .collect(),
    })
}

/// `0.6-0.7`.
fn bucket_label(bucket: i64) -> String {
    format!(
        "{:.1}-{:.1}",
        bucket as f64 / 10.0,
        (bucket + 1) as f64 / 10.0
    )
}

/// The scorecard from per-(group, bucket) sums and each group's median, one entry per group
/// in key order. The database does the summing (`HistoryStore::sums`), so the answer costs the
/// same however many rows there are.
pub fn score_groups(
    sums: &[BucketSums],
    calibrated_sums: &[CalibratedSums],
    medians: &BTreeMap<String, f64>,
) -> Vec<GroupScore> {
    let mut groups: BTreeMap<&str, Vec<&BucketSums>> = BTreeMap::new();
    for b in sums {
        groups.entry(b.group.as_str()).or_default().push(b);
    }
    let mut cal: BTreeMap<&str, Vec<&CalibratedSums>> = BTreeMap::new();
    for c in calibrated_sums {
        cal.entry(c.group.as_str()).or_default().push(c);
    }
    groups
        .into_iter()
        .filter_map(|(key, bs)| {
            let n: u64 = bs.iter().map(|b| b.n).sum();
            if n == 0 {
                return None;
            }
            let hits: u64 = bs.iter().map(|b| b.hits).sum();
            let (lo, hi) = wilson95(hits, n);
            let nf = n as f64;
            let brier = bs.iter().map(|b| b.squared_error).sum::<f64>() / nf;
            Some(GroupScore {
                key: key.to_string(),
                graded: n,
                hits,
                hit_rate: hits as f64 / nf,
                hit_rate_ci95: [lo, hi],
                mean_return: bs.iter().map(|b| b.returns).sum::<f64>() / nf,
                median_return: medians.get(key).copied().unwrap_or(0.0),
                brier,
                calibration: bs
                    .iter()
                    .filter(|b| b.n > 0)
                    .map(|b| CalibrationBucket {
                        bucket: bucket_label(b.bucket),
                        count: b.n,
                        mean_confidence: b.confidence / b.n as f64,
                        hit_rate: b.hits as f64 / b.n as f64,
                    })
                    .collect(),
                brier_skill: brier_skill(brier, hits, n),
                calibrated: calibrated(&bs, cal.get(key).map_or(&[][..], |v| v.as_slice())),
                baselines: baselines(&bs),
            })
        })
        .collect()
}

/// The scorecard of one horizon from `since`, grouped by `group_by`, read from `store`.
pub async fn scorecard_of(
    store: &dyn HistoryStore,
    horizon_seconds: i64,
    group_by: GroupBy,
    since: i64,
) -> Result<Vec<GroupScore>, HistoryError> {
    let sums = store.sums(horizon_seconds, group_by, since).await?;
    let calibrated = store
        .calibrated_sums(horizon_seconds, group_by, since)
        .await?;
    let medians = store.medians(horizon_seconds, group_by, since).await?;
    Ok(score_groups(&sums, &calibrated, &medians))
}

/// The scorecard of individual rows (the reference the database's sums are checked against).
pub fn scorecard(rows: &[GradedRow]) -> Vec<GroupScore> {
    let mut sums: BTreeMap<(String, i64), BucketSums> = BTreeMap::new();
    let mut cal: BTreeMap<(String, i64), CalibratedSums> = BTreeMap::new();
    let mut returns: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in rows {
        let bucket = ((r.confidence * 10.0).floor() as i64).clamp(0, 9);
        let hit = f64::from(u8::from(r.hit));
        let e = sums
            .entry((r.group.clone(), bucket))
            .or_insert_with(|| BucketSums {
                group: r.group.clone(),
                bucket,
                ..BucketSums::default()
            });
        e.n += 1;
        e.hits += u64::from(r.hit);
        e.confidence += r.confidence;
        e.returns += r.return_fraction;
        e.squared_error += (r.confidence - hit).powi(2);
        if let Some(c) = r.calibrated {
            e.calibrated_n += 1;
            e.calibrated_hits += u64::from(r.hit);
            e.calibrated_sum += c;
            e.calibrated_squared_error += (c - hit).powi(2);
            let cb = ((c * 10.0).floor() as i64).clamp(0, 9);
            let k = cal
                .entry((r.group.clone(), cb))
                .or_insert_with(|| CalibratedSums {
                    group: r.group.clone(),
                    bucket: cb,
                    ..CalibratedSums::default()
                });
            k.n += 1;
            k.hits += u64::from(r.hit);
            k.calibrated += c;
        }
        if let (Some(h), Some(m)) = (r.hold_hit, r.momentum_hit) {
            e.baseline_n += 1;
            e.baseline_hits += u64::from(r.hit);
            e.hold_hits += u64::from(h);
            e.hold_differ += u64::from(h != r.hit);
            e.momentum_hits += u64::from(m);
            e.momentum_differ += u64::from(m != r.hit);
        }
        returns
            .entry(r.group.clone())
            .or_default()
            .push(r.return_fraction);
    }
    let medians = returns
        .into_iter()
        .map(|(g, mut v)| {
            v.sort_by(f64::total_cmp);
            let m = v.len();
            let median = if m % 2 == 1 {
                v[m / 2]
            } else {
                (v[m / 2 - 1] + v[m / 2]) / 2.0
            };
            (g, median)
        })
        .collect();
    score_groups(
        &sums.into_values().collect::<Vec<_>>(),
        &cal.into_values().collect::<Vec<_>>(),
        &medians,
    )
}

/// What the source says of the price at `at`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PriceAt {
    /// The close of the candle ending at `at`.
    Known(f64),
    /// The source has no candle ending there (and will not get one).
    Missing,
    /// The source failed; ask again later.
    Unavailable,
}

/// How long after its time a candle may still appear (exchanges publish the last minute late):
/// until then an absent candle is asked for again, after it the price is recorded as missing.
pub const CANDLE_GRACE: chrono::Duration = chrono::Duration::minutes(10);

/// The close of the 1-minute candle that ends exactly at `at` (a whole minute), asked at `now`.
pub async fn price_at(
    market: &dyn MarketSource,
    symbol: &str,
    at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> PriceAt {
    let absent = if now - at < CANDLE_GRACE {
        PriceAt::Unavailable
    } else {
        PriceAt::Missing
    };
    match market.candles(symbol, at, 3).await {
        Ok(candles) => candles
            .iter()
            .rev()
            .find(|c| c.time + chrono::Duration::minutes(1) == at)
            .map_or(absent, |c| PriceAt::Known(c.close)),
        Err(MarketError::TooFew { .. } | MarketError::Status { status: 404 }) => absent,
        Err(_) => PriceAt::Unavailable,
    }
}

/// Grades due signals every `interval`, each (signal, horizon) once.
pub struct Grader {
    store: Arc<dyn HistoryStore>,
    market: Arc<dyn MarketSource>,
    horizons: Vec<i64>,
    threshold: f64,
    /// Per horizon: every signal priced before this has a grade (so the next round's scan
    /// starts there). Starts at 0: the first round catches up on everything stored.
    graded_through: HashMap<i64, i64>,
    /// The calibration refitted from the grades, and how often.
    calibration: Option<(Arc<Calibrator>, Duration)>,
    /// How far back each scan reaches for messages stored late (seconds).
    late_arrivals: i64,
}

/// What one round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Grades recorded by this replica.
    pub graded: u64,
    /// Recorded as missing a price.
    pub missing: u64,
    /// Left for a later round (the source failed).
    pub deferred: u64,
    /// A horizon had more due than one round looks at: another round now has work.
    pub more: bool,
}

/// Signals looked at per horizon per round.
const ROUND_LIMIT: usize = 500;

/// How late a message may reach the database and still be graded without a restart (the
/// writer's queue holds far less than a day of messages).
const LATE_ARRIVALS: i64 = 86_400;

impl Grader {
    /// A grader of `store`'s signals against `market` at `horizons_minutes`, with a flat band
    /// of ±`threshold_pct` percent.
    pub fn new(
        store: Arc<dyn HistoryStore>,
        market: Arc<dyn MarketSource>,
        horizons_minutes: &[u32],
        threshold_pct: f64,
    ) -> Grader {
        Grader {
            store,
            market,
            horizons: horizons_minutes
                .iter()
                .map(|m| i64::from(*m) * 60)
                .collect(),
            threshold: threshold_pct / 100.0,
            graded_through: HashMap::new(),
            calibration: None,
            late_arrivals: LATE_ARRIVALS,
        }
    }

    /// For a history where nothing arrives late (a replay writes each tick before it grades):
    /// each scan starts where the last one finished, not a day earlier, so a day of replayed
    /// ticks costs a day's grades rather than a day's grades for every tick.
    pub fn without_late_arrivals(mut self) -> Grader {
        self.late_arrivals = 0;
        self
    }

    /// Also refits `calibrator` from the grades every `every` (and at the first round, so a
    /// restart calibrates from the stored history at once).
    pub fn with_calibrator(mut self, calibrator: Arc<Calibrator>, every: Duration) -> Grader {
        self.calibration = Some((calibrator, every));
        self
    }

    /// Grades what is due at `now`.
    pub async fn round(&mut self, now: DateTime<Utc>) -> Result<Round, HistoryError> {
        let mut out = Round::default();
        let mut grades = vec![];
        // Per horizon, where the next scan starts once this round's grades are in.
        let mut next_from = vec![];
        for &h in &self.horizons.clone() {
            let from = self.graded_through.get(&h).copied().unwrap_or(0);
            let due = self
                .store
                .due(h, from..now.timestamp() - h + 1, ROUND_LIMIT)
                .await?;
            let mut first_deferred: Option<i64> = None;
            for s in &due {
                let Some(at) = Utc.timestamp_opt(s.data_as_of + h, 0).single() else {
                    continue;
                };
                let price = price_at(self.market.as_ref(), &s.symbol, at, now).await;
                grades.push(match price {
                    PriceAt::Unavailable => {
                        out.deferred += 1;
                        first_deferred.get_or_insert(s.data_as_of);
                        continue;
                    }
                    PriceAt::Missing => self.grade(s, h, None, now),
                    PriceAt::Known(p) => self.grade(s, h, Some(p), now),
                });
            }
            out.more |= due.len() == ROUND_LIMIT;
            // Everything before the first deferred signal (or, with a full page, before the
            // last one looked at) is graded — of what is stored now. Messages still arrive
            // late (the writer's backlog after a database outage, another replica's), so the
            // next scan starts a day earlier than that: late arrivals are graded too.
            let through = match (first_deferred, due.len() == ROUND_LIMIT) {
                (Some(d), _) => d,
                (None, true) => due.last().map_or(from, |s| s.data_as_of),
                (None, false) => now.timestamp() - h + 1,
            };
            next_from.push((h, (through - self.late_arrivals).max(0)));
        }
        // One transaction for the round's grades of every horizon (a commit is most of what a
        // small batch costs), none for no grades: an idle round costs its scans only.
        let recorded = if grades.is_empty() {
            vec![]
        } else {
            self.store.record_grades(&grades).await?
        };
        for (grade, _) in grades.iter().zip(recorded).filter(|(_, r)| *r) {
            let outcome = match grade.hit {
                Some(true) => "hit",
                Some(false) => "miss",
                None => "missing_price",
            };
            let label = horizon_label(grade.horizon_seconds);
            metrics::counter!(names::SIGNALS_GRADED, "horizon" => label, "outcome" => outcome)
                .increment(1);
            if grade.hit.is_some() {
                out.graded += 1;
            } else {
                out.missing += 1;
            }
        }
        // Only now, with the grades stored: a failed write leaves the scans where they were.
        self.graded_through.extend(next_from);
        Ok(out)
    }

    fn grade(&self, s: &DueSignal, h: i64, after: Option<f64>, now: DateTime<Utc>) -> Grade {
        let judged = after
            .filter(|_| s.price_then > 0.0)
            .map(|p| judge(s.action, s.price_then, p, self.threshold));
        let baseline = |action: Action| {
            after
                .filter(|_| s.price_then > 0.0)
                .map(|p| judge(action, s.price_then, p, self.threshold).1)
        };
        Grade {
            signal: s.clone(),
            horizon_seconds: h,
            price_after: after,
            return_fraction: judged.map(|j| j.0),
            hit: judged.map(|j| j.1),
            hold_hit: baseline(Action::Hold),
            momentum_hit: s.price_change_1h.and_then(|r| baseline(momentum_call(r))),
            graded_at: now.timestamp(),
        }
    }

    /// Sets `signal_hit_rate{horizon}` from the last 24 hours' grades.
    pub async fn publish_hit_rates(&self, now: DateTime<Utc>) -> Result<(), HistoryError> {
        for &h in &self.horizons {
            let sums = self
                .store
                .sums(h, GroupBy::Action, now.timestamp() - 86_400)
                .await?;
            let n: u64 = sums.iter().map(|b| b.n).sum();
            if n > 0 {
                let hits: u64 = sums.iter().map(|b| b.hits).sum();
                metrics::gauge!(names::SIGNAL_HIT_RATE, "horizon" => horizon_label(h))
                    .set(hits as f64 / n as f64);
            }
        }
        Ok(())
    }

    /// Grades every `interval` until `stop`; also prunes past `retention` hourly.
    pub async fn run(
        mut self,
        clock: crate::schedule::Clock,
        interval: Duration,
        retention: Duration,
        stop: CancellationToken,
    ) {
        let mut last_prune: Option<tokio::time::Instant> = None;
        let mut last_refit: Option<tokio::time::Instant> = None;
        loop {
            let now = clock.now();
            match self.round(now).await {
                Ok(r) if r.graded + r.missing > 0 => {
                    tracing::info!(
                        graded = r.graded,
                        missing_price = r.missing,
                        deferred = r.deferred,
                        "signals graded"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "grading round failed; retrying next round"),
            }
            if let Err(e) = self.publish_hit_rates(now).await {
                tracing::debug!(error = %e, "hit rates not updated");
            }
            if let Some((c, every)) = &self.calibration
                && last_refit.is_none_or(|t| t.elapsed() >= *every)
            {
                match c.refit(self.store.as_ref()).await {
                    Ok(()) => last_refit = Some(tokio::time::Instant::now()),
                    Err(e) => {
                        tracing::warn!(error = %e, "calibration not refitted; the previous fit stays")
                    }
                }
            }
            if last_prune.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600)) {
                let before = now.timestamp() - retention.as_secs() as i64;
                match self.store.prune(before).await {
                    Ok(n) if n > 0 => tracing::info!(rows = n, "history pruned past retention"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "history prune failed"),
                }
                last_prune = Some(tokio::time::Instant::now());
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}

/// `5m`, `15m`, `1h`, `90m` — a bounded label (the configured horizons).
pub fn horizon_label(seconds: i64) -> String {
    let m = seconds / 60;
    if m % 60 == 0 {
        format!("{}h", m / 60)
    } else {
        format!("{m}m")
    }
}

/// Reads `5m`, `15m`, `1h`, or a bare number of minutes.
pub fn parse_horizon(s: &str) -> Option<i64> {
    let (n, unit) = match s.strip_suffix('h') {
        Some(n) => (n, 3600),
        None => (s.strip_suffix('m').unwrap_or(s), 60),
    };
    n.parse::<i64>()
        .ok()
        .filter(|n| *n > 0 && *n <= 7 * 24 * 60)
        .map(|n| n * unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_judged_against_the_flat_band() {
        let t = 0.001;
        assert!(judge(Action::Buy, 100.0, 100.2, t).1);
        assert!(!judge(Action::Buy, 100.0, 100.05, t).1, "inside the band");
        assert!(judge(Action::Sell, 100.0, 99.8, t).1);
        assert!(!judge(Action::Sell, 100.0, 100.2, t).1);
        assert!(judge(Action::Hold, 100.0, 100.05, t).1);
        assert!(!judge(Action::Hold, 100.0, 99.5, t).1);
        let (r, _) = judge(Action::Buy, 200.0, 210.0, t);
        assert!((r - 0.05).abs() < 1e-12);
    }

    #[test]
    fn wilson_interval_matches_known_values() {
        // 8 of 10: the textbook interval is 0.4902–0.9433.
        let (lo, hi) = wilson95(8, 10);
        assert!(
            (lo - 0.4902).abs() < 1e-4 && (hi - 0.9433).abs() < 1e-4,
            "{lo} {hi}"
        );
        assert_eq!(wilson95(0, 0), (0.0, 1.0));
        let (lo, hi) = wilson95(0, 5);
        assert_eq!(lo, 0.0);
        assert!(hi > 0.4 && hi < 0.5, "{hi}");
    }

    #[test]
    fn scorecard_counts_rates_returns_brier_and_buckets() {
        let row = |g: &str, c: f64, hit: bool, r: f64| GradedRow {
            group: g.into(),
            confidence: c,
            hit,
            return_fraction: r,
            calibrated: None,
            hold_hit: None,
            momentum_hit: None,
        };
        let rows = [
            row("BUY", 0.9, true, 0.02),
            row("BUY", 0.8, false, -0.01),
            row("BUY", 0.65, true, 0.005),
            row("SELL", 0.6, true, -0.003),
        ];
        let s = scorecard(&rows);
        assert_eq!(s.len(), 2);
        let buy = &s[0];
        assert_eq!((buy.key.as_str(), buy.graded, buy.hits), ("BUY", 3, 2));
        assert!((buy.hit_rate - 2.0 / 3.0).abs() < 1e-12);
        assert!((buy.mean_return - 0.015 / 3.0).abs() < 1e-12);
        assert_eq!(buy.median_return, 0.005);
        let brier = ((0.1f64).powi(2) + (0.8f64).powi(2) + (0.35f64).powi(2)) / 3.0;
        assert!((buy.brier - brier).abs() < 1e-12);
        let buckets: Vec<(&str, u64)> = buy
            .calibration
            .iter()
            .map(|b| (b.bucket.as_str(), b.count))
            .collect();
        assert_eq!(buckets, [("0.6-0.7", 1), ("0.8-0.9", 1), ("0.9-1.0", 1)]);
        assert_eq!(s[1].median_return, -0.003);
    }

    /// Known rows, known figures: the calibrated confidence's own Brier and buckets, the Brier
    /// skill of both against the base rate, the baselines and the paired skill interval.
    #[test]
    fn scorecard_scores_calibration_and_baselines_exactly() {
        let row = |c: f64, hit: bool, cal: Option<f64>, base: Option<(bool, bool)>| GradedRow {
            group: "g".into(),
            confidence: c,
            hit,
            return_fraction: 0.0,
            calibrated: cal,
            hold_hit: base.map(|b| b.0),
            momentum_hit: base.map(|b| b.1),
        };
        let rows = [
            row(0.8, true, Some(0.7), Some((false, true))),
            row(0.8, false, Some(0.7), Some((true, false))),
            row(0.6, true, Some(0.4), Some((false, false))),
            // Stored before calibration and baselines: counted for what it has.
            row(0.6, true, None, None),
        ];
        let g = &scorecard(&rows)[0];
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert_eq!((g.graded, g.hits), (4, 3));
        // Stated: Brier (0.04 + 0.64 + 0.16 + 0.16) / 4 = 0.25 against p(1 − p) = 0.1875.
        assert!(close(g.brier, 0.25));
        assert!(close(g.brier_skill.expect("skill"), 1.0 - 0.25 / 0.1875));
        let c = g.calibrated.as_ref().expect("calibrated rows");
        assert_eq!(c.graded, 3);
        let brier = (0.09 + 0.49 + 0.36) / 3.0;
        assert!(close(c.brier, brier), "{c:?}");
        assert!(close(
            c.brier_skill.expect("skill"),
            1.0 - brier / (2.0 / 9.0)
        ));
        let buckets: Vec<(&str, u64, f64)> = c
            .calibration
            .iter()
            .map(|b| (b.bucket.as_str(), b.count, b.hit_rate))
            .collect();
        assert_eq!(buckets, [("0.4-0.5", 1, 1.0), ("0.7-0.8", 2, 0.5)]);
        let b = g.baselines.as_ref().expect("baselines");
        assert_eq!(b.graded, 3);
        assert!(close(b.hit_rate, 2.0 / 3.0) && close(b.always_hold, 1.0 / 3.0));
        assert!(close(b.momentum, 1.0 / 3.0));
        assert_eq!(b.best, "always_hold", "a tie goes to the simpler baseline");
        // Paired differences 1, −1, 1: mean 1/3, sample variance (3 − 3/9) / 2 = 4/3.
        assert!(close(b.skill, 1.0 / 3.0));
        let half = 1.959_963_984_540_054 * (4.0f64 / 3.0 / 3.0).sqrt();
        // 1/3 + 1.31 is past 1: a difference of hit rates is cut to [−1, 1].
        assert!(close(b.skill_ci95[0], 1.0 / 3.0 - half) && b.skill_ci95[1] == 1.0);
        // A forecast that is always right or always wrong leaves nothing to be skilled at.
        let perfect = scorecard(&[row(0.9, true, None, None)]);
        assert_eq!(perfect[0].brier_skill, None);
        assert!(perfect[0].calibrated.is_none() && perfect[0].baselines.is_none());
    }

    #[test]
    fn horizons_read_and_print_both_ways() {
        assert_eq!(parse_horizon("5m"), Some(300));
        assert_eq!(parse_horizon("1h"), Some(3600));
        assert_eq!(parse_horizon("15"), Some(900));
        for bad in ["", "0m", "-5m", "1d", "abc", "99999h"] {
            assert_eq!(parse_horizon(bad), None, "{bad}");
        }
        assert_eq!(horizon_label(300), "5m");
        assert_eq!(horizon_label(3600), "1h");
        assert_eq!(horizon_label(5400), "90m");
    }
}
