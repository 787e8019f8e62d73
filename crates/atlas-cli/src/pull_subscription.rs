//! `atlas pull subscription`: a FHIR Subscriptions (R4 backport) rest-hook
//! receiver that turns another server's notifications into incremental
//! REST pulls of one connector.
//!
//! It listens on `--listen` for the notification Bundles the server POSTs
//! (its Subscription's `channel.endpoint` points here): handshakes and
//! heartbeats are answered 200; event notifications are answered 200 at
//! once and queue a pull of the types they name (focus references and
//! entries; every `--type`, or every searchable type, for empty payloads).
//! A burst of notifications becomes one pull: the pull starts once no
//! notification came for `--debounce-ms` (and at the latest five times
//! that after the first). The pull is `atlas pull rest`'s, under the same
//! connector state and the writer lease, so it reads what changed since
//! the connector's watermarks, whatever the notifications carried: a
//! notification lost on the way costs nothing once the next one comes.
//!
//! The listener is plain HTTP/1.1 (one request per connection; put a TLS
//! proxy in front of it outside loopback), bounded: at most 64 connections
//! at once, a 16 KiB header, `--max-body-bytes`, and a deadline per
//! request. `--require-header 'Name: value'` (the Subscription's
//! `channel.header`) refuses notifications without it (401); the value is
//! compared in constant time and never printed.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use atlas_connect::bulk::PullProgress;
use atlas_connect::http::HttpClient;
use atlas_connect::rest::{Capabilities, RestOptions, RestPull};
use atlas_lake::Lake;
use atlas_serve::subscriptions::backport::{Notification, NotificationType};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};

use super::{AuthArgs, PullCommon};
use crate::cli::Globals;
use crate::{lake, progress};

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;
/// The request line and headers, at most.
const MAX_HEAD: usize = 16 << 10;
/// Subscriptions whose event counts are remembered (to report gaps).
const MAX_TRACKED: usize = 1000;

#[derive(Args)]
#[command(after_help = "Example:
  atlas pull subscription https://ehr.example/fhir --listen 127.0.0.1:8095 --connector ehr \\
      --client-id atlas --key atlas.pem --require-header 'X-Hook-Secret: s3cret'
  # then, at the EHR: a Subscription (R4 backport) with channel.type rest-hook,
  # channel.endpoint https://<this host, behind TLS>/ and channel.header 'X-Hook-Secret: s3cret'

Each notification queues a pull of the types it names; a burst becomes one pull (--debounce-ms).
The pull is `atlas pull rest`'s for the same connector: what changed since its watermarks.")]
pub struct SubscriptionArgs {
    /// The FHIR base URL of the server sending the notifications (the connector's server).
    pub base: String,
    /// Where to listen for rest-hook notifications (host:port).
    #[arg(long)]
    pub listen: SocketAddr,
    /// The connector: raw/<name>/... in the lake and its state under connectors/<name>/
    /// (the --source of `atlas pull rest`).
    #[arg(long, visible_alias = "source", default_value = "ehr")]
    pub connector: String,
    /// Types pulled (comma-separated or repeated): a notification's other types are ignored,
    /// and an empty-payload notification pulls all of these (default: every searchable type).
    #[arg(long = "type", value_delimiter = ',')]
    pub types: Vec<String>,
    /// A header every notification must carry, 'Name: value' (the Subscription's
    /// channel.header); notifications without it are refused with 401.
    #[arg(long, env = "ATLAS_SUBSCRIPTION_HEADER", hide_env_values = true)]
    pub require_header: Option<String>,
    /// Quiet time after a notification before pulling, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub debounce_ms: u64,
    /// Largest notification body taken, in bytes.
    #[arg(long, default_value_t = 32 << 20)]
    pub max_body_bytes: usize,
    /// Deadline for reading and answering one notification, in seconds.
    #[arg(long, default_value_t = 30)]
    pub request_timeout_secs: u64,
    /// Pull once before listening (what changed while nothing listened).
    #[arg(long)]
    pub pull_at_start: bool,
    /// Stop after this many pulls (for scripts and tests).
    #[arg(long)]
    pub max_pulls: Option<u64>,
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
    pub auth: AuthArgs,
    /// Staging folder for downloads (default: inside a local lake, else the system temp folder).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Longest wait between retries, whatever `Retry-After` says.
    #[arg(long, default_value_t = 120.0)]
    pub max_wait_secs: f64,
    /// Longest accepted NDJSON line in bytes; longer lines are quarantined.
    #[arg(long, default_value_t = 64 << 20)]
    pub max_line_bytes: usize,
    /// Attempts per request (429, 5xx, broken connections).
    #[arg(long, default_value_t = 8)]
    pub attempts: u32,
}

