//! The reference model: a deliberately simple, slow restatement of the lock
//! engine's semantics (ARCHITECTURE.md, "The lock engine"), written from the
//! prose and not from the engine's code, so that the property test compares
//! two independent readings of the same rules.
//!
//! Everything is recomputed the naive way: timers are found by scanning every
//! session, holder, waiter and lock-delay; the wait-for graph is rebuilt from
//! scratch and searched without a bound; lists are plain `Vec`s. Speed and
//! memory do not matter here, only obviousness.
//!
//! Points the prose leaves open are marked `UNSPECIFIED:` with the reading
//! chosen; the test report lists them.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use oclocks_core::{
    Applied, Caller, ClientId, Command, Effect, EndReason, EngineLimits, HeldLock, HolderInfo,
    KeyProof, LockInfo, LockRequest, LossReason, LostGrant, Nonce, Op, OwnerId, PublicKey, Refusal,
    Reply, Token, WaitInfo, WAIT_FOREVER,
};
use oclocks_proto::{Kind, Mode};

/// The free-text `what` of LIMIT and INVALID: the model does not guess the
/// engine's wording, and the harness blanks the engine's before comparing.
pub const NO_WHAT: Cow<'static, str> = Cow::Borrowed("");

/// A lock's address: (zone, name).
pub type LockKey = (String, String);

/// What a LOCK request (session, nonce) led to, as remembered for retries.
#[derive(Clone, Debug)]
pub enum Outcome {
    Granted { token: Token },
    Queued { lock: LockKey },
    Refused(Refusal),
    Cancelled,
}

/// One grant of the session that ended, in the session's own ring.
#[derive(Clone, Debug)]
pub struct RingEntry {
    pub token: Token,
    pub lock: LockKey,
    pub reason: EndReason,
    /// Whether an OpenSession reply already reported it (losses only).
    pub told: bool,
}

#[derive(Clone, Debug)]
pub struct Session {
    pub identity: String,
    pub timeout_ms: u64,
    pub deadline: u64,
    pub low_water: Nonce,
    pub outcomes: BTreeMap<Nonce, Outcome>,
    /// The session's own ended grants, newest first.
    pub ring: VecDeque<RingEntry>,
    pub watches: BTreeSet<LockKey>,
}

#[derive(Clone, Debug)]
pub struct Holder {
    pub token: Token,
    pub client: ClientId,
    pub identity: Arc<str>,
    /// Still bound to the session `client` (false once a static grant was
    /// detached by its session's end).
    pub attached: bool,
    pub owner: OwnerId,
    pub mode: Mode,
    pub kind: Kind,
    pub granted_at: u64,
    pub ttl_ms: u64,
    pub deadline: Option<u64>,
    pub key: Option<PublicKey>,
    pub counter: u64,
    pub lock_delay_ms: u64,
}

#[derive(Clone, Debug)]
pub struct Waiter {
    pub client: ClientId,
    pub identity: Arc<str>,
    pub nonce: Nonce,
    pub owner: OwnerId,
    pub mode: Mode,
    pub kind: Kind,
    pub ttl_ms: u64,
    pub lock_delay_ms: u64,
    pub key: Option<KeyProof>,
    pub deadline: Option<u64>,
}

#[derive(Clone, Debug, Default)]
pub struct Lock {
    /// Always in token order (tokens only grow, so pushing keeps the order).
    pub holders: Vec<Holder>,
    pub queue: Vec<Waiter>,
    /// End of a running lock-delay (its timer has not fired yet).
    pub delay_until: Option<u64>,
}

impl Lock {
    fn is_idle(&self) -> bool {
        self.holders.is_empty() && self.queue.is_empty() && self.delay_until.is_none()
    }
}

/// A grant remembered in the cluster-wide ended table.
#[derive(Clone, Debug)]
pub struct Ended {
    pub lock: LockKey,
    pub reason: EndReason,
}

/// The timers, in the order they fire at one deadline: session expiries by
/// client id, TTLs by token, wait timeouts by (client, nonce), lock-delay ends
/// by (zone, name). The derived `Ord` (variant first) is exactly that order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Session(ClientId),
    Ttl(Token),
    Wait(ClientId, Nonce),
    Delay(LockKey),
}

/// A node of the wait-for graph: (session client id, owner id).
type Node = (ClientId, OwnerId);

fn conflicts(a: Mode, b: Mode) -> bool {
    a == Mode::Exclusive || b == Mode::Exclusive
}

#[derive(Clone, Debug)]
pub struct Model {
    pub limits: EngineLimits,
    pub term: u64,
    /// Engine time.
    pub now: u64,
    /// Engine time minus the current leader's clock.
    pub offset: i128,
    pub last_token: Token,
    pub sessions: BTreeMap<ClientId, Session>,
    pub locks: BTreeMap<LockKey, Lock>,
    pub ended: BTreeMap<Token, Ended>,
    /// Tokens of `ended` in the order the grants ended.
    ended_order: VecDeque<Token>,
    /// Locks whose holders changed (a grant or an end) in this command.
    touched: BTreeSet<LockKey>,
}

impl Model {
    pub fn new(limits: EngineLimits) -> Model {
        Model {
            limits,
            term: 0,
            now: 0,
            offset: 0,
            last_token: 0,
            sessions: BTreeMap::new(),
            locks: BTreeMap::new(),
            ended: BTreeMap::new(),
            ended_order: VecDeque::new(),
            touched: BTreeSet::new(),
        }
    }

