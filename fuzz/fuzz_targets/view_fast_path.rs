//! Differential target for the view fast path: arbitrary text as one
//! resource, run through an `atlas_views::ViewSet` with the fast path (a
//! projected tape + compiled paths) and without it (the full evaluator).
//! The outcome (done / not JSON / no resourceType / other type), the errors
//! and every row must be identical; any difference panics.
#![no_main]

use std::sync::{Arc, LazyLock};

use atlas_views::{CompiledView, ViewSet, ViewSetState};
use libfuzzer_sys::fuzz_target;

/// Views in the fast subset over Observation (value[x], references,
/// iif/exists, forEach over components, round) and Encounter.
static VIEWS: LazyLock<Vec<Arc<CompiledView>>> = LazyLock::new(|| {
    let views = [
        serde_json::json!({"resource": "Observation", "select": [
            {"column": [
                {"name": "id", "path": "getResourceKey()"},
                {"name": "patient", "path": "subject.getReferenceKey(Patient)"},
                {"name": "status", "path": "status"},
                {"name": "code", "path": "code.coding.first().code"},
                {"name": "display", "path": "iif(code.coding.first().display.exists(), code.coding.first().display, code.text)"},
                {"name": "value", "path": "value.ofType(Quantity).value.round(18)", "type": "decimal"},
                {"name": "raw", "path": "value.ofType(Quantity).value", "type": "decimal"},
                {"name": "flag", "path": "value.ofType(boolean)"},
                {"name": "codes", "path": "category.coding.code", "collection": true}]},
            {"forEach": "component", "column": [
                {"name": "i", "path": "%rowIndex"},
                {"name": "c", "path": "code.coding.first().code"},
                {"name": "s", "path": "value.ofType(string)"}]}]}),
        serde_json::json!({"resource": "Encounter", "select": [{"column": [
            {"name": "id", "path": "getResourceKey()"},
            {"name": "start", "path": "period.start"},
            {"name": "who", "path": "participant.individual.getReferenceKey().first()"}]}]}),
    ];
    views
        .iter()
        .filter_map(|v| CompiledView::from_json(v).ok())
        .map(Arc::new)
        .collect()
});

fuzz_target!(|data: &[u8]| {
    if data.len() > 8192 {
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let fast = ViewSet::with_fast_path(VIEWS.clone(), true);
    let full = ViewSet::with_fast_path(VIEWS.clone(), false);
    let (mut bf, mut bs) = (fast.row_builders(), full.row_builders());
    let (mut ef, mut es) = (Vec::new(), Vec::new());
    let of = fast.append(text, &mut ViewSetState::new(), &mut bf, |v, e| {
        ef.push((v, e.to_string()))
    });
    let os = full.append(text, &mut ViewSetState::new(), &mut bs, |v, e| {
        es.push((v, e.to_string()))
    });
    assert_eq!(format!("{of:?}"), format!("{os:?}"), "outcome");
    assert_eq!(ef, es, "errors");
    for (a, b) in bf.iter_mut().zip(bs.iter_mut()) {
        let (a, b) = (a.finish().ok(), b.finish().ok());
        assert_eq!(a, b, "rows");
    }
});
