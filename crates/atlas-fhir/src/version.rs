//! Which copy of a resource wins when two arrive with the same `(type, id)`.
//!
//! The order is `meta.versionId` (numeric when both are integers, else text),
//! then `meta.lastUpdated` (as an instant); a missing value sorts below a
//! present one. When neither decides (equal, or missing on both sides, as in
//! Synthea NDJSON and most flat extracts), the copy that arrived later wins:
//! a later batch over an earlier one, and within a batch the later line.
//! The content never decides: a content hash as the last tie-break made the
//! winner of a correction arbitrary (issue 18, part 6).
//!
//! Replaying the same batches in the same order therefore gives the same
//! store; replaying them in another order may not, when versions tie.

use std::cmp::Ordering;

/// The version facts of one resource copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionStamp {
    pub version_id: Option<String>,
    /// `meta.lastUpdated` in UTC microseconds.
    pub last_updated: Option<i64>,
    pub content_hash: u128,
}

/// What to do with an incoming copy of a resource the store already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The incoming copy replaces the stored one.
    Replace,
    /// The same bytes are already stored.
    Unchanged,
    /// The stored copy is newer (higher `versionId` or `lastUpdated`, or,
    /// when those tie, it arrived later): the incoming copy is kept out and
    /// counted as `older_than_stored`.
    OlderThanStored,
}

/// A stable 128-bit hash of a resource's stored bytes.
pub fn content_hash(bytes: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(bytes)
}

fn cmp_version_ids(a: &str, b: &str) -> Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.len().cmp(&b.len()).then_with(|| a.cmp(b)),
    }
}

impl VersionStamp {
    /// Orders two copies by `meta.versionId`, then `meta.lastUpdated`:
    /// `Greater` means `self` is the newer one, `Equal` that the version
    /// metadata does not decide (the later arrival then wins, see
    /// [`VersionStamp::decide`]).
    pub fn newer_than(&self, other: &Self) -> Ordering {
        let by_version = match (&self.version_id, &other.version_id) {
            (Some(a), Some(b)) => cmp_version_ids(a, b),
            (a, b) => a.is_some().cmp(&b.is_some()),
        };
        // Option's order puts a missing value below any present one.
        by_version.then(self.last_updated.cmp(&other.last_updated))
    }

    /// Orders two copies by the version facts both carry: `meta.versionId`
    /// when both have one, then `meta.lastUpdated` when both have one;
    /// `Equal` when nothing shared decides.
    ///
    /// For deletions: a deletion's stamp comes from the server's response
    /// (`etag`, `lastModified`), which often carries only one of the two. By
    /// [`VersionStamp::newer_than`], where a missing value sorts below a
    /// present one, a deletion stamped only with `lastModified` would be
    /// older than every resource with a `versionId`, and would never apply.
    pub fn newer_on_shared_fields(&self, other: &Self) -> Ordering {
        let by_version = match (&self.version_id, &other.version_id) {
            (Some(a), Some(b)) => cmp_version_ids(a, b),
            _ => Ordering::Equal,
        };
        let by_time = match (self.last_updated, other.last_updated) {
            (Some(a), Some(b)) => a.cmp(&b),
            _ => Ordering::Equal,
        };
        by_version.then(by_time)
    }

    /// True when the copy carries a `versionId` or a `lastUpdated`.
    pub fn has_version_facts(&self) -> bool {
        self.version_id.is_some() || self.last_updated.is_some()
    }

    /// Decides between `self`, an incoming copy, and `stored`.
    /// `arrived_later` says whether `self` comes from a later batch than
    /// `stored` (or a later line of the same batch); it decides only when
    /// the version metadata ties.
    pub fn decide(&self, stored: &Self, arrived_later: bool) -> Decision {
        if self.content_hash == stored.content_hash {
            return Decision::Unchanged;
        }
        match self.newer_than(stored) {
            Ordering::Greater => Decision::Replace,
            Ordering::Less => Decision::OlderThanStored,
            Ordering::Equal if arrived_later => Decision::Replace,
            Ordering::Equal => Decision::OlderThanStored,
        }
    }
}

