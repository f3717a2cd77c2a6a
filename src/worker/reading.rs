//! Reading a batch's answers back: its downloaded result files applied to its requests, in
//! chunks of one transaction each, and the batch ended with what they did not settle.
//!
//! The worker hands each downloaded batch to a reader process when it can (see `reader`), and
//! reads it itself when it cannot; both read through [`Reading`]. Reading a batch twice is
//! harmless: only requests still `submitted` in it are updated.

use super::{catching, catching_failure, tx};
use crate::config::Settings;
use crate::provider::redact::{redact_all, redact_json_all};
use crate::provider::{BatchStatus, Kind, ProviderError};
use crate::results::{self, LineRead, LineResult, Outcome};
use crate::state::{self, held, ingest, BatchRow};
use pgrx::prelude::*;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Result lines applied per transaction, and the most bytes of them held at once, so memory
/// stays flat whatever the size of the answers.
const INGEST_CHUNK: usize = 1000;
const INGEST_CHUNK_BYTES: usize = 8 * 1024 * 1024;

/// One batch's reading: the batch as recorded, how its provider's lines read, and the keys
/// kept out of everything stored and logged.
pub struct Reading<'a> {
    batch: &'a BatchRow,
    kind: &'static dyn Kind,
    keys: Vec<String>,
    settings: &'a Settings,
    /// Asked between chunks: true leaves the rest of the reading to be done again later.
    stopping: fn() -> bool,
    /// Whether a chunk met a row its role holds (see [`Reading::apply_chunk`]).
    met_held: std::cell::Cell<bool>,
    /// Whether any answer was kept aside as the reading started (see `held::any_kept`): only
    /// then may it settle a request whose answer is kept.
    kept_before: std::cell::Cell<bool>,
}

/// A reading left unfinished because its process is to stop; nothing is recorded for it.
const STOPPED: &str = "the reading was stopped";

/// The batch error code of the provider's enqueued-token limit.
const TOKEN_LIMIT_CODE: &str = "token_limit_exceeded";

/// Removes downloaded files (best effort: the next download writes them anew).
pub fn remove_files(files: &[PathBuf]) {
    for path in files {
        let _ = std::fs::remove_file(path);
    }
}

/// Whether an ended batch's results are still asked for again when they cannot be read whole.
pub fn within_result_window(batch: &BatchRow, settings: &Settings) -> bool {
    batch.ended_ago < settings.result_retry_window && !batch.results_given_up
}

impl<'a> Reading<'a> {
    pub fn new(
        batch: &'a BatchRow,
        kind: &'static dyn Kind,
        keys: Vec<String>,
        settings: &'a Settings,
        stopping: fn() -> bool,
    ) -> Self {
        Reading {
            batch,
            kind,
            keys,
            settings,
            stopping,
            met_held: std::cell::Cell::new(false),
            kept_before: std::cell::Cell::new(true),
        }
    }

    /// A provider's text without any key in use or any echoed credential, bounded.
    pub fn redact(&self, text: &str) -> String {
        redact_all(text, self.keys.iter().map(String::as_str))
    }

    fn redact_json(&self, text: &str) -> String {
        redact_json_all(text, self.keys.iter().map(String::as_str))
    }

    /// Applies the batch's downloaded result files, then settles what they left out and ends
    /// the batch. The files are removed afterwards, whatever happened: a reading that failed is
    /// done again from a new download.
    pub fn finish(&self, files: &[PathBuf], downloading: Duration) -> Result<(), ProviderError> {
        let (batch, settings) = (self.batch, self.settings);
        let applied = self.apply_files(files);
        remove_files(files);
        let (lines, applying) = applied?;
        let last_read = !within_result_window(batch, settings);
        // Fewer lines than the provider counted means a download was cut short: read the files
        // again rather than send the missing requests a second time. Applying them twice is
        // harmless. A provider that keeps delivering short files is believed in the end.
        if lines < batch.counted_results && !last_read {
            return Err(ProviderError::Malformed(format!(
                "the result files hold {lines} readable lines, the provider counted {}",
                batch.counted_results
            )));
        }
        let reason = leftover_reason(batch);
        let token_limited = token_limited(batch);
        if token_limited {
            // Nothing ran: the model's queue at the provider was full. Wait, then send again.
            let pause = settings.token_limit_pause;
            warning!(
                "llmbatching: batch {} refused for the enqueued-token limit of model \"{}\"; its requests are queued again and the model waits {:.0}s",
                batch.id, batch.model, pause.as_secs_f64()
            );
            tx(|| ingest::pause_model(&batch.model, pause, &reason));
        }
        let max_attempts = settings.max_attempts;
        // (A request its role holds locked would hold up the closing: it fails after a bounded
        // wait, and the batch is read again later.)
        tx(|| ingest::close_batch(batch.id, &reason, max_attempts, token_limited));
        log!(
            "llmbatching: batch {} read back: {lines} result lines (download {:.2}s, applying {:.2}s)",
            batch.id,
            downloading.as_secs_f64(),
            applying.as_secs_f64()
        );
        Ok(())
    }

