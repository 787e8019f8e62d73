//! `atlas fhircast listen`: a FHIRcast STU3 subscriber that follows an
//! external hub's topic over WebSocket, acknowledges each event, and
//! republishes it to the Atlas hub's topic as a request-context-change
//! (so `GET /events` and Atlas's own FHIRcast subscribers see it).
//!
//! The loop: subscribe (form POST, 202 with `hub.channel.endpoint`),
//! connect, read the confirmation, then for each event POST it to
//! `<to>/fhircast/hub` and acknowledge it to the external hub with the
//! outcome (`200`, or Atlas's refusal status, so the external hub raises
//! its SyncError). A lost connection, a denial or an expired lease
//! resubscribes after a backoff (1 s doubling to 30 s, reset once
//! confirmed). Ctrl-C unsubscribes and closes with 1000.
//!
//! A `*-update` carries the external hub's `context.versionId`; Atlas's
//! hub keeps its own versions, so the update is sent with the version
//! Atlas's current context has (`GET <to>/fhircast/hub/<topic>`).
//! SyncErrors are not republished: they are about the external hub's
//! subscribers, not a context.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use atlas_serve::fhircast::protocol::{
    Ack, ChannelEndpoint, EventName, Inbound, Mode, Notification, SubscriptionRequest,
};
use clap::{Args, Subcommand};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[derive(Subcommand)]
pub enum FhircastCommand {
    /// Follow an external FHIRcast hub's topic and republish its context
    /// changes to this Atlas server's hub, until Ctrl-C.
    Listen(ListenArgs),
}

#[derive(Args)]
#[command(after_help = "Examples:
  atlas fhircast listen --hub https://ehr.example/fhircast/hub --topic 7544fe65 \\
      --token-file ehr.token --to http://127.0.0.1:8080 --to-token-file atlas.token
  atlas fhircast listen --hub http://127.0.0.1:9000/hub --topic demo --events 'Patient-*,Encounter-*' \\
      --to http://127.0.0.1:8080 --to-topic demo --to-token \"$(atlas token --sub me \\
      --scope 'user/*.rs fhircast/*.write' --fhircast-topic demo)\"

The Atlas token needs fhircast/<event>.write scopes and the Atlas topic (its hub.topic claim,
or [fhircast] open_topics on the server). Events are acknowledged to the external hub with
200 once Atlas accepted them, or with Atlas's error status otherwise.")]
pub struct ListenArgs {
    /// The external hub's URL (`hub.url`).
    #[arg(long)]
    pub hub: String,
    /// The session topic to follow on the external hub.
    #[arg(long)]
    pub topic: String,
    /// The events to subscribe to (comma-separated, wildcards allowed).
    #[arg(
        long,
        default_value = "Patient-open,Patient-close,Encounter-open,Encounter-close"
    )]
    pub events: String,
    /// Bearer token for the external hub.
    #[arg(long, conflicts_with = "token_file")]
    pub token: Option<String>,
    /// A file holding the bearer token for the external hub.
    #[arg(long)]
    pub token_file: Option<std::path::PathBuf>,
    /// The Atlas server's base URL (`http://127.0.0.1:8080`).
    #[arg(long)]
    pub to: String,
    /// The topic on the Atlas hub (default: the same as --topic).
    #[arg(long)]
    pub to_topic: Option<String>,
    /// Bearer token for the Atlas server.
    #[arg(long, conflicts_with = "to_token_file")]
    pub to_token: Option<String>,
    /// A file holding the bearer token for the Atlas server.
    #[arg(long)]
    pub to_token_file: Option<std::path::PathBuf>,
    /// The lease to ask for, in seconds (the hub may grant less).
    #[arg(long)]
    pub lease: Option<u64>,
    /// How this subscriber is named in the external hub's SyncErrors.
    #[arg(long, default_value = "atlas-fhircast-listen")]
    pub name: String,
}

pub async fn run(cmd: FhircastCommand) -> Result<()> {
    match cmd {
        FhircastCommand::Listen(args) => listen(args).await,
    }
}

fn token(inline: &Option<String>, file: &Option<std::path::PathBuf>) -> Result<Option<String>> {
    match (inline, file) {
        (Some(t), _) => Ok(Some(t.trim().to_owned())),
        (None, Some(f)) => {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("reading the token file {}", f.display()))?;
            Ok(Some(t.trim().to_owned()))
        }
        (None, None) => Ok(None),
    }
}

