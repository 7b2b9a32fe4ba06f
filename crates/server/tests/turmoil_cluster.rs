//! Three real Raft nodes under a simulated network and clock (turmoil).
//!
//! Each node is a turmoil host running the server's real consensus layer:
//! `RaftNode::start_with_transport` with the server's `RaftOptions` (its
//! openraft config), the WAL-backed `LogStore` and the snapshot-backed state
//! machine in a temporary data directory, and the lock `Engine`. The Raft
//! RPCs travel over turmoil's simulated TCP, framed exactly like the peer
//! protocol (`oclocks_server::peer`'s length-prefixed postcard `Frame`s, the
//! `Hello`/`Welcome` handshake first), without TLS. The answering side is
//! the server's own `peer::serve`; the calling side is [`SimNet`], a small
//! multiplexed client like `peer::PeerNet`. A crashed node (turmoil `crash`)
//! restarts (`bounce`) from its data directory.
//!
//! Time: every host is a paused current-thread tokio runtime whose clock
//! turmoil advances one tick (1 ms) per step, so openraft's heartbeats and
//! election timeouts run on simulated time. Storage reads and snapshot I/O
//! run on tokio's blocking pool (real threads): while a blocking task is in
//! flight, tokio does not auto-advance a paused clock, so they take no
//! simulated time. The log's appends are fsynced by raft-log's own flush
//! thread, outside tokio: while a node waits for one, simulated time runs
//! on (turmoil steps about 25 simulated ms per real ms here), so a flush
//! takes some simulated time, more on a loaded machine — like a disk.
//!
//! A driver (a turmoil client) stamps lock-service commands with the
//! leader's term and its own simulated clock (a `Rebase` first in every
//! term, nothing stamped without quorum contact, like `proposer.rs`) and
//! submits them to the leader through `RaftNode::submit`, while the test
//! injects faults between steps, all drawn from one seed: the leader
//! partitioned away, one-way partitions, held links, slow links, and the
//! leader or a follower crashed and restarted. After healing it checks:
//!
//! - (a) convergence: all three nodes applied the same index and their
//!   engines' snapshots are byte-identical; their logs agree wherever two
//!   hold the same index; replaying the committed log through a fresh
//!   `Engine` gives the same snapshot;
//! - (b) the committed record (that replay's replies and effects, in log
//!   order): fencing tokens strictly increase per lock and cluster-wide in
//!   grant order; between commands a lock has one exclusive holder or only
//!   shared ones; every node's effects feed (`AppliedBatch`) equals the
//!   record (and its last boot fed all of it); every command whose reply
//!   the driver got is in the log at the index it was told, with that
//!   reply;
//! - (c) the leader changed and commands committed in more than one term
//!   and after the last fault was healed; the new leader was elected no
//!   sooner than openraft's leader lease plus an election timeout (1.5–2 s
//!   of simulated time with our options) after the last AppendEntries it
//!   accepted, and within 5 s of the fault; idle followers got one heartbeat per openraft tick (3/2 of
//!   the heartbeat interval) of simulated time.
//!
//! Seeds: every run prints its seeds; `OCLOCKS_TURMOIL_SEED=0x1a` runs one,
//! `OCLOCKS_TURMOIL_SEEDS=50` runs seeds 1..=50 (the default is a handful).
//! `OCLOCKS_TURMOIL_SNAPSHOTS=mix` (the default: half the seeds), `on` or
//! `off` sets frequent snapshots (restarts from a snapshot, InstallSnapshot
//! over the simulated network; the record then starts at a snapshot): see
//! [`compacting`] for the bug they found.
//!
//! Determinism: the seed fixes the fault schedule, the workload's choices
//! and turmoil's network (latencies), but two runs of one seed are not
//! bit-identical: openraft draws its election timeouts from
//! `rand::thread_rng` (openraft's `TokioRuntime::thread_rng`, which our
//! `TypeConfig` uses), tokio's `select!` picks branches with an unseeded RNG
//! unless built with `--cfg tokio_unstable`, and blocking-pool I/O finishes
//! in real time. The checks must hold on every run.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use oclocks_core::{
    Caller, ClientId, Command, Effect, Engine, EngineLimits, Kind, LockRequest, Mode, Op, Refusal,
    Reply, Token,
};
use oclocks_server::peer::{
    codec, decode, encode, serve, Frame, PeerHandler, PeerHello, PeerRequest, PeerResponse,
    PeerWelcome,
};
use oclocks_server::raft::{
    AppliedBatch, Entry, LogStore, Member, NodeId, NodeOptions, PeerTransport, PendingReply,
    Proposal, RaftNode, RaftOptions, RpcError, StateMachineStore, TypeConfig,
};
use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::EntryPayload;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

// ----------------------------------------------------------------------
// Parameters
// ----------------------------------------------------------------------

const NODES: [NodeId; 3] = [1, 2, 3];
const PORT: u16 = 7000;
const CLUSTER_ID: u128 = 0x0c10_c57e;
/// Seeds run by default (kept within CI time).
const DEFAULT_SEEDS: u64 = 6;
/// When the first fault starts (the cluster forms before).
const FAULTS_FROM_MS: u64 = 3_000;
/// Faults per seed (the first always takes the leader away).
const FAULTS: usize = 4;
/// The workload goes on this long after everything is healed.
const AFTER_HEAL_MS: u64 = 3_000;
/// A run that has not finished by then failed.
const SIM_LIMIT_MS: u64 = 90_000;
/// A driver request without a reply by then is indeterminate.
const REPLY_TIMEOUT: Duration = Duration::from_secs(3);
/// The real proposer's quorum-contact bound (an election timeout).
const QUORUM_CONTACT_MS: u64 = 500;
/// The sessions' timeout.
const SESSION_MS: u64 = 4_000;
const CLIENTS: u64 = 4;
const LOCKS: [&str; 3] = ["a", "b", "c"];
const ZONE: &str = "default";
/// Dialling a peer (connect + handshake), at most.
const DIAL_TIMEOUT: Duration = Duration::from_millis(500);

fn host(id: NodeId) -> String {
    format!("n{id}")
}

fn addr(id: NodeId) -> String {
    format!("n{id}:{PORT}")
}

fn incarnation(id: NodeId) -> u64 {
    0x1000 + id
}

fn member(id: NodeId) -> Member {
    Member {
        addr: addr(id),
        client_addr: addr(id),
        site: "sim".into(),
        incarnation: incarnation(id),
        ..Member::default()
    }
}

/// Simulated time since the simulation started, in ms (inside a host).
fn sim_ms() -> u64 {
    turmoil::sim_elapsed().map_or(0, |d| d.as_millis() as u64)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// splitmix64: the test's own seeded PRNG.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

// ----------------------------------------------------------------------
// What the hosts, the driver and the test share
// ----------------------------------------------------------------------

/// One batch of a node's effects feed, with the boot it came from.
struct FeedItem {
    node: NodeId,
    boot: u32,
    batch: AppliedBatch,
}

/// A command whose reply the driver received.
struct Acked {
    cmd: Command,
    index: u64,
    reply: Reply,
}

/// What the driver saw at the end.
struct Final {
    index: u64,
    snapshots: BTreeMap<NodeId, Vec<u8>>,
    /// AppendEntries received per follower in an idle second.
    idle_heartbeats: BTreeMap<NodeId, u64>,
}

#[derive(Default)]
struct Shared {
    /// The running nodes (a crashed node is removed before the crash, so
    /// nothing outside its runtime keeps its handle).
    nodes: Mutex<BTreeMap<NodeId, RaftNode>>,
    boots: Mutex<BTreeMap<NodeId, u32>>,
    feeds: Mutex<Vec<FeedItem>>,
    /// AppendEntries requests each node has answered.
    append_entries: Mutex<BTreeMap<NodeId, u64>>,
    /// Per node, when (simulated ms) the latest AppendEntries it accepted
    /// (did not answer with a higher vote) arrived: openraft refreshes the
    /// follower's leader lease on each (`update_vote` → `touch`), at or
    /// after its arrival.
    leader_contact: Mutex<BTreeMap<NodeId, u64>>,
    /// Set by the test: clients stop, the driver checks convergence.
    stop_workload: AtomicBool,
    acked: Mutex<Vec<Acked>>,
    /// Every LOCK the driver submitted: (client, nonce) → (lock, mode).
    submitted_locks: Mutex<HashMap<(ClientId, u64), (String, Mode)>>,
    indeterminate: AtomicU64,
    /// (term, leader) pairs the driver stamped commands for.
    leaders: Mutex<BTreeSet<(u64, NodeId)>>,
    result: Mutex<Option<Result<Final, String>>>,
}

impl Shared {
    fn node(&self, id: NodeId) -> Option<RaftNode> {
        lock(&self.nodes).get(&id).cloned()
    }

    /// The leader with the highest term among the running nodes, if any.
    fn leader(&self) -> Option<(NodeId, u64)> {
        lock(&self.nodes)
            .values()
            .filter_map(|n| n.leader_term().map(|t| (n.node_id(), t)))
            .max_by_key(|(_, t)| *t)
    }
}

// ----------------------------------------------------------------------
// The transport: peer frames over turmoil TCP
// ----------------------------------------------------------------------

#[derive(Debug)]
struct NetError(String);

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NetError {}

/// One open, handshaken connection to a peer.
struct Conn {
    tx: mpsc::Sender<(u64, PeerRequest)>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<PeerResponse>>>>,
    next_id: AtomicU64,
    /// Cancelled when the connection is not to be used any more; its
    /// reader and writer tasks end.
    closed: CancellationToken,
}

/// Marks a connection closed unless disarmed: a call dropped before its
/// answer (openraft's deadline passed) may have lost a segment for good —
/// turmoil's TCP never retransmits — so the connection is not reused.
struct CloseOnDrop(Option<CancellationToken>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.cancel();
        }
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<Arc<Conn>>>>;

/// The calling side: one multiplexed connection per peer, dialled on
/// demand, like `peer::PeerNet` without TLS.
struct SimNet {
    me: NodeId,
    slots: Mutex<BTreeMap<NodeId, Slot>>,
}

impl SimNet {
    async fn conn(&self, target: NodeId, node: &Member) -> Result<Arc<Conn>, NetError> {
        let slot = lock(&self.slots).entry(target).or_default().clone();
        let mut g = slot.lock().await;
        if let Some(c) = g.as_ref() {
            if !c.closed.is_cancelled() {
                return Ok(c.clone());
            }
        }
        *g = None;
        let c = tokio::time::timeout(DIAL_TIMEOUT, dial(self.me, target, node))
            .await
            .map_err(|_| NetError(format!("dialling {} timed out", node.addr)))??;
        let c = Arc::new(c);
        *g = Some(c.clone());
        Ok(c)
    }

    async fn call(
        &self,
        target: NodeId,
        node: &Member,
        req: PeerRequest,
    ) -> Result<PeerResponse, NetError> {
        let conn = self.conn(target, node).await?;
        let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&conn.pending).insert(id, tx);
        let mut guard = CloseOnDrop(Some(conn.closed.clone()));
        if conn.tx.send((id, req)).await.is_err() {
            return Err(NetError("connection closed".into()));
        }
        let resp = rx
            .await
            .map_err(|_| NetError("connection lost before the answer".into()))?;
        if let PeerResponse::Refused(reason) = resp {
            return Err(NetError(format!("refused: {reason}")));
        }
        guard.0 = None;
        Ok(resp)
    }
}

