//! The provider's side of the protocol, without HTTP: stored files, the batch life cycle
//! driven by the clock, validation, and the output and error files a finished batch leaves.
//!
//! A batch moves `validating` → `in_progress` → `finalizing` → `completed` on a timeline set by
//! [`Config`]. It ends `failed` when validation finds a fault (nothing runs), `expired` when the
//! emulator was told to expire it (part of it runs, the rest is reported `batch_expired`), and
//! `cancelling` → `cancelled` after a cancel (what ran before the cancel is delivered).
//! The state is computed lazily from the clock whenever a batch is looked at.

use crate::answers::{run_request, LineResult, GARBLE_MARKER, TRUNCATE_MARKER};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Most requests one batch may hold, as the real provider enforces.
pub const MAX_REQUESTS_PER_BATCH: usize = 50_000;
/// Largest input file, in bytes.
pub const MAX_FILE_BYTES: usize = 200 * 1024 * 1024;

/// How the emulator behaves; every field can be changed while it runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Time a new batch spends in `validating`.
    pub validating_ms: u64,
    /// Time a batch spends in `in_progress`; its request counts grow over it.
    pub in_progress_ms: u64,
    /// Time a batch spends in `finalizing`.
    pub finalizing_ms: u64,
    /// Time a cancelled batch spends in `cancelling`.
    pub cancelling_ms: u64,
    /// The next this-many batches created will expire instead of completing.
    pub expire_next: u32,
    /// The share of an expiring batch's requests that run before it expires.
    pub expire_fraction: f64,
    /// Report a missing error file as `""` instead of `null`, as some deployments do.
    pub empty_error_file_id_as_string: bool,
    /// A per-model cap on prompt tokens enqueued across open batches; a batch that would pass
    /// it fails validation with `token_limit_exceeded`. None: no cap.
    pub enqueued_token_limit: Option<u64>,
    /// If set, requests must carry `Authorization: Bearer <this>`; otherwise any key is accepted.
    pub api_key: Option<String>,
    /// The next this-many batch lookups (`GET /v1/batches/{id}`) answer truncated JSON.
    pub malformed_polls: u32,
    /// The next this-many uploads (`POST /v1/files`) and batch creations (`POST /v1/batches`)
    /// are refused with status 400 and an error whose message echoes the request's credentials
    /// (see [`crate::echoed_credentials_message`]), as some OpenAI-compatible services do.
    /// Each refusal counts in [`Stats::faults_injected`].
    pub echo_authorization: u32,
    /// The first this-many lookups of each completed batch report it `completed` with no
    /// output or error file yet and zero request counts, as the real provider sometimes does
    /// while it finishes writing the files.
    pub late_output_polls: u32,
    /// For this long after a file is written (a batch's output or error file), downloading its
    /// content fails: 404 "No such File object", or, with `content_outage_html`, status 200 with
    /// an HTML error page. Each such answer counts in [`Stats::faults_injected`].
    pub content_outage_ms: u64,
    pub content_outage_html: bool,
    /// Result files that contradict themselves: every answered request also gets a retryable
    /// error line (status 500) in the error file, the first answer is repeated at the end of the
    /// output, and the error file names a request that is in no batch.
    pub noisy_results: bool,
    /// Share of lines that fail at random with `line_failure_status` (a server error by default).
    pub line_failure_rate: f64,
    pub line_failure_status: u16,
    /// Faults of the HTTP calls, by operation: `upload`, `create`, `get`, `list`, `cancel`,
    /// `content`, `file`, `delete`.
    pub faults: BTreeMap<String, Fault>,
}

/// Faults injected into one kind of HTTP call; each rate is a share of calls, drawn per call.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Fault {
    /// Answer with an error before doing anything.
    pub error_rate: f64,
    /// The statuses such errors use, picked at random (default: 500).
    pub statuses: Vec<u16>,
    /// `Retry-After` seconds sent with those errors.
    pub retry_after: Option<u64>,
    /// Do the work, then drop the connection instead of answering.
    pub drop_rate: f64,
    /// Do the work, then send only the first half of the answer.
    pub truncate_rate: f64,
    /// Do the work, then send the first half of the answer and go silent: the connection stays
    /// open and no more bytes come (until `stall_ms` has passed, then it drops).
    pub stall_rate: f64,
    /// How long a stalled answer stays silent before its connection drops (default 10 minutes).
    pub stall_ms: Option<u64>,
    /// The next this-many calls stall as `stall_rate` describes, whatever the rate.
    pub stall_next: u32,
    /// Added latency, in milliseconds.
    pub delay_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            validating_ms: 100,
            in_progress_ms: 300,
            finalizing_ms: 100,
            cancelling_ms: 100,
            expire_next: 0,
            expire_fraction: 0.5,
            empty_error_file_id_as_string: false,
            enqueued_token_limit: None,
            api_key: None,
            malformed_polls: 0,
            echo_authorization: 0,
            late_output_polls: 0,
            content_outage_ms: 0,
            content_outage_html: false,
            noisy_results: false,
            line_failure_rate: 0.0,
            line_failure_status: 500,
            faults: BTreeMap::new(),
        }
    }
}

/// What the emulator saw, for tests to assert on.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    pub files_uploaded: u64,
    pub files_deleted: u64,
    pub batches_created: u64,
    /// Anthropic batches deleted (their results go with them).
    pub batches_deleted: u64,
    /// Batch creations by the key they were made with (whoever is billed for them).
    pub creates_per_key: BTreeMap<String, u64>,
    pub faults_injected: u64,
    /// The most batches open (not yet ended) at once.
    pub max_open_batches: u64,
    /// For each custom_id, how many batches answered it: the runs that are billed.
    pub runs_per_custom_id: BTreeMap<String, u32>,
}

