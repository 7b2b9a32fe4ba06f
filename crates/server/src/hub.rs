//! The hub: delivers what the lock engine emits (grants to waiters, ended
//! waits, LOST, watch events) to the connections of this server.
//!
//! Every replica applies every command and so sees every effect; each
//! delivers the effects of the sessions connected to it. A session has at
//! most one current connection here (the latest HELLO wins). A waiting LOCK
//! registers `(client id, nonce)` *before* it is proposed, so a grant can
//! never be applied before anyone listens for it; a grant nobody listens for
//! is not lost either — the client's retry of that LOCK (same nonce) is
//! answered from the engine's outcome memory.
//!
//! The hub never blocks the apply path: delivery is `try_send` into each
//! connection's bounded outbound queue; a full queue marks the connection
//! for closing (a client that does not read is disconnected, not buffered
//! without end).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use oclocks_core::{ClientId, Effect, Engine, LockOutcome, Nonce, Refusal, Token};
use oclocks_proto::{Lost, Response, ResponseBody, WatchEvent};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::raft::AppliedBatch;
use crate::reply::holder_to_wire;

/// How a queued LOCK ended.
#[derive(Debug)]
pub enum WaitEnd {
    Granted(Token),
    Refused(Refusal),
}

/// The outbound side of one connection.
#[derive(Clone)]
pub struct ConnHandle {
    pub id: u64,
    pub tx: mpsc::Sender<Response>,
    /// Notified when the connection must close (its queue overflowed).
    pub kill: Arc<Notify>,
}

impl ConnHandle {
    /// Queue a response; a full queue closes the connection.
    pub fn send(&self, r: Response) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(r) {
            tracing::warn!(
                conn = self.id,
                "outbound queue full: closing the connection"
            );
            self.kill.notify_one();
        }
    }
}

#[derive(Default)]
struct Inner {
    conns: HashMap<ClientId, ConnHandle>,
    waits: HashMap<(ClientId, Nonce), oneshot::Sender<WaitEnd>>,
    /// (client, zone, name) → request id of the WATCH.
    watches: HashMap<(ClientId, String, String), u64>,
}

/// Routes effects to connections. Cheap to share.
#[derive(Default)]
pub struct Hub {
    inner: Mutex<Inner>,
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock would be a bug in this file; the
        // maps stay consistent enough to keep delivering.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Make `conn` the session's current connection.
    pub fn attach(&self, client: ClientId, conn: ConnHandle) {
        self.lock().conns.insert(client, conn);
    }

    /// Forget the connection if it is still the session's current one.
    pub fn detach(&self, client: ClientId, conn_id: u64) {
        let mut g = self.lock();
        if g.conns.get(&client).is_some_and(|c| c.id == conn_id) {
            g.conns.remove(&client);
        }
    }

    /// Listen for the end of the LOCK `(client, nonce)`; register before
    /// proposing. A later registration of the same LOCK (a retry on another
    /// connection) replaces this one.
    pub fn register_wait(&self, client: ClientId, nonce: Nonce) -> oneshot::Receiver<WaitEnd> {
        let (tx, rx) = oneshot::channel();
        self.lock().waits.insert((client, nonce), tx);
        rx
    }

    pub fn unregister_wait(&self, client: ClientId, nonce: Nonce) {
        self.lock().waits.remove(&(client, nonce));
    }

    pub fn register_watch(&self, client: ClientId, zone: &str, name: &str, request_id: u64) {
        self.lock()
            .watches
            .insert((client, zone.to_string(), name.to_string()), request_id);
    }

    pub fn unregister_watch(&self, client: ClientId, zone: &str, name: &str) {
        self.lock()
            .watches
            .remove(&(client, zone.to_string(), name.to_string()));
    }

