//! Unit tests of the connection task and the API on top of it, against a
//! scripted in-process peer.
//!
//! Scope: the peer is **not** a server. It is a test script speaking the
//! wire protocol over in-memory pipes ([`MockNet`] hands the client one
//! `tokio::io::duplex` per connect), and each test decides byte for byte
//! what "the server" answers. That exercises the client's framing, request
//! ids, pipelining, keepalives, lease, reconnect, resend and guard logic in
//! isolation; whether a real server answers that way is for the integration
//! tests against real server processes. Time is tokio's paused clock, so
//! timeouts and leases run in virtual time, deterministically.

use std::collections::HashSet;
use std::sync::Mutex as StdMutex;

use ed25519_dalek::{Signature, VerifyingKey};
use futures::SinkExt;
use oclocks_proto::{
    signed_message, ErrorReply, HeldLock, Kind, LostReason as WireLost, Mode, OkReply,
    RequestCodec, SigOp, WAIT_FOREVER,
};
use tokio::io::DuplexStream;
use tokio_util::codec::Framed;

use super::*;
use crate::{Client, ClientConfig, LostReason, ReleaseOutcome};

const CLUSTER: u128 = 0x00c1_u128 << 64 | 0x5e;
const OTHER_CLUSTER: u128 = 0xbad;

/// Connections the client opens, handed to the test.
struct MockNet {
    refused: StdMutex<HashSet<String>>,
    accepted: mpsc::UnboundedSender<(String, DuplexStream)>,
}

impl MockNet {
    fn new() -> (
        Arc<MockNet>,
        mpsc::UnboundedReceiver<(String, DuplexStream)>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(MockNet {
                refused: StdMutex::new(HashSet::new()),
                accepted: tx,
            }),
            rx,
        )
    }

    fn refuse(&self, endpoint: &str, refuse: bool) {
        let mut set = self.refused.lock().unwrap();
        if refuse {
            set.insert(endpoint.to_owned());
        } else {
            set.remove(endpoint);
        }
    }
}

impl Connector for MockNet {
    fn connect(&self, endpoint: String) -> BoxFuture<'static, Result<BoxIo, Error>> {
        let refused = self.refused.lock().unwrap().contains(&endpoint);
        let result = if refused {
            Err(Error::Connect {
                endpoint,
                message: "connection refused".into(),
            })
        } else {
            let (client, server) = tokio::io::duplex(1 << 20);
            let _ = self.accepted.send((endpoint, server));
            Ok(Box::new(client) as BoxIo)
        };
        Box::pin(async move { result })
    }
}

/// The test's side of one connection.
struct Peer {
    endpoint: String,
    io: Framed<DuplexStream, RequestCodec>,
}

impl Peer {
    async fn accept(rx: &mut mpsc::UnboundedReceiver<(String, DuplexStream)>) -> Peer {
        let (endpoint, io) = rx.recv().await.expect("the client connects");
        Peer {
            endpoint,
            io: Framed::new(io, RequestCodec::default()),
        }
    }

    /// The next request, whatever it is.
    async fn recv(&mut self) -> Request {
        self.io
            .next()
            .await
            .expect("the client sends a request")
            .expect("a valid request")
    }

    /// The next request that is not a KEEPALIVE; keepalives are answered OK.
    async fn recv_op(&mut self) -> Request {
        loop {
            let req = self.recv().await;
            if req.body == RequestBody::Keepalive {
                self.ok(req.id, OkReply::default()).await;
                continue;
            }
            return req;
        }
    }

    /// Answer keepalives (only) for `d`.
    async fn idle(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while let Ok(req) = tokio::time::timeout_at(end, self.recv()).await {
            assert_eq!(
                req.body,
                RequestBody::Keepalive,
                "unexpected request while idle"
            );
            self.ok(req.id, OkReply::default()).await;
        }
    }

    async fn send(&mut self, id: u64, body: ResponseBody) {
        self.io.send(Response { id, body }).await.expect("send");
    }

    async fn ok(&mut self, id: u64, ok: OkReply) {
        self.send(id, ResponseBody::Ok(ok)).await;
    }

    async fn error(&mut self, id: u64, code: ErrorCode) {
        self.send(
            id,
            ResponseBody::Error(ErrorReply {
                code,
                message: format!("test says {code}"),
                holders: vec![],
                leader_id: None,
                servers: vec![],
            }),
        )
        .await;
    }

    /// Expect HELLO and answer HELLO_OK.
    async fn hello(&mut self, cluster: u128, resumed: bool, held: Vec<HeldLock>) -> Hello {
        let req = self.recv().await;
        let RequestBody::Hello(hello) = req.body else {
            panic!("expected HELLO, got {req:?}");
        };
        self.send(
            req.id,
            ResponseBody::HelloOk(HelloOk {
                protocol_version: 1,
                cluster_id: cluster,
                resumed,
                session_timeout_ms: hello.session_timeout_ms.unwrap_or(15_000),
                node_id: 1,
                site: "test-site".into(),
                config_version: 3,
                held,
                waits: vec![],
                servers: vec![],
            }),
        )
        .await;
        hello
    }
}

/// Wait (in virtual time) until `cond` holds: the client's task runs
/// concurrently with the test script.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("never happened: {what}");
}

fn config(endpoints: &[&str]) -> ClientConfig {
    let mut c = ClientConfig::new(
        endpoints.iter().copied(),
        "unused-ca",
        "unused-cert",
        "unused-key",
    );
    c.session_timeout = Duration::from_secs(3);
    c.request_timeout = Duration::from_secs(2);
    c.connect_timeout = Duration::from_secs(1);
    c.reconnect_backoff_min = Duration::from_millis(50);
    c.reconnect_backoff_max = Duration::from_millis(400);
    // The scripted peers expect only the connections they script: no
    // probe connections (the fake-cluster tests turn probing on).
    c.probe_interval = Duration::ZERO;
    c
}

type Accepts = mpsc::UnboundedReceiver<(String, DuplexStream)>;

/// A connected client and the peer of its connection.
async fn connected(endpoints: &[&str]) -> (Client, Peer, Arc<MockNet>, Accepts) {
    let (net, mut accepts) = MockNet::new();
    let connect = tokio::spawn(Client::connect_with(config(endpoints), net.clone()));
    let mut peer = Peer::accept(&mut accepts).await;
    peer.hello(CLUSTER, false, vec![]).await;
    let client = connect.await.unwrap().unwrap();
    (client, peer, net, accepts)
}

fn held(name: &str, token: u64) -> HeldLock {
    HeldLock {
        zone: "z".into(),
        name: name.into(),
        token,
        mode: Mode::Exclusive,
        kind: Kind::Connection,
    }
}

fn granted(token: u64) -> OkReply {
    OkReply {
        token: Some(token),
        ..OkReply::default()
    }
}

/// Take a connection lock `name` with `token` through the peer.
async fn take(client: &Client, peer: &mut Peer, name: &str, token: u64) -> crate::LockGuard {
    let c = client.clone();
    let name2 = name.to_owned();
    let acquire = tokio::spawn(async move { c.lock("z", name2).try_once().acquire().await });
    let req = peer.recv_op().await;
    assert!(matches!(&req.body, RequestBody::Lock(l) if l.name == name));
    peer.ok(req.id, granted(token)).await;
    acquire.await.unwrap().unwrap()
}

#[tokio::test(start_paused = true)]
async fn hello_carries_the_client_id_and_timeout() {
    let (net, mut accepts) = MockNet::new();
    let mut cfg = config(&["a:1"]);
    let dir = tempfile::tempdir().unwrap();
    cfg.client_id_file = Some(dir.path().join("id"));
    let connect = tokio::spawn(Client::connect_with(cfg, net.clone()));
    let mut peer = Peer::accept(&mut accepts).await;
    let hello = peer.hello(CLUSTER, false, vec![]).await;
    let client = connect.await.unwrap().unwrap();
    assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
    assert_eq!(hello.session_timeout_ms, Some(3000));
    assert_eq!(hello.client_id, client.client_id());
    let stored = std::fs::read_to_string(dir.path().join("id")).unwrap();
    assert_eq!(stored.trim(), format!("{:032x}", client.client_id()));
    assert_eq!(client.cluster_id(), CLUSTER);
    let s = client.session();
    assert!(s.connected);
    assert_eq!(s.endpoint.as_deref(), Some("a:1"));
    assert_eq!(s.site.as_deref(), Some("test-site"));
    assert_eq!(s.session_timeout, Duration::from_secs(3));
    assert!(s.lease_remaining.is_some());
}

