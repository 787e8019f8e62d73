//! Export jobs after the kick-off: their files (split by type or organized
//! by patient, deleted-resource Bundles, error OperationOutcomes), the
//! status endpoint (202 with `X-Progress` and `Retry-After`, then the
//! manifest in the configured shape, optionally in pages), cancellation,
//! and the file downloads (gzip on request, bearer when required).

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};

use crate::clock::format_instant;
use crate::config::{FaultKind, ManifestShape};
use crate::export::{Item, by_type};
use crate::respond::{NDJSON, error, set_header, with_body};
use crate::store::Key;
use crate::{MockEhr, auth};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum FileKind {
    #[default]
    Output,
    Deleted,
    Error,
}

/// One export file: its lines are shared with the store where unchanged.
#[derive(Default)]
pub(crate) struct JobFile {
    pub kind: FileKind,
    pub ty: Option<String>,
    pub lines: Vec<Arc<str>>,
    /// Index (0-based) of the file this one's last patient block continues in.
    pub continues_in: Option<usize>,
}

impl JobFile {
    pub fn new(kind: FileKind, ty: Option<&str>, lines: Vec<Arc<str>>) -> JobFile {
        JobFile {
            kind,
            ty: ty.map(str::to_string),
            lines,
            continues_in: None,
        }
    }
}

/// How the export faults shape one job.
#[derive(Debug, Clone, Default)]
pub(crate) struct JobShape {
    pub max_lines: usize,
    pub huge_line: Option<usize>,
    pub wrong_type: bool,
    pub count_mismatch: bool,
    pub duplicate_ids: bool,
    pub partial_manifest: bool,
    pub fail: bool,
}

impl JobShape {
    pub fn from_faults(faults: &[FaultKind], max_lines: usize) -> JobShape {
        let mut s = JobShape {
            max_lines,
            ..JobShape::default()
        };
        for f in faults {
            match f {
                FaultKind::TinyFiles => s.max_lines = 1,
                FaultKind::HugeLine { bytes } => s.huge_line = Some(*bytes),
                FaultKind::WrongType => s.wrong_type = true,
                FaultKind::CountMismatch => s.count_mismatch = true,
                FaultKind::DuplicateIds => s.duplicate_ids = true,
                FaultKind::PartialManifest => s.partial_manifest = true,
                FaultKind::FailJob => s.fail = true,
                _ => {}
            }
        }
        s
    }
}

#[derive(Default)]
pub(crate) struct Job {
    pub owner: String,
    pub request_url: String,
    pub transaction_time: i64,
    pub since_given: bool,
    pub organized_by_patient: bool,
    pub files: Vec<JobFile>,
    pub polls_total: u32,
    pub polls_left: u32,
    pub shape: JobShape,
    /// The manifest was answered (or the job failed): no longer in progress.
    pub finished: bool,
    /// An `ExpireFiles` fault fired: its files answer 410.
    pub expired: bool,
}

#[derive(Default)]
pub(crate) struct Jobs {
    next: u64,
    jobs: HashMap<String, Job>,
}

impl Jobs {
    /// The id of `client`'s export still in progress, if any.
    pub fn active(&self, client: &str) -> Option<&str> {
        self.jobs
            .iter()
            .find(|(_, j)| j.owner == client && !j.finished)
            .map(|(id, _)| id.as_str())
    }

    pub fn insert(&mut self, job: Job) -> String {
        self.next += 1;
        let id = format!("job-{}", self.next);
        self.jobs.insert(id.clone(), job);
        id
    }

    pub fn expire(&mut self, id: &str) {
        if let Some(j) = self.jobs.get_mut(id) {
            j.expired = true;
        }
    }
}

/// Files of one type each, in type order, each at most `max_lines` long.
pub(crate) fn files_by_type(items: Vec<Item>, max_lines: usize) -> Vec<JobFile> {
    let mut files = Vec::new();
    for (ty, items) in by_type(items) {
        let lines: Vec<Arc<str>> = items.into_iter().map(|i| i.body).collect();
        for chunk in lines.chunks(max_lines) {
            files.push(JobFile::new(FileKind::Output, Some(&ty), chunk.to_vec()));
        }
    }
    files
}

