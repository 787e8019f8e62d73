//! `scale`: multiplies an NDJSON dataset by renaming ids and the
//! references to them, keeping every other byte. See [`scale`].
//!
//! Lines are processed in blocks; each (block, copy) pair is rendered on
//! rayon and the results are written in order, so memory stays bounded by a
//! few blocks whatever the input size and factor.

mod top_level_id;

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flate2::read::MultiGzDecoder;
use rayon::prelude::*;

use crate::output::{Sink, encode};
use crate::{SynthError, SynthSummary};

/// Target output bytes of one (block, copy) unit.
pub(crate) const OUTPUT_BLOCK_BYTES: usize = 8 << 20;
/// Smallest block of input, however large the factor.
pub(crate) const MIN_BLOCK_BYTES: usize = 64 << 10;
/// Most lines in one block.
pub(crate) const MAX_BLOCK_LINES: usize = 20_000;

/// The id copy `copy` of a resource with id `id` gets: `id` itself for copy
/// 0, else `<id>-s<copy>`, or — when that would be longer than FHIR's 64
/// characters — `<first 16 chars of id>-<32 hex digits of a hash of (id,
/// copy)>-s<copy>`. A function of `(id, copy)` alone, so a resource and every
/// reference to it, in any file, are renamed alike.
pub fn scaled_id(id: &str, copy: u32) -> String {
    if copy == 0 {
        return id.to_owned();
    }
    let simple = format!("{id}-s{copy}");
    if simple.len() <= 64 {
        return simple;
    }
    let hash = atlas_fhir::content_hash(format!("{id}\u{0}{copy}").as_bytes());
    let prefix: String = id.chars().take(16).collect();
    format!("{prefix}-{hash:032x}-s{copy}")
}

/// The reference copy `copy` should carry instead of `reference`, if it names a resource by id.
fn scaled_reference(reference: &str, copy: u32) -> Option<String> {
    let (ty, id) = atlas_fhir::split_relative_reference(reference)?;
    let rest = &reference[ty.len() + 1 + id.len()..];
    Some(format!("{ty}/{}{rest}", scaled_id(id, copy)))
}

/// Appends copy `copy` (`>= 1`) of one line (without its newline) to `out`:
/// renamed when the line is a JSON object, else unchanged.
fn push_copy(line: &[u8], copy: u32, out: &mut Vec<u8>) {
    let start = out.len();
    if !push_renamed(line, copy, out) {
        out.truncate(start);
        out.extend_from_slice(line);
    }
}

/// Appends the renamed line; `false` (with `out` possibly partly written)
/// when the line is not a JSON object.
fn push_renamed(line: &[u8], copy: u32, out: &mut Vec<u8>) -> bool {
    let Ok(text) = std::str::from_utf8(line) else {
        return false;
    };
    if !text.trim_start().starts_with('{')
        || serde_json::from_str::<serde::de::IgnoredAny>(text).is_err()
    {
        return false;
    }
    let Ok(text) = atlas_fhir::rewrite_references(text, |r| scaled_reference(r, copy)) else {
        return false;
    };
    let Some(spans) = top_level_id::top_level_id_spans(text.as_bytes()) else {
        return false;
    };
    let mut copied = 0;
    for span in spans {
        let literal = &text[span.clone()];
        let id: std::borrow::Cow<str> = if literal.contains('\\') {
            match serde_json::from_str::<String>(literal) {
                Ok(id) => id.into(),
                Err(_) => return false,
            }
        } else {
            literal[1..literal.len() - 1].into()
        };
        if atlas_fhir::is_valid_id(&id) {
            out.extend_from_slice(text[copied..span.start].as_bytes());
            out.push(b'"');
            out.extend_from_slice(scaled_id(&id, copy).as_bytes());
            out.push(b'"');
            copied = span.end;
        }
    }
    out.extend_from_slice(text[copied..].as_bytes());
    true
}

/// Lines of one input, as read: `data` holds them with their newlines.
struct Block {
    data: Vec<u8>,
    /// `(start, end)` of each line in `data`, without the `\n`.
    lines: Vec<(usize, usize)>,
}

