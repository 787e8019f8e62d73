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
        return error(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("no export job {id}"),
        );
    };
    if job.shape.fail {
        job.finished = true;
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "exception",
            "the export failed (FailJob fault)",
        );
    }
    if job.polls_left > 0 {
        job.polls_left -= 1;
        let done = job.polls_total - job.polls_left;
        let pct = 100 * done / (job.polls_total + 1);
        let mut r = Response::new(axum::body::Body::empty());
        *r.status_mut() = StatusCode::ACCEPTED;
        set_header(
            &mut r,
            header::HeaderName::from_static("x-progress"),
            &format!("{pct}% complete"),
        );
        set_header(
            &mut r,
            header::RETRY_AFTER,
            &ehr.config.retry_after_secs.to_string(),
        );
        return r;
    }
    job.finished = true;
    let page = crate::respond::query_pairs(query)
        .into_iter()
        .find(|(k, _)| k == "page")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(1);
    match manifest(ehr, id, job, page) {
        Some(m) => with_body(StatusCode::OK, "application/json", m.to_string()),
        None => error(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("manifest page {page} does not exist"),
        ),
    }
}

/// How many manifest pages a partial manifest has.
const MANIFEST_PAGES: usize = 3;

/// The manifest (page `page`, 1-based) in the configured shape.
fn manifest(ehr: &MockEhr, id: &str, job: &Job, page: usize) -> Option<Value> {
    let shape = ehr.config.manifest;
    let origin = ehr.origin();
    let entry = |n: usize, f: &JobFile| {
        let mut e = serde_json::Map::new();
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
            e.insert(
                "continuesInFile".into(),
                json!(format!("{origin}/files/{id}/{}", next + 1)),
            );
        }
        Value::Object(e)
    };
    let all: Vec<(usize, &JobFile)> = job.files.iter().enumerate().collect();
    let outputs: Vec<_> = all
        .iter()
        .filter(|(_, f)| f.kind == FileKind::Output)
        .collect();
    let pages = if job.shape.partial_manifest {
        MANIFEST_PAGES.min(outputs.len()).max(1)
    } else {
        1
    };
    if page == 0 || page > pages {
        return None;
    }
    let per_page = outputs.len().div_ceil(pages).max(1);
    let mut output: Vec<Value> = outputs
        .iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .map(|(n, f)| entry(*n, f))
        .collect();
    if job.shape.count_mismatch
        && page == 1
        && let Some(c) = output.first_mut().and_then(|o| o.get_mut("count"))
    {
        *c = json!(c.as_u64().unwrap_or(0) + 1);
    }
    // Deleted and error files are listed on the first page.
    let of_kind = |kind| -> Vec<Value> {
        all.iter()
            .filter(|(_, f)| f.kind == kind && page == 1)
            .map(|(n, f)| entry(*n, f))
            .collect()
    };
    let mut m = serde_json::Map::new();
    if shape == ManifestShape::Stu4 {
        m.insert(
            "manifestType".into(),
            json!("http://hl7.org/fhir/uv/bulkdata/StructureDefinition/BulkDataManifest"),
        );
    }
    m.insert(
        "transactionTime".into(),
        json!(format_instant(job.transaction_time)),
    );
    if shape != ManifestShape::Stu4 {
        m.insert("request".into(), json!(job.request_url));
    }
    m.insert("requiresAccessToken".into(), json!(ehr.config.require_auth));
    if job.organized_by_patient {
        m.insert("outputOrganizedBy".into(), json!("Patient"));
    }
    m.insert("output".into(), Value::Array(std::mem::take(&mut output)));
    if job.since_given {
        m.insert("deleted".into(), Value::Array(of_kind(FileKind::Deleted)));
    }
    let errors_key = if shape == ManifestShape::Stu4 {
        "outcome"
    } else {
        "error"
    };
    m.insert(errors_key.into(), Value::Array(of_kind(FileKind::Error)));
    let seed_url = "https://atlas.invalid/fhir/StructureDefinition/mock-ehr-seed";
    let seed = ehr.config.seed.to_string();
    m.insert(
        "extension".into(),
        if shape == ManifestShape::Stu4 {
            json!([{"url": seed_url, "valueString": seed}])
        } else {
            json!({ seed_url: seed })
        },
    );
    if page < pages {
        m.insert(
            "link".into(),
            json!([{"relation": "next", "url": format!("{origin}/jobs/{id}?page={}", page + 1)}]),
        );
    }
    Some(Value::Object(m))
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
    let jobs = ehr.lock_jobs();
    let Some(j) = jobs.jobs.get(job) else {
        return error(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("no export job {job}"),
        );
    };
    if j.expired {
        return error(
            StatusCode::GONE,
            "not-found",
            "this export's files have expired",
        );
    }
    let Some(f) = n
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_sub(1))
        .and_then(|i| j.files.get(i))
    else {
        return error(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("export {job} has no file {n}"),
        );
    };
    let mut body = Vec::with_capacity(f.lines.iter().map(|l| l.len() + 1).sum());
    for line in &f.lines {
        body.extend_from_slice(line.as_bytes());
        body.push(b'\n');
    }
    drop(jobs);
    let gzip = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| {
            e.split(';')
                .next()
                .is_some_and(|e| e.trim().eq_ignore_ascii_case("gzip"))
        });
    if !gzip {
        return with_body(StatusCode::OK, NDJSON, body);
    }
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let compressed = enc.write_all(&body).and_then(|_| enc.finish());
    match compressed {
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