    // ----------------------------------------------------------------------
    // Queries
    // ----------------------------------------------------------------------

    fn holder_info(&self, h: &Holder) -> HolderInfo {
        HolderInfo {
            identity: h.identity.clone(),
            client: h.client,
            owner: h.owner,
            token: h.token,
            mode: h.mode,
            kind: h.kind,
            held_ms: self.now - h.granted_at,
            expires_in_ms: h.deadline.map(|d| d - self.now),
        }
    }

    /// The holder LOCKED and TIMEOUT name: the oldest (smallest token).
    fn oldest_holder_info(&self, key: &LockKey) -> Option<HolderInfo> {
        let lock = self.locks.get(key)?;
        lock.holders
            .iter()
            .min_by_key(|h| h.token)
            .map(|h| self.holder_info(h))
    }

    pub fn query(&self, zone: &str, name: &str) -> Option<LockInfo> {
        let key = (zone.to_string(), name.to_string());
        let lock = self.locks.get(&key)?;
        Some(LockInfo {
            zone: Arc::from(zone),
            name: Arc::from(name),
            holders: lock.holders.iter().map(|h| self.holder_info(h)).collect(),
            waiters: lock.queue.len(),
            delay_ms: lock.delay_until.map_or(0, |d| d - self.now),
        })
    }

    pub fn check_token(&self, zone: &str, name: &str, token: Token) -> bool {
        let key = (zone.to_string(), name.to_string());
        self.locks
            .get(&key)
            .is_some_and(|l| l.holders.iter().any(|h| h.token == token))
    }

    /// Every current holder token of a lock, in token order.
    pub fn holder_tokens(&self, key: &LockKey) -> Vec<Token> {
        self.locks
            .get(key)
            .map(|l| l.holders.iter().map(|h| h.token).collect())
            .unwrap_or_default()
    }

    pub fn find_holder(&self, token: Token) -> Option<(&LockKey, &Holder)> {
        self.locks
            .iter()
            .find_map(|(k, l)| l.holders.iter().find(|h| h.token == token).map(|h| (k, h)))
    }

    /// Self-checks of the model (a failure here is a bug of the model).
    pub fn check(&self) {
        for (key, lock) in &self.locks {
            assert!(!lock.is_idle(), "model: idle lock entry {key:?}");
            let ex = lock
                .holders
                .iter()
                .filter(|h| h.mode == Mode::Exclusive)
                .count();
            assert!(
                ex == 0 || lock.holders.len() == 1,
                "model: exclusive holder shares {key:?}"
            );
            assert!(
                lock.holders.windows(2).all(|w| w[0].token < w[1].token),
                "model: holders out of token order in {key:?}"
            );
            if let Some(head) = lock.queue.first() {
                let grantable = lock.delay_until.is_none()
                    && !lock.holders.iter().any(|h| conflicts(h.mode, head.mode));
                assert!(!grantable, "model: wedged queue at {key:?}");
            }
            for w in &lock.queue {
                assert!(
                    self.sessions.contains_key(&w.client),
                    "model: orphan waiter"
                );
            }
        }
        // Every cycle is refused when its last wait is queued, and a grant
        // only removes edges or keeps them pointing at the same owner, so
        // the graph stays acyclic (which is why the model need not repeat
        // the check at every grant, as the engine's bounded search must).
        let edges = self.wait_for_graph();
        for (node, out) in &edges {
            assert!(
                !Self::reaches(&edges, out, *node),
                "model: wait-for cycle through {node:?}"
            );
        }
    }

    // ----------------------------------------------------------------------
    // apply
    // ----------------------------------------------------------------------

    pub fn apply(&mut self, cmd: &Command) -> Applied {
        self.touched.clear();
        let mut fx = Vec::new();
        self.advance_time(cmd);
        self.fire_timers(&mut fx);
        let reply = match &cmd.op {
            Op::OpenSession { caller, timeout_ms } => self.open_session(caller, *timeout_ms),
            Op::Keepalive { callers } => self.keepalive(callers),
            Op::CloseSession { caller } => self.close_session(caller, &mut fx),
            Op::Lock(req) => self.lock(req, &mut fx),
            Op::Cancel { caller, nonce } => self.cancel(caller, *nonce, &mut fx),
            Op::Release {
                caller,
                zone,
                name,
                token,
                key,
            } => self.release(caller, zone, name, *token, key.as_ref(), &mut fx),
            Op::Refresh {
                caller,
                zone,
                name,
                token,
                ttl_ms,
                key,
            } => self.refresh(caller, zone, name, *token, *ttl_ms, key.as_ref()),
            Op::Break {
                zone,
                name,
                expected_token,
            } => self.break_lock(zone, name, *expected_token, &mut fx),
            Op::Watch { caller, zone, name } => self.watch(caller, zone, name),
            Op::Unwatch { caller, zone, name } => self.unwatch(caller, zone, name),
            Op::Tick | Op::Rebase => Reply::Done,
        };
        self.watch_effects(&mut fx);
        Applied { reply, effects: fx }
    }

    // ----------------------------------------------------------------------
    // Time
    // ----------------------------------------------------------------------

