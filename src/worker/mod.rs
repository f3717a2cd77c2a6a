//! The background worker: forms batches from queued requests, carries each batch through the
//! provider (upload, create, poll, download), and sees that the answers are written back (by a
//! process of their own, see `writer`).
//!
//! Every step is recorded in `llmbatching.batches` before the worker moves on, and each step
//! can be repeated safely, so a worker that dies anywhere picks up where the table says:
//! - `pending`: the input file is rebuilt from the rows and uploaded again (an orphaned upload
//!   costs nothing);
//! - `uploaded`: if a create call may have been made, the provider's batch list is searched for
//!   our own tags in `metadata` before creating, so a batch is never created twice;
//! - `submitted`: polled;
//! - `ingesting`: the files are read again; only requests still `submitted` in this batch are
//!   updated, so lines applied before the crash are not applied twice.
//!
//! Network calls happen between transactions, never inside one.

use crate::config::Settings;
use crate::planner::{self, TokenBudget};
mod connections;
pub mod launcher;
mod writer;

use crate::provider::redact::{redact, redact_json};
use crate::provider::{
    BatchInfo, BatchProvider, BatchStatus, Kind, Leftovers, NewBatch, ProviderError,
    ProviderResult, SharedProvider,
};
use crate::registry::{self, Exit};
use crate::restricted::Failure;
use crate::results::{self, LineRead, LineResult, Outcome};
use crate::session;
use crate::state::{self, claim, housekeeping, ingest, send, BatchRow};
use crate::transfers::Transfers;
use crate::wakeup;
use connections::Connections;
use pgrx::bgworkers::{BackgroundWorker, DynamicBackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use std::collections::HashMap;
use std::ffi::CString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Where input and output files are staged, relative to the data directory.
const STAGING_DIR: &str = "pg_llmbatching";
/// Result lines applied per transaction while ingesting, and the most bytes of them held at
/// once, so memory stays flat whatever the size of the answers.
const INGEST_CHUNK: usize = 1000;
const INGEST_CHUNK_BYTES: usize = 8 * 1024 * 1024;
/// A refused step (4xx) that may be a passing glitch, such as "file not found" just after an
/// upload, is tried this many times before it is taken as final.
const REFUSALS_BEFORE_GIVING_UP: i32 = 5;
/// Finished rows are purged at most this often (or once per retention period, if shorter).
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// The batch error code of the provider's enqueued-token limit.
const TOKEN_LIMIT_CODE: &str = "token_limit_exceeded";
/// The longest the queue goes unread after a look that claimed nothing (see
/// `Worker::queue_quiet_until`).
const QUEUE_QUIET: Duration = Duration::from_secs(1);
/// How long a group whose claim failed (a request of it held locked by a role) waits.
const CLAIM_FAILURE_PAUSE: Duration = Duration::from_secs(30);
/// How often a worker that no commit wakes looks for new work.
const UNWOKEN_POLL: Duration = Duration::from_secs(1);
/// How often a worker that commits wake looks all the same.
const WOKEN_POLL: Duration = Duration::from_secs(15);
/// How often a sleeping worker looks whether a command needs its database to itself (such a
/// command waits 5 seconds for the sessions connected to the database to leave).
const YIELD_CHECK: Duration = Duration::from_secs(1);
/// How often the worker looks for ended transfers while some are under way.
const LANDING_CHECK: Duration = Duration::from_millis(20);
/// How long a stopping worker waits for its transfers to end.
const STOP_PATIENCE: Duration = Duration::from_secs(2);
/// Metadata keys that tag each batch with its row here.
const META_BATCH_ID: &str = "llmbatching_batch_id";
const META_INSTANCE: &str = "llmbatching_instance";

/// Waits on the latch for at most `timeout`; true when it was set.
fn wait_latch(timeout: Duration) -> bool {
    let events = (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32;
    let millis = timeout.as_millis().clamp(1, i32::MAX as u128) as _;
    // SAFETY: the process's own latch, waited on and reset as PostgreSQL's own workers do.
    let woke = unsafe {
        let woke = pg_sys::WaitLatch(pg_sys::MyLatch, events, millis, pg_sys::PG_WAIT_EXTENSION);
        pg_sys::ResetLatch(pg_sys::MyLatch);
        woke
    };
    pg_sys::check_for_interrupts!();
    woke & pg_sys::WL_LATCH_SET as i32 != 0
}

fn shutdown_requested() -> bool {
    // SAFETY: a sig_atomic_t the SIGTERM handler sets; read volatile as Postgres does.
    unsafe { std::ptr::read_volatile(&raw const pg_sys::ShutdownRequestPending) != 0 }
}

/// Starts a worker for the database as a dynamic background worker. The postmaster does not
/// start it again when it ends: the launcher does (and knows whether the database is still
/// there), or, without preloading, llm_worker_start() and llm_worker_restart().
pub fn launch_for(database: pg_sys::Oid) -> Result<DynamicBackgroundWorker, String> {
    launch_process("llmbatching worker", "llmbatching_worker_main", database)
        .map_err(|_| "could not start a worker (max_worker_processes reached?)".to_string())
}

/// Starts a dynamic background worker of this library serving `database`, whose start and end
/// this process is told of (it is never restarted by the postmaster).
fn launch_process(
    kind: &str,
    function: &str,
    database: pg_sys::Oid,
) -> Result<DynamicBackgroundWorker, ()> {
    pgrx::bgworkers::BackgroundWorkerBuilder::new(kind)
        .set_type(kind)
        .set_library("llmbatching")
        .set_function(function)
        .set_argument(Some(pg_sys::Datum::from(database.to_u32() as usize)))
        .enable_spi_access()
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .set_restart_time(None)
        .load_dynamic()
        .map_err(|_| ())
}

/// Starts this database's worker and waits until it runs; returns its pid.
pub fn start_for_this_database() -> Result<i32, String> {
    launch_for(unsafe { pg_sys::MyDatabaseId })?
        .wait_for_startup()
        .map_err(|status| format!("the worker did not start ({status:?})"))
}

/// Shows what the worker is doing in `pg_stat_activity.query`.
fn report_activity(what: &str) {
    let text = CString::new(what).unwrap_or_default();
    let state = if what.is_empty() {
        pg_sys::BackendState::STATE_IDLE
    } else {
        pg_sys::BackendState::STATE_RUNNING
    };
    unsafe { pg_sys::pgstat_report_activity(state, text.as_ptr()) };
}

/// The start of every process of this library that serves a database (the worker, the
/// writer): signals, the connection to the database `arg` names, and settings of its own.
fn connect_process(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = pg_sys::Oid::from(arg.value() as u32);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database), None);
    // It runs as a superuser: its settings are its own, whatever the database's or a role's
    // settings say (see `session`).
    session::pin();
}

