//! The lock table: the deterministic state machine every replica applies.
//!
//! `Engine::apply` takes one committed [`Command`] and returns the reply to its
//! proposer and the effects for everyone else. It reads no clock, draws no
//! random number and performs no I/O: time and leadership arrive in the
//! command (`term`, `now_ms`). The semantics are written down in
//! ARCHITECTURE.md ("The lock engine"); this file implements them.
//!
//! Data layout: zones → locks by name (ordered maps, so iteration, LIST pages
//! and snapshots are deterministic), sessions by client id, one ordered timer
//! set holding every deadline, and a bounded memory of ended grants. The
//! session indexes (holds, waits, watches) are derived data kept in step with
//! the lock table and rebuilt on restore.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use oclocks_proto::{Kind, Mode};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::limits::EngineLimits;
use crate::types::*;

/// A lock's address: (zone, name), sharing the strings of the lock table.
pub(crate) type LockRef = (Arc<str>, Arc<str>);

/// A node of the wait-for graph: (session client id, owner id).
type Node = (ClientId, OwnerId);

/// A client id stored as two u64 halves: 8-byte alignment instead of a
/// u128's 16 keeps a holder at 88 bytes instead of 96 (memory per held lock
/// is a target; see the `memory` bench).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub(crate) struct Cid([u64; 2]);

impl Cid {
    pub fn get(self) -> ClientId {
        (u128::from(self.0[0]) << 64) | u128::from(self.0[1])
    }
}

impl From<ClientId> for Cid {
    fn from(c: ClientId) -> Cid {
        Cid([(c >> 64) as u64, c as u64])
    }
}

impl PartialEq<ClientId> for Cid {
    fn eq(&self, other: &ClientId) -> bool {
        self.get() == *other
    }
}

/// The key that owns a key-owned grant, and the largest signature counter
/// used on it (boxed: most grants are session-owned and carry none).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OwnerKey {
    pub key: PublicKey,
    pub counter: u64,
}

/// One holder of a lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Holder {
    pub token: Token,
    /// The session that acquired it.
    pub client: Cid,
    /// Still belongs to that session (always true for connection locks; a
    /// static lock is detached when its session ends).
    pub bound: bool,
    pub owner: OwnerId,
    pub identity: Arc<str>,
    pub mode: Mode,
    pub kind: Kind,
    /// The owner key and the largest signature counter used on the grant.
    pub key: Option<Box<OwnerKey>>,
    pub granted_at: u64,
    pub ttl_ms: u64,
    pub deadline: Option<u64>,
    pub lock_delay_ms: u32,
}

/// One queued LOCK.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Waiter {
    /// Position key: strictly increasing along the queue, so a waiter is
    /// found by binary search.
    pub seq: u64,
    pub client: Cid,
    pub nonce: Nonce,
    pub owner: OwnerId,
    pub identity: Arc<str>,
    pub mode: Mode,
    pub kind: Kind,
    pub key: Option<Box<OwnerKey>>,
    pub ttl_ms: u64,
    pub lock_delay_ms: u32,
    pub deadline: Option<u64>,
}

/// A lock entry. Most locks are held by one holder and have no queue, so
/// one holder is stored inline and the queue only exists while non-empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Lock {
    pub holders: SmallVec<[Holder; 1]>,
    /// Queue and lock-delay; present only while one of them is.
    queue: Option<Box<Queue>>,
}

/// The FIFO queue and lock-delay of a contended lock.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Queue {
    waiters: VecDeque<Waiter>,
    /// The `seq` of the next waiter.
    next_seq: u64,
    /// End of a running lock-delay (engine time); 0 = none.
    available_at: u64,
}

static NO_WAITERS: VecDeque<Waiter> = VecDeque::new();

impl Lock {
    fn idle(&self) -> bool {
        self.holders.is_empty() && self.queue.is_none()
    }

    /// End of a running lock-delay (engine time); 0 = none.
    fn available_at(&self) -> u64 {
        self.queue.as_ref().map_or(0, |q| q.available_at)
    }

    /// Set or clear (0) the lock-delay.
    fn set_available_at(&mut self, at: u64) {
        if at != 0 {
            self.queue.get_or_insert_with(Box::default).available_at = at;
        } else if let Some(q) = self.queue.as_mut() {
            q.available_at = 0;
            if q.waiters.is_empty() {
                self.queue = None;
            }
        }
    }

    /// The queue, head first.
    pub(crate) fn waiters(&self) -> &VecDeque<Waiter> {
        self.queue.as_ref().map_or(&NO_WAITERS, |q| &q.waiters)
    }

    /// Queue a waiter at the back; returns its position and `seq`.
    fn push_waiter(&mut self, mut w: Waiter) -> (usize, u64) {
        let q = self.queue.get_or_insert_with(Box::default);
        w.seq = q.next_seq;
        q.next_seq += 1;
        q.waiters.push_back(w);
        (q.waiters.len() - 1, q.next_seq - 1)
    }

    /// Take the waiter at `index` out of the queue.
    fn take_waiter(&mut self, index: usize) -> Option<Waiter> {
        let q = self.queue.as_mut()?;
        let w = q.waiters.remove(index);
        if q.waiters.is_empty() && q.available_at == 0 {
            self.queue = None;
        }
        w
    }

    /// Whether a request in `mode` could be granted ignoring the queue.
    fn compatible(&self, mode: Mode) -> bool {
        self.holders.iter().all(|h| !mode.conflicts_with(h.mode))
    }

    /// The queue index of the waiter with this `seq`.
    fn waiter_index(&self, seq: u64) -> Option<usize> {
        self.waiters().binary_search_by_key(&seq, |w| w.seq).ok()
    }

    /// The holder named in LOCKED/TIMEOUT refusals: the oldest grant.
    fn oldest_holder(&self) -> Option<&Holder> {
        self.holders.iter().min_by_key(|h| h.token)
    }
}

/// What is remembered of a LOCK nonce at or above the session's mark.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Outcome {
    /// Queued; the wait is in the session's `waits`.
    Pending,
    Granted(Token),
    Refused(Refusal),
}

/// A grant that ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Ended {
    pub zone: Arc<str>,
    pub name: Arc<str>,
    pub token: Token,
    pub reason: EndReason,
    /// Reported to the session (HELLO's `lost` list) already.
    pub reported: bool,
}

/// LOCK outcomes by nonce, for nonces at or above the session's mark.
/// A sorted deque rather than a map: nonces arrive almost in order and are
/// forgotten from the front, so inserts are appends and the memory is
/// reused instead of allocated per request; bounded by
/// `outcomes_per_session_max`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Outcomes(VecDeque<(Nonce, Outcome)>);

impl Outcomes {
    fn find(&self, nonce: Nonce) -> Result<usize, usize> {
        self.0.binary_search_by_key(&nonce, |(n, _)| *n)
    }

    pub fn get(&self, nonce: &Nonce) -> Option<&Outcome> {
        self.find(*nonce).ok().map(|i| &self.0[i].1)
    }

    /// Set the outcome of `nonce`, replacing an earlier one.
    pub fn insert(&mut self, nonce: Nonce, outcome: Outcome) {
        match self.find(nonce) {
            Ok(i) => self.0[i].1 = outcome,
            Err(i) => self.0.insert(i, (nonce, outcome)),
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn first_nonce(&self) -> Option<Nonce> {
        self.0.front().map(|(n, _)| *n)
    }

    fn forget_below(&mut self, mark: Nonce) {
        while self.0.front().is_some_and(|(n, _)| *n < mark) {
            self.0.pop_front();
        }
    }
}

/// Where a session's queued LOCK waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WaitRef {
    pub lock: LockRef,
    pub owner: OwnerId,
    pub seq: u64,
}

impl Session {
    /// Remember a LOCK outcome, unless the client already moved its mark
    /// past the nonce (then it has promised never to ask again).
    fn record(&mut self, nonce: Nonce, outcome: Outcome) {
        if nonce >= self.low_water {
            self.outcomes.insert(nonce, outcome);
        }
    }

    fn owner_add(&mut self, owner: OwnerId) {
        *self.owners.entry(owner).or_insert(0) += 1;
    }

