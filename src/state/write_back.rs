//! Writing answers back into the rows they came from: the write-back step, which the worker's
//! writer process runs (see `worker::writer`).
//!
//! Answers completed for a role go into `llmbatching.writeback_queue` in the same transaction
//! that completes them, in entries of up to 1,000, so nothing is lost to a crash in between.
//! The writer takes a role's due entries as one attempt: it claims their write-backs
//! (`llmbatching.writebacks`) with the answers in one statement, then writes them one group per
//! target column and role, each group as that role inside [`crate::restricted::run_as`]: the
//! target's triggers, domain checks, casts, index expressions and policies run as the role
//! that owns them, in a security-restricted operation, under a lock timeout and a time limit,
//! in a subtransaction of its own. A group whose table is locked or slow waits (outcome
//! `waiting: …`) and its entries are tried again later; any other error is the group's final
//! outcome. Ingesting answers never waits on a user's table: it only fills the queue.

use crate::planner;
use crate::provider::redact::bounded;
use crate::restricted::{self, Bounds, Failure};
use pgrx::prelude::*;
use pgrx::spi::SpiResult;
use pgrx::JsonB;
use std::collections::HashMap;
use std::time::Duration;

/// Answers of each role taken per attempt (in whole entries, of up to 1,000 answers each, and
/// at most [`ENTRIES_PER_ATTEMPT`] entries); the rest wait for the next one.
const ANSWERS_PER_ATTEMPT: i64 = 10_000;
const ENTRIES_PER_ATTEMPT: i64 = 100;
/// A group that keeps running out of time (not merely waiting for a lock) is given up after
/// this many tries, so a trigger that always sleeps does not cost the worker time forever.
const MAX_SLOW_TRIES: i32 = 5;
/// Any group is given up after this many tries (with waits growing to five minutes, about two
/// hours of a table held locked).
const MAX_TRIES: i32 = 30;

fn fail<T>(what: &str, e: impl std::fmt::Display) -> T {
    error!("llmbatching: {what}: {e}")
}

/// A role's queue entries due now, to be written in one attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The role whose answers they are.
    pub role: String,
    pub entries: Vec<i64>,
    /// How many times these entries were already tried (the most of them).
    pub tries: i32,
}

impl Attempt {
    /// Whether its entries are not tried again, whatever happens to this try.
    pub fn is_last(&self) -> bool {
        self.tries + 1 >= MAX_TRIES
    }
}

/// The roles with entries in the write-back queue, one index probe each (a skip scan of
/// `writeback_queue_due`): a recursive CTE named `roles`, for the statements below. Every
/// statement on the queue reads only the window it needs, so that a round costs the same with a
/// million answers waiting as with ten.
const ROLES_IN_QUEUE: &str = "roles AS (
         (SELECT q.submitted_by FROM llmbatching.writeback_queue q
           ORDER BY q.submitted_by LIMIT 1)
         UNION ALL
         SELECT next.submitted_by
           FROM roles r
          CROSS JOIN LATERAL (
              SELECT q.submitted_by FROM llmbatching.writeback_queue q
               WHERE q.submitted_by OPERATOR(pg_catalog.>) r.submitted_by
               ORDER BY q.submitted_by LIMIT 1) next)";

