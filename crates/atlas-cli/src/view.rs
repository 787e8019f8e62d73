//! `atlas view run|test`: SQL-on-FHIR v2 ViewDefinitions from the command line.
//!
//! Owns reading resources for a view (files through the ingest reader, so
//! NDJSON, Bundles, archives and stdin work as in `atlas ingest`; or the
//! lake's resource store) and writing the rows as a table, CSV, NDJSON or
//! Parquet. Compiling and running the view is `atlas-views`' job.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use anyhow::{Context, Result, bail};
use arrow::record_batch::RecordBatch;
use atlas_ingest::{
    Event, IdentifierIndex, ReadOptions, collect_inputs, prescan_identifiers, read_events,
};
use atlas_views::{CompiledView, RowBuilder, render_diagnostics};
use clap::{Subcommand, ValueEnum};
use futures::StreamExt;

/// Rows per record batch handed to the writers.
const BATCH_ROWS: usize = 8192;

#[derive(Subcommand)]
pub enum ViewCommand {
    /// Run a ViewDefinition over FHIR inputs (NDJSON, Bundles, folders,
    /// .tar.gz, `-`) or, with no inputs, over the lake's live resources.
    #[command(after_help = "Examples:
  atlas view run patient_view.json data/Patient.ndjson
  atlas view run obs.json bundles/ --format csv > obs.csv
  atlas view run obs.json --format parquet --out obs.parquet     # from the lake
  atlas view run condition.json - --format ndjson < Condition.ndjson

The view is validated first: problems are printed with their place in the view,
e.g. `select[0].column[2].path: unknown function 'foo' at 1:5`, and nothing runs.")]
    Run {
        /// The ViewDefinition JSON file.
        view: PathBuf,
        /// Input files or folders; none means the lake (see --lake).
        inputs: Vec<String>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Write here instead of stdout (required for parquet).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run a SQL-on-FHIR conformance folder (every *.json with a `tests`
    /// array) and print `N passed, N failed`.
    #[command(after_help = "Example:
  atlas view test ../shared/conformance/sql-on-fhir --report sof-report.json

The report follows the suite's own test-report.schema.json.")]
    Test {
        /// The folder with the suite's test files.
        suite: PathBuf,
        /// Write the report (test-report.schema.json format) here.
        #[arg(long)]
        report: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Ndjson,
    Parquet,
}

pub async fn run(cmd: ViewCommand, lake: &str) -> Result<()> {
    match cmd {
        ViewCommand::Test { suite, report } => test(&suite, report.as_deref()),
        ViewCommand::Run {
            view,
            inputs,
            format,
            out,
        } => {
            let plan = compile(&view)?;
            if format == Format::Parquet && out.is_none() {
                bail!("--format parquet needs --out <file>");
            }
            let mut rows = Rows {
                sink: Sink::new(format, out, &plan)?,
                rows: RowBuilder::new(&plan),
                plan: &plan,
                failed: 0,
            };
            if inputs.is_empty() {
                from_lake(lake, &mut rows).await?;
            } else {
                from_inputs(&inputs, &mut rows)?;
            }
            rows.close()
        }
    }
}

fn test(suite: &Path, report: Option<&Path>) -> Result<()> {
    let result = atlas_views::suite::run_dir(suite)
        .with_context(|| format!("reading the suite in {}", suite.display()))?;
    for (file, t) in result.failures() {
        println!(
            "failed  {file} / {}: {}",
            t.name,
            t.error.as_deref().unwrap_or("")
        );
    }
    if let Some(path) = report {
        std::fs::write(path, serde_json::to_vec_pretty(&result.to_json())?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{}", result.summary());
    Ok(())
}

/// Reads, validates and compiles the view file; an invalid view is refused
/// with every diagnostic before a single resource is read.
fn compile(view: &Path) -> Result<CompiledView> {
    let text =
        std::fs::read_to_string(view).with_context(|| format!("reading {}", view.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", view.display()))?;
    let plan = CompiledView::from_json(&json).map_err(|d| {
        anyhow::anyhow!(
            "{}: invalid view\n{}",
            view.display(),
            render_diagnostics(&d)
        )
    })?;
    for w in plan.warnings() {
        eprintln!("warning: {w}");
    }
    Ok(plan)
}

/// The rows of one `view run`: resources go in one at a time, batches of
/// `BATCH_ROWS` go out to the sink.
struct Rows<'a> {
    plan: &'a CompiledView,
    rows: RowBuilder,
    sink: Sink,
    /// Resources the view could not evaluate (each reported on stderr).
    failed: u64,
}

impl Rows<'_> {
    /// Each resource's text is parsed with our JSON tree, so decimals stay exact.
    fn push(&mut self, resource: &str) -> Result<()> {
        if let Err(e) = self.plan.append_json_text(resource, &mut self.rows) {
            self.failed += 1;
            eprintln!("skipped: {e}");
        }
        if self.rows.len() >= BATCH_ROWS {
            self.sink.write(self.rows.finish()?)?;
        }
        Ok(())
    }

    fn close(mut self) -> Result<()> {
        if !self.rows.is_empty() {
            self.sink.write(self.rows.finish()?)?;
        }
        self.sink.close()?;
        if self.failed > 0 {
            bail!(
                "{} resource(s) could not be evaluated (see above)",
                self.failed
            );
        }
        Ok(())
    }
}

/// The live resources of the view's type in the lake's resource store.
async fn from_lake(lake: &str, rows: &mut Rows<'_>) -> Result<()> {
    let lake = crate::lake::open_lake(lake)?;
    let ctx = lake.session().await?;
    let ty = rows.plan.resource_type().replace('\'', "");
    let df = ctx
        .sql(&format!(
            "SELECT resource FROM resources WHERE resource_type = '{ty}' AND NOT deleted"
        ))
        .await
        .context("querying the lake's resources")?;
    let mut stream = df.execute_stream().await?;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let col = atlas_lake::lake::text_column(&batch, 0)?;
        for r in 0..batch.num_rows() {
            rows.push(col.value(r))?;
        }
    }
    Ok(())
}

/// Files, folders, archives or stdin, through the ingest reader (so Bundles
/// and conditional references resolve as they do in `atlas ingest`).
fn from_inputs(inputs: &[String], rows: &mut Rows<'_>) -> Result<()> {
    let set = collect_inputs(inputs, &mut std::io::stdin().lock())?;
    let opts = ReadOptions::default();
    let mut index = IdentifierIndex::default();
    if set.inputs.iter().any(|i| i.kind.may_hold_bundles()) {
        prescan_identifiers(&set.inputs, &opts, &mut index)?;
    }
    let rx = read_events(
        set.inputs.clone(),
        opts,
        Arc::new(index),
        Arc::new(AtomicU64::new(0)),
    )?;
    let mut not_resources = 0u64;
    for block in rx {
        for ev in block.events {
            match ev {
                Event::Resource(r) if r.resource_type == rows.plan.resource_type() => {
                    rows.push(&r.json)
                        .with_context(|| format!("{}:{}", r.origin.file, r.origin.line))?;
                }
                Event::Reject(_) => not_resources += 1,
                _ => {}
            }
        }
    }
    if not_resources > 0 {
        eprintln!(
            "note: {not_resources} input line(s) were not valid resources (`atlas ingest` reports why)"
        );
    }
    Ok(())
}

/// Where the rows go.
enum Sink {
    Table(Vec<RecordBatch>, Box<dyn Write>),
    Csv(arrow::csv::Writer<Box<dyn Write>>),
    Ndjson(Box<dyn Write>),
    Parquet(parquet::arrow::ArrowWriter<std::fs::File>),
}

impl Sink {
    fn new(format: Format, out: Option<PathBuf>, plan: &CompiledView) -> Result<Sink> {
        let open = |p: &PathBuf| {
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))
        };
        let writer: Box<dyn Write> = match (&out, format) {
            (_, Format::Parquet) => Box::new(std::io::sink()),
            (Some(p), _) => Box::new(std::io::BufWriter::new(open(p)?)),
            (None, _) => Box::new(std::io::BufWriter::new(std::io::stdout())),
        };
        Ok(match format {
            Format::Table => Sink::Table(Vec::new(), writer),
            Format::Csv => {
                if plan
                    .schema()
                    .fields()
                    .iter()
                    .any(|f| matches!(f.data_type(), arrow::datatypes::DataType::List(_)))
                {
                    bail!("--format csv cannot hold collection columns; use ndjson or parquet");
                }
                Sink::Csv(
                    arrow::csv::WriterBuilder::new()
                        .with_header(true)
                        .build(writer),
                )
            }
            Format::Ndjson => Sink::Ndjson(writer),
            Format::Parquet => {
                let path = out.as_ref().context("--format parquet needs --out")?;
                Sink::Parquet(parquet::arrow::ArrowWriter::try_new(
                    open(path)?,
                    plan.schema(),
                    None,
                )?)
            }
        })
    }

    fn write(&mut self, batch: RecordBatch) -> Result<()> {
        match self {
            Sink::Table(all, _) => all.push(batch),
            Sink::Csv(w) => w.write(&batch)?,
            Sink::Ndjson(w) => atlas_views::json::write_ndjson(&batch, w)?,
            Sink::Parquet(w) => w.write(&batch)?,
        }
        Ok(())
    }

    fn close(self) -> Result<()> {
        match self {
            Sink::Table(all, mut w) => {
                writeln!(w, "{}", arrow::util::pretty::pretty_format_batches(&all)?)?;
                let n: usize = all.iter().map(|b| b.num_rows()).sum();
                writeln!(w, "{n} row(s)")?;
                w.flush()?;
            }
            Sink::Csv(w) => {
                let mut inner = w.into_inner();
                inner.flush()?;
            }
            Sink::Ndjson(mut w) => w.flush()?,
            Sink::Parquet(w) => {
                w.close()?;
            }
        }
        Ok(())
    }
}
