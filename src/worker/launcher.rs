//! The launcher: with the library preloaded, it starts one worker for each database that has
//! the extension installed, and keeps it running.
//!
//! Connected to no database, the launcher cannot see which databases have the extension: it
//! starts a worker for every database that allows connections and is no template (and that
//! `llmbatching.database` names, if set), and a worker that finds no extension ends at once,
//! saying so (see `registry::Exit`). The launcher then starts none there until CREATE EXTENSION
//! asks for one. A worker that ends for any other reason is started again after a pause; one
//! that made way for DROP DATABASE, RENAME or a copy of its database after a longer one.

use super::{launch_for, shutdown_requested, wait_latch};
use crate::config;
use crate::registry::{self, Exit};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerStatus, DynamicBackgroundWorker};
use pgrx::prelude::*;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// How long the launcher waits before starting a worker again after it ended.
const RELAUNCH_PAUSE: Duration = Duration::from_secs(5);
/// How long after a worker made way for a command on its database another may start.
const YIELD_PAUSE: Duration = Duration::from_secs(10);
/// How often the launcher looks for new databases and ended workers when nothing wakes it.
const LOOK_EVERY: Duration = Duration::from_secs(5);
/// How often a database whose worker found no extension is looked at again, in case the
/// extension came without asking for a worker (created by a release that did not ask).
const NOT_INSTALLED_RECHECK: Duration = Duration::from_secs(600);

/// A database as the shared catalog shows it.
struct Database {
    oid: pg_sys::Oid,
    name: String,
    /// It allows connections, is no template, and is not half dropped.
    connectable: bool,
}

/// What the launcher knows of one database's worker.
struct Served {
    worker: Option<DynamicBackgroundWorker>,
    /// No worker starts before then.
    not_before: Instant,
    /// The last worker found no extension: none starts until one is asked for (or until
    /// `not_before`, `NOT_INSTALLED_RECHECK` later).
    not_installed: bool,
    /// A session asked for a worker: start one as soon as none runs, whatever the pause.
    asked: bool,
    /// Whether the log already says that no worker could be started.
    said_no_room: bool,
}

impl Served {
    fn new() -> Served {
        Served {
            worker: None,
            not_before: Instant::now(),
            not_installed: false,
            asked: false,
            said_no_room: false,
        }
    }
}

#[derive(Default)]
struct Launcher {
    databases: HashMap<pg_sys::Oid, Served>,
    /// Names in `llmbatching.database` the log already says do not exist.
    said_missing: HashSet<String>,
}

/// Registers the launcher, which the postmaster starts once recovery has ended (so never on a
/// standby, and on a standby promoted at its promotion) and again 5 seconds after it exits.
pub fn register() {
    pgrx::bgworkers::BackgroundWorkerBuilder::new("llmbatching launcher")
        .set_type("llmbatching launcher")
        .set_library("llmbatching")
        .set_function("llmbatching_launcher_main")
        .enable_spi_access()
        .set_restart_time(Some(RELAUNCH_PAUSE))
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn llmbatching_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(
        pgrx::bgworkers::SignalWakeFlags::SIGHUP | pgrx::bgworkers::SignalWakeFlags::SIGTERM,
    );
    BackgroundWorker::connect_worker_to_spi(None, None);
    registry::set_launcher_pid(unsafe { pg_sys::MyProcPid });
    let mut launcher = Launcher::default();
    while !shutdown_requested() {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let sleep = launcher.look();
        if shutdown_requested() {
            break;
        }
        wait_latch(sleep);
    }
    // Its workers go with it, so that the launcher started again never finds them running.
    launcher.stop_all();
    registry::set_launcher_pid(0);
    log!("llmbatching launcher stopped");
    // (Exit code 1: started again after its restart time, unless the server is shutting down.)
    unsafe { pg_sys::proc_exit(1) };
}

