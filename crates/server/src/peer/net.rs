//! The calling side of the peer protocol: [`PeerNet`] dials peers over TLS
//! (ALPN `oclocks-peer/1`, this server's own certificate as the client
//! certificate), performs the handshake, keeps one multiplexed connection
//! per peer, and implements openraft's [`PeerTransport`] on top.
//!
//! Every call has a deadline; a connection that fails is dropped and the
//! next call dials again. The time of the last answer from each node is
//! kept: the leader uses it to refuse a removal that would leave the
//! remaining voters without a reachable quorum.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsConnector;
use tokio_util::codec::{FramedRead, FramedWrite};

use super::{codec, decode, encode, Frame, PeerHello, PeerRequest, PeerResponse, PeerWelcome};
use crate::identity::DataIdentity;
use crate::raft::{Member, NodeId, PeerTransport, RpcError, TypeConfig};
use crate::tls::identity_of;

/// Frames queued for a connection's writer, at most.
const WRITE_QUEUE_MAX: usize = 1024;

/// How [`PeerNet`] behaves.
#[derive(Clone, Debug)]
pub struct PeerNetOptions {
    /// TCP connect + TLS handshake + peer handshake, at most.
    pub dial_timeout: Duration,
    /// Bind outgoing peer connections to this local address (multi-homed
    /// hosts; the chaos tests give each node its own loopback address so a
    /// fault proxy can tell who is calling).
    pub source_ip: Option<std::net::IpAddr>,
}

impl Default for PeerNetOptions {
    fn default() -> Self {
        PeerNetOptions {
            dial_timeout: Duration::from_secs(3),
            source_ip: None,
        }
    }
}

/// A peer call failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum PeerCallError {
    /// Could not connect or the connection broke: the peer may be down.
    #[error("peer {addr} unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    /// The peer refused the handshake or the request (the reason says why).
    #[error("peer {addr} refused: {reason}")]
    Refused { addr: String, reason: String },
    /// No answer within the deadline (it may still take effect).
    #[error("peer {addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    /// The answer was of the wrong kind.
    #[error("peer {addr} answered {got} to {sent}")]
    Protocol {
        addr: String,
        sent: &'static str,
        got: &'static str,
    },
}

/// One open, handshaken connection to a peer.
struct Conn {
    tx: mpsc::Sender<(u64, PeerRequest)>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<PeerResponse>>>>,
    next_id: AtomicU64,
    closed: Arc<AtomicBool>,
    welcome: PeerWelcome,
}

/// The connection to one (address, node id) pair, once dialled.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<Conn>>>>;

/// Dials peers and calls them. Cheap to share (`Arc`).
pub struct PeerNet {
    me: NodeId,
    identity: DataIdentity,
    tls: TlsConnector,
    opts: PeerNetOptions,
    /// One slot per (address, node id it should be); the async mutex
    /// serialises dialling of that slot only.
    conns: Mutex<HashMap<(String, Option<NodeId>), Slot>>,
    last_contact: Mutex<HashMap<NodeId, Instant>>,
}

impl PeerNet {
    pub fn new(
        me: NodeId,
        identity: DataIdentity,
        tls: Arc<rustls::ClientConfig>,
        opts: PeerNetOptions,
    ) -> PeerNet {
        PeerNet {
            me,
            identity,
            tls: TlsConnector::from(tls),
            opts,
            conns: Mutex::new(HashMap::new()),
            last_contact: Mutex::new(HashMap::new()),
        }
    }

    /// When `node` last answered a call, if ever.
    pub fn last_contact(&self, node: NodeId) -> Option<Instant> {
        self.last_contact
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .copied()
    }

    /// How long ago this node last had contact with a quorum of `voters`
    /// (itself counted as always in contact): the age of the answer of the
    /// voter that completes a majority. `None` if no majority has ever
    /// answered.
    pub fn quorum_contact_age(&self, voters: &[NodeId]) -> Option<Duration> {
        let need = voters.len() / 2 + 1;
        let now = Instant::now();
        let contacts = self.last_contact.lock().unwrap_or_else(|p| p.into_inner());
        let mut ages: Vec<Duration> = voters
            .iter()
            .filter_map(|v| {
                if *v == self.me {
                    Some(Duration::ZERO)
                } else {
                    contacts.get(v).map(|t| now.saturating_duration_since(*t))
                }
            })
            .collect();
        ages.sort();
        ages.get(need.checked_sub(1)?).copied()
    }

    fn slot(&self, addr: &str, to: Option<NodeId>) -> Slot {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((addr.to_string(), to))
            .or_default()
            .clone()
    }

    /// The open connection to `addr` (as node `to`), dialling if needed.
    async fn conn(
        &self,
        addr: &str,
        to: Option<NodeId>,
        to_incarnation: Option<u64>,
    ) -> Result<Arc<Conn>, PeerCallError> {
        let slot = self.slot(addr, to);
        let mut g = slot.lock().await;
        if let Some(c) = g.as_ref() {
            if !c.closed.load(Ordering::Acquire) {
                return Ok(c.clone());
            }
        }
        let timeout = self.opts.dial_timeout;
        let c = tokio::time::timeout(timeout, self.dial(addr, to, to_incarnation))
            .await
            .map_err(|_| PeerCallError::Timeout {
                addr: addr.to_string(),
                timeout,
            })??;
        let c = Arc::new(c);
        *g = Some(c.clone());
        Ok(c)
    }