/// The attempts due: for each role with entries due, its oldest, up to
/// [`ANSWERS_PER_ATTEMPT`] answers, so that no role's flood of answers pushes another's back.
/// Ordered by role. Entries tried [`MAX_TRIES`] times make an attempt of their own, which gives
/// them up: their last try is never another group's.
pub fn due_attempts() -> Vec<Attempt> {
    if !super::schema_is_current() {
        return Vec::new();
    }
    Spi::connect(|client| {
        client
            .select(
                &format!(
                    "WITH RECURSIVE {ROLES_IN_QUEUE}
                     SELECT r.submitted_by::pg_catalog.text, pg_catalog.array_agg(q.id ORDER BY q.id), pg_catalog.max(q.tries)
                       FROM roles r
                      CROSS JOIN LATERAL (
                          SELECT e.id, e.tries,
                                 pg_catalog.sum(e.answers) OVER (ORDER BY e.due_at, e.id) AS answers
                            FROM (SELECT q.id, q.tries, q.answers, q.due_at FROM llmbatching.writeback_queue q
                                   WHERE q.submitted_by OPERATOR(pg_catalog.=) r.submitted_by
                                     AND q.due_at OPERATOR(pg_catalog.<=) pg_catalog.now()
                                   ORDER BY q.due_at LIMIT $2) e) q
                      -- (No entry holds more answers than an attempt takes: the first always fits.)
                      WHERE q.answers OPERATOR(pg_catalog.<=) $1
                      GROUP BY r.submitted_by, q.tries OPERATOR(pg_catalog.>=) $3
                      ORDER BY r.submitted_by"
                ),
                None,
                &[
                    ANSWERS_PER_ATTEMPT.into(),
                    ENTRIES_PER_ATTEMPT.into(),
                    MAX_TRIES.into(),
                ],
            )?
            .map(|row| {
                Ok(Attempt {
                    role: row.get(1)?.unwrap_or_default(),
                    entries: row.get(2)?.unwrap_or_default(),
                    tries: row.get(3)?.unwrap_or(0),
                })
            })
            .collect::<SpiResult<Vec<_>>>()
    })
    .unwrap_or_else(|e| fail("reading due write-backs", e))
}

/// Takes an attempt's entries and counts the attempt, before it runs; returns the attempt with
/// the entries it took. Committed first, so that an attempt that never comes back (a process
/// that ends during it) is counted all the same, and a role's code cannot make the worker
/// return to it forever. It is counted as one that ran out of time, too: one the watchdog ends
/// did (see `restricted`). An attempt that comes back takes that count back (its entries leave
/// the queue, and what waits comes back with its own counts; or [`withdraw_slow_try`]).
///
/// Only entries still due are taken, and each is then not due again until the attempt is
/// surely over (its time limit, and the watchdog's past it) and its pause after that: so two
/// processes writing answers (a writer, and one left from a worker that restarted) never take
/// the same entries, whatever they read of the queue. (An answer in two entries, registered
/// again, is claimed by one of them: see [`claim`].)
pub fn begin_attempt(attempt: &Attempt, bounds: Bounds) -> Attempt {
    let not_before = retry_delay(attempt.tries) + bounds.longest_run();
    let mut taken = Spi::connect_mut(|client| {
        client
            .update(
                "UPDATE llmbatching.writeback_queue q
                    SET tries = q.tries OPERATOR(pg_catalog.+) 1,
                        slow_tries = q.slow_tries OPERATOR(pg_catalog.+) 1,
                        due_at = pg_catalog.now() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => $2)
                  WHERE q.id OPERATOR(pg_catalog.=) ANY ($1)
                    AND q.due_at OPERATOR(pg_catalog.<=) pg_catalog.now()
                 RETURNING q.id",
                None,
                &[
                    attempt.entries.clone().into(),
                    not_before.as_secs_f64().into(),
                ],
            )?
            .map(|row| row.get::<i64>(1).map(Option::unwrap_or_default))
            .collect::<SpiResult<Vec<i64>>>()
    })
    .unwrap_or_else(|e| fail("counting a write-back attempt", e));
    taken.sort_unstable();
    Attempt {
        entries: taken,
        ..attempt.clone()
    }
}

/// How long until the next queued write-back is due, for the worker's wake-up; never, while
/// the database's schema is older than this library (see `state::schema_is_current`).
pub fn next_due() -> Option<Duration> {
    if !super::schema_is_current() {
        return None;
    }
    Spi::get_one::<f64>(&format!(
        "WITH RECURSIVE {ROLES_IN_QUEUE}
         SELECT pg_catalog.date_part('epoch', pg_catalog.min(first.due_at) OPERATOR(pg_catalog.-) pg_catalog.clock_timestamp())
           FROM roles r
          CROSS JOIN LATERAL (
              SELECT q.due_at FROM llmbatching.writeback_queue q
               WHERE q.submitted_by OPERATOR(pg_catalog.=) r.submitted_by
               ORDER BY q.due_at LIMIT 1) first"
    ))
    .unwrap_or_else(|e| fail("reading the write-back queue", e))
    .map(|secs| Duration::from_secs_f64(secs.max(0.0)))
}

