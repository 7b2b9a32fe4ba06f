//! The client commands of `oclocks`: `lock` (hold a lock while a command
//! runs, like `flock`), `acquire`/`release`/`refresh` for static locks owned
//! by a key file, `locks`, `status`; and `probe`, used by `oclocks dev`.
//!
//! Client settings come from `--config FILE` / `OCLOCKS_CONFIG`, or from
//! `OCLOCKS_ENDPOINTS`, `OCLOCKS_CA`, `OCLOCKS_CERT`, `OCLOCKS_KEY` (or the
//! matching flags). Exit codes: 0 success; 1 error (one line on stderr);
//! `lock` returns its command's status, 3 when the lock could not be taken
//! within `--wait` (`--conflict-exit-code`), 4 when the lock was lost while
//! the command ran (the command gets SIGTERM, then SIGKILL after `--grace`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use oclocks_client::{Client, ClientConfig, Error as ClientError, LockGuard, ServerStatus};

/// Exit status when the lock could not be taken within `--wait`.
pub const EXIT_CONFLICT: u8 = 3;
/// Exit status when the lock was lost while the command ran.
pub const EXIT_LOST: u8 = 4;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (use e.g. 500ms, 15s, 2m)"))
}

/// Where the client finds the cluster and its TLS files.
#[derive(Args, Clone)]
pub struct ClientArgs {
    /// Client config file (TOML: endpoints, ca_file, cert_file, key_file).
    #[arg(long = "config", env = "OCLOCKS_CONFIG")]
    config: Option<PathBuf>,
    /// Server addresses, comma-separated (host:port).
    #[arg(long, env = "OCLOCKS_ENDPOINTS", value_delimiter = ',')]
    endpoints: Vec<String>,
    /// CA certificate (PEM).
    #[arg(long, env = "OCLOCKS_CA")]
    ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long = "tls-cert", env = "OCLOCKS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long = "tls-key", env = "OCLOCKS_KEY")]
    tls_key: Option<PathBuf>,
}

impl ClientArgs {
    pub(crate) fn client_config(&self) -> Result<ClientConfig> {
        let mut cfg = match &self.config {
            Some(path) => ClientConfig::from_file(path)
                .with_context(|| format!("client config {}", path.display()))?,
            None => {
                let (Some(ca), Some(cert), Some(key)) = (&self.ca, &self.tls_cert, &self.tls_key)
                else {
                    bail!(
                        "no client settings: give --config FILE (or OCLOCKS_CONFIG), or \
                         OCLOCKS_ENDPOINTS with OCLOCKS_CA, OCLOCKS_CERT and OCLOCKS_KEY"
                    );
                };
                if self.endpoints.is_empty() {
                    bail!("no endpoints: give --endpoints or OCLOCKS_ENDPOINTS");
                }
                ClientConfig::new(
                    self.endpoints.clone(),
                    ca.clone(),
                    cert.clone(),
                    key.clone(),
                )
            }
        };
        if self.config.is_some() && !self.endpoints.is_empty() {
            cfg.endpoints = self.endpoints.clone();
        }
        Ok(cfg)
    }

    pub(crate) async fn connect(&self, owner_key: Option<&Path>) -> Result<Client> {
        let mut cfg = self.client_config()?;
        if let Some(k) = owner_key {
            cfg.owner_key_file = Some(k.to_path_buf());
        }
        Ok(Client::connect(cfg).await?)
    }
}

#[derive(Args)]
pub struct LockArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The lock's zone.
    #[arg(long, default_value = "default")]
    zone: String,
    /// A shared (read) lock instead of an exclusive one.
    #[arg(long)]
    shared: bool,
    /// Cap the hold time: the lock ends (and the command is stopped) after it.
    #[arg(long, value_parser = duration)]
    ttl: Option<Duration>,
    /// How long to wait for the lock (0 = try once; default: forever).
    #[arg(long, value_parser = duration)]
    wait: Option<Duration>,
    /// Exit status when the lock could not be taken within --wait.
    #[arg(long, default_value_t = EXIT_CONFLICT)]
    conflict_exit_code: u8,
    /// Time between SIGTERM and SIGKILL when the lock is lost.
    #[arg(long, default_value = "5s", value_parser = duration)]
    grace: Duration,
    /// The lock name.
    name: String,
    /// The command to run while holding the lock.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Send `sig` to process `pid` (ignoring a process that is already gone).
pub fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

