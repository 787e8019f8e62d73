//! `atlas deid` and `atlas ingest --deid`: de-identification with a
//! Microsoft FHIR anonymizer configuration or a built-in profile.

use crate::progress;
use anyhow::{Context, Result, bail};
use atlas_deid::stream::{Progress, StreamOptions, Summary};
use atlas_deid::{DeidConfig, Deidentifier, profile};
use atlas_ingest::{ClassifyOptions, ReadOptions, collect_inputs};
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where the rules and the secret come from.
#[derive(Args, Clone, Default)]
pub struct DeidSource {
    /// The secret for hashing and date offsets of a built-in profile.
    /// Keep it: the same key gives the same hashes and offsets on every run.
    #[arg(long, env = "ATLAS_DEID_KEY", hide_env_values = true)]
    pub deid_key: Option<String>,
    /// Read the secret from this file instead (first line).
    #[arg(long)]
    pub deid_key_file: Option<PathBuf>,
}

#[derive(Args)]
#[command(after_help = "Examples:
  ATLAS_DEID_KEY=$(cat /secure/deid.key) atlas deid --profile safe-harbor-minimal \\
      ../shared/data/fhir/large/smart-generated-sample-data-R4/ndjson --out /tmp/deid
  atlas deid --config my-anonymizer.json exports/2026-11-01/ --out /tmp/deid --changes
  atlas deid --profile safe-harbor-minimal --print-config > my-anonymizer.json

Writes <out>/<Type>.ndjson, quarantine.ndjson (lines refused, with file, line and
reason), summary.json and, with --changes, changes.ndjson (per resource: which
elements changed and how). The output replaces <out> only once it is complete.")]
pub struct DeidArgs {
    /// Files, folders or `-` (stdin): NDJSON, .ndjson.gz, Bundles, .tar.gz.
    #[arg(required_unless_present = "print_config")]
    pub paths: Vec<String>,
    /// A Microsoft FHIR anonymizer configuration (JSON).
    #[arg(long, conflicts_with = "profile", required_unless_present = "profile")]
    pub config: Option<PathBuf>,
    /// A built-in profile: safe-harbor-minimal.
    #[arg(long)]
    pub profile: Option<String>,
    /// Output folder.
    #[arg(long, required_unless_present = "print_config")]
    pub out: Option<PathBuf>,
    /// Also write changes.ndjson.
    #[arg(long)]
    pub changes: bool,
    /// Print the configuration (a profile's rules) and exit.
    #[arg(long)]
    pub print_config: bool,
    #[command(flatten)]
    pub source: DeidSource,
}

fn secret(src: &DeidSource) -> Result<String> {
    if let Some(path) = &src.deid_key_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the key file {}", path.display()))?;
        let key = text.lines().next().unwrap_or("").trim().to_string();
        if key.is_empty() {
            bail!("the key file {} is empty", path.display());
        }
        return Ok(key);
    }
    match &src.deid_key {
        Some(k) if !k.trim().is_empty() => Ok(k.trim().to_string()),
        _ => bail!(
            "a built-in profile needs a secret key: --deid-key-file FILE or ATLAS_DEID_KEY \
             (for example: head -c 32 /dev/urandom | base64 > deid.key)"
        ),
    }
}

/// Reads `spec`: a built-in profile name, or the path of a configuration file.
pub fn load(spec: &str, src: &DeidSource) -> Result<DeidConfig> {
    if profile::PROFILES.contains(&spec) {
        return Ok(profile::by_name(spec, &secret(src)?)?);
    }
    let path = Path::new(spec);
    if !path.exists() {
        bail!(
            "'{spec}' is neither a built-in profile ({}) nor a configuration file",
            profile::PROFILES.join(", ")
        );
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {spec}"))?;
    DeidConfig::from_json(&text).with_context(|| format!("in {spec}"))
}

/// De-identifies `paths` into `out`, with a progress bar; prints the counts.
pub fn run_stream(
    engine: &Deidentifier,
    paths: &[String],
    out: &Path,
    changes: bool,
    show: bool,
) -> Result<Summary> {
    let started = Instant::now();
    let set = collect_inputs(paths, &mut std::io::stdin().lock())?;
    let total: u64 = set.inputs.iter().map(|i| i.size).sum();
    let progress = Progress::default();
    let bar = progress::CountBar::start(progress.bytes.clone(), total, "input bytes", show);
    let opts = StreamOptions {
        read: ReadOptions {
            classify: ClassifyOptions::default(),
            ..ReadOptions::default()
        },
        write_changes: changes,
    };
    let result = atlas_deid::stream::run(engine, &set.inputs, out, &opts, &progress);
    bar.finish();
    let s = result.with_context(|| format!("de-identifying into {}", out.display()))?;
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    eprintln!(
        "de-identified: {} read = {} written + {} rejected + {} failed + {} skipped + {} deletions{}",
        s.read,
        s.written,
        s.rejected,
        s.failed,
        s.skipped,
        s.deletes,
        if s.reconciles() {
            " (reconciled)"
        } else {
            " (DOES NOT RECONCILE)"
        }
    );
    eprintln!(
        "  {:.1} MB out in {:.1} s ({:.0} resources/s) to {}",
        s.bytes_out as f64 / 1e6,
        secs,
        s.written as f64 / secs,
        out.display()
    );
    if !s.quarantine_by_reason.is_empty() {
        let parts: Vec<String> = s
            .quarantine_by_reason
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        eprintln!(
            "  quarantined: {} (see {})",
            parts.join(", "),
            out.join("quarantine.ndjson").display()
        );
    }
    if !s.reconciles() {
        bail!("counts do not reconcile; this is a bug");
    }
    Ok(s)
}

pub fn run(args: DeidArgs, show: bool) -> Result<()> {
    let spec = match (&args.profile, &args.config) {
        (Some(p), _) => p.clone(),
        (None, Some(c)) => c.display().to_string(),
        (None, None) => bail!("give --profile or --config"),
    };
    if args.print_config {
        match &args.profile {
            Some(p) => {
                let key = secret(&args.source).unwrap_or_else(|_| "<your secret>".into());
                match profile::json_by_name(p, &key) {
                    Some(j) => print!("{j}"),
                    None => bail!("unknown profile '{p}'"),
                }
            }
            None => print!("{}", std::fs::read_to_string(&spec)?),
        }
        return Ok(());
    }
    let config = load(&spec, &args.source)?;
    let engine = Deidentifier::new(config).with_change_records(args.changes);
    let Some(out) = &args.out else {
        bail!("--out is required");
    };
    run_stream(&engine, &args.paths, out, args.changes, show)?;
    Ok(())
}
