//! Date handling shared by `redact` and `dateShift`: partial dates (year
//! only), the over-89 rule, and the day offsets.

use chrono::{Datelike, Duration, NaiveDate};

/// The parts of a FHIR date or dateTime the rules need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DateParts<'a> {
    pub year: &'a str,
    pub month: Option<u32>,
    pub day: Option<u32>,
    /// `T…` through the zone, when a time with a zone follows the day.
    pub time: Option<&'a str>,
}

fn digits(s: &str, n: usize) -> Option<&str> {
    (s.len() >= n && s.as_bytes()[..n].iter().all(u8::is_ascii_digit)).then(|| &s[..n])
}

/// Reads `YYYY[-MM[-DD[Thh:mm:ss[.f+](Z|±hh:mm)]]]` from the start of `s`.
/// The time part is only taken with a zone, as FHIR requires (and as the
/// upstream tool's pattern does).
pub(crate) fn parse(s: &str, with_time: bool) -> Option<DateParts<'_>> {
    let year = digits(s, 4)?;
    if year == "0000" {
        return None;
    }
    let mut parts = DateParts {
        year,
        month: None,
        day: None,
        time: None,
    };
    let rest = &s[4..];
    let Some(m) = rest.strip_prefix('-').and_then(|r| digits(r, 2)) else {
        return Some(parts);
    };
    let month: u32 = m.parse().ok()?;
    if !(1..=12).contains(&month) {
        return Some(parts);
    }
    parts.month = Some(month);
    let rest = &rest[3..];
    let Some(d) = rest.strip_prefix('-').and_then(|r| digits(r, 2)) else {
        return Some(parts);
    };
    let day: u32 = d.parse().ok()?;
    if !(1..=31).contains(&day) {
        return Some(parts);
    }
    parts.day = Some(day);
    let rest = &rest[3..];
    if with_time && rest.starts_with('T') && time_with_zone(rest) {
        parts.time = Some(rest);
    }
    Some(parts)
}

fn time_with_zone(t: &str) -> bool {
    let b = t.as_bytes();
    // T hh:mm:ss
    if b.len() < 9 || b[3] != b':' || b[6] != b':' {
        return false;
    }
    if ![1, 2, 4, 5, 7, 8].iter().all(|i| b[*i].is_ascii_digit()) {
        return false;
    }
    let mut i = 9;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match b.get(i) {
        Some(b'Z') => i + 1 == b.len(),
        Some(b'+' | b'-') => {
            b.len() == i + 6
                && b[i + 3] == b':'
                && [1, 2, 4, 5].iter().all(|k| b[i + k].is_ascii_digit())
        }
        _ => false,
    }
}

/// Whether the date lies more than 89 years before today (HIPAA's "ages over 89").
pub(crate) fn over_89(p: &DateParts<'_>, today: NaiveDate) -> bool {
    let Ok(year) = p.year.parse::<i32>() else {
        return false;
    };
    let month = p.month.unwrap_or(1);
    let day = p.day.unwrap_or(1);
    let before_birthday = (today.month() < month) || (today.month() == month && today.day() < day);
    let age = today.year() - year - i32::from(before_birthday);
    age > 89
}

/// The upstream tool's offset: a fold of the UTF-8 bytes of prefix + key, in [-50, 50].
pub(crate) fn upstream_offset(prefix: &str, key: &str) -> i64 {
    let mut offset: i64 = 0;
    for b in prefix.bytes().chain(key.bytes()) {
        offset = (offset * 131 + i64::from(b)) % 101;
    }
    offset - 50
}

/// The patient-scope offset: from a keyed HMAC of the patient id, never zero,
/// 30 to 365 days either way (so no shifted date sits within a month of the
/// real one).
pub(crate) fn patient_offset(patient: &str, key: &ring::hmac::Key) -> i64 {
    let tag = ring::hmac::sign(key, format!("atlas-date-shift:{patient}").as_bytes());
    let b = tag.as_ref();
    let n = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    let magnitude = 30 + (n % 336) as i64;
    if b[8] & 1 == 0 { magnitude } else { -magnitude }
}

/// Shifts the date part by `days`; `None` when the date does not exist (2015-02-30).
pub(crate) fn shift(p: &DateParts<'_>, days: i64) -> Option<String> {
    let date = NaiveDate::from_ymd_opt(p.year.parse().ok()?, p.month?, p.day?)?;
    let shifted = date.checked_add_signed(Duration::days(days))?;
    let mut out = shifted.format("%Y-%m-%d").to_string();
    if let Some(time) = p.time {
        // The clock is zeroed (digits of hh:mm:ss[.f]), the zone kept.
        let zone_at = time
            .char_indices()
            .skip(1)
            .find(|(_, c)| matches!(c, 'Z' | '+' | '-'))
            .map_or(time.len(), |(i, _)| i);
        out.push('T');
        out.extend(
            time[1..zone_at]
                .chars()
                .map(|c| if c.is_ascii_digit() { '0' } else { c }),
        );
        out.push_str(&time[zone_at..]);
    }
    Some(out)
}

/// Shifts a year or year-month by `days` from its first day, keeping its precision.
pub(crate) fn shift_partial(p: &DateParts<'_>, days: i64) -> Option<String> {
    let month = p.month.unwrap_or(1);
    let date = NaiveDate::from_ymd_opt(p.year.parse().ok()?, month, 1)?;
    let shifted = date.checked_add_signed(Duration::days(days))?;
    Some(match p.month {
        Some(_) => shifted.format("%Y-%m").to_string(),
        None => shifted.format("%Y").to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_and_shift() {
        let p = parse("2000-01-01T01:01:01-01:00", true).unwrap();
        assert_eq!(p.time, Some("T01:01:01-01:00"));
        assert_eq!(shift(&p, 41).unwrap(), "2000-02-11T00:00:00-01:00");
        let p = parse("2015-02-07T13:28:17.239+02:00", true).unwrap();
        assert_eq!(shift(&p, -1).unwrap(), "2015-02-06T00:00:00.000+02:00");
        // A time without a zone is not a FHIR dateTime time: only the date shifts.
        let p = parse("2015-02-07T13:28:17", true).unwrap();
        assert_eq!(p.time, None);
        assert_eq!(parse("2002", false).unwrap().month, None);
        assert!(shift(&parse("2015-02-30", false).unwrap(), 1).is_none());
        assert_eq!(upstream_offset("example", "123"), 41);
        assert_eq!(
            shift_partial(&parse("2014", false).unwrap(), -73052).unwrap(),
            "1813"
        );
        assert_eq!(
            shift_partial(&parse("2014-03", false).unwrap(), -40).unwrap(),
            "2014-01"
        );
    }

    #[test]
    fn over_89_counts_birthdays() {
        let today = NaiveDate::from_ymd_opt(2026, 6, 15).unwrap();
        assert!(over_89(&parse("1936-06-14", false).unwrap(), today));
        assert!(!over_89(&parse("1936-06-16", false).unwrap(), today));
        assert!(!over_89(&parse("1937", false).unwrap(), today));
    }

    #[test]
    fn patient_offsets_are_never_small() {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"k");
        for i in 0..2000 {
            let o = patient_offset(&format!("p{i}"), &key);
            assert!((30..=365).contains(&o.abs()), "{o}");
        }
    }
}
