//! API errors: a status and a JSON body in the shape of Foundry's errors
//! (`errorCode`, `errorName`, `parameters`), plus the parameter at fault
//! and a readable message.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

pub use atlas_access::AccessError;

/// An error response: the seam's [`AccessError`] with its HTTP body.
#[derive(Debug, Clone)]
pub struct ApiError(pub AccessError);

impl std::ops::Deref for ApiError {
    type Target = AccessError;
    fn deref(&self) -> &AccessError {
        &self.0
    }
}

impl std::ops::DerefMut for ApiError {
    fn deref_mut(&mut self) -> &mut AccessError {
        &mut self.0
    }
}

impl From<AccessError> for ApiError {
    fn from(e: AccessError) -> ApiError {
        ApiError(e)
    }
}

/// The error name, left on the response for the metrics layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ErrorKind(pub &'static str);

impl ApiError {
    pub fn new(
        status: StatusCode,
        name: &'static str,
        parameter: impl Into<String>,
        value: impl Into<String>,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError(AccessError::new(status, name, parameter, value, message))
    }

    pub fn not_found(
        parameter: impl Into<String>,
        value: impl Into<String>,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError(AccessError::not_found(parameter, value, message))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let challenge = self.challenge.clone();
        let e = self.0;
        let body = serde_json::json!({
            "errorCode": e.code(),
            "errorName": e.name,
            "message": e.message,
            "parameters": { e.parameter.clone(): e.value },
        });
        let mut response = (e.status, axum::Json(body)).into_response();
        response.extensions_mut().insert(ErrorKind(e.name));
        add_challenge(challenge.as_deref(), &mut response);
        response
    }
}

/// Puts a 401's `WWW-Authenticate` challenge on its response.
pub(crate) fn add_challenge(challenge: Option<&str>, response: &mut Response) {
    if let Some(c) = challenge
        && let Ok(v) = axum::http::HeaderValue::from_str(c)
    {
        response
            .headers_mut()
            .insert(axum::http::header::WWW_AUTHENTICATE, v);
    }
}

/// A 400 naming the parameter and value.
pub(crate) fn bad(name: &'static str, parameter: &str, value: &str, message: String) -> ApiError {
    ApiError(AccessError::bad(name, parameter, value, message))
}

/// A 500 saying what failed.
pub(crate) fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(AccessError::internal(e))
}

/// A de-identifying grant's refusal (see `atlas_access::deid::refused`).
pub(crate) fn refused(parameter: &str, value: &str, why: &str) -> ApiError {
    ApiError(atlas_access::deid::refused(parameter, value, why))
}