impl Launcher {
    /// Starts and forgets workers as the databases and the requests now say; returns how long
    /// until it should look again.
    fn look(&mut self) -> Duration {
        let databases = list_databases();
        let asked: HashSet<pg_sys::Oid> = registry::take_requests().into_iter().collect();
        self.say_missing(&databases);
        let now = Instant::now();
        let mut next = now + LOOK_EVERY;
        let mut wanted = HashSet::new();
        for database in databases
            .iter()
            .filter(|d| d.connectable && config::serves_database(&d.name))
        {
            wanted.insert(database.oid);
            let served = self
                .databases
                .entry(database.oid)
                .or_insert_with(Served::new);
            if asked.contains(&database.oid) {
                served.asked = true;
                served.not_installed = false;
            }
            note_ended_worker(database.oid, served, now);
            if served.not_installed && served.not_before <= now {
                served.not_installed = false;
            }
            if served.worker.is_none() && !served.not_installed {
                if served.asked || served.not_before <= now {
                    start_worker(database, served, now);
                }
                next = next.min(served.not_before.max(now + Duration::from_millis(100)));
            }
        }
        self.forget_unwanted(&databases, &wanted);
        next.saturating_duration_since(Instant::now())
    }

    /// Logs once each name in `llmbatching.database` that no database has.
    fn say_missing(&mut self, databases: &[Database]) {
        for name in config::database_restriction().unwrap_or_default() {
            if databases.iter().any(|d| d.name == name) {
                self.said_missing.remove(&name);
            } else if self.said_missing.insert(name.clone()) {
                log!("llmbatching: database \"{name}\" does not exist; the worker starts once it is created");
            }
        }
    }

    /// Stops the workers of databases no longer served (left out by `llmbatching.database`,
    /// made a template, dropped) and forgets them.
    fn forget_unwanted(&mut self, databases: &[Database], wanted: &HashSet<pg_sys::Oid>) {
        let unwanted: Vec<pg_sys::Oid> = self
            .databases
            .keys()
            .filter(|oid| !wanted.contains(oid))
            .copied()
            .collect();
        for oid in unwanted {
            if let Some(worker) = self.databases.remove(&oid).and_then(|s| s.worker) {
                let _ = worker.terminate();
            }
            if !databases.iter().any(|d| d.oid == oid) {
                registry::forget_database(oid);
            }
        }
    }

    fn stop_all(&mut self) {
        for (_, served) in self.databases.drain() {
            if let Some(worker) = served.worker {
                let _ = worker.terminate().wait_for_shutdown();
            }
        }
    }
}

/// If the database's worker has ended, sets when the next may start, by why it ended.
fn note_ended_worker(oid: pg_sys::Oid, served: &mut Served, now: Instant) {
    let ended = served.worker.as_ref().is_some_and(|w| {
        matches!(
            w.pid(),
            Err(BackgroundWorkerStatus::Stopped | BackgroundWorkerStatus::PostmasterDied)
        )
    });
    if !ended {
        return;
    }
    served.worker = None;
    match registry::take_exit(oid) {
        Exit::NotInstalled => {
            served.not_installed = !served.asked;
            served.not_before = now + NOT_INSTALLED_RECHECK;
        }
        Exit::Yielded => served.not_before = now + YIELD_PAUSE,
        Exit::Other => served.not_before = now + RELAUNCH_PAUSE,
    }
}

fn start_worker(database: &Database, served: &mut Served, now: Instant) {
    // A worker that runs already (one the launcher before this one started) keeps running.
    if registry::running_worker(database.oid).is_some() {
        served.not_before = now + RELAUNCH_PAUSE;
        return;
    }
    match launch_for(database.oid) {
        Ok(worker) => {
            served.worker = Some(worker);
            served.asked = false;
            served.said_no_room = false;
        }
        Err(e) => {
            if !served.said_no_room {
                warning!(
                    "llmbatching: {e} for database \"{}\"; trying again in {}s",
                    database.name,
                    RELAUNCH_PAUSE.as_secs()
                );
                served.said_no_room = true;
            }
            served.not_before = now + RELAUNCH_PAUSE;
        }
    }
}

/// The databases of the cluster, read from the shared catalog pg_database by a plain scan (as
/// the autovacuum launcher reads it): with no database selected, no index may be opened.
fn list_databases() -> Vec<Database> {
    // SAFETY: a catalog scan inside a transaction, closed on the way out.
    BackgroundWorker::transaction(|| unsafe {
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, lock);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        let mut databases = Vec::new();
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let form = &*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
            databases.push(Database {
                oid: form.oid,
                name: std::ffi::CStr::from_ptr(form.datname.data.as_ptr())
                    .to_string_lossy()
                    .into_owned(),
                // (A connection limit of -2 marks a database a DROP DATABASE left half done.)
                connectable: form.datallowconn && !form.datistemplate && form.datconnlimit != -2,
            });
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, lock);
        databases
    })
}
