//! How a submitting session wakes the worker: the worker publishes its pid in shared memory,
//! and a transaction that queued requests sets the worker's latch when it commits. The worker
//! then sees the new rows at once instead of after its next timeout.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, register_xact_callback, PgAtomic, PgXactCallbackEvent};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static WORKER_PID: PgAtomic<AtomicI32> = unsafe { PgAtomic::new(c"llmbatching_worker_pid") };

/// Set in the postmaster when the library is preloaded; inherited by every backend it forks.
static SHARED_MEMORY_READY: AtomicBool = AtomicBool::new(false);

/// Whether this backend's current transaction already has a wake-up registered.
static WAKE_REGISTERED: AtomicBool = AtomicBool::new(false);

/// Reserves the shared memory; call from `_PG_init` while preloading.
pub fn init_shared_memory() {
    pg_shmem_init!(WORKER_PID = AtomicI32::new(0));
    SHARED_MEMORY_READY.store(true, Ordering::Relaxed);
}

/// Whether the library was preloaded, with the shared memory of the commit-time wake-up.
pub fn preloaded() -> bool {
    SHARED_MEMORY_READY.load(Ordering::Relaxed)
}

/// Publishes the running worker's pid (0 when it stops).
pub fn publish_worker_pid(pid: i32) {
    WORKER_PID.get().store(pid, Ordering::SeqCst);
}

/// Arranges for the worker to be woken when the current transaction commits.
pub fn wake_worker_at_commit() {
    if !SHARED_MEMORY_READY.load(Ordering::Relaxed) || WAKE_REGISTERED.swap(true, Ordering::Relaxed)
    {
        return;
    }
    register_xact_callback(PgXactCallbackEvent::Commit, || {
        WAKE_REGISTERED.store(false, Ordering::Relaxed);
        wake_worker();
    });
    register_xact_callback(PgXactCallbackEvent::Abort, || {
        WAKE_REGISTERED.store(false, Ordering::Relaxed)
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
/// `llmbatching.database` names it.
pub fn launcher_serves_here() -> bool {
    preloaded() && crate::config::database() == this_database()
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
    Some(if preloaded() {
        format!(
            "no llmbatching worker serves database \"{}\": llmbatching.database is \"{}\"; {how}",
            this_database(),
            crate::config::database()
        )
    } else {
        format!("no llmbatching worker runs for database \"{}\" (the library is not in shared_preload_libraries, and none was started since the server started); {how}", this_database())
    })
}

fn wake_worker() {
    let pid = WORKER_PID.get().load(Ordering::SeqCst);
    if pid == 0 {
        return;
    }
    // SAFETY: the PGPROC array lives in shared memory for the server's lifetime; setting the
    // latch of a process that has since exited only wakes whoever holds that slot now.
    unsafe {
        let proc = pg_sys::BackendPidGetProc(pid);
        if !proc.is_null() {
            pg_sys::SetLatch(&raw mut (*proc).procLatch);
        }
    }
}
