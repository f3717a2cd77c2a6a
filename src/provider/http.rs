//! HTTP for every provider: one client and runtime per connection, driven by the transfer
//! threads; calls that end early when the worker stops; failures sorted by what to do about
//! them (see [`ProviderError`]); bounded answers; downloads streamed to a file within time
//! limits that grow with their size.

use super::{ProviderError, ProviderResult, Server};
use futures_util::StreamExt;
use reqwest::{Client, RequestBuilder, Response, StatusCode};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::runtime::Runtime;

/// Longest JSON answer accepted for a control call (batch objects, lists); files are streamed.
pub const MAX_JSON_BYTES: usize = 16 * 1024 * 1024;
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);
/// A file transfer may take this long, plus a second per `SLOWEST_RATE` bytes of the file
/// (the idle timeout catches a silent one much sooner).
const TRANSFER_BASE: Duration = Duration::from_secs(10 * 60);
const SLOWEST_RATE: u64 = 256 * 1024;
/// The limit of a download whose size the provider does not say.
const UNSIZED_TRANSFER: Duration = Duration::from_secs(2 * 3600);

/// How long a transfer of `bytes` may take in all.
pub fn transfer_limit(bytes: u64) -> Duration {
    TRANSFER_BASE + Duration::from_secs(bytes / SLOWEST_RATE)
}

/// How often a call waiting on the network asks whether to stop.
const STOP_CHECK: Duration = Duration::from_millis(200);

/// A connection's HTTP client.
pub struct Http {
    pub client: Client,
    runtime: Runtime,
    /// Asked every fraction of a second while a call waits on the network: true ends the wait.
    should_stop: fn() -> bool,
}

impl Http {
    /// A client whose calls fail when no byte arrives for the server's idle timeout (connect,
    /// headers or body: a stalled transfer), and stop at once, failing, when the worker is asked
    /// to exit.
    pub fn new(server: &Server) -> ProviderResult<Http> {
        let idle = server.idle_timeout;
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
        Ok(Http {
            client,
            runtime,
            should_stop: server.should_stop,
        })
    }

    /// Runs a call to its end, unless the worker is asked to stop meanwhile.
    pub fn run<T>(
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

    /// Sends a control request and reads its JSON answer.
    pub fn call_json(&self, request: RequestBuilder) -> ProviderResult<Value> {
        self.run(async {
            let response = send(request.timeout(CONTROL_TIMEOUT)).await?;
            let bytes = read_limited(response, MAX_JSON_BYTES).await?;
            serde_json::from_slice(&bytes)
                .map_err(|e| ProviderError::Malformed(format!("invalid JSON ({e})")))
        })
    }

    /// Streams the answer to an (authorized) GET into `dest`, checking that it is not an error
    /// page and that it arrived whole; `what` names it in errors. Returns the bytes written.
    pub fn download(
        &self,
        request: RequestBuilder,
        dest: &Path,
        what: &str,
    ) -> ProviderResult<u64> {
        let local = |e: std::io::Error| ProviderError::Local(format!("{}: {e}", dest.display()));
        self.run(async {
            let request = request.timeout(UNSIZED_TRANSFER);
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
                    message: format!("the provider answered an HTML page instead of {what}"),
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
                    "the download of {what} took longer than {}s",
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
                        "the download of {what} was cut short ({written} of {} bytes)",
                        expected.unwrap_or_default()
                    ),
                    retry_after: None,
                });
            }
            Ok(written)
        })
    }
}

/// Sends a request and sorts failures: connection trouble, 429 and 5xx are transient.
pub async fn send(request: RequestBuilder) -> ProviderResult<Response> {
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
pub fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

pub async fn read_limited(response: Response, limit: usize) -> ProviderResult<Vec<u8>> {
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
