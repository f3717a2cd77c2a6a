//! The worker's access to the state tables, one module per step of a request's life: claiming
//! queued requests into batches ([`claim`]), carrying a batch through the provider ([`send`]),
//! reading its answers back ([`ingest`], and [`held`] for answers whose request its role keeps
//! locked), writing them into the rows they came from
//! ([`write_back`]) and keeping the tables tidy ([`housekeeping`]).
//!
//! Every function here runs inside a transaction the worker opens around it and makes no network
//! call, so no row lock outlives a step. The worker's `search_path` is `pg_catalog, pg_temp`
//! (see `session`), and the statements name every table with its schema and every function with
//! `pg_catalog`.

pub mod claim;
pub mod held;
pub mod housekeeping;
pub mod ingest;
pub mod send;
pub mod write_back;

use crate::request::Endpoint;
use pgrx::prelude::*;
use pgrx::spi::{SpiClient, SpiResult};
use std::time::Duration;

fn fail<T>(what: &str, e: impl std::fmt::Display) -> T {
    error!("llmbatching: {what}: {e}")
}

/// Whether the extension in this database is the version this library was built for. A new
/// library runs on a database whose schema is not yet updated (the server restarted with it,
/// and `ALTER EXTENSION llmbatching UPDATE` not yet run): the worker still sends, polls and
/// reads answers, but writes none into rows, whose queue changed shape in 0.2.0 (they wait
/// there for the update, which keeps them), and keeps no answer aside (see [`held`]: 0.2.0
/// added its table).
pub fn schema_is_current() -> bool {
    // Once current, it stays so for the process: a version is never taken back (no script goes
    // down), and a dropped extension ends the worker and its writer.
    if SCHEMA_CURRENT.load(std::sync::atomic::Ordering::Relaxed) {
        return true;
    }
    let current = Spi::get_one_with_args::<bool>(
        "SELECT e.extversion OPERATOR(pg_catalog.=) $1 FROM pg_catalog.pg_extension e
          WHERE e.extname OPERATOR(pg_catalog.=) 'llmbatching'",
        &[env!("CARGO_PKG_VERSION").into()],
    )
    .unwrap_or_else(|e| fail("reading the extension's version", e))
    .unwrap_or(false);
    SCHEMA_CURRENT.store(current, std::sync::atomic::Ordering::Relaxed);
    if !current && !NOTED_OLD_SCHEMA.swap(true, std::sync::atomic::Ordering::Relaxed) {
        log!(
            "llmbatching: answers are not written back into rows until ALTER EXTENSION llmbatching UPDATE (this library is version {})",
            env!("CARGO_PKG_VERSION")
        );
    }
    current
}

static SCHEMA_CURRENT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static NOTED_OLD_SCHEMA: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// How long the worker's own statements in this transaction wait for a lock a role holds (a
/// request or a write-back of its own it keeps locked, the account's claim lock another
/// database's worker holds) before giving up: what waits is that role's work, not everyone's.
pub fn bound_lock_waits() {
    run("SET LOCAL lock_timeout = '1s'", &[]);
}

fn run(sql: &str, args: &[pgrx::datum::DatumWithOid]) {
    Spi::run_with_args(sql, args).unwrap_or_else(|e| fail(sql, e))
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// A batch as the worker sees it.
#[derive(Clone, Debug)]
pub struct BatchRow {
    pub id: i64,
    /// The provider (a server) and whose key it goes under.
    pub provider: String,
    pub account: String,
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
    /// How long ago the provider ended it (zero while it has not).
    pub ended_ago: Duration,
    /// How long ago it was created at the provider (zero while it has not been).
    pub submitted_ago: Duration,
    /// An administrator gave up waiting for its result files.
    pub results_given_up: bool,
    /// When a create call was first about to be made (Unix seconds).
    pub create_attempted_at: Option<i64>,
    /// How many requests it carries.
    pub request_count: i64,
}

impl BatchRow {
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::parse(&self.endpoint).unwrap_or(Endpoint::Responses)
    }

    /// The provider and account its requests go through.
    pub fn route(&self) -> (String, String) {
        (self.provider.clone(), self.account.clone())
    }
}

/// The provider batch ids batches of `provider` here hold: a batch found at the provider after
/// a lost create answer must be none of these.
pub fn taken_provider_batches(provider: &str) -> Vec<String> {
    Spi::connect(|client| {
        client
            .select(
                "SELECT provider_batch_id FROM llmbatching.batches
                  WHERE provider = $1 AND provider_batch_id IS NOT NULL
                    AND created_at > pg_catalog.now() - interval '3 days'",
                None,
                &[provider.into()],
            )?
            .map(|row| row.get::<String>(1).map(Option::unwrap_or_default))
            .collect::<SpiResult<Vec<_>>>()
    })
    .unwrap_or_else(|e| fail("reading the provider batch ids", e))
}

const BATCH_COLUMNS: &str = "id, endpoint, state, provider_status, provider_errors, input_file_id, provider_batch_id,
     output_file_id, error_file_id, step_failures, create_attempted_at IS NOT NULL, model,
     (completed_count + failed_count)::bigint, cancel_requested_at IS NOT NULL, cancel_sent_at IS NOT NULL,
     answer_formats > 0,
     extract(epoch FROM pg_catalog.clock_timestamp() - coalesce(ended_at, pg_catalog.clock_timestamp()))::float8,
     extract(epoch FROM pg_catalog.clock_timestamp() - coalesce(submitted_at, pg_catalog.clock_timestamp()))::float8,
     results_given_up_at IS NOT NULL, provider, account,
     extract(epoch FROM create_attempted_at)::bigint, request_count::bigint";

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
                ended_ago: Duration::from_secs_f64(row.get::<f64>(17)?.unwrap_or(0.0).max(0.0)),
                submitted_ago: Duration::from_secs_f64(row.get::<f64>(18)?.unwrap_or(0.0).max(0.0)),
                results_given_up: row.get(19)?.unwrap_or(false),
                provider: row.get(20)?.unwrap_or_default(),
                account: row.get(21)?.unwrap_or_default(),
                create_attempted_at: row.get(22)?,
                request_count: row.get(23)?.unwrap_or(0),
            })
        })
        .collect()
}

/// Batches with a step due now, oldest first.
pub fn batches_due() -> Vec<BatchRow> {
    let sql = format!(
        "SELECT {BATCH_COLUMNS} FROM llmbatching.batches
          WHERE state <> 'done' AND next_check_at <= pg_catalog.clock_timestamp() ORDER BY next_check_at, id"
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
