//! The one HTTP client of every connector.
//!
//! [`HttpClient::send`] owns what every request to a FHIR server needs:
//! * a deadline (connect timeout, a read timeout between body chunks, and
//!   a whole-request timeout for everything but file downloads);
//! * retries of connection failures and of 429, 500, 502, 503 and 504,
//!   waiting what `Retry-After` says (clamped, [`crate::retry`]) or an
//!   exponential backoff with jitter, up to the policy's attempts;
//! * the bearer token of a [`TokenSource`] when the request asks for it, and
//!   one renewal when the server answers 401;
//! * redirects followed by hand (up to 5): `Authorization` goes to the
//!   origin the request was made to and never to another one (a 307 to a
//!   storage host must not leak the token).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::{Method, StatusCode};
use url::Url;

use crate::error::{ConnectError, outcome_text};
use crate::retry::RetryPolicy;
use crate::smart::TokenSource;

/// Timeouts of the client.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    pub connect_timeout: Duration,
    /// Longest silence while reading a body.
    pub read_timeout: Duration,
    /// Deadline of a whole request (not of file downloads, which may be large).
    pub request_timeout: Duration,
    pub retry: RetryPolicy,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            connect_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(120),
            request_timeout: Duration::from_secs(300),
            retry: RetryPolicy::default(),
        }
    }
}

/// One request as the connectors describe it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    pub url: Url,
    pub headers: Vec<(&'static str, String)>,
    pub body: Option<Bytes>,
    /// Send the bearer token (to this URL's origin only).
    pub auth: bool,
    /// No whole-request deadline (file downloads: the read timeout still applies).
    pub streaming: bool,
    /// Safe to send twice. A kick-off POST is not: a retry after a 5xx or a
    /// broken connection could start a second export, so it is retried only
    /// on 429 (the server refused it) and on connections never made.
    pub idempotent: bool,
}

impl Request {
    pub fn get(url: Url) -> Request {
        Request {
            method: Method::GET,
            url,
            headers: vec![("accept", "application/fhir+json".into())],
            body: None,
            auth: true,
            streaming: false,
            idempotent: true,
        }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Request {
        self.headers.retain(|(n, _)| *n != name);
        self.headers.push((name, value.into()));
        self
    }
}

/// The connectors' HTTP client (cheap to clone).
#[derive(Clone)]
pub struct HttpClient {
    inner: reqwest::Client,
    opts: HttpOptions,
    auth: Option<Arc<TokenSource>>,
    /// The only origin the token is sent to (the FHIR base's): URLs a server
    /// hands out (status, manifest pages, files, `next` links) may point
    /// anywhere, and a token must not follow them there.
    token_origin: Option<Url>,
}

/// Statuses worth another attempt.
fn retryable(s: StatusCode) -> bool {
    matches!(s.as_u16(), 429 | 500 | 502 | 503 | 504)
}

/// The request never reached the server (nothing to undo by not retrying).
fn never_connected(e: &ConnectError) -> bool {
    matches!(e, ConnectError::Http { source, .. } if source.is_connect())
}

fn is_redirect(s: StatusCode) -> bool {
    matches!(s.as_u16(), 301 | 302 | 303 | 307 | 308)
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// A reqwest client with the connectors' settings: rustls, no automatic
/// redirects (they are followed by hand), timeouts.
pub fn build_reqwest(opts: &HttpOptions) -> Result<reqwest::Client, ConnectError> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(opts.connect_timeout)
        .read_timeout(opts.read_timeout)
        .user_agent(concat!("atlas/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|source| ConnectError::Http {
            method: "CLIENT".into(),
            url: String::new(),
            source,
        })
}

impl HttpClient {
    pub fn new(opts: HttpOptions, auth: Option<Arc<TokenSource>>) -> Result<Self, ConnectError> {
        Ok(HttpClient {
            inner: build_reqwest(&opts)?,
            opts,
            auth,
            token_origin: None,
        })
    }

    /// Sends the token to `base`'s origin only (see `token_origin`).
    pub fn with_token_origin(mut self, base: &Url) -> Self {
        self.token_origin = Some(base.clone());
        self
    }

    fn token_allowed(&self, url: &Url) -> bool {
        self.token_origin
            .as_ref()
            .is_none_or(|o| same_origin(o, url))
    }

    pub fn retry(&self) -> &RetryPolicy {
        &self.opts.retry
    }

    pub fn token_source(&self) -> Option<&Arc<TokenSource>> {
        self.auth.as_ref()
    }

