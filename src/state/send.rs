//! A batch's way through the provider: its input file, then what each call (upload, create,
//! poll, cancel, delete) left, recorded before the worker moves on.

use super::{fail, run, seconds, BatchRow};
use crate::provider::BatchInfo;
use crate::provider::Kind;
use crate::results::custom_id;
use pgrx::prelude::*;
use pgrx::PgMemoryContexts;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// Writes a batch's input file, one JSONL line per request in its provider's format, reading
/// the requests through a cursor so the file is never held in memory whole. Returns (lines,
/// bytes).
pub fn write_input_file(
    batch: &BatchRow,
    kind: &dyn Kind,
    path: &Path,
) -> std::io::Result<(usize, u64)> {
    let endpoint = batch.endpoint();
    let file = std::fs::File::create(path)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut lines = 0usize;
    Spi::connect(|client| -> std::io::Result<()> {
        let mut cursor = client.open_cursor(
            // In no particular order: lines are matched by custom_id, and an ORDER BY would tempt
            // the planner (a cursor wants its first rows fast) to walk the whole primary key.
            "SELECT id, body::text FROM llmbatching.requests
                  WHERE batch_id = $1 AND state = 'submitted'",
            &[batch.id.into()],
        );
        // Each fetch is read in a scratch context, reset afterwards, and its tuple table freed:
        // otherwise every detoasted body would stay allocated until the whole file is written.
        let mut scratch = PgMemoryContexts::new("llmbatching input file");
        loop {
            let written = unsafe {
                scratch.switch_to(|_| -> std::io::Result<usize> {
                    let rows = cursor
                        .fetch(200)
                        .unwrap_or_else(|e| fail("reading a batch's requests", e));
                    let mut count = 0;
                    for row in rows {
                        let id: i64 = row
                            .get(1)
                            .unwrap_or_else(|e| fail("reading a request id", e))
                            .unwrap_or(0);
                        let body: String = row
                            .get(2)
                            .unwrap_or_else(|e| fail("reading a request body", e))
                            .unwrap_or_default();
                        let line = kind
                            .input_line(&custom_id(id), endpoint, &body)
                            .map_err(std::io::Error::other)?;
                        out.write_all(line.as_bytes())?;
                        out.write_all(b"\n")?;
                        count += 1;
                    }
                    pg_sys::SPI_freetuptable(pg_sys::SPI_tuptable);
                    Ok(count)
                })?
            };
            unsafe { scratch.reset() };
            if written == 0 {
                return Ok(());
            }
            lines += written;
        }
    })?;
    out.flush()?;
    let bytes = out.get_ref().metadata()?.len();
    Ok((lines, bytes))
}

/// The input is staged (`file_id`: where, for providers that keep a file of it).
pub fn record_uploaded(batch_id: i64, file_id: Option<&str>, bytes: u64) {
    run(
        "UPDATE llmbatching.batches SET state = 'uploaded', input_file_id = $2, input_bytes = $3,
                step_failures = 0, last_error = NULL, next_check_at = pg_catalog.now()
          WHERE id = $1",
        &[batch_id.into(), file_id.into(), (bytes as i64).into()],
    );
}

/// Notes that a create call is about to be made, so that after a crash the worker looks for
/// the batch at the provider before creating it again.
pub fn record_create_attempt(batch_id: i64) {
    run(
        "UPDATE llmbatching.batches SET create_attempted_at = coalesce(create_attempted_at, pg_catalog.now()) WHERE id = $1",
        &[batch_id.into()],
    );
}

/// The batch of a route whose create call may have gone out unanswered, the earliest if several
/// (see `Kind::tags_batches`).
pub fn create_in_doubt(provider: &str, account: &str) -> Option<i64> {
    Spi::get_one_with_args::<i64>(
        "SELECT (SELECT id FROM llmbatching.batches
                  WHERE state = 'uploaded' AND create_attempted_at IS NOT NULL
                    AND provider = $1 AND account = $2
                  ORDER BY create_attempted_at, id LIMIT 1)",
        &[provider.into(), account.into()],
    )
    .unwrap_or_else(|e| fail("looking for a create in doubt", e))
}

