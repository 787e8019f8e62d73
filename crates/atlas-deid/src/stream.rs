//! The streaming driver behind `atlas deid`: inputs in (NDJSON, Bundles,
//! gzip, folders — read and classified by `atlas-ingest`), de-identified
//! NDJSON out, one file per resource type.
//!
//! Reading and classifying run on their own threads; each block of resources
//! is de-identified in parallel (rayon) and written in input order, so two
//! runs over the same inputs with the same key write the same bytes. The
//! output is built in a sibling folder and moved into place at the end: a run
//! killed at any point leaves the previous output (or none), and running it
//! again converges.
//!
//! Every input line ends somewhere: written, quarantined with a reason (bad
//! JSON, not FHIR R4, a rule that failed — naming file, line, resource type
//! and id, never the content), skipped (blank), or counted as a Bundle
//! deletion. `Summary::reconciles` checks the sum.

use crate::engine::{Deidentifier, ResourceContext};
use atlas_ingest::{Event, IdentifierIndex, Input, ReadOptions, prescan_identifiers, read_events};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Options of one run.
#[derive(Debug, Clone, Default)]
pub struct StreamOptions {
    pub read: ReadOptions,
    /// Also write `changes.ndjson`: per resource, which elements changed and how.
    pub write_changes: bool,
}

/// The counts of one run. `read = written + quarantined + skipped + deletes`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Lines and Bundle entries read.
    pub read: u64,
    pub written: u64,
    /// Lines the reader refused (not JSON, no resourceType, …).
    pub rejected: u64,
    /// Resources the engine refused (not FHIR R4, a failed rule).
    pub failed: u64,
    /// Resources a failed rule emptied under `processingErrors: skip` (also in `written`).
    pub emptied: u64,
    /// Blank lines.
    pub skipped: u64,
    /// Bundle entries that delete a resource (nothing to de-identify).
    pub deletes: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub by_type: BTreeMap<String, u64>,
    pub quarantine_by_reason: BTreeMap<String, u64>,
}

impl Summary {
    pub fn reconciles(&self) -> bool {
        self.read == self.written + self.rejected + self.failed + self.skipped + self.deletes
    }

    fn to_json(&self) -> String {
        let map = |m: &BTreeMap<String, u64>| {
            let parts: Vec<String> = m.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            format!("{{{}}}", parts.join(","))
        };
        format!(
            "{{\"read\":{},\"written\":{},\"rejected\":{},\"failed\":{},\"emptied\":{},\"skipped\":{},\"deletes\":{},\"bytes_in\":{},\"bytes_out\":{},\"by_type\":{},\"quarantine_by_reason\":{}}}\n",
            self.read,
            self.written,
            self.rejected,
            self.failed,
            self.emptied,
            self.skipped,
            self.deletes,
            self.bytes_in,
            self.bytes_out,
            map(&self.by_type),
            map(&self.quarantine_by_reason)
        )
    }
}

/// Live counters for a progress bar.
#[derive(Debug, Default)]
pub struct Progress {
    /// Raw input bytes consumed.
    pub bytes: Arc<AtomicU64>,
    pub resources: AtomicU64,
}

fn json_str(s: &str) -> String {
    atlas_fhirpath::JsonValue::String(std::borrow::Cow::Borrowed(s)).to_json_string()
}

struct Quarantine {
    file: String,
    line: u64,
    reason: &'static str,
    message: String,
    resource_type: Option<String>,
    id: Option<String>,
}

impl Quarantine {
    fn to_json(&self) -> String {
        let opt = |v: &Option<String>| v.as_deref().map_or("null".to_string(), json_str);
        format!(
            "{{\"file\":{},\"line\":{},\"reason\":\"{}\",\"message\":{},\"resourceType\":{},\"id\":{}}}\n",
            json_str(&self.file),
            self.line,
            self.reason,
            json_str(&self.message),
            opt(&self.resource_type),
            opt(&self.id)
        )
    }
}

enum Outcome {
    Written {
        resource_type: String,
        line: String,
        changes: Option<String>,
        emptied: bool,
    },
    Quarantined(Quarantine),
    Skipped,
    Deleted,
}

/// Where the output is built before it replaces `out`.
fn staging_dir(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "deid".into());
    out.with_file_name(format!(".{name}.partial"))
}

