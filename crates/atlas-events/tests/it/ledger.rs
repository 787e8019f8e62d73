//! `docs/events-ledger.md` names, for every must-do line of the brief's
//! FHIRcast and Subscriptions lists and every requirement of the events
//! issue, the tests that cover it: each named test must exist.

use std::path::Path;

#[test]
fn every_events_ledger_row_names_tests_that_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let ledger = std::fs::read_to_string(root.join("docs/events-ledger.md")).unwrap();
    let mut rows = 0;
    let mut problems = Vec::new();
    for (n, line) in ledger.lines().enumerate() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // `| id | source | requirement | tests |` rows, header and rule skipped.
        if cells.len() != 6 || cells[1] == "id" || cells[1].starts_with("---") {
            continue;
        }
        rows += 1;
        let tests: Vec<&str> = cells[4].split('`').skip(1).step_by(2).collect();
        if tests.is_empty() {
            problems.push(format!("line {}: {} names no test", n + 1, cells[1]));
        }
        for t in tests {
            let Some((file, func)) = t.rsplit_once("::") else {
                problems.push(format!("line {}: {t:?} is not path::function", n + 1));
                continue;
            };
            let text = std::fs::read_to_string(root.join(file)).unwrap_or_default();
            if !text.contains(&format!("fn {func}(")) {
                problems.push(format!("line {}: {file} has no fn {func}", n + 1));
            }
        }
    }
    assert!(rows >= 30, "the ledger has {rows} rows");
    assert!(
        problems.is_empty(),
        "ledger problems:\n{}",
        problems.join("\n")
    );
}
