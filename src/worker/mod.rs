//! The background worker: forms batches from queued requests, carries each batch through the
//! provider (upload, create, poll, download), and sees that the answers are read back (by a
//! process of their own when it can, see `reader`) and written back (see `writer`).
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
mod reader;
mod reading;
mod writer;

use crate::provider::redact::redact_all;
use crate::provider::{
    BatchInfo, BatchProvider, BatchStatus, Kind, Leftovers, NewBatch, ProviderError,
    ProviderResult, SharedProvider,
};
use crate::registry::{self, Exit};
use crate::restricted::Failure;
use crate::session;
use crate::state::{self, claim, held, housekeeping, ingest, send, BatchRow};
use crate::transfers::Transfers;
use crate::wakeup;
use connections::Connections;
use pgrx::bgworkers::{BackgroundWorker, DynamicBackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use reading::Reading;
use std::collections::HashMap;
use std::ffi::CString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Where input and output files are staged, relative to the data directory.
const STAGING_DIR: &str = "pg_llmbatching";
/// A refused step (4xx) that may be a passing glitch, such as "file not found" just after an
/// upload, is tried this many times before it is taken as final.
const REFUSALS_BEFORE_GIVING_UP: i32 = 5;
/// Finished rows are purged at most this often (or once per retention period, if shorter).
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// The longest the queue goes unread after a look that claimed nothing (see
/// `Worker::queue_quiet_until`).
const QUEUE_QUIET: Duration = Duration::from_secs(1);
/// How long a group whose claim failed waits.
const CLAIM_FAILURE_PAUSE: Duration = Duration::from_secs(30);
/// How long a group, once a request of it was found held locked by its role, is claimed
/// without waiting for such locks (which costs a lock per request).
const CLAIM_SKIPPING_HELD: Duration = Duration::from_secs(600);
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
    launch_process(
        "llmbatching worker",
        "llmbatching_worker_main",
        database,
        None,
    )
    .map_err(|_| "could not start a worker (max_worker_processes reached?)".to_string())
}

/// Starts a dynamic background worker of this library serving `database`, whose start and end
/// this process is told of (it is never restarted by the postmaster); `extra`: what it is to do,
/// as a short text it reads with `BackgroundWorker::get_extra`.
fn launch_process(
    kind: &str,
    function: &str,
    database: pg_sys::Oid,
    extra: Option<&str>,
) -> Result<DynamicBackgroundWorker, ()> {
    pgrx::bgworkers::BackgroundWorkerBuilder::new(kind)
        .set_extra(extra.unwrap_or_default())
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

/// Whether a process this one started still runs (or is starting).
fn still_runs(process: &DynamicBackgroundWorker) -> bool {
    matches!(
        process.pid(),
        Ok(_) | Err(pgrx::bgworkers::BackgroundWorkerStatus::NotYetStarted)
    )
}

/// This database's staging directory, relative to the data directory.
fn staging_dir() -> PathBuf {
    PathBuf::from(STAGING_DIR).join(unsafe { pg_sys::MyDatabaseId }.to_u32().to_string())
}

/// Where a batch's result file of a kind (`output`, `error`) is downloaded.
fn result_file(staging: &std::path::Path, batch_id: i64, kind: &str) -> PathBuf {
    staging.join(format!("batch-{batch_id}-{kind}.jsonl"))
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
/// writer, the reader): signals, the connection to the database `arg` names, and settings of its own.
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

    // (After the worker before it has gone: its reader, if it left one, ends too.)
    if !reader::end_leftover_readers(STOP_PATIENCE * 5) {
        warning!("llmbatching: a reader left by an earlier worker is still running; its batch may be read twice (harmlessly)");
    }
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
    /// When answers kept aside for held requests were last looked at (see `state::held`).
    last_held_look: Option<Instant>,
    /// Rounds in a row that ended in an error, for the pause before the next.
    failed_rounds: u32,
    /// Whether the log already says this database is a copy.
    said_copy: bool,
    /// When the log last said that a claim failed.
    said_claim_failed: OncePerMinute,
    /// Groups whose last claim failed, and until when they wait.
    claims_paused: HashMap<String, Instant>,
    /// Groups a role held a request of locked, and until when their claims skip such requests.
    claims_skipping_held: HashMap<String, Instant>,
    /// The process writing answers back, while one runs.
    writer: writer::Writer,
    /// The process reading a batch back, while one runs.
    reader: reader::Reader,
    /// After a look at the queue that claimed nothing, the queue is not read again before this,
    /// unless a batch moves on (making room) or a commit wakes the worker: otherwise every
    /// round, many a second while batches are polled, would read it again (26 ms a round with a
    /// million requests queued). That holds for a look that found nothing too: while a large
    /// submission is under way, every look walks the index entries of its rows, not yet
    /// committed (80 ms a look on average while a million are submitted, at ten looks a second).
    queue_quiet_until: Option<Instant>,
    /// Whether the last look at the queue found no group at all.
    queue_was_empty: bool,
}

fn tx<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe + std::panic::RefUnwindSafe) -> R {
    BackgroundWorker::transaction(f)
}

