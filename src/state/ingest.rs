//! Reading a batch's answers back: applying result lines to their requests, and ending the
//! batch with what no line settled.

use super::{fail, run, seconds};
use crate::request::AnswerFormat;
use crate::results::{check_answer, LineResult, Outcome};
use pgrx::prelude::*;
use pgrx::spi::SpiResult;
use pgrx::JsonB;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// Which of these ids, named by the result lines of batch `batch_id`, are requests at all (a
/// line may name one that is not). Nearly every line names a request of its own batch: those
/// are read in one pass over the batch's index entries, and only the others are looked up one
/// by one.
pub fn existing_ids(batch_id: i64, ids: Vec<i64>) -> HashSet<i64> {
    run("SET LOCAL enable_seqscan = off", &[]);
    let in_batch = ids_where(
        "SELECT r.id FROM llmbatching.requests r WHERE r.batch_id = $1",
        &[batch_id.into()],
    );
    let (mut known, mut others) = (HashSet::new(), Vec::new());
    for id in ids {
        if in_batch.contains(&id) {
            known.insert(id);
        } else {
            others.push(id);
        }
    }
    if !others.is_empty() {
        known.extend(ids_where(
            "SELECT r.id FROM llmbatching.requests r WHERE r.id = ANY ($1)",
            &[others.into()],
        ));
    }
    known
}

fn ids_where(sql: &str, args: &[pgrx::datum::DatumWithOid]) -> HashSet<i64> {
    Spi::connect(|client| {
        client
            .select(sql, None, args)?
            .map(|row| row.get::<i64>(1).map(Option::unwrap_or_default))
            .collect::<SpiResult<HashSet<i64>>>()
    })
    .unwrap_or_else(|e| fail("reading the requests a batch's results name", e))
}

/// Of the requests `ids` still `submitted` in batch `batch_id`, locks, without waiting, those no
/// other transaction holds, with the rows that applying their results changes too: the
/// identical requests waiting on them, and the write-backs of both. Returns the ids it locked
/// with all of those, and how many it could not: a role may keep its own rows locked (`SELECT …
/// FOR UPDATE`, or a cancellation not yet committed), and waiting for it would hold up every
/// other role's answers. Those are kept aside (see `held`), neither failed nor sent again.
/// (Ids no longer submitted in the batch are in neither set: applying their results changes
/// nothing.)
pub fn lock_unheld(batch_id: i64, ids: Vec<i64>) -> (HashSet<i64>, HashSet<i64>) {
    let pending = format!(
        "SELECT r.id FROM llmbatching.requests r,
                {}
          WHERE {CLAIMED_BY}",
        claimed_rows("pg_catalog.unnest($2::bigint[]) AS s(id)")
    );
    let submitted = ids_where(&pending, &[batch_id.into(), ids.clone().into()]);
    let mut unheld = ids_where(
        &format!("{pending} FOR NO KEY UPDATE OF r SKIP LOCKED"),
        &[batch_id.into(), ids.into()],
    );
    let locked: Vec<i64> = unheld.iter().copied().collect();
    // The identical requests waiting on those: every one, and those it could lock.
    let waiting = "SELECT f.id, f.reused_from FROM llmbatching.requests f
                    WHERE f.reused_from = ANY ($1) AND f.state = 'queued'";
    let followers = pairs_where(waiting, &[locked.clone().into()]);
    let followers_locked = ids_where(
        &format!("SELECT l.id FROM ({waiting} FOR NO KEY UPDATE OF f SKIP LOCKED) l"),
        &[locked.clone().into()],
    );
    // The write-backs of the requests and of those waiting on them.
    let mut with_followers = locked;
    with_followers.extend(followers.iter().map(|(id, _)| *id));
    let writebacks = "SELECT w.request_id FROM llmbatching.writebacks w
                       WHERE w.request_id = ANY ($1) AND w.written_at IS NULL";
    let writebacks_all = ids_where(writebacks, &[with_followers.clone().into()]);
    let writebacks_locked = ids_where(
        &format!("{writebacks} FOR NO KEY UPDATE SKIP LOCKED"),
        &[with_followers.into()],
    );
    let held = |id: &i64| writebacks_all.contains(id) && !writebacks_locked.contains(id);
    unheld.retain(|id| !held(id));
    for (follower, leader) in &followers {
        if !followers_locked.contains(follower) || held(follower) {
            unheld.remove(leader);
        }
    }
    let held = submitted.difference(&unheld).copied().collect();
    (unheld, held)
}