/// Write-backs claimed together that share a role and a target column, with their answers.
#[derive(Debug, Default)]
pub struct Group {
    pub role: String,
    pub target: pg_sys::Oid,
    pub column: String,
    pub request_ids: Vec<i64>,
    /// How many times its answers were already tried (the most of them), and how many of those
    /// tries ran out of time: counted per group, so that one table's troubles never count
    /// against another's.
    tries: i32,
    slow_tries: i32,
    row_keys: Vec<JsonB>,
    texts: Vec<Option<String>>,
    jsons: Vec<Option<JsonB>>,
    responses: Vec<Option<JsonB>>,
}

/// Claims the write-backs still pending of an attempt's entries, marking them written, and
/// reads their answers, in one statement (one probe of each table per answer); returns them by
/// group. Runs in the transaction that writes them: a group that cannot be written is put back
/// (see [`record`] and [`finish_attempt`]), and a process that ends midway leaves them pending
/// in their entries.
///
/// The entries are locked first, for the transaction: a write-back registered again meanwhile
/// queues an entry of its own instead of counting on one about to leave the queue (see
/// `writeback_reregistered`). The claim locks each write-back: of two processes claiming one
/// (an answer in two entries), the second finds it written once the first commits.
pub fn claim(attempt: &Attempt) -> Vec<Group> {
    run(
        "SELECT FROM llmbatching.writeback_queue q WHERE q.id OPERATOR(pg_catalog.=) ANY ($1) FOR UPDATE",
        &[attempt.entries.clone().into()],
    );
    // Statistics of these tables are rarely current (a job fills and empties them within
    // minutes): every table is reached through an index, one probe per answer. (Only for this
    // statement: the roles' code runs later in this transaction.)
    Spi::run("SET LOCAL enable_seqscan = off").unwrap_or_else(|e| fail("claiming write-backs", e));
    let rows = Spi::connect_mut(|client| {
        client
            .update(
                "UPDATE llmbatching.writebacks w SET written_at = pg_catalog.now(), outcome = 'written'
                   FROM (SELECT i.id, pg_catalog.max(q.tries) OPERATOR(pg_catalog.-) 1 AS tries,
                                GREATEST(pg_catalog.max(q.slow_tries) OPERATOR(pg_catalog.-) 1, 0) AS slow_tries
                           FROM llmbatching.writeback_queue q
                          CROSS JOIN LATERAL pg_catalog.unnest(q.request_ids) AS i (id)
                          WHERE q.id OPERATOR(pg_catalog.=) ANY ($1)
                          GROUP BY i.id) i,
                        llmbatching.requests r
                  WHERE w.request_id OPERATOR(pg_catalog.=) i.id AND w.written_at IS NULL
                    AND r.id OPERATOR(pg_catalog.=) i.id AND r.state OPERATOR(pg_catalog.=) 'completed'
                 RETURNING w.submitted_by::pg_catalog.text, w.target::pg_catalog.oid, w.target_column::pg_catalog.text,
                           w.request_id, w.row_key, r.result_text, r.result_json,
                           CASE WHEN r.endpoint OPERATOR(pg_catalog.=) '/v1/embeddings' THEN r.response END,
                           i.tries, i.slow_tries",
                None,
                &[attempt.entries.clone().into()],
            )?
            .map(|row| {
                Ok(Claimed {
                    role: row.get(1)?.unwrap_or_default(),
                    target: row.get(2)?.unwrap_or(pg_sys::InvalidOid),
                    column: row.get(3)?.unwrap_or_default(),
                    request_id: row.get(4)?.unwrap_or_default(),
                    row_key: row.get(5)?.unwrap_or(JsonB(serde_json::Value::Null)),
                    text: row.get(6)?,
                    json: row.get(7)?,
                    response: row.get(8)?,
                    tries: row.get(9)?.unwrap_or(0),
                    slow_tries: row.get(10)?.unwrap_or(0),
                })
            })
            .collect::<SpiResult<Vec<_>>>()
    })
    .unwrap_or_else(|e| fail("claiming write-backs", e));
    // (Back to the worker's own setting, see `session`.)
    Spi::run("SET LOCAL enable_seqscan = on").unwrap_or_else(|e| fail("claiming write-backs", e));
    into_groups(rows)
}

/// A write-back claimed, with its answer.
struct Claimed {
    role: String,
    target: pg_sys::Oid,
    column: String,
    request_id: i64,
    row_key: JsonB,
    text: Option<String>,
    json: Option<JsonB>,
    response: Option<JsonB>,
    tries: i32,
    slow_tries: i32,
}

