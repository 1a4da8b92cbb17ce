//! `quotad serve`: parse the configuration, bind, serve until SIGTERM or ctrl-c.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use quotad::config::Config;
use quotad::server::{serve, Listeners};
use quotad::storage::Durability;
use tokio::net::TcpListener;

/// glibc's malloc showed up at ~15% of the server's CPU under load, most of
/// it arena contention between the actor and WAL threads; mimalloc's
/// thread-local heaps avoid that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "quotad",
    version,
    about = "A quota engine for AI usage in schools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (embedded sled storage under --data-dir).
    Serve(ServeArgs),
}

/// Each flag overrides its environment variable, which overrides the config file.
#[derive(Args)]
struct ServeArgs {
    /// A TOML file with any of the settings in README.md.
    #[arg(long, env = "QUOTAD_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "QUOTAD_GRPC_ADDR")]
    grpc_addr: Option<SocketAddr>,
    #[arg(long, env = "QUOTAD_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Serve no metrics endpoint.
    #[arg(long)]
    no_metrics: bool,
    #[arg(long, env = "QUOTAD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// sync: acknowledge after the WAL flush; batched: at once, flushed every few ms.
    #[arg(long, env = "QUOTAD_DURABILITY", value_parser = parse_durability)]
    durability: Option<Durability>,
    #[arg(long, env = "QUOTAD_BATCHED_FLUSH_INTERVAL_MS")]
    batched_flush_interval_ms: Option<u64>,
    #[arg(long, env = "QUOTAD_SNAPSHOT_INTERVAL_S")]
    snapshot_interval_s: Option<u64>,
    /// Threads that run the actors and the gRPC server (0: one per core).
    #[arg(long, env = "QUOTAD_ACTOR_THREADS")]
    actor_threads: Option<usize>,
}

fn parse_durability(value: &str) -> Result<Durability, String> {
    match value {
        "sync" => Ok(Durability::Sync),
        "batched" => Ok(Durability::Batched),
        other => Err(format!("{other:?} is not sync or batched")),
    }
}

impl ServeArgs {
    fn config(&self) -> Result<Config, quotad::config::ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field.clone() { config.$field = v; } )* };
        }
        set!(
            grpc_addr,
            metrics_addr,
            data_dir,
            durability,
            batched_flush_interval_ms,
            snapshot_interval_s,
            actor_threads
        );
        config.validate()?;
        Ok(config)
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QUOTAD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let Command::Serve(args) = Cli::parse().command;
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("quotad: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
    let config = args.config()?;
    // gRPC runs on the actor threads; this runtime only starts and stops
    // things, serves /metrics and waits for signals.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let grpc = TcpListener::bind(config.grpc_addr)
            .await
            .map_err(|e| format!("cannot listen for gRPC on {}: {e}", config.grpc_addr))?;
        let metrics = match args.no_metrics {
            true => None,
            false => Some(TcpListener::bind(config.metrics_addr).await.map_err(|e| {
                format!("cannot listen for metrics on {}: {e}", config.metrics_addr)
            })?),
        };
        let metrics_addr = metrics.as_ref().and_then(|l| l.local_addr().ok());
        // One line on stdout that scripts and tests can wait for.
        println!(
            "quotad listening grpc={} metrics={}",
            grpc.local_addr()?,
            metrics_addr.map_or("off".to_string(), |a| a.to_string())
        );
        serve(Listeners { grpc, metrics }, config, shutdown_signal()).await?;
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(error) => {
                    tracing::error!(%error, "cannot listen for SIGTERM; only ctrl-c stops quotad");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down: finishing calls in flight, flushing the WAL");
}
