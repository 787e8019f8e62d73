//! `atlas views flatten`: several ViewDefinitions over NDJSON files straight
//! to one Parquet file per view, without a lake. Each line is parsed once
//! (exact decimals) and appended by every view over its resource type,
//! through an `atlas_views::ViewSet` (projected parse and compiled fast
//! paths, the full evaluator where those cannot decide).
//!
//! Threads: one reader (file blocks cut at line ends, gunzip), one
//! evaluation worker per core, one Parquet writer; bounded channels keep
//! memory independent of input size. Rows come out in block order per
//! worker, not input order.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use arrow::record_batch::RecordBatch;
use atlas_views::{Appended, CompiledView, RowBuilder, ViewSet, ViewSetState};
use atlas_viewstore::{ViewEntry, ViewOrigin};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

/// A named, compiled view.
pub struct FlattenView {
    pub name: String,
    pub plan: Arc<CompiledView>,
}

/// What a flatten run did.
#[derive(Debug, Default, serde::Serialize)]
pub struct FlattenReport {
    pub files: usize,
    pub bytes: u64,
    pub lines: u64,
    /// Lines whose resource type no view reads.
    pub other_types: u64,
    /// Lines that are not JSON objects with a resourceType (first ones in `first_errors`).
    pub rejected: u64,
    /// Resources a view could not evaluate (their rows are missing).
    pub eval_errors: u64,
    pub first_errors: Vec<String>,
    pub rows: HashMap<String, u64>,
    /// Resources evaluated on the projected fast path only / with the full evaluator.
    pub fast_resources: u64,
    pub full_resources: u64,
    pub seconds: f64,
}

struct Block {
    file: Arc<str>,
    first_line: u64,
    bytes: Vec<u8>,
}

const BLOCK_BYTES: usize = 4 << 20;
const FLUSH_ROWS: usize = 32 * 1024;
const MAX_ERRORS: usize = 10;

/// `atlas views flatten`: the views (`--view` files, or the built-in
/// ones), a progress bar over the input bytes, then the report.
pub fn run(
    inputs: &[PathBuf],
    out: &Path,
    view_files: &[PathBuf],
    json: bool,
    show: bool,
) -> Result<()> {
    let views = if view_files.is_empty() {
        builtin_views()?
    } else {
        view_files
            .iter()
            .map(|f| user_view(f))
            .collect::<Result<Vec<_>>>()?
    };
    let files = ndjson_files(inputs)?;
    // Gzip inputs are left out of the bar's length: the counter moves by
    // decompressed bytes, which their file size does not predict.
    let total: u64 = files
        .iter()
        .filter(|f| !f.to_string_lossy().ends_with(".gz"))
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let done = Arc::new(AtomicU64::new(0));
    let bar = crate::progress::FlattenBar::start(done.clone(), total, show);
    let report = flatten(&files, views, out, done);
    bar.finish();
    let report = report?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, out);
    }
    Ok(())
}

fn builtin_views() -> Result<Vec<FlattenView>> {
    let mut views = Vec::new();
    for b in atlas_ontology::builtin_views() {
        let entry = ViewEntry::from_json(b.json, ViewOrigin::Builtin, Some(b.name))?;
        views.push(FlattenView {
            name: entry.name,
            plan: entry.plan,
        });
    }
    Ok(views)
}

/// A `--view` file: named by its `name`, or else by its file name
/// (`blood-pressure.json` becomes `blood_pressure`).
fn user_view(f: &Path) -> Result<FlattenView> {
    let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
    let stem = f
        .file_stem()
        .map(|s| {
            s.to_string_lossy()
                .to_lowercase()
                .replace(['-', '.', ' '], "_")
        })
        .unwrap_or_else(|| "view".into());
    let entry = ViewEntry::from_json(&text, ViewOrigin::User, None)
        .or_else(|_| ViewEntry::from_json(&text, ViewOrigin::User, Some(&stem)))
        .with_context(|| format!("{}", f.display()))?;
    Ok(FlattenView {
        name: entry.name,
        plan: entry.plan,
    })
}

fn print_report(report: &FlattenReport, out: &Path) {
    let mut names: Vec<_> = report.rows.iter().collect();
    names.sort();
    for (name, rows) in names {
        println!(
            "{name:<24} {rows:>10} rows  -> {}",
            out.join(format!("{name}.parquet")).display()
        );
    }
    println!(
        "{} lines from {} file(s), {:.1} MB in {:.2} s ({:.1} MB/s); {} of other types, {} rejected, {} evaluation errors",
        report.lines,
        report.files,
        report.bytes as f64 / 1e6,
        report.seconds,
        report.bytes as f64 / 1e6 / report.seconds.max(1e-9),
        report.other_types,
        report.rejected,
        report.eval_errors
    );
    for e in &report.first_errors {
        eprintln!("  {e}");
    }
}

