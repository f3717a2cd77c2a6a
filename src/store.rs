//! The worker's access to the state tables. Every function here runs inside a transaction the
//! worker opens around it and makes no network call, so no row lock outlives a step.

use crate::planner::{self, BatchLimits, Candidate, QueuedGroup, TokenBudget};
use crate::provider::BatchInfo;
use crate::request::Endpoint;
use crate::request::{batch_line, AnswerFormat};
use crate::results::{check_answer, custom_id, LineResult, Outcome};
use pgrx::prelude::*;
use pgrx::spi::{SpiClient, SpiResult};
use pgrx::{JsonB, PgMemoryContexts};
use serde_json::Value;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

fn fail<T>(what: &str, e: impl std::fmt::Display) -> T {
    error!("llmbatching: {what}: {e}")
}

fn run(sql: &str, args: &[pgrx::datum::DatumWithOid]) {
    Spi::run_with_args(sql, args).unwrap_or_else(|e| fail(sql, e))
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Whether the extension is installed in the worker's database.
pub fn extension_ready() -> bool {
    Spi::get_one::<bool>("SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'llmbatching')")
        .unwrap_or_else(|e| fail("checking for the extension", e))
        .unwrap_or(false)
}

/// This installation's id, written into every batch's metadata.
pub fn instance_id() -> String {
    Spi::get_one::<String>("SELECT id FROM llmbatching.instance")
        .unwrap_or_else(|e| fail("reading the instance id", e))
        .unwrap_or_default()
}

/// A group of queued requests that share one endpoint and model.
pub struct Group {
    pub endpoint: String,
    pub model: String,
    pub queued: QueuedGroup,
}

/// The queued groups and, for each, its first `max_requests` requests: that many make a group
/// due whatever else is queued, so the count stops there and a wake-up never reads the whole
/// queue (a million queued rows would be read on every wake).
pub fn queued_groups(max_requests: usize) -> Vec<Group> {
    Spi::connect(|client| {
        let rows = client.select(
            "WITH RECURSIVE groups AS (
                 (SELECT endpoint, model FROM llmbatching.requests
                   WHERE state = 'queued' AND reused_from IS NULL
                   ORDER BY endpoint, model LIMIT 1)
                 UNION ALL
                 SELECT next.endpoint, next.model
                   FROM groups g
                  CROSS JOIN LATERAL (
                      SELECT r.endpoint, r.model FROM llmbatching.requests r
                       WHERE r.state = 'queued' AND r.reused_from IS NULL
                         AND (r.endpoint, r.model) > (g.endpoint, g.model)
                       ORDER BY r.endpoint, r.model LIMIT 1) next)
             SELECT g.endpoint, g.model, c.requests, c.body_bytes,
                    extract(epoch FROM clock_timestamp() - c.oldest)::float8
               FROM groups g
              CROSS JOIN LATERAL (
                  SELECT count(*) AS requests, sum(first.body_bytes)::bigint AS body_bytes,
                         min(first.queued_at) AS oldest
                    FROM (SELECT r.body_bytes, r.queued_at FROM llmbatching.requests r
                           WHERE r.state = 'queued' AND r.reused_from IS NULL
                             AND r.endpoint = g.endpoint AND r.model = g.model
                           ORDER BY r.id LIMIT $1) first) c
              WHERE NOT EXISTS (SELECT FROM llmbatching.model_pauses p
                                 WHERE p.model = g.model AND p.paused_until > now())",
            None,
            &[(max_requests as i64).into()],
        )?;
        rows.map(|row| {
            Ok(Group {
                endpoint: row.get(1)?.unwrap_or_default(),
                model: row.get(2)?.unwrap_or_default(),
                queued: QueuedGroup {
                    requests: row.get::<i64>(3)?.unwrap_or(0) as usize,
                    body_bytes: row.get::<i64>(4)?.unwrap_or(0) as usize,
                    oldest_wait: Duration::from_secs_f64(
                        row.get::<f64>(5)?.unwrap_or(0.0).max(0.0),
                    ),
                },
            })
        })
        .collect::<SpiResult<Vec<_>>>()
    })
    .unwrap_or_else(|e| fail("reading the queue", e))
}

