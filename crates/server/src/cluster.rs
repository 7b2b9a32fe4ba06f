//! Membership and the server's side of the peer protocol.
//!
//! Owns: the peer handshake checks (cluster id, node id, incarnation),
//! answering peers' requests (Raft RPCs into openraft, forwarded commands
//! and read-index requests through the [`Proposer`], joins and removals),
//! the joining of a new node through `peers`, and the server lists clients
//! and operators see.
//!
//! Membership rules:
//! - A node joins through any server: the request reaches the leader, which
//!   adds it as a learner and waits until it has caught up. It becomes a
//!   voter only if it is approved — its node id is in the leader's
//!   `voters`, or its address in the leader's `peers` — and its own role is
//!   not `learner`; otherwise it stays a learner until an administrator
//!   promotes it (PROMOTE_SERVER). Joining again with the same incarnation
//!   is a no-op (a restarted node), so every node asks on start.
//! - A node id already in the membership with another incarnation is a
//!   wiped data directory: refused, with what to do.
//! - A removal is refused when the voters that would remain could not form
//!   a quorum among those the leader has heard from recently.
//! - Membership changes run one at a time on the leader.
//!
//! Must never: let a connection whose handshake named no cluster do more
//! than join; give a vote-carrying slot to a node with the wrong
//! incarnation.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use oclocks_proto::{Role, ServerInfo};
use openraft::ChangeMembers;

use crate::identity::DataIdentity;
use crate::peer::{
    ForwardError, JoinRequest, PeerCallError, PeerHandler, PeerHello, PeerNet, PeerRequest,
    PeerResponse, PeerWelcome,
};
use crate::proposer::Proposer;
use crate::raft::{Member, MemberRole, NodeId, RaftNode};

/// A join (learner catch-up and promotion) may take this long.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(120);
/// A removal may take this long.
pub const REMOVE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between rounds over `peers` while joining.
const JOIN_RETRY: Duration = Duration::from_secs(1);
/// Attempts of a membership change that finds another one in progress.
const CHANGE_ATTEMPTS: usize = 50;

/// Membership and peer service of one server.
pub struct Cluster {
    pub node: Arc<RaftNode>,
    pub net: Arc<PeerNet>,
    pub proposer: Arc<Proposer>,
    pub identity: DataIdentity,
    /// This node's own record.
    pub member: Member,
    /// A voter the leader heard from within this window counts as live.
    pub live_window: Duration,
    approved: Approved,
    changes: tokio::sync::Mutex<()>,
}

/// The voters this server's config approves: node ids (`voters`) and
/// addresses (`peers`).
#[derive(Clone, Debug, Default)]
pub struct Approved {
    pub ids: Vec<NodeId>,
    pub addrs: Vec<String>,
}

fn wiped(node: NodeId, recorded: u64, presented: u64) -> String {
    format!(
        "node {node} is a member with data-directory incarnation {recorded:016x}, but it \
         presents {presented:016x}: its data directory was wiped or replaced, so it has \
         forgotten its vote and log and cannot take back its slot. Remove it \
         (`oclocks cluster remove {node}`), then start it again to join as a new member"
    )
}

