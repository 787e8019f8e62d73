//! Clustering: a streaming k-way merge of a view's sorted files into files
//! whose key ranges do not overlap.
//!
//! A build sorts rows by (patient key, resource key) in bounded chunks, so
//! each file is sorted but every file spans every patient. One patient's
//! rows then sit in one row group of *every* file. Merging the chunks (each
//! already sorted, so no sort and bounded memory: one batch per input file)
//! puts each patient in one place, which is what a single-patient read
//! prunes to with file statistics, row-group statistics and the page index.
//!
//! Runs before the view's commit, on files no snapshot references yet, so a
//! crash leaves only unreferenced files (the next build or a vacuum drops
//! them) and the table state never changes half way.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::compute::interleave_record_batch;
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, Rows, SortField};
use deltalake::kernel::Add;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
#[allow(deprecated)]
use parquet::arrow::async_reader::{ParquetObjectReader, ParquetRecordBatchStream};

use crate::ViewStoreError;

/// Rows per merged output batch (and per input batch read).
const BATCH_ROWS: usize = 8192;

fn arrow_err(view: &str) -> impl Fn(arrow::error::ArrowError) -> ViewStoreError + '_ {
    move |source| ViewStoreError::Arrow {
        view: view.to_owned(),
        source,
    }
}

fn delta_err(view: &str) -> impl Fn(deltalake::DeltaTableError) -> ViewStoreError + '_ {
    move |source| ViewStoreError::Delta {
        table: view.to_owned(),
        source: Box::new(source),
    }
}

/// One sorted input file being merged.
struct Cursor {
    #[allow(deprecated)]
    stream: ParquetRecordBatchStream<ParquetObjectReader>,
    file: String,
    /// The current batch's sort keys in row format (byte-comparable).
    rows: Option<Rows>,
    len: usize,
    pos: usize,
    /// Index of the current batch in the merge's `sources`.
    source: usize,
}

impl Cursor {
    /// Loads the next non-empty batch; `rows` is `None` at the end.
    async fn advance(
        &mut self,
        converter: &RowConverter,
        sort_columns: &[usize],
        sources: &mut Vec<RecordBatch>,
        view: &str,
    ) -> Result<(), ViewStoreError> {
        self.rows = None;
        while let Some(batch) = self.stream.next().await {
            let batch = batch.map_err(|e| ViewStoreError::Read {
                file: self.file.clone(),
                message: e.to_string(),
            })?;
            if batch.num_rows() == 0 {
                continue;
            }
            let cols: Vec<_> = sort_columns
                .iter()
                .map(|&i| batch.column(i).clone())
                .collect();
            self.rows = Some(converter.convert_columns(&cols).map_err(arrow_err(view))?);
            self.len = batch.num_rows();
            self.pos = 0;
            self.source = sources.len();
            sources.push(batch);
            return Ok(());
        }
        Ok(())
    }
}

