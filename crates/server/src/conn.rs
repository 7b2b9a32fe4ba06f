//! One client connection: TLS handshake, identity, then a stream of decoded
//! requests, each handled in its own task so that a LOCK that waits never
//! holds up the requests behind it; replies go back through one bounded
//! outbound queue, tagged with their request ids.
//!
//! Order of checks for every request: HELLO first (anything before it is
//! `PROTOCOL`), in-flight bound (`LIMIT`), then the request's own checks
//! (signatures are verified here, once, before anything enters the log),
//! then Raft. Bytes that do not decode end the connection after one ERROR
//! naming the problem; the session lives on and is resumed by HELLO on a
//! new connection. Nothing here decides anything about locks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::{Signature, VerifyingKey};
use futures::{SinkExt, StreamExt};
use oclocks_core::{Caller, ClientId, KeyProof, LockRequest, Op, Reply};
use oclocks_proto::{
    signed_message, CodecError, ErrorCode, HeldLock, HelloOk, Limits, LockInfo, Lost, OkReply,
    OwnerSig, PendingWait, Request, RequestBody, RequestCodec, Response, ResponseBody, Role, SigOp,
    StatusOk, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::cluster::Cluster;
use crate::driver::KeepaliveBatcher;
use crate::hub::{ConnHandle, Hub, WaitEnd};
use crate::proposer::{ProposeError, Proposer};
use crate::raft::RaftNode;
use crate::reply::{self, holder_to_wire};
use crate::tls::identity_of;

/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a connection needs from its server.
pub struct Ctx {
    pub node: Arc<RaftNode>,
    pub proposer: Arc<Proposer>,
    pub cluster: Arc<Cluster>,
    pub hub: Arc<Hub>,
    pub keepalive: KeepaliveBatcher,
    pub node_id: u64,
    pub site: String,
    pub wire_limits: Limits,
    pub outbound_queue_max: usize,
    pub admins: Vec<String>,
    pub acceptor: TlsAcceptor,
    pub next_conn_id: AtomicU64,
    pub metrics: Arc<crate::http::Metrics>,
}

/// Accept one TCP connection: handshake, then serve it.
pub async fn accept(ctx: Arc<Ctx>, tcp: TcpStream) {
    let peer = tcp.peer_addr().ok();
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, ctx.acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            ctx.metrics.tls_refused.inc();
            tracing::info!(?peer, "TLS handshake refused: {e}");
            return;
        }
        Err(_) => {
            tracing::info!(?peer, "TLS handshake timed out");
            return;
        }
    };
    let (_, session) = tls.get_ref();
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    let Some(cert) = session
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(identity_of)
    else {
        tracing::info!(?peer, "certificate names no identity: closed");
        return;
    };
    if alpn.as_deref() == Some(oclocks_proto::ALPN_PEER) {
        if !cert.server_role {
            ctx.metrics.tls_refused.inc();
            tracing::warn!(?peer, identity = %cert.name,
                "peer protocol refused: the certificate lacks the server role");
            return;
        }
        let addr = peer.map_or_else(|| "?".to_string(), |p| p.to_string());
        crate::peer::serve(tls, ctx.cluster.clone(), addr).await;
        return;
    }
    if alpn.as_deref() != Some(oclocks_proto::ALPN_CLIENT) {
        tracing::info!(?peer, "connection without a known ALPN protocol: closed");
        return;
    }
    // A server certificate may connect as a client but never has an
    // administrator's rights.
    let admin = !cert.server_role && ctx.admins.contains(&cert.name);
    let identity = cert.name;
    let id = ctx.next_conn_id.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(conn = id, ?peer, %identity, "client connected");
    ctx.metrics.connections.inc();
    let metrics = ctx.metrics.clone();
    serve(ctx, tls, identity, admin, id).await;
    metrics.connections.dec();
}

