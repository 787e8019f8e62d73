//! `atlas`: one command line over every Atlas crate.
//!
//! Owns: argument parsing, progress bars, human and JSON output. Each
//! subcommand is a thin composition of library calls (`atlas-ingest`,
//! `atlas-lake`, `atlas-synth`), so the demo and the tests exercise the same
//! code paths a user does.

mod audit;
mod deid;
mod flatten;
mod policy;
mod progress;
mod view;
mod views;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use atlas_ingest::{ClassifyOptions, ReadOptions, collect_inputs};
use atlas_lake::{IngestOptions, Lake, Progress, ingest, stats};
use clap::{Args, Parser, Subcommand};

const AFTER_HELP: &str = "Examples:
  atlas demo                                   generate 100 patients, ingest them, show stats
  atlas synth --patients 1000 --seed 7 --out data/
  atlas ingest data/                           ingest every .ndjson/.json/.tar.gz below data/
  atlas stats --json

The lake is ./atlas-lake unless --lake or ATLAS_LAKE says otherwise; it may be
a folder or an s3://, gs:// or az:// URL (credentials from AWS_*/GOOGLE_*/AZURE_* variables).";

#[derive(Parser)]
#[command(name = "atlas", version, about = "Atlas: an open FHIR R4 data platform", after_help = AFTER_HELP)]
struct Cli {
    /// Where the lake lives: a folder or an object-store URL.
    #[arg(
        long,
        global = true,
        env = "ATLAS_LAKE",
        default_value = "./atlas-lake"
    )]
    lake: String,
    /// No progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Commands that write the lake (ingest, views refresh/create/drop,
    /// demo) hold its writer lease: one writer at a time. When another
    /// writer holds it, wait (showing who) instead of failing at once.
    #[arg(long, global = true)]
    wait: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Land and store FHIR inputs: NDJSON (.ndjson, .ndjson.gz), JSON resources and Bundles,
    /// folders, .tar.gz archives, or `-` for stdin.
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
    Ingest(IngestArgs),
    /// De-identify FHIR inputs into per-type NDJSON with a Microsoft FHIR
    /// anonymizer configuration or the built-in safe-harbor-minimal profile.
    Deid(deid::DeidArgs),
    /// Show what the lake holds: resources per type, quarantine reasons, batches.
    #[command(after_help = "Examples:
  atlas stats
  atlas stats --json | jq '.resources.Patient.live'

