//! Every batch provider behind one boundary. The worker, the planner and the state tables speak
//! only the terms defined here: a [`Kind`] of provider says what it accepts and how its files
//! read (no connection needed: submit-time checks and the worker's reading of result lines use
//! it), and a [`BatchProvider`] is a connection to one server of that kind (stage the input,
//! create, poll, cancel, read the results back, clean up). Each protocol lives in its own
//! module; a new one is new files plus its line in [`KINDS`].
//!
//! Providers are configured the way PostgreSQL keeps credentials for outside services: each is a
//! foreign server of the `llmbatching` wrapper (`kind`, `api_base` and the kind's own options),
//! and its keys are user mappings (see `servers`).

pub mod anthropic;
mod http;
pub mod openai;
pub mod redact;
pub mod servers;

use crate::planner::BatchLimits;
use crate::request::Endpoint;
use crate::results::LineResult;
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Every kind of provider llmbatching speaks to, by the name `CREATE SERVER ... OPTIONS (kind
/// '...')` gives it.
pub const KINDS: &[&dyn Kind] = &[&openai::OPENAI, &openai::AZURE, &anthropic::ANTHROPIC];

/// The kind of the given name.
pub fn kind(name: &str) -> Option<&'static dyn Kind> {
    KINDS.iter().copied().find(|k| k.name() == name)
}

/// A kind of provider: what it accepts and how its batch files read. Pure: no connection.
pub trait Kind: Sync + std::panic::RefUnwindSafe {
    /// Its name in a server's `kind` option.
    fn name(&self) -> &'static str;
    /// Where its API is when the server's `api_base` does not say.
    fn default_api_base(&self) -> Option<&'static str>;
    /// Server options it reads besides `kind` and `api_base` (the validator refuses others).
    fn server_options(&self) -> &'static [&'static str] {
        &[]
    }
    /// The endpoints it batches; the first is the default of the submit functions.
    fn endpoints(&self) -> &'static [Endpoint];
    /// Most requests and bytes one batch may carry.
    fn limits(&self) -> BatchLimits;
    /// Whether its batches carry our tags, by which a batch whose create answer was lost is
    /// found again for sure. Without them, creates under one key go one at a time, and none
    /// while an earlier one is in doubt (see `BatchProvider::find_created`).
    fn tags_batches(&self) -> bool {
        true
    }
    /// One line of a batch's staged input file: the request `body_json` under `custom_id`.
    fn input_line(
        &self,
        custom_id: &str,
        endpoint: Endpoint,
        body_json: &str,
    ) -> Result<String, serde_json::Error>;
    /// Reads one result line. `Err`: the line names no request llmbatching sent (its text is
    /// logged); a line that names one but cannot be read is [`crate::results::Outcome::Unreadable`].
    fn parse_result_line(&self, endpoint: Endpoint, line: &str) -> Result<LineResult, String>;
    /// A connection to a server of this kind.
    fn connect(&self, server: &Server) -> ProviderResult<SharedProvider>;
}

/// One configured provider, as the worker connects to it: a server's options and the key of
/// the user mapping its requests were queued under.
pub struct Server {
    pub api_base: String,
    pub api_key: String,
    /// The kind's own options (see [`Kind::server_options`]).
    pub options: std::collections::BTreeMap<String, String>,
    /// A call fails when no byte of it arrives for this long.
    pub idle_timeout: Duration,
    /// Asked every fraction of a second while a call waits: true ends it.
    pub should_stop: fn() -> bool,
}

impl Server {
    pub fn option(&self, name: &str) -> Option<&str> {
        self.options.get(name).map(String::as_str)
    }
}

/// A connection to a provider, shared by the transfers under way.
pub type SharedProvider = Arc<dyn BatchProvider + Send + Sync>;

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
    /// A batch's answers were read, but this many requests their roles hold locked could not
    /// take theirs: the files are read again for them, however late (their answers are there).
    #[error("{0} requests were held locked by their own role; the files are read again for them")]
    Held(usize),
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
            | ProviderError::Database(_)
            | ProviderError::Held(_) => true,
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

impl BatchInfo {
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

/// The request to create a batch.
#[derive(Debug)]
pub struct NewBatch<'a> {
    /// The staged input file's id, for providers that stage it.
    pub input_file_id: Option<&'a str>,
    /// The input file itself, for providers that take the requests with the create call.
    pub input_path: Option<&'a Path>,
    pub endpoint: Endpoint,
    /// Our own tags, so a batch created just before a crash can be found again.
    pub metadata: Vec<(&'a str, String)>,
    /// How many requests it carries.
    pub request_count: i64,
    /// When the first create call may have gone out (Unix seconds), for providers that find a
    /// lost batch by its time and size.
    pub attempted_at: Option<i64>,
    /// Provider batch ids other batches here already hold: never this batch's.
    pub taken: &'a [String],
}

/// The operations of a provider's batch API, in the worker's terms.
pub trait BatchProvider {
    /// Puts a batch's input file (JSONL of [`Kind::input_line`]s) where a batch can be created
    /// from it; returns the provider's file id, or None for a provider that takes the requests
    /// with the create call.
    fn stage_input(&self, path: &Path, filename: &str) -> ProviderResult<Option<String>>;
    fn create_batch(&self, batch: &NewBatch<'_>) -> ProviderResult<BatchInfo>;
    /// Looks among the provider's recent batches for one that an earlier create call of this
    /// batch made, its answer lost (a crash). Must never return another batch.
    fn find_created(&self, batch: &NewBatch<'_>) -> ProviderResult<Option<BatchInfo>>;
    fn get_batch(&self, id: &str) -> ProviderResult<BatchInfo>;
    fn cancel_batch(&self, id: &str) -> ProviderResult<BatchInfo>;
    /// Streams a result file (an id or an address from [`BatchInfo`]) to `dest`; returns the
    /// number of bytes written.
    fn download_results(&self, location: &str, dest: &Path) -> ProviderResult<u64>;
    /// Deletes what a finished batch left at the provider. Best effort.
    fn clean_up(&self, leftovers: &Leftovers) -> ProviderResult<()>;
}

/// What a finished batch may have left at the provider.
#[derive(Clone, Debug, Default)]
pub struct Leftovers {
    pub batch_id: Option<String>,
    pub input_file_id: Option<String>,
    pub output: Option<String>,
    pub errors: Option<String>,
}