async fn dial(me: NodeId, target: NodeId, node: &Member) -> Result<Conn, NetError> {
    let err = |what: &str, e: &dyn fmt::Display| NetError(format!("{}: {what}: {e}", node.addr));
    let tcp = turmoil::net::TcpStream::connect(node.addr.as_str())
        .await
        .map_err(|e| err("connect", &e))?;
    let (rd, wr) = tcp.into_split();
    let mut reader = FramedRead::new(rd, codec());
    let mut writer = FramedWrite::new(wr, codec());
    let hello = PeerHello {
        cluster_id: Some(CLUSTER_ID),
        from: me,
        from_incarnation: incarnation(me),
        to: Some(target),
        to_incarnation: Some(node.incarnation),
    };
    let bytes = encode(&Frame {
        id: 0,
        body: PeerRequest::Hello(hello),
    })
    .map_err(|e| err("encode", &e))?;
    writer.send(bytes).await.map_err(|e| err("send", &e))?;
    let first = reader
        .next()
        .await
        .ok_or_else(|| err("handshake", &"closed"))?
        .map_err(|e| err("handshake", &e))?;
    let frame: Frame<PeerResponse> = decode(&first).map_err(|e| err("decode", &e))?;
    match frame.body {
        PeerResponse::Welcome(w) if w.node_id == target && w.cluster_id == Some(CLUSTER_ID) => {}
        PeerResponse::Refused(reason) => return Err(err("refused", &reason)),
        other => return Err(err("handshake answer", &other.kind())),
    }

    let (tx, mut rx) = mpsc::channel::<(u64, PeerRequest)>(1024);
    let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<PeerResponse>>>> = Arc::default();
    let closed = CancellationToken::new();
    let stop = closed.clone();
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                n = rx.recv() => n,
            };
            let Some((id, body)) = next else { break };
            let Ok(bytes) = encode(&Frame { id, body }) else {
                continue;
            };
            if writer.send(bytes).await.is_err() {
                break;
            }
        }
        stop.cancel();
    });
    let (pend, stop) = (pending.clone(), closed.clone());
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                n = reader.next() => n,
            };
            let Some(Ok(bytes)) = next else { break };
            let Ok(frame) = decode::<PeerResponse>(&bytes) else {
                break;
            };
            if let Some(w) = lock(&pend).remove(&frame.id) {
                let _ = w.send(frame.body);
            }
        }
        stop.cancel();
        // Fail every call still waiting on this connection.
        lock(&pend).clear();
    });
    Ok(Conn {
        tx,
        pending,
        next_id: AtomicU64::new(1),
        closed,
    })
}

/// The [`PeerTransport`] the nodes use.
struct SimTransport(Arc<SimNet>);

type Picked<T, E> = Option<Result<T, RaftError<NodeId, E>>>;

fn raft_call<T, E>(
    net: &Arc<SimNet>,
    target: NodeId,
    node: &Member,
    req: PeerRequest,
    pick: fn(PeerResponse) -> Picked<T, E>,
) -> BoxFuture<'static, Result<T, RpcError<E>>>
where
    T: Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
    RaftError<NodeId, E>: std::error::Error,
{
    let (net, node) = (net.clone(), node.clone());
    Box::pin(async move {
        let resp = net
            .call(target, &node, req)
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let kind = resp.kind();
        match pick(resp) {
            Some(Ok(r)) => Ok(r),
            Some(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(target, e))),
            None => Err(RPCError::Unreachable(Unreachable::new(&NetError(format!(
                "unexpected answer {kind}"
            ))))),
        }
    })
}

impl PeerTransport for SimTransport {
    fn append_entries(
        &self,
        target: NodeId,
        node: &Member,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> BoxFuture<'static, Result<AppendEntriesResponse<NodeId>, RpcError>> {
        let req = PeerRequest::AppendEntries(rpc);
        raft_call(&self.0, target, node, req, |r| match r {
            PeerResponse::AppendEntries(r) => Some(r),
            _ => None,
        })
    }

    fn vote(
        &self,
        target: NodeId,
        node: &Member,
        rpc: VoteRequest<NodeId>,
    ) -> BoxFuture<'static, Result<VoteResponse<NodeId>, RpcError>> {
        raft_call(&self.0, target, node, PeerRequest::Vote(rpc), |r| match r {
            PeerResponse::Vote(r) => Some(r),
            _ => None,
        })
    }

    fn install_snapshot(
        &self,
        target: NodeId,
        node: &Member,
        rpc: InstallSnapshotRequest<TypeConfig>,
    ) -> BoxFuture<'static, Result<InstallSnapshotResponse<NodeId>, RpcError<InstallSnapshotError>>>
    {
        let req = PeerRequest::InstallSnapshot(rpc);
        raft_call(&self.0, target, node, req, |r| match r {
            PeerResponse::InstallSnapshot(r) => Some(r),
            _ => None,
        })
    }
}

/// The answering side's handler (served by the server's `peer::serve`).
struct Handler {
    id: NodeId,
    node: RaftNode,
    shared: Arc<Shared>,
}

impl PeerHandler for Handler {
    fn hello(&self, h: &PeerHello) -> Result<PeerWelcome, String> {
        if h.cluster_id != Some(CLUSTER_ID) {
            return Err(format!("node {} is of another cluster", h.from));
        }
        if h.to != Some(self.id) || h.to_incarnation != Some(incarnation(self.id)) {
            return Err(format!("this is node {}, not {:?}", self.id, h.to));
        }
        Ok(PeerWelcome {
            cluster_id: Some(CLUSTER_ID),
            node_id: self.id,
            incarnation: incarnation(self.id),
        })
    }

    fn handle(
        self: Arc<Self>,
        _hello: Arc<PeerHello>,
        req: PeerRequest,
    ) -> BoxFuture<'static, PeerResponse> {
        Box::pin(async move {
            let raft = self.node.raft();
            match req {
                PeerRequest::AppendEntries(rpc) => {
                    *lock(&self.shared.append_entries)
                        .entry(self.id)
                        .or_default() += 1;
                    let arrived = sim_ms();
                    let resp = raft.append_entries(rpc).await;
                    if matches!(
                        resp,
                        Ok(AppendEntriesResponse::Success
                            | AppendEntriesResponse::PartialSuccess(_)
                            | AppendEntriesResponse::Conflict)
                    ) {
                        let mut c = lock(&self.shared.leader_contact);
                        let last = c.entry(self.id).or_default();
                        *last = (*last).max(arrived);
                    }
                    PeerResponse::AppendEntries(resp)
                }
                PeerRequest::Vote(rpc) => PeerResponse::Vote(raft.vote(rpc).await),
                PeerRequest::InstallSnapshot(rpc) => {
                    PeerResponse::InstallSnapshot(raft.install_snapshot(rpc).await)
                }
                _ => PeerResponse::Refused("not served in the simulation".into()),
            }
        })
    }
}

// ----------------------------------------------------------------------
// A host: one real node
// ----------------------------------------------------------------------

async fn run_host(
    id: NodeId,
    dir: PathBuf,
    options: RaftOptions,
    shared: Arc<Shared>,
) -> turmoil::Result {
    let boot = {
        let mut boots = lock(&shared.boots);
        let b = boots.entry(id).or_default();
        *b += 1;
        *b
    };
    let opts = NodeOptions {
        node_id: id,
        data_dir: dir,
        limits: EngineLimits::default(),
        options,
        // The driver initialises the three-member cluster on node 1.
        bootstrap: false,
        member: member(id),
    };
    let net = Arc::new(SimNet {
        me: id,
        slots: Mutex::default(),
    });
    let (node, mut feed) = RaftNode::start_with_transport(opts, Arc::new(SimTransport(net)))
        .await
        .map_err(|e| format!("node {id} start: {e}"))?;
    lock(&shared.nodes).insert(id, node.clone());
    let s = shared.clone();
    tokio::spawn(async move {
        while let Some(batch) = feed.recv().await {
            lock(&s.feeds).push(FeedItem {
                node: id,
                boot,
                batch,
            });
        }
    });
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
    let handler = Arc::new(Handler {
        id,
        node,
        shared: shared.clone(),
    });
    loop {
        let (stream, peer) = listener.accept().await?;
        tokio::spawn(serve(stream, handler.clone(), peer.to_string()));
    }
}

