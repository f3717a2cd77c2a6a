//! OpenAI's Files and Batches API, for two kinds of server: `openai` (OpenAI itself, and any
//! service speaking its protocol at `api_base`) and `azure` (Azure OpenAI: deployment names as
//! models, the `api-key` header, paths under `.../openai` with an `api-version`, endpoints
//! without `/v1`).

pub mod format;

use super::http::{read_limited, send, transfer_limit, Http, MAX_JSON_BYTES};
use super::{
    BatchError, BatchInfo, BatchProvider, BatchStatus, Kind, Leftovers, NewBatch, ProviderError,
    ProviderResult, Server, SharedProvider,
};
use crate::planner::BatchLimits;
use crate::request::Endpoint;
use crate::results::LineResult;
use reqwest::RequestBuilder;
use serde_json::{json, Value};
use std::path::Path;

/// The two ways of speaking the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    Azure,
}

/// A kind of server speaking this protocol.
pub struct OpenAiKind {
    dialect: Dialect,
}

pub static OPENAI: OpenAiKind = OpenAiKind {
    dialect: Dialect::OpenAi,
};
pub static AZURE: OpenAiKind = OpenAiKind {
    dialect: Dialect::Azure,
};

/// The Azure OpenAI API version used when the server's `api_version` option does not say.
pub const AZURE_API_VERSION: &str = "2024-10-21";

impl Kind for OpenAiKind {
    fn name(&self) -> &'static str {
        match self.dialect {
            Dialect::OpenAi => "openai",
            Dialect::Azure => "azure",
        }
    }

    fn default_api_base(&self) -> Option<&'static str> {
        match self.dialect {
            Dialect::OpenAi => Some("https://api.openai.com/v1"),
            // https://<resource>.openai.azure.com/openai: every resource has its own.
            Dialect::Azure => None,
        }
    }

    fn server_options(&self) -> &'static [&'static str] {
        match self.dialect {
            Dialect::OpenAi => &[],
            Dialect::Azure => &["api_version"],
        }
    }

    fn endpoints(&self) -> &'static [Endpoint] {
        match self.dialect {
            Dialect::OpenAi => &[
                Endpoint::Responses,
                Endpoint::ChatCompletions,
                Endpoint::Embeddings,
                Endpoint::Completions,
                Endpoint::Moderations,
            ],
            Dialect::Azure => &[
                Endpoint::ChatCompletions,
                Endpoint::Responses,
                Endpoint::Embeddings,
            ],
        }
    }

    fn limits(&self) -> BatchLimits {
        BatchLimits {
            max_requests: match self.dialect {
                Dialect::OpenAi => 50_000,
                Dialect::Azure => 100_000,
            },
            max_bytes: 200 * 1024 * 1024,
        }
    }

    fn input_line(
        &self,
        custom_id: &str,
        endpoint: Endpoint,
        body_json: &str,
    ) -> Result<String, serde_json::Error> {
        format::batch_line(custom_id, self.endpoint_path(endpoint), body_json)
    }

    fn parse_result_line(&self, endpoint: Endpoint, line: &str) -> Result<LineResult, String> {
        format::parse_line(endpoint, line)
    }

    fn connect(&self, server: &Server) -> ProviderResult<SharedProvider> {
        Ok(std::sync::Arc::new(OpenAi::new(server, self.dialect)?))
    }
}

impl OpenAiKind {
    /// The endpoint as this dialect names it in batch files and create calls.
    fn endpoint_path(&self, endpoint: Endpoint) -> &'static str {
        match self.dialect {
            Dialect::OpenAi => endpoint.path(),
            Dialect::Azure => endpoint.path().trim_start_matches("/v1"),
        }
    }
}

pub struct OpenAi {
    dialect: Dialect,
    base_url: String,
    api_key: String,
    /// Azure's `api-version` query parameter.
    api_version: String,
    http: Http,
}

