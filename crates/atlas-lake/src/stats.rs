//! `atlas stats`: what the lake holds, in a stable JSON shape scripts rely on.

use std::collections::BTreeMap;

use arrow::array::{Array, Int64Array, StringArray};
use serde::Serialize;

use crate::lake::{BATCHES, Lake, LakeError, QUARANTINE, RESOURCES};

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct TypeCounts {
    pub live: i64,
    pub deleted: i64,
}

/// One completed batch as `stats` reports it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BatchSummary {
    pub batch_id: String,
    pub source: String,
    pub started_at: String,
    pub finished_at: String,
    pub lines_read: i64,
    pub stored: i64,
    pub unchanged: i64,
    /// Lines older than the stored copy, kept out (the `batches` table's
    /// `superseded` column).
    pub older_than_stored: i64,
    pub quarantined: i64,
    pub skipped: i64,
    pub deleted: i64,
    pub outcome: String,
    /// Deprecated: the same number as `older_than_stored`, under its old
    /// name, for scripts written against earlier versions.
    pub superseded: i64,
}

/// The `atlas stats --json` document.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Stats {
    pub resources: BTreeMap<String, TypeCounts>,
    pub quarantine: BTreeMap<String, i64>,
    pub batches: Vec<BatchSummary>,
}

fn strings(b: &arrow::record_batch::RecordBatch, i: usize) -> Result<StringArray, LakeError> {
    crate::lake::text_column(b, i)
}

fn ints(b: &arrow::record_batch::RecordBatch, i: usize) -> Result<&Int64Array, LakeError> {
    b.column(i)
        .as_any()
        .downcast_ref::<Int64Array>()
        .ok_or_else(|| LakeError::ColumnType {
            column: i.to_string(),
            expected: "an integer",
        })
}

/// Reads the lake's counts.
pub async fn stats(lake: &Lake) -> Result<Stats, LakeError> {
    let mut out = Stats::default();
    if lake.has_table(RESOURCES).await? {
        let q = "SELECT resource_type, CAST(SUM(CASE WHEN deleted THEN 0 ELSE 1 END) AS BIGINT), \
                 CAST(SUM(CASE WHEN deleted THEN 1 ELSE 0 END) AS BIGINT) FROM resources GROUP BY resource_type";
        for b in lake.query(q).await? {
            let (t, l, d) = (strings(&b, 0)?, ints(&b, 1)?, ints(&b, 2)?);
            for r in 0..b.num_rows() {
                out.resources.insert(
                    t.value(r).to_owned(),
                    TypeCounts {
                        live: l.value(r),
                        deleted: d.value(r),
                    },
                );
            }
        }
    }
    if lake.has_table(QUARANTINE).await? {
        for b in lake
            .query("SELECT reason, COUNT(*) FROM quarantine GROUP BY reason")
            .await?
        {
            let (t, n) = (strings(&b, 0)?, ints(&b, 1)?);
            for r in 0..b.num_rows() {
                out.quarantine.insert(t.value(r).to_owned(), n.value(r));
            }
        }
    }
    if lake.has_table(BATCHES).await? {
        let q = "SELECT batch_id, source, CAST(started_at AS VARCHAR) AS started, CAST(finished_at AS VARCHAR) AS finished, lines_read, stored, \
                 unchanged, superseded, quarantined, skipped, deleted, outcome FROM batches ORDER BY started_at, batch_id";
        for b in lake.query(q).await? {
            for r in 0..b.num_rows() {
                let s = |i| {
                    strings(&b, i).map(|a| {
                        if a.is_null(r) {
                            String::new()
                        } else {
                            a.value(r).to_owned()
                        }
                    })
                };
                let n = |i| ints(&b, i).map(|a| a.value(r));
                out.batches.push(BatchSummary {
                    batch_id: s(0)?,
                    source: s(1)?,
                    started_at: s(2)?,
                    finished_at: s(3)?,
                    lines_read: n(4)?,
                    stored: n(5)?,
                    unchanged: n(6)?,
                    older_than_stored: n(7)?,
                    superseded: n(7)?,
                    quarantined: n(8)?,
                    skipped: n(9)?,
                    deleted: n(10)?,
                    outcome: s(11)?,
                });
            }
        }
    }
    Ok(out)
}
