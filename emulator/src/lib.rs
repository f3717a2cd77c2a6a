//! An HTTP emulator of the OpenAI Files and Batches API, for testing llmbatching without the
//! real provider. It speaks the same protocol (multipart upload, batch create/get/list/cancel,
//! file content and delete, OpenAI-shaped errors), moves batches through their statuses on an
//! adjustable clock, and answers each request with text derived from the request itself.
//!
//! Besides the `/v1` API it serves:
//! - `GET /emulator/config` and `POST /emulator/config` (a JSON object of [`Config`] fields to
//!   change) to steer timing, expiry and validation faults while it runs: among them
//!   [`Config::faults`] (errors, drops, truncation and delay per operation),
//!   [`Config::malformed_polls`] (truncated batch objects) and [`Config::echo_authorization`]
//!   (upload and create refused with an error message that echoes the caller's credentials);
//! - `GET /emulator/stats`: [`Stats`], what it saw.
//!
//! Use it in-process with [`Emulator::start`] or as the `llmbatching-emulator` binary.

pub mod answers;
pub mod anthropic;
pub mod batches;

pub use batches::{Config, Fault, Stats};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use batches::{ApiError, Provider};
use serde::Deserialize;
use serde_json::Value;
use std::sync::{Arc, Mutex, MutexGuard};

pub(crate) type Shared = Arc<Mutex<Provider>>;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        (status, Json(self.body())).into_response()
    }
}

pub(crate) fn lock(shared: &Shared) -> MutexGuard<'_, Provider> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

type ApiResult = Result<Json<Value>, ApiError>;

async fn upload(State(shared): State<Shared>, mut form: Multipart) -> ApiResult {
    let (mut purpose, mut file) = (None, None);
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| ApiError::new(400, e.to_string()))?
    {
        match field.name() {
            Some("purpose") => {
                purpose = Some(
                    field
                        .text()
                        .await
                        .map_err(|e| ApiError::new(400, e.to_string()))?,
                )
            }
            Some("file") => {
                let name = field.file_name().unwrap_or("upload").to_owned();
                let bytes = field
                    .bytes()
                    .await
                    .map_err(|e| ApiError::new(400, e.to_string()))?;
                file = Some((name, bytes.to_vec()));
            }
            _ => {}
        }
    }
    let purpose =
        purpose.ok_or_else(|| ApiError::new(400, "Missing required parameter: 'purpose'"))?;
    let (name, bytes) =
        file.ok_or_else(|| ApiError::new(400, "Missing required parameter: 'file'"))?;
    lock(&shared).upload(&name, &purpose, bytes).map(Json)
}

async fn file_object(State(shared): State<Shared>, Path(id): Path<String>) -> ApiResult {
    lock(&shared).file(&id).map(|f| Json(f.object()))
}

async fn file_content(
    State(shared): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match lock(&shared).file_content(&id)? {
        Ok(bytes) => Ok((
            [(header::CONTENT_TYPE, "application/octet-stream")],
            Bytes::from(bytes),
        )
            .into_response()),
        Err(page) => Ok(([(header::CONTENT_TYPE, "text/html")], page).into_response()),
    }
}

async fn delete_file(State(shared): State<Shared>, Path(id): Path<String>) -> ApiResult {
    lock(&shared).delete_file(&id).map(Json)
}

async fn create_batch(State(shared): State<Shared>, body: Bytes) -> ApiResult {
    let request: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(400, format!("Invalid JSON body: {e}")))?;
    lock(&shared).create_batch(&request).map(Json)
}

async fn get_batch(
    State(shared): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let mut provider = lock(&shared);
    let batch = provider.get_batch(&id)?;
    if provider.config.malformed_polls > 0 {
        provider.config.malformed_polls -= 1;
        let text = batch.to_string();
        return Ok((
            [(header::CONTENT_TYPE, "application/json")],
            text[..text.floor_char_boundary(text.len() / 3)].to_owned(),
        )
            .into_response());
    }
    Ok(Json(batch).into_response())
}

async fn cancel_batch(State(shared): State<Shared>, Path(id): Path<String>) -> ApiResult {
    lock(&shared).cancel_batch(&id).map(Json)
}