impl OpenAi {
    /// A client for the server's API. A call fails when no byte arrives for its idle timeout
    /// (connect, headers or body: a stalled transfer), and stops at once, failing, when
    /// `should_stop` says so (the worker is asked to exit).
    pub fn new(server: &Server, dialect: Dialect) -> ProviderResult<OpenAi> {
        Ok(OpenAi {
            http: Http::new(server)?,
            dialect,
            base_url: server.api_base.trim_end_matches('/').to_owned(),
            api_key: server.api_key.clone(),
            api_version: server
                .option("api_version")
                .unwrap_or(AZURE_API_VERSION)
                .to_owned(),
        })
    }

    fn url(&self, path: &str) -> String {
        match self.dialect {
            Dialect::OpenAi => format!("{}{}", self.base_url, path),
            Dialect::Azure => format!(
                "{}{}{}api-version={}",
                self.base_url,
                path,
                if path.contains('?') { '&' } else { '?' },
                self.api_version
            ),
        }
    }

    fn authorized(&self, request: RequestBuilder) -> RequestBuilder {
        match self.dialect {
            Dialect::OpenAi => request.bearer_auth(&self.api_key),
            Dialect::Azure => request.header("api-key", &self.api_key),
        }
    }

    fn list_batches(&self, after: Option<&str>, limit: u32) -> ProviderResult<BatchPage> {
        let mut path = format!("/batches?limit={limit}");
        if let Some(after) = after {
            path.push_str(&format!("&after={after}"));
        }
        let page = self.call(self.http.client.get(self.url(&path)))?;
        let batches = page
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| ProviderError::Malformed("batch list without data".into()))?
            .iter()
            .map(batch_info)
            .collect::<ProviderResult<Vec<_>>>()?;
        Ok(BatchPage {
            batches,
            has_more: page
                .get("has_more")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        })
    }

    fn call(&self, request: RequestBuilder) -> ProviderResult<Value> {
        self.http.call_json(self.authorized(request))
    }

    fn delete_file(&self, id: &str) -> ProviderResult<()> {
        self.call(self.http.client.delete(self.url(&format!("/files/{id}"))))
            .map(|_| ())
    }
}

/// Pages of the batch list searched for a batch whose create call went unrecorded.
const RECONCILE_PAGES: usize = 20;

/// A page of the provider's batch list, newest first.
struct BatchPage {
    batches: Vec<BatchInfo>,
    has_more: bool,
}

impl BatchProvider for OpenAi {
    fn stage_input(&self, path: &Path, filename: &str) -> ProviderResult<Option<String>> {
        let local = |e: std::io::Error| ProviderError::Local(format!("{}: {e}", path.display()));
        let value = self.http.run(async {
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
                .authorized(self.http.client.post(self.url("/files")))
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
            .map(|id| Some(id.to_owned()))
            .ok_or_else(|| ProviderError::Malformed("file object without an id".into()))
    }

    fn create_batch(&self, batch: &NewBatch<'_>) -> ProviderResult<BatchInfo> {
        let metadata: serde_json::Map<String, Value> = batch
            .metadata
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.clone())))
            .collect();
        let endpoint = match self.dialect {
            Dialect::OpenAi => OPENAI.endpoint_path(batch.endpoint),
            Dialect::Azure => AZURE.endpoint_path(batch.endpoint),
        };
        let body = json!({"input_file_id": batch.input_file_id.unwrap_or_default(),
                          "endpoint": endpoint, "completion_window": "24h", "metadata": metadata});
        batch_info(&self.call(self.http.client.post(self.url("/batches")).json(&body))?)
    }

    /// Searches the batch list for one carrying every tag of `batch.metadata`.
    fn find_created(&self, batch: &NewBatch<'_>) -> ProviderResult<Option<BatchInfo>> {
        let ours = |b: &BatchInfo| {
            batch.metadata.iter().all(|(key, value)| {
                b.metadata.get(*key).and_then(|v| v.as_str()) == Some(value.as_str())
            })
        };
        let mut after: Option<String> = None;
        for _ in 0..RECONCILE_PAGES {
            let page = self.list_batches(after.as_deref(), 100)?;
            if let Some(found) = page.batches.iter().find(|b| ours(b)) {
                return Ok(Some(found.clone()));
            }
            match (page.has_more, page.batches.last()) {
                (true, Some(last)) => after = Some(last.id.clone()),
                _ => break,
            }
        }
        Ok(None)
    }

    fn get_batch(&self, id: &str) -> ProviderResult<BatchInfo> {
        batch_info(&self.call(self.http.client.get(self.url(&format!("/batches/{id}"))))?)
    }

    fn cancel_batch(&self, id: &str) -> ProviderResult<BatchInfo> {
        batch_info(
            &self.call(
                self.http
                    .client
                    .post(self.url(&format!("/batches/{id}/cancel"))),
            )?,
        )
    }

    fn download_results(&self, id: &str, dest: &Path) -> ProviderResult<u64> {
        let request = self.authorized(
            self.http
                .client
                .get(self.url(&format!("/files/{id}/content"))),
        );
        self.http.download(request, dest, &format!("file {id}"))
    }

    /// Deletes the batch's input, output and error files (the batch itself stays listed).
    fn clean_up(&self, leftovers: &Leftovers) -> ProviderResult<()> {
        let files = [
            &leftovers.input_file_id,
            &leftovers.output,
            &leftovers.errors,
        ];
        let mut first_failure = None;
        for file_id in files.into_iter().flatten() {
            if let Err(e) = self.delete_file(file_id) {
                first_failure.get_or_insert(ProviderError::Local(format!("file {file_id}: {e}")));
            }
        }
        first_failure.map_or(Ok(()), Err)
    }
}