/// How many batches are open: being sent, at the provider, or being read back.
pub fn open_batch_count() -> i64 {
    Spi::get_one::<i64>("SELECT count(*) FROM llmbatching.batches WHERE state <> 'done'")
        .unwrap_or_else(|e| fail("counting open batches", e))
        .unwrap_or(0)
}

/// The model's enqueued-token cap (its row in `model_limits`, else `default_cap`) and how
/// much of it the model's open batches leave free. None: no cap.
pub fn token_budget(model: &str, default_cap: Option<i64>) -> Option<TokenBudget> {
    let (cap, used) = Spi::get_two_with_args::<i64, i64>(
        "SELECT coalesce((SELECT max_enqueued_tokens FROM llmbatching.model_limits WHERE model = $1), $2),
                (SELECT coalesce(sum(estimated_tokens), 0)::bigint FROM llmbatching.batches
                  WHERE model = $1 AND state IN ('pending', 'uploaded', 'submitted'))",
        &[model.into(), default_cap.into()],
    )
    .unwrap_or_else(|e| fail("reading the token budget", e));
    let cap = cap? as usize;
    Some(TokenBudget {
        cap,
        available: cap.saturating_sub(used.unwrap_or(0).max(0) as usize),
    })
}

/// The oldest queued requests of a group, up to `limit` of each role, each role's in turn (see
/// [`planner::interleave_roles`]). Roles whose requests already ride in `per_role_cap` open
/// batches (0: no cap) wait.
fn claim_candidates(
    endpoint: &str,
    model: &str,
    limit: usize,
    per_role_cap: i64,
) -> Vec<Candidate> {
    let rows: Vec<(String, Candidate)> = Spi::connect(|client| {
        client
            .select(
                "WITH RECURSIVE roles AS (
                     (SELECT r.submitted_by FROM llmbatching.requests r
                       WHERE r.state = 'queued' AND r.reused_from IS NULL AND r.endpoint = $1 AND r.model = $2
                       ORDER BY r.submitted_by LIMIT 1)
                     UNION ALL
                     SELECT next.submitted_by
                       FROM roles g
                      CROSS JOIN LATERAL (
                          SELECT r.submitted_by FROM llmbatching.requests r
                           WHERE r.state = 'queued' AND r.reused_from IS NULL AND r.endpoint = $1 AND r.model = $2
                             AND r.submitted_by > g.submitted_by
                           ORDER BY r.submitted_by LIMIT 1) next)
                 SELECT g.submitted_by::text, c.id, c.body_bytes
                   FROM roles g
                  CROSS JOIN LATERAL (
                      SELECT r.id, r.body_bytes FROM llmbatching.requests r
                       WHERE r.state = 'queued' AND r.reused_from IS NULL AND r.endpoint = $1 AND r.model = $2
                         AND r.submitted_by = g.submitted_by
                       ORDER BY r.id LIMIT $3) c
                  WHERE $4 = 0
                     OR (SELECT count(*) FROM llmbatching.batches b
                          WHERE b.state <> 'done' AND g.submitted_by = ANY (b.roles)) < $4
                  ORDER BY g.submitted_by, c.id",
                None,
                &[
                    endpoint.into(),
                    model.into(),
                    (limit as i64).into(),
                    per_role_cap.into(),
                ],
            )?
            .map(|row| {
                Ok((
                    row.get::<String>(1)?.unwrap_or_default(),
                    Candidate {
                        id: row.get(2)?.unwrap_or(0),
                        body_bytes: row.get::<i32>(3)?.unwrap_or(0) as usize,
                    },
                ))
            })
            .collect::<SpiResult<Vec<_>>>()
    })
    .unwrap_or_else(|e| fail("reading queued requests", e));
    let mut per_role: Vec<Vec<Candidate>> = Vec::new();
    let mut last_role: Option<String> = None;
    for (role, candidate) in rows {
        if last_role.as_ref() != Some(&role) {
            per_role.push(Vec::new());
            last_role = Some(role);
        }
        per_role.last_mut().expect("pushed above").push(candidate);
    }
    planner::interleave_roles(per_role)
}

