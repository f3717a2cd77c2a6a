//! llmbatching-gateway: an OpenAI-compatible HTTP endpoint in front of a database with the
//! llmbatching extension. A call of an official SDK (`responses.create`, `chat.completions.create`,
//! `embeddings.create`, ...) is queued as a batch request and answered with the provider's own
//! response body once its batch is back; until then it is answered 422 with the request's state,
//! and the client calls again (or sends `Prefer: wait=N` to be held until the answer arrives).
//!
//! The gateway keeps no state of its own: keys, requests, answers and idempotency keys are rows
//! of the database, so several gateways can serve one database and a restart loses nothing.
//! Every call runs as the role of its key (see `sql/gateway.sql`).

mod calls;
mod errors;
mod waiting;

use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;
use std::time::Duration;

pub use errors::ApiError;

/// How the gateway runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// `postgres://` address of the database, logging in as a member of llmbatching_gateway.
    pub database_url: String,
    /// Connections kept to the database.
    pub pool_size: usize,
    /// The `Retry-After` of a pending answer.
    pub retry_after: Duration,
    /// The longest a call may be held by `Prefer: wait=N`.
    pub max_wait: Duration,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: String::new(),
            pool_size: 16,
            retry_after: Duration::from_secs(60),
            max_wait: Duration::from_secs(300),
            max_body_bytes: 32 * 1024 * 1024,
        }
    }
}

/// What every handler shares.
pub struct Gateway {
    pub(crate) config: Config,
    pub(crate) pool: deadpool_postgres::Pool,
    pub(crate) waiting: waiting::Waiting,
}

/// Connects to the database (lazily: the pool opens connections as calls need them) and starts
/// the listener that wakes waiting calls.
pub fn gateway(config: Config) -> Result<Arc<Gateway>, String> {
    let pg: tokio_postgres::Config = config
        .database_url
        .parse()
        .map_err(|e| format!("--database-url: {e}"))?;
    let manager = deadpool_postgres::Manager::from_config(
        pg.clone(),
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(config.pool_size)
        .wait_timeout(Some(Duration::from_secs(30)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(Gateway {
        waiting: waiting::Waiting::start(pg),
        config,
        pool,
    }))
}

/// The gateway's routes.
pub fn router(gateway: Arc<Gateway>) -> Router {
    let limit = gateway.config.max_body_bytes;
    let mut api = Router::new();
    for endpoint in calls::ENDPOINTS {
        api = api.route(endpoint, post(calls::call));
    }
    Router::new()
        .nest(
            "/v1",
            api.route("/models", get(calls::models))
                .fallback(calls::unknown_endpoint),
        )
        .route("/health", get(calls::health))
        .fallback(calls::unknown_endpoint)
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(gateway)
}

/// A gateway serving on a loopback port from a thread of its own, for tests and the demo;
/// stops when dropped.
pub struct Running {
    /// The base URL to give an SDK, ending in `/v1`.
    pub base_url: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    pub fn start(config: Config) -> std::io::Result<Running> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let base_url = format!("http://{}/v1", listener.local_addr()?);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let app = match gateway(config) {
                    Ok(gateway) => router(gateway),
                    Err(e) => panic!("gateway: {e}"),
                };
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await;
            })
        });
        Ok(Running {
            base_url,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
