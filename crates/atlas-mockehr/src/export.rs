//! The Bulk Data kick-off: `[base]/$export`, `Patient/$export` and
//! `Group/{id}/$export` by GET (query) or POST (`Parameters`), their
//! parameters checked as the IG asks (unknown ones refused unless
//! `Prefer: handling=lenient`), and the job they start: the state as of
//! the kick-off instant (`transactionTime`), filtered, split into files.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use serde_json::Value;

use crate::auth::Grant;
use crate::clock::parse_instant;
use crate::config::{FaultKind, KickoffMode, ManifestShape};
use crate::filter::{Elements, TypeFilters};
use crate::jobs::{self, FileKind, Job, JobFile, JobShape};
use crate::json::outcome;
use crate::respond::{error, fhir, set_header};
use crate::store::{Key, Store};
use crate::{MockEhr, auth};

/// Which kick-off was called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Level {
    System,
    Patient,
    Group(String),
}

const OUTPUT_FORMATS: [&str; 3] = ["application/fhir+ndjson", "application/ndjson", "ndjson"];

/// A kick-off's parameters, checked.
#[derive(Default)]
pub(crate) struct ExportRequest {
    types: Option<Vec<String>>,
    since: Option<i64>,
    filters: TypeFilters,
    elements: Elements,
    patients: Option<HashSet<String>>,
    organize_by_patient: bool,
    /// What lenient handling ignored: reported in the job's error file.
    warnings: Vec<String>,
}

/// A resource chosen for the output.
#[derive(Clone)]
pub(crate) struct Item {
    pub ty: String,
    pub last_updated: i64,
    pub body: Arc<str>,
    pub patients: Arc<[String]>,
}

/// What the scan of the store found.
struct Selection {
    items: Vec<Item>,
    deleted: Vec<(Key, u64, i64)>,
    /// For the `DuplicateIds` fault: a selected item's index and an older
    /// version of it.
    older: Option<(usize, Arc<str>)>,
}

/// `GET|POST .../$export`.
pub(crate) async fn kickoff(
    ehr: Arc<MockEhr>,
    level: Level,
    method: &Method,
    url: String,
    headers: &HeaderMap,
    body: &Bytes,
    faults: &[FaultKind],
) -> Response {
    let (grant, request) = match admit(&ehr, &level, method, &url, headers, body) {
        Ok(admitted) => admitted,
        Err(r) => return r,
    };
    if ehr.lock_jobs().active(&grant.client_id).is_some() {
        return busy(&ehr);
    }
    let faults = faults.to_vec();
    let builder = ehr.clone();
    let job =
        tokio::task::spawn_blocking(move || build(&builder, &level, request, &grant, url, &faults))
            .await;
    let Ok(job) = job else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "exception",
            "the export could not be built",
        );
    };
    let mut jobs = ehr.lock_jobs();
    // Checked again: another kick-off of the same client may have won the race.
    if jobs.active(&job.owner).is_some() {
        return busy(&ehr);
    }
    let id = jobs.insert(job);
    drop(jobs);
    let status_url = format!("{}/jobs/{id}", ehr.origin());
    let text = format!("export started: poll {status_url}");
    let mut r = fhir(
        StatusCode::ACCEPTED,
        &outcome("information", "informational", &text),
    );
    set_header(&mut r, header::CONTENT_LOCATION, &status_url);
    r
}

