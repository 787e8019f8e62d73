//! The errors of building and starting a mock EHR (the HTTP endpoints
//! answer their own errors as OperationOutcomes, never with these).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum MockError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid mock EHR configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("this mock EHR is already started: start it once, or build another")]
    AlreadyStarted,
}

impl MockError {
    /// For `map_err`: an I/O error on `path`.
    pub(crate) fn io(path: &Path) -> impl Fn(std::io::Error) -> MockError + '_ {
        move |source| MockError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
