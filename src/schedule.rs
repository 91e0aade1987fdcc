//! The cron schedule: which instants are ticks, and what a tick is called.
//!
//! Ticks are computed from the cron expression, never as "now + period", so they stay on the
//! boundary however long a cycle took. A tick's identity ([`CycleId`]) is its scheduled time,
//! which every replica computes identically — that is what makes the cycle lease work.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// A parsed schedule: a 5-field (minute) or 6-field (second) cron in a time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    tz: Tz,
    expr: String,
}

/// Why a schedule could not be built.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScheduleError {
    /// Not 5 or 6 fields, or a field croner rejects.
    #[error("invalid cron expression {expr:?}: {reason}")]
    Cron {
        /// The expression as given.
        expr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Not an IANA time zone name.
    #[error("unknown time zone {0:?} (use an IANA name such as \"UTC\" or \"Europe/Berlin\")")]
    TimeZone(String),
    /// The expression never matches (e.g. 30 February).
    #[error("cron expression {0:?} has no upcoming tick")]
    NeverFires(String),
}

impl Schedule {
    /// Parses `expr` (5 or 6 fields) in time zone `tz`.
    pub fn new(expr: &str, tz: &str) -> Result<Self, ScheduleError> {
        let fields = expr.split_whitespace().count();
        if !(fields == 5 || fields == 6) {
            return Err(ScheduleError::Cron {
                expr: expr.to_string(),
                reason: format!(
                    "expected 5 fields (minute…) or 6 (second minute…), found {fields}"
                ),
            });
        }
        // croner accepts a step larger than its field (`*/61` minutes fires at :00 only, once
        // an hour): almost certainly not what was meant, so it is refused.
        let names: &[(&str, u32)] = if fields == 6 {
            &[
                ("second", 59),
                ("minute", 59),
                ("hour", 23),
                ("day of month", 31),
                ("month", 12),
                ("day of week", 7),
            ]
        } else {
            &[
                ("minute", 59),
                ("hour", 23),
                ("day of month", 31),
                ("month", 12),
                ("day of week", 7),
            ]
        };
        for (field, (name, max)) in expr.split_whitespace().zip(names) {
            for part in field.split(',') {
                if let Some((_, step)) = part.split_once('/') {
                    match step.parse::<u32>() {
                        Ok(n) if (1..=*max).contains(&n) => {}
                        _ => {
                            return Err(ScheduleError::Cron {
                                expr: expr.to_string(),
                                reason: format!(
                                    "the {name} step {step:?} must be a whole number from 1 to {max}"
                                ),
                            });
                        }
                    }
                }
            }
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(expr)
            .map_err(|e| ScheduleError::Cron {
                expr: expr.to_string(),
                reason: e.to_string(),
            })?;
        let tz = Tz::from_str(tz).map_err(|_| ScheduleError::TimeZone(tz.to_string()))?;
        let s = Self {
            cron,
            tz,
            expr: expr.to_string(),
        };
        // Reject expressions that never fire now, not at the first tick.
        s.next_after(Utc::now())
            .ok_or_else(|| ScheduleError::NeverFires(expr.to_string()))?;
        Ok(s)
    }

    /// The expression as configured.
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = t.with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The latest tick at or before `t` (what a one-shot run started just after a boundary
    /// belongs to).
    pub fn latest_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = t.with_timezone(&self.tz);
        self.cron
            .find_previous_occurrence(&local, true)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// Waking at `woke` for tick `due`: the latest tick that is due by now, and how many due
    /// ticks in between are passed over (a stalled process does not replay them).
    pub fn latest_due(&self, due: DateTime<Utc>, woke: DateTime<Utc>) -> (DateTime<Utc>, u64) {
        let mut tick = due;
        let mut missed = 0u64;
        // Bounded: a process suspended for days must not spin through every second.
        while missed < 1_000_000 {
            match self.next_after(tick) {
                Some(n) if n <= woke => {
                    missed += 1;
                    tick = n;
                }
                _ => break,
            }
        }
        (tick, missed)
    }

    /// The time from tick `t` to the one after it.
    pub fn period_after(&self, t: DateTime<Utc>) -> Option<std::time::Duration> {
        let next = self.next_after(t)?;
        (next - t).to_std().ok()
    }
}

/// A tick's identity: its scheduled time, printed in RFC 3339 with second precision and `Z`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CycleId(DateTime<Utc>);

impl CycleId {
    /// The cycle of the tick scheduled at `t` (sub-second parts are dropped: ticks are whole
    /// seconds).
    pub fn new(t: DateTime<Utc>) -> Self {
        use chrono::Timelike;
        CycleId(t.with_nanosecond(0).unwrap_or(t))
    }

    /// The scheduled time.
    pub fn time(&self) -> DateTime<Utc> {
        self.0
    }
}

impl fmt::Display for CycleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.to_rfc3339_opts(SecondsFormat::Secs, true))
    }
}

