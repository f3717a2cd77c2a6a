//! Anthropic's Message Batches API (kind `anthropic`). It differs from OpenAI's at every step:
//! the requests go inline with the create call (no file to stage), a batch's status is its
//! `processing_status` (`in_progress`, `canceling`, `ended`), its results come from its
//! `results_url`, followed as given, and it carries no metadata. Only `/v1/messages` is batched.
//!
//! A batch whose create call went out just before a crash, its answer lost, is found again by
//! what Anthropic does keep: among the batches created since the call (a minute of clock skew
//! allowed), one of the same number of requests that no other batch here holds, the earliest.
//! Creates under one key are made one at a time, and none while an earlier one is in doubt
//! (see the worker), so no two batches of this database are ever in doubt at once.

pub mod format;

use super::http::{transfer_limit, Http};
use super::{
    BatchInfo, BatchProvider, BatchStatus, Kind, Leftovers, NewBatch, ProviderError,
    ProviderResult, Server, SharedProvider,
};
use crate::planner::BatchLimits;
use crate::request::Endpoint;
use crate::results::LineResult;
use reqwest::RequestBuilder;
use serde_json::Value;
use std::path::Path;

/// The API version every call names.
const API_VERSION: &str = "2023-06-01";
/// Pages of the batch list searched for a batch whose create call went unrecorded.
const RECONCILE_PAGES: usize = 20;
/// Clock difference allowed between this server and the provider when matching creation times.
const CLOCK_SKEW_SECS: i64 = 60;

pub struct AnthropicKind;

pub static ANTHROPIC: AnthropicKind = AnthropicKind;

impl Kind for AnthropicKind {
    fn name(&self) -> &'static str {
        "anthropic"
    }

    fn default_api_base(&self) -> Option<&'static str> {
        Some("https://api.anthropic.com/v1")
    }

    fn endpoints(&self) -> &'static [Endpoint] {
        &[Endpoint::Messages]
    }

    fn limits(&self) -> BatchLimits {
        BatchLimits {
            max_requests: 100_000,
            max_bytes: 256 * 1024 * 1024,
        }
    }

    fn tags_batches(&self) -> bool {
        false
    }

    fn input_line(
        &self,
        custom_id: &str,
        _endpoint: Endpoint,
        body_json: &str,
    ) -> Result<String, serde_json::Error> {
        format::request_item(custom_id, body_json)
    }

    fn parse_result_line(&self, endpoint: Endpoint, line: &str) -> Result<LineResult, String> {
        format::parse_line(endpoint, line)
    }

    fn connect(&self, server: &Server) -> ProviderResult<SharedProvider> {
        Ok(std::sync::Arc::new(Anthropic {
            http: Http::new(server)?,
            base_url: server.api_base.trim_end_matches('/').to_owned(),
            api_key: server.api_key.clone(),
        }))
    }
}

pub struct Anthropic {
    http: Http,
    base_url: String,
    api_key: String,
}

impl Anthropic {
    fn authorized(&self, request: RequestBuilder) -> RequestBuilder {
        request
            .header("x-api-key", &self.api_key)
            .header("anthropic-version", API_VERSION)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    fn call(&self, request: RequestBuilder) -> ProviderResult<Value> {
        self.http.call_json(self.authorized(request))
    }

    fn list(&self, after_id: Option<&str>) -> ProviderResult<(Vec<(BatchInfo, i64)>, bool)> {
        let mut path = "/messages/batches?limit=100".to_owned();
        if let Some(after) = after_id {
            path.push_str(&format!("&after_id={after}"));
        }
        let page = self.call(self.http.client.get(self.url(&path)))?;
        let batches = page
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| ProviderError::Malformed("batch list without data".into()))?
            .iter()
            .map(|b| Ok((batch_info(b)?, created_at(b))))
            .collect::<ProviderResult<Vec<_>>>()?;
        let more = page
            .get("has_more")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok((batches, more))
    }
}

impl BatchProvider for Anthropic {
    fn stage_input(&self, _path: &Path, _filename: &str) -> ProviderResult<Option<String>> {
        Ok(None)
    }

    /// Sends the staged lines as `{"requests": [...]}`, streamed from the file: each line's
    /// newline becomes the comma between items, and the last one the array's end.
    fn create_batch(&self, batch: &NewBatch<'_>) -> ProviderResult<BatchInfo> {
        let path = batch
            .input_path
            .ok_or_else(|| ProviderError::Local("no input file to send".into()))?;
        let local = |e: std::io::Error| ProviderError::Local(format!("{}: {e}", path.display()));
        let length = std::fs::metadata(path).map_err(local)?.len();
        if length == 0 {
            return Err(ProviderError::Local("the input file is empty".into()));
        }
        let value = self.http.run(async {
            let file = tokio::fs::File::open(path).await.map_err(local)?;
            let body = json_array_stream(file, length);
            let request = self
                .authorized(self.http.client.post(self.url("/messages/batches")))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(
                    reqwest::header::CONTENT_LENGTH,
                    length + PREFIX.len() as u64 + 1,
                )
                .body(reqwest::Body::wrap_stream(body))
                .timeout(transfer_limit(length));
            let response = super::http::send(request).await?;
            let bytes = super::http::read_limited(response, super::http::MAX_JSON_BYTES).await?;
            serde_json::from_slice::<Value>(&bytes)
                .map_err(|e| ProviderError::Malformed(format!("invalid JSON ({e})")))
        })?;
        batch_info(&value)
    }

