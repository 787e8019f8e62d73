//! `atlas pull`: pull from a FHIR server into the lake, through the one
//! ingest path.
//!
//! `bulk` runs (or resumes) a Bulk Data `$export` with `atlas-connect`,
//! then ingests the staged output and `deleted` files as one batch under
//! the connector's name (`--source`), lands the error files next to the
//! raw data, and moves the connector's watermark to the export's
//! `transactionTime`. `rest` does the same with `_lastUpdated` searches or
//! `_history`. `cancel` deletes the export on the server and forgets it;
//! `status` prints the connector's state; `keygen` makes a client key.
//!
//! Order, so a kill anywhere converges: files staged and checkpointed →
//! ingest (idempotent: the same files make the same batch) → state saved
//! (watermark, job cleared) → staging removed.

// Doc comments here are `--help` text, where `[base]` and `<id>` are the
// Bulk Data spec's placeholders, not links or HTML tags.
#![allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use atlas_connect::bulk::{
    BulkClient, BulkOptions, BulkPull, ExportLevel, ExportRequest, PullProgress, PulledExport,
};
use atlas_connect::http::{HttpClient, HttpOptions, build_reqwest};
use atlas_connect::manifest::FileKind;
use atlas_connect::rest::{RestOptions, RestPull};
use atlas_connect::smart::{ClientKey, SmartConfiguration, TokenSource};
use atlas_connect::state::{ConnectorState, RunRecord, StateStore};
use atlas_lake::{BatchReport, IngestOptions, Lake, Progress, WriterLease, ingest};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use object_store::{ObjectStoreExt, PutPayload};

use crate::cli::Globals;
use crate::{lake, progress};

#[path = "pull_subscription.rs"]
mod subscription;

#[derive(Subcommand)]
pub enum PullCommand {
    /// Bulk Data `$export` (system, Patient or Group) into the lake.
    Bulk(BulkArgs),
    /// REST incremental pull: `_lastUpdated` searches, or `_history` (to see deletes).
    Rest(RestArgs),
    /// Listen for FHIR Subscription (R4 backport) rest-hook notifications and pull what they name.
    Subscription(subscription::SubscriptionArgs),
    /// Cancel a connector's export on the server (DELETE) and forget it.
    Cancel(NameArgs),
    /// Print a connector's state: job under way, files done, watermarks, last run.
    Status(NameArgs),
    /// Make a client key pair for SMART Backend Services: a private key
    /// (mode 600) and the public JWKS to register with the server.
    Keygen(KeygenArgs),
}

/// SMART Backend Services options (all optional: without `--client-id` requests are anonymous).
#[derive(Args, Clone)]
pub struct AuthArgs {
    /// The client_id registered with the server (also the assertion's iss and sub).
    #[arg(long, env = "ATLAS_PULL_CLIENT_ID")]
    pub client_id: Option<String>,
    /// The private key: PEM (PKCS#1, PKCS#8, SEC1) or JWK/JWKS; mode 600.
    #[arg(long, env = "ATLAS_PULL_KEY")]
    pub key: Option<PathBuf>,
    /// The key id to send (default: the JWK's kid, else the key's RFC 7638 thumbprint).
    #[arg(long)]
    pub kid: Option<String>,
    /// Scopes (default: system/*.rs when the server lists v2 scopes, else system/*.read).
    #[arg(long)]
    pub scope: Option<String>,
    /// Token endpoint, when the server has no .well-known/smart-configuration.
    #[arg(long)]
    pub token_url: Option<String>,
    /// Sent as the assertion's `jku` (for servers that fetch the JWKS from it).
    #[arg(long)]
    pub jku: Option<String>,
}