pub fn record_submitted(batch_id: i64, info: &BatchInfo, poll_interval: Duration) {
    run(
        "UPDATE llmbatching.batches SET state = 'submitted', provider_batch_id = $2, provider_status = $3,
                submitted_at = pg_catalog.now(), step_failures = 0, last_error = NULL,
                next_check_at = pg_catalog.now() + pg_catalog.make_interval(secs => $4)
          WHERE id = $1",
        &[batch_id.into(), info.id.as_str().into(), info.status.as_str().into(), seconds(poll_interval).into()],
    );
}

/// Records what a poll saw. A batch that has ended moves to `ingesting`.
pub fn record_poll(batch_id: i64, info: &BatchInfo, poll_interval: Duration) {
    let state = if info.status.is_terminal() {
        "ingesting"
    } else {
        "submitted"
    };
    run(
        "UPDATE llmbatching.batches SET
                state = $2, provider_status = $3, output_file_id = $4, error_file_id = $5,
                completed_count = $6, failed_count = $7, input_tokens = $8, output_tokens = $9,
                provider_errors = $10, cached_tokens = $12, reasoning_tokens = $13, step_failures = 0, last_error = NULL,
                ended_at = CASE WHEN $2 = 'ingesting' THEN coalesce(ended_at, pg_catalog.now()) END,
                next_check_at = CASE WHEN $2 = 'ingesting' THEN pg_catalog.now() ELSE pg_catalog.now() + pg_catalog.make_interval(secs => $11) END
          WHERE id = $1",
        &[
            batch_id.into(),
            state.into(),
            info.status.as_str().into(),
            info.output_file_id.clone().into(),
            info.error_file_id.clone().into(),
            (info.completed as i32).into(),
            (info.failed as i32).into(),
            info.input_tokens.into(),
            info.output_tokens.into(),
            info.errors_text().into(),
            seconds(poll_interval).into(),
            info.cached_tokens.into(),
            info.reasoning_tokens.into(),
        ],
    );
}

/// Records the result files (and counts) the provider names for an ended batch now: asked
/// again after a reading failed, they may have changed. The batch's step and failures stay.
pub fn record_result_files(batch_id: i64, info: &BatchInfo) {
    run(
        "UPDATE llmbatching.batches SET
                output_file_id = coalesce($2, output_file_id), error_file_id = coalesce($3, error_file_id),
                completed_count = greatest(completed_count, $4), failed_count = greatest(failed_count, $5)
          WHERE id = $1",
        &[
            batch_id.into(),
            info.output_file_id.clone().into(),
            info.error_file_id.clone().into(),
            (info.completed as i32).into(),
            (info.failed as i32).into(),
        ],
    );
}

/// Records the error that ended a batch, for administrators.
pub fn record_last_error(batch_id: i64, error: &str) {
    run(
        "UPDATE llmbatching.batches SET last_error = $2 WHERE id = $1",
        &[batch_id.into(), error.into()],
    );
}

/// Records a failed step and when to try it again.
pub fn record_step_failure(batch_id: i64, error: &str, retry_in: Duration) {
    run(
        "UPDATE llmbatching.batches SET last_error = $2, step_failures = step_failures + 1,
                next_check_at = pg_catalog.now() + pg_catalog.make_interval(secs => $3)
          WHERE id = $1",
        &[batch_id.into(), error.into(), seconds(retry_in).into()],
    );
}

pub fn record_cancel_sent(batch_id: i64) {
    run(
        "UPDATE llmbatching.batches SET cancel_sent_at = pg_catalog.now() WHERE id = $1",
        &[batch_id.into()],
    );
}

pub fn record_files_deleted(batch_id: i64) {
    run(
        "UPDATE llmbatching.batches SET files_deleted_at = pg_catalog.now() WHERE id = $1",
        &[batch_id.into()],
    );
}