fn describe_conflict(name: &str, e: &ClientError) -> String {
    match e.holders().first() {
        Some(h) => format!(
            "lock {name:?} is held by {} (token {}, for {:.1}s)",
            h.identity,
            h.token,
            h.held_ms as f64 / 1000.0
        ),
        None => format!("lock {name:?} could not be taken: {e}"),
    }
}

fn exit_status(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let sig = status.signal().unwrap_or(0);
    ExitCode::from(u8::try_from(128 + sig).unwrap_or(1))
}

pub async fn lock(a: LockArgs) -> Result<ExitCode> {
    let client = a.client.connect(None).await?;
    let mut b = client.lock(a.zone.clone(), a.name.clone());
    if a.shared {
        b = b.shared();
    }
    if let Some(ttl) = a.ttl {
        b = b.ttl(ttl);
    }
    b = match a.wait {
        Some(w) => b.wait(w),
        None => b.wait_forever(),
    };
    let guard = match b.acquire().await {
        Ok(g) => g,
        Err(e) if e.is_conflict() => {
            eprintln!("oclocks: {}", describe_conflict(&a.name, &e));
            return Ok(ExitCode::from(a.conflict_exit_code));
        }
        Err(e) => return Err(e.into()),
    };
    let Some((program, args)) = a.command.split_first() else {
        bail!("no command given after --");
    };
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env("OCLOCKS_TOKEN", guard.token().to_string())
        .env("OCLOCKS_LOCK", &a.name)
        .env("OCLOCKS_ZONE", &a.zone)
        .spawn()
        .with_context(|| format!("cannot run {program:?}"))?;
    let lost = guard.lost();
    tokio::select! {
        status = child.wait() => {
            let status = status.context("waiting for the command")?;
            release(guard).await;
            client.close().await.ok();
            Ok(exit_status(status))
        }
        reason = lost => {
            eprintln!("oclocks: lost lock {:?} ({reason:?}): stopping the command", a.name);
            if let Some(pid) = child.id() {
                signal(pid, libc::SIGTERM);
            }
            if tokio::time::timeout(a.grace, child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
            drop(guard);
            Ok(ExitCode::from(EXIT_LOST))
        }
    }
}

async fn release(guard: LockGuard) {
    if let Err(e) = guard.release().await {
        eprintln!("oclocks: release failed: {e}");
    }
}

#[derive(Args)]
pub struct AcquireArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[arg(long, default_value = "default")]
    zone: String,
    /// A static lock (survives this process; owned by the key file).
    #[arg(long = "static", required = true)]
    static_lock: bool,
    /// Owner key file (PEM PKCS#8 Ed25519); created if missing.
    #[arg(long, default_value = "oclocks-owner.key")]
    key: PathBuf,
    /// Release automatically after this long.
    #[arg(long, value_parser = duration)]
    ttl: Option<Duration>,
    /// How long to wait for the lock (0 = try once; default: try once).
    #[arg(long, value_parser = duration, default_value = "0s")]
    wait: Duration,
    #[arg(long)]
    shared: bool,
    name: String,
}