/// Between two rounds: reads the configuration again when asked to (SIGHUP), and pins the
/// session's settings again.
fn refresh_settings() {
    if BackgroundWorker::sighup_received() {
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
    }
    session::pin();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn llmbatching_worker_main(arg: pg_sys::Datum) {
    connect_process(arg);
    // (A catalog lookup: in a transaction.)
    let name = tx(wakeup::this_database);
    if let Some(other) = another_worker_stays() {
        // Two workers of one database would both send its batches: the later one goes.
        log!("llmbatching: worker {other} already serves database \"{name}\"; this one stops");
        unsafe { pg_sys::proc_exit(0) };
    }
    // The launcher starts this database's worker again after it made way for a command; a
    // worker it does not manage hands over to a successor instead (see `end_worker`).
    let launcher_manages = tx(wakeup::launcher_serves_here);
    if !tx(housekeeping::extension_ready) {
        end_worker(Exit::NotInstalled);
    }
    // Woken at commit where the registry has room for it; else it looks for work each second.
    let woken_at_commit = registry::worker_started(unsafe { pg_sys::MyProcPid });
    log!("llmbatching worker started for database \"{name}\"");

    let mut worker = Worker::new();
    let why = loop {
        if registry::database_wanted_alone() {
            break Exit::Yielded;
        }
        refresh_settings();
        if !tx(housekeeping::extension_ready) {
            // DROP EXTENSION: what transfers bring has nowhere to go.
            worker.forget_transfers();
            break Exit::NotInstalled;
        }
        // A worker woken at commit still runs a round now and then: nothing waits on a wake-up
        // that was lost.
        let longest = if woken_at_commit {
            WOKEN_POLL
        } else {
            UNWOKEN_POLL
        };
        let sleep = worker.run_round_catching().min(longest);
        report_activity(&worker.idle_status());
        if !worker.wait(sleep) {
            break Exit::Other;
        }
    };
    worker.stop();
    if why == Exit::Yielded && !launcher_manages {
        // The successor's connection waits until the command is done (a new session's
        // connection waits on the lock the command holds, before it counts as connected), then
        // serves the database under its new name; after a DROP it finds none and ends.
        if let Err(e) = launch_for(unsafe { pg_sys::MyDatabaseId }) {
            warning!("llmbatching: {e}; start the worker again with SELECT llmbatching.llm_worker_start()");
        }
    }
    end_worker(why);
}

/// Another worker serving this database, if one stays: one that is ending (the worker this one
/// succeeds) is given 5 seconds to go.
fn another_worker_stays() -> Option<i32> {
    let patience = Instant::now() + Duration::from_secs(5);
    loop {
        let other = tx(housekeeping::other_worker)?;
        if Instant::now() >= patience || shutdown_requested() {
            return Some(other);
        }
        wait_latch(Duration::from_millis(100));
    }
}

/// Ends the worker, telling the launcher why.
fn end_worker(why: Exit) -> ! {
    registry::worker_ending(why);
    match why {
        Exit::NotInstalled => {
            log!("llmbatching worker stopped: the extension is not installed in this database")
        }
        Exit::Yielded => log!("llmbatching worker stopped: a command needs the database to itself"),
        Exit::Other => log!("llmbatching worker stopped"),
    }
    // SAFETY: PostgreSQL's own way out of a process, running its exit callbacks.
    unsafe { pg_sys::proc_exit(0) };
    // (PostgreSQL 18's bindings do not say that it does not return.)
    #[allow(unreachable_code)]
    {
        unreachable!("proc_exit returned")
    }
}

struct Worker {
    /// The connections to the providers, by route.
    connections: Connections,
    /// The provider calls under way, and the batch each belongs to as it was when they started.
    transfers: Transfers<ProviderResult<Landed>>,
    in_flight: HashMap<i64, BatchRow>,
    staging: PathBuf,
    instance: Option<String>,
    last_purge: Option<std::time::Instant>,
    /// Rounds in a row that ended in an error, for the pause before the next.
    failed_rounds: u32,
    /// Whether the log already says this database is a copy.
    said_copy: bool,
    /// When the log last said that a claim failed.
    said_claim_failed: Option<Instant>,
    /// Groups whose last claim failed, and until when they wait.
    claims_paused: HashMap<String, Instant>,
    /// The process writing answers back, while one runs.
    writer: writer::Writer,
    /// After a look at the queue that found groups and claimed none of them, the queue is not
    /// read again before this, unless a batch moves on (making room) or a commit wakes the
    /// worker: otherwise every round, many a second while batches are polled, would read it
    /// again (26 ms a round with a million requests queued).
    queue_quiet_until: Option<Instant>,
}

fn tx<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe + std::panic::RefUnwindSafe) -> R {
    BackgroundWorker::transaction(f)
}

/// Runs `f`; an ERROR (or a panic) inside it rolls back the transaction it left open and comes
/// back as `Err` with its message, so that one batch's, one answer's or one write-back's failure
/// stays with it and the worker goes on with the rest.
fn catching<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    PgTryBuilder::new(std::panic::AssertUnwindSafe(move || Ok(f())))
        .catch_others(|caught| {
            // SAFETY: PostgreSQL's own recovery after an error outside any transaction block;
            // it does nothing when no transaction is open.
            unsafe { pg_sys::AbortCurrentTransaction() };
            Err(Failure::from_caught(caught).message)
        })
        .execute()
}

impl Worker {
    fn new() -> Worker {
        // One directory per database: each database's worker clears its own at start.
        let staging =
            PathBuf::from(STAGING_DIR).join(unsafe { pg_sys::MyDatabaseId }.to_u32().to_string());
        // Files left by an earlier run are stale: every step rebuilds or re-downloads its file.
        let _ = std::fs::remove_dir_all(&staging);
        if let Err(e) = std::fs::create_dir_all(&staging) {
            warning!("llmbatching: cannot create {}: {e}", staging.display());
        }
        Worker {
            connections: Connections::default(),
            transfers: Transfers::new(),
            in_flight: HashMap::new(),
            staging,
            instance: None,
            last_purge: None,
            failed_rounds: 0,
            said_copy: false,
            said_claim_failed: None,
            claims_paused: HashMap::new(),
            writer: writer::Writer::default(),
            queue_quiet_until: None,
        }
    }