/// STU3 `organizeOutputBy=Patient`: one block per patient (the Patient
/// first, then its compartment in type order), blocks in patient order,
/// resources of no patient last; a block cut by the file size continues
/// in the next file (`continuesInFile`).
pub(crate) fn files_by_patient(items: Vec<Item>, max_lines: usize) -> Vec<JobFile> {
    let mut blocks: std::collections::BTreeMap<(bool, String), Vec<Item>> = Default::default();
    for item in items {
        let owner = item.patients.first().cloned();
        blocks
            .entry((owner.is_none(), owner.unwrap_or_default()))
            .or_default()
            .push(item);
    }
    let mut files: Vec<JobFile> = Vec::new();
    let mut current: Vec<Arc<str>> = Vec::new();
    for (_, mut block) in blocks {
        block.sort_by_key(|i| i.ty != "Patient");
        for (k, item) in block.into_iter().enumerate() {
            if current.len() == max_lines {
                let mut f = JobFile::new(FileKind::Output, None, std::mem::take(&mut current));
                // The block started in this file goes on in the next one.
                f.continues_in = (k > 0).then_some(files.len() + 1);
                files.push(f);
            }
            current.push(item.body);
        }
    }
    if !current.is_empty() {
        files.push(JobFile::new(FileKind::Output, None, current));
    }
    files
}

