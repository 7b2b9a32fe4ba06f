//! Stamping and proposing commands: the one place where the leader's clock
//! and term enter the replicated log — and, on any other server, the way to
//! the leader: operations are forwarded to it over the peer protocol,
//! stamped and committed there, and answered here only once this server has
//! applied the entry too (so a client's next read here sees its write, and
//! the effects of that entry have been delivered). Linearizable reads on a
//! follower ask the leader for a read index and wait until it is applied.
//!
//! Every command is stamped with the term and this process's monotonic clock
//! (milliseconds since start) and handed to Raft *in stamp order* (under one
//! lock, with openraft's fire-and-forget submit, so log order equals stamp
//! order). Before the first command after a stall — a gap of more than two
//! heartbeats in the liveness beat that the driver keeps — a `Rebase` is
//! submitted first, so a paused process never expires sessions on its first
//! command after waking (SPEC guarantee 3).
//!
//! What it never does: decide anything about locks. Waiting for the commit
//! happens outside the lock, so concurrent proposals share fsyncs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use oclocks_core::{Command, Engine, Op, Reply};

use crate::peer::{ForwardError, PeerCallError, PeerNet, PeerRequest, PeerResponse};
use crate::raft::{Applied, NodeId, RaftNode};

/// A forwarded operation or read-index request, at most (the leader
/// answers once the entry is committed; a wait for a lock is not part of
/// it — LOCK answers QUEUED at once).
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a follower waits to apply an entry the leader has committed.
const APPLY_WAIT: Duration = Duration::from_secs(5);
/// Attempts to reach a leader while leadership changes.
const LEADER_ATTEMPTS: usize = 4;
/// Pause between those attempts.
const LEADER_RETRY: Duration = Duration::from_millis(150);
/// How often a leader that lost quorum contact looks for it again.
const QUORUM_POLL: Duration = Duration::from_millis(10);

/// Why a proposal did not produce a reply.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// This node is not the leader (single-node clusters only while
    /// starting); `leader` if known.
    #[error("not the leader")]
    NotLeader { leader: Option<u64> },
    /// Raft stopped or storage failed, or the leader could not be reached
    /// or did not answer; the command may or may not commit.
    #[error("raft unavailable: {0}")]
    Unavailable(String),
}

impl From<ForwardError> for ProposeError {
    fn from(e: ForwardError) -> ProposeError {
        match e {
            ForwardError::NotLeader { leader } => ProposeError::NotLeader { leader },
            ForwardError::Unavailable(m) | ForwardError::Refused(m) => ProposeError::Unavailable(m),
        }
    }
}

impl From<ProposeError> for ForwardError {
    fn from(e: ProposeError) -> ForwardError {
        match e {
            ProposeError::NotLeader { leader } => ForwardError::NotLeader { leader },
            ProposeError::Unavailable(m) => ForwardError::Unavailable(m),
        }
    }
}

/// The leader's monotonic clock, shared by the proposer and the driver.
#[derive(Debug)]
pub struct Clock {
    start: Instant,
    /// Last time the driver's beat ran, in clock ms.
    last_beat_ms: AtomicU64,
    /// A gap longer than this in the beat is a stall.
    stall_ms: u64,
    /// Set by a beat that found a stall, taken by the next stamp
    /// ([`Clock::take_stall`]): whoever notices the stall first, the
    /// driver's beat or a proposal, the Rebase is not lost between them.
    stall_pending: AtomicBool,
}

impl Clock {
    pub fn new(stall_ms: u64) -> Clock {
        Clock {
            start: Instant::now(),
            last_beat_ms: AtomicU64::new(0),
            stall_ms,
            stall_pending: AtomicBool::new(false),
        }
    }

    /// Milliseconds since this process started (monotonic).
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The driver's beat: record liveness; returns whether the gap since
    /// the previous beat was a stall.
    pub fn beat(&self) -> bool {
        self.beat_at(self.now_ms())
    }

    fn beat_at(&self, now: u64) -> bool {
        let stalled = now.saturating_sub(self.last_beat_ms.load(Ordering::SeqCst)) > self.stall_ms;
        if stalled {
            // Flag it before the beat is refreshed: a proposal that sees
            // the fresh beat then still sees the flag.
            self.stall_pending.store(true, Ordering::SeqCst);
        }
        self.last_beat_ms.fetch_max(now, Ordering::SeqCst);
        stalled
    }

    /// Whether a stall happened that no stamp has re-based yet (the beat
    /// flagged one, or the beat is overdue now); clears the flag and
    /// refreshes the beat, so one Rebase follows one stall.
    pub fn take_stall(&self) -> bool {
        self.take_stall_at(self.now_ms())
    }

    fn take_stall_at(&self, now: u64) -> bool {
        let overdue = now.saturating_sub(self.last_beat_ms.load(Ordering::SeqCst)) > self.stall_ms;
        let flagged = self.stall_pending.swap(false, Ordering::SeqCst);
        if overdue {
            self.last_beat_ms.fetch_max(now, Ordering::SeqCst);
        }
        overdue || flagged
    }
}