    fn owner_remove(&mut self, owner: OwnerId) {
        if let Some(n) = self.owners.get_mut(&owner) {
            *n -= 1;
            if *n == 0 {
                self.owners.remove(&owner);
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Session {
    pub identity: Arc<str>,
    pub timeout_ms: u64,
    pub deadline: u64,
    pub low_water: Nonce,
    pub outcomes: Outcomes,
    /// This session's ended grants, newest last, bounded.
    pub ended: VecDeque<Ended>,
    /// Derived: grants bound to this session.
    #[serde(skip)]
    pub held: BTreeMap<Token, LockRef>,
    /// Derived: queued LOCKs of this session, by nonce.
    #[serde(skip)]
    pub waits: BTreeMap<Nonce, WaitRef>,
    /// Derived: holds (bound) plus waits per owner id. An owner absent here
    /// can be on no wait-for cycle, which spares the deadlock search in the
    /// common case of one owner per acquire.
    #[serde(skip)]
    pub owners: BTreeMap<OwnerId, u32>,
    /// Derived: locks this session watches.
    #[serde(skip)]
    pub watches: BTreeSet<LockRef>,
}

/// Every deadline of the table. The derived order is the firing order at
/// equal deadlines: sessions, then TTLs, then waits, then lock-delays.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Session(ClientId),
    Ttl(Token, LockRef),
    Wait(ClientId, Nonce),
    Delay(LockRef),
}

/// The snapshot format's version byte.
const SNAPSHOT_VERSION: u8 = 1;

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot is empty")]
    Empty,
    #[error("snapshot format version {0} is not supported (this build reads {SNAPSHOT_VERSION})")]
    Version(u8),
    #[error("snapshot does not decode: {0}")]
    Decode(#[from] postcard::Error),
    #[error("snapshot is inconsistent: {0}")]
    Inconsistent(String),
}

/// The replicated state, in snapshot order.
#[derive(Serialize, Deserialize)]
struct State {
    term: u64,
    /// Engine time (ms): monotonic across terms.
    now: u64,
    /// Engine time minus the current leader's clock, fixed at each re-base.
    offset: i64,
    last_token: Token,
    zones: BTreeMap<Arc<str>, BTreeMap<Arc<str>, Box<Lock>>>,
    sessions: BTreeMap<ClientId, Session>,
    /// Ended grants, cluster-wide, oldest end first; bounded.
    ended: VecDeque<Ended>,
    watchers: BTreeMap<LockRef, BTreeSet<ClientId>>,
}

/// The lock table. See the module documentation and ARCHITECTURE.md.
pub struct Engine {
    limits: EngineLimits,
    st: State,
    /// Derived: open sessions per identity.
    identities: BTreeMap<Arc<str>, usize>,
    /// Derived: every deadline.
    timers: BTreeSet<(u64, Timer)>,
    /// Derived: token → absolute position in `st.ended` (whose front is at
    /// `ended_base`). Lookups only; never iterated, so its order is moot.
    ended_index: HashMap<Token, u64, BuildHasherDefault<TokenHasher>>,
    ended_base: u64,
    /// Effects of the command being applied.
    effects: Vec<Effect>,
    /// Locks whose holder set changed during the command (for watchers).
    changed: Vec<LockRef>,
    /// Locks whose queue must be served before the step ends; served in
    /// (zone, name) order, which fixes the order of tokens.
    to_pump: Vec<LockRef>,
    /// Scratch for `pump_all` (kept to reuse its memory).
    pumping: Vec<LockRef>,
    check_invariants: bool,
}

/// A hasher for fencing tokens. Tokens are assigned by the engine, never
/// chosen by a client, so there is no collision attack to defend against:
/// a multiplicative (Fibonacci) hash spreads consecutive tokens well at a
/// fraction of SipHash's cost on the release path.
#[derive(Default)]
struct TokenHasher(u64);

impl Hasher for TokenHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Caller checks, shared by every session-bound operation.
fn caller_session<'a>(
    sessions: &'a mut BTreeMap<ClientId, Session>,
    caller: &Caller,
) -> Result<&'a mut Session, Refusal> {
    let s = sessions.get_mut(&caller.client).ok_or(Refusal::NoSession)?;
    if *s.identity != *caller.identity {
        return Err(Refusal::Forbidden);
    }
    Ok(s)
}

impl Engine {
    /// An empty table with these limits.
    pub fn new(limits: EngineLimits) -> Engine {
        Engine {
            limits,
            st: State {
                term: 0,
                now: 0,
                offset: 0,
                last_token: 0,
                zones: BTreeMap::new(),
                sessions: BTreeMap::new(),
                ended: VecDeque::new(),
                watchers: BTreeMap::new(),
            },
            identities: BTreeMap::new(),
            timers: BTreeSet::new(),
            ended_index: HashMap::default(),
            ended_base: 0,
            effects: Vec::new(),
            changed: Vec::new(),
            to_pump: Vec::new(),
            pumping: Vec::new(),
            check_invariants: cfg!(debug_assertions),
        }
    }

    /// Turn the full invariant check after every apply on or off (on by
    /// default in debug builds; it costs O(table size) per command).
    pub fn set_check_invariants(&mut self, on: bool) {
        self.check_invariants = on;
    }

    /// The limits this table enforces.
    pub fn limits(&self) -> &EngineLimits {
        &self.limits
    }

    /// Engine time: the largest `now_ms` applied in the current term.
    pub fn now_ms(&self) -> u64 {
        self.st.now
    }

    /// The term of the last applied command.
    pub fn term(&self) -> u64 {
        self.st.term
    }

    /// The last fencing token issued (0 = none yet).
    pub fn last_token(&self) -> Token {
        self.st.last_token
    }

    /// The earliest pending deadline, in engine time: when the leader should
    /// propose the next `Tick` (no log traffic while nothing is due).
    pub fn next_deadline(&self) -> Option<u64> {
        self.timers.first().map(|(d, _)| *d)
    }

    /// The reading of the current term's leader clock at which engine time
    /// reaches `engine_ms`; meaningful once a command of the current term
    /// (its first is a re-base) has been applied.
    pub fn leader_clock_at(&self, engine_ms: u64) -> u64 {
        let t = i128::from(engine_ms) - i128::from(self.st.offset);
        u64::try_from(t.max(0)).unwrap_or(u64::MAX)
    }

    /// Number of open sessions.
    pub fn session_count(&self) -> usize {
        self.st.sessions.len()
    }

    // ------------------------------------------------------------------
    // apply
    // ------------------------------------------------------------------

    /// Apply one committed command. Deterministic: the same sequence of
    /// commands gives the same replies, effects and state on every replica.
    pub fn apply(&mut self, cmd: Command) -> Applied {
        self.advance_time(cmd.term, cmd.now_ms, matches!(cmd.op, Op::Rebase));
        self.fire_due();
        let reply = match cmd.op {
            Op::OpenSession { caller, timeout_ms } => self.op_open(caller, timeout_ms),
            Op::Keepalive { callers } => Reply::Keepalive(
                callers
                    .iter()
                    .map(|c| self.keepalive(c))
                    .collect::<Vec<_>>(),
            ),
            Op::CloseSession { caller } => self.op_close(&caller),
            Op::Lock(req) => self.op_lock(req),
            Op::Cancel { caller, nonce } => self.op_cancel(&caller, nonce),
            Op::Release {
                caller,
                zone,
                name,
                token,
                key,
            } => self.op_release(&caller, &zone, &name, token, key.as_ref()),
            Op::Refresh {
                caller,
                zone,
                name,
                token,
                ttl_ms,
                key,
            } => self.op_refresh(&caller, &zone, &name, token, ttl_ms, key.as_ref()),
            Op::Break {
                zone,
                name,
                expected_token,
            } => self.op_break(&zone, &name, expected_token),
            Op::Watch { caller, zone, name } => self.op_watch(&caller, &zone, &name),
            Op::Unwatch { caller, zone, name } => self.op_unwatch(&caller, &zone, &name),
            Op::Tick | Op::Rebase => Reply::Done,
        };
        self.pump_all();
        self.emit_watch_events();
        if self.check_invariants {
            if let Err(e) = self.check_invariants() {
                panic!("lock engine invariant violated: {e}");
            }
        }
        Applied {
            reply,
            effects: std::mem::take(&mut self.effects),
        }
    }

    /// Map the proposer's clock onto engine time. Engine time is one
    /// monotonic timeline across all terms: `engine = leader_now + offset`,
    /// where the offset is fixed at every re-base so that engine time
    /// continues exactly where the last applied command left it.
    fn advance_time(&mut self, term: u64, now: u64, rebase: bool) {
        if term > self.st.term || (rebase && term == self.st.term) {
            self.st.term = term;
            self.rebase(now);
        } else if term == self.st.term {
            let t = i128::from(now) + i128::from(self.st.offset);
            let t = u64::try_from(t.max(0)).unwrap_or(u64::MAX);
            self.st.now = self.st.now.max(t);
        }
        // A command of an older term cannot follow a newer one in a Raft log;
        // if it ever did, its clock is not comparable and is ignored.
    }

    /// Re-base on a new clock reading (see ARCHITECTURE.md, "Time model"):
    /// engine time does not move, so every TTL, wait and lock-delay keeps
    /// exactly its remaining time; every session gets a full timeout. Runs
    /// before any timer fires.
    fn rebase(&mut self, leader_now: u64) {
        let offset = i128::from(self.st.now) - i128::from(leader_now);
        // Clocks are milliseconds since some boot: far inside i64.
        self.st.offset =
            i64::try_from(offset).unwrap_or(if offset < 0 { i64::MIN } else { i64::MAX });
        let now = self.st.now;
        for (&c, s) in self.st.sessions.iter_mut() {
            let new = now.saturating_add(s.timeout_ms);
            if new != s.deadline {
                self.timers.remove(&(s.deadline, Timer::Session(c)));
                self.timers.insert((new, Timer::Session(c)));
                s.deadline = new;
            }
        }
    }

