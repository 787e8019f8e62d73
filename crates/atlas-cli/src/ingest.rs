//! `atlas ingest`: land and store FHIR inputs, optionally de-identified
//! first (`--deid`), under the lake's writer lease.
//!
//! The work is `atlas-lake::ingest` (and `atlas-deid` for `--deid`); this
//! module turns flags into options and prints the batch's counts.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use atlas_ingest::{ClassifyOptions, ReadOptions, collect_inputs};
use atlas_lake::{BatchReport, IngestOptions, Lake, Progress, WriterLease, ingest};
use clap::Args;

use crate::cli::Globals;
use crate::{deid, lake, progress};

#[derive(Args)]
#[command(after_help = "Examples:
  atlas ingest Patient.ndjson.gz Observation.ndjson.gz
  atlas ingest --source ehr-east exports/2026-11-01/
  cat bundle.json | atlas ingest -
  atlas ingest --json bundles.tar.gz > report.json
  atlas ingest --wait exports/2026-11-02/    # another writer is busy: wait for it

Every line ends up stored, unchanged, older than stored, quarantined or skipped, and the run
prints that these add up. Running the same inputs again changes nothing.

Which copy of a resource wins: the higher meta.versionId, then meta.lastUpdated; when those
are equal or missing, the later batch (and within a batch, the later line). A copy older than
the stored one is kept out and counted as `older than stored`.

One writer at a time: a second `atlas ingest` (or `views refresh`) on the same lake fails at
once naming the running one, or with --wait waits for it.")]
pub struct IngestArgs {
    /// Files, folders or `-` (stdin).
    #[arg(required = true)]
    pub paths: Vec<String>,
    /// Source name, used in raw/<source>/... and in every row.
    #[arg(long, default_value = "files")]
    pub source: String,
    /// Mark every resource of this run synthetic (tagged ones always are).
    #[arg(long)]
    pub synthetic: bool,
    /// Longest accepted NDJSON line in bytes; longer lines are quarantined.
    #[arg(long, default_value_t = 64 << 20)]
    pub max_line_bytes: usize,
    /// Stored bytes per commit (bounds memory).
    #[arg(long, default_value_t = 48)]
    pub chunk_mb: usize,
    /// Print the batch manifest as JSON.
    #[arg(long)]
    pub json: bool,
    /// De-identify before anything is landed or stored, with a built-in profile
    /// (safe-harbor-minimal) or a Microsoft FHIR anonymizer configuration file:
    /// the lake (a de-identified zone) never holds the identified bytes.
    #[arg(long, value_name = "PROFILE|CONFIG")]
    pub deid: Option<String>,
    #[command(flatten)]
    pub deid_source: deid::DeidSource,
}