    /// A round, whatever happens in it: an error ends the round (its transaction rolled back,
    /// the error logged) and the worker pauses longer after each round that failed in a row.
    /// Errors of one batch or one write-back are caught closer to them and never get here.
    fn run_round_catching(&mut self) -> Duration {
        match catching(|| self.run_round()) {
            Ok(sleep) => {
                self.failed_rounds = 0;
                sleep
            }
            Err(message) => {
                // The extension dropped during the round: the worker ends, with no warning.
                if !catching(|| tx(housekeeping::extension_ready)).unwrap_or(true) {
                    return Duration::ZERO;
                }
                let pause = planner::retry_delay(
                    self.failed_rounds,
                    Duration::from_secs(1),
                    Duration::from_secs(300),
                    None,
                    rand::random(),
                );
                self.failed_rounds = self.failed_rounds.saturating_add(1);
                warning!(
                    "llmbatching: a worker round failed: {}; next round in {:.1}s",
                    self.redact(&message),
                    pause.as_secs_f64()
                );
                pause
            }
        }
    }

    /// Whether an ended batch's results are still asked for again when they cannot be read whole.
    fn within_result_window(&self, batch: &BatchRow, settings: &Settings) -> bool {
        batch.ended_ago < settings.result_retry_window && !batch.results_given_up
    }

    /// What `pg_stat_activity` shows while the worker sleeps.
    fn idle_status(&self) -> String {
        if self.said_copy {
            "llmbatching: this database is a copy; sending nothing until llm_adopt()".into()
        } else if self.transfers.count() > 0 {
            format!(
                "llmbatching: waiting on the provider ({})",
                self.transfers.describe()
            )
        } else {
            String::new()
        }
    }

