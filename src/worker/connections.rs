//! The worker's connections to its providers, one per route (a server and the account whose
//! key pays). A route's server and key are read once per round, so a changed server or user
//! mapping applies from the next round on (transfers under way finish with the connection they
//! started with); a route that cannot be used is warned about once, and its requests stay
//! queued.

use super::{catching, tx};
use crate::provider::servers::{self, ServerConfig};
use crate::provider::{Kind, Server, SharedProvider};
use crate::transfers;
use pgrx::prelude::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

/// A provider (server name) and an account (see `servers::Route`).
pub type Route = (String, String);

/// What a connection was made from; a change makes a new one.
#[derive(PartialEq)]
struct Made {
    kind: &'static str,
    api_base: String,
    api_key: String,
    options: BTreeMap<String, String>,
    idle: Duration,
}

struct Connection {
    made: Made,
    kind: &'static dyn Kind,
    client: SharedProvider,
    /// Who the provider counts this connection's batches against (see `account_identity`).
    account: u64,
}

#[derive(Default)]
pub struct Connections {
    open: HashMap<Route, Connection>,
    /// Routes whose configuration was read this round.
    checked: HashSet<Route>,
    /// The problem last warned about, per route.
    problems: HashMap<Route, String>,
}

impl Connections {
    /// Starts a round: each route's configuration is read again when next used.
    pub fn new_round(&mut self) {
        self.checked.clear();
    }

    /// The kind and client of a route, or None (warned once) when it cannot be used now.
    pub fn get(
        &mut self,
        route: &Route,
        idle: Duration,
    ) -> Option<(&'static dyn Kind, SharedProvider)> {
        if !self.checked.contains(route) {
            self.checked.insert(route.clone());
            let (provider, account) = route.clone();
            let config =
                catching(move || tx(move || servers::server_for_worker(&provider, &account)))
                    .unwrap_or_else(Err);
            match config.and_then(|config| self.connect(route, config, idle)) {
                Ok(()) => {
                    if self.problems.remove(route).is_some() {
                        log!("llmbatching: provider \"{}\" can be used again", route.0);
                    }
                }
                Err(problem) => {
                    self.open.remove(route);
                    if self.problems.get(route) != Some(&problem) {
                        warning!("llmbatching: {problem}. Its requests stay queued.");
                        self.problems.insert(route.clone(), problem);
                    }
                }
            }
        }
        self.open.get(route).map(|c| (c.kind, c.client.clone()))
    }

    /// The kind of a route already connected this round or before.
    pub fn kind_of(&self, route: &Route) -> Option<&'static dyn Kind> {
        self.open.get(route).map(|c| c.kind)
    }

    /// Who the provider counts a route's batches against, the same in every database: the
    /// kind, address and key of its connection (hashed). None for a route not connected.
    pub fn account_identity(&self, route: &Route) -> Option<u64> {
        self.open.get(route).map(|c| c.account)
    }

    /// [`Self::account_identity`] of every connected route.
    pub fn identities(&self) -> HashMap<Route, u64> {
        self.open
            .keys()
            .filter_map(|route| Some((route.clone(), self.account_identity(route)?)))
            .collect()
    }

    /// Every key in use, to keep them out of what is stored and logged.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.open.values().map(|c| c.made.api_key.as_str())
    }

    fn connect(
        &mut self,
        route: &Route,
        config: ServerConfig,
        idle: Duration,
    ) -> Result<(), String> {
        let made = Made {
            kind: config.kind.name(),
            api_base: config.api_base.clone(),
            api_key: config.api_key.clone(),
            options: config.options.clone(),
            idle,
        };
        if self.open.get(route).is_some_and(|c| c.made == made) {
            return Ok(());
        }
        let server = Server {
            api_base: config.api_base,
            api_key: config.api_key,
            options: config.options,
            idle_timeout: idle,
            should_stop: transfers::should_stop,
        };
        let client = config.kind.connect(&server).map_err(|e| {
            format!(
                "cannot set up the HTTP client of provider \"{}\": {e}",
                route.0
            )
        })?;
        let account = crate::registry::account_name(made.kind, &made.api_base, &made.api_key);
        self.open.insert(
            route.clone(),
            Connection {
                made,
                kind: config.kind,
                client,
                account,
            },
        );
        Ok(())
    }
}
