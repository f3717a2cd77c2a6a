//! The OpenAI Files and Batches API (and any service that speaks it, such as the emulator).

use super::{BatchInfo, BatchPage, BatchProvider, NewBatch, ProviderError, ProviderResult};
use futures_util::StreamExt;
use reqwest::{Client, RequestBuilder, Response, StatusCode};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::runtime::Runtime;

/// Longest JSON answer accepted for a control call (batch objects, lists); files are streamed.
const MAX_JSON_BYTES: usize = 16 * 1024 * 1024;
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);
/// A file transfer may take this long, plus a second per `SLOWEST_RATE` bytes of the file
/// (the idle timeout catches a silent one much sooner).
const TRANSFER_BASE: Duration = Duration::from_secs(10 * 60);
const SLOWEST_RATE: u64 = 256 * 1024;
/// The limit of a download whose size the provider does not say.
const UNSIZED_TRANSFER: Duration = Duration::from_secs(2 * 3600);

/// How long a transfer of `bytes` may take in all.
fn transfer_limit(bytes: u64) -> Duration {
    TRANSFER_BASE + Duration::from_secs(bytes / SLOWEST_RATE)
}

pub struct OpenAi {
    base_url: String,
    api_key: String,
    client: Client,
    runtime: Runtime,
    /// Asked every fraction of a second while a call waits on the network: true ends the wait.
    should_stop: fn() -> bool,
}

/// How often a call waiting on the network asks whether to stop.
const STOP_CHECK: Duration = Duration::from_millis(200);