    /// Engine time is one timeline that never moves backwards (ARCHITECTURE
    /// "Time model"): within a term it is the largest stamp seen, mapped
    /// through `offset`; a new term or a `Rebase` fixes a new offset so that
    /// engine time goes on from where the last command left it. Hence every
    /// TTL, wait and lock-delay keeps exactly its remaining time and every
    /// `held_ms` is preserved, while each session gets a full timeout.
    fn advance_time(&mut self, cmd: &Command) {
        let rebase = matches!(cmd.op, Op::Rebase) && cmd.term == self.term;
        if cmd.term > self.term || rebase {
            self.term = cmd.term;
            self.offset = i128::from(self.now) - i128::from(cmd.now_ms);
            for s in self.sessions.values_mut() {
                s.deadline = self.now + s.timeout_ms;
            }
        } else if cmd.term == self.term {
            let t = (i128::from(cmd.now_ms) + self.offset).max(0);
            let t = u64::try_from(t).expect("model: engine time fits u64");
            self.now = self.now.max(t);
        }
    }

    fn due_timer(&self, target: u64) -> Option<(u64, Timer)> {
        let mut all: Vec<(u64, Timer)> = Vec::new();
        for (c, s) in &self.sessions {
            all.push((s.deadline, Timer::Session(*c)));
        }
        for (key, lock) in &self.locks {
            for h in &lock.holders {
                if let Some(d) = h.deadline {
                    all.push((d, Timer::Ttl(h.token)));
                }
            }
            for w in &lock.queue {
                if let Some(d) = w.deadline {
                    all.push((d, Timer::Wait(w.client, w.nonce)));
                }
            }
            if let Some(d) = lock.delay_until {
                all.push((d, Timer::Delay(key.clone())));
            }
        }
        all.into_iter().filter(|(d, _)| *d <= target).min()
    }

    /// Every timer due by now fires in (deadline, kind, key) order, *at its
    /// deadline*: engine time steps to the deadline while it fires and the
    /// affected queue is served, so grants, TTLs and lock-delays it causes
    /// are stamped with that instant (and may fall due themselves), and a
    /// session that expired before is never granted.
    fn fire_timers(&mut self, fx: &mut Vec<Effect>) {
        let target = self.now;
        let mut last = 0;
        while let Some((deadline, timer)) = self.due_timer(target) {
            assert!(deadline >= last, "model: timers out of order");
            last = deadline;
            self.now = deadline;
            match timer {
                Timer::Session(c) => {
                    // Every session expiring at this instant is gone before
                    // any queue is served: "expired sessions lose their waits
                    // before anything is granted" (ARCHITECTURE, pump).
                    let mut dying = vec![c];
                    dying.extend(
                        self.sessions
                            .iter()
                            .filter(|(other, s)| s.deadline == deadline && **other != c)
                            .map(|(other, _)| *other),
                    );
                    let mut affected = BTreeSet::new();
                    for c in dying {
                        affected.extend(self.end_session(c, true, fx));
                    }
                    for key in affected {
                        self.serve(&key, fx);
                    }
                }
                Timer::Ttl(token) => {
                    let (key, _) = self
                        .find_holder(token)
                        .expect("model: TTL of a missing holder");
                    let key = key.clone();
                    self.end_holder(&key, token, EndReason::Lost(LossReason::TtlExpired), fx);
                    self.serve(&key, fx);
                }
                Timer::Wait(c, nonce) => {
                    let key = self
                        .waiter_lock(c, nonce)
                        .expect("model: timeout of a missing wait");
                    let lock = self.locks.get_mut(&key).expect("model: lock of a wait");
                    lock.queue.retain(|w| !(w.client == c && w.nonce == nonce));
                    let refusal = Refusal::Timeout {
                        holder: self.oldest_holder_info(&key),
                    };
                    self.record(c, nonce, Outcome::Refused(refusal.clone()));
                    fx.push(Effect::WaitEnded {
                        client: c,
                        nonce,
                        zone: Arc::from(key.0.as_str()),
                        name: Arc::from(key.1.as_str()),
                        refusal,
                    });
                    self.serve(&key, fx);
                }
                Timer::Delay(key) => {
                    let lock = self.locks.get_mut(&key).expect("model: lock of a delay");
                    lock.delay_until = None;
                    self.serve(&key, fx);
                }
            }
        }
        self.now = target;
    }

    // ----------------------------------------------------------------------
    // Helpers shared by operations
    // ----------------------------------------------------------------------

    fn check_caller(&self, caller: &Caller) -> Result<(), Refusal> {
        match self.sessions.get(&caller.client) {
            None => Err(Refusal::NoSession),
            Some(s) if s.identity != caller.identity => Err(Refusal::Forbidden),
            Some(_) => Ok(()),
        }
    }

    fn waiter_lock(&self, client: ClientId, nonce: Nonce) -> Option<LockKey> {
        self.locks
            .iter()
            .find(|(_, l)| {
                l.queue
                    .iter()
                    .any(|w| w.client == client && w.nonce == nonce)
            })
            .map(|(k, _)| k.clone())
    }

    /// Remember the outcome of (client, nonce), unless the session is gone or
    /// the nonce fell below its low-water mark (then it is forgotten anyway).
    fn record(&mut self, client: ClientId, nonce: Nonce, outcome: Outcome) {
        if let Some(s) = self.sessions.get_mut(&client) {
            if nonce >= s.low_water {
                s.outcomes.insert(nonce, outcome);
            }
        }
    }

    fn next_token(&mut self) -> Token {
        self.last_token += 1;
        self.last_token
    }

