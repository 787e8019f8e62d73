//! `atlas synth` and `atlas synth scale`: synthetic data
//! (`atlas-synth::generate`) and scaled copies of a real dataset
//! (`atlas-synth::scale`), with a progress bar.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};

use crate::progress;

#[derive(Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:
  atlas synth --patients 1000 --seed 7 --out data/synthetic
  atlas synth --patients 1000000 --gzip --out /big/synthetic
  atlas synth scale --factor 10 ../shared/data/fhir/large/smart-generated-sample-data-R4/ndjson --out /tmp/x10"
)]
pub struct SynthArgs {
    #[command(subcommand)]
    pub scale: Option<SynthCommand>,
    /// Number of patients.
    #[arg(long, default_value_t = 100)]
    pub patients: usize,
    /// Random seed: the same seed gives the same bytes.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output folder (one NDJSON file per resource type).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write .ndjson.gz.
    #[arg(long)]
    pub gzip: bool,
}

#[derive(Subcommand)]
pub enum SynthCommand {
    /// Copy a real NDJSON dataset K times with rewritten ids and references, for load tests.
    #[command(after_help = "Example:
  atlas synth scale --factor 10 data/ndjson --out /tmp/x10")]
    Scale {
        /// How many copies (copy 0 is the input itself).
        #[arg(long)]
        factor: u32,
        /// NDJSON files or folders.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(args: SynthArgs, show: bool) -> Result<()> {
    match args.scale {
        Some(SynthCommand::Scale {
            factor,
            inputs,
            out,
        }) => scale(factor, &inputs, &out, show),
        None => {
            let Some(out) = &args.out else {
                bail!("--out <dir> is required (see `atlas synth --help`)")
            };
            generate(&args, out, show)
        }
    }
}

fn generate(args: &SynthArgs, out: &Path, show: bool) -> Result<()> {
    let started = Instant::now();
    let opts = atlas_synth::SynthOptions {
        patients: args.patients,
        seed: args.seed,
        gzip: args.gzip,
        ..Default::default()
    };
    let done = Arc::new(AtomicU64::new(0));
    let bar = progress::CountBar::start(done.clone(), args.patients as u64, "patients", show);
    let summary = atlas_synth::generate(&opts, out, &done);
    bar.finish();
    let summary = summary?;
    eprintln!(
        "wrote {} patients, {} resources ({:.1} MB) to {} in {:.1} s",
        args.patients,
        summary.resources,
        summary.bytes as f64 / 1e6,
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn scale(factor: u32, inputs: &[PathBuf], out: &Path, show: bool) -> Result<()> {
    let started = Instant::now();
    if factor == 0 {
        bail!("--factor must be at least 1");
    }
    let total: u64 = inputs.iter().map(|p| dir_size(p)).sum();
    let done = Arc::new(AtomicU64::new(0));
    let bar = progress::CountBar::start(done.clone(), total, "bytes", show);
    let summary = atlas_synth::scale(inputs, factor, out, &done);
    bar.finish();
    let summary = summary?;
    eprintln!(
        "wrote {} resources ({:.1} MB) in {} files to {} in {:.1} s",
        summary.resources,
        summary.bytes as f64 / 1e6,
        summary.files.len(),
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Bytes under `p`, for the progress bar's length only: unreadable entries
/// count as empty (the scaler itself reports them).
fn dir_size(p: &Path) -> u64 {
    if p.is_dir() {
        std::fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| dir_size(&e.path())).sum())
            .unwrap_or(0)
    } else {
        std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
    }
}
