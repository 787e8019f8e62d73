//! `atlas sql`: read-only SQL (DataFusion) over the lake, through the
//! session `atlas-viewstore` builds (every view by name, and the
//! `resources`, `quarantine` and `batches` tables; writes refused before
//! planning). This module only writes the rows out in the chosen format.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use arrow::record_batch::RecordBatch;
use atlas_viewstore::ViewStore;
use clap::{Args, ValueEnum};
use futures::StreamExt;

use crate::lake::open_lake as open;

#[derive(Args)]
#[command(after_help = "Examples:
  atlas sql \"SELECT gender, count(*) AS n FROM patient GROUP BY gender\"
  atlas sql \"SELECT p.id, count(*) FROM patient p JOIN observation o ON o.patient_id = p.id GROUP BY 1 ORDER BY 2 DESC LIMIT 5\"
  atlas sql --format parquet --out obs.parquet \"SELECT * FROM observation WHERE code = '8867-4'\"

Write statements (INSERT, UPDATE, DELETE, CREATE, DROP, COPY, SET) are refused.")]
pub struct SqlArgs {
    /// The query.
    pub query: String,
    #[arg(long, value_enum, default_value_t = SqlFormat::Table)]
    pub format: SqlFormat,
    /// Write to this file instead of stdout (required for parquet).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SqlFormat {
    Table,
    Csv,
    Json,
    Parquet,
}

/// Runs `query` and writes its rows; shared with `atlas demo`.
pub async fn run(lake: &str, query: &str, format: SqlFormat, out: Option<PathBuf>) -> Result<()> {
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