fn read_block(reader: &mut dyn BufRead, budget: usize) -> std::io::Result<Option<Block>> {
    let mut data = Vec::with_capacity(budget.min(OUTPUT_BLOCK_BYTES) + 4096);
    let mut lines = Vec::new();
    while data.len() < budget && lines.len() < MAX_BLOCK_LINES {
        let start = data.len();
        if reader.read_until(b'\n', &mut data)? == 0 {
            break;
        }
        let end = if data.last() == Some(&b'\n') {
            data.len() - 1
        } else {
            data.len()
        };
        lines.push((start, end));
    }
    Ok((!lines.is_empty()).then_some(Block { data, lines }))
}

/// Copy `copy` of a block, and how many resources (non-blank lines) it holds.
fn render(block: &Block, copy: u32) -> (Vec<u8>, u64) {
    let mut out = Vec::with_capacity(block.data.len() + block.lines.len() * 8 + 1);
    let mut records = 0;
    for &(start, end) in &block.lines {
        let line = &block.data[start..end];
        if !line.iter().all(u8::is_ascii_whitespace) {
            records += 1;
        }
        if copy == 0 {
            out.extend_from_slice(line);
        } else {
            push_copy(line, copy, &mut out);
        }
        out.push(b'\n');
    }
    (out, records)
}

/// Counts bytes read from the file into the progress counter.
struct Counting<'a> {
    inner: File,
    progress: &'a AtomicU64,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

struct Input {
    path: PathBuf,
    gzip: bool,
    /// Output file name.
    name: String,
}

fn is_ndjson_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".ndjson") || lower.ends_with(".ndjson.gz")
}

fn walk(dir: &Path, found: &mut Vec<PathBuf>) -> Result<(), SynthError> {
    let mut entries = std::fs::read_dir(dir)
        .map_err(SynthError::io(dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(SynthError::io(dir))?;
    entries.sort();
    for path in entries {
        let meta = std::fs::symlink_metadata(&path).map_err(SynthError::io(&path))?;
        if meta.is_dir() {
            walk(&path, found)?;
        } else if path.file_name().and_then(|n| n.to_str()).is_some_and(is_ndjson_name)
            // Symlinks are followed to files, never to folders (no cycles).
            && std::fs::metadata(&path).is_ok_and(|m| m.is_file())
        {
            found.push(path);
        }
    }
    Ok(())
}

/// Splits `Patient.ndjson.gz` into `("Patient", ".ndjson.gz")`.
fn split_name(name: &str) -> (&str, &str) {
    let lower = name.to_ascii_lowercase();
    for ext in [".ndjson.gz", ".ndjson", ".gz"] {
        if lower.ends_with(ext) && name.len() > ext.len() {
            return name.split_at(name.len() - ext.len());
        }
    }
    match name.rfind('.') {
        Some(dot) if dot > 0 => name.split_at(dot),
        _ => (name, ""),
    }
}

/// The input files in order, each with a unique output name: files as
/// given, folders searched recursively (sorted) for `.ndjson`/`.ndjson.gz`.
/// A repeated name gets `-2`, `-3`, … before its extension.
fn collect_inputs(inputs: &[PathBuf], out_dir: &Path) -> Result<Vec<Input>, SynthError> {
    let mut files = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input).map_err(SynthError::io(input))?;
        if meta.is_dir() {
            walk(input, &mut files)?;
        } else {
            files.push(input.clone());
        }
    }
    let out_canon = out_dir.canonicalize().map_err(SynthError::io(out_dir))?;
    let mut seen = HashSet::new();
    let mut names = HashSet::new();
    let mut result = Vec::new();
    for path in files {
        let canon = path.canonicalize().map_err(SynthError::io(&path))?;
        if !seen.insert(canon.clone()) {
            continue;
        }
        if canon.parent() == Some(out_canon.as_path()) {
            return Err(SynthError::Input {
                path,
                reason:
                    "is in the output folder and would be overwritten; choose another output folder"
                        .into(),
            });
        }
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (stem, ext) = split_name(&file_name);
        let mut name = file_name.clone();
        let mut n = 2;
        while !names.insert(name.to_ascii_lowercase()) {
            name = format!("{stem}-{n}{ext}");
            n += 1;
        }
        let gzip = file_name.to_ascii_lowercase().ends_with(".gz");
        result.push(Input { path, gzip, name });
    }
    Ok(result)
}

