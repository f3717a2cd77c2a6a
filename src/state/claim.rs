//! Claiming queued requests into batches: which groups are due, what the limits leave room
//! for, and every waiting role's requests in turn.

use super::{fail, run};
use crate::planner::{self, BatchLimits, Candidate, QueuedGroup, TokenBudget};
use pgrx::prelude::*;
use pgrx::spi::SpiResult;
use std::time::Duration;

/// A group of queued requests that share one provider, account, endpoint and model.
#[derive(Clone)]
pub struct Group {
    pub provider: String,
    pub account: String,
    pub endpoint: String,
    pub model: String,
}

impl Group {
    /// What tells this group from the others.
    pub fn key(&self) -> String {
        format!(
            "{}\n{}\n{}\n{}",
            self.provider, self.account, self.endpoint, self.model
        )
    }
}

/// The groups with queued requests (a skip scan of the queue index: one probe per group), with
/// nothing read of their requests yet: [`measure_group`] reads that, for the groups that may
/// claim now, so that a round in which no group may (their routes busy sending) reads nothing
/// of a million queued requests.
pub fn queued_groups() -> Vec<Group> {
    Spi::connect(|client| {
        let rows = client.select(
            "WITH RECURSIVE groups AS (
                 (SELECT provider, account, endpoint, model FROM llmbatching.requests
                   WHERE state = 'queued' AND reused_from IS NULL
                   ORDER BY provider, account, endpoint, model LIMIT 1)
                 UNION ALL
                 SELECT next.provider, next.account, next.endpoint, next.model
                   FROM groups g
                  CROSS JOIN LATERAL (
                      SELECT r.provider, r.account, r.endpoint, r.model FROM llmbatching.requests r
                       WHERE r.state = 'queued' AND r.reused_from IS NULL
                         AND (r.provider, r.account, r.endpoint, r.model) > (g.provider, g.account, g.endpoint, g.model)
                       ORDER BY r.provider, r.account, r.endpoint, r.model LIMIT 1) next)
             SELECT g.endpoint, g.model, g.provider, g.account
               FROM groups g
              WHERE NOT EXISTS (SELECT FROM llmbatching.model_pauses p
                                 WHERE p.model = g.model AND p.paused_until > pg_catalog.now())
              ORDER BY g.provider, g.account, g.endpoint, g.model",
            None,
            &[],
        )?;
        rows.map(|row| {
            Ok(Group {
                endpoint: row.get(1)?.unwrap_or_default(),
                model: row.get(2)?.unwrap_or_default(),
                provider: row.get(3)?.unwrap_or_default(),
                account: row.get(4)?.unwrap_or_default(),
            })
        })
        .collect::<SpiResult<Vec<_>>>()
    })
    .unwrap_or_else(|e| fail("reading the queue", e))
}

/// Reads what a group holds: its first `max_requests` requests (that many make a group due
/// whatever else is queued, so the count stops there), their bytes and how long the oldest
/// waited. They come from the queue index (`requests_queue` carries the bytes and the time
/// queued), with no probe of the table per request, as in [`claim_candidates`].
pub fn measure_group(group: &Group, max_requests: usize) -> QueuedGroup {
    Spi::connect(|client| {
        let row = client
            .select(
                "SELECT pg_catalog.count(*), pg_catalog.sum(first.body_bytes)::bigint,
                        extract(epoch FROM pg_catalog.clock_timestamp() - pg_catalog.min(first.queued_at))::float8
                   FROM (SELECT q.body_bytes, q.queued_at FROM llmbatching.requests q
                          WHERE q.state = 'queued' AND q.reused_from IS NULL
                            AND q.provider = $1 AND q.account = $2 AND q.endpoint = $3 AND q.model = $4
                          ORDER BY q.id LIMIT $5) first",
                Some(1),
                &[
                    group.provider.as_str().into(),
                    group.account.as_str().into(),
                    group.endpoint.as_str().into(),
                    group.model.as_str().into(),
                    (max_requests as i64).into(),
                ],
            )?
            .first();
        Ok::<_, pgrx::spi::Error>(QueuedGroup {
            requests: row.get::<i64>(1)?.unwrap_or(0) as usize,
            body_bytes: row.get::<i64>(2)?.unwrap_or(0) as usize,
            oldest_wait: Duration::from_secs_f64(row.get::<f64>(3)?.unwrap_or(0.0).max(0.0)),
        })
    })
    .unwrap_or_else(|e| fail("reading the queue", e))
}