/// Serve one authenticated connection until it closes.
async fn serve<S>(ctx: Arc<Ctx>, stream: S, identity: String, admin: bool, conn_id: u64)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut reader = FramedRead::new(rd, RequestCodec::new(ctx.wire_limits.clone()));
    let (tx, mut rx) = mpsc::channel::<Response>(ctx.outbound_queue_max);
    let kill = Arc::new(Notify::new());
    let conn = ConnHandle {
        id: conn_id,
        tx,
        kill: kill.clone(),
    };
    let limits = ctx.wire_limits.clone();
    let writer = tokio::spawn(async move {
        let mut out = FramedWrite::new(wr, RequestCodec::new(limits));
        while let Some(r) = rx.recv().await {
            if let Err(e) = out.feed(r).await {
                tracing::debug!(conn = conn_id, "write failed: {e}");
                return;
            }
            while let Ok(r) = rx.try_recv() {
                if let Err(e) = out.feed(r).await {
                    tracing::debug!(conn = conn_id, "write failed: {e}");
                    return;
                }
            }
            if SinkExt::<Response>::flush(&mut out).await.is_err() {
                return;
            }
        }
        let _ = SinkExt::<Response>::close(&mut out).await;
    });
    let in_flight = Arc::new(Semaphore::new(ctx.wire_limits.requests_in_flight_max));
    let mut session: Option<ClientId> = None;
    // Request tasks of this connection: aborted when it closes, so a LOCK
    // waiting for ever does not keep a dead connection's socket open (what
    // it proposed stays proposed; a retry by nonce finds its outcome).
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        let next = tokio::select! {
            biased;
            _ = kill.notified() => break,
            n = reader.next() => n,
        };
        let req = match next {
            None => break,
            Some(Ok(req)) => req,
            Some(Err(e)) => {
                let id = reader.decoder().partial_request_id().unwrap_or(0);
                let (code, msg) = match &e {
                    CodecError::Decode(d) => (d.error_code(), d.to_string()),
                    CodecError::Encode(d) => (ErrorCode::Protocol, d.to_string()),
                    CodecError::Io(_) => break,
                };
                ctx.metrics.protocol_errors.inc();
                tracing::info!(conn = conn_id, "closing after undecodable input: {msg}");
                conn.send(reply::error(id, code, msg));
                break;
            }
        };
        let id = req.id;
        ctx.metrics.requests.inc();
        if let RequestBody::Hello(h) = &req.body {
            if session.is_some() {
                conn.send(reply::error(id, ErrorCode::Protocol, "HELLO already done"));
                continue;
            }
            if h.protocol_version < 1 {
                conn.send(reply::error(
                    id,
                    ErrorCode::Protocol,
                    format!("this server speaks protocol versions 1..={PROTOCOL_VERSION}"),
                ));
                break;
            }
            // HELLO runs inline: requests behind it need the session.
            if let Some(client) = hello(&ctx, &conn, &identity, id, h.client_id, h).await {
                session = Some(client);
            }
            continue;
        }
        if session.is_none() && matches!(req.body, RequestBody::Status) {
            // The one request allowed before HELLO: clients probe with it.
            conn.send(status(&ctx, id));
            continue;
        }
        let Some(client) = session else {
            conn.send(reply::error(
                id,
                ErrorCode::Protocol,
                "HELLO must come first",
            ));
            continue;
        };
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            conn.send(reply::error(
                id,
                ErrorCode::Limit,
                "requests_in_flight_max reached",
            ));
            continue;
        };
        let ctx = ctx.clone();
        let conn = conn.clone();
        let caller = Caller {
            client,
            identity: identity.clone(),
        };
        tasks.spawn(async move {
            let resp = handle(&ctx, &conn, caller, admin, req).await;
            if let Some(r) = resp {
                conn.send(r);
            }
            drop(permit);
        });
    }
    tasks.abort_all();
    if let Some(client) = session {
        ctx.hub.detach(client, conn_id);
        // The session's timeout runs from the disconnect, not from the last
        // keepalive: confirm it once more now (harmless after CLOSE: the
        // keepalive finds no session).
        let keepalive = ctx.keepalive.clone();
        let caller = Caller {
            client,
            identity: identity.clone(),
        };
        tokio::spawn(async move {
            let _ = keepalive.keepalive(caller).await;
        });
    }
    drop(conn);
    drop(reader);
    // The writer ends when every sender (in-flight handlers) is gone.
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    tracing::debug!(conn = conn_id, "connection closed");
}