/// What every pull shares.
#[derive(Args, Clone)]
pub struct PullCommon {
    /// The connector's name: raw/<source>/... in the lake, and its state under connectors/<source>/.
    #[arg(long, default_value = "ehr")]
    pub source: String,
    #[command(flatten)]
    pub auth: AuthArgs,
    /// Staging folder for downloads (default: inside a local lake, else the system temp folder).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Longest wait between retries or status polls, whatever `Retry-After` says.
    #[arg(long, default_value_t = 120.0)]
    pub max_wait_secs: f64,
    /// Longest accepted NDJSON line in bytes; longer lines are quarantined
    /// (`line_too_long`), never dropped.
    #[arg(long, default_value_t = 64 << 20)]
    pub max_line_bytes: usize,
    /// Attempts per request (429, 5xx, broken connections).
    #[arg(long, default_value_t = 8)]
    pub attempts: u32,
    /// Print the batch manifest as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
#[command(after_help = "Examples:
  atlas mock-ehr --synth 50 --listen 127.0.0.1:8090 &
  atlas pull bulk http://127.0.0.1:8090/fhir --client-id demo --key demo.pem
  atlas pull bulk https://ehr.example/fhir --group cohort-7 --type Patient,Observation --since auto
  atlas pull bulk https://ehr.example/fhir --patient --type-filter 'Observation?category=laboratory'

Kill it at any point and run the same command again: it resumes the saved export (status URL,
files already downloaded). `--since auto` asks only for what changed after the last export's
transactionTime. Ctrl-C asks whether to cancel the export on the server.")]
pub struct BulkArgs {
    /// The FHIR base URL.
    pub base: String,
    /// System-level export: [base]/$export (the default).
    #[arg(long, conflicts_with_all = ["patient", "group"])]
    pub system: bool,
    /// Patient-level export: [base]/Patient/$export.
    #[arg(long, conflicts_with = "group")]
    pub patient: bool,
    /// Group-level export: [base]/Group/<id>/$export.
    #[arg(long)]
    pub group: Option<String>,
    /// Resource types (comma-separated or repeated).
    #[arg(long = "type", value_delimiter = ',')]
    pub types: Vec<String>,
    /// `auto` (after the last export's transactionTime) or a FHIR instant.
    #[arg(long)]
    pub since: Option<String>,
    /// `_typeFilter` queries, e.g. 'Observation?category=laboratory' (repeatable).
    #[arg(long = "type-filter")]
    pub type_filters: Vec<String>,
    /// `_elements` (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    pub elements: Vec<String>,
    /// `includeAssociatedData` codes (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    pub include_associated_data: Vec<String>,
    /// Files downloaded at once.
    #[arg(long, default_value_t = 5)]
    pub parallel: usize,
    /// Do not ask for gzip-encoded files (saves CPU on fast local links).
    #[arg(long)]
    pub no_gzip: bool,
    /// Move the watermark even when the server reported errors (error
    /// files with issues of severity error or fatal).
    #[arg(long)]
    pub accept_errors: bool,
    /// Send `Prefer: handling=lenient`: the server may ignore parameters it
    /// does not support (e.g. includeAssociatedData) instead of refusing.
    #[arg(long)]
    pub lenient: bool,
    #[command(flatten)]
    pub common: PullCommon,
}

#[derive(Args)]
#[command(after_help = "Examples:
  atlas pull rest http://127.0.0.1:8090/fhir --type Patient,Observation --source ehr-rest
  atlas pull rest https://ehr.example/fhir --client-id atlas --key atlas.pem   # every 5 minutes

The first run reads every resource of each type; later runs only what changed since (via
Type/_history?_since= where the server offers it, which also brings deletes).")]
pub struct RestArgs {
    /// The FHIR base URL.
    pub base: String,
    /// Resource types (default: every type the CapabilityStatement lets you search).
    #[arg(long = "type", value_delimiter = ',')]
    pub types: Vec<String>,
    /// Start from this instant instead of each type's watermark.
    #[arg(long)]
    pub since: Option<String>,
    /// `_count` per page.
    #[arg(long, default_value_t = 500)]
    pub page_size: u32,
    /// Types pulled at once.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Never use `_history` (searches only; deletes are then not seen).
    #[arg(long)]
    pub no_history: bool,
    #[command(flatten)]
    pub common: PullCommon,
}

#[derive(Args)]
#[command(after_help = "Example:
  atlas pull cancel --source ehr")]
pub struct NameArgs {
    #[arg(long, default_value = "ehr")]
    pub source: String,
    #[command(flatten)]
    pub auth: AuthArgs,
}

#[derive(Args)]
#[command(after_help = "Example:
  atlas pull keygen --alg ES384 --out atlas-client
  # writes atlas-client.pem (mode 600) and atlas-client.jwks.json (register this one)")]
pub struct KeygenArgs {
    /// RS384 or ES384.
    #[arg(long, default_value = "ES384")]
    pub alg: String,
    /// Output path prefix.
    #[arg(long)]
    pub out: PathBuf,
}

pub async fn run(cmd: PullCommand, g: &Globals) -> Result<()> {
    match cmd {
        PullCommand::Bulk(args) => bulk(args, g).await,
        PullCommand::Rest(args) => rest(args, g).await,
        PullCommand::Subscription(args) => subscription::run(args, g).await,
        PullCommand::Cancel(args) => cancel(args, g).await,
        PullCommand::Status(args) => status(args, g).await,
        PullCommand::Keygen(args) => keygen(&args),
    }
}

fn http_options(c: &PullCommon) -> HttpOptions {
    let mut o = HttpOptions::default();
    o.retry.max_attempts = c.attempts.max(1);
    o.retry.max_wait = Duration::from_secs_f64(c.max_wait_secs.max(0.0));
    o.retry.min_wait = o.retry.min_wait.min(o.retry.max_wait);
    o
}

/// The HTTP client, authenticated when `--client-id` is given: discovery
/// (or `--token-url`), the key, the scope.
async fn client(base: &str, auth: &AuthArgs, opts: HttpOptions) -> Result<HttpClient> {
    let Some(client_id) = &auth.client_id else {
        return Ok(HttpClient::new(opts, None)?);
    };
    let key_path = auth
        .key
        .as_ref()
        .context("--client-id needs --key (the client's private key)")?;
    let key = ClientKey::from_file(key_path, auth.kid.as_deref())?;
    let plain = HttpClient::new(opts.clone(), None)?;
    let base_url = atlas_connect::bulk::fhir_base(base)?;
    let discovery = base_url.join(".well-known/smart-configuration")?;
    let config = match plain.get_json(discovery.clone()).await {
        Ok(v) => Some(serde_json::from_value::<SmartConfiguration>(v).with_context(|| format!("{discovery}"))?),
        Err(e) if auth.token_url.is_some() => {
            tracing::info!(error = %e, "no SMART configuration: using --token-url");
            None
        }
        Err(e) => return Err(e).context("SMART discovery failed; pass --token-url if the server has no .well-known/smart-configuration"),
    };
    if let Some(c) = &config {
        c.check(key.alg(), discovery.as_str())?;
    }
    let token_url = auth
        .token_url
        .clone()
        .or_else(|| config.as_ref().map(|c| c.token_endpoint.clone()))
        .context("no token endpoint")?;
    atlas_connect::bulk::check_transport(
        &url::Url::parse(&token_url).with_context(|| format!("token endpoint {token_url:?}"))?,
    )?;
    let scope = auth.scope.clone().unwrap_or_else(|| {
        config
            .as_ref()
            .map_or("system/*.read", |c| c.default_scope())
            .to_owned()
    });
    let tokens = TokenSource::new(
        build_reqwest(&opts)?,
        token_url,
        client_id.clone(),
        scope,
        auth.jku.clone(),
        key,
    );
    tokens.token().await.context("getting an access token")?;
    Ok(HttpClient::new(opts, Some(Arc::new(tokens)))?)
}

/// The connector's state store, its state (checked against `base`), and
/// its staging folder.
async fn connector(
    lake: &Lake,
    name: &str,
    base: Option<&str>,
    work_dir: Option<&Path>,
) -> Result<(StateStore, ConnectorState, PathBuf)> {
    let store = StateStore::new(lake.object_store().clone(), &lake.path(""), name)?;
    let mut state = store.load().await?.unwrap_or_else(|| ConnectorState {
        name: name.to_owned(),
        ..ConnectorState::default()
    });
    if let Some(base) = base {
        let base = base.trim_end_matches('/');
        if state.base_url.is_empty() {
            state.base_url = base.to_owned();
        } else if state.base_url != base {
            bail!(
                "connector {name:?} pulls from {}; use another --source for {base}",
                state.base_url
            );
        }
    }
    let staging = match work_dir {
        Some(d) => d.join(name),
        None if lake.is_local() => lake
            .root()
            .to_file_path()
            .map_err(|()| anyhow::anyhow!("the lake root {} is not a local path", lake.root()))?
            .join("connectors")
            .join(name)
            .join("staging"),
        None => std::env::temp_dir().join("atlas-pull").join(name),
    };
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    Ok((store, state, staging))
}

fn export_request(args: &BulkArgs, state: &ConnectorState) -> Result<ExportRequest> {
    let level = match (&args.group, args.patient) {
        (Some(g), _) => ExportLevel::Group(g.clone()),
        (None, true) => ExportLevel::Patient,
        _ => ExportLevel::System,
    };
    let mut req = ExportRequest::new(level);
    req.types = args.types.clone();
    req.type_filters = args.type_filters.clone();
    req.elements = args.elements.clone();
    req.include_associated_data = args.include_associated_data.clone();
    req.since = match args.since.as_deref() {
        Some("auto") => state.bulk_watermarks.get(&req.watermark_key()).cloned(),
        Some(s) => {
            chrono::DateTime::parse_from_rfc3339(s).with_context(|| {
                format!("--since {s:?}: not a FHIR instant (e.g. 2026-01-01T00:00:00Z) nor `auto`")
            })?;
            Some(s.to_owned())
        }
        None => None,
    };
    Ok(req)
}

async fn bulk(args: BulkArgs, g: &Globals) -> Result<()> {
    let lake = lake::open_lake(&g.lake)?;
    let lease = progress::take_lease(&lake, g.wait, g.show).await?;
    let result = bulk_leased(&lake, &args, g, &lease).await;
    lake::release(lease, result).await
}

async fn bulk_leased(lake: &Lake, args: &BulkArgs, g: &Globals, lease: &WriterLease) -> Result<()> {
    let started = Instant::now();
    let c = &args.common;
    let (store, mut state, staging) =
        connector(lake, &c.source, Some(&args.base), c.work_dir.as_deref()).await?;
    let req = export_request(args, &state)?;
    let opts = http_options(c);
    let http = client(&args.base, &c.auth, opts.clone()).await?;
    let mut bulk_opts = BulkOptions {
        parallel: args.parallel.max(1),
        gzip: !args.no_gzip,
        lenient: args.lenient,
        ..BulkOptions::default()
    };
    bulk_opts.poll.max_wait = opts.retry.max_wait;
    bulk_opts.poll.min_wait = bulk_opts.poll.min_wait.min(opts.retry.max_wait);
    let client = BulkClient::new(http, &args.base, bulk_opts)?;
    let progress = Arc::new(PullProgress::default());
    let pull = BulkPull {
        client: &client,
        store: &store,
        staging: staging.clone(),
        progress: progress.clone(),
    };
    if let Some(s) = &req.since {
        eprintln!("exporting changes since {s}");
    }
    let bar = PullBar::start(progress.clone(), g.show);
    let pulled = tokio::select! {
        r = pull.run(&mut state, &req) => r,
        _ = tokio::signal::ctrl_c() => {
            bar.finish();
            return interrupted(&client, &store, &state).await;
        }
    };
    bar.finish();
    // The Ctrl-C handler above replaced the default one: from here on
    // (ingest, crash-safe) Ctrl-C exits at once again.
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\ninterrupted; run the same command again to finish");
            std::process::exit(130);
        }
    });
    let pulled = pulled?;
    eprintln!(
        "export of {} complete: {} files ({:.1} MB) staged{}",
        pulled.manifest.transaction_time,
        pulled.files.len(),
        pulled.files.iter().map(|f| f.done.bytes).sum::<u64>() as f64 / 1e6,
        if pulled.restarts > 0 {
            format!(", after {} restart(s) of expired exports", pulled.restarts)
        } else {
            String::new()
        }
    );
    atlas_connect::bulk::crash_point("pull_before_ingest");
    let report = ingest_staged(lake, &c.source, &pulled, c, g.show, lease).await?;
    atlas_connect::bulk::crash_point("pull_after_ingest");
    let errors = land_errors(lake, &c.source, &pulled).await?;
    if errors == 0 || args.accept_errors {
        state.bulk_watermark = Some(pulled.manifest.transaction_time.clone());
        state.bulk_watermarks.insert(
            req.watermark_key(),
            pulled.manifest.transaction_time.clone(),
        );
    } else {
        eprintln!(
            "warning: the watermark stays where it was: the server reported {errors} error(s), so the next `--since auto` asks for this period again (--accept-errors moves it anyway)"
        );
    }
    state.bulk_job = None;
    state.last_run = Some(run_record(
        "bulk",
        pulled.files.len() as u64,
        pulled.files.iter().map(|f| f.done.bytes).sum(),
        &report,
    ));
    store.save(&state).await?;
    let _ = std::fs::remove_dir_all(&pulled.job_dir);
    eprintln!(
        "connector {}: watermark {} (next `--since auto` starts there); {:.1} s in all",
        c.source,
        pulled.manifest.transaction_time,
        started.elapsed().as_secs_f64()
    );
    if c.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