/// Replies arrive out of order and each reaches its own caller.
#[tokio::test(start_paused = true)]
async fn pipelined_requests_are_matched_by_id() {
    let (client, mut peer, _net, _acc) = connected(&["a:1"]).await;
    let mut calls = Vec::new();
    for i in 0..3u64 {
        let c = client.clone();
        calls.push(tokio::spawn(async move {
            c.check_token("z", &format!("n{i}"), i).await
        }));
    }
    let mut reqs = Vec::new();
    for _ in 0..3 {
        reqs.push(peer.recv_op().await);
    }
    let ids: HashSet<u64> = reqs.iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), 3);
    assert!(!ids.contains(&0));
    // Answer in reverse order: token i is current iff i is even.
    for r in reqs.iter().rev() {
        let RequestBody::CheckToken(ct) = &r.body else {
            panic!("{r:?}")
        };
        let ok = OkReply {
            token_current: Some(ct.token % 2 == 0),
            ..OkReply::default()
        };
        peer.ok(r.id, ok).await;
    }
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), i % 2 == 0);
    }
}

#[tokio::test(start_paused = true)]
async fn lock_waits_through_queued_then_releases() {
    let (client, mut peer, _net, _acc) = connected(&["a:1"]).await;
    let c = client.clone();
    let acquire = tokio::spawn(async move {
        c.lock("z", "n")
            .shared()
            .ttl(Duration::from_secs(30))
            .wait(Duration::from_secs(5))
            .lock_delay(Duration::from_millis(1500))
            .acquire()
            .await
    });
    let req = peer.recv_op().await;
    let RequestBody::Lock(l) = &req.body else {
        panic!("{req:?}")
    };
    assert_eq!((l.mode, l.kind), (Mode::Shared, Kind::Connection));
    assert_eq!((l.ttl_ms, l.wait_ms, l.lock_delay_ms), (30_000, 5000, 1500));
    // Each acquire is its own owner by default: a fresh, non-zero id.
    assert_ne!(l.owner_id, 0);
    assert!(l.nonce > 0 && l.low_water <= l.nonce && l.low_water > 0);
    assert!(l.owner_sig.is_none());
    peer.send(req.id, ResponseBody::Queued { position: 2 })
        .await;
    peer.idle(Duration::from_secs(3)).await;
    assert!(!acquire.is_finished(), "QUEUED is not final");
    let ok = OkReply {
        token: Some(77),
        expires_in_ms: Some(30_000),
        ..OkReply::default()
    };
    peer.ok(req.id, ok).await;
    let guard = acquire.await.unwrap().unwrap();
    assert_eq!((guard.token(), guard.zone(), guard.name()), (77, "z", "n"));
    assert_eq!(guard.mode(), Mode::Shared);
    assert_eq!(guard.expires_in(), Some(Duration::from_secs(30)));
    assert!(!guard.is_lost());

    let release = tokio::spawn(guard.release());
    let req = peer.recv_op().await;
    assert!(matches!(&req.body, RequestBody::Release(r) if r.token == 77 && r.owner_sig.is_none()));
    peer.ok(
        req.id,
        OkReply {
            already_released: true,
            ..OkReply::default()
        },
    )
    .await;
    let outcome = release.await.unwrap().unwrap();
    assert!(outcome.already_released);
}

#[tokio::test(start_paused = true)]
async fn refused_lock_reports_the_holder() {
    let (client, mut peer, _net, _acc) = connected(&["a:1"]).await;
    let c = client.clone();
    let acquire = tokio::spawn(async move { c.lock("z", "n").try_once().acquire().await });
    let req = peer.recv_op().await;
    assert!(matches!(&req.body, RequestBody::Lock(l) if l.wait_ms == 0));
    let holder = oclocks_proto::Holder {
        identity: "svc-a".into(),
        token: 5,
        mode: Mode::Exclusive,
        kind: Kind::Connection,
        held_ms: 1500,
        expires_in_ms: None,
    };
    peer.send(
        req.id,
        ResponseBody::Error(ErrorReply {
            code: ErrorCode::Locked,
            message: "held".into(),
            holders: vec![holder.clone()],
            leader_id: None,
            servers: vec![],
        }),
    )
    .await;
    let err = acquire.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, Error::Locked { holders, .. } if holders == &vec![holder]),
        "{err:?}"
    );
    // A final refusal needs no CANCEL: the next request is the next LOCK,
    // and the refused nonce is retired (low-water moved past it).
    let LockNonce(refused) = LockNonce::of(&req);
    let c = client.clone();
    let _next = tokio::spawn(async move { c.lock("z", "m").try_once().acquire().await });
    let req = peer.recv_op().await;
    let RequestBody::Lock(l) = &req.body else {
        panic!("expected the next LOCK, got {req:?}")
    };
    assert!(l.nonce > refused && l.low_water > refused);
}

struct LockNonce(u64);
impl LockNonce {
    fn of(req: &Request) -> LockNonce {
        match &req.body {
            RequestBody::Lock(l) => LockNonce(l.nonce),
            other => panic!("not a LOCK: {other:?}"),
        }
    }
}

/// A dropped acquire sends CANCEL with its nonce; the nonce stays
/// outstanding (low-water below it) until the CANCEL is acknowledged.
#[tokio::test(start_paused = true)]
async fn dropped_acquire_cancels_its_wait() {
    let (client, mut peer, _net, _acc) = connected(&["a:1"]).await;
    let c = client.clone();
    let acquire = tokio::spawn(async move { c.lock("z", "n").acquire().await });
    let req = peer.recv_op().await;
    let RequestBody::Lock(l) = &req.body else {
        panic!("{req:?}")
    };
    assert_eq!(l.wait_ms, WAIT_FOREVER);
    let nonce = l.nonce;
    peer.send(req.id, ResponseBody::Queued { position: 1 })
        .await;
    acquire.abort();
    let cancel = peer.recv_op().await;
    assert_eq!(cancel.body, RequestBody::Cancel { nonce });
    assert_eq!(lock(&client.inner_shared().nonces).low_water(), nonce);
    // The server answers the LOCK CANCELLED and the CANCEL OK (it could
    // also have granted just before: then the CANCEL gives it back).
    peer.error(req.id, ErrorCode::Cancelled).await;
    peer.ok(cancel.id, OkReply::default()).await;
    let c = client.clone();
    let _next = tokio::spawn(async move { c.lock("z", "m").try_once().acquire().await });
    let req = peer.recv_op().await;
    let RequestBody::Lock(l) = &req.body else {
        panic!("{req:?}")
    };
    assert!(l.low_water > nonce, "the cancelled nonce is retired");
}

/// An acquire whose wait bound passes without a final reply gives up
/// locally, cancels, and says so.
#[tokio::test(start_paused = true)]
async fn local_acquire_timeout_cancels() {
    let (client, mut peer, _net, _acc) = connected(&["a:1"]).await;
    let c = client.clone();
    let acquire = tokio::spawn(async move {
        c.lock("z", "n")
            .wait(Duration::from_secs(1))
            .acquire()
            .await
    });
    let req = peer.recv_op().await;
    let LockNonce(nonce) = LockNonce::of(&req);
    // No reply at all: after wait (1 s) + request timeout (2 s).
    let cancel = peer.recv_op().await;
    assert_eq!(cancel.body, RequestBody::Cancel { nonce });
    let err = acquire.await.unwrap().unwrap_err();
    assert!(
        matches!(err, Error::AcquireTimeout { waited } if waited >= Duration::from_secs(3)),
        "{err:?}"
    );
    assert!(err.is_conflict());
}

