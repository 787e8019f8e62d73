//! Connector errors: each says which URL, file or key it is about.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{method} {url}: {source}")]
    Http {
        method: String,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{method} {url}: HTTP {status}{}", detail_suffix(.detail))]
    Status {
        method: String,
        url: String,
        status: u16,
        detail: String,
    },
    #[error("{url}: {message}")]
    Protocol { url: String, message: String },
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("client key {}: {message}", .path.display())]
    Key { path: PathBuf, message: String },
    #[error("token endpoint {url} refused the client: {error}{}", detail_suffix(.description))]
    Auth {
        url: String,
        error: String,
        description: String,
    },
    #[error("connector state {path}: {message}")]
    State { path: String, message: String },
    #[error("the export's file {url} is gone (HTTP {status}): the server expired the job's files")]
    Expired { url: String, status: u16 },
    #[error("{what}: gave up after {attempts} attempts; last error: {last}")]
    GaveUp {
        what: String,
        attempts: u32,
        last: String,
    },
    #[error("{0}")]
    Usage(String),
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

impl ConnectError {
    pub(crate) fn protocol(url: impl Into<String>, message: impl Into<String>) -> Self {
        ConnectError::Protocol {
            url: url.into(),
            message: message.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| ConnectError::Io { path, source }
    }
}

/// The text of an OperationOutcome (its issues' diagnostics and details),
/// or the start of the body when it is not one: what a server said.
pub fn outcome_text(body: &[u8]) -> String {
    let shown = || {
        let s = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return shown();
    };
    let issues: Vec<String> = v["issue"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| {
                    i["diagnostics"]
                        .as_str()
                        .or_else(|| i["details"]["text"].as_str())
                        .or_else(|| i["code"].as_str())
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    if issues.is_empty() {
        shown()
    } else {
        issues.join("; ")
    }
}