JSON shape (stable): {\"resources\": {\"<Type>\": {\"live\": n, \"deleted\": n}},
\"quarantine\": {\"<reason>\": n}, \"batches\": [{\"batch_id\", \"source\", \"started_at\",
\"finished_at\", \"lines_read\", \"stored\", \"unchanged\", \"older_than_stored\", \"quarantined\",
\"skipped\", \"deleted\", \"outcome\", \"superseded\"}]} (superseded: deprecated, = older_than_stored)")]
    Stats {
        /// Print the stable JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Generate deterministic synthetic FHIR R4 data, or scale a real dataset.
    Synth(SynthArgs),
    /// Evaluate FHIRPath expressions, or run the HL7 FHIRPath conformance suite.
    #[command(subcommand)]
    Fhirpath(FhirpathCommand),
    /// Run SQL-on-FHIR v2 ViewDefinitions over files or the lake, or run the
    /// SQL-on-FHIR conformance suite.
    #[command(subcommand)]
    View(view::ViewCommand),
    /// Materialized views: the built-in views behind the ontology plus your
    /// own, written as Delta tables under <lake>/views/ and refreshed incrementally.
    #[command(subcommand)]
    Views(views::ViewsCommand),
    /// The ontology: object types backed by views, their links and saved object sets.
    #[command(subcommand)]
    Ontology(views::OntologyCommand),
    /// Run read-only SQL (DataFusion) over the lake: every view by name
    /// (patient, encounter, observation, ...) and the resources, quarantine
    /// and batches tables.
    #[command(after_help = "Examples:
  atlas sql \"SELECT gender, count(*) AS n FROM patient GROUP BY gender\"
  atlas sql \"SELECT p.id, count(*) FROM patient p JOIN observation o ON o.patient_id = p.id GROUP BY 1 ORDER BY 2 DESC LIMIT 5\"
  atlas sql --format parquet --out obs.parquet \"SELECT * FROM observation WHERE code = '8867-4'\"

Write statements (INSERT, UPDATE, DELETE, CREATE, DROP, COPY, SET) are refused.")]
    Sql {
        /// The query.
        query: String,
        #[arg(long, value_enum, default_value_t = views::SqlFormat::Table)]
        format: views::SqlFormat,
        /// Write to this file instead of stdout (required for parquet).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Serve the lake over HTTP: object sets (Foundry ontology API v2
    /// shape) behind bearer-token auth, ontology metadata, health and
    /// Prometheus metrics.
    #[command(after_help = "Examples:
  atlas --lake /tmp/demo-lake serve --dev-auth           # http://127.0.0.1:8080
  TOKEN=$(atlas --lake /tmp/demo-lake token --sub alice --scope 'user/*.rs')
  curl -s -H \"Authorization: Bearer $TOKEN\" -X POST \\
    localhost:8080/api/v2/ontologies/atlas/objectSets/loadObjects \\
    -d '{\"objectSet\": {\"type\": \"base\", \"objectType\": \"Patient\"}, \"pageSize\": 5}'
  atlas serve --config atlas.toml --bind 0.0.0.0:9000
  curl -s localhost:8080/health; curl -s localhost:8080/metrics

Settings come from defaults, then --config (TOML: bind, default_page_size, max_page_size,
page_token_ttl_secs, slice_reads, public_base_url, [auth] dev/leeway_secs/purpose_header_without_claim and
[[auth.issuers]] issuer/audience/jwks_file or jwks_url, [graphql] max_depth/max_complexity/max_rows/introspection/
max_query_bytes/max_nesting/max_fragment_spreads/max_aliases/max_root_fields/max_fields/max_link_queries,
[limits] request_timeout_ms/stream_timeout_secs/max_concurrent_per_principal/shutdown_timeout_ms,
[tls] cert/key, [policy] file/refresh_secs, [audit] enabled/start_record_after_ms), then
ATLAS_SERVE_BIND / ATLAS_SERVE_DEFAULT_PAGE_SIZE / ATLAS_SERVE_MAX_PAGE_SIZE, then flags.
Every data endpoint needs a bearer JWT from a configured issuer (or, with --dev-auth, from
`atlas token`). Ctrl-C or SIGTERM stops accepting, lets the requests in flight finish for
[limits] shutdown_timeout_ms (10 s), then cuts the rest (each audited as cut) and exits.
Logs: ATLAS_LOG=info.")]
    Serve {
        /// A TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on (overrides the file and the environment).
        #[arg(long)]
        bind: Option<std::net::SocketAddr>,
        /// Accept tokens from the lake's local dev issuer (`atlas token`).
        /// For development only: anyone who can read the lake can mint them,
        /// so it is refused on a non-loopback address without
        /// --allow-remote-dev-auth.
        #[arg(long)]
        dev_auth: bool,
        /// Allow dev auth (--dev-auth or [auth] dev) on an address other
        /// machines can reach. Anyone who can read the lake can then mint
        /// tokens this server accepts.
        #[arg(long)]
        allow_remote_dev_auth: bool,
        /// Serve HTTPS with this PEM certificate chain (with --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key for --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Threads for blocking file reads (the lake's local object store),
        /// default: the number of cores. More do not read a local disk
        /// faster, and each one that has read keeps freed memory of its own.
        #[arg(long, env = "ATLAS_IO_THREADS")]
        io_threads: Option<usize>,
    },
    /// Test an access policy before deploying it: the decision, the rows,
    /// the hidden fields and the rules behind them.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// The audit trail `atlas serve` writes: verify its hash chain, export
    /// it as FHIR AuditEvent.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Mint a bearer token from the lake's local dev issuer (accepted by
    /// `atlas serve --dev-auth` on the same lake).
    #[command(after_help = "Examples:
  atlas --lake /tmp/demo-lake token --sub alice --scope 'user/*.rs'
  atlas --lake /tmp/demo-lake token --sub bob --scope 'patient/*.rs' --patient 42 --ttl 15m

Scopes are SMART on FHIR (v1 user/*.read or v2 user/*.rs). --patient binds the token to one
patient's compartment: it then sees only that patient's objects on every path.")]
    Token {
        /// The token's subject (who it is for).
        #[arg(long)]
        sub: String,
        /// SMART scopes, space-separated.
        #[arg(long, default_value = "user/*.rs")]
        scope: String,
        /// Bind the token to this patient's compartment.
        #[arg(long)]
        patient: Option<String>,
        /// Lifetime: seconds, or with a unit (90s, 15m, 1h, 1d).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// A role for the token's `roles` claim (repeatable; policy rules
        /// may name roles).
        #[arg(long = "role")]
        roles: Vec<String>,
        /// The token's `purpose_of_use` claim (TREAT, HRESCH, ...); several,
        /// comma-separated (TREAT,HRESCH), let a request pick one with the
        /// X-Purpose-Of-Use header. Without a claim the header is refused
        /// unless the server sets [auth] purpose_header_without_claim.
        #[arg(long)]
        purpose: Option<String>,
    },
    /// Generate a small population, ingest it and show what to try next.
    #[command(after_help = "Example:
  atlas demo --patients 200 --lake /tmp/demo-lake")]
    Demo {
        /// How many synthetic patients.
        #[arg(long, default_value_t = 100)]
        patients: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum FhirpathCommand {
    /// Evaluate an expression against a FHIR R4 JSON resource and print the
    /// result collection as JSON.
    #[command(after_help = "Examples:
  atlas fhirpath eval 'Patient.name.where(use = \'official\').given.first()' patient.json
  atlas fhirpath eval 'Observation.value.ofType(Quantity).value' obs.json
  atlas fhirpath eval 'name.given.count() > %n' patient.json --var n=1
  atlas fhirpath eval --check 'Patient.nmae' patient.json      # static check first

A malformed expression is reported with its position (`expected ')' at 1:17`).")]
    Eval {
        /// The FHIRPath expression.
        expression: String,
        /// A JSON file holding one resource (or `-` for stdin).
        resource: String,
        /// A variable as name=JSON (used as %name); repeatable.
        #[arg(long = "var", value_name = "NAME=JSON")]
        vars: Vec<String>,
        /// Type-check the expression against the resource's type before
        /// evaluating; problems are printed and the command fails.
        #[arg(long)]
        check: bool,
    },
    /// Run the HL7 FHIRPath suite (tests-fhir-r4.xml) and print
    /// `N passed, N failed, N skipped`.
    #[command(after_help = "Example:
  atlas fhirpath test ../shared/conformance/fhirpath/tests-fhir-r4.xml \\
      --inputs ../shared/conformance/fhirpath/r4-input --report fhirpath-report.json

Inputs are read as JSON; a test whose input exists only as XML is skipped and
named. --convert-xml converts such inputs instead.")]
    Test {
        /// The suite file.
        suite: PathBuf,
        /// The folder with the suite's input resources.
        #[arg(long)]
        inputs: PathBuf,
        /// Write every test's result as JSON here.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Convert inputs that exist only as XML instead of skipping their tests.
        #[arg(long)]
        convert_xml: bool,
        /// Also list the failing tests.
        #[arg(long, short)]
        verbose: bool,
    },
}

#[derive(Args)]
struct IngestArgs {
    /// Files, folders or `-` (stdin).
    #[arg(required = true)]
    paths: Vec<String>,
    /// Source name, used in raw/<source>/... and in every row.
    #[arg(long, default_value = "files")]
    source: String,
    /// Mark every resource of this run synthetic (tagged ones always are).
    #[arg(long)]
    synthetic: bool,
    /// Longest accepted NDJSON line in bytes; longer lines are quarantined.
    #[arg(long, default_value_t = 64 << 20)]
    max_line_bytes: usize,
    /// Stored bytes per commit (bounds memory).
    #[arg(long, default_value_t = 48)]
    chunk_mb: usize,
    /// Print the batch manifest as JSON.
    #[arg(long)]
    json: bool,
    /// De-identify before anything is landed or stored, with a built-in profile
    /// (safe-harbor-minimal) or a Microsoft FHIR anonymizer configuration file:
    /// the lake (a de-identified zone) never holds the identified bytes.
    #[arg(long, value_name = "PROFILE|CONFIG")]
    deid: Option<String>,
    #[command(flatten)]
    deid_source: deid::DeidSource,
}

#[derive(Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:
  atlas synth --patients 1000 --seed 7 --out data/synthetic
  atlas synth --patients 1000000 --gzip --out /big/synthetic
  atlas synth scale --factor 10 ../shared/data/fhir/large/smart-generated-sample-data-R4/ndjson --out /tmp/x10"
)]
struct SynthArgs {
    #[command(subcommand)]
    scale: Option<SynthCommand>,
    /// Number of patients.
    #[arg(long, default_value_t = 100)]
    patients: usize,
    /// Random seed: the same seed gives the same bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output folder (one NDJSON file per resource type).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write .ndjson.gz.
    #[arg(long)]
    gzip: bool,
}

#[derive(Subcommand)]
enum SynthCommand {
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

/// Ingest allocates a few small buffers per input line on the reader and
/// classifier threads and frees them on the thread that builds the chunk.
/// glibc's malloc spent a sixth of ingest's CPU on exactly that (cross-thread
/// frees, consolidation, fresh pages per chunk); mimalloc's thread-local
/// free lists do not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Commits arena memory on first touch instead of up front: the same speed,
/// and ingest's peak RSS at 10x drops from 0.9-1.0 GiB to about 0.8 GiB.
fn tune_allocator() {
    // From the bundled mimalloc.h (v2 and v3 agree): `mi_option_arena_eager_commit`.
    const MI_OPTION_ARENA_EAGER_COMMIT: i32 = 4;
    // Declared here: the `mimalloc` crate links the C library but does not
    // re-export its option API.
    unsafe extern "C" {
        fn mi_option_set(option: i32, value: std::ffi::c_long);
    }
    // SAFETY: sets one allocator option; runs first thing in `main`, before
    // any other thread exists.
    unsafe { mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) }
}

/// The blocking pool `atlas serve` gets unless `--io-threads` says: one
/// thread per core. The pool runs the local object store's file reads; tokio
/// would otherwise grow it to hundreds of threads under a fast stream of
/// small-file reads, and each thread's allocator heap keeps the pages its
/// buffers came from after they are freed elsewhere. A 10-million-row FHIR
/// NDJSON stream peaked at 542-676 MB that way, and stays at 256-271 MB
/// with two threads, at the same speed (`bench/stream_memory.py`).
fn default_io_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().max(2))
}

fn main() {
    tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ATLAS_LOG").unwrap_or_else(|_| {
                "warn,atlas_serve=info,buoyant_kernel=off,deltalake_core::writer::stats=error"
                    .into()
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Command::Serve { io_threads, .. } = &cli.command {
        builder.max_blocking_threads(io_threads.map_or_else(default_io_threads, |n| n.max(1)));
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(2);
        }
    };
    let result = runtime.block_on(run(cli));
    // Work still running on the blocking pool (a request `atlas serve`
    // cut at shutdown) must not keep the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    if let Err(e) = result {
        // `atlas ... | head` closing the pipe early is not an error.
        let broken_pipe = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
                || c.to_string().contains("Broken pipe")
        });
        if broken_pipe {
            std::process::exit(0);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    let show = !cli.quiet && std::io::stderr().is_terminal();
    match cli.command {
        Command::Ingest(args) => {
            let lake = open_lake(&cli.lake)?;
            let lease = progress::take_lease(&lake, cli.wait, show).await?;
            let result = run_ingest(&lake, &args, show, &lease).await;
            let released = lease.release().await;
            let report = result?;
            released.context("releasing the lake's writer lease")?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            Ok(())
        }
        Command::Deid(args) => deid::run(args, show),
        Command::Stats { json } => {
            let lake = open_lake(&cli.lake)?;
            let s = stats(&lake).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_stats(&s);
            }
            Ok(())
        }
        Command::Synth(args) => run_synth(args, show),
        Command::Fhirpath(cmd) => run_fhirpath(cmd),
        Command::View(cmd) => view::run(cmd, &cli.lake).await,
        Command::Views(cmd) => views::run_views(cmd, &cli.lake, show, cli.wait).await,
        Command::Ontology(cmd) => views::run_ontology(cmd),
        Command::Sql { query, format, out } => views::run_sql(&cli.lake, &query, format, out).await,
        Command::Demo { patients, seed } => demo(&cli.lake, patients, seed, show, cli.wait).await,
        Command::Serve {
            config,
            bind,
            dev_auth,
            allow_remote_dev_auth,
            tls_cert,
            tls_key,
            io_threads: _,
        } => {
            let tls = tls_cert
                .zip(tls_key)
                .map(|(cert, key)| atlas_serve::TlsConfig { cert, key });
            serve(
                &cli.lake,
                config,
                bind,
                (dev_auth, allow_remote_dev_auth),
                tls,
            )
            .await
        }
        Command::Token {
            sub,
            scope,
            patient,
            ttl,
            roles,
            purpose,
        } => {
            token(
                &cli.lake,
                atlas_serve::TokenRequest {
                    subject: sub,
                    scope,
                    patient,
                    roles,
                    purpose,
                    ttl_secs: 0,
                },
                &ttl,
            )
            .await
        }
        Command::Policy(cmd) => policy::run(cmd, &cli.lake).await,
        Command::Audit(cmd) => audit::run(cmd, &cli.lake).await,
    }
}

async fn serve(
    lake_location: &str,
    config: Option<PathBuf>,
    bind: Option<std::net::SocketAddr>,
    (dev_auth, allow_remote_dev_auth): (bool, bool),
    tls: Option<atlas_serve::TlsConfig>,
) -> Result<()> {
    let mut settings = match &config {
        Some(path) => atlas_serve::ServeConfig::from_file(path)?,
        None => atlas_serve::ServeConfig::default(),
    }
    .with_env(|k| std::env::var(k).ok())?;
    if let Some(b) = bind {
        settings.bind = b;
    }
    if dev_auth {
        settings.auth.dev = true;
    }
    if tls.is_some() {
        settings.tls = tls;
    }
    atlas_serve::auth::check_dev_auth_bind(&settings.auth, settings.bind, allow_remote_dev_auth)
        .map_err(|e| anyhow::anyhow!("atlas serve: {e}"))?;
    if settings.auth.dev && !settings.bind.ip().is_loopback() {
        eprintln!(
            "atlas serve: WARNING: dev auth on {}: anyone who can read the lake can mint accepted tokens",
            settings.bind
        );
    }
    let lake = open_lake(lake_location)?;
    let state = atlas_serve::AppState::open(lake, atlas_ontology::Ontology::builtin(), settings)
        .await
        .map_err(|e| anyhow::anyhow!("atlas serve: {e}"))?;
    for w in atlas_serve::auth::exposed_key_files(&state.lake) {
        eprintln!("atlas serve: WARNING: {w}");
    }
    if !state.auth.has_issuers() {
        eprintln!(
            "atlas serve: no token issuer is configured, so every data request will get 401; \
             add [[auth.issuers]] to the config or pass --dev-auth"
        );
    }
    let addr = state.config.bind;
    let scheme = if state.config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    eprintln!("atlas serve: {scheme}://{addr} (lake {lake_location}); Ctrl-C stops");
    atlas_serve::serve(state, atlas_serve::shutdown_signal())
        .await
        .with_context(|| format!("serving on {addr}"))?;
    Ok(())
}

async fn token(
    lake_location: &str,
    mut request: atlas_serve::TokenRequest,
    ttl: &str,
) -> Result<()> {
    request.ttl_secs = parse_duration(ttl)
        .with_context(|| format!("--ttl {ttl:?}: give seconds or a number with s, m, h or d"))?;
    let lake = open_lake(lake_location)?;
    let issuer = atlas_serve::DevIssuer::open(&lake).await?;
    let token = issuer.mint(&request)?;
    println!("{token}");
    Ok(())
}

/// `90`, `90s`, `15m`, `1h`, `1d` as seconds.
fn parse_duration(text: &str) -> Option<u64> {
    let t = text.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = num.parse().ok()?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(mult).filter(|s| *s > 0)
}

fn run_fhirpath(cmd: FhirpathCommand) -> Result<()> {
    use atlas_fhirpath::{EvalContext, Expr};
    match cmd {
        FhirpathCommand::Eval {
            expression,
            resource,
            vars,
            check,
        } => {
            let text = if resource == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut s)
                    .context("reading the resource from stdin")?;
                s
            } else {
                std::fs::read_to_string(&resource).with_context(|| format!("reading {resource}"))?
            };
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{resource}: not valid JSON"))?;
            let expr =
                Expr::parse(&expression).map_err(|e| anyhow::anyhow!("invalid expression: {e}"))?;
            if check {
                let ty = json
                    .get("resourceType")
                    .and_then(|t| t.as_str())
                    .with_context(|| format!("{resource}: no resourceType to check against"))?;
                let problems = expr.check(ty);
                if !problems.is_empty() {
                    for p in &problems {
                        eprintln!("{p}");
                    }
                    bail!("{} problem(s) in the expression", problems.len());
                }
            }
            let mut values = Vec::with_capacity(vars.len());
            for v in &vars {
                let (name, value) = v
                    .split_once('=')
                    .with_context(|| format!("--var {v}: expected NAME=JSON"))?;
                let value: serde_json::Value = serde_json::from_str(value).or_else(|_| {
                    Ok::<_, serde_json::Error>(serde_json::Value::String(value.into()))
                })?;
                values.push((name.to_owned(), value));
            }
            let mut ctx = EvalContext::new();
            for (name, value) in &values {
                ctx = ctx.with_json_variable(name, value);
            }
            let out = expr
                .evaluate(&json, &ctx)
                .map_err(|e| anyhow::anyhow!("evaluation failed: {e}"))?;
            println!("{}", serde_json::to_string_pretty(&out.to_json())?);
            Ok(())
        }
        FhirpathCommand::Test {
            suite,
            inputs,
            report,
            convert_xml,
            verbose,
        } => {
            use atlas_fhirpath::suite::{RunOptions, Status, run_with};
            let result = run_with(
                &suite,
                &inputs,
                &RunOptions {
                    convert_xml_inputs: convert_xml,
                },
            )?;
            for t in &result.tests {
                let reason = t.reason.as_deref().unwrap_or("");
                match t.status {
                    Status::Skip => println!("skipped {}/{}: {reason}", t.group, t.name),
                    Status::Fail if verbose => println!(
                        "failed  {}/{}: {} -- {reason}",
                        t.group, t.name, t.expression
                    ),
                    _ => {}
                }
            }
            if let Some(path) = report {
                std::fs::write(&path, serde_json::to_vec_pretty(&result)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            println!("{}", result.summary());
            Ok(())
        }
    }
}

fn open_lake(location: &str) -> Result<Lake> {
    Lake::open(location, atlas_lake::lake::storage_options_from_env())
        .with_context(|| format!("opening the lake at {location}"))
}

/// Ingests under `lease`, the lake's writer lease (taken before the inputs
/// are even de-identified, so a second writer fails before doing any work).
async fn run_ingest(
    lake: &Lake,
    args: &IngestArgs,
    show: bool,
    lease: &atlas_lake::WriterLease,
) -> Result<atlas_lake::BatchReport> {
    let started = Instant::now();
    // With --deid the inputs are de-identified into a private staging folder
    // first, and only that output is landed and stored.
    let staging = match &args.deid {
        Some(spec) => {
            let engine = atlas_deid::Deidentifier::new(deid::load(spec, &args.deid_source)?)
                .with_change_records(false);
            let dir =
                tempfile::tempdir().context("creating the de-identification staging folder")?;
            let out = dir.path().join("deid");
            deid::run_stream(&engine, &args.paths, &out, false, show)?;
            Some((dir, out))
        }
        None => None,
    };
    let paths: Vec<String> = match &staging {
        Some((_, out)) => {
            let mut files: Vec<String> = std::fs::read_dir(out)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    name.ends_with(".ndjson")
                        && !matches!(name, "quarantine.ndjson" | "changes.ndjson")
                })
                .map(|p| p.display().to_string())
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("de-identification wrote no resources; nothing to ingest");
            }
            files
        }
        None => args.paths.clone(),
    };
    let set = collect_inputs(&paths, &mut std::io::stdin().lock())?;
    let opts = IngestOptions {
        source: args.source.clone(),
        read: ReadOptions {
            max_line_bytes: args.max_line_bytes,
            classify: ClassifyOptions {
                synthetic: args.synthetic,
            },
            ..ReadOptions::default()
        },
        chunk_bytes: args.chunk_mb.max(1) << 20,
        lease: Some(lease.clone()),
    };
    let progress = Arc::new(Progress::default());
    let bar = progress::IngestBar::start(progress.clone(), show);
    let result = ingest(lake, &set.inputs, &opts, &progress).await;
    bar.finish();
    let report = result?;
    let o = &report.outcomes;
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    if report.already_ingested {
        eprintln!(
            "batch {} was already ingested ({} lines); nothing changed",
            report.batch_id, o.lines_read
        );
        return Ok(report);
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
    if !o.reconciles() {
        bail!("counts do not reconcile; this is a bug, please report it with the manifest");
    }
    Ok(report)
}

fn print_stats(s: &atlas_lake::Stats) {
    println!("{:<28} {:>10} {:>10}", "resource type", "live", "deleted");
    let (mut live, mut deleted) = (0, 0);
    for (t, c) in &s.resources {
        println!("{:<28} {:>10} {:>10}", t, c.live, c.deleted);
        live += c.live;
        deleted += c.deleted;
    }
    println!("{:<28} {:>10} {:>10}", "total", live, deleted);
    if !s.quarantine.is_empty() {
        println!("\n{:<28} {:>10}", "quarantine reason", "lines");
        for (r, n) in &s.quarantine {
            println!("{r:<28} {n:>10}");
        }
    }
    println!("\n{} batches", s.batches.len());
    for b in &s.batches {
        println!(
            "  {} {} {}: read {} stored {} unchanged {} older than stored {} quarantined {} skipped {}",
            b.batch_id,
            b.source,
            b.started_at,
            b.lines_read,
            b.stored,
            b.unchanged,
            b.older_than_stored,
            b.quarantined,
            b.skipped
        );
    }
}

fn run_synth(args: SynthArgs, show: bool) -> Result<()> {
    let started = Instant::now();
    match args.scale {
        Some(SynthCommand::Scale {
            factor,
            inputs,
            out,
        }) => {
            if factor == 0 {
                bail!("--factor must be at least 1");
            }
            let total: u64 = inputs.iter().map(|p| dir_size(p)).sum();
            let done = Arc::new(AtomicU64::new(0));
            let bar = progress::CountBar::start(done.clone(), total, "bytes", show);
            let summary = atlas_synth::scale(&inputs, factor, &out, &done);
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
        }
        None => {
            let Some(out) = args.out else {
                bail!("--out <dir> is required (see `atlas synth --help`)")
            };
            let opts = atlas_synth::SynthOptions {
                patients: args.patients,
                seed: args.seed,
                gzip: args.gzip,
                ..Default::default()
            };
            let done = Arc::new(AtomicU64::new(0));
            let bar =
                progress::CountBar::start(done.clone(), args.patients as u64, "patients", show);
            let summary = atlas_synth::generate(&opts, &out, &done);
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
        }
    }
    Ok(())
}

fn dir_size(p: &Path) -> u64 {
    if p.is_dir() {
        std::fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| dir_size(&e.path())).sum())
            .unwrap_or(0)
    } else {
        std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
    }
}

async fn demo(
    lake_location: &str,
    patients: usize,
    seed: u64,
    show: bool,
    wait: bool,
) -> Result<()> {
    let started = Instant::now();
    let lake = open_lake(lake_location)?;
    let lease = progress::take_lease(&lake, wait, show).await?;
    let result = demo_leased(&lake, lake_location, patients, seed, show, &lease).await;
    let released = lease.release().await;
    result?;
    released.context("releasing the lake's writer lease")?;
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "\nDemo done in {elapsed:.1} s. Try next:
  atlas --lake {lake_location} stats --json
  atlas --lake {lake_location} views status
  atlas --lake {lake_location} ontology show
  atlas --lake {lake_location} sql \"SELECT code_display, count(*) FROM condition GROUP BY 1 ORDER BY 2 DESC LIMIT 10\"
  atlas --lake {lake_location} ingest {}      # again: nothing changes
  atlas --lake {lake_location} serve --dev-auth &
  TOKEN=$(atlas --lake {lake_location} token --sub me --scope 'user/*.rs')
  curl -s -H \"Authorization: Bearer $TOKEN\" 'localhost:8080/api/v2/ontologies/atlas/objects/Patient?pageSize=3'
  duckdb -c \"INSTALL delta; LOAD delta; SELECT resource_type, count(*) FROM delta_scan('{}tables/resources') GROUP BY 1\"",
        demo_data(&lake, lake_location).display(),
        lake.root().to_file_path().map(|p| format!("{}/", p.display().to_string().trim_end_matches('/'))).unwrap_or_else(|_| lake.root().to_string()),
    );
    Ok(())
}

fn demo_data(lake: &Lake, lake_location: &str) -> PathBuf {
    if lake.is_local() {
        PathBuf::from(format!("{}-demo-data", lake_location.trim_end_matches('/')))
    } else {
        std::env::temp_dir().join("atlas-demo-data")
    }
}

async fn demo_leased(
    lake: &Lake,
    lake_location: &str,
    patients: usize,
    seed: u64,
    show: bool,
    lease: &atlas_lake::WriterLease,
) -> Result<()> {
    let data = demo_data(lake, lake_location);
    eprintln!(
        "1/4 generating {patients} synthetic patients (seed {seed}) into {}",
        data.display()
    );
    run_synth(
        SynthArgs {
            scale: None,
            patients,
            seed,
            out: Some(data.clone()),
            gzip: false,
        },
        show,
    )?;
    eprintln!("2/4 ingesting them into the lake at {}", lake.root());
    let args = IngestArgs {
        paths: vec![data.display().to_string()],
        source: "synth".into(),
        synthetic: true,
        max_line_bytes: 64 << 20,
        chunk_mb: 48,
        json: false,
        deid: None,
        deid_source: deid::DeidSource::default(),
    };
    run_ingest(lake, &args, show, lease).await?;
    eprintln!("3/4 what the lake holds now:\n");
    print_stats(&stats(lake).await?);
    eprintln!(
        "\n4/4 building the views behind the ontology (patient, encounter, observation, ...)\n"
    );
    let store = atlas_viewstore::ViewStore::new(lake.clone());
    let reports = views::refresh(&store, &[], false, show, Some(lease.clone())).await?;
    views::print_refresh(&reports);
    let sample = "SELECT p.gender, count(DISTINCT p.id) AS patients, count(o.id) AS heart_rates, round(avg(o.value_quantity), 1) AS mean_bpm FROM patient p JOIN observation o ON o.patient_id = p.id WHERE o.code = '8867-4' GROUP BY p.gender ORDER BY p.gender";
    println!("\nA sample query across views (heart rate by gender):\n  atlas sql \"{sample}\"\n");
    views::run_sql(lake_location, sample, views::SqlFormat::Table, None).await?;
    Ok(())
}