    /// Remove the holder `token` of `key`, remember how it ended, and for an
    /// involuntary loss emit `Lost` and start the holder's lock-delay. Does
    /// not serve the queue.
    fn end_holder(&mut self, key: &LockKey, token: Token, reason: EndReason, fx: &mut Vec<Effect>) {
        let now = self.now;
        let lock = self
            .locks
            .get_mut(key)
            .expect("model: end_holder on a missing lock");
        let idx = lock
            .holders
            .iter()
            .position(|h| h.token == token)
            .expect("model: end_holder on a missing holder");
        let h = lock.holders.remove(idx);
        self.touched.insert(key.clone());
        if let EndReason::Lost(loss) = reason {
            if h.lock_delay_ms > 0 {
                let until = now + h.lock_delay_ms;
                // UNSPECIFIED: two losses with running delays: the later end wins.
                lock.delay_until = Some(lock.delay_until.map_or(until, |d| d.max(until)));
            }
            fx.push(Effect::Lost {
                client: h.attached.then_some(h.client),
                zone: Arc::from(key.0.as_str()),
                name: Arc::from(key.1.as_str()),
                token,
                reason: loss,
            });
        }
        // The cluster-wide table forgets the entry that ended first.
        // ARCHITECTURE says "the oldest tokens are forgotten first"; the
        // engine forgets in the order grants *ended* (FIFO), which the model
        // follows: by token, a grant held for long would be forgotten at
        // once when it ends (see the test report).
        self.ended.insert(
            token,
            Ended {
                lock: key.clone(),
                reason,
            },
        );
        self.ended_order.push_back(token);
        while self.ended.len() > self.limits.ended_grants_max {
            let oldest = self
                .ended_order
                .pop_front()
                .expect("model: ended order tracks the table");
            self.ended.remove(&oldest);
        }
        if h.attached {
            if let Some(s) = self.sessions.get_mut(&h.client) {
                s.ring.push_front(RingEntry {
                    token,
                    lock: key.clone(),
                    reason,
                    told: false,
                });
                s.ring.truncate(self.limits.ended_per_session_max);
            }
        }
    }

    fn drop_if_idle(&mut self, key: &LockKey) {
        if self.locks.get(key).is_some_and(Lock::is_idle) {
            self.locks.remove(key);
        }
    }

    /// Queue service: strictly FIFO from the head while no lock-delay runs.
    fn serve(&mut self, key: &LockKey, fx: &mut Vec<Effect>) {
        loop {
            let now = self.now;
            let Some(lock) = self.locks.get_mut(key) else {
                return;
            };
            if lock.delay_until.is_some() {
                break;
            }
            let Some(head) = lock.queue.first() else {
                break;
            };
            if lock.holders.iter().any(|h| conflicts(h.mode, head.mode)) {
                break;
            }
            let w = lock.queue.remove(0);
            self.last_token += 1;
            let token = self.last_token;
            let lock = self
                .locks
                .get_mut(key)
                .expect("model: lock vanished while serving");
            lock.holders.push(Holder {
                token,
                client: w.client,
                identity: w.identity.clone(),
                attached: true,
                owner: w.owner,
                mode: w.mode,
                kind: w.kind,
                granted_at: now,
                ttl_ms: w.ttl_ms,
                deadline: (w.ttl_ms > 0).then(|| now + w.ttl_ms),
                key: w.key.as_ref().map(|k| k.key),
                counter: w.key.as_ref().map_or(0, |k| k.counter),
                lock_delay_ms: w.lock_delay_ms,
            });
            self.touched.insert(key.clone());
            fx.push(Effect::Granted {
                client: w.client,
                nonce: w.nonce,
                zone: Arc::from(key.0.as_str()),
                name: Arc::from(key.1.as_str()),
                token,
            });
            self.record(w.client, w.nonce, Outcome::Granted { token });
            // The grant-time deadlock check of the grantee's other waits is
            // not modelled: with an unbounded search at every enqueue no
            // cycle can exist (`check` asserts it after every command), so
            // it can never find one. The test's limits keep the engine's
            // bounded search from giving up.
        }
        self.drop_if_idle(key);
    }

    /// Session expiry (`expired`) or CLOSE. Returns the locks whose queues
    /// the caller must serve.
    fn end_session(
        &mut self,
        c: ClientId,
        expired: bool,
        fx: &mut Vec<Effect>,
    ) -> BTreeSet<LockKey> {
        let mut affected: BTreeSet<LockKey> = BTreeSet::new();
        // 1. Waits are dropped first, silently.
        for (key, lock) in self.locks.iter_mut() {
            let n = lock.queue.len();
            lock.queue.retain(|w| w.client != c);
            if lock.queue.len() != n {
                affected.insert(key.clone());
            }
        }
        // 2. Connection grants end, in token order.
        let mut conn: Vec<(Token, LockKey)> = Vec::new();
        for (key, lock) in &self.locks {
            for h in &lock.holders {
                if h.attached && h.client == c && h.kind == Kind::Connection {
                    conn.push((h.token, key.clone()));
                }
            }
        }
        conn.sort();
        let reason = if expired {
            EndReason::Lost(LossReason::SessionExpired)
        } else {
            EndReason::Released
        };
        for (token, key) in conn {
            self.end_holder(&key, token, reason, fx);
            affected.insert(key);
        }
        // 3. Static grants are detached: they stay held.
        for lock in self.locks.values_mut() {
            for h in &mut lock.holders {
                if h.attached && h.client == c {
                    assert_eq!(
                        h.kind,
                        Kind::Static,
                        "model: connection grant survived its session"
                    );
                    h.attached = false;
                }
            }
        }
        // 4. Watches go with the session.
        self.sessions.remove(&c);
        if expired {
            fx.push(Effect::SessionExpired { client: c });
        }
        affected
    }

