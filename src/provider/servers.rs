//! Providers are foreign servers of the validator-only wrapper `llmbatching`, and their keys
//! are user mappings, the way dblink keeps credentials: `pg_user_mappings` shows a key to
//! superusers, the server's owner and (for their own mapping) the mapped role, and to no one
//! else; nothing here prints one.
//!
//! - A server's options: `kind` (see [`super::KINDS`]), `api_base` (the kind's default if
//!   absent) and the kind's own options. A key is refused there: server options are readable by
//!   every role.
//! - A user mapping's option: `api_key`. A role's requests use its own mapping, else the
//!   server's mapping `FOR PUBLIC`; the choice is made when a request is queued, and requests
//!   under different keys never share a batch (see `requests.account`).
//! - The server `openai`, created with the extension, falls back without a mapping to
//!   `llmbatching.api_base` and the key file or `OPENAI_API_KEY` (see `config`).

use super::{kind, Kind};
use crate::config;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

/// The server created with the extension, which falls back to the server-wide key.
pub const BUILT_IN_SERVER: &str = "openai";

fn bad_option(message: String, hint: String) -> ! {
    ereport!(
        ERROR,
        PgSqlErrorCode::ERRCODE_FDW_INVALID_OPTION_NAME,
        message,
        hint
    );
    #[allow(unreachable_code)]
    {
        unreachable!()
    }
}