fn propose_error(id: u64, e: ProposeError) -> Response {
    match e {
        ProposeError::NotLeader { leader } => Response {
            id,
            body: ResponseBody::Error(oclocks_proto::ErrorReply {
                code: ErrorCode::NotLeader,
                message: "this server is not the leader".into(),
                holders: Vec::new(),
                leader_id: leader,
                servers: Vec::new(),
            }),
        },
        ProposeError::Unavailable(m) => reply::error(id, ErrorCode::Unavailable, m),
    }
}

async fn hello(
    ctx: &Arc<Ctx>,
    conn: &ConnHandle,
    identity: &str,
    id: u64,
    client: ClientId,
    h: &oclocks_proto::Hello,
) -> Option<ClientId> {
    if !ctx.cluster.role().serves_clients() {
        conn.send(unavailable(
            ctx,
            id,
            "this server is quorum-only and serves no clients: use one of the listed servers",
        ));
        return None;
    }
    let Some(cluster_id) = ctx.cluster.identity.cluster_id() else {
        conn.send(unavailable(
            ctx,
            id,
            "this server has not joined a cluster yet",
        ));
        return None;
    };
    let caller = Caller {
        client,
        identity: identity.to_string(),
    };
    let op = Op::OpenSession {
        caller,
        timeout_ms: h.session_timeout_ms.unwrap_or(0),
    };
    match ctx.proposer.propose(op).await {
        Ok(Reply::Session {
            resumed,
            timeout_ms,
            held,
            waits,
            lost,
        }) => {
            ctx.hub.attach(client, conn.clone());
            conn.send(Response {
                id,
                body: ResponseBody::HelloOk(HelloOk {
                    protocol_version: h.protocol_version.min(PROTOCOL_VERSION),
                    cluster_id,
                    resumed,
                    session_timeout_ms: timeout_ms,
                    node_id: ctx.node_id,
                    site: ctx.site.clone(),
                    config_version: 0,
                    held: held
                        .iter()
                        .map(|l| HeldLock {
                            zone: l.zone.to_string(),
                            name: l.name.to_string(),
                            token: l.token,
                            mode: l.mode,
                            kind: l.kind,
                        })
                        .collect(),
                    waits: waits
                        .iter()
                        .map(|w| PendingWait {
                            zone: w.zone.to_string(),
                            name: w.name.to_string(),
                            nonce: w.nonce,
                        })
                        .collect(),
                    servers: ctx.cluster.serving_servers(),
                }),
            });
            for l in lost {
                conn.send(Response {
                    id: 0,
                    body: ResponseBody::Lost(Lost {
                        zone: l.zone.to_string(),
                        name: l.name.to_string(),
                        token: l.token,
                        reason: l.reason,
                    }),
                });
            }
            Some(client)
        }
        Ok(Reply::Refused(r)) => {
            conn.send(reply::refusal(id, &r));
            None
        }
        Ok(other) => {
            conn.send(reply::error(
                id,
                ErrorCode::Internal,
                format!("unexpected engine reply {other:?}"),
            ));
            None
        }
        Err(e) => {
            conn.send(propose_error(id, e));
            None
        }
    }
}

/// `ERROR UNAVAILABLE` with the servers that do serve clients.
fn unavailable(ctx: &Ctx, id: u64, message: &str) -> Response {
    Response {
        id,
        body: ResponseBody::Error(oclocks_proto::ErrorReply {
            code: ErrorCode::Unavailable,
            message: message.into(),
            holders: Vec::new(),
            leader_id: ctx.node.current_leader(),
            servers: ctx.cluster.serving_servers(),
        }),
    }
}

/// Whether an owner signature verifies over the canonical message.
fn verify(
    ctx: &Ctx,
    sig: &OwnerSig,
    op: SigOp,
    zone: &str,
    name: &str,
    value: u64,
    ttl_ms: u64,
) -> bool {
    let Some(cluster_id) = ctx.cluster.identity.cluster_id() else {
        return false;
    };
    let msg = signed_message(
        &cluster_id.to_be_bytes(),
        op,
        zone,
        name,
        value,
        ttl_ms,
        sig.counter,
    );
    let Ok(key) = VerifyingKey::from_bytes(&sig.public_key) else {
        return false;
    };
    key.verify_strict(&msg, &Signature::from_bytes(&sig.signature))
        .is_ok()
}

