//! Starting and stopping a server: config → data dir and cluster id → Raft
//! node → hub, proposer, drivers → TLS listener. Runs until the shutdown
//! future resolves, then stops accepting, stops the drivers and Raft.

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::cluster::{Approved, Cluster};
use crate::config::ServerConfig;
use crate::conn::{self, Ctx};
use crate::driver::{tick_loop, KeepaliveBatcher};
use crate::hub::Hub;
use crate::identity::DataIdentity;
use crate::peer::{PeerNet, PeerNetOptions};
use crate::proposer::{Clock, Proposer};
use crate::raft::{Member, MemberRole, NodeOptions, RaftNode, RaftOptions};

/// The server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("data directory {path}: {reason}")]
    DataDir { path: String, reason: String },
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("raft: {0}")]
    Raft(String),
    #[error("cannot join the cluster: {0}")]
    Join(String),
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
        &[oclocks_proto::ALPN_CLIENT, oclocks_proto::ALPN_PEER],
    )?;
    let peer_tls = crate::tls::peer_client_config(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)?;
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
    let identity = DataIdentity::open(&cfg.data_dir)?;
    let raft_fresh = !cfg.data_dir.join(crate::raft::LOG_DIR).exists()
        && !cfg.data_dir.join(crate::raft::LEGACY_LOG_FILE).exists();
    if identity.cluster_id().is_none() {
        if bootstrap && raft_fresh {
            identity.set_cluster_id(rand::random::<u128>().max(1))?;
        } else if cfg.peers.is_empty() {
            return Err(ServerError::DataDir {
                path: cfg.data_dir.display().to_string(),
                reason: "no cluster here yet: start the first node with --bootstrap, \
                         or list the servers to join in `peers`"
                    .into(),
            });
        }
    }
    let member = Member {
        addr: cfg.advertise_addr(),
        client_addr: cfg.client_addr(),
        site: cfg.site.clone(),
        incarnation: identity.incarnation(),
        role: cfg.role,
    };
    let heartbeat = Duration::from_millis(cfg.raft.heartbeat_ms);
    let options = RaftOptions {
        heartbeat_interval_ms: cfg.raft.heartbeat_ms,
        election_timeout_min_ms: cfg.raft.election_timeout_ms_min,
        election_timeout_max_ms: cfg.raft.election_timeout_ms_max,
        snapshot_every_entries: cfg.raft.snapshot_every_entries,
        logs_kept_after_snapshot: cfg.raft.logs_kept_after_snapshot,
        max_batch_commands: cfg.raft.max_batch_commands,
        max_inflight_batches: cfg.raft.max_inflight_batches,
        batch_linger_us: cfg.raft.batch_linger_us,
        elect: cfg.role != MemberRole::QuorumOnly,
        ..RaftOptions::default()
    };
    let net = Arc::new(PeerNet::new(
        cfg.node_id,
        identity.clone(),
        peer_tls,
        PeerNetOptions {
            source_ip: cfg.peer_source_ip,
            ..PeerNetOptions::default()
        },
    ));
    let (node, feed) = RaftNode::start_with_transport(
        NodeOptions {
            node_id: cfg.node_id,
            data_dir: cfg.data_dir.clone(),
            limits: cfg.engine_limits(),
            options,
            bootstrap,
            member: member.clone(),
        },
        Arc::new(net.clone()),
    )
    .await
    .map_err(|e| ServerError::Raft(e.to_string()))?;
    let node = Arc::new(node);
    let hub = Arc::new(Hub::default());
    tokio::spawn(hub.clone().run(feed, node.engine()));
    // A stall is a gap of more than two heartbeats in the timer loop.
    let clock = Arc::new(Clock::new(2 * cfg.raft.heartbeat_ms));
    let proposer = Arc::new(Proposer::new(
        node.clone(),
        net.clone(),
        clock.clone(),
        Duration::from_millis(cfg.raft.election_timeout_ms_min),
    ));
    let cluster = Arc::new(Cluster::new(
        node.clone(),
        net,
        proposer.clone(),
        identity,
        member,
        Duration::from_millis(2 * cfg.raft.election_timeout_ms_max),
        Approved {
            ids: cfg.voters.clone(),
            addrs: cfg.peers.clone(),
        },
    ));
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
        cluster: cluster.clone(),
        hub,
        keepalive,
        node_id: cfg.node_id,
        site: cfg.site.clone(),
        wire_limits: cfg.wire_limits(),
        outbound_queue_max: cfg.limits.outbound_queue_max,
        admins: cfg.admins.clone(),
        acceptor: TlsAcceptor::from(tls),
        next_conn_id: AtomicU64::new(1),
        metrics,
    });
    tracing::info!(node = cfg.node_id, listen = %cfg.listen, http = ?http_addr,
        cluster = ?cluster.identity.cluster_id().map(|c| format!("{c:032x}")),
        role = %cfg.role, "listening");
    // Every node with `peers` asks to join on start (a no-op for a member);
    // a refusal that retrying cannot fix stops the server.
    let mut joining = if cfg.peers.is_empty() || bootstrap {
        None
    } else {
        Some(tokio::spawn(cluster.clone().join(cfg.peers.clone())))
    };
    let mut failure = None;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            joined = async {
                match joining.as_mut() {
                    Some(j) => j.await,
                    None => std::future::pending().await,
                }
            }, if joining.is_some() => {
                joining = None;
                match joined {
                    Ok(Ok(())) => {}
                    Ok(Err(reason)) => {
                        tracing::error!("cannot join the cluster: {reason}");
                        failure = Some(ServerError::Join(reason));
                        break;
                    }
                    Err(e) => tracing::warn!("join task failed: {e}"),
                }
            }
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
    if let Some(j) = joining {
        j.abort();
    }
    node.shutdown().await;
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