    /// Sends `req`, retrying and following redirects as the module doc
    /// says. Returns the final response whatever its status (after retries
    /// of retryable ones); errors only when no response could be had.
    pub async fn send(&self, req: &Request) -> Result<reqwest::Response, ConnectError> {
        let mut renewed = false;
        let mut attempt = 0u32;
        loop {
            let token = match (&self.auth, req.auth) {
                (Some(src), true) if self.token_allowed(&req.url) => Some(src.token().await?),
                (Some(_), true) => {
                    tracing::warn!(url = %req.url, "not sending the access token: the URL is on another origin than the FHIR base");
                    None
                }
                _ => None,
            };
            match self.send_following(req, token.as_deref()).await {
                Ok(r) if r.status() == StatusCode::UNAUTHORIZED && !renewed => {
                    let (Some(src), Some(stale)) = (&self.auth, &token) else {
                        return Ok(r);
                    };
                    tracing::info!(url = %req.url, "401: renewing the access token once");
                    src.renew(stale).await?;
                    renewed = true;
                }
                Ok(r)
                    if retryable(r.status())
                        && (req.idempotent || r.status() == StatusCode::TOO_MANY_REQUESTS)
                        && attempt + 1 < self.opts.retry.max_attempts =>
                {
                    let ra = r
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let wait = self.opts.retry.wait(ra.as_deref(), attempt);
                    tracing::info!(url = %req.url, status = r.status().as_u16(), retry_after = ?ra, ?wait, "server busy or failing: retrying");
                    drop(r);
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Ok(r) => return Ok(r),
                Err(e @ ConnectError::Usage(_)) => return Err(e),
                Err(e)
                    if (req.idempotent || never_connected(&e))
                        && attempt + 1 < self.opts.retry.max_attempts =>
                {
                    let wait = self.opts.retry.backoff(attempt);
                    tracing::info!(url = %req.url, error = %e, ?wait, "request failed: retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => {
                    return Err(ConnectError::GaveUp {
                        what: format!("{} {}", req.method, req.url),
                        attempts: attempt + 1,
                        last: e.to_string(),
                    });
                }
            }
        }
    }

    /// One attempt, following redirects; the token goes to the original
    /// origin only.
    async fn send_following(
        &self,
        req: &Request,
        token: Option<&str>,
    ) -> Result<reqwest::Response, ConnectError> {
        let mut url = req.url.clone();
        let mut method = req.method.clone();
        let mut body = req.body.clone();
        for _ in 0..=5 {
            let mut b = self.inner.request(method.clone(), url.clone());
            for (name, value) in &req.headers {
                b = b.header(*name, value);
            }
            if let Some(t) = token.filter(|_| same_origin(&url, &req.url)) {
                // A token never travels in clear text (loopback aside).
                crate::bulk::check_transport(&url)?;
                b = b.bearer_auth(t);
            }
            if !req.streaming {
                b = b.timeout(self.opts.request_timeout);
            }
            if let Some(body) = &body {
                b = b.body(body.clone());
            }
            let r = b.send().await.map_err(|source| ConnectError::Http {
                method: method.to_string(),
                url: url.to_string(),
                source,
            })?;
            if !is_redirect(r.status()) {
                return Ok(r);
            }
            let Some(next) = r
                .headers()
                .get("location")
                .and_then(|l| l.to_str().ok())
                .and_then(|l| url.join(l).ok())
            else {
                return Ok(r);
            };
            if r.status() == StatusCode::SEE_OTHER {
                method = Method::GET;
                body = None;
            }
            tracing::debug!(from = %url, to = %next, status = r.status().as_u16(), "redirect");
            url = next;
        }
        Err(ConnectError::protocol(
            req.url.as_str(),
            "more than 5 redirects",
        ))
    }

    /// Sends and reads a whole (small) body, failing on any non-2xx status
    /// with the server's OperationOutcome text.
    pub async fn fetch(
        &self,
        req: &Request,
    ) -> Result<(StatusCode, reqwest::header::HeaderMap, Bytes), ConnectError> {
        let r = self.send(req).await?;
        let (status, headers) = (r.status(), r.headers().clone());
        let body = r.bytes().await.map_err(|source| ConnectError::Http {
            method: req.method.to_string(),
            url: req.url.to_string(),
            source,
        })?;
        if !status.is_success() {
            return Err(ConnectError::Status {
                method: req.method.to_string(),
                url: req.url.to_string(),
                status: status.as_u16(),
                detail: outcome_text(&body),
            });
        }
        Ok((status, headers, body))
    }

    /// GET a JSON document.
    pub async fn get_json(&self, url: Url) -> Result<serde_json::Value, ConnectError> {
        let u = url.to_string();
        let (_, _, body) = self.fetch(&Request::get(url)).await?;
        serde_json::from_slice(&body)
            .map_err(|e| ConnectError::protocol(u, format!("not JSON: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let a = Url::parse("http://127.0.0.1:80/fhir/x").unwrap();
        assert!(same_origin(
            &a,
            &Url::parse("http://127.0.0.1/files/1").unwrap()
        ));
        assert!(!same_origin(
            &a,
            &Url::parse("http://127.0.0.1:81/x").unwrap()
        ));
        assert!(!same_origin(
            &a,
            &Url::parse("https://127.0.0.1/x").unwrap()
        ));
        assert!(!same_origin(&a, &Url::parse("http://localhost/x").unwrap()));
    }
}