impl Cluster {
    pub fn new(
        node: Arc<RaftNode>,
        net: Arc<PeerNet>,
        proposer: Arc<Proposer>,
        identity: DataIdentity,
        member: Member,
        live_window: Duration,
        approved: Approved,
    ) -> Cluster {
        Cluster {
            node,
            net,
            proposer,
            identity,
            member,
            live_window,
            approved,
            changes: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether this node's config approves `id` at `addr` as a voter.
    fn approved(&self, id: NodeId, addr: &str) -> bool {
        self.approved.ids.contains(&id) || self.approved.addrs.iter().any(|a| a == addr)
    }

    fn me(&self) -> NodeId {
        self.node.node_id()
    }

    /// This node's role as the membership records it (its config's until
    /// it is a member).
    pub fn role(&self) -> MemberRole {
        self.node
            .member(self.me())
            .map_or(self.member.role, |m| m.role)
    }

    /// The servers clients may use (every member but quorum-only ones).
    pub fn serving_servers(&self) -> Vec<ServerInfo> {
        let mut out: Vec<ServerInfo> = self
            .node
            .members()
            .into_iter()
            .filter(|(_, m, _)| m.role.serves_clients())
            .map(|(id, m, _)| ServerInfo {
                node_id: id,
                address: m.client_addr,
                site: m.site,
                serving: true,
                role: None,
                config_version: None,
                lag: None,
            })
            .collect();
        if out.is_empty() && self.member.role.serves_clients() {
            out.push(ServerInfo {
                node_id: self.me(),
                address: self.member.client_addr.clone(),
                site: self.member.site.clone(),
                serving: true,
                role: None,
                config_version: None,
                lag: None,
            });
        }
        out
    }

    /// Every member with its role and (on the leader) its replication lag.
    pub fn status_servers(&self) -> Vec<ServerInfo> {
        let metrics = self.node.raft().metrics().borrow().clone();
        let last = metrics.last_log_index.unwrap_or(0);
        let lags: BTreeMap<NodeId, u64> = metrics
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .map(|(id, m)| (*id, last.saturating_sub(m.map_or(0, |l| l.index))))
                    .collect()
            })
            .unwrap_or_default();
        self.node
            .members()
            .into_iter()
            .map(|(id, m, voter)| {
                let role = if metrics.current_leader == Some(id) {
                    Role::Leader
                } else if m.role == MemberRole::QuorumOnly {
                    Role::QuorumOnly
                } else if voter {
                    Role::Follower
                } else {
                    Role::Learner
                };
                ServerInfo {
                    node_id: id,
                    address: m.client_addr,
                    site: m.site,
                    serving: m.role.serves_clients(),
                    role: Some(role),
                    config_version: None,
                    lag: lags.get(&id).copied(),
                }
            })
            .collect()
    }

    /// Join the cluster through `peers` (a no-op for a node that is already
    /// a member with this incarnation). Retries until it succeeds; `Err` is
    /// a refusal that retrying cannot fix.
    pub async fn join(self: Arc<Self>, peers: Vec<String>) -> Result<(), String> {
        let req = JoinRequest {
            node_id: self.me(),
            member: self.member.clone(),
        };
        let mut warned = false;
        loop {
            for addr in &peers {
                match self.join_via(addr, &req).await {
                    Ok(()) => {
                        tracing::info!(via = %addr, role = %self.member.role, "member of the cluster");
                        return Ok(());
                    }
                    Err(JoinFailure::Refused(reason)) => return Err(reason),
                    Err(JoinFailure::Retry(why)) => {
                        if warned {
                            tracing::debug!(via = %addr, "join: {why}");
                        } else {
                            tracing::info!(via = %addr, "join not done yet: {why}");
                            warned = true;
                        }
                    }
                }
            }
            tokio::time::sleep(JOIN_RETRY).await;
        }
    }

    async fn join_via(&self, addr: &str, req: &JoinRequest) -> Result<(), JoinFailure> {
        let welcome = self
            .net
            .welcome(addr)
            .await
            .map_err(|e| JoinFailure::Retry(e.to_string()))?;
        if welcome.node_id == self.me() {
            return Err(JoinFailure::Retry("that address is this node".into()));
        }
        let Some(cluster) = welcome.cluster_id else {
            return Err(JoinFailure::Retry(
                "that server has not joined a cluster yet".into(),
            ));
        };
        self.identity
            .set_cluster_id(cluster)
            .map_err(|e| JoinFailure::Refused(e.to_string()))?;
        let resp = self
            .net
            .call(
                addr,
                None,
                None,
                PeerRequest::Join(req.clone()),
                JOIN_TIMEOUT,
            )
            .await
            .map_err(|e| match e {
                PeerCallError::Refused { reason, .. } => JoinFailure::Refused(reason),
                e => JoinFailure::Retry(e.to_string()),
            })?;
        match resp {
            PeerResponse::Joined(Ok(_)) => Ok(()),
            PeerResponse::Joined(Err(ForwardError::Refused(r))) => Err(JoinFailure::Refused(r)),
            PeerResponse::Joined(Err(e)) => Err(JoinFailure::Retry(e.to_string())),
            other => Err(JoinFailure::Retry(format!("answered {}", other.kind()))),
        }
    }