/// Claims queued requests of a group, every waiting role's in turn, into a new batch (state
/// `pending`); returns its id, or None when nothing could be claimed. Requests that could
/// never fit are failed.
pub fn claim_batch(
    endpoint: &str,
    model: &str,
    limits: BatchLimits,
    budget: Option<TokenBudget>,
    per_role_cap: i64,
) -> Option<i64> {
    let candidates = claim_candidates(endpoint, model, limits.max_requests, per_role_cap);
    let split = planner::take_batch(&candidates, limits, budget);
    if !split.too_many_bytes.is_empty() {
        run(
            "UPDATE llmbatching.requests SET state = 'failed', finished_at = now(),
                    error = format('the request is %s bytes, more than one batch file may hold (llmbatching.batch_max_bytes = %s)', body_bytes, $2)
              WHERE id = ANY($1)",
            &[split.too_many_bytes.into(), (limits.max_bytes as i64).into()],
        );
    }
    if !split.too_many_tokens.is_empty() {
        let cap = budget.map(|b| b.cap as i64).unwrap_or(0);
        run(
            "UPDATE llmbatching.requests SET state = 'failed', finished_at = now(),
                    error = format('the request is estimated at %s prompt tokens, more than the model''s enqueued-token cap of %s',
                                   (body_bytes + 3) / 4, $2)
              WHERE id = ANY($1)",
            &[split.too_many_tokens.into(), cap.into()],
        );
    }
    if split.batch.is_empty() {
        return None;
    }
    let batch_id = Spi::get_one_with_args::<i64>(
        "INSERT INTO llmbatching.batches (endpoint, model, request_count, estimated_tokens)
         VALUES ($1, $2, $3, $4) RETURNING id",
        &[
            endpoint.into(),
            model.into(),
            (split.batch.len() as i32).into(),
            (split.estimated_tokens as i64).into(),
        ],
    )
    .unwrap_or_else(|e| fail("creating a batch", e))?;
    // Only the worker claims requests, but a role may cancel one of them meanwhile: the claim
    // takes those still queued (no row is locked in advance, which would write every row twice).
    let (claimed, formatted, roles) = Spi::connect_mut(|client| {
        let row = client
            .update(
                "WITH claimed AS (
                     UPDATE llmbatching.requests
                        SET state = 'submitted', batch_id = $1, attempts = attempts + 1, submitted_at = now()
                      WHERE id = ANY($2) AND state = 'queued' AND reused_from IS NULL
                     RETURNING answer_format IS NOT NULL AS formatted, submitted_by)
                 SELECT count(*), count(*) FILTER (WHERE formatted),
                        coalesce(array_agg(DISTINCT submitted_by::text), '{}')
                   FROM claimed",
                None,
                &[batch_id.into(), split.batch.into()],
            )?
            .first();
        Ok::<_, pgrx::spi::SpiError>((
            row.get::<i64>(1)?.unwrap_or(0),
            row.get::<i64>(2)?.unwrap_or(0),
            row.get::<Vec<String>>(3)?.unwrap_or_default(),
        ))
    })
    .unwrap_or_else(|e| fail("claiming queued requests", e));
    if claimed == 0 {
        run(
            "DELETE FROM llmbatching.batches WHERE id = $1",
            &[batch_id.into()],
        );
        return None;
    }
    run(
        "UPDATE llmbatching.batches SET request_count = $2, answer_formats = $3, roles = $4::name[]
          WHERE id = $1",
        &[
            batch_id.into(),
            (claimed as i32).into(),
            (formatted as i32).into(),
            roles.into(),
        ],
    );
    Some(batch_id)
}

/// A batch as the worker sees it.
#[derive(Clone, Debug)]
pub struct BatchRow {
    pub id: i64,
    pub endpoint: String,
    pub model: String,
    pub state: String,
    pub provider_status: Option<String>,
    pub provider_errors: Option<String>,
    pub input_file_id: Option<String>,
    pub provider_batch_id: Option<String>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub step_failures: i32,
    pub create_attempted: bool,
    /// Result lines the provider's request counts promise (completed + failed).
    pub counted_results: i64,
    pub cancel_requested: bool,
    pub cancel_sent: bool,
    /// Whether any of its requests asked for an answer format to check.
    pub has_answer_formats: bool,
}

impl BatchRow {
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::parse(&self.endpoint).unwrap_or(Endpoint::Responses)
    }
}

const BATCH_COLUMNS: &str = "id, endpoint, state, provider_status, provider_errors, input_file_id, provider_batch_id,
     output_file_id, error_file_id, step_failures, create_attempted_at IS NOT NULL, model,
     (completed_count + failed_count)::bigint, cancel_requested_at IS NOT NULL, cancel_sent_at IS NOT NULL,
     answer_formats > 0";

