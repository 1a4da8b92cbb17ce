//! `quotad serve`: parse the configuration, bind, serve until SIGTERM or ctrl-c.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use quotad::auth::{AuthMode, Role, TokenSigner};
use quotad::config::Config;
use quotad::server::{serve, Listeners};
use quotad::storage::history::RecoverFrom;
use quotad::storage::Durability;
use quotad_core::SchoolId;
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
    /// Print a signed bearer token: with a private key (EdDSA, ES256) whose
    /// public key the server has, or with the server's shared HS256 key.
    Token(TokenArgs),
    /// Create or update quotad's tables and views in Postgres.
    Migrate(MigrateArgs),
}

#[derive(Args)]
struct MigrateArgs {
    /// e.g. postgres://quotad@127.0.0.1:5432/quotad
    #[arg(long, env = "QUOTAD_DATABASE_URL", hide_env_values = true)]
    database_url: String,
}

/// With `--private-key-file` and `--kid`: EdDSA or ES256, signed by a key
/// the server knows only the public half of. Otherwise HS256, with the
/// server's own shared key, from the same places as the server's
/// (`QUOTAD_AUTH_KEY`, or `--auth-key-file`).
#[derive(Args)]
struct TokenArgs {
    /// admin, principal, teacher or service.
    #[arg(long)]
    role: String,
    /// Who the token names: a teacher's id for a teacher, a person or a system otherwise.
    #[arg(long)]
    subject: String,
    /// The school (principal, teacher) or schools (service; repeat the flag).
    #[arg(long = "school")]
    schools: Vec<String>,
    /// How long the token is valid, in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl_s: u64,
    /// A PEM private key, Ed25519 or P-256 (`openssl genpkey -algorithm ed25519`),
    /// whose public key the server has in auth_public_keys under --kid.
    #[arg(long, requires = "kid")]
    private_key_file: Option<PathBuf>,
    /// The id the server knows --private-key-file's public key by.
    #[arg(long, requires = "private_key_file")]
    kid: Option<String>,
    /// A file holding the shared HS256 key (single box), when there is no
    /// --private-key-file; or the key itself in QUOTAD_AUTH_KEY.
    #[arg(long, env = "QUOTAD_AUTH_KEY_FILE")]
    auth_key_file: Option<PathBuf>,
    #[command(flatten)]
    no_key_flag: NoKeyOnCommandLine,
}

/// `--auth-key` is gone: a key on the command line is visible to every user
/// of the machine in `ps`. Still parsed (hidden), to say so and where the
/// key goes instead, rather than clap's "unexpected argument".
#[derive(Args)]
struct NoKeyOnCommandLine {
    #[arg(long = "auth-key", hide = true, value_name = "KEY")]
    auth_key: Option<String>,
}

impl NoKeyOnCommandLine {
    fn refuse(&self) -> Result<(), String> {
        match self.auth_key {
            None => Ok(()),
            Some(_) => Err(format!(
                "--auth-key is not accepted: a command line is visible to every user in `ps`. \
                 Put the key in {} or in a file named by --auth-key-file (QUOTAD_AUTH_KEY_FILE), \
                 or better, use public keys (README, Roles and tokens)",
                Config::AUTH_KEY_ENV
            )),
        }
    }
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
    /// Where the gateways' rate limit protocols (Envoy's ShouldRateLimit,
    /// Kuadrant's) are served without tokens: loopback or a private address.
    #[arg(long, env = "QUOTAD_RLS_ADDR")]
    rls_addr: Option<SocketAddr>,
    /// No rate limit listener (the protocols stay on the gRPC port, with tokens).
    #[arg(long)]
    no_rls: bool,
    /// Let --rls-addr be a public or unspecified (0.0.0.0) address: whoever
    /// reaches it may charge the domains' schools (e.g. in a container whose
    /// network only the gateway shares).
    #[arg(
        long,
        env = "QUOTAD_RLS_ALLOW_PUBLIC",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::SetTrue
    )]
    rls_allow_public: bool,
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
    /// A file holding the shared HS256 key (at least 32 bytes), for a single
    /// box; or the key itself in QUOTAD_AUTH_KEY. Public keys: auth_public_keys.
    #[arg(long, env = "QUOTAD_AUTH_KEY_FILE")]
    auth_key_file: Option<PathBuf>,
    #[command(flatten)]
    no_key_flag: NoKeyOnCommandLine,
    /// Accept every call without a token, as an admin: for a first run on a
    /// laptop only; every listener must be on a loopback address.
    #[arg(long)]
    insecure_dev: bool,
    /// Start even though the write-ahead log is damaged, serving what it still holds
    /// (logged, and written in every school's audit trail). For this start only.
    #[arg(long)]
    accept_data_loss: bool,
    /// Postgres for snapshots, recovery and analytics (postgres://user@host:port/db).
    #[arg(long, env = "QUOTAD_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    #[arg(long, env = "QUOTAD_POSTGRES_SNAPSHOT_INTERVAL_S")]
    postgres_snapshot_interval_s: Option<u64>,
    /// postgres: discard a data directory that belongs to another history or
    /// an older epoch than Postgres's (refused otherwise) and recover from Postgres.
    #[arg(long, env = "QUOTAD_RECOVER_FROM", value_parser = parse_recover_from)]
    recover_from: Option<RecoverFrom>,
}