    /// Send a join or removal to the leader this node knows of.
    async fn to_leader(
        &self,
        req: PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, ForwardError> {
        let leader = self.node.current_leader();
        let member = leader
            .filter(|l| *l != self.me())
            .and_then(|l| self.node.member(l).map(|m| (l, m)));
        let Some((id, m)) = member else {
            return Err(ForwardError::NotLeader { leader });
        };
        self.net
            .call(&m.addr, Some(id), Some(m.incarnation), req, timeout)
            .await
            .map_err(|e| ForwardError::Unavailable(format!("cannot reach the leader: {e}")))
    }

    /// The leader's part of a join (forwarded there from any server).
    pub async fn admit(&self, req: JoinRequest) -> Result<u128, ForwardError> {
        if !self.node.is_leader() {
            return match self.to_leader(PeerRequest::Join(req), JOIN_TIMEOUT).await? {
                PeerResponse::Joined(r) => r,
                other => Err(ForwardError::Unavailable(format!(
                    "leader answered {}",
                    other.kind()
                ))),
            };
        }
        let cluster = self
            .identity
            .cluster_id()
            .ok_or_else(|| ForwardError::Unavailable("the leader has no cluster id".into()))?;
        let _one_at_a_time = self.changes.lock().await;
        let id = req.node_id;
        match self.node.member(id) {
            Some(existing) if existing.incarnation != req.member.incarnation => {
                let msg = wiped(id, existing.incarnation, req.member.incarnation);
                tracing::warn!("join refused: {msg}");
                return Err(ForwardError::Refused(msg));
            }
            Some(_) => {}
            None => {
                tracing::info!(node = id, member = %req.member, "adding a learner");
                let add = self.node.raft().add_learner(id, req.member.clone(), true);
                match tokio::time::timeout(JOIN_TIMEOUT, add).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(ForwardError::Unavailable(e.to_string())),
                    Err(_) => {
                        return Err(ForwardError::Unavailable(
                            "the learner did not catch up in time".into(),
                        ))
                    }
                }
            }
        }
        let voter = self.node.members().iter().any(|(n, _, v)| *n == id && *v);
        if req.member.role.votes() && !voter {
            if self.approved(id, &req.member.addr) {
                tracing::info!(node = id, "promoting to voter");
                self.change(ChangeMembers::AddVoterIds(BTreeSet::from([id])))
                    .await?;
            } else {
                tracing::warn!(
                    node = id,
                    "joined as a learner: it is neither in `voters` nor in `peers`; it becomes \
                     a voter when an administrator runs `oclocks cluster promote {id}`"
                );
            }
        }
        Ok(cluster)
    }

    /// An administrator's approval: make learner `id` a voter (forwarded to
    /// the leader from any server).
    pub async fn promote(&self, id: NodeId) -> Result<(), ForwardError> {
        if !self.node.is_leader() {
            return match self
                .to_leader(PeerRequest::Promote(id), JOIN_TIMEOUT)
                .await?
            {
                PeerResponse::Promoted(r) => r,
                other => Err(ForwardError::Unavailable(format!(
                    "leader answered {}",
                    other.kind()
                ))),
            };
        }
        let _one_at_a_time = self.changes.lock().await;
        let members = self.node.members();
        let Some((_, m, voter)) = members.iter().find(|(n, _, _)| *n == id) else {
            return Err(ForwardError::Refused(format!("node {id} is not a member")));
        };
        if *voter {
            return Ok(());
        }
        if m.role == MemberRole::Learner {
            return Err(ForwardError::Refused(format!(
                "node {id} runs with role = \"learner\": change its config to make it a voter"
            )));
        }
        tracing::warn!(node = id, "audit: promoting a learner to voter");
        self.change(ChangeMembers::AddVoterIds(BTreeSet::from([id])))
            .await
    }

    /// Remove node `id` (forwarded to the leader from any server).
    pub async fn remove(&self, id: NodeId) -> Result<(), ForwardError> {
        if !self.node.is_leader() {
            return match self
                .to_leader(PeerRequest::Remove(id), REMOVE_TIMEOUT)
                .await?
            {
                PeerResponse::Removed(r) => r,
                other => Err(ForwardError::Unavailable(format!(
                    "leader answered {}",
                    other.kind()
                ))),
            };
        }
        let _one_at_a_time = self.changes.lock().await;
        let members = self.node.members();
        let Some((_, _, is_voter)) = members.iter().find(|(n, _, _)| *n == id) else {
            return Err(ForwardError::Refused(format!("node {id} is not a member")));
        };
        if !is_voter {
            return self
                .change(ChangeMembers::RemoveNodes(BTreeSet::from([id])))
                .await;
        }
        let remaining: Vec<NodeId> = members
            .iter()
            .filter(|(n, _, v)| *v && *n != id)
            .map(|(n, _, _)| *n)
            .collect();
        if remaining.is_empty() {
            return Err(ForwardError::Refused(format!(
                "node {id} is the only voter: removing it would leave no cluster"
            )));
        }
        let live: Vec<NodeId> = remaining
            .iter()
            .copied()
            .filter(|n| {
                *n == self.me()
                    || self
                        .net
                        .last_contact(*n)
                        .is_some_and(|t| t.elapsed() <= self.live_window)
            })
            .collect();
        let need = remaining.len() / 2 + 1;
        if live.len() < need {
            return Err(ForwardError::Refused(format!(
                "the voters that would remain ({remaining:?}) could not form a quorum: only \
                 {live:?} answered in the last {:?}, {need} are needed",
                self.live_window
            )));
        }
        tracing::warn!(node = id, "audit: removing a voter");
        self.change(ChangeMembers::RemoveVoters(BTreeSet::from([id])))
            .await
    }