    /// Sleeps until the next round is due, the latch is set (a commit queued requests, a
    /// signal came) or a transfer ended; false when the worker is to stop.
    fn wait(&mut self, sleep: Duration) -> bool {
        let until = Instant::now() + sleep;
        let mut yield_check = Instant::now() + YIELD_CHECK;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if shutdown_requested() {
                return false;
            }
            if left.is_zero() {
                return true;
            }
            if Instant::now() >= yield_check {
                if registry::database_wanted_alone() {
                    return true;
                }
                yield_check = Instant::now() + YIELD_CHECK;
            }
            // Transfers end on threads, which cannot set the latch (only the main thread may
            // call into PostgreSQL): while any is under way, look for ended ones often.
            let slice = if self.transfers.count() > 0 {
                left.min(LANDING_CHECK)
            } else {
                left.min(YIELD_CHECK)
            };
            if wait_latch(slice) {
                // (A commit may have queued requests.)
                self.queue_quiet_until = None;
                return !shutdown_requested();
            }
            if self.transfers.any_landed() {
                return !shutdown_requested();
            }
        }
    }

    /// Ends the transfers under way and records those that ended meanwhile. What is left
    /// unrecorded is done again by the next worker (see the module's comment).
    fn stop(&mut self) {
        self.writer.stop();
        let settings = Settings::current();
        for (id, step, outcome) in self.transfers.stop(STOP_PATIENCE) {
            if let Some(batch) = self.in_flight.remove(&id) {
                let outcome = outcome.unwrap_or_else(|panic| Err(ProviderError::Local(panic)));
                let _ = catching(|| self.land(batch, step, outcome, &settings));
            }
        }
    }

    /// A provider's text without any key in use or any echoed credential, bounded.
    fn redact(&self, text: &str) -> String {
        self.connections
            .keys()
            .fold(redact(text, ""), |text, key| redact(&text, key))
    }

    /// [`Self::redact`] for a JSON text kept whole.
    fn redact_json(&self, text: &str) -> String {
        self.connections
            .keys()
            .fold(redact_json(text, ""), |text, key| redact_json(&text, key))
    }

    /// Does everything that is due; returns how long to sleep before the next round.
    fn run_round(&mut self) -> Duration {
        let settings = Settings::current();
        let idle = settings.poll_interval;
        if let Some(problem) = tx(housekeeping::copy_problem) {
            if !self.said_copy {
                warning!("llmbatching: {problem}");
                self.said_copy = true;
            }
            self.forget_transfers();
            return idle.min(Duration::from_secs(10));
        }
        self.said_copy = false;
        self.land_transfers(&settings);
        // Read every round: llm_adopt(as_copy => true) gives the installation a new identity.
        self.instance = Some(tx(housekeeping::instance_id));
        self.purge_if_due(&settings);
        self.connections.new_round();
        tx(housekeeping::promote_orphaned_duplicates);
        let next_group_due = self.form_batches(&settings);
        tx(housekeeping::flag_cancelled_batches);
        self.start_due_steps(&settings);
        self.writer.write_due(&settings);
        if registry::preloaded() {
            let identities = self.connections.identities();
            tx(move || publish_usage(&identities));
        }
        let busy = self.transfers.busy_batches();
        let next_step_due = tx(move || housekeeping::next_step_due(&busy));
        let next_write_back_due = self.writer.next_look();
        [next_group_due, next_step_due, next_write_back_due]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(idle)
            .clamp(Duration::from_millis(10), idle)
    }

    /// Deletes finished rows older than `llmbatching.retention`, at most once a minute.
    fn purge_if_due(&mut self, settings: &Settings) {
        let Some(retention) = settings.retention else {
            return;
        };
        if self
            .last_purge
            .is_some_and(|at| at.elapsed() < PURGE_EVERY.min(retention))
        {
            return;
        }
        self.last_purge = Some(std::time::Instant::now());
        let (requests, batches) = tx(move || housekeeping::purge_finished(retention));
        if requests + batches > 0 {
            log!("llmbatching: purged {requests} finished requests and {batches} batches past llmbatching.retention");
        }
    }

    /// Claims queued requests into new batches for every group that is due, within the
    /// limits on open batches and on each model's enqueued tokens. Returns how long until the
    /// first group left waiting becomes due.
    fn form_batches(&mut self, settings: &Settings) -> Option<Duration> {
        let (limits, wait) = (settings.limits, settings.batch_wait);
        let (max_open, default_token_cap, per_role_cap) = (
            settings.max_batches_in_flight,
            settings.max_enqueued_tokens,
            settings.max_batches_per_role,
        );
        // Batches claimed and not yet uploaded, by route: a route with as many as may be sent at
        // once claims no more this round, so that sending starts while the rest of a large
        // queue is claimed, rather than after it.
        let now = Instant::now();
        if let Some(until) = self.queue_quiet_until.filter(|until| now < *until) {
            return Some(until - now);
        }
        let mut unsent = tx(claim::unsent_batches_by_route);
        loop {
            let groups = tx(claim::queued_groups);
            let any_groups = !groups.is_empty();
            let (mut claimed, mut next_due) = (0, None::<Duration>);
            for mut group in groups {
                // A provider that cannot be used now (no key, dropped) leaves its requests queued.
                let route = (group.provider.clone(), group.account.clone());
                let Some((kind, _)) = self.connections.get(&route, settings.transfer_idle_timeout)
                else {
                    continue;
                };
                if unsent.get(&route).copied().unwrap_or(0)
                    >= settings.max_concurrent_transfers as i64
                {
                    continue;
                }
                let key = group.key();
                if self
                    .claims_paused
                    .get(&key)
                    .is_some_and(|until| Instant::now() < *until)
                {
                    continue;
                }
                let limits = limits.within(kind.limits());
                group.queued = tx(|| claim::measure_group(&group, limits.max_requests));
                if !planner::group_is_due(&group.queued, limits, wait) {
                    let due_in = planner::due_in(&group.queued, limits, wait);
                    next_due = Some(next_due.map_or(due_in, |d| d.min(due_in)));
                    continue;
                }
                // Limits the provider counts per key hold across the databases using the key.
                let account = self.connections.account_identity(&route);
                let model = registry::short_hash(&[&group.model]);
                let identities = self.connections.identities();
                let taken = catching(move || {
                    tx(move || {
                        // A role may hold one of its own queued requests locked (SELECT … FOR
                        // UPDATE): the claim waits for it at most this long, then this group waits
                        // for a later round, and nothing else does.
                        state::bound_lock_waits();
                        if let Some(account) = account {
                            registry::lock_account_for_claim(account);
                        }
                        let (open_elsewhere, tokens_elsewhere) =
                            account.map_or((0, 0), |a| registry::usage_elsewhere(a, model));
                        // A due group that cannot go now waits for a batch to end: a batch step.
                        if claim::open_batch_count() + open_elsewhere >= max_open {
                            return false;
                        }
                        let budget =
                            claim::token_budget(&group, default_token_cap).map(|b| TokenBudget {
                                available: b
                                    .available
                                    .saturating_sub(tokens_elsewhere.max(0) as usize),
                                ..b
                            });
                        let taken =
                            claim::claim_batch(&group, limits, budget, per_role_cap).is_some();
                        if taken {
                            publish_usage(&identities);
                        }
                        taken
                    })
                })
                .unwrap_or_else(|message| {
                    // The group waits (its other requests too): trying again at once would
                    // spend the lock wait again every round.
                    self.claims_paused
                        .insert(key, Instant::now() + CLAIM_FAILURE_PAUSE);
                    self.say_claim_failed(&message);
                    false
                });
                if taken {
                    *unsent.entry(route).or_insert(0) += 1;
                }
                claimed += usize::from(taken);
            }
            if claimed == 0 || shutdown_requested() {
                if claimed == 0 && any_groups {
                    let quiet = next_due.unwrap_or(QUEUE_QUIET).min(QUEUE_QUIET);
                    self.queue_quiet_until = Some(Instant::now() + quiet);
                }
                return next_due;
            }
        }
    }

    /// Logs, at most once a minute, that a claim failed (its group waits for a later round).
    fn say_claim_failed(&mut self, message: &str) {
        if self
            .said_claim_failed
            .is_some_and(|at| at.elapsed() < Duration::from_secs(60))
        {
            return;
        }
        self.said_claim_failed = Some(Instant::now());
        warning!(
            "llmbatching: claiming queued requests failed, their group waits for a later round: {}",
            self.redact(message)
        );
    }

    /// Starts the next step of each batch that has one due, while fewer than
    /// `max_concurrent_transfers` are under way. The database half of a step runs here; its
    /// provider calls run beside the worker (see `transfers`) and land in [`Self::land`].
    fn start_due_steps(&mut self, settings: &Settings) {
        let due = tx(state::batches_due);
        for batch in due {
            if shutdown_requested() || self.transfers.count() >= settings.max_concurrent_transfers {
                break;
            }
            if self.transfers.busy(batch.id) {
                continue;
            }
            let Some((kind, client)) = self
                .connections
                .get(&batch.route(), settings.transfer_idle_timeout)
            else {
                continue;
            };
            if !kind.tags_batches() && self.must_wait_to_create(&batch) {
                continue;
            }
            report_activity(&format!(
                "llmbatching: batch {} ({})",
                batch.id, batch.state
            ));
            let retry = batch.clone();
            // An error in the database on the way is the batch's own failed step (retried with
            // backoff, visible in `last_error`), never the worker's.
            if let Err(message) = catching(|| self.start_step(batch, kind, client, settings)) {
                self.step_failed(
                    &retry,
                    "a database step",
                    ProviderError::Database(message),
                    settings,
                );
            }
        }
    }

    /// Whether a batch must wait before its create call, for a provider whose batches carry no
    /// tags: creates under one route go one at a time, and none while another batch's create is
    /// in doubt, so that a batch found again after a lost answer (see `find_created`) can only
    /// be that one's.
    fn must_wait_to_create(&self, batch: &BatchRow) -> bool {
        if batch.state != "uploaded" {
            return false;
        }
        let creating = self.in_flight.values().any(|other| {
            other.id != batch.id
                && other.state == "uploaded"
                && other.provider == batch.provider
                && other.account == batch.account
        });
        if creating {
            return true;
        }
        let (provider, account) = batch.route();
        let in_doubt = tx(move || send::create_in_doubt(&provider, &account));
        in_doubt.is_some_and(|other| other != batch.id)
    }

    /// Prepares a batch's next step and starts its provider calls.
    fn start_step(
        &mut self,
        batch: BatchRow,
        kind: &'static dyn Kind,
        client: SharedProvider,
        settings: &Settings,
    ) {
        let call = match batch.state.as_str() {
            "pending" => self.prepare_upload(&batch, kind, settings),
            "uploaded" => self.prepare_create(&batch, kind, settings),
            "submitted" if batch.cancel_requested && !batch.cancel_sent => {
                Some(cancel_call(&batch, "every request was cancelled"))
            }
            // Past its completion window and a grace period: cancelled at the provider and
            // then read back like an expired batch (answers kept, the rest queued again).
            "submitted" if batch.submitted_ago > settings.batch_deadline && !batch.cancel_sent => {
                Some(cancel_call(&batch, "past llmbatching.batch_deadline"))
            }
            "submitted" => Some(poll_call(&batch)),
            "ingesting" => Some(self.download_call(&batch)),
            _ => None,
        };
        if let Some((step, call)) = call {
            self.start_transfer(batch, step, call, client);
        }
    }

    /// Runs a step's provider calls beside the worker; the batch waits for them to land.
    fn start_transfer(
        &mut self,
        batch: BatchRow,
        step: &'static str,
        call: Call,
        client: SharedProvider,
    ) {
        let id = batch.id;
        match self.transfers.start(id, step, move || call(&*client)) {
            Ok(()) => {
                self.in_flight.insert(id, batch);
            }
            Err(e) => {
                warning!("llmbatching: batch {id}: cannot start a thread for its {step}: {e}")
            }
        }
    }

    /// Applies what the transfers that ended brought: each batch's step is recorded, or its
    /// failure is, in transactions of its own.
    fn land_transfers(&mut self, settings: &Settings) {
        for (id, step, outcome) in self.transfers.landed() {
            let Some(batch) = self.in_flight.remove(&id) else {
                continue;
            };
            let outcome = outcome.unwrap_or_else(|panic| Err(ProviderError::Local(panic)));
            self.land(batch, step, outcome, settings);
        }
    }

    /// Drops what the transfers that ended brought, unrecorded: their steps are done again
    /// (see the module's comment) if ever their batches are served again.
    fn forget_transfers(&mut self) {
        for (id, _, _) in self.transfers.landed() {
            self.in_flight.remove(&id);
        }
    }

    fn land(
        &mut self,
        batch: BatchRow,
        step: &'static str,
        outcome: ProviderResult<Landed>,
        settings: &Settings,
    ) {
        let landed = match outcome {
            Ok(landed) => landed,
            Err(e) if step == DELETE_STEP => return self.warn_undeleted(&batch, &e),
            Err(e) => {
                self.queue_quiet_until = None;
                return self.step_failed(&batch, step, e, settings);
            }
        };
        // A batch that moved on may leave room for a claim (see `queue_quiet_until`).
        if !matches!(landed, Landed::Polled(_) | Landed::Deleted) {
            self.queue_quiet_until = None;
        }
        let retry = batch.clone();
        let finished = catching(|| match landed {
            Landed::Uploaded { file_id, bytes } => {
                tx(|| send::record_uploaded(batch.id, file_id.as_deref(), bytes));
                Ok(())
            }
            Landed::Created { info, found } => {
                if found {
                    log!(
                        "llmbatching: batch {} was already created at the provider as {}",
                        batch.id,
                        info.id
                    );
                }
                let poll = settings.poll_interval;
                tx(|| send::record_submitted(batch.id, &info, poll));
                Ok(())
            }
            Landed::Polled(info) => self.finish_poll(&batch, info, settings),
            Landed::Cancelled { why } => {
                log!(
                    "llmbatching: batch {} ({}): {why}; cancelled at the provider",
                    batch.id,
                    batch.provider_batch_id.as_deref().unwrap_or_default()
                );
                tx(|| send::record_cancel_sent(batch.id));
                Ok(())
            }
            Landed::Downloaded {
                refreshed,
                files,
                took,
            } => self.finish_ingest(batch, refreshed, files, took, settings),
            Landed::Deleted => {
                tx(|| send::record_files_deleted(batch.id));
                Ok(())
            }
        });
        match finished {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.step_failed(&retry, step, e, settings),
            Err(message) => {
                self.step_failed(&retry, step, ProviderError::Database(message), settings)
            }
        }
    }

    /// Writes the input file from the batch's rows; the upload is the transfer. A batch whose
    /// requests were all cancelled meanwhile is closed instead.
    fn prepare_upload(
        &mut self,
        batch: &BatchRow,
        kind: &'static dyn Kind,
        settings: &Settings,
    ) -> Option<(&'static str, Call)> {
        let path = self.input_path(batch);
        let (lines, bytes) = match self.write_input(batch, kind, &path) {
            Ok(written) => written,
            Err(e) => {
                self.step_failed(batch, "upload", ProviderError::Local(e), settings);
                return None;
            }
        };
        if lines == 0 {
            let _ = std::fs::remove_file(&path);
            tx(|| ingest::close_batch(batch.id, "the batch held no requests", i32::MAX, false));
            return None;
        }
        let name = format!("llmbatching-{}-{}.jsonl", self.instance_tag(), batch.id);
        let call: Call = Box::new(move |provider| {
            let staged = provider.stage_input(&path, &name);
            let _ = std::fs::remove_file(&path);
            Ok(Landed::Uploaded {
                file_id: staged?,
                bytes,
            })
        });
        Some(("upload", call))
    }

    fn input_path(&self, batch: &BatchRow) -> PathBuf {
        self.staging.join(format!("batch-{}-input.jsonl", batch.id))
    }

    /// Writes the batch's input file from its rows; returns (lines, bytes).
    fn write_input(
        &self,
        batch: &BatchRow,
        kind: &'static dyn Kind,
        path: &std::path::Path,
    ) -> Result<(usize, u64), String> {
        let (batch, path) = (batch.clone(), path.to_owned());
        tx(move || send::write_input_file(&batch, kind, &path)).map_err(|e| e.to_string())
    }

    fn instance_tag(&self) -> &str {
        let id = self.instance.as_deref().unwrap_or("");
        &id[..id.len().min(8)]
    }

    /// Records that a create call is about to be made, so that a worker that dies before it
    /// hears the answer searches the provider's batches for this one before creating again.
    /// A provider that takes the requests with the call gets the input file written again.
    fn prepare_create(
        &mut self,
        batch: &BatchRow,
        kind: &'static dyn Kind,
        settings: &Settings,
    ) -> Option<(&'static str, Call)> {
        if batch.cancel_requested {
            let (id, max_attempts) = (batch.id, settings.max_attempts);
            tx(move || {
                ingest::close_batch(
                    id,
                    "the batch was cancelled before it was sent",
                    max_attempts,
                    false,
                )
            });
            self.delete_files(batch, settings);
            return None;
        }
        // The lines sent: a provider without metadata finds a lost batch again by their number.
        let (input_path, request_count) = match batch.input_file_id {
            Some(_) => (None, batch.request_count),
            None => {
                let path = self.input_path(batch);
                match self.write_input(batch, kind, &path) {
                    Ok((lines, _)) => (Some(path), lines as i64),
                    Err(e) => {
                        self.step_failed(
                            batch,
                            "batch creation",
                            ProviderError::Local(e),
                            settings,
                        );
                        return None;
                    }
                }
            }
        };
        let searched = batch.create_attempted;
        let taken = if searched {
            let provider = batch.provider.clone();
            tx(move || state::taken_provider_batches(&provider))
        } else {
            Vec::new()
        };
        tx(|| send::record_create_attempt(batch.id));
        let id = batch.id;
        let attempted_at = match batch.create_attempted_at {
            Some(at) => Some(at),
            None => tx(move || state::batch(id)).and_then(|b| b.create_attempted_at),
        };
        let tags = vec![
            (META_BATCH_ID, batch.id.to_string()),
            (META_INSTANCE, self.instance.clone().unwrap_or_default()),
        ];
        let input_file_id = batch.input_file_id.clone();
        let endpoint = batch.endpoint();
        let call: Call = Box::new(move |provider| {
            let request = NewBatch {
                input_file_id: input_file_id.as_deref(),
                input_path: input_path.as_deref(),
                endpoint,
                metadata: tags,
                request_count,
                attempted_at,
                taken: &taken,
            };
            let outcome = (|| {
                if searched {
                    if let Some(info) = provider.find_created(&request)? {
                        return Ok(Landed::Created { info, found: true });
                    }
                }
                let info = provider.create_batch(&request)?;
                Ok(Landed::Created { info, found: false })
            })();
            if let Some(path) = &input_path {
                let _ = std::fs::remove_file(path);
            }
            outcome
        });
        Some(("batch creation", call))
    }

    fn finish_poll(
        &mut self,
        batch: &BatchRow,
        mut info: BatchInfo,
        settings: &Settings,
    ) -> Result<(), ProviderError> {
        let provider_id = info.id.clone();
        for error in &mut info.errors {
            error.message = self.redact(&error.message);
        }
        // Completed, but without its result files or counting fewer results than lines:
        // the provider is still writing them. Ending the batch now would send again answers the
        // provider has; ask again later instead.
        // Past the batch's deadline it is believed as it is, and read back for what it holds.
        let incomplete = info.status == BatchStatus::Completed
            && batch.submitted_ago <= settings.batch_deadline
            && (info.output_file_id.is_none() && info.error_file_id.is_none()
                || info.completed + info.failed < info.total);
        if incomplete {
            return Err(ProviderError::Malformed(format!(
                "the provider reports batch {provider_id} completed without all its results yet ({} of {} counted); asking again",
                info.completed + info.failed,
                info.total
            )));
        }
        if info.status.is_terminal() {
            log!(
                "llmbatching: batch {} ({provider_id}) ended {}",
                batch.id,
                info.status.as_str()
            );
        }
        let poll = settings.poll_interval;
        tx(|| send::record_poll(batch.id, &info, poll));
        Ok(())
    }

    /// Downloads the batch's output and error files to the staging directory. After a failed
    /// reading the provider is asked again first: its file ids may have changed. (If that
    /// question fails too, the ids known are tried: it is only a chance to do better.)
    fn download_call(&self, batch: &BatchRow) -> (&'static str, Call) {
        let refresh = batch
            .provider_batch_id
            .clone()
            .filter(|_| batch.step_failures > 0);
        let known = (batch.output_file_id.clone(), batch.error_file_id.clone());
        let staging = self.staging.clone();
        let id = batch.id;
        let call: Call = Box::new(move |provider| {
            let started = Instant::now();
            let refreshed = refresh.and_then(|pid| provider.get_batch(&pid).ok());
            let (output, error) = match &refreshed {
                Some(info) => (info.output_file_id.clone(), info.error_file_id.clone()),
                None => known,
            };
            let mut files = Vec::new();
            for (kind, file_id) in [("output", output), ("error", error)] {
                let Some(file_id) = file_id else { continue };
                let path = staging.join(format!("batch-{id}-{kind}.jsonl"));
                files.push(path.clone());
                if let Err(e) = provider.download_results(&file_id, &path) {
                    for written in &files {
                        let _ = std::fs::remove_file(written);
                    }
                    return Err(e);
                }
            }
            Ok(Landed::Downloaded {
                refreshed,
                files,
                took: started.elapsed(),
            })
        });
        ("download", call)
    }

    /// Applies the output and error files, then settles what they left out.
    fn finish_ingest(
        &mut self,
        batch: BatchRow,
        refreshed: Option<BatchInfo>,
        files: Vec<PathBuf>,
        downloading: Duration,
        settings: &Settings,
    ) -> Result<(), ProviderError> {
        let batch = match refreshed {
            Some(info) => {
                let id = batch.id;
                tx(|| send::record_result_files(id, &info));
                tx(move || state::batch(id)).unwrap_or(batch)
            }
            None => batch,
        };
        let applied = self.apply_files(&batch, &files, settings);
        for path in &files {
            let _ = std::fs::remove_file(path);
        }
        let (lines, applying) = applied?;
        let batch = &batch;
        let last_read = !self.within_result_window(batch, settings);
        // Fewer lines than the provider counted means a download was cut short: read the files
        // again rather than send the missing requests a second time. Applying them twice is
        // harmless. A provider that keeps delivering short files is believed in the end.
        if lines < batch.counted_results && !last_read {
            return Err(ProviderError::Malformed(format!(
                "the result files hold {lines} readable lines, the provider counted {}",
                batch.counted_results
            )));
        }
        let reason = leftover_reason(batch);
        let token_limited = token_limited(batch);
        if token_limited {
            // Nothing ran: the model's queue at the provider was full. Wait, then send again.
            let pause = settings.token_limit_pause;
            warning!(
                "llmbatching: batch {} refused for the enqueued-token limit of model \"{}\"; its requests are queued again and the model waits {:.0}s",
                batch.id, batch.model, pause.as_secs_f64()
            );
            tx(|| ingest::pause_model(&batch.model, pause, &reason));
        }
        let max_attempts = settings.max_attempts;
        tx(|| ingest::close_batch(batch.id, &reason, max_attempts, token_limited));
        log!(
            "llmbatching: batch {} read back: {lines} result lines (download {:.2}s, applying {:.2}s)",
            batch.id,
            downloading.as_secs_f64(),
            applying.as_secs_f64()
        );
        self.delete_files(batch, settings);
        Ok(())
    }

    /// Reads the result files twice: first to choose each request's line (see
    /// [`results::LineFilter`]: the same choice however the files are chunked), then to apply
    /// the chosen lines. Returns how many requests of this database the lines answered, and
    /// how long applying took.
    fn apply_files(
        &self,
        batch: &BatchRow,
        files: &[PathBuf],
        settings: &Settings,
    ) -> Result<(i64, Duration), ProviderError> {
        let started = Instant::now();
        // Until the window after the batch ended has passed, a reading that is not whole is
        // tried again; on the last one, lines that still cannot be read fail their requests.
        let last_read = !self.within_result_window(batch, settings);
        let mut filter = results::LineFilter::default();
        for path in files {
            self.read_file(batch, path, |r| filter.note(&r))?;
        }
        let named = filter.named();
        let batch_id = batch.id;
        let known = catching(move || tx(move || ingest::existing_ids(batch_id, named)))
            .map_err(ProviderError::Database)?;
        let unknown = filter.forget_unknown(&known);
        if unknown > 0 {
            warning!(
                "llmbatching: batch {}: {unknown} result lines name no request of this database; they are ignored",
                batch.id
            );
        }
        let mut unread = 0;
        for path in files {
            let (_, left) =
                self.apply_file(batch, path, settings.max_attempts, last_read, &mut filter)?;
            unread += left;
        }
        if filter.duplicates() > 0 {
            warning!(
                "llmbatching: batch {}: {} result lines repeated a request already answered; the first answer is kept",
                batch.id,
                filter.duplicates()
            );
        }
        if unread > 0 {
            return Err(ProviderError::Malformed(format!(
                "{unread} result lines could not be read; the files are read again"
            )));
        }
        Ok((filter.requests_named(), started.elapsed()))
    }

    /// Deletes a finished batch's files at the provider, unless told to keep them. Best
    /// effort: a file left behind expires at the provider on its own.
    fn delete_files(&mut self, batch: &BatchRow, settings: &Settings) {
        let leftovers = Leftovers {
            batch_id: batch.provider_batch_id.clone(),
            input_file_id: batch.input_file_id.clone(),
            output: batch.output_file_id.clone(),
            errors: batch.error_file_id.clone(),
        };
        let nothing_left = leftovers.batch_id.is_none() && leftovers.input_file_id.is_none();
        if !settings.delete_provider_files || nothing_left || self.transfers.busy(batch.id) {
            return;
        }
        let Some((_, client)) = self
            .connections
            .get(&batch.route(), settings.transfer_idle_timeout)
        else {
            return;
        };
        let call: Call =
            Box::new(move |provider| provider.clean_up(&leftovers).map(|_| Landed::Deleted));
        self.start_transfer(batch.clone(), DELETE_STEP, call, client);
    }

    fn warn_undeleted(&self, batch: &BatchRow, error: &ProviderError) {
        warning!(
            "llmbatching: batch {}: could not delete its files at the provider ({}); they expire there on their own",
            batch.id,
            self.redact(&error.to_string())
        );
    }

    /// Reads a result file line by line, handing each line that names a request to `each`.
    /// Returns how many lines could not be attributed to a request, and the first problem.
    fn read_file(
        &self,
        batch: &BatchRow,
        path: &std::path::Path,
        mut each: impl FnMut(LineResult),
    ) -> Result<(usize, Option<String>), ProviderError> {
        let local = |e: std::io::Error| ProviderError::Local(format!("{}: {e}", path.display()));
        let mut reader = std::io::BufReader::new(std::fs::File::open(path).map_err(local)?);
        let endpoint = batch.endpoint();
        let kind = self.connections.kind_of(&batch.route()).ok_or_else(|| {
            ProviderError::Local(format!(
                "provider \"{}\" cannot be used now",
                batch.provider
            ))
        })?;
        let mut line = Vec::new();
        let (mut unattributed, mut first_problem) = (0usize, None);
        loop {
            match results::read_line_bounded(&mut reader, &mut line, results::MAX_RESULT_LINE_BYTES)
                .map_err(local)?
            {
                LineRead::Line => {
                    let text = String::from_utf8_lossy(&line);
                    if text.trim().is_empty() {
                        continue;
                    }
                    match kind.parse_result_line(endpoint, text.trim_end()) {
                        Ok(result) => each(result),
                        Err(why) => {
                            unattributed += 1;
                            first_problem.get_or_insert(why);
                        }
                    }
                }
                LineRead::TooLong => {
                    unattributed += 1;
                    first_problem.get_or_insert(format!(
                        "a line over {} bytes",
                        results::MAX_RESULT_LINE_BYTES
                    ));
                }
                LineRead::End => return Ok((unattributed, first_problem)),
            }
        }
    }

    /// Reads a result file again and applies the lines `filter` keeps, in chunks of one
    /// transaction each. Returns how many lines named a request, and how many of those could
    /// not be read and were left for the next reading (`last_read` false: it is read again;
    /// true: they fail, with the line kept, rather than be sent again).
    fn apply_file(
        &self,
        batch: &BatchRow,
        path: &std::path::Path,
        max_attempts: i32,
        last_read: bool,
        filter: &mut results::LineFilter,
    ) -> Result<(i64, i64), ProviderError> {
        let mut chunk = Vec::with_capacity(INGEST_CHUNK);
        let mut chunk_bytes = 0usize;
        let (mut attributed, mut unread, mut unread_first) = (0i64, 0i64, None);
        let (unattributed, first_problem) = self.read_file(batch, path, |result| {
            attributed += 1;
            if !filter.apply(&result) {
                return;
            }
            // The best this request has is a line that cannot be read: read the files again
            // (nothing of it is applied meanwhile), unless this is the last reading.
            if matches!(result.outcome, Outcome::Unreadable { .. }) && !last_read {
                unread += 1;
                unread_first.get_or_insert(format!("request {}: unreadable", result.request_id));
                return;
            }
            chunk_bytes += approximate_size(&result);
            chunk.push(self.redacted(result));
            if chunk.len() >= INGEST_CHUNK || chunk_bytes >= INGEST_CHUNK_BYTES {
                chunk_bytes = 0;
                self.apply_chunk(batch, std::mem::take(&mut chunk), max_attempts);
            }
        })?;
        if !chunk.is_empty() {
            self.apply_chunk(batch, chunk, max_attempts);
        }
        if unattributed > 0 || unread > 0 {
            warning!(
                "llmbatching: batch {}: {} result lines could not be read (first: {})",
                batch.id,
                unattributed as i64 + unread,
                self.redact(&first_problem.or(unread_first).unwrap_or_default())
            );
        }
        Ok((attributed, unread))
    }

    /// A provider's error texts in a result, redacted (see [`redact`]).
    fn redacted(&self, mut result: LineResult) -> LineResult {
        match &mut result.outcome {
            Outcome::Failed { message, response } => {
                *message = self.redact(message);
                // The provider's error body is kept for its request's role to read.
                if let Some(body) = response {
                    *body = self.redact_json(body);
                }
            }
            Outcome::Retry { reason } => *reason = self.redact(reason),
            Outcome::Unreadable { reason, line } => {
                *reason = self.redact(reason);
                *line = self.redact_json(line);
            }
            Outcome::Completed { .. } => {}
        }
        result
    }

    /// Applies a chunk of results in a transaction. A chunk that fails is applied again one
    /// result at a time, and a result that fails alone fails its request only: an answer no
    /// statement can store never stops the others, nor the worker.
    fn apply_chunk(&self, batch: &BatchRow, chunk: Vec<LineResult>, max_attempts: i32) {
        let (id, formats) = (batch.id, batch.has_answer_formats);
        let whole = chunk.clone();
        let Err(message) =
            catching(move || tx(move || ingest::apply_results(id, whole, max_attempts, formats)))
        else {
            return;
        };
        warning!(
            "llmbatching: batch {id}: {} answers could not be stored together ({message}); storing them one at a time",
            chunk.len()
        );
        for result in chunk {
            let request = result.request_id;
            let alone = catching(move || {
                tx(move || ingest::apply_results(id, vec![result], max_attempts, formats))
            });
            if let Err(message) = alone {
                let reason = format!("the answer could not be stored: {message}");
                let _ = catching(move || tx(move || ingest::fail_request(id, request, &reason)));
            }
        }
    }

    /// Records a failed step. Passing faults are retried with backoff; a refusal that persists
    /// ends the batch, and its requests go back to the queue (or fail, out of attempts).
    fn step_failed(
        &mut self,
        batch: &BatchRow,
        step: &str,
        error: ProviderError,
        settings: &Settings,
    ) {
        let message = self.redact(&format!("{step} failed: {error}"));
        // The results of an ended batch are asked for again for the whole window, whatever the
        // error (giving up would send again answers the provider has), and given up once it has
        // passed (or an administrator said so), whatever the error.
        let final_refusal = if batch.state == "ingesting" {
            !self.within_result_window(batch, settings)
        } else {
            !error.is_retryable() && batch.step_failures + 1 >= REFUSALS_BEFORE_GIVING_UP
        };
        if final_refusal {
            warning!(
                "llmbatching: batch {}: {message}; giving up on this batch",
                batch.id
            );
            let (id, max_attempts) = (batch.id, settings.max_attempts);
            // The provider's words go to the batch, which only administrators read; the
            // requests of every role in it get a neutral reason.
            tx(move || {
                send::record_last_error(id, &message);
                ingest::close_batch(id, REFUSED_BATCH, max_attempts, false)
            });
            self.delete_files(batch, settings);
            return;
        }
        let base = settings.poll_interval.min(Duration::from_secs(2));
        // An ended batch's files are asked for again within a minute at most: the answers are
        // there, and the window bounds how long this goes on.
        let cap = if batch.state == "ingesting" {
            settings.poll_interval.max(Duration::from_secs(60))
        } else {
            settings.poll_interval.max(Duration::from_secs(300))
        };
        let delay = planner::retry_delay(
            batch.step_failures as u32,
            base,
            cap,
            error.retry_after(),
            rand::random(),
        );
        warning!(
            "llmbatching: batch {}: {message}; retrying in {:.1}s",
            batch.id,
            delay.as_secs_f64()
        );
        let id = batch.id;
        tx(move || send::record_step_failure(id, &message, delay));
    }
}