fn scale_file(
    input: &Input,
    factor: u32,
    sink: &mut Sink,
    progress: &AtomicU64,
) -> Result<(), SynthError> {
    let file = File::open(&input.path).map_err(SynthError::io(&input.path))?;
    let counting = Counting {
        inner: file,
        progress,
    };
    let mut reader: Box<dyn BufRead> = if input.gzip {
        Box::new(BufReader::with_capacity(
            1 << 16,
            MultiGzDecoder::new(BufReader::with_capacity(1 << 16, counting)),
        ))
    } else {
        Box::new(BufReader::with_capacity(1 << 16, counting))
    };
    let block_budget = (OUTPUT_BLOCK_BYTES / factor as usize).max(MIN_BLOCK_BYTES);
    let wave_budget = (rayon::current_num_threads() * 2 * OUTPUT_BLOCK_BYTES).min(256 << 20);
    let mut current: Option<(Arc<Block>, u32)> = None;
    let mut eof = false;
    while !eof {
        // Gather (block, copy) units in output order until the wave is full.
        let mut units: Vec<(Arc<Block>, u32)> = Vec::new();
        let mut bytes = 0;
        while bytes < wave_budget {
            let (block, copy) = match current.take() {
                Some((block, copy)) if copy < factor => (block, copy),
                _ => match read_block(reader.as_mut(), block_budget)
                    .map_err(SynthError::io(&input.path))?
                {
                    Some(block) => (Arc::new(block), 0),
                    None => {
                        eof = true;
                        break;
                    }
                },
            };
            bytes += block.data.len().max(1);
            units.push((Arc::clone(&block), copy));
            current = Some((block, copy + 1));
        }
        let rendered: Vec<std::io::Result<(Vec<u8>, u64)>> = units
            .par_iter()
            .map(|(block, copy)| {
                let (bytes, records) = render(block, *copy);
                Ok((encode(bytes, input.gzip)?, records))
            })
            .collect();
        for chunk in rendered {
            let (chunk, records) = chunk.map_err(SynthError::io(sink.path()))?;
            sink.write(&chunk, records)?;
        }
    }
    Ok(())
}