    /// Fire every timer whose deadline has come, in order, serving the
    /// affected queue after each.
    ///
    /// Each timer fires *at its deadline*: engine time steps to the deadline
    /// while it fires, so a grant made by an earlier expiry belongs to a
    /// session that was alive then and is stamped with that instant, and a
    /// session that expired before it is never granted.
    fn fire_due(&mut self) {
        let target = self.st.now;
        while let Some((deadline, _)) = self.timers.first() {
            if *deadline > target {
                break;
            }
            let Some((deadline, timer)) = self.timers.pop_first() else {
                break;
            };
            self.st.now = deadline;
            match timer {
                Timer::Session(client) => self.end_session(client, true),
                Timer::Ttl(token, lr) => {
                    self.end_grant(&lr, token, EndReason::Lost(LossReason::TtlExpired));
                }
                Timer::Wait(client, nonce) => self.wait_timed_out(client, nonce),
                Timer::Delay(lr) => {
                    if let Some(lock) = self.lock_mut(&lr.0, &lr.1) {
                        lock.set_available_at(0);
                    }
                    self.to_pump.push(lr);
                }
            }
            // Every session due at this instant expires before any queue is
            // served, so none of them can be granted on its way out.
            let more_sessions_now = matches!(
                self.timers.first(),
                Some((d, Timer::Session(_))) if *d == deadline
            );
            if !more_sessions_now {
                self.pump_all();
            }
        }
        self.st.now = target;
    }

    // ------------------------------------------------------------------
    // sessions
    // ------------------------------------------------------------------

    fn op_open(&mut self, caller: Caller, timeout_ms: u64) -> Reply {
        if caller.identity.len() > self.limits.identity_bytes_max {
            return Reply::Refused(Refusal::Limit {
                what: "identity_bytes_max".into(),
            });
        }
        if caller.identity.is_empty() {
            return Reply::Refused(Refusal::Invalid {
                what: "empty identity".into(),
            });
        }
        let timeout = if timeout_ms == 0 {
            self.limits.session_timeout_ms_default
        } else {
            timeout_ms.clamp(
                self.limits.session_timeout_ms_min,
                self.limits.session_timeout_ms_max,
            )
        }
        .max(1);
        let now = self.st.now;
        if let Some(s) = self.st.sessions.get_mut(&caller.client) {
            if *s.identity != *caller.identity {
                return Reply::Refused(Refusal::Forbidden);
            }
            let old_deadline = s.deadline;
            if timeout_ms != 0 {
                s.timeout_ms = timeout;
            }
            s.deadline = now.saturating_add(s.timeout_ms);
            let timeout_ms = s.timeout_ms;
            let new_deadline = s.deadline;
            let lost = s
                .ended
                .iter_mut()
                .filter(|e| !e.reported)
                .filter_map(|e| {
                    e.reported = true;
                    match e.reason {
                        EndReason::Lost(reason) => Some(LostGrant {
                            zone: e.zone.clone(),
                            name: e.name.clone(),
                            token: e.token,
                            reason,
                        }),
                        EndReason::Released => None,
                    }
                })
                .collect();
            self.move_timer(old_deadline, new_deadline, Timer::Session(caller.client));
            let (held, waits) = self.session_listing(caller.client);
            return Reply::Session {
                resumed: true,
                timeout_ms,
                held,
                waits,
                lost,
            };
        }
        if self.st.sessions.len() >= self.limits.sessions_max {
            return Reply::Refused(Refusal::Limit {
                what: "sessions_max".into(),
            });
        }
        let identity: Arc<str> = match self.identities.get_key_value(caller.identity.as_str()) {
            Some((k, &n)) => {
                if n >= self.limits.sessions_per_identity_max {
                    return Reply::Refused(Refusal::Limit {
                        what: "sessions_per_identity_max".into(),
                    });
                }
                k.clone()
            }
            None => Arc::from(caller.identity.as_str()),
        };
        *self.identities.entry(identity.clone()).or_insert(0) += 1;
        let deadline = now.saturating_add(timeout);
        self.st.sessions.insert(
            caller.client,
            Session {
                identity,
                timeout_ms: timeout,
                deadline,
                low_water: 0,
                outcomes: Outcomes::default(),
                ended: VecDeque::new(),
                held: BTreeMap::new(),
                waits: BTreeMap::new(),
                owners: BTreeMap::new(),
                watches: BTreeSet::new(),
            },
        );
        self.timers
            .insert((deadline, Timer::Session(caller.client)));
        Reply::Session {
            resumed: false,
            timeout_ms: timeout,
            held: Vec::new(),
            waits: Vec::new(),
            lost: Vec::new(),
        }
    }

    fn session_listing(&self, client: ClientId) -> (Vec<HeldLock>, Vec<WaitInfo>) {
        let Some(s) = self.st.sessions.get(&client) else {
            return (Vec::new(), Vec::new());
        };
        let held = s
            .held
            .iter()
            .filter_map(|(&token, lr)| {
                let lock = self.lock(&lr.0, &lr.1)?;
                let h = lock.holders.iter().find(|h| h.token == token)?;
                Some(HeldLock {
                    zone: lr.0.clone(),
                    name: lr.1.clone(),
                    token,
                    mode: h.mode,
                    kind: h.kind,
                })
            })
            .collect();
        let waits = s
            .waits
            .iter()
            .map(|(&nonce, w)| WaitInfo {
                zone: w.lock.0.clone(),
                name: w.lock.1.clone(),
                nonce,
            })
            .collect();
        (held, waits)
    }

    fn keepalive(&mut self, caller: &Caller) -> Result<(), Refusal> {
        let now = self.st.now;
        let s = caller_session(&mut self.st.sessions, caller)?;
        let old = s.deadline;
        s.deadline = now.saturating_add(s.timeout_ms);
        let new = s.deadline;
        self.move_timer(old, new, Timer::Session(caller.client));
        Ok(())
    }

    fn op_close(&mut self, caller: &Caller) -> Reply {
        if let Err(r) = caller_session(&mut self.st.sessions, caller) {
            return Reply::Refused(r);
        }
        self.end_session(caller.client, false);
        Reply::Done
    }

    /// End a session: expired (involuntary) or closed (voluntary).
    fn end_session(&mut self, client: ClientId, expired: bool) {
        let Some(s) = self.st.sessions.get(&client) else {
            return;
        };
        let deadline = s.deadline;
        let waits: Vec<(Nonce, LockRef)> =
            s.waits.iter().map(|(n, w)| (*n, w.lock.clone())).collect();
        let held: Vec<(Token, LockRef)> = s.held.iter().map(|(t, lr)| (*t, lr.clone())).collect();
        let watches: Vec<LockRef> = s.watches.iter().cloned().collect();
        self.timers.remove(&(deadline, Timer::Session(client)));
        // Waits go first, so nothing is ever granted to the ending session.
        for (nonce, lr) in waits {
            self.remove_waiter(&lr, client, nonce);
        }
        for (token, lr) in held {
            let kind = self
                .lock(&lr.0, &lr.1)
                .and_then(|l| l.holders.iter().find(|h| h.token == token))
                .map(|h| h.kind);
            match kind {
                Some(Kind::Connection) => {
                    let reason = if expired {
                        EndReason::Lost(LossReason::SessionExpired)
                    } else {
                        EndReason::Released
                    };
                    self.end_grant(&lr, token, reason);
                }
                Some(Kind::Static) => {
                    if let Some(h) = self
                        .lock_mut(&lr.0, &lr.1)
                        .and_then(|l| l.holders.iter_mut().find(|h| h.token == token))
                    {
                        h.bound = false;
                        let owner = h.owner;
                        if let Some(s) = self.st.sessions.get_mut(&client) {
                            s.held.remove(&token);
                            s.owner_remove(owner);
                        }
                    }
                }
                None => {}
            }
        }
        for lr in watches {
            if let Some(set) = self.st.watchers.get_mut(&lr) {
                set.remove(&client);
                if set.is_empty() {
                    self.st.watchers.remove(&lr);
                }
            }
        }
        if let Some(s) = self.st.sessions.remove(&client) {
            if let Some(n) = self.identities.get_mut(&s.identity) {
                *n -= 1;
                if *n == 0 {
                    self.identities.remove(&s.identity);
                }
            }
        }
        if expired {
            self.effects.push(Effect::SessionExpired { client });
        }
    }

    // ------------------------------------------------------------------
    // LOCK
    // ------------------------------------------------------------------

