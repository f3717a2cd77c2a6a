//! The write-back step, in a process of its own: the writer.
//!
//! Answers wait in `llmbatching.writeback_queue` (see `state::write_back`). While some are due,
//! the database's worker keeps a writer running, a dynamic background worker that writes them
//! into their rows and ends once nothing more is due within a few seconds. So rows are written
//! while the worker claims, uploads and applies the next batches, on the other core. Where no
//! writer can start (`max_worker_processes` reached), the answers wait for a slot: the worker
//! never runs a role's code itself. That code may end the process it runs in (the watchdog ends
//! code that ignores its time limit), and the worker serves every role: a role able to fill
//! the free slots (with parallel queries, say) could otherwise end it, and keep it from
//! starting again while the slots stay full.
//!
//! Two processes may write answers at once (a writer left running by a worker that restarted,
//! and its successor's): each attempt first takes its entries of the queue (see
//! `write_back::begin_attempt`) and then claims each write-back before writing it (see
//! `write_back::claim`), so no two write the same answer.

use super::{
    catching, catching_failure, connect_process, launch_process, refresh_settings, report_activity,
    shutdown_requested, still_runs, tx, wait_latch, OncePerMinute,
};
use crate::config::Settings;
use crate::registry;
use crate::state;
use crate::state::housekeeping;
use crate::state::write_back::{self, Written};
use pgrx::bgworkers::DynamicBackgroundWorker;
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// How many roles' worth of write-back time (`write_back_timeout` each) one pass may spend
/// before looking again whether it should stop.
const ROLES_PER_PASS: u32 = 3;
/// A writer ends when nothing is due within this long; the worker starts one again when
/// something is.
pub const LINGER: Duration = Duration::from_secs(2);
/// The worker starts a writer at most this often (one that cannot work ends at once).
const LAUNCH_EVERY: Duration = Duration::from_secs(1);
/// After a pass that failed (the queue could not be read), the writer waits this long.
const AFTER_FAILURE: Duration = Duration::from_secs(1);

/// The writer the worker started, while it may still run.
#[derive(Default)]
pub struct Writer {
    handle: Option<DynamicBackgroundWorker>,
    last_launch: Option<Instant>,
    /// When the log last said that no writer could start.
    said_no_slot: OncePerMinute,
}

impl Writer {
    /// Whether a writer this worker started still runs (or is starting).
    pub fn running(&mut self) -> bool {
        let running = self.handle.as_ref().is_some_and(still_runs);
        if !running {
            self.handle = None;
        }
        running
    }

    /// Sees that the answers due are written: by a writer, started now if none runs. When none
    /// can start, they wait (see the module's documentation), and the log says why.
    pub fn write_due(&mut self) {
        if self.running()
            || self
                .last_launch
                .is_some_and(|at| at.elapsed() < LAUNCH_EVERY)
            || registry::database_wanted_alone()
        {
            return;
        }
        if !catching(|| tx(write_back::next_due)).is_ok_and(|due| due.is_some_and(|d| d.is_zero()))
        {
            return;
        }
        self.last_launch = Some(Instant::now());
        let database = unsafe { pg_sys::MyDatabaseId };
        match launch_process(
            "llmbatching writer",
            "llmbatching_writer_main",
            database,
            None,
        ) {
            Ok(handle) => self.handle = Some(handle),
            Err(()) => self.say_no_slot(),
        }
    }

    /// Logs, at most once a minute, that answers wait for a slot for the writer.
    fn say_no_slot(&mut self) {
        if !self.said_no_slot.due() {
            return;
        }
        warning!(
            "llmbatching: answers wait to be written back: no background worker slot is free for the writer (max_worker_processes)"
        );
    }

    /// When the worker should next see to the write-backs: while a writer runs, it watches the
    /// queue, and its end wakes the worker, which looks again within a writer's linger all the
    /// same (a wake-up can be missed); otherwise when the next answer is due, but not before
    /// another writer may start.
    pub fn next_look(&mut self) -> Option<Duration> {
        if self.running() {
            return Some(LINGER);
        }
        let due = tx(write_back::next_due)?;
        let may_launch_in = self.last_launch.map_or(Duration::ZERO, |at| {
            LAUNCH_EVERY.saturating_sub(at.elapsed())
        });
        Some(due.max(may_launch_in))
    }

    /// Ends the writer this worker started, if it runs: a worker that stops takes its writer
    /// with it (the next worker starts its own).
    pub fn stop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = handle.terminate();
        }
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn llmbatching_writer_main(arg: pg_sys::Datum) {
    connect_process(arg);
    loop {
        if shutdown_requested() || registry::database_wanted_alone() {
            break;
        }
        refresh_settings();
        if !catching(|| tx(housekeeping::extension_ready)).unwrap_or(false) {
            break;
        }
        let passed = write_back_due(&Settings::current());
        report_activity("");
        let next = if passed {
            catching(|| tx(write_back::next_due)).ok().flatten()
        } else {
            Some(AFTER_FAILURE)
        };
        match next {
            Some(due) if due <= LINGER => {
                wait_latch(due.max(Duration::from_millis(10)));
            }
            _ => break,
        }
    }
    // SAFETY: PostgreSQL's own way out of a process.
    unsafe { pg_sys::proc_exit(0) };
}