/// The version id an HTTP `ETag` carries: FHIR servers answer `W/"3"` for
/// version 3 (a weak validator); a strong `"3"` is read the same way.
/// Anything else, or a value that is not a FHIR id, is `None`: the etag is a
/// header echoed into Bundles and some servers and proxies mangle it, so a
/// garbled one is ignored rather than trusted.
pub fn parse_etag(etag: &str) -> Option<&str> {
    let etag = etag.trim();
    let quoted = etag.strip_prefix("W/").unwrap_or(etag);
    let version = quoted.strip_prefix('"')?.strip_suffix('"')?;
    crate::is_valid_id(version).then_some(version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stamp(v: Option<&str>, t: Option<i64>, h: u128) -> VersionStamp {
        VersionStamp {
            version_id: v.map(str::to_owned),
            last_updated: t,
            content_hash: h,
        }
    }

    #[test]
    fn version_then_time() {
        assert_eq!(
            stamp(Some("10"), Some(0), 0).newer_than(&stamp(Some("9"), Some(5), 9)),
            Ordering::Greater
        );
        assert_eq!(
            stamp(Some("2"), Some(5), 0).newer_than(&stamp(Some("2"), Some(4), 9)),
            Ordering::Greater
        );
        assert_eq!(
            stamp(None, Some(5), 0).newer_than(&stamp(Some("7"), Some(4), 9)),
            Ordering::Less
        );
        assert_eq!(
            stamp(None, Some(5), 0).newer_than(&stamp(None, None, 9)),
            Ordering::Greater
        );
        assert_eq!(
            stamp(Some("b"), None, 0).newer_than(&stamp(Some("a"), None, 1)),
            Ordering::Greater
        );
        // The content hash no longer decides anything.
        assert_eq!(
            stamp(None, None, 3).newer_than(&stamp(None, None, 2)),
            Ordering::Equal
        );
        assert_eq!(
            stamp(Some("4"), Some(7), 1).newer_than(&stamp(Some("4"), Some(7), 2)),
            Ordering::Equal
        );
    }

    /// Issue 18 part 6: a correction without version metadata used to lose
    /// whenever its content hash happened to be lower.
    #[test]
    fn ties_go_to_the_later_arrival_whatever_the_hashes() {
        for (old, new) in [(1u128, 2u128), (2, 1)] {
            let stored = stamp(None, None, old);
            let incoming = stamp(None, None, new);
            assert_eq!(incoming.decide(&stored, true), Decision::Replace);
            assert_eq!(incoming.decide(&stored, false), Decision::OlderThanStored);
            let stored = stamp(Some("3"), Some(10), old);
            let incoming = stamp(Some("3"), Some(10), new);
            assert_eq!(incoming.decide(&stored, true), Decision::Replace);
        }
        // Same bytes: unchanged, whichever came first.
        assert_eq!(
            stamp(None, None, 5).decide(&stamp(None, None, 5), true),
            Decision::Unchanged
        );
        // A lower versionId never wins, even arriving later.
        assert_eq!(
            stamp(Some("1"), Some(99), 1).decide(&stamp(Some("2"), Some(0), 2), true),
            Decision::OlderThanStored
        );
        assert_eq!(
            stamp(Some("2"), None, 1).decide(&stamp(Some("1"), None, 2), false),
            Decision::Replace
        );
    }

    #[test]
    fn etags() {
        assert_eq!(parse_etag(r#"W/"3""#), Some("3"));
        assert_eq!(parse_etag(r#" W/"12" "#), Some("12"));
        assert_eq!(parse_etag(r#""7""#), Some("7"));
        assert_eq!(parse_etag(r#"W/"a.b-1""#), Some("a.b-1"));
        for garbage in [
            "",
            "3",
            "W/3",
            r#"W/"""#,
            r#"W/"3"#,
            r#"w/"3""#,
            r#"W/"3 4""#,
            r#"W/"3"x"#,
            r#"W/"\"3\"""#,
            "\"",
        ] {
            assert_eq!(parse_etag(garbage), None, "{garbage}");
        }
        assert_eq!(parse_etag(&format!("W/\"{}\"", "9".repeat(65))), None);
    }

    #[test]
    fn shared_fields_only() {
        // A deletion stamped only with lastModified against a resource with
        // both: the times decide (by `newer_than` the versionId would).
        let del = stamp(None, Some(9), 0);
        let res = stamp(Some("4"), Some(5), 1);
        assert_eq!(del.newer_on_shared_fields(&res), Ordering::Greater);
        assert_eq!(del.newer_than(&res), Ordering::Less);
        assert_eq!(
            stamp(Some("3"), None, 0).newer_on_shared_fields(&stamp(Some("4"), Some(1), 1)),
            Ordering::Less
        );
        assert_eq!(
            stamp(Some("3"), Some(1), 0).newer_on_shared_fields(&stamp(Some("3"), Some(2), 1)),
            Ordering::Less
        );
        assert_eq!(
            stamp(Some("3"), None, 0).newer_on_shared_fields(&stamp(None, Some(2), 1)),
            Ordering::Equal
        );
        assert_eq!(
            stamp(None, None, 0).newer_on_shared_fields(&stamp(Some("1"), Some(2), 1)),
            Ordering::Equal
        );
        assert!(stamp(None, Some(1), 0).has_version_facts());
        assert!(!stamp(None, None, 5).has_version_facts());
    }

    fn arb_stamp() -> impl Strategy<Value = VersionStamp> {
        (
            proptest::option::of(prop_oneof![
                (0u64..20).prop_map(|v| v.to_string()),
                "[a-c]{1,2}"
            ]),
            proptest::option::of(0i64..5),
            0u128..4,
        )
            // The same bytes always carry the same metadata.
            .prop_map(|(v, t, h)| VersionStamp {
                content_hash: content_hash(format!("{v:?}{t:?}{h}").as_bytes()),
                version_id: v,
                last_updated: t,
            })
    }

    proptest! {
        #[test]
        fn antisymmetric(a in arb_stamp(), b in arb_stamp()) {
            prop_assert_eq!(a.newer_than(&b), b.newer_than(&a).reverse());
        }

        /// Folding arrivals in order, as ingest does: the kept copy has the
        /// highest (versionId, lastUpdated), and among copies tied on those,
        /// the bytes of the last one to arrive.
        #[test]
        fn newest_version_wins_and_ties_go_to_the_last_arrival(v in proptest::collection::vec(arb_stamp(), 1..8)) {
            let kept = v.iter().skip(1).fold(v[0].clone(), |stored, x| {
                match x.decide(&stored, true) {
                    Decision::Replace => x.clone(),
                    Decision::Unchanged | Decision::OlderThanStored => stored,
                }
            });
            for x in &v {
                prop_assert_ne!(x.newer_than(&kept), Ordering::Greater);
            }
            let last_tied = v.iter().rev().find(|x| x.newer_than(&kept) == Ordering::Equal);
            prop_assert_eq!(last_tied.map(|x| x.content_hash), Some(kept.content_hash));
        }
    }
}