    fn op_lock(&mut self, req: LockRequest) -> Reply {
        let outcomes_max = self.limits.outcomes_per_session_max;
        let s = match caller_session(&mut self.st.sessions, &req.caller) {
            Ok(s) => s,
            Err(r) => return Reply::Refused(r),
        };
        if req.nonce < s.low_water {
            return Reply::Refused(Refusal::StaleNonce);
        }
        if let Some(outcome) = s.outcomes.get(&req.nonce) {
            let outcome = outcome.clone();
            return self.replay(req.caller.client, req.nonce, outcome);
        }
        if req.low_water > req.nonce {
            return Reply::Refused(Refusal::Invalid {
                what: "low-water mark above the request nonce".into(),
            });
        }
        if req.low_water > s.low_water {
            s.low_water = req.low_water;
            s.outcomes.forget_below(req.low_water);
        }
        if s.outcomes.len() >= outcomes_max {
            return Reply::Refused(Refusal::Limit {
                what: "outcomes_per_session_max".into(),
            });
        }
        let client = req.caller.client;
        let nonce = req.nonce;
        let (reply, outcome) = match self.lock_inner(req) {
            Ok(Reply::Granted { token }) => (Reply::Granted { token }, Outcome::Granted(token)),
            Ok(reply) => (reply, Outcome::Pending),
            Err(r) => (Reply::Refused(r.clone()), Outcome::Refused(r)),
        };
        if let Some(s) = self.st.sessions.get_mut(&client) {
            s.outcomes.insert(nonce, outcome);
        }
        reply
    }

    /// The reply for a LOCK nonce seen before.
    fn replay(&self, client: ClientId, nonce: Nonce, outcome: Outcome) -> Reply {
        match outcome {
            Outcome::Granted(token) => Reply::Granted { token },
            Outcome::Refused(r) => Reply::Refused(r),
            Outcome::Pending => {
                let position = self
                    .st
                    .sessions
                    .get(&client)
                    .and_then(|s| s.waits.get(&nonce))
                    .and_then(|w| self.lock(&w.lock.0, &w.lock.1)?.waiter_index(w.seq));
                match position {
                    Some(position) => Reply::Queued { position },
                    // Unreachable while indexes agree (invariant 3).
                    None => Reply::Refused(Refusal::Cancelled),
                }
            }
        }
    }

    fn lock_inner(&mut self, req: LockRequest) -> Result<Reply, Refusal> {
        let l = &self.limits;
        if req.zone.is_empty() || req.name.is_empty() {
            return Err(Refusal::Invalid {
                what: "empty zone or lock name".into(),
            });
        }
        if req.zone.len() > l.zone_name_bytes_max {
            return Err(Refusal::Limit {
                what: "zone_name_bytes_max".into(),
            });
        }
        if req.name.len() > l.lock_name_bytes_max {
            return Err(Refusal::Limit {
                what: "lock_name_bytes_max".into(),
            });
        }
        if req.kind == Kind::Static && req.key.is_none() {
            return Err(Refusal::Invalid {
                what: "a static lock needs an owner key".into(),
            });
        }
        if req.ttl_ms > l.ttl_ms_max {
            return Err(Refusal::Limit {
                what: "ttl_ms_max".into(),
            });
        }
        if req.wait_ms != WAIT_FOREVER && req.wait_ms > l.wait_ms_max {
            return Err(Refusal::Limit {
                what: "wait_ms_max".into(),
            });
        }
        if req.lock_delay_ms > l.lock_delay_ms_max {
            return Err(Refusal::Limit {
                what: "lock_delay_ms_max".into(),
            });
        }
        let client = req.caller.client;
        let now = self.st.now;
        let owner_active = self
            .st
            .sessions
            .get(&client)
            .is_some_and(|s| s.owners.contains_key(&req.owner));
        if let Some(lock) = self.lock(&req.zone, &req.name).filter(|_| owner_active) {
            if let Some(h) = lock
                .holders
                .iter()
                .find(|h| h.bound && h.client == client && h.owner == req.owner)
            {
                return Err(Refusal::Locked {
                    holder: Some(holder_info(h, now)),
                });
            }
            if lock
                .waiters()
                .iter()
                .any(|w| w.client == client && w.owner == req.owner)
            {
                return Err(Refusal::Invalid {
                    what: "this owner already waits for this lock".into(),
                });
            }
        }
        let s = self.st.sessions.get(&client).ok_or(Refusal::NoSession)?;
        let identity = s.identity.clone();
        if s.held.len() + s.waits.len() >= l.locks_per_session_max {
            return Err(Refusal::Limit {
                what: "locks_per_session_max".into(),
            });
        }
        let (grantable, queue_len, oldest) = match self.lock(&req.zone, &req.name) {
            None => (true, 0, None),
            Some(lock) => (
                lock.waiters().is_empty() && lock.available_at() == 0 && lock.compatible(req.mode),
                lock.waiters().len(),
                lock.oldest_holder().map(|h| holder_info(h, now)),
            ),
        };
        let key = req.key.map(|p| {
            Box::new(OwnerKey {
                key: p.key,
                counter: p.counter,
            })
        });
        // Bounded by lock_delay_ms_max above, which the config keeps within u32.
        let lock_delay_ms = u32::try_from(req.lock_delay_ms).unwrap_or(u32::MAX);
        if grantable {
            let lr = self.intern(&req.zone, &req.name);
            let token = self.grant(
                &lr,
                Holder {
                    token: 0,
                    client: client.into(),
                    bound: true,
                    owner: req.owner,
                    identity,
                    mode: req.mode,
                    kind: req.kind,
                    key,
                    granted_at: now,
                    ttl_ms: req.ttl_ms,
                    deadline: None,
                    lock_delay_ms,
                },
            );
            return Ok(Reply::Granted { token });
        }
        if req.wait_ms == 0 {
            return Err(Refusal::Locked { holder: oldest });
        }
        if queue_len >= self.limits.waiters_per_lock_max {
            return Err(Refusal::Limit {
                what: "waiters_per_lock_max".into(),
            });
        }
        // An owner with no holds and no waits has no edge pointing at it,
        // so the new wait cannot close a cycle.
        if owner_active {
            let mut first = Vec::new();
            if let Some(lock) = self.lock(&req.zone, &req.name) {
                edges_of(lock, req.mode, lock.waiters().len(), &mut first);
            }
            if self.reaches(&first, (client, req.owner)) {
                return Err(Refusal::Deadlock);
            }
        }
        let lr = self.intern(&req.zone, &req.name);
        let deadline = if req.wait_ms == WAIT_FOREVER {
            None
        } else {
            Some(now.saturating_add(req.wait_ms))
        };
        let waiter = Waiter {
            seq: 0,
            client: client.into(),
            nonce: req.nonce,
            owner: req.owner,
            identity,
            mode: req.mode,
            kind: req.kind,
            key,
            ttl_ms: req.ttl_ms,
            lock_delay_ms,
            deadline,
        };
        let (position, seq) = {
            let lock = self.lock_mut(&lr.0, &lr.1).expect("lock was just interned");
            lock.push_waiter(waiter)
        };
        if let Some(d) = deadline {
            self.timers.insert((d, Timer::Wait(client, req.nonce)));
        }
        if let Some(s) = self.st.sessions.get_mut(&client) {
            s.waits.insert(
                req.nonce,
                WaitRef {
                    lock: lr,
                    owner: req.owner,
                    seq,
                },
            );
            s.owner_add(req.owner);
        }
        Ok(Reply::Queued { position })
    }

    /// Make a holder of `lr` with the next token; returns the token.
    fn grant(&mut self, lr: &LockRef, mut h: Holder) -> Token {
        let now = self.st.now;
        let session_alive = self
            .st
            .sessions
            .get(&h.client.get())
            .is_some_and(|s| s.deadline > now);
        assert!(session_alive, "grant to a dead session");
        self.st.last_token += 1;
        let token = self.st.last_token;
        h.token = token;
        h.granted_at = now;
        h.deadline = (h.ttl_ms > 0).then(|| now.saturating_add(h.ttl_ms));
        if let Some(d) = h.deadline {
            self.timers.insert((d, Timer::Ttl(token, lr.clone())));
        }
        let client = h.client.get();
        let lock = self.lock_mut(&lr.0, &lr.1).expect("granted lock exists");
        assert!(
            lock.compatible(h.mode),
            "grant would break mutual exclusion"
        );
        let owner = h.owner;
        lock.holders.push(h);
        if let Some(s) = self.st.sessions.get_mut(&client) {
            s.held.insert(token, lr.clone());
            s.owner_add(owner);
        }
        self.changed.push(lr.clone());
        token
    }

    // ------------------------------------------------------------------
    // Queue service
    // ------------------------------------------------------------------

    fn pump_all(&mut self) {
        while !self.to_pump.is_empty() {
            let mut batch = std::mem::take(&mut self.pumping);
            std::mem::swap(&mut batch, &mut self.to_pump);
            batch.sort_unstable();
            batch.dedup();
            for lr in batch.drain(..) {
                self.pump(&lr);
            }
            self.pumping = batch;
        }
    }

