//! FHIR REST under `/fhir`: read (the stored JSON, byte for byte), search,
//! `Patient/{id}/$everything` and the CapabilityStatement, over the
//! resource store.
//!
//! Search parameters: `_id`, `_lastUpdated`, `patient`/`subject`, and for
//! types with an ontology view `code`, `date` and `status` (evaluated on the
//! view's columns, joined by id); `_count`, `_sort` (`_id`, `_lastUpdated`,
//! `-` for descending), `_total=accurate`. Unknown parameters are refused
//! (400): a server that ignores a filter returns more than was asked for.
//! Paging follows `Bundle.link[next]`, whose `_page_token` is the signed
//! token of the object-set API: same principal, same search, same table
//! versions, keyset position.
//!
//! Every read asks the `PolicyEngine` for the resource type and applies the
//! row scope (the patient compartment, by the store's `patient_id`) to the
//! scan itself, as the object-set paths do.

use std::collections::{BTreeMap, HashMap};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, TimeUnit};
use arrow::record_batch::RecordBatch;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use datafusion::common::ScalarValue;
use datafusion::dataframe::DataFrame;
use datafusion::datasource::provider_as_source;
use datafusion::logical_expr::{Expr, LogicalPlanBuilder, in_subquery, lit};
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use atlas_ontology::ObjectType;
use atlas_policy::{Action, Decision, Grant, Principal, RowScope};

use crate::error::internal;
use crate::query::{Planner, Providers, after_expr, allowed_rows, column, key_json, write_str};
use crate::{ApiError, AppState};
use atlas_access::Egress;
use atlas_access::egress::ResourceRelease;
use atlas_access::token::{PageState, digest};

use atlas_access::tables::STORE_DIR;
const STORE: &str = "resources";
const DEFAULT_COUNT: usize = 50;

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(metadata))
        .routes(routes!(search))
        .routes(routes!(read))
        .routes(routes!(operation))
}

/// An error as a FHIR OperationOutcome.
pub(crate) struct Outcome(ApiError);

impl From<atlas_access::AccessError> for Outcome {
    fn from(e: atlas_access::AccessError) -> Self {
        Outcome(ApiError(e))
    }
}

impl From<ApiError> for Outcome {
    fn from(e: ApiError) -> Self {
        Outcome(e)
    }
}

impl IntoResponse for Outcome {
    fn into_response(self) -> Response {
        let e = self.0;
        let code = match e.status {
            StatusCode::NOT_FOUND => "not-found",
            StatusCode::GONE => "deleted",
            StatusCode::UNAUTHORIZED => "login",
            StatusCode::FORBIDDEN => "forbidden",
            s if s.is_server_error() => "exception",
            _ => "invalid",
        };
        let body = json!({
            "resourceType": "OperationOutcome",
            "issue": [{
                "severity": "error",
                "code": code,
                "details": {"text": e.name},
                "diagnostics": e.message,
                "expression": [e.parameter],
            }]
        });
        let mut r = (
            e.status,
            [(header::CONTENT_TYPE, "application/fhir+json")],
            body.to_string(),
        )
            .into_response();
        r.extensions_mut().insert(crate::error::ErrorKind(e.name));
        crate::error::add_challenge(e.challenge.as_deref(), &mut r);
        r
    }
}

fn invalid(param: &str, value: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "InvalidSearch",
        param,
        value,
        message,
    )
}

fn fhir_json(body: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/fhir+json")], body).into_response()
}

/// The object type whose view holds a resource type's searchable columns.
fn view_type<'o>(state: &'o AppState, resource_type: &str) -> Option<&'o ObjectType> {
    state
        .ontology
        .object_types
        .iter()
        .find(|t| crate::query::resource_type(t) == resource_type)
}

fn first_property<'t>(t: &'t ObjectType, names: &[&str]) -> Option<&'t str> {
    names
        .iter()
        .find_map(|n| t.property(n).map(|p| p.api_name.as_str()))
}

fn is_resource_type(s: &str) -> bool {
    atlas_fhir::is_resource_type(s)
}

/// The store scan, scoped for `who` on `resource_type`.
fn scoped_store(
    state: &AppState,
    who: &Principal,
    resource_type: &str,
    action: Action,
    providers: &Providers,
) -> Result<(LogicalPlanBuilder, Grant), ApiError> {
    let grant = crate::query::allowed_resources(
        state,
        who,
        resource_type,
        action,
        ("resourceType", resource_type),
    )?;
    let provider = providers
        .get(STORE)
        .ok_or_else(|| internal("the resource store was not opened"))?;
    let b = LogicalPlanBuilder::scan("store", provider_as_source(provider.clone()), None)
        .map_err(internal)?;
    let b = b
        .filter(
            column("resource_type")
                .eq(lit(resource_type))
                .and(column("deleted").eq(lit(false))),
        )
        .map_err(internal)?;
    Ok((scope_rows(b, &grant.rows)?, grant))
}

/// The store's rows inside a row scope (every resource row carries its
/// patient key, null for resources outside any compartment).
fn scope_rows(b: LogicalPlanBuilder, scope: &RowScope) -> Result<LogicalPlanBuilder, ApiError> {
    match crate::query::scope_predicate(Some("patient_id"), scope) {
        Ok(None) => Ok(b),
        Ok(Some(p)) => b.filter(p).map_err(internal),
        Err(e) => Err(internal(e)),
    }
}

