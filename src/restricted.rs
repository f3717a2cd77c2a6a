//! Running code a role owns from the worker's superuser session, the way PostgreSQL's own
//! maintenance commands run a table owner's code (REFRESH MATERIALIZED VIEW, VACUUM, since
//! CVE-2022-1552):
//!
//! - as that role, in a security-restricted operation, so `SET ROLE`, `RESET ROLE`,
//!   `SET SESSION AUTHORIZATION`, temporary tables and cursors WITH HOLD are refused;
//! - at a GUC nest level rolled back when the block ends, so no `SET` or `set_config(…, false)`
//!   it makes outlives it (not even a `SET` inside a function with a `SET` clause);
//! - in a subtransaction, so an error it raises stays with it;
//! - under a lock timeout and a time limit, so a held lock or a slow trigger delays only it;
//! - without keeping any session-level advisory lock it took.

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::ffi::CString;
use std::time::Duration;

/// timeout.h's `TimeoutId`, whose first members have kept their numbers since PostgreSQL 9.3.
const STATEMENT_TIMEOUT: u32 = 3;
/// timeout.h's first user-definable `TimeoutId`: 12 up to PostgreSQL 16, 13 from 17 on (which
/// added TRANSACTION_TIMEOUT before it).
#[cfg(any(feature = "pg15", feature = "pg16"))]
const USER_TIMEOUT: u32 = 12;
#[cfg(not(any(feature = "pg15", feature = "pg16")))]
const USER_TIMEOUT: u32 = 13;

unsafe extern "C-unwind" {
    // Not in pgrx's bindings (utils/timeout.h).
    fn enable_timeout_after(id: u32, delay_ms: std::ffi::c_int);
    fn disable_timeout(id: u32, keep_indicator: bool);
    fn get_timeout_indicator(id: u32, reset_indicator: bool) -> bool;
    fn RegisterTimeout(id: u32, handler: Option<unsafe extern "C-unwind" fn()>) -> u32;
}

/// The time limit reaches the role's code as an ordinary error (`query_canceled`), which
/// PL/pgSQL can catch by name and go on. So a second, later timer ends the process itself
/// (FATAL, which nothing catches; only a writer runs a role's code, and its worker starts
/// another): the attempt was counted before the code ran, so no process comes back to it
/// forever.
static WATCHDOG: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

unsafe extern "C-unwind" fn watchdog_expired() {
    // A signal handler: set the flags PostgreSQL's own SIGTERM handler sets, and nothing more.
    std::ptr::write_volatile(&raw mut pg_sys::ProcDiePending, 1);
    std::ptr::write_volatile(&raw mut pg_sys::InterruptPending, 1);
    pg_sys::SetLatch(pg_sys::MyLatch);
}

fn watchdog() -> u32 {
    // SAFETY: registers a handler for a free timeout slot, once per process.
    *WATCHDOG.get_or_init(|| unsafe { RegisterTimeout(USER_TIMEOUT, Some(watchdog_expired)) })
}

/// How long past its time limit a block may go on (ignoring the cancel) before the watchdog
/// ends the process.
fn watchdog_delay(time_limit: Duration) -> Duration {
    time_limit + time_limit.max(Duration::from_secs(5))
}

/// The bounds a block runs under.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// Longest wait for any lock (`lock_timeout`).
    pub lock_timeout: Duration,
    /// Longest the whole block may take.
    pub time_limit: Duration,
}

impl Bounds {
    /// The longest a block under these bounds can run at all: past its time limit, the
    /// watchdog ends the process.
    pub fn longest_run(&self) -> Duration {
        watchdog_delay(self.time_limit)
    }
}

/// How a block ended when it raised an error.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    /// A lock wait or the time limit ran out (or a deadlock or serialization failure): the same
    /// work may well succeed later.
    pub transient: bool,
    /// The time limit ran out (the code, not a lock, was slow).
    pub timed_out: bool,
}