#[derive(Deserialize)]
struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

async fn list_batches(State(shared): State<Shared>, Query(q): Query<ListQuery>) -> ApiResult {
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::new(400, "limit must be between 1 and 100"));
    }
    lock(&shared)
        .list_batches(q.after.as_deref(), limit)
        .map(Json)
}

async fn get_config(State(shared): State<Shared>) -> Json<Value> {
    Json(serde_json::to_value(&lock(&shared).config).unwrap_or_default())
}

/// Merges the posted fields into the running configuration.
async fn set_config(State(shared): State<Shared>, Json(changes): Json<Value>) -> ApiResult {
    let mut provider = lock(&shared);
    let mut merged = serde_json::to_value(&provider.config).unwrap_or_default();
    if let (Some(target), Some(changes)) = (merged.as_object_mut(), changes.as_object()) {
        for (k, v) in changes {
            target.insert(k.clone(), v.clone());
        }
    }
    provider.config =
        serde_json::from_value(merged).map_err(|e| ApiError::new(400, e.to_string()))?;
    Ok(Json(
        serde_json::to_value(&provider.config).unwrap_or_default(),
    ))
}

async fn get_stats(State(shared): State<Shared>) -> Json<Value> {
    Json(serde_json::to_value(&lock(&shared).stats).unwrap_or_default())
}

/// The operation a call performs, as named in [`Config::faults`].
fn operation(method: &axum::http::Method, path: &str) -> &'static str {
    let parts: Vec<&str> = path
        .trim_start_matches("/v1")
        .trim_matches('/')
        .split('/')
        .collect();
    match (method.as_str(), parts.as_slice()) {
        ("POST", ["files"]) => "upload",
        ("GET", ["files", _]) => "file",
        ("GET", ["files", _, "content"]) => "content",
        ("DELETE", ["files", _]) => "delete",
        ("POST", ["batches"]) => "create",
        ("GET", ["batches"]) => "list",
        ("GET", ["batches", _]) => "get",
        ("POST", ["batches", _, "cancel"]) => "cancel",
        ("POST", ["messages", "batches"]) => "create",
        ("GET", ["messages", "batches"]) => "list",
        ("GET", ["messages", "batches", _]) => "get",
        ("POST", ["messages", "batches", _, "cancel"]) => "cancel",
        ("DELETE", ["messages", "batches", _]) => "delete",
        ("GET", ["messages", "batches", _, "results"]) => "content",
        _ => "other",
    }
}

/// Applies the configured faults of the call's operation: delay, error before the work, or
/// a lost or truncated answer after it.
pub(crate) async fn inject_faults(
    State(shared): State<Shared>,
    request: Request,
    next: Next,
) -> Response {
    let op = operation(request.method(), request.uri().path());
    let Some(fault) = lock(&shared).config.faults.get(op).cloned() else {
        return next.run(request).await;
    };
    if fault.delay_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(fault.delay_ms)).await;
    }
    if rand::random::<f64>() < fault.error_rate {
        lock(&shared).stats.faults_injected += 1;
        let status = fault
            .statuses
            .get(rand::random_range(0..fault.statuses.len().max(1)))
            .copied()
            .unwrap_or(500);
        let mut response = ApiError::new(status, format!("Emulated fault on {op}")).into_response();
        if let Some(seconds) = fault.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, seconds.into());
        }
        return response;
    }
    let response = next.run(request).await;
    if rand::random::<f64>() < fault.drop_rate {
        lock(&shared).stats.faults_injected += 1;
        // Headers go out, then the body fails: the client loses the connection mid-answer.
        let broken = futures_util::stream::once(async {
            Err::<Bytes, std::io::Error>(std::io::Error::other("dropped"))
        });
        return (response.status(), axum::body::Body::from_stream(broken)).into_response();
    }
    let stall_this = {
        let mut provider = lock(&shared);
        let counted = provider
            .config
            .faults
            .get_mut(op)
            .filter(|f| f.stall_next > 0)
            .map(|f| f.stall_next -= 1)
            .is_some();
        counted || rand::random::<f64>() < fault.stall_rate
    };
    if stall_this {
        lock(&shared).stats.faults_injected += 1;
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default();
        let half = bytes.slice(..bytes.len() / 2);
        let silence = std::time::Duration::from_millis(fault.stall_ms.unwrap_or(600_000));
        // The first half, then nothing: the client waits on an open connection.
        use futures_util::StreamExt;
        let stalled = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(half) })
            .chain(futures_util::stream::once(async move {
                tokio::time::sleep(silence).await;
                Err::<Bytes, std::io::Error>(std::io::Error::other("stalled"))
            }));
        let mut parts = parts;
        parts.headers.remove(header::CONTENT_LENGTH);
        return Response::from_parts(parts, axum::body::Body::from_stream(stalled));
    }
    if rand::random::<f64>() < fault.truncate_rate {
        lock(&shared).stats.faults_injected += 1;
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default();
        let mut parts = parts;
        parts.headers.remove(header::CONTENT_LENGTH);
        return Response::from_parts(
            parts,
            axum::body::Body::from(bytes.slice(..bytes.len() / 2)),
        );
    }
    response
}

