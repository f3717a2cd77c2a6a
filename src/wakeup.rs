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

/// Why no worker will pick up what this database queues, if none will: the library was not
/// preloaded (no worker runs at all), or the worker serves another database.
pub fn no_worker_reason() -> Option<String> {
    if !SHARED_MEMORY_READY.load(Ordering::Relaxed) {
        return Some(
            "no llmbatching worker runs: the library is not in shared_preload_libraries; add 'llmbatching' there \
             and restart the server (requests stay queued meanwhile)"
                .into(),
        );
    }
    let served = crate::config::database();
    // SAFETY: the name of the database this backend is connected to, from the catalog.
    let here = unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if name.is_null() {
            return None;
        }
        std::ffi::CStr::from_ptr(name)
            .to_string_lossy()
            .into_owned()
    };
    (served != here).then(|| {
        format!(
            "no llmbatching worker serves database \"{here}\": llmbatching.database is \"{served}\" \
             (set it and restart the server; requests stay queued meanwhile)"
        )
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