    /// One `Watch` per (watcher, lock) whose holders changed during the
    /// command, even if they changed back (a grant and its TTL loss inside
    /// one timer cascade), holders in token order as they are at the end.
    fn watch_effects(&self, fx: &mut Vec<Effect>) {
        for key in &self.touched {
            let holders: Vec<HolderInfo> = self
                .locks
                .get(key)
                .map(|l| l.holders.iter().map(|h| self.holder_info(h)).collect())
                .unwrap_or_default();
            for (c, s) in &self.sessions {
                if s.watches.contains(key) {
                    fx.push(Effect::Watch {
                        client: *c,
                        zone: Arc::from(key.0.as_str()),
                        name: Arc::from(key.1.as_str()),
                        holders: holders.clone(),
                    });
                }
            }
        }
    }

    // ----------------------------------------------------------------------
    // Sessions
    // ----------------------------------------------------------------------

    fn clamp_timeout(&self, t: u64) -> u64 {
        if t == 0 {
            self.limits.session_timeout_ms_default
        } else {
            t.clamp(
                self.limits.session_timeout_ms_min,
                self.limits.session_timeout_ms_max,
            )
        }
    }

    fn open_session(&mut self, caller: &Caller, timeout_ms: u64) -> Reply {
        let timeout = self.clamp_timeout(timeout_ms);
        let now = self.now;
        if let Some(s) = self.sessions.get(&caller.client) {
            if s.identity != caller.identity {
                return Reply::Refused(Refusal::Forbidden);
            }
            let mut held: Vec<HeldLock> = Vec::new();
            let mut waits: Vec<WaitInfo> = Vec::new();
            for (key, lock) in &self.locks {
                for h in &lock.holders {
                    if h.attached && h.client == caller.client {
                        held.push(HeldLock {
                            zone: Arc::from(key.0.as_str()),
                            name: Arc::from(key.1.as_str()),
                            token: h.token,
                            mode: h.mode,
                            kind: h.kind,
                        });
                    }
                }
                for w in &lock.queue {
                    if w.client == caller.client {
                        waits.push(WaitInfo {
                            zone: Arc::from(key.0.as_str()),
                            name: Arc::from(key.1.as_str()),
                            nonce: w.nonce,
                        });
                    }
                }
            }
            // UNSPECIFIED: held in token order, waits in nonce order.
            held.sort_by_key(|h| h.token);
            waits.sort_by_key(|w| w.nonce);
            let s = self
                .sessions
                .get_mut(&caller.client)
                .expect("model: session vanished");
            // UNSPECIFIED (engine's reading; ARCHITECTURE only says "0 =
            // default"): a resume asking for 0 keeps the session's timeout.
            if timeout_ms != 0 {
                s.timeout_ms = timeout;
            }
            s.deadline = now + s.timeout_ms;
            let timeout = s.timeout_ms;
            // UNSPECIFIED: `lost` = the session's ring entries ended by a loss
            // and not reported before, in the order they were lost (the
            // engine's reading).
            let mut lost: Vec<LostGrant> = Vec::new();
            for e in s.ring.iter_mut().rev() {
                if let EndReason::Lost(reason) = e.reason {
                    if !e.told {
                        e.told = true;
                        lost.push(LostGrant {
                            zone: Arc::from(e.lock.0.as_str()),
                            name: Arc::from(e.lock.1.as_str()),
                            token: e.token,
                            reason,
                        });
                    }
                }
            }
            return Reply::Session {
                resumed: true,
                timeout_ms: timeout,
                held,
                waits,
                lost,
            };
        }
        if self.sessions.len() >= self.limits.sessions_max {
            return Reply::Refused(Refusal::Limit { what: NO_WHAT });
        }
        let same_identity = self
            .sessions
            .values()
            .filter(|s| s.identity == caller.identity)
            .count();
        if same_identity >= self.limits.sessions_per_identity_max {
            return Reply::Refused(Refusal::Limit { what: NO_WHAT });
        }
        self.sessions.insert(
            caller.client,
            Session {
                identity: caller.identity.clone(),
                timeout_ms: timeout,
                deadline: now + timeout,
                low_water: 0,
                outcomes: BTreeMap::new(),
                ring: VecDeque::new(),
                watches: BTreeSet::new(),
            },
        );
        Reply::Session {
            resumed: false,
            timeout_ms: timeout,
            held: Vec::new(),
            waits: Vec::new(),
            lost: Vec::new(),
        }
    }

    fn keepalive(&mut self, callers: &[Caller]) -> Reply {
        let now = self.now;
        let results = callers
            .iter()
            .map(|c| match self.sessions.get_mut(&c.client) {
                None => Err(Refusal::NoSession),
                Some(s) if s.identity != c.identity => Err(Refusal::Forbidden),
                Some(s) => {
                    s.deadline = now + s.timeout_ms;
                    Ok(())
                }
            })
            .collect();
        Reply::Keepalive(results)
    }

    fn close_session(&mut self, caller: &Caller, fx: &mut Vec<Effect>) -> Reply {
        if let Err(r) = self.check_caller(caller) {
            return Reply::Refused(r);
        }
        // UNSPECIFIED: several affected locks are served in (zone, name) order.
        for key in self.end_session(caller.client, false, fx) {
            self.serve(&key, fx);
        }
        Reply::Done
    }

    // ----------------------------------------------------------------------
    // LOCK
    // ----------------------------------------------------------------------

