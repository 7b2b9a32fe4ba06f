//! A running Raft node: the stores, the openraft instance, and the proposal
//! batcher in front of it.
//!
//! Owns: starting a node from a data directory (bootstrapping a one-member
//! cluster only when asked and only when the directory is fresh), the
//! proposal queue, and shutdown.
//!
//! Group commit: openraft 0.9 turns each `client_write` into its own log
//! append and waits for that append's fsync before taking the next, so
//! commands proposed one by one would cost one fsync each. [`RaftNode`]
//! therefore queues proposals (FIFO) and a batcher task submits everything
//! that queued while the previous batch was being made durable as *one* log
//! entry ([`Proposal`]): one append, one fsync, one apply; each command gets
//! its own reply. Idle, a lone command goes out at once (no added latency);
//! under load, batches grow up to `max_batch_commands`. Right after a batch
//! answered several clients, the next one lingers (≤ `batch_linger_us`)
//! for their follow-up requests, so that a lock handoff's two requests —
//! the released client's next LOCK and the new holder's RELEASE — share
//! one commit instead of taking two (see `run_batcher`). Queue order is
//! log order.
//!
//! Must never: acknowledge a command before its entry is committed and
//! applied; hold the engine's lock across an `.await`; bootstrap a data
//! directory that already holds a cluster. (The data directory's identity —
//! cluster id, node incarnation — is decided elsewhere, next issue.)

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use oclocks_core::{Command, Engine, EngineLimits, Reply};
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError as OpenRaftError};
use openraft::ServerState;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;

use super::error::{ProposeError, RaftError, ReadError, StoreError};
use super::log_store::{LogStats, LogStore};
use super::member::Member;
use super::network::{Network, NoPeers, PeerTransport};
use super::options::RaftOptions;
use super::state_machine::{AppliedBatch, StateMachineStore};
use super::{NodeId, Proposal, Raft};

/// How to start a node.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub node_id: NodeId,
    /// Holds `raft-log/` and `snapshots/`.
    pub data_dir: PathBuf,
    /// The engine's limits (must be the same on every replica).
    pub limits: EngineLimits,
    pub options: RaftOptions,
    /// Start a new one-member cluster if the data directory is fresh.
    /// Ignored (with a log line) when it already holds a cluster.
    pub bootstrap: bool,
    /// This node as the membership records it (address, site, data
    /// directory incarnation, role); used when bootstrapping.
    pub member: Member,
}

/// One queued proposal.
struct Pending {
    cmd: Command,
    tx: oneshot::Sender<Result<Applied, ProposeError>>,
}

/// A command's reply and the index of the log entry that carried it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Applied {
    pub reply: Reply,
    pub index: u64,
}

/// The reply to a submitted command, once its entry is committed and
/// applied. Await it (it is a future).
#[must_use = "a PendingReply does nothing unless awaited"]
pub struct PendingReply {
    rx: oneshot::Receiver<Result<Applied, ProposeError>>,
}

impl Future for PendingReply {
    type Output = Result<Applied, ProposeError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx).poll(cx).map(|r| {
            r.unwrap_or_else(|_| {
                Err(ProposeError::Fatal(
                    "raft node shut down before the command was applied".into(),
                ))
            })
        })
    }
}

/// A running Raft node. Cheap to clone (clones share the node).
#[derive(Clone)]
pub struct RaftNode {
    id: NodeId,
    raft: Raft,
    engine: Arc<Mutex<Engine>>,
    queue: mpsc::Sender<Pending>,
    batcher: Arc<Mutex<Option<JoinHandle<()>>>>,
    log_closed: Weak<()>,
    log_stats: Arc<LogStats>,
}

impl RaftNode {
    /// Start a node with no peer transport (single-node clusters).
    pub async fn start(
        opts: NodeOptions,
    ) -> Result<(RaftNode, mpsc::UnboundedReceiver<AppliedBatch>), RaftError> {
        RaftNode::start_with_transport(opts, Arc::new(NoPeers)).await
    }

