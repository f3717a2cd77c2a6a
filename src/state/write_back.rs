//! Writing answers back into the rows they came from: the write-back step, which the worker's
//! writer process runs (see `worker::writer`).
//!
//! A completed request whose answer is registered for a row (`llmbatching.writebacks`) is put in
//! `llmbatching.writeback_queue` in the same transaction that completes it, so nothing is lost
//! to a crash in between. The writer then writes the queued answers, one group per target
//! column and role, each group as that role inside [`crate::restricted::run_as`]: the target's
//! triggers, domain checks, casts, index expressions and policies run as the role that owns
//! them, in a security-restricted operation, under a lock timeout and a time limit, in a
//! subtransaction of its own. A group whose table is locked or slow waits (outcome
//! `waiting: …`) and is tried again later; any other error is the group's final outcome.
//! Ingesting answers never waits on a user's table: it only fills the queue.

use crate::provider::redact::bounded;
use crate::restricted::{self, Bounds, Failure};
use pgrx::prelude::*;
use pgrx::spi::SpiResult;
use pgrx::JsonB;
use std::time::Duration;

/// Queue entries of each role read per round; the rest wait for the next one.
const DUE_PER_ROLE: i64 = 10_000;
/// A group that keeps running out of time (not merely waiting for a lock) is given up after
/// this many tries, so a trigger that always sleeps does not cost the worker time forever.
const MAX_SLOW_TRIES: i32 = 5;
/// Any group is given up after this many tries (with waits growing to five minutes, about two
/// hours of a table held locked).
const MAX_TRIES: i32 = 30;

fn fail<T>(what: &str, e: impl std::fmt::Display) -> T {
    error!("llmbatching: {what}: {e}")
}

/// Write-backs due now that share a target column and a role.
#[derive(Debug, Clone)]
pub struct Group {
    pub target: pg_sys::Oid,
    pub column: String,
    pub role: String,
    pub request_ids: Vec<i64>,
    /// How many times this group already waited, and how many of those ran out of time (the
    /// most of its entries).
    pub tries: i32,
    pub slow_tries: i32,
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

/// Reads the due write-backs by group: for each role with entries due, its oldest
/// [`DUE_PER_ROLE`], so that no role's flood of write-backs pushes another's back. Groups come
/// ordered by role. Entries of that window whose write-back is gone or settled (its request
/// deleted, superseded) leave the queue on the way.
pub fn due_groups() -> Vec<Group> {
    // Statistics of these tables are rarely current (a job fills and empties them within
    // minutes): every table is reached through an index, one probe per entry of the window.
    Spi::run("SET LOCAL enable_seqscan = off")
        .unwrap_or_else(|e| fail("reading due write-backs", e));
    Spi::connect_mut(|client| {
        client
            .update(
                &format!(
                    "WITH RECURSIVE {ROLES_IN_QUEUE},
                     due AS (
                         SELECT q.request_id, r.submitted_by, q.tries, q.slow_tries,
                                (SELECT w FROM llmbatching.writebacks w
                                  WHERE w.request_id OPERATOR(pg_catalog.=) q.request_id
                                    AND w.submitted_by OPERATOR(pg_catalog.=) r.submitted_by
                                    AND w.written_at IS NULL) AS pending
                           FROM roles r
                          CROSS JOIN LATERAL (
                              SELECT q.request_id, q.tries, q.slow_tries FROM llmbatching.writeback_queue q
                               WHERE q.submitted_by OPERATOR(pg_catalog.=) r.submitted_by
                                 AND q.due_at OPERATOR(pg_catalog.<=) pg_catalog.now()
                               ORDER BY q.due_at LIMIT $1) q),
                     settled AS (
                         DELETE FROM llmbatching.writeback_queue q
                          WHERE q.request_id OPERATOR(pg_catalog.=) ANY (
                                    (SELECT pg_catalog.array_agg(d.request_id) FROM due d WHERE (d.pending).request_id IS NULL)::pg_catalog.int8[]))
                     SELECT (d.pending).target::pg_catalog.oid, (d.pending).target_column::pg_catalog.text, d.submitted_by::pg_catalog.text,
                            pg_catalog.array_agg(d.request_id ORDER BY d.request_id), pg_catalog.max(d.tries), pg_catalog.max(d.slow_tries)
                       FROM due d
                      WHERE (d.pending).request_id IS NOT NULL
                      GROUP BY 3, 1, 2
                      ORDER BY 3, 1, 2"
                ),
                None,
                &[DUE_PER_ROLE.into()],
            )?
            .map(|row| {
                Ok(Group {
                    target: row.get(1)?.unwrap_or(pg_sys::InvalidOid),
                    column: row.get(2)?.unwrap_or_default(),
                    role: row.get(3)?.unwrap_or_default(),
                    request_ids: row.get(4)?.unwrap_or_default(),
                    tries: row.get(5)?.unwrap_or(0),
                    slow_tries: row.get(6)?.unwrap_or(0),
                })
            })
            .collect::<SpiResult<Vec<_>>>()
    })
    .unwrap_or_else(|e| fail("reading due write-backs", e))
}

/// Takes a group's entries for an attempt and counts it, before the attempt runs; returns the
/// group with the entries it took. Committed first, so that an attempt that never comes back
/// (a process that ends during it) is counted all the same, and a role's code cannot make the
/// worker return to it forever.
///
/// Only entries still due are taken, and each is then not due again until the attempt is
/// surely over (its time limit, and the watchdog's past it) and its pause after that: so two
/// processes writing answers (a writer, and one left from a worker that restarted) never write
/// the same answers, whatever they read of the queue.
pub fn begin_attempt(group: &Group, bounds: Bounds) -> Group {
    let not_before = retry_delay(group.tries) + bounds.longest_run();
    let mut taken = Spi::connect_mut(|client| {
        client
            .update(
                "UPDATE llmbatching.writeback_queue q
                    SET tries = q.tries OPERATOR(pg_catalog.+) 1,
                        due_at = pg_catalog.now() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => $2)
                  WHERE q.request_id OPERATOR(pg_catalog.=) ANY ($1)
                    AND q.due_at OPERATOR(pg_catalog.<=) pg_catalog.now()
                 RETURNING q.request_id",
                None,
                &[
                    group.request_ids.clone().into(),
                    not_before.as_secs_f64().into(),
                ],
            )?
            .map(|row| row.get::<i64>(1).map(Option::unwrap_or_default))
            .collect::<SpiResult<Vec<i64>>>()
    })
    .unwrap_or_else(|e| fail("counting a write-back attempt", e));
    taken.sort_unstable();
    Group {
        request_ids: taken,
        ..group.clone()
    }
}