impl Failure {
    pub fn from_caught(error: pg_sys::panic::CaughtError) -> Failure {
        let report = match &error {
            pg_sys::panic::CaughtError::PostgresError(r)
            | pg_sys::panic::CaughtError::ErrorReport(r)
            | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => r,
        };
        let transient = matches!(
            report.sql_error_code(),
            PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE
                | PgSqlErrorCode::ERRCODE_QUERY_CANCELED
                | PgSqlErrorCode::ERRCODE_T_R_DEADLOCK_DETECTED
                | PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE
        );
        Failure {
            message: report.message().to_owned(),
            transient,
            timed_out: report.sql_error_code() == PgSqlErrorCode::ERRCODE_QUERY_CANCELED,
        }
    }
}

/// Runs `block` as `role` within `bounds`, in a subtransaction of the current transaction that
/// is rolled back if the block raises an error. The worker's own identity, security context and
/// settings are back as they were when this returns, whichever way the block ended.
pub fn run_as<R>(
    role: pg_sys::Oid,
    bounds: Bounds,
    block: impl FnOnce() -> R + std::panic::UnwindSafe,
) -> Result<R, Failure> {
    // SAFETY: the calls below are PostgreSQL's own protocol for an internal subtransaction
    // (as PL/pgSQL's exception blocks use it) and for switching to a role's identity (as
    // RefreshMatViewByOid does); each is undone on every path out.
    unsafe {
        let memory = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(memory);
        let (mut saved_user, mut saved_context) = (pg_sys::InvalidOid, 0);
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);

        let outcome = PgTryBuilder::new(|| {
            pg_sys::SetUserIdAndSecContext(
                role,
                saved_context
                    | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                    | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
            );
            let nest_level = pg_sys::NewGUCNestLevel();
            set_at_level(c"lock_timeout", &millis(bounds.lock_timeout));
            enable_timeout_after(STATEMENT_TIMEOUT, millis_int(bounds.time_limit));
            enable_timeout_after(watchdog(), millis_int(watchdog_delay(bounds.time_limit)));
            let result = block();
            stop_time_limit();
            pg_sys::AtEOXact_GUC(false, nest_level);
            pg_sys::SetUserIdAndSecContext(saved_user, saved_context);
            Ok(result)
        })
        .catch_others(|caught| Err(Failure::from_caught(caught)))
        .execute();

        match outcome {
            Ok(_) => pg_sys::ReleaseCurrentSubTransaction(),
            Err(_) => {
                stop_time_limit();
                // Rolls back the nest level and restores the identity and security context.
                pg_sys::RollbackAndReleaseCurrentSubTransaction();
            }
        }
        pg_sys::MemoryContextSwitchTo(memory);
        pg_sys::CurrentResourceOwner = owner;
        // Session-level advisory locks the block took outlive any subtransaction: they would
        // stay held by the worker for good, blocking whoever else uses those keys.
        pg_sys::LockReleaseSession(pg_sys::USER_LOCKMETHOD as pg_sys::LOCKMETHODID);
        outcome
    }
}

/// Disarms the time limit; a limit that expired after the block's last check for interrupts
/// must not cancel the worker's next statement.
unsafe fn stop_time_limit() {
    disable_timeout(watchdog(), false);
    disable_timeout(STATEMENT_TIMEOUT, false);
    if get_timeout_indicator(STATEMENT_TIMEOUT, true) {
        std::ptr::write_volatile(&raw mut pg_sys::QueryCancelPending, 0);
    }
}

/// Sets a setting for the current GUC nest level only (what a function's `SET` clause does).
unsafe fn set_at_level(name: &std::ffi::CStr, value: &str) {
    let value = CString::new(value).expect("a setting's value holds no NUL");
    pg_sys::set_config_option(
        name.as_ptr(),
        value.as_ptr(),
        pg_sys::GucContext::PGC_SUSET,
        pg_sys::GucSource::PGC_S_SESSION,
        pg_sys::GucAction::GUC_ACTION_SAVE,
        true,
        pgrx::PgLogLevel::ERROR as i32,
        false,
    );
}

fn millis(d: Duration) -> String {
    format!("{}ms", millis_int(d))
}

/// At least 1 ms: 0 would mean no limit at all.
fn millis_int(d: Duration) -> std::ffi::c_int {
    d.as_millis().clamp(1, i32::MAX as u128) as std::ffi::c_int
}
