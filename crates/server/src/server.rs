//! Starting and stopping a server: config → data dir and cluster id → Raft
//! node → hub, proposer, drivers → TLS listener. Runs until the shutdown
//! future resolves, then stops accepting, stops the drivers and Raft.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::ServerConfig;
use crate::conn::{self, Ctx};
use crate::driver::{tick_loop, KeepaliveBatcher};
use crate::hub::Hub;
use crate::proposer::{Clock, Proposer};
use crate::raft::{NodeOptions, RaftNode, RaftOptions};

/// The server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("data directory {path}: {reason}")]
    DataDir { path: String, reason: String },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("raft: {0}")]
    Raft(String),
}

const CLUSTER_ID_FILE: &str = "cluster-id";

/// Read the cluster id of this data dir, creating it when bootstrapping.
fn cluster_id(dir: &Path, bootstrap: bool) -> Result<u128, ServerError> {
    let path = dir.join(CLUSTER_ID_FILE);
    let err = |reason: String| ServerError::DataDir {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => u128::from_str_radix(text.trim(), 16)
            .map_err(|e| err(format!("corrupt cluster id: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !bootstrap {
                return Err(err(
                    "no cluster here yet: start the first node with --bootstrap \
                     (joining an existing cluster arrives with multi-node support)"
                        .into(),
                ));
            }
            let id: u128 = rand::random();
            let tmp = dir.join(format!("{CLUSTER_ID_FILE}.tmp"));
            std::fs::write(&tmp, format!("{id:032x}\n")).map_err(|e| err(e.to_string()))?;
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| err(e.to_string()))?;
            std::fs::rename(&tmp, &path).map_err(|e| err(e.to_string()))?;
            std::fs::File::open(dir)
                .and_then(|f| f.sync_all())
                .map_err(|e| err(e.to_string()))?;
            Ok(id)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// Run a server until `shutdown` resolves.
pub async fn run(
    cfg: ServerConfig,
    bootstrap: bool,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| ServerError::DataDir {
        path: cfg.data_dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let tls = crate::tls::server_config(
        &cfg.tls.ca,
        &cfg.tls.cert,
        &cfg.tls.key,
        &[oclocks_proto::ALPN_CLIENT],
    )?;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: cfg.listen.to_string(),
            source,
        })?;
    let http_listener =
        TcpListener::bind(cfg.http)
            .await
            .map_err(|source| ServerError::Listen {
                addr: cfg.http.to_string(),
                source,
            })?;
    let cluster_id = cluster_id(&cfg.data_dir, bootstrap)?;
    let heartbeat = Duration::from_millis(cfg.raft.heartbeat_ms);
    let options = RaftOptions {
        heartbeat_interval_ms: cfg.raft.heartbeat_ms,
        election_timeout_min_ms: cfg.raft.election_timeout_ms_min,
        election_timeout_max_ms: cfg.raft.election_timeout_ms_max,
        snapshot_every_entries: cfg.raft.snapshot_every_entries,
        ..RaftOptions::default()
    };
    let (node, feed) = RaftNode::start(NodeOptions {
        node_id: cfg.node_id,
        data_dir: cfg.data_dir.clone(),
        limits: cfg.engine_limits(),
        options,
        bootstrap,
        advertise_addr: cfg.advertise_addr(),
    })
    .await
    .map_err(|e| ServerError::Raft(e.to_string()))?;
    let node = Arc::new(node);
    // Serve clients only once a leader is known (SPEC 5).
    let leader = node
        .wait_for_leader(Duration::from_secs(60))
        .await
        .map_err(|e| ServerError::Raft(format!("no leader elected: {e}")))?;
    tracing::info!(leader, "leader known");
    let hub = Arc::new(Hub::default());
    tokio::spawn(hub.clone().run(feed));
    // A stall is a gap of more than two heartbeats in the timer loop.
    let clock = Arc::new(Clock::new(2 * cfg.raft.heartbeat_ms));
    let proposer = Arc::new(Proposer::new(node.clone(), clock.clone()));
    let keepalive = KeepaliveBatcher::start(proposer.clone(), heartbeat / 4);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ticker = tokio::spawn(tick_loop(
        node.clone(),
        proposer.clone(),
        clock,
        heartbeat / 4,
        stop_rx,
    ));
    let metrics = Arc::new(crate::http::Metrics::default());
    let conns = Arc::new(tokio::sync::Semaphore::new(cfg.limits.connections_max));
    let http_addr = http_listener.local_addr().ok();
    let http = tokio::spawn(crate::http::serve(
        http_listener,
        Arc::new(crate::http::HttpState {
            node: node.clone(),
            node_id: cfg.node_id,
            site: cfg.site.clone(),
            metrics: metrics.clone(),
        }),
        stop_tx.subscribe(),
    ));
    let ctx = Arc::new(Ctx {
        node: node.clone(),
        proposer,
        hub,
        keepalive,
        cluster_id,
        node_id: cfg.node_id,
        site: cfg.site.clone(),
        advertise: cfg.advertise_addr(),
        wire_limits: cfg.wire_limits(),
        outbound_queue_max: cfg.limits.outbound_queue_max,
        admins: cfg.admins.clone(),
        acceptor: TlsAcceptor::from(tls),
        next_conn_id: AtomicU64::new(1),
        metrics,
    });
    tracing::info!(node = cfg.node_id, listen = %cfg.listen, http = ?http_addr,
        cluster = %format!("{cluster_id:032x}"), "serving");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let Ok(permit) = conns.clone().try_acquire_owned() else {
                        tracing::warn!("connections_max reached: refusing a connection");
                        continue;
                    };
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        conn::accept(ctx, tcp).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    tracing::info!("shutting down");
    drop(listener);
    let _ = stop_tx.send(true);
    let _ = ticker.await;
    let _ = http.await;
    node.shutdown().await;
    Ok(())
}
