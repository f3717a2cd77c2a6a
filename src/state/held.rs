//! Answers that came back while their request's role kept the request locked (see
//! `llmbatching.held_answers`): kept aside in the transaction that applies the others, so that
//! their batch can end rather than stay open and be read again, and applied once the lock is
//! gone.
//!
//! A look at them costs the same however many a role keeps: each look takes at most
//! [`PER_ROLE`] answers of each role, the roles in turn, and at most [`PER_LOOK`] in all; it
//! reads their results only once their rows are free, in chunks bounded by size.

use super::{fail, ingest, run};
use crate::results::{LineResult, Outcome};
use pgrx::prelude::*;
use pgrx::spi::SpiResult;

/// Most kept answers one look takes, of each role and in all.
const PER_ROLE: i64 = 100;
const PER_LOOK: i64 = 1000;

/// When a kept answer `h` whose row is still held is looked at next: later each time (1, 2, 4 …
/// seconds), every five minutes at most.
const NEXT_LOOK: &str =
    "pg_catalog.now() + pg_catalog.make_interval(secs => LEAST(300, 1 << LEAST(h.tries + 1, 9)))";

/// After applying a chunk of results of batch `batch_id` (the requests `ids`): the answers of
/// those whose rows were held (`held`) are kept, and, with `forget`, those kept before for the
/// others, settled now, are forgotten. Returns how many held answers could not be kept: all of
/// them while the database's schema is older than this library (see
/// `state::schema_is_current`); those are left for a later reading.
pub fn after_applying(batch_id: i64, ids: &[i64], held: &[LineResult], forget: bool) -> usize {
    if !super::schema_is_current() {
        return held.len();
    }
    if forget {
        forget_settled(ids, held);
    }
    keep(batch_id, held);
    0
}

/// Whether any answer is kept. When none is as a batch's reading starts, none of its requests
/// can have one that the reading would settle: a request whose answer is kept is never sent
/// again, and each request gets one line of a reading.
pub fn any_kept() -> bool {
    super::schema_is_current()
        && Spi::get_one::<bool>("SELECT EXISTS (SELECT FROM llmbatching.held_answers)")
            .unwrap_or_else(|e| fail("reading held answers", e))
            .unwrap_or(false)
}

/// Forgets the kept answers of the requests `ids` but those `held` again.
fn forget_settled(ids: &[i64], held: &[LineResult]) {
    let held_ids: std::collections::HashSet<i64> = held.iter().map(|h| h.request_id).collect();
    let settled: Vec<i64> = ids
        .iter()
        .copied()
        .filter(|id| !held_ids.contains(id))
        .collect();
    run(
        "DELETE FROM llmbatching.held_answers h WHERE h.request_id = ANY ($1)",
        &[settled.into()],
    );
}

/// Keeps the answers of batch `batch_id` whose rows another transaction holds. One kept already
/// for this batch is looked at again later than the last time (every five minutes at most); one
/// kept for an earlier batch (whose reading failed, and whose request was sent again since)
/// gives way to this one.
pub fn keep(batch_id: i64, held: &[LineResult]) {
    if held.is_empty() {
        return;
    }
    let ids: Vec<i64> = held.iter().map(|r| r.request_id).collect();
    let results: Vec<String> = held
        .iter()
        .map(|r| serde_json::to_string(r).unwrap_or_else(|e| fail("keeping a held answer", e)))
        .collect();
    run(
        &format!(
            "INSERT INTO llmbatching.held_answers AS h (request_id, batch_id, submitted_by, result)
             SELECT s.id, $1, r.submitted_by, s.result
               FROM ROWS FROM (pg_catalog.unnest($2::bigint[]), pg_catalog.unnest($3::text[])) AS s(id, result)
               JOIN llmbatching.requests r ON r.id = s.id
             ON CONFLICT (request_id) DO UPDATE
                SET tries = CASE WHEN h.batch_id = excluded.batch_id THEN h.tries + 1 ELSE 0 END,
                    next_try_at = CASE WHEN h.batch_id = excluded.batch_id THEN {NEXT_LOOK}
                                       ELSE pg_catalog.now() END,
                    held_since = CASE WHEN h.batch_id = excluded.batch_id THEN h.held_since ELSE pg_catalog.now() END,
                    batch_id = excluded.batch_id, result = excluded.result"
        ),
        &[batch_id.into(), ids.into(), results.into()],
    );
}