    async fn dial(
        &self,
        addr: &str,
        to: Option<NodeId>,
        to_incarnation: Option<u64>,
    ) -> Result<Conn, PeerCallError> {
        let unreachable = |reason: String| PeerCallError::Unreachable {
            addr: addr.to_string(),
            reason,
        };
        let host = crate::split_host(addr).ok_or_else(|| unreachable("not host:port".into()))?;
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| unreachable(format!("bad server name {host:?}: {e}")))?;
        let tcp = self
            .connect_tcp(addr)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| unreachable(format!("TLS: {e}")))?;
        let server_role = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(identity_of)
            .is_some_and(|i| i.server_role);
        if !server_role {
            return Err(PeerCallError::Refused {
                addr: addr.to_string(),
                reason: "its certificate lacks the server role".into(),
            });
        }
        let (rd, wr) = tokio::io::split(tls);
        let mut reader = FramedRead::new(rd, codec());
        let mut writer = FramedWrite::new(wr, codec());
        let hello = PeerHello {
            cluster_id: self.identity.cluster_id(),
            from: self.me,
            from_incarnation: self.identity.incarnation(),
            to,
            to_incarnation,
        };
        let bytes = encode(&Frame {
            id: 0,
            body: PeerRequest::Hello(hello),
        })
        .map_err(|e| unreachable(format!("encode: {e}")))?;
        writer
            .send(bytes)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let first = reader
            .next()
            .await
            .ok_or_else(|| unreachable("closed during the handshake".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let frame: Frame<PeerResponse> =
            decode(&first).map_err(|e| unreachable(format!("bad handshake answer: {e}")))?;
        let welcome = match frame.body {
            PeerResponse::Welcome(w) => w,
            PeerResponse::Refused(reason) => {
                return Err(PeerCallError::Refused {
                    addr: addr.to_string(),
                    reason,
                })
            }
            other => {
                return Err(PeerCallError::Protocol {
                    addr: addr.to_string(),
                    sent: "Hello",
                    got: other.kind(),
                })
            }
        };
        if let (Some(mine), Some(theirs)) = (self.identity.cluster_id(), welcome.cluster_id) {
            if mine != theirs {
                return Err(PeerCallError::Refused {
                    addr: addr.to_string(),
                    reason: format!(
                        "it belongs to cluster {theirs:032x}, this node to {mine:032x}"
                    ),
                });
            }
        }
        if let Some(to) = to {
            if welcome.node_id != to {
                return Err(PeerCallError::Refused {
                    addr: addr.to_string(),
                    reason: format!("it is node {}, not node {to}", welcome.node_id),
                });
            }
        }

        let (tx, mut rx) = mpsc::channel::<(u64, PeerRequest)>(WRITE_QUEUE_MAX);
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<PeerResponse>>>> = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let (closed_w, closed_r) = (closed.clone(), closed.clone());
        let peer = addr.to_string();
        tokio::spawn(async move {
            while let Some((id, body)) = rx.recv().await {
                let bytes = match encode(&Frame { id, body }) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(peer, "cannot encode a peer request: {e}");
                        continue;
                    }
                };
                if bytes.len() > super::PEER_FRAME_BYTES_MAX {
                    tracing::warn!(
                        peer,
                        len = bytes.len(),
                        "peer request over the frame limit: dropped"
                    );
                    continue;
                }
                if let Err(e) = writer.send(bytes).await {
                    tracing::debug!(peer, "peer write failed: {e}");
                    break;
                }
            }
            closed_w.store(true, Ordering::Release);
        });
        let pend = pending.clone();
        let peer = addr.to_string();
        tokio::spawn(async move {
            while let Some(next) = reader.next().await {
                let Ok(bytes) = next else { break };
                let frame: Frame<PeerResponse> = match decode(&bytes) {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::warn!(peer, "undecodable peer response: {e}");
                        break;
                    }
                };
                let waiter = pend
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&frame.id);
                if let Some(w) = waiter {
                    let _ = w.send(frame.body);
                }
            }
            closed_r.store(true, Ordering::Release);
            // Fail every call still waiting on this connection.
            pend.lock().unwrap_or_else(|p| p.into_inner()).clear();
        });
        Ok(Conn {
            tx,
            pending,
            next_id: AtomicU64::new(1),
            closed,
            welcome,
        })
    }

    async fn connect_tcp(&self, addr: &str) -> std::io::Result<TcpStream> {
        let Some(ip) = self.opts.source_ip else {
            return TcpStream::connect(addr).await;
        };
        let mut last = None;
        for target in tokio::net::lookup_host(addr).await? {
            let socket = if target.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.bind(std::net::SocketAddr::new(ip, 0))?;
            match socket.connect(target).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no address")))
    }

    /// Handshake with `addr` (dialling if needed) and return its welcome.
    pub async fn welcome(&self, addr: &str) -> Result<PeerWelcome, PeerCallError> {
        Ok(self.conn(addr, None, None).await?.welcome.clone())
    }

    /// Call node `to` (or whoever is at `addr`, if `to` is `None`).
    pub async fn call(
        &self,
        addr: &str,
        to: Option<NodeId>,
        to_incarnation: Option<u64>,
        req: PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, PeerCallError> {
        let conn = self.conn(addr, to, to_incarnation).await?;
        let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        conn.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let broken = |reason: &str| PeerCallError::Unreachable {
            addr: addr.to_string(),
            reason: reason.to_string(),
        };
        if conn.tx.send((id, req)).await.is_err() {
            conn.closed.store(true, Ordering::Release);
            return Err(broken("connection closed"));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(PeerResponse::Refused(reason))) => {
                conn.closed.store(true, Ordering::Release);
                Err(PeerCallError::Refused {
                    addr: addr.to_string(),
                    reason,
                })
            }
            Ok(Ok(resp)) => {
                let node = to.unwrap_or(conn.welcome.node_id);
                self.last_contact
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(node, Instant::now());
                Ok(resp)
            }
            Ok(Err(_)) => Err(broken("connection lost before the answer")),
            Err(_) => {
                conn.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                Err(PeerCallError::Timeout {
                    addr: addr.to_string(),
                    timeout,
                })
            }
        }
    }
}