#[tokio::test(start_paused = true)]
async fn dropped_guard_releases_in_the_background() {
    let (client, mut peer, _net, _acc) = connected(&["a:1"]).await;
    let guard = take(&client, &mut peer, "n", 9).await;
    drop(guard);
    let req = peer.recv_op().await;
    assert!(matches!(&req.body, RequestBody::Release(r) if r.token == 9 && r.name == "n"));
    peer.ok(req.id, OkReply::default()).await;
    // keep() leaves the grant alone.
    let guard = take(&client, &mut peer, "k", 10).await;
    let grant = guard.keep();
    assert_eq!(grant.token, 10);
    let probe = {
        let c = client.clone();
        tokio::spawn(async move { c.query("z", "probe").await })
    };
    let req = peer.recv_op().await;
    assert!(
        matches!(&req.body, RequestBody::Query(_)),
        "no RELEASE after keep(): {req:?}"
    );
    peer.ok(req.id, OkReply::default()).await;
    let state = probe.await.unwrap().unwrap();
    assert_eq!((state.holders.len(), state.waiters), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn lost_event_fires_the_guard_and_drop_sends_nothing() {
    let (client, mut peer, _net, _acc) = connected(&["a:1"]).await;
    let guard = take(&client, &mut peer, "n", 11).await;
    let other = take(&client, &mut peer, "o", 12).await;
    let lost = guard.lost();
    peer.send(
        0,
        ResponseBody::Lost(oclocks_proto::Lost {
            zone: "z".into(),
            name: "n".into(),
            token: 11,
            reason: WireLost::Broken,
        }),
    )
    .await;
    assert_eq!(lost.await, LostReason::Broken);
    assert_eq!(guard.lost_reason(), Some(LostReason::Broken));
    assert!(!other.is_lost());
    drop(guard);
    let release = tokio::spawn(other.release());
    let req = peer.recv_op().await;
    assert!(
        matches!(&req.body, RequestBody::Release(r) if r.token == 12),
        "no RELEASE for the lost grant: {req:?}"
    );
    peer.ok(req.id, OkReply::default()).await;
    release.await.unwrap().unwrap();
}

/// The connection drops with a LOCK in flight. The client reconnects,
/// HELLO says the session was resumed and lists one of the two held
/// grants: the other guard fires, and the LOCK is resent with the same
/// nonce.
#[tokio::test(start_paused = true)]
async fn reconnect_resends_lock_and_fires_unlisted_guards() {
    let (client, mut peer, _net, mut accepts) = connected(&["a:1", "b:1"]).await;
    let kept = take(&client, &mut peer, "kept", 1).await;
    let gone = take(&client, &mut peer, "gone", 2).await;
    let c = client.clone();
    let acquire = tokio::spawn(async move { c.lock("z", "c").acquire().await });
    let first = peer.recv_op().await;
    let LockNonce(nonce) = LockNonce::of(&first);
    drop(peer);

    let mut peer = Peer::accept(&mut accepts).await;
    let hello = peer.hello(CLUSTER, true, vec![held("kept", 1)]).await;
    assert_eq!(
        hello.client_id,
        client.client_id(),
        "same client id after reconnect"
    );
    let again = peer.recv_op().await;
    assert_eq!(
        LockNonce::of(&again).0,
        nonce,
        "the same nonce: idempotent retry"
    );
    assert_eq!(gone.lost().await, LostReason::NotHeld);
    assert!(!kept.is_lost());
    peer.ok(again.id, granted(3)).await;
    let guard = acquire.await.unwrap().unwrap();
    assert_eq!(guard.token(), 3);
    let s = client.session();
    assert_eq!(s.connects, 2);
    assert_eq!(s.new_sessions, 1);
    std::mem::forget(guard); // keep the test's peer script short
    std::mem::forget(kept);
    drop(gone);
}

#[tokio::test(start_paused = true)]
async fn new_session_fires_connection_guards_not_static_ones() {
    let (client, mut peer, _net, mut accepts) = connected(&["a:1"]).await;
    let conn_guard = take(&client, &mut peer, "c", 1).await;
    let c = client.clone();
    let acquire =
        tokio::spawn(async move { c.lock("z", "s").static_lock().try_once().acquire().await });
    let req = peer.recv_op().await;
    peer.ok(req.id, granted(2)).await;
    let static_guard = acquire.await.unwrap().unwrap();
    assert_eq!(static_guard.kind(), Kind::Static);
    drop(peer);
    let mut peer = Peer::accept(&mut accepts).await;
    peer.hello(CLUSTER, false, vec![]).await;
    assert_eq!(conn_guard.lost().await, LostReason::SessionNotResumed);
    assert!(!static_guard.is_lost(), "static locks outlive sessions");
    assert_eq!(client.session().new_sessions, 2);
    drop(conn_guard);
    // Dropping the lost connection guard sends nothing; the static one
    // releases (signed).
    drop(static_guard);
    let req = peer.recv_op().await;
    assert!(
        matches!(&req.body, RequestBody::Release(r) if r.token == 2 && r.owner_sig.is_some()),
        "{req:?}"
    );
}

/// Keepalives go out every timeout/3 and move the lease; with them
/// unanswered the lease runs out at send time + timeout − margin, while the
/// client is still trying to reconnect.
#[tokio::test(start_paused = true)]
async fn lease_runs_out_without_acknowledged_keepalives() {
    let (client, mut peer, _net, mut accepts) = connected(&["a:1"]).await;
    let guard = take(&client, &mut peer, "n", 1).await;
    // Answer keepalives for a while: the guard stays held.
    let start = Instant::now();
    let mut keepalives = 0;
    while start.elapsed() < Duration::from_secs(10) {
        let req = peer.recv().await;
        assert_eq!(req.body, RequestBody::Keepalive);
        keepalives += 1;
        peer.ok(req.id, OkReply::default()).await;
    }
    assert!(
        (9..=11).contains(&keepalives),
        "{keepalives} keepalives in 10 s at 1 s intervals"
    );
    assert!(!guard.is_lost());
    let remaining = client.session().lease_remaining.unwrap();
    assert!(
        remaining > Duration::from_secs(1) && remaining <= Duration::from_millis(2500),
        "{remaining:?}"
    );

    // Now stop answering. The last acknowledged keepalive was sent at most
    // one interval ago, so the lease (2.5 s after it) runs out within 2.5 s.
    let silent_from = Instant::now();
    let lost = guard.lost();
    let script = tokio::spawn(async move {
        // Swallow keepalives; then refuse to answer the reconnect's HELLO.
        while let Some(Ok(_)) = peer.io.next().await {}
        let mut next = Peer::accept(&mut accepts).await;
        let _hello = next.recv().await;
        std::future::pending::<()>().await;
    });
    assert_eq!(lost.await, LostReason::LeaseExpired);
    let after = silent_from.elapsed();
    assert!(after <= Duration::from_millis(2500), "{after:?}");
    assert!(after >= Duration::from_millis(1400), "{after:?}");
    assert_eq!(client.session().lease_remaining, None);
    script.abort();
}

/// KEEPALIVE answered NO_SESSION: connection guards fire at once and the
/// client opens a new session.
#[tokio::test(start_paused = true)]
async fn no_session_on_keepalive_ends_connection_locks() {
    let (client, mut peer, _net, mut accepts) = connected(&["a:1"]).await;
    let guard = take(&client, &mut peer, "n", 1).await;
    let req = peer.recv().await;
    assert_eq!(req.body, RequestBody::Keepalive);
    peer.error(req.id, ErrorCode::NoSession).await;
    assert_eq!(guard.lost().await, LostReason::SessionExpired);
    let mut peer = Peer::accept(&mut accepts).await;
    peer.hello(CLUSTER, false, vec![]).await;
    drop(guard); // ended: no RELEASE
    let q = {
        let c = client.clone();
        tokio::spawn(async move { c.query("z", "n").await })
    };
    let req = peer.recv_op().await;
    assert!(matches!(req.body, RequestBody::Query(_)), "{req:?}");
    peer.ok(req.id, OkReply::default()).await;
    q.await.unwrap().unwrap();
}

/// A reconnect that lands on another cluster is refused; the client keeps
/// trying and takes the right one.
#[tokio::test(start_paused = true)]
async fn another_cluster_is_refused() {
    let (client, peer, _net, mut accepts) = connected(&["a:1", "b:1"]).await;
    drop(peer);
    let mut wrong = Peer::accept(&mut accepts).await;
    wrong.hello(OTHER_CLUSTER, false, vec![]).await;
    // The client drops that connection and dials again.
    let mut right = Peer::accept(&mut accepts).await;
    assert!(
        wrong.io.next().await.is_none(),
        "the wrong cluster's connection is closed"
    );
    right.hello(CLUSTER, true, vec![]).await;
    eventually("reconnected", || client.session().connected).await;
    assert_eq!(
        client.session().connects,
        2,
        "the refused server does not count"
    );
    let q = {
        let c = client.clone();
        tokio::spawn(async move { c.status().await })
    };
    let req = right.recv_op().await;
    assert_eq!(req.body, RequestBody::Status);
    right.error(req.id, ErrorCode::Unavailable).await;
    assert!(matches!(q.await.unwrap(), Err(Error::Unavailable { .. })));
    assert!(
        client
            .session()
            .last_error
            .unwrap_or_default()
            .contains("belongs to cluster"),
        "the mismatch is reported"
    );
}

#[tokio::test(start_paused = true)]
async fn first_connect_fails_over_and_reports_every_endpoint() {
    let (net, mut accepts) = MockNet::new();
    net.refuse("a:1", true);
    let connect = tokio::spawn(Client::connect_with(config(&["a:1", "b:1"]), net.clone()));
    let mut peer = Peer::accept(&mut accepts).await;
    assert_eq!(peer.endpoint, "b:1");
    peer.hello(CLUSTER, false, vec![]).await;
    let client = connect.await.unwrap().unwrap();
    assert_eq!(client.session().endpoint.as_deref(), Some("b:1"));

    net.refuse("b:1", true);
    let err = Client::connect_with(config(&["a:1", "b:1"]), net.clone())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("a:1") && text.contains("b:1"), "{text}");
    let err = Client::connect_with(config(&["a:1"]), net.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Connect { .. }),
        "one endpoint: its own error: {err:?}"
    );
}

