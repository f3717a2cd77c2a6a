//! Errors as OpenAI writes them (`{"error": {"message", "type", "param", "code"}}`), which the
//! official SDKs read into their exceptions.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::time::Duration;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The error's `type`: for a pending answer, the request's state (`queued`, `submitted`).
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<String>,
    /// The llmbatching request the call maps to, if any.
    pub request_id: Option<i64>,
    pub retry_after: Option<Duration>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            code: None,
            param: None,
            request_id: None,
            retry_after: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn unauthorized() -> ApiError {
        ApiError {
            code: Some("invalid_api_key"),
            ..ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "Incorrect API key provided: give a key of llm_gateway_key_create() as the bearer token.",
            )
        }
    }

    /// The database could not be reached or failed unexpectedly; what it said goes to the log,
    /// not to the caller.
    pub fn unavailable(what: &str, e: impl std::fmt::Display) -> ApiError {
        eprintln!("llmbatching-gateway: {what}: {e}");
        ApiError {
            retry_after: Some(Duration::from_secs(5)),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the gateway cannot reach its database; try again shortly",
            )
        }
    }

    /// A submission the extension refused: its message names the argument at fault.
    pub fn from_database(e: &tokio_postgres::Error) -> ApiError {
        let Some(db) = e.as_db_error() else {
            return ApiError::unavailable("a database call failed", e);
        };
        let code = db.code().code();
        let message = db.message().to_owned();
        match code {
            // invalid_parameter_value, invalid_text_representation, ...: the call's fault.
            c if c.starts_with("22") => ApiError {
                param: argument_named(&message),
                ..ApiError::invalid(message)
            },
            "42501" => ApiError::new(StatusCode::FORBIDDEN, "permission_error", message),
            _ => ApiError::unavailable("a database call failed", e),
        }
    }
}

/// The argument an extension error names (`invalid argument "model": ...`).
fn argument_named(message: &str) -> Option<String> {
    let rest = message.strip_prefix("invalid argument \"")?;
    Some(rest.split('"').next()?.to_owned())
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"message": self.message, "type": self.kind,
                               "param": self.param, "code": self.code});
        if let Some(id) = self.request_id {
            error["request_id"] = json!(id);
        }
        let mut response = (self.status, Json(json!({ "error": error }))).into_response();
        if let Some(after) = self.retry_after {
            if let Ok(value) = HeaderValue::from_str(&after.as_secs().max(1).to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        if let Some(id) = self.request_id {
            if let Ok(value) = HeaderValue::from_str(&id.to_string()) {
                response
                    .headers_mut()
                    .insert("llmbatching-request-id", value);
            }
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_argument_is_read_from_the_message() {
        assert_eq!(
            argument_named("invalid argument \"model\": must not be NULL").as_deref(),
            Some("model")
        );
        assert_eq!(argument_named("something else"), None);
    }
}