impl Stats {
    /// The custom_ids that ran in more than one batch.
    pub fn ran_more_than_once(&self) -> Vec<String> {
        self.runs_per_custom_id
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(id, _)| id.clone())
            .collect()
    }
}

pub struct StoredFile {
    pub id: String,
    pub filename: String,
    pub purpose: String,
    pub created_at: u64,
    pub bytes: Vec<u8>,
    /// When it was written, for [`Config::content_outage_ms`].
    pub stored: Instant,
}

impl StoredFile {
    pub fn object(&self) -> Value {
        json!({"id": self.id, "object": "file", "bytes": self.bytes.len(), "created_at": self.created_at,
               "filename": self.filename, "purpose": self.purpose, "status": "processed",
               "expires_at": self.created_at + 30 * 86_400})
    }
}

struct InputLine {
    custom_id: String,
    body: Value,
}

/// The protocol a batch was created through, which decides the shape of its results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    OpenAi,
    /// Anthropic's Message Batches: requests inline, one results file behind `results_url`.
    Anthropic,
}

pub struct Batch {
    id: String,
    protocol: Protocol,
    endpoint: String,
    input_file_id: String,
    completion_window: String,
    metadata: Value,
    model: Option<String>,
    started: Instant,
    created_at: u64,
    lines: Vec<InputLine>,
    validation_errors: Vec<Value>,
    expire_fraction: Option<f64>,
    cancel_requested: Option<(Instant, u64)>,
    status: &'static str,
    times: BTreeMap<&'static str, u64>,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    counts: (usize, usize),
    usage: Option<Value>,
    prompt_tokens: u64,
    /// Lookups answered since it completed, for [`Config::late_output_polls`].
    polls_after_end: u32,
    /// Anthropic's request counts once it ended: succeeded, errored, canceled, expired.
    result_types: [usize; 4],
}

/// Error answered to an API call: status code and OpenAI-shaped error body.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            code: None,
        }
    }
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": "invalid_request_error",
                         "param": null, "code": self.code}})
    }
}

#[derive(Default)]
pub struct Provider {
    pub config: Config,
    pub stats: Stats,
    files: HashMap<String, StoredFile>,
    batches: Vec<Batch>,
    next_id: u64,
    /// Where Anthropic's API is served (`.../anthropic/v1`), for the batches' `results_url`.
    pub anthropic_base: String,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn unix_at(base: u64, since_start: Duration) -> u64 {
    base + since_start.as_secs()
}

impl Provider {
    pub fn new(config: Config) -> Self {
        Provider {
            config,
            ..Default::default()
        }
    }

