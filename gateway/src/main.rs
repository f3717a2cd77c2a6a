//! `llmbatching-gateway`: serves the OpenAI-compatible endpoint of a database with llmbatching.

use clap::Parser;
use llmbatching_gateway::{gateway, router, Config};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// An OpenAI-compatible endpoint in front of llmbatching: point an OpenAI SDK at it, and its
/// calls are sent through the provider's batch API at batch prices.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The database, as a member of llmbatching_gateway: postgres://gateway:...@host/db
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Address to listen on.
    #[arg(
        long,
        env = "LLMBATCHING_GATEWAY_LISTEN",
        default_value = "127.0.0.1:9487"
    )]
    listen: SocketAddr,
    /// Serve HTTPS with this certificate chain (PEM), and --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Connections kept to the database.
    #[arg(long, default_value_t = 16)]
    pool_size: usize,
    /// Seconds a pending answer's Retry-After says.
    #[arg(long, default_value_t = 60)]
    retry_after: u64,
    /// Most seconds a call may be held by `Prefer: wait=N`.
    #[arg(long, default_value_t = 300)]
    max_wait: u64,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let config = Config {
        database_url: args.database_url,
        pool_size: args.pool_size,
        retry_after: Duration::from_secs(args.retry_after),
        max_wait: Duration::from_secs(args.max_wait),
        ..Config::default()
    };
    let app = match gateway(config) {
        Ok(gateway) => router(gateway),
        Err(e) => {
            eprintln!("llmbatching-gateway: {e}");
            std::process::exit(2);
        }
    };
    let handle = axum_server::Handle::new();
    let shutdown = handle.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        shutdown.graceful_shutdown(Some(Duration::from_secs(10)));
    });
    let scheme = if args.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    eprintln!(
        "llmbatching-gateway: listening on {scheme}://{}/v1",
        args.listen
    );
    let served = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = match axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key).await {
                Ok(tls) => tls,
                Err(e) => {
                    eprintln!("llmbatching-gateway: cannot read the certificate or key: {e}");
                    std::process::exit(2);
                }
            };
            axum_server::bind_rustls(args.listen, tls)
                .handle(handle)
                .serve(app.into_make_service())
                .await
        }
        _ => {
            axum_server::bind(args.listen)
                .handle(handle)
                .serve(app.into_make_service())
                .await
        }
    };
    if let Err(e) = served {
        eprintln!("llmbatching-gateway: {e}");
        std::process::exit(1);
    }
}
