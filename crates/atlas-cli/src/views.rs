//! `atlas views ...` (materialized views), `atlas ontology show` and `atlas sql`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use arrow::record_batch::RecordBatch;
use atlas_lake::Lake;
use atlas_ontology::Ontology;
use atlas_viewstore::{RefreshOptions, RefreshReport, ViewStore};
use clap::{Subcommand, ValueEnum};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Subcommand)]
pub enum ViewsCommand {
    /// List the views: the built-in ones and those created with `views create`.
    #[command(after_help = "Example:\n  atlas views list --json")]
    List {
        #[arg(long)]
        json: bool,
    },
    /// Last refresh, rows, files and lag behind the resource store, per view.
    #[command(
        after_help = "Example:\n  atlas views status\n  atlas views status --json | jq '.[] | select(.lag_versions > 0) | .name'"
    )]
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Add a user view from a SQL-on-FHIR v2 ViewDefinition file; it is
    /// validated and compiled first and refused with diagnostics when invalid.
    #[command(after_help = "Example:
  atlas views create bp.json
  atlas views create --name bp_v2 --replace bp.json && atlas views refresh bp_v2")]
    Create {
        /// The ViewDefinition JSON file.
        file: PathBuf,
        /// The view's name (default: the definition's `name`).
        #[arg(long)]
        name: Option<String>,
        /// Replace an existing user view of that name (its table is rebuilt on refresh).
        #[arg(long)]
        replace: bool,
    },
    /// Bring views up to date with the resource store: only resources changed or
    /// deleted since each view's last refresh are re-derived, in one atomic
    /// commit per view; a new or changed view is built in full.
    #[command(after_help = "Examples:
  atlas views refresh                  # every view
  atlas views refresh patient observation
  atlas views refresh --full --json    # rebuild from scratch, print the reports
  atlas views refresh --wait           # an ingest is running: wait for it, then refresh