/// `WrongType`: a resource of another type appended to the first type's
/// last file (a copy of the first resource of another type, or a Basic).
pub(crate) fn add_wrong_type(items: &mut Vec<Item>) {
    let Some(first_ty) = items.iter().map(|i| i.ty.clone()).min() else {
        return;
    };
    let body = items
        .iter()
        .find(|i| i.ty != first_ty)
        .map(|i| i.body.clone())
        .unwrap_or_else(|| {
            Arc::from(r#"{"resourceType":"Basic","id":"mock-wrong-type","code":{"text":"mock"}}"#)
        });
    items.push(Item {
        ty: first_ty,
        last_updated: 0,
        body,
        patients: Arc::from(Vec::new()),
    });
}

/// `HugeLine`: a Binary whose `data` makes its line about `bytes` long.
pub(crate) fn huge_binary(bytes: usize) -> Arc<str> {
    // "QUFB" is base64 for "AAA": valid base64 of any multiple of 4.
    let data = "QUFB".repeat(bytes.div_ceil(4).max(1));
    Arc::from(format!(
        r#"{{"resourceType":"Binary","id":"mock-huge-line","contentType":"application/octet-stream","data":"{data}"}}"#
    ))
}

/// Deleted keys as transaction Bundles of DELETE entries, 100 per Bundle.
pub(crate) fn deleted_files(
    ehr: &MockEhr,
    deleted: &[(Key, u64, i64)],
    at: i64,
    max_lines: usize,
) -> Vec<JobFile> {
    let base = ehr.fhir_base();
    let bundles: Vec<Arc<str>> = deleted
        .chunks(100)
        .enumerate()
        .map(|(n, chunk)| {
            let entries: Vec<Value> = chunk
                .iter()
                .map(|((ty, id), vid, lu)| {
                    json!({
                        "fullUrl": format!("{base}/{ty}/{id}"),
                        "request": {"method": "DELETE", "url": format!("{ty}/{id}")},
                        "response": {"status": "204", "lastModified": format_instant(*lu), "etag": format!("W/\"{vid}\"")}
                    })
                })
                .collect();
            let bundle = json!({
                "resourceType": "Bundle",
                "id": format!("deleted-{}", n + 1),
                "meta": {"lastUpdated": format_instant(at)},
                "type": "transaction",
                "entry": entries
            });
            Arc::from(bundle.to_string())
        })
        .collect();
    bundles
        .chunks(max_lines)
        .map(|c| JobFile::new(FileKind::Deleted, Some("Bundle"), c.to_vec()))
        .collect()
}

/// `GET /jobs/{id}`: progress, the manifest (or one page of it), or the failure.
pub(crate) fn status(
    ehr: &MockEhr,
    id: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Response {
    let grant = match auth::check(ehr, headers) {
        Ok(g) => g,
        Err(r) => return r,
    };
    let mut jobs = ehr.lock_jobs();
    let Some(job) = jobs.jobs.get_mut(id).filter(|j| j.owner == grant.client_id) else {
        let text = format!("no export job {id}");
        return error(StatusCode::NOT_FOUND, "not-found", &text);
    };
    if job.shape.fail {
        job.finished = true;
        let text = "the export failed (FailJob fault)";
        return error(StatusCode::INTERNAL_SERVER_ERROR, "exception", text);
    }
    if job.polls_left > 0 {
        job.polls_left -= 1;
        return in_progress(ehr, job);
    }
    job.finished = true;
    let page = crate::respond::query_pairs(query)
        .into_iter()
        .find(|(k, _)| k == "page")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(1);
    match manifest(ehr, id, job, page) {
        Some(m) => with_body(StatusCode::OK, "application/json", m.to_string()),
        None => {
            let text = format!("manifest page {page} does not exist");
            error(StatusCode::NOT_FOUND, "not-found", &text)
        }
    }
}

/// 202 with `X-Progress` and `Retry-After`.
fn in_progress(ehr: &MockEhr, job: &Job) -> Response {
    let done = job.polls_total - job.polls_left;
    let pct = 100 * done / (job.polls_total + 1);
    let mut r = Response::new(axum::body::Body::empty());
    *r.status_mut() = StatusCode::ACCEPTED;
    let progress = header::HeaderName::from_static("x-progress");
    set_header(&mut r, progress, &format!("{pct}% complete"));
    let retry = ehr.config.retry_after_secs.to_string();
    set_header(&mut r, header::RETRY_AFTER, &retry);
    r
}

/// How many manifest pages a partial manifest has.
const MANIFEST_PAGES: usize = 3;

/// The manifest's entry for file `n` (0-based) of job `id`.
fn file_entry(origin: &str, id: &str, shape: ManifestShape, n: usize, f: &JobFile) -> Value {
    let mut e = serde_json::Map::new();
    // The STU4 examples give deleted and outcome files no type.
    let typed = !(shape == ManifestShape::Stu4 && f.kind != FileKind::Output);
    if let Some(ty) = f.ty.as_ref().filter(|_| typed) {
        e.insert("type".into(), json!(ty));
    }
    e.insert(
        "url".into(),
        json!(format!("{origin}/files/{id}/{}", n + 1)),
    );
    e.insert("count".into(), json!(f.lines.len()));
    if let Some(next) = f.continues_in {
        let url = format!("{origin}/files/{id}/{}", next + 1);
        e.insert("continuesInFile".into(), json!(url));
    }
    Value::Object(e)
}

/// The manifest (page `page`, 1-based) in the configured shape.
fn manifest(ehr: &MockEhr, id: &str, job: &Job, page: usize) -> Option<Value> {
    let shape = ehr.config.manifest;
    let origin = ehr.origin();
    let entries = |kind: FileKind| -> Vec<Value> {
        let files = job.files.iter().enumerate().filter(|(_, f)| f.kind == kind);
        files
            .map(|(n, f)| file_entry(&origin, id, shape, n, f))
            .collect()
    };
    let outputs = entries(FileKind::Output);
    let pages = match job.shape.partial_manifest {
        true => MANIFEST_PAGES.min(outputs.len()).max(1),
        false => 1,
    };
    if page == 0 || page > pages {
        return None;
    }
    let per_page = outputs.len().div_ceil(pages).max(1);
    let mut output: Vec<Value> = outputs
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .collect();
    if job.shape.count_mismatch
        && page == 1
        && let Some(c) = output.first_mut().and_then(|o| o.get_mut("count"))
    {
        *c = json!(c.as_u64().unwrap_or(0) + 1);
    }
    let mut m = manifest_head(ehr, job);
    m.insert("output".into(), Value::Array(output));
    // Deleted and error files are listed on the first page.
    let first = |v: Vec<Value>| Value::Array(if page == 1 { v } else { Vec::new() });
    if job.since_given {
        m.insert("deleted".into(), first(entries(FileKind::Deleted)));
    }
    let errors_key = if shape == ManifestShape::Stu4 {
        "outcome"
    } else {
        "error"
    };
    m.insert(errors_key.into(), first(entries(FileKind::Error)));
    m.insert("extension".into(), manifest_extension(ehr));
    if page < pages {
        let next = format!("{origin}/jobs/{id}?page={}", page + 1);
        m.insert("link".into(), json!([{"relation": "next", "url": next}]));
    }
    Some(Value::Object(m))
}

/// The members before `output`: what the shape asks for.
fn manifest_head(ehr: &MockEhr, job: &Job) -> serde_json::Map<String, Value> {
    let stu4 = ehr.config.manifest == ManifestShape::Stu4;
    let mut m = serde_json::Map::new();
    if stu4 {
        let ty = "http://hl7.org/fhir/uv/bulkdata/StructureDefinition/BulkDataManifest";
        m.insert("manifestType".into(), json!(ty));
    }
    let tt = format_instant(job.transaction_time);
    m.insert("transactionTime".into(), json!(tt));
    if !stu4 {
        m.insert("request".into(), json!(job.request_url));
    }
    m.insert("requiresAccessToken".into(), json!(ehr.config.require_auth));
    if job.organized_by_patient {
        m.insert("outputOrganizedBy".into(), json!("Patient"));
    }
    m
}

/// The seed, as an extension: an object before STU4, FHIR extensions after.
fn manifest_extension(ehr: &MockEhr) -> Value {
    let url = "https://atlas.invalid/fhir/StructureDefinition/mock-ehr-seed";
    let seed = ehr.config.seed.to_string();
    match ehr.config.manifest {
        ManifestShape::Stu4 => json!([{"url": url, "valueString": seed}]),
        _ => json!({ url: seed }),
    }
}

/// `DELETE /jobs/{id}`: 202, then the job is gone (404).
pub(crate) fn cancel(ehr: &MockEhr, id: &str, headers: &HeaderMap) -> Response {
    let grant = match auth::check(ehr, headers) {
        Ok(g) => g,
        Err(r) => return r,
    };
    let mut jobs = ehr.lock_jobs();
    match jobs.jobs.get(id) {
        Some(j) if j.owner == grant.client_id => {
            jobs.jobs.remove(id);
            crate::respond::fhir(
                StatusCode::ACCEPTED,
                &crate::json::outcome(
                    "information",
                    "informational",
                    &format!("export {id} deleted"),
                ),
            )
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("no export job {id}"),
        ),
    }
}

/// `GET /files/{job}/{n}`; `other_host` downloads (after a redirect) need no token.
pub(crate) fn file(
    ehr: &MockEhr,
    job: &str,
    n: &str,
    headers: &HeaderMap,
    other_host: bool,
) -> Response {
    if !other_host && let Err(r) = auth::check(ehr, headers) {
        return r;
    }
    let body = {
        let jobs = ehr.lock_jobs();
        let Some(j) = jobs.jobs.get(job) else {
            let text = format!("no export job {job}");
            return error(StatusCode::NOT_FOUND, "not-found", &text);
        };
        if j.expired {
            return error(
                StatusCode::GONE,
                "not-found",
                "this export's files have expired",
            );
        }
        let index = n.parse::<usize>().ok().and_then(|n| n.checked_sub(1));
        let Some(f) = index.and_then(|i| j.files.get(i)) else {
            let text = format!("export {job} has no file {n}");
            return error(StatusCode::NOT_FOUND, "not-found", &text);
        };
        ndjson(f)
    };
    if !wants_gzip(headers) {
        return with_body(StatusCode::OK, NDJSON, body);
    }
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    match enc.write_all(&body).and_then(|_| enc.finish()) {
        Ok(bytes) => {
            let mut r = with_body(StatusCode::OK, NDJSON, bytes);
            set_header(&mut r, header::CONTENT_ENCODING, "gzip");
            r
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "exception",
            &format!("gzip: {e}"),
        ),
    }
}

/// A file's lines, each ended by a newline.
fn ndjson(f: &JobFile) -> Vec<u8> {
    let mut body = Vec::with_capacity(f.lines.iter().map(|l| l.len() + 1).sum());
    for line in &f.lines {
        body.extend_from_slice(line.as_bytes());
        body.push(b'\n');
    }
    body
}

/// `Accept-Encoding` names gzip.
fn wants_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|e| e.split(';').next())
        .any(|e| e.trim().eq_ignore_ascii_case("gzip"))
}