/// Proposes commands to Raft in stamp order (on the leader), or forwards
/// them to the leader (elsewhere).
pub struct Proposer {
    node: Arc<RaftNode>,
    net: Arc<PeerNet>,
    clock: Arc<Clock>,
    /// The leader stamps nothing while it has not heard from a quorum for
    /// longer than this, and re-bases first once it has again.
    quorum_bound: Duration,
    /// Held while stamping and submitting, so that log order = stamp order.
    submit: tokio::sync::Mutex<SubmitState>,
}

struct SubmitState {
    rebase_pending: bool,
}

impl Proposer {
    pub fn new(
        node: Arc<RaftNode>,
        net: Arc<PeerNet>,
        clock: Arc<Clock>,
        quorum_bound: Duration,
    ) -> Proposer {
        Proposer {
            node,
            net,
            clock,
            quorum_bound,
            submit: tokio::sync::Mutex::new(SubmitState {
                rebase_pending: false,
            }),
        }
    }

    /// Ask for a `Rebase` before the next command (the driver saw a stall).
    pub async fn request_rebase(&self) {
        self.submit.lock().await.rebase_pending = true;
    }

    /// Commit `op` through the leader (this node or another) and return its
    /// reply once it is applied on this node.
    pub async fn propose(&self, op: Op) -> Result<Reply, ProposeError> {
        let mut last = ProposeError::NotLeader { leader: None };
        for attempt in 0..LEADER_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(LEADER_RETRY).await;
            }
            let r = match self.node.leader_term() {
                Some(_) => self.propose_here(op.clone()).await.map(|a| a.reply),
                None => self.forward(op.clone()).await,
            };
            match r {
                // Not accepted anywhere (no leader, or it stepped down
                // before appending): safe to try again.
                Err(e @ ProposeError::NotLeader { .. }) => last = e,
                other => return other,
            }
        }
        Err(last)
    }

    /// Forward `op` to the leader this node knows of.
    async fn forward(&self, op: Op) -> Result<Reply, ProposeError> {
        let (leader, member) = self.leader()?;
        let call = self.net.call(
            &member.addr,
            Some(leader),
            Some(member.incarnation),
            PeerRequest::Forward(op),
            FORWARD_TIMEOUT,
        );
        // A leader that stops answering (paused, partitioned) is replaced
        // after an election timeout: stop waiting for it then, rather than
        // for the whole forward deadline, so clients retry on the new one.
        let resp = tokio::select! {
            r = call => r.map_err(unreachable)?,
            () = self.leader_changes_from(leader) => {
                return Err(ProposeError::Unavailable(format!(
                    "leader {leader} was replaced while a forwarded command waited; \
                     its outcome is unknown"
                )));
            }
        };
        match resp {
            PeerResponse::Forwarded(Ok(applied)) => {
                self.node
                    .wait_applied(applied.index, APPLY_WAIT)
                    .await
                    .map_err(|e| ProposeError::Unavailable(e.to_string()))?;
                Ok(applied.reply)
            }
            PeerResponse::Forwarded(Err(e)) => Err(e.into()),
            other => Err(ProposeError::Unavailable(format!(
                "leader answered {} to a forwarded command",
                other.kind()
            ))),
        }
    }

    /// Resolves once this node knows of a leader other than `leader` (or of
    /// none, after it was `leader`).
    async fn leader_changes_from(&self, leader: NodeId) {
        let mut rx = self.node.raft().metrics();
        loop {
            if rx.borrow_and_update().current_leader != Some(leader) {
                return;
            }
            if rx.changed().await.is_err() {
                // Raft stopped: the call's own deadline ends the wait.
                std::future::pending::<()>().await;
            }
        }
    }

    /// The leader this node knows of, other than itself, and its record.
    fn leader(&self) -> Result<(NodeId, crate::raft::Member), ProposeError> {
        let leader = self.node.current_leader();
        match leader {
            Some(l) if l != self.node.node_id() => match self.node.member(l) {
                Some(m) => Ok((l, m)),
                None => Err(ProposeError::NotLeader { leader: None }),
            },
            _ => Err(ProposeError::NotLeader { leader: None }),
        }
    }

    /// Run `f` on the engine linearizably: on the leader after a quorum
    /// round (read-index); elsewhere after asking the leader for its read
    /// index and applying up to it.
    pub async fn read<F, T>(&self, f: F) -> Result<T, ProposeError>
    where
        F: FnOnce(&Engine) -> T,
    {
        if self.node.is_leader() {
            return self
                .node
                .linearizable_read(f)
                .await
                .map_err(|e| ProposeError::Unavailable(e.to_string()));
        }
        let (leader, member) = self.leader()?;
        let resp = self
            .net
            .call(
                &member.addr,
                Some(leader),
                Some(member.incarnation),
                PeerRequest::ReadIndex,
                FORWARD_TIMEOUT,
            )
            .await
            .map_err(unreachable)?;
        let index = match resp {
            PeerResponse::ReadIndex(Ok(i)) => i,
            PeerResponse::ReadIndex(Err(e)) => return Err(e.into()),
            other => {
                return Err(ProposeError::Unavailable(format!(
                    "leader answered {} to a read-index request",
                    other.kind()
                )))
            }
        };
        self.node
            .wait_applied(index, APPLY_WAIT)
            .await
            .map_err(|e| ProposeError::Unavailable(e.to_string()))?;
        let engine = self.node.engine();
        let e = engine
            .lock()
            .map_err(|_| ProposeError::Unavailable("the engine's mutex is poisoned".into()))?;
        Ok(f(&e))
    }

    /// The leader's side of a read-index request from a follower.
    pub async fn read_index(&self) -> Result<u64, ForwardError> {
        if !self.node.is_leader() {
            return Err(ForwardError::NotLeader {
                leader: self.node.current_leader(),
            });
        }
        let (read, _applied) = self
            .node
            .raft()
            .get_read_log_id()
            .await
            .map_err(|e| ForwardError::Unavailable(e.to_string()))?;
        Ok(read.map_or(0, |l| l.index))
    }

    /// Whether a majority of voters answered this node within the bound.
    pub fn quorum_fresh(&self) -> bool {
        self.net
            .quorum_contact_age(&self.node.voter_ids())
            .is_some_and(|a| a <= self.quorum_bound)
    }

    /// Stamp `op`, submit it here (this node must lead), and wait for its
    /// reply once applied. Used for this node's own clients and for
    /// operations forwarded by followers; never forwards further.
    pub async fn propose_here(&self, op: Op) -> Result<Applied, ProposeError> {
        let term = match self.node.leader_term() {
            Some(t) => t,
            None => {
                return Err(ProposeError::NotLeader {
                    leader: self.node.current_leader(),
                })
            }
        };
        let pending = {
            let mut st = self.submit.lock().await;
            // Unbroken quorum contact: time during which this leader could
            // not reach a quorum must not count against sessions (their
            // keepalives could not commit either). Stamp nothing meanwhile;
            // the first command afterwards is a Rebase.
            if !self.quorum_fresh() {
                st.rebase_pending = true;
                // A late heartbeat answer (a busy machine) is not a lost
                // quorum: ask for a round now and give it one more bound
                // before refusing. The lock is held meanwhile, so nothing
                // is stamped with the stale view.
                let _ = self.node.raft().trigger().heartbeat().await;
                let deadline = Instant::now() + self.quorum_bound;
                while !self.quorum_fresh() {
                    if Instant::now() >= deadline {
                        return Err(ProposeError::Unavailable(format!(
                            "the leader has not heard from a quorum for over {:?}",
                            self.quorum_bound
                        )));
                    }
                    tokio::time::sleep(QUORUM_POLL).await;
                }
                if self.node.leader_term() != Some(term) {
                    return Err(ProposeError::NotLeader {
                        leader: self.node.current_leader(),
                    });
                }
            }
            // (`take_stall` first: it must be cleared even when a Rebase
            // is pending anyway.)
            if self.clock.take_stall() | st.rebase_pending {
                st.rebase_pending = false;
                let cmd = Command {
                    term,
                    now_ms: self.clock.now_ms(),
                    op: Op::Rebase,
                };
                // Its reply is `Done`; nobody waits for it.
                drop(self.node.submit(cmd).await.map_err(conv));
            }
            let cmd = Command {
                term,
                now_ms: self.clock.now_ms(),
                op,
            };
            self.node.submit(cmd).await.map_err(conv)?
        };
        pending.await.map_err(conv)
    }
}

fn unreachable(e: PeerCallError) -> ProposeError {
    ProposeError::Unavailable(format!("cannot reach the leader: {e}"))
}

fn conv(e: crate::raft::ProposeError) -> ProposeError {
    match e {
        crate::raft::ProposeError::ForwardToLeader { leader_id, .. } => {
            ProposeError::NotLeader { leader: leader_id }
        }
        e => ProposeError::Unavailable(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::Clock;

    /// The driver's beat may notice a stall (and refresh the beat) just
    /// before a proposal stamps: the stall must still reach that stamp.
    #[test]
    fn a_stall_seen_by_the_beat_reaches_the_next_stamp_once() {
        let clock = Clock::new(100);
        assert!(!clock.beat_at(50));
        assert!(!clock.take_stall_at(60), "no stall yet");
        // Paused from 50 to 500: the beat sees it first and refreshes.
        assert!(clock.beat_at(500));
        assert!(clock.take_stall_at(501), "the proposal still re-bases");
        assert!(!clock.take_stall_at(502), "one Rebase per stall");
        // A proposal that notices an overdue beat itself.
        assert!(clock.take_stall_at(900));
        assert!(!clock.beat_at(901), "the stamp refreshed the beat");
        assert!(!clock.take_stall_at(902));
    }
}