Refreshing writes the lake: it holds the lake's writer lease, so it fails at once naming
a running `atlas ingest` (or refresh), or with --wait waits for it.")]
    Refresh {
        /// Views to refresh (default: all).
        names: Vec<String>,
        /// Rebuild in full even when an incremental refresh is possible.
        #[arg(long)]
        full: bool,
        #[arg(long)]
        json: bool,
    },
    /// Remove a user view and its table.
    #[command(after_help = "Example:\n  atlas views drop bp")]
    Drop { name: String },
    /// Flatten NDJSON files through views straight to Parquet, one file per
    /// view, without a lake (each line parsed once, all cores; decimals exact).
    #[command(after_help = "Examples:
  atlas views flatten --out /tmp/flat data/*.ndjson.gz          # the six built-in views
  atlas views flatten --out /tmp/flat --view bp.json --view hr.json data/

Rows are written in the order workers finish blocks, not input order. Lines that
are not resources, or that a view cannot evaluate, are counted and the first ones shown.
resolve() finds contained resources only here (medication_request's display from a
Medication referenced by id needs the lake: `atlas ingest` then `atlas views refresh`).")]
    Flatten {
        /// .ndjson / .ndjson.gz files or folders.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Output folder: <view name>.parquet per view.
        #[arg(long)]
        out: PathBuf,
        /// ViewDefinition files (default: the built-in views). Repeatable.
        #[arg(long = "view")]
        views: Vec<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a view's definition JSON.
    #[command(after_help = "Example:\n  atlas views show patient > my_patient.json")]
    Show { name: String },
}

#[derive(Subcommand)]
pub enum OntologyCommand {
    /// Print the object types, their properties, links and saved object sets.
    #[command(
        after_help = "Example:\n  atlas ontology show\n  atlas ontology show --json | jq '.objectTypes[].apiName'"
    )]
    Show {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SqlFormat {
    Table,
    Csv,
    Json,
    Parquet,
}

fn open(lake: &str) -> Result<Lake> {
    Lake::open(lake, atlas_lake::lake::storage_options_from_env())
        .with_context(|| format!("opening the lake at {lake}"))
}

pub async fn run_views(cmd: ViewsCommand, lake: &str, show: bool, wait: bool) -> Result<()> {
    if let ViewsCommand::Flatten {
        inputs,
        out,
        views,
        json,
    } = cmd
    {
        return run_flatten(&inputs, &out, &views, json, show);
    }
    let store = ViewStore::new(open(lake)?);
    // Commands that write the lake hold its writer lease.
    let lease = match cmd {
        ViewsCommand::Create { .. } | ViewsCommand::Refresh { .. } | ViewsCommand::Drop { .. } => {
            Some(crate::progress::take_lease(store.lake(), wait, show).await?)
        }
        _ => None,
    };
    let result = run_store_command(cmd, &store, show, lease.clone()).await;
    if let Some(lease) = lease {
        let released = lease.release().await;
        result?;
        released.context("releasing the lake's writer lease")?;
        return Ok(());
    }
    result
}

async fn run_store_command(
    cmd: ViewsCommand,
    store: &ViewStore,
    show: bool,
    lease: Option<atlas_lake::WriterLease>,
) -> Result<()> {
    match cmd {
        ViewsCommand::Flatten { .. } => bail!("views flatten does not use the lake"),
        ViewsCommand::List { json } => {
            let views = store.list().await?;
            if json {
                let list: Vec<_> = views
                    .iter()
                    .map(|v| {
                        serde_json::json!({"name": v.name, "origin": v.origin,
                            "resource": v.resource_type, "hash": v.hash,
                            "key_column": v.key_column, "patient_column": v.patient_column,
                            "columns": v.plan.columns().iter().map(|c| &c.name).collect::<Vec<_>>()})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<24} {:<8} {:<18} columns", "view", "origin", "resource");
                for v in views {
                    println!(
                        "{:<24} {:<8} {:<18} {}",
                        v.name,
                        format!("{:?}", v.origin).to_lowercase(),
                        v.resource_type,
                        v.plan.columns().len()
                    );
                }
            }
        }
        ViewsCommand::Status { json } => {
            let status = store.status().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                println!(
                    "{:<24} {:>10} {:>6} {:>9} {:>7}  last refresh",
                    "view", "rows", "files", "at store", "lag"
                );
                for s in status {
                    let lag = match (s.materialized, s.lag_versions) {
                        (false, _) => "never built".to_owned(),
                        (true, None) => "rebuild".to_owned(),
                        (true, Some(l)) => l.to_string(),
                    };
                    println!(
                        "{:<24} {:>10} {:>6} {:>9} {:>7}  {}",
                        s.name,
                        s.rows,
                        s.files,
                        s.store_version.map(|v| v.to_string()).unwrap_or("-".into()),
                        lag,
                        s.last_refresh.unwrap_or_else(|| "-".into())
                    );
                }
            }
        }
        ViewsCommand::Create {
            file,
            name,
            replace,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let v = store
                .create(&text, name.as_deref(), replace)
                .await
                .with_context(|| format!("{}", file.display()))?;
            println!(
                "created view `{}` over {} ({} columns); build it with: atlas views refresh {}",
                v.name,
                v.resource_type,
                v.plan.columns().len(),
                v.name
            );
        }
        ViewsCommand::Refresh { names, full, json } => {
            let reports = refresh(store, &names, full, show, lease).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else {
                print_refresh(&reports);
            }
        }
        ViewsCommand::Drop { name } => {
            store.drop_view(&name).await?;
            println!("dropped view `{name}`");
        }
        ViewsCommand::Show { name } => {
            let v = store.get(&name).await?;
            println!("{}", serde_json::to_string_pretty(&v.definition)?);
        }
    }
    Ok(())
}

/// Refreshes with a progress bar under `lease` (the lake's writer lease;
/// taken by the view store when `None`); shared with `atlas demo`.
pub async fn refresh(
    store: &ViewStore,
    names: &[String],
    full: bool,
    show: bool,
    lease: Option<atlas_lake::WriterLease>,
) -> Result<Vec<RefreshReport>> {
    let bar = ProgressBar::with_draw_target(
        Some(0),
        if show {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    if let Ok(style) = ProgressStyle::with_template(
        "{msg:30} [{bar:30}] {human_pos}/{human_len} resources ({per_sec}, {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    let b = bar.clone();
    let opts = RefreshOptions {
        full,
        progress: Some(Arc::new(move |what: &str, done, total| {
            if b.length() != Some(total) {
                b.set_length(total);
                b.reset();
                b.set_message(what.to_owned());
            }
            b.set_position(done);
        })),
        lease,
        ..RefreshOptions::default()
    };
    let reports = store.refresh(names, &opts).await;
    bar.finish_and_clear();
    Ok(reports?)
}

pub fn print_refresh(reports: &[RefreshReport]) {
    println!(
        "{:<24} {:<12} {:>10} {:>10} {:>10} {:>7} {:>8}",
        "view", "refresh", "read", "written", "removed", "errors", "seconds"
    );
    for r in reports {
        println!(
            "{:<24} {:<12} {:>10} {:>10} {:>10} {:>7} {:>8.2}",
            r.name,
            serde_json::to_value(r.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            r.resources_read,
            r.rows_written,
            r.rows_removed,
            r.errors,
            r.seconds
        );
        for e in &r.first_errors {
            println!("    error: {e}");
        }
    }
}

pub fn run_ontology(cmd: OntologyCommand) -> Result<()> {
    let OntologyCommand::Show { json } = cmd;
    let ontology = Ontology::builtin();
    if json {
        println!("{}", serde_json::to_string_pretty(&ontology)?);
    } else {
        print!("{}", ontology.render_text());
    }
    Ok(())
}

pub async fn run_sql(
    lake: &str,
    query: &str,
    format: SqlFormat,
    out: Option<PathBuf>,
) -> Result<()> {
    let store = ViewStore::new(open(lake)?);
    let df = store.sql(query).await?;
    let schema: arrow::datatypes::SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let mut stream = df.execute_stream().await?;
    let mut writer: Box<dyn Write> = match &out {
        Some(p) if format != SqlFormat::Parquet => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        _ => Box::new(std::io::BufWriter::new(std::io::stdout())),
    };
    let mut rows = 0usize;
    match format {
        SqlFormat::Table => {
            let mut all: Vec<RecordBatch> = Vec::new();
            while let Some(b) = stream.next().await {
                let b = b?;
                rows += b.num_rows();
                all.push(b);
            }
            writeln!(
                writer,
                "{}",
                arrow::util::pretty::pretty_format_batches(&all)?
            )?;
            writeln!(writer, "{rows} row(s)")?;
        }
        SqlFormat::Csv => {
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(writer);
            while let Some(b) = stream.next().await {
                w.write(&b?)?;
            }
            writer = Box::new(w.into_inner());
        }
        SqlFormat::Json => {
            let mut w = arrow::json::LineDelimitedWriter::new(writer);
            while let Some(b) = stream.next().await {
                w.write(&b?)?;
            }
            w.finish()?;
            writer = Box::new(w.into_inner());
        }
        SqlFormat::Parquet => {
            let Some(path) = out else {
                bail!("--format parquet needs --out <file>");
            };
            let file = std::fs::File::create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            let mut w = parquet::arrow::ArrowWriter::try_new(file, schema, None)?;
            while let Some(b) = stream.next().await {
                let b = b?;
                rows += b.num_rows();
                w.write(&b)?;
            }
            w.close()?;
            eprintln!("wrote {rows} row(s) to {}", path.display());
        }
    }
    writer.flush()?;
    Ok(())
}

fn run_flatten(
    inputs: &[PathBuf],
    out: &std::path::Path,
    view_files: &[PathBuf],
    json: bool,
    show: bool,
) -> Result<()> {
    use crate::flatten::{FlattenView, flatten, ndjson_files};
    let mut views = Vec::new();
    if view_files.is_empty() {
        for b in atlas_ontology::builtin_views() {
            let entry = atlas_viewstore::ViewEntry::from_json(
                b.json,
                atlas_viewstore::ViewOrigin::Builtin,
                Some(b.name),
            )?;
            views.push(FlattenView {
                name: entry.name,
                plan: entry.plan,
            });
        }
    } else {
        for f in view_files {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let stem = f
                .file_stem()
                .map(|s| {
                    s.to_string_lossy()
                        .to_lowercase()
                        .replace(['-', '.', ' '], "_")
                })
                .unwrap_or_else(|| "view".into());
            let entry = atlas_viewstore::ViewEntry::from_json(
                &text,
                atlas_viewstore::ViewOrigin::User,
                None,
            )
            .or_else(|_| {
                atlas_viewstore::ViewEntry::from_json(
                    &text,
                    atlas_viewstore::ViewOrigin::User,
                    Some(&stem),
                )
            })
            .with_context(|| format!("{}", f.display()))?;
            views.push(FlattenView {
                name: entry.name,
                plan: entry.plan,
            });
        }
    }
    let files = ndjson_files(inputs)?;
    let total: u64 = files
        .iter()
        .filter(|f| !f.to_string_lossy().ends_with(".gz"))
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let bar = ProgressBar::with_draw_target(
        (total > 0).then_some(total),
        if show {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    if let Ok(style) = ProgressStyle::with_template(
        "flatten [{bar:30}] {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    let (b, d) = (bar.clone(), done.clone());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let ticker = std::thread::spawn(move || {
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            b.set_position(d.load(std::sync::atomic::Ordering::Relaxed));
            std::thread::park_timeout(std::time::Duration::from_millis(100));
        }
    });
    let report = flatten(&files, views, out, done);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    ticker.thread().unpark();
    let _ = ticker.join();
    bar.finish_and_clear();
    let report = report?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
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
    Ok(())
}
