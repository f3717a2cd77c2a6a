//! The worker's own session settings.
//!
//! The worker connects like any session, so `ALTER DATABASE … SET` and `ALTER ROLE … SET` (which
//! a database owner who is not a superuser may run) would reach it: `default_transaction_read_only`
//! would make every transaction fail, a `search_path` would decide which functions its queries
//! call, `DateStyle` or `extra_float_digits` how values it reads back print. So every setting
//! that changes how the worker's SQL runs or parses is set here at session level, a source that
//! database and role settings rank below, and set again at the start of every round. Code a role
//! owns runs only inside [`crate::restricted`], whose GUC nest level undoes whatever it sets.
//!
//! Two settings act while that code still runs, before anything is undone: `exit_on_error`
//! (and, from PostgreSQL 17 on, `transaction_timeout`) would end the process on an error there,
//! not only fail that write. No `SET` can be outranked (one in that code, or a function's own
//! `SET` clause, always wins), so in the worker's processes those settings refuse any other
//! value: trying fails the code that tries, like any error of its own.

use pgrx::pg_sys;
use std::ffi::CStr;

/// Each setting and the value the worker runs with.
const PINNED: &[(&CStr, &CStr)] = &[
    // Only pg_catalog (and never pg_temp for functions): nothing planted elsewhere is called.
    (c"search_path", c"pg_catalog, pg_temp"),
    (c"default_transaction_read_only", c"off"),
    (c"default_transaction_isolation", c"read committed"),
    (c"default_transaction_deferrable", c"off"),
    (c"statement_timeout", c"0"),
    (c"lock_timeout", c"0"),
    (c"idle_in_transaction_session_timeout", c"0"),
    (c"DateStyle", c"ISO, MDY"),
    (c"IntervalStyle", c"postgres"),
    (c"TimeZone", c"UTC"),
    (c"extra_float_digits", c"1"),
    (c"bytea_output", c"hex"),
    (c"standard_conforming_strings", c"on"),
    (c"row_security", c"on"),
    (c"session_replication_role", c"origin"),
    (c"check_function_bodies", c"on"),
    // The planner's choices and memory: a database owner's settings must not slow it down.
    (c"enable_seqscan", c"on"),
    (c"enable_indexscan", c"on"),
    (c"enable_indexonlyscan", c"on"),
    (c"enable_bitmapscan", c"on"),
    (c"enable_nestloop", c"on"),
    (c"enable_hashjoin", c"on"),
    (c"enable_mergejoin", c"on"),
    (c"enable_hashagg", c"on"),
    (c"enable_sort", c"on"),
    (c"enable_material", c"on"),
    (c"plan_cache_mode", c"auto"),
    (c"work_mem", c"4MB"),
    (c"jit", c"off"),
];

/// The settings that would end the process on an error in a role's code, and the one value
/// they keep. They are pinned with the priority of a server default as well, so that even a
/// `RESET` (to the database's or role's value otherwise) keeps that value.
#[cfg(any(feature = "pg15", feature = "pg16"))]
const UNCHANGEABLE: &[(&CStr, &CStr)] = &[(c"exit_on_error", c"off")];
#[cfg(not(any(feature = "pg15", feature = "pg16")))]
const UNCHANGEABLE: &[(&CStr, &CStr)] =
    &[(c"exit_on_error", c"off"), (c"transaction_timeout", c"0")];

/// Sets every pinned setting. Call outside any transaction: a value set inside one is undone
/// if it aborts.
pub fn pin() {
    refuse_changes_once();
    let unchangeable = UNCHANGEABLE.iter().flat_map(|s| {
        [
            (s, pg_sys::GucSource::PGC_S_OVERRIDE),
            (s, pg_sys::GucSource::PGC_S_SESSION),
        ]
    });
    let pinned = PINNED.iter().map(|s| (s, pg_sys::GucSource::PGC_S_SESSION));
    for ((name, value), source) in unchangeable.chain(pinned) {
        // SAFETY: plain C strings; an invalid value would be our own bug and raises an ERROR.
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                source,
            )
        };
    }
}

