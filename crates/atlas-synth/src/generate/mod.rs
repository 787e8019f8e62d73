//! `generate`: a deterministic, Synthea-like FHIR R4 population as NDJSON.
//!
//! Patients are generated in blocks of [`BLOCK_PATIENTS`]; blocks of a wave
//! run in parallel on rayon while the previous wave is written, and are
//! written in index order. Patient `i` draws only from its own random stream
//! (see [`crate::rng`]), so the output depends on `(patients, seed,
//! end_date, gzip)` alone — never on the number of threads.

mod codes;
mod patient;
mod person;
mod pool;
mod schedule;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;

use crate::output::{Sink, encode};
use crate::time::{DAY, days_from_civil};
use crate::{SynthError, SynthSummary};
use patient::Ctx;
use pool::Pool;

/// The resource types written, in file order.
pub const GENERATED_TYPES: [&str; 7] = [
    "Organization",
    "Practitioner",
    "Patient",
    "Encounter",
    "Observation",
    "Condition",
    "MedicationRequest",
];
const N_TYPES: usize = GENERATED_TYPES.len();
const ORGANIZATION: usize = 0;
const PRACTITIONER: usize = 1;
const PATIENT: usize = 2;
const ENCOUNTER: usize = 3;
const OBSERVATION: usize = 4;
const CONDITION: usize = 5;
const MEDICATION_REQUEST: usize = 6;

/// Patients per block: the unit of parallel work, of gzip members, and of progress.
pub const BLOCK_PATIENTS: usize = 250;

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthOptions {
    /// Number of patients.
    pub patients: usize,
    /// Seed of every random stream.
    pub seed: u64,
    /// Write `.ndjson.gz` (multi-member gzip) instead of `.ndjson`.
    pub gzip: bool,
    /// `(year, month, day)`: histories end at midnight UTC starting this day.
    pub end_date: (i32, u32, u32),
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            patients: 100,
            seed: 1,
            gzip: false,
            end_date: (2026, 1, 1),
        }
    }
}

impl SynthOptions {
    /// The end of every history in seconds since the epoch, if `end_date` is a real date.
    fn end_seconds(&self) -> Result<i64, SynthError> {
        let (y, m, d) = self.end_date;
        let text = format!("{y:04}-{m:02}-{d:02}");
        if !(1900..=9999).contains(&y) || !atlas_fhir::is_fhir_date(&text) {
            return Err(SynthError::InvalidOption(format!(
                "end_date {y}-{m}-{d} is not a date between 1900-01-01 and 9999-12-31"
            )));
        }
        Ok(days_from_civil(i64::from(y), i64::from(m), i64::from(d)) * DAY)
    }
}

/// Per-type text of a run of patients, one resource per line.
pub(crate) struct Bufs {
    text: [String; N_TYPES],
    counts: [u64; N_TYPES],
}

/// A block ready to append: one encoded chunk per type.
struct Encoded {
    chunks: [Vec<u8>; N_TYPES],
    counts: [u64; N_TYPES],
    patients: u64,
}

fn render_block(
    ctx: &Ctx<'_>,
    block: usize,
    patients: usize,
    gzip: bool,
) -> std::io::Result<Encoded> {
    let first = block * BLOCK_PATIENTS;
    let last = (first + BLOCK_PATIENTS).min(patients);
    let mut bufs = Bufs {
        text: Default::default(),
        counts: [0; N_TYPES],
    };
    for i in first..last {
        patient::write_patient(ctx, i as u64, &mut bufs);
    }
    let mut chunks: [Vec<u8>; N_TYPES] = Default::default();
    for (chunk, text) in chunks.iter_mut().zip(bufs.text) {
        *chunk = encode(text.into_bytes(), gzip)?;
    }
    Ok(Encoded {
        chunks,
        counts: bufs.counts,
        patients: (last - first) as u64,
    })
}

