//! Stamping and proposing commands: the one place where the leader's clock
//! and term enter the replicated log.
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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use oclocks_core::{Command, Op, Reply};

use crate::raft::RaftNode;

/// Why a proposal did not produce a reply.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// This node is not the leader (single-node clusters only while
    /// starting); `leader` if known.
    #[error("not the leader")]
    NotLeader { leader: Option<u64> },
    /// Raft stopped or storage failed; the command may or may not commit.
    #[error("raft unavailable: {0}")]
    Unavailable(String),
}

/// The leader's monotonic clock, shared by the proposer and the driver.
#[derive(Debug)]
pub struct Clock {
    start: Instant,
    /// Last time the driver's beat ran, in clock ms.
    last_beat_ms: AtomicU64,
    /// A gap longer than this in the beat is a stall.
    stall_ms: u64,
}

impl Clock {
    pub fn new(stall_ms: u64) -> Clock {
        Clock {
            start: Instant::now(),
            last_beat_ms: AtomicU64::new(0),
            stall_ms,
        }
    }

    /// Milliseconds since this process started (monotonic).
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The driver's beat: record liveness; returns whether the gap since
    /// the previous beat was a stall.
    pub fn beat(&self) -> bool {
        let now = self.now_ms();
        let prev = self.last_beat_ms.swap(now, Ordering::SeqCst);
        now.saturating_sub(prev) > self.stall_ms
    }

    /// Whether the beat has not run for longer than the stall bound.
    pub fn stalled(&self) -> bool {
        self.now_ms()
            .saturating_sub(self.last_beat_ms.load(Ordering::SeqCst))
            > self.stall_ms
    }
}

/// Proposes commands to Raft in stamp order.
pub struct Proposer {
    node: Arc<RaftNode>,
    clock: Arc<Clock>,
    /// Held while stamping and submitting, so that log order = stamp order.
    submit: tokio::sync::Mutex<SubmitState>,
}

struct SubmitState {
    rebase_pending: bool,
}

impl Proposer {
    pub fn new(node: Arc<RaftNode>, clock: Arc<Clock>) -> Proposer {
        Proposer {
            node,
            clock,
            submit: tokio::sync::Mutex::new(SubmitState {
                rebase_pending: false,
            }),
        }
    }

    /// Ask for a `Rebase` before the next command (the driver saw a stall).
    pub async fn request_rebase(&self) {
        self.submit.lock().await.rebase_pending = true;
    }

    /// Stamp `op`, submit it, and wait for its reply once applied.
    pub async fn propose(&self, op: Op) -> Result<Reply, ProposeError> {
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
            if st.rebase_pending || self.clock.stalled() {
                st.rebase_pending = false;
                // Refresh the beat so only one Rebase follows one stall.
                self.clock.beat();
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
        self.node.wait_reply(pending).await.map_err(conv)
    }
}

fn conv(e: crate::raft::ProposeError) -> ProposeError {
    match e {
        crate::raft::ProposeError::ForwardToLeader { leader_id, .. } => {
            ProposeError::NotLeader { leader: leader_id }
        }
        e => ProposeError::Unavailable(e.to_string()),
    }
}
