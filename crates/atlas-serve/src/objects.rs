//! The object-set endpoints in the shape of Foundry's ontology API v2:
//! `objectSets/loadObjects`, listing a type's objects, one object by primary
//! key, and an object's linked objects. Each decodes and checks its input
//! (errors name the field), then runs through [`crate::query::run`], where
//! the access seam scopes every table read.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use atlas_objectset::{Decoder, ObjectSet};
use atlas_policy::{Action, Principal};

use crate::ontology::{check_ontology, object_type};
use crate::params::{
    LIST_PARAMS, LoadObjectsBody, bad, decode_set, narrow, order_body, order_param, page_params,
    page_size, params, select, select_param,
};
use crate::query::{Narrow, Page, PageRequest, Query, run, write_str};
use crate::{ApiError, AppState};

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(load_objects))
        .routes(routes!(list_objects))
        .routes(routes!(get_object))
        .routes(routes!(list_linked_objects))
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