    /// Serve the queue of `lr` from its head, strictly FIFO.
    fn pump(&mut self, lr: &LockRef) {
        loop {
            let Some(lock) = self.lock_mut(&lr.0, &lr.1) else {
                return;
            };
            if lock.available_at() != 0 {
                return;
            }
            let Some(head) = lock.waiters().front() else {
                break;
            };
            if !lock.compatible(head.mode) {
                break;
            }
            let Some(w) = lock.take_waiter(0) else {
                break;
            };
            if let Some(d) = w.deadline {
                self.timers
                    .remove(&(d, Timer::Wait(w.client.get(), w.nonce)));
            }
            if let Some(s) = self.st.sessions.get_mut(&w.client.get()) {
                s.waits.remove(&w.nonce);
                s.owner_remove(w.owner);
            }
            let (client, nonce, owner) = (w.client.get(), w.nonce, w.owner);
            let token = self.grant(
                lr,
                Holder {
                    token: 0,
                    client: client.into(),
                    bound: true,
                    owner,
                    identity: w.identity,
                    mode: w.mode,
                    kind: w.kind,
                    key: w.key,
                    granted_at: 0,
                    ttl_ms: w.ttl_ms,
                    deadline: None,
                    lock_delay_ms: w.lock_delay_ms,
                },
            );
            if let Some(s) = self.st.sessions.get_mut(&client) {
                s.record(nonce, Outcome::Granted(token));
            }
            self.effects.push(Effect::Granted {
                client,
                nonce,
                zone: lr.0.clone(),
                name: lr.1.clone(),
                token,
            });
            self.check_deadlock_after_grant((client, owner));
        }
        self.drop_if_idle(lr);
    }

    /// After a grant to `node`, its other waits may now close a cycle (only
    /// when an earlier bounded search gave up): end such a wait with DEADLOCK.
    fn check_deadlock_after_grant(&mut self, node: Node) {
        let Some(s) = self.st.sessions.get(&node.0) else {
            return;
        };
        // Only the hold just granted: no other wait of this owner to check.
        if s.owners.get(&node.1).is_none_or(|&n| n <= 1) {
            return;
        }
        let waits: Vec<(Nonce, WaitRef)> = s
            .waits
            .iter()
            .filter(|(_, w)| w.owner == node.1)
            .map(|(n, w)| (*n, w.clone()))
            .collect();
        for (nonce, w) in waits {
            let mut first = Vec::new();
            if let Some(lock) = self.lock(&w.lock.0, &w.lock.1) {
                if let Some(i) = lock.waiter_index(w.seq) {
                    edges_of(lock, lock.waiters()[i].mode, i, &mut first);
                }
            }
            if self.reaches(&first, node) {
                self.end_wait(&w.lock, node.0, nonce, Refusal::Deadlock);
            }
        }
    }

    /// End a queued LOCK with a refusal, telling its session.
    fn end_wait(&mut self, lr: &LockRef, client: ClientId, nonce: Nonce, refusal: Refusal) {
        self.remove_waiter(lr, client, nonce);
        if let Some(s) = self.st.sessions.get_mut(&client) {
            s.record(nonce, Outcome::Refused(refusal.clone()));
        }
        self.effects.push(Effect::WaitEnded {
            client,
            nonce,
            zone: lr.0.clone(),
            name: lr.1.clone(),
            refusal,
        });
    }

    fn wait_timed_out(&mut self, client: ClientId, nonce: Nonce) {
        let lr = match self
            .st
            .sessions
            .get(&client)
            .and_then(|s| s.waits.get(&nonce))
        {
            Some(w) => w.lock.clone(),
            None => return,
        };
        let now = self.st.now;
        let holder = self
            .lock(&lr.0, &lr.1)
            .and_then(|l| l.oldest_holder())
            .map(|h| holder_info(h, now));
        self.end_wait(&lr, client, nonce, Refusal::Timeout { holder });
    }

    /// Take a waiter out of its queue and the indexes; the queue is served
    /// later in the command.
    fn remove_waiter(&mut self, lr: &LockRef, client: ClientId, nonce: Nonce) {
        let Some(wr) = self
            .st
            .sessions
            .get_mut(&client)
            .and_then(|s| s.waits.remove(&nonce))
        else {
            return;
        };
        if let Some(s) = self.st.sessions.get_mut(&client) {
            s.owner_remove(wr.owner);
        }
        if let Some(lock) = self.lock_mut(&lr.0, &lr.1) {
            if let Some(i) = lock.waiter_index(wr.seq) {
                if let Some(w) = lock.take_waiter(i) {
                    if let Some(d) = w.deadline {
                        self.timers.remove(&(d, Timer::Wait(client, nonce)));
                    }
                }
            }
        }
        self.to_pump.push(lr.clone());
    }

    // ------------------------------------------------------------------
    // Ending grants
    // ------------------------------------------------------------------

    /// End the grant `token` of `lr`; returns whether it existed.
    fn end_grant(&mut self, lr: &LockRef, token: Token, reason: EndReason) -> bool {
        let now = self.st.now;
        let Some(lock) = self.lock_mut(&lr.0, &lr.1) else {
            return false;
        };
        let Some(i) = lock.holders.iter().position(|h| h.token == token) else {
            return false;
        };
        let h = lock.holders.swap_remove(i);
        if let EndReason::Lost(_) = reason {
            if h.lock_delay_ms > 0 {
                let until = now.saturating_add(u64::from(h.lock_delay_ms));
                if until > lock.available_at() {
                    let old = lock.available_at();
                    lock.set_available_at(until);
                    if old != 0 {
                        self.timers.remove(&(old, Timer::Delay(lr.clone())));
                    }
                    self.timers.insert((until, Timer::Delay(lr.clone())));
                }
            }
        }
        if let Some(d) = h.deadline {
            self.timers.remove(&(d, Timer::Ttl(token, lr.clone())));
        }
        let ended = Ended {
            zone: lr.0.clone(),
            name: lr.1.clone(),
            token,
            reason,
            reported: false,
        };
        let session_max = self.limits.ended_per_session_max;
        let session = if h.bound {
            self.st.sessions.get_mut(&h.client.get())
        } else {
            None
        };
        let client = session.as_ref().map(|_| h.client.get());
        if let Some(s) = session {
            s.held.remove(&token);
            s.owner_remove(h.owner);
            if session_max > 0 {
                if s.ended.len() >= session_max {
                    s.ended.pop_front();
                }
                s.ended.push_back(ended.clone());
            }
        }
        if self.limits.ended_grants_max > 0 {
            let seq = self.ended_base + self.st.ended.len() as u64;
            self.st.ended.push_back(ended);
            self.ended_index.insert(token, seq);
            while self.st.ended.len() > self.limits.ended_grants_max {
                if let Some(old) = self.st.ended.pop_front() {
                    self.ended_index.remove(&old.token);
                }
                self.ended_base += 1;
            }
        }
        if let EndReason::Lost(reason) = reason {
            self.effects.push(Effect::Lost {
                client,
                zone: lr.0.clone(),
                name: lr.1.clone(),
                token,
                reason,
            });
        }
        self.changed.push(lr.clone());
        self.to_pump.push(lr.clone());
        true
    }

    /// How a token that is not a current grant of (zone, name) ended, as far
    /// as the table remembers: the caller's session ring, then the
    /// cluster-wide memory.
    fn ended_reason(
        &self,
        client: ClientId,
        zone: &str,
        name: &str,
        token: Token,
    ) -> Option<EndReason> {
        let matches = |e: &Ended| e.token == token && *e.zone == *zone && *e.name == *name;
        if let Some(e) = self
            .st
            .sessions
            .get(&client)
            .and_then(|s| s.ended.iter().find(|e| matches(e)))
        {
            return Some(e.reason);
        }
        let seq = *self.ended_index.get(&token)?;
        let pos = usize::try_from(seq - self.ended_base).ok()?;
        self.st
            .ended
            .get(pos)
            .filter(|e| matches(e))
            .map(|e| e.reason)
    }

    /// Ownership check of a current grant for RELEASE/REFRESH.
    fn check_owner(h: &Holder, caller: &Caller, key: Option<&KeyProof>) -> Result<(), Refusal> {
        match (&h.key, key) {
            (Some(hk), Some(p)) => {
                if hk.key != p.key {
                    Err(Refusal::NotOwner)
                } else if p.counter <= hk.counter {
                    Err(Refusal::Replay)
                } else {
                    Ok(())
                }
            }
            (Some(_), None) => Err(Refusal::NotOwner),
            (None, _) => {
                if h.bound && h.client == caller.client {
                    Ok(())
                } else {
                    Err(Refusal::NotOwner)
                }
            }
        }
    }