fn proof(sig: &Option<OwnerSig>) -> Option<KeyProof> {
    sig.as_ref().map(|s| KeyProof {
        key: s.public_key,
        counter: s.counter,
    })
}

fn bad_signature(id: u64) -> Response {
    reply::error(
        id,
        ErrorCode::BadSignature,
        "the owner signature does not verify",
    )
}

/// Handle one request after HELLO; `None` when the reply was already sent.
async fn handle(
    ctx: &Arc<Ctx>,
    conn: &ConnHandle,
    caller: Caller,
    admin: bool,
    req: Request,
) -> Option<Response> {
    let id = req.id;
    let simple = |r: Result<Reply, ProposeError>, ok: &dyn Fn(Reply) -> Option<Response>| match r {
        Ok(Reply::Refused(x)) => Some(reply::refusal(id, &x)),
        Ok(other) => ok(other),
        Err(e) => Some(propose_error(id, e)),
    };
    match req.body {
        RequestBody::Hello(_) => Some(reply::error(id, ErrorCode::Protocol, "HELLO already done")),
        RequestBody::Keepalive => match ctx.keepalive.keepalive(caller).await {
            Ok(Ok(())) => Some(reply::done(id)),
            Ok(Err(r)) => Some(reply::refusal(id, &r)),
            Err(e) => Some(propose_error(id, e)),
        },
        RequestBody::Close => {
            let client = caller.client;
            let r = ctx.proposer.propose(Op::CloseSession { caller }).await;
            simple(r, &|_| {
                ctx.hub.detach(client, conn.id);
                Some(reply::done(id))
            })
        }
        RequestBody::Lock(l) => lock(ctx, conn, caller, id, l).await,
        RequestBody::Cancel { nonce } => {
            let r = ctx.proposer.propose(Op::Cancel { caller, nonce }).await;
            simple(r, &|rep| match rep {
                Reply::Cancelled { gave_back } => Some(reply::ok(
                    id,
                    OkReply {
                        token: gave_back,
                        ..OkReply::default()
                    },
                )),
                _ => Some(reply::done(id)),
            })
        }
        RequestBody::Release(r) => {
            if let Some(sig) = &r.owner_sig {
                if !verify(ctx, sig, SigOp::Release, &r.zone, &r.name, r.token, 0) {
                    return Some(bad_signature(id));
                }
            }
            let op = Op::Release {
                caller,
                key: proof(&r.owner_sig),
                zone: r.zone,
                name: r.name,
                token: r.token,
            };
            let res = ctx.proposer.propose(op).await;
            simple(res, &|rep| match rep {
                Reply::Released { already_released } => Some(reply::ok(
                    id,
                    OkReply {
                        already_released,
                        ..OkReply::default()
                    },
                )),
                _ => Some(reply::done(id)),
            })
        }
        RequestBody::Refresh(r) => {
            if let Some(sig) = &r.owner_sig {
                if !verify(
                    ctx,
                    sig,
                    SigOp::Refresh,
                    &r.zone,
                    &r.name,
                    r.token,
                    r.ttl_ms,
                ) {
                    return Some(bad_signature(id));
                }
            }
            let op = Op::Refresh {
                caller,
                key: proof(&r.owner_sig),
                zone: r.zone,
                name: r.name,
                token: r.token,
                ttl_ms: r.ttl_ms,
            };
            let res = ctx.proposer.propose(op).await;
            simple(res, &|rep| match rep {
                Reply::Refreshed { expires_in_ms } => Some(reply::ok(
                    id,
                    OkReply {
                        expires_in_ms,
                        ..OkReply::default()
                    },
                )),
                _ => Some(reply::done(id)),
            })
        }
        RequestBody::Query(l) => {
            let (zone, name) = (l.zone, l.name);
            let info = ctx.proposer.read(move |e| e.query(&zone, &name)).await;
            Some(match info {
                Ok(info) => {
                    let (holders, waiters) = info
                        .map(|i| (i.holders.iter().map(holder_to_wire).collect(), i.waiters))
                        .unwrap_or_default();
                    reply::ok(
                        id,
                        OkReply {
                            holders,
                            waiters: Some(u32::try_from(waiters).unwrap_or(u32::MAX)),
                            ..OkReply::default()
                        },
                    )
                }
                Err(e) => propose_error(id, e),
            })
        }
        RequestBody::CheckToken(c) => {
            let (zone, name, token) = (c.zone, c.name, c.token);
            let r = ctx
                .proposer
                .read(move |e| e.check_token(&zone, &name, token))
                .await;
            Some(match r {
                Ok(current) => reply::ok(
                    id,
                    OkReply {
                        token_current: Some(current),
                        ..OkReply::default()
                    },
                ),
                Err(e) => propose_error(id, e),
            })
        }
        RequestBody::List(l) => {
            let page = usize::try_from(l.page_size).unwrap_or(usize::MAX);
            let r = ctx
                .proposer
                .read(move |e| e.list(&l.zone, l.start_after.as_deref(), page))
                .await;
            Some(match r {
                Ok((locks, next)) => reply::ok(
                    id,
                    OkReply {
                        locks: locks
                            .iter()
                            .map(|i| LockInfo {
                                name: i.name.to_string(),
                                mode: i
                                    .holders
                                    .first()
                                    .map_or(oclocks_proto::Mode::Exclusive, |h| h.mode),
                                holders: u32::try_from(i.holders.len()).unwrap_or(u32::MAX),
                                waiters: u32::try_from(i.waiters).unwrap_or(u32::MAX),
                            })
                            .collect(),
                        next_cursor: next,
                        ..OkReply::default()
                    },
                ),
                Err(e) => propose_error(id, e),
            })
        }
        RequestBody::Break(b) => {
            if !admin {
                return Some(reply::error(
                    id,
                    ErrorCode::Forbidden,
                    "BREAK needs a client certificate whose identity is listed in the server's `admins`",
                ));
            }
            tracing::warn!(identity = %caller.identity, zone = %b.zone, name = %b.name,
                expected_token = ?b.token, "audit: operator BREAK");
            let op = Op::Break {
                zone: b.zone,
                name: b.name,
                expected_token: b.token,
            };
            let res = ctx.proposer.propose(op).await;
            simple(res, &|rep| match rep {
                Reply::Broken { tokens } => Some(reply::ok(
                    id,
                    OkReply {
                        token: tokens.first().copied(),
                        ..OkReply::default()
                    },
                )),
                _ => Some(reply::done(id)),
            })
        }
        RequestBody::Watch(l) => {
            ctx.hub.register_watch(caller.client, &l.zone, &l.name, id);
            let client = caller.client;
            let (zone, name) = (l.zone.clone(), l.name.clone());
            let res = ctx
                .proposer
                .propose(Op::Watch {
                    caller,
                    zone: l.zone,
                    name: l.name,
                })
                .await;
            if !matches!(res, Ok(Reply::Done)) {
                ctx.hub.unregister_watch(client, &zone, &name);
            }
            simple(res, &|_| Some(reply::done(id)))
        }
        RequestBody::Unwatch(l) => {
            ctx.hub.unregister_watch(caller.client, &l.zone, &l.name);
            let res = ctx
                .proposer
                .propose(Op::Unwatch {
                    caller,
                    zone: l.zone,
                    name: l.name,
                })
                .await;
            simple(res, &|_| Some(reply::done(id)))
        }
        RequestBody::Status => Some(status(ctx, id)),
        RequestBody::RemoveServer { node_id } => {
            if !admin {
                return Some(reply::error(
                    id,
                    ErrorCode::Forbidden,
                    "REMOVE_SERVER needs a client certificate whose identity is listed in the server's `admins`",
                ));
            }
            tracing::warn!(identity = %caller.identity, node = node_id, "audit: REMOVE_SERVER");
            Some(match ctx.cluster.remove(node_id).await {
                Ok(()) => reply::done(id),
                Err(crate::peer::ForwardError::Refused(m)) => {
                    reply::error(id, ErrorCode::Invalid, m)
                }
                Err(e) => propose_error(id, e.into()),
            })
        }
        RequestBody::PromoteServer { node_id } => {
            if !admin {
                return Some(reply::error(
                    id,
                    ErrorCode::Forbidden,
                    "PROMOTE_SERVER needs a client certificate whose identity is listed in the server's `admins`",
                ));
            }
            tracing::warn!(identity = %caller.identity, node = node_id, "audit: PROMOTE_SERVER");
            Some(match ctx.cluster.promote(node_id).await {
                Ok(()) => reply::done(id),
                Err(crate::peer::ForwardError::Refused(m)) => {
                    reply::error(id, ErrorCode::Invalid, m)
                }
                Err(e) => propose_error(id, e.into()),
            })
        }
    }
}

