//! `atlas mock-ehr`: a deterministic FHIR R4 server on loopback
//! (`atlas-mockehr`) over a folder of NDJSON or freshly generated
//! synthetic patients (`atlas-synth`), until Ctrl-C. For demos, and to try
//! `atlas pull` without a real EHR.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use anyhow::{Context, Result, bail};
use atlas_mockehr::{ClientRegistration, ManifestShape, MockConfig, MockEhr};
use clap::{Args, ValueEnum};

#[derive(Args)]
#[command(after_help = "Examples:
  atlas pull keygen --alg ES384 --out demo      # demo.pem and demo.jwks.json
  atlas mock-ehr --synth 50 --client-id demo --client-jwks demo.jwks.json
  atlas pull bulk http://127.0.0.1:8090/fhir --client-id demo --key demo.pem

  atlas mock-ehr --data ../shared/data/fhir/medium/smart-bulk-data-server-100 --manifest stu4 --no-auth
  atlas mock-ehr --synth 20 --config mock.toml  # faults, groups, ticks: see below

mock.toml holds atlas_mockehr::MockConfig, every field optional, e.g.:
  manifest = \"stu3\"
  export_delay_polls = 2
  auto_tick_every = 10          # the data changes every 10 requests
  [[faults]]
  at = \"file\"                   # token, kickoff, status, file, search, history, any
  nth = 2                       # the 2nd file download (omit: every one)
  kind = \"status\"
  code = 503
  retry_after = \"soon\"")]
pub struct MockEhrArgs {
    /// Serve every *.ndjson / *.ndjson.gz below this folder.
    #[arg(long, conflicts_with = "synth", required_unless_present = "synth")]
    pub data: Option<PathBuf>,
    /// Serve this many freshly generated synthetic patients.
    #[arg(long)]
    pub synth: Option<usize>,
    /// Where to listen (a second listener on 127.0.0.1 takes redirected downloads).
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// A TOML MockConfig (faults, groups, delays, clients, ...); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The client_id to register with --client-jwks.
    #[arg(long, default_value = "demo")]
    pub client_id: String,
    /// The client's public JWKS (JSON file): registers one client allowed system/*.rs.
    #[arg(long)]
    pub client_jwks: Option<PathBuf>,
    /// The manifest shape of the Bulk Data status endpoint.
    #[arg(long, value_enum)]
    pub manifest: Option<Shape>,
    /// Seeds the synthetic data, the clock and the data changes.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Serve without bearer tokens (requiresAccessToken false).
    #[arg(long)]
    pub no_auth: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Shape {
    Stu2,
    Stu3,
    Stu4,
}

pub async fn run(args: MockEhrArgs) -> Result<()> {
    let config = config(&args)?;
    // Kept until the server stops: the synthetic data is read from it.
    let synth_dir = tempfile::tempdir().context("cannot make a temporary folder")?;
    let data = match (&args.data, args.synth) {
        (Some(dir), _) => dir.clone(),
        (None, Some(patients)) => synthesize(patients, config.seed, synth_dir.path())?,
        (None, None) => bail!("give --data <dir> or --synth <patients>"),
    };
    let needs_client = config.require_auth && config.clients.is_empty();
    let ehr = MockEhr::from_ndjson_dir(&data, config)
        .with_context(|| format!("cannot load {}", data.display()))?;
    let running = ehr.start(args.listen).await?;
    print_banner(&ehr, &running, &args, needs_client);
    tokio::signal::ctrl_c()
        .await
        .context("cannot wait for Ctrl-C")?;
    eprintln!("stopping");
    running.shutdown().await;
    Ok(())
}

/// The configuration file, then the flags over it.
fn config(args: &MockEhrArgs) -> Result<MockConfig> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            MockConfig::from_toml(&text).with_context(|| path.display().to_string())?
        }
        None => MockConfig::default(),
    };
    if let Some(shape) = args.manifest {
        config.manifest = match shape {
            Shape::Stu2 => ManifestShape::Stu2,
            Shape::Stu3 => ManifestShape::Stu3,
            Shape::Stu4 => ManifestShape::Stu4,
        };
    }
    if let Some(seed) = args.seed {
        config.seed = seed;
    }
    if args.no_auth {
        config.require_auth = false;
    }
    if let Some(path) = &args.client_jwks {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let jwks: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        config.clients.push(ClientRegistration {
            client_id: args.client_id.clone(),
            jwks,
            scopes: vec!["system/*.rs".into()],
            jku: None,
        });
    }
    Ok(config)
}

fn synthesize(patients: usize, seed: u64, dir: &Path) -> Result<PathBuf> {
    let opts = atlas_synth::SynthOptions {
        patients,
        seed,
        ..Default::default()
    };
    let done = Arc::new(AtomicU64::new(0));
    atlas_synth::generate(&opts, dir, &done).context("cannot generate synthetic data")?;
    Ok(dir.to_path_buf())
}

fn print_banner(
    ehr: &MockEhr,
    running: &atlas_mockehr::RunningMock,
    args: &MockEhrArgs,
    needs_client: bool,
) {
    let s = ehr.stats();
    println!(
        "mock EHR: {} resources from {} files ({} lines skipped, {} duplicates)",
        s.resources, s.files, s.skipped, s.duplicates
    );
    println!("FHIR base:  {}", running.fhir_base);
    println!("token URL:  {}", running.token_url);
    println!("other host: {} (redirected downloads)", running.other_host);
    if needs_client {
        println!(
            "no client is registered, so no token can be had: pass --client-jwks or --no-auth"
        );
    }
    println!("try:");
    if ehr.config().require_auth {
        let key = match &args.client_jwks {
            Some(p) => p.to_string_lossy().replace(".jwks.json", ".pem"),
            None => "<private key>".into(),
        };
        println!(
            "  atlas pull bulk {} --client-id {} --key {key}",
            running.fhir_base, args.client_id
        );
    } else {
        println!("  atlas pull bulk {}", running.fhir_base);
    }
    println!("Ctrl-C stops it.");
}