/// An openraft RPC error for a failed call.
fn rpc_error<E: std::error::Error>(e: PeerCallError) -> RpcError<E> {
    match e {
        PeerCallError::Unreachable { .. } | PeerCallError::Refused { .. } => {
            RPCError::Unreachable(Unreachable::new(&e))
        }
        PeerCallError::Timeout { .. } | PeerCallError::Protocol { .. } => {
            RPCError::Network(NetworkError::new(&e))
        }
    }
}

/// The outer deadline ([`crate::raft::PeerClient`]) bounds Raft RPCs; this
/// one only keeps a lost answer from pinning its slot for ever.
const RAFT_CALL_TIMEOUT: Duration = Duration::from_secs(60);

fn known(inc: u64) -> Option<u64> {
    (inc != 0).then_some(inc)
}

/// The answer to a Raft RPC, if the response is of its kind.
type Picked<T, E> = Option<Result<T, RaftError<NodeId, E>>>;

/// One Raft RPC to `target`: send `req`, take the answer `pick` accepts
/// (the remote's own error becomes `RemoteError`), anything else is a
/// protocol error.
fn raft_call<T, E>(
    net: &Arc<PeerNet>,
    target: NodeId,
    node: &Member,
    req: PeerRequest,
    name: &'static str,
    pick: fn(PeerResponse) -> Picked<T, E>,
) -> BoxFuture<'static, Result<T, RpcError<E>>>
where
    T: Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
    RaftError<NodeId, E>: std::error::Error,
{
    let net = net.clone();
    let node = node.clone();
    Box::pin(async move {
        let r = net
            .call(
                &node.addr,
                Some(target),
                known(node.incarnation),
                req,
                RAFT_CALL_TIMEOUT,
            )
            .await
            .map_err(rpc_error)?;
        let got = r.kind();
        match pick(r) {
            Some(Ok(r)) => Ok(r),
            Some(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(target, e))),
            None => Err(rpc_error(PeerCallError::Protocol {
                addr: node.addr.clone(),
                sent: name,
                got,
            })),
        }
    })
}

impl PeerTransport for Arc<PeerNet> {
    fn append_entries(
        &self,
        target: NodeId,
        node: &Member,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> BoxFuture<'static, Result<AppendEntriesResponse<NodeId>, RpcError>> {
        let req = PeerRequest::AppendEntries(rpc);
        raft_call(self, target, node, req, "AppendEntries", |r| match r {
            PeerResponse::AppendEntries(r) => Some(r),
            _ => None,
        })
    }

    fn vote(
        &self,
        target: NodeId,
        node: &Member,
        rpc: VoteRequest<NodeId>,
    ) -> BoxFuture<'static, Result<VoteResponse<NodeId>, RpcError>> {
        let req = PeerRequest::Vote(rpc);
        raft_call(self, target, node, req, "Vote", |r| match r {
            PeerResponse::Vote(r) => Some(r),
            _ => None,
        })
    }

    fn install_snapshot(
        &self,
        target: NodeId,
        node: &Member,
        rpc: InstallSnapshotRequest<TypeConfig>,
    ) -> BoxFuture<'static, Result<InstallSnapshotResponse<NodeId>, RpcError<InstallSnapshotError>>>
    {
        let req = PeerRequest::InstallSnapshot(rpc);
        raft_call(self, target, node, req, "InstallSnapshot", |r| match r {
            PeerResponse::InstallSnapshot(r) => Some(r),
            _ => None,
        })
    }
}