impl serde::Serialize for CycleId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Why text is not a cycle id.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("not a cycle id (RFC 3339 UTC time with whole seconds, e.g. 2026-11-28T10:01:00Z): {0:?}")]
pub struct BadCycleId(String);

/// In the OpenAPI document: the tick as an RFC 3339 time, as it is serialized.
impl utoipa::PartialSchema for CycleId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        crate::model::string_schema(
            "The tick: the scheduled time of the cycle, whole seconds, UTC (RFC 3339).",
            Some(utoipa::openapi::KnownFormat::DateTime),
        )
    }
}

impl utoipa::ToSchema for CycleId {}

impl FromStr for CycleId {
    type Err = BadCycleId;

    /// Reads what [`Display`](fmt::Display) writes. Any RFC 3339 offset is accepted and
    /// normalised to UTC; a fractional second is refused, because ids that differ only in a
    /// fraction would name the same tick twice.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use chrono::Timelike;
        let t = DateTime::parse_from_rfc3339(s)
            .map_err(|_| BadCycleId(s.to_string()))?
            .with_timezone(&Utc);
        if t.nanosecond() != 0 {
            return Err(BadCycleId(s.to_string()));
        }
        Ok(CycleId(t))
    }
}

impl<'de> serde::Deserialize<'de> for CycleId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Wall-clock time as the scheduler sees it.
///
/// In service the system clock is the truth (ticks belong to UTC boundaries, and replicas on
/// different hosts agree through NTP). Tests anchor wall time to tokio's clock instead, so a
/// paused clock drives the scheduler exactly — and [`Clock::steppable`] lets a test step the
/// wall clock as an NTP correction does, which a paused monotonic clock alone cannot show.
#[derive(Debug, Clone)]
pub enum Clock {
    /// `Utc::now()`.
    System,
    /// A replay's: the time its driver last set; nothing waits on it.
    Virtual(VirtualTime),
    /// `wall` at `mono`, advancing with tokio's clock, plus `steps` (milliseconds; zero
    /// unless a test stepped it through [`WallSteps`]).
    Anchored {
        /// Wall time at the anchor.
        wall: DateTime<Utc>,
        /// tokio instant at the anchor.
        mono: tokio::time::Instant,
        /// How far the wall clock was stepped since, in milliseconds (shared by clones).
        steps: Arc<AtomicI64>,
    },
}

/// Steps the wall clock of a [`Clock::steppable`] clock (every clone of it), leaving tokio's
/// monotonic clock alone — what an NTP step does to a real host.
#[derive(Debug, Clone)]
pub struct WallSteps(Arc<AtomicI64>);

impl WallSteps {
    /// Moves the wall clock by `d` (negative: back).
    pub fn step(&self, d: chrono::Duration) {
        self.0.fetch_add(d.num_milliseconds(), Ordering::Relaxed);
    }
}

/// How a wait for a wall time ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woke {
    /// The time came.
    Reached,
    /// The wall clock jumped by this much beyond the time that passed (negative: back).
    Stepped(chrono::Duration),
}

/// Longest nap of [`Clock::sleep_until`]: a step of the wall clock is noticed within it.
const NAP: std::time::Duration = std::time::Duration::from_secs(1);

/// A wall-clock move this much larger or smaller than the monotonic time that passed is a
/// step, not drift: NTP slews below it and steps above it (its default step threshold is
/// 128 ms; a second leaves room for a loaded host's late wake-ups, which move both clocks).
const STEP: chrono::Duration = chrono::Duration::seconds(2);

impl Clock {
    /// A clock that starts at `wall` now and follows tokio's (possibly paused) clock.
    pub fn anchored(wall: DateTime<Utc>) -> Self {
        Self::steppable(wall).0
    }

    /// [`Clock::anchored`], and the handle that steps its wall clock.
    pub fn steppable(wall: DateTime<Utc>) -> (Self, WallSteps) {
        let steps = Arc::new(AtomicI64::new(0));
        (
            Clock::Anchored {
                wall,
                mono: tokio::time::Instant::now(),
                steps: steps.clone(),
            },
            WallSteps(steps),
        )
    }