    /// Start a node whose Raft RPCs go over `transport`.
    ///
    /// Opens the stores in `opts.data_dir` (the state machine from its
    /// latest snapshot; openraft then re-applies the log after it), starts
    /// openraft, and — if `opts.bootstrap` and the directory is fresh (no
    /// vote, no log, no snapshot) — initialises a one-member cluster of this
    /// node. A restart needs no bootstrap. Returns the node and the feed of
    /// applied effects.
    pub async fn start_with_transport(
        opts: NodeOptions,
        transport: Arc<dyn PeerTransport>,
    ) -> Result<(RaftNode, mpsc::UnboundedReceiver<AppliedBatch>), RaftError> {
        let config = Arc::new(opts.options.to_config()?);
        let (effects_tx, effects_rx) = mpsc::unbounded_channel();
        let dir = opts.data_dir.clone();
        let limits = opts.limits.clone();
        let (log, sm) = tokio::task::spawn_blocking(move || {
            let log = LogStore::open(&dir)?;
            let sm = StateMachineStore::open(&dir, limits, effects_tx)?;
            Ok::<_, StoreError>((log, sm))
        })
        .await
        .map_err(|e| RaftError::Store(StoreError::Task(e.to_string())))??;

        let fresh = log.is_pristine().await? && !sm.has_snapshot();
        let engine = sm.engine();
        let log_closed = log.closed_token();
        let log_stats = log.stats();
        let network = Network::new(opts.node_id, transport);
        let raft = Raft::new(opts.node_id, config, network, log, sm)
            .await
            .map_err(|e| RaftError::Start(e.to_string()))?;

        if fresh && opts.bootstrap {
            let mut members = BTreeMap::new();
            members.insert(opts.node_id, opts.member.clone());
            if let Err(e) = raft.initialize(members).await {
                // Do not leave a half-started node running.
                if let Err(e) = raft.shutdown().await {
                    tracing::warn!("raft shutdown: {e}");
                }
                return Err(RaftError::Bootstrap(e.to_string()));
            }
            tracing::info!(node = opts.node_id, "bootstrapped a new one-member cluster");
        } else if fresh {
            tracing::info!(
                node = opts.node_id,
                "fresh data directory and no bootstrap: waiting to be added to a cluster"
            );
        } else {
            if opts.bootstrap {
                tracing::info!("the data directory already holds a cluster: bootstrap ignored");
            }
            tracing::info!(node = opts.node_id, "restarted from the data directory");
        }

        let (queue, rx) = mpsc::channel(opts.options.proposal_queue_max);
        let batcher = tokio::spawn(run_batcher(
            raft.clone(),
            rx,
            opts.options.max_batch_commands,
            Arc::new(Semaphore::new(opts.options.max_inflight_batches)),
            Duration::from_micros(opts.options.batch_linger_us),
        ));
        let node = RaftNode {
            id: opts.node_id,
            raft,
            engine,
            queue,
            batcher: Arc::new(Mutex::new(Some(batcher))),
            log_closed,
            log_stats,
        };
        Ok((node, effects_rx))
    }

    /// The openraft handle (metrics, membership changes, triggers).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The lock engine. Read it only after [`RaftNode::linearizable_read`]'s
    /// check (or use that), and never hold the lock across an `.await`.
    pub fn engine(&self) -> Arc<Mutex<Engine>> {
        self.engine.clone()
    }

    pub fn node_id(&self) -> NodeId {
        self.id
    }

    /// Whether this node currently believes it is the leader.
    pub fn is_leader(&self) -> bool {
        self.leader_term().is_some()
    }

    /// The term this node leads, if it believes it is the leader.
    pub fn leader_term(&self) -> Option<u64> {
        let rx = self.raft.metrics();
        let m = rx.borrow();
        (m.state == ServerState::Leader && m.current_leader == Some(self.id))
            .then_some(m.current_term)
    }

