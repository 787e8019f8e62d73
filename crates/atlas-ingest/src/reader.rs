//! The read pipeline: decompress and split inputs on one thread, classify on
//! every core, hand ordered blocks of events to the caller.
//!
//! Memory is bounded by the block size times the channel depth, never by
//! the input size (whole-document `.json` files are the one exception: a
//! document is read whole, up to `max_document_bytes`).

use std::fs::File;
use std::io::{BufRead, BufReader, Cursor, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use flate2::read::MultiGzDecoder;
use rayon::iter::Either;
use rayon::prelude::*;

use crate::bundle::{IdentifierIndex, looks_like_bundle, unpack_bundle};
use crate::classify::{
    Classified, ClassifyOptions, Event, Origin, Reason, Rejection, classify_owned,
};
use crate::input::{Input, InputKind};
use crate::lines::{LineItem, LineSplitter};

/// Limits and options of one read.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Longest accepted NDJSON line (default 64 MiB).
    pub max_line_bytes: usize,
    /// Largest whole JSON document (default 1 GiB).
    pub max_document_bytes: usize,
    /// Target size of one block handed to the classifier.
    pub block_bytes: usize,
    pub classify: ClassifyOptions,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            max_line_bytes: 64 << 20,
            max_document_bytes: 1 << 30,
            block_bytes: 4 << 20,
            classify: ClassifyOptions::default(),
        }
    }
}

/// One unit of raw input before classification.
enum Unit {
    Text {
        origin: Origin,
        bytes: Vec<u8>,
        unterminated: bool,
    },
    Fault(Box<Rejection>),
}

/// Ordered classified events from a stretch of input.
pub struct Block {
    pub events: Vec<Event>,
}