/// Runs `f`; an ERROR (or a panic) inside it rolls back the transaction it left open and comes
/// back as `Err` with its message, so that one batch's, one answer's or one write-back's failure
/// stays with it and the worker goes on with the rest.
fn catching<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    catching_failure(f).map_err(|failure| failure.message)
}

/// As [`catching`], telling what kind of error it was (a lock or time limit, or another).
fn catching_failure<R>(f: impl FnOnce() -> R) -> Result<R, Failure> {
    PgTryBuilder::new(std::panic::AssertUnwindSafe(move || Ok(f())))
        .catch_others(|caught| {
            // SAFETY: PostgreSQL's own recovery after an error outside any transaction block;
            // it does nothing when no transaction is open.
            unsafe { pg_sys::AbortCurrentTransaction() };
            Err(Failure::from_caught(caught))
        })
        .execute()
}

impl Worker {
    fn new() -> Worker {
        // One directory per database: each database's worker clears its own at start.
        let staging = staging_dir();
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
            last_held_look: None,
            failed_rounds: 0,
            said_copy: false,
            said_claim_failed: OncePerMinute::default(),
            claims_paused: HashMap::new(),
            claims_skipping_held: HashMap::new(),
            writer: writer::Writer::default(),
            reader: reader::Reader::default(),
            queue_quiet_until: None,
            queue_was_empty: false,
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
        self.reader.stop();
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
        redact_all(text, self.connections.keys())
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
        // (A reader that ended first: a download landing now may then go to a new one.)
        if let Some(batch_id) = self.reader.ended() {
            self.reader_ended(batch_id, &settings);
        }
        self.land_transfers(&settings);
        // Read every round: llm_adopt(as_copy => true) gives the installation a new identity.
        self.instance = Some(tx(housekeeping::instance_id));
        self.purge_if_due(&settings);
        self.connections.new_round();
        tx(housekeeping::promote_orphaned_duplicates);
        self.apply_held_answers(&settings);
        let next_group_due = self.form_batches(&settings);
        tx(housekeeping::flag_cancelled_batches);
        self.start_due_steps(&settings);
        self.writer.write_due();
        if registry::preloaded() {
            let identities = self.connections.identities();
            tx(move || publish_usage(&identities));
        }
        let mut busy = self.transfers.busy_batches();
        busy.extend(self.reader.reading());
        let next_step_due = tx(move || housekeeping::next_step_due(&busy));
        let next_write_back_due = self.writer.next_look();
        let next_held_look = self.next_held_look();
        [
            next_group_due,
            next_step_due,
            next_write_back_due,
            next_held_look,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(idle)
        .clamp(Duration::from_millis(10), idle)
    }

    /// Applies the answers kept aside while their roles held their requests locked (see
    /// `state::held`) whose locks are gone, looking once a second at most. Those still held
    /// are looked at again later, later each time.
    fn apply_held_answers(&mut self, settings: &Settings) {
        if self
            .last_held_look
            .is_some_and(|at| at.elapsed() < HELD_LOOK_EVERY)
        {
            return;
        }
        self.last_held_look = Some(Instant::now());
        let due = match catching(|| tx(held::due)) {
            Ok(due) => due,
            Err(message) => {
                warning!("llmbatching: reading held answers failed: {message}");
                return;
            }
        };
        for (batch_id, ids) in due {
            let free = catching(move || {
                tx(move || {
                    state::bound_lock_waits();
                    held::free_now(batch_id, ids)
                })
            });
            let free = match free {
                Ok(free) => free,
                Err(message) => {
                    warning!(
                        "llmbatching: batch {batch_id}: looking at held answers failed: {message}"
                    );
                    continue;
                }
            };
            for chunk in reading::chunks_by_size(free) {
                match catching(move || tx(move || held::results(chunk))) {
                    Ok(results) => {
                        let _ = reading::apply_chunk(
                            batch_id,
                            true,
                            results,
                            settings.max_attempts,
                            true,
                            true,
                        );
                    }
                    Err(message) => {
                        warning!(
                            "llmbatching: batch {batch_id}: reading held answers failed: {message}"
                        )
                    }
                }
            }
        }
    }

    /// When answers kept aside are next due for a look (see [`Self::apply_held_answers`]), but
    /// not before a look may come again.
    fn next_held_look(&self) -> Option<Duration> {
        let due = tx(held::next_due)?;
        let may_look_in = self.last_held_look.map_or(Duration::ZERO, |at| {
            HELD_LOOK_EVERY.saturating_sub(at.elapsed())
        });
        Some(due.max(may_look_in))
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
        // The purge leaves a finished row its role keeps locked for a later one; any other
        // lock (an administrator's) holds it up for a second at most, and it is tried again at
        // the next purge.
        let purged = catching(move || {
            tx(move || {
                state::bound_lock_waits();
                housekeeping::purge_finished(retention)
            })
        });
        let (requests, batches) = match purged {
            Ok(purged) => purged,
            Err(message) => {
                warning!("llmbatching: purging finished rows failed, tried again later: {message}");
                return;
            }
        };
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
            // (An empty queue needs no look at the end of the rest: a commit wakes the worker.)
            return (!self.queue_was_empty).then(|| until - now);
        }
        let mut unsent = tx(claim::unsent_batches_by_route);
        loop {
            let groups = tx(claim::queued_groups);
            self.queue_was_empty = groups.is_empty();
            let (mut claimed, mut next_due) = (0, None::<Duration>);
            for group in groups {
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
                let queued = tx(|| claim::measure_group(&group, limits.max_requests));
                if !planner::group_is_due(&queued, limits, wait) {
                    let due_in = planner::due_in(&queued, limits, wait);
                    next_due = Some(next_due.map_or(due_in, |d| d.min(due_in)));
                    continue;
                }
                // Limits the provider counts per key hold across the databases using the key.
                let account = self.connections.account_identity(&route);
                let model = registry::short_hash(&[&group.model]);
                let identities = self.connections.identities();
                let try_claim = |skip_held: bool| {
                    let (group, identities) = (group.clone(), identities.clone());
                    catching_failure(move || {
                        tx(move || {
                            // A role may hold one of its own queued requests locked: the claim
                            // waits for it at most this long (and then claims without it).
                            state::bound_lock_waits();
                            if let Some(account) = account {
                                registry::lock_account_for_claim(account);
                            }
                            let (open_elsewhere, tokens_elsewhere) =
                                account.map_or((0, 0), |a| registry::usage_elsewhere(a, model));
                            // A due group that cannot go now waits for a batch to end: a batch step.
                            if claim::open_batch_count() + open_elsewhere >= max_open {
                                return (false, false);
                            }
                            let budget = claim::token_budget(&group, default_token_cap).map(|b| {
                                TokenBudget {
                                    available: b
                                        .available
                                        .saturating_sub(tokens_elsewhere.max(0) as usize),
                                    ..b
                                }
                            });
                            let claim =
                                claim::claim_batch(&group, limits, budget, per_role_cap, skip_held);
                            if claim.batch.is_some() {
                                publish_usage(&identities);
                            }
                            (claim.batch.is_some(), claim.left_held)
                        })
                    })
                };
                let skipping_held = self
                    .claims_skipping_held
                    .get(&key)
                    .is_some_and(|until| Instant::now() < *until);
                let mut outcome = try_claim(skipping_held);
                if let Err(failure) = &outcome {
                    if failure.transient && !skipping_held {
                        // A lock held a request back: claim at once without the held ones,
                        // and keep doing so for a while rather than wait each time.
                        self.claims_skipping_held
                            .insert(key.clone(), Instant::now() + CLAIM_SKIPPING_HELD);
                        outcome = try_claim(true);
                    }
                }
                let (taken, left_held) = outcome.unwrap_or_else(|failure| {
                    // The group waits (its other requests too): trying again at once would
                    // spend the lock wait again every round.
                    self.claims_paused
                        .insert(key.clone(), Instant::now() + CLAIM_FAILURE_PAUSE);
                    self.say_claim_failed(&failure.message);
                    (false, false)
                });
                if left_held {
                    // The held requests still make the group look due (they wait longest):
                    // the others of the group gather for a batch's wait, as they would without
                    // them, rather than go in batches of one, or be looked at every second.
                    let pause = wait.max(QUEUE_QUIET);
                    self.claims_paused.insert(key, Instant::now() + pause);
                }
                if taken {
                    *unsent.entry(route).or_insert(0) += 1;
                }
                claimed += usize::from(taken);
            }
            if claimed == 0 || shutdown_requested() {
                if claimed == 0 {
                    let quiet = next_due.unwrap_or(QUEUE_QUIET).min(QUEUE_QUIET);
                    self.queue_quiet_until = Some(Instant::now() + quiet);
                }
                return next_due;
            }
        }
    }