fn status(ctx: &Ctx, id: u64) -> Response {
    let m = ctx.node.raft().metrics().borrow().clone();
    let role = if m.state.is_leader() {
        Role::Leader
    } else if ctx.cluster.role() == crate::raft::MemberRole::QuorumOnly {
        Role::QuorumOnly
    } else if m.state.is_candidate() {
        Role::Candidate
    } else if m.state.is_learner() {
        Role::Learner
    } else {
        Role::Follower
    };
    Response {
        id,
        body: ResponseBody::StatusOk(StatusOk {
            node_id: ctx.node_id,
            site: ctx.site.clone(),
            role,
            term: m.current_term,
            leader_id: m.current_leader,
            config_version: 0,
            applied_index: m.last_applied.map_or(0, |l| l.index),
            servers: ctx.cluster.status_servers(),
        }),
    }
}

async fn lock(
    ctx: &Arc<Ctx>,
    conn: &ConnHandle,
    caller: Caller,
    id: u64,
    l: oclocks_proto::Lock,
) -> Option<Response> {
    if let Some(sig) = &l.owner_sig {
        if !verify(ctx, sig, SigOp::Lock, &l.zone, &l.name, l.nonce, l.ttl_ms) {
            return Some(bad_signature(id));
        }
    }
    let client = caller.client;
    let nonce = l.nonce;
    // Listen before proposing: the grant may be applied before the reply
    // to this proposal is read.
    let ended = (l.wait_ms > 0).then(|| ctx.hub.register_wait(client, nonce));
    let req = LockRequest {
        caller,
        key: proof(&l.owner_sig),
        zone: l.zone,
        name: l.name,
        mode: l.mode,
        kind: l.kind,
        ttl_ms: l.ttl_ms,
        wait_ms: l.wait_ms,
        lock_delay_ms: l.lock_delay_ms,
        owner: l.owner_id,
        nonce,
        low_water: l.low_water,
    };
    let ttl_ms = l.ttl_ms;
    let granted = |token| {
        Some(reply::ok(
            id,
            OkReply {
                token: Some(token),
                expires_in_ms: (ttl_ms > 0).then_some(ttl_ms),
                ..OkReply::default()
            },
        ))
    };
    match ctx.proposer.propose(Op::Lock(req)).await {
        Ok(Reply::Granted { token }) => {
            if ended.is_some() {
                ctx.hub.unregister_wait(client, nonce);
            }
            granted(token)
        }
        Ok(Reply::Queued { position }) => {
            conn.send(Response {
                id,
                body: ResponseBody::Queued {
                    position: u32::try_from(position).unwrap_or(u32::MAX),
                },
            });
            let rx = ended?;
            match rx.await {
                Ok(WaitEnd::Granted(token)) => granted(token),
                Ok(WaitEnd::Refused(r)) => Some(reply::refusal(id, &r)),
                // Replaced by a retry of the same LOCK elsewhere: that one answers.
                Err(_) => None,
            }
        }
        Ok(Reply::Refused(r)) => {
            if ended.is_some() {
                ctx.hub.unregister_wait(client, nonce);
            }
            Some(reply::refusal(id, &r))
        }
        Ok(other) => Some(reply::error(
            id,
            ErrorCode::Internal,
            format!("unexpected engine reply {other:?}"),
        )),
        Err(e) => {
            if ended.is_some() {
                ctx.hub.unregister_wait(client, nonce);
            }
            Some(propose_error(id, e))
        }
    }
}