    fn new_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}-{:06}{:08x}", self.next_id, rand::random::<u32>())
    }

    fn store_file(&mut self, filename: String, purpose: &str, bytes: Vec<u8>) -> String {
        let id = self.new_id("file");
        let file = StoredFile {
            id: id.clone(),
            filename,
            purpose: purpose.into(),
            created_at: unix_now(),
            bytes,
            stored: Instant::now(),
        };
        self.files.insert(id.clone(), file);
        id
    }

    pub fn upload(
        &mut self,
        filename: &str,
        purpose: &str,
        bytes: Vec<u8>,
    ) -> Result<Value, ApiError> {
        if purpose != "batch" {
            return Err(ApiError::new(
                400,
                format!("Invalid purpose '{purpose}' for this emulator"),
            ));
        }
        if !filename.ends_with(".jsonl") {
            return Err(ApiError::new(
                400,
                "Batch input files must have the .jsonl extension",
            ));
        }
        if bytes.starts_with(&[0xEF, 0xBB, 0xBF]) {
            return Err(ApiError::new(
                400,
                "The file starts with a byte-order mark; upload UTF-8 without BOM",
            ));
        }
        if bytes.len() > MAX_FILE_BYTES {
            return Err(ApiError::new(
                413,
                "File exceeds the 200 MB limit for batch input",
            ));
        }
        self.stats.files_uploaded += 1;
        let id = self.store_file(filename.into(), purpose, bytes);
        Ok(self.files[&id].object())
    }

    pub fn file(&self, id: &str) -> Result<&StoredFile, ApiError> {
        self.files
            .get(id)
            .ok_or_else(|| ApiError::new(404, format!("No such File object: {id}")))
    }

    pub fn delete_file(&mut self, id: &str) -> Result<Value, ApiError> {
        self.files
            .remove(id)
            .ok_or_else(|| ApiError::new(404, format!("No such File object: {id}")))?;
        self.stats.files_deleted += 1;
        Ok(json!({"id": id, "object": "file", "deleted": true}))
    }

    pub fn create_batch(&mut self, request: &Value) -> Result<Value, ApiError> {
        let field = |name: &str| request.get(name).and_then(Value::as_str).map(str::to_owned);
        let input_file_id =
            field("input_file_id").ok_or_else(|| ApiError::new(400, "Missing input_file_id"))?;
        let endpoint = field("endpoint").ok_or_else(|| ApiError::new(400, "Missing endpoint"))?;
        let completion_window = field("completion_window").unwrap_or_default();
        if completion_window != "24h" {
            return Err(ApiError::new(400, "completion_window must be '24h'"));
        }
        const ENDPOINTS: [&str; 5] = [
            "/v1/responses",
            "/v1/chat/completions",
            "/v1/embeddings",
            "/v1/completions",
            "/v1/moderations",
        ];
        // Azure OpenAI names the endpoints without the version: "/chat/completions".
        let versioned = if endpoint.starts_with("/v1/") {
            endpoint.clone()
        } else {
            format!("/v1{endpoint}")
        };
        if !ENDPOINTS.contains(&versioned.as_str()) {
            return Err(ApiError::new(
                400,
                format!("Unsupported endpoint '{endpoint}'"),
            ));
        }
        let metadata = request.get("metadata").cloned().unwrap_or(Value::Null);
        check_metadata(&metadata)?;
        let content = self.file(&input_file_id)?.bytes.clone();
        let (lines, validation_errors, model) = validate(&content, &endpoint);
        let prompt_tokens = lines
            .iter()
            .map(|l| (l.body.to_string().len() as u64).div_ceil(4))
            .sum();

        let expire_fraction = if self.config.expire_next > 0 {
            self.config.expire_next -= 1;
            Some(self.config.expire_fraction)
        } else {
            None
        };
        let mut batch = Batch {
            id: self.new_id("batch"),
            protocol: Protocol::OpenAi,
            endpoint,
            input_file_id,
            completion_window,
            metadata,
            model,
            started: Instant::now(),
            created_at: unix_now(),
            lines,
            validation_errors,
            expire_fraction,
            cancel_requested: None,
            status: "validating",
            times: BTreeMap::new(),
            output_file_id: None,
            error_file_id: None,
            counts: (0, 0),
            usage: None,
            prompt_tokens,
            polls_after_end: 0,
            result_types: [0; 4],
        };
        if batch.validation_errors.is_empty() {
            if let Some(limit) = self.config.enqueued_token_limit {
                if self.enqueued_tokens(batch.model.as_deref()) + batch.prompt_tokens > limit {
                    batch.validation_errors.push(json!({"code": "token_limit_exceeded", "line": null, "param": null,
                        "message": format!("Enqueued token limit reached for {}. Limit: {limit} enqueued tokens.",
                                           batch.model.as_deref().unwrap_or("this model"))}));
                }
            }
        }
        self.stats.batches_created += 1;
        let object = batch.object(&self.config);
        self.batches.push(batch);
        self.advance();
        let open = self.batches.iter().filter(|b| !b.is_terminal()).count() as u64;
        self.stats.max_open_batches = self.stats.max_open_batches.max(open);
        Ok(object)
    }

    /// Prompt tokens of the batches of `model` that are still open (not yet ended).
    fn enqueued_tokens(&self, model: Option<&str>) -> u64 {
        self.batches
            .iter()
            .filter(|b| {
                b.model.as_deref() == model && !b.is_terminal() && b.validation_errors.is_empty()
            })
            .map(|b| b.prompt_tokens)
            .sum()
    }

    fn batch_index(&self, id: &str) -> Result<usize, ApiError> {
        self.batches
            .iter()
            .position(|b| b.id == id)
            .ok_or_else(|| ApiError::new(404, format!("No such Batch object: {id}")))
    }

    /// Brings every batch's state up to the present.
    pub fn advance(&mut self) {
        let now = Instant::now();
        for i in 0..self.batches.len() {
            if let Some(ended) = self.batches[i].advance(now, &self.config) {
                self.finish(i, ended);
            }
        }
    }

    pub fn get_batch(&mut self, id: &str) -> Result<Value, ApiError> {
        self.advance();
        let i = self.batch_index(id)?;
        let mut object = self.batches[i].object(&self.config);
        let batch = &mut self.batches[i];
        if batch.status == "completed" && batch.polls_after_end < self.config.late_output_polls {
            batch.polls_after_end += 1;
            self.stats.faults_injected += 1;
            object["output_file_id"] = Value::Null;
            object["error_file_id"] = Value::Null;
            object["request_counts"]["completed"] = json!(0);
            object["request_counts"]["failed"] = json!(0);
        }
        Ok(object)
    }

    /// A file's content, unless [`Config::content_outage_ms`] says the files endpoint is down
    /// for it: then the error (or, with `content_outage_html`, the HTML page) to answer instead.
    pub fn file_content(&mut self, id: &str) -> Result<Result<Vec<u8>, String>, ApiError> {
        let outage = std::time::Duration::from_millis(self.config.content_outage_ms);
        let html = self.config.content_outage_html;
        let file = self.file(id)?;
        if file.stored.elapsed() >= outage {
            return Ok(Ok(file.bytes.clone()));
        }
        self.stats.faults_injected += 1;
        if html {
            return Ok(Err(
                "<html><body><h1>502 Bad Gateway</h1></body></html>".into()
            ));
        }
        Err(ApiError::new(404, format!("No such File object: {id}")))
    }

    pub fn cancel_batch(&mut self, id: &str) -> Result<Value, ApiError> {
        self.advance();
        let i = self.batch_index(id)?;
        let batch = &mut self.batches[i];
        match batch.status {
            "validating" | "in_progress" | "finalizing" => {
                let ran = batch.lines_done(Instant::now(), &self.config);
                batch.cancel_requested = Some((Instant::now(), ran as u64));
                batch.status = "cancelling";
                batch.times.insert("cancelling_at", unix_now());
            }
            "cancelling" => {}
            other => {
                return Err(ApiError::new(
                    409,
                    format!("Cannot cancel a batch with status '{other}'"),
                ))
            }
        }
        Ok(batch.object(&self.config))
    }

    pub fn list_batches(&mut self, after: Option<&str>, limit: usize) -> Result<Value, ApiError> {
        self.advance();
        let newest_first: Vec<&Batch> = self.batches.iter().rev().collect();
        let start = match after {
            Some(id) => newest_first
                .iter()
                .position(|b| b.id == id)
                .map(|p| p + 1)
                .unwrap_or(newest_first.len()),
            None => 0,
        };
        let page: Vec<Value> = newest_first
            .iter()
            .skip(start)
            .take(limit)
            .map(|b| b.object(&self.config))
            .collect();
        let has_more = start + page.len() < newest_first.len();
        Ok(json!({"object": "list",
                  "first_id": page.first().map(|b| b["id"].clone()),
                  "last_id": page.last().map(|b| b["id"].clone()),
                  "has_more": has_more, "data": page}))
    }

    /// Runs the first `ran` requests of batch `i`, writes its output and error files and sets
    /// its final status.
    fn finish(&mut self, i: usize, ended: Ending) {
        let endpoint = match self.batches[i].endpoint.clone() {
            e if e.starts_with("/v1/") => e,
            e => format!("/v1{e}"),
        };
        let (line_failure_rate, line_failure_status) = (
            self.config.line_failure_rate,
            self.config.line_failure_status,
        );
        let (status, ran, not_run_code, not_run_message) = match ended {
            Ending::Completed => ("completed", usize::MAX, "", ""),
            Ending::Expired(ran) => (
                "expired",
                ran,
                "batch_expired",
                "This request could not be executed before the completion window expired.",
            ),
            Ending::Cancelled(ran) => (
                "cancelled",
                ran,
                "batch_cancelled",
                "This request was not executed because the batch was cancelled.",
            ),
        };
        let protocol = self.batches[i].protocol;
        let mut output = Vec::new();
        let mut errors = Vec::new();
        let (mut input_tokens, mut output_tokens, mut cached_tokens, mut reasoning_tokens) =
            (0u64, 0u64, 0u64, 0u64);
        for (n, line) in self.batches[i].lines.iter().enumerate() {
            let seq = self.next_id + n as u64;
            let request_id = format!("batch_req_{seq:012}");
            if n >= ran && protocol == Protocol::Anthropic {
                let kind = if not_run_code == "batch_expired" {
                    "expired"
                } else {
                    "canceled"
                };
                errors.push(json!({"custom_id": line.custom_id, "result": {"type": kind}}));
                continue;
            }
            if n >= ran {
                errors.push(
                    json!({"id": request_id, "custom_id": line.custom_id, "response": null,
                                   "error": {"code": not_run_code, "message": not_run_message}}),
                );
                continue;
            }
            let outcome = if rand::random::<f64>() < line_failure_rate {
                LineResult::Rejected {
                    status: line_failure_status,
                    body: json!({"error": {
                    "message": "Emulated transient failure", "type": "server_error", "param": null, "code": null}}),
                }
            } else {
                run_request(&endpoint, &line.custom_id, &line.body, seq)
            };
            match outcome {
                LineResult::Ok(body) if protocol == Protocol::Anthropic => {
                    *self.stats.runs_per_custom_id.entry(line.custom_id.clone()).or_default() += 1;
                    output.push(json!({"custom_id": line.custom_id,
                                       "result": {"type": "succeeded", "message": body}}));
                }
                LineResult::Rejected { status, body } if protocol == Protocol::Anthropic => {
                    let kind = if status >= 500 { "api_error" } else { "invalid_request_error" };
                    errors.push(json!({"custom_id": line.custom_id, "result": {"type": "errored",
                        "error": {"type": "error", "error": {"type": kind,
                                  "message": body.pointer("/error/message").cloned().unwrap_or_default()}}}}));
                }
                LineResult::Ok(body) => {
                    *self.stats.runs_per_custom_id.entry(line.custom_id.clone()).or_default() += 1;
                    let usage = &body["usage"];
                    input_tokens += usage["input_tokens"].as_u64().or(usage["prompt_tokens"].as_u64()).unwrap_or(0);
                    output_tokens +=
                        usage["output_tokens"].as_u64().or(usage["completion_tokens"].as_u64()).unwrap_or(0);
                    cached_tokens += usage["input_tokens_details"]["cached_tokens"].as_u64()
                        .or(usage["prompt_tokens_details"]["cached_tokens"].as_u64()).unwrap_or(0);
                    reasoning_tokens += usage["output_tokens_details"]["reasoning_tokens"].as_u64()
                        .or(usage["completion_tokens_details"]["reasoning_tokens"].as_u64()).unwrap_or(0);
                    output.push(json!({"id": request_id, "custom_id": line.custom_id, "error": null,
                        "response": {"status_code": 200, "request_id": format!("req_{seq:012}"), "body": body}}));
                }
                LineResult::Rejected { status, body } => errors.push(json!({"id": request_id,
                    "custom_id": line.custom_id, "error": null,
                    "response": {"status_code": status, "request_id": format!("req_{seq:012}"), "body": body}})),
            }
        }
        self.next_id += self.batches[i].lines.len() as u64;
        if self.config.noisy_results && protocol == Protocol::Anthropic {
            self.stats.faults_injected += 1;
            for answered in &output {
                errors.push(json!({"custom_id": answered["custom_id"], "result": {"type": "errored",
                    "error": {"type": "error", "error": {"type": "api_error", "message": "Emulated contradicting failure"}}}}));
            }
            errors.push(json!({"custom_id": "987654321", "result": {"type": "errored",
                "error": {"type": "error", "error": {"type": "api_error", "message": "a request of no batch"}}}}));
            if let Some(first) = output.first().cloned() {
                output.push(first);
            }
        } else if self.config.noisy_results {
            self.stats.faults_injected += 1;
            for answered in &output {
                errors.push(json!({"id": answered["id"], "custom_id": answered["custom_id"], "error": null,
                    "response": {"status_code": 500, "request_id": "req_noise", "body": {"error": {
                        "message": "Emulated contradicting failure", "type": "server_error", "param": null, "code": null}}}}));
            }
            errors.push(json!({"id": "batch_req_unknown", "custom_id": "987654321", "response": null,
                               "error": {"code": "server_error", "message": "a request of no batch"}}));
            if let Some(first) = output.first().cloned() {
                output.push(first);
            }
        }
        let mut output: Vec<String> = output.iter().map(|l| mangle(l, protocol)).collect();
        let mut errors: Vec<String> = errors.iter().map(|l| mangle(l, protocol)).collect();
        let counted = (output.len(), errors.len());
        let result_types = ["succeeded", "errored", "canceled", "expired"].map(|kind| {
            output
                .iter()
                .chain(&errors)
                .filter(|l| l.contains(&format!("\"type\":\"{kind}\"")))
                .count()
        });
        if protocol == Protocol::Anthropic {
            // One results file, behind the batch's results_url.
            output.append(&mut errors);
        }
        // The provider writes results in the order they finish, not the input order.
        let mut rng = rand::rng();
        output.shuffle(&mut rng);
        errors.shuffle(&mut rng);
        let batch_id = self.batches[i].id.clone();
        let output_file_id = (!output.is_empty()).then(|| {
            self.store_file(
                format!("{batch_id}_output.jsonl"),
                "batch_output",
                to_jsonl(&output),
            )
        });
        let error_file_id = (!errors.is_empty()).then(|| {
            self.store_file(
                format!("{batch_id}_error.jsonl"),
                "batch_output",
                to_jsonl(&errors),
            )
        });
        let batch = &mut self.batches[i];
        batch.status = status;
        batch.times.insert(
            status_time_field(status),
            unix_at(batch.created_at, batch.started.elapsed()),
        );
        batch.output_file_id = output_file_id;
        batch.error_file_id = error_file_id;
        batch.counts = counted;
        batch.result_types = result_types;
        batch.usage = Some(
            json!({"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached_tokens},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": input_tokens + output_tokens}),
        );
    }
}

