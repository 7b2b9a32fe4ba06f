//! The chaos workload: many clients contending on a few locks, each holder
//! of an exclusive lock doing slow read-modify-write increments of a fenced
//! register, and every operation recorded into the checker's history.
//!
//! Each client is a "process" of its own: an OS thread running a
//! current-thread tokio runtime with one `oclocks_client::Client`. So the
//! nemesis can
//! - **kill** it: the runtime is dropped without running another task — no
//!   CLOSE, no RELEASE, no CANCEL; the server sees the TCP connection close
//!   and the session expires after its timeout, exactly as for a SIGKILLed
//!   process;
//! - **pause** it: a task blocks the runtime's only thread for a while —
//!   keepalives, lease timers, the workload and its lost-lock watchers all
//!   freeze, as under SIGSTOP; afterwards every timer fires late and a
//!   holder caught mid-increment writes with its old token.
//!
//! Times are nanoseconds since the run's origin on one monotonic clock
//! (`std::time::Instant`), shared by the history, the lost-lock events, the
//! fault log and the server processes' lifetimes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use oclocks_check::{Call, Fail, FencedRegister, LockKey, OpId, Outcome, Recorder, Ret};
use oclocks_client::{Client, ClientConfig, Error, LockGuard, LostReason};
use oclocks_core::{Kind, Mode, Token};
use oclocks_proto::ErrorCode;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::record::Ns;

pub const ZONE: &str = "default";

/// A lock of the workload.
#[derive(Clone, Copy, Debug)]
pub struct LockSpec {
    pub name: &'static str,
    pub kind: Kind,
    /// Some acquires are shared.
    pub shared: bool,
}

/// The contended locks: connection and static, exclusive and shared.
pub const LOCKS: &[LockSpec] = &[
    LockSpec {
        name: "chaos-a",
        kind: Kind::Connection,
        shared: false,
    },
    LockSpec {
        name: "chaos-b",
        kind: Kind::Connection,
        shared: false,
    },
    LockSpec {
        name: "chaos-rw",
        kind: Kind::Connection,
        shared: true,
    },
    LockSpec {
        name: "chaos-static",
        kind: Kind::Static,
        shared: false,
    },
    LockSpec {
        name: "chaos-static-rw",
        kind: Kind::Static,
        shared: true,
    },
];

/// The lock names change every epoch (`chaos-a-e0`, `chaos-a-e1`, ...):
/// the checker's search is per lock, and operations whose outcome is
/// unknown stay pending for ever in it, so a lock's history must not grow
/// with the length of the run.
pub const EPOCH: Duration = Duration::from_secs(30);

/// TTL of the static locks (they must end by themselves when their owner
/// is killed).
pub const STATIC_TTL: Duration = Duration::from_secs(4);

/// One grant a client was told of.
#[derive(Clone, Debug)]
pub struct Granted {
    pub client: usize,
    pub op: OpId,
    pub lock: String,
    pub mode: Mode,
    pub kind: Kind,
    pub at: Ns,
}

/// A register access refused by the fence.
#[derive(Clone, Debug)]
pub struct FencedAccess {
    pub client: usize,
    pub lock: String,
    pub token: Token,
    pub at: Ns,
    /// The holder's guard had not reported the lock lost.
    pub guard_held: bool,
}

/// What the harness knows about one client.
#[derive(Clone, Debug, Default)]
pub struct ClientFacts {
    pub client_id: u128,
    pub started: Ns,
    /// Pauses: (from, to), generously bounded.
    pub frozen: Vec<(Ns, Ns)>,
    pub killed: Option<Ns>,
    pub closed: Option<Ns>,
}

impl ClientFacts {
    /// Whether the client could not have reacted at some point in
    /// `[from, to]` (paused or killed).
    pub fn impaired(&self, from: Ns, to: Ns) -> bool {
        self.killed.is_some_and(|k| k <= to)
            || self.frozen.iter().any(|(a, b)| *a <= to && *b >= from)
    }
}