/// De-identifies `inputs` into `out` (per-type `<Type>.ndjson`, `quarantine.ndjson`,
/// `changes.ndjson` when asked, and `summary.json`).
pub fn run(
    deid: &Deidentifier,
    inputs: &[Input],
    out: &Path,
    opts: &StreamOptions,
    progress: &Progress,
) -> std::io::Result<Summary> {
    // The output replaces `out` at the end; never a folder this did not write.
    if out.exists()
        && !out.join("summary.json").exists()
        && std::fs::read_dir(out)?.next().is_some()
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not an earlier de-identification output (no summary.json); \
                 refusing to replace it: name a new or empty folder",
                out.display()
            ),
        ));
    }
    let staging = staging_dir(out);
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    std::fs::create_dir_all(&staging)?;

    let mut index = IdentifierIndex::default();
    if inputs.iter().any(|i| i.kind.may_hold_bundles()) {
        prescan_identifiers(inputs, &opts.read, &mut index)?;
    }
    let rx = read_events(
        inputs.to_vec(),
        opts.read.clone(),
        Arc::new(index),
        progress.bytes.clone(),
    )?;

    let mut summary = Summary::default();
    let mut writers: BTreeMap<String, BufWriter<File>> = BTreeMap::new();
    let mut quarantine = BufWriter::new(File::create(staging.join("quarantine.ndjson"))?);
    let mut changes = if opts.write_changes {
        Some(BufWriter::new(File::create(
            staging.join("changes.ndjson"),
        )?))
    } else {
        None
    };
    for block in rx {
        let outcomes: Vec<Outcome> = block
            .events
            .into_par_iter()
            .with_min_len(16)
            .map(|ev| one(deid, ev, opts.write_changes))
            .collect();
        for o in outcomes {
            summary.read += 1;
            match o {
                Outcome::Written {
                    resource_type,
                    line,
                    changes: ch,
                    emptied,
                } => {
                    let w = match writers.get_mut(&resource_type) {
                        Some(w) => w,
                        None => {
                            let f = File::create(staging.join(format!("{resource_type}.ndjson")))?;
                            writers
                                .entry(resource_type.clone())
                                .or_insert(BufWriter::with_capacity(1 << 20, f))
                        }
                    };
                    w.write_all(line.as_bytes())?;
                    w.write_all(b"\n")?;
                    summary.bytes_out += line.len() as u64 + 1;
                    summary.written += 1;
                    summary.emptied += u64::from(emptied);
                    *summary.by_type.entry(resource_type).or_default() += 1;
                    if let (Some(cw), Some(ch)) = (changes.as_mut(), ch) {
                        cw.write_all(ch.as_bytes())?;
                    }
                    progress.resources.fetch_add(1, Ordering::Relaxed);
                }
                Outcome::Quarantined(q) => {
                    if q.reason == "deid_failed" || q.reason == "not_fhir_r4" {
                        summary.failed += 1;
                    } else {
                        summary.rejected += 1;
                    }
                    *summary
                        .quarantine_by_reason
                        .entry(q.reason.to_string())
                        .or_default() += 1;
                    quarantine.write_all(q.to_json().as_bytes())?;
                }
                Outcome::Skipped => summary.skipped += 1,
                Outcome::Deleted => summary.deletes += 1,
            }
        }
    }
    summary.bytes_in = progress.bytes.load(Ordering::Relaxed);
    for (_, mut w) in writers {
        w.flush()?;
        w.get_ref().sync_all()?;
    }
    quarantine.flush()?;
    if let Some(mut c) = changes {
        c.flush()?;
    }
    std::fs::write(staging.join("summary.json"), summary.to_json())?;
    // Swap into place: the old output goes only once the new one is complete.
    if out.exists() {
        std::fs::remove_dir_all(out)?;
    }
    std::fs::rename(&staging, out)?;
    Ok(summary)
}

fn one(deid: &Deidentifier, ev: Event, with_changes: bool) -> Outcome {
    match ev {
        Event::Skip(_) => Outcome::Skipped,
        Event::Delete(_) => Outcome::Deleted,
        Event::Reject(r) => Outcome::Quarantined(Quarantine {
            file: r.origin.file.to_string(),
            line: r.origin.line,
            reason: r.reason.code(),
            message: r.message.clone(),
            resource_type: r.resource_type.clone(),
            id: r.resource_id.clone(),
        }),
        Event::Resource(p) => {
            let path = Path::new(&*p.origin.file);
            let file_name = path.file_name().and_then(|n| n.to_str());
            let folder_name = path
                .parent()
                .and_then(|d| d.file_name())
                .and_then(|n| n.to_str());
            let ctx = ResourceContext {
                file_name,
                folder_name,
                patient_id: p.patient_id.as_deref(),
            };
            match deid.deidentify_str(&p.json, &ctx) {
                Ok(d) => {
                    let changes = with_changes.then(|| {
                        let items: Vec<String> = d
                            .changes
                            .iter()
                            .map(|c| {
                                format!(
                                    "{{\"path\":{},\"op\":\"{}\",\"rule\":{}}}",
                                    json_str(&c.path),
                                    c.operation.as_str(),
                                    if c.rule == usize::MAX {
                                        "null".to_string()
                                    } else {
                                        c.rule.to_string()
                                    }
                                )
                            })
                            .collect();
                        format!(
                            "{{\"resourceType\":{},\"id\":{},\"changes\":[{}]}}\n",
                            json_str(&d.resource_type),
                            d.id.as_deref().map_or("null".to_string(), json_str),
                            items.join(",")
                        )
                    });
                    Outcome::Written {
                        resource_type: d.resource_type.clone(),
                        line: d.to_json_string(),
                        changes,
                        emptied: d.emptied,
                    }
                }
                Err(e) => {
                    let reason = match e {
                        crate::DeidError::Processing { .. } => "deid_failed",
                        _ => "not_fhir_r4",
                    };
                    Outcome::Quarantined(Quarantine {
                        file: p.origin.file.to_string(),
                        line: p.origin.line,
                        reason,
                        message: e.to_string(),
                        resource_type: Some(p.resource_type.clone()),
                        id: Some(p.id.clone()),
                    })
                }
            }
        }
    }
}