/// What the listener hands the puller.
#[derive(Default)]
struct Inbox {
    queued: Mutex<Queued>,
    wake: Notify,
}

#[derive(Default)]
struct Queued {
    /// Types named since the last pull.
    types: BTreeSet<String>,
    /// A notification named none (empty payload): pull every type.
    all: bool,
    first: Option<Instant>,
    last: Option<Instant>,
    /// The last events-since-subscription-start of each subscription seen.
    counts: HashMap<String, u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the listener checks.
struct Listen {
    required: Option<(String, String)>,
    max_body: usize,
    deadline: Duration,
    /// `--type`: only these are pulled (empty: any).
    only: BTreeSet<String>,
}

pub async fn run(args: SubscriptionArgs, g: &Globals) -> Result<()> {
    let lake = lake::open_lake(&g.lake)?;
    let common = PullCommon {
        source: args.connector.clone(),
        auth: args.auth.clone(),
        work_dir: args.work_dir.clone(),
        max_wait_secs: args.max_wait_secs,
        max_line_bytes: args.max_line_bytes,
        attempts: args.attempts,
        json: false,
    };
    if let Some(t) = args.types.iter().find(|t| !atlas_fhir::is_resource_type(t)) {
        bail!("--type {t}: not a FHIR R4 resource type");
    }
    // The connector must be this server's (or new) before anything listens.
    super::connector(
        &lake,
        &common.source,
        Some(&args.base),
        common.work_dir.as_deref(),
    )
    .await?;
    let required = args
        .require_header
        .as_deref()
        .map(parse_header)
        .transpose()?;
    let http = super::client(&args.base, &common.auth, super::http_options(&common)).await?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    eprintln!(
        "listening for FHIR Subscription notifications on http://{addr}/ (connector {}, {})",
        common.source,
        if required.is_some() {
            "header required"
        } else {
            "no header required"
        }
    );
    let inbox = Arc::new(Inbox::default());
    let listen = Arc::new(Listen {
        required,
        max_body: args.max_body_bytes,
        deadline: Duration::from_secs(args.request_timeout_secs.max(1)),
        only: args.types.iter().cloned().collect(),
    });
    let server = tokio::spawn(accept(listener, inbox.clone(), listen));
    let opts = RestOptions {
        page_size: args.page_size.max(1),
        parallel: args.parallel.max(1),
        history: !args.no_history,
        ..RestOptions::default()
    };
    let puller = Puller {
        lake: &lake,
        base: &args.base,
        http,
        common: &common,
        opts,
        show: g.show,
        caps: None,
    };
    let result = tokio::select! {
        r = pull_loop(puller, &inbox, &args) => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\nstopped");
            Ok(())
        }
    };
    server.abort();
    result
}

/// `Name: value`.
fn parse_header(h: &str) -> Result<(String, String)> {
    let (n, v) = h
        .split_once(':')
        .context("--require-header is 'Name: value'")?;
    let (n, v) = (n.trim(), v.trim());
    if n.is_empty() || v.is_empty() || !n.bytes().all(|b| b.is_ascii_graphic()) {
        bail!("--require-header is 'Name: value'");
    }
    Ok((n.to_ascii_lowercase(), v.to_owned()))
}

/// Waits for notifications and pulls, a burst at a time.
async fn pull_loop(mut p: Puller<'_>, inbox: &Inbox, args: &SubscriptionArgs) -> Result<()> {
    let debounce = Duration::from_millis(args.debounce_ms);
    let mut pulls = 0u64;
    if args.pull_at_start {
        p.pull_logged(&args.types).await;
        pulls += 1;
    }
    loop {
        if args.max_pulls.is_some_and(|m| pulls >= m) {
            return Ok(());
        }
        // Wait for something queued, then for the burst to end.
        loop {
            let (first, last) = {
                let q = lock(&inbox.queued);
                (q.first, q.last)
            };
            let (Some(first), Some(last)) = (first, last) else {
                inbox.wake.notified().await;
                continue;
            };
            let quiet = last + debounce;
            let latest = first + debounce * 5;
            let at = quiet.min(latest);
            if Instant::now() >= at {
                break;
            }
            tokio::time::sleep_until(at.into()).await;
        }
        let (types, all) = {
            let mut q = lock(&inbox.queued);
            q.first = None;
            q.last = None;
            q.all |= q.types.is_empty();
            (
                std::mem::take(&mut q.types),
                std::mem::replace(&mut q.all, false),
            )
        };
        let types: Vec<String> = if all {
            args.types.clone()
        } else {
            types.into_iter().collect()
        };
        p.pull_logged(&types).await;
        pulls += 1;
    }
}

