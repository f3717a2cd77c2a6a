//! How sessions reach the worker of their database: a transaction that queued requests sets
//! the worker's latch when it commits (its pid is in shared memory, see `registry`), so the
//! worker sees the new rows at once instead of after its next timeout; CREATE EXTENSION has the
//! worker started when it commits.

use crate::registry;
use pgrx::prelude::*;
use pgrx::{register_xact_callback, PgXactCallbackEvent};
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether this backend's current transaction already has a wake-up registered.
static WAKE_REGISTERED: AtomicBool = AtomicBool::new(false);

/// Arranges for the worker to be woken when the current transaction commits.
pub fn wake_worker_at_commit() {
    if !registry::preloaded() || WAKE_REGISTERED.swap(true, Ordering::Relaxed) {
        return;
    }
    register_xact_callback(PgXactCallbackEvent::Commit, || {
        WAKE_REGISTERED.store(false, Ordering::Relaxed);
        registry::wake_worker_here();
    });
    register_xact_callback(PgXactCallbackEvent::Abort, || {
        WAKE_REGISTERED.store(false, Ordering::Relaxed)
    });
}

/// Arranges for this database's worker to be started when the current transaction commits
/// (CREATE EXTENSION, llm_worker_restart()): by the launcher where it serves this database,
/// else as a dynamic background worker. Not before the commit: a worker that finds no
/// extension ends at once.
pub fn start_worker_at_commit() {
    let database = unsafe { pg_sys::MyDatabaseId };
    let by_launcher = launcher_serves_here();
    register_xact_callback(PgXactCallbackEvent::Commit, move || {
        if by_launcher {
            registry::request_worker(database);
        } else if let Err(e) = crate::worker::launch_for(database) {
            // (No ERROR here: the transaction has committed.)
            warning!("llmbatching: {e}; start it with SELECT llmbatching.llm_worker_start()");
        }
    });
}

/// Whether a worker serving this database runs now (any role may see that in
/// pg_stat_activity).
pub fn worker_runs_here() -> bool {
    Spi::get_one::<bool>(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_stat_activity a
                         WHERE a.backend_type OPERATOR(pg_catalog.=) 'llmbatching worker'
                           AND a.datname OPERATOR(pg_catalog.=) pg_catalog.current_database())",
    )
    .unwrap_or_else(|e| error!("llmbatching: looking for the worker: {e}"))
    .unwrap_or(false)
}

/// Whether the launcher serves this database: the library is preloaded and
/// `llmbatching.database` is empty or names it.
pub fn launcher_serves_here() -> bool {
    registry::preloaded() && crate::config::serves_database(&this_database())
}

/// The name of the database this process is connected to (a catalog lookup: call it in a
/// transaction).
pub fn this_database() -> String {
    // SAFETY: the name of the database this backend is connected to, from the catalog.
    unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if name.is_null() {
            return String::new();
        }
        std::ffi::CStr::from_ptr(name)
            .to_string_lossy()
            .into_owned()
    }
}

/// Why no worker will pick up what this database queues, if none will: none runs for it, and
/// the launcher will not start one (the library is not preloaded, or serves another database).
pub fn no_worker_reason() -> Option<String> {
    if launcher_serves_here() || worker_runs_here() {
        return None;
    }
    let how = "an administrator starts one with SELECT llmbatching.llm_worker_start() (requests stay queued meanwhile)";
    Some(if registry::preloaded() {
        format!(
            "no llmbatching worker serves database \"{}\": llmbatching.database is \"{}\"; {how}",
            this_database(),
            crate::config::database()
        )
    } else {
        format!("no llmbatching worker runs for database \"{}\" (the library is not in shared_preload_libraries, and none was started since the server started); {how}", this_database())
    })
}
