//! Deterministic synthetic FHIR R4 data, and scaling of NDJSON datasets.
//!
//! Owns: [`generate`], a Synthea-like population (patients with encounters,
//! vital signs and labs, conditions and medication requests, and the
//! organizations and practitioners they refer to) whose bytes depend only on
//! its options; and [`scale`], which multiplies an existing NDJSON dataset
//! by renaming ids and the references to them, keeping every other byte.
//!
//! May call: `atlas-fhir` only among Atlas crates (ids, references, dates),
//! plus serde_json, rand, flate2 and rayon. No I/O beyond reading the inputs
//! and writing the output files it is given; no network, no clock.

mod error;
mod generate;
mod json;
mod output;
mod rng;
mod scale;
mod time;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use error::SynthError;
pub use generate::{BLOCK_PATIENTS, GENERATED_TYPES, SynthOptions, generate};
pub use scale::{scale, scaled_id};

/// What a run wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SynthSummary {
    /// Every file written, in write order, with the number of resources
    /// (non-blank lines) it holds.
    pub files: Vec<(PathBuf, u64)>,
    /// Resources (non-blank lines) written in total.
    pub resources: u64,
    /// Bytes written in total, as stored on disk (compressed when gzip).
    pub bytes: u64,
}