/// Merges `files` (each sorted ascending, nulls first, by `sort_columns`)
/// into `writer`, starting a new file every `file_rows` rows, and deletes
/// the inputs. Returns the new files' Add actions and the rows written.
/// `view` names the view in errors.
pub(crate) async fn merge_sorted_files(
    store: Arc<dyn ObjectStore>,
    files: &[Add],
    schema: &SchemaRef,
    sort_columns: &[usize],
    writer: &mut RecordBatchWriter,
    file_rows: usize,
    view: &str,
) -> Result<(Vec<Add>, u64), ViewStoreError> {
    #[allow(deprecated)]
    use parquet::arrow::async_reader::ParquetRecordBatchStreamBuilder;
    let converter = RowConverter::new(
        sort_columns
            .iter()
            .map(|&i| SortField::new(schema.field(i).data_type().clone()))
            .collect(),
    )
    .map_err(arrow_err(view))?;
    let mut sources: Vec<RecordBatch> = Vec::new();
    let mut cursors = Vec::with_capacity(files.len());
    let mut paths = Vec::with_capacity(files.len());
    for add in files {
        let path = Path::from_url_path(&add.path).map_err(|source| ViewStoreError::Path {
            path: add.path.clone(),
            source,
        })?;
        #[allow(deprecated)]
        let reader =
            ParquetObjectReader::new(store.clone(), path.clone()).with_file_size(add.size as u64);
        let stream = ParquetRecordBatchStreamBuilder::new(reader)
            .await
            .and_then(|b| b.with_batch_size(BATCH_ROWS).build())
            .map_err(|e| ViewStoreError::Read {
                file: path.to_string(),
                message: e.to_string(),
            })?;
        let mut c = Cursor {
            stream,
            file: path.to_string(),
            rows: None,
            len: 0,
            pos: 0,
            source: 0,
        };
        c.advance(&converter, sort_columns, &mut sources, view)
            .await?;
        cursors.push(c);
        paths.push(path);
    }

    let mut adds = Vec::new();
    let mut written = 0u64;
    let mut in_file = 0usize;
    let out_rows = BATCH_ROWS.min(file_rows.max(1));
    let mut picks: Vec<(usize, usize)> = Vec::with_capacity(out_rows);
    loop {
        // The smallest head; ties go to the earlier file, so the merge is
        // stable. k is small (rows / file_rows), a linear scan beats a heap.
        let mut best: Option<usize> = None;
        for (i, c) in cursors.iter().enumerate() {
            let Some(rows) = &c.rows else { continue };
            let better = match best {
                None => true,
                Some(b) => {
                    let cb = &cursors[b];
                    cb.rows
                        .as_ref()
                        .is_some_and(|br| rows.row(c.pos) < br.row(cb.pos))
                }
            };
            if better {
                best = Some(i);
            }
        }
        let done = best.is_none();
        if let Some(b) = best {
            let c = &mut cursors[b];
            picks.push((c.source, c.pos));
            c.pos += 1;
            if c.pos == c.len {
                c.advance(&converter, sort_columns, &mut sources, view)
                    .await?;
            }
        }
        if picks.len() == out_rows || (done && !picks.is_empty()) {
            let refs: Vec<&RecordBatch> = sources.iter().collect();
            let batch = interleave_record_batch(&refs, &picks).map_err(arrow_err(view))?;
            picks.clear();
            // Keep only the batches the cursors still read from.
            let mut kept = Vec::new();
            for c in cursors.iter_mut().filter(|c| c.rows.is_some()) {
                kept.push(sources[c.source].clone());
                c.source = kept.len() - 1;
            }
            sources = kept;
            let n = batch.num_rows();
            writer.write(batch).await.map_err(delta_err(view))?;
            written += n as u64;
            in_file += n;
            if in_file >= file_rows {
                adds.extend(writer.flush().await.map_err(delta_err(view))?);
                in_file = 0;
            }
        }
        if done {
            break;
        }
    }
    adds.extend(writer.flush().await.map_err(delta_err(view))?);
    // The inputs were never committed; removing them is tidiness, not
    // correctness, so a failure here is logged and the build goes on.
    for p in paths {
        if let Err(e) = store.delete(&p).await {
            tracing::warn!(file = %p, error = %e, "could not remove a merged chunk file");
        }
    }
    Ok((adds, written))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    /// Writes `chunks` (each sorted) as separate files, merges them, and
    /// reads back the merged files: rows in global order, none lost, and
    /// file key ranges that do not overlap.
    #[tokio::test]
    async fn merge_gives_non_overlapping_files_in_global_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = url::Url::from_directory_path(dir.path()).expect("url");
        let schema = Arc::new(Schema::new(vec![
            Field::new("patient", DataType::Utf8, true),
            Field::new("id", DataType::Utf8, false),
            Field::new("n", DataType::Int64, false),
        ]));
        let table = deltalake::DeltaTable::try_from_url(url.clone())
            .await
            .expect("handle");
        let store = table.object_store();
        let mut writer =
            RecordBatchWriter::try_new(url.as_str(), schema.clone(), None, None).expect("writer");
        // Three sorted chunks over interleaved patients (nulls first).
        let mut inputs = Vec::new();
        let mut expected = Vec::new();
        for chunk in 0..3i64 {
            let mut rows: Vec<(Option<String>, String)> = (0..500i64)
                .map(|i| {
                    let p = if i % 97 == 0 {
                        None
                    } else {
                        Some(format!("p{:03}", (i * 7 + chunk) % 50))
                    };
                    (p, format!("r{chunk}-{i:04}"))
                })
                .collect();
            rows.sort();
            expected.extend(rows.iter().cloned());
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from_iter(rows.iter().map(|r| r.0.clone()))),
                    Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.1))),
                    Arc::new(Int64Array::from_iter_values(
                        (0..rows.len() as i64).map(|i| i + chunk * 1000),
                    )),
                ],
            )
            .expect("batch");
            writer.write(batch).await.expect("write");
            inputs.extend(writer.flush().await.expect("flush"));
        }
        expected.sort();
        assert_eq!(inputs.len(), 3);
        let (adds, written) = merge_sorted_files(
            store.clone(),
            &inputs,
            &schema,
            &[0, 1],
            &mut writer,
            600,
            "t",
        )
        .await
        .expect("merge");
        assert_eq!(written, 1500);
        assert_eq!(adds.len(), 3, "600-row files from 1,500 rows");
        let mut got = Vec::new();
        let mut ranges = Vec::new();
        for add in &adds {
            let path = Path::from_url_path(&add.path).expect("path");
            #[allow(deprecated)]
            let reader =
                ParquetObjectReader::new(store.clone(), path).with_file_size(add.size as u64);
            #[allow(deprecated)]
            let mut stream =
                parquet::arrow::async_reader::ParquetRecordBatchStreamBuilder::new(reader)
                    .await
                    .expect("open")
                    .build()
                    .expect("stream");
            let mut file_rows = Vec::new();
            while let Some(b) = stream.next().await {
                let b = b.expect("batch");
                let p = b
                    .column(0)
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .expect("p");
                let id = b
                    .column(1)
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .expect("id");
                for i in 0..b.num_rows() {
                    file_rows.push((
                        p.is_valid(i).then(|| p.value(i).to_owned()),
                        id.value(i).to_owned(),
                    ));
                }
            }
            ranges.push((file_rows.first().cloned(), file_rows.last().cloned()));
            got.extend(file_rows);
        }
        assert_eq!(got, expected, "global (patient, id) order, every row once");
        for w in ranges.windows(2) {
            assert!(w[0].1 <= w[1].0, "file ranges overlap: {w:?}");
        }
        for add in &inputs {
            let path = Path::from_url_path(&add.path).expect("path");
            assert!(
                store.head(&path).await.is_err(),
                "input chunk {path} left behind"
            );
        }
    }
}