/// HELLO refused with NOT_LEADER (an election) is asked again with the
/// reconnect backoff until a server takes the session; when it never does,
/// `connect` fails after about `connect_timeout`, not at the first refusal.
#[tokio::test(start_paused = true)]
async fn connect_rides_through_an_election() {
    let (net, mut accepts) = MockNet::new();
    let connect = tokio::spawn(Client::connect_with(config(&["a:1", "b:1"]), net.clone()));
    // Two rounds over both servers, every HELLO refused.
    for _ in 0..4 {
        let mut peer = tokio::time::timeout(Duration::from_secs(10), Peer::accept(&mut accepts))
            .await
            .expect("the client asks again after NOT_LEADER");
        let req = peer.recv().await;
        peer.error(req.id, ErrorCode::NotLeader).await;
    }
    let mut peer = Peer::accept(&mut accepts).await;
    peer.hello(CLUSTER, false, vec![]).await;
    let client = connect.await.unwrap().unwrap();
    assert!(client.session().endpoint.is_some());

    // Never a leader: given up after connect_timeout (1 s here).
    let started = tokio::time::Instant::now();
    let connect = tokio::spawn(Client::connect_with(config(&["a:1"]), net.clone()));
    let refuse = tokio::spawn(async move {
        while let Some((endpoint, io)) = accepts.recv().await {
            let mut peer = Peer {
                endpoint,
                io: Framed::new(io, RequestCodec::default()),
            };
            let req = peer.recv().await;
            peer.error(req.id, ErrorCode::NotLeader).await;
        }
    });
    let err = connect.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::NotLeader { .. }), "{err:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took <= Duration::from_millis(1500),
        "gave up after {took:?}"
    );
    refuse.abort();
}

/// The reconnect delay is capped at a quarter of the session timeout: a
/// client whose servers were all away comes back well within its session's
/// timeout (2 s here: rounds at most 500 ms apart, though
/// `reconnect_backoff_max` is 5 s).
#[tokio::test(start_paused = true)]
async fn reconnect_rounds_stay_within_a_quarter_of_the_session_timeout() {
    let (net, mut accepts) = MockNet::new();
    let mut cfg = config(&["a:1"]);
    cfg.session_timeout = Duration::from_secs(2);
    cfg.reconnect_backoff_max = Duration::from_secs(5);
    let connect = tokio::spawn(Client::connect_with(cfg, net.clone()));
    let mut peer = Peer::accept(&mut accepts).await;
    peer.hello(CLUSTER, false, vec![]).await;
    let _client = connect.await.unwrap().unwrap();
    // The server goes away; every later connection is dropped before HELLO.
    drop(peer);
    let mut last = Instant::now();
    let mut gaps = Vec::new();
    for _ in 0..10 {
        let (_, io) = accepts.recv().await.expect("the client dials again");
        gaps.push(last.elapsed());
        last = Instant::now();
        drop(io);
    }
    assert!(
        gaps.iter().all(|g| *g <= Duration::from_millis(500)),
        "rounds {gaps:?} apart"
    );
}

/// A server that never answers HELLO is given up after connect_timeout.
#[tokio::test(start_paused = true)]
async fn silent_server_times_out_at_connect() {
    let (net, mut accepts) = MockNet::new();
    let connect = tokio::spawn(Client::connect_with(config(&["a:1"]), net.clone()));
    let _peer = Peer::accept(&mut accepts).await;
    let err = connect.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("no HELLO_OK"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn hello_refused_is_reported() {
    let (net, mut accepts) = MockNet::new();
    let connect = tokio::spawn(Client::connect_with(config(&["a:1"]), net.clone()));
    let mut peer = Peer::accept(&mut accepts).await;
    let req = peer.recv().await;
    peer.error(req.id, ErrorCode::Forbidden).await;
    let err = connect.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Forbidden { .. }), "{err:?}");
}

/// A session of an earlier process with the same client id is closed, and
/// a new one opened.
#[tokio::test(start_paused = true)]
async fn resumed_session_at_startup_is_closed_first() {
    let (net, mut accepts) = MockNet::new();
    let connect = tokio::spawn(Client::connect_with(config(&["a:1"]), net.clone()));
    let mut peer = Peer::accept(&mut accepts).await;
    peer.hello(CLUSTER, true, vec![held("orphan", 5)]).await;
    let req = peer.recv().await;
    assert_eq!(req.body, RequestBody::Close);
    peer.ok(req.id, OkReply::default()).await;
    let mut peer = Peer::accept(&mut accepts).await;
    peer.hello(CLUSTER, false, vec![]).await;
    let client = connect.await.unwrap().unwrap();
    assert!(client.session().connected);
}

/// BREAK without a token is not safe to resend: a lost connection makes it
/// indeterminate. A request nobody answers times out as indeterminate; one
/// that could not be sent says so.
#[tokio::test(start_paused = true)]
async fn unknown_outcomes_are_explicit() {
    let (client, mut peer, net, mut accepts) = connected(&["a:1"]).await;
    let c = client.clone();
    let brk = tokio::spawn(async move { c.break_lock("z", "n", None).await });
    let req = peer.recv_op().await;
    assert!(matches!(&req.body, RequestBody::Break(b) if b.token.is_none()));
    drop(peer);
    let err = brk.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Indeterminate {
                action: "BREAK",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_indeterminate());

    let mut peer = Peer::accept(&mut accepts).await;
    peer.hello(CLUSTER, true, vec![]).await;
    let c = client.clone();
    let q = tokio::spawn(async move { c.query("z", "n").await });
    let _unanswered = peer.recv_op().await;
    let err = q.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Indeterminate {
                action: "QUERY",
                ..
            }
        ),
        "{err:?}"
    );

    // Now no server is reachable: requests are not sent at all.
    net.refuse("a:1", true);
    drop(peer);
    eventually("disconnected", || !client.session().connected).await;
    let err = client.query("z", "n").await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::NotSent {
                action: "QUERY",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("refused"), "{err}");
    // ... and a request that was not sent is never sent later.
    net.refuse("a:1", false);
    let mut peer = Peer::accept(&mut accepts).await;
    peer.hello(CLUSTER, true, vec![]).await;
    let c = client.clone();
    let s = tokio::spawn(async move { c.status().await });
    let req = peer.recv_op().await;
    assert_eq!(
        req.body,
        RequestBody::Status,
        "the abandoned QUERY was dropped"
    );
    peer.error(req.id, ErrorCode::Internal).await;
    assert!(s.await.unwrap().unwrap_err().is_indeterminate());
}