/// Expands folders (recursively) into their `.ndjson` / `.ndjson.gz` files.
pub fn ndjson_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            entries.sort();
            for e in entries {
                if e.is_dir() || is_ndjson(&e) {
                    walk(&e, out)?;
                }
            }
        } else if is_ndjson(p) {
            out.push(p.to_owned());
        } else if !p.exists() {
            bail!("{}: no such file or folder", p.display());
        } else {
            bail!(
                "{}: only .ndjson and .ndjson.gz files are flattened here (use `atlas ingest` for Bundles)",
                p.display()
            );
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        walk(p, &mut out)?;
    }
    Ok(out)
}

fn is_ndjson(p: &Path) -> bool {
    let n = p.to_string_lossy();
    n.ends_with(".ndjson") || n.ends_with(".ndjson.gz")
}

pub fn flatten(
    files: &[PathBuf],
    views: Vec<FlattenView>,
    out_dir: &Path,
    progress: Arc<AtomicU64>,
) -> Result<FlattenReport> {
    let started = Instant::now();
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let set = Arc::new(ViewSet::new(views.iter().map(|v| v.plan.clone()).collect()));
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (block_tx, block_rx) = sync_channel::<Block>(workers * 2);
    let block_rx = Arc::new(std::sync::Mutex::new(block_rx));
    let (row_tx, row_rx) = sync_channel::<(usize, RecordBatch)>(workers * 4);
    let (free_tx, free_rx) = sync_channel::<Vec<u8>>(workers * 2 + 2);

    // Writer: one Parquet file per view.
    let mut writers = Vec::new();
    for v in &views {
        let path = out_dir.join(format!("{}.parquet", v.name));
        let file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).unwrap_or_default()))
            .build();
        writers.push(ArrowWriter::try_new(file, v.plan.schema(), Some(props))?);
    }
    let writer = std::thread::spawn(
        move || -> Result<(Vec<u64>, Vec<ArrowWriter<std::fs::File>>)> {
            let mut rows = vec![0u64; writers.len()];
            for (i, batch) in row_rx {
                rows[i] += batch.num_rows() as u64;
                writers[i].write(&batch)?;
            }
            Ok((rows, writers))
        },
    );

    // Workers: parse once, append to every view of the resource's type.
    let mut handles = Vec::new();
    for _ in 0..workers {
        let rx = block_rx.clone();
        let tx = row_tx.clone();
        let set = set.clone();
        let progress = progress.clone();
        let free = free_tx.clone();
        handles.push(std::thread::spawn(move || {
            work(&rx, &tx, &free, &set, &progress)
        }));
    }
    drop(row_tx);

    let mut report = FlattenReport {
        files: files.len(),
        ..Default::default()
    };
    let read = read_blocks(files, &block_tx, &free_rx);
    drop(block_tx);
    let mut stats = Vec::new();
    for h in handles {
        stats.push(
            h.join()
                .map_err(|_| anyhow::anyhow!("a flatten worker panicked"))??,
        );
    }
    let (rows, writers) = writer
        .join()
        .map_err(|_| anyhow::anyhow!("the Parquet writer panicked"))??;
    for w in writers {
        w.close()?;
    }
    report.bytes = read?;
    for s in stats {
        report.lines += s.lines;
        report.other_types += s.other_types;
        report.rejected += s.rejected;
        report.eval_errors += s.eval_errors;
        report.fast_resources += s.fast_resources;
        report.full_resources += s.full_resources;
        for e in s.first_errors {
            if report.first_errors.len() < MAX_ERRORS {
                report.first_errors.push(e);
            }
        }
    }
    for (v, n) in views.iter().zip(rows) {
        report.rows.insert(v.name.clone(), n);
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Reads files into line-aligned blocks (read straight into the block, the
/// partial last line carried into the next one); returns the bytes read.
fn read_blocks(files: &[PathBuf], tx: &SyncSender<Block>, free: &Receiver<Vec<u8>>) -> Result<u64> {
    let mut total = 0u64;
    for f in files {
        let name: Arc<str> = f.display().to_string().into();
        let raw = std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?;
        let mut reader: Box<dyn Read> = if f.to_string_lossy().ends_with(".gz") {
            Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(raw)))
        } else {
            Box::new(raw)
        };
        let mut line_no = 1u64;
        let mut carry: Vec<u8> = Vec::new();
        let mut eof = false;
        while !eof {
            // Reuse a buffer the workers are done with (fresh pages cost faults).
            let mut bytes = free
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(BLOCK_BYTES + (64 << 10)));
            bytes.clear();
            bytes.append(&mut carry);
            // Fill the block; a line longer than a block makes it grow.
            loop {
                let want = (BLOCK_BYTES.saturating_sub(bytes.len())).max(64 << 10);
                let n = (&mut reader)
                    .take(want as u64)
                    .read_to_end(&mut bytes)
                    .with_context(|| format!("reading {}", f.display()))?;
                if n == 0 {
                    eof = true;
                    break;
                }
                if bytes.len() >= BLOCK_BYTES && memchr::memrchr(b'\n', &bytes).is_some() {
                    break;
                }
            }
            if !eof && let Some(cut) = memchr::memrchr(b'\n', &bytes) {
                carry.extend_from_slice(&bytes[cut + 1..]);
                bytes.truncate(cut + 1);
            }
            if bytes.is_empty() {
                continue;
            }
            total += bytes.len() as u64;
            let lines = memchr::memchr_iter(b'\n', &bytes).count() as u64;
            let block = Block {
                file: name.clone(),
                first_line: line_no,
                bytes,
            };
            line_no += lines;
            if tx.send(block).is_err() {
                bail!("flatten workers stopped early");
            }
        }
    }
    Ok(total)
}