/// Writes `factor` copies of every NDJSON file in `inputs` into `out_dir`.
///
/// Inputs are files (any name; `.gz` means gzip) or folders, searched
/// recursively in name order for `*.ndjson` and `*.ndjson.gz`. Each input
/// gets one output file of the same name (gzip in, gzip out); a name seen
/// twice gets `-2`, `-3`, … before its extension. An input inside `out_dir`
/// is an error, as is a factor of 0.
///
/// Copy 0 of every line is the line exactly as read. Copy `k >= 1` of a line
/// that is a JSON object gets its top-level `id` (only that one: ids inside
/// `contained` and elements stay) renamed to [`scaled_id`]`(id, k)`, and every
/// relative `reference` (`Type/id`, `Type/id/_history/v`) renamed the same
/// way through [`atlas_fhir::rewrite_references`]; absolute, `#contained`,
/// `urn:` and conditional references are kept, as is every other byte
/// (decimals, key order, whitespace). Lines that are not JSON objects
/// (invalid JSON or UTF-8, arrays, blank lines) are copied unchanged into
/// every copy, so ingest's quarantine sees them `factor` times. Ids inside
/// Bundle entries are not renamed.
///
/// Line order: each input is read once, in blocks of lines (about 8 MiB /
/// `factor` of input, at most 20,000 lines); the output holds copy 0 of a
/// block, then copy 1, …, then the next block. Block boundaries depend only
/// on the input and the factor, so the output bytes are the same for any
/// number of threads. Every output line ends with `\n` (an unterminated last
/// input line gets one).
///
/// `progress` grows by the input bytes read from disk (compressed bytes for
/// gzip inputs), reaching the inputs' total size.
pub fn scale(
    inputs: &[PathBuf],
    factor: u32,
    out_dir: &Path,
    progress: &AtomicU64,
) -> Result<SynthSummary, SynthError> {
    if factor == 0 {
        return Err(SynthError::InvalidOption(
            "the scale factor must be at least 1".into(),
        ));
    }
    std::fs::create_dir_all(out_dir).map_err(SynthError::io(out_dir))?;
    let inputs = collect_inputs(inputs, out_dir)?;
    let mut summary = SynthSummary::default();
    for input in &inputs {
        let mut sink = Sink::create(out_dir.join(&input.name), input.gzip)?;
        scale_file(input, factor, &mut sink, progress)?;
        let (path, records, bytes) = sink.finish()?;
        summary.resources += records;
        summary.bytes += bytes;
        summary.files.push((path, records));
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_suffixed_or_hashed() {
        assert_eq!(scaled_id("abc", 0), "abc");
        assert_eq!(scaled_id("abc", 3), "abc-s3");
        let long = "a".repeat(63);
        let hashed = scaled_id(&long, 12);
        assert!(
            hashed.len() <= 64 && atlas_fhir::is_valid_id(&hashed),
            "{hashed}"
        );
        assert_eq!(hashed, scaled_id(&long, 12));
        assert_ne!(hashed, scaled_id(&long, 13));
        let max = scaled_id(&"b".repeat(64), u32::MAX);
        assert!(max.len() <= 64 && atlas_fhir::is_valid_id(&max), "{max}");
    }

    #[test]
    fn references() {
        assert_eq!(
            scaled_reference("Patient/p1", 2).as_deref(),
            Some("Patient/p1-s2")
        );
        assert_eq!(
            scaled_reference("Patient/p1/_history/7", 2).as_deref(),
            Some("Patient/p1-s2/_history/7")
        );
        for kept in [
            "#c1",
            "urn:uuid:1234",
            "http://x.org/fhir/Patient/1",
            "Patient?identifier=a|b",
            "Nope/1",
        ] {
            assert_eq!(scaled_reference(kept, 2), None, "{kept}");
        }
    }

    fn rewrite_line(line: &[u8], copy: u32) -> Option<String> {
        let mut out = Vec::new();
        push_copy(line, copy, &mut out);
        let out = String::from_utf8(out).ok()?;
        (out.as_bytes() != line).then_some(out)
    }

    #[test]
    fn lines() {
        let line = br##"{"resourceType":"Observation","contained":[{"resourceType":"Patient","id":"c1"}],"id":"o1","subject":{"reference":"#c1"},"encounter":{"reference":"Encounter/e1"},"valueQuantity":{"value":176.35499866729558}}"##;
        assert_eq!(
            rewrite_line(line, 4).as_deref(),
            Some(
                r##"{"resourceType":"Observation","contained":[{"resourceType":"Patient","id":"c1"}],"id":"o1-s4","subject":{"reference":"#c1"},"encounter":{"reference":"Encounter/e1-s4"},"valueQuantity":{"value":176.35499866729558}}"##
            )
        );
        // Escaped id: decoded, renamed, written plainly.
        assert_eq!(
            rewrite_line(br#"{"id":"o\u0031"}"#, 1).as_deref(),
            Some(r#"{"id":"o1-s1"}"#)
        );
        // Invalid ids stay; not-objects and broken JSON pass through.
        assert_eq!(rewrite_line(br#"{"id":"a b"}"#, 1), None);
        assert_eq!(
            rewrite_line(br#"{"id":"a b","subject":{"reference":"Patient/p"}}"#, 1).as_deref(),
            Some(r#"{"id":"a b","subject":{"reference":"Patient/p-s1"}}"#)
        );
        for bad in [
            &b"[1,2]"[..],
            b"{\"id\":\"x\"",
            b"{\"id\":\"x\"} trailing",
            b"\xff\xfe",
            b"",
            b"   ",
        ] {
            assert_eq!(rewrite_line(bad, 1), None);
        }
    }

    #[test]
    fn names() {
        assert_eq!(split_name("Patient.ndjson.gz"), ("Patient", ".ndjson.gz"));
        assert_eq!(split_name("my.data.ndjson"), ("my.data", ".ndjson"));
        assert_eq!(split_name("x.json"), ("x", ".json"));
        assert_eq!(split_name("noext"), ("noext", ""));
    }
}