fn run_record(kind: &str, files: u64, bytes: u64, report: &BatchReport) -> RunRecord {
    RunRecord {
        kind: kind.into(),
        finished_at: chrono::Utc::now().to_rfc3339(),
        files,
        bytes,
        batch_id: Some(report.batch_id.clone()),
        stored: report.outcomes.stored,
        quarantined: report.outcomes.quarantined,
        deleted: report.outcomes.deleted,
    }
}

/// Ctrl-C during a pull: ask whether to cancel the export on the server
/// (when a terminal can answer); otherwise keep it for the next run.
async fn interrupted(
    client: &BulkClient,
    store: &StateStore,
    state: &ConnectorState,
) -> Result<()> {
    let Some(job) = &state.bulk_job else {
        bail!("interrupted before the export was kicked off");
    };
    use std::io::IsTerminal;
    let cancel = std::io::stdin().is_terminal() && {
        eprint!("\ninterrupted. Cancel the export on the server too? [y/N] ");
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer).is_ok() && answer.trim().eq_ignore_ascii_case("y")
    };
    if cancel {
        client.cancel(&job.status_url).await?;
        let mut s = state.clone();
        s.bulk_job = None;
        store.save(&s).await?;
        bail!("interrupted; the export was cancelled on the server");
    }
    store.save(state).await?;
    bail!(
        "interrupted; the export is kept ({}): run the same command again to resume, or `atlas pull cancel --source {}`",
        job.status_url,
        state.name
    )
}