/// The message of an error that echoes the request's credentials back, as some
/// OpenAI-compatible services do when they refuse a request: the `Authorization` header's value
/// exactly as received (including `Bearer `), and the `api-key` header's value if one was sent.
pub fn echoed_credentials_message(authorization: Option<&str>, api_key: Option<&str>) -> String {
    let mut message = format!(
        "Invalid request. Headers received: Authorization: {}",
        authorization.unwrap_or("")
    );
    if let Some(key) = api_key {
        message.push_str(&format!(", api-key: {key}"));
    }
    message
}

/// While [`Config::echo_authorization`] is above zero, refuses each upload and batch creation
/// with status 400 and an error echoing the request's credentials, counting the refusal down.
async fn echo_credentials(
    State(shared): State<Shared>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let op = operation(request.method(), request.uri().path());
    if matches!(op, "upload" | "create") {
        let mut provider = lock(&shared);
        if provider.config.echo_authorization > 0 {
            provider.config.echo_authorization -= 1;
            provider.stats.faults_injected += 1;
            drop(provider);
            let value = |name| {
                headers
                    .get(name)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            };
            let message = echoed_credentials_message(
                value(header::AUTHORIZATION.as_str()).as_deref(),
                value("api-key").as_deref(),
            );
            return ApiError::new(400, message).into_response();
        }
    }
    next.run(request).await
}

/// How a protocol's calls carry the key.
#[derive(Clone, Copy)]
enum Auth {
    /// OpenAI: `Authorization: Bearer <key>`.
    Bearer,
    /// Azure OpenAI: an `api-key` header, and an `api-version` query parameter on every call.
    AzureKey,
}

/// Refuses calls without the key their protocol expects (or with the wrong one, when a key is set).
async fn require_key(
    State((shared, auth)): State<(Shared, Auth)>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let header_value = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let given = match auth {
        Auth::Bearer => header_value(header::AUTHORIZATION.as_str())
            .strip_prefix("Bearer ")
            .unwrap_or("")
            .to_owned(),
        Auth::AzureKey => header_value("api-key"),
    };
    if matches!(auth, Auth::AzureKey)
        && !request.uri().query().unwrap_or("").contains("api-version=")
    {
        return ApiError::new(404, "Resource not found (no api-version given)").into_response();
    }
    let expected = lock(&shared).config.api_key.clone();
    let accepted = !given.is_empty() && expected.as_deref().is_none_or(|k| k == given);
    if !accepted {
        let mut err = ApiError::new(401, "Incorrect API key provided.");
        err.code = Some("invalid_api_key");
        return err.into_response();
    }
    count_create(&shared, &request, &given);
    next.run(request).await
}

/// Counts a batch creation under the key it was made with (see [`Stats::creates_per_key`]).
pub(crate) fn count_create(shared: &Shared, request: &Request, key: &str) {
    if operation(request.method(), request.uri().path()) == "create" {
        *lock(shared)
            .stats
            .creates_per_key
            .entry(key.to_owned())
            .or_default() += 1;
    }
}