/// What the listener holds between subscriptions.
struct Listener {
    http: reqwest::Client,
    hub: String,
    topic: String,
    events: String,
    token: Option<String>,
    to: String,
    to_topic: String,
    to_token: Option<String>,
    lease: Option<u64>,
    name: String,
}

/// How one subscription ended.
enum End {
    /// Ctrl-C: unsubscribed; stop.
    Stop,
    /// Resubscribe (after a backoff unless the subscription had worked).
    Again { confirmed: bool, why: String },
}

async fn listen(args: ListenArgs) -> Result<()> {
    // reqwest's rustls and the wss connector need a process-wide provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    if atlas_serve::fhircast::protocol::EventPattern::parse_list(&args.events).is_err() {
        bail!("--events {:?}: not a list of FHIRcast events", args.events);
    }
    let l = Listener {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?,
        token: token(&args.token, &args.token_file)?,
        to_token: token(&args.to_token, &args.to_token_file)?,
        hub: args.hub.trim_end_matches('/').to_owned(),
        to_topic: args.to_topic.unwrap_or_else(|| args.topic.clone()),
        topic: args.topic,
        events: args.events,
        to: args.to.trim_end_matches('/').to_owned(),
        lease: args.lease,
        name: args.name,
    };
    let mut backoff = Duration::from_secs(1);
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        match l.session(&mut stop).await {
            End::Stop => return Ok(()),
            End::Again { confirmed, why } => {
                if confirmed {
                    backoff = Duration::from_secs(1);
                }
                eprintln!("fhircast: {why}; resubscribing in {} s", backoff.as_secs());
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = &mut stop => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

type Io = Box<dyn IoStream>;
trait IoStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> IoStream for T {}

/// Connects a ws:// or wss:// URL (TLS verified with the platform's roots).
async fn connect(url: &str) -> Result<tokio_tungstenite::WebSocketStream<Io>> {
    let u = url::Url::parse(url).with_context(|| format!("endpoint {url:?} is not a URL"))?;
    let host = u
        .host_str()
        .ok_or_else(|| anyhow!("endpoint {url:?} has no host"))?
        .to_owned();
    let port = u
        .port_or_known_default()
        .ok_or_else(|| anyhow!("endpoint {url:?} has no port"))?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| anyhow!("connecting to {host}:{port} timed out"))??;
    let io: Io = match u.scheme() {
        "ws" => Box::new(tcp),
        "wss" => {
            use rustls_platform_verifier::BuilderVerifierExt;
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_platform_verifier()?
                .with_no_client_auth();
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| anyhow!("{host}: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await?;
            Box::new(tls)
        }
        other => bail!("endpoint {url:?}: scheme {other} is not ws or wss"),
    };
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(url, io),
    )
    .await
    .map_err(|_| anyhow!("the WebSocket handshake timed out"))??;
    Ok(ws)
}

impl Listener {
    fn bearer(req: reqwest::RequestBuilder, token: &Option<String>) -> reqwest::RequestBuilder {
        match token {
            Some(t) => req.header("authorization", format!("Bearer {t}")),
            None => req,
        }
    }

    /// POSTs a subscription form to the external hub: the endpoint URL.
    async fn form(&self, r: &SubscriptionRequest) -> Result<String> {
        let req = self
            .http
            .post(&self.hub)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(r.to_form());
        let resp = Self::bearer(req, &self.token).send().await?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("the hub answered {status}: {}", text.trim());
        }
        let ep: ChannelEndpoint = serde_json::from_str(&text)
            .with_context(|| format!("the hub's answer has no hub.channel.endpoint: {text}"))?;
        Ok(ep.endpoint)
    }

    fn request(&self, mode: Mode, endpoint: Option<String>) -> SubscriptionRequest {
        SubscriptionRequest {
            channel_type: "websocket".into(),
            mode,
            topic: self.topic.clone(),
            events: (mode == Mode::Subscribe).then(|| self.events.clone()),
            lease_seconds: if mode == Mode::Subscribe {
                self.lease
            } else {
                None
            },
            channel_endpoint: endpoint,
            subscriber_name: (mode == Mode::Subscribe).then(|| self.name.clone()),
        }
    }

    /// One subscription, from the POST to its end.
    async fn session(&self, stop: &mut (impl std::future::Future + Unpin)) -> End {
        let again = |why: String| End::Again {
            confirmed: false,
            why,
        };
        let endpoint = match self.form(&self.request(Mode::Subscribe, None)).await {
            Ok(e) => e,
            Err(e) => return again(format!("subscribing failed: {e:#}")),
        };
        let mut ws = match connect(&endpoint).await {
            Ok(ws) => ws,
            Err(e) => return again(format!("connecting to the endpoint failed: {e:#}")),
        };
        let mut confirmed = false;
        loop {
            let msg = tokio::select! {
                m = ws.next() => m,
                _ = &mut *stop => {
                    // Unsubscribe first (the hub then closes), then close ours.
                    if let Err(e) = self.form(&self.request(Mode::Unsubscribe, Some(endpoint.clone()))).await {
                        eprintln!("fhircast: unsubscribing failed: {e:#}");
                    }
                    let _ = ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() })).await;
                    return End::Stop;
                }
            };
            let text = match msg {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(f))) => {
                    return End::Again {
                        confirmed,
                        why: format!(
                            "the hub closed the socket ({})",
                            f.map(|f| format!("{} {}", u16::from(f.code), f.reason))
                                .unwrap_or_default()
                        ),
                    };
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    return End::Again {
                        confirmed,
                        why: format!("socket error: {e}"),
                    };
                }
                None => {
                    return End::Again {
                        confirmed,
                        why: "the socket ended".into(),
                    };
                }
            };
            match Inbound::parse(text.as_str()) {
                Ok(Inbound::Confirmation(c)) => {
                    confirmed = true;
                    eprintln!(
                        "fhircast: following {} ({}) for {} s",
                        c.topic, c.events, c.lease_seconds
                    );
                }
                Ok(Inbound::Denial(d)) => {
                    return End::Again {
                        confirmed,
                        why: format!(
                            "the hub denied the subscription: {}",
                            d.reason.unwrap_or_default()
                        ),
                    };
                }
                Ok(Inbound::Notification(n)) => {
                    let status = self.republish(n.clone()).await;
                    let ack = serde_json::to_string(&Ack::new(&n.id, status)).unwrap_or_default();
                    if let Err(e) = ws.send(Message::Text(ack.into())).await {
                        return End::Again {
                            confirmed,
                            why: format!("acknowledging failed: {e}"),
                        };
                    }
                }
                Err(e) => eprintln!("fhircast: ignoring a message that is not FHIRcast: {e}"),
            }
        }
    }

    /// Sends an event to the Atlas hub; the status to acknowledge with.
    async fn republish(&self, mut n: Notification) -> u16 {
        let event = match EventName::parse(&n.event.event) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("fhircast: not republished: {e}");
                return 200;
            }
        };
        if event == EventName::SyncError {
            return 200;
        }
        n.event.topic = self.to_topic.clone();
        n.event.prior_version_id = None;
        n.event.version_id = match event.action() {
            Some(atlas_serve::fhircast::protocol::Action::Update) => self.atlas_version().await,
            _ => None,
        };
        let url = format!("{}/fhircast/hub", self.to);
        let req = self
            .http
            .post(&url)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&n).unwrap_or_default());
        match Self::bearer(req, &self.to_token).send().await {
            Ok(r) if r.status().is_success() => {
                eprintln!("fhircast: {} {} republished", event, n.id);
                200
            }
            Ok(r) => {
                let status = r.status().as_u16();
                let text = r.text().await.unwrap_or_default();
                eprintln!(
                    "fhircast: Atlas refused {event} {}: {status} {}",
                    n.id,
                    text.trim()
                );
                status
            }
            Err(e) => {
                eprintln!("fhircast: Atlas unreachable: {e}");
                500
            }
        }
    }

    /// The `context.versionId` of Atlas's current context on the topic.
    async fn atlas_version(&self) -> Option<String> {
        let url = format!("{}/fhircast/hub/{}", self.to, self.to_topic);
        let r = Self::bearer(self.http.get(&url), &self.to_token)
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.ok()?).ok()?;
        v.get("context.versionId")
            .and_then(|s| s.as_str())
            .map(str::to_owned)
    }
}