/// `key=value` option strings as a map.
fn options_map(options: &[String]) -> BTreeMap<String, String> {
    options
        .iter()
        .filter_map(|o| o.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// What is wrong with a server's options, if anything.
pub fn server_options_problem(options: &BTreeMap<String, String>) -> Option<(String, String)> {
    let kinds: Vec<&str> = super::KINDS.iter().map(|k| k.name()).collect();
    let Some(kind_name) = options.get("kind") else {
        return Some((
            "an llmbatching server needs the option \"kind\"".into(),
            format!("One of: {}.", kinds.join(", ")),
        ));
    };
    let Some(kind) = kind(kind_name) else {
        return Some((
            format!("unknown provider kind \"{kind_name}\""),
            format!("One of: {}.", kinds.join(", ")),
        ));
    };
    for (name, value) in options {
        match name.as_str() {
            "kind" => {}
            "api_base" => {
                if !(value.starts_with("https://") || value.starts_with("http://")) {
                    return Some((
                        format!("api_base \"{value}\" is not an http or https address"),
                        "For example https://api.openai.com/v1.".into(),
                    ));
                }
            }
            "api_key" => {
                return Some((
                    "an API key is not a server option: every role can read server options".into(),
                    "Put it in a user mapping: CREATE USER MAPPING FOR PUBLIC SERVER ... OPTIONS (api_key '...').".into(),
                ))
            }
            other if kind.server_options().contains(&other) => {}
            other => {
                let mut valid = vec!["kind", "api_base"];
                valid.extend(kind.server_options());
                return Some((
                    format!("invalid option \"{other}\" for a server of kind {}", kind.name()),
                    format!("Valid options: {}.", valid.join(", ")),
                ));
            }
        }
    }
    if kind.default_api_base().is_none() && !options.contains_key("api_base") {
        return Some((
            format!(
                "a server of kind {} needs the option \"api_base\"",
                kind.name()
            ),
            "For Azure OpenAI: https://<resource>.openai.azure.com/openai.".into(),
        ));
    }
    None
}

/// The validator of the `llmbatching` foreign-data wrapper: checks the options of its servers
/// and user mappings when they are created or altered.
#[pg_extern(immutable, parallel_safe)]
fn fdw_validator(options: Option<Vec<Option<String>>>, catalog: Option<pg_sys::Oid>) {
    let options: Vec<String> = options.unwrap_or_default().into_iter().flatten().collect();
    let options = options_map(&options);
    match catalog {
        Some(c) if c == pg_sys::ForeignServerRelationId => {
            if let Some((message, hint)) = server_options_problem(&options) {
                bad_option(message, hint);
            }
        }
        Some(c) if c == pg_sys::UserMappingRelationId => {
            if let Some(other) = options.keys().find(|k| *k != "api_key") {
                bad_option(
                    format!("invalid option \"{other}\" for an llmbatching user mapping"),
                    "Valid option: api_key.".into(),
                );
            }
            if options.get("api_key").is_none_or(|k| k.trim().is_empty()) {
                bad_option(
                    "an llmbatching user mapping needs the option \"api_key\"".into(),
                    "CREATE USER MAPPING FOR <role or PUBLIC> SERVER <server> OPTIONS (api_key '...').".into(),
                );
            }
        }
        _ => {
            if let Some(other) = options.keys().next() {
                bad_option(
                    format!("invalid option \"{other}\""),
                    "The llmbatching wrapper takes options on its servers and user mappings only."
                        .into(),
                );
            }
        }
    }
}

/// Where a request goes: a server, its kind, and whose key pays (`account`: the role whose own
/// user mapping applies, or "" for the server's mapping for PUBLIC or its fallback).
#[derive(Clone)]
pub struct Route {
    pub provider: String,
    pub kind: &'static dyn Kind,
    pub account: String,
}

thread_local! {
    /// Routes found in this transaction, by (provider, current user).
    static ROUTES: RefCell<(i64, HashMap<(String, u32), Route>)> = RefCell::new((0, HashMap::new()));
}

/// The route of a request the current role queues through `provider` (NULL: the setting
/// `llmbatching.default_provider`). Raises an ERROR naming the argument when the provider does
/// not exist, is not an llmbatching server, may not be used by the role, or has no key for it.
/// Looked up once per transaction for each provider and role.
pub fn route_for_submit(provider: Option<&str>) -> Route {
    let name = provider
        .map(str::to_owned)
        .unwrap_or_else(config::default_provider);
    // SAFETY: plain reads of the current transaction's start and the current user.
    let (now, user) = unsafe {
        (
            pg_sys::GetCurrentTransactionStartTimestamp(),
            pg_sys::GetUserId().to_u32(),
        )
    };
    let key = (name.clone(), user);
    let cached = ROUTES.with(|r| {
        let mut r = r.borrow_mut();
        if r.0 != now {
            *r = (now, HashMap::new());
        }
        r.1.get(&key).cloned()
    });
    if let Some(route) = cached {
        return route;
    }
    let route = look_up_route(&name);
    ROUTES.with(|r| r.borrow_mut().1.insert(key, route.clone()));
    route
}

fn refuse(message: String, hint: &str) -> ! {
    ereport!(
        ERROR,
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        message,
        hint
    );
    #[allow(unreachable_code)]
    {
        unreachable!()
    }
}

fn look_up_route(name: &str) -> Route {
    // SAFETY: reads of the system caches, in the caller's transaction.
    let found = unsafe { server_as_seen_by_current_user(name) };
    let create_hint = "Create one: CREATE SERVER <name> FOREIGN DATA WRAPPER llmbatching OPTIONS (kind '...'), or use openai.";
    let Some((wrapper, options, usable, own, public)) = found else {
        refuse(
            format!("invalid argument \"provider\": there is no provider \"{name}\""),
            create_hint,
        );
    };
    if wrapper != "llmbatching" {
        refuse(
            format!("invalid argument \"provider\": server \"{name}\" is not an llmbatching provider (its wrapper is {wrapper})"),
            create_hint,
        );
    }
    if !usable {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied for provider \"{name}\""),
            format!("Its owner may grant it: GRANT USAGE ON FOREIGN SERVER {name} TO <role>.")
        );
    }
    let options = options_map(&options);
    let kind = options
        .get("kind")
        .and_then(|k| kind(k))
        .unwrap_or_else(|| error!("llmbatching: provider \"{name}\" has no valid kind"));
    let account = if own {
        current_user()
    } else if public || name == BUILT_IN_SERVER {
        String::new()
    } else {
        refuse(
            format!("invalid argument \"provider\": provider \"{name}\" has no key for role {}", current_user()),
            "Its owner may add one: CREATE USER MAPPING FOR <role or PUBLIC> SERVER <name> OPTIONS (api_key '...').",
        );
    };
    Route {
        provider: name.to_owned(),
        kind,
        account,
    }
}

