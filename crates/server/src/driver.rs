//! The leader's drivers: time and keepalives.
//!
//! - The **tick loop** beats every `beat` (a fraction of the heartbeat),
//!   records liveness in the [`Clock`] (so a stall is noticed), makes sure
//!   the first command of every term this node leads is a `Rebase`, and
//!   proposes a `Tick` when the engine's earliest deadline has come — no log
//!   traffic while nothing is due, and deadlines fire within one beat.
//! - The **keepalive batcher** collects KEEPALIVEs from all connections and
//!   commits them as one `Keepalive` entry per batch; each is acknowledged
//!   only after that entry is committed and applied (never from memory).

use std::sync::Arc;
use std::time::Duration;

use oclocks_core::{Caller, Op, Refusal, Reply};
use tokio::sync::{mpsc, oneshot};

use crate::proposer::{Clock, ProposeError, Proposer};
use crate::raft::RaftNode;

/// Keepalives waiting for the next batch.
pub const KEEPALIVE_BATCH_MAX: usize = 4096;

type KeepaliveJob = (
    Caller,
    oneshot::Sender<Result<Result<(), Refusal>, ProposeError>>,
);

/// The connections' handle to the keepalive batcher.
#[derive(Clone)]
pub struct KeepaliveBatcher {
    tx: mpsc::Sender<KeepaliveJob>,
}

impl KeepaliveBatcher {
    /// Start the batcher: one `Keepalive` proposal per `interval` at most.
    pub fn start(proposer: Arc<Proposer>, interval: Duration) -> KeepaliveBatcher {
        let (tx, mut rx) = mpsc::channel::<KeepaliveJob>(KEEPALIVE_BATCH_MAX);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                // Let the batch fill for one interval.
                tokio::time::sleep(interval).await;
                let mut jobs = vec![first];
                while jobs.len() < KEEPALIVE_BATCH_MAX {
                    match rx.try_recv() {
                        Ok(j) => jobs.push(j),
                        Err(_) => break,
                    }
                }
                let callers = jobs.iter().map(|(c, _)| c.clone()).collect();
                let proposer = proposer.clone();
                // Propose without holding up the next batch.
                tokio::spawn(async move {
                    match proposer.propose(Op::Keepalive { callers }).await {
                        Ok(Reply::Keepalive(results)) if results.len() == jobs.len() => {
                            for ((_, tx), r) in jobs.into_iter().zip(results) {
                                drop(tx.send(Ok(r)));
                            }
                        }
                        Ok(other) => {
                            let msg = format!("unexpected keepalive reply {other:?}");
                            for (_, tx) in jobs {
                                drop(tx.send(Err(ProposeError::Unavailable(msg.clone()))));
                            }
                        }
                        Err(e) => {
                            let msg = e.to_string();
                            let leader = match e {
                                ProposeError::NotLeader { leader } => Some(leader),
                                ProposeError::Unavailable(_) => None,
                            };
                            for (_, tx) in jobs {
                                let err = match leader {
                                    Some(l) => ProposeError::NotLeader { leader: l },
                                    None => ProposeError::Unavailable(msg.clone()),
                                };
                                drop(tx.send(Err(err)));
                            }
                        }
                    }
                });
            }
        });
        KeepaliveBatcher { tx }
    }

    /// Queue one keepalive and wait until its batch is committed.
    pub async fn keepalive(&self, caller: Caller) -> Result<Result<(), Refusal>, ProposeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((caller, tx))
            .await
            .map_err(|_| ProposeError::Unavailable("keepalive batcher stopped".into()))?;
        rx.await
            .map_err(|_| ProposeError::Unavailable("keepalive batch dropped".into()))?
    }
}

/// Run the tick loop until `stop` resolves.
pub async fn tick_loop(
    node: Arc<RaftNode>,
    proposer: Arc<Proposer>,
    clock: Arc<Clock>,
    beat: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut rebased_term: Option<u64> = None;
    loop {
        if clock.beat() {
            tracing::warn!("stall detected (timer loop paused): re-basing deadlines first");
            proposer.request_rebase().await;
        }
        if let Some(term) = node.leader_term() {
            if !proposer.quorum_fresh() {
                // Unbroken quorum contact: time without it must not count
                // against sessions even if nothing was proposed meanwhile.
                proposer.request_rebase().await;
            }
            if rebased_term != Some(term) {
                // First command of the term this node leads: re-base, so
                // every session gets a full timeout from this clock.
                match proposer.propose(Op::Rebase).await {
                    Ok(_) => rebased_term = Some(term),
                    Err(e) => tracing::debug!("rebase not proposed: {e}"),
                }
            } else {
                let due = {
                    let engine = node.engine();
                    let e = engine.lock().unwrap_or_else(|p| p.into_inner());
                    (e.term() == term)
                        .then(|| e.next_deadline().map(|d| e.leader_clock_at(d)))
                        .flatten()
                };
                if due.is_some_and(|d| d <= clock.now_ms()) {
                    if let Err(e) = proposer.propose(Op::Tick).await {
                        tracing::debug!("tick not proposed: {e}");
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(beat) => {}
            _ = stop.changed() => return,
        }
    }
}