    /// Reads the result files twice: first to choose each request's line (see
    /// [`results::LineFilter`]: the same choice however the files are chunked), then to apply
    /// the chosen lines. Returns how many requests of this database the lines answered, and
    /// how long applying took.
    fn apply_files(&self, files: &[PathBuf]) -> Result<(i64, Duration), ProviderError> {
        let (batch, settings) = (self.batch, self.settings);
        let started = Instant::now();
        // Until the window after the batch ended has passed, a reading that is not whole is
        // tried again; on the last one, lines that still cannot be read fail their requests.
        let last_read = !within_result_window(batch, settings);
        let mut filter = results::LineFilter::default();
        for path in files {
            self.read_file(path, |r| {
                filter.note(&r);
                ControlFlow::Continue(())
            })?;
        }
        let named = filter.named();
        let batch_id = batch.id;
        self.kept_before
            .set(catching(|| tx(held::any_kept)).map_err(ProviderError::Database)?);
        let known = catching(move || tx(move || ingest::existing_ids(batch_id, named)))
            .map_err(ProviderError::Database)?;
        let unknown = filter.forget_unknown(&known);
        if unknown > 0 {
            warning!(
                "llmbatching: batch {}: {unknown} result lines name no request of this database; they are ignored",
                batch.id
            );
        }
        let (mut unread, mut held) = (0, 0);
        for path in files {
            if (self.stopping)() {
                return Err(ProviderError::Local(STOPPED.into()));
            }
            let applied = self.apply_file(path, settings.max_attempts, last_read, &mut filter)?;
            unread += applied.unread;
            held += applied.held;
        }
        if filter.duplicates() > 0 {
            warning!(
                "llmbatching: batch {}: {} result lines repeated a request already answered; the first answer is kept",
                batch.id,
                filter.duplicates()
            );
        }
        if unread > 0 {
            return Err(ProviderError::Malformed(format!(
                "{unread} result lines could not be read; the files are read again"
            )));
        }
        // Their answers are in the files: read them again later rather than end the batch,
        // which would send those requests again.
        if held > 0 {
            tx(move || ingest::keep_roles_still_waiting(batch_id));
            return Err(ProviderError::Held(held));
        }
        Ok((filter.requests_named(), started.elapsed()))
    }

    /// Reads a result file line by line, handing each line that names a request to `each`,
    /// until `each` says to stop. Returns how many lines could not be attributed to a request,
    /// and the first problem.
    fn read_file(
        &self,
        path: &Path,
        mut each: impl FnMut(LineResult) -> ControlFlow<()>,
    ) -> Result<(usize, Option<String>), ProviderError> {
        let local = |e: std::io::Error| ProviderError::Local(format!("{}: {e}", path.display()));
        let mut reader = std::io::BufReader::new(std::fs::File::open(path).map_err(local)?);
        let (endpoint, kind) = (self.batch.endpoint(), self.kind);
        let mut line = Vec::new();
        let (mut unattributed, mut first_problem) = (0usize, None);
        loop {
            match results::read_line_bounded(&mut reader, &mut line, results::MAX_RESULT_LINE_BYTES)
                .map_err(local)?
            {
                LineRead::Line => {
                    let text = String::from_utf8_lossy(&line);
                    if text.trim().is_empty() {
                        continue;
                    }
                    match kind.parse_result_line(endpoint, text.trim_end()) {
                        Ok(result) => {
                            if each(result).is_break() {
                                return Ok((unattributed, first_problem));
                            }
                        }
                        Err(why) => {
                            unattributed += 1;
                            first_problem.get_or_insert(why);
                        }
                    }
                }
                LineRead::TooLong => {
                    unattributed += 1;
                    first_problem.get_or_insert(format!(
                        "a line over {} bytes",
                        results::MAX_RESULT_LINE_BYTES
                    ));
                }
                LineRead::End => return Ok((unattributed, first_problem)),
            }
        }
    }

