//! `atlas views ...`: the materialized views of `atlas-viewstore` (list,
//! status, create, refresh, drop, show). `views flatten`, which needs no
//! lake, is run by [`crate::flatten`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use atlas_lake::WriterLease;
use atlas_viewstore::{RefreshOptions, RefreshReport, ViewStore};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cli::Globals;
use crate::{lake, progress};

// Doc comments here are `--help` text, where `<view name>` is a placeholder
// for the user, not an HTML tag.
#[allow(rustdoc::invalid_html_tags)]
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

pub async fn run(cmd: ViewsCommand, g: &Globals) -> Result<()> {
    if let ViewsCommand::Flatten {
        inputs,
        out,
        views,
        json,
    } = cmd
    {
        return crate::flatten::run(&inputs, &out, &views, json, g.show);
    }
    let store = ViewStore::new(lake::open_lake(&g.lake)?);
    // Commands that write the lake hold its writer lease.
    let lease = match cmd {
        ViewsCommand::Create { .. } | ViewsCommand::Refresh { .. } | ViewsCommand::Drop { .. } => {
            Some(progress::take_lease(store.lake(), g.wait, g.show).await?)
        }
        _ => None,
    };
    let result = run_store_command(cmd, &store, g.show, lease.clone()).await;
    match lease {
        Some(lease) => lake::release(lease, result).await,
        None => result,
    }
}

async fn run_store_command(
    cmd: ViewsCommand,
    store: &ViewStore,
    show: bool,
    lease: Option<WriterLease>,
) -> Result<()> {
    match cmd {
        ViewsCommand::Flatten { .. } => bail!("views flatten does not use the lake"),
        ViewsCommand::List { json } => list(store, json).await?,
        ViewsCommand::Status { json } => status(store, json).await?,
        ViewsCommand::Create {
            file,
            name,
            replace,
        } => create(store, &file, name.as_deref(), replace).await?,
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

async fn list(store: &ViewStore, json: bool) -> Result<()> {
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
        return Ok(());
    }
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
    Ok(())
}

async fn status(store: &ViewStore, json: bool) -> Result<()> {
    let status = store.status().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
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
    Ok(())
}

async fn create(store: &ViewStore, file: &Path, name: Option<&str>, replace: bool) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let v = store
        .create(&text, name, replace)
        .await
        .with_context(|| format!("{}", file.display()))?;
    println!(
        "created view `{}` over {} ({} columns); build it with: atlas views refresh {}",
        v.name,
        v.resource_type,
        v.plan.columns().len(),
        v.name
    );
    Ok(())
}

/// Refreshes with a progress bar under `lease` (the lake's writer lease;
/// taken by the view store when `None`); shared with `atlas demo`.
pub async fn refresh(
    store: &ViewStore,
    names: &[String],
    full: bool,
    show: bool,
    lease: Option<WriterLease>,
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