/// The provider calls of a step, run beside the worker (see `transfers`).
type Call = Box<dyn FnOnce(&dyn BatchProvider) -> ProviderResult<Landed> + Send>;

/// What a step's provider calls brought back, for the worker to record.
enum Landed {
    /// `file_id`: where the provider keeps the input, if it keeps a file of it.
    Uploaded {
        file_id: Option<String>,
        bytes: u64,
    },
    /// `found`: the batch was created by an earlier call whose answer went unrecorded.
    Created {
        info: BatchInfo,
        found: bool,
    },
    Polled(BatchInfo),
    Cancelled {
        why: &'static str,
    },
    /// The result files, downloaded; `refreshed`: the batch as the provider showed it first.
    Downloaded {
        refreshed: Option<BatchInfo>,
        files: Vec<PathBuf>,
        took: Duration,
    },
    Deleted,
}

/// The step that deletes a finished batch's files; its failure is only worth a warning.
const DELETE_STEP: &str = "file deletion";

/// Tells the other databases' workers what this database's open batches hold of each account
/// (see `registry`); in a transaction.
fn publish_usage(identities: &HashMap<connections::Route, u64>) {
    if !registry::preloaded() {
        return;
    }
    let usage: Vec<registry::Usage> = claim::open_usage()
        .into_iter()
        .filter_map(|u| {
            Some(registry::Usage {
                account: *identities.get(&(u.provider, u.account))?,
                model: registry::short_hash(&[&u.model]),
                open_batches: u.open_batches.clamp(0, u32::MAX as i64) as u32,
                enqueued_tokens: u.enqueued_tokens,
            })
        })
        .collect();
    if !registry::publish_usage(&usage) {
        static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
            warning!("llmbatching: the shared table of account usage is full; limits per key now count only part of the other databases' batches");
        }
    }
}

