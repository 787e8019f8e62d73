//! Errors the seam answers with: a status, a stable name, the request
//! parameter at fault and a readable message. The HTTP layer turns them
//! into JSON bodies (Foundry's `errorCode`/`errorName`/`parameters` shape);
//! nothing here knows about HTTP beyond the status code.

use http::StatusCode;

/// A refusal or failure, naming the parameter and the value at fault.
#[derive(Debug, Clone)]
pub struct AccessError {
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

impl AccessError {
    pub fn new(
        status: StatusCode,
        name: &'static str,
        parameter: impl Into<String>,
        value: impl Into<String>,
        message: impl Into<String>,
    ) -> AccessError {
        AccessError {
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
    ) -> AccessError {
        AccessError::new(StatusCode::NOT_FOUND, "NotFound", parameter, value, message)
    }

    /// A 400 naming the parameter and value.
    pub fn bad(name: &'static str, parameter: &str, value: &str, message: String) -> AccessError {
        AccessError::new(StatusCode::BAD_REQUEST, name, parameter, value, message)
    }

    /// A 500 whose message says what failed (never a row's values: the
    /// callers pass plan and I/O errors).
    pub fn internal(e: impl std::fmt::Display) -> AccessError {
        AccessError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "query",
            "",
            format!("the query failed: {e}"),
        )
    }

    /// The `errorCode` family of the status.
    pub fn code(&self) -> &'static str {
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

impl std::fmt::Display for AccessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.name, self.parameter, self.message)
    }
}

impl std::error::Error for AccessError {}
