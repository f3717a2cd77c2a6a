//! What the launcher, the workers and the sessions of one cluster share, in shared memory
//! (reserved only when the library is preloaded):
//! - per database served: its worker's pid (for the commit-time wake-up), whether a session
//!   asked the launcher for a worker (CREATE EXTENSION, llm_worker_start), and why its last
//!   worker ended (so that the launcher knows whether to start another);
//! - per account, model and database: the open batches and enqueued tokens, so that limits the
//!   provider counts per key hold across the databases that use one key.
//!
//! The tables are small and fixed; a database or an account that finds no free entry works as
//! without preloading (polled each second, limits counted per database), which the log says.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};
use std::sync::atomic::{AtomicBool, Ordering};

/// Databases with a worker entry at once.
const MAX_DATABASES: usize = 128;
/// Entries of account usage at once (one per database, account and model with open batches).
const MAX_USAGE: usize = 512;

/// Why a worker ended, as the launcher reads it.
#[derive(Copy, Clone, PartialEq, Eq, Debug, Default)]
#[repr(u8)]
pub enum Exit {
    /// Ended for any other reason (terminated, crashed, server shutdown): start it again.
    #[default]
    Other = 0,
    /// The extension is not installed in its database: start none until CREATE EXTENSION.
    NotInstalled = 1,
    /// A command needs the database to itself (DROP, RENAME, a copy from it as a template):
    /// start it again only after a pause.
    Yielded = 2,
}

/// Room for a role's name (NAMEDATALEN, with its terminating zero).
const NAME_BYTES: usize = 64;

#[derive(Copy, Clone)]
#[repr(C)]
struct DatabaseEntry {
    /// 0: a free entry.
    database: u32,
    worker_pid: i32,
    start_requested: bool,
    exit: Exit,
    /// The role whose write-backs were tried last (see [`write_back_turn`]), zero-terminated.
    write_back_turn: [u8; NAME_BYTES],
}

impl Default for DatabaseEntry {
    fn default() -> Self {
        DatabaseEntry {
            database: 0,
            worker_pid: 0,
            start_requested: false,
            exit: Exit::Other,
            write_back_turn: [0; NAME_BYTES],
        }
    }
}

#[derive(Copy, Clone, Default)]
#[repr(C)]
struct UsageEntry {
    /// 0: a free entry.
    database: u32,
    account: u64,
    model: u64,
    open_batches: u32,
    enqueued_tokens: i64,
}

#[derive(Copy, Clone)]
#[repr(C)]
pub struct Registry {
    /// A random number of this server's lifetime, mixed into account names (see
    /// [`account_name`]), so that the lock names visible in `pg_locks` say nothing of a key.
    salt: u64,
    launcher_pid: i32,
    databases: [DatabaseEntry; MAX_DATABASES],
    usage: [UsageEntry; MAX_USAGE],
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            salt: rand::random(),
            launcher_pid: 0,
            databases: [DatabaseEntry::default(); MAX_DATABASES],
            usage: [UsageEntry::default(); MAX_USAGE],
        }
    }
}

// SAFETY: plain numbers in fixed arrays, no pointers.
unsafe impl PGRXSharedMemory for Registry {}

static REGISTRY: PgLwLock<Registry> = unsafe { PgLwLock::new(c"llmbatching_registry") };

/// Set in the postmaster when the library is preloaded; inherited by every process it forks.
static READY: AtomicBool = AtomicBool::new(false);

/// Reserves the shared memory; call from `_PG_init` while preloading.
pub fn init_shared_memory() {
    pg_shmem_init!(REGISTRY = Registry::default());
    READY.store(true, Ordering::Relaxed);
}

/// Whether the library was preloaded, with this shared memory.
pub fn preloaded() -> bool {
    READY.load(Ordering::Relaxed)
}

impl Registry {
    fn entry(&self, database: u32) -> Option<&DatabaseEntry> {
        self.databases.iter().find(|e| e.database == database)
    }

    /// The database's entry, taken from the free ones if it has none.
    fn entry_mut(&mut self, database: u32) -> Option<&mut DatabaseEntry> {
        let at = self
            .databases
            .iter()
            .position(|e| e.database == database)
            .or_else(|| self.databases.iter().position(|e| e.database == 0))?;
        let entry = &mut self.databases[at];
        if entry.database != database {
            *entry = DatabaseEntry {
                database,
                ..DatabaseEntry::default()
            };
        }
        Some(entry)
    }
}

