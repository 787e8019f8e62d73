//! The crate's error type.

use std::path::{Path, PathBuf};

/// Why generating or scaling failed. Every I/O failure names its file.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// Reading or writing `path` failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An input path cannot be used (missing, or would be overwritten).
    #[error("{}: {reason}", path.display())]
    Input { path: PathBuf, reason: String },
    /// An option is out of range.
    #[error("invalid option: {0}")]
    InvalidOption(String),
}

impl SynthError {
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SynthError + '_ {
        move |source| SynthError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