/// The (id, other id) pairs `sql` selects.
fn pairs_where(sql: &str, args: &[pgrx::datum::DatumWithOid]) -> Vec<(i64, i64)> {
    Spi::connect(|client| {
        client
            .select(sql, None, args)?
            .map(|row| {
                Ok((
                    row.get::<i64>(1)?.unwrap_or(0),
                    row.get::<i64>(2)?.unwrap_or(0),
                ))
            })
            .collect::<SpiResult<Vec<_>>>()
    })
    .unwrap_or_else(|e| fail("reading the requests waiting on a batch's", e))
}

/// After a reading that left requests their roles hold locked: the batch now carries only
/// those roles' requests, so only their caps on open batches count it (see
/// `claim::claim_candidates`), not the caps of every role whose answers it already gave.
pub fn keep_roles_still_waiting(batch_id: i64) {
    run(
        "UPDATE llmbatching.batches b
            SET roles = ARRAY(SELECT DISTINCT r.submitted_by FROM llmbatching.requests r
                               WHERE r.batch_id = b.id AND r.state = 'submitted' ORDER BY 1)
          WHERE b.id = $1",
        &[batch_id.into()],
    );
}

/// Fails one request of a batch whose answer could not be stored.
pub fn fail_request(batch_id: i64, request_id: i64, reason: &str) {
    run(
        "UPDATE llmbatching.requests SET state = 'failed', error = $3, finished_at = pg_catalog.now()
          WHERE id = $2 AND batch_id = $1 AND state = 'submitted'",
        &[batch_id.into(), request_id.into(), reason.into()],
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

/// The rows of `source` (a row source with its alias, such as `ROWS FROM (unnest(...), ...) AS s(id, reason)`),
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
                                 THEN x.reason || pg_catalog.format(' (gave up after %s attempts)', r.attempts - $3)
                                 ELSE x.reason END,
                    batch_id = CASE WHEN r.attempts - $3 >= $2 THEN r.batch_id END,
                    queued_at = pg_catalog.now(),
                    finished_at = CASE WHEN r.attempts - $3 >= $2 THEN pg_catalog.now() END
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

/// Applies one chunk of result lines of a batch; returns those left out because their rows
/// are held. With `skip_held`, results whose rows another transaction holds are left (see
/// [`lock_unheld`]); without it, applying waits for them.
///
/// Every statement here finds its rows by primary key, one probe per line (see [`CLAIMED_BY`]).
pub fn apply_results(
    batch_id: i64,
    mut results: Vec<LineResult>,
    max_attempts: i32,
    any_answer_formats: bool,
    skip_held: bool,
) -> Vec<LineResult> {
    run("SET LOCAL enable_seqscan = off", &[]);
    let mut held = Vec::new();
    if skip_held {
        let ids = results.iter().map(|r| r.request_id).collect();
        let (unheld, held_ids) = lock_unheld(batch_id, ids);
        let (applied, left): (Vec<_>, Vec<_>) = results
            .into_iter()
            .partition(|r| unheld.contains(&r.request_id));
        results = applied;
        held = left
            .into_iter()
            .filter(|r| held_ids.contains(&r.request_id))
            .collect();
    }
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
                    error = NULL, finished_at = pg_catalog.now()
               FROM {}
              WHERE {CLAIMED_BY}",
              claimed_rows("ROWS FROM (pg_catalog.unnest($2::bigint[]), pg_catalog.unnest($3::text[]), pg_catalog.unnest($4::text[]), pg_catalog.unnest($5::int[]), pg_catalog.unnest($6::int[]), pg_catalog.unnest($7::int[]), pg_catalog.unnest($8::int[]), pg_catalog.unnest($9::jsonb[]))
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
                    finished_at = pg_catalog.now()
               FROM {}
              WHERE {CLAIMED_BY}",
              claimed_rows("ROWS FROM (pg_catalog.unnest($2::bigint[]), pg_catalog.unnest($3::text[]), pg_catalog.unnest($4::text[])) AS s(id, message, response)")),
            &[batch_id.into(), failed_ids.into(), messages.into(), failed_bodies.into()],
        );
    }
    if !retry_ids.is_empty() {
        requeue_or_fail(
            "ROWS FROM (pg_catalog.unnest($4::bigint[]), pg_catalog.unnest($5::text[]))",
            &[
                batch_id.into(),
                max_attempts.into(),
                0i32.into(),
                retry_ids.into(),
                reasons.into(),
            ],
        );
    }
    held
}

