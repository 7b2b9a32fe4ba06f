//! The seam between openraft and the transport that carries Raft RPCs to
//! peers.
//!
//! Owns: [`Network`], openraft's `RaftNetworkFactory`, which hands out one
//! [`PeerClient`] per target; every client delegates to a shared
//! [`PeerTransport`] trait object and puts openraft's per-RPC deadline
//! (`RPCOption::hard_ttl`) around each call, so a hung peer can never stall
//! the Raft core (openraft#1810) whatever the transport does. (openraft 0.9
//! also bounds AppendEntries by `heartbeat_interval` and votes by the
//! election timeout; the deadline here is the same, kept as a floor for
//! every RPC kind.) Note what that means for a transport: an AppendEntries
//! round trip, including the follower's fsync of the entries, must fit in
//! one heartbeat interval.
//!
//! This milestone runs single-node clusters, which send no RPCs: the only
//! transport is [`NoPeers`], which answers every RPC with `Unreachable` at
//! once. The peer protocol of the next issue — the same TLS 1.3 port as
//! clients, ALPN `oclocks-peer/1`, peers authenticated by a server-role
//! certificate, the project's own framing, snapshots streamed in chunks,
//! per-RPC timeouts — implements [`PeerTransport`] and is passed to
//! [`RaftNode::start_with_transport`](super::RaftNode::start_with_transport);
//! nothing else in the server changes.
//!
//! Must never: block, retry forever, or wait without a deadline.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use openraft::error::{InstallSnapshotError, RPCError, RaftError, Timeout, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{RPCTypes, RaftNetwork, RaftNetworkFactory};

use super::member::Member;
use super::{NodeId, TypeConfig};

/// The error of an RPC whose remote side answers with a `RaftError<E>`.
pub type RpcError<E = openraft::error::Infallible> = RPCError<NodeId, Member, RaftError<NodeId, E>>;

/// A transport for Raft RPCs to peers. Object-safe, so the server can plug
/// in any implementation (`Arc<dyn PeerTransport>`); each call is
/// independent and may run concurrently with others, to the same or other
/// targets.
///
/// Errors: [`RPCError::Unreachable`] when the peer cannot be reached (openraft
/// backs off before retrying), [`RPCError::Network`] for a failure worth an
/// immediate retry, [`RPCError::RemoteError`] for the peer's own answer. A
/// deadline is applied by [`PeerClient`] around every call; implementations
/// should still bound their own connection attempts.
pub trait PeerTransport: Send + Sync + 'static {
    fn append_entries(
        &self,
        target: NodeId,
        node: &Member,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> BoxFuture<'static, Result<AppendEntriesResponse<NodeId>, RpcError>>;

    fn vote(
        &self,
        target: NodeId,
        node: &Member,
        rpc: VoteRequest<NodeId>,
    ) -> BoxFuture<'static, Result<VoteResponse<NodeId>, RpcError>>;

    /// One chunk of a snapshot (openraft's chunked transfer; the chunk size
    /// is `RaftOptions::snapshot_chunk_bytes`).
    fn install_snapshot(
        &self,
        target: NodeId,
        node: &Member,
        rpc: InstallSnapshotRequest<TypeConfig>,
    ) -> BoxFuture<'static, Result<InstallSnapshotResponse<NodeId>, RpcError<InstallSnapshotError>>>;
}

/// The transport of a single-node cluster: there are no peers, so every RPC
/// fails at once with `Unreachable`. Replaced by the TLS peer protocol
/// (ALPN `oclocks-peer/1` on the client port) in the next issue.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoPeers;

/// The error [`NoPeers`] reports.
#[derive(Debug, thiserror::Error)]
#[error("no peer transport in this build: node {target} at {addr} is unreachable")]
pub struct NoPeerTransport {
    pub target: NodeId,
    pub addr: String,
}

fn unreachable<E: std::error::Error>(target: NodeId, node: &Member) -> RpcError<E> {
    RPCError::Unreachable(Unreachable::new(&NoPeerTransport {
        target,
        addr: node.addr.clone(),
    }))
}

impl PeerTransport for NoPeers {
    fn append_entries(
        &self,
        target: NodeId,
        node: &Member,
        _rpc: AppendEntriesRequest<TypeConfig>,
    ) -> BoxFuture<'static, Result<AppendEntriesResponse<NodeId>, RpcError>> {
        let e = unreachable(target, node);
        Box::pin(async move { Err(e) })
    }

    fn vote(
        &self,
        target: NodeId,
        node: &Member,
        _rpc: VoteRequest<NodeId>,
    ) -> BoxFuture<'static, Result<VoteResponse<NodeId>, RpcError>> {
        let e = unreachable(target, node);
        Box::pin(async move { Err(e) })
    }

    fn install_snapshot(
        &self,
        target: NodeId,
        node: &Member,
        _rpc: InstallSnapshotRequest<TypeConfig>,
    ) -> BoxFuture<'static, Result<InstallSnapshotResponse<NodeId>, RpcError<InstallSnapshotError>>>
    {
        let e = unreachable(target, node);
        Box::pin(async move { Err(e) })
    }
}

/// openraft's network factory: one [`PeerClient`] per replication target or
/// vote, all sharing one transport.
#[derive(Clone)]
pub struct Network {
    id: NodeId,
    transport: Arc<dyn PeerTransport>,
}

impl Network {
    /// The network of node `id` over `transport`.
    pub fn new(id: NodeId, transport: Arc<dyn PeerTransport>) -> Network {
        Network { id, transport }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerClient {
        PeerClient {
            id: self.id,
            target,
            node: node.clone(),
            transport: self.transport.clone(),
        }
    }
}

/// The connection to one peer, as openraft sees it.
pub struct PeerClient {
    id: NodeId,
    target: NodeId,
    node: Member,
    transport: Arc<dyn PeerTransport>,
}

impl PeerClient {
    /// Run `fut` within `ttl`; past it, the RPC fails with `Timeout`.
    async fn deadline<T, E: std::error::Error>(
        &self,
        action: RPCTypes,
        ttl: Duration,
        fut: BoxFuture<'static, Result<T, RpcError<E>>>,
    ) -> Result<T, RpcError<E>> {
        match tokio::time::timeout(ttl, fut).await {
            Ok(r) => r,
            Err(_) => Err(RPCError::Timeout(Timeout {
                action,
                id: self.id,
                target: self.target,
                timeout: ttl,
            })),
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcError> {
        let fut = self.transport.append_entries(self.target, &self.node, rpc);
        self.deadline(RPCTypes::AppendEntries, option.hard_ttl(), fut)
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcError<InstallSnapshotError>> {
        let fut = self
            .transport
            .install_snapshot(self.target, &self.node, rpc);
        self.deadline(RPCTypes::InstallSnapshot, option.hard_ttl(), fut)
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcError> {
        let fut = self.transport.vote(self.target, &self.node, rpc);
        self.deadline(RPCTypes::Vote, option.hard_ttl(), fut).await
    }
}
