//! API errors: a status and a JSON body in the shape of Foundry's errors
//! (`errorCode`, `errorName`, `parameters`), plus the parameter at fault
//! and a readable message.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// An error response.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// A stable name for clients to match (`ObjectTypeNotFound`, ...).
    pub name: &'static str,
    /// The request parameter or body field at fault.
    pub parameter: String,
    /// The offending value, as received.
    pub value: String,
    pub message: String,
    /// The `WWW-Authenticate` challenge of a 401.
    pub challenge: Option<String>,
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
        ApiError {
            status,
            name,
            parameter: parameter.into(),
            value: value.into(),
            message: message.into(),
            challenge: None,
        }
    }

    pub fn not_found(
        parameter: impl Into<String>,
        value: impl Into<String>,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "NotFound", parameter, value, message)
    }

    fn code(&self) -> &'static str {
        match self.status {
            StatusCode::NOT_FOUND => "NOT_FOUND",
            StatusCode::UNAUTHORIZED => "UNAUTHORIZED",
            StatusCode::FORBIDDEN => "PERMISSION_DENIED",
            StatusCode::METHOD_NOT_ALLOWED => "METHOD_NOT_ALLOWED",
            StatusCode::SERVICE_UNAVAILABLE => "UNAVAILABLE",
            s if s.is_server_error() => "INTERNAL",
            _ => "INVALID_ARGUMENT",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let challenge = self.challenge.clone();
        let body = serde_json::json!({
            "errorCode": self.code(),
            "errorName": self.name,
            "message": self.message,
            "parameters": { self.parameter.clone(): self.value },
        });
        let mut response = (self.status, axum::Json(body)).into_response();
        response.extensions_mut().insert(ErrorKind(self.name));
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