/// Ends a batch: every request of it that no result line settled goes back to the queue (or
/// fails, out of attempts) with `reason`, and the batch is `done`. With `refund_attempt` the
/// requests get back the attempt this batch used. Requests whose answer is kept aside (see
/// `held`) wait for it; those their role holds locked get `reason` kept aside as their answer,
/// applied once the lock is gone (without the refund: it is one attempt more, not a request
/// sent twice).
pub fn close_batch(batch_id: i64, reason: &str, max_attempts: i32, refund_attempt: bool) {
    super::bound_lock_waits();
    let can_keep = super::schema_is_current();
    let unsettled = ids_where(
        &format!(
            "SELECT r.id FROM llmbatching.requests r
              WHERE r.batch_id = $1 AND r.state = 'submitted' {}",
            if can_keep {
                "AND NOT EXISTS (SELECT FROM llmbatching.held_answers h
                                  WHERE h.request_id = r.id AND h.batch_id = r.batch_id)"
            } else {
                ""
            }
        ),
        &[batch_id.into()],
    );
    if !unsettled.is_empty() {
        let (free, held) = lock_unheld(batch_id, unsettled.into_iter().collect());
        if !held.is_empty() && !can_keep {
            // (A schema older than this library has nowhere to keep them: the batch is closed
            // at a later try.)
            fail::<()>("closing a batch", "a request its role holds locked");
        }
        let kept: Vec<LineResult> = held
            .into_iter()
            .map(|request_id| LineResult {
                request_id,
                outcome: Outcome::Retry {
                    reason: reason.to_string(),
                },
            })
            .collect();
        super::held::keep(batch_id, &kept);
        requeue_or_fail(
            "(SELECT u.id, $5::text FROM pg_catalog.unnest($4::bigint[]) AS u(id))",
            &[
                batch_id.into(),
                max_attempts.into(),
                (refund_attempt as i32).into(),
                free.into_iter().collect::<Vec<i64>>().into(),
                reason.into(),
            ],
        );
    }
    run(
        "UPDATE llmbatching.batches b SET state = 'done', finished_at = pg_catalog.now(),
                cancelled_count = (SELECT pg_catalog.count(*) FROM llmbatching.requests r
                                    WHERE r.batch_id = b.id AND r.state = 'cancelled')
          WHERE b.id = $1",
        &[batch_id.into()],
    );
}

/// Holds back a model's new batches until `pause` has passed.
pub fn pause_model(model: &str, pause: Duration, reason: &str) {
    run(
        "INSERT INTO llmbatching.model_pauses (model, paused_until, reason)
         VALUES ($1, pg_catalog.now() + pg_catalog.make_interval(secs => $2), $3)
         ON CONFLICT (model) DO UPDATE SET paused_until = excluded.paused_until, reason = excluded.reason",
        &[model.into(), seconds(pause).into(), reason.into()],
    );
}
