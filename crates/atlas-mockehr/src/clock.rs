//! The mock's logical clock: instants are microseconds since the Unix
//! epoch, written as FHIR instants with milliseconds. Runs start at
//! 2026-01-01T00:00:00Z and move only when the data changes, so two runs
//! with the same seed and the same calls give the same instants.

/// 2026-01-01T00:00:00Z in microseconds.
pub(crate) const START_MICROS: i64 = 1_767_225_600_000_000;

/// `micros` as a FHIR instant, e.g. `2026-01-01T00:00:00.000Z`.
pub(crate) fn format_instant(micros: i64) -> String {
    match chrono::DateTime::from_timestamp_micros(micros) {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        // Out of chrono's range: cannot happen for a clock that starts in
        // 2026 and moves by at most a second per write.
        None => format!("{micros}us"),
    }
}

/// A FHIR instant, dateTime or date as microseconds; `None` when it is not one.
pub(crate) fn parse_instant(text: &str) -> Option<i64> {
    atlas_fhir::parse_instant_micros(text.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        assert_eq!(format_instant(START_MICROS), "2026-01-01T00:00:00.000Z");
        assert_eq!(parse_instant("2026-01-01T00:00:00Z"), Some(START_MICROS));
        assert_eq!(parse_instant("2026-01-01"), Some(START_MICROS));
        assert_eq!(parse_instant("soon"), None);
    }
}