/// Claimed write-backs by role and target column, in the order each group first appears.
fn into_groups(claimed: Vec<Claimed>) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    let mut index: HashMap<(String, pg_sys::Oid, String), usize> = HashMap::new();
    for c in claimed {
        let key = (c.role, c.target, c.column);
        let at = *index.entry(key.clone()).or_insert_with(|| {
            groups.push(Group {
                role: key.0,
                target: key.1,
                column: key.2,
                ..Group::default()
            });
            groups.len() - 1
        });
        let group = &mut groups[at];
        group.tries = group.tries.max(c.tries);
        group.slow_tries = group.slow_tries.max(c.slow_tries);
        group.request_ids.push(c.request_id);
        group.row_keys.push(c.row_key);
        group.texts.push(c.text);
        group.jsons.push(c.json);
        group.responses.push(c.response);
    }
    groups
}

/// What a group's write ended with.
pub enum Written {
    /// The ids of the requests whose row was updated; the others' rows are missing.
    Done(Vec<i64>),
    /// Not written now; tried again when the queue says (see [`begin_attempt`]).
    Waiting { reason: String, timed_out: bool },
    /// Not written, for good.
    Failed(String),
    /// Not tried in this attempt (its role's time was used up): tried again at once.
    Postponed,
}

/// Writes one group's answers as its role, within `bounds`. Runs inside the worker's
/// transaction; the role's code runs in a subtransaction of it.
pub fn write_group(group: &mut Group, bounds: Bounds) -> Written {
    if group.tries >= MAX_TRIES {
        return Written::Failed(format!("gave up after {MAX_TRIES} tries"));
    }
    if group.slow_tries >= MAX_SLOW_TRIES {
        return Written::Failed(format!(
            "gave up after {MAX_SLOW_TRIES} tries that ran out of time"
        ));
    }
    let role = match role_that_may_write(&group.role) {
        Ok(role) => role,
        Err(why) => return Written::Failed(why),
    };
    let statement = match update_statement(group) {
        Ok(statement) => statement,
        Err(why) => return Written::Failed(why),
    };
    let args = [
        group.request_ids.clone().into(),
        std::mem::take(&mut group.row_keys).into(),
        std::mem::take(&mut group.texts).into(),
        std::mem::take(&mut group.jsons).into(),
        std::mem::take(&mut group.responses).into(),
    ];
    let outcome = restricted::run_as(role, bounds, move || {
        Spi::connect_mut(|client| {
            client
                .update(&statement, None, &args)?
                .map(|row| row.get::<i64>(1).map(Option::unwrap_or_default))
                .collect::<SpiResult<Vec<i64>>>()
        })
        .unwrap_or_else(|e| fail("writing answers back", e))
    });
    match outcome {
        Ok(written) => Written::Done(written),
        Err(Failure {
            message,
            transient,
            timed_out,
        }) => {
            if transient && !(timed_out && group.slow_tries + 1 >= MAX_SLOW_TRIES) {
                Written::Waiting {
                    reason: message,
                    timed_out,
                }
            } else {
                Written::Failed(message)
            }
        }
    }
}

/// Waits grow from one second to five minutes (without jitter: each role's answers are tried
/// on their own, never in lockstep with another's).
fn retry_delay(tries: i32) -> Duration {
    planner::retry_delay(
        tries.max(0) as u32,
        Duration::from_secs(1),
        Duration::from_secs(300),
        None,
        1.0,
    )
}

/// Answers to queue again, in an entry of their own: a group's that waited, or was not tried.
pub struct Again {
    role: String,
    request_ids: Vec<i64>,
    tries: i32,
    slow_tries: i32,
    due_in: Duration,
}

impl Again {
    /// The group's answers, with its counts raised by `tries` and `slow_tries`, due in `due_in`.
    fn of(group: &Group, tries: i32, slow_tries: i32, due_in: Duration) -> Again {
        Again {
            role: group.role.clone(),
            request_ids: group.request_ids.clone(),
            tries: group.tries + tries,
            slow_tries: group.slow_tries + slow_tries,
            due_in,
        }
    }
}

