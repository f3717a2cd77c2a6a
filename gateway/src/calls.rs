//! The endpoints. A call is authenticated by its key, runs as the key's role, and maps to one
//! llmbatching request (see `llmbatching.gateway_request`): answered with the provider's response
//! body when it is completed, with the provider's error when it failed, and with 422 while it is
//! queued or in a batch.

use crate::errors::ApiError;
use crate::Gateway;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// The batchable endpoints served, under `/v1`. `/messages` is Anthropic's Messages API, for
/// servers of kind anthropic (and the Anthropic SDK).
pub const ENDPOINTS: [&str; 6] = [
    "/responses",
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/moderations",
    "/messages",
];

/// The header that names the provider (an llmbatching server); without it, the role's
/// `llmbatching.default_provider`.
const PROVIDER_HEADER: &str = "llmbatching-provider";

/// The key of a call: `Authorization: Bearer` (OpenAI's SDKs), or `x-api-key` (Anthropic's).
fn key_of(headers: &HeaderMap) -> Option<&str> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    header("authorization")
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .or_else(|| header("x-api-key"))
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// How long the call may be held for its answer: `Prefer: wait=N` (RFC 7240), at most the
/// gateway's `max_wait`.
fn wait_of(headers: &HeaderMap, max: Duration) -> Duration {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .filter_map(|p| p.trim().strip_prefix("wait="))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
        .next()
        .unwrap_or_default()
        .min(max)
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// The body of a call: a JSON object, not asking to stream.
fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "the request body is larger than the gateway accepts",
            )
        } else {
            ApiError::invalid(format!("could not read the request body: {rejection}"))
        }
    })?;
    let body: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}")))?;
    if !body.is_object() {
        return Err(ApiError::invalid("the request body must be a JSON object"));
    }
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err(ApiError {
            param: Some("stream".into()),
            ..ApiError::invalid(
                "stream: true is not supported: llmbatching answers through a provider's batch API, once the batch is back; call without streaming and read the answer when it is ready (422 until then)",
            )
        });
    }
    Ok(body)
}

/// What the database says of a call's request.
struct Answer {
    id: i64,
    state: String,
    response: Option<Value>,
    error: Option<String>,
}

/// A pooled connection, in a transaction running as the key's role. The role is checked with
/// the key first (a wrong or revoked key touches nothing else).
async fn as_key_role<'a>(
    client: &'a mut deadpool_postgres::Client,
    key: &str,
) -> Result<deadpool_postgres::Transaction<'a>, ApiError> {
    let role: Option<String> = client
        .query_one("SELECT llmbatching.gateway_key_role($1)::text", &[&key])
        .await
        .map_err(|e| ApiError::unavailable("checking a key", e))?
        .get(0);
    let role = role.ok_or_else(ApiError::unauthorized)?;
    let tx = client
        .transaction()
        .await
        .map_err(|e| ApiError::unavailable("starting a transaction", e))?;
    // SET LOCAL ROLE: the role ends with the transaction, so a pooled connection never keeps it.
    tx.execute("SELECT pg_catalog.set_config('role', $1, true)", &[&role])
        .await
        .map_err(|e| ApiError::from_database(&e))?;
    Ok(tx)
}

async fn connection(gateway: &Gateway) -> Result<deadpool_postgres::Client, ApiError> {
    gateway
        .pool
        .get()
        .await
        .map_err(|e| ApiError::unavailable("getting a connection", e))
}

/// `POST /v1/<endpoint>`.
pub async fn call(
    State(gateway): State<Arc<Gateway>>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match answer_call(&gateway, uri.path(), &headers, body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn answer_call(
    gateway: &Gateway,
    path: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let key = key_of(headers).ok_or_else(ApiError::unauthorized)?;
    let body = parse_body(body)?;
    let endpoint = format!("/v1{}", path.trim_start_matches("/v1"));
    let provider = header_text(headers, PROVIDER_HEADER);
    let idempotency_key = header_text(headers, "idempotency-key");
    let wait = wait_of(headers, gateway.config.max_wait);

    let mut client = connection(gateway).await?;
    let tx = as_key_role(&mut client, key).await?;
    let row = tx
        .query_one(
            "SELECT id, state, response, error, llmbatching.llm_channel()
               FROM llmbatching.gateway_request($1, $2, $3::text::jsonb, $4)",
            &[&provider, &endpoint, &body.to_string(), &idempotency_key],
        )
        .await
        .map_err(|e| ApiError::from_database(&e))?;
    tx.commit().await.map_err(|e| ApiError::from_database(&e))?;
    let mut answer = Answer {
        id: row.get(0),
        state: row.get(1),
        response: row.get(2),
        error: row.get(3),
    };
    let channel: String = row.get(4);
    if pending(&answer) && !wait.is_zero() {
        answer = wait_for(gateway, &mut client, key, &channel, answer, wait).await?;
    }
    Ok(respond(gateway, answer))
}

fn pending(answer: &Answer) -> bool {
    matches!(answer.state.as_str(), "queued" | "submitted")
}

/// Holds a call until its request finishes (woken by the role's notification) or `wait` passes.
async fn wait_for(
    gateway: &Gateway,
    client: &mut deadpool_postgres::Client,
    key: &str,
    channel: &str,
    mut answer: Answer,
    wait: Duration,
) -> Result<Answer, ApiError> {
    let notify = gateway.waiting.channel(channel);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        answer = look_again(client, key, answer.id).await?;
        if !pending(&answer) {
            return Ok(answer);
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline) => return look_again(client, key, answer.id).await,
        }
    }
}

