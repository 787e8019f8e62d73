//! Parse arbitrary UTF-8 as FHIRPath; when it parses, type-check it against
//! `Patient` and evaluate it on a small fixed Patient. Errors are fine; a panic
//! (or a hang) is a bug.
#![no_main]

use std::sync::LazyLock;

use atlas_fhirpath::{EvalContext, Expr};
use libfuzzer_sys::fuzz_target;
use serde_json::Value as Json;

#[path = "fixtures.rs"]
#[allow(dead_code)] // only the Patient is used here
mod fixtures;

/// `ATLAS_FUZZ_VERBOSE=1`: print the parse error, diagnostics and result
/// (useful when replaying a single seed or artifact).
static VERBOSE: LazyLock<bool> = LazyLock::new(|| std::env::var_os("ATLAS_FUZZ_VERBOSE").is_some());

static PATIENT: LazyLock<Json> = LazyLock::new(fixtures::patient);

fuzz_target!(|data: &[u8]| {
    if data.len() > 4096 {
        return;
    }
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let expr = match Expr::parse(source) {
        Ok(expr) => expr,
        Err(e) => {
            if *VERBOSE {
                eprintln!("parse error: {e}");
            }
            return;
        }
    };
    let diagnostics = expr.check("Patient");
    let ctx = EvalContext::new();
    let result = expr.evaluate(&PATIENT, &ctx).map(|out| out.to_json());
    if *VERBOSE {
        for d in &diagnostics {
            eprintln!("check: {d}");
        }
        match result {
            Ok(json) => eprintln!("result: {json}"),
            Err(e) => eprintln!("eval error: {e}"),
        }
    }
});
