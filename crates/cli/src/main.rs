//! `oclocks`: the one binary of OpenCluster-Locks — the server, a one-command
//! local cluster for development, certificates, and the client commands.
//!
//! Parsing (clap) is kept apart from doing: each subcommand's arguments are
//! turned into a plain call of a function in its module. Errors are printed
//! as one line on stderr; exit codes are documented on each command.

mod bench;
mod certs;
mod client_cmds;
mod cluster_cmds;
mod dev;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "oclocks",
    version,
    about = "OpenCluster-Locks: a distributed lock service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a server node.
    Server {
        /// The node's TOML config file.
        #[arg(long)]
        config: PathBuf,
        /// Start a new cluster with this node as its first member.
        #[arg(long)]
        bootstrap: bool,
    },
    /// Start a local cluster on 127.0.0.1 with generated certificates.
    Dev(dev::DevArgs),
    /// Make development certificates.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Hold a lock while a command runs (exit codes: the command's; 3 if the
    /// lock could not be taken within --wait; 4 if it was lost meanwhile).
    Lock(client_cmds::LockArgs),
    /// Take a static lock owned by a key file; prints the fencing token.
    Acquire(client_cmds::AcquireArgs),
    /// Release a static lock (token and key file).
    Release(client_cmds::ReleaseArgs),
    /// Refresh a static lock's TTL (token and key file).
    Refresh(client_cmds::RefreshArgs),
    /// List the locks of a zone and their holders.
    Locks(client_cmds::LocksArgs),
    /// Show the server's status.
    Status(client_cmds::StatusArgs),
    /// The cluster's members: list them, remove one.
    #[command(subcommand)]
    Cluster(cluster_cmds::ClusterCmd),
    /// Measure the cluster with lockbench's workloads (uncontended,
    /// contended, failover); markdown tables (or --json) on stdout. Exit
    /// status 2 if a safety check failed.
    Bench(Box<bench::BenchArgs>),
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Make a development CA in DIR.
    Init {
        #[arg(long, default_value = ".oclocks-certs")]
        dir: PathBuf,
    },
    /// Issue a server or client certificate signed by the CA in DIR.
    Issue(IssueArgs),
}

#[derive(Args)]
struct IssueArgs {
    #[arg(long, default_value = ".oclocks-certs")]
    dir: PathBuf,
    /// Issue a server certificate with this name.
    #[arg(long, conflicts_with = "client", required_unless_present = "client")]
    server: Option<String>,
    /// Issue a client certificate; the name is the client's identity.
    #[arg(long)]
    client: Option<String>,
    /// DNS names and IP addresses of the server, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1,localhost")]
    san: Vec<String>,
}

/// jemalloc instead of the system allocator: under glibc malloc a leader
/// that had served a million LOCKs kept ~1.5 GiB resident for a live heap
/// under 0.5 GiB (fragmentation across threads); jemalloc gives it back.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Servers log their life at info; client commands speak only when
    // something is wrong (their output is for people and scripts). raft-log
    // (the Raft log's WAL) logs a line per flush at info: warn and above.
    let default_filter = match cli.command {
        Command::Server { .. } | Command::Dev(_) => "info,openraft=error,raft_log=warn",
        _ => "warn,openraft=error",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OCLOCKS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("oclocks: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Server { config, bootstrap } => {
            let cfg = oclocks_server::config::ServerConfig::load(&config)?;
            runtime()?.block_on(async move {
                oclocks_server::server::run(cfg, bootstrap, shutdown_signal()).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Dev(args) => runtime()?.block_on(dev::run(args)),
        Command::Certs(CertsCmd::Init { dir }) => {
            certs::init(&dir)?;
            println!("development CA written to {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs(CertsCmd::Issue(a)) => {
            let (name, role) = match (a.server, a.client) {
                (Some(n), _) => (n, certs::Role::Server { sans: a.san }),
                (None, Some(n)) => (n, certs::Role::Client),
                (None, None) => anyhow::bail!("give --server NAME or --client NAME"),
            };
            let (cert, key) = certs::issue(&a.dir, &name, role)?;
            println!("{} and {}", cert.display(), key.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Lock(a) => runtime()?.block_on(client_cmds::lock(a)),
        Command::Acquire(a) => runtime()?.block_on(client_cmds::acquire(a)),
        Command::Release(a) => runtime()?.block_on(client_cmds::release_cmd(a)),
        Command::Refresh(a) => runtime()?.block_on(client_cmds::refresh(a)),
        Command::Locks(a) => runtime()?.block_on(client_cmds::locks(a)),
        Command::Status(a) => runtime()?.block_on(client_cmds::status(a)),
        Command::Cluster(c) => runtime()?.block_on(cluster_cmds::run(c)),
        // The bench builds its own runtime (worker threads: --threads).
        Command::Bench(a) => bench::run(*a),
    }
}

/// Resolves on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