    fn lock(&mut self, r: &LockRequest, fx: &mut Vec<Effect>) -> Reply {
        // 1. caller
        if let Err(e) = self.check_caller(&r.caller) {
            return Reply::Refused(e);
        }
        let c = r.caller.client;
        let s = self.sessions.get_mut(&c).expect("model: checked session");
        // 2. stale nonce
        if r.nonce < s.low_water {
            return Reply::Refused(Refusal::StaleNonce);
        }
        // 3. retry: the same outcome again
        if let Some(o) = s.outcomes.get(&r.nonce).cloned() {
            return match o {
                Outcome::Granted { token } => Reply::Granted { token },
                Outcome::Refused(refusal) => Reply::Refused(refusal),
                Outcome::Cancelled => Reply::Refused(Refusal::Cancelled),
                Outcome::Queued { lock } => {
                    let position = self.locks[&lock]
                        .queue
                        .iter()
                        .position(|w| w.client == c && w.nonce == r.nonce)
                        .expect("model: queued outcome without its waiter");
                    Reply::Queued { position }
                }
            };
        }
        // 4. low-water mark
        if r.low_water > r.nonce {
            return Reply::Refused(Refusal::Invalid { what: NO_WHAT });
        }
        s.low_water = s.low_water.max(r.low_water);
        let mark = s.low_water;
        s.outcomes.retain(|n, _| *n >= mark);
        // 5. outcome memory
        if s.outcomes.len() >= self.limits.outcomes_per_session_max {
            return Reply::Refused(Refusal::Limit { what: NO_WHAT });
        }
        // 6.–13. decided and recorded
        let outcome = self.lock_decide(r, fx);
        let reply = match &outcome {
            Outcome::Granted { token } => Reply::Granted { token: *token },
            Outcome::Refused(refusal) => Reply::Refused(refusal.clone()),
            Outcome::Queued { lock } => Reply::Queued {
                position: self.locks[lock].queue.len() - 1,
            },
            Outcome::Cancelled => unreachable!("model: a LOCK is never decided as cancelled"),
        };
        self.record(c, r.nonce, outcome);
        reply
    }

    fn lock_decide(&mut self, r: &LockRequest, _fx: &mut Vec<Effect>) -> Outcome {
        let refuse = Outcome::Refused;
        let l = &self.limits;
        // 6. fields
        if r.zone.is_empty() || r.name.is_empty() {
            return refuse(Refusal::Invalid { what: NO_WHAT });
        }
        if r.zone.len() > l.zone_name_bytes_max || r.name.len() > l.lock_name_bytes_max {
            return refuse(Refusal::Limit { what: NO_WHAT });
        }
        if r.kind == Kind::Static && r.key.is_none() {
            return refuse(Refusal::Invalid { what: NO_WHAT });
        }
        if r.ttl_ms > l.ttl_ms_max
            || (r.wait_ms != WAIT_FOREVER && r.wait_ms > l.wait_ms_max)
            || r.lock_delay_ms > l.lock_delay_ms_max
        {
            return refuse(Refusal::Limit { what: NO_WHAT });
        }
        let c = r.caller.client;
        let key: LockKey = (r.zone.clone(), r.name.clone());
        // 7. the same owner holds or waits on it
        if let Some(lock) = self.locks.get(&key) {
            if let Some(h) = lock
                .holders
                .iter()
                .find(|h| h.attached && h.client == c && h.owner == r.owner)
            {
                return refuse(Refusal::Locked {
                    holder: Some(self.holder_info(h)),
                });
            }
            if lock
                .queue
                .iter()
                .any(|w| w.client == c && w.owner == r.owner)
            {
                return refuse(Refusal::Invalid { what: NO_WHAT });
            }
        }
        // 8. the session's holds + waits
        let mut count = 0usize;
        for lock in self.locks.values() {
            count += lock
                .holders
                .iter()
                .filter(|h| h.attached && h.client == c)
                .count();
            count += lock.queue.iter().filter(|w| w.client == c).count();
        }
        if count >= self.limits.locks_per_session_max {
            return refuse(Refusal::Limit { what: NO_WHAT });
        }
        // 9. grantable now
        let now = self.now;
        let grantable = match self.locks.get(&key) {
            None => true,
            Some(lock) => {
                lock.queue.is_empty()
                    && lock.delay_until.is_none()
                    && !lock.holders.iter().any(|h| conflicts(h.mode, r.mode))
            }
        };
        let identity: Arc<str> = Arc::from(r.caller.identity.as_str());
        if grantable {
            let token = self.next_token();
            self.touched.insert(key.clone());
            let lock = self.locks.entry(key).or_default();
            lock.holders.push(Holder {
                token,
                client: c,
                identity,
                attached: true,
                owner: r.owner,
                mode: r.mode,
                kind: r.kind,
                granted_at: now,
                ttl_ms: r.ttl_ms,
                deadline: (r.ttl_ms > 0).then(|| now + r.ttl_ms),
                key: r.key.as_ref().map(|k| k.key),
                counter: r.key.as_ref().map_or(0, |k| k.counter),
                lock_delay_ms: r.lock_delay_ms,
            });
            return Outcome::Granted { token };
        }
        // 10. try-lock
        if r.wait_ms == 0 {
            return refuse(Refusal::Locked {
                holder: self.oldest_holder_info(&key),
            });
        }
        // 11. queue length
        if self.locks[&key].queue.len() >= self.limits.waiters_per_lock_max {
            return refuse(Refusal::Limit { what: NO_WHAT });
        }
        let w = Waiter {
            client: c,
            identity,
            nonce: r.nonce,
            owner: r.owner,
            mode: r.mode,
            kind: r.kind,
            ttl_ms: r.ttl_ms,
            lock_delay_ms: r.lock_delay_ms,
            key: r.key.clone(),
            deadline: (r.wait_ms != WAIT_FOREVER).then(|| now + r.wait_ms),
        };
        // 12. deadlock
        if self.would_deadlock(&key, &w) {
            return refuse(Refusal::Deadlock);
        }
        // 13. queued
        self.locks
            .get_mut(&key)
            .expect("model: lock of a wait")
            .queue
            .push(w);
        Outcome::Queued { lock: key }
    }