pub async fn acquire(a: AcquireArgs) -> Result<ExitCode> {
    let _ = a.static_lock;
    let client = a.client.connect(Some(&a.key)).await?;
    let mut b = client
        .lock(a.zone.clone(), a.name.clone())
        .static_lock()
        .wait(a.wait);
    if a.shared {
        b = b.shared();
    }
    if let Some(ttl) = a.ttl {
        b = b.ttl(ttl);
    }
    match b.acquire().await {
        Ok(guard) => {
            let held = guard.keep();
            println!("{}", held.token);
            client.close().await.ok();
            Ok(ExitCode::SUCCESS)
        }
        Err(e) if e.is_conflict() => {
            eprintln!("oclocks: {}", describe_conflict(&a.name, &e));
            Ok(ExitCode::from(EXIT_CONFLICT))
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(Args)]
pub struct ReleaseArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[arg(long, default_value = "default")]
    zone: String,
    /// The fencing token printed by `oclocks acquire`.
    #[arg(long)]
    token: u64,
    /// The owner key file the lock was taken with.
    #[arg(long)]
    key: PathBuf,
    name: String,
}

pub async fn release_cmd(a: ReleaseArgs) -> Result<ExitCode> {
    if !a.key.exists() {
        bail!("owner key file {} does not exist", a.key.display());
    }
    let client = a.client.connect(Some(&a.key)).await?;
    let out = client.release_static(&a.zone, &a.name, a.token).await;
    client.close().await.ok();
    let out = out?;
    if out.already_released {
        println!("already released");
    } else {
        println!("released");
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct RefreshArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[arg(long, default_value = "default")]
    zone: String,
    #[arg(long)]
    token: u64,
    #[arg(long)]
    key: PathBuf,
    /// The new TTL from now (default: the grant's own TTL).
    #[arg(long, value_parser = duration, default_value = "0s")]
    ttl: Duration,
    name: String,
}

pub async fn refresh(a: RefreshArgs) -> Result<ExitCode> {
    if !a.key.exists() {
        bail!("owner key file {} does not exist", a.key.display());
    }
    let client = a.client.connect(Some(&a.key)).await?;
    let out = client
        .refresh_static(&a.zone, &a.name, a.token, a.ttl)
        .await;
    client.close().await.ok();
    match out? {
        Some(left) => println!("refreshed: expires in {:.1}s", left.as_secs_f64()),
        None => println!("refreshed (no TTL)"),
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct LocksArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[arg(long, default_value = "default")]
    zone: String,
}

pub async fn locks(a: LocksArgs) -> Result<ExitCode> {
    let client = a.client.connect(None).await?;
    let mut cursor: Option<String> = None;
    println!("{:<32} {:<9} {:>7}  HOLDERS", "NAME", "MODE", "WAITERS");
    loop {
        let page = client.list(&a.zone, cursor.as_deref(), 500).await?;
        for l in &page.locks {
            let state = client.query(&a.zone, &l.name).await?;
            let holders: Vec<String> = state
                .holders
                .iter()
                .map(|h| {
                    format!(
                        "{}(token {}, {:.1}s)",
                        h.identity,
                        h.token,
                        h.held_ms as f64 / 1000.0
                    )
                })
                .collect();
            println!(
                "{:<32} {:<9} {:>7}  {}",
                l.name,
                format!("{:?}", l.mode).to_lowercase(),
                state.waiters,
                holders.join(", ")
            );
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    client.close().await.ok();
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    client: ClientArgs,
}

pub async fn status(a: StatusArgs) -> Result<ExitCode> {
    let client = a.client.connect(None).await?;
    let s = client.status().await?;
    // Measure every server this client knows now (STATUS round trips on
    // separate connections; each server bounded by the connect timeout).
    let measured = client.probe_servers().await;
    client.close().await.ok();
    println!(
        "node {} (site {}): {:?}, term {}",
        s.node_id, s.site, s.role, s.term
    );
    println!(
        "leader: {}",
        s.leader_id.map_or("none".to_string(), |l| l.to_string())
    );
    println!(
        "applied index: {}, config version: {}",
        s.applied_index, s.config_version
    );
    for srv in &s.servers {
        println!(
            "server {} at {} (site {}){}",
            srv.node_id,
            srv.address,
            srv.site,
            if srv.serving { "" } else { " not serving" }
        );
    }
    print!("{}", servers_table(&measured));
    Ok(ExitCode::SUCCESS)
}

/// The servers as this client sees them: round-trip time and which one it
/// uses (`*`).
fn servers_table(servers: &[ServerStatus]) -> String {
    let dash = || "-".to_string();
    let rows: Vec<[String; 6]> = servers
        .iter()
        .map(|k| {
            [
                if k.primary { "*" } else { "" }.to_string(),
                k.address.clone(),
                k.node_id.map_or_else(dash, |n| n.to_string()),
                k.site.clone().unwrap_or_else(dash),
                k.rtt
                    .map_or_else(dash, |d| format!("{:.2} ms", d.as_secs_f64() * 1000.0)),
                match (k.serving, &k.probe_error) {
                    (_, Some(e)) => format!("probe failed: {e}"),
                    (Some(false), None) => "not serving".to_string(),
                    (Some(true), None) => "serving".to_string(),
                    (None, None) => dash(),
                },
            ]
        })
        .collect();
    let header = ["", "ADDRESS", "NODE", "SITE", "RTT", "STATE"].map(String::from);
    let mut widths = [0usize; 6];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::from("servers as this client sees them (* = primary):\n");
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Whether the server at `addr` serves a HELLO (used by `oclocks dev`).
pub async fn probe(client_toml: &Path, addr: SocketAddr) -> Result<()> {
    let mut cfg = ClientConfig::from_file(client_toml)?;
    cfg.endpoints = vec![addr.to_string()];
    cfg.connect_timeout = Duration::from_secs(2);
    let client = Client::connect(cfg).await?;
    client.close().await.ok();
    Ok(())
}
