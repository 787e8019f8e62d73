//! Civil-calendar arithmetic and FHIR date/dateTime/instant formatting.
//!
//! Times are whole seconds since the Unix epoch (UTC). The generator only ever
//! needs UTC, so every dateTime is written with a `+00:00` offset and every
//! instant with `Z`.

/// Seconds in a day.
pub(crate) const DAY: i64 = 86_400;

pub(crate) use atlas_fhir::instant::{civil_from_days, days_from_civil};

fn push_digits(buf: &mut String, value: i64, width: usize) {
    let mut digits = [b'0'; 4];
    let mut v = value.unsigned_abs();
    for slot in digits[..width].iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        v /= 10;
    }
    for &d in &digits[..width] {
        buf.push(char::from(d));
    }
}

/// Appends `YYYY-MM-DD` for a day number (years 0000–9999).
pub(crate) fn push_date(buf: &mut String, day: i64) {
    let (y, m, d) = civil_from_days(day);
    push_digits(buf, y, 4);
    buf.push('-');
    push_digits(buf, i64::from(m), 2);
    buf.push('-');
    push_digits(buf, i64::from(d), 2);
}

fn push_date_time(buf: &mut String, secs: i64) {
    push_date(buf, secs.div_euclid(DAY));
    let tod = secs.rem_euclid(DAY);
    buf.push('T');
    push_digits(buf, tod / 3600, 2);
    buf.push(':');
    push_digits(buf, tod / 60 % 60, 2);
    buf.push(':');
    push_digits(buf, tod % 60, 2);
}

/// Appends a quoted FHIR dateTime, `"YYYY-MM-DDThh:mm:ss+00:00"`.
pub(crate) fn push_date_time_json(buf: &mut String, secs: i64) {
    buf.push('"');
    push_date_time(buf, secs);
    buf.push_str("+00:00\"");
}

/// Appends a quoted FHIR instant, `"YYYY-MM-DDThh:mm:ssZ"`.
pub(crate) fn push_instant_json(buf: &mut String, secs: i64) {
    buf.push('"');
    push_date_time(buf, secs);
    buf.push_str("Z\"");
}

/// Appends a quoted FHIR date, `"YYYY-MM-DD"`.
pub(crate) fn push_date_json(buf: &mut String, day: i64) {
    buf.push('"');
    push_date(buf, day);
    buf.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trip() {
        for day in (-800_000..3_000_000).step_by(997) {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, i64::from(m), i64::from(d)), day);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2026, 1, 1), 20_454);
    }

    #[test]
    fn formats_match_the_fhir_parser() {
        let secs = days_from_civil(2000, 2, 29) * DAY + 13 * 3600 + 5 * 60 + 9;
        let mut buf = String::new();
        push_date_time_json(&mut buf, secs);
        assert_eq!(buf, "\"2000-02-29T13:05:09+00:00\"");
        assert_eq!(
            atlas_fhir::parse_instant_micros(buf.trim_matches('"')),
            Ok(secs * 1_000_000)
        );
        buf.clear();
        push_instant_json(&mut buf, secs);
        assert_eq!(buf, "\"2000-02-29T13:05:09Z\"");
        buf.clear();
        push_date_json(&mut buf, days_from_civil(1907, 11, 3));
        assert_eq!(buf, "\"1907-11-03\"");
    }
}
