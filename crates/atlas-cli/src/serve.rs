//! `atlas serve`: settings from defaults, `--config`, the environment and
//! flags, checked, then `atlas-serve` runs the server until Ctrl-C or
//! SIGTERM. Everything the server does is `atlas-serve`'s; this module
//! only merges the settings and says what it is about to do.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use atlas_serve::{AppState, ServeConfig, TlsConfig};
use clap::Args;

use crate::lake::open_lake;

// Doc comments here are `--help` text, where `[auth] dev` names a config
// section, not a rustdoc link.
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(Args)]
#[command(after_help = "Examples:
  atlas --lake /tmp/demo-lake serve --dev-auth           # http://127.0.0.1:8080
  TOKEN=$(atlas --lake /tmp/demo-lake token --sub alice --scope 'user/*.rs')
  curl -s -H \"Authorization: Bearer $TOKEN\" -X POST \\
    localhost:8080/api/v2/ontologies/atlas/objectSets/loadObjects \\
    -d '{\"objectSet\": {\"type\": \"base\", \"objectType\": \"Patient\"}, \"pageSize\": 5}'
  atlas serve --config atlas.toml --bind 0.0.0.0:9000
  atlas --lake /tmp/demo-lake serve --dev-auth --live-views   # views follow new data
  curl -N -H \"Authorization: Bearer $TOKEN\" localhost:8080/events   # change notices (SSE)
  curl -s localhost:8080/health; curl -s localhost:8080/metrics

Settings come from defaults, then --config (TOML: bind, default_page_size, max_page_size,
page_token_ttl_secs, slice_reads, public_base_url, [auth] dev/leeway_secs/purpose_header_without_claim and
[[auth.issuers]] issuer/audience/jwks_file or jwks_url, [graphql] max_depth/max_complexity/max_rows/introspection/
max_query_bytes/max_nesting/max_fragment_spreads/max_aliases/max_root_fields/max_fields/max_link_queries,
[limits] request_timeout_ms/stream_timeout_secs/max_concurrent_per_principal/shutdown_timeout_ms,
[tls] cert/key, [policy] file/refresh_secs, [audit] enabled/start_record_after_ms,
[events] enabled/poll_ms/heartbeat_secs/ticket_ttl_secs/max_connection_secs/max_connections,
[views] auto_refresh, [fhircast] ..., [subscriptions] ...; see docs/events.md), then
ATLAS_SERVE_BIND / ATLAS_SERVE_DEFAULT_PAGE_SIZE / ATLAS_SERVE_MAX_PAGE_SIZE, then flags.
Every data endpoint needs a bearer JWT from a configured issuer (or, with --dev-auth, from
`atlas token`). Ctrl-C or SIGTERM stops accepting, lets the requests in flight finish for
[limits] shutdown_timeout_ms (10 s), then cuts the rest (each audited as cut) and exits.
Logs: ATLAS_LOG=info.")]
pub struct ServeArgs {
    /// A TOML configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on (overrides the file and the environment).
    #[arg(long)]
    pub bind: Option<SocketAddr>,
    /// Accept tokens from the lake's local dev issuer (`atlas token`).
    /// For development only: anyone who can read the lake can mint them,
    /// so it is refused on a non-loopback address without
    /// --allow-remote-dev-auth.
    #[arg(long)]
    pub dev_auth: bool,
    /// Allow dev auth (--dev-auth or [auth] dev) on an address other
    /// machines can reach. Anyone who can read the lake can then mint
    /// tokens this server accepts.
    #[arg(long)]
    pub allow_remote_dev_auth: bool,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Keep the materialized views current: refresh them when the store
    /// changes and pin queries to views that reflect one store version
    /// (`[views] auto_refresh`).
    #[arg(long)]
    pub live_views: bool,
    /// Threads for blocking file reads (the lake's local object store),
    /// default: the number of cores. More do not read a local disk
    /// faster, and each one that has read keeps freed memory of its own.
    #[arg(long, env = "ATLAS_IO_THREADS")]
    pub io_threads: Option<usize>,
}

/// The blocking pool `atlas serve` gets unless `--io-threads` says: one
/// thread per core. The pool runs the local object store's file reads; tokio
/// would otherwise grow it to hundreds of threads under a fast stream of
/// small-file reads, and each thread's allocator heap keeps the pages its
/// buffers came from after they are freed elsewhere. A 10-million-row FHIR
/// NDJSON stream peaked at 542-676 MB that way, and stays at 256-271 MB
/// with two threads, at the same speed (`bench/stream_memory.py`).
pub fn blocking_threads(args: &ServeArgs) -> usize {
    args.io_threads.map_or_else(
        || std::thread::available_parallelism().map_or(2, |n| n.get().max(2)),
        |n| n.max(1),
    )
}

pub async fn run(args: ServeArgs, lake_location: &str) -> Result<()> {
    let settings = settings(args)?;
    let lake = open_lake(lake_location)?;
    let state = AppState::open(lake, atlas_ontology::Ontology::builtin(), settings)
        .await
        .map_err(|e| anyhow::anyhow!("atlas serve: {e}"))?;
    warn_about(&state);
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

/// Defaults, then the file, then the environment, then the flags; refuses
/// dev auth on a reachable address unless `--allow-remote-dev-auth`.
fn settings(args: ServeArgs) -> Result<ServeConfig> {
    let mut settings = match &args.config {
        Some(path) => ServeConfig::from_file(path)?,
        None => ServeConfig::default(),
    }
    .with_env(|k| std::env::var(k).ok())?;
    if let Some(b) = args.bind {
        settings.bind = b;
    }
    if args.dev_auth {
        settings.auth.dev = true;
    }
    if args.live_views {
        settings.views.auto_refresh = true;
    }
    if let Some((cert, key)) = args.tls_cert.zip(args.tls_key) {
        settings.tls = Some(TlsConfig { cert, key });
    }
    atlas_serve::auth::check_dev_auth_bind(
        &settings.auth,
        settings.bind,
        args.allow_remote_dev_auth,
    )
    .map_err(|e| anyhow::anyhow!("atlas serve: {e}"))?;
    if settings.auth.dev && !settings.bind.ip().is_loopback() {
        eprintln!(
            "atlas serve: WARNING: dev auth on {}: anyone who can read the lake can mint accepted tokens",
            settings.bind
        );
    }
    Ok(settings)
}

/// Warnings about the opened server: key files others can read, and no
/// issuer at all (every data request would get 401).
fn warn_about(state: &AppState) {
    for w in atlas_serve::auth::exposed_key_files(&state.lake) {
        eprintln!("atlas serve: WARNING: {w}");
    }
    if !state.auth.has_issuers() {
        eprintln!(
            "atlas serve: no token issuer is configured, so every data request will get 401; \
             add [[auth.issuers]] to the config or pass --dev-auth"
        );
    }
}