/// Ingests the staged output and deleted files as one batch.
async fn ingest_staged(
    lake: &Lake,
    source: &str,
    pulled: &PulledExport,
    common: &PullCommon,
    show: bool,
    lease: &WriterLease,
) -> Result<BatchReport> {
    let paths: Vec<String> = pulled
        .files
        .iter()
        .filter(|f| f.done.kind != FileKind::Error)
        .map(|f| f.path.display().to_string())
        .collect();
    for f in pulled
        .files
        .iter()
        .filter(|f| f.done.count_mismatch.is_some())
    {
        eprintln!(
            "warning: {} has {} lines where the manifest says {} (same bytes on a second download: kept)",
            f.url,
            f.done.lines,
            f.done.count_mismatch.unwrap_or_default()
        );
    }
    let hashes = pulled
        .files
        .iter()
        .map(|f| (f.path.clone(), (f.done.bytes, f.done.sha256.clone())))
        .collect();
    ingest_paths(lake, source, &paths, &hashes, common, show, lease).await
}

pub(crate) async fn ingest_paths(
    lake: &Lake,
    source: &str,
    paths: &[String],
    hashes: &std::collections::HashMap<PathBuf, (u64, String)>,
    common: &PullCommon,
    show: bool,
    lease: &WriterLease,
) -> Result<BatchReport> {
    let started = Instant::now();
    // An empty pull (nothing changed) still records its batch.
    let set = if paths.is_empty() {
        None
    } else {
        Some(atlas_ingest::collect_inputs(paths, &mut std::io::empty())?)
    };
    let mut set = set;
    if let Some(set) = set.as_mut() {
        for input in &mut set.inputs {
            // Hashed while downloaded: no second pass over the bytes.
            if let Some((size, sha)) = hashes.get(&input.path) {
                input.size = *size;
                input.sha256 = sha.clone();
            }
        }
    }
    let inputs = set.as_ref().map_or(&[][..], |s| &s.inputs[..]);
    let opts = IngestOptions {
        source: source.to_owned(),
        lease: Some(lease.clone()),
        // Staged downloads are this run's own files: landed by a hard
        // link on a local lake (no second copy), never changed again.
        link_inputs: true,
        read: atlas_ingest::ReadOptions {
            max_line_bytes: common.max_line_bytes,
            ..atlas_ingest::ReadOptions::default()
        },
        ..IngestOptions::default()
    };
    let progress = Arc::new(Progress::default());
    let bar = progress::IngestBar::start(progress.clone(), show);
    let result = ingest(lake, inputs, &opts, &progress).await;
    bar.finish();
    let report = result?;
    crate::ingest::print_report(&report, started.elapsed().as_secs_f64().max(1e-9));
    if !report.already_ingested && !report.outcomes.reconciles() {
        bail!("counts do not reconcile; this is a bug, please report it with the manifest");
    }
    Ok(report)
}