/// Facts gathered while running, for the checks after it.
#[derive(Default)]
pub struct Facts {
    pub granted: BTreeMap<Token, Granted>,
    /// A guard's `lost()` fired: when, why.
    pub lost: BTreeMap<Token, (Ns, LostReason)>,
    /// When the holder invoked RELEASE (it stopped using the lock).
    pub release_invoked: BTreeMap<Token, Ns>,
    pub fenced: Vec<FencedAccess>,
    pub clients: Vec<ClientFacts>,
    /// Clients with an acquire in flight that may wait.
    pub waiting: std::collections::BTreeSet<usize>,
    /// Failed acquires: the error each got.
    pub acquire_errors: BTreeMap<OpId, String>,
}

impl Facts {
    /// Clients holding a grant they have not started to release.
    pub fn holders(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .granted
            .iter()
            .filter(|(t, _)| !self.release_invoked.contains_key(t))
            .map(|(_, g)| g.client)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// Counters.
#[derive(Debug, Default)]
pub struct Stats {
    pub acquires: AtomicU64,
    pub grants: AtomicU64,
    pub refused: AtomicU64,
    pub indeterminate: AtomicU64,
    pub releases: AtomicU64,
    pub increments: AtomicU64,
    pub fenced: AtomicU64,
    pub lost: AtomicU64,
    pub cancelled_waits: AtomicU64,
    /// Times a client's runtime did not run for over [`STARVED`].
    pub starved: AtomicU64,
    /// The longest such gap, in ms.
    pub starved_max_ms: AtomicU64,
}

/// A client runtime that has not run for longer than this (an overloaded
/// machine) counts as paused for that time: the client library cannot
/// react while its process is not scheduled.
pub const STARVED: Duration = Duration::from_millis(150);

/// Notices the gaps in which this client's runtime did not run.
async fn lag_monitor(shared: Arc<Shared>, idx: usize) {
    let mut last = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = Instant::now();
        let gap = now - last;
        if gap > STARVED {
            shared.stats.starved.fetch_add(1, Ordering::Relaxed);
            let ms = u64::try_from(gap.as_millis()).unwrap_or(u64::MAX);
            shared.stats.starved_max_ms.fetch_max(ms, Ordering::Relaxed);
            let (from, to) = (shared.ns(last), shared.ns(now));
            shared.facts().clients[idx].frozen.push((from, to));
        }
        last = now;
    }
}

/// The fenced resource of one lock name: a register and the increments it
/// accepted.
#[derive(Default)]
pub struct Resource {
    pub reg: FencedRegister,
    pub acked: AtomicU64,
}

/// Everything the clients share.
pub struct Shared {
    pub rec: Recorder,
    pub origin: Instant,
    /// Every lock name used, with its fenced resource.
    resources: Mutex<BTreeMap<String, Arc<Resource>>>,
    /// The current epoch of lock names.
    pub epoch: AtomicU64,
    pub stats: Stats,
    facts: Mutex<Facts>,
    /// Ask every workload loop to finish (release what it holds) and stop.
    pub stop: AtomicBool,
}

impl Shared {
    pub fn new(origin: Instant) -> Arc<Shared> {
        Arc::new(Shared {
            rec: Recorder::new(),
            origin,
            resources: Mutex::new(BTreeMap::new()),
            epoch: AtomicU64::new(0),
            stats: Stats::default(),
            facts: Mutex::new(Facts::default()),
            stop: AtomicBool::new(false),
        })
    }