fn poll_call(batch: &BatchRow) -> (&'static str, Call) {
    let provider_id = batch.provider_batch_id.clone().unwrap_or_default();
    let call: Call = Box::new(move |provider| provider.get_batch(&provider_id).map(Landed::Polled));
    ("poll", call)
}

/// Cancels a batch at the provider (every request was cancelled, or it is past its deadline).
/// A refusal means the batch already ended, which the next poll will show.
fn cancel_call(batch: &BatchRow, why: &'static str) -> (&'static str, Call) {
    let provider_id = batch.provider_batch_id.clone().unwrap_or_default();
    let call: Call = Box::new(move |provider| match provider.cancel_batch(&provider_id) {
        Ok(_) | Err(ProviderError::Rejected { .. }) => Ok(Landed::Cancelled { why }),
        Err(e) => Err(e),
    });
    ("cancel", call)
}

/// The reason requests get when the provider refused their batch for good.
const REFUSED_BATCH: &str =
    "the provider refused this request's batch (administrators see why in llmbatching.batches.last_error)";

/// Whether the provider failed the batch for the model's enqueued-token limit.
fn token_limited(batch: &BatchRow) -> bool {
    batch.provider_status.as_deref() == Some("failed")
        && batch
            .provider_errors
            .as_deref()
            .is_some_and(|e| e.contains(TOKEN_LIMIT_CODE))
}