    /// Deliver one applied batch of effects.
    pub fn deliver(&self, effects: Vec<Effect>) {
        let mut g = self.lock();
        for e in effects {
            match e {
                Effect::Granted {
                    client,
                    nonce,
                    token,
                    ..
                } => {
                    if let Some(tx) = g.waits.remove(&(client, nonce)) {
                        // The waiting request may have gone; its retry is
                        // answered from the engine's outcome memory.
                        drop(tx.send(WaitEnd::Granted(token)));
                    }
                }
                Effect::WaitEnded {
                    client,
                    nonce,
                    refusal,
                    ..
                } => {
                    if let Some(tx) = g.waits.remove(&(client, nonce)) {
                        drop(tx.send(WaitEnd::Refused(refusal)));
                    }
                }
                Effect::Lost {
                    client: Some(client),
                    zone,
                    name,
                    token,
                    reason,
                } => {
                    if let Some(c) = g.conns.get(&client) {
                        c.send(Response {
                            id: 0,
                            body: ResponseBody::Lost(Lost {
                                zone: zone.to_string(),
                                name: name.to_string(),
                                token,
                                reason,
                            }),
                        });
                    }
                }
                Effect::Lost { client: None, .. } => {}
                Effect::SessionExpired { client } => {
                    let ended: Vec<(ClientId, Nonce)> = g
                        .waits
                        .keys()
                        .filter(|(c, _)| *c == client)
                        .copied()
                        .collect();
                    for k in ended {
                        if let Some(tx) = g.waits.remove(&k) {
                            drop(tx.send(WaitEnd::Refused(Refusal::NoSession)));
                        }
                    }
                    g.watches.retain(|(c, _, _), _| *c != client);
                }
                Effect::Watch {
                    client,
                    zone,
                    name,
                    holders,
                } => {
                    let key = (client, zone.to_string(), name.to_string());
                    if let (Some(&id), Some(c)) = (g.watches.get(&key), g.conns.get(&client)) {
                        c.send(Response {
                            id,
                            body: ResponseBody::WatchEvent(WatchEvent {
                                zone: zone.to_string(),
                                name: name.to_string(),
                                holders: holders.iter().map(holder_to_wire).collect(),
                            }),
                        });
                    }
                }
            }
        }
    }

    /// After a snapshot install (effects of skipped entries never came):
    /// settle every wait whose LOCK the engine says has ended.
    pub fn resync(&self, engine: &Engine) {
        let mut g = self.lock();
        let keys: Vec<(ClientId, Nonce)> = g.waits.keys().copied().collect();
        for (client, nonce) in keys {
            let end = match engine.lock_outcome(client, nonce) {
                Some(LockOutcome::Granted(t)) => WaitEnd::Granted(t),
                Some(LockOutcome::Refused(r)) => WaitEnd::Refused(r),
                Some(LockOutcome::Waiting) | None => continue,
            };
            if let Some(tx) = g.waits.remove(&(client, nonce)) {
                drop(tx.send(end));
            }
        }
    }

    /// Deliver effects as the state machine applies them, until the feed ends.
    pub async fn run(
        self: Arc<Self>,
        mut feed: mpsc::UnboundedReceiver<AppliedBatch>,
        engine: Arc<std::sync::Mutex<Engine>>,
    ) {
        while let Some(batch) = feed.recv().await {
            if batch.resync {
                tracing::info!(
                    index = batch.log_index,
                    "snapshot installed: settling waits from the engine"
                );
                let e = engine.lock().unwrap_or_else(|p| p.into_inner());
                self.resync(&e);
            }
            self.deliver(batch.effects);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oclocks_core::{Caller, Command, EngineLimits, Kind, LockRequest, Mode, Op, Reply};

    fn apply(e: &mut Engine, op: Op) -> Reply {
        e.apply(Command {
            term: 1,
            now_ms: 1000,
            op,
        })
        .reply
    }

    fn lock(client: u128, nonce: u64) -> Op {
        Op::Lock(LockRequest {
            caller: Caller {
                client,
                identity: "a".into(),
            },
            key: None,
            zone: "z".into(),
            name: "n".into(),
            mode: Mode::Exclusive,
            kind: Kind::Connection,
            ttl_ms: 0,
            wait_ms: 60_000,
            lock_delay_ms: 0,
            owner: nonce,
            nonce,
            low_water: 0,
        })
    }

    /// A snapshot install skips the grant's effect; the resync settles the
    /// wait from the engine instead, and leaves a still-queued wait alone.
    #[test]
    fn resync_settles_waits_the_snapshot_skipped() {
        let mut e = Engine::new(EngineLimits::default());
        for c in [1, 2, 3] {
            let caller = Caller {
                client: c,
                identity: "a".into(),
            };
            apply(
                &mut e,
                Op::OpenSession {
                    caller,
                    timeout_ms: 10_000,
                },
            );
        }
        let Reply::Granted { token } = apply(&mut e, lock(1, 1)) else {
            panic!("first lock not granted");
        };
        assert!(matches!(apply(&mut e, lock(2, 1)), Reply::Queued { .. }));
        assert!(matches!(apply(&mut e, lock(3, 1)), Reply::Queued { .. }));
        let hub = Hub::default();
        let mut granted = hub.register_wait(2, 1);
        let mut waiting = hub.register_wait(3, 1);
        let caller = Caller {
            client: 1,
            identity: "a".into(),
        };
        let op = Op::Release {
            caller,
            key: None,
            zone: "z".into(),
            name: "n".into(),
            token,
        };
        apply(&mut e, op);
        hub.resync(&e);
        match granted.try_recv() {
            Ok(WaitEnd::Granted(t)) => assert!(t > token),
            other => panic!("{other:?}"),
        }
        assert!(waiting.try_recv().is_err(), "client 3 still waits");
    }
}