    fn op_release(
        &mut self,
        caller: &Caller,
        zone: &str,
        name: &str,
        token: Token,
        key: Option<&KeyProof>,
    ) -> Reply {
        if let Err(r) = caller_session(&mut self.st.sessions, caller) {
            return Reply::Refused(r);
        }
        let current = self
            .lock(zone, name)
            .and_then(|l| l.holders.iter().find(|h| h.token == token))
            .map(|h| Self::check_owner(h, caller, key));
        match current {
            Some(Ok(())) => {
                let lr = self.intern(zone, name);
                self.end_grant(&lr, token, EndReason::Released);
                Reply::Released {
                    already_released: false,
                }
            }
            Some(Err(r)) => Reply::Refused(r),
            None => match self.ended_reason(caller.client, zone, name, token) {
                Some(EndReason::Released) => Reply::Released {
                    already_released: true,
                },
                Some(EndReason::Lost(reason)) => Reply::Refused(Refusal::Lost { reason }),
                None => Reply::Refused(Refusal::UnknownGrant),
            },
        }
    }

    fn op_refresh(
        &mut self,
        caller: &Caller,
        zone: &str,
        name: &str,
        token: Token,
        ttl_ms: u64,
        key: Option<&KeyProof>,
    ) -> Reply {
        if let Err(r) = caller_session(&mut self.st.sessions, caller) {
            return Reply::Refused(r);
        }
        if ttl_ms > self.limits.ttl_ms_max {
            return Reply::Refused(Refusal::Limit {
                what: "ttl_ms_max".into(),
            });
        }
        let now = self.st.now;
        let current = self
            .lock(zone, name)
            .and_then(|l| l.holders.iter().find(|h| h.token == token))
            .map(|h| Self::check_owner(h, caller, key).map(|()| h.deadline));
        match current {
            Some(Ok(old_deadline)) => {
                let lr = self.intern(zone, name);
                let Some(h) = self
                    .lock_mut(zone, name)
                    .and_then(|l| l.holders.iter_mut().find(|h| h.token == token))
                else {
                    return Reply::Refused(Refusal::UnknownGrant);
                };
                if let (Some(p), Some(hk)) = (key, h.key.as_mut()) {
                    hk.counter = p.counter;
                }
                if ttl_ms > 0 {
                    h.ttl_ms = ttl_ms;
                }
                h.deadline = (h.ttl_ms > 0).then(|| now.saturating_add(h.ttl_ms));
                let new_deadline = h.deadline;
                if let Some(d) = old_deadline {
                    self.timers.remove(&(d, Timer::Ttl(token, lr.clone())));
                }
                if let Some(d) = new_deadline {
                    self.timers.insert((d, Timer::Ttl(token, lr)));
                }
                Reply::Refreshed {
                    expires_in_ms: new_deadline.map(|d| d - now),
                }
            }
            Some(Err(r)) => Reply::Refused(r),
            None => match self.ended_reason(caller.client, zone, name, token) {
                Some(EndReason::Released) => Reply::Refused(Refusal::NotOwner),
                Some(EndReason::Lost(reason)) => Reply::Refused(Refusal::Lost { reason }),
                None => Reply::Refused(Refusal::UnknownGrant),
            },
        }
    }

    fn op_cancel(&mut self, caller: &Caller, nonce: Nonce) -> Reply {
        let outcomes_max = self.limits.outcomes_per_session_max;
        let s = match caller_session(&mut self.st.sessions, caller) {
            Ok(s) => s,
            Err(r) => return Reply::Refused(r),
        };
        if nonce < s.low_water {
            return Reply::Cancelled { gave_back: None };
        }
        match s.outcomes.get(&nonce).cloned() {
            Some(Outcome::Pending) => {
                let lr = s.waits.get(&nonce).map(|w| w.lock.clone());
                s.outcomes
                    .insert(nonce, Outcome::Refused(Refusal::Cancelled));
                if let Some(lr) = lr {
                    self.remove_waiter(&lr, caller.client, nonce);
                }
                Reply::Cancelled { gave_back: None }
            }
            Some(Outcome::Granted(token)) => match s.held.get(&token).cloned() {
                Some(lr) => {
                    self.end_grant(&lr, token, EndReason::Released);
                    Reply::Cancelled {
                        gave_back: Some(token),
                    }
                }
                None => Reply::Cancelled { gave_back: None },
            },
            Some(Outcome::Refused(_)) => Reply::Cancelled { gave_back: None },
            None => {
                if s.outcomes.len() >= outcomes_max {
                    return Reply::Refused(Refusal::Limit {
                        what: "outcomes_per_session_max".into(),
                    });
                }
                s.outcomes
                    .insert(nonce, Outcome::Refused(Refusal::Cancelled));
                Reply::Cancelled { gave_back: None }
            }
        }
    }

    fn op_break(&mut self, zone: &str, name: &str, expected: Option<Token>) -> Reply {
        let tokens: Vec<Token> = match self.lock(zone, name) {
            None => Vec::new(),
            Some(lock) => {
                let mut t: Vec<Token> = lock
                    .holders
                    .iter()
                    .map(|h| h.token)
                    .filter(|t| expected.is_none_or(|e| e == *t))
                    .collect();
                t.sort_unstable();
                t
            }
        };
        if !tokens.is_empty() {
            let lr = self.intern(zone, name);
            for &t in &tokens {
                self.end_grant(&lr, t, EndReason::Lost(LossReason::Broken));
            }
        }
        Reply::Broken { tokens }
    }

    // ------------------------------------------------------------------
    // Watches
    // ------------------------------------------------------------------

    fn op_watch(&mut self, caller: &Caller, zone: &str, name: &str) -> Reply {
        let watches_max = self.limits.watches_per_session_max;
        if zone.is_empty() || name.is_empty() {
            return Reply::Refused(Refusal::Invalid {
                what: "empty zone or lock name".into(),
            });
        }
        if zone.len() > self.limits.zone_name_bytes_max {
            return Reply::Refused(Refusal::Limit {
                what: "zone_name_bytes_max".into(),
            });
        }
        if name.len() > self.limits.lock_name_bytes_max {
            return Reply::Refused(Refusal::Limit {
                what: "lock_name_bytes_max".into(),
            });
        }
        let lr: LockRef = match self.lock_ref(zone, name) {
            Some(lr) => lr,
            None => (Arc::from(zone), Arc::from(name)),
        };
        let s = match caller_session(&mut self.st.sessions, caller) {
            Ok(s) => s,
            Err(r) => return Reply::Refused(r),
        };
        if s.watches.contains(&lr) {
            return Reply::Done;
        }
        if s.watches.len() >= watches_max {
            return Reply::Refused(Refusal::Limit {
                what: "watches_per_session_max".into(),
            });
        }
        s.watches.insert(lr.clone());
        self.st
            .watchers
            .entry(lr)
            .or_default()
            .insert(caller.client);
        Reply::Done
    }

    fn op_unwatch(&mut self, caller: &Caller, zone: &str, name: &str) -> Reply {
        let s = match caller_session(&mut self.st.sessions, caller) {
            Ok(s) => s,
            Err(r) => return Reply::Refused(r),
        };
        let key: LockRef = (Arc::from(zone), Arc::from(name));
        s.watches.remove(&key);
        if let Some(set) = self.st.watchers.get_mut(&key) {
            set.remove(&caller.client);
            if set.is_empty() {
                self.st.watchers.remove(&key);
            }
        }
        Reply::Done
    }

    fn emit_watch_events(&mut self) {
        if self.changed.is_empty() {
            return;
        }
        let mut changed = std::mem::take(&mut self.changed);
        if !self.st.watchers.is_empty() {
            changed.sort();
            changed.dedup();
            let now = self.st.now;
            for lr in &changed {
                let Some(watchers) = self.st.watchers.get(lr) else {
                    continue;
                };
                let mut holders: Vec<HolderInfo> = self
                    .lock(&lr.0, &lr.1)
                    .map(|l| l.holders.iter().map(|h| holder_info(h, now)).collect())
                    .unwrap_or_default();
                holders.sort_by_key(|h| h.token);
                for &client in watchers {
                    self.effects.push(Effect::Watch {
                        client,
                        zone: lr.0.clone(),
                        name: lr.1.clone(),
                        holders: holders.clone(),
                    });
                }
            }
        }
        changed.clear();
        self.changed = changed;
    }

    // ------------------------------------------------------------------
    // Deadlock search
    // ------------------------------------------------------------------