/// The store at the pinned or latest version, plus every view a search may
/// join.
async fn open(
    state: &AppState,
    pinned: Option<&BTreeMap<String, u64>>,
    views: &[&ObjectType],
) -> Result<(BTreeMap<String, u64>, Providers), ApiError> {
    let mut versions = BTreeMap::new();
    let mut providers = HashMap::new();
    let mut wanted = vec![(STORE.to_owned(), STORE_DIR.to_owned())];
    for t in views {
        wanted.push((
            t.backing_view.clone(),
            atlas_viewstore::view_table_dir(&t.backing_view),
        ));
    }
    for (name, dir) in wanted {
        let version = match pinned {
            Some(p) => *p.get(&name).ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "PageTokenMismatch",
                    "_page_token",
                    "…",
                    "the page token does not cover this search's tables",
                )
            })?,
            None => state.tables.latest_version(&dir).await?,
        };
        providers.insert(name.clone(), state.tables.provider(&dir, version).await?);
        versions.insert(name, version);
    }
    Ok((versions, providers))
}

/// The query string as ordered pairs (FHIR repeats parameters to AND them).
fn pairs(raw: Option<String>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// A FHIR date or instant as the UTC microsecond range it covers.
fn date_range(v: &str) -> Option<(i64, i64)> {
    use chrono::{DateTime, Months, NaiveDate};
    let day = |d: NaiveDate| {
        d.and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp_micros())
    };
    let b = v.as_bytes();
    match b.len() {
        4 => {
            let y: i32 = v.parse().ok()?;
            let s = NaiveDate::from_ymd_opt(y, 1, 1)?;
            Some((day(s)?, day(s.checked_add_months(Months::new(12))?)?))
        }
        7 => {
            let s = NaiveDate::parse_from_str(&format!("{v}-01"), "%Y-%m-%d").ok()?;
            Some((day(s)?, day(s.checked_add_months(Months::new(1))?)?))
        }
        10 => {
            let s = NaiveDate::parse_from_str(v, "%Y-%m-%d").ok()?;
            Some((day(s)?, day(s.succ_opt()?)?))
        }
        _ => {
            let t = DateTime::parse_from_rfc3339(v).ok()?.timestamp_micros();
            Some((t, t + 1))
        }
    }
}

fn split_prefix(v: &str) -> (&str, &str) {
    for p in ["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"] {
        if let Some(rest) = v.strip_prefix(p)
            && rest.starts_with(|c: char| c.is_ascii_digit())
        {
            return (p, rest);
        }
    }
    ("eq", v)
}

fn last_updated_expr(value: &str) -> Result<Expr, ApiError> {
    let (prefix, v) = split_prefix(value);
    let (start, end) = date_range(v).ok_or_else(|| {
        invalid(
            "_lastUpdated",
            value,
            "_lastUpdated takes an optional prefix (eq, ne, gt, ge, lt, le, sa, eb) and a date or instant",
        )
    })?;
    let ts = |us: i64| {
        lit(ScalarValue::TimestampMicrosecond(
            Some(us),
            Some("UTC".into()),
        ))
    };
    let c = column("last_updated");
    let cmp = match prefix {
        "eq" => c.clone().gt_eq(ts(start)).and(c.clone().lt(ts(end))),
        "ne" => c.clone().lt(ts(start)).or(c.clone().gt_eq(ts(end))),
        "gt" | "sa" => c.clone().gt_eq(ts(end)),
        "ge" => c.clone().gt_eq(ts(start)),
        "lt" | "eb" => c.clone().lt(ts(start)),
        _ => c.clone().lt(ts(end)),
    };
    Ok(c.is_not_null().and(cmp))
}

/// `date` on a view's time property (FHIR text, compared at the value's
/// precision, as `dateFrom`/`dateTo` do).
fn view_date_expr(col: &str, value: &str) -> Result<Expr, ApiError> {
    let (prefix, v) = split_prefix(value);
    let ok = matches!(v.len(), 4 | 7 | 10) && date_range(v).is_some();
    if !ok {
        return Err(invalid(
            "date",
            value,
            "date takes an optional prefix (eq, ne, gt, ge, lt, le) and YYYY, YYYY-MM or YYYY-MM-DD",
        ));
    }
    let c = column(col);
    let left = datafusion::functions::unicode::expr_fn::left(c.clone(), lit(v.len() as i64));
    let v = lit(v);
    let cmp = match prefix {
        "eq" => left.eq(v),
        "ne" => left.not_eq(v),
        "gt" | "sa" => left.gt(v),
        "ge" => left.gt_eq(v),
        "lt" | "eb" => left.lt(v),
        _ => left.lt_eq(v),
    };
    Ok(c.is_not_null().and(cmp))
}

/// A parsed search.
struct Search {
    resource_type: String,
    /// Parameters that filter, normalised (sorted) for the page token.
    filters: Vec<(String, String)>,
    count: usize,
    sort: Vec<(String, bool)>,
    page_token: Option<String>,
    total: bool,
    /// `$everything`: the patient, and `_type` / `_since`.
    everything: Option<String>,
    /// Every match as NDJSON (`_format=ndjson` or `Accept:
    /// application/fhir+ndjson`) instead of a Bundle page.
    ndjson: bool,
    /// `_count` was given (refused with NDJSON, which has no pages).
    count_given: bool,
}

/// The column `_sort=date` orders by: the type's time property, joined
/// from its view.
const SORT_DATE: &str = "__sort_date";

const SEARCH_PARAMS: &[&str] = &[
    "_id",
    "_lastUpdated",
    "patient",
    "subject",
    "code",
    "date",
    "status",
    "_count",
    "_sort",
    "_total",
    "_page_token",
    "_format",
];