/// Idempotent requests in flight when the connection drops are resent on
/// the next one, in order, and succeed.
#[tokio::test(start_paused = true)]
async fn safe_requests_are_resent_after_reconnect() {
    let (client, mut peer, _net, mut accepts) = connected(&["a:1"]).await;
    let mut calls = Vec::new();
    for i in 0..3u64 {
        let c = client.clone();
        calls.push(tokio::spawn(
            async move { c.check_token("z", "n", i).await },
        ));
    }
    for _ in 0..3 {
        peer.recv_op().await;
    }
    drop(peer);
    let mut peer = Peer::accept(&mut accepts).await;
    peer.hello(CLUSTER, true, vec![]).await;
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let req = peer.recv_op().await;
        let RequestBody::CheckToken(ct) = &req.body else {
            panic!("{req:?}")
        };
        tokens.push(ct.token);
        peer.ok(
            req.id,
            OkReply {
                token_current: Some(true),
                ..OkReply::default()
            },
        )
        .await;
    }
    tokens.sort_unstable();
    assert_eq!(tokens, vec![0, 1, 2]);
    for call in calls {
        assert!(call.await.unwrap().unwrap());
    }
}

/// A request that is safe to repeat and is answered "not now"
/// (`UNAVAILABLE`, `NOT_LEADER`) is sent again until it gets a definite
/// answer: a background RELEASE, a CANCEL, and a caller's LOCK (same
/// nonce, which stays outstanding meanwhile). Otherwise the grant or wait
/// would stay behind in the live session.
#[tokio::test(start_paused = true)]
async fn not_now_answers_are_retried_for_safe_requests() {
    let (client, mut peer, _net, _acc) = connected(&["a:1"]).await;
    // A dropped guard's RELEASE.
    let guard = take(&client, &mut peer, "n", 9).await;
    drop(guard);
    let first = peer.recv_op().await;
    peer.error(first.id, ErrorCode::Unavailable).await;
    let second = peer.recv_op().await;
    assert_eq!(second.body, first.body, "the same RELEASE again");
    peer.error(second.id, ErrorCode::NotLeader).await;
    let third = peer.recv_op().await;
    assert_eq!(third.body, first.body);
    peer.ok(third.id, OkReply::default()).await;

    // A caller's LOCK: resent with its nonce, which is not retired before
    // the definite answer.
    let c = client.clone();
    let acquire = tokio::spawn(async move { c.lock("z", "m").try_once().acquire().await });
    let req = peer.recv_op().await;
    let LockNonce(nonce) = LockNonce::of(&req);
    peer.error(req.id, ErrorCode::NotLeader).await;
    let again = peer.recv_op().await;
    assert_eq!(LockNonce::of(&again).0, nonce, "the retry keeps the nonce");
    assert_eq!(lock(&client.inner_shared().nonces).low_water(), nonce);
    peer.ok(again.id, granted(21)).await;
    let guard = acquire.await.unwrap().unwrap();
    assert_eq!(guard.token(), 21);

    // An abandoned acquire's CANCEL.
    let (req, nonce, cancel) = abandon_a_queued_acquire(&client, &mut peer).await;
    peer.error(cancel.id, ErrorCode::Unavailable).await;
    let cancel2 = peer.recv_op().await;
    assert_eq!(cancel2.body, RequestBody::Cancel { nonce });
    peer.error(req.id, ErrorCode::Cancelled).await;
    peer.ok(cancel2.id, OkReply::default()).await;
    peer.idle(Duration::from_secs(3)).await;
    drop(guard);
}

/// An acquire of z/w answered QUEUED, then dropped by its caller: returns
/// its LOCK, the LOCK's nonce and the CANCEL the client sent for it.
async fn abandon_a_queued_acquire(client: &Client, peer: &mut Peer) -> (Request, u64, Request) {
    let c = client.clone();
    let acquire = tokio::spawn(async move { c.lock("z", "w").acquire().await });
    let req = peer.recv_op().await;
    let LockNonce(nonce) = LockNonce::of(&req);
    peer.send(req.id, ResponseBody::Queued { position: 1 })
        .await;
    acquire.abort();
    let cancel = peer.recv_op().await;
    assert_eq!(cancel.body, RequestBody::Cancel { nonce });
    (req, nonce, cancel)
}

/// A CANCEL answered `LIMIT` (the server's `requests_in_flight_max`, or
/// `outcomes_per_session_max` when the LOCK has not arrived) did nothing:
/// it is sent again, and its nonce stays outstanding until it is answered.
/// Dropped, the LOCK behind it could be granted to nobody.
#[tokio::test(start_paused = true)]
async fn a_cancel_answered_limit_is_sent_again() {
    let (client, mut peer, _net, _acc) = connected(&["a:1"]).await;
    let (req, nonce, cancel) = abandon_a_queued_acquire(&client, &mut peer).await;
    peer.error(cancel.id, ErrorCode::Limit).await;
    // Retried within the backoff's 1 s cap (simulated time).
    let again = tokio::time::timeout(Duration::from_secs(5), peer.recv_op())
        .await
        .expect("the CANCEL is sent again");
    assert_eq!(
        again.body,
        RequestBody::Cancel { nonce },
        "the CANCEL again"
    );
    assert!(
        lock(&client.inner_shared().nonces).low_water() <= nonce,
        "the nonce is not retired before the CANCEL is answered"
    );
    peer.error(req.id, ErrorCode::Cancelled).await;
    peer.ok(again.id, OkReply::default()).await;
    peer.idle(Duration::from_secs(3)).await;
}

/// An acquire that gave up locally (its CANCEL is on its way) and whose
/// LOCK is then answered "not now" by a server: that LOCK may still have
/// been granted, so its nonce stays outstanding — the next LOCK's low-water
/// mark stays at or below it — until the CANCEL is answered; only then can
/// the server forget the grant the CANCEL gives back.
#[tokio::test(start_paused = true)]
async fn an_abandoned_lock_answered_not_now_keeps_its_nonce_until_the_cancel() {
    let (client, mut peer, _net, _acc) = connected(&["a:1"]).await;
    let c = client.clone();
    let acquire = tokio::spawn(async move {
        c.lock("z", "n")
            .wait(Duration::from_secs(1))
            .acquire()
            .await
    });
    let req = peer.recv_op().await;
    let LockNonce(nonce) = LockNonce::of(&req);
    // No reply: the caller gives up after wait + request timeout.
    let cancel = peer.recv_op().await;
    assert_eq!(cancel.body, RequestBody::Cancel { nonce });
    assert!(acquire.await.unwrap().is_err());
    peer.error(req.id, ErrorCode::NotLeader).await;
    // Another acquire meanwhile: its low-water mark must not pass the nonce.
    let c = client.clone();
    let next = tokio::spawn(async move { c.lock("z", "m").try_once().acquire().await });
    let req2 = peer.recv_op().await;
    let RequestBody::Lock(l2) = &req2.body else {
        panic!("{req2:?}")
    };
    assert!(
        l2.low_water <= nonce,
        "low-water {} passed the abandoned nonce {nonce}",
        l2.low_water
    );
    peer.ok(req2.id, granted(5)).await;
    let _guard = next.await.unwrap().unwrap();
    // The CANCEL's answer retires it.
    peer.ok(cancel.id, OkReply::default()).await;
    let c = client.clone();
    let _third = tokio::spawn(async move { c.lock("z", "k").try_once().acquire().await });
    let req3 = peer.recv_op().await;
    let RequestBody::Lock(l3) = &req3.body else {
        panic!("{req3:?}")
    };
    assert!(
        l3.low_water > nonce,
        "retired after the CANCEL: {}",
        l3.low_water
    );
}

