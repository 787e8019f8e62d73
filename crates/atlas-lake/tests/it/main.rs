//! Integration tests of the lake: ingest through the real Delta tables on a
//! temporary folder (and on S3 through a local moto server when available).

mod changes;
mod history;
mod ingest;
mod lease;
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

/// All rows of a query as `a|b|c` strings (NULL as `NULL`), for comparisons.
pub async fn rows(lake: &Lake, sql: &str) -> Vec<String> {
    let rows = lake.query_text(sql).await.unwrap();
    rows.into_iter()
        .map(|r| {
            r.into_iter()
                .map(|v| v.unwrap_or_else(|| "NULL".into()))
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect()
}
