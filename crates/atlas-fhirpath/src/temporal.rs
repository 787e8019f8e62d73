//! Partial-precision dates, date-times and times, as FHIRPath defines them.

use std::cmp::Ordering;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum TemporalKind {
    Date,
    DateTime,
    Time,
}

/// How much of a date/time was given. `Second` and `Millisecond` compare as one level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Precision {
    Year,
    Month,
    Day,
    Hour,
    Minute,
    Second,
    Millisecond,
}

/// A calendar duration unit usable in date/time arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalendarUnit {
    Year,
    Month,
    Week,
    Day,
    Hour,
    Minute,
    Second,
    Millisecond,
}

/// A FHIRPath Date, DateTime or Time value with its precision and optional timezone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Temporal {
    pub kind: TemporalKind,
    pub precision: Precision,
    pub year: i32,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    pub millis: u16,
    /// Number of fractional-second digits written (0 when none).
    pub frac_digits: u8,
    /// Timezone offset in minutes, when given.
    pub tz: Option<i16>,
}

fn num(s: &str, n: usize) -> Option<(u32, &str)> {
    if s.len() < n || !s.as_bytes()[..n].iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some((s[..n].parse().ok()?, &s[n..]))
}

pub(crate) fn days_in_month(y: i32, m: u8) -> u8 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ => {
            if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 {
                29
            } else {
                28
            }
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (the shared civil
/// arithmetic of `atlas-fhir`, in this crate's field types).
fn days_from_civil(y: i32, m: u8, d: u8) -> i64 {
    atlas_fhir::instant::days_from_civil(i64::from(y), i64::from(m), i64::from(d))
}

fn civil_from_days(z: i64) -> (i32, u8, u8) {
    let (y, m, d) = atlas_fhir::instant::civil_from_days(z);
    (y as i32, m as u8, d as u8)
}

const MS_PER_DAY: i64 = 86_400_000;

impl Temporal {
    fn blank(kind: TemporalKind) -> Self {
        Temporal {
            kind,
            precision: Precision::Year,
            year: 0,
            month: 1,
            day: 1,
            hour: 0,
            minute: 0,
            second: 0,
            millis: 0,
            frac_digits: 0,
            tz: None,
        }
    }

    fn parse_date_into(t: &mut Temporal, s: &str) -> Option<()> {
        let (y, rest) = num(s, 4)?;
        t.year = y as i32;
        t.precision = Precision::Year;
        if rest.is_empty() {
            return Some(());
        }
        let rest = rest.strip_prefix('-')?;
        let (m, rest) = num(rest, 2)?;
        if !(1..=12).contains(&m) {
            return None;
        }
        t.month = m as u8;
        t.precision = Precision::Month;
        if rest.is_empty() {
            return Some(());
        }
        let rest = rest.strip_prefix('-')?;
        let (d, rest) = num(rest, 2)?;
        if d < 1 || d > u32::from(days_in_month(t.year, t.month)) || !rest.is_empty() {
            return None;
        }
        t.day = d as u8;
        t.precision = Precision::Day;
        Some(())
    }

    /// `hh(:mm(:ss(.f+)?)?)?`, returns the unparsed remainder.
    fn parse_time_into<'s>(t: &mut Temporal, s: &'s str) -> Option<&'s str> {
        let (h, rest) = num(s, 2)?;
        if h > 23 {
            return None;
        }
        t.hour = h as u8;
        t.precision = Precision::Hour;
        let Some(rest) = rest.strip_prefix(':') else {
            return Some(rest);
        };
        let (mi, rest) = num(rest, 2)?;
        if mi > 59 {
            return None;
        }
        t.minute = mi as u8;
        t.precision = Precision::Minute;
        let Some(rest) = rest.strip_prefix(':') else {
            return Some(rest);
        };
        let (sec, rest) = num(rest, 2)?;
        if sec > 59 {
            return None;
        }
        t.second = sec as u8;
        t.precision = Precision::Second;
        let Some(rest) = rest.strip_prefix('.') else {
            return Some(rest);
        };
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let frac = &rest[..digits];
        let mut ms = 0u32;
        for (i, b) in frac.bytes().take(3).enumerate() {
            ms += u32::from(b - b'0') * [100, 10, 1][i];
        }
        t.millis = ms as u16;
        t.frac_digits = digits.min(9) as u8;
        t.precision = Precision::Millisecond;
        Some(&rest[digits..])
    }

    fn parse_tz(s: &str) -> Option<Option<i16>> {
        if s.is_empty() {
            return Some(None);
        }
        if s == "Z" {
            return Some(Some(0));
        }
        let sign = match s.as_bytes()[0] {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        let (h, rest) = num(&s[1..], 2)?;
        let rest = rest.strip_prefix(':')?;
        let (m, rest) = num(rest, 2)?;
        if !rest.is_empty() || h > 14 || m > 59 {
            return None;
        }
        Some(Some(sign * (h * 60 + m) as i16))
    }

    /// Parse a FHIR `date` value (`YYYY`, `YYYY-MM`, `YYYY-MM-DD`).
    pub fn parse_date(s: &str) -> Option<Self> {
        let mut t = Self::blank(TemporalKind::Date);
        Self::parse_date_into(&mut t, s)?;
        Some(t)
    }

    /// Parse a FHIR `dateTime`/`instant` value; a bare date gives a DateTime of date precision.
    pub fn parse_datetime(s: &str) -> Option<Self> {
        let mut t = Self::blank(TemporalKind::DateTime);
        let (date, time) = match s.split_once('T') {
            Some((d, t)) => (d, Some(t)),
            None => (s, None),
        };
        Self::parse_date_into(&mut t, date)?;
        if let Some(time) = time {
            if time.is_empty() {
                return Some(t);
            }
            if t.precision != Precision::Day {
                return None;
            }
            let rest = Self::parse_time_into(&mut t, time)?;
            t.tz = Self::parse_tz(rest)?;
        }
        Some(t)
    }

    /// Parse a time (`hh(:mm(:ss(.fff)?)?)?`), without timezone.
    pub fn parse_time(s: &str) -> Option<Self> {
        let mut t = Self::blank(TemporalKind::Time);
        let rest = Self::parse_time_into(&mut t, s)?;
        rest.is_empty().then_some(t)
    }

    /// Parse the text of an `@` literal (without the `@`; `T...` forms are times).
    pub(crate) fn parse_literal(s: &str) -> Option<Self> {
        if s.contains('T') {
            Self::parse_datetime(s)
        } else {
            Self::parse_date(s)
        }
    }

    /// FHIRPath `precision()`: the number of digits of the value.
    pub fn digits(&self) -> u32 {
        let mut n = match self.kind {
            TemporalKind::Time => 0,
            _ => 4,
        };
        let levels: &[(Precision, u32)] = match self.kind {
            TemporalKind::Time => &[
                (Precision::Hour, 2),
                (Precision::Minute, 2),
                (Precision::Second, 2),
            ],
            _ => &[
                (Precision::Month, 2),
                (Precision::Day, 2),
                (Precision::Hour, 2),
                (Precision::Minute, 2),
                (Precision::Second, 2),
            ],
        };
        for (p, d) in levels {
            if self.precision >= *p {
                n += d;
            }
        }
        if self.precision == Precision::Millisecond {
            n += 3;
        }
        n
    }

    /// A UTC DateTime of millisecond precision from milliseconds since 1970.
    pub fn from_epoch_millis_utc(ms: i64) -> Self {
        let mut t = Self::blank(TemporalKind::DateTime);
        t.set_epoch_ms(ms);
        t.precision = Precision::Millisecond;
        t.frac_digits = 3;
        t.tz = Some(0);
        t
    }

    fn epoch_ms(&self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * MS_PER_DAY
            + i64::from(self.hour) * 3_600_000
            + i64::from(self.minute) * 60_000
            + i64::from(self.second) * 1000
            + i64::from(self.millis)
    }

    fn set_epoch_ms(&mut self, ms: i64) {
        let days = ms.div_euclid(MS_PER_DAY);
        let rem = ms.rem_euclid(MS_PER_DAY);
        let (y, m, d) = civil_from_days(days);
        self.year = y;
        self.month = m;
        self.day = d;
        self.hour = (rem / 3_600_000) as u8;
        self.minute = (rem / 60_000 % 60) as u8;
        self.second = (rem / 1000 % 60) as u8;
        self.millis = (rem % 1000) as u16;
    }

    fn to_utc(self) -> Self {
        match self.tz {
            Some(off) if off != 0 && self.precision >= Precision::Hour => {
                let mut t = self;
                t.set_epoch_ms(self.epoch_ms() - i64::from(off) * 60_000);
                t.tz = Some(0);
                t
            }
            _ => self,
        }
    }

    fn levels(&self) -> [(Precision, i64); 6] {
        [
            (Precision::Year, i64::from(self.year)),
            (Precision::Month, i64::from(self.month)),
            (Precision::Day, i64::from(self.day)),
            (Precision::Hour, i64::from(self.hour)),
            (Precision::Minute, i64::from(self.minute)),
            (
                Precision::Second,
                i64::from(self.second) * 1000 + i64::from(self.millis),
            ),
        ]
    }

    fn merged(p: Precision) -> Precision {
        if p == Precision::Millisecond {
            Precision::Second
        } else {
            p
        }
    }

    /// Whether the two values are of comparable kinds (Date and DateTime mix).
    pub fn comparable_kind(&self, other: &Temporal) -> bool {
        match (self.kind, other.kind) {
            (TemporalKind::Time, TemporalKind::Time) => true,
            (TemporalKind::Time, _) | (_, TemporalKind::Time) => false,
            _ => true,
        }
    }

    /// FHIRPath comparison: `None` when the result is uncertain because the
    /// precisions differ (or only one side has a timezone).
    pub fn compare(&self, other: &Temporal) -> Option<Ordering> {
        if !self.comparable_kind(other) {
            return None;
        }
        let (mut a, mut b) = (*self, *other);
        if a.precision >= Precision::Hour && b.precision >= Precision::Hour {
            match (a.tz, b.tz) {
                (Some(_), Some(_)) => {
                    a = a.to_utc();
                    b = b.to_utc();
                }
                (None, None) => {}
                _ => return None,
            }
        }
        let pa = Self::merged(a.precision);
        let pb = Self::merged(b.precision);
        let (la, lb) = (a.levels(), b.levels());
        let start = if a.kind == TemporalKind::Time { 3 } else { 0 };
        for i in start..6 {
            let p = la[i].0;
            if p > pa || p > pb {
                break;
            }
            match la[i].1.cmp(&lb[i].1) {
                Ordering::Equal => {}
                o => return Some(o),
            }
        }
        if pa == pb {
            Some(Ordering::Equal)
        } else {
            None
        }
    }

    /// Equivalence: different precisions are simply not equivalent.
    pub fn equivalent(&self, other: &Temporal) -> bool {
        if Self::merged(self.precision) != Self::merged(other.precision) {
            return false;
        }
        self.compare(other) == Some(Ordering::Equal)
    }

    /// Add `amount` calendar units (negative to subtract).
    pub fn add(&self, amount: i64, unit: CalendarUnit) -> Option<Self> {
        let mut t = *self;
        match unit {
            CalendarUnit::Year | CalendarUnit::Month => {
                if t.kind == TemporalKind::Time {
                    return None;
                }
                let months = if unit == CalendarUnit::Year {
                    amount.checked_mul(12)?
                } else {
                    amount
                };
                let total = i64::from(t.year) * 12 + i64::from(t.month) - 1 + months;
                t.year = i32::try_from(total.div_euclid(12)).ok()?;
                t.month = (total.rem_euclid(12) + 1) as u8;
                t.day = t.day.min(days_in_month(t.year, t.month));
            }
            CalendarUnit::Week | CalendarUnit::Day => {
                if t.kind == TemporalKind::Time {
                    return None;
                }
                let days = if unit == CalendarUnit::Week {
                    amount.checked_mul(7)?
                } else {
                    amount
                };
                let ms = t.epoch_ms().checked_add(days.checked_mul(MS_PER_DAY)?)?;
                t.set_epoch_ms(ms);
            }
            _ => {
                let per = match unit {
                    CalendarUnit::Hour => 3_600_000,
                    CalendarUnit::Minute => 60_000,
                    CalendarUnit::Second => 1000,
                    _ => 1,
                };
                let delta = amount.checked_mul(per)?;
                if t.kind == TemporalKind::Date {
                    // Sub-day quantities move a date only by whole days.
                    let days = delta / MS_PER_DAY;
                    let ms = t.epoch_ms().checked_add(days.checked_mul(MS_PER_DAY)?)?;
                    t.set_epoch_ms(ms);
                } else if t.kind == TemporalKind::Time {
                    let day_ms = i64::from(t.hour) * 3_600_000
                        + i64::from(t.minute) * 60_000
                        + i64::from(t.second) * 1000
                        + i64::from(t.millis);
                    let v = (day_ms + delta).rem_euclid(MS_PER_DAY);
                    t.hour = (v / 3_600_000) as u8;
                    t.minute = (v / 60_000 % 60) as u8;
                    t.second = (v / 1000 % 60) as u8;
                    t.millis = (v % 1000) as u16;
                } else {
                    let ms = t.epoch_ms().checked_add(delta)?;
                    t.set_epoch_ms(ms);
                }
            }
        }
        (t.kind == TemporalKind::Time || (1..=9999).contains(&t.year)).then_some(t)
    }

    /// The earliest (`high == false`) or latest instant this value may stand for,
    /// at the given number of digits (FHIRPath `lowBoundary`/`highBoundary`).
    pub fn boundary(&self, digits: Option<u32>, high: bool) -> Option<Self> {
        // FHIR has no hour-precision dateTime: `T08` stands for `T08:00`, so
        // its boundaries vary the seconds, not the minutes (the HL7 suite's rule).
        let mut own = *self;
        if own.kind == TemporalKind::DateTime && own.precision == Precision::Hour {
            own.minute = 0;
            own.precision = Precision::Minute;
        }
        let this = &own;
        let mut t = own;
        let target = match (this.kind, digits) {
            (TemporalKind::Time, None) => Precision::Millisecond,
            (TemporalKind::Time, Some(d)) => match d {
                2 => Precision::Hour,
                4 => Precision::Minute,
                6 => Precision::Second,
                9 => Precision::Millisecond,
                _ => return None,
            },
            (TemporalKind::Date, None) => Precision::Day,
            (_, None) => Precision::Millisecond,
            (kind, Some(d)) => match d {
                4 => Precision::Year,
                6 => Precision::Month,
                8 => Precision::Day,
                10 if kind == TemporalKind::DateTime => Precision::Hour,
                12 if kind == TemporalKind::DateTime => Precision::Minute,
                14 if kind == TemporalKind::DateTime => Precision::Second,
                17 if kind == TemporalKind::DateTime => Precision::Millisecond,
                _ => return None,
            },
        };
        if target > this.precision {
            if this.precision < Precision::Month {
                t.month = if high { 12 } else { 1 };
            }
            if this.precision < Precision::Day {
                t.day = if high {
                    days_in_month(t.year, t.month)
                } else {
                    1
                };
            }
            if this.precision < Precision::Hour {
                t.hour = if high { 23 } else { 0 };
            }
            if this.precision < Precision::Minute {
                t.minute = if high { 59 } else { 0 };
            }
            if this.precision < Precision::Second {
                t.second = if high { 59 } else { 0 };
            }
            if this.precision < Precision::Millisecond {
                t.millis = if high { 999 } else { 0 };
            }
            if target >= Precision::Hour && t.kind == TemporalKind::DateTime && t.tz.is_none() {
                t.tz = Some(if high { -12 * 60 } else { 14 * 60 });
            }
        }
        t.precision = target;
        t.frac_digits = if target == Precision::Millisecond {
            3
        } else {
            0
        };
        Some(t)
    }

    fn fmt_time(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}", self.hour)?;
        if self.precision >= Precision::Minute {
            write!(f, ":{:02}", self.minute)?;
        }
        if self.precision >= Precision::Second {
            write!(f, ":{:02}", self.second)?;
        }
        if self.precision == Precision::Millisecond {
            write!(f, ".{:03}", self.millis)?;
        }
        Ok(())
    }
}

