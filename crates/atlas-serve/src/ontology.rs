//! Ontology metadata in the shape of Foundry's ontology API v2: the
//! ontology, its object types (properties typed for clients) and the link
//! types leaving each object type. Read from `atlas-ontology`, the same
//! metadata `atlas ontology show` prints and the IDE's schema explorer
//! reads.

use axum::extract::{Path, Query, State};
use serde::Deserialize;
use serde_json::{Value as Json, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use atlas_ontology::{Cardinality, Link, ObjectType, Ontology};

use crate::{ApiError, AppState};

/// The one ontology a lake has.
pub const ONTOLOGY_API_NAME: &str = "atlas";
pub const ONTOLOGY_RID: &str = "ri.ontology.main.ontology.atlas";

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_ontologies))
        .routes(routes!(get_ontology))
        .routes(routes!(list_object_types))
        .routes(routes!(get_object_type))
        .routes(routes!(list_link_types))
        .routes(routes!(get_link_type))
}

fn ontology_json() -> Json {
    json!({
        "apiName": ONTOLOGY_API_NAME,
        "displayName": "Atlas",
        "description": "FHIR R4 data as object types backed by materialized SQL-on-FHIR views.",
        "rid": ONTOLOGY_RID,
    })
}

/// Accepts the ontology's apiName or rid; anything else is a 404 naming it.
pub(crate) fn check_ontology(name: &str) -> Result<(), ApiError> {
    if name == ONTOLOGY_API_NAME || name == ONTOLOGY_RID {
        Ok(())
    } else {
        Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "OntologyNotFound",
            "ontology",
            name,
            format!("no ontology '{name}'; this server has '{ONTOLOGY_API_NAME}'"),
        ))
    }
}

pub(crate) fn object_type<'o>(
    ontology: &'o Ontology,
    name: &str,
) -> Result<&'o ObjectType, ApiError> {
    atlas_access::object_type(ontology, name).map_err(ApiError::from)
}

/// The client-facing data type of a FHIR-typed property.
fn data_type(fhir_type: &str) -> Json {
    let t = match fhir_type {
        "boolean" => "boolean",
        "integer" | "positiveInt" | "unsignedInt" => "integer",
        "integer64" => "long",
        "decimal" => "decimal",
        "date" => "date",
        "dateTime" | "instant" => "timestamp",
        _ => "string",
    };
    json!({ "type": t })
}

fn object_type_json(t: &ObjectType) -> Json {
    let properties: serde_json::Map<String, Json> = t
        .properties
        .iter()
        .map(|p| {
            (
                p.api_name.clone(),
                json!({
                    "dataType": data_type(&p.r#type),
                    "description": p.description,
                    "fhirType": p.r#type,
                    "derived": p.derived,
                }),
            )
        })
        .collect();
    json!({
        "apiName": t.api_name,
        "displayName": t.display_name,
        "description": t.description,
        "status": "ACTIVE",
        "visibility": "NORMAL",
        "primaryKey": t.primary_key,
        "titleProperty": t.title_property,
        "patientProperty": t.patient_property,
        "timeProperty": t.time_property,
        "rid": format!("ri.ontology.main.object-type.{}", t.api_name),
        "backingView": t.backing_view,
        "properties": properties,
    })
}

/// A link seen from one of its ends, as Foundry's `LinkTypeSideV2`.
struct LinkSide<'o> {
    api_name: &'o str,
    target: &'o str,
    many: bool,
    foreign_key: Option<&'o str>,
    link: &'o Link,
}

fn outgoing<'o>(ontology: &'o Ontology, from: &'o str) -> Vec<LinkSide<'o>> {
    // From `from` the link is navigated forwards; from `to`, by its reverse
    // name, with the cardinality seen from the other end.
    let side = |l: &'o Link, forward: bool| {
        let (api_name, target, many_when, key) = if forward {
            (&l.api_name, &l.to, Cardinality::OneToMany, &l.from_property)
        } else {
            (
                &l.reverse_api_name,
                &l.from,
                Cardinality::ManyToOne,
                &l.to_property,
            )
        };
        LinkSide {
            api_name,
            target,
            many: l.cardinality == many_when,
            foreign_key: (l.cardinality != many_when).then_some(key.as_str()),
            link: l,
        }
    };
    ontology
        .links_from(from)
        .map(|l| side(l, true))
        .chain(ontology.links_to(from).map(|l| side(l, false)))
        .collect()
}

fn link_json(s: &LinkSide<'_>) -> Json {
    json!({
        "apiName": s.api_name,
        "displayName": s.api_name,
        "status": "ACTIVE",
        "objectTypeApiName": s.target,
        "cardinality": if s.many { "MANY" } else { "ONE" },
        "foreignKeyPropertyApiName": s.foreign_key,
        "description": s.link.description,
        "linkTypeRid": format!("ri.ontology.main.relation.{}.{}", s.link.from, s.link.api_name),
    })
}

/// `pageSize` and `pageToken` of a metadata listing: every list here fits
/// in one page, so only their validity is checked.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ListParams {
    page_size: Option<String>,
    page_token: Option<String>,
}

