//! Answers that came back while their request's role kept the request locked (see
//! `llmbatching.held_answers`): kept aside in the transaction that applies the others, so that
//! their batch can end rather than stay open and be read again, and applied once the lock is
//! gone.

use super::fail;
use crate::results::LineResult;
use pgrx::prelude::*;
use pgrx::spi::SpiResult;

/// Most kept answers applied at one look.
pub const APPLIED_AT_ONCE: i64 = 1000;

/// Keeps the answers of batch `batch_id` whose rows another transaction holds. An answer kept
/// already is tried again later than the last time: a role that keeps its rows locked for
/// hours costs a look every five minutes at most.
pub fn keep(batch_id: i64, held: &[LineResult]) {
    if held.is_empty() {
        return;
    }
    let ids: Vec<i64> = held.iter().map(|r| r.request_id).collect();
    let results: Vec<String> = held
        .iter()
        .map(|r| serde_json::to_string(r).unwrap_or_else(|e| fail("keeping a held answer", e)))
        .collect();
    super::run(
        "INSERT INTO llmbatching.held_answers AS h (request_id, batch_id, result)
         SELECT s.id, $1, s.result
           FROM ROWS FROM (pg_catalog.unnest($2::bigint[]), pg_catalog.unnest($3::text[])) AS s(id, result)
         ON CONFLICT (request_id) DO UPDATE
            SET tries = h.tries + 1,
                next_try_at = pg_catalog.now()
                    + pg_catalog.make_interval(secs => LEAST(300, 1 << LEAST(h.tries + 1, 9)))",
        &[batch_id.into(), ids.into(), results.into()],
    );
}

/// The kept answers due to be tried again, by batch, at most [`APPLIED_AT_ONCE`].
pub fn due() -> Vec<(i64, Vec<LineResult>)> {
    let rows = Spi::connect(|client| {
        client
            .select(
                "SELECT batch_id, result FROM llmbatching.held_answers
                  WHERE next_try_at <= pg_catalog.now()
                  ORDER BY batch_id, request_id LIMIT $1",
                None,
                &[APPLIED_AT_ONCE.into()],
            )?
            .map(|row| Ok((row.get::<i64>(1)?.unwrap_or(0), row.get::<String>(2)?)))
            .collect::<SpiResult<Vec<_>>>()
    })
    .unwrap_or_else(|e| fail("reading held answers", e));
    let mut batches: Vec<(i64, Vec<LineResult>)> = Vec::new();
    for (batch_id, result) in rows {
        // (Written by `keep`: a row that does not read is left, never applied wrongly.)
        let Some(result) = result.and_then(|r| serde_json::from_str(&r).ok()) else {
            continue;
        };
        match batches.last_mut() {
            Some((id, results)) if *id == batch_id => results.push(result),
            _ => batches.push((batch_id, vec![result])),
        }
    }
    batches
}

/// Forgets the kept answers of these requests that are no longer waiting in their batch:
/// applied, cancelled by their role meanwhile, or failed.
pub fn forget_settled(request_ids: Vec<i64>) {
    super::run(
        "DELETE FROM llmbatching.held_answers h
          WHERE h.request_id = ANY ($1)
            AND NOT EXISTS (SELECT FROM llmbatching.requests r
                             WHERE r.id = h.request_id AND r.batch_id = h.batch_id AND r.state = 'submitted')",
        &[request_ids.into()],
    );
}
