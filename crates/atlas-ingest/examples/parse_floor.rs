//! The ingest benchmark's floor: read the same bytes (gzip included), split
//! lines and fully parse each line with serde_json (the parser ingest uses),
//! on all cores, and discard the result. Ingest is measured against this.
//!
//! usage: cargo run --release -p atlas-ingest --example parse_floor -- <file-or-dir>...

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;

fn files(p: &Path, out: &mut Vec<PathBuf>) {
    if p.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for e in entries {
            files(&e, out);
        }
    } else if p.to_string_lossy().contains(".ndjson") {
        out.push(p.to_owned());
    }
}

fn main() -> std::io::Result<()> {
    let mut all = Vec::new();
    for a in std::env::args().skip(1) {
        files(Path::new(&a), &mut all);
    }
    let started = Instant::now();
    let (mut bytes, mut lines, mut ok) = (0u64, 0u64, 0u64);
    for f in &all {
        let raw = std::fs::File::open(f)?;
        let reader: Box<dyn Read> = if f.extension().is_some_and(|e| e == "gz") {
            Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(raw)))
        } else {
            Box::new(raw)
        };
        let mut reader = BufReader::with_capacity(1 << 18, reader);
        loop {
            // Blocks of ~4 MiB, parsed in parallel, like the ingest pipeline.
            let mut block: Vec<Vec<u8>> = Vec::new();
            let mut size = 0;
            while size < 4 << 20 {
                let mut line = Vec::new();
                if reader.read_until(b'\n', &mut line)? == 0 {
                    break;
                }
                size += line.len();
                block.push(line);
            }
            if block.is_empty() {
                break;
            }
            bytes += size as u64;
            lines += block.len() as u64;
            ok += block
                .par_iter()
                .filter(|l| serde_json::from_slice::<serde::de::IgnoredAny>(l).is_ok())
                .count() as u64;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{{\"bytes\": {bytes}, \"lines\": {lines}, \"parsed\": {ok}, \"seconds\": {secs:.3}, \"mb_per_s\": {:.1}, \"lines_per_s\": {:.0}}}",
        bytes as f64 / 1e6 / secs,
        lines as f64 / secs
    );
    Ok(())
}
