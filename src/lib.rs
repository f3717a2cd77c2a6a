//! llmbatching: send LLM requests from SQL through a provider's batch API, at half the price,
//! with a background worker inside Postgres doing the bookkeeping.

use pgrx::prelude::*;

mod api;
mod config;
mod planner;
mod provider;
mod registry;
mod request;
mod request_insert;
mod restricted;
mod results;
mod session;
mod state;
mod transfers;
mod wakeup;
mod worker;

pgrx::pg_module_magic!();

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../sql/api.sql", name = "api", requires = ["schema"]);
extension_sql_file!(
    "../sql/providers.sql",
    name = "providers",
    requires = ["api", fdw_validator]
);
extension_sql_file!(
    "../sql/pipelines.sql",
    name = "pipelines",
    requires = ["providers", llm_submit, llm_submit_json, llm_submit_label]
);
extension_sql_file!("../sql/costs.sql", name = "costs", requires = ["pipelines"]);
extension_sql_file!("../sql/copies.sql", name = "copies", requires = ["costs"]);
extension_sql_file!(
    "../sql/gateway.sql",
    name = "gateway",
    requires = ["copies", llm_submit_body]
);
extension_sql_file!(
    "../sql/operations.sql",
    name = "operations",
    requires = ["gateway"]
);
extension_sql_file!(
    "../sql/drop_guard.sql",
    name = "drop_guard",
    requires = ["operations"]
);
extension_sql_file!("../sql/security.sql", name = "security", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    config::register(preloading);
    // The worker and its wake-up slot need the library loaded at server start. A server that
    // pg_upgrade runs (binary-upgrade mode) gets no worker: it would hold a connection to the
    // database pg_upgrade drops and restores.
    if preloading {
        registry::init_shared_memory();
        // SAFETY: a flag the postmaster sets from its command line before loading libraries.
        if !unsafe { pg_sys::IsBinaryUpgrade } {
            worker::launcher::register();
        }
    }
}

/// Hooks for `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        // The extension's functions live in its own schema; the tests call them unqualified.
        vec![r#"search_path = '"$user", public, llmbatching'"#]
    }
}
