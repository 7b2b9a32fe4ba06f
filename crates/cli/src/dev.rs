//! `oclocks dev`: one command to a running local cluster.
//!
//! Makes certificates if missing (a CA, one server certificate per node, a
//! client certificate `dev-client` that is also an admin), writes node
//! configs, starts N `oclocks server` child processes on 127.0.0.1 (node 1
//! bootstraps the cluster, the others join it through `peers`; the last
//! `--quorum-only K` nodes are quorum-only), waits until each is a member
//! with a known leader (`/ready`), writes `client.toml` and `cluster.json`
//! (with every node's pid, so one can be `kill -9`ed to watch the others
//! carry on), prints how to use the CLI against it, and stops its children
//! on ctrl-c/SIGTERM. A second run reuses the directory: same certificates,
//! same data, same ports (a restarted cluster keeps its locks).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::certs;

#[derive(Args)]
pub struct DevArgs {
    /// Number of server nodes: 1, 3, 5 or 7.
    #[arg(long, default_value_t = 3, value_parser = parse_nodes)]
    nodes: u32,
    /// How many of them (the last ones) are quorum-only: they vote but
    /// never lead and serve no clients.
    #[arg(long, default_value_t = 0)]
    quorum_only: u32,
    /// Where certificates, configs, data and logs go.
    #[arg(long, default_value = ".oclocks-dev")]
    dir: PathBuf,
    /// How long to wait for the nodes to serve.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    start_timeout: Duration,
}

fn parse_nodes(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n @ (1 | 3 | 5 | 7)) => Ok(n),
        _ => Err("must be 1, 3, 5 or 7 (an odd number of voters)".into()),
    }
}

/// One node as `cluster.json` describes it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: u64,
    pub pid: u32,
    pub config: PathBuf,
    pub client_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub log: PathBuf,
    pub role: String,
}

/// The identity of the development client certificate (an admin).
pub const DEV_CLIENT: &str = "dev-client";

fn free_port() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?)
}

fn ensure_certs(dir: &Path, nodes: u32) -> Result<PathBuf> {
    let certs_dir = dir.join("certs");
    if !certs_dir.join("ca.pem").exists() {
        certs::init(&certs_dir)?;
    }
    for id in 1..=nodes {
        let name = format!("node{id}");
        if !certs::files(&certs_dir, &name).0.exists() {
            certs::issue(
                &certs_dir,
                &name,
                certs::Role::Server {
                    sans: vec!["127.0.0.1".into(), "localhost".into()],
                },
            )?;
        }
    }
    if !certs::files(&certs_dir, DEV_CLIENT).0.exists() {
        certs::issue(&certs_dir, DEV_CLIENT, certs::Role::Client)?;
    }
    Ok(certs_dir)
}

/// The nodes' configs, written once and reused (ports stay stable).
fn ensure_configs(
    dir: &Path,
    certs_dir: &Path,
    nodes: u32,
    quorum_only: u32,
) -> Result<Vec<PathBuf>> {
    let paths: Vec<PathBuf> = (1..=u64::from(nodes))
        .map(|id| dir.join(format!("node{id}.toml")))
        .collect();
    let existing = paths.iter().filter(|p| p.exists()).count();
    let extra = dir.join(format!("node{}.toml", nodes + 1)).exists();
    if existing == paths.len() && !extra {
        return Ok(paths);
    }
    if existing > 0 || extra {
        bail!(
            "{} holds a cluster of another size; use --nodes as before or another --dir",
            dir.display()
        );
    }
    let ports: Vec<(SocketAddr, SocketAddr)> = (0..nodes)
        .map(|_| Ok((free_port()?, free_port()?)))
        .collect::<Result<_>>()?;
    let certs_dir = std::fs::canonicalize(certs_dir)?;
    for (i, path) in paths.iter().enumerate() {
        let id = i as u64 + 1;
        let (listen, http) = ports[i];
        let peers = ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, (l, _))| format!("\"{l}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let role = if id > u64::from(nodes - quorum_only) {
            "quorum-only"
        } else {
            "voter"
        };
        write_config(path, &certs_dir, id, listen, http, &peers, role)?;
    }
    Ok(paths)
}