    /// Current wall time.
    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Clock::System => Utc::now(),
            Clock::Virtual(v) => v.get(),
            Clock::Anchored { wall, mono, steps } => {
                let since = tokio::time::Instant::now().duration_since(*mono);
                *wall
                    + chrono::Duration::from_std(since).unwrap_or_default()
                    + chrono::Duration::milliseconds(steps.load(Ordering::Relaxed))
            }
        }
    }
}

/// Watches the wall clock against tokio's monotonic clock for steps (an NTP correction, an
/// operator's `date -s`), and sleeps until a wall time without missing one.
#[derive(Debug)]
pub struct WallWatch {
    clock: Clock,
    /// Wall and monotonic time at the last look.
    wall: DateTime<Utc>,
    mono: tokio::time::Instant,
}

impl WallWatch {
    /// Starts watching `clock` now.
    pub fn new(clock: Clock) -> Self {
        WallWatch {
            wall: clock.now(),
            mono: tokio::time::Instant::now(),
            clock,
        }
    }

    /// How far the wall clock moved beyond the monotonic time that passed since the last
    /// look, when that is a step (more than [`STEP`] either way; negative: back). Looks anew.
    /// A virtual clock is moved by its driver: it never steps.
    pub fn stepped(&mut self) -> Option<chrono::Duration> {
        let (wall, mono) = (self.clock.now(), tokio::time::Instant::now());
        let slept = chrono::Duration::from_std(mono.duration_since(self.mono)).unwrap_or_default();
        let jump = (wall - self.wall) - slept;
        (self.wall, self.mono) = (wall, mono);
        (jump.abs() > STEP && !matches!(self.clock, Clock::Virtual(_))).then_some(jump)
    }

    /// Sleeps until wall time `t`, in naps of at most a second (calling `on_nap` after each),
    /// re-reading the wall clock after each: an early wake-up never starts a tick before its
    /// boundary, and a step of the wall clock since the last look — during the wait or
    /// before it — ends the wait with [`Woke::Stepped`]: a clock stepped back an hour must
    /// not leave the caller asleep for that hour. On a virtual clock it returns at once: its
    /// driver moves time, not the waiting.
    pub async fn sleep_until(&mut self, t: DateTime<Utc>, mut on_nap: impl FnMut()) -> Woke {
        loop {
            if let Some(jump) = self.stepped() {
                return Woke::Stepped(jump);
            }
            let remaining = (t - self.clock.now()).to_std().unwrap_or_default();
            if remaining.is_zero() || matches!(self.clock, Clock::Virtual(_)) {
                return Woke::Reached;
            }
            tokio::time::sleep(remaining.min(NAP)).await;
            on_nap();
        }
    }
}

/// The ticks a tick loop has handled (run, skipped, or passed over), as spans of wall time:
/// what keeps a cycle id from ever running twice when the wall clock steps back over ticks
/// already run. Every tick in a span is done; a forward step leaves the jumped-over ticks
/// outside every span, so after a step back they are run like any other.
///
/// A span per forward step, merged when they meet: a handful at most, however long it runs.
#[derive(Debug, Default)]
pub struct DoneTicks {
    /// Disjoint, in time order.
    spans: Vec<(DateTime<Utc>, DateTime<Utc>)>,
    /// The start of the span the next tick continues (`None` after a step).
    current: Option<DateTime<Utc>>,
}

/// Spans kept: the oldest go first (a step back further than dozens of forward steps ago).
const MAX_SPANS: usize = 64;

impl DoneTicks {
    /// Records that `tick` was handled, with every tick since the last one recorded if no
    /// step came between.
    pub fn record(&mut self, tick: DateTime<Utc>) {
        let current = self
            .current
            .and_then(|start| self.spans.iter().position(|(a, _)| *a == start));
        match current {
            Some(i) if tick >= self.spans[i].1 => self.spans[i].1 = tick,
            _ => {
                self.spans.push((tick, tick));
                self.spans.sort();
            }
        }
        self.merge();
        self.current = self.containing(tick).map(|(a, _)| a);
    }

    /// The wall clock stepped: the next tick recorded starts a span of its own.
    pub fn stepped(&mut self) {
        self.current = None;
    }