/// Error files (OperationOutcomes) are landed beside the raw data and
/// summarised; they are not resources of the patient record.
async fn land_errors(lake: &Lake, source: &str, pulled: &PulledExport) -> Result<u64> {
    let errors: Vec<_> = pulled
        .files
        .iter()
        .filter(|f| f.done.kind == FileKind::Error)
        .collect();
    if errors.is_empty() {
        return Ok(0);
    }
    let day = pulled
        .manifest
        .transaction_time
        .get(..10)
        .unwrap_or("unknown");
    let (mut issues, mut serious) = (0u64, 0u64);
    for f in &errors {
        let bytes =
            std::fs::read(&f.path).with_context(|| format!("reading {}", f.path.display()))?;
        let name = f
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("error.ndjson");
        let folder = f.done.sha256.get(..16).unwrap_or("unknown");
        let dest = lake.path(&format!("raw/{source}/errors/{day}/{folder}/{name}"));
        let reader: Box<dyn std::io::Read> = if name.ends_with(".gz") {
            Box::new(flate2::read::MultiGzDecoder::new(&bytes[..]))
        } else {
            Box::new(&bytes[..])
        };
        for (n, line) in std::io::BufRead::lines(std::io::BufReader::new(reader)).enumerate() {
            let line = line.with_context(|| format!("reading {}", f.path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            let bad = v["issue"].as_array().is_none_or(|a| {
                a.iter()
                    .any(|i| matches!(i["severity"].as_str(), Some("error" | "fatal") | None))
            });
            serious += u64::from(bad);
            issues += 1;
            if n < 5 {
                eprintln!(
                    "  server {}: {}",
                    if bad { "error" } else { "note" },
                    atlas_connect::error::outcome_text(line.as_bytes())
                );
            }
        }
        lake.object_store()
            .put(&dest, PutPayload::from(bytes))
            .await
            .with_context(|| format!("landing {dest}"))?;
    }
    eprintln!(
        "the server reported {issues} outcome(s) ({serious} error or fatal) in {} file(s); landed under raw/{source}/errors/{day}/",
        errors.len()
    );
    Ok(serious)
}

async fn rest(args: RestArgs, g: &Globals) -> Result<()> {
    let lake = lake::open_lake(&g.lake)?;
    let lease = progress::take_lease(&lake, g.wait, g.show).await?;
    let result = rest_leased(&lake, &args, g, &lease).await;
    lake::release(lease, result).await
}

async fn rest_leased(lake: &Lake, args: &RestArgs, g: &Globals, lease: &WriterLease) -> Result<()> {
    let c = &args.common;
    let (store, mut state, staging) =
        connector(lake, &c.source, Some(&args.base), c.work_dir.as_deref()).await?;
    if let Some(s) = &args.since {
        chrono::DateTime::parse_from_rfc3339(s)
            .with_context(|| format!("--since {s:?}: not a FHIR instant"))?;
    }
    let http = client(&args.base, &c.auth, http_options(c)).await?;
    let progress = Arc::new(PullProgress::default());
    let opts = RestOptions {
        page_size: args.page_size.max(1),
        parallel: args.parallel.max(1),
        history: !args.no_history,
        ..RestOptions::default()
    };
    let pull = RestPull::new(http, &args.base, &store, staging, progress.clone(), opts)?;
    let caps = pull
        .capabilities()
        .await
        .context("reading the server's CapabilityStatement")?;
    let bar = PullBar::start(progress.clone(), g.show);
    let pulled = pull
        .run(&mut state, &args.types, &caps, args.since.as_deref())
        .await;
    bar.finish();
    let pulled = pulled?;
    eprintln!(
        "{} pages ({} entries) staged; modes: {}",
        pulled.pages,
        pulled.entries,
        pulled
            .modes
            .iter()
            .map(|(t, m)| format!("{t}={m:?}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let paths: Vec<String> = pulled
        .files
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let bytes = pulled
        .files
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let report = ingest_paths(
        lake,
        &c.source,
        &paths,
        &Default::default(),
        c,
        g.show,
        lease,
    )
    .await?;
    state.last_run = Some(run_record(
        "rest",
        pulled.files.len() as u64,
        bytes,
        &report,
    ));
    pull.finish(&mut state).await?;
    if c.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

async fn cancel(args: NameArgs, g: &Globals) -> Result<()> {
    let lake = lake::open_lake(&g.lake)?;
    // Under the writer lease: a pull running now must not see its export
    // vanish and start a new one over the cancel.
    let lease = progress::take_lease(&lake, g.wait, g.show).await?;
    let result = cancel_leased(&lake, &args).await;
    lake::release(lease, result).await
}

async fn cancel_leased(lake: &Lake, args: &NameArgs) -> Result<()> {
    let (store, mut state, _) = connector(lake, &args.source, None, None).await?;
    let Some(job) = state.bulk_job.take() else {
        eprintln!("connector {}: no export under way", args.source);
        return Ok(());
    };
    let http = client(&state.base_url, &args.auth, HttpOptions::default()).await?;
    let client = BulkClient::new(http, &state.base_url, BulkOptions::default())?;
    client.cancel(&job.status_url).await?;
    store.save(&state).await?;
    eprintln!(
        "connector {}: export {} cancelled on the server and forgotten",
        args.source, job.status_url
    );
    Ok(())
}

async fn status(args: NameArgs, g: &Globals) -> Result<()> {
    let lake = lake::open_lake(&g.lake)?;
    let store = StateStore::new(lake.object_store().clone(), &lake.path(""), &args.source)?;
    match store.load().await? {
        Some(s) => println!("{}", serde_json::to_string_pretty(&s)?),
        None => eprintln!("connector {} has never run", args.source),
    }
    Ok(())
}

fn keygen(args: &KeygenArgs) -> Result<()> {
    let alg = match args.alg.to_ascii_uppercase().as_str() {
        "RS384" => jsonwebtoken::Algorithm::RS384,
        "ES384" => jsonwebtoken::Algorithm::ES384,
        other => bail!("--alg {other}: use RS384 or ES384"),
    };
    let (key, pem) = ClientKey::generate(alg).map_err(anyhow::Error::msg)?;
    let pem_path = args.out.with_extension("pem");
    let jwks_path = args.out.with_extension("jwks.json");
    write_private(&pem_path, pem.as_bytes())?;
    std::fs::write(
        &jwks_path,
        serde_json::to_string_pretty(&key.public_jwks())?,
    )
    .with_context(|| format!("writing {}", jwks_path.display()))?;
    eprintln!(
        "wrote {} (private, mode 600) and {} (public: register it with the server); kid {}",
        pem_path.display(),
        jwks_path.display(),
        key.kid()
    );
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// A progress bar over a pull: files, bytes and the server's `X-Progress`.
struct PullBar {
    bar: ProgressBar,
    task: tokio::task::JoinHandle<()>,
}

impl PullBar {
    fn start(p: Arc<PullProgress>, show: bool) -> PullBar {
        let bar = ProgressBar::with_draw_target(
            Some(0),
            if show {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} {elapsed} [{bar:30}] {pos}/{len} files {msg}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        let b = bar.clone();
        let task = tokio::spawn(async move {
            loop {
                b.set_length(p.files_total.load(Ordering::Relaxed));
                b.set_position(p.files_done.load(Ordering::Relaxed));
                b.set_message(format!(
                    "{:.1} MB · {}",
                    p.bytes.load(Ordering::Relaxed) as f64 / 1e6,
                    p.status()
                ));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        PullBar { bar, task }
    }

    fn finish(&self) {
        self.task.abort();
        self.bar.finish_and_clear();
    }
}