fn parse_search(
    resource_type: &str,
    raw: Vec<(String, String)>,
    state: &AppState,
    allowed: &[&str],
) -> Result<Search, ApiError> {
    let mut s = Search {
        resource_type: resource_type.to_owned(),
        filters: Vec::new(),
        count: DEFAULT_COUNT.min(state.config.max_page_size),
        sort: Vec::new(),
        page_token: None,
        total: false,
        everything: None,
        ndjson: false,
        count_given: false,
    };
    for (k, v) in raw {
        if !allowed.contains(&k.as_str()) {
            return Err(invalid(
                &k,
                &v,
                format!(
                    "search parameter '{k}' is not supported here; supported: {}",
                    allowed.join(", ")
                ),
            ));
        }
        match k.as_str() {
            "_count" => {
                s.count_given = true;
                s.count = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=state.config.max_page_size).contains(n))
                    .ok_or_else(|| {
                        invalid(
                            "_count",
                            &v,
                            format!("_count must be from 1 to {}", state.config.max_page_size),
                        )
                    })?;
            }
            "_sort" => {
                for part in v.split(',') {
                    let (name, asc) = match part.strip_prefix('-') {
                        Some(n) => (n, false),
                        None => (part, true),
                    };
                    let col = match name {
                        "_id" => "id",
                        "_lastUpdated" => "last_updated",
                        "date" => SORT_DATE,
                        _ => {
                            return Err(invalid(
                                "_sort",
                                &v,
                                "_sort takes _id, _lastUpdated and date (prefix - for descending)",
                            ));
                        }
                    };
                    s.sort.push((col.to_owned(), asc));
                }
            }
            "_total" => match v.as_str() {
                "accurate" => s.total = true,
                "none" | "estimate" => s.total = false,
                _ => {
                    return Err(invalid(
                        "_total",
                        &v,
                        "_total is none, estimate or accurate",
                    ));
                }
            },
            "_page_token" => s.page_token = Some(v),
            "_format" => match v.as_str() {
                "json" | "application/json" | "application/fhir+json" => s.ndjson = false,
                "ndjson" | "application/fhir+ndjson" | "application/x-ndjson" => s.ndjson = true,
                _ => {
                    return Err(invalid(
                        "_format",
                        &v,
                        "_format is json (a Bundle page) or ndjson (every match, one resource per line)",
                    ));
                }
            },
            _ => s.filters.push((k, v)),
        }
    }
    s.filters.sort();
    Ok(s)
}

impl Search {
    fn normalised(&self) -> String {
        json!({
            "type": self.resource_type,
            "filters": self.filters,
            "sort": self.sort,
            "everything": self.everything,
        })
        .to_string()
    }
}

/// Applies the filters of a type search to the scoped store scan.
fn type_filters(
    state: &AppState,
    who: &Principal,
    s: &Search,
    providers: &Providers,
    mut b: LogicalPlanBuilder,
) -> Result<LogicalPlanBuilder, ApiError> {
    let view = view_type(state, &s.resource_type);
    for (k, v) in &s.filters {
        let values: Vec<&str> = v.split(',').filter(|x| !x.is_empty()).collect();
        let pred = match k.as_str() {
            "_id" => column("id").in_list(values.iter().map(|x| lit(*x)).collect(), false),
            "_lastUpdated" => last_updated_expr(v)?,
            "patient" | "subject" => {
                let ids: Vec<Expr> = values
                    .iter()
                    .map(|x| lit(x.strip_prefix("Patient/").unwrap_or(x)))
                    .collect();
                column("patient_id")
                    .is_not_null()
                    .and(column("patient_id").in_list(ids, false))
            }
            "code" | "date" | "status" => {
                let Some(t) = view else {
                    return Err(invalid(
                        k,
                        v,
                        format!("{} has no view to search '{k}' on", s.resource_type),
                    ));
                };
                let mut planner =
                    Planner::new(state, who, Action::Search, providers).for_resource_filters();
                let inner_pred = match k.as_str() {
                    "code" => {
                        let prop = first_property(t, &["code", "medication_code", "type_code"])
                            .ok_or_else(|| {
                                invalid(k, v, format!("{} has no code", s.resource_type))
                            })?;
                        let code_col = planner.property_column(t, prop)?.to_owned();
                        let system_col = t.property("code_system").map(|p| p.column.clone());
                        let mut any = lit(false);
                        for token in &values {
                            let (system, code) = match token.split_once('|') {
                                Some((sys, c)) => (Some(sys), c),
                                None => (None, *token),
                            };
                            let mut one = column(&code_col).eq(lit(code));
                            if let (Some(sys), Some(sc)) =
                                (system.filter(|s| !s.is_empty()), &system_col)
                            {
                                one = one.and(column(sc).eq(lit(sys)));
                            }
                            any = any.or(one);
                        }
                        column(&code_col).is_not_null().and(any)
                    }
                    "status" => {
                        let prop =
                            first_property(t, &["status", "clinical_status"]).ok_or_else(|| {
                                invalid(k, v, format!("{} has no status", s.resource_type))
                            })?;
                        let c = planner.property_column(t, prop)?.to_owned();
                        column(&c).is_not_null().and(
                            column(&c).in_list(values.iter().map(|x| lit(*x)).collect(), false),
                        )
                    }
                    _ => {
                        let tp = t.time_property.as_deref().ok_or_else(|| {
                            invalid(k, v, format!("{} has no date to search", s.resource_type))
                        })?;
                        let c = planner.property_column(t, tp)?.to_owned();
                        view_date_expr(&c, v)?
                    }
                };
                let pk = planner.key_column(t, &t.primary_key)?.to_owned();
                let sub = planner
                    .scan(t)?
                    .filter(inner_pred)
                    .and_then(|b| b.project(vec![column(&pk)]))
                    .and_then(|b| b.build())
                    .map_err(internal)?;
                in_subquery(column("id"), std::sync::Arc::new(sub))
            }
            other => return Err(invalid(other, v, "unsupported parameter")),
        };
        b = b.filter(pred).map_err(internal)?;
    }
    Ok(b)
}

/// The Bundle's `self` URL, and the `next` URL without its token.
fn urls(base: &str, path: &str, raw: Option<&str>, pairs: &[(String, String)]) -> (String, String) {
    let without_token: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs.iter().filter(|(k, _)| k != "_page_token"))
        .finish();
    let self_url = match raw {
        Some(q) => format!("{base}/{path}?{q}"),
        None => format!("{base}/{path}"),
    };
    (self_url, format!("{base}/{path}?{without_token}"))
}

