//! Integration tests of the connectors.
//!
//! * `spec`: the specifications' own examples from `../shared/conformance`
//!   (the SMART worked RS384 assertion, reproduced byte for byte; the Bulk
//!   Data IG's manifests of every version). Missing shared data fails under
//!   CI and is reported otherwise.
//! * `mock`: the clients against `atlas-mockehr` and its fault timeline:
//!   no resource lost, duplicated or corrupted, counts that reconcile.
//! * `ledger`: every client-side SHALL/SHOULD in `docs/connectors-ledger.md`
//!   names a test that exists.

mod ledger;
mod mock;
mod spec;
mod wire;

use std::path::{Path, PathBuf};

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