/// Everything a kick-off must pass before a job is built: the method, the
/// token, the headers, the parameters, the Group.
fn admit(
    ehr: &MockEhr,
    level: &Level,
    method: &Method,
    url: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(Grant, ExportRequest), Response> {
    let allowed = match ehr.config.kickoff {
        KickoffMode::Both => true,
        KickoffMode::GetOnly => method == Method::GET,
        KickoffMode::PostOnly => method == Method::POST,
    };
    if !allowed {
        let other = if method == Method::GET { "POST" } else { "GET" };
        let text = format!("this server takes $export by {other}");
        let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "not-supported", &text);
        set_header(&mut r, header::ALLOW, other);
        return Err(r);
    }
    let grant = auth::check(ehr, headers)?;
    check_headers(headers)?;
    let lenient = prefer(headers).any(|p| p.eq_ignore_ascii_case("handling=lenient"));
    let bad = |why: String| error(StatusCode::BAD_REQUEST, "invalid", &why);
    let pairs = params(method, url, body).map_err(bad)?;
    let request = parse(ehr, level, &pairs, lenient).map_err(bad)?;
    if let Level::Group(id) = level
        && !ehr.config.groups.iter().any(|g| &g.id == id)
    {
        let text = format!("no Group/{id}");
        return Err(error(StatusCode::NOT_FOUND, "not-found", &text));
    }
    Ok((grant, request))
}

/// 429: one export per client at a time.
fn busy(ehr: &MockEhr) -> Response {
    let mut r = error(
        StatusCode::TOO_MANY_REQUESTS,
        "throttled",
        "this client already has an export in progress: finish or cancel it first",
    );
    set_header(
        &mut r,
        header::RETRY_AFTER,
        &ehr.config.retry_after_secs.to_string(),
    );
    r
}

/// The `Prefer` header's tokens.
fn prefer(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// `Prefer: respond-async` and an `Accept` that takes FHIR JSON.
fn check_headers(headers: &HeaderMap) -> Result<(), Response> {
    if !prefer(headers).any(|p| p.eq_ignore_ascii_case("respond-async")) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid",
            "the $export kick-off requires the header Prefer: respond-async",
        ));
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let ok = accept
        .split(',')
        .map(|a| a.split(';').next().unwrap_or("").trim())
        .any(|a| matches!(a, "application/fhir+json" | "application/json" | "*/*"));
    if !ok {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid",
            "the $export kick-off requires the header Accept: application/fhir+json",
        ));
    }
    Ok(())
}

/// The parameters as name/value pairs: the query, plus a POST body's
/// `Parameters` (references as their `reference`).
fn params(method: &Method, url: &str, body: &Bytes) -> Result<Vec<(String, String)>, String> {
    let query = url.split_once('?').map(|(_, q)| q);
    let mut pairs = crate::respond::query_pairs(query);
    if method != Method::POST || body.is_empty() {
        return Ok(pairs);
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the POST body is not JSON: {e}"))?;
    if value.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err("the POST body must be a FHIR Parameters resource".into());
    }
    for p in value
        .get("parameter")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = p
            .get("name")
            .and_then(Value::as_str)
            .ok_or("a parameter has no name")?;
        let value = p
            .as_object()
            .into_iter()
            .flatten()
            .find(|(k, _)| k.starts_with("value"))
            .map(|(_, v)| match v {
                Value::String(s) => s.clone(),
                Value::Object(o) => o
                    .get("reference")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                other => other.to_string(),
            })
            .ok_or_else(|| format!("parameter {name} has no value[x]"))?;
        pairs.push((name.to_string(), value));
    }
    Ok(pairs)
}

/// Checks each parameter; an error names it. With lenient handling, what
/// the server does not support is ignored and reported instead.
fn parse(
    ehr: &MockEhr,
    level: &Level,
    pairs: &[(String, String)],
    lenient: bool,
) -> Result<ExportRequest, String> {
    let mut req = ExportRequest::default();
    let stu3 = ehr.config.manifest != ManifestShape::Stu2;
    for (name, value) in pairs {
        match apply(&mut req, level, stu3, name, value) {
            Ok(()) => {}
            Err(Refusal::Unsupported(why)) if lenient => {
                req.warnings.push(format!("ignored: {why}"))
            }
            Err(Refusal::Unsupported(why) | Refusal::Invalid(why)) => return Err(why),
        }
    }
    Ok(req)
}

/// Why a parameter is refused: a wrong value, or something this server
/// does not do (which lenient handling may ignore).
enum Refusal {
    Invalid(String),
    Unsupported(String),
}

