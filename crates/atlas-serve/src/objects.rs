//! The object-set endpoints in the shape of Foundry's ontology API v2:
//! `objectSets/loadObjects`, listing a type's objects, one object by primary
//! key, and an object's linked objects. Each decodes and checks its input
//! (errors name the field), then runs through [`crate::query::run`], where
//! the access seam scopes every table read.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value as Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use atlas_objectset::{Decoder, ObjectSet};
use atlas_ontology::ObjectType;
use atlas_policy::{Action, Principal};

use crate::ontology::{check_ontology, object_type};
use crate::query::{Narrow, OrderField, Page, PageRequest, Query, run, write_str};
use crate::{ApiError, AppState};

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(load_objects))
        .routes(routes!(crate::aggregate::aggregate))
        .routes(routes!(list_objects))
        .routes(routes!(get_object))
        .routes(routes!(list_linked_objects))
        .routes(routes!(crate::graphql::handler))
        .routes(routes!(crate::stream::view_rows))
}

fn bad(name: &'static str, parameter: &str, value: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, name, parameter, value, message)
}

/// A request body's `objectSet`, narrowed by its top-level `where` when
/// given, checked against the ontology; with the set's object type.
pub(crate) fn decode_set<'s>(
    state: &'s AppState,
    object_set: &Json,
    where_: Option<&Json>,
) -> Result<(ObjectSet, &'s ObjectType), ApiError> {
    let decoder = Decoder::new(&state.ontology);
    let mut set = decoder
        .object_set(object_set, "objectSet")
        .map_err(|e| bad("InvalidObjectSet", &e.path, "", e.to_string()))?;
    let t = object_type(&state.ontology, set.object_type())?;
    if let Some(w) = where_ {
        let filter = decoder
            .where_clause(w, &t.api_name, "where")
            .map_err(|e| bad("InvalidObjectSet", &e.path, "", e.to_string()))?;
        set = ObjectSet::Filter {
            set: Box::new(set),
            filter,
        };
    }
    Ok((set, t))
}

/// The body of `loadObjects`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LoadObjectsBody {
    object_set: Json,
    /// A filter applied to the set (a shorthand for a `filter` set).
    #[serde(rename = "where")]
    where_: Option<Json>,
    order_by: Option<Json>,
    select: Option<Vec<String>>,
    page_size: Option<Json>,
    page_token: Option<String>,
    /// Count every object of the set (exact; costs a scan).
    #[serde(default)]
    include_total_count: bool,
    /// Accepted for Foundry clients; objects carry no rid here.
    #[serde(default)]
    exclude_rid: bool,
}

/// The query string as a map: unknown and repeated parameters are refused.
pub(crate) fn params(
    raw: Option<String>,
    allowed: &[&str],
) -> Result<HashMap<String, String>, ApiError> {
    let mut out = HashMap::new();
    for (k, v) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        if !allowed.contains(&k.as_ref()) {
            return Err(bad(
                "InvalidQueryParameters",
                &k,
                &v,
                format!(
                    "unknown query parameter '{k}'; this endpoint takes: {}",
                    allowed.join(", ")
                ),
            ));
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(bad(
                "InvalidQueryParameters",
                &k,
                &v,
                format!("query parameter '{k}' is given more than once"),
            ));
        }
    }
    Ok(out)
}

fn page_size(v: Option<&Json>, state: &AppState) -> Result<usize, ApiError> {
    let max = state.config.max_page_size;
    let Some(v) = v else {
        return Ok(state.config.default_page_size);
    };
    let n = match v {
        Json::Number(n) => n.as_u64(),
        Json::String(s) => s.parse::<u64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n >= 1 && n <= max as u64 => Ok(n as usize),
        _ => Err(bad(
            "InvalidPageSize",
            "pageSize",
            &v.to_string(),
            format!("pageSize must be a whole number from 1 to {max}"),
        )),
    }
}

/// `patientId`, `dateFrom`, `dateTo` from the query string.
pub(crate) fn narrow(p: &HashMap<String, String>) -> Result<Narrow, ApiError> {
    let date = |name: &str| -> Result<Option<String>, ApiError> {
        let Some(v) = p.get(name) else {
            return Ok(None);
        };
        if is_date_prefix(v) {
            Ok(Some(v.clone()))
        } else {
            Err(bad(
                "InvalidParameter",
                name,
                v,
                format!("{name} must be a date: YYYY, YYYY-MM or YYYY-MM-DD"),
            ))
        }
    };
    Ok(Narrow {
        patient: p.get("patientId").cloned(),
        date_from: date("dateFrom")?,
        date_to: date("dateTo")?,
    })
}