    pub fn now(&self) -> Ns {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn ns(&self, at: Instant) -> Ns {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The name of `spec` in the current epoch.
    pub fn lock_name(&self, spec: &LockSpec) -> String {
        format!("{}-e{}", spec.name, self.epoch.load(Ordering::SeqCst))
    }

    /// The resource of lock `name` (made on first use).
    pub fn resource(&self, name: &str) -> Arc<Resource> {
        self.resources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Every lock name used so far, with its resource.
    pub fn resources(&self) -> Vec<(String, Arc<Resource>)> {
        self.resources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect()
    }

    pub fn facts(&self) -> MutexGuard<'_, Facts> {
        self.facts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn invoke(&self, call: Call) -> OpId {
        self.rec.invoke_at(self.now(), call)
    }

    fn complete(&self, id: OpId, outcome: Outcome) {
        match &outcome {
            Outcome::Ok(Ret::Granted { .. }) => {
                self.stats.grants.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Indeterminate => {
                self.stats.indeterminate.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Fail(_) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Ok(_) => {}
        }
        self.rec
            .complete_at(id, self.now(), outcome)
            .expect("each operation completes once");
    }
}

fn code_name(e: &Error) -> String {
    e.code()
        .map_or_else(|| "LOCAL".to_string(), |c| format!("{c:?}").to_uppercase())
}

/// The history outcome of a failed acquire. Only answers that say the LOCK
/// did not take effect are definite; anything that may have reached the
/// log is indeterminate.
fn acquire_failure(e: &Error) -> Outcome {
    match e.code() {
        Some(
            ErrorCode::Locked
            | ErrorCode::Timeout
            | ErrorCode::Deadlock
            | ErrorCode::Limit
            | ErrorCode::Invalid
            | ErrorCode::Forbidden
            | ErrorCode::NoSession
            | ErrorCode::StaleNonce
            | ErrorCode::Cancelled
            | ErrorCode::BadSignature
            | ErrorCode::NotOwner,
        ) => Outcome::Fail(Fail::Refused(code_name(e))),
        _ => match e {
            Error::NotSent { .. } => Outcome::Fail(Fail::Refused("NOT_SENT".into())),
            _ => Outcome::Indeterminate,
        },
    }
}

/// The history outcome of a failed RELEASE or REFRESH.
fn grant_op_failure(e: &Error) -> Outcome {
    match e.code() {
        Some(ErrorCode::Lost | ErrorCode::UnknownGrant) => {
            Outcome::Fail(Fail::NotHeld(code_name(e)))
        }
        Some(
            ErrorCode::NotOwner
            | ErrorCode::NoSession
            | ErrorCode::BadSignature
            | ErrorCode::Forbidden
            | ErrorCode::Invalid,
        ) => Outcome::Fail(Fail::Refused(code_name(e))),
        _ => Outcome::Indeterminate,
    }
}

/// What an acquire gave.
enum Acquired {
    Granted(LockGuard),
    No,
}

/// A client's context inside its own runtime.
struct Ctx {
    shared: Arc<Shared>,
    idx: usize,
    client: Client,
}

impl Ctx {
    fn id(&self) -> u128 {
        self.client.client_id()
    }

    fn lock_key(name: &str) -> LockKey {
        LockKey::new(ZONE, name)
    }

    /// One acquire, recorded; the guard if granted.
    async fn acquire(
        &self,
        spec: &LockSpec,
        name: &str,
        mode: Mode,
        wait: Option<Duration>,
        request_timeout: Duration,
    ) -> Acquired {
        let sh = &self.shared;
        sh.stats.acquires.fetch_add(1, Ordering::Relaxed);
        sh.resource(name);
        let mut b = self.client.lock(ZONE, name);
        if mode == Mode::Shared {
            b = b.shared();
        }
        if spec.kind == Kind::Static {
            b = b.static_lock().ttl(STATIC_TTL);
        }
        b = match wait {
            None => b.try_once(),
            Some(w) => b.wait(w),
        };
        let id = sh.invoke(Call::Acquire {
            client: self.id(),
            lock: Self::lock_key(name),
            mode,
            kind: spec.kind,
        });
        let bound = wait.unwrap_or_default() + request_timeout + Duration::from_secs(5);
        if wait.is_some() {
            sh.facts().waiting.insert(self.idx);
        }
        let result = tokio::time::timeout(bound, b.acquire()).await;
        sh.facts().waiting.remove(&self.idx);
        match result {
            Ok(Ok(guard)) => {
                let token = guard.token();
                sh.complete(id, Outcome::Ok(Ret::Granted { token }));
                sh.facts().granted.insert(
                    token,
                    Granted {
                        client: self.idx,
                        op: id,
                        lock: name.to_string(),
                        mode,
                        kind: spec.kind,
                        at: sh.now(),
                    },
                );
                Acquired::Granted(guard)
            }
            Ok(Err(e)) => {
                sh.complete(id, acquire_failure(&e));
                sh.facts().acquire_errors.insert(id, e.to_string());
                Acquired::No
            }
            Err(_) => {
                // The dropped future sends CANCEL with its nonce.
                sh.complete(id, Outcome::Indeterminate);
                sh.facts()
                    .acquire_errors
                    .insert(id, "no answer within the local bound".into());
                Acquired::No
            }
        }
    }

    /// Watch `guard` for a lost event (until `done` fires).
    fn watch_lost(&self, guard: &LockGuard) -> tokio::sync::oneshot::Sender<()> {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let lost = guard.lost();
        let token = guard.token();
        let sh = self.shared.clone();
        tokio::spawn(async move {
            tokio::select! {
                reason = lost => {
                    let at = sh.now();
                    sh.stats.lost.fetch_add(1, Ordering::Relaxed);
                    sh.facts().lost.entry(token).or_insert((at, reason));
                }
                _ = done_rx => {}
            }
        });
        done_tx
    }

    /// Release, recorded. (A RELEASE the cluster could not do now is
    /// retried by the client library, in the background after an error.)
    async fn release(&self, guard: LockGuard) {
        let sh = &self.shared;
        let token = guard.token();
        sh.stats.releases.fetch_add(1, Ordering::Relaxed);
        let id = sh.invoke(Call::Release {
            client: self.id(),
            lock: Self::lock_key(guard.name()),
            token,
        });
        sh.facts().release_invoked.insert(token, sh.now());
        let outcome = match guard.release().await {
            Ok(o) => Outcome::Ok(Ret::Released {
                already_released: o.already_released,
            }),
            Err(e) => grant_op_failure(&e),
        };
        sh.complete(id, outcome);
    }

    /// CLOSE the session (its connection locks are released), recorded.
    async fn close(&self) {
        let sh = &self.shared;
        let id = sh.invoke(Call::Close { client: self.id() });
        let outcome = match self.client.close().await {
            Ok(()) => Outcome::Ok(Ret::Closed),
            Err(_) => Outcome::Indeterminate,
        };
        sh.complete(id, outcome);
    }

    /// Refresh a static grant's TTL, recorded.
    async fn refresh(&self, guard: &mut LockGuard) {
        let sh = &self.shared;
        let id = sh.invoke(Call::Refresh {
            client: self.id(),
            lock: Self::lock_key(guard.name()),
            token: guard.token(),
        });
        let outcome = match guard.refresh(STATIC_TTL).await {
            Ok(_) => Outcome::Ok(Ret::Refreshed),
            Err(e) => grant_op_failure(&e),
        };
        sh.complete(id, outcome);
    }

    /// Slow read-modify-write increments of the lock's fenced register,
    /// stopping as soon as the guard reports the lock lost.
    async fn increments(&self, guard: &LockGuard, n: usize, rng: &mut StdRng) {
        let sh = &self.shared;
        let res = sh.resource(guard.name());
        let reg = &res.reg;
        let token = guard.token();
        for _ in 0..n {
            if guard.is_lost() {
                return;
            }
            let v = match reg.read(token) {
                Ok(v) => v,
                Err(_) => {
                    self.fenced(guard);
                    return;
                }
            };
            let pause = rng.gen_range(5..60);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            if guard.is_lost() {
                return;
            }
            match reg.write(token, v + 1) {
                Ok(()) => {
                    res.acked.fetch_add(1, Ordering::Relaxed);
                    sh.stats.increments.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    self.fenced(guard);
                    return;
                }
            }
        }
    }

    fn fenced(&self, guard: &LockGuard) {
        let sh = &self.shared;
        sh.stats.fenced.fetch_add(1, Ordering::Relaxed);
        let access = FencedAccess {
            client: self.idx,
            lock: guard.name().to_string(),
            token: guard.token(),
            at: sh.now(),
            guard_held: !guard.is_lost(),
        };
        sh.facts().fenced.push(access);
    }
}

/// The settings of the workload loop.
#[derive(Clone, Copy, Debug)]
pub struct LoopOpts {
    pub request_timeout: Duration,
    /// Pause between operations, at most.
    pub think_ms: u64,
    /// Share of grants held for one to two session timeouts.
    pub long_hold_p: f64,
    pub session_timeout: Duration,
}

/// The workload loop of one client: acquire, work, release, until asked
/// to stop.
async fn workload(ctx: Arc<Ctx>, seed: u64, opts: LoopOpts) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !ctx.shared.stop.load(Ordering::Relaxed) {
        let spec = &LOCKS[rng.gen_range(0..LOCKS.len())];
        let mode = if spec.shared && rng.gen_bool(0.5) {
            Mode::Shared
        } else {
            Mode::Exclusive
        };
        let wait = match rng.gen_range(0..10) {
            0..=1 => None,
            2..=8 => Some(Duration::from_millis(rng.gen_range(300..4000))),
            _ => Some(Duration::from_millis(rng.gen_range(4000..8000))),
        };
        let name = ctx.shared.lock_name(spec);
        let granted = match ctx
            .acquire(spec, &name, mode, wait, opts.request_timeout)
            .await
        {
            Acquired::Granted(g) => Some(g),
            Acquired::No => None,
        };
        if let Some(mut guard) = granted {
            let done = ctx.watch_lost(&guard);
            if rng.gen_bool(opts.long_hold_p) {
                // A long holder: works for one to two session timeouts,
                // a slow increment at a time, refreshing a static TTL,
                // until done or told the lock is lost.
                let until = tokio::time::Instant::now()
                    + opts.session_timeout.mul_f64(rng.gen_range(1.0..2.0));
                let mut refreshed = tokio::time::Instant::now();
                while tokio::time::Instant::now() < until && !guard.is_lost() {
                    if mode == Mode::Exclusive {
                        ctx.increments(&guard, 1, &mut rng).await;
                    }
                    if spec.kind == Kind::Static && refreshed.elapsed() > STATIC_TTL / 3 {
                        ctx.refresh(&mut guard).await;
                        refreshed = tokio::time::Instant::now();
                    }
                    tokio::time::sleep(Duration::from_millis(rng.gen_range(50..300))).await;
                }
            } else if mode == Mode::Exclusive {
                let n = rng.gen_range(1..=3);
                ctx.increments(&guard, n, &mut rng).await;
            } else {
                tokio::time::sleep(Duration::from_millis(rng.gen_range(20..200))).await;
            }
            if spec.kind == Kind::Static && rng.gen_bool(0.3) && !guard.is_lost() {
                ctx.refresh(&mut guard).await;
            }
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..150))).await;
            ctx.release(guard).await;
            let _ = done.send(());
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..=opts.think_ms))).await;
    }
}