    /// Whether `target` is reachable from `start` nodes in the wait-for
    /// graph, within the search bounds (past them: `false`).
    fn reaches(&self, start: &[Node], target: Node) -> bool {
        let mut stack: Vec<Node> = start.to_vec();
        let mut seen: BTreeSet<Node> = BTreeSet::new();
        let mut edges_seen = start.len();
        let mut next = Vec::new();
        while let Some(node) = stack.pop() {
            if node == target {
                return true;
            }
            if !seen.insert(node) {
                continue;
            }
            if seen.len() > self.limits.deadlock_search_nodes_max
                || edges_seen > self.limits.deadlock_search_edges_max
            {
                return false;
            }
            let Some(s) = self.st.sessions.get(&node.0) else {
                continue;
            };
            if !s.owners.contains_key(&node.1) {
                continue;
            }
            for w in s.waits.values() {
                if w.owner != node.1 {
                    continue;
                }
                let Some(lock) = self.lock(&w.lock.0, &w.lock.1) else {
                    continue;
                };
                let Some(i) = lock.waiter_index(w.seq) else {
                    continue;
                };
                next.clear();
                edges_of(lock, lock.waiters()[i].mode, i, &mut next);
                edges_seen += next.len();
                stack.extend(next.iter().copied());
            }
        }
        false
    }

    // ------------------------------------------------------------------
    // Table access
    // ------------------------------------------------------------------

    fn lock(&self, zone: &str, name: &str) -> Option<&Lock> {
        self.st.zones.get(zone)?.get(name).map(|l| &**l)
    }

    fn lock_mut(&mut self, zone: &str, name: &str) -> Option<&mut Lock> {
        self.st.zones.get_mut(zone)?.get_mut(name).map(|l| &mut **l)
    }

    /// The shared strings of an existing lock entry.
    fn lock_ref(&self, zone: &str, name: &str) -> Option<LockRef> {
        let (z, locks) = self.st.zones.get_key_value(zone)?;
        let (n, _) = locks.get_key_value(name)?;
        Some((z.clone(), n.clone()))
    }

    /// The lock entry for (zone, name), created empty if missing.
    fn intern(&mut self, zone: &str, name: &str) -> LockRef {
        if let Some(lr) = self.lock_ref(zone, name) {
            return lr;
        }
        let z: Arc<str> = match self.st.zones.get_key_value(zone) {
            Some((z, _)) => z.clone(),
            None => {
                let z: Arc<str> = Arc::from(zone);
                self.st.zones.insert(z.clone(), BTreeMap::new());
                z
            }
        };
        let n: Arc<str> = Arc::from(name);
        if let Some(locks) = self.st.zones.get_mut(zone) {
            locks.insert(n.clone(), Box::default());
        }
        (z, n)
    }

    fn drop_if_idle(&mut self, lr: &LockRef) {
        let Some(locks) = self.st.zones.get_mut(&lr.0) else {
            return;
        };
        if locks.get(&lr.1).is_some_and(|l| l.idle()) {
            locks.remove(&lr.1);
            if locks.is_empty() {
                self.st.zones.remove(&lr.0);
            }
        }
    }

    fn move_timer(&mut self, old: u64, new: u64, t: Timer) {
        if old != new {
            self.timers.remove(&(old, t.clone()));
            self.timers.insert((new, t));
        }
    }

    /// Every deadline, recomputed from the table.
    fn compute_timers(&self) -> BTreeSet<(u64, Timer)> {
        let mut t = BTreeSet::new();
        for (&c, s) in &self.st.sessions {
            t.insert((s.deadline, Timer::Session(c)));
        }
        for (z, locks) in &self.st.zones {
            for (n, lock) in locks {
                let lr: LockRef = (z.clone(), n.clone());
                if lock.available_at() != 0 {
                    t.insert((lock.available_at(), Timer::Delay(lr.clone())));
                }
                for h in &lock.holders {
                    if let Some(d) = h.deadline {
                        t.insert((d, Timer::Ttl(h.token, lr.clone())));
                    }
                }
                for w in lock.waiters() {
                    if let Some(d) = w.deadline {
                        t.insert((d, Timer::Wait(w.client.get(), w.nonce)));
                    }
                }
            }
        }
        t
    }

    // ------------------------------------------------------------------
    // Queries (read-only; served after a read-index round)
    // ------------------------------------------------------------------

    /// Holders and queue length of a lock; `None` if it is free and idle.
    pub fn query(&self, zone: &str, name: &str) -> Option<LockInfo> {
        let (lr, lock) = {
            let (z, locks) = self.st.zones.get_key_value(zone)?;
            let (n, lock) = locks.get_key_value(name)?;
            ((z.clone(), n.clone()), lock)
        };
        Some(self.lock_info(&lr, lock))
    }

    fn lock_info(&self, lr: &LockRef, lock: &Lock) -> LockInfo {
        let now = self.st.now;
        let mut holders: Vec<HolderInfo> =
            lock.holders.iter().map(|h| holder_info(h, now)).collect();
        holders.sort_by_key(|h| h.token);
        LockInfo {
            zone: lr.0.clone(),
            name: lr.1.clone(),
            holders,
            waiters: lock.waiters().len(),
            delay_ms: lock.available_at().saturating_sub(now),
        }
    }

    /// Whether `token` is a current grant of (zone, name).
    pub fn check_token(&self, zone: &str, name: &str, token: Token) -> bool {
        self.lock(zone, name)
            .is_some_and(|l| l.holders.iter().any(|h| h.token == token))
    }

    /// One page of the locks of a zone in name order, starting after
    /// `after`; at most `limit` (capped by `list_page_max`). Returns the page
    /// and the cursor of the next page, if there is more.
    pub fn list(
        &self,
        zone: &str,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<LockInfo>, Option<String>) {
        let limit = limit.clamp(1, self.limits.list_page_max.max(1));
        let Some((z, locks)) = self.st.zones.get_key_value(zone) else {
            return (Vec::new(), None);
        };
        let range: Box<dyn Iterator<Item = (&Arc<str>, &Box<Lock>)>> = match after {
            Some(a) => Box::new(
                locks.range::<str, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            ),
            None => Box::new(locks.iter()),
        };
        let mut page = Vec::new();
        let mut more = false;
        for (n, lock) in range {
            if page.len() == limit {
                more = true;
                break;
            }
            page.push(self.lock_info(&(z.clone(), n.clone()), lock));
        }
        let next = if more {
            page.last().map(|l| l.name.to_string())
        } else {
            None
        };
        (page, next)
    }

    /// Counts per zone, in zone order.
    pub fn zone_counts(&self) -> Vec<(Arc<str>, ZoneCounts)> {
        self.st
            .zones
            .iter()
            .map(|(z, locks)| {
                let mut c = ZoneCounts::default();
                for lock in locks.values() {
                    c.locks += 1;
                    c.holders += lock.holders.len();
                    c.waiters += lock.waiters().len();
                }
                (z.clone(), c)
            })
            .collect()
    }

    /// How the LOCK `nonce` of session `client` stands, as far as the engine
    /// remembers: still waiting, granted, or refused (`NoSession` when the
    /// session is gone). `None` if the nonce is forgotten (below the
    /// session's mark) or was never seen. Lets a server that skipped
    /// entries (snapshot install) settle the waits it was listening for.
    pub fn lock_outcome(&self, client: ClientId, nonce: Nonce) -> Option<LockOutcome> {
        let Some(s) = self.st.sessions.get(&client) else {
            return Some(LockOutcome::Refused(Refusal::NoSession));
        };
        Some(match s.outcomes.get(&nonce)? {
            Outcome::Pending => LockOutcome::Waiting,
            Outcome::Granted(t) => LockOutcome::Granted(*t),
            Outcome::Refused(r) => LockOutcome::Refused(r.clone()),
        })
    }

    /// A session's identity, timeout and remaining time, if it exists.
    pub fn session(&self, client: ClientId) -> Option<(Arc<str>, u64, u64)> {
        let s = self.st.sessions.get(&client)?;
        Some((
            s.identity.clone(),
            s.timeout_ms,
            s.deadline.saturating_sub(self.st.now),
        ))
    }

    // ------------------------------------------------------------------
    // Snapshots
    // ------------------------------------------------------------------

    /// The whole replicated state as bytes: a version byte, then postcard.
    /// Deterministic: the same state gives the same bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = vec![SNAPSHOT_VERSION];
        // Serialising plain maps, strings and integers into a Vec cannot
        // fail; a failure would be a bug in the types above.
        let body = postcard::to_stdvec(&self.st).expect("lock table serialises");
        out.extend_from_slice(&body);
        out
    }

    /// Restore a table from [`Engine::snapshot`] bytes, rebuilding the
    /// derived indexes and checking every invariant.
    pub fn restore(limits: EngineLimits, bytes: &[u8]) -> Result<Engine, SnapshotError> {
        let (&version, body) = bytes.split_first().ok_or(SnapshotError::Empty)?;
        if version != SNAPSHOT_VERSION {
            return Err(SnapshotError::Version(version));
        }
        let st: State = postcard::from_bytes(body)?;
        let mut e = Engine::new(limits);
        e.st = st;
        e.rebuild_indexes().map_err(SnapshotError::Inconsistent)?;
        e.check_invariants().map_err(SnapshotError::Inconsistent)?;
        Ok(e)
    }