/// The kept answers due for another look, by batch (ids only): each role's that have waited
/// longest, the roles in turn.
pub fn due() -> Vec<(i64, Vec<i64>)> {
    if !super::schema_is_current() {
        return Vec::new();
    }
    Spi::connect(|client| {
        client
            .select(
                "WITH RECURSIVE roles AS (
                     (SELECT h.submitted_by FROM llmbatching.held_answers h
                       ORDER BY h.submitted_by LIMIT 1)
                     UNION ALL
                     SELECT next.submitted_by
                       FROM roles o
                      CROSS JOIN LATERAL (
                          SELECT h.submitted_by FROM llmbatching.held_answers h
                           WHERE h.submitted_by > o.submitted_by
                           ORDER BY h.submitted_by LIMIT 1) next)
                 SELECT d.batch_id, pg_catalog.array_agg(d.request_id ORDER BY d.request_id)
                   FROM (SELECT l.batch_id, l.request_id
                           FROM roles o
                          CROSS JOIN LATERAL (
                              SELECT f.batch_id, f.request_id, f.next_try_at,
                                     pg_catalog.row_number() OVER (ORDER BY f.next_try_at) AS turn
                                FROM (SELECT h.batch_id, h.request_id, h.next_try_at
                                        FROM llmbatching.held_answers h
                                       WHERE h.submitted_by = o.submitted_by AND h.next_try_at <= pg_catalog.now()
                                       ORDER BY h.next_try_at LIMIT $1) f) l
                          ORDER BY l.turn, l.next_try_at LIMIT $2) d
                  GROUP BY d.batch_id ORDER BY d.batch_id",
                None,
                &[PER_ROLE.into(), PER_LOOK.into()],
            )?
            .map(|row| {
                Ok((
                    row.get::<i64>(1)?.unwrap_or(0),
                    row.get::<Vec<i64>>(2)?.unwrap_or_default(),
                ))
            })
            .collect::<SpiResult<Vec<_>>>()
    })
    .unwrap_or_else(|e| fail("reading held answers", e))
}

/// Of the kept answers `ids` of batch `batch_id`, those whose rows are free now, with the size
/// of each kept result. Those still held are looked at again later (see [`keep`]); those whose
/// request no longer waits in the batch (cancelled, or settled by a later reading) are
/// forgotten.
pub fn free_now(batch_id: i64, ids: Vec<i64>) -> Vec<(i64, usize)> {
    let (free, held) = ingest::lock_unheld(batch_id, ids.clone());
    let (free, held): (Vec<i64>, Vec<i64>) =
        (free.into_iter().collect(), held.into_iter().collect());
    run(
        &format!(
            "UPDATE llmbatching.held_answers h SET tries = h.tries + 1, next_try_at = {NEXT_LOOK}
              WHERE h.request_id = ANY ($1)"
        ),
        &[held.clone().into()],
    );
    run(
        "DELETE FROM llmbatching.held_answers h
          WHERE h.request_id = ANY ($1) AND h.request_id <> ALL ($2) AND h.request_id <> ALL ($3)",
        &[ids.into(), free.clone().into(), held.into()],
    );
    Spi::connect(|client| {
        client
            .select(
                "SELECT h.request_id, pg_catalog.octet_length(h.result)
                   FROM llmbatching.held_answers h WHERE h.request_id = ANY ($1)",
                None,
                &[free.into()],
            )?
            .map(|row| {
                Ok((
                    row.get::<i64>(1)?.unwrap_or(0),
                    row.get::<i32>(2)?.unwrap_or(0) as usize,
                ))
            })
            .collect::<SpiResult<Vec<_>>>()
    })
    .unwrap_or_else(|e| fail("reading held answers", e))
}

/// The kept results of `ids`, as they were kept. One that does not read back (it never should)
/// is an unreadable line: its request fails with it, rather than wait for ever.
pub fn results(ids: Vec<i64>) -> Vec<LineResult> {
    Spi::connect(|client| {
        client
            .select(
                "SELECT h.request_id, h.result FROM llmbatching.held_answers h WHERE h.request_id = ANY ($1)",
                None,
                &[ids.into()],
            )?
            .map(|row| {
                let (id, kept) = (row.get::<i64>(1)?.unwrap_or(0), row.get::<String>(2)?);
                let kept = kept.unwrap_or_default();
                Ok(serde_json::from_str(&kept).unwrap_or(LineResult {
                    request_id: id,
                    outcome: Outcome::Unreadable {
                        reason: "the answer kept while the request was held does not read back"
                            .into(),
                        line: kept,
                    },
                }))
            })
            .collect::<SpiResult<Vec<_>>>()
    })
    .unwrap_or_else(|e| fail("reading held answers", e))
}

/// How long until the first kept answer is due for another look, if any is kept.
pub fn next_due() -> Option<std::time::Duration> {
    if !super::schema_is_current() {
        return None;
    }
    Spi::get_one::<f64>(
        "SELECT extract(epoch FROM pg_catalog.min(h.next_try_at) - pg_catalog.clock_timestamp())::float8
           FROM llmbatching.held_answers h",
    )
    .unwrap_or_else(|e| fail("reading held answers", e))
    .map(|secs| std::time::Duration::from_secs_f64(secs.max(0.0)))
}
