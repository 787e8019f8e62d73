//! Parse the input as JSON; compile it as a ViewDefinition and, when it
//! compiles, run it over a small Patient and Observation. Errors are fine; a
//! panic (or a hang) is a bug.
#![no_main]

use std::sync::LazyLock;

use atlas_views::CompiledView;
use libfuzzer_sys::fuzz_target;
use serde_json::Value as Json;

#[path = "fixtures.rs"]
mod fixtures;

/// `ATLAS_FUZZ_VERBOSE=1`: print why an input was rejected, or the rows it
/// produced (useful when replaying a single seed or artifact).
static VERBOSE: LazyLock<bool> = LazyLock::new(|| std::env::var_os("ATLAS_FUZZ_VERBOSE").is_some());

static RESOURCES: LazyLock<[Json; 2]> =
    LazyLock::new(|| [fixtures::patient(), fixtures::observation()]);

fuzz_target!(|data: &[u8]| {
    if data.len() > 16 * 1024 {
        return;
    }
    let json = match serde_json::from_slice::<Json>(data) {
        Ok(json) => json,
        Err(e) => {
            if *VERBOSE {
                eprintln!("not JSON: {e}");
            }
            return;
        }
    };
    let view = match CompiledView::from_json(&json) {
        Ok(view) => view,
        Err(d) => {
            if *VERBOSE {
                eprintln!("invalid view:\n{}", atlas_views::render_diagnostics(&d));
            }
            return;
        }
    };
    let _ = view.schema();
    // Resources of another type are skipped or rejected by the plan; either is fine.
    let all = view.run(RESOURCES.iter());
    if *VERBOSE {
        match &all {
            Ok(batch) => eprintln!(
                "{} rows: {:?}",
                batch.num_rows(),
                atlas_views::batch_to_json_rows(batch)
            ),
            Err(e) => eprintln!("run error: {e}"),
        }
    }
    for r in RESOURCES.iter() {
        let _ = view.run([r]);
    }
});