/// How many batches of each route (provider, account) are claimed and not yet uploaded.
pub fn unsent_batches_by_route() -> std::collections::HashMap<(String, String), i64> {
    Spi::connect(|client| {
        client
            .select(
                "SELECT provider, account, pg_catalog.count(*) FROM llmbatching.batches
                  WHERE state = 'pending' GROUP BY provider, account",
                None,
                &[],
            )?
            .map(|row| {
                Ok((
                    (
                        row.get::<String>(1)?.unwrap_or_default(),
                        row.get::<String>(2)?.unwrap_or_default(),
                    ),
                    row.get::<i64>(3)?.unwrap_or(0),
                ))
            })
            .collect::<SpiResult<_>>()
    })
    .unwrap_or_else(|e| fail("counting unsent batches", e))
}

/// How many batches are open: being sent, at the provider, or being read back.
pub fn open_batch_count() -> i64 {
    Spi::get_one::<i64>("SELECT pg_catalog.count(*) FROM llmbatching.batches WHERE state <> 'done'")
        .unwrap_or_else(|e| fail("counting open batches", e))
        .unwrap_or(0)
}

/// What the open batches hold, per provider, account and model: how many are open, and their
/// estimated tokens still enqueued at the provider (shared with other databases' workers, see
/// `registry`).
pub fn open_usage() -> Vec<OpenUsage> {
    Spi::connect(|client| {
        client
            .select(
                "SELECT provider, account, model, pg_catalog.count(*),
                        coalesce(pg_catalog.sum(estimated_tokens) FILTER (WHERE state IN ('pending', 'uploaded', 'submitted')), 0)::bigint
                   FROM llmbatching.batches WHERE state <> 'done'
                  GROUP BY provider, account, model",
                None,
                &[],
            )?
            .map(|row| {
                Ok(OpenUsage {
                    provider: row.get(1)?.unwrap_or_default(),
                    account: row.get(2)?.unwrap_or_default(),
                    model: row.get(3)?.unwrap_or_default(),
                    open_batches: row.get::<i64>(4)?.unwrap_or(0),
                    enqueued_tokens: row.get::<i64>(5)?.unwrap_or(0),
                })
            })
            .collect::<SpiResult<Vec<_>>>()
    })
    .unwrap_or_else(|e| fail("reading the open batches' usage", e))
}

/// One line of [`open_usage`].
pub struct OpenUsage {
    pub provider: String,
    pub account: String,
    pub model: String,
    pub open_batches: i64,
    pub enqueued_tokens: i64,
}