#[derive(Default)]
struct WorkStats {
    fast_resources: u64,
    full_resources: u64,
    lines: u64,
    other_types: u64,
    rejected: u64,
    eval_errors: u64,
    first_errors: Vec<String>,
}

fn work(
    rx: &std::sync::Mutex<Receiver<Block>>,
    tx: &SyncSender<(usize, RecordBatch)>,
    free: &SyncSender<Vec<u8>>,
    set: &ViewSet,
    progress: &AtomicU64,
) -> Result<WorkStats> {
    let mut builders: Vec<RowBuilder> = set.row_builders();
    let mut state = ViewSetState::new();
    let mut s = WorkStats::default();
    fn note(s: &mut WorkStats, msg: String) {
        if s.first_errors.len() < MAX_ERRORS {
            s.first_errors.push(msg);
        }
    }
    loop {
        let block = match rx.lock() {
            Ok(guard) => match guard.recv() {
                Ok(b) => b,
                Err(_) => break,
            },
            Err(_) => bail!("block queue poisoned"),
        };
        let mut line_no = block.first_line;
        let mut from = 0;
        while from < block.bytes.len() {
            let to = memchr::memchr(b'\n', &block.bytes[from..])
                .map_or(block.bytes.len(), |i| from + i + 1);
            let line = &block.bytes[from..to];
            from = to;
            let this_line = line_no;
            line_no += 1;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            s.lines += 1;
            let text = match std::str::from_utf8(line) {
                Ok(t) => t,
                Err(e) => {
                    s.rejected += 1;
                    note(
                        &mut s,
                        format!("{}:{this_line}: invalid UTF-8: {e}", block.file),
                    );
                    continue;
                }
            };
            let mut errors = Vec::new();
            match set.append(text, &mut state, &mut builders, |v, e| errors.push((v, e))) {
                Appended::Done => {}
                Appended::NotJson(e) => {
                    s.rejected += 1;
                    note(&mut s, format!("{}:{this_line}: {e}", block.file));
                    continue;
                }
                Appended::NoResourceType => {
                    s.rejected += 1;
                    note(
                        &mut s,
                        format!("{}:{this_line}: no resourceType", block.file),
                    );
                    continue;
                }
                Appended::OtherType => {
                    s.other_types += 1;
                    continue;
                }
            }
            for (_, e) in errors {
                s.eval_errors += 1;
                note(&mut s, format!("{}:{this_line}: {e}", block.file));
            }
            for (v, b) in builders.iter_mut().enumerate() {
                if b.len() >= FLUSH_ROWS {
                    let batch = b.finish()?;
                    if tx.send((v, batch)).is_err() {
                        bail!("the Parquet writer stopped early");
                    }
                }
            }
        }
        progress.fetch_add(block.bytes.len() as u64, Ordering::Relaxed);
        // Full or reader gone: drop it.
        let _ = free.try_send(block.bytes);
    }
    for (v, b) in builders.iter_mut().enumerate() {
        if !b.is_empty() {
            let batch = b.finish()?;
            if tx.send((v, batch)).is_err() {
                bail!("the Parquet writer stopped early");
            }
        }
    }
    s.fast_resources = state.fast_resources;
    s.full_resources = state.full_resources;
    Ok(s)
}