/// The FHIR base of every link: the configured public base URL, never the
/// request's `Host` (a forged one must not steer links elsewhere).
fn base_url(state: &AppState) -> String {
    format!("{}/fhir", state.config.public_base())
}

/// Runs a search (or `$everything`) and writes the searchset Bundle.
/// `Accept: application/fhir+ndjson` (or `application/x-ndjson`) asks for
/// NDJSON unless `_format` says otherwise.
fn accepts_ndjson(headers: &HeaderMap, pairs: &[(String, String)]) -> bool {
    if pairs.iter().any(|(k, _)| k == "_format") {
        return false;
    }
    headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| {
            a.contains("application/fhir+ndjson") || a.contains("application/x-ndjson")
        })
}

/// Every match of a search as NDJSON: the stored JSON of each resource, one
/// per line (in `_sort` order when given, else in store order), streamed
/// batch by batch from the same scoped plan a Bundle page uses (no page, no
/// `_count`).
async fn stream_search(
    state: &AppState,
    s: &Search,
    filtered: LogicalPlanBuilder,
    keys: &[(String, bool, DataType)],
    redactor: ResourceRelease,
) -> Result<Response, ApiError> {
    for (given, name) in [
        (s.page_token.is_some(), "_page_token"),
        (s.count_given, "_count"),
        (s.total, "_total"),
    ] {
        if given {
            return Err(invalid(
                name,
                "…",
                "NDJSON returns every match in one stream; it takes no paging or totals",
            ));
        }
    }
    // Ordered only when asked (`_sort`): an unordered stream needs no
    // operator that holds the whole result, so memory stays flat however
    // many resources match.
    let ordered = if s.sort.is_empty() {
        filtered
    } else {
        filtered
            .sort(crate::query::sort_exprs(keys))
            .map_err(internal)?
    };
    let plan = ordered
        .project(vec![
            column("resource"),
            column("resource_type"),
            column("id"),
            column("patient_id"),
        ])
        .and_then(|b| b.build())
        .map_err(internal)?;
    let stream = state.tables.execute_stream(plan).await?;
    let metrics = state.metrics.clone();
    let body = crate::stream::async_stream(stream, move |batch| {
        let Some(b) = batch else {
            return Ok(bytes::Bytes::new());
        };
        let res = utf8(b.column(0)).map_err(|e| std::io::Error::other(e.message.clone()))?;
        let types = utf8(b.column(1)).map_err(|e| std::io::Error::other(e.message.clone()))?;
        let ids = utf8(b.column(2)).map_err(|e| std::io::Error::other(e.message.clone()))?;
        let patients = utf8(b.column(3)).map_err(|e| std::io::Error::other(e.message.clone()))?;
        let mut out = Vec::with_capacity(b.num_rows() * 1024);
        let mut n = 0u64;
        for row in 0..b.num_rows() {
            if let Some(r) = text(&res, row) {
                let t = text(&types, row).unwrap_or_default();
                let id = text(&ids, row).unwrap_or_default();
                let patient = text(&patients, row);
                let released = redactor.release(t, id, r, patient);
                out.extend_from_slice(released.json.as_bytes());
                out.push(b'\n');
                n += 1;
            }
        }
        metrics.rows("fhir.ndjson", n);
        Ok(bytes::Bytes::from(out))
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/fhir+ndjson")],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

/// The search's rows with `__sort_date`: the type's time property from its
/// view (policy-scoped like every scan), joined by resource id; null when
/// the view has no row for a resource (such rows sort last).
fn with_sort_date(
    state: &AppState,
    who: &Principal,
    s: &Search,
    providers: &Providers,
    b: LogicalPlanBuilder,
) -> Result<(LogicalPlanBuilder, DataType), ApiError> {
    let no_date = |why: String| invalid("_sort", "date", why);
    let t = view_type(state, &s.resource_type)
        .ok_or_else(|| no_date(format!("{} has no view to sort by date", s.resource_type)))?;
    let time = t
        .time_property
        .as_deref()
        .ok_or_else(|| no_date(format!("{} has no time property", t.api_name)))?;
    let mut planner = Planner::new(state, who, Action::Search, providers);
    let time_col = planner.property_column(t, time)?.to_owned();
    let pk = planner.key_column(t, &t.primary_key)?.to_owned();
    let ty = planner.column_type(t, &time_col)?;
    let dates = planner
        .scan(t)?
        .project(vec![
            column(&pk).alias("__sort_key"),
            column(&time_col).alias(SORT_DATE),
        ])
        .and_then(|v| v.build())
        .map_err(internal)?;
    let joined = b
        .join(
            dates,
            datafusion::logical_expr::JoinType::Left,
            (
                vec![datafusion::common::Column::from_name("id")],
                vec![datafusion::common::Column::from_name("__sort_key")],
            ),
            None,
        )
        .map_err(internal)?;
    Ok((joined, ty))
}

/// What a search reads: the plan of every match (scoped, filtered, not yet
/// sorted or paged), its sort keys (name, ascending, type; `id` last), the
/// table versions it was planned on and the release its resources leave
/// through.
struct SearchPlan {
    filtered: LogicalPlanBuilder,
    keys: Vec<(String, bool, DataType)>,
    versions: BTreeMap<String, u64>,
    redactor: ResourceRelease,
}

/// One Bundle page's entries as they leave, how many, and the sort key of
/// the last one when there are more matches after it.
struct Page {
    entries: Vec<u8>,
    n: usize,
    after: Option<Vec<serde_json::Value>>,
}

/// A search (or `$everything`): checks the page token, plans every match,
/// then streams them all as NDJSON or answers one Bundle page.
async fn run_search(
    state: &AppState,
    who: &Principal,
    s: &Search,
    self_url: &str,
    next_base: &str,
    base: &str,
) -> Result<Response, ApiError> {
    let request = digest(&s.normalised());
    let token = page_token(state, who, s, &request)?;
    let SearchPlan {
        filtered,
        keys,
        versions,
        redactor,
    } = search_plan(state, who, s, token.as_ref()).await?;
    if s.ndjson {
        return stream_search(state, s, filtered, &keys, redactor).await;
    }
    let total = if s.total {
        Some(count_matches(state, &filtered).await?)
    } else {
        None
    };
    let batches = page_batches(state, s, filtered, &keys, token.as_ref()).await?;
    let page = page_entries(&batches, s, &keys, &redactor, base)?;
    let next = page.after.map(|after| {
        state
            .page_tokens
            .issue(&who.key(), &request, versions, after)
    });
    let out = bundle(total, self_url, next_base, next, &page.entries);
    state.metrics.rows("fhirSearch", page.n as u64);
    Ok(fhir_json(out))
}

/// The `_page_token` of a search, checked against the caller and the
/// search it was issued for.
fn page_token(
    state: &AppState,
    who: &Principal,
    s: &Search,
    request: &str,
) -> Result<Option<PageState>, ApiError> {
    let Some(t) = &s.page_token else {
        return Ok(None);
    };
    Ok(Some(
        state
            .page_tokens
            .read(t, &who.key(), request)
            .map_err(|mut e| {
                e.parameter = "_page_token".into();
                e
            })?,
    ))
}

/// Plans every match of a search on the tables the page token pins (else
/// the latest).
async fn search_plan(
    state: &AppState,
    who: &Principal,
    s: &Search,
    token: Option<&PageState>,
) -> Result<SearchPlan, ApiError> {
    let views: Vec<&ObjectType> = if s.everything.is_none() {
        view_type(state, &s.resource_type).into_iter().collect()
    } else {
        Vec::new()
    };
    let (versions, providers) = open(state, token.map(|t| &t.t), &views).await?;

    let mut redactor = Egress::for_request().resources();
    let (filtered, date_type) = match &s.everything {
        None => type_search_plan(state, who, s, &providers, &mut redactor)?,
        Some(patient) => (
            everything_plan(state, who, s, patient, &providers, &mut redactor).await?,
            DataType::Utf8,
        ),
    };
    Ok(SearchPlan {
        filtered,
        keys: sort_keys(s, date_type),
        versions,
        redactor,
    })
}

/// The matches of a search on one type: the store scoped for the caller,
/// the search's filters, and for `_sort=date` the date joined from the
/// type's view (with the date's type; Utf8 without it).
fn type_search_plan(
    state: &AppState,
    who: &Principal,
    s: &Search,
    providers: &Providers,
    redactor: &mut ResourceRelease,
) -> Result<(LogicalPlanBuilder, DataType), ApiError> {
    let (b, grant) = scoped_store(state, who, &s.resource_type, Action::Search, providers)?;
    redactor.admit(state, &s.resource_type, &grant)?;
    if grant.deid.is_some() {
        refuse_identified_terms(s)?;
    }
    let b = type_filters(state, who, s, providers, b)?;
    if s.sort.iter().any(|(c, _)| c == SORT_DATE) {
        with_sort_date(state, who, s, providers, b)
    } else {
        Ok((b, DataType::Utf8))
    }
}

/// Under a de-identifying grant: refuses the parameters that compare
/// identified values and any `_sort`.
fn refuse_identified_terms(s: &Search) -> Result<(), ApiError> {
    if let Some((k, v)) = s
        .filters
        .iter()
        .find(|(k, _)| !crate::deid::ALLOWED_PARAMS.contains(&k.as_str()))
    {
        return Err(crate::error::refused(
            k,
            v,
            "this parameter compares identified values (ids, dates); use code or status",
        ));
    }
    if let Some((c, _)) = s.sort.first() {
        return Err(crate::error::refused(
            "_sort",
            c,
            "sorting by identified values reveals their order",
        ));
    }
    Ok(())
}

/// The keys a page is sorted and resumed by: `resource_type` first for
/// `$everything`, then `_sort`'s, then `id` unless sorted by it already.
fn sort_keys(s: &Search, date_type: DataType) -> Vec<(String, bool, DataType)> {
    let mut keys: Vec<(String, bool, DataType)> = Vec::new();
    if s.everything.is_some() {
        keys.push(("resource_type".into(), true, DataType::Utf8));
    }
    for (c, asc) in &s.sort {
        let ty = match c.as_str() {
            "last_updated" => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            SORT_DATE => date_type.clone(),
            _ => DataType::Utf8,
        };
        keys.push((c.clone(), *asc, ty));
    }
    if !keys.iter().any(|k| k.0 == "id") {
        keys.push(("id".into(), true, DataType::Utf8));
    }
    keys
}

/// `_total=accurate`: the number of matches.
async fn count_matches(state: &AppState, filtered: &LogicalPlanBuilder) -> Result<usize, ApiError> {
    let plan = filtered.clone().build().map_err(internal)?;
    DataFrame::new(state.tables.session().state(), plan)
        .count()
        .await
        .map_err(internal)
}

/// The rows of one page: after the page token's position, in key order,
/// one more than `_count` (which tells whether a next page exists).
async fn page_batches(
    state: &AppState,
    s: &Search,
    filtered: LogicalPlanBuilder,
    keys: &[(String, bool, DataType)],
    token: Option<&PageState>,
) -> Result<Vec<RecordBatch>, ApiError> {
    let mut paged = filtered;
    if let Some(tok) = token {
        let after = after_expr(keys, &tok.a).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "InvalidPageToken",
                "_page_token",
                "…",
                "the page token's position does not fit this search",
            )
        })?;
        paged = paged.filter(after).map_err(internal)?;
    }
    let mut cols: Vec<Expr> = vec![
        column("resource_type"),
        column("id"),
        column("resource"),
        column("patient_id"),
    ];
    for k in keys {
        if !["resource_type", "id"].contains(&k.0.as_str()) {
            cols.push(column(&k.0));
        }
    }
    let plan = paged
        .sort(crate::query::sort_exprs(keys))
        .and_then(|b| b.limit(0, Some(s.count + 1)))
        .and_then(|b| b.project(cols))
        .and_then(|b| b.build())
        .map_err(internal)?;
    Ok(state.tables.collect(plan).await?)
}