    /// The span `t` is in, if any.
    fn containing(&self, t: DateTime<Utc>) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        self.spans.iter().copied().find(|(a, b)| *a <= t && t <= *b)
    }

    /// Whether `t` was handled already.
    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        self.containing(t).is_some()
    }

    /// The first tick of `schedule` after `now` that is not done yet.
    pub fn next_after(&self, schedule: &Schedule, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut next = schedule.next_after(now)?;
        while let Some((_, end)) = self.containing(next) {
            next = schedule.next_after(end)?;
        }
        Some(next)
    }

    fn merge(&mut self) {
        let mut merged: Vec<(DateTime<Utc>, DateTime<Utc>)> = Vec::with_capacity(self.spans.len());
        for (a, b) in self.spans.drain(..) {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        if merged.len() > MAX_SPANS {
            merged.drain(..merged.len() - MAX_SPANS);
        }
        self.spans = merged;
    }
}

/// A wall time set by hand, shared by every clone of its [`Clock::Virtual`]: a replay sets
/// each tick's time before it runs the tick.
#[derive(Debug, Clone)]
pub struct VirtualTime(Arc<AtomicI64>);

impl VirtualTime {
    /// A virtual time starting at `t` (millisecond precision).
    pub fn new(t: DateTime<Utc>) -> Self {
        Self(Arc::new(AtomicI64::new(t.timestamp_millis())))
    }

    /// Moves it to `t`.
    pub fn set(&self, t: DateTime<Utc>) {
        self.0.store(t.timestamp_millis(), Ordering::Relaxed);
    }