    fn find_created(&self, batch: &NewBatch<'_>) -> ProviderResult<Option<BatchInfo>> {
        let Some(attempted) = batch.attempted_at else {
            return Ok(None);
        };
        let mut after: Option<String> = None;
        let mut best: Option<(BatchInfo, i64)> = None;
        for _ in 0..RECONCILE_PAGES {
            let (page, more) = self.list(after.as_deref())?;
            let mut older_than_attempt = false;
            for (info, created) in &page {
                if *created < attempted - CLOCK_SKEW_SECS {
                    older_than_attempt = true;
                    continue;
                }
                let candidate =
                    info.total == batch.request_count && !batch.taken.contains(&info.id);
                if candidate && best.as_ref().is_none_or(|(_, at)| *created <= *at) {
                    best = Some((info.clone(), *created));
                }
            }
            // Newest first: once a page reaches batches older than the attempt, none further is.
            match (more && !older_than_attempt, page.last()) {
                (true, Some((last, _))) => after = Some(last.id.clone()),
                _ => break,
            }
        }
        Ok(best.map(|(info, _)| info))
    }

    fn get_batch(&self, id: &str) -> ProviderResult<BatchInfo> {
        batch_info(
            &self.call(
                self.http
                    .client
                    .get(self.url(&format!("/messages/batches/{id}"))),
            )?,
        )
    }

    fn cancel_batch(&self, id: &str) -> ProviderResult<BatchInfo> {
        let path = format!("/messages/batches/{id}/cancel");
        batch_info(&self.call(self.http.client.post(self.url(&path)))?)
    }

    /// Reads the results from the batch's `results_url`, exactly as the provider gave it.
    fn download_results(&self, results_url: &str, dest: &Path) -> ProviderResult<u64> {
        let request = self.authorized(self.http.client.get(results_url));
        self.http.download(request, dest, "the batch's results")
    }

    /// Deletes the batch, and its results with it.
    fn clean_up(&self, leftovers: &Leftovers) -> ProviderResult<()> {
        let Some(id) = &leftovers.batch_id else {
            return Ok(());
        };
        self.call(
            self.http
                .client
                .delete(self.url(&format!("/messages/batches/{id}"))),
        )
        .map(|_| ())
    }
}

const PREFIX: &[u8] = b"{\"requests\":[";

/// The staged JSONL file as one JSON object: `{"requests":[` + the lines, each newline turned
/// into a comma and the last into `]`, + `}`. Lines are JSON text, which holds no raw newline.
fn json_array_stream(
    file: tokio::fs::File,
    length: u64,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> {
    use futures_util::StreamExt;
    let mut offset = 0u64;
    let lines = tokio_util::io::ReaderStream::new(file).map(move |chunk| {
        let mut chunk = chunk?.to_vec();
        for (i, byte) in chunk.iter_mut().enumerate() {
            if *byte == b'\n' {
                *byte = if offset + i as u64 + 1 == length {
                    b']'
                } else {
                    b','
                };
            }
        }
        offset += chunk.len() as u64;
        Ok(bytes::Bytes::from(chunk))
    });
    futures_util::stream::once(async { Ok(bytes::Bytes::from_static(PREFIX)) })
        .chain(lines)
        .chain(futures_util::stream::once(async {
            Ok(bytes::Bytes::from_static(b"}"))
        }))
}

/// When a batch was created, in Unix seconds (0 if it does not say).
fn created_at(batch: &Value) -> i64 {
    batch
        .get("created_at")
        .and_then(Value::as_str)
        .and_then(unix_seconds)
        .unwrap_or(0)
}

/// Unix seconds of an RFC 3339 time (`2024-09-24T18:37:24.100435Z`); fractions and offsets
/// other than Z are read too.
fn unix_seconds(text: &str) -> Option<i64> {
    let (date, time) = text.split_once('T')?;
    let mut ymd = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let (clock, offset) = match time.find(['Z', '+', '-']) {
        Some(at) => time.split_at(at),
        None => (time, "Z"),
    };
    let mut hms = clock.splitn(3, ':');
    let h = hms.next()?.parse::<i64>().ok()?;
    let min = hms.next()?.parse::<i64>().ok()?;
    let sec = hms.next()?.split('.').next()?.parse::<i64>().ok()?;
    let offset_secs = match offset {
        "Z" | "" => 0,
        o => {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            let (oh, om) = o[1..].split_once(':')?;
            sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60)
        }
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + min * 60 + sec - offset_secs)
}