/// The FHIR/ISO text form (`2015-02-04T14:34:28.123+09:00`, `14:30`), without `@`.
impl fmt::Display for Temporal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind == TemporalKind::Time {
            return self.fmt_time(f);
        }
        write!(f, "{:04}", self.year)?;
        if self.precision >= Precision::Month {
            write!(f, "-{:02}", self.month)?;
        }
        if self.precision >= Precision::Day {
            write!(f, "-{:02}", self.day)?;
        }
        if self.kind == TemporalKind::DateTime && self.precision >= Precision::Hour {
            f.write_str("T")?;
            self.fmt_time(f)?;
            match self.tz {
                Some(0) => f.write_str("Z")?,
                Some(off) => {
                    let sign = if off < 0 { '-' } else { '+' };
                    let a = off.unsigned_abs();
                    write!(f, "{sign}{:02}:{:02}", a / 60, a % 60)?;
                }
                None => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dt(s: &str) -> Temporal {
        Temporal::parse_literal(s).expect(s)
    }

    #[test]
    fn precision_comparison_is_empty_when_precisions_differ() {
        assert_eq!(dt("2018-03").compare(&dt("2018-03-01")), None);
        assert_eq!(
            dt("2018-03-01T10:30").compare(&dt("2018-03-01T10:30:00")),
            None
        );
        assert_eq!(
            dt("2018-03-01T10:30:00").compare(&dt("2018-03-01T10:30:00.0")),
            Some(Ordering::Equal)
        );
        assert_eq!(
            dt("2018-02").compare(&dt("2018-03-01")),
            Some(Ordering::Less)
        );
    }

    #[test]
    fn timezones_normalize() {
        let a = dt("2017-11-05T01:30:00.0-04:00");
        let b = dt("2017-11-05T00:30:00.0-05:00");
        assert_eq!(a.compare(&b), Some(Ordering::Equal));
        assert_eq!(
            dt("2012-04-15T15:00:00Z").compare(&dt("2012-04-15T10:00:00")),
            None
        );
    }

    #[test]
    fn calendar_arithmetic() {
        assert_eq!(
            dt("1973-12-25")
                .add(1, CalendarUnit::Month)
                .map(|t| t.to_string()),
            Some("1974-01-25".into())
        );
        assert_eq!(
            dt("2020-01-31")
                .add(1, CalendarUnit::Month)
                .map(|t| t.to_string()),
            Some("2020-02-29".into())
        );
        assert_eq!(
            dt("1973-12-25")
                .add(7, CalendarUnit::Day)
                .map(|t| t.to_string()),
            Some("1974-01-01".into())
        );
        assert_eq!(
            dt("1973-12-25T00:00:00.000+10:00")
                .add(1, CalendarUnit::Hour)
                .map(|t| t.to_string()),
            Some("1973-12-25T01:00:00.000+10:00".into())
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "2015",
            "2015-02",
            "2015-02-04",
            "2015-02-04T14:34:28.123+09:00",
            "2015-02-04T14:34Z",
        ] {
            assert_eq!(dt(s).to_string(), s);
        }
        assert_eq!(
            Temporal::parse_time("14:30").map(|t| t.to_string()),
            Some("14:30".into())
        );
        assert!(Temporal::parse_date("2015-02-30").is_none());
    }
}