    /// The time it was last set to.
    pub fn get(&self) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(self.0.load(Ordering::Relaxed))
            .single()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 28, h, m, s)
            .single()
            .expect("valid")
    }

    #[test]
    fn every_minute_lands_on_the_minute() {
        let s = Schedule::new("*/1 * * * *", "UTC").expect("valid");
        assert_eq!(s.next_after(at(10, 0, 0)), Some(at(10, 1, 0)));
        assert_eq!(s.next_after(at(10, 0, 59)), Some(at(10, 1, 0)));
        assert_eq!(s.latest_at_or_before(at(10, 0, 37)), Some(at(10, 0, 0)));
        assert_eq!(s.latest_at_or_before(at(10, 1, 0)), Some(at(10, 1, 0)));
        assert_eq!(
            s.period_after(at(10, 0, 0)),
            Some(std::time::Duration::from_secs(60))
        );
    }

    #[test]
    fn six_fields_are_seconds() {
        let s = Schedule::new("*/5 * * * * *", "UTC").expect("valid");
        let mut t = at(10, 0, 3);
        for _ in 0..30 {
            t = s.next_after(t).expect("tick");
            assert_eq!(chrono::Timelike::second(&t) % 5, 0);
            assert_eq!(t.timestamp_subsec_nanos(), 0);
        }
        assert_eq!(t, at(10, 2, 30));
    }

    #[test]
    fn no_drift_from_where_we_start() {
        // Whatever instant we compute from (a late wake-up), the next tick is on the boundary.
        let s = Schedule::new("*/1 * * * *", "UTC").expect("valid");
        let late = at(10, 0, 0) + chrono::Duration::milliseconds(1234);
        assert_eq!(s.next_after(late), Some(at(10, 1, 0)));
    }

    #[test]
    fn named_time_zone() {
        // 09:00 in Berlin (UTC+1 in November) is 08:00 UTC.
        let s = Schedule::new("0 9 * * *", "Europe/Berlin").expect("valid");
        assert_eq!(s.next_after(at(7, 0, 0)), Some(at(8, 0, 0)));
    }

    #[test]
    fn bad_input_is_named() {
        assert!(matches!(
            Schedule::new("* * * *", "UTC"),
            Err(ScheduleError::Cron { .. })
        ));
        assert!(matches!(
            Schedule::new("* * * * * * *", "UTC"),
            Err(ScheduleError::Cron { .. })
        ));
        assert!(matches!(
            Schedule::new("61 * * * *", "UTC"),
            Err(ScheduleError::Cron { .. })
        ));
        assert!(matches!(
            Schedule::new("every minute", "UTC"),
            Err(ScheduleError::Cron { .. })
        ));
        // Steps larger than their field (issue 10): refused, with the field named.
        for (expr, field) in [
            ("*/61 * * * *", "minute"),
            ("*/60 * * * *", "minute"),
            ("0 */25 * * *", "hour"),
            ("*/0 * * * *", "minute"),
            ("*/61 * * * * *", "second"),
            ("0,*/90 * * * *", "minute"),
        ] {
            match Schedule::new(expr, "UTC") {
                Err(ScheduleError::Cron { reason, .. }) => {
                    assert!(reason.contains(field), "{expr}: {reason}")
                }
                other => panic!("{expr}: {other:?}"),
            }
        }
        assert!(Schedule::new("*/59 * * * *", "UTC").is_ok());
        assert!(Schedule::new("*/5 * * * * *", "UTC").is_ok());
        assert_eq!(
            Schedule::new("* * * * *", "Mars/Olympus").err(),
            Some(ScheduleError::TimeZone("Mars/Olympus".into()))
        );
    }

    #[test]
    fn a_stall_passes_over_missed_ticks() {
        let s = Schedule::new("*/5 * * * * *", "UTC").expect("valid");
        // On time: nothing missed.
        assert_eq!(s.latest_due(at(10, 0, 5), at(10, 0, 5)), (at(10, 0, 5), 0));
        assert_eq!(s.latest_due(at(10, 0, 5), at(10, 0, 9)), (at(10, 0, 5), 0));
        // Woke 17 s late: ticks 10, 15 and 20 are due; run 20, count 10 and 15... and 5.
        assert_eq!(
            s.latest_due(at(10, 0, 5), at(10, 0, 22)),
            (at(10, 0, 20), 3)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn anchored_clock_follows_tokio_time() {
        let c = Clock::anchored(at(10, 0, 0));
        tokio::time::advance(std::time::Duration::from_millis(1500)).await;
        assert_eq!(c.now(), at(10, 0, 1) + chrono::Duration::milliseconds(500));
        let mut w = WallWatch::new(c.clone());
        let mut naps = 0;
        assert_eq!(
            w.sleep_until(at(10, 1, 0), || naps += 1).await,
            Woke::Reached
        );
        assert_eq!(c.now(), at(10, 1, 0));
        // 58.5 s in naps of at most a second.
        assert_eq!(naps, 59);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wall_clock_step_ends_the_wait_within_a_second_and_drift_does_not() {
        let (c, steps) = Clock::steppable(at(10, 0, 0));
        let mut w = WallWatch::new(c.clone());
        let sleeper = tokio::spawn(async move { w.sleep_until(at(11, 0, 0), || {}).await });
        tokio::time::sleep(std::time::Duration::from_millis(10_500)).await;
        // Slewed 1.5 s (under the 2 s step threshold): still waiting.
        steps.step(chrono::Duration::milliseconds(-1500));
        tokio::time::sleep(std::time::Duration::from_millis(2_000)).await;
        assert!(!sleeper.is_finished());
        steps.step(chrono::Duration::minutes(-30));
        tokio::time::sleep(std::time::Duration::from_millis(1_000)).await;
        assert!(sleeper.is_finished());
        let woke = sleeper.await.expect("joined");
        assert_eq!(woke, Woke::Stepped(chrono::Duration::minutes(-30)));
        // A step that came between two waits is seen by the next one at once.
        let mut w = WallWatch::new(c.clone());
        steps.step(chrono::Duration::hours(1));
        assert_eq!(
            w.sleep_until(at(13, 0, 0), || {}).await,
            Woke::Stepped(chrono::Duration::hours(1))
        );
    }

    #[test]
    fn cycle_id_reads_what_it_writes_and_refuses_the_rest() {
        let c = CycleId::new(
            Utc.with_ymd_and_hms(2026, 11, 28, 10, 1, 0)
                .single()
                .expect("valid"),
        );
        assert_eq!("2026-11-28T10:01:00Z".parse::<CycleId>(), Ok(c));
        assert_eq!("2026-11-28T11:01:00+01:00".parse::<CycleId>(), Ok(c));
        let json = serde_json::to_string(&c).expect("serialize");
        assert_eq!(
            serde_json::from_str::<CycleId>(&json).expect("round trip"),
            c
        );
        for bad in [
            "",
            "c1",
            "2026-11-28",
            "2026-11-28T10:01:00.5Z",
            "2026-13-28T10:01:00Z",
        ] {
            let e = bad.parse::<CycleId>().expect_err(bad);
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn cycle_id_is_rfc3339_seconds() {
        let id = CycleId::new(at(10, 0, 5) + chrono::Duration::milliseconds(3));
        assert_eq!(id.to_string(), "2026-11-28T10:00:05Z");
    }
}