    /// Wait-for edges of waiter `w` with `ahead` before it in `lock`'s queue:
    /// to every conflicting holder bound to a session, and to every
    /// conflicting earlier waiter.
    fn waiter_edges(lock: &Lock, ahead: &[Waiter], w: &Waiter, out: &mut BTreeSet<Node>) {
        for h in &lock.holders {
            if h.attached && conflicts(w.mode, h.mode) {
                out.insert((h.client, h.owner));
            }
        }
        for e in ahead {
            if conflicts(w.mode, e.mode) {
                out.insert((e.client, e.owner));
            }
        }
    }

    /// The whole wait-for graph, built from scratch.
    fn wait_for_graph(&self) -> BTreeMap<Node, BTreeSet<Node>> {
        let mut edges: BTreeMap<Node, BTreeSet<Node>> = BTreeMap::new();
        for lock in self.locks.values() {
            for (i, w) in lock.queue.iter().enumerate() {
                Self::waiter_edges(
                    lock,
                    &lock.queue[..i],
                    w,
                    edges.entry((w.client, w.owner)).or_default(),
                );
            }
        }
        edges
    }

    /// Whether `target` is reachable from `from` (unbounded search).
    fn reaches(
        edges: &BTreeMap<Node, BTreeSet<Node>>,
        from: &BTreeSet<Node>,
        target: Node,
    ) -> bool {
        let mut seen: BTreeSet<Node> = BTreeSet::new();
        let mut stack: Vec<Node> = from.iter().copied().collect();
        while let Some(n) = stack.pop() {
            if n == target {
                return true;
            }
            if seen.insert(n) {
                if let Some(out) = edges.get(&n) {
                    stack.extend(out.iter().copied());
                }
            }
        }
        false
    }

    /// Whether queueing `new` at the back of `key` closes a wait-for cycle:
    /// a search from the new waiter's edges that finds its own node.
    fn would_deadlock(&self, key: &LockKey, new: &Waiter) -> bool {
        let mut edges = self.wait_for_graph();
        let lock = &self.locks[key];
        let mut first: BTreeSet<Node> = BTreeSet::new();
        Self::waiter_edges(lock, &lock.queue, new, &mut first);
        let me = (new.client, new.owner);
        edges.entry(me).or_default().extend(first.iter().copied());
        Self::reaches(&edges, &first, me)
    }

    // ----------------------------------------------------------------------
    // CANCEL
    // ----------------------------------------------------------------------

    fn cancel(&mut self, caller: &Caller, nonce: Nonce, fx: &mut Vec<Effect>) -> Reply {
        if let Err(r) = self.check_caller(caller) {
            return Reply::Refused(r);
        }
        let c = caller.client;
        let s = self.sessions.get_mut(&c).expect("model: checked session");
        if nonce < s.low_water {
            return Reply::Cancelled { gave_back: None };
        }
        match s.outcomes.get(&nonce).cloned() {
            None => {
                // UNSPECIFIED (engine's reading; the table lists only
                // `Cancelled`): recording it must respect the bound, so a
                // full outcome memory refuses with LIMIT.
                if s.outcomes.len() >= self.limits.outcomes_per_session_max {
                    return Reply::Refused(Refusal::Limit { what: NO_WHAT });
                }
                s.outcomes.insert(nonce, Outcome::Cancelled);
                Reply::Cancelled { gave_back: None }
            }
            Some(Outcome::Queued { lock }) => {
                let l = self
                    .locks
                    .get_mut(&lock)
                    .expect("model: lock of a queued outcome");
                l.queue.retain(|w| !(w.client == c && w.nonce == nonce));
                self.record(c, nonce, Outcome::Cancelled);
                self.serve(&lock, fx);
                Reply::Cancelled { gave_back: None }
            }
            Some(Outcome::Granted { token }) => {
                let held = self
                    .find_holder(token)
                    .filter(|(_, h)| h.attached && h.client == c)
                    .map(|(k, _)| k.clone());
                match held {
                    Some(key) => {
                        // UNSPECIFIED: the outcome stays "granted" (a retried
                        // LOCK gets the same token again).
                        self.end_holder(&key, token, EndReason::Released, fx);
                        self.serve(&key, fx);
                        Reply::Cancelled {
                            gave_back: Some(token),
                        }
                    }
                    None => Reply::Cancelled { gave_back: None },
                }
            }
            Some(Outcome::Refused(_)) | Some(Outcome::Cancelled) => {
                Reply::Cancelled { gave_back: None }
            }
        }
    }

    // ----------------------------------------------------------------------
    // RELEASE, REFRESH, BREAK
    // ----------------------------------------------------------------------

    fn check_owner(h: &Holder, caller: &Caller, proof: Option<&KeyProof>) -> Result<(), Refusal> {
        match h.key {
            Some(hk) => match proof {
                Some(p) if p.key == hk => {
                    if p.counter > h.counter {
                        Ok(())
                    } else {
                        Err(Refusal::Replay)
                    }
                }
                _ => Err(Refusal::NotOwner),
            },
            None => {
                if h.attached && h.client == caller.client {
                    Ok(())
                } else {
                    Err(Refusal::NotOwner)
                }
            }
        }
    }