fn batch_rows(
    client: &SpiClient<'_>,
    sql: &str,
    args: &[pgrx::datum::DatumWithOid],
) -> SpiResult<Vec<BatchRow>> {
    client
        .select(sql, None, args)?
        .map(|row| {
            Ok(BatchRow {
                id: row.get(1)?.unwrap_or(0),
                endpoint: row.get(2)?.unwrap_or_default(),
                state: row.get(3)?.unwrap_or_default(),
                provider_status: row.get(4)?,
                provider_errors: row.get(5)?,
                input_file_id: row.get(6)?,
                provider_batch_id: row.get(7)?,
                output_file_id: row.get(8)?,
                error_file_id: row.get(9)?,
                step_failures: row.get(10)?.unwrap_or(0),
                create_attempted: row.get(11)?.unwrap_or(false),
                model: row.get(12)?.unwrap_or_default(),
                counted_results: row.get(13)?.unwrap_or(0),
                cancel_requested: row.get(14)?.unwrap_or(false),
                cancel_sent: row.get(15)?.unwrap_or(false),
                has_answer_formats: row.get(16)?.unwrap_or(true),
            })
        })
        .collect()
}

/// Batches with a step due now, oldest first.
pub fn batches_due() -> Vec<BatchRow> {
    let sql = format!(
        "SELECT {BATCH_COLUMNS} FROM llmbatching.batches
          WHERE state <> 'done' AND next_check_at <= clock_timestamp() ORDER BY next_check_at, id"
    );
    Spi::connect(|client| batch_rows(client, &sql, &[]))
        .unwrap_or_else(|e| fail("reading open batches", e))
}

pub fn batch(id: i64) -> Option<BatchRow> {
    let sql = format!("SELECT {BATCH_COLUMNS} FROM llmbatching.batches WHERE id = $1");
    Spi::connect(|client| batch_rows(client, &sql, &[id.into()]))
        .unwrap_or_else(|e| fail("reading a batch", e))
        .pop()
}

