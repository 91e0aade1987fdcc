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
/// paused clock drives the scheduler exactly.
#[derive(Debug, Clone)]
pub enum Clock {
    /// `Utc::now()`.
    System,
    /// A replay's: the time its driver last set; nothing waits on it.
    Virtual(VirtualTime),
    /// `wall` at `mono`, advancing with tokio's clock.
    Anchored {
        /// Wall time at the anchor.
        wall: DateTime<Utc>,
        /// tokio instant at the anchor.
        mono: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that starts at `wall` now and follows tokio's (possibly paused) clock.
    pub fn anchored(wall: DateTime<Utc>) -> Self {
        Clock::Anchored {
            wall,
            mono: tokio::time::Instant::now(),
        }
    }

    /// Current wall time.
    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Clock::System => Utc::now(),
            Clock::Virtual(v) => v.get(),
            Clock::Anchored { wall, mono } => {
                let since = tokio::time::Instant::now().duration_since(*mono);
                *wall + chrono::Duration::from_std(since).unwrap_or_default()
            }
        }
    }

    /// Sleeps until wall time `t` (re-checking after waking, so an early wake-up caused by
    /// the wall clock stepping never starts a tick before its boundary).
    /// On a virtual clock it returns at once: its driver moves time, not the waiting.
    pub async fn sleep_until(&self, t: DateTime<Utc>) {
        if matches!(self, Clock::Virtual(_)) {
            return;
        }
        loop {
            let remaining = (t - self.now()).to_std().unwrap_or_default();
            if remaining.is_zero() {
                return;
            }
            tokio::time::sleep(remaining).await;
        }
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
        c.sleep_until(at(10, 1, 0)).await;
        assert_eq!(c.now(), at(10, 1, 0));
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
