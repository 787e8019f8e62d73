//! FHIR R4 facts and pure functions that every other Atlas crate shares.
//!
//! Owns: the list of R4 resource types, resource keys, the version order that
//! decides which copy of a resource wins, FHIR instants, the patient
//! compartment key, and the byte-preserving reference rewriter used for
//! Bundles and `atlas synth scale`.
//!
//! May call: nothing but serde_json and a hash. No I/O, no async, no Arrow:
//! this crate builds in seconds and is safe to use from every layer.

pub mod instant;
pub mod references;
pub mod resource_types;
pub mod version;

pub use instant::{InstantError, is_fhir_date, parse_instant_micros};
pub use references::{ReferenceTarget, RewriteError, rewrite_references};
pub use resource_types::{R4_RESOURCE_TYPES, is_resource_type};
pub use version::{Decision, VersionStamp, content_hash, parse_etag};

/// The FHIR version every stored row carries today (`fhir_version` column).
pub const FHIR_VERSION_R4: &str = "R4";

/// True when `id` is a valid FHIR id: 1 to 64 characters of `[A-Za-z0-9\-.]`.
pub fn is_valid_id(id: &str) -> bool {
    // A table lookup per byte: this runs for every resource ingested.
    static ID_BYTE: [bool; 256] = {
        let mut t = [false; 256];
        let mut b = 0;
        while b < 256 {
            let c = b as u8;
            t[b] = c.is_ascii_alphanumeric() || c == b'-' || c == b'.';
            b += 1;
        }
        t
    };
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| ID_BYTE[b as usize])
}

/// Splits a relative literal reference `Type/id` (optionally `Type/id/_history/v`)
/// into its type and id. Returns `None` for anything else (absolute URLs,
/// contained `#x`, `urn:` references, conditional references).
pub fn split_relative_reference(reference: &str) -> Option<(&str, &str)> {
    let mut parts = reference.split('/');
    let ty = parts.next()?;
    let id = parts.next()?;
    match (parts.next(), parts.next(), parts.next()) {
        (None, None, None) => {}
        (Some("_history"), Some(_), None) => {}
        _ => return None,
    }
    (is_resource_type(ty) && is_valid_id(id)).then_some((ty, id))
}

/// True when `name` has the shape of a FHIR resource type name: an ASCII
/// capital, then ASCII letters. Used to find the `Type/id` pair in a URL;
/// whether the type exists in R4 is [`is_resource_type`]'s question.
pub fn is_type_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_uppercase()) && bytes.all(|b| b.is_ascii_alphabetic())
}

/// The path segments of a RESTful URL: relative (`Type/id`, `/Type/id`) or
/// absolute (`http(s)://host/any/base/Type/id`, the host and base dropped).
/// The bool says whether the URL was absolute.
fn url_segments(url: &str) -> Option<(bool, Vec<&str>)> {
    let absolute = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    match absolute {
        Some(rest) => {
            let (host, path) = rest.split_once('/')?;
            if host.is_empty() {
                return None;
            }
            Some((true, path.split('/').collect()))
        }
        None => Some((
            false,
            url.strip_prefix('/').unwrap_or(url).split('/').collect(),
        )),
    }
}

/// The `Type/id` a RESTful URL names: `Type/id`, `/Type/id` or
/// `http(s)://host/any/base/Type/id`, each optionally followed by
/// `/_history/vid` (which still names `Type/id`). A relative URL must be
/// exactly that; an absolute one gives its last `Type/id` pair. `Type` is
/// only checked for its shape ([`is_type_name`]) so that callers can tell an
/// unknown type from a URL that is no resource URL at all; `id` must be a
/// valid FHIR id. Query strings and fragments are not accepted.
pub fn split_resource_url(url: &str) -> Option<(&str, &str)> {
    let (absolute, mut segments) = url_segments(url)?;
    if segments.len() >= 4
        && segments[segments.len() - 2] == "_history"
        && is_valid_id(segments[segments.len() - 1])
    {
        segments.truncate(segments.len() - 2);
    }
    if !absolute && segments.len() != 2 {
        return None;
    }
    let [.., ty, id] = segments[..] else {
        return None;
    };
    (is_type_name(ty) && is_valid_id(id)).then_some((ty, id))
}

/// The type a type-level URL names (the part of a conditional URL before
/// `?`): `Type`, `/Type` or `http(s)://host/any/base/Type`. Only the shape
/// of the name is checked, as in [`split_resource_url`].
pub fn split_type_url(url: &str) -> Option<&str> {
    let (absolute, segments) = url_segments(url)?;
    if !absolute && segments.len() != 1 {
        return None;
    }
    let ty = *segments.last()?;
    is_type_name(ty).then_some(ty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_urls() {
        for (url, want) in [
            ("Patient/42", Some(("Patient", "42"))),
            ("/Patient/42", Some(("Patient", "42"))),
            ("Patient/42/_history/3", Some(("Patient", "42"))),
            ("/Patient/42/_history/3", Some(("Patient", "42"))),
            ("http://h/Patient/42", Some(("Patient", "42"))),
            (
                "https://fhir.example.org:8443/r4/base/Patient/a-1.b",
                Some(("Patient", "a-1.b")),
            ),
            (
                "https://h/fhir/R4/Observation/o1/_history/12",
                Some(("Observation", "o1")),
            ),
            // Shape only: the caller tells unknown types apart.
            ("Patinet/42", Some(("Patinet", "42"))),
            ("https://h/Patinet/42", Some(("Patinet", "42"))),
            ("patient/42", None),
            ("R4/42", None),
            ("Patient", None),
            ("Patient/", None),
            ("Patient/a b", None),
            ("Patient/42/x", None),
            ("base/Patient/42", None),
            ("Patient/42/_history", None),
            ("Patient/42/_history/", None),
            ("Patient/42?x=1", None),
            ("https://h/Patient/42/", None),
            ("https://h/Patient/_history", None),
            ("https:///Patient/42", None),
            ("https://h", None),
            ("urn:uuid:1234", None),
            ("ftp://h/Patient/42", None),
            ("", None),
        ] {
            assert_eq!(split_resource_url(url), want, "{url}");
        }
    }

    #[test]
    fn type_urls() {
        assert_eq!(split_type_url("Patient"), Some("Patient"));
        assert_eq!(split_type_url("/Patient"), Some("Patient"));
        assert_eq!(split_type_url("https://h/base/Patient"), Some("Patient"));
        assert_eq!(split_type_url("base/Patient"), None);
        assert_eq!(split_type_url("Patient/1"), None);
        assert_eq!(split_type_url("https://h/Patient/1"), None);
        assert_eq!(split_type_url(""), None);
        assert!(is_type_name("MedicationRequest"));
        assert!(!is_type_name("medicationRequest"));
        assert!(!is_type_name("R4"));
        assert!(!is_type_name(""));
    }

    #[test]
    fn ids() {
        assert!(is_valid_id("abc-123.X"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id(&"x".repeat(65)));
    }

    #[test]
    fn relative_references() {
        assert_eq!(
            split_relative_reference("Patient/42"),
            Some(("Patient", "42"))
        );
        assert_eq!(
            split_relative_reference("Patient/42/_history/3"),
            Some(("Patient", "42"))
        );
        assert_eq!(split_relative_reference("Nope/42"), None);
        assert_eq!(split_relative_reference("urn:uuid:1234"), None);
        assert_eq!(split_relative_reference("Patient/42/x"), None);
    }
}