/// Writes a batch's input file, one JSONL line per request, reading the requests through a
/// cursor so the file is never held in memory whole. Returns (lines, bytes).
pub fn write_input_file(batch: &BatchRow, path: &Path) -> std::io::Result<(usize, u64)> {
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
                        let line = batch_line(&custom_id(id), &batch.endpoint, &body)
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

pub fn record_uploaded(batch_id: i64, file_id: &str, bytes: u64) {
    run(
        "UPDATE llmbatching.batches SET state = 'uploaded', input_file_id = $2, input_bytes = $3,
                step_failures = 0, last_error = NULL, next_check_at = now()
          WHERE id = $1",
        &[batch_id.into(), file_id.into(), (bytes as i64).into()],
    );
}

/// Notes that a create call is about to be made, so that after a crash the worker looks for
/// the batch at the provider before creating it again.
pub fn record_create_attempt(batch_id: i64) {
    run(
        "UPDATE llmbatching.batches SET create_attempted_at = now() WHERE id = $1",
        &[batch_id.into()],
    );
}

pub fn record_submitted(batch_id: i64, info: &BatchInfo, poll_interval: Duration) {
    run(
        "UPDATE llmbatching.batches SET state = 'submitted', provider_batch_id = $2, provider_status = $3,
                submitted_at = now(), step_failures = 0, last_error = NULL,
                next_check_at = now() + make_interval(secs => $4)
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
                ended_at = CASE WHEN $2 = 'ingesting' THEN now() END,
                next_check_at = CASE WHEN $2 = 'ingesting' THEN now() ELSE now() + make_interval(secs => $11) END
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

/// Records the error that ended a batch, for administrators.
pub fn record_last_error(batch_id: i64, error: &str) {
    run(
        "UPDATE llmbatching.batches SET last_error = $2 WHERE id = $1",
        &[batch_id.into(), error.into()],
    );
}

/// Fails one request of a batch whose answer could not be stored.
pub fn fail_request(batch_id: i64, request_id: i64, reason: &str) {
    run(
        "UPDATE llmbatching.requests SET state = 'failed', error = $3, finished_at = now()
          WHERE id = $2 AND batch_id = $1 AND state = 'submitted'",
        &[batch_id.into(), request_id.into(), reason.into()],
    );
}

/// Records a failed step and when to try it again.
pub fn record_step_failure(batch_id: i64, error: &str, retry_in: Duration) {
    run(
        "UPDATE llmbatching.batches SET last_error = $2, step_failures = step_failures + 1,
                next_check_at = now() + make_interval(secs => $3)
          WHERE id = $1",
        &[batch_id.into(), error.into(), seconds(retry_in).into()],
    );
}

/// How a statement applying results finds each request: by primary key, and only while it is
/// still `submitted` in the batch the results belong to (`x.claimed_batch`, `x.claimed_state`).
///
/// The batch and the state are columns of the joined rows, not constants, and those rows come
/// from a subquery the planner may not flatten (`OFFSET 0`). So no condition narrows the
/// requests table on its own, and the one cheap-looking plan is a probe of the primary key per
/// line. Written with constants, statistics taken before the claim (no request `submitted`)
/// made the table look like one row, and a 5,000-line chunk walked the whole table once per line.
/// `IS NOT DISTINCT FROM` keeps the batch index out; sequential scans are off ([`apply_results`]).
const CLAIMED_BY: &str =
    "r.id = x.id AND r.batch_id IS NOT DISTINCT FROM x.claimed_batch AND r.state = x.claimed_state";

/// The rows of `source` (a row source with its alias, such as `unnest(...) AS s(id, reason)`),
/// as the subquery `x` that [`CLAIMED_BY`] matches: each with the batch `$1` and the state
/// `submitted`, not to be flattened into the outer statement.
fn claimed_rows(source: &str) -> String {
    format!(
        "(SELECT s.*, $1::bigint AS claimed_batch, 'submitted'::text AS claimed_state
            FROM {source}
          OFFSET 0) x"
    )
}

/// Requests go back to the queue with their reason, or fail with it once they have used all
/// their attempts. `source` yields `(id, reason)` rows; `$1` is the batch, `$2` the max attempts,
/// `$3` how many attempts to give back (1 when the provider refused the batch through no fault
/// of its requests). Only requests still `submitted` in the batch are touched, so applying the
/// same results twice changes nothing.
fn requeue_or_fail(source: &str, args: &[pgrx::datum::DatumWithOid]) {
    run(
        &format!(
            "UPDATE llmbatching.requests r SET
                    attempts = r.attempts - $3,
                    state = CASE WHEN r.attempts - $3 >= $2 THEN 'failed' ELSE 'queued' END,
                    error = CASE WHEN r.attempts - $3 >= $2
                                 THEN x.reason || format(' (gave up after %s attempts)', r.attempts - $3)
                                 ELSE x.reason END,
                    batch_id = CASE WHEN r.attempts - $3 >= $2 THEN r.batch_id END,
                    queued_at = now(),
                    finished_at = CASE WHEN r.attempts - $3 >= $2 THEN now() END
               FROM {}
              WHERE {CLAIMED_BY}",
            claimed_rows(&format!("{source} AS s(id, reason)"))
        ),
        args,
    );
}

/// The answer formats the given requests asked for (only those that asked for one).
fn answer_formats(ids: Vec<i64>) -> HashMap<i64, AnswerFormat> {
    if ids.is_empty() {
        return HashMap::new();
    }
    Spi::connect(|client| {
        client
            .select(
                "SELECT id, answer_format FROM llmbatching.requests WHERE id = ANY($1) AND answer_format IS NOT NULL",
                None,
                &[ids.into()],
            )?
            .map(|row| Ok((row.get::<i64>(1)?.unwrap_or(0), row.get::<JsonB>(2)?)))
            .collect::<SpiResult<Vec<_>>>()
    })
    .unwrap_or_else(|e| fail("reading answer formats", e))
    .into_iter()
    .filter_map(|(id, format)| Some((id, AnswerFormat::from_json(&format?.0)?)))
    .collect()
}

/// Holds each answer to the format its request asked for: a structured answer is parsed (the
/// JSON comes back beside the result), and one that breaks its format fails the request.
/// `any_formats` false (no request of the batch asked for one) spares looking them up.
fn enforce_answer_formats(
    results: Vec<LineResult>,
    any_formats: bool,
) -> Vec<(LineResult, Option<Value>)> {
    if !any_formats {
        return results.into_iter().map(|result| (result, None)).collect();
    }
    let completed = results
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Completed { .. }))
        .map(|r| r.request_id);
    let formats = answer_formats(completed.collect());
    results
        .into_iter()
        .map(|mut result| {
            let Some(format) = formats.get(&result.request_id) else {
                return (result, None);
            };
            let Outcome::Completed { response, text, .. } = &mut result.outcome else {
                return (result, None);
            };
            match check_answer(format, text.as_deref()) {
                Ok((checked, json)) => {
                    *text = checked;
                    (result, Some(json))
                }
                Err(message) => {
                    let response = Some(std::mem::take(response));
                    result.outcome = Outcome::Failed { message, response };
                    (result, None)
                }
            }
        })
        .collect()
}

