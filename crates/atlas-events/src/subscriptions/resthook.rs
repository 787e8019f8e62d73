//! The rest-hook channel: one `POST` of a notification Bundle to the
//! subscriber's endpoint.
//!
//! Each attempt has its own timeout (the subscription's
//! `backport-timeout`). Connection failures, timeouts, 408, 429 and 5xx
//! are retried with exponential backoff and full jitter (a `Retry-After`
//! in seconds is honoured up to the longest wait); other answers are final.
//! Redirects are not followed: a redirect would carry the channel headers
//! to wherever it points.
//!
//! The channel headers (usually a credential) are sent with every attempt
//! and shown nowhere: [`Endpoint`]'s `Debug`, the errors and
//! [`audit_path`] name the endpoint's host, port and path only, never its
//! query, credentials or headers.
//!
//! Unless built to allow them ([`RestHook::new`] with `private_endpoints`),
//! the sender refuses endpoints that are this machine or the private
//! network ([`is_private_ip`]): an IP literal is checked before the
//! request, and a host name is resolved by the client's own resolver,
//! which fails when any address it resolves to is private, so the
//! connection only ever goes to a checked address (no proxy either).
//! What the subscriber is told of a failure ([`DeliveryError::public_text`])
//! never tells a refused connection from a timeout or a DNS failure.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};

/// Where notifications go, with the headers sent along.
#[derive(Clone)]
pub struct Endpoint {
    url: url::Url,
    headers: HeaderMap,
}

impl Endpoint {
    /// `url` with `headers` (name, value); a header that is not valid
    /// HTTP is an error naming it (never its value).
    pub fn new(url: url::Url, headers: &[(String, String)]) -> Result<Endpoint, String> {
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            let name = HeaderName::from_bytes(n.as_bytes())
                .map_err(|_| format!("header name '{n}' is not valid"))?;
            let mut value = HeaderValue::from_str(v)
                .map_err(|_| format!("the value of header '{n}' is not valid"))?;
            value.set_sensitive(true);
            map.append(name, value);
        }
        Ok(Endpoint { url, headers: map })
    }

    pub fn url(&self) -> &url::Url {
        &self.url
    }

    /// Host, port and path: what logs and audit records may say.
    pub fn audit_path(&self) -> String {
        audit_path(&self.url)
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.headers.keys().map(HeaderName::as_str).collect();
        f.debug_struct("Endpoint")
            .field("at", &self.audit_path())
            .field("headers", &names)
            .finish()
    }
}

/// `host[:port]/path` of `url`: no scheme-specific credentials, no query,
/// no fragment.
pub fn audit_path(url: &url::Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(p) => format!("{host}:{p}{}", url.path()),
        None => format!("{host}{}", url.path()),
    }
}

/// How often, and how patiently, a notification is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Attempts in all (1: no retry).
    pub attempts: u32,
    /// The first wait; each later one doubles, up to `max`.
    pub base: Duration,
    pub max: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 5,
            base: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

impl Retry {
    /// The wait before attempt `n + 1` (after `n` failures): exponential,
    /// with full jitter so subscribers that failed together do not retry
    /// together.
    pub fn backoff(&self, n: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX))
            .min(self.max);
        let jitter: f64 = rand::random::<f64>();
        exp.mul_f64(0.5 + jitter / 2.0)
    }
}

/// A notification the endpoint took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub status: u16,
    pub attempts: u32,
}

/// Whether `ip` is this machine or a private network: loopback, private
/// (RFC 1918, fc00::/7), link-local, unspecified (and `0.0.0.0/8`,
/// IPv4-mapped and -compatible IPv6 forms of those).
pub fn is_private_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.octets()[0] == 0
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private_ip(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            // ::a.b.c.d (deprecated IPv4-compatible), but not :: and ::1.
            if seg[..6].iter().all(|s| *s == 0)
                && !v6.is_loopback()
                && !v6.is_unspecified()
                && let Some(v4) = v6.to_ipv4()
            {
                return is_private_ip(IpAddr::V4(v4));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || (seg[0] & 0xfe00) == 0xfc00
                || (seg[0] & 0xffc0) == 0xfe80
        }
    }
}

/// Whether `url`'s host is `localhost` (or under `.localhost`) or a
/// private IP literal ([`is_private_ip`]).
pub fn is_private_host(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            d == "localhost" || d.ends_with(".localhost")
        }
        Some(url::Host::Ipv4(ip)) => is_private_ip(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => is_private_ip(IpAddr::V6(ip)),
        None => true,
    }
}

/// Resolves host names, refusing any that resolves to a private address
/// (so the connection goes only to the addresses checked here).
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addrs.is_empty() {
                return Err("no address".into());
            }
            if addrs.iter().any(|a| is_private_ip(a.ip())) {
                return Err("the endpoint resolves to a private address".into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// A notification that did not get through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The endpoint answered, and not with 2xx.
    #[error("{endpoint} answered HTTP {status} (after {attempts} attempt(s))")]
    Refused {
        endpoint: String,
        status: u16,
        attempts: u32,
    },
    /// No answer: connection refused or reset, DNS, TLS, timeout.
    #[error("{endpoint} could not be reached: {reason} (after {attempts} attempt(s))")]
    Unreachable {
        endpoint: String,
        reason: String,
        attempts: u32,
    },
}

impl DeliveryError {
    /// The HTTP status the endpoint last answered, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            DeliveryError::Refused { status, .. } => Some(*status),
            DeliveryError::Unreachable { .. } => None,
        }
    }

    pub fn attempts(&self) -> u32 {
        match self {
            DeliveryError::Refused { attempts, .. }
            | DeliveryError::Unreachable { attempts, .. } => *attempts,
        }
    }

    /// What the subscriber may be told (`Subscription.error`): the status
    /// if the endpoint answered, and never why it could not be reached (a
    /// refused connection, a timeout and a DNS failure look the same, so
    /// the text is no port scanner).
    pub fn public_text(&self) -> String {
        match self {
            DeliveryError::Refused { status, .. } => format!(
                "the endpoint could not be reached or refused the notification (HTTP {status})"
            ),
            DeliveryError::Unreachable { .. } => {
                "the endpoint could not be reached or refused the notification".to_owned()
            }
        }
    }
}