fn non_empty_string(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Reads a batch object. `error_file_id` and `output_file_id` given as `""` mean no file.
pub fn batch_info(v: &Value) -> ProviderResult<BatchInfo> {
    let malformed = |what: &str| ProviderError::Malformed(format!("batch object without {what}"));
    let id = non_empty_string(v.get("id")).ok_or_else(|| malformed("an id"))?;
    let status = v
        .get("status")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed("a status"))?;
    let count = |name: &str| {
        v.pointer(&format!("/request_counts/{name}"))
            .and_then(Value::as_i64)
            .unwrap_or(0)
    };
    let errors = v
        .pointer("/errors/data")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .map(|e| BatchError {
                    code: e
                        .get("code")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown")
                        .to_owned(),
                    message: e
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned(),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(BatchInfo {
        id,
        status: BatchStatus::parse(status),
        output_file_id: non_empty_string(v.get("output_file_id")),
        error_file_id: non_empty_string(v.get("error_file_id")),
        total: count("total"),
        completed: count("completed"),
        failed: count("failed"),
        errors,
        metadata: v
            .get("metadata")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default(),
        input_tokens: v.pointer("/usage/input_tokens").and_then(Value::as_i64),
        cached_tokens: v
            .pointer("/usage/input_tokens_details/cached_tokens")
            .and_then(Value::as_i64),
        output_tokens: v.pointer("/usage/output_tokens").and_then(Value::as_i64),
        reasoning_tokens: v
            .pointer("/usage/output_tokens_details/reasoning_tokens")
            .and_then(Value::as_i64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn empty_file_ids_mean_no_file() {
        let b = batch_info(
            &json!({"id": "batch_1", "status": "completed", "output_file_id": null,
            "error_file_id": "", "request_counts": {"total": 3, "completed": 0, "failed": 3}}),
        )
        .unwrap();
        assert_eq!((b.output_file_id, b.error_file_id), (None, None));
        assert_eq!((b.total, b.failed), (3, 3));
        assert!(b.status.is_terminal());
    }

    #[test]
    fn validation_errors_are_read() {
        let b = batch_info(&json!({"id": "b", "status": "failed",
            "errors": {"data": [{"code": "token_limit_exceeded", "message": "too many"}]}}))
        .unwrap();
        assert_eq!(
            b.errors_text().as_deref(),
            Some("token_limit_exceeded: too many")
        );
    }

    #[test]
    fn a_batch_without_status_is_malformed() {
        assert!(matches!(
            batch_info(&json!({"id": "b"})),
            Err(ProviderError::Malformed(_))
        ));
        assert!(matches!(
            batch_info(&json!("x")),
            Err(ProviderError::Malformed(_))
        ));
    }
}