fn write_config(
    path: &Path,
    certs_dir: &Path,
    id: u64,
    listen: SocketAddr,
    http: SocketAddr,
    peers: &str,
    role: &str,
) -> Result<()> {
    let text = format!(
        r#"# Written by `oclocks dev`.
node_id = {id}
listen = "{listen}"
http = "{http}"
site = "dev"
data_dir = "node{id}-data"
role = "{role}"
peers = [{peers}]
admins = ["{DEV_CLIENT}"]

[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
"#,
        ca = certs_dir.join("ca.pem").display(),
        cert = certs_dir.join(format!("node{id}.pem")).display(),
        key = certs_dir.join(format!("node{id}.key")).display(),
    );
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Whether `GET /ready` on `addr` answers 200.
async fn ready(addr: SocketAddr) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    s.write_all(b"GET /ready HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf))
        .await
        .context("read timed out")??;
    let text = String::from_utf8_lossy(&buf);
    if text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200") {
        Ok(())
    } else {
        bail!("not ready: {}", text.lines().last().unwrap_or(""))
    }
}

pub async fn run(args: DevArgs) -> Result<ExitCode> {
    if args.quorum_only >= args.nodes || args.quorum_only > args.nodes / 2 {
        bail!(
            "--quorum-only {}: at most {} of {} nodes (a majority must be able to lead)",
            args.quorum_only,
            args.nodes / 2,
            args.nodes
        );
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let dir = std::fs::canonicalize(&args.dir)?;
    let certs_dir = ensure_certs(&dir, args.nodes)?;
    let exe = std::env::current_exe().context("cannot find the oclocks binary")?;
    let configs = ensure_configs(&dir, &certs_dir, args.nodes, args.quorum_only)?;
    let mut children = Vec::new();
    let mut infos = Vec::new();
    for (config, id) in configs.into_iter().zip(1u64..) {
        let cfg = oclocks_server::config::ServerConfig::load(&config)?;
        let bootstrap = id == 1 && !cfg.data_dir.join("cluster-id").exists();
        let log = dir.join(format!("node{id}.log"));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg("server").arg("--config").arg(&config);
        if bootstrap {
            cmd.arg("--bootstrap");
        }
        cmd.stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start node {id}"))?;
        infos.push(NodeInfo {
            id,
            pid: child.id().unwrap_or(0),
            config,
            client_addr: cfg.listen,
            http_addr: cfg.http,
            log,
            role: cfg.role.to_string(),
        });
        children.push(child);
    }
    let client_toml = dir.join("client.toml");
    std::fs::write(
        &client_toml,
        format!(
            "# Written by `oclocks dev`.\nendpoints = [{}]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            infos
                .iter()
                .filter(|n| n.role != "quorum-only")
                .map(|n| format!("\"{}\"", n.client_addr))
                .collect::<Vec<_>>()
                .join(", "),
            certs_dir.join("ca.pem").display(),
            certs_dir.join(format!("{DEV_CLIENT}.pem")).display(),
            certs_dir.join(format!("{DEV_CLIENT}.key")).display(),
        ),
    )?;
    std::fs::write(
        dir.join("cluster.json"),
        serde_json::to_string_pretty(&infos)?,
    )?;
    let deadline = Instant::now() + args.start_timeout;
    for n in &infos {
        loop {
            match ready(n.http_addr).await {
                Ok(()) => break,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("node {} not serving yet: {e:#}", n.id);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => bail!(
                    "node {} did not start serving within {:?} (log: {}): {e:#}",
                    n.id,
                    args.start_timeout,
                    n.log.display()
                ),
            }
        }
    }
    crate::client_cmds::probe(&client_toml, infos[0].client_addr)
        .await
        .context("the cluster does not serve a HELLO")?;
    println!("OpenCluster-Locks dev cluster: {} node(s)", infos.len());
    for n in &infos {
        println!(
            "  node {}  {}  {:<11}  pid {}  log {}",
            n.id,
            n.client_addr,
            n.role,
            n.pid,
            n.log.display()
        );
    }
    println!("Use it from another shell:");
    println!("  export OCLOCKS_CONFIG={}", client_toml.display());
    println!("  oclocks lock demo -- sh -c 'echo holding token $OCLOCKS_TOKEN; sleep 2'");
    println!("  oclocks status");
    println!("Logs: {}/node*.log. Stop with ctrl-c.", dir.display());
    crate::shutdown_signal().await;
    for (child, n) in children.iter_mut().zip(&infos) {
        if let Some(pid) = child.id() {
            // SIGTERM first: the server shuts down gracefully.
            crate::client_cmds::signal(pid, libc::SIGTERM);
        }
        match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                tracing::warn!("node {} did not stop in 10 s: killing it", n.id);
                let _ = child.kill().await;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