/// `YYYY`, `YYYY-MM` or `YYYY-MM-DD`, and a real date (`2020-13-45` and
/// `2021-02-29` are not).
fn is_date_prefix(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    let real = |ymd: &str| chrono::NaiveDate::parse_from_str(ymd, "%Y-%m-%d").is_ok();
    match b.len() {
        4 => digits(0..4),
        7 => digits(0..4) && b[4] == b'-' && digits(5..7) && real(&format!("{s}-01")),
        10 => {
            digits(0..4) && b[4] == b'-' && digits(5..7) && b[7] == b'-' && digits(8..10) && real(s)
        }
        _ => false,
    }
}

/// `orderBy` in the body: `{"orderType": "fields", "fields": [{"field": f,
/// "direction": "asc"|"desc"}]}`.
fn order_body(v: Option<&Json>, t: &ObjectType) -> Result<Vec<OrderField>, ApiError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    let path = "orderBy";
    let obj = v.as_object().ok_or_else(|| {
        bad(
            "InvalidOrderBy",
            path,
            &v.to_string(),
            "orderBy must be an object",
        )
    })?;
    for k in obj.keys() {
        if k != "orderType" && k != "fields" {
            return Err(bad(
                "InvalidOrderBy",
                &format!("{path}.{k}"),
                k,
                format!("unknown field '{k}' (orderBy takes orderType and fields)"),
            ));
        }
    }
    if let Some(ot) = obj.get("orderType")
        && ot.as_str() != Some("fields")
    {
        return Err(bad(
            "InvalidOrderBy",
            "orderBy.orderType",
            &ot.to_string(),
            "orderType must be \"fields\"",
        ));
    }
    let fields = obj.get("fields").and_then(Json::as_array).ok_or_else(|| {
        bad(
            "InvalidOrderBy",
            "orderBy.fields",
            "",
            "orderBy.fields must be a list of {field, direction}",
        )
    })?;
    let mut out = Vec::new();
    for (i, f) in fields.iter().enumerate() {
        let at = format!("orderBy.fields[{i}]");
        let field = f.get("field").and_then(Json::as_str).ok_or_else(|| {
            bad(
                "InvalidOrderBy",
                &format!("{at}.field"),
                &f.to_string(),
                "field must be a property name",
            )
        })?;
        let ascending = match f.get("direction").map(|d| d.as_str()) {
            None | Some(Some("asc")) => true,
            Some(Some("desc")) => false,
            Some(_) => {
                return Err(bad(
                    "InvalidOrderBy",
                    &format!("{at}.direction"),
                    &f.to_string(),
                    "direction must be \"asc\" or \"desc\"",
                ));
            }
        };
        if let Some(k) = f
            .as_object()
            .and_then(|o| o.keys().find(|k| *k != "field" && *k != "direction"))
        {
            return Err(bad(
                "InvalidOrderBy",
                &format!("{at}.{k}"),
                k,
                format!("unknown field '{k}'"),
            ));
        }
        check_property(t, field, &format!("{at}.field"))?;
        out.push(OrderField {
            property: field.to_owned(),
            ascending,
        });
    }
    Ok(out)
}

/// `orderBy=effective:desc,id` in a query string.
pub(crate) fn order_param(v: Option<&String>, t: &ObjectType) -> Result<Vec<OrderField>, ApiError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for part in v.split(',').filter(|p| !p.is_empty()) {
        let (field, dir) = part.split_once(':').unwrap_or((part, "asc"));
        let field = field.strip_prefix("p.").unwrap_or(field);
        let ascending = match dir {
            "asc" => true,
            "desc" => false,
            _ => {
                return Err(bad(
                    "InvalidOrderBy",
                    "orderBy",
                    v,
                    format!("'{part}': direction must be asc or desc"),
                ));
            }
        };
        check_property(t, field, "orderBy")?;
        out.push(OrderField {
            property: field.to_owned(),
            ascending,
        });
    }
    Ok(out)
}