/// The Files and Batches API, with the faults and the key check of `auth`.
fn files_and_batches(shared: &Shared, auth: Auth) -> Router<Shared> {
    Router::new()
        .route("/files", post(upload))
        .route("/files/{id}", get(file_object).delete(delete_file))
        .route("/files/{id}/content", get(file_content))
        .route("/batches", post(create_batch).get(list_batches))
        .route("/batches/{id}", get(get_batch))
        .route("/batches/{id}/cancel", post(cancel_batch))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            echo_credentials,
        ))
        .layer(middleware::from_fn_with_state(
            (shared.clone(), auth),
            require_key,
        ))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            inject_faults,
        ))
        .layer(DefaultBodyLimit::max(batches::MAX_FILE_BYTES + 1024 * 1024))
}

/// The emulator's routes over shared provider state: OpenAI at `/v1`, Azure OpenAI at
/// `/azure/openai` (its paths, `api-key` header and `api-version`), Anthropic's Message
/// Batches at `/anthropic/v1`.
pub fn router(shared: Arc<Mutex<Provider>>) -> Router {
    Router::new()
        .nest("/v1", files_and_batches(&shared, Auth::Bearer))
        .nest("/azure/openai", files_and_batches(&shared, Auth::AzureKey))
        .nest("/anthropic/v1", anthropic::routes(&shared))
        .route("/emulator/config", get(get_config).post(set_config))
        .route("/emulator/stats", get(get_stats))
        .with_state(shared)
}

/// A running emulator on a loopback port, served from a thread of its own; stops when dropped.
pub struct Emulator {
    /// The base URL to give llmbatching (`llmbatching.api_base`), ending in `/v1`.
    pub base_url: String,
    /// The same API the Azure OpenAI way (a server of kind `azure`), and Anthropic's.
    pub azure_base_url: String,
    pub anthropic_base_url: String,
    shared: Shared,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Emulator {
    pub fn start(config: Config) -> std::io::Result<Emulator> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let root = format!("http://{}", listener.local_addr()?);
        let base_url = format!("{root}/v1");
        let mut provider = Provider::new(config);
        provider.anthropic_base = format!("{root}/anthropic/v1");
        let shared = Arc::new(Mutex::new(provider));
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = router(shared.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await;
            })
        });
        Ok(Emulator {
            azure_base_url: format!("{root}/azure/openai"),
            anthropic_base_url: format!("{root}/anthropic/v1"),
            base_url,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// Changes the configuration of the running emulator.
    pub fn configure(&self, change: impl FnOnce(&mut Config)) {
        change(&mut lock(&self.shared).config);
    }

    /// What the emulator has seen so far (batches are brought up to date first).
    pub fn stats(&self) -> Stats {
        let mut provider = lock(&self.shared);
        provider.advance();
        provider.stats.clone()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{echoed_credentials_message, operation};
    use axum::http::Method;

    #[test]
    fn the_echo_repeats_the_credentials_exactly() {
        assert_eq!(
            echoed_credentials_message(Some("Bearer sk-secret"), Some("sk-other")),
            "Invalid request. Headers received: Authorization: Bearer sk-secret, api-key: sk-other"
        );
        assert_eq!(
            echoed_credentials_message(Some("Bearer sk-secret"), None),
            "Invalid request. Headers received: Authorization: Bearer sk-secret"
        );
    }

    #[test]
    fn calls_map_to_their_operation() {
        assert_eq!(operation(&Method::POST, "/files"), "upload");
        assert_eq!(
            operation(&Method::GET, "/v1/files/file-1/content"),
            "content"
        );
        assert_eq!(operation(&Method::DELETE, "/files/file-1"), "delete");
        assert_eq!(operation(&Method::POST, "/batches"), "create");
        assert_eq!(operation(&Method::GET, "/batches"), "list");
        assert_eq!(operation(&Method::GET, "/batches/batch-1"), "get");
        assert_eq!(
            operation(&Method::POST, "/batches/batch-1/cancel"),
            "cancel"
        );
    }
}
