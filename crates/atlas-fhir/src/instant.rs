//! FHIR `instant` / `dateTime` parsing to microseconds since the Unix epoch (UTC).
//!
//! Hand-written rather than via chrono because this is on the ingest hot path
//! and FHIR's grammar is small: `YYYY(-MM(-DD(Thh:mm(:ss(.f+)?)?(Z|±hh:mm))?)?)?`.
//! Partial dates resolve to the start of the period, in UTC.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("not a FHIR instant or dateTime: {0}")]
pub struct InstantError(pub String);

fn digits(s: &[u8], at: usize, n: usize) -> Option<i64> {
    let part = s.get(at..at + n)?;
    let mut v = 0i64;
    for &b in part {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + i64::from(b - b'0');
    }
    Some(v)
}

/// Days since 1970-01-01 for a proleptic Gregorian civil date (H. Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date `(year, month, day)` of a day number (inverse of [`days_from_civil`]).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Parses a FHIR `instant`, `dateTime` or `date` to UTC microseconds since the epoch.
pub fn parse_instant_micros(text: &str) -> Result<i64, InstantError> {
    parse(text.as_bytes()).ok_or_else(|| InstantError(text.chars().take(64).collect()))
}

fn parse(s: &[u8]) -> Option<i64> {
    let year = digits(s, 0, 4)?;
    let (mut month, mut day) = (1, 1);
    let mut pos = 4;
    if s.len() > pos {
        if s[pos] != b'-' {
            return None;
        }
        month = digits(s, pos + 1, 2)?;
        pos += 3;
        if s.len() > pos {
            if s[pos] != b'-' {
                return None;
            }
            day = digits(s, pos + 1, 2)?;
            pos += 3;
        }
    }
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let mut micros = days_from_civil(year, month, day) * 86_400_000_000;
    if pos == s.len() {
        return Some(micros);
    }
    if s[pos] != b'T' {
        return None;
    }
    let hour = digits(s, pos + 1, 2)?;
    if s.get(pos + 3) != Some(&b':') {
        return None;
    }
    let minute = digits(s, pos + 4, 2)?;
    pos += 6;
    let mut second = 0;
    if s.get(pos) == Some(&b':') {
        second = digits(s, pos + 1, 2)?;
        pos += 3;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    micros += ((hour * 60 + minute) * 60 + second) * 1_000_000;
    if s.get(pos) == Some(&b'.') {
        pos += 1;
        let start = pos;
        let mut frac = 0i64;
        let mut scale = 1_000_000i64;
        while let Some(b) = s.get(pos).filter(|b| b.is_ascii_digit()) {
            if scale > 1 {
                scale /= 10;
                frac += i64::from(b - b'0') * scale;
            }
            pos += 1;
        }
        if pos == start {
            return None;
        }
        micros += frac;
    }
    match s.get(pos) {
        Some(b'Z') if pos + 1 == s.len() => Some(micros),
        Some(&sign @ (b'+' | b'-')) if pos + 6 == s.len() && s[pos + 3] == b':' => {
            let oh = digits(s, pos + 1, 2)?;
            let om = digits(s, pos + 4, 2)?;
            if oh > 14 || om > 59 {
                return None;
            }
            let offset = (oh * 60 + om) * 60_000_000;
            Some(if sign == b'+' {
                micros - offset
            } else {
                micros + offset
            })
        }
        // FHIR dateTime allows a time only with a zone; be lenient and read it as UTC.
        None => Some(micros),
        _ => None,
    }
}

/// True when `text` is a FHIR `date` (`YYYY`, `YYYY-MM` or `YYYY-MM-DD`).
pub fn is_fhir_date(text: &str) -> bool {
    matches!(text.len(), 4 | 7 | 10) && parse(text.as_bytes()).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_and_offsets() {
        assert_eq!(parse_instant_micros("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_instant_micros("1970-01-01T01:00:00+01:00"), Ok(0));
        assert_eq!(
            parse_instant_micros("2019-05-31T16:32:57.123-04:00"),
            Ok(1_559_334_777_123_000)
        );
        assert_eq!(parse_instant_micros("2000-02-29"), Ok(951_782_400_000_000));
        assert_eq!(parse_instant_micros("1969-12-31T23:59:59Z"), Ok(-1_000_000));
    }

    #[test]
    fn rejects() {
        for bad in [
            "",
            "2019-13-01",
            "2019-02-30",
            "19",
            "2019-05-31T25:00:00Z",
            "2019-05-31X",
            "2019-05-31T10:00:00.Z",
            "abcd",
        ] {
            assert!(parse_instant_micros(bad).is_err(), "{bad}");
        }
        assert!(is_fhir_date("1987-04-02"));
        assert!(!is_fhir_date("1987-04-02T10:00:00Z"));
    }
}