/// Records how a group's write ended (it was claimed as written); returns its answers if they
/// are still to be written.
pub fn record(group: &Group, written: &Written) -> Option<Again> {
    let ids = group.request_ids.clone();
    match written {
        Written::Done(done) => {
            if done.len() < ids.len() {
                run(
                    "UPDATE llmbatching.writebacks w SET outcome = 'row missing'
                      WHERE w.request_id OPERATOR(pg_catalog.=) ANY ($1)
                        AND w.request_id OPERATOR(pg_catalog.<>) ALL ($2)",
                    &[ids.into(), done.clone().into()],
                );
            }
            None
        }
        Written::Failed(why) => {
            run(
                "UPDATE llmbatching.writebacks w SET outcome = $2
                  WHERE w.request_id OPERATOR(pg_catalog.=) ANY ($1)",
                &[ids.into(), format!("error: {}", bounded(why)).into()],
            );
            None
        }
        Written::Waiting { reason, timed_out } => {
            unclaim(ids, Some(format!("waiting: {}", bounded(reason))));
            // This try counts; the pause before the next counts from the end of this one.
            Some(Again::of(
                group,
                1,
                i32::from(*timed_out),
                retry_delay(group.tries),
            ))
        }
        Written::Postponed => {
            unclaim(ids, None);
            Some(Again::of(group, 0, 0, Duration::ZERO))
        }
    }
}

/// Gives claimed write-backs back to be written later, with `outcome` saying why.
fn unclaim(ids: Vec<i64>, outcome: Option<String>) {
    run(
        "UPDATE llmbatching.writebacks w SET written_at = NULL, outcome = $2
          WHERE w.request_id OPERATOR(pg_catalog.=) ANY ($1)",
        &[ids.into(), outcome.into()],
    );
}

/// Ends an attempt: its entries leave the queue, and the answers still to be written come back
/// in entries of their own group, with that group's counts.
pub fn finish_attempt(attempt: &Attempt, again: &[Again]) {
    for a in again {
        run(
            "INSERT INTO llmbatching.writeback_queue (submitted_by, request_ids, due_at, tries, slow_tries)
             VALUES ($1, $2, pg_catalog.now() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => $3), $4, $5)",
            &[
                a.role.as_str().into(),
                a.request_ids.clone().into(),
                a.due_in.as_secs_f64().into(),
                a.tries.into(),
                a.slow_tries.into(),
            ],
        );
    }
    run(
        "DELETE FROM llmbatching.writeback_queue q WHERE q.id OPERATOR(pg_catalog.=) ANY ($1)",
        &[attempt.entries.clone().into()],
    );
}

/// An attempt whose transaction rolled back on a passing error outside the roles' code (a lock
/// its role holds on its own entries, say): it did not run out of time, so its entries lose
/// the count [`begin_attempt`] gave them.
pub fn withdraw_slow_try(attempt: &Attempt) {
    run(
        "UPDATE llmbatching.writeback_queue q SET slow_tries = GREATEST(q.slow_tries OPERATOR(pg_catalog.-) 1, 0)
          WHERE q.id OPERATOR(pg_catalog.=) ANY ($1)",
        &[attempt.entries.clone().into()],
    );
}

/// An attempt that failed outside the roles' code (its transaction rolled back): the
/// write-backs still pending of its entries end with the error, and the entries leave the
/// queue.
pub fn fail_attempt(attempt: &Attempt, why: &str) {
    run(
        "UPDATE llmbatching.writebacks w SET written_at = pg_catalog.now(), outcome = $2
           FROM (SELECT DISTINCT i.id
                   FROM llmbatching.writeback_queue q
                  CROSS JOIN LATERAL pg_catalog.unnest(q.request_ids) AS i (id)
                  WHERE q.id OPERATOR(pg_catalog.=) ANY ($1)) i
          WHERE w.request_id OPERATOR(pg_catalog.=) i.id AND w.written_at IS NULL",
        &[
            attempt.entries.clone().into(),
            format!("error: {}", bounded(why)).into(),
        ],
    );
    finish_attempt(attempt, &[]);
}

fn run(sql: &str, args: &[pgrx::datum::DatumWithOid]) {
    Spi::run_with_args(sql, args).unwrap_or_else(|e| fail("recording a write-back", e))
}