/// A grant whose reply arrives after its TTL can no longer be believed
/// (the reply took longer than the TTL minus the margin) is not handed out:
/// the acquire fails with `Lost` and the grant is released in the
/// background — another client may already hold the lock.
#[tokio::test(start_paused = true)]
async fn a_grant_whose_ttl_ran_out_before_the_reply_is_not_handed_out() {
    let (client, mut peer, _net, _acc) = connected(&["a:1"]).await;
    let c = client.clone();
    let acquire = tokio::spawn(async move {
        c.lock("z", "n")
            .ttl(Duration::from_secs(2))
            .wait(Duration::from_secs(10))
            .acquire()
            .await
    });
    let req = peer.recv_op().await;
    peer.idle(Duration::from_secs(3)).await;
    peer.ok(
        req.id,
        OkReply {
            token: Some(44),
            expires_in_ms: Some(2000),
            ..OkReply::default()
        },
    )
    .await;
    let err = acquire.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Lost {
                reason: Some(crate::LostReason::TtlExpired),
                ..
            }
        ),
        "{err:?}"
    );
    let release = peer.recv_op().await;
    assert!(
        matches!(&release.body, RequestBody::Release(r) if r.token == 44),
        "{release:?}"
    );
}

/// A request that is not safe to repeat (an admin's REMOVE_SERVER) gets
/// the "not now" answer as its error, at once.
#[tokio::test(start_paused = true)]
async fn not_now_is_reported_for_unsafe_requests() {
    let (client, mut peer, _net, _acc) = connected(&["a:1"]).await;
    let c = client.clone();
    let call = tokio::spawn(async move { c.remove_server(3).await });
    let req = peer.recv_op().await;
    assert!(
        matches!(req.body, RequestBody::RemoveServer { .. }),
        "{req:?}"
    );
    peer.error(req.id, ErrorCode::NotLeader).await;
    let err = call.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::NotLeader { .. }), "{err:?}");
    peer.idle(Duration::from_secs(2)).await;
}

/// Static locks: LOCK, REFRESH and RELEASE carry the owner key and a
/// signature over the canonical message, with strictly increasing counters.
#[tokio::test(start_paused = true)]
async fn static_locks_are_signed() {
    let (client, mut peer, _net, _acc) = connected(&["a:1"]).await;
    let key = VerifyingKey::from_bytes(&client.owner_public_key()).unwrap();
    let verify = |op, name: &str, value, ttl, sig: &oclocks_proto::OwnerSig| {
        assert_eq!(sig.public_key, client.owner_public_key());
        let msg = signed_message(
            &CLUSTER.to_be_bytes(),
            op,
            "z",
            name,
            value,
            ttl,
            sig.counter,
        );
        key.verify_strict(&msg, &Signature::from_bytes(&sig.signature))
            .expect("signature verifies");
    };
    let c = client.clone();
    let acquire = tokio::spawn(async move {
        c.lock("z", "s")
            .static_lock()
            .ttl(Duration::from_secs(60))
            .try_once()
            .acquire()
            .await
    });
    let req = peer.recv_op().await;
    let RequestBody::Lock(l) = &req.body else {
        panic!("{req:?}")
    };
    assert_eq!(l.kind, Kind::Static);
    let lock_sig = l.owner_sig.clone().expect("signed");
    verify(SigOp::Lock, "s", l.nonce, 60_000, &lock_sig);
    peer.ok(
        req.id,
        OkReply {
            token: Some(500),
            expires_in_ms: Some(60_000),
            ..OkReply::default()
        },
    )
    .await;
    let mut guard = acquire.await.unwrap().unwrap();
    assert!(guard.is_key_owned());

    let refresh = tokio::spawn(async move {
        let r = guard.refresh(Duration::from_secs(90)).await;
        (guard, r)
    });
    let req = peer.recv_op().await;
    let RequestBody::Refresh(r) = &req.body else {
        panic!("{req:?}")
    };
    let refresh_sig = r.owner_sig.clone().expect("signed");
    verify(SigOp::Refresh, "s", 500, 90_000, &refresh_sig);
    assert!(refresh_sig.counter > lock_sig.counter);
    peer.ok(
        req.id,
        OkReply {
            expires_in_ms: Some(90_000),
            ..OkReply::default()
        },
    )
    .await;
    let (guard, r) = refresh.await.unwrap();
    assert_eq!(r.unwrap(), Some(Duration::from_secs(90)));

    let release = tokio::spawn(guard.release());
    let req = peer.recv_op().await;
    let RequestBody::Release(r) = &req.body else {
        panic!("{req:?}")
    };
    let release_sig = r.owner_sig.clone().expect("signed");
    verify(SigOp::Release, "s", 500, 0, &release_sig);
    assert!(release_sig.counter > refresh_sig.counter);
    peer.ok(req.id, OkReply::default()).await;
    release.await.unwrap().unwrap();

    // By token, as a restarted process would.
    let c = client.clone();
    let rel = tokio::spawn(async move { c.release_static("z", "s", 500).await });
    let req = peer.recv_op().await;
    let RequestBody::Release(r) = &req.body else {
        panic!("{req:?}")
    };
    verify(SigOp::Release, "s", 500, 0, r.owner_sig.as_ref().unwrap());
    peer.error(req.id, ErrorCode::NotOwner).await;
    assert!(matches!(rel.await.unwrap(), Err(Error::NotOwner { .. })));
}

/// The client's own view of a TTL fires the guard no later than the
/// cluster's (measured from the LOCK's send time).
#[tokio::test(start_paused = true)]
async fn local_ttl_fires_the_guard() {
    let (client, mut peer, _net, _acc) = connected(&["a:1"]).await;
    let c = client.clone();
    let sent = Instant::now();
    let acquire = tokio::spawn(async move {
        c.lock("z", "t")
            .static_lock()
            .ttl(Duration::from_secs(2))
            .try_once()
            .acquire()
            .await
    });
    let req = peer.recv_op().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    peer.ok(
        req.id,
        OkReply {
            token: Some(8),
            expires_in_ms: Some(2000),
            ..OkReply::default()
        },
    )
    .await;
    let guard = acquire.await.unwrap().unwrap();
    let keepalives = tokio::spawn(async move {
        loop {
            let req = peer.recv().await;
            peer.ok(req.id, OkReply::default()).await;
        }
    });
    assert_eq!(guard.lost().await, LostReason::TtlExpired);
    // The send time + TTL − the lease margin (500 ms for a 2 s TTL): the
    // client stops believing before the cluster could expire it.
    let at = sent.elapsed();
    let believed = Duration::from_secs(2) - crate::lease_margin(Duration::from_secs(2));
    assert!(
        at >= believed && at < believed + Duration::from_millis(100),
        "{at:?}"
    );
    keepalives.abort();
    std::mem::forget(guard);
}

#[tokio::test(start_paused = true)]
async fn close_ends_the_session_and_the_client() {
    let (client, mut peer, _net, _acc) = connected(&["a:1"]).await;
    let guard = take(&client, &mut peer, "n", 1).await;
    let c = client.clone();
    let close = tokio::spawn(async move { c.close().await });
    let req = peer.recv_op().await;
    assert_eq!(req.body, RequestBody::Close);
    peer.ok(req.id, OkReply::default()).await;
    close.await.unwrap().unwrap();
    assert!(matches!(client.query("z", "n").await, Err(Error::Closed)));
    assert!(!guard.is_lost(), "released by CLOSE, not lost");
    let err = guard.release().await;
    assert!(
        matches!(
            err,
            Ok(ReleaseOutcome {
                already_released: true
            })
        ),
        "{err:?}"
    );
}

/// When every handle is gone, background releases finish and the session
/// is closed.
#[tokio::test(start_paused = true)]
async fn dropping_everything_releases_then_closes() {
    let (client, mut peer, _net, _acc) = connected(&["a:1"]).await;
    let guard = take(&client, &mut peer, "n", 4).await;
    drop(client);
    drop(guard);
    let req = peer.recv_op().await;
    assert!(
        matches!(&req.body, RequestBody::Release(r) if r.token == 4),
        "{req:?}"
    );
    peer.ok(req.id, OkReply::default()).await;
    let req = peer.recv_op().await;
    assert_eq!(req.body, RequestBody::Close);
    peer.ok(req.id, OkReply::default()).await;
    assert!(peer.io.next().await.is_none(), "the client hangs up");
}