/// How long until the next queued write-back is due, for the worker's wake-up.
pub fn next_due() -> Option<Duration> {
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

/// What a group's write ended with.
pub enum Written {
    /// The ids of the requests whose row was updated; the others' rows are missing.
    Done(Vec<i64>),
    /// Not written now; tried again when the queue says (see [`begin_attempt`]).
    Waiting { reason: String, timed_out: bool },
    /// Not written, for good.
    Failed(String),
}

/// Writes one group's answers as its role, within `bounds`. Runs inside the worker's
/// transaction; the role's code runs in a subtransaction of it.
pub fn write_group(group: &Group, bounds: Bounds) -> Written {
    if group.tries >= MAX_TRIES {
        return Written::Failed(format!("gave up after {MAX_TRIES} tries"));
    }
    let role = match role_that_may_write(&group.role) {
        Ok(role) => role,
        Err(why) => return Written::Failed(why),
    };
    let statement = match update_statement(group) {
        Ok(statement) => statement,
        Err(why) => return Written::Failed(why),
    };
    let values = answer_values(&group.request_ids);
    let outcome = restricted::run_as(role, bounds, move || {
        Spi::connect_mut(|client| {
            client
                .update(
                    &statement,
                    None,
                    &[
                        values.ids.into(),
                        values.row_keys.into(),
                        values.texts.into(),
                        values.jsons.into(),
                        values.responses.into(),
                    ],
                )?
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

/// Waits grow from one second to five minutes.
fn retry_delay(tries: i32) -> Duration {
    Duration::from_secs(1u64 << tries.clamp(0, 9)).min(Duration::from_secs(300))
}

/// Records how a group's write ended and takes its entries off the queue (or puts them back
/// for later).
pub fn record(group: &Group, written: &Written) {
    let ids = group.request_ids.clone();
    match written {
        Written::Done(done) => {
            run(
                "UPDATE llmbatching.writebacks w
                    SET written_at = pg_catalog.now(),
                        outcome = CASE WHEN w.request_id OPERATOR(pg_catalog.=) ANY ($2) THEN 'written' ELSE 'row missing' END
                  WHERE w.request_id OPERATOR(pg_catalog.=) ANY ($1) AND w.written_at IS NULL",
                &[ids.clone().into(), done.clone().into()],
            );
            unqueue(ids);
        }
        Written::Failed(why) => {
            run(
                "UPDATE llmbatching.writebacks w SET written_at = pg_catalog.now(), outcome = $2
                  WHERE w.request_id OPERATOR(pg_catalog.=) ANY ($1) AND w.written_at IS NULL",
                &[
                    ids.clone().into(),
                    format!("error: {}", bounded(why)).into(),
                ],
            );
            unqueue(ids);
        }
        Written::Waiting { reason, timed_out } => {
            run(
                "UPDATE llmbatching.writebacks w SET outcome = $2
                  WHERE w.request_id OPERATOR(pg_catalog.=) ANY ($1) AND w.written_at IS NULL",
                &[
                    ids.clone().into(),
                    format!("waiting: {}", bounded(reason)).into(),
                ],
            );
            // The pause before the next try counts from the end of this one.
            run(
                "UPDATE llmbatching.writeback_queue q
                    SET slow_tries = q.slow_tries OPERATOR(pg_catalog.+) CASE WHEN $2 THEN 1 ELSE 0 END,
                        due_at = pg_catalog.now() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => $3)
                  WHERE q.request_id OPERATOR(pg_catalog.=) ANY ($1)",
                &[
                    ids.into(),
                    (*timed_out).into(),
                    retry_delay(group.tries).as_secs_f64().into(),
                ],
            );
        }
    }
}

fn unqueue(ids: Vec<i64>) {
    run(
        "DELETE FROM llmbatching.writeback_queue q WHERE q.request_id OPERATOR(pg_catalog.=) ANY ($1)",
        &[ids.into()],
    );
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

/// The answers of a group's requests, as the arrays its statement reads.
struct AnswerValues {
    ids: Vec<i64>,
    row_keys: Vec<JsonB>,
    texts: Vec<Option<String>>,
    jsons: Vec<Option<JsonB>>,
    responses: Vec<Option<JsonB>>,
}

fn answer_values(ids: &[i64]) -> AnswerValues {
    let rows = Spi::connect(|client| {
        client
            .select(
                "SELECT r.id, w.row_key, r.result_text, r.result_json,
                        CASE WHEN r.endpoint OPERATOR(pg_catalog.=) '/v1/embeddings' THEN r.response END
                   FROM pg_catalog.unnest($1::pg_catalog.int8[]) AS i (id)
                   JOIN llmbatching.requests r ON r.id OPERATOR(pg_catalog.=) i.id AND r.state OPERATOR(pg_catalog.=) 'completed'
                   JOIN llmbatching.writebacks w ON w.request_id OPERATOR(pg_catalog.=) i.id AND w.written_at IS NULL",
                None,
                &[ids.to_vec().into()],
            )?
            .map(|row| {
                Ok((
                    row.get::<i64>(1)?.unwrap_or_default(),
                    row.get::<JsonB>(2)?.unwrap_or(JsonB(serde_json::Value::Null)),
                    row.get::<String>(3)?,
                    row.get::<JsonB>(4)?,
                    row.get::<JsonB>(5)?,
                ))
            })
            .collect::<SpiResult<Vec<_>>>()
    })
    .unwrap_or_else(|e| fail("reading answers to write back", e));
    let mut values = AnswerValues {
        ids: Vec::with_capacity(rows.len()),
        row_keys: Vec::with_capacity(rows.len()),
        texts: Vec::with_capacity(rows.len()),
        jsons: Vec::with_capacity(rows.len()),
        responses: Vec::with_capacity(rows.len()),
    };
    for (id, key, text, json, response) in rows {
        values.ids.push(id);
        values.row_keys.push(key);
        values.texts.push(text);
        values.jsons.push(json);
        values.responses.push(response);
    }
    values
}