fn parse_recover_from(value: &str) -> Result<RecoverFrom, String> {
    RecoverFrom::parse(value).ok_or_else(|| format!("{value:?} is not auto or postgres"))
}

fn parse_durability(value: &str) -> Result<Durability, String> {
    match value {
        "sync" => Ok(Durability::Sync),
        "batched" => Ok(Durability::Batched),
        other => Err(format!("{other:?} is not sync or batched")),
    }
}

impl ServeArgs {
    fn config(&self) -> Result<Config, Box<dyn std::error::Error>> {
        self.no_key_flag.refuse()?;
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
            rls_addr,
            data_dir,
            durability,
            batched_flush_interval_ms,
            snapshot_interval_s,
            actor_threads,
            postgres_snapshot_interval_s,
            recover_from
        );
        if let Some(url) = &self.database_url {
            config.postgres_url = Some(quotad::config::Secret(url.clone()));
        }
        if let Some(path) = &self.auth_key_file {
            config.auth_key_file = Some(path.clone());
        }
        if let Some(key) = Config::auth_key_from_env()? {
            config.auth_key = Some(key);
        }
        config.insecure_dev |= self.insecure_dev;
        config.rls_allow_public |= self.rls_allow_public;
        config.accept_data_loss |= self.accept_data_loss;
        config.validate()?;
        config.check_insecure_dev_listeners(!self.no_metrics, !self.no_rls)?;
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
    let result = match Cli::parse().command {
        Command::Serve(args) => run(args),
        Command::Token(args) => token(args),
        Command::Migrate(args) => migrate(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("quotad: {error}");
            ExitCode::FAILURE
        }
    }
}

fn migrate(args: MigrateArgs) -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut client = quotad::postgres::connect(&args.database_url).await?;
        let applied = quotad::postgres::migrate(&mut client).await?;
        match applied.as_slice() {
            [] => println!("the schema is up to date"),
            versions => println!("applied migrations {versions:?}"),
        }
        Ok(())
    })
}

fn token(args: TokenArgs) -> Result<(), Box<dyn std::error::Error>> {
    args.no_key_flag.refuse()?;
    let role = Role::parse(&args.role)?;
    let schools = args
        .schools
        .iter()
        .map(|s| SchoolId::parse(s).map_err(|e| format!("--school: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let ttl = std::time::Duration::from_secs(args.ttl_s);
    let token = match (&args.private_key_file, &args.kid) {
        (Some(path), Some(kid)) => {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read --private-key-file {}: {e}", path.display()))?;
            let signer = TokenSigner::from_private_key_pem(kid, &pem)
                .map_err(|e| format!("--private-key-file {}: {e}", path.display()))?;
            signer.mint(&args.subject, role, &schools, ttl, now_s)?
        }
        // clap makes --private-key-file and --kid go together.
        _ => {
            let config = Config {
                auth_key: Config::auth_key_from_env()?,
                auth_key_file: args.auth_key_file,
                ..Config::default()
            };
            if config.auth_key.is_none() && config.auth_key_file.is_none() {
                return Err(format!(
                    "no key to sign with: give --private-key-file and --kid, or, for a server \
                     with a shared HS256 key, {} or --auth-key-file",
                    Config::AUTH_KEY_ENV
                )
                .into());
            }
            let AuthMode::Key(authenticator) = config.auth_mode()? else {
                return Err("no signing key".into());
            };
            authenticator.mint(&args.subject, role, &schools, ttl, now_s)?
        }
    };
    println!("{token}");
    Ok(())
}

fn run(args: ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
    let config = args.config()?;
    // Refuse before listening, so nothing waits on a server that will not run.
    config.auth_mode()?;
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
        let rls = match args.no_rls {
            true => None,
            false => Some(TcpListener::bind(config.rls_addr).await.map_err(|e| {
                format!(
                    "cannot listen for rate limit calls on {}: {e}",
                    config.rls_addr
                )
            })?),
        };
        let address = |listener: Option<&TcpListener>| {
            listener
                .and_then(|l| l.local_addr().ok())
                .map_or("off".to_string(), |a| a.to_string())
        };
        let shutdown = shutdown_signal();
        // One line on stdout that scripts and tests can wait for.
        println!(
            "quotad listening grpc={} metrics={} rls={}",
            grpc.local_addr()?,
            address(metrics.as_ref()),
            address(rls.as_ref())
        );
        serve(Listeners { grpc, metrics, rls }, config, shutdown).await?;
        Ok(())
    })
}

/// Resolves on SIGTERM or ctrl-c. SIGTERM is caught from this call on, not
/// from the future's first poll (which comes only once recovery is done and
/// serving starts): a stop sent as soon as quotad says it listens, while it
/// may still be replaying its WAL, is then a graceful stop rather than the
/// default action, which kills the process.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = match term {
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
}