    /// The leader this node knows of.
    pub fn current_leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// The member record of node `id` in the current membership.
    pub fn member(&self, id: NodeId) -> Option<Member> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .cloned()
    }

    /// Every member with its record and whether it votes, by node id.
    pub fn members(&self) -> Vec<(NodeId, Member, bool)> {
        let rx = self.raft.metrics();
        let m = rx.borrow();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, n)| (*id, n.clone(), voters.contains(id)))
            .collect()
    }

    /// The voters of the current membership (both sets during a change).
    pub fn voter_ids(&self) -> Vec<NodeId> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// The last applied log index (0 before anything was applied).
    pub fn applied_index(&self) -> u64 {
        self.raft
            .metrics()
            .borrow()
            .last_applied
            .map_or(0, |l| l.index)
    }

    /// Wait until this node has applied the log up to `index`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<(), RaftError> {
        if self.applied_index() >= index {
            return Ok(());
        }
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "the forwarded entry applied here")
            .await
            .map(|_| ())
            .map_err(|e| RaftError::Timeout(e.to_string()))
    }

    /// Milliseconds since a quorum last acknowledged this node as leader
    /// (`None` when not leading).
    pub fn millis_since_quorum_ack(&self) -> Option<u64> {
        self.raft.metrics().borrow().millis_since_quorum_ack
    }

    /// This node's current term.
    pub fn current_term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// Counters of the log store (fsynced commits, entries appended).
    pub fn log_stats(&self) -> Arc<LogStats> {
        self.log_stats.clone()
    }

    /// Wait until some node is known as leader; returns its id.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, RaftError> {
        let m = self
            .raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a known leader")
            .await
            .map_err(|e| RaftError::Timeout(e.to_string()))?;
        m.current_leader
            .ok_or_else(|| RaftError::Timeout("a known leader".into()))
    }

    /// Queue `cmd` for the log; returns once it is queued. Commands are
    /// logged in the order they were queued. Await the returned reply for
    /// the outcome.
    pub async fn submit(&self, cmd: Command) -> Result<PendingReply, ProposeError> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send(Pending { cmd, tx })
            .await
            .map_err(|_| ProposeError::Fatal("raft node is shut down".into()))?;
        Ok(PendingReply { rx })
    }

    /// Wait for a submitted command's reply (same as awaiting it).
    pub async fn wait_reply(&self, reply: PendingReply) -> Result<Reply, ProposeError> {
        reply.await.map(|a| a.reply)
    }

    /// Propose `cmd` and wait until it is committed and applied; returns the
    /// engine's reply. Concurrent proposals share log entries and fsyncs.
    pub async fn propose(&self, cmd: Command) -> Result<Reply, ProposeError> {
        self.submit(cmd).await?.await.map(|a| a.reply)
    }

    /// Run `f` on the engine after confirming, with a quorum, that this node
    /// is the leader and has applied everything committed before the call
    /// (read-index): the read is linearizable.
    pub async fn linearizable_read<F, T>(&self, f: F) -> Result<T, ReadError>
    where
        F: FnOnce(&Engine) -> T,
    {
        self.raft.ensure_linearizable().await.map_err(read_error)?;
        let engine = self
            .engine
            .lock()
            .map_err(|_| ReadError::Fatal("the lock engine's mutex is poisoned".into()))?;
        Ok(f(&engine))
    }

    /// Stop the node: stop batching (queued proposals fail), stop openraft,
    /// and wait (up to 5 s) until the log database is closed, so the same
    /// data directory can be opened again.
    pub async fn shutdown(&self) {
        let batcher = self
            .batcher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(b) = batcher {
            b.abort();
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!("raft shutdown: {e}");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.log_closed.strong_count() > 0 {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!("raft log store still open 5 s after shutdown");
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn read_error(e: OpenRaftError<NodeId, CheckIsLeaderError<NodeId, Member>>) -> ReadError {
    match e {
        OpenRaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => {
            ReadError::ForwardToLeader {
                leader_id: f.leader_id,
                leader_addr: f.leader_node.map(|n| n.addr),
            }
        }
        OpenRaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)) => {
            ReadError::QuorumNotReached(q.to_string())
        }
        OpenRaftError::Fatal(f) => ReadError::Fatal(f.to_string()),
    }
}

/// How long a batch's reply is still awaited after this node stopped
/// leading the term it was submitted in. Normally it comes (the entry is
/// applied here as a follower, or openraft answers ForwardToLeader when it
/// is truncated); but openraft 0.9.25 never answers a write whose entry a
/// snapshot install purged on a deposed leader that held no conflicting
/// entry at the snapshot's index — and the batch's in-flight permit would
/// be held for ever (found by `tests/turmoil_cluster.rs`).
const DEPOSED_REPLY_GRACE: Duration = Duration::from_secs(3);

/// A hint older than this (or twice the linger, if longer) when the next
/// command arrives says nothing about it (see [`FollowUps`]).
const FOLLOW_UP_HINT_FRESH: Duration = Duration::from_millis(1);

/// What the last answered batch suggests about the next one: its answers
/// (final replies and grants) went to `answered` clients at `at`, and a
/// client that just got what it waited for usually sends its next request
/// within a round trip — the released client its next LOCK, the new holder
/// its RELEASE. Proposing the first of those alone would make the rest wait
/// a whole commit for the next batch.
#[derive(Clone, Copy, Debug)]
struct FollowUps {
    answered: usize,
    at: tokio::time::Instant,
}

/// Answers in `replies` (plus `granted` waiting LOCKs) that end what a
/// client waited for: all but "queued" (the client waits on) and
/// keepalives (answered to the server's own keepalive batcher).
fn answered(replies: &[Reply], granted: usize) -> usize {
    granted
        + replies
            .iter()
            .filter(|r| !matches!(r, Reply::Queued { .. } | Reply::Keepalive(_)))
            .count()
}

/// Submit queued proposals as batches, in queue order, with at most
/// `inflight` batches between submission and reply.
///
/// Lingering: when the previous batch answered `n` > 1 clients moments
/// ago, a batch waits up to `linger` after its first command for as many
/// as `n` commands before it is proposed (never longer; `linger` zero
/// turns it off). One client's request (`n` = 1) goes out at once.
async fn run_batcher(
    raft: Raft,
    mut rx: mpsc::Receiver<Pending>,
    max_batch: usize,
    inflight: Arc<Semaphore>,
    linger: Duration,
) {
    let follow_ups: Arc<Mutex<Option<FollowUps>>> = Arc::new(Mutex::new(None));
    let fresh = FOLLOW_UP_HINT_FRESH.max(linger.saturating_mul(2));
    loop {
        // Take the slot first: while waiting for it, proposals pile up and
        // the next batch gets all of them.
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut commands = vec![first.cmd];
        let mut waiters = vec![first.tx];
        let first_at = tokio::time::Instant::now();
        while commands.len() < max_batch {
            match rx.try_recv() {
                Ok(p) => {
                    commands.push(p.cmd);
                    waiters.push(p.tx);
                }
                Err(_) => break,
            }
        }
        let hint = follow_ups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(h) = hint.filter(|h| !linger.is_zero() && first_at.duration_since(h.at) < fresh)
        {
            let want = h.answered.min(max_batch);
            let deadline = first_at + linger;
            while commands.len() < want {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(p)) => {
                        commands.push(p.cmd);
                        waiters.push(p.tx);
                    }
                    // Closed (submit what we have) or lingered enough.
                    Ok(None) | Err(_) => break,
                }
            }
        }
        tracing::trace!(commands = commands.len(), "submitting a batch");
        match raft.client_write_ff(Proposal { commands }).await {
            Err(fatal) => {
                drop(permit);
                fail_all(waiters, ProposeError::Fatal(fatal.to_string()));
            }
            Ok(reply_rx) => {
                let mut metrics = raft.metrics();
                let led = {
                    let m = metrics.borrow_and_update();
                    (m.state == ServerState::Leader).then_some(m.current_term)
                };
                let follow_ups = follow_ups.clone();
                tokio::spawn(async move {
                    let mut reply_rx = std::pin::pin!(reply_rx);
                    let res = loop {
                        tokio::select! {
                            biased;
                            r = &mut reply_rx => break Some(r),
                            changed = metrics.changed(), if led.is_some() => {
                                let deposed = changed.is_err() || {
                                    let m = metrics.borrow_and_update();
                                    m.state != ServerState::Leader || Some(m.current_term) != led
                                };
                                if deposed {
                                    break tokio::time::timeout(DEPOSED_REPLY_GRACE, &mut reply_rx)
                                        .await
                                        .ok();
                                }
                            }
                        }
                    };
                    if let Some(Ok(Ok(resp))) = &res {
                        let n = answered(&resp.data.replies, resp.data.granted);
                        *follow_ups.lock().unwrap_or_else(PoisonError::into_inner) =
                            (n > 1).then(|| FollowUps {
                                answered: n,
                                at: tokio::time::Instant::now(),
                            });
                    }
                    drop(permit);
                    let Some(res) = res else {
                        tracing::warn!(
                            commands = waiters.len(),
                            "no reply for a batch {DEPOSED_REPLY_GRACE:?} after this node stopped \
                             leading its term; its outcome is unknown"
                        );
                        fail_all(
                            waiters,
                            ProposeError::Other(
                                "leadership lost before the entry was applied; outcome unknown"
                                    .into(),
                            ),
                        );
                        return;
                    };
                    match res {
                        Ok(Ok(resp)) => {
                            let index = resp.log_id.index;
                            let replies = resp.data.replies;
                            if replies.len() == waiters.len() {
                                for (w, reply) in waiters.into_iter().zip(replies) {
                                    let _ = w.send(Ok(Applied { reply, index }));
                                }
                            } else {
                                let msg = format!(
                                    "{} replies for {} commands",
                                    replies.len(),
                                    waiters.len()
                                );
                                fail_all(waiters, ProposeError::Other(msg));
                            }
                        }
                        Ok(Err(ClientWriteError::ForwardToLeader(f))) => fail_all(
                            waiters,
                            ProposeError::ForwardToLeader {
                                leader_id: f.leader_id,
                                leader_addr: f.leader_node.map(|n| n.addr),
                            },
                        ),
                        Ok(Err(e)) => fail_all(waiters, ProposeError::Other(e.to_string())),
                        Err(_) => fail_all(
                            waiters,
                            ProposeError::Fatal("raft stopped before the entry was applied".into()),
                        ),
                    }
                });
            }
        }
    }
}

fn fail_all(waiters: Vec<oneshot::Sender<Result<Applied, ProposeError>>>, e: ProposeError) {
    for w in waiters {
        let _ = w.send(Err(e.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answered_counts_what_ends_a_wait() {
        let replies = vec![
            Reply::Granted { token: 3 },
            Reply::Queued { position: 2 },
            Reply::Released {
                already_released: false,
            },
            Reply::Keepalive(vec![Ok(())]),
        ];
        // The grant and the release answer their clients; the queued LOCK
        // waits on and the keepalive is the server's own.
        assert_eq!(answered(&replies, 0), 2);
        // A waiting LOCK granted by the same entry is one more.
        assert_eq!(answered(&replies, 1), 3);
        assert_eq!(answered(&[], 0), 0);
    }
}