/// Waits on `lock` that all end at once when `cancel` fires (their futures
/// are dropped: each sends CANCEL), recorded; a wait granted before that
/// releases at once.
pub async fn cancelled_wait(
    shared: Arc<Shared>,
    client: Client,
    idx: usize,
    spec: LockSpec,
    name: String,
    mut cancel: tokio::sync::watch::Receiver<bool>,
) {
    let ctx = Ctx {
        shared: shared.clone(),
        idx,
        client,
    };
    shared.resource(&name);
    let id = shared.invoke(Call::Acquire {
        client: ctx.id(),
        lock: LockKey::new(ZONE, &name),
        mode: Mode::Exclusive,
        kind: spec.kind,
    });
    let mut b = ctx.client.lock(ZONE, &name).wait(Duration::from_secs(60));
    if spec.kind == Kind::Static {
        b = b.static_lock().ttl(STATIC_TTL);
    }
    let acquire = b.acquire();
    let cancelled = async move {
        let _ = cancel.wait_for(|c| *c).await;
    };
    tokio::select! {
        r = acquire => match r {
            Ok(guard) => {
                let token = guard.token();
                shared.complete(id, Outcome::Ok(Ret::Granted { token }));
                shared.facts().granted.insert(token, Granted {
                    client: idx,
                    op: id,
                    lock: name.clone(),
                    mode: Mode::Exclusive,
                    kind: spec.kind,
                    at: shared.now(),
                });
                let done = ctx.watch_lost(&guard);
                let _ = ctx.release(guard).await;
                let _ = done.send(());
            }
            Err(e) => shared.complete(id, acquire_failure(&e)),
        },
        () = cancelled => {
            shared.stats.cancelled_waits.fetch_add(1, Ordering::Relaxed);
            shared.complete(id, Outcome::Indeterminate);
        }
    }
}