    /// Reads a result file again and applies the lines `filter` keeps, in chunks of one
    /// transaction each.
    fn apply_file(
        &self,
        path: &Path,
        max_attempts: i32,
        last_read: bool,
        filter: &mut results::LineFilter,
    ) -> Result<Applied, ProviderError> {
        let mut chunk = Vec::with_capacity(INGEST_CHUNK);
        let mut chunk_bytes = 0usize;
        let (mut unread, mut unread_first, mut held) = (0usize, None, 0usize);
        let mut stopped = false;
        let (unattributed, first_problem) = self.read_file(path, |result| {
            if !filter.apply(&result) {
                return ControlFlow::Continue(());
            }
            // The best this request has is a line that cannot be read: read the files again
            // (nothing of it is applied meanwhile), unless this is the last reading.
            if matches!(result.outcome, Outcome::Unreadable { .. }) && !last_read {
                unread += 1;
                unread_first.get_or_insert(format!("request {}: unreadable", result.request_id));
                return ControlFlow::Continue(());
            }
            chunk_bytes += approximate_size(&result);
            chunk.push(self.redacted(result));
            if chunk.len() >= INGEST_CHUNK || chunk_bytes >= INGEST_CHUNK_BYTES {
                chunk_bytes = 0;
                held += self.apply_chunk(std::mem::take(&mut chunk), max_attempts);
                stopped = (self.stopping)();
                if stopped {
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        })?;
        if stopped {
            return Err(ProviderError::Local(STOPPED.into()));
        }
        if !chunk.is_empty() {
            held += self.apply_chunk(chunk, max_attempts);
        }
        if unattributed > 0 || unread > 0 {
            warning!(
                "llmbatching: batch {}: {} result lines could not be read (first: {})",
                self.batch.id,
                unattributed + unread,
                self.redact(&first_problem.or(unread_first).unwrap_or_default())
            );
        }
        Ok(Applied { unread, held })
    }

    /// A provider's error texts in a result, redacted (see [`redact`]).
    fn redacted(&self, mut result: LineResult) -> LineResult {
        match &mut result.outcome {
            Outcome::Failed { message, response } => {
                *message = self.redact(message);
                // The provider's error body is kept for its request's role to read.
                if let Some(body) = response {
                    *body = self.redact_json(body);
                }
            }
            Outcome::Retry { reason } => *reason = self.redact(reason),
            Outcome::Unreadable { reason, line } => {
                *reason = self.redact(reason);
                *line = self.redact_json(line);
            }
            Outcome::Completed { .. } => {}
        }
        result
    }

    /// Applies a chunk of results (see [`apply_chunk`]). Once a chunk of this reading met a
    /// row its role holds, the following ones skip held rows from the start, rather than wait a
    /// second each for another (a role could spread its held rows over every chunk of a large
    /// batch); so does a batch read again (an earlier reading failed).
    fn apply_chunk(&self, chunk: Vec<LineResult>, max_attempts: i32) -> usize {
        let skip_held = self.met_held.get() || self.batch.step_failures > 0;
        let (left, met_held) = apply_chunk(
            self.batch.id,
            self.batch.has_answer_formats,
            chunk,
            max_attempts,
            skip_held,
            self.kept_before.get(),
        );
        if met_held {
            self.met_held.set(true);
        }
        left
    }
}

/// Applies a chunk of results of batch `id` in a transaction; returns how many could not be
/// applied nor kept aside (see `held`), left for a later reading of the batch, and whether
/// applying met a lock it had to give up waiting for. Waiting for a lock is bounded: past it,
/// the chunk is applied again without the rows others hold, whose answers are kept aside in
/// the same transaction (see `ingest::lock_unheld`). With `skip_held`, that is done from the
/// start. A chunk that fails otherwise is applied again one result at a time, and a result
/// that fails alone fails its request only: an answer no statement can store never stops the
/// others, nor the worker.
pub fn apply_chunk(
    id: i64,
    formats: bool,
    chunk: Vec<LineResult>,
    max_attempts: i32,
    skip_held: bool,
    kept_before: bool,
) -> (usize, bool) {
    let apply = move |results: Vec<LineResult>, skip_held: bool| {
        catching_failure(move || {
            tx(move || {
                state::bound_lock_waits();
                let ids: Vec<i64> = results.iter().map(|r| r.request_id).collect();
                let left = ingest::apply_results(id, results, max_attempts, formats, skip_held);
                held::after_applying(id, &ids, &left, kept_before)
            })
        })
    };
    let mut failure = match apply(chunk.clone(), skip_held) {
        Ok(left) => return (left, false),
        Err(failure) => failure,
    };
    if failure.transient && !skip_held {
        match apply(chunk.clone(), true) {
            Ok(left) => return (left, true),
            Err(again) => failure = again,
        }
    }
    warning!(
        "llmbatching: batch {id}: {} answers could not be stored together ({}); storing them one at a time",
        chunk.len(),
        failure.message
    );
    let mut left = 0;
    for result in chunk {
        let request = result.request_id;
        let one = vec![result];
        match apply(one.clone(), true) {
            Ok(kept_not) => left += kept_not,
            // (Kept aside, it is tried again later; if even that fails, the batch is read
            // again.)
            Err(failure) if failure.transient => {
                left += catching(move || tx(move || held::after_applying(id, &[], &one, false)))
                    .unwrap_or(1)
            }
            Err(failure) => {
                let reason = format!("the answer could not be stored: {}", failure.message);
                let _ = catching(move || {
                    tx(move || {
                        state::bound_lock_waits();
                        ingest::fail_request(id, request, &reason)
                    })
                });
            }
        }
    }
    (left, failure.transient)
}

/// What applying a result file left for the next reading.
struct Applied {
    /// Requests whose best line could not be read (`last_read` false: the files are read
    /// again; true: they fail, with the line kept, rather than be sent again).
    unread: usize,
    /// Requests whose rows their role held locked, and whose answers could not be kept aside
    /// either.
    held: usize,
}

/// Whether the provider failed the batch for the model's enqueued-token limit.
pub fn token_limited(batch: &BatchRow) -> bool {
    batch.provider_status.as_deref() == Some("failed")
        && batch
            .provider_errors
            .as_deref()
            .is_some_and(|e| e.contains(TOKEN_LIMIT_CODE))
}

/// Ids with the size of what each brings, in chunks of at most [`INGEST_CHUNK`] ids and (but for
/// one that is larger alone) [`INGEST_CHUNK_BYTES`].
pub fn chunks_by_size(items: Vec<(i64, usize)>) -> Vec<Vec<i64>> {
    let mut chunks: Vec<Vec<i64>> = Vec::new();
    let mut bytes = 0;
    for (id, size) in items {
        match chunks.last_mut() {
            Some(chunk) if chunk.len() < INGEST_CHUNK && bytes + size <= INGEST_CHUNK_BYTES => {
                chunk.push(id);
                bytes += size;
            }
            _ => {
                chunks.push(vec![id]);
                bytes = size;
            }
        }
    }
    chunks
}

/// About how many bytes a result holds, to bound what a chunk keeps in memory.
fn approximate_size(result: &LineResult) -> usize {
    match &result.outcome {
        Outcome::Completed { response, text, .. } => {
            response.len() + text.as_ref().map_or(0, String::len)
        }
        Outcome::Failed { message, response } => {
            message.len() + response.as_ref().map_or(0, String::len)
        }
        Outcome::Retry { reason } => reason.len(),
        Outcome::Unreadable { reason, line } => reason.len() + line.len(),
    }
}

/// Why requests that no result line settled go back to the queue.
fn leftover_reason(batch: &BatchRow) -> String {
    let status = BatchStatus::parse(batch.provider_status.as_deref().unwrap_or(""));
    match status {
        BatchStatus::Expired => "the batch expired before this request ran".into(),
        BatchStatus::Cancelled => "the batch was cancelled before this request ran".into(),
        // The provider's reason stays with the batch (administrators read it there): it may
        // name other roles' requests.
        BatchStatus::Failed if token_limited(batch) => {
            "the provider's enqueued-token limit for the model was reached; queued again".into()
        }
        BatchStatus::Failed => "the batch failed at the provider (administrators see why in llmbatching.batches.provider_errors)".into(),
        _ => "the provider returned no result for this request".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_hold_a_bounded_count_and_size() {
        let small = (0..2500).map(|id| (id, 10)).collect();
        let sizes: Vec<usize> = chunks_by_size(small).iter().map(Vec::len).collect();
        assert_eq!(sizes, [INGEST_CHUNK, INGEST_CHUNK, 500]);
        let large = vec![
            (1, INGEST_CHUNK_BYTES / 2),
            (2, INGEST_CHUNK_BYTES / 2),
            (3, 1),
            (4, INGEST_CHUNK_BYTES * 3),
            (5, 1),
        ];
        assert_eq!(
            chunks_by_size(large),
            [vec![1, 2], vec![3], vec![4], vec![5]]
        );
        assert!(chunks_by_size(Vec::new()).is_empty());
    }
}