fn check_property(t: &ObjectType, name: &str, at: &str) -> Result<(), ApiError> {
    if t.property(name).is_some() {
        return Ok(());
    }
    Err(bad(
        "PropertyNotFound",
        at,
        name,
        format!(
            "object type '{}' has no property '{name}'; it has: {}",
            t.api_name,
            t.properties
                .iter()
                .map(|p| p.api_name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

fn select(
    list: Option<Vec<String>>,
    t: &ObjectType,
    at: &str,
) -> Result<Option<Vec<String>>, ApiError> {
    let Some(list) = list else { return Ok(None) };
    for (i, p) in list.iter().enumerate() {
        check_property(t, p, &format!("{at}[{i}]"))?;
    }
    Ok(Some(list))
}

fn select_param(v: Option<&String>, t: &ObjectType) -> Result<Option<Vec<String>>, ApiError> {
    select(
        v.map(|s| {
            s.split(',')
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect()
        }),
        t,
        "select",
    )
}

fn page_response(page: Page, state: &AppState, route: &str) -> Response {
    state.metrics.rows(route, page.rows as u64);
    let mut body = Vec::with_capacity(page.data.len() + 200);
    body.extend_from_slice(b"{\"data\":");
    body.extend_from_slice(&page.data);
    body.extend_from_slice(b",\"nextPageToken\":");
    match &page.next {
        Some(t) => write_str(&mut body, t),
        None => body.extend_from_slice(b"null"),
    }
    if let Some(n) = page.total {
        body.extend_from_slice(format!(",\"totalCount\":{n}").as_bytes());
    }
    body.push(b'}');
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[utoipa::path(post, path = "/api/v2/ontologies/{ontology}/objectSets/loadObjects", tag = "objects", security(("bearer" = [])), params(("ontology" = String, Path, description = "The ontology: `atlas` or its rid"), ("patientId" = Option<String>, Query, description = "Only this patient's objects"), ("dateFrom" = Option<String>, Query, description = "Time property on or after (YYYY, YYYY-MM or YYYY-MM-DD)"), ("dateTo" = Option<String>, Query, description = "Time property on or before (same forms, inclusive)"), ("format" = Option<String>, Query, description = "json (a page, default), ndjson, arrow or parquet (the whole set, streamed); or by Accept")), request_body(content = Object, description = "objectSet, where, orderBy, select, pageSize, pageToken, includeTotalCount, excludeRid", content_type = "application/json"), responses((status = 200, description = "A page of objects (or the streamed set)", body = crate::openapi::ObjectPage), (status = 400, description = "Invalid input; the body names the field", body = crate::openapi::ErrorBody), (status = 401, description = "No or bad bearer token", body = crate::openapi::ErrorBody), (status = 403, description = "The PolicyEngine denies the type", body = crate::openapi::ErrorBody)))]
async fn load_objects(
    State(state): State<AppState>,
    Path(ontology): Path<String>,
    RawQuery(raw): RawQuery,
    headers: axum::http::HeaderMap,
    who: Principal,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_ontology(&ontology)?;
    let p = params(raw, &["patientId", "dateFrom", "dateTo", "format"])?;
    let format = crate::stream::Format::choose(
        p.get("format").map(String::as_str),
        headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()),
    )?;
    let body: LoadObjectsBody = serde_json::from_slice(&body).map_err(|e| {
        bad(
            "InvalidRequestBody",
            "body",
            "",
            format!("the request body is not a loadObjects request: {e}"),
        )
    })?;
    let _ = body.exclude_rid;
    let (set, t) = decode_set(&state, &body.object_set, body.where_.as_ref())?;
    let q = Query {
        set,
        order: order_body(body.order_by.as_ref(), t)?,
        select: select(body.select, t, "select")?,
        narrow: narrow(&p)?,
        action: Action::Search,
    };
    if let Some(f) = format {
        if body.page_token.is_some() || body.page_size.is_some() || body.include_total_count {
            return Err(bad(
                "InvalidRequestBody",
                "format",
                f.content_type(),
                "a streamed response holds the whole set: pageSize, pageToken and includeTotalCount do not apply",
            ));
        }
        return crate::stream::stream_objects(&state, &who, &q, f).await;
    }
    let page = PageRequest {
        size: page_size(body.page_size.as_ref(), &state)?,
        token: body.page_token,
        total: body.include_total_count,
    };
    let result = run(&state, &who, &q, &page).await?;
    Ok(page_response(result, &state, "loadObjects"))
}

const LIST_PARAMS: &[&str] = &[
    "pageSize",
    "pageToken",
    "orderBy",
    "select",
    "patientId",
    "dateFrom",
    "dateTo",
    "includeTotalCount",
    "excludeRid",
];

fn page_params(p: &HashMap<String, String>, state: &AppState) -> Result<PageRequest, ApiError> {
    Ok(PageRequest {
        size: page_size(
            p.get("pageSize").map(|s| Json::String(s.clone())).as_ref(),
            state,
        )?,
        token: p.get("pageToken").cloned(),
        total: match p.get("includeTotalCount").map(String::as_str) {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(bad(
                    "InvalidParameter",
                    "includeTotalCount",
                    other,
                    "includeTotalCount must be true or false",
                ));
            }
        },
    })
}

#[utoipa::path(get, path = "/api/v2/ontologies/{ontology}/objects/{object_type}", tag = "objects", security(("bearer" = [])), params(("ontology" = String, Path, description = "The ontology: `atlas` or its rid"), ("object_type" = String, Path, description = "Object type api name (Patient, Observation, ...)"), ("pageSize" = Option<u32>, Query), ("pageToken" = Option<String>, Query), ("orderBy" = Option<String>, Query, description = "property:asc|desc, comma-separated"), ("select" = Option<String>, Query, description = "Properties, comma-separated"), ("includeTotalCount" = Option<bool>, Query), ("excludeRid" = Option<bool>, Query), ("patientId" = Option<String>, Query, description = "Only this patient's objects"), ("dateFrom" = Option<String>, Query, description = "Time property on or after (YYYY, YYYY-MM or YYYY-MM-DD)"), ("dateTo" = Option<String>, Query, description = "Time property on or before (same forms, inclusive)")), responses((status = 200, description = "A page of objects", body = crate::openapi::ObjectPage), (status = 400, description = "Invalid input; the body names the field", body = crate::openapi::ErrorBody), (status = 401, description = "No or bad bearer token", body = crate::openapi::ErrorBody), (status = 403, description = "The PolicyEngine denies the type", body = crate::openapi::ErrorBody)))]
async fn list_objects(
    State(state): State<AppState>,
    Path((ontology, type_name)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    who: Principal,
) -> Result<Response, ApiError> {
    check_ontology(&ontology)?;
    let t = object_type(&state.ontology, &type_name)?;
    let p = params(raw, LIST_PARAMS)?;
    let q = Query {
        set: ObjectSet::Base {
            object_type: t.api_name.clone(),
        },
        order: order_param(p.get("orderBy"), t)?,
        select: select_param(p.get("select"), t)?,
        narrow: narrow(&p)?,
        action: Action::Search,
    };
    let result = run(&state, &who, &q, &page_params(&p, &state)?).await?;
    Ok(page_response(result, &state, "listObjects"))
}

#[utoipa::path(get, path = "/api/v2/ontologies/{ontology}/objects/{object_type}/{primary_key}", tag = "objects", security(("bearer" = [])), params(("ontology" = String, Path, description = "The ontology: `atlas` or its rid"), ("object_type" = String, Path, description = "Object type api name (Patient, Observation, ...)"), ("primary_key" = String, Path), ("select" = Option<String>, Query), ("excludeRid" = Option<bool>, Query)), responses((status = 200, description = "The object"), (status = 404, description = "No such object, or not visible to the caller (indistinguishable)", body = crate::openapi::ErrorBody), (status = 400, description = "Invalid input; the body names the field", body = crate::openapi::ErrorBody), (status = 401, description = "No or bad bearer token", body = crate::openapi::ErrorBody), (status = 403, description = "The PolicyEngine denies the type", body = crate::openapi::ErrorBody)))]
async fn get_object(
    State(state): State<AppState>,
    Path((ontology, type_name, pk)): Path<(String, String, String)>,
    RawQuery(raw): RawQuery,
    who: Principal,
) -> Result<Response, ApiError> {
    check_ontology(&ontology)?;
    let t = object_type(&state.ontology, &type_name)?;
    let p = params(raw, &["select", "excludeRid"])?;
    let q = Query {
        set: ObjectSet::Static {
            object_type: t.api_name.clone(),
            primary_keys: vec![pk.clone()],
        },
        order: Vec::new(),
        select: select_param(p.get("select"), t)?,
        narrow: Narrow::default(),
        action: Action::Read,
    };
    let page = PageRequest {
        size: 1,
        token: None,
        total: false,
    };
    let result = run(&state, &who, &q, &page).await?;
    if result.rows == 0 {
        if let Ok((_, providers)) = crate::query::snapshot(&state, &q.set, None).await
            && let Some(view) = providers.get(&t.backing_view)
            && let Some(pk_col) = t.property(&t.primary_key).map(|p| p.column.clone())
        {
            let key = crate::query::column(&pk_col).eq(datafusion::logical_expr::lit(pk.as_str()));
            let what = format!("{} object '{pk}'", t.api_name);
            crate::query::note_if_out_of_scope(&state, view, key, &what).await;
        }
        // The same answer whether the object does not exist or lies outside
        // the caller's scope: a 404 reveals nothing about other patients.
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "ObjectNotFound",
            "primaryKey",
            &pk,
            format!("no {} object with primary key '{pk}'", t.api_name),
        ));
    }
    state.metrics.rows("getObject", 1);
    // The page's data is `[obj]`: strip the brackets.
    let data = &result.data[1..result.data.len() - 1];
    Ok(([(header::CONTENT_TYPE, "application/json")], data.to_vec()).into_response())
}

#[utoipa::path(get, path = "/api/v2/ontologies/{ontology}/objects/{object_type}/{primary_key}/links/{link}", tag = "objects", security(("bearer" = [])), params(("ontology" = String, Path, description = "The ontology: `atlas` or its rid"), ("object_type" = String, Path, description = "Object type api name (Patient, Observation, ...)"), ("primary_key" = String, Path), ("link" = String, Path), ("pageSize" = Option<u32>, Query), ("pageToken" = Option<String>, Query), ("orderBy" = Option<String>, Query, description = "property:asc|desc, comma-separated"), ("select" = Option<String>, Query, description = "Properties, comma-separated"), ("includeTotalCount" = Option<bool>, Query), ("excludeRid" = Option<bool>, Query), ("patientId" = Option<String>, Query, description = "Only this patient's objects"), ("dateFrom" = Option<String>, Query, description = "Time property on or after (YYYY, YYYY-MM or YYYY-MM-DD)"), ("dateTo" = Option<String>, Query, description = "Time property on or before (same forms, inclusive)")), responses((status = 200, description = "A page of linked objects", body = crate::openapi::ObjectPage), (status = 400, description = "Invalid input; the body names the field", body = crate::openapi::ErrorBody), (status = 401, description = "No or bad bearer token", body = crate::openapi::ErrorBody), (status = 403, description = "The PolicyEngine denies the type", body = crate::openapi::ErrorBody)))]
async fn list_linked_objects(
    State(state): State<AppState>,
    Path((ontology, type_name, pk, link)): Path<(String, String, String, String)>,
    RawQuery(raw): RawQuery,
    who: Principal,
) -> Result<Response, ApiError> {
    check_ontology(&ontology)?;
    let t = object_type(&state.ontology, &type_name)?;
    let p = params(raw, LIST_PARAMS)?;
    let source = ObjectSet::Static {
        object_type: t.api_name.clone(),
        primary_keys: vec![pk],
    };
    let set_json =
        serde_json::json!({"type": "searchAround", "objectSet": source.to_json(), "link": link});
    let set = Decoder::new(&state.ontology)
        .object_set(&set_json, "link")
        .map_err(|e| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "LinkTypeNotFound",
                "link",
                &link,
                e.message,
            )
        })?;
    let target = object_type(&state.ontology, set.object_type())?;
    let q = Query {
        order: order_param(p.get("orderBy"), target)?,
        select: select_param(p.get("select"), target)?,
        narrow: narrow(&p)?,
        set,
        action: Action::Search,
    };
    let result = run(&state, &who, &q, &page_params(&p, &state)?).await?;
    Ok(page_response(result, &state, "listLinkedObjects"))
}

#[cfg(test)]
mod tests {
    use super::is_date_prefix;

    #[test]
    fn date_prefixes_must_be_real_dates() {
        for ok in ["2020", "2020-12", "2020-02-29", "1999-01-31"] {
            assert!(is_date_prefix(ok), "{ok}");
        }
        for bad in [
            "2020-13-45",
            "2020-13",
            "2020-00",
            "2021-02-29",
            "2020-04-31",
            "2020-1-1",
            "20201",
            "2020-12-00",
        ] {
            assert!(!is_date_prefix(bad), "{bad}");
        }
    }
}