/// The sender.
#[derive(Clone)]
pub struct RestHook {
    client: reqwest::Client,
    private_endpoints: bool,
}

impl RestHook {
    /// The sender; `private_endpoints`: whether endpoints on this machine
    /// or the private network may be reached (see [`is_private_ip`]).
    pub fn new(private_endpoints: bool) -> Result<RestHook, String> {
        let mut builder = reqwest::Client::builder();
        if !private_endpoints {
            // A proxy would resolve and connect where no check reaches.
            builder = builder.dns_resolver(Arc::new(PublicOnly)).no_proxy();
        }
        let client = builder
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!(
                "atlas/",
                env!("CARGO_PKG_VERSION"),
                " (FHIR Subscriptions)"
            ))
            .build()
            .map_err(|e| format!("the rest-hook client: {e}"))?;
        Ok(RestHook {
            client,
            private_endpoints,
        })
    }

    /// POSTs `body` (a notification Bundle) to `endpoint`, retrying as
    /// `retry` says, each attempt cut after `timeout`.
    pub async fn post(
        &self,
        endpoint: &Endpoint,
        body: &[u8],
        timeout: Duration,
        retry: &Retry,
    ) -> Result<Delivered, DeliveryError> {
        let attempts = retry.attempts.max(1);
        if !self.private_endpoints && is_private_host(&endpoint.url) {
            // Host names are checked by the resolver; literals and
            // `localhost` here, before anything is sent.
            return Err(DeliveryError::Unreachable {
                endpoint: endpoint.audit_path(),
                reason: "the endpoint is a private address".to_owned(),
                attempts: 1,
            });
        }
        let mut n = 0;
        loop {
            n += 1;
            let sent = self
                .client
                .post(endpoint.url.clone())
                .headers(endpoint.headers.clone())
                .header(CONTENT_TYPE, "application/fhir+json")
                .timeout(timeout)
                .body(body.to_vec())
                .send()
                .await;
            let (err, wait) = match sent {
                Ok(r) if r.status().is_success() => {
                    return Ok(Delivered {
                        status: r.status().as_u16(),
                        attempts: n,
                    });
                }
                Ok(r) => {
                    let status = r.status().as_u16();
                    let retryable = status == 408 || status == 429 || status >= 500;
                    let after = r
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|s| s.trim().parse::<u64>().ok())
                        .map(|s| Duration::from_secs(s).min(retry.max));
                    let err = DeliveryError::Refused {
                        endpoint: endpoint.audit_path(),
                        status,
                        attempts: n,
                    };
                    if !retryable {
                        return Err(err);
                    }
                    (err, after)
                }
                Err(e) => {
                    // reqwest's message may hold the URL with its query:
                    // only the kind of failure is kept.
                    let reason = if e.is_timeout() {
                        format!("no answer within {} s", timeout.as_secs_f64())
                    } else if e.is_connect() {
                        "the connection failed".to_owned()
                    } else {
                        "the request failed".to_owned()
                    };
                    (
                        DeliveryError::Unreachable {
                            endpoint: endpoint.audit_path(),
                            reason,
                            attempts: n,
                        },
                        None,
                    )
                }
            };
            if n >= attempts {
                return Err(err);
            }
            tokio::time::sleep(wait.unwrap_or_else(|| retry.backoff(n))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn host_names_resolving_to_private_addresses_are_refused() {
        use reqwest::dns::Resolve;
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        assert!(PublicOnly.resolve(name).await.is_err());
        let name: reqwest::dns::Name = "127.0.0.1".parse().unwrap();
        assert!(PublicOnly.resolve(name).await.is_err());
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let r = Retry {
            attempts: 10,
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for n in 1..12 {
            let d = r.backoff(n);
            let full = (Duration::from_millis(100) * 2u32.pow(n.min(10) - 1)).min(r.max);
            assert!(d >= full / 2 && d <= full, "{n}: {d:?} vs {full:?}");
        }
    }

    #[test]
    fn endpoints_never_show_their_secrets() {
        let u = url::Url::parse("https://user:pw@hooks.example:8443/a/b?token=s3cret#x").unwrap();
        let e = Endpoint::new(u, &[("Authorization".into(), "Bearer s3cret".into())]).unwrap();
        assert_eq!(e.audit_path(), "hooks.example:8443/a/b");
        let shown = format!("{e:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("pw"),
            "{shown}"
        );
        assert!(shown.contains("authorization"), "{shown}");
        assert!(Endpoint::new(e.url().clone(), &[("Bad Name".into(), "x".into())]).is_err());
    }
}