    /// Logs, at most once a minute, that a claim failed (its group waits for a later round).
    fn say_claim_failed(&mut self, message: &str) {
        if !self.said_claim_failed.due() {
            return;
        }
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
            if self.transfers.busy(batch.id) || self.reader.busy(batch.id) {
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
            close_batch(batch.id, "the batch held no requests", i32::MAX);
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
            let reason = "the batch was cancelled before it was sent";
            if close_batch(batch.id, reason, settings.max_attempts) {
                self.delete_files(batch, settings);
            }
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
                let path = result_file(&staging, id, kind);
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

    /// Has the downloaded result files read back: by a reader process when one can start, else
    /// here (see `reading`). The batch's files at the provider are deleted once it is done.
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
        if self.reader.hand_over(batch.id, &files, downloading) {
            return Ok(());
        }
        let Some(kind) = self.connections.kind_of(&batch.route()) else {
            reading::remove_files(&files);
            return Err(ProviderError::Local(format!(
                "provider \"{}\" cannot be used now",
                batch.provider
            )));
        };
        let keys = self.connections.keys().map(str::to_owned).collect();
        Reading::new(&batch, kind, keys, settings, || false).finish(&files, downloading)?;
        self.delete_files(&batch, settings);
        Ok(())
    }

    /// After a reader ended: its batch's files at the provider are deleted once the batch is
    /// done (a reading that failed or stopped left it to be downloaded again), and the
    /// requests it queued again may be claimed.
    fn reader_ended(&mut self, batch_id: i64, settings: &Settings) {
        self.queue_quiet_until = None;
        let batch = catching(move || tx(move || state::batch(batch_id)));
        if let Ok(Some(batch)) = batch {
            if batch.state == "done" {
                self.delete_files(&batch, settings);
            }
        }
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

    /// Records a failed step (see [`record_step_failure`]); a batch given up on has its files
    /// at the provider deleted.
    fn step_failed(
        &mut self,
        batch: &BatchRow,
        step: &str,
        error: ProviderError,
        settings: &Settings,
    ) {
        let message = self.redact(&format!("{step} failed: {error}"));
        if record_step_failure(batch, &message, &error, settings) {
            self.delete_files(batch, settings);
        }
    }
}

/// How often answers kept aside for requests their roles held locked are looked at, at most.
const HELD_LOOK_EVERY: Duration = Duration::from_secs(1);

/// A warning about a condition that may last, said at most once a minute.
#[derive(Default)]
struct OncePerMinute(Option<Instant>);

impl OncePerMinute {
    /// Whether to say it now; if so, not again for a minute.
    fn due(&mut self) -> bool {
        if self
            .0
            .is_some_and(|at| at.elapsed() < Duration::from_secs(60))
        {
            return false;
        }
        self.0 = Some(Instant::now());
        true
    }
}

/// Ends a batch whose requests were never sent (see `ingest::close_batch`); false when a
/// request its role holds locked held the closing up: the batch is closed at a later round.
fn close_batch(id: i64, reason: &str, max_attempts: i32) -> bool {
    catching(move || tx(move || ingest::close_batch(id, reason, max_attempts, false))).is_ok()
}

/// Records a failed step of a batch (`message`, redacted, says what failed). Passing faults are
/// retried with backoff; a refusal that persists ends the batch, and its requests go back to
/// the queue (or fail, out of attempts). True when the batch was given up on.
pub fn record_step_failure(
    batch: &BatchRow,
    message: &str,
    error: &ProviderError,
    settings: &Settings,
) -> bool {
    // The results of an ended batch are asked for again for the whole window, whatever the
    // error (giving up would send again answers the provider has), and given up once it has
    // passed (or an administrator said so), whatever the error.
    // (Not while requests are held locked: their answers are in the files, and giving up
    // would send them again.)
    let final_refusal = if batch.state == "ingesting" {
        !reading::within_result_window(batch, settings) && !matches!(error, ProviderError::Held(_))
    } else {
        !error.is_retryable() && batch.step_failures + 1 >= REFUSALS_BEFORE_GIVING_UP
    };
    if final_refusal {
        let (id, max_attempts, last_error) = (batch.id, settings.max_attempts, message.to_owned());
        // The provider's words go to the batch, which only administrators read; the
        // requests of every role in it get a neutral reason. (Held up by a request its role
        // keeps locked, the batch is given up at a later try.)
        let closed = catching(move || {
            tx(move || {
                send::record_last_error(id, &last_error);
                ingest::close_batch(id, REFUSED_BATCH, max_attempts, false)
            })
        });
        if closed.is_ok() {
            warning!(
                "llmbatching: batch {}: {message}; giving up on this batch",
                batch.id
            );
            return true;
        }
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
    let (id, message) = (batch.id, message.to_owned());
    tx(move || send::record_step_failure(id, &message, delay));
    false
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