fn set_latch_of(pid: i32) {
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

// --- the launcher ---

/// The launcher says it runs (0: it stopped).
pub fn set_launcher_pid(pid: i32) {
    if preloaded() {
        REGISTRY.exclusive().launcher_pid = pid;
    }
}

/// Asks the launcher to start the database's worker now (it starts none for a database whose
/// last worker found no extension until asked).
pub fn request_worker(database: pg_sys::Oid) {
    if !preloaded() {
        return;
    }
    let launcher = {
        let mut registry = REGISTRY.exclusive();
        if let Some(entry) = registry.entry_mut(database.to_u32()) {
            entry.start_requested = true;
        }
        registry.launcher_pid
    };
    set_latch_of(launcher);
}

/// The databases whose worker a session asked for since the last call (the launcher's).
pub fn take_requests() -> Vec<pg_sys::Oid> {
    let mut registry = REGISTRY.exclusive();
    registry
        .databases
        .iter_mut()
        .filter(|e| e.database != 0 && e.start_requested)
        .map(|e| {
            e.start_requested = false;
            pg_sys::Oid::from(e.database)
        })
        .collect()
}

/// Why the database's last worker ended; frees its entry when nothing else is kept in it.
pub fn take_exit(database: pg_sys::Oid) -> Exit {
    let database = database.to_u32();
    let mut registry = REGISTRY.exclusive();
    let Some(entry) = registry
        .databases
        .iter_mut()
        .find(|e| e.database == database)
    else {
        return Exit::Other;
    };
    let exit = std::mem::take(&mut entry.exit);
    if entry.worker_pid == 0 && !entry.start_requested {
        *entry = DatabaseEntry::default();
    }
    exit
}

/// The pid of the database's worker if one runs (started by an earlier launcher, say).
pub fn running_worker(database: pg_sys::Oid) -> Option<i32> {
    let pid = REGISTRY.share().entry(database.to_u32())?.worker_pid;
    // SAFETY: a look into the PGPROC array, which lives as long as the server.
    let alive = pid != 0
        && unsafe {
            let proc = pg_sys::BackendPidGetProc(pid);
            !proc.is_null() && (*proc).databaseId == database
        };
    alive.then_some(pid)
}

/// Frees what a database that is gone held.
pub fn forget_database(database: pg_sys::Oid) {
    let database = database.to_u32();
    let mut registry = REGISTRY.exclusive();
    for entry in registry
        .databases
        .iter_mut()
        .filter(|e| e.database == database)
    {
        *entry = DatabaseEntry::default();
    }
    for entry in registry.usage.iter_mut().filter(|e| e.database == database) {
        *entry = UsageEntry::default();
    }
}

// --- the workers ---

/// The worker of this database says it runs; false when no entry was free for it.
pub fn worker_started(pid: i32) -> bool {
    if !preloaded() {
        return false;
    }
    let mut registry = REGISTRY.exclusive();
    match registry.entry_mut(this_database()) {
        Some(entry) => {
            entry.worker_pid = pid;
            entry.exit = Exit::Other;
            true
        }
        None => false,
    }
}

/// The worker of this database says it ends, and why. One that leaves for good (no
/// extension) takes back what it said of its accounts' usage.
pub fn worker_ending(why: Exit) {
    if !preloaded() {
        return;
    }
    let here = this_database();
    let mut registry = REGISTRY.exclusive();
    if let Some(entry) = registry.entry_mut(here) {
        entry.worker_pid = 0;
        entry.exit = why;
    }
    if why == Exit::NotInstalled {
        for entry in registry.usage.iter_mut().filter(|e| e.database == here) {
            *entry = UsageEntry::default();
        }
    }
}

// --- the write-backs' turns ---

/// The role of this database whose write-backs were tried last, by whichever process wrote
/// them; None without preloading. Kept here rather than in the process, so that a writer ended
/// in the middle of a role's code (by the watchdog) leaves the next one to start after that
/// role, not with the first role by name again.
pub fn write_back_turn() -> Option<String> {
    if !preloaded() {
        return None;
    }
    let registry = REGISTRY.share();
    let turn = &registry.entry(this_database())?.write_back_turn;
    let len = turn.iter().position(|b| *b == 0).unwrap_or(NAME_BYTES);
    Some(String::from_utf8_lossy(&turn[..len]).into_owned())
}

/// Notes that `role`'s write-backs are tried now (see [`write_back_turn`]).
pub fn set_write_back_turn(role: &str) {
    if !preloaded() {
        return;
    }
    let mut registry = REGISTRY.exclusive();
    if let Some(entry) = registry.entry_mut(this_database()) {
        let name = &role.as_bytes()[..role.len().min(NAME_BYTES - 1)];
        entry.write_back_turn = [0; NAME_BYTES];
        entry.write_back_turn[..name.len()].copy_from_slice(name);
    }
}

/// Wakes the worker of this database, if one runs.
pub fn wake_worker_here() {
    if !preloaded() {
        return;
    }
    let pid = REGISTRY
        .share()
        .entry(this_database())
        .map_or(0, |e| e.worker_pid);
    set_latch_of(pid);
}

fn this_database() -> u32 {
    // SAFETY: a plain read of this process's database.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

// --- usage of accounts across databases ---

/// What this database's open batches hold of one account and model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub account: u64,
    pub model: u64,
    pub open_batches: u32,
    pub enqueued_tokens: i64,
}

/// The name under which an account's usage is shared: its kind, address and key, hashed with
/// this server's salt (so that it tells nothing of the key to whoever reads `pg_locks`). The
/// same in every process of the server; 0 without preloading, where nothing is shared.
pub fn account_name(kind: &str, api_base: &str, api_key: &str) -> u64 {
    if !preloaded() {
        return 0;
    }
    let salt = REGISTRY.share().salt.to_string();
    short_hash(&[&salt, kind, api_base, api_key])
}

/// A short, stable name for the given parts (a model; see also [`account_name`]), the same in
/// every process.
pub fn short_hash(parts: &[&str]) -> u64 {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// Replaces what this database holds of every account; false when the table was full (then
/// the other databases do not see all of it).
pub fn publish_usage(usage: &[Usage]) -> bool {
    if !preloaded() {
        return true;
    }
    let here = this_database();
    let mut registry = REGISTRY.exclusive();
    for entry in registry.usage.iter_mut().filter(|e| e.database == here) {
        *entry = UsageEntry::default();
    }
    let mut free = registry.usage.iter_mut().filter(|e| e.database == 0);
    usage.iter().all(|u| match free.next() {
        Some(entry) => {
            *entry = UsageEntry {
                database: here,
                account: u.account,
                model: u.model,
                open_batches: u.open_batches,
                enqueued_tokens: u.enqueued_tokens,
            };
            true
        }
        None => false,
    })
}

/// What the other databases hold of an account: its open batches (all models), and the
/// enqueued tokens of one model.
pub fn usage_elsewhere(account: u64, model: u64) -> (i64, i64) {
    if !preloaded() {
        return (0, 0);
    }
    let here = this_database();
    let registry = REGISTRY.share();
    registry
        .usage
        .iter()
        .filter(|e| e.database != 0 && e.database != here && e.account == account)
        .fold((0, 0), |(batches, tokens), e| {
            (
                batches + i64::from(e.open_batches),
                tokens
                    + if e.model == model {
                        e.enqueued_tokens
                    } else {
                        0
                    },
            )
        })
}

/// Takes, for the current transaction, a lock that every database's worker takes before it
/// claims a batch on the account, so that two databases never both fill the last room under a
/// limit. (A heavyweight lock not tied to any database: it ends with the transaction, and the
/// claim's `lock_timeout` bounds a wait for it.)
pub fn lock_account_for_claim(account: u64) {
    if !preloaded() {
        return;
    }
    // A kind of lock PostgreSQL itself no longer uses (LOCKTAG_USERLOCK), which no SQL can
    // take, under database 0 so that every database shares it.
    let tag = lock_tag(
        pg_sys::LockTagType::LOCKTAG_USERLOCK,
        pg_sys::USER_LOCKMETHOD,
        [account as u32, (account >> 32) as u32],
        u16::from_be_bytes(*b"LB"),
    );
    // SAFETY: a transaction-level lock, released when the transaction ends.
    unsafe {
        pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as i32, false, false);
    }
}

/// Whether a command waits to have this database to itself: DROP DATABASE, ALTER DATABASE …
/// RENAME or SET TABLESPACE, or CREATE DATABASE copying it as a template. Each holds a lock on
/// the database that conflicts with the one every new session takes while it connects; they
/// then wait a few seconds for the sessions connected already to leave, and fail if they stay.
pub fn database_wanted_alone() -> bool {
    // The same tag PostgreSQL's own connection start locks.
    let tag = lock_tag(
        pg_sys::LockTagType::LOCKTAG_OBJECT,
        pg_sys::DEFAULT_LOCKMETHOD,
        [
            pg_sys::DatabaseRelationId.to_u32(),
            unsafe { pg_sys::MyDatabaseId }.to_u32(),
        ],
        0,
    );
    // SAFETY: a session-level lock, asked for without waiting and released at once.
    unsafe {
        let mode = pg_sys::RowExclusiveLock as i32;
        let got = pg_sys::LockAcquire(&tag, mode, true, true);
        if got == pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL {
            return true;
        }
        pg_sys::LockRelease(&tag, mode, true);
        false
    }
}

/// A lock tag of PostgreSQL's layout for an object shared by every database (its first field,
/// the database, is 0), as `SET_LOCKTAG_OBJECT` fills one for a shared object.
fn lock_tag(
    kind: pg_sys::LockTagType::Type,
    method: u32,
    fields: [u32; 2],
    field4: u16,
) -> pg_sys::LOCKTAG {
    pg_sys::LOCKTAG {
        locktag_field1: 0,
        locktag_field2: fields[0],
        locktag_field3: fields[1],
        locktag_field4: field4,
        locktag_type: kind as u8,
        locktag_lockmethodid: method as u8,
    }
}