fn check_list(p: &ListParams, state: &AppState) -> Result<(), ApiError> {
    if let Some(s) = &p.page_size {
        match s.parse::<usize>() {
            Ok(n) if (1..=state.config.max_page_size).contains(&n) => {}
            _ => {
                return Err(ApiError::new(
                    axum::http::StatusCode::BAD_REQUEST,
                    "InvalidPageSize",
                    "pageSize",
                    s,
                    format!(
                        "pageSize must be a whole number from 1 to {}",
                        state.config.max_page_size
                    ),
                ));
            }
        }
    }
    if let Some(t) = &p.page_token {
        return Err(ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "InvalidPageToken",
            "pageToken",
            t,
            "this listing has a single page; the token was not issued by it",
        ));
    }
    Ok(())
}

fn query<T>(q: Result<Query<T>, axum::extract::rejection::QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(p)| p).map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "InvalidQueryParameters",
            "query",
            "",
            e.body_text(),
        )
    })
}

#[utoipa::path(get, path = "/api/v2/ontologies", tag = "ontology", responses((status = 200, description = "The ontologies (one: atlas)")))]
async fn list_ontologies() -> axum::Json<Json> {
    axum::Json(json!({ "data": [ontology_json()] }))
}

#[utoipa::path(get, path = "/api/v2/ontologies/{ontology}", tag = "ontology", params(("ontology" = String, Path, description = "The ontology: `atlas` or its rid")), responses((status = 200, description = "The ontology"), (status = 404, description = "No such ontology", body = crate::openapi::ErrorBody)))]
async fn get_ontology(Path(ontology): Path<String>) -> Result<axum::Json<Json>, ApiError> {
    check_ontology(&ontology)?;
    Ok(axum::Json(ontology_json()))
}

#[utoipa::path(get, path = "/api/v2/ontologies/{ontology}/objectTypes", tag = "ontology", params(("ontology" = String, Path, description = "The ontology: `atlas` or its rid"), ("pageSize" = Option<u32>, Query), ("pageToken" = Option<String>, Query)), responses((status = 200, description = "Object types with typed properties")))]
async fn list_object_types(
    State(state): State<AppState>,
    Path(ontology): Path<String>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<Json>, ApiError> {
    check_ontology(&ontology)?;
    check_list(&query(params)?, &state)?;
    let data: Vec<Json> = state
        .ontology
        .object_types
        .iter()
        .map(object_type_json)
        .collect();
    Ok(axum::Json(json!({ "data": data, "nextPageToken": null })))
}

#[utoipa::path(get, path = "/api/v2/ontologies/{ontology}/objectTypes/{object_type}", tag = "ontology", params(("ontology" = String, Path, description = "The ontology: `atlas` or its rid"), ("object_type" = String, Path, description = "Object type api name (Patient, Observation, ...)")), responses((status = 200, description = "One object type"), (status = 404, description = "Unknown type", body = crate::openapi::ErrorBody)))]
async fn get_object_type(
    State(state): State<AppState>,
    Path((ontology, object_type_name)): Path<(String, String)>,
) -> Result<axum::Json<Json>, ApiError> {
    check_ontology(&ontology)?;
    let t = object_type(&state.ontology, &object_type_name)?;
    Ok(axum::Json(object_type_json(t)))
}

#[utoipa::path(get, path = "/api/v2/ontologies/{ontology}/objectTypes/{object_type}/outgoingLinkTypes", tag = "ontology", params(("ontology" = String, Path, description = "The ontology: `atlas` or its rid"), ("object_type" = String, Path, description = "Object type api name (Patient, Observation, ...)"), ("pageSize" = Option<u32>, Query), ("pageToken" = Option<String>, Query)), responses((status = 200, description = "Links leaving the type")))]
async fn list_link_types(
    State(state): State<AppState>,
    Path((ontology, object_type_name)): Path<(String, String)>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<Json>, ApiError> {
    check_ontology(&ontology)?;
    check_list(&query(params)?, &state)?;
    let t = object_type(&state.ontology, &object_type_name)?;
    let data: Vec<Json> = outgoing(&state.ontology, &t.api_name)
        .iter()
        .map(link_json)
        .collect();
    Ok(axum::Json(json!({ "data": data, "nextPageToken": null })))
}

#[utoipa::path(get, path = "/api/v2/ontologies/{ontology}/objectTypes/{object_type}/outgoingLinkTypes/{link_type}", tag = "ontology", params(("ontology" = String, Path, description = "The ontology: `atlas` or its rid"), ("object_type" = String, Path, description = "Object type api name (Patient, Observation, ...)"), ("link_type" = String, Path)), responses((status = 200, description = "One link type"), (status = 404, description = "Unknown link", body = crate::openapi::ErrorBody)))]
async fn get_link_type(
    State(state): State<AppState>,
    Path((ontology, object_type_name, link_type)): Path<(String, String, String)>,
) -> Result<axum::Json<Json>, ApiError> {
    check_ontology(&ontology)?;
    let t = object_type(&state.ontology, &object_type_name)?;
    let sides = outgoing(&state.ontology, &t.api_name);
    let side = sides
        .iter()
        .find(|s| s.api_name == link_type)
        .ok_or_else(|| {
            ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "LinkTypeNotFound",
                "linkType",
                &link_type,
                format!(
                    "object type '{}' has no link '{link_type}'; it has: {}",
                    t.api_name,
                    sides
                        .iter()
                        .map(|s| s.api_name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })?;
    Ok(axum::Json(link_json(side)))
}