/// A server that sends bytes the client cannot decode loses the
/// connection; the client reconnects.
#[tokio::test(start_paused = true)]
async fn garbage_from_the_server_reconnects() {
    let (client, peer, _net, mut accepts) = connected(&["a:1"]).await;
    let mut raw = peer.io.into_inner();
    tokio::io::AsyncWriteExt::write_all(&mut raw, &[0xff, 0xff, 0, 0])
        .await
        .unwrap();
    let mut peer = Peer::accept(&mut accepts).await;
    peer.hello(CLUSTER, true, vec![]).await;
    eventually("reconnected", || client.session().connects == 2).await;
    assert!(client
        .session()
        .last_error
        .unwrap()
        .contains("unknown item code"));
}

/// A request that cannot be encoded fails alone, before sending; the
/// connection carries on.
#[tokio::test(start_paused = true)]
async fn unencodable_request_fails_alone() {
    let (client, mut peer, _net, _acc) = connected(&["a:1"]).await;
    let long = "x".repeat(300);
    let err = client
        .lock("z", long)
        .try_once()
        .acquire()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Encode(_)), "{err:?}");
    let c = client.clone();
    let q = tokio::spawn(async move { c.query("z", "n").await });
    let req = peer.recv_op().await;
    assert!(
        matches!(req.body, RequestBody::Query(_)),
        "no CANCEL for a LOCK never sent: {req:?}"
    );
    peer.ok(req.id, OkReply::default()).await;
    q.await.unwrap().unwrap();
    assert_eq!(lock(&client.inner_shared().nonces).outstanding(), 0);
}

/// Callers beyond `requests_in_flight_max − reserve` wait for a slot; a
/// reply frees one.
#[tokio::test(start_paused = true)]
async fn in_flight_slots_bound_callers() {
    let (net, mut accepts) = MockNet::new();
    let mut cfg = config(&["a:1"]);
    cfg.requests_in_flight_max = crate::config::RESERVED_IN_FLIGHT + 2;
    let connect = tokio::spawn(Client::connect_with(cfg, net.clone()));
    let mut peer = Peer::accept(&mut accepts).await;
    peer.hello(CLUSTER, false, vec![]).await;
    let client = connect.await.unwrap().unwrap();
    let mut calls = Vec::new();
    for i in 0..3u64 {
        let c = client.clone();
        calls.push(tokio::spawn(
            async move { c.check_token("z", "n", i).await },
        ));
    }
    let a = peer.recv_op().await;
    let _b = peer.recv_op().await;
    let third = tokio::time::timeout(Duration::from_millis(500), peer.recv_op()).await;
    assert!(third.is_err(), "the third caller waits for a slot");
    let ok = OkReply {
        token_current: Some(true),
        ..OkReply::default()
    };
    peer.ok(a.id, ok).await;
    let c = peer.recv_op().await;
    assert!(matches!(c.body, RequestBody::CheckToken(_)));
}

// ----- Several servers: probing, the fastest primary, redirection -----

/// How one fake server behaves.
#[derive(Clone, Debug)]
struct FakeServer {
    node_id: u64,
    /// Added before every STATUS_OK (the "distance" to this server).
    status_delay: Duration,
    /// Added before every OK to a BREAK.
    break_delay: Duration,
    /// `Some`: refuse HELLO with UNAVAILABLE naming these servers.
    redirect: Option<Vec<ServerInfo>>,
}

fn fake(node_id: u64, status_delay: Duration) -> FakeServer {
    FakeServer {
        node_id,
        status_delay,
        break_delay: Duration::ZERO,
        redirect: None,
    }
}

fn server_info(node_id: u64, address: &str, serving: bool) -> ServerInfo {
    ServerInfo {
        node_id,
        address: address.into(),
        site: format!("site{node_id}"),
        serving,
        role: None,
        config_version: None,
        lag: None,
    }
}

/// What the fake cluster saw, per endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    Hello {
        client_id: u128,
        resumed: bool,
    },
    Refused,
    Status,
    Keepalive,
    Lock(u64),
    Release(u64),
    Break,
    /// A connection that had completed HELLO ended.
    SessionConnClosed,
}

/// A tiny in-memory cluster behind [`MockNet`]: every connection the
/// client opens is answered by the fake server of its endpoint. Sessions
/// (by client id) and their locks are shared by all servers, as a real
/// cluster's are; nothing else about a real server is imitated.
#[derive(Clone)]
struct FakeCluster {
    log: Arc<StdMutex<Vec<(String, Seen)>>>,
}

type Sessions = Arc<StdMutex<std::collections::HashMap<u128, Vec<HeldLock>>>>;

impl FakeCluster {
    fn start(mut accepts: Accepts, servers: Vec<(&str, FakeServer)>) -> FakeCluster {
        let servers: std::collections::HashMap<String, FakeServer> = servers
            .into_iter()
            .map(|(e, s)| (e.to_owned(), s))
            .collect();
        let cluster = FakeCluster {
            log: Arc::default(),
        };
        let sessions: Sessions = Arc::default();
        let c = cluster.clone();
        tokio::spawn(async move {
            while let Some((endpoint, io)) = accepts.recv().await {
                let server = servers
                    .get(&endpoint)
                    .cloned()
                    .unwrap_or_else(|| panic!("no fake server at {endpoint}"));
                tokio::spawn(c.clone().serve(endpoint, server, io, sessions.clone()));
            }
        });
        cluster
    }

    fn note(&self, endpoint: &str, seen: Seen) {
        self.log.lock().unwrap().push((endpoint.to_owned(), seen));
    }

    fn seen(&self, endpoint: &str) -> Vec<Seen> {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|(e, _)| e == endpoint)
            .map(|(_, s)| s.clone())
            .collect()
    }

    fn count(&self, endpoint: &str, what: &Seen) -> usize {
        self.seen(endpoint).iter().filter(|s| *s == what).count()
    }

    async fn serve(
        self,
        endpoint: String,
        server: FakeServer,
        io: DuplexStream,
        sessions: Sessions,
    ) {
        let mut io = Framed::new(io, RequestCodec::default());
        let mut client = None;
        let mut next_token = server.node_id * 1000;
        while let Some(Ok(req)) = io.next().await {
            let body = match req.body {
                RequestBody::Hello(h) => {
                    if let Some(servers) = &server.redirect {
                        self.note(&endpoint, Seen::Refused);
                        ResponseBody::Error(ErrorReply {
                            code: ErrorCode::Unavailable,
                            message: "this server only votes".into(),
                            holders: vec![],
                            leader_id: None,
                            servers: servers.clone(),
                        })
                    } else {
                        let mut all = sessions.lock().unwrap();
                        let resumed = all.contains_key(&h.client_id);
                        let held = all.entry(h.client_id).or_default().clone();
                        drop(all);
                        client = Some(h.client_id);
                        self.note(
                            &endpoint,
                            Seen::Hello {
                                client_id: h.client_id,
                                resumed,
                            },
                        );
                        ResponseBody::HelloOk(HelloOk {
                            protocol_version: 1,
                            cluster_id: CLUSTER,
                            resumed,
                            session_timeout_ms: h.session_timeout_ms.unwrap_or(15_000),
                            node_id: server.node_id,
                            site: format!("site{}", server.node_id),
                            config_version: 1,
                            held,
                            waits: vec![],
                            servers: vec![],
                        })
                    }
                }
                RequestBody::Status => {
                    self.note(&endpoint, Seen::Status);
                    tokio::time::sleep(server.status_delay).await;
                    ResponseBody::StatusOk(oclocks_proto::StatusOk {
                        node_id: server.node_id,
                        site: format!("site{}", server.node_id),
                        role: oclocks_proto::Role::Follower,
                        term: 1,
                        leader_id: Some(1),
                        config_version: 1,
                        applied_index: 1,
                        servers: vec![],
                    })
                }
                RequestBody::Keepalive => {
                    self.note(&endpoint, Seen::Keepalive);
                    ResponseBody::Ok(OkReply::default())
                }
                RequestBody::Lock(l) => {
                    next_token += 1;
                    let token = next_token;
                    self.note(&endpoint, Seen::Lock(token));
                    let id = client.expect("LOCK after HELLO");
                    sessions
                        .lock()
                        .unwrap()
                        .entry(id)
                        .or_default()
                        .push(HeldLock {
                            zone: l.zone,
                            name: l.name,
                            token,
                            mode: l.mode,
                            kind: l.kind,
                        });
                    ResponseBody::Ok(granted(token))
                }
                RequestBody::Release(r) => {
                    self.note(&endpoint, Seen::Release(r.token));
                    let id = client.expect("RELEASE after HELLO");
                    if let Some(held) = sessions.lock().unwrap().get_mut(&id) {
                        held.retain(|h| h.token != r.token);
                    }
                    ResponseBody::Ok(OkReply::default())
                }
                RequestBody::Break(_) => {
                    self.note(&endpoint, Seen::Break);
                    tokio::time::sleep(server.break_delay).await;
                    ResponseBody::Ok(OkReply::default())
                }
                _ => ResponseBody::Ok(OkReply::default()),
            };
            if io.send(Response { id: req.id, body }).await.is_err() {
                break;
            }
        }
        if client.is_some() {
            self.note(&endpoint, Seen::SessionConnClosed);
        }
    }
}