async fn look_again(
    client: &mut deadpool_postgres::Client,
    key: &str,
    id: i64,
) -> Result<Answer, ApiError> {
    let tx = as_key_role(client, key).await?;
    let row = tx
        .query_one(
            "SELECT state, response, error FROM llmbatching.gateway_answer($1)",
            &[&id],
        )
        .await
        .map_err(|e| ApiError::from_database(&e))?;
    tx.commit().await.map_err(|e| ApiError::from_database(&e))?;
    Ok(Answer {
        id,
        state: row.get::<_, Option<String>>(0).unwrap_or_default(),
        response: row.get(1),
        error: row.get(2),
    })
}

/// The response for a request's state.
fn respond(gateway: &Gateway, answer: Answer) -> Response {
    let Answer {
        id,
        state,
        response,
        error,
    } = answer;
    let mut reply = match state.as_str() {
        "completed" => Json(response.unwrap_or(Value::Null)).into_response(),
        "failed" => failed(id, response, error).into_response(),
        "queued" | "submitted" => ApiError {
            code: Some("batch_pending"),
            request_id: Some(id),
            retry_after: Some(gateway.config.retry_after),
            ..ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                if state == "queued" { "queued" } else { "submitted" },
                format!(
                    "request {id} is {}; the answer is not ready yet: call again later with the same body (or Idempotency-Key)",
                    if state == "queued" { "queued for the next batch" } else { "in a batch at the provider" }
                ),
            )
        }
        .into_response(),
        "cancelled" => ApiError {
            request_id: Some(id),
            ..ApiError::new(
                StatusCode::CONFLICT,
                "cancelled",
                format!("request {id} was cancelled; send a new Idempotency-Key for a fresh request"),
            )
        }
        .into_response(),
        _ => ApiError {
            request_id: Some(id),
            ..ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("request {id} is gone"))
        }
        .into_response(),
    };
    if let Ok(value) = id.to_string().parse() {
        reply.headers_mut().insert("llmbatching-request-id", value);
    }
    reply
}

/// A failed request: the provider's error body and status when it gave one, else the reason.
fn failed(id: i64, response: Option<Value>, error: Option<String>) -> Response {
    let message = error.unwrap_or_else(|| "the request failed".into());
    match response.filter(|r| r.get("error").is_some()) {
        Some(body) => {
            let status = body
                .pointer("/error/status")
                .and_then(Value::as_u64)
                .and_then(|s| StatusCode::from_u16(s as u16).ok())
                .unwrap_or(StatusCode::BAD_REQUEST);
            (status, Json(body)).into_response()
        }
        None => ApiError {
            request_id: Some(id),
            ..ApiError::new(StatusCode::BAD_REQUEST, "request_failed", message)
        }
        .into_response(),
    }
}

/// `GET /v1/models`: the models with a price row, by provider (what the extension knows how
/// to batch and bill).
pub async fn models(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let result = async {
        let key = key_of(&headers).ok_or_else(ApiError::unauthorized)?;
        let mut client = connection(&gateway).await?;
        let tx = as_key_role(&mut client, key).await?;
        let rows = tx
            .query(
                "SELECT model, provider FROM llmbatching.prices ORDER BY provider, model",
                &[],
            )
            .await
            .map_err(|e| ApiError::from_database(&e))?;
        let data: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({"id": r.get::<_, String>(0), "object": "model", "created": 0,
                       "owned_by": r.get::<_, String>(1)})
            })
            .collect();
        Ok::<_, ApiError>(Json(json!({"object": "list", "data": data})).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /health`: 200 when the database answers.
pub async fn health(State(gateway): State<Arc<Gateway>>) -> Response {
    let ok = match gateway.pool.get().await {
        Ok(client) => client.simple_query("SELECT 1").await.is_ok(),
        Err(_) => false,
    };
    if ok {
        Json(json!({"status": "ok"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable"})),
        )
            .into_response()
    }
}

pub async fn unknown_endpoint(uri: Uri) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!(
            "unknown endpoint {}; llmbatching-gateway serves POST /v1/responses, /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/moderations, /v1/messages, GET /v1/models and /health",
            uri.path()
        ),
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn keys_come_from_bearer_or_x_api_key() {
        let mut h = HeaderMap::new();
        assert_eq!(key_of(&h), None);
        h.insert("x-api-key", HeaderValue::from_static("lbk_x"));
        assert_eq!(key_of(&h), Some("lbk_x"));
        h.insert("authorization", HeaderValue::from_static("Bearer lbk_y"));
        assert_eq!(key_of(&h), Some("lbk_y"));
    }

    #[test]
    fn prefer_wait_is_read_and_capped() {
        let max = Duration::from_secs(30);
        let mut h = HeaderMap::new();
        assert_eq!(wait_of(&h, max), Duration::ZERO);
        h.insert("prefer", HeaderValue::from_static("respond-async, wait=10"));
        assert_eq!(wait_of(&h, max), Duration::from_secs(10));
        h.insert("prefer", HeaderValue::from_static("wait=999"));
        assert_eq!(wait_of(&h, max), max);
    }

    #[test]
    fn bodies_must_be_objects_that_do_not_stream() {
        assert!(parse_body(Ok(Bytes::from_static(b"{\"model\": \"m\"}"))).is_ok());
        for bad in [&b"{not json"[..], b"[1]", b"{\"stream\": true}"] {
            let e = parse_body(Ok(Bytes::copy_from_slice(bad))).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
        }
    }
}