    async fn change(&self, change: ChangeMembers<NodeId, Member>) -> Result<(), ForwardError> {
        let mut last = String::new();
        for _ in 0..CHANGE_ATTEMPTS {
            match self
                .node
                .raft()
                .change_membership(change.clone(), false)
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) => {
                    let msg = e.to_string();
                    if let Some(openraft::error::ClientWriteError::ForwardToLeader(f)) =
                        e.api_error()
                    {
                        return Err(ForwardError::NotLeader {
                            leader: f.leader_id,
                        });
                    }
                    if !msg.contains("in progress") && !msg.contains("InProgress") {
                        return Err(ForwardError::Unavailable(msg));
                    }
                    last = msg;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Err(ForwardError::Unavailable(last))
    }
}

enum JoinFailure {
    Refused(String),
    Retry(String),
}

impl PeerHandler for Cluster {
    fn hello(&self, h: &PeerHello) -> Result<PeerWelcome, String> {
        let mine = self.identity.cluster_id();
        if let (Some(theirs), Some(mine)) = (h.cluster_id, mine) {
            if theirs != mine {
                return Err(format!(
                    "node {} belongs to cluster {theirs:032x}, this node (node {}) to {mine:032x}",
                    h.from,
                    self.me()
                ));
            }
        }
        if h.cluster_id.is_some() && mine.is_none() {
            return Err(format!("node {} has not joined a cluster yet", self.me()));
        }
        if let Some(to) = h.to {
            if to != self.me() {
                return Err(format!(
                    "this is node {}, not node {to}: check addresses",
                    self.me()
                ));
            }
        }
        if let Some(inc) = h.to_incarnation {
            if inc != self.identity.incarnation() {
                return Err(wiped(self.me(), inc, self.identity.incarnation()));
            }
        }
        // A caller that names its cluster must be who the membership says.
        if h.cluster_id.is_some() {
            if let Some(m) = self.node.member(h.from) {
                if m.incarnation != h.from_incarnation {
                    return Err(wiped(h.from, m.incarnation, h.from_incarnation));
                }
            }
        }
        Ok(PeerWelcome {
            cluster_id: mine,
            node_id: self.me(),
            incarnation: self.identity.incarnation(),
        })
    }

    fn handle(
        self: Arc<Self>,
        hello: Arc<PeerHello>,
        req: PeerRequest,
    ) -> BoxFuture<'static, PeerResponse> {
        Box::pin(async move {
            if hello.cluster_id.is_none() && !matches!(req, PeerRequest::Join(_)) {
                return PeerResponse::Refused(
                    "a node that has not joined a cluster may only ask to join".into(),
                );
            }
            let raft = self.node.raft();
            match req {
                PeerRequest::Hello(_) => PeerResponse::Refused("second handshake".into()),
                PeerRequest::AppendEntries(rpc) => {
                    PeerResponse::AppendEntries(raft.append_entries(rpc).await)
                }
                PeerRequest::Vote(rpc) => PeerResponse::Vote(raft.vote(rpc).await),
                PeerRequest::InstallSnapshot(rpc) => {
                    PeerResponse::InstallSnapshot(raft.install_snapshot(rpc).await)
                }
                PeerRequest::Forward(op) => PeerResponse::Forwarded(
                    self.proposer
                        .propose_here(op)
                        .await
                        .map_err(ForwardError::from),
                ),
                PeerRequest::ReadIndex => PeerResponse::ReadIndex(self.proposer.read_index().await),
                PeerRequest::Join(req) => PeerResponse::Joined(self.admit(req).await),
                PeerRequest::Remove(id) => PeerResponse::Removed(self.remove(id).await),
                PeerRequest::Promote(id) => PeerResponse::Promoted(self.promote(id).await),
            }
        })
    }
}