/// The Bundle entries of a page's rows (at most `_count`), each resource
/// leaving through the release.
fn page_entries(
    batches: &[RecordBatch],
    s: &Search,
    keys: &[(String, bool, DataType)],
    redactor: &ResourceRelease,
    base: &str,
) -> Result<Page, ApiError> {
    let mut entries = Vec::with_capacity(s.count * 1024);
    let mut n = 0usize;
    let mut more = false;
    let mut last = None;
    'outer: for b in batches {
        let ty = &utf8(b.column(0))?;
        let id = &utf8(b.column(1))?;
        let res = &utf8(b.column(2))?;
        let patients = &utf8(b.column(3))?;
        for row in 0..b.num_rows() {
            if n == s.count {
                more = true;
                break 'outer;
            }
            let (Some(t), Some(i), Some(r)) = (text(ty, row), text(id, row), text(res, row)) else {
                continue;
            };
            if n > 0 {
                entries.push(b',');
            }
            let released = redactor.release(t, i, r, text(patients, row));
            let (json, out_id) = (released.json, released.id);
            entries.push(b'{');
            if let Some(out_id) = out_id {
                entries.extend_from_slice(b"\"fullUrl\":");
                write_str(&mut entries, &format!("{base}/{t}/{out_id}"));
                entries.push(b',');
            }
            entries.extend_from_slice(b"\"resource\":");
            entries.extend_from_slice(json.as_bytes());
            entries.extend_from_slice(b",\"search\":{\"mode\":\"match\"}}");
            n += 1;
            last = Some(
                keys.iter()
                    .map(|(c, _, _)| {
                        b.column_by_name(c)
                            .map_or(serde_json::Value::Null, |a| key_json(a.as_ref(), row))
                    })
                    .collect::<Vec<_>>(),
            );
        }
    }
    Ok(Page {
        entries,
        n,
        after: if more { last } else { None },
    })
}

