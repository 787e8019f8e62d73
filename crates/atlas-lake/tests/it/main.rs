//! Integration tests of the lake: ingest through the real Delta tables on a
//! temporary folder (and on S3 through a local moto server when available).

mod ingest;
mod s3;

use std::path::{Path, PathBuf};

use atlas_ingest::collect_inputs;
use atlas_lake::{BatchReport, IngestOptions, Lake, Progress};

pub fn write(dir: &Path, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&p, content).unwrap();
    p
}

pub async fn ingest_with(lake: &Lake, paths: &[&Path], opts: &IngestOptions) -> BatchReport {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let set = collect_inputs(&names, &mut std::io::empty()).unwrap();
    let report = atlas_lake::ingest(lake, &set.inputs, opts, &Progress::default())
        .await
        .unwrap();
    assert!(report.outcomes.reconciles(), "{:?}", report.outcomes);
    report
}

pub async fn ingest(lake: &Lake, paths: &[&Path]) -> BatchReport {
    ingest_with(lake, paths, &IngestOptions::default()).await
}

pub fn local_lake(dir: &Path) -> Lake {
    Lake::open(dir.join("lake").to_str().unwrap(), Default::default()).unwrap()
}

/// All rows of a query as strings, for comparisons.
pub async fn rows(lake: &Lake, sql: &str) -> Vec<String> {
    let batches = lake.query(sql).await.unwrap();
    let mut out = Vec::new();
    for b in &batches {
        let cols: Vec<_> = (0..b.num_columns())
            .map(|i| arrow::compute::cast(b.column(i), &arrow::datatypes::DataType::Utf8).unwrap())
            .collect();
        for r in 0..b.num_rows() {
            let vals: Vec<String> = cols
                .iter()
                .map(|c| {
                    let a = c
                        .as_any()
                        .downcast_ref::<arrow::array::StringArray>()
                        .unwrap();
                    if arrow::array::Array::is_null(a, r) {
                        "NULL".to_owned()
                    } else {
                        a.value(r).to_owned()
                    }
                })
                .collect();
            out.push(vals.join("|"));
        }
    }
    out
}