enum Exit {
    Kill,
    Close,
}

/// A client "process".
pub struct ClientProc {
    pub idx: usize,
    pub client: Client,
    pub handle: tokio::runtime::Handle,
    exit: Option<std::sync::mpsc::Sender<Exit>>,
    thread: Option<std::thread::JoinHandle<()>>,
    done: Arc<AtomicBool>,
    pub killed: bool,
}

impl ClientProc {
    /// Connect a client with `cfg` on its own thread and start its
    /// workload loop.
    pub fn spawn(
        shared: &Arc<Shared>,
        idx: usize,
        cfg: ClientConfig,
        seed: u64,
        opts: LoopOpts,
    ) -> Result<ClientProc, String> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (exit_tx, exit_rx) = std::sync::mpsc::channel::<Exit>();
        let done = Arc::new(AtomicBool::new(false));
        let done2 = done.clone();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("chaos-client-{idx}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("client runtime");
                let deadline = Instant::now() + Duration::from_secs(60);
                let client = loop {
                    match rt.block_on(Client::connect(cfg.clone())) {
                        Ok(c) => break c,
                        Err(e) if Instant::now() >= deadline => {
                            let _ = ready_tx.send(Err(format!("client {idx}: connect: {e}")));
                            return;
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(300)),
                    }
                };
                let _ = ready_tx.send(Ok((client.clone(), rt.handle().clone())));
                let ctx = Arc::new(Ctx {
                    shared: sh,
                    idx,
                    client: client.clone(),
                });
                rt.spawn(lag_monitor(ctx.shared.clone(), idx));
                rt.spawn(async move {
                    workload(ctx, seed, opts).await;
                    done2.store(true, Ordering::SeqCst);
                });
                // Drive the runtime until told how to end.
                let exit = rt.block_on(async {
                    loop {
                        match exit_rx.try_recv() {
                            Ok(e) => return e,
                            Err(std::sync::mpsc::TryRecvError::Disconnected) => return Exit::Kill,
                            Err(std::sync::mpsc::TryRecvError::Empty) => {
                                tokio::time::sleep(Duration::from_millis(20)).await
                            }
                        }
                    }
                });
                match exit {
                    // Like SIGKILL: nothing more runs, nothing is sent.
                    Exit::Kill => rt.shutdown_background(),
                    Exit::Close => {
                        let _ = rt.block_on(async {
                            tokio::time::timeout(Duration::from_secs(15), client.close()).await
                        });
                        rt.shutdown_timeout(Duration::from_secs(2));
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        let (client, handle) = ready_rx
            .recv()
            .map_err(|_| format!("client {idx}: thread ended"))??;
        {
            let mut f = shared.facts();
            while f.clients.len() <= idx {
                f.clients.push(ClientFacts::default());
            }
            f.clients[idx] = ClientFacts {
                client_id: client.client_id(),
                started: shared.now(),
                ..ClientFacts::default()
            };
        }
        Ok(ClientProc {
            idx,
            client,
            handle,
            exit: Some(exit_tx),
            thread: Some(thread),
            done,
            killed: false,
        })
    }

    pub fn is_closed(&self) -> bool {
        self.exit.is_none()
    }

    pub fn workload_done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    /// Freeze the client for `d` (its whole runtime).
    pub fn pause(&self, shared: &Shared, d: Duration) {
        let from = shared.now();
        let to = from + u64::try_from(d.as_nanos()).unwrap_or(u64::MAX) + 1_000_000_000;
        shared.facts().clients[self.idx].frozen.push((from, to));
        self.handle.spawn(async move { std::thread::sleep(d) });
    }

    /// Kill the client: its runtime stops without sending anything more.
    pub fn kill(&mut self, shared: &Shared) {
        if self.killed {
            return;
        }
        self.killed = true;
        shared.facts().clients[self.idx].killed = Some(shared.now());
        if let Some(tx) = self.exit.take() {
            let _ = tx.send(Exit::Kill);
        }
        if let Some(t) = self.thread.take() {
            // A paused client ends after its pause.
            let _ = t.join();
        }
    }

    /// Close the session (CLOSE) and end the thread.
    pub fn close(&mut self, shared: &Shared) {
        if self.killed {
            return;
        }
        if let Some(tx) = self.exit.take() {
            let _ = tx.send(Exit::Close);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        shared.facts().clients[self.idx].closed = Some(shared.now());
    }
}

impl Drop for ClientProc {
    fn drop(&mut self) {
        if let Some(tx) = self.exit.take() {
            let _ = tx.send(Exit::Kill);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