/// The role a write-back was registered by, if it still exists and is still granted
/// llmbatching_user (a role name is not an identity that lasts: it is checked every time).
fn role_that_may_write(name: &str) -> Result<pg_sys::Oid, String> {
    let name_c = std::ffi::CString::new(name).map_err(|_| "an invalid role name".to_string())?;
    // SAFETY: catalog lookups by name, in a transaction.
    unsafe {
        let role = pg_sys::get_role_oid(name_c.as_ptr(), true);
        if role == pg_sys::InvalidOid {
            return Err(format!("the role \"{name}\" no longer exists"));
        }
        let users = pg_sys::get_role_oid(c"llmbatching_user".as_ptr(), true);
        if users == pg_sys::InvalidOid || !pg_sys::has_privs_of_role(role, users) {
            return Err(format!(
                "the role \"{name}\" is no longer a member of llmbatching_user"
            ));
        }
        Ok(role)
    }
}

/// The target column's type and how an answer becomes a value of it.
fn update_statement(group: &Group) -> Result<String, String> {
    let shape = Spi::connect(|client| {
        client
            .select(
                "SELECT c.oid::pg_catalog.regclass::pg_catalog.text,
                        pg_catalog.format_type(a.atttypid, a.atttypmod), a.atttypid, t.typname::pg_catalog.text,
                        pk.names, pk.types
                   FROM pg_catalog.pg_class c
                  CROSS JOIN LATERAL (
                      SELECT pg_catalog.array_agg(k.attname::pg_catalog.text ORDER BY n.ord) AS names,
                             pg_catalog.array_agg(pg_catalog.format_type(k.atttypid, k.atttypmod) ORDER BY n.ord) AS types
                        FROM pg_catalog.pg_index i
                       CROSS JOIN LATERAL pg_catalog.unnest(i.indkey) WITH ORDINALITY AS n (attnum, ord)
                        JOIN pg_catalog.pg_attribute k ON k.attrelid OPERATOR(pg_catalog.=) i.indrelid AND k.attnum OPERATOR(pg_catalog.=) n.attnum
                       WHERE i.indrelid OPERATOR(pg_catalog.=) c.oid AND i.indisprimary) pk
                   LEFT JOIN pg_catalog.pg_attribute a
                     ON a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attname OPERATOR(pg_catalog.=) $2::pg_catalog.name
                    AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
                   LEFT JOIN pg_catalog.pg_type t ON t.oid OPERATOR(pg_catalog.=) a.atttypid
                  WHERE c.oid OPERATOR(pg_catalog.=) $1",
                None,
                &[group.target.into(), group.column.as_str().into()],
            )?
            .map(|row| {
                Ok(TargetShape {
                    table: row.get(1)?.unwrap_or_default(),
                    column_type: row.get(2)?,
                    column_type_oid: row.get(3)?.unwrap_or(pg_sys::InvalidOid),
                    column_type_name: row.get(4)?.unwrap_or_default(),
                    key_names: row.get(5)?.unwrap_or_default(),
                    key_types: row.get(6)?.unwrap_or_default(),
                })
            })
            .collect::<SpiResult<Vec<_>>>()
    })
    .unwrap_or_else(|e| fail("reading a write-back target", e))
    .pop()
    .ok_or_else(|| "the table no longer exists".to_string())?;
    shape.statement(&group.column)
}

struct TargetShape {
    /// The table's name as it may be written into SQL (qualified unless in pg_catalog).
    table: String,
    column_type: Option<String>,
    column_type_oid: pg_sys::Oid,
    column_type_name: String,
    /// The primary key's columns and their types, in key order.
    key_names: Vec<String>,
    key_types: Vec<String>,
}