/// The searchset Bundle around a page's entries: the total when asked,
/// the `self` link, the `next` link when a next page exists.
fn bundle(
    total: Option<usize>,
    self_url: &str,
    next_base: &str,
    next: Option<String>,
    entries: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() + 512);
    out.extend_from_slice(b"{\"resourceType\":\"Bundle\",\"type\":\"searchset\"");
    if let Some(t) = total {
        out.extend_from_slice(format!(",\"total\":{t}").as_bytes());
    }
    out.extend_from_slice(b",\"link\":[{\"relation\":\"self\",\"url\":");
    write_str(&mut out, self_url);
    out.push(b'}');
    if let Some(tok) = next {
        out.extend_from_slice(b",{\"relation\":\"next\",\"url\":");
        let sep = if next_base.contains('?') { '&' } else { '?' };
        let enc: String = url::form_urlencoded::byte_serialize(tok.as_bytes()).collect();
        write_str(&mut out, &format!("{next_base}{sep}_page_token={enc}"));
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"entry\":[");
    out.extend_from_slice(entries);
    out.extend_from_slice(b"]}");
    out
}

/// A text column as plain Utf8 (partition columns come dictionary-encoded).
pub(crate) fn utf8(a: &arrow::array::ArrayRef) -> Result<arrow::array::ArrayRef, ApiError> {
    match a.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Ok(a.clone()),
        _ => arrow::compute::cast(a, &DataType::Utf8).map_err(internal),
    }
}

pub(crate) fn text(a: &dyn Array, row: usize) -> Option<&str> {
    if a.is_null(row) {
        return None;
    }
    match a.data_type() {
        DataType::Utf8 => Some(a.as_string::<i32>().value(row)),
        DataType::LargeUtf8 => Some(a.as_string::<i64>().value(row)),
        DataType::Utf8View => Some(a.as_string_view().value(row)),
        _ => None,
    }
}