/// Applies one chunk of result lines of a batch.
///
/// Every statement here finds its rows by primary key, one probe per line (see [`CLAIMED_BY`]).
pub fn apply_results(
    batch_id: i64,
    results: Vec<LineResult>,
    max_attempts: i32,
    any_answer_formats: bool,
) {
    run("SET LOCAL enable_seqscan = off", &[]);
    let (mut done_ids, mut responses, mut texts, mut answers) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut input_tokens, mut cached_tokens, mut output_tokens, mut reasoning_tokens) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut failed_ids, mut messages, mut failed_bodies) = (Vec::new(), Vec::new(), Vec::new());
    let (mut retry_ids, mut reasons) = (Vec::new(), Vec::new());
    for (result, answer) in enforce_answer_formats(results, any_answer_formats) {
        match result.outcome {
            Outcome::Completed {
                response,
                text,
                usage,
            } => {
                done_ids.push(result.request_id);
                responses.push(response);
                texts.push(text);
                input_tokens.push(usage.input);
                cached_tokens.push(usage.cached);
                output_tokens.push(usage.output);
                reasoning_tokens.push(usage.reasoning);
                answers.push(answer.map(JsonB));
            }
            Outcome::Failed { message, response } => {
                failed_ids.push(result.request_id);
                messages.push(message);
                failed_bodies.push(response);
            }
            // Read again and still unreadable: it ran, so it fails rather than being sent again;
            // the line is kept for the operator.
            Outcome::Unreadable { reason, line } => {
                failed_ids.push(result.request_id);
                messages.push(format!(
                    "{reason}; the request ran, so it is not sent again (the line is kept in response)"
                ));
                failed_bodies.push(Some(line));
            }
            Outcome::Retry { reason } => {
                retry_ids.push(result.request_id);
                reasons.push(reason);
            }
        }
    }
    if !done_ids.is_empty() {
        run(
            &format!("UPDATE llmbatching.requests r SET state = 'completed', response = x.response::jsonb, result_text = x.text,
                    result_json = x.answer, input_tokens = x.input_tokens, cached_tokens = x.cached_tokens,
                    output_tokens = x.output_tokens, reasoning_tokens = x.reasoning_tokens,
                    error = NULL, finished_at = now()
               FROM {}
              WHERE {CLAIMED_BY}",
              claimed_rows("unnest($2::bigint[], $3::text[], $4::text[], $5::int[], $6::int[], $7::int[], $8::int[], $9::jsonb[])
                                AS s(id, response, text, input_tokens, cached_tokens, output_tokens, reasoning_tokens, answer)")),
            &[
                batch_id.into(),
                done_ids.into(),
                responses.into(),
                texts.into(),
                input_tokens.into(),
                cached_tokens.into(),
                output_tokens.into(),
                reasoning_tokens.into(),
                answers.into(),
            ],
        );
    }
    if !failed_ids.is_empty() {
        run(
            &format!("UPDATE llmbatching.requests r SET state = 'failed', error = x.message, response = x.response::jsonb,
                    finished_at = now()
               FROM {}
              WHERE {CLAIMED_BY}",
              claimed_rows("unnest($2::bigint[], $3::text[], $4::text[]) AS s(id, message, response)")),
            &[batch_id.into(), failed_ids.into(), messages.into(), failed_bodies.into()],
        );
    }
    if !retry_ids.is_empty() {
        requeue_or_fail(
            "unnest($4::bigint[], $5::text[])",
            &[
                batch_id.into(),
                max_attempts.into(),
                0i32.into(),
                retry_ids.into(),
                reasons.into(),
            ],
        );
    }
}

/// Ends a batch: every request of it that no result line settled goes back to the queue (or
/// fails, out of attempts) with `reason`, and the batch is `done`. With `refund_attempt` the
/// requests get back the attempt this batch used.
pub fn close_batch(batch_id: i64, reason: &str, max_attempts: i32, refund_attempt: bool) {
    requeue_or_fail(
        "(SELECT id, $4::text FROM llmbatching.requests WHERE batch_id = $1 AND state = 'submitted')",
        &[batch_id.into(), max_attempts.into(), (refund_attempt as i32).into(), reason.into()],
    );
    run(
        "UPDATE llmbatching.batches SET state = 'done', finished_at = now() WHERE id = $1",
        &[batch_id.into()],
    );
}

/// Holds back a model's new batches until `pause` has passed.
pub fn pause_model(model: &str, pause: Duration, reason: &str) {
    run(
        "INSERT INTO llmbatching.model_pauses (model, paused_until, reason)
         VALUES ($1, now() + make_interval(secs => $2), $3)
         ON CONFLICT (model) DO UPDATE SET paused_until = excluded.paused_until, reason = excluded.reason",
        &[model.into(), seconds(pause).into(), reason.into()],
    );
}

/// Requests waiting on an identical request that was cancelled (or purged) wait on the oldest
/// of themselves instead, which is then sent.
pub fn promote_orphaned_duplicates() {
    run(
        "WITH orphans AS (
             SELECT f.id, min(f.id) OVER (PARTITION BY f.reused_from) AS heir
               FROM llmbatching.requests f
               LEFT JOIN llmbatching.requests leader ON leader.id = f.reused_from
              WHERE f.state = 'queued' AND f.reused_from IS NOT NULL
                AND (leader.id IS NULL OR leader.state = 'cancelled'))
         UPDATE llmbatching.requests f SET reused_from = NULLIF(o.heir, f.id)
           FROM orphans o WHERE f.id = o.id",
        &[],
    );
}

