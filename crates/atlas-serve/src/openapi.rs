//! The OpenAPI document at `/openapi.json`, generated from the handlers:
//! every route is registered through `utoipa_axum::routes!` from its
//! `#[utoipa::path]` attribute, so a route cannot exist without its entry
//! (nor an entry without its route).

use serde::Serialize;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// An error body (every non-FHIR error).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub(crate) struct ErrorBody {
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `UNAUTHORIZED`, `PERMISSION_DENIED`, ...
    error_code: String,
    /// A stable name to match (`InvalidPageToken`, `PropertyNotFound`, ...).
    error_name: String,
    message: String,
    /// The parameter or field at fault and the value received.
    #[schema(value_type = Object)]
    parameters: serde_json::Value,
}

/// A page of objects.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub(crate) struct ObjectPage {
    /// Objects: `__apiName`, `__primaryKey`, `__title` and the properties
    /// (nulls included).
    #[schema(value_type = Vec<Object>)]
    data: Vec<serde_json::Value>,
    /// Signed; pass it back as `pageToken` for the next page (same snapshot).
    next_page_token: Option<String>,
    /// Only when `includeTotalCount` was true.
    total_count: Option<u64>,
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let mut http = Http::new(HttpAuthScheme::Bearer);
        http.bearer_format = Some("JWT".into());
        api.components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(http));
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Atlas",
        description = "Object sets (Foundry ontology API v2 shape), aggregates, GraphQL and FHIR REST over an Atlas lake. Data endpoints need a bearer JWT; access is decided by one PolicyEngine.",
        license(name = "Apache-2.0")
    ),
    components(schemas(ErrorBody, ObjectPage)),
    modifiers(&BearerAuth)
)]
pub(crate) struct ApiDoc;