/// Every resource in the patient's compartment the caller may read.
async fn everything_plan(
    state: &AppState,
    who: &Principal,
    s: &Search,
    patient: &str,
    providers: &Providers,
    redactor: &mut ResourceRelease,
) -> Result<LogicalPlanBuilder, ApiError> {
    // The patient must be visible to the caller, else it does not exist.
    let (visible, patient_grant) = scoped_store(state, who, "Patient", Action::Read, providers)?;
    if patient_grant.deid.is_some() {
        return Err(crate::error::refused(
            "id",
            patient,
            "$everything takes a real patient id",
        ));
    }
    let visible = visible
        .filter(column("id").eq(lit(patient)))
        .and_then(|b| b.limit(0, Some(1)))
        .and_then(|b| b.build())
        .map_err(internal)?;
    let found = DataFrame::new(state.tables.session().state(), visible)
        .count()
        .await
        .map_err(internal)?;
    if found == 0 {
        if let Some(store) = providers.get(STORE) {
            let key = column("resource_type")
                .eq(lit("Patient"))
                .and(column("id").eq(lit(patient)))
                .and(column("deleted").eq(lit(false)));
            let what = format!("Patient/{patient}");
            crate::query::note_if_out_of_scope(state, store, key, &what).await;
        }
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            "id",
            patient,
            format!("no Patient/{patient}"),
        ));
    }
    let mut types: Option<Vec<String>> = None;
    let mut since = None;
    for (k, v) in &s.filters {
        match k.as_str() {
            "_type" => {
                let list: Vec<String> = v
                    .split(',')
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned)
                    .collect();
                if let Some(bad) = list.iter().find(|t| !is_resource_type(t)) {
                    return Err(invalid(
                        "_type",
                        v,
                        format!("'{bad}' is not a resource type"),
                    ));
                }
                types = Some(list);
            }
            "_since" => {
                let (start, _) =
                    date_range(v).ok_or_else(|| invalid("_since", v, "_since takes an instant"))?;
                since = Some(start);
            }
            _ => {}
        }
    }
    // Which types the compartment holds, then which of them policy allows.
    let provider = providers
        .get(STORE)
        .ok_or_else(|| internal("store not opened"))?;
    let present_plan =
        LogicalPlanBuilder::scan("store", provider_as_source(provider.clone()), None)
            .and_then(|b| {
                b.filter(
                    column("patient_id")
                        .eq(lit(patient))
                        .and(column("deleted").eq(lit(false))),
                )
            })
            .and_then(|b| b.aggregate(vec![column("resource_type")], Vec::<Expr>::new()))
            .and_then(|b| b.build())
            .map_err(internal)?;
    let present = DataFrame::new(state.tables.session().state(), present_plan)
        .collect()
        .await
        .map_err(internal)?;
    let mut allowed = Vec::new();
    for b in &present {
        let col = utf8(b.column(0))?;
        for row in 0..b.num_rows() {
            let Some(t) = text(&col, row) else {
                continue;
            };
            if types.as_ref().is_some_and(|ts| !ts.iter().any(|x| x == t)) {
                continue;
            }
            if let Decision::Allow(grant) = state.decide(who, t, Action::Search)
                && grant.rows.admits(Some(patient))
            {
                redactor.admit(state, t, &grant)?;
                allowed.push(lit(t.to_owned()));
            }
        }
    }
    let mut b = LogicalPlanBuilder::scan("store", provider_as_source(provider.clone()), None)
        .and_then(|b| {
            b.filter(
                column("patient_id")
                    .eq(lit(patient))
                    .and(column("deleted").eq(lit(false)))
                    .and(if allowed.is_empty() {
                        lit(false)
                    } else {
                        column("resource_type").in_list(allowed, false)
                    }),
            )
        })
        .map_err(internal)?;
    if let Some(us) = since {
        b = b
            .filter(
                column("last_updated").gt_eq(lit(ScalarValue::TimestampMicrosecond(
                    Some(us),
                    Some("UTC".into()),
                ))),
            )
            .map_err(internal)?;
    }
    Ok(b)
}

#[utoipa::path(get, path = "/fhir/{resource_type}", tag = "fhir", security(("bearer" = [])), params(("resource_type" = String, Path), ("_id" = Option<String>, Query), ("_lastUpdated" = Option<String>, Query), ("patient" = Option<String>, Query), ("subject" = Option<String>, Query), ("code" = Option<String>, Query), ("date" = Option<String>, Query), ("status" = Option<String>, Query), ("_count" = Option<u32>, Query), ("_sort" = Option<String>, Query), ("_total" = Option<String>, Query), ("_page_token" = Option<String>, Query), ("_format" = Option<String>, Query, description = "json (default) or ndjson: every match, one resource per line")), responses((status = 200, description = "searchset Bundle with link[next], or NDJSON with _format=ndjson / Accept: application/fhir+ndjson", content_type = "application/fhir+json"), (status = 400, description = "OperationOutcome naming the parameter"), (status = 401, description = "OperationOutcome"), (status = 403, description = "OperationOutcome")))]
async fn search(
    State(state): State<AppState>,
    Path(resource_type): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    who: Result<Principal, ApiError>,
) -> Result<Response, Outcome> {
    let who = who?;
    if !is_resource_type(&resource_type) {
        return Err(
            ApiError::not_found("resourceType", &resource_type, "not a resource type").into(),
        );
    }
    let pairs = pairs(raw.clone());
    let mut s = parse_search(&resource_type, pairs.clone(), &state, SEARCH_PARAMS)?;
    s.ndjson |= accepts_ndjson(&headers, &pairs);
    let base = base_url(&state);
    let (self_url, next_base) = urls(&base, &resource_type, raw.as_deref(), &pairs);
    Ok(run_search(&state, &who, &s, &self_url, &next_base, &base).await?)
}