fn write_wave(
    sinks: &mut [Sink],
    wave: Vec<Encoded>,
    progress: &AtomicU64,
) -> Result<(), SynthError> {
    for block in wave {
        for (sink, (chunk, count)) in sinks.iter_mut().zip(block.chunks.iter().zip(block.counts)) {
            sink.write(chunk, count)?;
        }
        progress.fetch_add(block.patients, Ordering::Relaxed);
    }
    Ok(())
}

/// Generates `opts.patients` patients with their encounters, observations,
/// conditions and medication requests, plus the organizations and
/// practitioners they refer to, into one file per type in `out_dir`:
/// `<Type>.ndjson` for each of [`GENERATED_TYPES`], or `<Type>.ndjson.gz`
/// with `gzip` (existing files of those names are replaced).
///
/// One resource per line, compact JSON, FHIR R4 with US Core extensions;
/// every resource carries the `HTEST` ("test health data") tag and every
/// reference points to a generated resource. Each history covers the last
/// five years of the patient's life up to `end_date` (or death).
///
/// The bytes depend only on `(patients, seed, end_date, gzip)`, never on the
/// number of threads: patient `i` draws from its own random stream, and
/// patients are written in index order in blocks of [`BLOCK_PATIENTS`]. A
/// gzip file is a multi-member stream (one member per block), which `zcat`,
/// `gzip -d` and Atlas ingest read as one.
///
/// `progress` grows by the number of patients written.
pub fn generate(
    opts: &SynthOptions,
    out_dir: &Path,
    progress: &AtomicU64,
) -> Result<SynthSummary, SynthError> {
    let end = opts.end_seconds()?;
    std::fs::create_dir_all(out_dir).map_err(SynthError::io(out_dir))?;
    let ext = if opts.gzip { "ndjson.gz" } else { "ndjson" };
    let mut sinks = GENERATED_TYPES
        .iter()
        .map(|ty| Sink::create(out_dir.join(format!("{ty}.{ext}")), opts.gzip))
        .collect::<Result<Vec<_>, _>>()?;

    let pool = Pool::build(opts.seed, opts.patients, end);
    for (kind, lines) in [
        (ORGANIZATION, &pool.org_lines),
        (PRACTITIONER, &pool.practitioner_lines),
    ] {
        let sink = &mut sinks[kind];
        let records = lines.bytes().filter(|&b| b == b'\n').count() as u64;
        let chunk =
            encode(lines.as_bytes().to_vec(), opts.gzip).map_err(SynthError::io(sink.path()))?;
        sink.write(&chunk, records)?;
    }

    let ctx = Ctx {
        seed: opts.seed,
        pool: &pool,
        end,
    };
    let blocks = opts.patients.div_ceil(BLOCK_PATIENTS);
    // The wave size only bounds memory and feeds the threads; it never changes the bytes.
    let wave_len = (rayon::current_num_threads() * 2).clamp(2, 32);
    let mut pending: Vec<Encoded> = Vec::new();
    let mut next = 0;
    while next < blocks {
        let wave = next..(next + wave_len).min(blocks);
        next = wave.end;
        let to_write = std::mem::take(&mut pending);
        let (computed, written) = rayon::join(
            || {
                wave.into_par_iter()
                    .map(|b| render_block(&ctx, b, opts.patients, opts.gzip))
                    .collect::<std::io::Result<Vec<_>>>()
            },
            || write_wave(&mut sinks, to_write, progress),
        );
        written?;
        // Compressing into memory cannot fail in practice; name the file it was for.
        pending = computed.map_err(SynthError::io(sinks[PATIENT].path()))?;
    }
    write_wave(&mut sinks, pending, progress)?;

    let mut summary = SynthSummary::default();
    for sink in sinks {
        let (path, records, bytes) = sink.finish()?;
        summary.resources += records;
        summary.bytes += bytes;
        summary.files.push((path, records));
    }
    Ok(summary)
}