/// Applies one parameter to `req`.
fn apply(
    req: &mut ExportRequest,
    level: &Level,
    stu3: bool,
    name: &str,
    value: &str,
) -> Result<(), Refusal> {
    use Refusal::{Invalid, Unsupported};
    match name {
        "_outputFormat" if OUTPUT_FORMATS.contains(&value) => {}
        "_outputFormat" => {
            return Err(Invalid(format!(
                "_outputFormat {value:?} is not supported (use application/fhir+ndjson)"
            )));
        }
        "_since" => {
            let at = parse_instant(value);
            req.since =
                Some(at.ok_or_else(|| Invalid(format!("_since {value:?} is not an instant")))?);
        }
        "_type" => {
            for ty in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                if !atlas_fhir::is_resource_type(ty) {
                    return Err(Unsupported(format!(
                        "_type {ty:?} is not an R4 resource type"
                    )));
                }
                req.types.get_or_insert_with(Vec::new).push(ty.to_string());
            }
        }
        "_typeFilter" => req.filters.add(value).map_err(Unsupported)?,
        "_elements" => req.elements.add(value).map_err(Invalid)?,
        "patient" if *level == Level::System => {
            return Err(Invalid(
                "patient is only allowed on Patient/$export and Group/[id]/$export".into(),
            ));
        }
        "patient" => {
            let id = crate::json::patient_id_of(value)
                .ok_or_else(|| Invalid(format!("patient {value:?} is not a Patient reference")))?;
            req.patients
                .get_or_insert_with(HashSet::new)
                .insert(id.to_string());
        }
        "organizeOutputBy" if stu3 && value == "Patient" => req.organize_by_patient = true,
        "organizeOutputBy" if stu3 => {
            return Err(Unsupported(format!(
                "organizeOutputBy {value:?}: only Patient is supported"
            )));
        }
        "allowPartialManifests" if stu3 => {}
        "includeAssociatedData" => {
            return Err(Unsupported(format!(
                "includeAssociatedData {value:?} is not supported"
            )));
        }
        other => return Err(Unsupported(format!("parameter {other:?} is not supported"))),
    }
    Ok(())
}

/// Which patients' compartments an export covers.
enum Compartment {
    All,
    AnyPatient,
    Patients(HashSet<String>),
}

impl Compartment {
    fn holds(&self, patients: &[String]) -> bool {
        match self {
            Compartment::All => true,
            Compartment::AnyPatient => !patients.is_empty(),
            Compartment::Patients(set) => patients.iter().any(|p| set.contains(p)),
        }
    }
}

fn compartment(ehr: &MockEhr, store: &Store, level: &Level, req: &ExportRequest) -> Compartment {
    let members = match level {
        Level::System => return Compartment::All,
        Level::Patient => match &req.patients {
            None => return Compartment::AnyPatient,
            Some(p) => return Compartment::Patients(p.clone()),
        },
        Level::Group(id) => ehr.group_members(store, id),
    };
    match &req.patients {
        Some(p) => Compartment::Patients(members.intersection(p).cloned().collect()),
        None => Compartment::Patients(members),
    }
}

/// The store as of `at`, filtered by type, scope, compartment and `_since`.
fn select(
    ehr: &MockEhr,
    store: &Store,
    level: &Level,
    req: &ExportRequest,
    grant: &Grant,
    at: i64,
) -> Selection {
    let within = compartment(ehr, store, level, req);
    let mut sel = Selection {
        items: Vec::new(),
        deleted: Vec::new(),
        older: None,
    };
    for (key, versions) in &store.records {
        let wanted = req.types.as_ref().is_none_or(|t| t.contains(&key.0));
        if !wanted || !grant.can_read(&key.0) {
            continue;
        }
        let Some(v) = Store::as_of(versions, at) else {
            continue;
        };
        let changed = req.since.is_none_or(|s| v.last_updated > s);
        if !changed || !within.holds(&v.patients) {
            continue;
        }
        let Some(body) = &v.body else {
            if req.since.is_some() {
                sel.deleted
                    .push((key.clone(), v.version_id, v.last_updated));
            }
            continue;
        };
        if sel.older.is_none() && v.version_id > 1 {
            let prev = &versions[v.version_id as usize - 2];
            if let Some(old) = &prev.body {
                sel.older = Some((sel.items.len(), old.clone()));
            }
        }
        sel.items.push(Item {
            ty: key.0.clone(),
            last_updated: v.last_updated,
            body: body.clone(),
            patients: v.patients.clone(),
        });
    }
    sel
}

