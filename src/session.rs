//! The worker's own session settings.
//!
//! The worker connects like any session, so `ALTER DATABASE … SET` and `ALTER ROLE … SET` (which
//! a database owner who is not a superuser may run) would reach it: `default_transaction_read_only`
//! would make every transaction fail, a `search_path` would decide which functions its queries
//! call, `DateStyle` or `extra_float_digits` how values it reads back print. So every setting
//! that changes how the worker's SQL runs or parses is set here at session level, a source that
//! database and role settings rank below, and set again at the start of every round. Code a role
//! owns runs only inside [`crate::restricted`], whose GUC nest level undoes whatever it sets.

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

/// Sets every pinned setting. Call outside any transaction: a value set inside one is undone
/// if it aborts.
pub fn pin() {
    for (name, value) in PINNED {
        // SAFETY: plain C strings; an invalid value would be our own bug and raises an ERROR.
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_SESSION,
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::PINNED;

    #[test]
    fn each_setting_is_pinned_once() {
        let mut names: Vec<String> = PINNED
            .iter()
            .map(|(n, _)| n.to_string_lossy().to_lowercase())
            .collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), PINNED.len());
    }
}