/// Counts raw (compressed) bytes consumed, for progress bars.
struct Counting<R> {
    inner: R,
    counter: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

struct UnitSink {
    tx: SyncSender<Vec<Unit>>,
    block: Vec<Unit>,
    bytes: usize,
    limit: usize,
    closed: bool,
}

impl UnitSink {
    fn push(&mut self, unit: Unit) {
        if let Unit::Text { bytes, .. } = &unit {
            self.bytes += bytes.len();
        }
        self.block.push(unit);
        if self.bytes >= self.limit {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if !self.block.is_empty() && !self.closed {
            let block = std::mem::take(&mut self.block);
            // A closed receiver means the consumer stopped early; stop reading.
            self.closed = self.tx.send(block).is_err();
        }
        self.bytes = 0;
    }
}

fn fault(reason: Reason, message: String, partial: &[u8], file: &Arc<str>, line: u64) -> Unit {
    Unit::Fault(Box::new(Rejection::new(
        reason,
        message,
        partial,
        Origin {
            file: file.clone(),
            line,
        },
    )))
}

fn split_lines(
    reader: &mut dyn BufRead,
    name: &Arc<str>,
    gz: bool,
    opts: &ReadOptions,
    sink: &mut UnitSink,
) {
    for item in LineSplitter::new(reader, opts.max_line_bytes) {
        if sink.closed {
            return;
        }
        match item {
            LineItem::Line {
                line,
                bytes,
                unterminated,
            } => sink.push(Unit::Text {
                origin: Origin {
                    file: name.clone(),
                    line,
                },
                bytes,
                unterminated,
            }),
            LineItem::TooLong { line, prefix, len } => {
                let mut r = Rejection::new(
                    Reason::LineTooLong,
                    format!(
                        "line is {len} bytes, over the {} byte limit",
                        opts.max_line_bytes
                    ),
                    &prefix,
                    Origin {
                        file: name.clone(),
                        line,
                    },
                );
                r.byte_len = len;
                sink.push(Unit::Fault(Box::new(r)));
            }
            LineItem::Fault {
                line,
                error,
                partial,
            } => {
                let (reason, what) = if gz {
                    (Reason::CorruptGzip, "gzip stream is corrupt")
                } else {
                    (Reason::UnreadableInput, "read failed")
                };
                sink.push(fault(
                    reason,
                    format!("{what} at line {line}: {error}; lines before it were read, the rest of the file is lost"),
                    &partial,
                    name,
                    line,
                ));
            }
        }
    }
}

fn read_document(
    reader: &mut dyn Read,
    name: &Arc<str>,
    gz: bool,
    opts: &ReadOptions,
    sink: &mut UnitSink,
) {
    let mut whole = Vec::new();
    let limit = opts.max_document_bytes as u64;
    match (&mut *reader).take(limit + 1).read_to_end(&mut whole) {
        Ok(_) if whole.len() as u64 > limit => {
            let mut rest = 0u64;
            let _ = std::io::copy(reader, &mut std::io::sink()).map(|n| rest = n);
            let mut r = Rejection::new(
                Reason::LineTooLong,
                format!("document is over the {limit} byte limit"),
                &whole,
                Origin {
                    file: name.clone(),
                    line: 1,
                },
            );
            r.byte_len = whole.len() as u64 + rest;
            sink.push(Unit::Fault(Box::new(r)));
        }
        Ok(_) => {
            // NDJSON saved as .json: several values, one per line.
            let several = matches!(
                serde_json::from_slice::<serde::de::IgnoredAny>(&whole),
                Err(e) if e.to_string().starts_with("trailing characters")
            );
            if several {
                split_lines(&mut Cursor::new(whole), name, false, opts, sink);
            } else {
                sink.push(Unit::Text {
                    origin: Origin {
                        file: name.clone(),
                        line: 1,
                    },
                    bytes: whole,
                    unterminated: false,
                });
            }
        }
        Err(e) => {
            let reason = if gz {
                Reason::CorruptGzip
            } else {
                Reason::UnreadableInput
            };
            sink.push(fault(
                reason,
                format!("reading the document failed: {e}"),
                &whole,
                name,
                1,
            ));
        }
    }
}

fn read_stream(
    reader: &mut dyn Read,
    kind: InputKind,
    name: &Arc<str>,
    opts: &ReadOptions,
    sink: &mut UnitSink,
) {
    match kind {
        InputKind::Ndjson => split_lines(
            &mut BufReader::with_capacity(1 << 18, reader),
            name,
            false,
            opts,
            sink,
        ),
        InputKind::NdjsonGz => split_lines(
            &mut BufReader::with_capacity(
                1 << 18,
                MultiGzDecoder::new(BufReader::with_capacity(1 << 16, reader)),
            ),
            name,
            true,
            opts,
            sink,
        ),
        InputKind::Json => read_document(reader, name, false, opts, sink),
        InputKind::JsonGz => read_document(
            &mut MultiGzDecoder::new(BufReader::new(reader)),
            name,
            true,
            opts,
            sink,
        ),
        InputKind::TarGz => {
            let mut archive = tar::Archive::new(MultiGzDecoder::new(BufReader::with_capacity(
                1 << 16,
                reader,
            )));
            let entries = match archive.entries() {
                Ok(e) => e,
                Err(e) => {
                    sink.push(fault(
                        Reason::CorruptGzip,
                        format!("not a readable tar.gz: {e}"),
                        b"",
                        name,
                        1,
                    ));
                    return;
                }
            };
            for (n, entry) in entries.enumerate() {
                let mut entry = match entry {
                    Ok(e) => e,
                    Err(e) => {
                        sink.push(fault(
                            Reason::CorruptGzip,
                            format!("archive is corrupt after {n} members: {e}; the rest is lost"),
                            b"",
                            name,
                            1,
                        ));
                        return;
                    }
                };
                if !entry.header().entry_type().is_file() {
                    continue;
                }
                let member = match entry.path() {
                    Ok(p) => p.display().to_string(),
                    Err(_) => continue,
                };
                let Some(member_kind) = InputKind::from_name(&member) else {
                    continue;
                };
                if member_kind == InputKind::TarGz {
                    continue;
                }
                let member_name: Arc<str> = Arc::from(format!("{name}!{member}"));
                read_stream(&mut entry, member_kind, &member_name, opts, sink);
                if sink.closed {
                    return;
                }
            }
        }
    }
}

/// The events of one unit: one for a line, many for an unpacked Bundle
/// (no `Vec` per line on the hot path).
type UnitEvents = Either<std::iter::Once<Event>, std::vec::IntoIter<Event>>;

fn one(ev: Event) -> UnitEvents {
    Either::Left(std::iter::once(ev))
}

fn classify_unit(unit: Unit, opts: &ClassifyOptions, index: &IdentifierIndex) -> UnitEvents {
    let (origin, bytes, unterminated) = match unit {
        Unit::Fault(r) => return one(Event::Reject(r)),
        Unit::Text {
            origin,
            bytes,
            unterminated,
        } => (origin, bytes, unterminated),
    };
    if index.has_full_urls() {
        // A run with Bundles: a bare resource may point at Bundle entries of
        // the run by fullUrl, so references are rewritten before classifying.
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let text = text.trim_start_matches('\u{feff}');
            if looks_like_bundle(text)
                && let Some(events) = unpack_bundle(text, &bytes, &origin, opts, index)
            {
                return Either::Right(events.into_iter());
            }
            if text.contains("\"urn:") {
                let text = text.trim_end_matches(['\r', '\n', ' ', '\t']);
                let mut unresolved = 0u32;
                if let Ok(rewritten) = atlas_fhir::rewrite_references(text, |r| {
                    let hit = index.resolve_full_url(r).cloned();
                    unresolved += u32::from(hit.is_none() && r.starts_with("urn:"));
                    hit
                }) {
                    return one(crate::classify::classify_text(
                        &rewritten,
                        &bytes,
                        origin,
                        unterminated,
                        opts,
                        Some(unresolved),
                    ));
                }
            }
        }
        return one(done(classify_owned(
            bytes,
            origin,
            unterminated,
            opts,
            false,
        )));
    }
    match classify_owned(bytes, origin, unterminated, opts, true) {
        Classified::Done(ev) => one(ev),
        Classified::Bundle(text, origin) => {
            match unpack_bundle(&text, text.as_bytes(), &origin, opts, index) {
                Some(events) => Either::Right(events.into_iter()),
                // Not an unpackable Bundle type: stored as one resource.
                None => one(done(classify_owned(
                    text.into_bytes(),
                    origin,
                    unterminated,
                    opts,
                    false,
                ))),
            }
        }
    }
}

fn done(c: Classified) -> Event {
    match c {
        Classified::Done(ev) => ev,
        // `detect_bundle` was off.
        Classified::Bundle(_, origin) => Event::Skip(origin),
    }
}

/// Reads `inputs` in order and yields blocks of classified events.
/// `consumed` counts raw input bytes read so far (for progress).
pub fn read_events(
    inputs: Vec<Input>,
    opts: ReadOptions,
    index: Arc<IdentifierIndex>,
    consumed: Arc<AtomicU64>,
) -> std::io::Result<Receiver<Block>> {
    let (unit_tx, unit_rx) = sync_channel::<Vec<Unit>>(4);
    let (block_tx, block_rx) = sync_channel::<Block>(4);
    let read_opts = opts.clone();
    std::thread::Builder::new()
        .name("atlas-read".into())
        .spawn(move || {
            let mut sink = UnitSink {
                tx: unit_tx,
                block: Vec::new(),
                bytes: 0,
                limit: read_opts.block_bytes,
                closed: false,
            };
            for input in &inputs {
                let name: Arc<str> = Arc::from(input.name.as_str());
                match File::open(&input.path) {
                    Ok(f) => read_stream(
                        &mut Counting {
                            inner: f,
                            counter: consumed.clone(),
                        },
                        input.kind,
                        &name,
                        &read_opts,
                        &mut sink,
                    ),
                    Err(e) => sink.push(fault(
                        Reason::UnreadableInput,
                        format!("cannot open: {e}"),
                        b"",
                        &name,
                        1,
                    )),
                }
                if sink.closed {
                    return;
                }
            }
            sink.flush();
        })?;
    std::thread::Builder::new()
        .name("atlas-classify".into())
        .spawn(move || {
            for units in unit_rx {
                let events: Vec<Event> = units
                    .into_par_iter()
                    .with_min_len(64)
                    .flat_map_iter(|u| classify_unit(u, &opts.classify, &index))
                    .collect();
                if block_tx.send(Block { events }).is_err() {
                    return;
                }
            }
        })?;
    Ok(block_rx)
}

/// Builds the identifier index of every resource in the inputs that may hold
/// Bundles, so conditional references resolve to resources of the same run
/// wherever they appear in it (a Practitioner bundle may come last).
pub fn prescan_identifiers(
    inputs: &[Input],
    opts: &ReadOptions,
    index: &mut IdentifierIndex,
) -> std::io::Result<()> {
    let bundles: Vec<Input> = inputs
        .iter()
        .filter(|i| i.kind.may_hold_bundles())
        .cloned()
        .collect();
    if bundles.is_empty() {
        return Ok(());
    }
    let rx = read_events(
        bundles,
        opts.clone(),
        Arc::new(IdentifierIndex::default()),
        Arc::new(AtomicU64::new(0)),
    )?;
    for block in rx {
        for ev in block.events {
            if let Event::Resource(r) = ev {
                for ident in &r.identifiers {
                    index.insert(&r.resource_type, &r.id, ident);
                }
                if let Some(url) = &r.full_url {
                    index.insert_full_url(url, format!("{}/{}", r.resource_type, r.id));
                }
            }
        }
    }
    Ok(())
}