/// `atlas ingest`: takes the writer lease, ingests, releases it.
pub async fn run(args: IngestArgs, g: &Globals) -> Result<()> {
    let lake = lake::open_lake(&g.lake)?;
    let lease = progress::take_lease(&lake, g.wait, g.show).await?;
    let result = run_leased(&lake, &args, g.show, &lease).await;
    let report = lake::release(lease, result).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// Ingests under `lease`, the lake's writer lease (taken before the inputs
/// are even de-identified, so a second writer fails before doing any work);
/// shared with `atlas demo`.
pub async fn run_leased(
    lake: &Lake,
    args: &IngestArgs,
    show: bool,
    lease: &WriterLease,
) -> Result<BatchReport> {
    let started = Instant::now();
    // With --deid the inputs are de-identified into a private staging folder
    // first, and only that output is landed and stored. The folder lives
    // until the end of this function, that is until the batch is stored.
    let staging = match &args.deid {
        Some(spec) => Some(stage_deid(args, spec, show)?),
        None => None,
    };
    let paths = match &staging {
        Some((_, out)) => deidentified_files(out)?,
        None => args.paths.clone(),
    };
    let set = collect_inputs(&paths, &mut std::io::stdin().lock())?;
    let opts = options(args, lease);
    let progress = Arc::new(Progress::default());
    let bar = progress::IngestBar::start(progress.clone(), show);
    let result = ingest(lake, &set.inputs, &opts, &progress).await;
    bar.finish();
    let report = result?;
    print_report(&report, started.elapsed().as_secs_f64().max(1e-9));
    if !report.already_ingested && !report.outcomes.reconciles() {
        bail!("counts do not reconcile; this is a bug, please report it with the manifest");
    }
    Ok(report)
}

/// De-identifies the inputs into a fresh temporary folder; returns the
/// folder (deleted when dropped) and the output folder inside it.
fn stage_deid(
    args: &IngestArgs,
    spec: &str,
    show: bool,
) -> Result<(tempfile::TempDir, std::path::PathBuf)> {
    let engine = atlas_deid::Deidentifier::new(deid::load(spec, &args.deid_source)?)
        .with_change_records(false);
    let dir = tempfile::tempdir().context("creating the de-identification staging folder")?;
    let out = dir.path().join("deid");
    deid::run_stream(&engine, &args.paths, &out, false, show)?;
    Ok((dir, out))
}

/// The per-type NDJSON files `atlas deid` wrote into `out`, sorted (so the
/// batch id does not depend on directory order), without its own reports.
fn deidentified_files(out: &Path) -> Result<Vec<String>> {
    let mut files: Vec<String> = std::fs::read_dir(out)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.ends_with(".ndjson") && !matches!(name, "quarantine.ndjson" | "changes.ndjson")
        })
        .map(|p| p.display().to_string())
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("de-identification wrote no resources; nothing to ingest");
    }
    Ok(files)
}

fn options(args: &IngestArgs, lease: &WriterLease) -> IngestOptions {
    IngestOptions {
        source: args.source.clone(),
        read: ReadOptions {
            max_line_bytes: args.max_line_bytes,
            classify: ClassifyOptions {
                synthetic: args.synthetic,
            },
            ..ReadOptions::default()
        },
        chunk_bytes: args.chunk_mb.max(1) << 20,
        // The user's files: copied, never linked (they may change later).
        link_inputs: false,
        lease: Some(lease.clone()),
    }
}

/// The batch's counts on stderr (stdout is for `--json`).
pub(crate) fn print_report(report: &BatchReport, secs: f64) {
    let o = &report.outcomes;
    if report.already_ingested {
        eprintln!(
            "batch {} was already ingested ({} lines); nothing changed",
            report.batch_id, o.lines_read
        );
        return;
    }
    eprintln!(
        "batch {}: {} lines read = {} stored + {} unchanged + {} older than stored + {} quarantined + {} skipped{}",
        report.batch_id,
        o.lines_read,
        o.stored,
        o.unchanged,
        o.older_than_stored,
        o.quarantined,
        o.skipped,
        if o.reconciles() {
            " (reconciled)"
        } else {
            " (DOES NOT RECONCILE)"
        }
    );
    eprintln!(
        "  {:.1} MB in {:.1} s ({:.1} MB/s, {:.0} lines/s); {} deleted, {} unresolved references; raw bytes at {}",
        report.bytes as f64 / 1e6,
        secs,
        report.bytes as f64 / 1e6 / secs,
        o.lines_read as f64 / secs,
        o.deleted,
        o.unresolved_references,
        report.raw_path
    );
    print_warnings(report);
}

fn print_warnings(report: &BatchReport) {
    let o = &report.outcomes;
    if o.older_than_stored > 0 {
        eprintln!(
            "  {} resource(s) NOT applied: older than the stored copy (lower meta.versionId or meta.lastUpdated)",
            o.older_than_stored
        );
    }
    if !report.quarantine_by_reason.is_empty() {
        let parts: Vec<String> = report
            .quarantine_by_reason
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        eprintln!(
            "  quarantined: {} (see the quarantine table)",
            parts.join(", ")
        );
    }
}