/// One connector's pulls.
struct Puller<'a> {
    lake: &'a Lake,
    base: &'a str,
    http: HttpClient,
    common: &'a PullCommon,
    opts: RestOptions,
    show: bool,
    caps: Option<Capabilities>,
}

impl Puller<'_> {
    /// A failed pull is reported, not fatal: the next notification pulls
    /// again from the same watermarks.
    async fn pull_logged(&mut self, types: &[String]) {
        let started = Instant::now();
        let what = if types.is_empty() {
            "every type".to_owned()
        } else {
            types.join(",")
        };
        match self.pull(types).await {
            Ok(()) => eprintln!("pulled {what} in {:.1} s", started.elapsed().as_secs_f64()),
            Err(e) => eprintln!("pull of {what} failed (the next notification retries): {e:#}"),
        }
    }

    async fn pull(&mut self, types: &[String]) -> Result<()> {
        let lease = progress::take_lease(self.lake, true, self.show).await?;
        let result = self.pull_leased(types, &lease).await;
        lake::release(lease, result).await
    }

    async fn pull_leased(
        &mut self,
        types: &[String],
        lease: &atlas_lake::WriterLease,
    ) -> Result<()> {
        let c = self.common;
        let (store, mut state, staging) =
            super::connector(self.lake, &c.source, Some(self.base), c.work_dir.as_deref()).await?;
        let progress = std::sync::Arc::new(PullProgress::default());
        let pull = RestPull::new(
            self.http.clone(),
            self.base,
            &store,
            staging,
            progress,
            self.opts.clone(),
        )?;
        if self.caps.is_none() {
            self.caps = Some(
                pull.capabilities()
                    .await
                    .context("reading the server's CapabilityStatement")?,
            );
        }
        let caps = self.caps.as_ref().context("no capabilities")?;
        // A notification may name types the server does not let us search.
        let searchable: Vec<String> = types
            .iter()
            .filter(|t| caps.types.get(*t).is_some_and(|c| c.search))
            .cloned()
            .collect();
        if !types.is_empty() && searchable.is_empty() {
            eprintln!(
                "nothing to pull: the server offers no search of {}",
                types.join(",")
            );
            return Ok(());
        }
        let pulled = pull.run(&mut state, &searchable, caps, None).await?;
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
        let report = super::ingest_paths(
            self.lake,
            &c.source,
            &paths,
            &Default::default(),
            c,
            self.show,
            lease,
        )
        .await?;
        state.last_run = Some(super::run_record(
            "subscription",
            pulled.files.len() as u64,
            bytes,
            &report,
        ));
        pull.finish(&mut state).await?;
        Ok(())
    }
}

/// Accepts connections, each answered on its own task within the deadline.
async fn accept(listener: TcpListener, inbox: Arc<Inbox>, listen: Arc<Listen>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (inbox, listen) = (inbox.clone(), listen.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if tokio::time::timeout(listen.deadline, serve(sock, &inbox, &listen))
                .await
                .is_err()
            {
                tracing::info!(%peer, "notification not read within the deadline; connection closed");
            }
        });
    }
}

/// One request read off a connection.
struct Request {
    method: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// Reads one request and answers it.
async fn serve(mut sock: TcpStream, inbox: &Inbox, listen: &Listen) {
    let (status, text) = match read_request(&mut sock, listen.max_body).await {
        Ok(req) => answer(&req, inbox, listen),
        Err((status, text)) => (status, text),
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        _ => "Error",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = sock.write_all(response.as_bytes()).await;
    let _ = sock.shutdown().await;
}

type HttpError = (u16, String);

async fn read_request(sock: &mut TcpStream, max_body: usize) -> Result<Request, HttpError> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err((400, "request head too large".into()));
        }
        let n = sock
            .read(&mut chunk)
            .await
            .map_err(|_| (400, "connection error".to_owned()))?;
        if n == 0 {
            return Err((400, "incomplete request".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| (400, "request head is not text".to_owned()))?;
    let mut lines = head.split("\r\n");
    let method = lines
        .next()
        .and_then(|l| l.split(' ').next())
        .unwrap_or_default()
        .to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    if header("expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue")) {
        let _ = sock.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
    }
    let mut rest = buf[head_end + 4..].to_vec();
    let chunked =
        header("transfer-encoding").is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        read_chunked(sock, rest, max_body).await?
    } else {
        let len: usize = match header("content-length") {
            Some(v) => v
                .parse()
                .map_err(|_| (400, "bad content-length".to_owned()))?,
            None if method == "POST" => return Err((411, "content-length required".into())),
            None => 0,
        };
        if len > max_body {
            return Err((413, format!("notifications are at most {max_body} bytes")));
        }
        while rest.len() < len {
            let n = sock
                .read(&mut chunk)
                .await
                .map_err(|_| (400, "connection error".to_owned()))?;
            if n == 0 {
                return Err((400, "body shorter than its content-length".into()));
            }
            rest.extend_from_slice(&chunk[..n]);
        }
        rest.truncate(len);
        rest
    };
    Ok(Request {
        method,
        headers,
        body,
    })
}

