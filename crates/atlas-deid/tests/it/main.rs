//! Integration tests of `atlas-deid`: the upstream anonymizer's functional
//! test pairs (read from `../shared/conformance/anonymizer`), and the
//! Safe-Harbor-minimal profile on the 615-patient Synthea data (from
//! `../shared/data/fhir`). Both say so and fail under CI when the data is
//! missing.

mod conformance;
mod safe_harbor;

use std::path::{Path, PathBuf};

/// `../shared` seen from this crate, if present.
pub fn shared() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared");
    p.is_dir().then(|| p.canonicalize().ok()).flatten()
}

/// Reports missing shared data: a failure under CI, a note otherwise.
pub fn missing(what: &str) {
    let msg = format!("MISSING: {what}; the test did not run");
    eprintln!("{msg}");
    assert!(std::env::var("CI").is_err(), "{msg}");
}