/// The model's enqueued-token cap (its row in `model_limits`, else `default_cap`) and how
/// much of it the model's open batches under the same provider and key leave free (the
/// provider counts enqueued tokens per account). None: no cap.
pub fn token_budget(group: &Group, default_cap: Option<i64>) -> Option<TokenBudget> {
    let (cap, used) = Spi::get_two_with_args::<i64, i64>(
        "SELECT coalesce((SELECT max_enqueued_tokens FROM llmbatching.model_limits WHERE model = $1), $2),
                (SELECT coalesce(pg_catalog.sum(estimated_tokens), 0)::bigint FROM llmbatching.batches
                  WHERE model = $1 AND provider = $3 AND account = $4
                    AND state IN ('pending', 'uploaded', 'submitted'))",
        &[
            group.model.as_str().into(),
            default_cap.into(),
            group.provider.as_str().into(),
            group.account.as_str().into(),
        ],
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
///
/// The ids and body sizes come from the queue indexes, which hold queued requests only and
/// carry their sizes. Read in primary-key order instead, as the planner may choose when its
/// statistics predate the last claims, every claim would step over all the requests claimed
/// before it.
fn claim_candidates(group: &Group, limit: usize, per_role_cap: i64) -> Vec<Candidate> {
    let same_group = "r.state = 'queued' AND r.reused_from IS NULL AND r.provider = $5
                      AND r.account = $6 AND r.endpoint = $1 AND r.model = $2";
    let mut rows: Vec<(String, Candidate)> = Spi::connect(|client| {
        client
            .select(
                &format!(
                    "WITH RECURSIVE roles AS (
                     (SELECT r.submitted_by FROM llmbatching.requests r
                       WHERE {same_group}
                       ORDER BY r.submitted_by LIMIT 1)
                     UNION ALL
                     SELECT next.submitted_by
                       FROM roles g
                      CROSS JOIN LATERAL (
                          SELECT r.submitted_by FROM llmbatching.requests r
                           WHERE {same_group} AND r.submitted_by > g.submitted_by
                           ORDER BY r.submitted_by LIMIT 1) next)
                 SELECT g.submitted_by::text, c.id, c.body_bytes
                   FROM roles g
                  CROSS JOIN LATERAL (
                      SELECT r.id, r.body_bytes FROM llmbatching.requests r
                       WHERE {same_group} AND r.submitted_by = g.submitted_by
                       ORDER BY r.id LIMIT $3) c
                  WHERE $4 = 0
                     OR (SELECT pg_catalog.count(*) FROM llmbatching.batches b
                          WHERE b.state <> 'done' AND g.submitted_by = ANY (b.roles)) < $4"
                ),
                None,
                &[
                    group.endpoint.as_str().into(),
                    group.model.as_str().into(),
                    (limit as i64).into(),
                    per_role_cap.into(),
                    group.provider.as_str().into(),
                    group.account.as_str().into(),
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
    // Ordered here rather than by the statement, whose sort of a batch's worth of rows would
    // spill to disk.
    rows.sort_unstable_by(|(role_a, a), (role_b, b)| role_a.cmp(role_b).then(a.id.cmp(&b.id)));
    planner::interleave_roles(planner::split_by_role(rows))
}

/// How a claim's statements find each candidate: by primary key, and only while it is still
/// queued and sent itself (a role may cancel one meanwhile). The state to match comes with
/// each id (`c.queued`), not as a constant, so that no queue index can stand for the primary
/// key (see `ingest::CLAIMED_BY`): statistics taken before a large submit show almost no queued
/// request, and the planner would scan the whole queue.
const STILL_QUEUED: &str = "r.id = c.id AND r.state = c.queued AND r.reused_from IS NULL";

/// The candidates' ids (the statement's parameter `param`, a bigint[]) as the subquery `c`
/// that [`STILL_QUEUED`] matches, not to be flattened into the outer statement.
fn queued_ids(param: &str) -> String {
    format!(
        "(SELECT c.id, 'queued'::text AS queued
            FROM pg_catalog.unnest({param}::pg_catalog.int8[]) AS c(id) OFFSET 0) c"
    )
}

/// Of the candidates, those still queued that no other transaction holds, locked now without
/// waiting: a role may keep one of its own queued requests locked (`SELECT … FOR UPDATE`, or a
/// cancellation not yet committed), and the claim would wait for it with every other role's
/// requests of the group.
fn unheld(candidates: Vec<Candidate>) -> (Vec<Candidate>, usize) {
    let ids: Vec<i64> = candidates.iter().map(|c| c.id).collect();
    let locked: std::collections::HashSet<i64> = Spi::connect(|client| {
        client
            .select(
                &format!(
                    "SELECT r.id FROM llmbatching.requests r, {}
                      WHERE {STILL_QUEUED}
                        FOR NO KEY UPDATE OF r SKIP LOCKED",
                    queued_ids("$1")
                ),
                None,
                &[ids.into()],
            )?
            .map(|row| row.get::<i64>(1).map(Option::unwrap_or_default))
            .collect::<SpiResult<_>>()
    })
    .unwrap_or_else(|e| fail("locking queued requests", e));
    let (kept, held): (Vec<Candidate>, Vec<Candidate>) =
        candidates.into_iter().partition(|c| locked.contains(&c.id));
    (kept, held.len())
}

/// What a claim did: the batch it made, if any, and whether requests held locked by their
/// role were left behind while the batch took less than it could (then the group is not
/// claimed again at once: see `Worker::form_batches`).
pub struct Claim {
    pub batch: Option<i64>,
    pub left_held: bool,
}

/// Claims queued requests of a group, every waiting role's in turn, into a new batch (state
/// `pending`); returns its id, or None when nothing could be claimed. Requests that could
/// never fit are failed. With `skip_held`, requests another transaction holds locked are left
/// for a later claim (see [`unheld`]); without it, the claim waits for them.
pub fn claim_batch(
    group: &Group,
    limits: BatchLimits,
    budget: Option<TokenBudget>,
    per_role_cap: i64,
    skip_held: bool,
) -> Claim {
    // Every statement here finds requests by their ids, one primary-key probe each: a scan of
    // the table or of an index (for a join by hash or merge), which the planner prefers for a
    // batch's worth of ids when its statistics predate a large submit, would read the whole
    // table for each claim, and a million queued requests would be read twenty times. Sorts
    // are discouraged too: the waiting roles come in order from `requests_queue_by_role`,
    // where sorting the entries of the other queue index (which a planner without statistics
    // may find as cheap) reads the whole queue for each role.
    for setting in [
        "enable_seqscan",
        "enable_hashjoin",
        "enable_mergejoin",
        "enable_sort",
    ] {
        run(&format!("SET LOCAL {setting} = off"), &[]);
    }
    let mut candidates = claim_candidates(group, limits.max_requests, per_role_cap);
    let mut held = 0;
    if skip_held {
        (candidates, held) = unheld(candidates);
    }
    let claim = |batch: Option<i64>, claimed: usize| Claim {
        batch,
        left_held: held > 0 && claimed < limits.max_requests,
    };
    let split = planner::take_batch(&candidates, limits, budget);
    if !split.too_many_bytes.is_empty() {
        run(
            "UPDATE llmbatching.requests SET state = 'failed', finished_at = pg_catalog.now(),
                    error = pg_catalog.format('the request is %s bytes, more than one batch file may hold (llmbatching.batch_max_bytes = %s)', body_bytes, $2)
              WHERE id = ANY($1)",
            &[split.too_many_bytes.into(), (limits.max_bytes as i64).into()],
        );
    }
    if !split.too_many_tokens.is_empty() {
        let cap = budget.map(|b| b.cap as i64).unwrap_or(0);
        run(
            "UPDATE llmbatching.requests SET state = 'failed', finished_at = pg_catalog.now(),
                    error = pg_catalog.format('the request is estimated at %s prompt tokens, more than the model''s enqueued-token cap of %s',
                                   (body_bytes + 3) / 4, $2)
              WHERE id = ANY($1)",
            &[split.too_many_tokens.into(), cap.into()],
        );
    }
    if split.batch.is_empty() {
        return claim(None, 0);
    }
    let batch_id = Spi::get_one_with_args::<i64>(
        "INSERT INTO llmbatching.batches (endpoint, model, request_count, estimated_tokens, provider, account)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        &[
            group.endpoint.as_str().into(),
            group.model.as_str().into(),
            (split.batch.len() as i32).into(),
            (split.estimated_tokens as i64).into(),
            group.provider.as_str().into(),
            group.account.as_str().into(),
        ],
    )
    .unwrap_or_else(|e| fail("creating a batch", e))
    .expect("INSERT … RETURNING returns the new batch's id");
    // Only the worker claims requests, but a role may cancel one of them meanwhile: the claim
    // takes those still queued (see `STILL_QUEUED`; no row is locked in advance, which would
    // write every row twice, unless a role was seen holding one: see `unheld`).
    // (Counted per role, by hashing: a batch's requests come from few roles.)
    let per_role: Vec<(String, i64, i64)> = Spi::connect_mut(|client| {
        client
            .update(
                &format!(
                    "WITH claimed AS (
                         UPDATE llmbatching.requests r
                            SET state = 'submitted', batch_id = $1, attempts = r.attempts + 1, submitted_at = pg_catalog.now()
                           FROM {}
                          WHERE {STILL_QUEUED}
                         RETURNING r.answer_format IS NOT NULL AS formatted, r.submitted_by)
                     SELECT c.submitted_by::text, pg_catalog.count(*), pg_catalog.count(*) FILTER (WHERE c.formatted)
                       FROM claimed c
                      GROUP BY c.submitted_by",
                    queued_ids("$2")
                ),
                None,
                &[batch_id.into(), split.batch.into()],
            )?
            .map(|row| {
                Ok((
                    row.get::<String>(1)?.unwrap_or_default(),
                    row.get::<i64>(2)?.unwrap_or(0),
                    row.get::<i64>(3)?.unwrap_or(0),
                ))
            })
            .collect::<SpiResult<Vec<_>>>()
    })
    .unwrap_or_else(|e| fail("claiming queued requests", e));
    let claimed: i64 = per_role.iter().map(|(_, n, _)| n).sum();
    let formatted: i64 = per_role.iter().map(|(_, _, f)| f).sum();
    let mut roles: Vec<String> = per_role.into_iter().map(|(role, _, _)| role).collect();
    roles.sort_unstable();
    if claimed == 0 {
        run(
            "DELETE FROM llmbatching.batches WHERE id = $1",
            &[batch_id.into()],
        );
        return claim(None, 0);
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
    claim(Some(batch_id), claimed as usize)
}
