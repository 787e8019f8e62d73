//! Output files: plain NDJSON, or gzip written as one member per chunk.
//!
//! Chunks are compressed independently (in parallel, by the caller), so a
//! `.ndjson.gz` file is a multi-member gzip stream as RFC 1952 allows; `gzip
//! -d`, `zcat` and flate2's `MultiGzDecoder` (which Atlas ingest uses) read it
//! as one stream. Members carry no name and a zero mtime, so the bytes are
//! deterministic.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;

use crate::SynthError;

/// Compression level of every member: fast, since output is large and
/// written on the critical path.
const GZIP_LEVEL: u32 = 3;

/// Compresses `data` as one complete gzip member.
pub(crate) fn gzip_member(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = GzEncoder::new(
        Vec::with_capacity(data.len() / 4 + 64),
        Compression::new(GZIP_LEVEL),
    );
    enc.write_all(data)?;
    enc.finish()
}

/// Encodes a chunk for a file: as is, or as a gzip member (nothing for an empty chunk).
pub(crate) fn encode(data: Vec<u8>, gzip: bool) -> std::io::Result<Vec<u8>> {
    if gzip && !data.is_empty() {
        gzip_member(&data)
    } else {
        Ok(data)
    }
}

/// One output file being written.
pub(crate) struct Sink {
    path: PathBuf,
    out: BufWriter<File>,
    gzip: bool,
    bytes: u64,
    records: u64,
}

impl Sink {
    pub(crate) fn create(path: PathBuf, gzip: bool) -> Result<Sink, SynthError> {
        let file = File::create(&path).map_err(SynthError::io(&path))?;
        Ok(Sink {
            out: BufWriter::with_capacity(1 << 20, file),
            path,
            gzip,
            bytes: 0,
            records: 0,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Appends an already encoded chunk holding `records` resources.
    pub(crate) fn write(&mut self, chunk: &[u8], records: u64) -> Result<(), SynthError> {
        self.out
            .write_all(chunk)
            .map_err(SynthError::io(&self.path))?;
        self.bytes += chunk.len() as u64;
        self.records += records;
        Ok(())
    }

    /// Flushes the file; an empty gzip file gets one empty member so it is
    /// still valid gzip. Returns `(path, records, bytes)`.
    pub(crate) fn finish(mut self) -> Result<(PathBuf, u64, u64), SynthError> {
        if self.gzip && self.bytes == 0 {
            let empty = gzip_member(&[]).map_err(SynthError::io(&self.path))?;
            self.write(&empty, 0)?;
        }
        self.out.flush().map_err(SynthError::io(&self.path))?;
        Ok((self.path, self.records, self.bytes))
    }
}
