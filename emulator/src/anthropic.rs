//! Anthropic's Message Batches API over the same provider state: requests sent inline at
//! creation, `processing_status`, one results file behind `results_url`, result types
//! `succeeded`/`errored`/`canceled`/`expired`, the `x-api-key` and `anthropic-version`
//! headers and Anthropic-shaped errors. Faults are configured under the same operation names
//! as OpenAI's (`create`, `get`, `list`, `cancel`, `delete`, and `content` for the results).

use crate::batches::ApiError;
use crate::{inject_faults, lock, Shared};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

/// An error the way Anthropic writes it.
fn error_response(error: ApiError) -> Response {
    let kind = match error.status {
        401 => "authentication_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        s if s >= 500 => "api_error",
        _ => "invalid_request_error",
    };
    let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::BAD_REQUEST);
    let body = json!({"type": "error", "error": {"type": kind, "message": error.message}});
    (status, Json(body)).into_response()
}

fn answer(result: Result<Value, ApiError>) -> Response {
    match result {
        Ok(value) => Json(value).into_response(),
        Err(error) => error_response(error),
    }
}

async fn create(State(shared): State<Shared>, body: Bytes) -> Response {
    let request = match serde_json::from_slice::<Value>(&body) {
        Ok(request) => request,
        Err(e) => return error_response(ApiError::new(400, format!("Invalid JSON body: {e}"))),
    };
    answer(lock(&shared).create_message_batch(&request, body.len()))
}

async fn retrieve(State(shared): State<Shared>, Path(id): Path<String>) -> Response {
    answer(lock(&shared).message_batch(&id))
}

#[derive(Deserialize)]
struct ListQuery {
    after_id: Option<String>,
    limit: Option<usize>,
}

async fn list(State(shared): State<Shared>, Query(q): Query<ListQuery>) -> Response {
    let limit = q.limit.unwrap_or(20);
    if !(1..=1000).contains(&limit) {
        return error_response(ApiError::new(400, "limit must be between 1 and 1000"));
    }
    answer(lock(&shared).list_message_batches(q.after_id.as_deref(), limit))
}

async fn cancel(State(shared): State<Shared>, Path(id): Path<String>) -> Response {
    answer(lock(&shared).cancel_message_batch(&id))
}

async fn delete(State(shared): State<Shared>, Path(id): Path<String>) -> Response {
    answer(lock(&shared).delete_message_batch(&id))
}

async fn results(State(shared): State<Shared>, Path(id): Path<String>) -> Response {
    match lock(&shared).message_batch_results(&id) {
        Ok(Ok(bytes)) => (
            [(header::CONTENT_TYPE, "application/binary")],
            Bytes::from(bytes),
        )
            .into_response(),
        Ok(Err(page)) => ([(header::CONTENT_TYPE, "text/html")], page).into_response(),
        Err(error) => error_response(error),
    }
}

/// Refuses calls without `x-api-key` (or with the wrong one, when a key is set) or without
/// `anthropic-version`.
async fn require_key(
    State(shared): State<Shared>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let value = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    if value("anthropic-version").is_empty() {
        return error_response(ApiError::new(400, "anthropic-version: header is required"));
    }
    let given = value("x-api-key");
    let expected = lock(&shared).config.api_key.clone();
    if given.is_empty() || expected.as_deref().is_some_and(|k| k != given) {
        return error_response(ApiError::new(401, "invalid x-api-key"));
    }
    crate::count_create(&shared, &request, given);
    next.run(request).await
}

/// The Message Batches routes, relative to the API's base (`.../v1`).
pub fn routes(shared: &Shared) -> Router<Shared> {
    Router::new()
        .route("/messages/batches", post(create).get(list))
        .route("/messages/batches/{id}", get(retrieve).delete(delete))
        .route("/messages/batches/{id}/cancel", post(cancel))
        .route("/messages/batches/{id}/results", get(results))
        .layer(middleware::from_fn_with_state(shared.clone(), require_key))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            inject_faults,
        ))
        .layer(DefaultBodyLimit::max(
            crate::batches::ANTHROPIC_MAX_BYTES + 1024 * 1024,
        ))
}