/// Marks for cancellation at the provider the open batches whose every request was cancelled.
pub fn flag_cancelled_batches() {
    run(
        "UPDATE llmbatching.batches b SET cancel_requested_at = now(), next_check_at = now()
          WHERE b.state IN ('pending', 'uploaded', 'submitted') AND b.cancel_requested_at IS NULL
            AND EXISTS (SELECT FROM llmbatching.requests r WHERE r.batch_id = b.id AND r.state = 'cancelled')
            AND NOT EXISTS (SELECT FROM llmbatching.requests r WHERE r.batch_id = b.id AND r.state = 'submitted')",
        &[],
    );
}

pub fn record_cancel_sent(batch_id: i64) {
    run(
        "UPDATE llmbatching.batches SET cancel_sent_at = now() WHERE id = $1",
        &[batch_id.into()],
    );
}

pub fn record_files_deleted(batch_id: i64) {
    run(
        "UPDATE llmbatching.batches SET files_deleted_at = now() WHERE id = $1",
        &[batch_id.into()],
    );
}

/// Deletes finished requests, then done batches left without requests, older than `retention`
/// (see `llmbatching.purge_before`). Returns how many requests and batches went.
pub fn purge_finished(retention: Duration) -> (i64, i64) {
    let (requests, batches) = Spi::get_two_with_args::<i64, i64>(
        "SELECT requests, batches FROM llmbatching.purge_before(now() - make_interval(secs => $1))",
        &[seconds(retention).into()],
    )
    .unwrap_or_else(|e| fail("purging finished rows", e));
    (requests.unwrap_or(0), batches.unwrap_or(0))
}

/// How long until a batch's next step or the end of a model's pause, whichever comes first.
/// (Queued groups' waits are known from [`queued_groups`].)
pub fn next_step_due() -> Option<Duration> {
    Spi::get_one::<f64>(
        "SELECT extract(epoch FROM least(
                    (SELECT min(next_check_at) FROM llmbatching.batches WHERE state <> 'done'),
                    (SELECT min(paused_until) FROM llmbatching.model_pauses WHERE paused_until > now()))
                - clock_timestamp())::float8",
    )
    .unwrap_or_else(|e| fail("computing the next wake-up", e))
    .map(|secs| Duration::from_secs_f64(secs.max(0.0)))
}
