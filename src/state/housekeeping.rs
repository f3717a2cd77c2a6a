//! Keeping the state tables in order between the steps: the extension's presence, identical
//! requests left waiting on a cancelled one, batches whose every request was cancelled,
//! retention, and when the next step is due.

use super::{fail, run, seconds};
use pgrx::prelude::*;
use std::time::Duration;

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

/// Why this database is a copy (see sql/copies.sql), if it is one; the first time the worker
/// sees it, it records when, so that what was inherited can be told from what comes later.
pub fn copy_problem() -> Option<String> {
    let problem = Spi::get_one::<String>("SELECT llmbatching.copy_problem()")
        .unwrap_or_else(|e| fail("checking for a copy", e))?;
    run(
        "UPDATE llmbatching.instance SET copied_at = pg_catalog.now() WHERE copied_at IS NULL",
        &[],
    );
    Some(problem)
}

/// Requests waiting on an identical request that was cancelled (or purged) wait on the oldest
/// of themselves instead, which is then sent. Those their role holds locked are left for a
/// later round (waiting for them would hold up every role's round); the oldest is the heir all
/// the same, so identical requests are never split between two that are sent.
pub fn promote_orphaned_duplicates() {
    run(
        "WITH orphans AS (
             SELECT f.id, pg_catalog.min(f.id) OVER (PARTITION BY f.reused_from) AS heir
               FROM llmbatching.requests f
               LEFT JOIN llmbatching.requests leader ON leader.id = f.reused_from
              WHERE f.state = 'queued' AND f.reused_from IS NOT NULL
                AND (leader.id IS NULL OR leader.state = 'cancelled')),
         unheld AS (
             SELECT f.id FROM llmbatching.requests f
              WHERE f.id IN (SELECT o.id FROM orphans o) AND f.state = 'queued'
                FOR NO KEY UPDATE SKIP LOCKED)
         UPDATE llmbatching.requests f SET reused_from = NULLIF(o.heir, f.id)
           FROM orphans o JOIN unheld u ON u.id = o.id
          WHERE f.id = o.id",
        &[],
    );
}

/// Marks for cancellation at the provider the open batches whose every request was cancelled.
/// Asked first whether a batch has a cancelled request at all, one probe of the small index of
/// cancelled requests, which nearly always says no; only then whether one is still submitted,
/// which a batch at work answers with its first row through the batch index (`OFFSET 0` keeps
/// each EXISTS a probe per batch; bitmap scans, which would read every entry of the batch
/// before the first row, are off).
pub fn flag_cancelled_batches() {
    run("SET LOCAL enable_seqscan = off", &[]);
    run("SET LOCAL enable_bitmapscan = off", &[]);
    run(
        "UPDATE llmbatching.batches b SET cancel_requested_at = pg_catalog.now(), next_check_at = pg_catalog.now()
          WHERE b.state IN ('pending', 'uploaded', 'submitted') AND b.cancel_requested_at IS NULL
            AND CASE WHEN EXISTS (SELECT FROM llmbatching.requests r WHERE r.batch_id = b.id AND r.state = 'cancelled' OFFSET 0)
                     THEN NOT EXISTS (SELECT FROM llmbatching.requests r WHERE r.batch_id = b.id AND r.state = 'submitted' OFFSET 0)
                     ELSE false END",
        &[],
    );
}

/// Deletes finished requests, then done batches left without requests, older than `retention`
/// (see `llmbatching.purge_before`). Returns how many requests and batches went.
pub fn purge_finished(retention: Duration) -> (i64, i64) {
    let (requests, batches) = Spi::get_two_with_args::<i64, i64>(
        "SELECT requests, batches FROM llmbatching.purge_before(pg_catalog.now() - pg_catalog.make_interval(secs => $1))",
        &[seconds(retention).into()],
    )
    .unwrap_or_else(|e| fail("purging finished rows", e));
    (requests.unwrap_or(0), batches.unwrap_or(0))
}

/// How long until the next step of a batch not in `busy` (its transfer under way) or the end of a model's pause, whichever comes first.
/// (Queued groups' waits are known from [`queued_groups`].)
pub fn next_step_due(busy: &[i64]) -> Option<Duration> {
    Spi::get_one_with_args::<f64>(
        "SELECT extract(epoch FROM least(
                    (SELECT pg_catalog.min(next_check_at) FROM llmbatching.batches
                      WHERE state <> 'done' AND id OPERATOR(pg_catalog.<>) ALL ($1)),
                    (SELECT pg_catalog.min(paused_until) FROM llmbatching.model_pauses WHERE paused_until > pg_catalog.now()))
                - pg_catalog.clock_timestamp())::float8",
        &[busy.to_vec().into()],
    )
    .unwrap_or_else(|e| fail("computing the next wake-up", e))
    .map(|secs| Duration::from_secs_f64(secs.max(0.0)))
}

/// Asks this database's readers (see `worker::reader`) to stop; returns how many there are.
pub fn end_readers() -> i64 {
    Spi::get_one::<i64>(
        "SELECT pg_catalog.count(pg_catalog.pg_terminate_backend(a.pid))
           FROM pg_catalog.pg_stat_activity a
          WHERE a.backend_type OPERATOR(pg_catalog.=) 'llmbatching reader'
            AND a.datid OPERATOR(pg_catalog.=) (SELECT d.oid FROM pg_catalog.pg_database d
                                                 WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database())",
    )
    .unwrap_or_else(|e| fail("ending leftover readers", e))
    .unwrap_or(0)
}

/// Another worker serving this database, started before this one (by start time, then pid),
/// if there is one. `pg_stat_activity`'s backend type is the process's own: no role can
/// pose as a worker.
pub fn other_worker() -> Option<i32> {
    Spi::get_one::<i32>(
        "SELECT (SELECT a.pid FROM pg_catalog.pg_stat_activity a, pg_catalog.pg_stat_activity me
                  WHERE me.pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()
                    AND a.backend_type OPERATOR(pg_catalog.=) 'llmbatching worker'
                    AND a.datid OPERATOR(pg_catalog.=) me.datid
                    AND a.pid OPERATOR(pg_catalog.<>) me.pid
                    AND (a.backend_start, a.pid) OPERATOR(pg_catalog.<) (me.backend_start, me.pid)
                  ORDER BY a.backend_start LIMIT 1)",
    )
    .unwrap_or_else(|e| fail("looking for another worker", e))
}