/// The role whose attempt this process made last: the next pass starts with the role after it,
/// so that when passes end early (their time used up) every role still comes in turn, not
/// those first by name. (Preloaded, the registry keeps it for the database, across processes:
/// see `registry::write_back_turn`.)
static LAST_SERVED: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// Writes the answers that wait in the write-back queue into their rows: one attempt per role
/// with entries due, each writing its groups (a role's answers into one column) as that role
/// (see `state::write_back`). Roles take turns, each may use at most one `write_back_timeout`
/// of the pass, and the pass ends after a few of them, so that no role's write-backs starve
/// another's. False when the queue could not be read.
fn write_back_due(settings: &Settings) -> bool {
    let attempts = match catching(|| tx(write_back::due_attempts)) {
        Ok(attempts) => attempts,
        Err(message) => {
            warning!("llmbatching: reading the write-back queue failed: {message}");
            return false;
        }
    };
    let bounds = settings.write_back;
    let pass_budget = bounds.time_limit.max(Duration::from_secs(1)) * ROLES_PER_PASS;
    let started = Instant::now();
    let last = registry::write_back_turn()
        .unwrap_or_else(|| LAST_SERVED.lock().map(|l| l.clone()).unwrap_or_default());
    for attempt in in_turn(attempts, &last) {
        if shutdown_requested()
            || started.elapsed() >= pass_budget
            || registry::database_wanted_alone()
        {
            break;
        }
        report_activity("llmbatching: writing answers back");
        if let Ok(mut served) = LAST_SERVED.lock() {
            served.clone_from(&attempt.role);
        }
        registry::set_write_back_turn(&attempt.role);
        write_attempt(attempt, bounds);
    }
    true
}

/// The attempts (ordered by role) starting with the first role after `last`, then from the
/// first role on.
fn in_turn(mut attempts: Vec<write_back::Attempt>, last: &str) -> Vec<write_back::Attempt> {
    let next = attempts
        .iter()
        .position(|a| a.role.as_str() > last)
        .unwrap_or(0);
    attempts.rotate_left(next);
    attempts
}

/// One attempt: its entries taken and the attempt counted (and committed) first, then its
/// answers claimed, written as their role and how each group ended recorded, in one
/// transaction. An error is the attempt's outcome, never the process's: a lock the role holds
/// (its own write-backs or entries, locked from its session; the worker's own statements wait
/// at most a second for one) or a time limit leaves the entries to their next try, which was
/// counted; any other error, or any on the last try, ends their write-backs with it.
fn write_attempt(attempt: write_back::Attempt, bounds: crate::restricted::Bounds) {
    let taken = catching(move || {
        tx(move || {
            state::bound_lock_waits();
            write_back::begin_attempt(&attempt, bounds)
        })
    });
    let attempt = match taken {
        Ok(attempt) if !attempt.entries.is_empty() => attempt,
        Ok(_) => return,
        Err(message) => {
            warning!("llmbatching: counting a write-back attempt failed: {message}");
            return;
        }
    };
    let this = attempt.clone();
    let done = catching_failure(move || {
        tx(move || {
            state::bound_lock_waits();
            write_groups(&this, bounds)
        })
    });
    match done {
        Ok(()) => {}
        Err(failure) if failure.transient && !attempt.is_last() => {
            if let Err(message) = catching(move || {
                tx(move || {
                    state::bound_lock_waits();
                    write_back::withdraw_slow_try(&attempt)
                })
            }) {
                warning!("llmbatching: recounting a write-back attempt failed: {message}");
            }
        }
        Err(failure) => {
            let _ = catching(move || {
                tx(move || {
                    state::bound_lock_waits();
                    write_back::fail_attempt(&attempt, &failure.message)
                })
            });
        }
    }
}

/// Writes an attempt's groups within its role's time, and queues again what is still to be
/// written.
fn write_groups(attempt: &write_back::Attempt, bounds: crate::restricted::Bounds) {
    let started = Instant::now();
    let mut again = Vec::new();
    for mut group in write_back::claim(attempt) {
        let written = if started.elapsed() >= bounds.time_limit || shutdown_requested() {
            Written::Postponed
        } else {
            write_back::write_group(&mut group, bounds)
        };
        again.extend(write_back::record(&group, &written));
    }
    write_back::finish_attempt(attempt, &again);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(role: &str) -> write_back::Attempt {
        write_back::Attempt {
            role: role.into(),
            entries: vec![1],
            tries: 0,
        }
    }

    #[test]
    fn each_pass_starts_with_the_role_after_the_last_one_served() {
        let roles = |attempts: Vec<write_back::Attempt>| -> Vec<String> {
            attempts.into_iter().map(|a| a.role).collect()
        };
        let all = || {
            vec![
                attempt("alice"),
                attempt("bob"),
                attempt("bob"),
                attempt("carol"),
            ]
        };
        assert_eq!(roles(in_turn(all(), "")), ["alice", "bob", "bob", "carol"]);
        assert_eq!(
            roles(in_turn(all(), "alice")),
            ["bob", "bob", "carol", "alice"]
        );
        assert_eq!(
            roles(in_turn(all(), "bob")),
            ["carol", "alice", "bob", "bob"]
        );
        assert_eq!(
            roles(in_turn(all(), "carol")),
            ["alice", "bob", "bob", "carol"]
        );
        // A role that has left the queue: the next one after it by name.
        assert_eq!(
            roles(in_turn(all(), "bert")),
            ["bob", "bob", "carol", "alice"]
        );
        assert!(in_turn(Vec::new(), "bob").is_empty());
    }
}
