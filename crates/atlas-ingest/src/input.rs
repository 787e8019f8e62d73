//! Input discovery: turns the paths a user names (files, folders, `-`) into an
//! ordered list of inputs with their size and SHA-256.
//!
//! Folders are walked recursively in sorted order so that two runs over the
//! same tree see the same inputs in the same order (batch ids depend on it).

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

/// How an input's bytes are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// One resource per line.
    Ndjson,
    /// Gzip (possibly multi-member) NDJSON.
    NdjsonGz,
    /// A whole JSON document: one resource or a Bundle (NDJSON is accepted too).
    Json,
    /// Gzip of a whole JSON document.
    JsonGz,
    /// A gzip-compressed tar of any of the above.
    TarGz,
}

impl InputKind {
    /// Chooses the kind from a file name; `None` for files that are not FHIR inputs.
    pub fn from_name(name: &str) -> Option<InputKind> {
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".tar.gz") || lower.ends_with(".tgz") {
            Some(InputKind::TarGz)
        } else if lower.ends_with(".ndjson.gz") || lower.ends_with(".jsonl.gz") {
            Some(InputKind::NdjsonGz)
        } else if lower.ends_with(".json.gz") {
            Some(InputKind::JsonGz)
        } else if lower.ends_with(".ndjson") || lower.ends_with(".jsonl") {
            Some(InputKind::Ndjson)
        } else if lower.ends_with(".json") {
            Some(InputKind::Json)
        } else {
            None
        }
    }

    /// Whether this kind can carry Bundles (and so conditional references).
    pub fn may_hold_bundles(self) -> bool {
        matches!(self, InputKind::Json | InputKind::JsonGz | InputKind::TarGz)
    }
}

/// One input file, hashed.
#[derive(Debug, Clone)]
pub struct Input {
    /// What the user named (or the path inside a named folder); `-` for stdin.
    pub name: String,
    /// Where the bytes are read from (stdin is spooled to a temporary file).
    pub path: PathBuf,
    pub kind: InputKind,
    pub size: u64,
    /// Empty until [`hash_inputs`] runs.
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error(
        "{0}: not a FHIR input (expected .ndjson, .ndjson.gz, .json, .json.gz, .tar.gz or a folder)"
    )]
    UnknownKind(String),
    #[error("no FHIR inputs found in {0}")]
    Empty(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> InputError + '_ {
    move |source| InputError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Inputs plus the temporary files that must outlive them (spooled stdin).
pub struct InputSet {
    pub inputs: Vec<Input>,
    _spool: Vec<tempfile::TempPath>,
}

/// Hashes a file: (size, sha256 hex). ring's SHA-256 (assembly, AVX2)
/// hashes about 2.7 times faster than a portable implementation on
/// machines without SHA extensions, and this reads every input byte.
pub fn hash_file(path: &Path) -> Result<(u64, String), InputError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((size, hex::encode(h.finish())))
}

fn sniff_kind(path: &Path) -> Result<InputKind, InputError> {
    let mut head = [0u8; 512];
    let mut f = File::open(path).map_err(io_err(path))?;
    let n = f.read(&mut head).map_err(io_err(path))?;
    let head = &head[..n];
    if head.starts_with(&[0x1f, 0x8b]) {
        return Ok(InputKind::NdjsonGz);
    }
    // A whole-document JSON starts with '{' and does not end its first line
    // with a complete object; NDJSON is handled by the Json path either way.
    Ok(InputKind::Json)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), InputError> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io_err(dir))?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(InputKind::from_name)
            .is_some()
        {
            out.push(p);
        }
    }
    Ok(())
}

/// Fills in each input's SHA-256 (and exact size): every file at once, on
/// every core. Ingest calls this while its reader already decompresses and
/// classifies the same files.
///
/// An input whose `sha256` is already set is trusted as it is: a caller
/// that just wrote the file and hashed it on the way (a connector's
/// download) does not pay for a second pass.
pub fn hash_inputs(inputs: &mut [Input]) -> Result<(), InputError> {
    inputs.par_iter_mut().try_for_each(|i| {
        if i.sha256.is_empty() {
            (i.size, i.sha256) = hash_file(&i.path)?;
        }
        Ok(())
    })
}

/// Resolves user-named paths into inputs (sizes from the file system; the
/// SHA-256 is left empty until [`hash_inputs`]). `stdin` is read when a path
/// is `-`.
pub fn collect_inputs(paths: &[String], stdin: &mut dyn Read) -> Result<InputSet, InputError> {
    let mut inputs = Vec::new();
    let mut spool = Vec::new();
    for p in paths {
        if p == "-" {
            let mut tmp = tempfile::NamedTempFile::new().map_err(io_err(Path::new("-")))?;
            io::copy(stdin, &mut tmp).map_err(io_err(Path::new("-")))?;
            tmp.flush().map_err(io_err(Path::new("-")))?;
            let path = tmp.into_temp_path();
            let kind = sniff_kind(&path)?;
            inputs.push(Input {
                name: "-".into(),
                path: path.to_path_buf(),
                kind,
                size: 0,
                sha256: String::new(),
            });
            spool.push(path);
            continue;
        }
        let path = PathBuf::from(p);
        let meta = std::fs::metadata(&path).map_err(io_err(&path))?;
        if meta.is_dir() {
            let mut files = Vec::new();
            walk(&path, &mut files)?;
            if files.is_empty() {
                return Err(InputError::Empty(p.clone()));
            }
            for f in files {
                let kind = f
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(InputKind::from_name)
                    .ok_or_else(|| InputError::UnknownKind(f.display().to_string()))?;
                inputs.push(Input {
                    name: f.display().to_string(),
                    path: f,
                    kind,
                    size: 0,
                    sha256: String::new(),
                });
            }
        } else {
            let kind = match path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(InputKind::from_name)
            {
                Some(k) => k,
                None => sniff_kind(&path)?,
            };
            inputs.push(Input {
                name: p.clone(),
                path,
                kind,
                size: 0,
                sha256: String::new(),
            });
        }
    }
    for i in &mut inputs {
        i.size = std::fs::metadata(&i.path).map_err(io_err(&i.path))?.len();
    }
    Ok(InputSet {
        inputs,
        _spool: spool,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_from_names() {
        assert_eq!(
            InputKind::from_name("Patient.ndjson.gz"),
            Some(InputKind::NdjsonGz)
        );
        assert_eq!(InputKind::from_name("a.NDJSON"), Some(InputKind::Ndjson));
        assert_eq!(InputKind::from_name("bundle.json"), Some(InputKind::Json));
        assert_eq!(InputKind::from_name("all.tar.gz"), Some(InputKind::TarGz));
        assert_eq!(InputKind::from_name("notes.txt"), None);
    }
}