/// Reads a message batch object into the worker's terms. `ended` becomes `expired` or
/// `cancelled` when requests did not run for that reason, else `completed`; `results_url` is
/// where the results are (none yet: still being written).
fn batch_info(v: &Value) -> ProviderResult<BatchInfo> {
    let malformed = |what: &str| ProviderError::Malformed(format!("message batch without {what}"));
    let id = v
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty())
        .ok_or_else(|| malformed("an id"))?
        .to_owned();
    let processing = v
        .get("processing_status")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed("a processing_status"))?;
    let count = |name: &str| {
        v.pointer(&format!("/request_counts/{name}"))
            .and_then(Value::as_i64)
            .unwrap_or(0)
    };
    let (succeeded, errored, canceled, expired) = (
        count("succeeded"),
        count("errored"),
        count("canceled"),
        count("expired"),
    );
    let status = match processing {
        "in_progress" => BatchStatus::InProgress,
        "canceling" => BatchStatus::Cancelling,
        "ended" if expired > 0 => BatchStatus::Expired,
        "ended" if canceled > 0 => BatchStatus::Cancelled,
        "ended" => BatchStatus::Completed,
        other => BatchStatus::Other(other.to_owned()),
    };
    Ok(BatchInfo {
        id,
        status,
        output_file_id: v
            .get("results_url")
            .and_then(Value::as_str)
            .filter(|u| !u.is_empty())
            .map(str::to_owned),
        error_file_id: None,
        total: count("processing") + succeeded + errored + canceled + expired,
        completed: succeeded,
        failed: errored + canceled + expired,
        errors: Vec::new(),
        metadata: serde_json::Map::new(),
        input_tokens: None,
        cached_tokens: None,
        output_tokens: None,
        reasoning_tokens: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn times_are_read_as_unix_seconds() {
        assert_eq!(unix_seconds("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            unix_seconds("2024-09-24T18:37:24.100435Z"),
            Some(1_727_203_044)
        );
        assert_eq!(
            unix_seconds("2024-09-24T20:37:24+02:00"),
            Some(1_727_203_044)
        );
        assert_eq!(unix_seconds("nonsense"), None);
    }

    #[test]
    fn an_ended_batch_reads_as_how_it_ended() {
        let ended = |counts: Value| {
            batch_info(&json!({"id": "msgbatch_1", "processing_status": "ended",
                               "request_counts": counts, "results_url": "https://x/results"}))
            .unwrap()
        };
        let done = ended(
            json!({"processing": 0, "succeeded": 2, "errored": 1, "canceled": 0, "expired": 0}),
        );
        assert_eq!(done.status, BatchStatus::Completed);
        assert_eq!((done.total, done.completed, done.failed), (3, 2, 1));
        assert_eq!(done.output_file_id.as_deref(), Some("https://x/results"));
        assert_eq!(
            ended(json!({"succeeded": 1, "expired": 1})).status,
            BatchStatus::Expired
        );
        assert_eq!(
            ended(json!({"succeeded": 1, "canceled": 1})).status,
            BatchStatus::Cancelled
        );
        let running = batch_info(&json!({"id": "b", "processing_status": "in_progress",
            "request_counts": {"processing": 5}, "results_url": null}))
        .unwrap();
        assert_eq!(
            (running.status, running.total, running.output_file_id),
            (BatchStatus::InProgress, 5, None)
        );
        assert!(batch_info(&json!({"id": "b"})).is_err());
    }

    #[test]
    fn the_staged_lines_stream_as_one_json_object() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(staged_lines_stream_as_one_json_object());
    }

    async fn staged_lines_stream_as_one_json_object() {
        use futures_util::StreamExt;
        let dir =
            std::env::temp_dir().join(format!("llmbatching-anthropic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("input.jsonl");
        std::fs::write(
            &path,
            "{\"custom_id\":\"1\",\"params\":{}}\n{\"custom_id\":\"2\",\"params\":{}}\n",
        )
        .unwrap();
        let length = std::fs::metadata(&path).unwrap().len();
        let file = tokio::fs::File::open(&path).await.unwrap();
        let parts: Vec<_> = json_array_stream(file, length).collect().await;
        let body: Vec<u8> = parts
            .into_iter()
            .flat_map(|p| p.unwrap().to_vec())
            .collect();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["requests"][1]["custom_id"], "2");
        assert_eq!(body.len() as u64, length + PREFIX.len() as u64 + 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
