//! Which copy of a resource wins when two arrive with the same `(type, id)`.
//!
//! The order is `meta.versionId` (numeric when both are integers, else text),
//! then `meta.lastUpdated` (as an instant), then the content hash; a missing
//! value sorts below a present one. The order is total (a key comparison), and the last
//! step makes the order total, so the winner never depends on arrival order:
//! ingesting A then B converges to the same store as B then A.

use std::cmp::Ordering;

/// The version facts of one resource copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionStamp {
    pub version_id: Option<String>,
    /// `meta.lastUpdated` in UTC microseconds.
    pub last_updated: Option<i64>,
    pub content_hash: u128,
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
    /// Orders two copies: `Greater` means `self` is the newer one.
    pub fn newer_than(&self, other: &Self) -> Ordering {
        let by_version = match (&self.version_id, &other.version_id) {
            (Some(a), Some(b)) => cmp_version_ids(a, b),
            (a, b) => a.is_some().cmp(&b.is_some()),
        };
        // Option's order puts a missing value below any present one.
        let by_time = self.last_updated.cmp(&other.last_updated);
        by_version
            .then(by_time)
            .then(self.content_hash.cmp(&other.content_hash))
    }
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
    fn version_then_time_then_hash() {
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
            stamp(None, None, 3).newer_than(&stamp(None, None, 2)),
            Ordering::Greater
        );
        assert_eq!(
            stamp(Some("b"), None, 0).newer_than(&stamp(Some("a"), None, 1)),
            Ordering::Greater
        );
        assert_eq!(
            stamp(None, None, 2).newer_than(&stamp(None, None, 2)),
            Ordering::Equal
        );
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
            .prop_map(|(v, t, h)| VersionStamp {
                version_id: v,
                last_updated: t,
                content_hash: h,
            })
    }

    proptest! {
        #[test]
        fn antisymmetric(a in arb_stamp(), b in arb_stamp()) {
            prop_assert_eq!(a.newer_than(&b), b.newer_than(&a).reverse());
        }

        #[test]
        fn winner_is_independent_of_arrival_order(mut v in proptest::collection::vec(arb_stamp(), 1..8)) {
            // Fold left-to-right keeping the newer copy, as ingest does; then reversed.
            let fold = |xs: &[VersionStamp]| {
                xs.iter().skip(1).fold(xs[0].clone(), |best, x| {
                    if x.newer_than(&best) == Ordering::Greater { x.clone() } else { best }
                })
            };
            let forward = fold(&v);
            v.reverse();
            let backward = fold(&v);
            prop_assert_eq!(forward.newer_than(&backward), Ordering::Equal);
        }
    }
}
