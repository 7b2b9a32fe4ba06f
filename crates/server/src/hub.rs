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

use oclocks_core::{ClientId, Effect, Nonce, Refusal, Token};
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

    /// Deliver effects as the state machine applies them, until the feed ends.
    pub async fn run(self: Arc<Self>, mut feed: mpsc::UnboundedReceiver<AppliedBatch>) {
        while let Some(batch) = feed.recv().await {
            self.deliver(batch.effects);
        }
    }
}
