//! The provider's batch protocol behind one small trait. The worker speaks only
//! [`BatchProvider`]; a second provider is a new module implementing it.

pub mod openai;
pub mod redact;

use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// Where a provider call went wrong, sorted by what the worker should do about it.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// Rate limits, server errors, timeouts, dropped connections: try again later.
    #[error("{message}")]
    Transient {
        message: String,
        retry_after: Option<Duration>,
    },
    /// The provider refused the call (a 4xx other than rate limiting).
    #[error("HTTP {status}: {message}")]
    Rejected { status: u16, message: String },
    /// The provider answered something that does not follow the protocol.
    #[error("malformed provider response: {0}")]
    Malformed(String),
    /// A local file could not be read or written.
    #[error("local file error: {0}")]
    Local(String),
    /// A statement of the worker's own failed (the batch's step is tried again later).
    #[error("{0}")]
    Database(String),
}

impl ProviderError {
    /// Whether the same call may succeed later without anything changing on our side.
    /// Authentication and permission failures count: an operator fixes the key, and the
    /// requests must still be there when they do.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Transient { .. }
            | ProviderError::Malformed(_)
            | ProviderError::Local(_)
            | ProviderError::Database(_) => true,
            ProviderError::Rejected { status, .. } => matches!(status, 401 | 403),
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

pub type ProviderResult<T> = Result<T, ProviderError>;

/// A batch's status at the provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchStatus {
    Validating,
    InProgress,
    Finalizing,
    Completed,
    Failed,
    Expired,
    Cancelling,
    Cancelled,
    Other(String),
}

impl BatchStatus {
    pub fn parse(s: &str) -> BatchStatus {
        match s {
            "validating" => BatchStatus::Validating,
            "in_progress" => BatchStatus::InProgress,
            "finalizing" => BatchStatus::Finalizing,
            "completed" => BatchStatus::Completed,
            "failed" => BatchStatus::Failed,
            "expired" => BatchStatus::Expired,
            "cancelling" => BatchStatus::Cancelling,
            "cancelled" => BatchStatus::Cancelled,
            other => BatchStatus::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            BatchStatus::Validating => "validating",
            BatchStatus::InProgress => "in_progress",
            BatchStatus::Finalizing => "finalizing",
            BatchStatus::Completed => "completed",
            BatchStatus::Failed => "failed",
            BatchStatus::Expired => "expired",
            BatchStatus::Cancelling => "cancelling",
            BatchStatus::Cancelled => "cancelled",
            BatchStatus::Other(s) => s,
        }
    }

    /// Whether the batch has ended and its files can be read.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            BatchStatus::Completed
                | BatchStatus::Failed
                | BatchStatus::Expired
                | BatchStatus::Cancelled
        )
    }
}

/// One entry of a batch's `errors` list (validation failures).
#[derive(Clone, Debug, PartialEq)]
pub struct BatchError {
    pub code: String,
    pub message: String,
}

/// What the worker needs to know about a batch at the provider.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchInfo {
    pub id: String,
    pub status: BatchStatus,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub total: i64,
    pub completed: i64,
    pub failed: i64,
    pub errors: Vec<BatchError>,
    pub metadata: serde_json::Map<String, Value>,
    pub input_tokens: Option<i64>,
    pub cached_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub reasoning_tokens: Option<i64>,
}

/// A page of the provider's batch list, newest first.
#[derive(Debug)]
pub struct BatchPage {
    pub batches: Vec<BatchInfo>,
    pub has_more: bool,
}

/// The request to create a batch.
#[derive(Debug)]
pub struct NewBatch<'a> {
    pub input_file_id: &'a str,
    pub endpoint: &'a str,
    /// Our own tags, so a batch created just before a crash can be found again.
    pub metadata: Vec<(&'a str, String)>,
}

/// The operations of a provider's batch API.
pub trait BatchProvider {
    /// Uploads a JSONL input file, streamed from disk; returns the provider's file id.
    fn upload_batch_file(&self, path: &Path, filename: &str) -> ProviderResult<String>;
    fn create_batch(&self, batch: &NewBatch<'_>) -> ProviderResult<BatchInfo>;
    fn get_batch(&self, id: &str) -> ProviderResult<BatchInfo>;
    /// One page of batches, newest first, starting after the batch `after`.
    fn list_batches(&self, after: Option<&str>, limit: u32) -> ProviderResult<BatchPage>;
    fn cancel_batch(&self, id: &str) -> ProviderResult<BatchInfo>;
    /// Streams a file's content to `dest`; returns the number of bytes written.
    fn download_file(&self, id: &str, dest: &Path) -> ProviderResult<u64>;
    fn delete_file(&self, id: &str) -> ProviderResult<()>;
}

fn non_empty_string(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

impl BatchInfo {
    /// Reads a batch object. `error_file_id` and `output_file_id` given as `""` mean no file.
    pub fn from_json(v: &Value) -> ProviderResult<BatchInfo> {
        let malformed =
            |what: &str| ProviderError::Malformed(format!("batch object without {what}"));
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

    /// The validation errors as one line of text.
    pub fn errors_text(&self) -> Option<String> {
        (!self.errors.is_empty()).then(|| {
            self.errors
                .iter()
                .map(|e| format!("{}: {}", e.code, e.message))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn empty_file_ids_mean_no_file() {
        let b = BatchInfo::from_json(
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
        let b = BatchInfo::from_json(&json!({"id": "b", "status": "failed",
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
            BatchInfo::from_json(&json!({"id": "b"})),
            Err(ProviderError::Malformed(_))
        ));
        assert!(matches!(
            BatchInfo::from_json(&json!("x")),
            Err(ProviderError::Malformed(_))
        ));
    }
}