/// Most requests of one Anthropic message batch, and its largest size.
pub const ANTHROPIC_MAX_REQUESTS: usize = 100_000;
pub const ANTHROPIC_MAX_BYTES: usize = 256 * 1024 * 1024;

/// Whether a custom_id is one Anthropic accepts.
fn valid_anthropic_custom_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Unix seconds as RFC 3339 (UTC), as Anthropic writes its times.
pub fn rfc3339(unix: u64) -> String {
    let (days, secs) = ((unix / 86_400) as i64, unix % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

impl Provider {
    /// Anthropic: creates a message batch from inline requests. A bad request refuses the
    /// whole call (400), as Anthropic checks requests when the batch is created.
    pub fn create_message_batch(
        &mut self,
        request: &Value,
        size: usize,
    ) -> Result<Value, ApiError> {
        let requests = request
            .get("requests")
            .and_then(Value::as_array)
            .ok_or_else(|| ApiError::new(400, "requests: Field required"))?;
        if requests.is_empty() || requests.len() > ANTHROPIC_MAX_REQUESTS {
            return Err(ApiError::new(
                400,
                format!("requests: a batch holds 1 to {ANTHROPIC_MAX_REQUESTS} requests"),
            ));
        }
        if size > ANTHROPIC_MAX_BYTES {
            return Err(ApiError::new(
                413,
                "Request exceeds the maximum size of 256 MB",
            ));
        }
        let mut seen = HashSet::new();
        let mut lines = Vec::with_capacity(requests.len());
        for (n, item) in requests.iter().enumerate() {
            let custom_id = item
                .get("custom_id")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !valid_anthropic_custom_id(custom_id) {
                return Err(ApiError::new(400, format!("requests.{n}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'")));
            }
            if !seen.insert(custom_id.to_owned()) {
                return Err(ApiError::new(
                    400,
                    format!("requests.{n}.custom_id: duplicate custom_id '{custom_id}'"),
                ));
            }
            let params = item.get("params").cloned().unwrap_or(Value::Null);
            for field in ["model", "max_tokens", "messages"] {
                if params.get(field).is_none() {
                    return Err(ApiError::new(
                        400,
                        format!("requests.{n}.params.{field}: Field required"),
                    ));
                }
            }
            if params.get("stream").and_then(Value::as_bool) == Some(true) {
                return Err(ApiError::new(
                    400,
                    format!("requests.{n}.params.stream: streaming is not supported in batches"),
                ));
            }
            lines.push(InputLine {
                custom_id: custom_id.to_owned(),
                body: params,
            });
        }
        let model = lines
            .first()
            .and_then(|l| l.body.get("model"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let prompt_tokens = lines
            .iter()
            .map(|l| (l.body.to_string().len() as u64).div_ceil(4))
            .sum();
        let expire_fraction = if self.config.expire_next > 0 {
            self.config.expire_next -= 1;
            Some(self.config.expire_fraction)
        } else {
            None
        };
        let batch = Batch {
            id: format!(
                "msgbatch_{:06}{:08x}",
                {
                    self.next_id += 1;
                    self.next_id
                },
                rand::random::<u32>()
            ),
            protocol: Protocol::Anthropic,
            endpoint: "/v1/messages".into(),
            input_file_id: String::new(),
            completion_window: "24h".into(),
            metadata: Value::Null,
            model,
            started: Instant::now(),
            created_at: unix_now(),
            lines,
            validation_errors: Vec::new(),
            expire_fraction,
            cancel_requested: None,
            status: "validating",
            times: BTreeMap::new(),
            output_file_id: None,
            error_file_id: None,
            counts: (0, 0),
            usage: None,
            prompt_tokens,
            polls_after_end: 0,
            result_types: [0; 4],
        };
        self.stats.batches_created += 1;
        let object = batch.anthropic_object(&self.anthropic_base);
        self.batches.push(batch);
        self.advance();
        let open = self.batches.iter().filter(|b| !b.is_terminal()).count() as u64;
        self.stats.max_open_batches = self.stats.max_open_batches.max(open);
        Ok(object)
    }

    fn message_batch_index(&self, id: &str) -> Result<usize, ApiError> {
        self.batches
            .iter()
            .position(|b| b.id == id && b.protocol == Protocol::Anthropic)
            .ok_or_else(|| ApiError::new(404, format!("message batch {id} not found")))
    }

    /// Anthropic: a message batch. With [`Config::late_output_polls`], an ended batch is first
    /// shown without its `results_url`.
    pub fn message_batch(&mut self, id: &str) -> Result<Value, ApiError> {
        self.advance();
        let i = self.message_batch_index(id)?;
        let mut object = self.batches[i].anthropic_object(&self.anthropic_base);
        let batch = &mut self.batches[i];
        if batch.is_terminal() && batch.polls_after_end < self.config.late_output_polls {
            batch.polls_after_end += 1;
            self.stats.faults_injected += 1;
            object["results_url"] = Value::Null;
        }
        Ok(object)
    }

    /// Anthropic: message batches, newest first, after `after_id`.
    pub fn list_message_batches(
        &mut self,
        after_id: Option<&str>,
        limit: usize,
    ) -> Result<Value, ApiError> {
        self.advance();
        let newest_first: Vec<&Batch> = self
            .batches
            .iter()
            .rev()
            .filter(|b| b.protocol == Protocol::Anthropic)
            .collect();
        let start = match after_id {
            Some(id) => newest_first
                .iter()
                .position(|b| b.id == id)
                .map(|p| p + 1)
                .unwrap_or(newest_first.len()),
            None => 0,
        };
        let page: Vec<Value> = newest_first
            .iter()
            .skip(start)
            .take(limit)
            .map(|b| b.anthropic_object(&self.anthropic_base))
            .collect();
        let has_more = start + page.len() < newest_first.len();
        Ok(json!({"data": page, "has_more": has_more,
                  "first_id": page.first().map(|b| b["id"].clone()),
                  "last_id": page.last().map(|b| b["id"].clone())}))
    }

    pub fn cancel_message_batch(&mut self, id: &str) -> Result<Value, ApiError> {
        self.advance();
        let i = self.message_batch_index(id)?;
        let batch = &mut self.batches[i];
        if !batch.is_terminal() && batch.cancel_requested.is_none() {
            let ran = batch.lines_done(Instant::now(), &self.config);
            batch.cancel_requested = Some((Instant::now(), ran as u64));
            batch.status = "cancelling";
            batch.times.insert("cancelling_at", unix_now());
        }
        Ok(self.batches[i].anthropic_object(&self.anthropic_base))
    }

    /// Anthropic: deletes an ended batch and its results.
    pub fn delete_message_batch(&mut self, id: &str) -> Result<Value, ApiError> {
        self.advance();
        let i = self.message_batch_index(id)?;
        if !self.batches[i].is_terminal() {
            return Err(ApiError::new(
                400,
                "Batches can only be deleted once they have ended; cancel it first",
            ));
        }
        let batch = self.batches.remove(i);
        if let Some(file) = batch.output_file_id {
            self.files.remove(&file);
        }
        self.stats.batches_deleted += 1;
        Ok(json!({"id": id, "type": "message_batch_deleted"}))
    }

    /// Anthropic: the results of an ended batch (JSONL), subject to the content faults.
    pub fn message_batch_results(&mut self, id: &str) -> Result<Result<Vec<u8>, String>, ApiError> {
        self.advance();
        let i = self.message_batch_index(id)?;
        let file = self.batches[i]
            .output_file_id
            .clone()
            .ok_or_else(|| ApiError::new(404, format!("message batch {id} has no results yet")))?;
        self.file_content(&file)
    }
}

impl Batch {
    /// The batch as Anthropic's API shows it.
    pub fn anthropic_object(&self, base: &str) -> Value {
        let ended = self.is_terminal();
        let processing_status = match self.status {
            _ if ended => "ended",
            "cancelling" => "canceling",
            _ => "in_progress",
        };
        let ended_at = self
            .times
            .iter()
            .find(|(k, _)| {
                matches!(
                    **k,
                    "completed_at" | "expired_at" | "cancelled_at" | "failed_at"
                )
            })
            .map(|(_, t)| rfc3339(*t));
        let [succeeded, errored, canceled, expired] = self.result_types;
        let processing = if ended { 0 } else { self.lines.len() };
        json!({
            "id": self.id, "type": "message_batch", "processing_status": processing_status,
            "request_counts": {"processing": processing, "succeeded": succeeded, "errored": errored,
                               "canceled": canceled, "expired": expired},
            "ended_at": ended_at, "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.created_at + 86_400), "archived_at": null,
            "cancel_initiated_at": self.times.get("cancelling_at").map(|t| rfc3339(*t)),
            "results_url": (ended && self.output_file_id.is_some())
                .then(|| format!("{base}/messages/batches/{}/results", self.id)),
        })
    }
}

fn status_time_field(status: &str) -> &'static str {
    match status {
        "completed" => "completed_at",
        "expired" => "expired_at",
        "cancelled" => "cancelled_at",
        _ => "failed_at",
    }
}

/// Serializes a result line, spoiling it as its request asked (see the markers in `answers`).
fn mangle(line: &Value, protocol: Protocol) -> String {
    let text = line.to_string();
    if text.contains(TRUNCATE_MARKER) {
        return text[..text.floor_char_boundary(text.len() / 2)].to_owned();
    }
    if text.contains(GARBLE_MARKER) {
        let mut garbled = line.clone();
        match protocol {
            Protocol::OpenAi => garbled["response"]["body"] = json!("<html>Bad Gateway</html>"),
            Protocol::Anthropic => garbled["result"]["message"] = json!("<html>Bad Gateway</html>"),
        }
        return garbled.to_string();
    }
    text
}

fn to_jsonl(lines: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in lines {
        out.extend_from_slice(line.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

fn check_metadata(metadata: &Value) -> Result<(), ApiError> {
    match metadata {
        Value::Null => Ok(()),
        Value::Object(pairs) => {
            if pairs.len() > 16 {
                return Err(ApiError::new(400, "metadata may hold at most 16 pairs"));
            }
            for (k, v) in pairs {
                let ok = k.len() <= 64 && v.as_str().is_some_and(|s| s.len() <= 512);
                if !ok {
                    return Err(ApiError::new(400, format!("Invalid metadata pair '{k}'")));
                }
            }
            Ok(())
        }
        _ => Err(ApiError::new(400, "metadata must be an object")),
    }
}

/// Checks an input file the way the provider's validation step does. Returns the parsed
/// lines, the validation errors (any error fails the whole batch) and the file's model.
fn validate(content: &[u8], endpoint: &str) -> (Vec<InputLine>, Vec<Value>, Option<String>) {
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    let mut model: Option<String> = None;
    let mut seen = HashSet::new();
    let mut error = |line: usize, code: &str, message: String| {
        errors.push(json!({"code": code, "line": line, "message": message, "param": null}))
    };
    for (n, raw) in content.split(|b| *b == b'\n').enumerate() {
        let line_no = n + 1;
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Ok(value) = serde_json::from_slice::<Value>(raw) else {
            error(
                line_no,
                "invalid_json_line",
                format!("Line {line_no} is not valid JSON."),
            );
            continue;
        };
        let custom_id = value
            .get("custom_id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if custom_id.is_empty() {
            error(
                line_no,
                "missing_required_parameter",
                format!("Line {line_no} has no custom_id."),
            );
            continue;
        }
        if !seen.insert(custom_id.clone()) {
            error(
                line_no,
                "duplicate_custom_id",
                format!("The custom_id '{custom_id}' on line {line_no} is not unique."),
            );
        }
        if value.get("method").and_then(Value::as_str) != Some("POST") {
            error(
                line_no,
                "invalid_method",
                format!("Line {line_no}: method must be POST."),
            );
        }
        if value.get("url").and_then(Value::as_str) != Some(endpoint) {
            error(
                line_no,
                "mismatched_url",
                format!("Line {line_no}: url does not match the batch endpoint {endpoint}."),
            );
        }
        let body = value.get("body").cloned().unwrap_or(Value::Null);
        if body.get("stream").and_then(Value::as_bool) == Some(true) {
            error(
                line_no,
                "invalid_request",
                format!("Line {line_no}: streaming is not supported in batches."),
            );
        }
        let line_model = body.get("model").and_then(Value::as_str).map(str::to_owned);
        match (&model, &line_model) {
            (_, None) => error(line_no, "missing_required_parameter", format!("Line {line_no} has no model.")),
            (None, Some(m)) => model = Some(m.clone()),
            (Some(first), Some(m)) if first != m => error(line_no, "mismatched_model",
                format!("Line {line_no} uses model '{m}' but the batch uses '{first}'; a batch holds one model.")),
            _ => {}
        }
        lines.push(InputLine { custom_id, body });
    }
    if lines.len() > MAX_REQUESTS_PER_BATCH {
        error(
            0,
            "too_many_requests",
            format!("A batch may hold at most {MAX_REQUESTS_PER_BATCH} requests."),
        );
    }
    if lines.is_empty() && errors.is_empty() {
        errors.push(json!({"code": "empty_file", "line": null, "message": "The input file holds no requests.", "param": null}));
    }
    (lines, errors, model)
}

enum Ending {
    Completed,
    Expired(usize),
    Cancelled(usize),
}

impl Batch {
    fn is_terminal(&self) -> bool {
        matches!(
            self.status,
            "completed" | "failed" | "expired" | "cancelled"
        )
    }

    fn phase_ends(&self, config: &Config) -> (Duration, Duration, Duration) {
        let v = Duration::from_millis(config.validating_ms);
        let p = v + Duration::from_millis(config.in_progress_ms);
        let f = p + Duration::from_millis(config.finalizing_ms);
        (v, p, f)
    }

    /// How many requests have run by `now`.
    fn lines_done(&self, now: Instant, config: &Config) -> usize {
        let (v, p, _) = self.phase_ends(config);
        let elapsed = now.duration_since(self.started);
        if elapsed <= v || !self.validation_errors.is_empty() {
            return 0;
        }
        let share = ((elapsed - v).as_secs_f64() / (p - v).as_secs_f64().max(1e-9)).min(1.0);
        let limit = self.expire_fraction.unwrap_or(1.0);
        ((self.lines.len() as f64) * share.min(limit)).floor() as usize
    }

    /// Moves the batch along its timeline; returns how it ended if it ended just now.
    fn advance(&mut self, now: Instant, config: &Config) -> Option<Ending> {
        if self.is_terminal() {
            return None;
        }
        let (v, p, f) = self.phase_ends(config);
        let elapsed = now.duration_since(self.started);
        let at = |d: Duration| unix_at(self.created_at, d);
        if let Some((asked, ran)) = self.cancel_requested {
            if now.duration_since(asked) >= Duration::from_millis(config.cancelling_ms) {
                return Some(Ending::Cancelled(ran as usize));
            }
            return None;
        }
        if elapsed < v {
            return None;
        }
        if !self.validation_errors.is_empty() {
            self.status = "failed";
            self.times.insert("failed_at", at(v));
            return None;
        }
        self.times.insert("in_progress_at", at(v));
        if elapsed < p {
            self.status = "in_progress";
            self.counts = (self.lines_done(now, config), 0);
            return None;
        }
        if let Some(share) = self.expire_fraction {
            let ran = ((self.lines.len() as f64) * share).floor() as usize;
            return Some(Ending::Expired(ran));
        }
        self.times.insert("finalizing_at", at(p));
        if elapsed < f {
            self.status = "finalizing";
            self.counts = (self.lines.len(), 0);
            return None;
        }
        Some(Ending::Completed)
    }

    pub fn object(&self, config: &Config) -> Value {
        let time = |field: &str| self.times.get(field).copied();
        let error_file_id = match (&self.error_file_id, config.empty_error_file_id_as_string) {
            (Some(id), _) => json!(id),
            (None, true) if self.is_terminal() => json!(""),
            (None, _) => Value::Null,
        };
        let errors = if self.validation_errors.is_empty() {
            Value::Null
        } else {
            json!({"object": "list", "data": self.validation_errors})
        };
        json!({
            "id": self.id, "object": "batch", "endpoint": self.endpoint, "model": self.model,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status, "output_file_id": self.output_file_id, "error_file_id": error_file_id,
            "errors": errors, "created_at": self.created_at,
            "in_progress_at": time("in_progress_at"), "expires_at": self.created_at + 86_400,
            "finalizing_at": time("finalizing_at"), "completed_at": time("completed_at"),
            "failed_at": time("failed_at"), "expired_at": time("expired_at"),
            "cancelling_at": time("cancelling_at"), "cancelled_at": time("cancelled_at"),
            "request_counts": {"total": self.lines.len(), "completed": self.counts.0, "failed": self.counts.1},
            "metadata": self.metadata, "usage": self.usage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: &str, model: &str, url: &str) -> String {
        json!({"custom_id": id, "method": "POST", "url": url, "body": {"model": model, "input": id}}).to_string()
    }

    fn provider(config: Config) -> Provider {
        Provider::new(config)
    }

    fn create(p: &mut Provider, content: String) -> String {
        let file = p.upload("in.jsonl", "batch", content.into_bytes()).unwrap();
        let b = p
            .create_batch(
                &json!({"input_file_id": file["id"], "endpoint": "/v1/responses",
                                  "completion_window": "24h", "metadata": {"k": "v"}}),
            )
            .unwrap();
        b["id"].as_str().unwrap().to_owned()
    }

    fn instant() -> Config {
        Config {
            validating_ms: 0,
            in_progress_ms: 0,
            finalizing_ms: 0,
            cancelling_ms: 0,
            ..Config::default()
        }
    }

    #[test]
    fn a_clean_batch_completes_with_every_answer() {
        let mut p = provider(instant());
        let content = format!(
            "{}\n{}\n",
            line("1", "m", "/v1/responses"),
            line("2", "m", "/v1/responses")
        );
        let id = create(&mut p, content);
        let b = p.get_batch(&id).unwrap();
        assert_eq!(b["status"], "completed");
        assert_eq!(b["request_counts"]["completed"], 2);
        assert!(b["error_file_id"].is_null());
        let out = String::from_utf8(
            p.file(b["output_file_id"].as_str().unwrap())
                .unwrap()
                .bytes
                .clone(),
        )
        .unwrap();
        assert_eq!(out.lines().count(), 2);
        assert_eq!(p.stats.runs_per_custom_id.len(), 2);
    }

    #[test]
    fn duplicate_ids_and_two_models_fail_validation() {
        let mut p = provider(instant());
        let content = format!(
            "{}\n{}\n",
            line("1", "m", "/v1/responses"),
            line("1", "other", "/v1/responses")
        );
        let id = create(&mut p, content);
        let b = p.get_batch(&id).unwrap();
        assert_eq!(b["status"], "failed");
        let codes: Vec<&str> = b["errors"]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["code"].as_str().unwrap())
            .collect();
        assert_eq!(codes, ["duplicate_custom_id", "mismatched_model"]);
        assert!(p.stats.runs_per_custom_id.is_empty());
    }

    #[test]
    fn an_expired_batch_reports_the_rest_as_batch_expired() {
        let mut p = provider(Config {
            expire_next: 1,
            expire_fraction: 0.5,
            ..instant()
        });
        let content: String = (0..4)
            .map(|i| line(&i.to_string(), "m", "/v1/responses") + "\n")
            .collect();
        let id = create(&mut p, content);
        let b = p.get_batch(&id).unwrap();
        assert_eq!(b["status"], "expired");
        let errors = String::from_utf8(
            p.file(b["error_file_id"].as_str().unwrap())
                .unwrap()
                .bytes
                .clone(),
        )
        .unwrap();
        assert_eq!(errors.matches("batch_expired").count(), 2);
    }

    #[test]
    fn the_token_cap_fails_validation_after_create() {
        let mut p = provider(Config {
            enqueued_token_limit: Some(1),
            ..instant()
        });
        let id = create(&mut p, line("1", "m", "/v1/responses"));
        let b = p.get_batch(&id).unwrap();
        assert_eq!(b["status"], "failed");
        assert_eq!(b["errors"]["data"][0]["code"], "token_limit_exceeded");
    }

    #[test]
    fn a_bom_is_refused_at_upload() {
        let mut p = provider(instant());
        let err = p
            .upload("in.jsonl", "batch", b"\xEF\xBB\xBF{}".to_vec())
            .unwrap_err();
        assert_eq!(err.status, 400);
    }

    #[test]
    fn random_line_failures_are_not_billed() {
        let mut p = provider(Config {
            line_failure_rate: 1.0,
            ..instant()
        });
        let id = create(&mut p, line("1", "m", "/v1/responses"));
        let b = p.get_batch(&id).unwrap();
        assert_eq!(b["request_counts"]["failed"], 1);
        assert!(p.stats.runs_per_custom_id.is_empty());
    }

    #[test]
    fn list_pages_newest_first() {
        let mut p = provider(Config {
            validating_ms: 60_000,
            ..instant()
        });
        let ids: Vec<String> = (0..3)
            .map(|i| create(&mut p, line(&i.to_string(), "m", "/v1/responses")))
            .collect();
        let page = p.list_batches(None, 2).unwrap();
        assert_eq!(page["data"][0]["id"], ids[2].as_str());
        assert_eq!(page["has_more"], true);
        let next = p.list_batches(page["last_id"].as_str(), 2).unwrap();
        assert_eq!(next["data"][0]["id"], ids[0].as_str());
        assert_eq!(next["has_more"], false);
    }
}