impl TargetShape {
    /// `UPDATE … FROM unnest($1..$5)` matching each row by its primary key, returning the ids
    /// of the requests whose row it updated. Every name is quoted and every function and
    /// operator qualified: it runs as the role, whose code must not stand in for ours.
    /// The arrays reach `unnest` through sub-selects, so the planner does not see that a group
    /// holds 10,000 answers: seen, it hashed the whole table for every group (220 ms per group
    /// into a 1,000,000-row table, against 37 ms for a probe of the primary key per answer).
    fn statement(&self, column: &str) -> Result<String, String> {
        let column_type = self
            .column_type
            .as_deref()
            .ok_or_else(|| format!("the column \"{column}\" no longer exists"))?;
        if self.key_names.is_empty() {
            return Err(format!("the table {} has no primary key", self.table));
        }
        let value = self.value_expression(column_type);
        let key_match: Vec<String> = self
            .key_names
            .iter()
            .zip(&self.key_types)
            .map(|(name, key_type)| {
                format!(
                    "t.{} = (s.row_key OPERATOR(pg_catalog.->>) {})::{key_type}",
                    quote_ident(name),
                    literal(name)
                )
            })
            .collect();
        Ok(format!(
            "UPDATE {table} AS t SET {col} = {value}
               FROM ROWS FROM (pg_catalog.unnest((SELECT $1::pg_catalog.int8[])), pg_catalog.unnest((SELECT $2::pg_catalog.jsonb[])),
                               pg_catalog.unnest((SELECT $3::pg_catalog.text[])), pg_catalog.unnest((SELECT $4::pg_catalog.jsonb[])),
                               pg_catalog.unnest((SELECT $5::pg_catalog.jsonb[])))
                    AS s (request_id, row_key, answer_text, answer_json, response)
              WHERE {keys}
             RETURNING s.request_id",
            table = self.table,
            col = quote_ident(column),
            keys = key_match.join(" AND "),
        ))
    }

    /// How the answer becomes a value of the column: json and jsonb take the structured answer
    /// (or the text as a JSON string); real[], double precision[] and numeric[] take an
    /// embedding, and so does pgvector's vector; any other type takes the answer text, cast.
    fn value_expression(&self, column_type: &str) -> String {
        match self.column_type_oid {
            pg_sys::JSONOID | pg_sys::JSONBOID => format!(
                "coalesce(s.answer_json, pg_catalog.to_jsonb(s.answer_text))::{column_type}"
            ),
            pg_sys::FLOAT4ARRAYOID | pg_sys::FLOAT8ARRAYOID | pg_sys::NUMERICARRAYOID => format!(
                "ARRAY(SELECT e::pg_catalog.float8
                         FROM pg_catalog.jsonb_array_elements_text(s.response OPERATOR(pg_catalog.#>) '{{data,0,embedding}}') e)::{column_type}"
            ),
            _ if self.column_type_name == "vector" => format!(
                "(s.response OPERATOR(pg_catalog.#>>) '{{data,0,embedding}}')::{column_type}"
            ),
            _ => format!("s.answer_text::{column_type}"),
        }
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claimed(role: &str, target: u32, column: &str, id: i64) -> Claimed {
        Claimed {
            role: role.into(),
            target: pg_sys::Oid::from(target),
            column: column.into(),
            request_id: id,
            row_key: JsonB(serde_json::json!({ "id": id })),
            text: Some(format!("answer {id}")),
            json: None,
            response: None,
            tries: 0,
            slow_tries: 0,
        }
    }

    #[test]
    fn claimed_write_backs_group_by_role_and_target_column_keeping_each_answer_with_its_row() {
        let retried = Claimed {
            tries: 3,
            slow_tries: 1,
            ..claimed("alice", 10, "answer", 4)
        };
        let groups = into_groups(vec![
            claimed("alice", 10, "answer", 1),
            claimed("bob", 10, "answer", 2),
            claimed("alice", 10, "label", 3),
            retried,
            claimed("alice", 11, "answer", 5),
        ]);
        let shape: Vec<(&str, u32, &str, &[i64])> = groups
            .iter()
            .map(|g| {
                (
                    g.role.as_str(),
                    g.target.to_u32(),
                    g.column.as_str(),
                    &g.request_ids[..],
                )
            })
            .collect();
        assert_eq!(
            shape,
            [
                ("alice", 10, "answer", &[1, 4][..]),
                ("bob", 10, "answer", &[2][..]),
                ("alice", 10, "label", &[3][..]),
                ("alice", 11, "answer", &[5][..]),
            ]
        );
        // Each group counts the tries of its own answers only.
        let tries: Vec<(i32, i32)> = groups.iter().map(|g| (g.tries, g.slow_tries)).collect();
        assert_eq!(tries, [(3, 1), (0, 0), (0, 0), (0, 0)]);
        let first = &groups[0];
        assert_eq!(
            first.texts,
            [Some("answer 1".to_string()), Some("answer 4".to_string())]
        );
        assert_eq!(first.row_keys[1].0, serde_json::json!({ "id": 4 }));
    }
}