/// What a submit needs to know of a server, from the system caches (a submit may run once per
/// transaction, and a query planned each time cost more than the insert): its wrapper's name,
/// its options, whether the current user may use it, and whether a user mapping exists for the
/// current user and for PUBLIC (only whether it exists: its options hold the key).
unsafe fn server_as_seen_by_current_user(
    name: &str,
) -> Option<(String, Vec<String>, bool, bool, bool)> {
    let c_name = std::ffi::CString::new(name).ok()?;
    // SAFETY (for the whole body): catalog reads through PostgreSQL's own accessors; the
    // pointers they return live in the current memory context.
    unsafe {
        let server = pg_sys::GetForeignServerByName(c_name.as_ptr(), true);
        if server.is_null() {
            return None;
        }
        let server_id = (*server).serverid;
        let wrapper = pg_sys::GetForeignDataWrapper((*server).fdwid);
        let wrapper = std::ffi::CStr::from_ptr((*wrapper).fdwname)
            .to_string_lossy()
            .into_owned();
        let options = pgrx::PgList::<pg_sys::DefElem>::from_pg((*server).options)
            .iter_ptr()
            .map(|def| {
                let value = std::ffi::CStr::from_ptr(pg_sys::defGetString(def)).to_string_lossy();
                let key = std::ffi::CStr::from_ptr((*def).defname).to_string_lossy();
                format!("{key}={value}")
            })
            .collect();
        let user = pg_sys::GetUserId();
        let mapping_exists = |role: pg_sys::Oid| {
            pg_sys::SearchSysCacheExists(
                pg_sys::SysCacheIdentifier::USERMAPPINGUSERSERVER as _,
                pg_sys::Datum::from(role),
                pg_sys::Datum::from(server_id),
                pg_sys::Datum::from(0),
                pg_sys::Datum::from(0),
            )
        };
        Some((
            wrapper,
            options,
            may_use_server(server_id, user),
            mapping_exists(user),
            mapping_exists(pg_sys::InvalidOid),
        ))
    }
}

/// Whether the role has USAGE on the server.
unsafe fn may_use_server(server: pg_sys::Oid, role: pg_sys::Oid) -> bool {
    let usage = pg_sys::ACL_USAGE as pg_sys::AclMode;
    // SAFETY: PostgreSQL's own privilege check.
    #[cfg(feature = "pg15")]
    let result = unsafe { pg_sys::pg_foreign_server_aclcheck(server, role, usage) };
    #[cfg(not(feature = "pg15"))]
    let result =
        unsafe { pg_sys::object_aclcheck(pg_sys::ForeignServerRelationId, server, role, usage) };
    result == pg_sys::AclResult::ACLCHECK_OK
}

fn current_user() -> String {
    // SAFETY: the current user's name, copied.
    unsafe {
        std::ffi::CStr::from_ptr(pg_sys::GetUserNameFromId(pg_sys::GetUserId(), false))
            .to_string_lossy()
            .into_owned()
    }
}

/// A server as the worker connects to it: its kind, address, options and the key of one
/// account. `Err` says why it cannot be used now (requests stay queued meanwhile).
pub struct ServerConfig {
    pub kind: &'static dyn Kind,
    pub api_base: String,
    pub options: BTreeMap<String, String>,
    pub api_key: String,
}

