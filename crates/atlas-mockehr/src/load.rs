//! Filling the store: every `*.ndjson` / `*.ndjson.gz` below a folder, in
//! path order, or a list of JSON values. Lines that are not resources are
//! counted, not fatal: a demo folder may hold a stray file.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::MockError;
use crate::json::Parsed;
use crate::store::Store;

/// What loading found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// NDJSON files read.
    pub files: usize,
    /// Resources stored (version 1 each).
    pub resources: usize,
    /// Non-blank lines that were not a JSON object with a known R4
    /// `resourceType` and a valid `id` (or not UTF-8).
    pub skipped: usize,
    /// Resources whose key was already loaded (the first copy wins).
    pub duplicates: usize,
}

impl LoadStats {
    pub(crate) fn add_line(&mut self, store: &mut Store, line: &str) {
        if line.trim().is_empty() {
            return;
        }
        match Parsed::from_line(line).map(|p| store.insert_initial(p)) {
            Some(true) => self.resources += 1,
            Some(false) => self.duplicates += 1,
            None => self.skipped += 1,
        }
    }
}

/// Every NDJSON file below `dir`, sorted by path so loads are repeatable.
fn ndjson_files(dir: &Path) -> Result<Vec<PathBuf>, MockError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(MockError::io(&d))?;
        for entry in entries {
            let path = entry.map_err(MockError::io(&d))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if path.is_dir() {
                stack.push(path);
            } else if name.ends_with(".ndjson") || name.ends_with(".ndjson.gz") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

pub(crate) fn load_dir(dir: &Path, store: &mut Store) -> Result<LoadStats, MockError> {
    if !dir.is_dir() {
        return Err(MockError::Config(format!(
            "{} is not a folder of NDJSON files",
            dir.display()
        )));
    }
    let mut stats = LoadStats::default();
    for path in ndjson_files(dir)? {
        let file = File::open(&path).map_err(MockError::io(&path))?;
        let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
            Box::new(flate2::read::MultiGzDecoder::new(file))
        } else {
            Box::new(file)
        };
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let n = reader
                .read_until(b'\n', &mut buf)
                .map_err(MockError::io(&path))?;
            if n == 0 {
                break;
            }
            match std::str::from_utf8(&buf) {
                Ok(line) => stats.add_line(store, line),
                Err(_) => stats.skipped += 1,
            }
        }
        stats.files += 1;
    }
    Ok(stats)
}