/// About how many bytes a result holds, to bound what a chunk keeps in memory.
fn approximate_size(result: &LineResult) -> usize {
    match &result.outcome {
        Outcome::Completed { response, text, .. } => {
            response.len() + text.as_ref().map_or(0, String::len)
        }
        Outcome::Failed { message, response } => {
            message.len() + response.as_ref().map_or(0, String::len)
        }
        Outcome::Retry { reason } => reason.len(),
        Outcome::Unreadable { reason, line } => reason.len() + line.len(),
    }
}

/// Why requests that no result line settled go back to the queue.
fn leftover_reason(batch: &BatchRow) -> String {
    let status = BatchStatus::parse(batch.provider_status.as_deref().unwrap_or(""));
    match status {
        BatchStatus::Expired => "the batch expired before this request ran".into(),
        BatchStatus::Cancelled => "the batch was cancelled before this request ran".into(),
        // The provider's reason stays with the batch (administrators read it there): it may
        // name other roles' requests.
        BatchStatus::Failed if token_limited(batch) => {
            "the provider's enqueued-token limit for the model was reached; queued again".into()
        }
        BatchStatus::Failed => "the batch failed at the provider (administrators see why in llmbatching.batches.provider_errors)".into(),
        _ => "the provider returned no result for this request".into(),
    }
}