/// Reads a server and the key of `account` (see [`Route`]); for the worker, which may read
/// every user mapping. Never puts a key into an error.
pub fn server_for_worker(provider: &str, account: &str) -> Result<ServerConfig, String> {
    let row = Spi::connect(|client| {
        let mut rows = client.select(
            "SELECT s.srvoptions::text[],
                    (SELECT u.umoptions::text[] FROM pg_catalog.pg_user_mapping u
                      WHERE u.umserver OPERATOR(pg_catalog.=) s.oid
                        AND u.umuser OPERATOR(pg_catalog.=) CASE WHEN $2 OPERATOR(pg_catalog.=) '' THEN 0::pg_catalog.oid
                                ELSE (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) $2) END)
               FROM pg_catalog.pg_foreign_server s
               JOIN pg_catalog.pg_foreign_data_wrapper w ON w.oid OPERATOR(pg_catalog.=) s.srvfdw
              WHERE s.srvname OPERATOR(pg_catalog.=) $1 AND w.fdwname OPERATOR(pg_catalog.=) 'llmbatching'",
            Some(1),
            &[provider.into(), account.into()],
        )?;
        let Some(row) = rows.next() else {
            return Ok(None);
        };
        Ok::<_, pgrx::spi::SpiError>(Some((
            row.get::<Vec<String>>(1)?.unwrap_or_default(),
            row.get::<Vec<String>>(2)?,
        )))
    })
    .map_err(|e| format!("reading provider \"{provider}\": {e}"))?;
    let Some((server_options, mapping)) = row else {
        return Err(format!("provider \"{provider}\" no longer exists"));
    };
    let mut options = options_map(&server_options);
    let kind = options
        .get("kind")
        .and_then(|k| kind(k))
        .ok_or_else(|| format!("provider \"{provider}\" has no valid kind"))?;
    let built_in = provider == BUILT_IN_SERVER && account.is_empty();
    let api_base = match options.remove("api_base") {
        Some(base) => base,
        None if provider == BUILT_IN_SERVER => config::api_base(),
        None => kind
            .default_api_base()
            .ok_or_else(|| format!("provider \"{provider}\" has no api_base"))?
            .to_owned(),
    };
    options.remove("kind");
    let mapped_key = mapping
        .map(|m| options_map(&m))
        .and_then(|mut m| m.remove("api_key"))
        .filter(|k| !k.trim().is_empty());
    let api_key = match mapped_key {
        Some(key) => key,
        None if built_in => config::api_key()?.ok_or_else(|| {
            "no API key; name a key file in llmbatching.api_key_file, set OPENAI_API_KEY in the server's environment, or CREATE USER MAPPING FOR PUBLIC SERVER openai OPTIONS (api_key '...')".to_string()
        })?,
        None if account.is_empty() => {
            return Err(format!("provider \"{provider}\" has no user mapping FOR PUBLIC any more"))
        }
        None => {
            return Err(format!(
                "provider \"{provider}\" has no user mapping for role {account} any more"
            ))
        }
    };
    Ok(ServerConfig {
        kind,
        api_base,
        options,
        api_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn server_options_are_checked_per_kind() {
        assert!(server_options_problem(&options(&[("kind", "openai")])).is_none());
        assert!(server_options_problem(&options(&[
            ("kind", "anthropic"),
            ("api_base", "http://x/v1")
        ]))
        .is_none());
        assert!(server_options_problem(&options(&[
            ("kind", "azure"),
            ("api_base", "https://r.openai.azure.com/openai"),
            ("api_version", "2024-10-21")
        ]))
        .is_none());
        let problem = |pairs: &[(&str, &str)]| server_options_problem(&options(pairs)).unwrap().0;
        assert!(problem(&[]).contains("needs the option \"kind\""));
        assert!(problem(&[("kind", "bard")]).contains("unknown provider kind"));
        assert!(problem(&[("kind", "azure")]).contains("needs the option \"api_base\""));
        assert!(problem(&[("kind", "openai"), ("api_version", "1")])
            .contains("invalid option \"api_version\""));
        assert!(problem(&[("kind", "openai"), ("api_key", "sk-1")]).contains("not a server option"));
        assert!(problem(&[("kind", "openai"), ("api_base", "ftp://x")]).contains("not an http"));
    }
}