    /// How a token that is not a current holder of `key` ended, if remembered
    /// (cluster-wide table first, then the caller's own ring).
    fn ended_reason(&self, caller: ClientId, key: &LockKey, token: Token) -> Option<EndReason> {
        if let Some(e) = self.ended.get(&token) {
            return (e.lock == *key).then_some(e.reason);
        }
        let s = self.sessions.get(&caller)?;
        s.ring
            .iter()
            .find(|e| e.token == token && e.lock == *key)
            .map(|e| e.reason)
    }

    fn release(
        &mut self,
        caller: &Caller,
        zone: &str,
        name: &str,
        token: Token,
        proof: Option<&KeyProof>,
        fx: &mut Vec<Effect>,
    ) -> Reply {
        if let Err(r) = self.check_caller(caller) {
            return Reply::Refused(r);
        }
        let key: LockKey = (zone.to_string(), name.to_string());
        let current = self
            .locks
            .get(&key)
            .and_then(|l| l.holders.iter().find(|h| h.token == token));
        if let Some(h) = current {
            if let Err(r) = Self::check_owner(h, caller, proof) {
                return Reply::Refused(r);
            }
            self.end_holder(&key, token, EndReason::Released, fx);
            self.serve(&key, fx);
            return Reply::Released {
                already_released: false,
            };
        }
        match self.ended_reason(caller.client, &key, token) {
            Some(EndReason::Released) => Reply::Released {
                already_released: true,
            },
            Some(EndReason::Lost(reason)) => Reply::Refused(Refusal::Lost { reason }),
            None => Reply::Refused(Refusal::UnknownGrant),
        }
    }

    fn refresh(
        &mut self,
        caller: &Caller,
        zone: &str,
        name: &str,
        token: Token,
        ttl_ms: u64,
        proof: Option<&KeyProof>,
    ) -> Reply {
        if let Err(r) = self.check_caller(caller) {
            return Reply::Refused(r);
        }
        // UNSPECIFIED: a TTL over the maximum is refused before anything else.
        if ttl_ms > self.limits.ttl_ms_max {
            return Reply::Refused(Refusal::Limit { what: NO_WHAT });
        }
        let now = self.now;
        let key: LockKey = (zone.to_string(), name.to_string());
        let current = self
            .locks
            .get_mut(&key)
            .and_then(|l| l.holders.iter_mut().find(|h| h.token == token));
        if let Some(h) = current {
            if let Err(r) = Self::check_owner(h, caller, proof) {
                return Reply::Refused(r);
            }
            if h.key.is_some() {
                h.counter = proof.expect("model: key-owned refresh has a proof").counter;
            }
            // UNSPECIFIED: ttl 0 uses the grant's own TTL (none stays none);
            // a non-zero ttl sets the deadline, even on a grant that had none,
            // and (engine's reading) becomes the grant's own TTL for later
            // refreshes with 0.
            let ttl = if ttl_ms == 0 { h.ttl_ms } else { ttl_ms };
            h.ttl_ms = ttl;
            h.deadline = (ttl > 0).then(|| now + ttl);
            return Reply::Refreshed {
                expires_in_ms: h.deadline.map(|d| d - now),
            };
        }
        match self.ended_reason(caller.client, &key, token) {
            Some(EndReason::Released) => Reply::Refused(Refusal::NotOwner),
            Some(EndReason::Lost(reason)) => Reply::Refused(Refusal::Lost { reason }),
            None => Reply::Refused(Refusal::UnknownGrant),
        }
    }

    fn break_lock(
        &mut self,
        zone: &str,
        name: &str,
        expected: Option<Token>,
        fx: &mut Vec<Effect>,
    ) -> Reply {
        let key: LockKey = (zone.to_string(), name.to_string());
        let current = self.holder_tokens(&key);
        let tokens: Vec<Token> = match expected {
            None => current,
            Some(t) => current.into_iter().filter(|x| *x == t).collect(),
        };
        for &t in &tokens {
            self.end_holder(&key, t, EndReason::Lost(LossReason::Broken), fx);
        }
        if !tokens.is_empty() {
            self.serve(&key, fx);
        }
        Reply::Broken { tokens }
    }

    // ----------------------------------------------------------------------
    // WATCH
    // ----------------------------------------------------------------------

    fn watch(&mut self, caller: &Caller, zone: &str, name: &str) -> Reply {
        if let Err(r) = self.check_caller(caller) {
            return Reply::Refused(r);
        }
        let max = self.limits.watches_per_session_max;
        let s = self
            .sessions
            .get_mut(&caller.client)
            .expect("model: checked session");
        let key: LockKey = (zone.to_string(), name.to_string());
        if !s.watches.contains(&key) && s.watches.len() >= max {
            return Reply::Refused(Refusal::Limit { what: NO_WHAT });
        }
        s.watches.insert(key);
        Reply::Done
    }

    fn unwatch(&mut self, caller: &Caller, zone: &str, name: &str) -> Reply {
        if let Err(r) = self.check_caller(caller) {
            return Reply::Refused(r);
        }
        let s = self
            .sessions
            .get_mut(&caller.client)
            .expect("model: checked session");
        s.watches.remove(&(zone.to_string(), name.to_string()));
        Reply::Done
    }
}