    fn rebuild_indexes(&mut self) -> Result<(), String> {
        // Share zone and name strings between the table and the indexes.
        self.identities.clear();
        for s in self.st.sessions.values_mut() {
            s.held.clear();
            s.waits.clear();
            s.owners.clear();
            s.watches.clear();
        }
        let mut ids: BTreeMap<Arc<str>, Arc<str>> = BTreeMap::new();
        for s in self.st.sessions.values_mut() {
            let id = ids
                .entry(s.identity.clone())
                .or_insert_with(|| s.identity.clone());
            s.identity = id.clone();
            *self.identities.entry(id.clone()).or_insert(0) += 1;
        }
        for (z, locks) in &self.st.zones {
            for (n, lock) in locks {
                let lr: LockRef = (z.clone(), n.clone());
                for h in &lock.holders {
                    if h.bound {
                        let s =
                            self.st.sessions.get_mut(&h.client.get()).ok_or_else(|| {
                                format!("holder {} of a missing session", h.token)
                            })?;
                        s.held.insert(h.token, lr.clone());
                        s.owner_add(h.owner);
                    }
                }
                for w in lock.waiters() {
                    let s = self
                        .st
                        .sessions
                        .get_mut(&w.client.get())
                        .ok_or_else(|| format!("waiter {} of a missing session", w.nonce))?;
                    s.waits.insert(
                        w.nonce,
                        WaitRef {
                            lock: lr.clone(),
                            owner: w.owner,
                            seq: w.seq,
                        },
                    );
                    s.owner_add(w.owner);
                }
            }
        }
        for (lr, set) in &self.st.watchers {
            for c in set {
                let s = self
                    .st
                    .sessions
                    .get_mut(c)
                    .ok_or_else(|| "watcher of a missing session".to_string())?;
                s.watches.insert(lr.clone());
            }
        }
        self.timers = self.compute_timers();
        self.ended_base = 0;
        self.ended_index = self
            .st
            .ended
            .iter()
            .enumerate()
            .map(|(i, e)| (e.token, i as u64))
            .collect();
        if self.ended_index.len() != self.st.ended.len() {
            return Err("a token ended twice".into());
        }
        Ok(())
    }

    // ------------------------------------------------------------------
    // Invariants
    // ------------------------------------------------------------------

    /// Check every invariant of ARCHITECTURE.md ("Invariants"). O(table).
    pub fn check_invariants(&self) -> Result<(), String> {
        let now = self.st.now;
        let mut tokens = BTreeSet::new();
        let mut held_count = 0usize;
        let mut wait_count = 0usize;
        for (z, locks) in &self.st.zones {
            if locks.is_empty() {
                return Err(format!("empty zone {z}"));
            }
            for (n, lock) in locks {
                let at = || format!("{z}/{n}");
                if lock.idle() {
                    return Err(format!("idle lock entry {}", at()));
                }
                let excl = lock
                    .holders
                    .iter()
                    .filter(|h| h.mode == Mode::Exclusive)
                    .count();
                if excl > 1 || (excl == 1 && lock.holders.len() > 1) {
                    return Err(format!("mutual exclusion broken on {}", at()));
                }
                if lock.available_at() != 0 && lock.available_at() <= now {
                    return Err(format!("lock-delay of {} is overdue", at()));
                }
                for h in &lock.holders {
                    if h.token == 0 || h.token > self.st.last_token || !tokens.insert(h.token) {
                        return Err(format!("bad or duplicate token {} on {}", h.token, at()));
                    }
                    if h.deadline.is_some_and(|d| d <= now) {
                        return Err(format!("overdue TTL of token {}", h.token));
                    }
                    if h.kind == Kind::Connection && !h.bound {
                        return Err(format!("connection lock {} without a session", h.token));
                    }
                    if h.kind == Kind::Static && h.key.is_none() {
                        return Err(format!("static lock {} without an owner key", h.token));
                    }
                    if h.bound {
                        held_count += 1;
                        let s = self.st.sessions.get(&h.client.get()).ok_or_else(|| {
                            format!("token {} held by a missing session", h.token)
                        })?;
                        match s.held.get(&h.token) {
                            Some((sz, sn)) if sz == z && sn == n => {}
                            _ => return Err(format!("session index lacks token {}", h.token)),
                        }
                    }
                }
                let mut nodes = BTreeSet::new();
                if lock
                    .waiters()
                    .iter()
                    .zip(lock.waiters().iter().skip(1))
                    .any(|(a, b)| a.seq >= b.seq)
                    || lock.queue.as_ref().is_some_and(|q| {
                        (q.waiters.is_empty() && q.available_at == 0)
                            || q.waiters.back().is_some_and(|w| w.seq >= q.next_seq)
                    })
                {
                    return Err(format!("queue order keys of {} are not increasing", at()));
                }
                for w in lock.waiters() {
                    wait_count += 1;
                    if !nodes.insert((w.client, w.owner)) {
                        return Err(format!("owner waits twice on {}", at()));
                    }
                    let s = self
                        .st
                        .sessions
                        .get(&w.client.get())
                        .ok_or_else(|| format!("waiter of a missing session on {}", at()))?;
                    match s.waits.get(&w.nonce) {
                        Some(r)
                            if r.lock.0 == *z
                                && r.lock.1 == *n
                                && r.owner == w.owner
                                && r.seq == w.seq => {}
                        _ => return Err(format!("session index lacks wait {}", w.nonce)),
                    }
                    if w.deadline.is_some_and(|d| d <= now) {
                        return Err(format!("overdue wait {} on {}", w.nonce, at()));
                    }
                }
                if let Some(head) = lock.waiters().front() {
                    if lock.available_at() == 0 && lock.compatible(head.mode) {
                        return Err(format!("queue of {} is wedged: head is grantable", at()));
                    }
                }
            }
        }
        let mut ids: BTreeMap<&str, usize> = BTreeMap::new();
        let (mut s_held, mut s_waits) = (0usize, 0usize);
        for (c, s) in &self.st.sessions {
            if s.deadline <= now {
                return Err(format!("session {c:x} outlived its deadline"));
            }
            s_held += s.held.len();
            s_waits += s.waits.len();
            let owner_total: u32 = s.owners.values().sum();
            if owner_total as usize != s.held.len() + s.waits.len() {
                return Err(format!("owner index of session {c:x} disagrees"));
            }
            *ids.entry(&s.identity).or_insert(0) += 1;
            for lr in &s.watches {
                if !self.st.watchers.get(lr).is_some_and(|w| w.contains(c)) {
                    return Err("watch index disagrees".into());
                }
            }
            if s.outcomes.first_nonce().is_some_and(|n| n < s.low_water) {
                return Err(format!("session {c:x} remembers nonces below its mark"));
            }
        }
        if s_held != held_count || s_waits != wait_count {
            return Err(format!(
                "session indexes ({s_held} held, {s_waits} waits) disagree with the table ({held_count}, {wait_count})"
            ));
        }
        let watch_entries: usize = self.st.watchers.values().map(BTreeSet::len).sum();
        let session_watches: usize = self.st.sessions.values().map(|s| s.watches.len()).sum();
        if watch_entries != session_watches {
            return Err("watcher counts disagree".into());
        }
        let same_ids = ids.len() == self.identities.len()
            && ids.iter().all(|(k, v)| self.identities.get(*k) == Some(v));
        if !same_ids {
            return Err("identity counts disagree".into());
        }
        if self.timers != self.compute_timers() {
            return Err("timer set disagrees with the table".into());
        }
        Ok(())
    }
}

/// Wait-for edges of a waiter in `mode` at queue position `pos` of `lock`:
/// every conflicting holder bound to a session, and the conflicting earlier
/// waiters back to (and including) the nearest exclusive one. That one
/// conflicts with everything before it and with every holder, so the edges
/// it has itself reach the rest: reachability, and so every cycle, is the
/// same as with an edge to every earlier conflicting waiter, at the cost of
/// the run of shared waiters before it instead of the whole queue.
fn edges_of(lock: &Lock, mode: Mode, pos: usize, out: &mut Vec<Node>) {
    for h in &lock.holders {
        if h.bound && mode.conflicts_with(h.mode) {
            out.push((h.client.get(), h.owner));
        }
    }
    for w in lock.waiters().iter().take(pos).rev() {
        if mode.conflicts_with(w.mode) {
            out.push((w.client.get(), w.owner));
        }
        if w.mode == Mode::Exclusive {
            break;
        }
    }
}

fn holder_info(h: &Holder, now: u64) -> HolderInfo {
    HolderInfo {
        identity: h.identity.clone(),
        client: h.client.get(),
        owner: h.owner,
        token: h.token,
        mode: h.mode,
        kind: h.kind,
        held_ms: now.saturating_sub(h.granted_at),
        expires_in_ms: h.deadline.map(|d| d.saturating_sub(now)),
    }
}

#[cfg(test)]
mod tests;