/// The checks the refusing hooks stand in front of (PostgreSQL's own, if any).
static EXIT_ON_ERROR_CHECK: std::sync::OnceLock<pg_sys::GucBoolCheckHook> =
    std::sync::OnceLock::new();
#[cfg(not(any(feature = "pg15", feature = "pg16")))]
static TRANSACTION_TIMEOUT_CHECK: std::sync::OnceLock<pg_sys::GucIntCheckHook> =
    std::sync::OnceLock::new();

const REFUSED: &CStr = c"The llmbatching worker runs with this setting as it is.";

/// Puts the refusing checks on the settings of [`UNCHANGEABLE`], once per process. The table
/// of settings is this process's own: no other session is affected.
fn refuse_changes_once() {
    // SAFETY: the records of built-in settings live as long as the process; only their check
    // hook is replaced, as an extension's own setting would declare one.
    unsafe {
        let record = setting_record(c"exit_on_error") as *mut pg_sys::config_bool;
        if !record.is_null() && EXIT_ON_ERROR_CHECK.set((*record).check_hook).is_ok() {
            (*record).check_hook = Some(refuse_exit_on_error);
        }
        #[cfg(not(any(feature = "pg15", feature = "pg16")))]
        {
            let record = setting_record(c"transaction_timeout") as *mut pg_sys::config_int;
            if !record.is_null() && TRANSACTION_TIMEOUT_CHECK.set((*record).check_hook).is_ok() {
                (*record).check_hook = Some(refuse_transaction_timeout);
            }
        }
    }
}

/// A built-in setting's record in this process's table of settings (null if unknown).
unsafe fn setting_record(name: &CStr) -> *mut pg_sys::config_generic {
    #[cfg(feature = "pg15")]
    {
        let all = pg_sys::get_guc_variables();
        let count = pg_sys::GetNumConfigOptions() as usize;
        (0..count)
            .map(|i| *all.add(i))
            .find(|record| {
                CStr::from_ptr((**record).name)
                    .to_bytes()
                    .eq_ignore_ascii_case(name.to_bytes())
            })
            .unwrap_or(std::ptr::null_mut())
    }
    #[cfg(not(feature = "pg15"))]
    {
        pg_sys::find_option(name.as_ptr(), false, true, pg_sys::WARNING as i32)
    }
}

/// Refuses a check: the setting keeps its value, and whoever set it gets an ERROR.
unsafe fn refuse() -> bool {
    // Where PostgreSQL's own `GUC_check_errdetail` puts it: freed once the error is reported.
    pg_sys::GUC_check_errdetail_string =
        pg_sys::MemoryContextStrdup(pg_sys::ErrorContext, REFUSED.as_ptr());
    false
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn refuse_exit_on_error(
    newval: *mut bool,
    extra: *mut *mut std::ffi::c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    if *newval {
        return refuse();
    }
    match EXIT_ON_ERROR_CHECK.get().copied().flatten() {
        Some(check) => check(newval, extra, source),
        None => true,
    }
}

#[cfg(not(any(feature = "pg15", feature = "pg16")))]
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn refuse_transaction_timeout(
    newval: *mut std::ffi::c_int,
    extra: *mut *mut std::ffi::c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    if *newval != 0 {
        return refuse();
    }
    match TRANSACTION_TIMEOUT_CHECK.get().copied().flatten() {
        Some(check) => check(newval, extra, source),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::{PINNED, UNCHANGEABLE};

    #[test]
    fn each_setting_is_pinned_once() {
        let mut names: Vec<String> = PINNED
            .iter()
            .chain(UNCHANGEABLE)
            .map(|(n, _)| n.to_string_lossy().to_lowercase())
            .collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), PINNED.len() + UNCHANGEABLE.len());
    }
}