/// A chunked body, `max_body` bytes at most.
async fn read_chunked(
    sock: &mut TcpStream,
    mut buf: Vec<u8>,
    max_body: usize,
) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        // The size line.
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            if buf.len() > 1024 {
                return Err((400, "bad chunk".into()));
            }
            let n = sock
                .read(&mut chunk)
                .await
                .map_err(|_| (400, "connection error".to_owned()))?;
            if n == 0 {
                return Err((400, "incomplete chunked body".into()));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let size_text = std::str::from_utf8(&buf[..line_end]).unwrap_or_default();
        let size =
            usize::from_str_radix(size_text.split(';').next().unwrap_or_default().trim(), 16)
                .map_err(|_| (400, "bad chunk size".to_owned()))?;
        buf.drain(..line_end + 2);
        if size == 0 {
            return Ok(body);
        }
        if body.len() + size > max_body {
            return Err((413, format!("notifications are at most {max_body} bytes")));
        }
        while buf.len() < size + 2 {
            let n = sock
                .read(&mut chunk)
                .await
                .map_err(|_| (400, "connection error".to_owned()))?;
            if n == 0 {
                return Err((400, "incomplete chunked body".into()));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

/// Equal bytes, in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The answer to one request; event notifications queue a pull.
fn answer(req: &Request, inbox: &Inbox, listen: &Listen) -> (u16, String) {
    match req.method.as_str() {
        "POST" => {}
        "GET" | "HEAD" => return (200, "atlas FHIR Subscription receiver\n".into()),
        _ => return (405, "POST notifications here\n".into()),
    }
    if let Some((name, value)) = &listen.required {
        let ok = req
            .headers
            .iter()
            .any(|(n, v)| n == name && same(v.as_bytes(), value.as_bytes()));
        if !ok {
            tracing::info!("notification without the required header refused");
            return (401, "the required header is missing or wrong\n".into());
        }
    }
    let n = match Notification::parse(&req.body) {
        Ok(n) => n,
        Err(e) => return (400, format!("not a notification Bundle: {e}\n")),
    };
    let sub = n.status.subscription.clone();
    match n.status.kind {
        NotificationType::Handshake => {
            eprintln!("handshake from {sub}");
        }
        NotificationType::Heartbeat => {
            tracing::debug!(subscription = %sub, "heartbeat");
        }
        NotificationType::EventNotification => {
            let named: BTreeSet<String> = n
                .focus_types()
                .into_iter()
                .filter(|t| atlas_fhir::is_resource_type(t))
                .collect();
            let wanted: BTreeSet<String> = named
                .iter()
                .filter(|t| listen.only.is_empty() || listen.only.contains(*t))
                .cloned()
                .collect();
            let now = Instant::now();
            let mut q = lock(&inbox.queued);
            if let Some(count) = n.status.events_since_start {
                let before = q.counts.get(&sub).copied();
                let first = n.status.events.iter().map(|e| e.number).min();
                if let (Some(b), Some(f)) = (before, first)
                    && f > b + 1
                {
                    eprintln!(
                        "{sub}: events {}-{} were not received; the pull reads them anyway",
                        b + 1,
                        f - 1
                    );
                }
                if q.counts.len() >= MAX_TRACKED && !q.counts.contains_key(&sub) {
                    q.counts.clear();
                }
                q.counts.insert(sub.clone(), count);
            }
            // Named types the listener does not pull: nothing to do.
            if !named.is_empty() && wanted.is_empty() {
                return (200, "ok\n".into());
            }
            if named.is_empty() {
                q.all = true;
            }
            q.types.extend(wanted);
            q.first.get_or_insert(now);
            q.last = Some(now);
            drop(q);
            inbox.wake.notify_one();
        }
        NotificationType::QueryStatus | NotificationType::QueryEvent => {}
    }
    (200, "ok\n".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_compare_in_full() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
        assert_eq!(
            parse_header("X-Hook-Secret:  s3cret ").unwrap(),
            ("x-hook-secret".to_owned(), "s3cret".to_owned())
        );
        assert!(parse_header("nocolon").is_err());
    }
}