#[utoipa::path(get, path = "/fhir/{resource_type}/{id}", tag = "fhir", security(("bearer" = [])), params(("resource_type" = String, Path), ("id" = String, Path)), responses((status = 200, description = "The stored resource, byte for byte", content_type = "application/fhir+json"), (status = 404, description = "OperationOutcome"), (status = 410, description = "Deleted")))]
async fn read(
    State(state): State<AppState>,
    Path((resource_type, id)): Path<(String, String)>,
    who: Result<Principal, ApiError>,
) -> Result<Response, Outcome> {
    let who = who?;
    if !is_resource_type(&resource_type) {
        return Err(
            ApiError::not_found("resourceType", &resource_type, "not a resource type").into(),
        );
    }
    let (_, providers) = open(&state, None, &[]).await?;
    let grant = allowed_rows(
        &state,
        &who,
        &resource_type,
        Action::Read,
        ("resourceType", &resource_type),
    )?;
    let provider = providers
        .get(STORE)
        .ok_or_else(|| internal("store not opened"))?;
    // Deleted rows are read too, to answer 410 rather than 404.
    let b = LogicalPlanBuilder::scan("store", provider_as_source(provider.clone()), None)
        .and_then(|b| {
            b.filter(
                column("resource_type")
                    .eq(lit(resource_type.as_str()))
                    .and(column("id").eq(lit(id.as_str()))),
            )
        })
        .map_err(internal)?;
    let plan = scope_rows(b, &grant.rows)?
        .project(vec![
            column("resource"),
            column("deleted"),
            column("version_id"),
            column("patient_id"),
        ])
        .and_then(|b| b.limit(0, Some(1)))
        .and_then(|b| b.build())
        .map_err(internal)?;
    let batches = state.tables.collect(plan).await?;
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            "id",
            &id,
            format!("no {resource_type}/{id}"),
        )
    };
    let Some(b) = batches.iter().find(|b| b.num_rows() > 0) else {
        let key = column("resource_type")
            .eq(lit(resource_type.as_str()))
            .and(column("id").eq(lit(id.as_str())));
        let what = format!("{resource_type}/{id}");
        crate::query::note_if_out_of_scope(&state, provider, key, &what).await;
        return Err(not_found().into());
    };
    if b.column(1).as_boolean().value(0) {
        return Err(ApiError::new(
            StatusCode::GONE,
            "ResourceDeleted",
            "id",
            &id,
            format!("{resource_type}/{id} was deleted"),
        )
        .into());
    }
    let Some(body) = text(b.column(0), 0) else {
        return Err(not_found().into());
    };
    state.metrics.rows("fhirRead", 1);
    let mut redactor = Egress::for_request().resources();
    redactor.admit(&state, &resource_type, &grant)?;
    let patient = text(&utf8(b.column(3))?, 0).map(str::to_owned);
    let released = redactor.release(&resource_type, &id, body, patient.as_deref());
    let mut r = fhir_json(released.json.as_bytes().to_vec());
    if let Some(v) = text(b.column(2), 0)
        && let Ok(h) = format!("W/\"{v}\"").parse()
    {
        r.headers_mut().insert(header::ETAG, h);
    }
    Ok(r)
}

#[utoipa::path(get, path = "/fhir/{resource_type}/{id}/{operation}", tag = "fhir", security(("bearer" = [])), params(("resource_type" = String, Path, description = "Patient"), ("id" = String, Path), ("operation" = String, Path, description = "$everything"), ("_type" = Option<String>, Query), ("_since" = Option<String>, Query), ("_count" = Option<u32>, Query), ("_page_token" = Option<String>, Query)), responses((status = 200, description = "searchset Bundle of the compartment", content_type = "application/fhir+json"), (status = 404, description = "OperationOutcome")))]
async fn operation(
    State(state): State<AppState>,
    Path((resource_type, id, op)): Path<(String, String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    who: Result<Principal, ApiError>,
) -> Result<Response, Outcome> {
    let who = who?;
    if resource_type != "Patient" || op != "$everything" {
        return Err(ApiError::not_found(
            "operation",
            &op,
            format!("{resource_type}/{{id}}/{op} is not supported; Patient/{{id}}/$everything is"),
        )
        .into());
    }
    let pairs = pairs(raw.clone());
    let mut s = parse_search(
        "Patient",
        pairs.clone(),
        &state,
        &["_type", "_since", "_count", "_page_token", "_format"],
    )?;
    s.everything = Some(id.clone());
    s.ndjson |= accepts_ndjson(&headers, &pairs);
    s.count = pairs
        .iter()
        .find(|(k, _)| k == "_count")
        .map_or(state.config.default_page_size, |_| s.count);
    let base = base_url(&state);
    let path = format!("Patient/{id}/$everything");
    let (self_url, next_base) = urls(&base, &path, raw.as_deref(), &pairs);
    Ok(run_search(&state, &who, &s, &self_url, &next_base, &base).await?)
}

#[utoipa::path(get, path = "/fhir/metadata", tag = "fhir", responses((status = 200, description = "CapabilityStatement", content_type = "application/fhir+json")))]
/// What this server really does, as a CapabilityStatement.
async fn metadata(State(state): State<AppState>) -> Response {
    let mut resources = Vec::new();
    let mut types: Vec<String> = atlas_fhir_types();
    types.sort();
    for t in types {
        let mut params = vec![
            json!({"name": "_id", "type": "token"}),
            json!({"name": "_lastUpdated", "type": "date"}),
            json!({"name": "patient", "type": "reference"}),
            json!({"name": "subject", "type": "reference"}),
        ];
        if let Some(v) = view_type(&state, &t) {
            if first_property(v, &["code", "medication_code", "type_code"]).is_some() {
                params.push(json!({"name": "code", "type": "token"}));
            }
            if v.time_property.is_some() {
                params.push(json!({"name": "date", "type": "date"}));
            }
            if first_property(v, &["status", "clinical_status"]).is_some() {
                params.push(json!({"name": "status", "type": "token"}));
            }
        }
        let mut r = json!({
            "type": t,
            "interaction": [{"code": "read"}, {"code": "search-type"}],
            "searchParam": params,
        });
        if t == "Patient" {
            r["operation"] = json!([{"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"}]);
        }
        if t == "Subscription" {
            // The R4 backport: profile, CRUD, `$status`, `$events` and one
            // topic-canonical extension per topic offered.
            if state.config.subscriptions.enabled {
                r = state.subscriptions.capability();
            }
        }
        resources.push(r);
    }
    let body = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-27",
        "kind": "instance",
        "fhirVersion": "4.0.1",
        "format": ["json", "application/fhir+ndjson"],
        "software": {"name": "Atlas", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "Atlas FHIR REST (read-only) over the lake's resource store", "url": base_url(&state)},
        "rest": [{
            "mode": "server",
            "security": {
                "cors": false,
                "description": "Bearer JWT (RS256, RS384, ES256, ES384) from a configured issuer; SMART scopes and the patient claim decide access",
                "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}]}]
            },
            "resource": resources,
        }]
    });
    fhir_json(body.to_string().into_bytes())
}

/// The resource types a lake may hold (R4), for the CapabilityStatement.
fn atlas_fhir_types() -> Vec<String> {
    atlas_fhir::R4_RESOURCE_TYPES
        .iter()
        .map(|s| s.to_string())
        .collect()
}
