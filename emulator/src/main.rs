//! `llmbatching-emulator`: serves the emulated OpenAI Files and Batches API on a local port.

use clap::Parser;
use llmbatching_emulator::{router, Config};
use std::sync::{Arc, Mutex};

/// An HTTP emulator of the OpenAI Files and Batches API, for testing llmbatching.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8089")]
    listen: String,
    /// Milliseconds a batch spends in `validating`.
    #[arg(long, default_value_t = 500)]
    validating_ms: u64,
    /// Milliseconds a batch spends in `in_progress`.
    #[arg(long, default_value_t = 2000)]
    in_progress_ms: u64,
    /// Milliseconds a batch spends in `finalizing`.
    #[arg(long, default_value_t = 500)]
    finalizing_ms: u64,
    /// Accept only this API key (default: accept any non-empty key).
    #[arg(long)]
    api_key: Option<String>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let config = Config {
        validating_ms: args.validating_ms,
        in_progress_ms: args.in_progress_ms,
        finalizing_ms: args.finalizing_ms,
        api_key: args.api_key,
        ..Config::default()
    };
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    let root = format!("http://{}", listener.local_addr()?);
    println!("llmbatching-emulator listening: OpenAI at {root}/v1, Azure OpenAI at {root}/azure/openai, Anthropic at {root}/anthropic/v1");
    let mut provider = llmbatching_emulator::batches::Provider::new(config);
    provider.anthropic_base = format!("http://{}/anthropic/v1", listener.local_addr()?);
    let shared = Arc::new(Mutex::new(provider));
    axum::serve(listener, router(shared))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}