impl OpenAi {
    /// A client for the API at `base_url`. A call fails when no byte arrives for `idle`
    /// (connect, headers or body: a stalled transfer), and stops at once, failing, when
    /// `should_stop` says so (the worker is asked to exit).
    pub fn new(
        base_url: &str,
        api_key: &str,
        idle: Duration,
        should_stop: fn() -> bool,
    ) -> ProviderResult<OpenAi> {
        let local = |e: &dyn std::fmt::Display| ProviderError::Local(e.to_string());
        // No threads of its own: the worker's transfer threads drive it, each waiting on its
        // call (a current-thread runtime takes callers from several threads, one at a time
        // driving the network for all).
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| local(&e))?;
        let client = Client::builder()
            .connect_timeout(Duration::from_secs(15).min(idle))
            .read_timeout(idle)
            .user_agent(concat!("llmbatching/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| local(&e))?;
        Ok(OpenAi {
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key: api_key.to_owned(),
            client,
            runtime,
            should_stop,
        })
    }

    /// Runs a call to its end, unless the worker is asked to stop meanwhile.
    fn run<T>(
        &self,
        call: impl std::future::Future<Output = ProviderResult<T>>,
    ) -> ProviderResult<T> {
        let should_stop = self.should_stop;
        self.runtime.block_on(async move {
            let stop = async move {
                while !should_stop() {
                    tokio::time::sleep(STOP_CHECK).await;
                }
            };
            futures_util::pin_mut!(call);
            futures_util::pin_mut!(stop);
            match futures_util::future::select(call, stop).await {
                futures_util::future::Either::Left((result, _)) => result,
                futures_util::future::Either::Right(_) => Err(ProviderError::Transient {
                    message: "interrupted: the worker is stopping".into(),
                    retry_after: None,
                }),
            }
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    fn authorized(&self, request: RequestBuilder) -> RequestBuilder {
        request.bearer_auth(&self.api_key)
    }

    /// Sends a control request and reads its JSON answer.
    fn call_json(&self, request: RequestBuilder) -> ProviderResult<Value> {
        self.run(async {
            let response = send(self.authorized(request).timeout(CONTROL_TIMEOUT)).await?;
            let bytes = read_limited(response, MAX_JSON_BYTES).await?;
            serde_json::from_slice(&bytes)
                .map_err(|e| ProviderError::Malformed(format!("invalid JSON ({e})")))
        })
    }
}

/// Sends a request and sorts failures: connection trouble, 429 and 5xx are transient.
async fn send(request: RequestBuilder) -> ProviderResult<Response> {
    let response = request.send().await.map_err(|e| ProviderError::Transient {
        message: format!("request failed: {}", describe(&e)),
        retry_after: None,
    })?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = read_limited(response, 64 * 1024).await.unwrap_or_default();
    let message = error_message(status, &body);
    if status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
    {
        return Err(ProviderError::Transient {
            message: format!("HTTP {}: {message}", status.as_u16()),
            retry_after,
        });
    }
    Err(ProviderError::Rejected {
        status: status.as_u16(),
        message,
    })
}

/// The `error.message` of an OpenAI error body, or the status's own words.
fn error_message(status: StatusCode, body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned())
}

/// A reqwest error with its causes, which is where the useful part ("connection refused") is.
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

async fn read_limited(response: Response, limit: usize) -> ProviderResult<Vec<u8>> {
    let mut stream = response.bytes_stream();
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ProviderError::Transient {
            message: describe(&e),
            retry_after: None,
        })?;
        if body.len() + chunk.len() > limit {
            return Err(ProviderError::Malformed(format!(
                "response larger than {limit} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

impl BatchProvider for OpenAi {
    fn upload_batch_file(&self, path: &Path, filename: &str) -> ProviderResult<String> {
        let local = |e: std::io::Error| ProviderError::Local(format!("{}: {e}", path.display()));
        let value = self.run(async {
            let file = tokio::fs::File::open(path).await.map_err(local)?;
            let length = file.metadata().await.map_err(local)?.len();
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
            let part = reqwest::multipart::Part::stream_with_length(body, length)
                .file_name(filename.to_owned())
                .mime_str("application/jsonl")
                .map_err(|e| ProviderError::Local(e.to_string()))?;
            let form = reqwest::multipart::Form::new()
                .text("purpose", "batch")
                .part("file", part);
            let request = self
                .authorized(self.client.post(self.url("/files")))
                .multipart(form)
                .timeout(transfer_limit(length));
            let bytes = read_limited(send(request).await?, MAX_JSON_BYTES).await?;
            serde_json::from_slice::<Value>(&bytes)
                .map_err(|e| ProviderError::Malformed(format!("invalid JSON ({e})")))
        })?;
        value
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| ProviderError::Malformed("file object without an id".into()))
    }

    fn create_batch(&self, batch: &NewBatch<'_>) -> ProviderResult<BatchInfo> {
        let metadata: serde_json::Map<String, Value> = batch
            .metadata
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.clone())))
            .collect();
        let body = json!({"input_file_id": batch.input_file_id, "endpoint": batch.endpoint,
                          "completion_window": "24h", "metadata": metadata});
        BatchInfo::from_json(&self.call_json(self.client.post(self.url("/batches")).json(&body))?)
    }

    fn get_batch(&self, id: &str) -> ProviderResult<BatchInfo> {
        BatchInfo::from_json(&self.call_json(self.client.get(self.url(&format!("/batches/{id}"))))?)
    }

    fn list_batches(&self, after: Option<&str>, limit: u32) -> ProviderResult<BatchPage> {
        let mut query = vec![("limit", limit.to_string())];
        if let Some(after) = after {
            query.push(("after", after.to_owned()));
        }
        let page = self.call_json(self.client.get(self.url("/batches")).query(&query))?;
        let batches = page
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| ProviderError::Malformed("batch list without data".into()))?
            .iter()
            .map(BatchInfo::from_json)
            .collect::<ProviderResult<Vec<_>>>()?;
        Ok(BatchPage {
            batches,
            has_more: page
                .get("has_more")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        })
    }

    fn cancel_batch(&self, id: &str) -> ProviderResult<BatchInfo> {
        BatchInfo::from_json(
            &self.call_json(self.client.post(self.url(&format!("/batches/{id}/cancel"))))?,
        )
    }

    fn download_file(&self, id: &str, dest: &Path) -> ProviderResult<u64> {
        let local = |e: std::io::Error| ProviderError::Local(format!("{}: {e}", dest.display()));
        self.run(async {
            let request = self
                .authorized(self.client.get(self.url(&format!("/files/{id}/content"))))
                .timeout(UNSIZED_TRANSFER);
            let started = tokio::time::Instant::now();
            let response = send(request).await?;
            // A gateway's error page answered with 200 is not the file.
            let html = response
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.to_ascii_lowercase().starts_with("text/html"));
            if html {
                return Err(ProviderError::Transient {
                    message: format!("the provider answered an HTML page instead of file {id}"),
                    retry_after: None,
                });
            }
            let expected = response.content_length();
            let limit = expected.map_or(UNSIZED_TRANSFER, transfer_limit);
            let mut file = tokio::fs::File::create(dest).await.map_err(local)?;
            let mut stream = response.bytes_stream();
            let mut written = 0u64;
            let too_slow = || ProviderError::Transient {
                message: format!(
                    "the download of file {id} took longer than {}s",
                    limit.as_secs()
                ),
                retry_after: None,
            };
            while let Some(chunk) = tokio::time::timeout_at(started + limit, stream.next())
                .await
                .map_err(|_| too_slow())?
            {
                let chunk = chunk.map_err(|e| ProviderError::Transient {
                    message: describe(&e),
                    retry_after: None,
                })?;
                file.write_all(&chunk).await.map_err(local)?;
                written += chunk.len() as u64;
            }
            file.flush().await.map_err(local)?;
            if expected.is_some_and(|n| n != written) {
                return Err(ProviderError::Transient {
                    message: format!(
                        "the download of file {id} was cut short ({written} of {} bytes)",
                        expected.unwrap_or_default()
                    ),
                    retry_after: None,
                });
            }
            Ok(written)
        })
    }

    fn delete_file(&self, id: &str) -> ProviderResult<()> {
        self.call_json(self.client.delete(self.url(&format!("/files/{id}"))))
            .map(|_| ())
    }
}