/// Builds the job: the selection at the kick-off instant, filtered, shaped
/// by the export faults, split into files.
fn build(
    ehr: &MockEhr,
    level: &Level,
    req: ExportRequest,
    grant: &Grant,
    request_url: String,
    faults: &[FaultKind],
) -> Job {
    let (at, mut sel) = {
        let store = ehr.lock_store();
        let at = store.clock;
        (at, select(ehr, &store, level, &req, grant, at))
    };
    let shape = JobShape::from_faults(faults, ehr.config.max_lines_per_file);
    let deleted = std::mem::take(&mut sel.deleted);
    let items = shape_items(sel, &req, &shape);
    let mut files = if req.organize_by_patient {
        jobs::files_by_patient(items, shape.max_lines)
    } else {
        jobs::files_by_type(items, shape.max_lines)
    };
    if let Some(bytes) = shape.huge_line {
        let line = vec![jobs::huge_binary(bytes)];
        files.push(JobFile::new(FileKind::Output, Some("Binary"), line));
    }
    if req.since.is_some() {
        files.extend(jobs::deleted_files(ehr, &deleted, at, shape.max_lines));
    }
    if !req.warnings.is_empty() {
        let lines = req
            .warnings
            .iter()
            .map(|w| Arc::from(outcome("warning", "not-supported", w).to_string()))
            .collect();
        files.push(JobFile::new(
            FileKind::Error,
            Some("OperationOutcome"),
            lines,
        ));
    }
    Job {
        owner: grant.client_id.clone(),
        request_url,
        transaction_time: at,
        since_given: req.since.is_some(),
        organized_by_patient: req.organize_by_patient,
        files,
        polls_total: ehr.config.export_delay_polls,
        polls_left: ehr.config.export_delay_polls,
        shape,
        ..Job::default()
    }
}

/// The selected resources through `_typeFilter` and `_elements`, then the
/// `DuplicateIds` and `WrongType` faults.
fn shape_items(sel: Selection, req: &ExportRequest, shape: &JobShape) -> Vec<Item> {
    let mut items = Vec::with_capacity(sel.items.len());
    let (older_of, older) = match sel.older {
        Some((i, body)) if shape.duplicate_ids => (Some(i), Some(body)),
        _ => (None, None),
    };
    for (i, item) in sel.items.into_iter().enumerate() {
        if !req.filters.keep(&item) {
            continue;
        }
        let copy = older
            .as_ref()
            .filter(|_| older_of == Some(i))
            .map(|old| Item {
                body: req.elements.apply(&item.ty, old),
                ..item.clone()
            });
        let body = req.elements.apply(&item.ty, &item.body);
        items.push(Item { body, ..item });
        items.extend(copy);
    }
    if shape.duplicate_ids && older_of.is_none() {
        // No key has an older version yet: the same version twice.
        if let Some(first) = items.first().cloned() {
            items.insert(1, first);
        }
    }
    if shape.wrong_type {
        jobs::add_wrong_type(&mut items);
    }
    items
}

/// Groups items by type (types in name order, each in id order).
pub(crate) fn by_type(items: Vec<Item>) -> BTreeMap<String, Vec<Item>> {
    let mut out: BTreeMap<String, Vec<Item>> = BTreeMap::new();
    for item in items {
        out.entry(item.ty.clone()).or_default().push(item);
    }
    out
}