fn probing_config(endpoints: &[&str]) -> ClientConfig {
    let mut c = config(endpoints);
    c.probe_interval = Duration::from_secs(30);
    c
}

/// Two servers, the first configured one slow: the first probe round
/// measures both, and the client moves to the fast one with a graceful
/// switch — HELLO there with the same client id, the session resumed, the
/// lock kept, keepalives carrying on — and stays there.
#[tokio::test(start_paused = true)]
async fn probes_pick_the_fastest_server_and_keep_the_session() {
    let (net, accepts) = MockNet::new();
    let cluster = FakeCluster::start(
        accepts,
        vec![
            ("slow:1", fake(1, Duration::from_millis(40))),
            ("fast:1", fake(2, Duration::from_millis(1))),
        ],
    );
    let client = Client::connect_with(probing_config(&["slow:1", "fast:1"]), net.clone())
        .await
        .unwrap();
    assert_eq!(client.session().endpoint.as_deref(), Some("slow:1"));
    let guard = client.lock("z", "n").try_once().acquire().await.unwrap();

    eventually("moved to the fast server", || {
        client.session().endpoint.as_deref() == Some("fast:1")
    })
    .await;
    let s = client.session();
    assert_eq!((s.connects, s.new_sessions, s.switches), (2, 1, 1));
    let id = client.client_id();
    assert_eq!(
        cluster.seen("fast:1").first(),
        Some(&Seen::Status),
        "measured before moving"
    );
    assert!(cluster.seen("fast:1").contains(&Seen::Hello {
        client_id: id,
        resumed: true
    }));
    eventually("the old connection is closed", || {
        cluster.count("slow:1", &Seen::SessionConnClosed) == 1
    })
    .await;

    let servers = client.servers();
    assert_eq!(servers, s.known_servers);
    let slow = servers.iter().find(|k| k.address == "slow:1").unwrap();
    let fast = servers.iter().find(|k| k.address == "fast:1").unwrap();
    assert!(fast.primary && !slow.primary);
    assert_eq!((slow.node_id, fast.node_id), (Some(1), Some(2)));
    assert_eq!(fast.site.as_deref(), Some("site2"));
    let (slow_rtt, fast_rtt) = (slow.rtt.unwrap(), fast.rtt.unwrap());
    assert!(slow_rtt >= Duration::from_millis(40), "{slow_rtt:?}");
    assert!(fast_rtt < Duration::from_millis(20), "{fast_rtt:?}");
    assert_eq!(fast.serving, Some(true));

    // The lock survived the move, keepalives go to the new server, and
    // the lease holds; later rounds do not move the client again.
    let keepalives_before = cluster.count("fast:1", &Seen::Keepalive);
    tokio::time::sleep(Duration::from_secs(65)).await;
    assert!(!guard.is_lost());
    assert!(client.session().lease_remaining.is_some());
    assert!(cluster.count("fast:1", &Seen::Keepalive) > keepalives_before + 50);
    let s = client.session();
    assert_eq!((s.switches, s.endpoint.as_deref()), (1, Some("fast:1")));
    assert!(
        cluster.count("slow:1", &Seen::Status) >= 3 * 3,
        "three rounds of three probes"
    );
    let token = guard.token();
    guard.release().await.unwrap();
    assert!(cluster.seen("fast:1").contains(&Seen::Release(token)));
}

/// A request that may not be resent (BREAK without a token) holds a
/// decided switch back until its reply is in: it never becomes
/// indeterminate because of a switch.
#[tokio::test(start_paused = true)]
async fn switch_waits_for_requests_that_cannot_be_resent() {
    let (net, accepts) = MockNet::new();
    let mut slow = fake(1, Duration::from_millis(40));
    // Within the request timeout (2 s).
    slow.break_delay = Duration::from_millis(1200);
    let cluster = FakeCluster::start(
        accepts,
        vec![
            ("slow:1", slow),
            ("fast:1", fake(2, Duration::from_millis(1))),
        ],
    );
    let client = Client::connect_with(probing_config(&["slow:1", "fast:1"]), net.clone())
        .await
        .unwrap();
    let c = client.clone();
    let brk = tokio::spawn(async move { c.break_lock("z", "n", None).await });
    // The probe round ends (and the switch is decided) long before the
    // BREAK is answered.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(cluster.count("slow:1", &Seen::Break), 1);
    assert_eq!(client.session().endpoint.as_deref(), Some("slow:1"));
    let answered = brk.await.unwrap();
    assert!(
        answered.is_ok(),
        "answered, not indeterminate: {answered:?}"
    );
    eventually("moved after the reply", || client.session().switches == 1).await;
    assert_eq!(client.session().endpoint.as_deref(), Some("fast:1"));
}

/// Without measurements there is no switch; `probe_servers` measures on
/// demand and reports, without moving the client.
#[tokio::test(start_paused = true)]
async fn probe_servers_measures_on_demand() {
    let (net, accepts) = MockNet::new();
    let cluster = FakeCluster::start(
        accepts,
        vec![
            ("slow:1", fake(1, Duration::from_millis(40))),
            ("fast:1", fake(2, Duration::from_millis(1))),
        ],
    );
    let client = Client::connect_with(config(&["slow:1", "fast:1"]), net.clone())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(cluster.count("fast:1", &Seen::Status), 0, "probing is off");
    assert!(client.servers().iter().all(|k| k.rtt.is_none()));
    let servers = client.probe_servers().await;
    assert!(servers.iter().all(|k| k.rtt.is_some()), "{servers:?}");
    assert!(servers[0].primary && servers[0].address == "slow:1");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(client.session().switches, 0);
}

/// A quorum-only server refuses HELLO with UNAVAILABLE and names the
/// serving servers: the client learns them and goes there in the same
/// round, not failing the connect.
#[tokio::test(start_paused = true)]
async fn unavailable_hello_redirects_to_the_listed_server() {
    let (net, accepts) = MockNet::new();
    let mut quorum = fake(1, Duration::from_millis(1));
    quorum.redirect = Some(vec![
        server_info(1, "quorum:1", false),
        server_info(2, "serve:1", true),
    ]);
    let cluster = FakeCluster::start(
        accepts,
        vec![
            ("quorum:1", quorum),
            ("serve:1", fake(2, Duration::from_millis(1))),
        ],
    );
    let client = Client::connect_with(config(&["quorum:1"]), net.clone())
        .await
        .unwrap();
    let s = client.session();
    assert_eq!(s.endpoint.as_deref(), Some("serve:1"));
    assert_eq!(s.connects, 1);
    assert_eq!(cluster.seen("quorum:1"), vec![Seen::Refused]);
    let servers = client.servers();
    let addresses: Vec<&str> = servers.iter().map(|k| k.address.as_str()).collect();
    assert_eq!(addresses, vec!["quorum:1", "serve:1"]);
    assert_eq!(servers[0].serving, Some(false));
    assert!(servers[1].primary);

    // With learning off, the refusal is the answer.
    let mut fixed = config(&["quorum:1"]);
    fixed.learn_endpoints = false;
    let err = Client::connect_with(fixed, net.clone()).await.unwrap_err();
    assert!(
        matches!(&err, Error::Unavailable { servers, .. } if servers.len() == 2),
        "{err:?}"
    );
}