// ----------------------------------------------------------------------
// The driver: stamps and proposes through the leader
// ----------------------------------------------------------------------

struct Stamper {
    /// The term of the last command stamped.
    term: u64,
    rebase_pending: bool,
}

struct Driver {
    shared: Arc<Shared>,
    start: tokio::time::Instant,
    stamper: tokio::sync::Mutex<Stamper>,
}

enum Outcome {
    Applied(Reply),
    /// No reply (timeout, leader change, no leader): may or may not have
    /// taken effect.
    Unknown,
}

impl Driver {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Stamp `op` with the leader's term and the driver's clock and submit
    /// it there (a `Rebase` first in a new term or after lost quorum
    /// contact); wait for the reply.
    async fn propose(&self, op: Op) -> Outcome {
        let deadline = tokio::time::Instant::now() + REPLY_TIMEOUT;
        let (cmd, pending) = loop {
            if tokio::time::Instant::now() >= deadline {
                self.shared.indeterminate.fetch_add(1, Ordering::Relaxed);
                return Outcome::Unknown;
            }
            let mut st = self.stamper.lock().await;
            let Some((id, term)) = self.shared.leader() else {
                drop(st);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let Some(node) = self.shared.node(id) else {
                continue;
            };
            // Unbroken quorum contact (ARCHITECTURE.md): stamp nothing
            // while the leader has not heard from a quorum.
            let fresh = node
                .millis_since_quorum_ack()
                .is_some_and(|ms| ms <= QUORUM_CONTACT_MS);
            if !fresh {
                st.rebase_pending = true;
                drop(st);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            if term != st.term || st.rebase_pending {
                st.term = term;
                st.rebase_pending = false;
                let rebase = Command {
                    term,
                    now_ms: self.now_ms(),
                    op: Op::Rebase,
                };
                if let Ok(p) = node.submit(rebase.clone()).await {
                    let shared = self.shared.clone();
                    tokio::task::spawn_local(async move {
                        if let Ok(Ok(a)) = tokio::time::timeout(REPLY_TIMEOUT, p).await {
                            lock(&shared.acked).push(Acked {
                                cmd: rebase,
                                index: a.index,
                                reply: a.reply,
                            });
                        }
                    });
                }
            }
            let cmd = Command {
                term,
                now_ms: self.now_ms(),
                op: op.clone(),
            };
            match node.submit(cmd.clone()).await {
                Ok(p) => {
                    lock(&self.shared.leaders).insert((term, id));
                    break (cmd, p);
                }
                Err(_) => {
                    drop(st);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        match tokio::time::timeout_at(deadline, pending).await {
            Ok(Ok(a)) => {
                lock(&self.shared.acked).push(Acked {
                    cmd,
                    index: a.index,
                    reply: a.reply.clone(),
                });
                Outcome::Applied(a.reply)
            }
            _ => {
                self.shared.indeterminate.fetch_add(1, Ordering::Relaxed);
                Outcome::Unknown
            }
        }
    }

    /// Each running node's view, for failure messages.
    fn views(&self) -> String {
        let nodes = lock(&self.shared.nodes);
        let mut out = String::new();
        for (id, n) in nodes.iter() {
            let m = n.raft().metrics().borrow().clone();
            out.push_str(&format!(
                "\n  node {id}: {:?} term {} leader {:?} last log {:?} applied {:?} \
                 quorum ack {:?} ms ago, membership {:?}",
                m.state,
                m.current_term,
                m.current_leader,
                m.last_log_index,
                m.last_applied.map(|l| l.index),
                m.millis_since_quorum_ack,
                m.membership_config
                    .membership()
                    .voter_ids()
                    .collect::<Vec<_>>(),
            ));
        }
        out
    }

    /// On a stuck leader: does openraft itself still commit (a write that
    /// bypasses `RaftNode`'s batcher)? And what did each node's feed say
    /// about installed snapshots?
    async fn probe(&self) -> String {
        let mut out = String::new();
        if let Some((id, term)) = self.shared.leader() {
            if let Some(node) = self.shared.node(id) {
                let cmd = Command {
                    term,
                    now_ms: self.now_ms(),
                    op: Op::Tick,
                };
                let w = node.raft().client_write(Proposal {
                    commands: vec![cmd],
                });
                let r = tokio::time::timeout(Duration::from_secs(2), w).await;
                out.push_str(&format!(
                    "direct openraft client_write on leader {id}: {}\n",
                    match r {
                        Ok(Ok(resp)) => format!("committed at {}", resp.log_id.index),
                        Ok(Err(e)) => format!("error {e}"),
                        Err(_) => "no answer in 2 s".into(),
                    }
                ));
            }
        }
        for f in lock(&self.shared.feeds).iter().filter(|f| f.batch.resync) {
            out.push_str(&format!(
                "node {} (boot {}) installed a snapshot up to {}\n",
                f.node, f.boot, f.batch.log_index
            ));
        }
        out
    }

    fn stopped(&self) -> bool {
        self.shared.stop_workload.load(Ordering::Relaxed)
    }

    /// One client: a session, keepalives, locks (some waiting), releases,
    /// cancels, pauses long enough to expire, closes.
    async fn client(&self, n: u64, seed: u64) {
        let mut rng = Rng::new(seed.wrapping_mul(31).wrapping_add(n));
        let client: ClientId = 0xc11e_0000 + u128::from(n);
        let caller = Caller {
            client,
            identity: format!("client-{n}"),
        };
        let mut open = false;
        let mut nonce = 0u64;
        let mut held: Vec<(&str, Token)> = Vec::new();
        let mut last_keepalive = 0u64;
        while !self.stopped() {
            tokio::time::sleep(Duration::from_millis(rng.range(5, 40))).await;
            if !open {
                let op = Op::OpenSession {
                    caller: caller.clone(),
                    timeout_ms: SESSION_MS,
                };
                if let Outcome::Applied(Reply::Session { .. }) = self.propose(op).await {
                    open = true;
                    held.clear();
                    last_keepalive = self.now_ms();
                }
                continue;
            }
            if self.now_ms().saturating_sub(last_keepalive) > SESSION_MS / 4 {
                let op = Op::Keepalive {
                    callers: vec![caller.clone()],
                };
                let sent = self.now_ms();
                match self.propose(op).await {
                    Outcome::Applied(Reply::Keepalive(r)) if r.iter().all(|r| r.is_ok()) => {
                        last_keepalive = sent;
                    }
                    Outcome::Applied(_) => open = false,
                    Outcome::Unknown => {}
                }
                continue;
            }
            let roll = rng.range(0, 999);
            if roll < 550 {
                nonce += 1;
                let name = LOCKS[rng.range(0, LOCKS.len() as u64 - 1) as usize];
                let wait = rng.chance(25);
                let req = LockRequest {
                    caller: caller.clone(),
                    zone: ZONE.into(),
                    name: name.into(),
                    mode: if rng.chance(20) {
                        Mode::Shared
                    } else {
                        Mode::Exclusive
                    },
                    kind: Kind::Connection,
                    ttl_ms: if rng.chance(30) { 1_500 } else { 0 },
                    wait_ms: if wait { 600 } else { 0 },
                    lock_delay_ms: 0,
                    owner: nonce,
                    nonce,
                    low_water: nonce,
                    key: None,
                };
                lock(&self.shared.submitted_locks)
                    .insert((client, nonce), (format!("{ZONE}/{name}"), req.mode));
                match self.propose(Op::Lock(req)).await {
                    Outcome::Applied(Reply::Granted { token }) => held.push((name, token)),
                    Outcome::Applied(Reply::Queued { .. }) => {
                        tokio::time::sleep(Duration::from_millis(rng.range(50, 400))).await;
                        let op = Op::Cancel {
                            caller: caller.clone(),
                            nonce,
                        };
                        if let Outcome::Applied(Reply::Refused(Refusal::NoSession)) =
                            self.propose(op).await
                        {
                            open = false;
                        }
                    }
                    Outcome::Applied(Reply::Refused(Refusal::NoSession)) => open = false,
                    _ => {}
                }
            } else if roll < 900 {
                if held.is_empty() {
                    continue;
                }
                let (name, token) = held.swap_remove(rng.range(0, held.len() as u64 - 1) as usize);
                let op = Op::Release {
                    caller: caller.clone(),
                    zone: ZONE.into(),
                    name: name.into(),
                    token,
                    key: None,
                };
                if let Outcome::Applied(Reply::Refused(Refusal::NoSession)) = self.propose(op).await
                {
                    open = false;
                }
            } else if roll < 990 {
                // Refresh a held grant (its TTL starts over).
                let Some((name, token)) = held.get(rng.range(0, 99) as usize % held.len().max(1))
                else {
                    continue;
                };
                let op = Op::Refresh {
                    caller: caller.clone(),
                    zone: ZONE.into(),
                    name: (*name).into(),
                    token: *token,
                    ttl_ms: 0,
                    key: None,
                };
                if let Outcome::Applied(Reply::Refused(Refusal::NoSession)) = self.propose(op).await
                {
                    open = false;
                }
            } else if roll < 995 {
                // A pause, sometimes past the session timeout: the session
                // expires and its grants are lost.
                tokio::time::sleep(Duration::from_millis(rng.range(200, 6_000))).await;
            } else {
                let op = Op::CloseSession {
                    caller: caller.clone(),
                };
                self.propose(op).await;
                open = false;
            }
        }
    }

    /// The time driver: a `Tick` every 200 ms.
    async fn ticker(&self) {
        while !self.stopped() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.propose(Op::Tick).await;
        }
    }

    /// After the workload: commit one more command, wait until every node
    /// has applied the same index, then take their snapshots and count the
    /// heartbeats of an idle second.
    async fn finish(&self) -> Result<Final, String> {
        let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
        let index = loop {
            if tokio::time::Instant::now() >= give_up {
                return Err(format!(
                    "no command committed within 30 s after healing:{}\n{}",
                    self.views(),
                    self.probe().await
                ));
            }
            let before = lock(&self.shared.acked).len();
            if let Outcome::Applied(_) = self.propose(Op::Tick).await {
                let acked = lock(&self.shared.acked);
                if let Some(a) = acked[before..].iter().find(|a| a.cmd.op == Op::Tick) {
                    break a.index;
                }
            }
        };
        let applied = loop {
            let idx: Vec<u64> = NODES
                .iter()
                .map(|id| self.shared.node(*id).map_or(0, |n| n.applied_index()))
                .collect();
            if idx.iter().all(|i| *i >= index) && idx.iter().all(|i| *i == idx[0]) {
                break idx[0];
            }
            if tokio::time::Instant::now() >= give_up {
                return Err(format!(
                    "nodes did not converge within 30 s after healing: applied {idx:?}, \
                     final command at {index}:{}",
                    self.views()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // An idle second of *simulated* time (turmoil drives tokio's clock;
        // no wall-clock wait): count the heartbeats the followers get.
        let before = lock(&self.shared.append_entries).clone();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = lock(&self.shared.append_entries).clone();
        let leader = self.shared.leader().map(|(id, _)| id);
        let idle_heartbeats = NODES
            .iter()
            .filter(|id| Some(**id) != leader)
            .map(|id| {
                let d = after.get(id).copied().unwrap_or(0) - before.get(id).copied().unwrap_or(0);
                (*id, d)
            })
            .collect();
        let mut snapshots = BTreeMap::new();
        for id in NODES {
            let node = self
                .shared
                .node(id)
                .ok_or_else(|| format!("node {id} is not running at the end"))?;
            if node.applied_index() != applied {
                return Err(format!(
                    "node {id} applied {} after the idle second, not {applied}",
                    node.applied_index()
                ));
            }
            let snap = lock(&node.engine()).snapshot();
            snapshots.insert(id, snap);
        }
        Ok(Final {
            index: applied,
            snapshots,
            idle_heartbeats,
        })
    }

    async fn run(self, seed: u64) -> turmoil::Result {
        // Wait for the three hosts, then initialise the cluster on node 1.
        while lock(&self.shared.nodes).len() < NODES.len() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let members: BTreeMap<NodeId, Member> = NODES.iter().map(|id| (*id, member(*id))).collect();
        let n1 = self.shared.node(1).ok_or("node 1 is not running")?;
        n1.raft()
            .initialize(members)
            .await
            .map_err(|e| format!("initialize: {e}"))?;

        let clients = (0..CLIENTS).map(|n| self.client(n, seed));
        futures::join!(futures::future::join_all(clients), self.ticker());
        let result = self.finish().await;
        *lock(&self.shared.result) = Some(result);
        Ok(())
    }
}

// ----------------------------------------------------------------------
// Faults
// ----------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum FaultKind {
    /// The leader cut off from both followers.
    PartitionLeader,
    /// The leader's messages get out, nothing comes back to it.
    OnewayToLeader,
    /// Messages between the leader and one follower held, then released.
    HoldLink,
    /// Every link slow (up to 60 ms per message).
    SlowLinks,
    /// The leader crashes, restarts from its data directory later.
    CrashLeader,
    /// A follower crashes, restarts later.
    CrashFollower,
}

struct Fault {
    at: u64,
    len: u64,
    kind: FaultKind,
}

/// The server's default Raft options; with `compact`, snapshots (and log
/// purges) every 100 entries, keeping 20, so restarts start from a snapshot
/// and a follower that was down catches up by InstallSnapshot.
fn raft_options(compact: bool) -> RaftOptions {
    let mut o = RaftOptions::default();
    if compact {
        o.snapshot_every_entries = 100;
        o.logs_kept_after_snapshot = 20;
    }
    o
}

/// Whether the seed runs with frequent snapshots: `OCLOCKS_TURMOIL_SNAPSHOTS`
/// is `mix` (the default: half the seeds, by seed), `on` or `off`.
///
/// Snapshots found a liveness bug of `RaftNode`'s batcher (`raft/node.rs`,
/// `run_batcher`): a leader cut off with proposals in flight, caught up
/// later by InstallSnapshot, never heard back about them (openraft 0.9.25
/// purges, without answering, the client writes of entries a snapshot
/// covers when the local log does not reach the snapshot's last index), so
/// its only in-flight batch permit was never released and, once it led
/// again, nothing it was given was proposed
/// (`deposed_leader_caught_up_by_a_snapshot_keeps_proposing` forces it).
/// Fixed: the batcher stops waiting a grace period after the node stops
/// leading the batch's term.
fn compacting(seed: u64) -> bool {
    match std::env::var("OCLOCKS_TURMOIL_SNAPSHOTS").as_deref() {
        Ok("on") => true,
        Ok("mix") | Err(_) => Rng::new(seed ^ 0x5a5a).chance(50),
        Ok("off") => false,
        Ok(other) => panic!("OCLOCKS_TURMOIL_SNAPSHOTS={other:?}: expected off, on or mix"),
    }
}

fn plan(seed: u64) -> Vec<Fault> {
    let mut rng = Rng::new(seed);
    let mut at = FAULTS_FROM_MS;
    let mut out = Vec::new();
    for i in 0..FAULTS {
        let kind = if i == 0 {
            // Always take the leader away first: a leader change.
            if rng.chance(50) {
                FaultKind::PartitionLeader
            } else {
                FaultKind::CrashLeader
            }
        } else {
            match rng.range(0, 5) {
                0 => FaultKind::PartitionLeader,
                1 => FaultKind::OnewayToLeader,
                2 => FaultKind::HoldLink,
                3 => FaultKind::SlowLinks,
                4 => FaultKind::CrashLeader,
                _ => FaultKind::CrashFollower,
            }
        };
        // The first is long enough for a new leader to be elected.
        let len = if i == 0 {
            rng.range(4_000, 5_000)
        } else {
            rng.range(1_000, 3_000)
        };
        out.push(Fault { at, len, kind });
        at += len + rng.range(800, 2_000);
    }
    out
}

/// What a fault did, to undo it.
enum Undo {
    Repair(Vec<(String, String)>),
    RepairOneway(Vec<(String, String)>),
    Release(String, String),
    Latency,
    Restart(NodeId),
}

const LATENCY_MAX: Duration = Duration::from_millis(5);
const LATENCY_SLOW: Duration = Duration::from_millis(60);

// ----------------------------------------------------------------------
// One seed
// ----------------------------------------------------------------------

/// One leader taken away and a new one elected, in simulated ms.
#[derive(Debug)]
struct Failover {
    /// From the fault to the new leader.
    since_fault: u64,
    /// From the last AppendEntries the new leader accepted (before its
    /// election) to its election; `None` if it never accepted one.
    since_contact: Option<u64>,
}

struct Summary {
    sim_ms: u64,
    final_index: u64,
    acked: usize,
    indeterminate: u64,
    stats: Stats,
    failovers: Vec<Failover>,
    idle_heartbeats: BTreeMap<NodeId, u64>,
    trace: Vec<String>,
}

/// What the committed record holds.
#[derive(Default)]
struct Stats {
    /// Terms in which commands the driver got replies for were stamped.
    terms: usize,
    grants: usize,
    /// Of which to a waiting LOCK.
    queued_grants: usize,
    lost: usize,
    sessions_expired: usize,
    /// The record starts at this index (after a snapshot, if the logs were
    /// compacted); replies for earlier entries are not checked against it.
    record_from: u64,
    acked_before_record: usize,
    /// Snapshots installed from a leader (`AppliedBatch::resync`).
    snapshots_installed: usize,
    /// The engine snapshot's hash at the end.
    hash: u64,
}

fn data_root() -> tempfile::TempDir {
    // tmpfs keeps the fsyncs cheap; the code path is the same.
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("oclocks-turmoil-")
            .tempdir_in(shm)
        {
            return d;
        }
    }
    tempfile::Builder::new()
        .prefix("oclocks-turmoil-")
        .tempdir()
        .expect("temporary directory")
}

fn run_seed(seed: u64) -> Result<Summary, (String, Vec<String>)> {
    let root = data_root();
    let dirs: BTreeMap<NodeId, PathBuf> = NODES
        .iter()
        .map(|id| (*id, root.path().join(format!("node-{id}"))))
        .collect();
    let shared = Arc::new(Shared::default());
    let compact = compacting(seed);
    let mut trace = vec![format!(
        "snapshots every {} entries",
        raft_options(compact).snapshot_every_entries
    )];

    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(Duration::from_millis(SIM_LIMIT_MS + 10_000))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(LATENCY_MAX)
        // Room for the SYNs and segments a released hold delivers at once.
        .tcp_capacity(4096)
        .build();
    for id in NODES {
        let (dir, shared) = (dirs[&id].clone(), shared.clone());
        let options = raft_options(compact);
        sim.host(host(id), move || {
            run_host(id, dir.clone(), options.clone(), shared.clone())
        });
    }
    let driver_shared = shared.clone();
    sim.client("driver", async move {
        // The driver's clock is its own (simulated) runtime's.
        let driver = Driver {
            shared: driver_shared,
            start: tokio::time::Instant::now(),
            stamper: tokio::sync::Mutex::new(Stamper {
                term: 0,
                rebase_pending: false,
            }),
        };
        driver.run(seed).await
    });

    let faults = plan(seed);
    let heal_at = faults.last().map_or(FAULTS_FROM_MS, |f| f.at + f.len);
    let mut next_fault = 0;
    let mut undo: Vec<(u64, Undo)> = Vec::new();
    let mut failovers = Vec::new();
    // (since, term of the leader taken away) while waiting for a new leader.
    let mut awaiting_leader: Option<(u64, u64)> = None;
    let pairs = |a: NodeId| -> Vec<(String, String)> {
        NODES
            .iter()
            .filter(|b| **b != a)
            .map(|b| (host(a), host(*b)))
            .collect()
    };

    let fail = |msg: String, trace: &[String]| -> Result<Summary, (String, Vec<String>)> {
        Err((msg, trace.to_vec()))
    };
    loop {
        let done = match sim.step() {
            Ok(d) => d,
            Err(e) => return fail(format!("simulation error: {e}"), &trace),
        };
        if done {
            break;
        }
        let now = sim.elapsed().as_millis() as u64;
        if now > SIM_LIMIT_MS {
            return fail(format!("not finished after {SIM_LIMIT_MS} ms"), &trace);
        }
        if let Some((since, old_term)) = awaiting_leader {
            if let Some((id, term)) = shared.leader() {
                if term > old_term {
                    let since_contact = lock(&shared.leader_contact)
                        .get(&id)
                        .map(|c| now.saturating_sub(*c));
                    failovers.push(Failover {
                        since_fault: now - since,
                        since_contact,
                    });
                    trace.push(format!(
                        "{now:>6} ms: node {id} leads term {term} ({since_contact:?} ms \
                         after the last AppendEntries it accepted)"
                    ));
                    awaiting_leader = None;
                }
            }
        }
        // Undo what is due.
        let mut i = 0;
        while i < undo.len() {
            if undo[i].0 > now {
                i += 1;
                continue;
            }
            let (_, u) = undo.swap_remove(i);
            // Failover is measured within the fault only.
            awaiting_leader = None;
            match u {
                Undo::Repair(p) => {
                    for (a, b) in p {
                        sim.repair(a.as_str(), b.as_str());
                    }
                    trace.push(format!("{now:>6} ms: repaired"));
                }
                Undo::RepairOneway(p) => {
                    for (a, b) in p {
                        sim.repair_oneway(a.as_str(), b.as_str());
                    }
                    trace.push(format!("{now:>6} ms: repaired one-way"));
                }
                Undo::Release(a, b) => {
                    sim.release(a.as_str(), b.as_str());
                    trace.push(format!("{now:>6} ms: released {a}-{b}"));
                }
                Undo::Latency => {
                    for a in NODES {
                        for (x, y) in pairs(a) {
                            sim.set_link_max_message_latency(x.as_str(), y.as_str(), LATENCY_MAX);
                        }
                    }
                    trace.push(format!("{now:>6} ms: links fast again"));
                }
                Undo::Restart(id) => {
                    sim.bounce(host(id));
                    trace.push(format!("{now:>6} ms: restarted node {id}"));
                }
            }
        }
        // Start what is due.
        if next_fault < faults.len() && faults[next_fault].at <= now {
            let f = &faults[next_fault];
            next_fault += 1;
            let Some((leader, term)) = shared.leader() else {
                trace.push(format!("{now:>6} ms: {:?} skipped: no leader", f.kind));
                continue;
            };
            let until = now + f.len;
            let follower = NODES
                .iter()
                .copied()
                .filter(|n| *n != leader)
                .nth((seed as usize + next_fault) % 2)
                .unwrap_or(leader);
            match f.kind {
                FaultKind::PartitionLeader => {
                    for (a, b) in pairs(leader) {
                        sim.partition(a.as_str(), b.as_str());
                    }
                    undo.push((until, Undo::Repair(pairs(leader))));
                    awaiting_leader = Some((now, term));
                }
                FaultKind::OnewayToLeader => {
                    let p: Vec<(String, String)> =
                        pairs(leader).into_iter().map(|(a, b)| (b, a)).collect();
                    for (from, to) in &p {
                        sim.partition_oneway(from.as_str(), to.as_str());
                    }
                    undo.push((until, Undo::RepairOneway(p)));
                    // TCP needs both directions: the followers stop hearing
                    // heartbeats too, once the leader's calls time out.
                    awaiting_leader = Some((now, term));
                }
                FaultKind::HoldLink => {
                    sim.hold(host(leader), host(follower));
                    undo.push((until, Undo::Release(host(leader), host(follower))));
                }
                FaultKind::SlowLinks => {
                    for a in NODES {
                        for (x, y) in pairs(a) {
                            sim.set_link_max_message_latency(x.as_str(), y.as_str(), LATENCY_SLOW);
                        }
                    }
                    undo.push((until, Undo::Latency));
                }
                FaultKind::CrashLeader | FaultKind::CrashFollower => {
                    let victim = if matches!(f.kind, FaultKind::CrashLeader) {
                        awaiting_leader = Some((now, term));
                        leader
                    } else {
                        follower
                    };
                    // Nothing outside the host may keep its handle: the
                    // restart reopens the same data directory.
                    lock(&shared.nodes).remove(&victim);
                    sim.crash(host(victim));
                    undo.push((until, Undo::Restart(victim)));
                }
            }
            trace.push(format!(
                "{now:>6} ms: {:?} for {} ms (leader {leader}, term {term}, other {follower})",
                f.kind, f.len
            ));
        }
        if next_fault == faults.len()
            && undo.is_empty()
            && now >= heal_at + AFTER_HEAL_MS
            && !shared.stop_workload.swap(true, Ordering::Relaxed)
        {
            trace.push(format!("{now:>6} ms: workload stopped"));
        }
    }
    let sim_ms = sim.elapsed().as_millis() as u64;
    // Stop every node (drops the runtimes, closes the stores).
    lock(&shared.nodes).clear();
    drop(sim);

    let result = lock(&shared.result).take();
    let fin = match result {
        Some(Ok(f)) => f,
        Some(Err(e)) => return fail(e, &trace),
        None => return fail("the driver gave no result".into(), &trace),
    };
    let checked = check(&shared, &dirs, &fin, &failovers);
    match checked {
        Ok(stats) => Ok(Summary {
            sim_ms,
            final_index: fin.index,
            acked: lock(&shared.acked).len(),
            indeterminate: shared.indeterminate.load(Ordering::Relaxed),
            stats,
            failovers,
            idle_heartbeats: fin.idle_heartbeats.clone(),
            trace,
        }),
        Err(e) => fail(e, &trace),
    }
}

// ----------------------------------------------------------------------
// The checks
// ----------------------------------------------------------------------

/// The committed log of `dir`, read back from its log store.
fn read_log(dir: &Path) -> Result<Vec<Entry>, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let log = LogStore::open(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        log.load_entries((Bound::Unbounded, Bound::Unbounded))
            .await
            .map_err(|e| format!("{}: {e}", dir.display()))
    })
}

/// The latest snapshot stored in `dir`, read back through the state
/// machine: its engine and last index.
fn read_snapshot(dir: &Path) -> Result<Option<(Engine, u64)>, String> {
    let (tx, _rx) = mpsc::unbounded_channel();
    let sm = StateMachineStore::open(dir, EngineLimits::default(), tx)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let Some(last) = sm.last_applied() else {
        return Ok(None);
    };
    let bytes = lock(&sm.engine()).snapshot();
    let engine = Engine::restore(EngineLimits::default(), &bytes).map_err(|e| e.to_string())?;
    Ok(Some((engine, last.index)))
}

/// One applied command of the replay.
struct Step {
    cmd: Command,
    reply: Reply,
    effects: Vec<Effect>,
}

#[derive(Default)]
struct LockRecord {
    last_token: Token,
    holders: BTreeMap<Token, (ClientId, Mode)>,
}

/// The record's steps of `client` (and those that mention it) up to
/// `upto`, for a failure message.
fn story(steps: &BTreeMap<u64, Vec<Step>>, client: ClientId, upto: u64) -> String {
    let needle = format!("client: {client}");
    let mut out = String::new();
    for (i, v) in steps.range(..=upto) {
        for s in v {
            let text = format!("{:?} -> {:?} {:?}", s.cmd, s.reply, s.effects);
            if text.contains(&needle) {
                out.push_str(&format!("  {i}: {text}\n"));
            }
        }
    }
    out
}

fn check(
    shared: &Shared,
    dirs: &BTreeMap<NodeId, PathBuf>,
    fin: &Final,
    failovers: &[Failover],
) -> Result<Stats, String> {
    let mut stats = Stats::default();

    // (a) the engines agree.
    let first = &fin.snapshots[&NODES[0]];
    for (id, s) in &fin.snapshots {
        if s != first {
            return Err(format!(
                "engine snapshots differ at index {}: node {} {:016x}, node {id} {:016x}",
                fin.index,
                NODES[0],
                fnv(first),
                fnv(s)
            ));
        }
    }

    // (a) so do the logs, wherever two of them hold the same index; each is
    // contiguous up to the final index (or a snapshot covers it).
    let mut logs: BTreeMap<NodeId, Vec<Entry>> = BTreeMap::new();
    let mut snaps: BTreeMap<NodeId, Option<(Engine, u64)>> = BTreeMap::new();
    let mut seen: BTreeMap<u64, (NodeId, Vec<u8>)> = BTreeMap::new();
    for (id, dir) in dirs {
        let entries: Vec<Entry> = read_log(dir)?
            .into_iter()
            .filter(|e| e.log_id.index <= fin.index)
            .collect();
        let snap = read_snapshot(dir)?;
        let snap_index = snap.as_ref().map(|(_, i)| *i);
        for w in entries.windows(2) {
            if w[1].log_id.index != w[0].log_id.index + 1 {
                return Err(format!(
                    "node {id}: log entry {} follows {}",
                    w[1].log_id.index, w[0].log_id.index
                ));
            }
        }
        let last = entries.last().map(|e| e.log_id.index);
        if last != Some(fin.index) && snap_index < Some(fin.index) {
            return Err(format!(
                "node {id}: log ends at {last:?}, snapshot at {snap_index:?}, final index {}",
                fin.index
            ));
        }
        for e in &entries {
            let b = postcard::to_stdvec(e).map_err(|e| e.to_string())?;
            match seen.get(&e.log_id.index) {
                Some((other, ob)) if *ob != b => {
                    return Err(format!(
                        "nodes {other} and {id} hold different committed entries at {}",
                        e.log_id.index
                    ))
                }
                Some(_) => {}
                None => {
                    seen.insert(e.log_id.index, (*id, b));
                }
            }
        }
        logs.insert(*id, entries);
        snaps.insert(*id, snap);
    }

    // The record: the committed log replayed through a fresh engine, from
    // the earliest point some node can give — index 0 (openraft's
    // `initialize` writes the first membership there) or a snapshot whose
    // next entries are still in that node's log.
    let mut base: Option<(NodeId, u64)> = None;
    for (id, entries) in &logs {
        let from = match &snaps[id] {
            None => 0,
            Some((_, i)) => i + 1,
        };
        let first_index = entries.first().map_or(u64::MAX, |e| e.log_id.index);
        let complete = first_index <= from || from > fin.index;
        if complete && base.is_none_or(|(_, b)| from < b) {
            base = Some((*id, from));
        }
    }
    let (base_node, from) = base.ok_or("no node holds the log after its snapshot")?;
    stats.record_from = from;
    let (mut engine, mut locks, mut last_token) = match snaps.remove(&base_node).flatten() {
        None => (Engine::new(EngineLimits::default()), BTreeMap::new(), 0),
        Some((engine, _)) => {
            // The grants held at the snapshot start the record.
            let mut locks: BTreeMap<String, LockRecord> = BTreeMap::new();
            for name in LOCKS {
                if let Some(info) = engine.query(ZONE, name) {
                    let l = locks.entry(format!("{ZONE}/{name}")).or_default();
                    for h in info.holders {
                        l.last_token = l.last_token.max(h.token);
                        l.holders.insert(h.token, (h.client, h.mode));
                    }
                }
            }
            let last = engine.last_token();
            (engine, locks, last)
        }
    };
    let mut steps: BTreeMap<u64, Vec<Step>> = BTreeMap::new();
    for e in logs[&base_node].iter().filter(|e| e.log_id.index >= from) {
        if let EntryPayload::Normal(p) = &e.payload {
            let v = steps.entry(e.log_id.index).or_default();
            for cmd in &p.commands {
                let a = engine.apply(cmd.clone());
                v.push(Step {
                    cmd: cmd.clone(),
                    reply: a.reply,
                    effects: a.effects,
                });
            }
        }
    }
    if &engine.snapshot() != first {
        return Err(format!(
            "replaying the committed log from index {from} (node {base_node}) gives \
             another engine state"
        ));
    }

    // (b) every reply the driver got is in the log at its index.
    let acked = lock(&shared.acked);
    for a in acked.iter() {
        if a.index < from {
            stats.acked_before_record += 1;
            continue;
        }
        let found = steps
            .get(&a.index)
            .is_some_and(|v| v.iter().any(|s| s.cmd == a.cmd && s.reply == a.reply));
        if !found {
            return Err(format!(
                "acknowledged {:?} (reply {:?}) is not in the committed log at index {}",
                a.cmd, a.reply, a.index
            ));
        }
    }
    let terms: BTreeSet<u64> = acked.iter().map(|a| a.cmd.term).collect();
    drop(acked);

    // (b) each node's effects feed is the record's; before the record, the
    // nodes' feeds agree with each other.
    let record: Vec<(u64, Vec<Effect>)> = steps
        .iter()
        .map(|(i, v)| (*i, v.iter().flat_map(|s| s.effects.clone()).collect()))
        .filter(|(_, e): &(u64, Vec<Effect>)| !e.is_empty())
        .collect();
    let by_index: BTreeMap<u64, &Vec<Effect>> = record.iter().map(|(i, e)| (*i, e)).collect();
    let feeds = lock(&shared.feeds);
    let boots = lock(&shared.boots);
    let mut early: BTreeMap<u64, (NodeId, &Vec<Effect>)> = BTreeMap::new();
    for id in NODES {
        let last_boot = boots.get(&id).copied().unwrap_or(0);
        let snap_index = read_snapshot(&dirs[&id])?.map(|(_, i)| i);
        // From where its last boot fed every batch: after its snapshot
        // (it started from it or a later one replaced nothing), after the
        // last snapshot it installed.
        let mut complete_from = snap_index.map_or(0, |i| i + 1).max(from);
        let mut last: Vec<(u64, Vec<Effect>)> = Vec::new();
        for f in feeds.iter().filter(|f| f.node == id) {
            let (index, effects) = (f.batch.log_index, &f.batch.effects);
            if f.batch.resync {
                stats.snapshots_installed += 1;
                if f.boot == last_boot {
                    complete_from = complete_from.max(index + 1);
                }
                continue;
            }
            if index > fin.index {
                continue;
            }
            if index >= from {
                if by_index.get(&index) != Some(&effects) {
                    return Err(format!(
                        "node {id} (boot {}) fed effects {effects:?} for index {index}, the \
                         record has {:?}",
                        f.boot,
                        by_index.get(&index)
                    ));
                }
            } else {
                match early.get(&index) {
                    Some((other, e)) if *e != effects => {
                        return Err(format!(
                            "nodes {other} and {id} fed different effects for index {index}"
                        ))
                    }
                    Some(_) => {}
                    None => {
                        early.insert(index, (id, effects));
                    }
                }
            }
            if f.boot == last_boot {
                last.push((index, effects.clone()));
            }
        }
        last.retain(|(i, _)| *i >= complete_from);
        let want: Vec<(u64, Vec<Effect>)> = record
            .iter()
            .filter(|(i, _)| *i >= complete_from)
            .cloned()
            .collect();
        if last != want {
            return Err(format!(
                "node {id}'s feed in boot {last_boot} has {} batches from index \
                 {complete_from}, the record {}",
                last.len(),
                want.len()
            ));
        }
    }
    drop((feeds, boots));

    // (b) tokens and overlaps along the record. A command is atomic (it
    // may fire expiries, grant waiters, do its operation and grant more),
    // so the holders are checked between commands: grants first (in token
    // order, which is the engine's grant order), then every end the
    // command reports.
    let submitted = lock(&shared.submitted_locks);
    let mut waits: HashMap<(ClientId, u64), (String, Mode)> = HashMap::new();
    for (index, v) in &steps {
        for s in v {
            let at = |what: String| format!("index {index}, {:?}: {what}", s.cmd.op);
            // Grants: the reply's and the waiters'.
            let mut granted: Vec<(String, Token, ClientId, Mode)> = Vec::new();
            if let Op::Lock(req) = &s.cmd.op {
                let k = format!("{}/{}", req.zone, req.name);
                waits.insert((req.caller.client, req.nonce), (k.clone(), req.mode));
                if let Reply::Granted { token } = &s.reply {
                    granted.push((k, *token, req.caller.client, req.mode));
                }
            }
            for e in &s.effects {
                if let Effect::Granted {
                    client,
                    nonce,
                    zone,
                    name,
                    token,
                } = e
                {
                    let k = format!("{zone}/{name}");
                    let key = (*client, *nonce);
                    let mode = match waits.get(&key).or_else(|| submitted.get(&key)) {
                        Some((wk, m)) if *wk == k => *m,
                        _ => return Err(at(format!("grant of unknown wait {client:x}/{nonce}"))),
                    };
                    stats.queued_grants += 1;
                    granted.push((k, *token, *client, mode));
                }
            }
            granted.sort_by_key(|g| g.1);
            let mut touched: BTreeSet<String> = BTreeSet::new();
            for (k, token, client, mode) in granted {
                stats.grants += 1;
                if token <= last_token {
                    return Err(at(format!(
                        "token {token} on {k} after token {last_token} elsewhere"
                    )));
                }
                last_token = token;
                let l = locks.entry(k.clone()).or_default();
                if token <= l.last_token {
                    return Err(at(format!(
                        "token {token} on {k} after token {}",
                        l.last_token
                    )));
                }
                l.last_token = token;
                l.holders.insert(token, (client, mode));
                touched.insert(k);
            }
            // Ends.
            let mut end = |k: &str, t: &Token| {
                if let Some(l) = locks.get_mut(k) {
                    l.holders.remove(t);
                }
            };
            for e in &s.effects {
                match e {
                    Effect::Lost {
                        zone, name, token, ..
                    } => {
                        stats.lost += 1;
                        end(&format!("{zone}/{name}"), token);
                    }
                    Effect::SessionExpired { .. } => stats.sessions_expired += 1,
                    _ => {}
                }
            }
            match (&s.cmd.op, &s.reply) {
                (
                    Op::Release {
                        zone, name, token, ..
                    },
                    Reply::Released { .. },
                ) => end(&format!("{zone}/{name}"), token),
                (Op::Cancel { caller, nonce }, Reply::Cancelled { gave_back }) => {
                    let key = (caller.client, *nonce);
                    if let (Some(t), Some((k, _))) =
                        (gave_back, waits.get(&key).or_else(|| submitted.get(&key)))
                    {
                        end(k, t);
                    }
                }
                (_, Reply::Broken { tokens }) => {
                    for l in locks.values_mut() {
                        for t in tokens {
                            l.holders.remove(t);
                        }
                    }
                }
                _ => {}
            }
            // A closed or expired session's connection grants end with it
            // (a close reports no effect per grant).
            let gone: Vec<ClientId> = s
                .effects
                .iter()
                .filter_map(|e| match e {
                    Effect::SessionExpired { client } => Some(*client),
                    _ => None,
                })
                .chain(match (&s.cmd.op, &s.reply) {
                    (Op::CloseSession { caller }, Reply::Done) => Some(caller.client),
                    _ => None,
                })
                .collect();
            for l in locks.values_mut() {
                l.holders.retain(|_, (c, _)| !gone.contains(c));
            }
            // Between commands: one exclusive holder, or only shared ones.
            for k in touched {
                let l = &locks[&k];
                let exclusive = l.holders.values().find(|(_, m)| *m == Mode::Exclusive);
                if let Some((c, _)) = exclusive.filter(|_| l.holders.len() > 1) {
                    return Err(at(format!(
                        "overlapping grants on {k} after this command: {:?}; the record of \
                         client {c:x}:\n{}",
                        l.holders,
                        story(&steps, *c, *index)
                    )));
                }
            }
        }
    }
    drop(submitted);

    // (c) a leader change, and commits in more than one term.
    let leaders = lock(&shared.leaders);
    let leader_nodes: BTreeSet<NodeId> = leaders.iter().map(|(_, n)| *n).collect();
    if leader_nodes.len() < 2 {
        return Err(format!("no leader change: {leaders:?}"));
    }
    if terms.len() < 2 {
        return Err(format!("commands committed in one term only: {terms:?}"));
    }
    // Failover follows simulated time. openraft 0.9.25 checks its timers on
    // a tick every 3/2 heartbeat intervals (`Tick::spawn` in raft/mod.rs),
    // and a follower that saw a committed leader waits out the leader lease
    // (the election timeout's maximum) plus its random election timeout
    // (engine_config.rs, `handle_tick_election`) before it campaigns: 1.5–2 s
    // with our options, counted from the last AppendEntries it accepted
    // (`update_vote` touches the lease; a vote it grants later, after the
    // lease, restarts the wait). So the new leader is elected no sooner than
    // lease + minimum election timeout after its last accepted
    // AppendEntries (less 10 ms for the order of steps within one simulated
    // ms). That last contact can come well before the fault: while a
    // follower's append waits for the log's flush thread (real time, during
    // which simulated time runs on), its replication stream sends it no
    // heartbeat. Past 5 s from the fault something is wrong (split votes add
    // an election timeout each).
    let opts = RaftOptions::default();
    let tick = opts.heartbeat_interval_ms * 3 / 2;
    if failovers.is_empty() {
        return Err("the leader was taken away but no failover was seen".into());
    }
    let lo = opts.election_timeout_max_ms + opts.election_timeout_min_ms - 10;
    for f in failovers {
        let early = f.since_contact.is_some_and(|ms| ms < lo);
        if early || f.since_fault > 5 * opts.election_timeout_max_ms {
            return Err(format!(
                "failover {f:?} in simulated ms (lease {} ms + election timeout {}–{} ms \
                 after the new leader's last accepted AppendEntries; at most {} ms after \
                 the fault)",
                opts.election_timeout_max_ms,
                opts.election_timeout_min_ms,
                opts.election_timeout_max_ms,
                5 * opts.election_timeout_max_ms,
            ));
        }
    }
    // Heartbeats: one per tick of simulated time (heartbeats are sent on a
    // tick when one is due).
    let expect = 1_000 / tick;
    for (id, n) in &fin.idle_heartbeats {
        if n.abs_diff(expect) > 2 {
            return Err(format!(
                "follower {id} got {n} AppendEntries in an idle simulated second, \
                 expected one per {tick} ms"
            ));
        }
    }
    stats.terms = terms.len();
    stats.hash = fnv(first);
    Ok(stats)
}

// ----------------------------------------------------------------------
// The test
// ----------------------------------------------------------------------

fn parse_seed(s: &str) -> u64 {
    let s = s.trim();
    let parsed = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    parsed.unwrap_or_else(|_| panic!("bad seed {s:?}"))
}

#[test]
fn real_nodes_under_simulated_network_and_clock() {
    let seeds: Vec<u64> = match std::env::var("OCLOCKS_TURMOIL_SEED") {
        Ok(s) => vec![parse_seed(&s)],
        Err(_) => {
            let n = std::env::var("OCLOCKS_TURMOIL_SEEDS")
                .ok()
                .map_or(DEFAULT_SEEDS, |s| parse_seed(&s));
            (1..=n).collect()
        }
    };
    for seed in seeds {
        println!("turmoil cluster: seed {seed:#x}");
        let started = std::time::Instant::now();
        match run_seed(seed) {
            Ok(s) => {
                let st = &s.stats;
                println!(
                    "  ok in {:.1} s: {} ms simulated, final index {}, {} replies \
                     ({} indeterminate), commits in {} terms, failovers {:?} ms after the \
                     fault, engine \
                     {:016x}",
                    started.elapsed().as_secs_f64(),
                    s.sim_ms,
                    s.final_index,
                    s.acked,
                    s.indeterminate,
                    st.terms,
                    s.failovers
                        .iter()
                        .map(|f| f.since_fault)
                        .collect::<Vec<_>>(),
                    st.hash
                );
                println!(
                    "  record from index {} ({} earlier replies unchecked): {} grants ({} to \
                     waiters), {} lost, {} sessions expired; {} snapshots installed; idle \
                     heartbeats/s {:?}",
                    st.record_from,
                    st.acked_before_record,
                    st.grants,
                    st.queued_grants,
                    st.lost,
                    st.sessions_expired,
                    st.snapshots_installed,
                    s.idle_heartbeats,
                );
                for t in &s.trace {
                    println!("    {t}");
                }
            }
            Err((e, trace)) => {
                for t in &trace {
                    eprintln!("    {t}");
                }
                let snapshots = std::env::var("OCLOCKS_TURMOIL_SNAPSHOTS")
                    .map(|v| format!("OCLOCKS_TURMOIL_SNAPSHOTS={v} "))
                    .unwrap_or_default();
                panic!(
                    "seed {seed:#x} failed: {e}\nreplay (runs differ in timing, see the \
                     module docs): {snapshots}OCLOCKS_TURMOIL_SEED={seed:#x} cargo test -p \
                     oclocks-server --test turmoil_cluster -- --nocapture"
                );
            }
        }
    }
}

// ----------------------------------------------------------------------
// A forced scenario: a deposed leader caught up by a snapshot
// ----------------------------------------------------------------------

/// Stamp `op` with `node`'s term (it must lead) and submit it there.
async fn submit_at(node: &RaftNode, now_ms: u64, op: Op) -> Result<PendingReply, String> {
    let term = node
        .leader_term()
        .ok_or_else(|| format!("node {} does not lead", node.node_id()))?;
    node.submit(Command { term, now_ms, op })
        .await
        .map_err(|e| e.to_string())
}

async fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("{what}: not within {secs} s"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Wait for the three nodes, initialize the cluster on node 1 and wait
/// for a leader.
async fn initialize_and_elect(shared: &Shared) -> Result<(), String> {
    wait_until("three nodes", 5, || {
        lock(&shared.nodes).len() == NODES.len()
    })
    .await?;
    let members: BTreeMap<NodeId, Member> = NODES.iter().map(|id| (*id, member(*id))).collect();
    let n1 = shared.node(1).ok_or("node 1 is not running")?;
    n1.raft()
        .initialize(members)
        .await
        .map_err(|e| format!("initialize: {e}"))?;
    wait_until("a leader", 10, || shared.leader().is_some()).await?;
    Ok(())
}

/// The leader is cut off with a proposal in flight (appended only to its
/// own log); the others elect a leader, commit past a snapshot and purge
/// the log; once healed, the old leader is caught up by InstallSnapshot
/// (whose last index is beyond its own last entry, so openraft purges that
/// entry instead of truncating it); then it is made leader again.
async fn deposed_leader_scenario(shared: Arc<Shared>) -> Result<String, String> {
    let start = tokio::time::Instant::now();
    let now = || start.elapsed().as_millis() as u64;
    initialize_and_elect(&shared).await?;
    let (old, old_term) = shared.leader().ok_or("no leader")?;
    let old_node = shared.node(old).ok_or("no old leader")?;
    let others: Vec<NodeId> = NODES.iter().copied().filter(|n| *n != old).collect();
    let caller = Caller {
        client: 0xdead,
        identity: "scenario".into(),
    };
    let open = Op::OpenSession {
        caller: caller.clone(),
        timeout_ms: 600_000,
    };
    submit_at(&old_node, now(), open.clone())
        .await?
        .await
        .map_err(|e| e.to_string())?;

    for o in &others {
        turmoil::partition(host(old), host(*o));
    }
    // In flight on the cut-off leader: appended there, never committed.
    let mut stranded = submit_at(&old_node, now(), Op::Tick).await?;

    wait_until("a new leader", 10, || {
        shared.leader().is_some_and(|(_, t)| t > old_term)
    })
    .await?;
    let (new, _) = shared.leader().ok_or("no new leader")?;
    let new_node = shared.node(new).ok_or("no new leader node")?;
    for _ in 0..500 {
        submit_at(&new_node, now(), Op::Tick)
            .await?
            .await
            .map_err(|e| e.to_string())?;
    }
    let target = new_node.applied_index();
    let (purged, old_last) = {
        let m = new_node.raft().metrics().borrow().clone();
        let o = old_node.raft().metrics().borrow().clone();
        (m.purged.map(|l| l.index), o.last_log_index)
    };
    for o in &others {
        turmoil::repair(host(old), host(*o));
    }
    wait_until("the old leader caught up", 20, || {
        old_node.applied_index() >= target
    })
    .await?;
    let installed = lock(&shared.feeds)
        .iter()
        .any(|f| f.node == old && f.batch.resync);
    if !installed {
        return Err("the old leader was not caught up by a snapshot".into());
    }
    let mut report = format!(
        "node {old} led term {old_term} and was cut off with its log up to {old_last:?}; \
         node {new} took over, committed up to {target} and purged its log up to \
         {purged:?}; healed, node {old} installed a snapshot up to {target}"
    );
    // Its stranded proposal must have been answered by now (an error: its
    // entry is gone).
    let answered = tokio::time::timeout(Duration::from_secs(3), &mut stranded).await;
    report.push_str(&format!("; the stranded proposal: {answered:?}"));

    // Lead again, and propose.
    for _ in 0..10 {
        if old_node.leader_term().is_some() {
            break;
        }
        let _ = old_node.raft().trigger().elect().await;
        let _ = wait_until("", 2, || old_node.leader_term().is_some()).await;
    }
    let term = old_node.leader_term().ok_or("not leading")?;
    let direct = tokio::time::timeout(
        Duration::from_secs(3),
        old_node.raft().client_write(Proposal {
            commands: vec![Command {
                term,
                now_ms: now(),
                op: Op::Tick,
            }],
        }),
    )
    .await;
    report.push_str(&format!(
        "; leading term {term}, a direct openraft write: {}",
        match &direct {
            Ok(Ok(r)) => format!("committed at {}", r.log_id.index),
            Ok(Err(e)) => format!("error {e}"),
            Err(_) => "no answer in 3 s".into(),
        }
    ));
    let proposed = match submit_at(&old_node, now(), Op::Tick).await {
        Ok(p) => tokio::time::timeout(Duration::from_secs(5), p).await,
        Err(e) => return Err(format!("{report}; submit: {e}")),
    };
    report.push_str(&format!("; RaftNode::propose: {proposed:?}"));
    if answered.is_err() || !matches!(proposed, Ok(Ok(_))) {
        return Err(report);
    }
    Ok(report)
}

/// A leader deposed with a proposal in flight and caught up by a snapshot
/// must answer that proposal and go on proposing once it leads again.
///
/// openraft 0.9.25 answers the client write of a purged entry neither when
/// it installs the snapshot (`following_handler::install_full_snapshot`
/// truncates only when the local log holds a conflicting entry at the
/// snapshot's last index, and only truncation answers pending writes) nor
/// later; `RaftNode::run_batcher` (`raft/node.rs`) kept its in-flight batch
/// permit (`max_inflight_batches` = 1) until that answer came, so the node
/// never proposed again. It now gives up waiting `DEPOSED_REPLY_GRACE`
/// after losing the lead (fails without that: shown 4/4 before the fix).
#[test]
fn deposed_leader_caught_up_by_a_snapshot_keeps_proposing() {
    run_scenario(7, 120, raft_options(true), deposed_leader_scenario);
}

/// Three nodes (fresh data directories, `options`) and a driver running `scenario` on a simulated network (`rng_seed`),
/// at most `secs` of simulated time; panics with the scenario's report if
/// it fails.
fn run_scenario<F, Fut>(rng_seed: u64, secs: u64, options: RaftOptions, scenario: F)
where
    F: FnOnce(Arc<Shared>) -> Fut,
    Fut: std::future::Future<Output = Result<String, String>> + 'static,
{
    let root = data_root();
    let shared = Arc::new(Shared::default());
    let mut sim = turmoil::Builder::new()
        .rng_seed(rng_seed)
        .simulation_duration(Duration::from_secs(secs))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(LATENCY_MAX)
        .tcp_capacity(4096)
        .build();
    for id in NODES {
        let (dir, shared) = (root.path().join(format!("node-{id}")), shared.clone());
        let options = options.clone();
        sim.host(host(id), move || {
            run_host(id, dir.clone(), options.clone(), shared.clone())
        });
    }
    let result: Arc<Mutex<Option<Result<String, String>>>> = Arc::default();
    let r = result.clone();
    let run = scenario(shared.clone());
    sim.client("driver", async move {
        *lock(&r) = Some(run.await);
        Ok(())
    });
    sim.run().expect("simulation");
    lock(&shared.nodes).clear();
    drop(sim);
    let outcome = lock(&result).take().expect("the scenario finished");
    match outcome {
        Ok(report) => println!("{report}"),
        Err(report) => panic!("{report}"),
    }
}

/// The leader replicates its appends while its own disk is still flushing
/// them, and counts itself in the commit quorum only once its flush is
/// reported (our patch of openraft 0.9.25, `vendor/openraft/PATCHED.md`).
///
/// With the leader's flush reports held back (`LogStats` test hook: the
/// data is written, the report withheld): (1) with both followers up, a
/// command commits on their disks alone; (2) with one follower cut off,
/// nothing commits — the leader's unreported append must not count — and
/// (3) it commits once the leader's report arrives. Unpatched openraft
/// fails (1) (its core waits for the leader's flush before it replicates);
/// counting the leader at submission fails (2).
#[test]
fn leader_replicates_while_it_flushes_and_counts_itself_after() {
    // A follower's flush runs on raft-log's thread in real time while the
    // simulated clock runs on (see the module docs), and its replication
    // stream sends no heartbeat meanwhile: long election timeouts keep a
    // slow flush on a loaded machine from starting an election mid-test.
    let mut options = raft_options(false);
    options.election_timeout_min_ms = 10_000;
    options.election_timeout_max_ms = 20_000;
    run_scenario(11, 300, options, held_flush_scenario);
}

async fn held_flush_scenario(shared: Arc<Shared>) -> Result<String, String> {
    let start = tokio::time::Instant::now();
    let now = || start.elapsed().as_millis() as u64;
    initialize_and_elect(&shared).await?;
    let (leader, term) = shared.leader().ok_or("no leader")?;
    let node = shared.node(leader).ok_or("no leader node")?;
    let others: Vec<NodeId> = NODES.iter().copied().filter(|n| *n != leader).collect();
    // One command with every report delivered: the cluster works.
    let warm = submit_at(&node, now(), Op::Tick).await?;
    tokio::time::timeout(Duration::from_secs(5), warm)
        .await
        .map_err(|_| "no commit before the hold".to_string())?
        .map_err(|e| e.to_string())?;

    let stats = node.log_stats();
    stats.hold_append_reports_for_tests();
    // (1) Both followers up: commits on their disks while the leader's
    // report is held (10 s of simulated time; a commit takes milliseconds).
    let both = submit_at(&node, now(), Op::Tick).await?;
    let one = match tokio::time::timeout(Duration::from_secs(10), both).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(format!("(1) the command failed: {e}")),
        Err(_) => {
            stats.release_append_reports_for_tests();
            return Err(
                "(1) no commit in 10 s while the leader's flush report was held: the leader \
                 waits for its own flush before it replicates"
                    .into(),
            );
        }
    };
    // (2) One follower cut off: the leader's append is one of the two
    // copies a commit needs, and it is not reported on disk.
    let cut = others[1];
    turmoil::partition(host(leader), host(cut));
    let applied = node.applied_index();
    let mut pending = submit_at(&node, now(), Op::Tick).await?;
    let early = tokio::time::timeout(Duration::from_secs(1), &mut pending).await;
    let after = node.applied_index();
    let still = shared.leader();
    // (3) The report arrives: it commits with the remaining follower.
    stats.release_append_reports_for_tests();
    let late = match early {
        Ok(_) => None,
        Err(_) => Some(tokio::time::timeout(Duration::from_secs(10), &mut pending).await),
    };
    turmoil::repair(host(leader), host(cut));
    if still != Some((leader, term)) {
        return Err(format!("(2) the leader changed during the test: {still:?}"));
    }
    if let Ok(r) = early {
        return Err(format!(
            "(2) committed ({r:?}; applied {applied} -> {after}) with one follower cut off \
             and the leader's append not reported on disk: the leader counted itself \
             before its flush"
        ));
    }
    match late.ok_or("unreachable: answered early")? {
        Ok(Ok(r)) => Ok(format!(
            "leader {leader} (term {term}), its flush reports held: a command committed on \
             the followers' disks ({one:?}); with node {cut} cut off nothing committed in 1 s \
             (applied index {applied} -> {after}); the report released, it committed: {r:?}"
        )),
        Ok(Err(e)) => Err(format!("(3) the command failed: {e}")),
        Err(_) => Err("(3) no commit within 10 s of the leader's flush report".into()),
    }
}
