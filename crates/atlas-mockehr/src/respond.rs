//! Building responses: FHIR JSON, OperationOutcome errors, query strings.

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use serde_json::Value;

use crate::json::outcome;

pub(crate) const FHIR_JSON: &str = "application/fhir+json";
pub(crate) const NDJSON: &str = "application/fhir+ndjson";

/// A response with `body` as `content_type`.
pub(crate) fn with_body(status: StatusCode, content_type: &str, body: impl Into<Body>) -> Response {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// A FHIR JSON resource (or any JSON) as `application/fhir+json`.
pub(crate) fn fhir(status: StatusCode, value: &Value) -> Response {
    with_body(status, FHIR_JSON, value.to_string())
}

/// An error as an OperationOutcome; `code` is the issue type.
pub(crate) fn error(status: StatusCode, code: &str, text: &str) -> Response {
    tracing::debug!(status = status.as_u16(), text, "mock EHR refused a request");
    fhir(status, &outcome("error", code, text))
}

/// `name: value` set on `r` (ignored when the value is not a header value,
/// which only fault texts given by a test could be).
pub(crate) fn set_header(r: &mut Response, name: header::HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        r.headers_mut().insert(name, v);
    }
}

/// The query string's pairs, percent-decoded, in order.
pub(crate) fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// A query string from pairs.
pub(crate) fn query_string(pairs: &[(String, String)]) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}
