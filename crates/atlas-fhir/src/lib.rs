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
pub use version::{Decision, VersionStamp, content_hash};

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

#[cfg(test)]
mod tests {
    use super::*;

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
