//! A simulated client: the rules of `crates/client` that matter for safety,
//! driven by random choices.
//!
//! - One connection at a time to one replica; HELLO (OpenSession) on every
//!   connect; a request without an answer within `REQUEST_TIMEOUT_MS`, or no
//!   acknowledged keepalive for 2.5 intervals, drops the connection and
//!   dials another replica. Replies on an old connection are discarded.
//! - **Lease**: `send time of the last acknowledged keepalive (or HELLO) +
//!   timeout − margin`, `margin = min(max(timeout/10, 500), timeout/2)`;
//!   once it runs out, the client no longer believes it holds its connection
//!   locks (and releases them in the background). A grant's TTL is believed
//!   until `first send of the LOCK (or REFRESH) + ttl − margin(ttl)`.
//! - LOCK is idempotent by nonce: retried on timeout and polled while
//!   queued; an abandoned acquire (its wait plus a request timeout passed,
//!   or given up early) sends CANCEL, and a CANCEL that gave nothing back
//!   is followed by one more LOCK of the same nonce to learn the outcome.
//!   RELEASE is retried; REFRESH and CLOSE are not.
//! - A HELLO that does not resume means a new session: its LOCKs in
//!   progress end indeterminate and are not resent into it (nor after a
//!   "resumed" HELLO that followed an unanswered one, which may have
//!   created the session it resumes). After a CLOSE the client goes on
//!   under a fresh client id.
//! - Every operation is recorded in the history with its invocation and
//!   completion times; an operation whose outcome the client cannot know is
//!   `Indeterminate`.
//! - A slow read-modify-write of the fenced register under the first lock,
//!   with a random delay between read and write (as if the process paused).

use std::collections::BTreeMap;

use oclocks_check::{Call, Fail, FencedRegister, History, LockKey, OpId, Outcome, Ret};
use oclocks_core::{
    Caller, ClientId, Effect, KeyProof, Kind, LockOutcome, LockRequest, Mode, Nonce, Op, PublicKey,
    Refusal, Reply, Token, WAIT_FOREVER,
};

use crate::ctx::Ctx;
use crate::net::{Addr, Msg};
use crate::{Mutation, REQUEST_TIMEOUT_MS};

/// How often a queued LOCK is polled (a retry with the same nonce).
const POLL_MS: u64 = 700;
/// Attempts of a retried request before the outcome is indeterminate.
const ATTEMPTS_MAX: u32 = 4;

/// The client library's safety margin for a duration (lease.rs).
pub fn margin(ms: u64) -> u64 {
    (ms / 10).max(500).min(ms / 2)
}

/// The shared things a client touches.
pub struct Env<'a> {
    pub history: &'a mut History,
    pub register: &'a FencedRegister,
    pub acked: &'a mut u64,
    pub locks: &'a [LockKey],
    pub nodes: usize,
}

/// A grant the client believes it holds.
#[derive(Clone, Debug)]
pub struct Hold {
    pub lock: LockKey,
    pub mode: Mode,
    pub kind: Kind,
    pub ttl_ms: u64,
    /// Believed until then (simulated ms); `None`: no TTL.
    pub ttl_deadline: Option<u64>,
    /// The session generation it was granted in.
    gen: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AcqState {
    Asking,
    Queued,
    Cancelling,
    Resolving,
}

struct Acq {
    nonce: Nonce,
    lock: LockKey,
    mode: Mode,
    kind: Kind,
    ttl_ms: u64,
    wait_ms: u64,
    delay_ms: u64,
    hist: OpId,
    first_sent: Option<u64>,
    give_up_at: u64,
    state: AcqState,
    attempts: u32,
    next_send: u64,
    cancel: Option<(OpId, u32)>,
}

enum Job {
    Acquire(Acq),
    Release {
        token: Token,
        lock: LockKey,
        kind: Kind,
        hist: OpId,
        attempts: u32,
    },
    Refresh {
        token: Token,
        lock: LockKey,
        kind: Kind,
        hist: OpId,
        sent: bool,
    },
    Close {
        hist: OpId,
        sent: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum What {
    Hello,
    Keepalive,
    Job(u64),
    Fire,
}

struct Pending {
    what: What,
    sent_at: u64,
    timeout_at: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle { until: u64 },
    Hello,
    Ready,
}

struct Rmw {
    token: Token,
    value: u64,
    write_at: u64,
}

pub struct Client {
    pub idx: usize,
    pub id: ClientId,
    base_id: ClientId,
    incarnation: u32,
    identity: String,
    key: PublicKey,
    counter: u64,
    pub server: usize,
    pub conn: u64,
    phase: Phase,
    timeout_req: u64,
    timeout: u64,
    /// Lease deadline (simulated ms).
    pub lease: Option<u64>,
    gen: u64,
    next_ka: u64,
    last_ka_ok: u64,
    next_req: u64,
    next_nonce: Nonce,
    pending: BTreeMap<u64, Pending>,
    jobs: BTreeMap<u64, Job>,
    inflight: BTreeMap<u64, u64>,
    next_job: u64,
    pub holds: BTreeMap<Token, Hold>,
    rmw: Option<Rmw>,
    next_action: u64,
    pub ops: u64,
    /// The process is paused (a GC pause, SIGSTOP) until then.
    pub paused_until: u64,
    /// A HELLO went unanswered since the last answered one.
    hello_unanswered: bool,
    /// Per lock, the last grant the client stopped believing in because its
    /// lease or TTL ran out: (token, when the belief ended, mode). For the
    /// observer's statistics on how close the lease rule was tested.
    pub belief_ends: BTreeMap<LockKey, (Token, u64, Mode)>,
}

fn code(r: &Refusal) -> String {
    format!("{:?}", r.code())
}

impl Client {
    pub fn new(idx: usize, id: ClientId, server: usize, timeout_ms: u64) -> Client {
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(&id.to_le_bytes());
        Client {
            idx,
            id,
            base_id: id,
            incarnation: 0,
            identity: format!("client-{}", idx / 2),
            key,
            counter: 0,
            server,
            conn: 0,
            phase: Phase::Idle { until: 0 },
            timeout_req: timeout_ms,
            timeout: timeout_ms,
            lease: None,
            gen: 0,
            next_ka: 0,
            last_ka_ok: 0,
            next_req: 0,
            next_nonce: 1,
            pending: BTreeMap::new(),
            jobs: BTreeMap::new(),
            inflight: BTreeMap::new(),
            next_job: 0,
            holds: BTreeMap::new(),
            rmw: None,
            next_action: 0,
            ops: 0,
            paused_until: 0,
            hello_unanswered: false,
            belief_ends: BTreeMap::new(),
        }
    }

    fn caller(&self) -> Caller {
        Caller {
            client: self.id,
            identity: self.identity.clone(),
        }
    }

    fn proof(&mut self, kind: Kind) -> Option<KeyProof> {
        (kind == Kind::Static).then(|| {
            self.counter += 1;
            KeyProof {
                key: self.key,
                counter: self.counter,
            }
        })
    }

    /// Whether the client, by its own rules, believes at `now` that it holds
    /// the grant `token`.
    pub fn believes(&self, token: Token, now: u64) -> bool {
        let Some(h) = self.holds.get(&token) else {
            return false;
        };
        let lease_ok = h.kind == Kind::Static || self.lease.is_some_and(|l| now < l);
        lease_ok && h.ttl_deadline.is_none_or(|d| now < d)
    }

    fn ttl_deadline(&self, ctx: &Ctx, sent: u64, ttl: u64) -> u64 {
        if ctx.mutated(Mutation::TtlWithoutMargin) {
            sent + ttl
        } else {
            sent + ttl - margin(ttl)
        }
    }

    fn lease_on_ack(&mut self, ctx: &Ctx, sent_at: u64) {
        let d = if ctx.mutated(Mutation::LeaseFromReceipt) {
            ctx.now + self.timeout
        } else {
            sent_at + self.timeout - margin(self.timeout)
        };
        self.lease = Some(self.lease.map_or(d, |l| l.max(d)));
    }

    fn send(&mut self, ctx: &mut Ctx, op: Op, what: What) -> u64 {
        self.next_req += 1;
        let req = self.next_req;
        ctx.send(
            Addr::Client(self.idx),
            Addr::Node(self.server),
            Msg::Request {
                conn: self.conn,
                req,
                op,
            },
        );
        self.pending.insert(
            req,
            Pending {
                what,
                sent_at: ctx.now,
                timeout_at: ctx.now + REQUEST_TIMEOUT_MS,
            },
        );
        if let What::Job(j) = what {
            self.inflight.insert(j, req);
        }
        req
    }

    fn complete(&mut self, env: &mut Env, ctx: &mut Ctx, id: OpId, outcome: Outcome) {
        ctx.trace(|| format!("client {} {id} → {outcome}", self.idx));
        if let Err(e) = env.history.complete(id, ctx.now, outcome) {
            ctx.fail(format!("client {}: history: {e}", self.idx));
        }
    }

    fn invoke(&mut self, env: &mut Env, ctx: &mut Ctx, call: Call) -> OpId {
        self.ops += 1;
        let id = env.history.invoke(ctx.now, call);
        ctx.trace(|| format!("client {} invokes {}", self.idx, id));
        id
    }

    fn add_job(&mut self, job: Job) -> u64 {
        self.next_job += 1;
        self.jobs.insert(self.next_job, job);
        self.next_job
    }

    // ------------------------------------------------------------------
    // Connection
    // ------------------------------------------------------------------

    /// Drop the connection and dial another replica a little later.
    fn reconnect(&mut self, ctx: &mut Ctx, env: &mut Env) {
        let reqs: Vec<u64> = self.pending.keys().copied().collect();
        for req in reqs {
            self.lost(req, ctx, env);
        }
        self.conn += 1;
        if env.nodes > 1 {
            let other = ctx.rng.below(env.nodes as u64 - 1) as usize;
            self.server = if other >= self.server {
                other + 1
            } else {
                other
            };
        }
        self.phase = Phase::Idle {
            until: ctx.now + ctx.rng.range(5, 150),
        };
        ctx.trace(|| format!("client {} reconnects to node {}", self.idx, self.server));
    }

    /// A request's answer will never be read.
    fn lost(&mut self, req: u64, ctx: &mut Ctx, env: &mut Env) {
        let Some(p) = self.pending.remove(&req) else {
            return;
        };
        match p.what {
            What::Hello => {
                // It may still create a session; a later HELLO may then
                // "resume" that one rather than ours.
                self.hello_unanswered = true;
                if self.phase == Phase::Hello {
                    self.phase = Phase::Idle { until: ctx.now };
                }
            }
            What::Keepalive | What::Fire => {}
            What::Job(j) => {
                if self.inflight.get(&j) == Some(&req) {
                    self.inflight.remove(&j);
                }
                self.attempt_failed(j, ctx, env);
            }
        }
    }

    /// An attempt of job `j` got no usable answer.
    fn attempt_failed(&mut self, j: u64, ctx: &mut Ctx, env: &mut Env) {
        let Some(job) = self.jobs.get_mut(&j) else {
            return;
        };
        match job {
            Job::Acquire(a) => match a.state {
                AcqState::Asking | AcqState::Queued => {
                    a.next_send = ctx.now;
                    if a.attempts >= ATTEMPTS_MAX {
                        a.give_up_at = ctx.now;
                    }
                }
                AcqState::Cancelling => {
                    if a.cancel.is_some_and(|(_, n)| n >= ATTEMPTS_MAX) {
                        self.finish_acquire(j, Outcome::Indeterminate, ctx, env);
                    }
                }
                AcqState::Resolving => self.finish_acquire(j, Outcome::Indeterminate, ctx, env),
            },
            Job::Release { attempts, hist, .. } => {
                if *attempts >= ATTEMPTS_MAX {
                    let hist = *hist;
                    self.jobs.remove(&j);
                    self.complete(env, ctx, hist, Outcome::Indeterminate);
                }
            }
            Job::Refresh { hist, .. } => {
                let hist = *hist;
                self.jobs.remove(&j);
                self.complete(env, ctx, hist, Outcome::Indeterminate);
            }
            Job::Close { hist, .. } => {
                let hist = *hist;
                self.jobs.remove(&j);
                self.complete(env, ctx, hist, Outcome::Indeterminate);
                self.retire_id(ctx);
            }
        }
    }

    /// The session is gone (NO_SESSION, SESSION_EXPIRED, a HELLO that did
    /// not resume): its connection locks with it.
    fn session_gone(&mut self) {
        self.holds.retain(|_, h| h.kind == Kind::Static);
        self.lease = None;
    }

    fn new_session(&mut self, ctx: &mut Ctx, env: &mut Env) {
        self.gen += 1;
        self.session_gone();
        // LOCKs of the old session must not be resent into the new one.
        self.finish_acquires(ctx, env);
    }

    /// End every acquire in progress as indeterminate.
    fn finish_acquires(&mut self, ctx: &mut Ctx, env: &mut Env) {
        let old: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, j)| matches!(j, Job::Acquire(_)))
            .map(|(k, _)| *k)
            .collect();
        for j in old {
            self.finish_acquire(j, Outcome::Indeterminate, ctx, env);
        }
    }

    fn on_hello(&mut self, reply: Option<Reply>, sent_at: u64, ctx: &mut Ctx, env: &mut Env) {
        match reply {
            Some(Reply::Session {
                resumed,
                timeout_ms,
                held,
                ..
            }) => {
                self.timeout = timeout_ms;
                if !resumed {
                    self.new_session(ctx, env);
                } else {
                    // Grants the session no longer lists are gone. (Tokens
                    // are unique, so a listed one is ours whichever session
                    // this is.)
                    let gen = self.gen;
                    self.holds
                        .retain(|t, h| h.gen != gen || held.iter().any(|x| x.token == *t));
                    if self.hello_unanswered {
                        // "Resumed" may name a session that an unanswered
                        // HELLO of ours created after the old one expired:
                        // LOCKs of the old session must not be resent into
                        // it as if nothing happened.
                        self.finish_acquires(ctx, env);
                    }
                }
                self.hello_unanswered = false;
                self.lease_on_ack(ctx, sent_at);
                self.phase = Phase::Ready;
                self.next_ka = ctx.now + self.timeout / 3;
                self.last_ka_ok = ctx.now;
            }
            _ => self.reconnect(ctx, env),
        }
    }

    // ------------------------------------------------------------------
    // Messages
    // ------------------------------------------------------------------

    pub fn on_msg(&mut self, msg: Msg, ctx: &mut Ctx, env: &mut Env) {
        match msg {
            Msg::Reply { conn, req, reply } if conn == self.conn => {
                let Some(p) = self.pending.remove(&req) else {
                    return;
                };
                match p.what {
                    What::Hello => self.on_hello(reply, p.sent_at, ctx, env),
                    What::Keepalive | What::Fire => {}
                    What::Job(j) => {
                        if self.inflight.get(&j) == Some(&req) {
                            self.inflight.remove(&j);
                        }
                        match reply {
                            Some(r) => self.on_job_reply(j, r, p.sent_at, ctx, env),
                            None => {
                                self.attempt_failed(j, ctx, env);
                                if ctx.rng.chance(500_000) {
                                    self.reconnect(ctx, env);
                                }
                            }
                        }
                    }
                }
            }
            Msg::KeepaliveAck { conn, req, result } if conn == self.conn => {
                let Some(p) = self.pending.remove(&req) else {
                    return;
                };
                match result {
                    Some(Ok(())) => {
                        self.lease_on_ack(ctx, p.sent_at);
                        self.last_ka_ok = ctx.now;
                    }
                    Some(Err(_)) => {
                        self.session_gone();
                        self.reconnect(ctx, env);
                    }
                    None => {}
                }
            }
            Msg::Event { conn, effect } if conn == self.conn => match effect {
                Effect::Granted { nonce, token, .. } => self.event_granted(nonce, token, ctx, env),
                Effect::WaitEnded { nonce, refusal, .. } => {
                    self.event_refused(nonce, &refusal, ctx, env)
                }
                Effect::Lost { token, .. } => {
                    self.holds.remove(&token);
                }
                Effect::SessionExpired { client } => {
                    if client == self.id {
                        self.session_gone();
                        self.reconnect(ctx, env);
                    }
                }
                Effect::Watch { .. } => {}
            },
            Msg::Settled {
                conn,
                nonce,
                outcome,
            } if conn == self.conn => match outcome {
                LockOutcome::Granted(token) => self.event_granted(nonce, token, ctx, env),
                LockOutcome::Refused(r) => self.event_refused(nonce, &r, ctx, env),
                LockOutcome::Waiting => {}
            },
            _ => {}
        }
    }

    fn acquire_job(&self, nonce: Nonce) -> Option<u64> {
        self.jobs.iter().find_map(|(k, j)| match j {
            Job::Acquire(a) if a.nonce == nonce => Some(*k),
            _ => None,
        })
    }

    fn event_granted(&mut self, nonce: Nonce, token: Token, ctx: &mut Ctx, env: &mut Env) {
        let Some(j) = self.acquire_job(nonce) else {
            return;
        };
        if let Some(Job::Acquire(a)) = self.jobs.get(&j) {
            if matches!(a.state, AcqState::Asking | AcqState::Queued) {
                self.granted(j, token, true, ctx, env);
            }
        }
    }

    fn event_refused(&mut self, nonce: Nonce, r: &Refusal, ctx: &mut Ctx, env: &mut Env) {
        let Some(j) = self.acquire_job(nonce) else {
            return;
        };
        if let Some(Job::Acquire(a)) = self.jobs.get(&j) {
            if matches!(a.state, AcqState::Asking | AcqState::Queued) {
                self.finish_acquire(j, Outcome::Fail(Fail::Refused(code(r))), ctx, env);
            }
        }
    }

    /// The acquire of job `j` was granted `token`; `hold`: the client takes
    /// it as held (not when learnt after a cancel).
    fn granted(&mut self, j: u64, token: Token, hold: bool, ctx: &mut Ctx, env: &mut Env) {
        let Some(Job::Acquire(a)) = self.jobs.remove(&j) else {
            return;
        };
        self.inflight.remove(&j);
        if hold {
            let sent = a.first_sent.unwrap_or(ctx.now);
            let ttl_deadline = (a.ttl_ms > 0).then(|| self.ttl_deadline(ctx, sent, a.ttl_ms));
            self.holds.insert(
                token,
                Hold {
                    lock: a.lock.clone(),
                    mode: a.mode,
                    kind: a.kind,
                    ttl_ms: a.ttl_ms,
                    ttl_deadline,
                    gen: self.gen,
                },
            );
        }
        if let Some((c, _)) = a.cancel {
            if a.state == AcqState::Cancelling {
                self.complete(env, ctx, c, Outcome::Indeterminate);
            }
        }
        self.complete(env, ctx, a.hist, Outcome::Ok(Ret::Granted { token }));
    }

    fn finish_acquire(&mut self, j: u64, outcome: Outcome, ctx: &mut Ctx, env: &mut Env) {
        let Some(Job::Acquire(a)) = self.jobs.remove(&j) else {
            return;
        };
        self.inflight.remove(&j);
        if let Some((c, _)) = a.cancel {
            if a.state == AcqState::Cancelling {
                self.complete(env, ctx, c, Outcome::Indeterminate);
            }
        }
        self.complete(env, ctx, a.hist, outcome);
    }

    #[allow(clippy::too_many_arguments)]
    fn on_acquire_reply(
        &mut self,
        j: u64,
        state: AcqState,
        cancel: Option<(OpId, u32)>,
        attempts: u32,
        reply: Reply,
        ctx: &mut Ctx,
        env: &mut Env,
    ) {
        match (state, reply) {
            (AcqState::Cancelling, Reply::Cancelled { gave_back }) => {
                if let Some(Job::Acquire(a)) = self.jobs.get_mut(&j) {
                    a.cancel = None;
                }
                if let Some((c, attempts)) = cancel {
                    // "Nothing to give back" after a retry may mean our own
                    // earlier attempt gave it back.
                    let outcome = if gave_back.is_none() && attempts > 1 {
                        Outcome::Indeterminate
                    } else {
                        Outcome::Ok(Ret::Cancelled { gave_back })
                    };
                    self.complete(env, ctx, c, outcome);
                }
                match gave_back {
                    Some(t) => self.granted(j, t, false, ctx, env),
                    None => {
                        if let Some(Job::Acquire(a)) = self.jobs.get_mut(&j) {
                            a.state = AcqState::Resolving;
                            a.next_send = ctx.now;
                            a.attempts = 0;
                        }
                    }
                }
            }
            (AcqState::Cancelling, Reply::Refused(r)) => {
                if let Some(Job::Acquire(a)) = self.jobs.get_mut(&j) {
                    a.cancel = None;
                }
                if let Some((c, _)) = cancel {
                    self.complete(env, ctx, c, Outcome::Fail(Fail::Refused(code(&r))));
                }
                self.finish_acquire(j, Outcome::Indeterminate, ctx, env);
                if r == Refusal::NoSession {
                    self.session_gone();
                    self.reconnect(ctx, env);
                }
            }
            // A late answer to a LOCK sent before the cancel: the cancel's
            // answer decides.
            (AcqState::Cancelling, _) => {}
            (state, Reply::Granted { token }) => {
                self.granted(j, token, state != AcqState::Resolving, ctx, env)
            }
            (AcqState::Resolving, Reply::Queued { .. }) => {
                self.finish_acquire(j, Outcome::Indeterminate, ctx, env)
            }
            (_, Reply::Queued { .. }) => {
                if let Some(Job::Acquire(a)) = self.jobs.get_mut(&j) {
                    a.state = AcqState::Queued;
                    a.next_send = ctx.now + POLL_MS;
                }
            }
            (state, Reply::Refused(r)) => {
                // A refusal is definite only for the first attempt: an
                // earlier attempt may have been granted in a session that
                // has since ended.
                let definite = state != AcqState::Resolving && attempts <= 1;
                let outcome = match r {
                    Refusal::NoSession | Refusal::StaleNonce if !definite => Outcome::Indeterminate,
                    Refusal::StaleNonce => Outcome::Indeterminate,
                    _ => Outcome::Fail(Fail::Refused(code(&r))),
                };
                self.finish_acquire(j, outcome, ctx, env);
                if r == Refusal::NoSession {
                    self.session_gone();
                    self.reconnect(ctx, env);
                }
            }
            _ => self.finish_acquire(j, Outcome::Indeterminate, ctx, env),
        }
    }

    fn on_job_reply(&mut self, j: u64, reply: Reply, sent_at: u64, ctx: &mut Ctx, env: &mut Env) {
        let Some(job) = self.jobs.get_mut(&j) else {
            return;
        };
        match job {
            Job::Acquire(a) => {
                let (state, cancel, attempts) = (a.state, a.cancel, a.attempts);
                self.on_acquire_reply(j, state, cancel, attempts, reply, ctx, env);
            }
            Job::Release { hist, attempts, .. } => {
                let (hist, attempts) = (*hist, *attempts);
                let outcome = match reply {
                    // (After a retry, "already released" may be our own
                    // earlier attempt: the checker's model allows it.)
                    Reply::Released { already_released } => {
                        Outcome::Ok(Ret::Released { already_released })
                    }
                    // After a retry, a grant the cluster has forgotten may
                    // be one our own earlier attempt released.
                    Reply::Refused(Refusal::UnknownGrant) if attempts > 1 => Outcome::Indeterminate,
                    Reply::Refused(r @ (Refusal::Lost { .. } | Refusal::UnknownGrant)) => {
                        Outcome::Fail(Fail::NotHeld(code(&r)))
                    }
                    Reply::Refused(Refusal::NoSession) => {
                        // Refused before anything happened: try again in
                        // a new session.
                        self.session_gone();
                        self.reconnect(ctx, env);
                        return;
                    }
                    Reply::Refused(r) => Outcome::Fail(Fail::Refused(code(&r))),
                    _ => Outcome::Indeterminate,
                };
                self.jobs.remove(&j);
                self.complete(env, ctx, hist, outcome);
            }
            Job::Refresh { hist, token, .. } => {
                let (hist, token) = (*hist, *token);
                self.jobs.remove(&j);
                let outcome = match reply {
                    Reply::Refreshed { expires_in_ms } => {
                        if let (Some(ms), Some(ttl)) =
                            (expires_in_ms, self.holds.get(&token).map(|h| h.ttl_ms))
                        {
                            let d = if ctx.mutated(Mutation::TtlWithoutMargin) {
                                sent_at + ms
                            } else {
                                (sent_at + ms).saturating_sub(margin(ttl))
                            };
                            if let Some(h) = self.holds.get_mut(&token) {
                                h.ttl_deadline = Some(h.ttl_deadline.map_or(d, |x| x.max(d)));
                            }
                        }
                        Outcome::Ok(Ret::Refreshed)
                    }
                    Reply::Refused(r @ (Refusal::Lost { .. } | Refusal::UnknownGrant)) => {
                        self.holds.remove(&token);
                        Outcome::Fail(Fail::NotHeld(code(&r)))
                    }
                    Reply::Refused(r) => Outcome::Fail(Fail::Refused(code(&r))),
                    _ => Outcome::Indeterminate,
                };
                self.complete(env, ctx, hist, outcome);
            }
            Job::Close { hist, .. } => {
                let hist = *hist;
                self.jobs.remove(&j);
                let outcome = match reply {
                    Reply::Done => Outcome::Ok(Ret::Closed),
                    Reply::Refused(r) => Outcome::Fail(Fail::Refused(code(&r))),
                    _ => Outcome::Indeterminate,
                };
                self.complete(env, ctx, hist, outcome);
                self.retire_id(ctx);
                self.reconnect(ctx, env);
            }
        }
    }

    /// After a CLOSE, answered or not, the client goes on under a fresh
    /// client id, as a new process would: a CLOSE that is still travelling
    /// (held in a paused server's socket buffer, say) must not end a session
    /// this client resumed meanwhile. (Found by this simulation: with the
    /// same id, a stale CLOSE released a connection lock whose holder's
    /// lease was still valid.)
    fn retire_id(&mut self, ctx: &mut Ctx) {
        self.incarnation += 1;
        self.id = self.base_id | (u128::from(self.incarnation) << 32);
        ctx.client_ix.insert(self.id, self.idx);
        self.gen += 1;
        self.session_gone();
    }

    // ------------------------------------------------------------------
    // Time
    // ------------------------------------------------------------------

    pub fn tick(&mut self, ctx: &mut Ctx, env: &mut Env) {
        let now = ctx.now;
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.timeout_at <= now)
            .map(|(r, _)| *r)
            .collect();
        if !expired.is_empty() {
            for req in expired {
                self.lost(req, ctx, env);
            }
            self.reconnect(ctx, env);
        }
        self.rmw_step(ctx, env);
        match self.phase {
            Phase::Idle { until } => {
                if now >= until {
                    self.conn += 1;
                    self.phase = Phase::Hello;
                    let op = Op::OpenSession {
                        caller: self.caller(),
                        timeout_ms: self.timeout_req,
                    };
                    self.send(ctx, op, What::Hello);
                }
                return;
            }
            Phase::Hello => return,
            Phase::Ready => {}
        }
        // Keepalives, and a connection that stopped acknowledging them.
        let interval = (self.timeout / 3).max(1);
        if now >= self.next_ka {
            self.next_ka = now + interval;
            self.next_req += 1;
            let req = self.next_req;
            let caller = self.caller();
            ctx.send(
                Addr::Client(self.idx),
                Addr::Node(self.server),
                Msg::Keepalive {
                    conn: self.conn,
                    req,
                    caller,
                },
            );
            self.pending.insert(
                req,
                Pending {
                    what: What::Keepalive,
                    sent_at: now,
                    timeout_at: now + 5 * interval,
                },
            );
        }
        if now > self.last_ka_ok + interval * 5 / 2 {
            self.last_ka_ok = now;
            self.reconnect(ctx, env);
            return;
        }
        self.expire_beliefs(ctx, env);
        self.drive_jobs(ctx, env);
        if now >= self.next_action {
            self.next_action = now + ctx.rng.range(20, 400);
            self.act(ctx, env);
        }
    }

    /// Grants no longer believed (lease or TTL ran out) are released in the
    /// background, as dropped guards are.
    fn expire_beliefs(&mut self, ctx: &mut Ctx, env: &mut Env) {
        let gone: Vec<Token> = self
            .holds
            .keys()
            .copied()
            .filter(|t| !self.believes(*t, ctx.now))
            .collect();
        for t in gone {
            if let Some(h) = self.holds.get(&t) {
                let lease = (h.kind == Kind::Connection).then_some(self.lease).flatten();
                let end = [lease, h.ttl_deadline]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap_or(ctx.now);
                self.belief_ends.insert(h.lock.clone(), (t, end, h.mode));
            }
            self.release(t, ctx, env);
        }
    }

    fn release(&mut self, token: Token, ctx: &mut Ctx, env: &mut Env) {
        let Some(h) = self.holds.remove(&token) else {
            return;
        };
        let hist = self.invoke(
            env,
            ctx,
            Call::Release {
                client: self.id,
                lock: h.lock.clone(),
                token,
            },
        );
        self.add_job(Job::Release {
            token,
            lock: h.lock,
            kind: h.kind,
            hist,
            attempts: 0,
        });
    }

    fn low_water(&self) -> Nonce {
        self.jobs
            .values()
            .filter_map(|j| match j {
                Job::Acquire(a) => Some(a.nonce),
                _ => None,
            })
            .min()
            .unwrap_or(self.next_nonce)
    }

    fn drive_jobs(&mut self, ctx: &mut Ctx, env: &mut Env) {
        let keys: Vec<u64> = self.jobs.keys().copied().collect();
        for j in keys {
            if self.phase != Phase::Ready || self.inflight.contains_key(&j) {
                continue;
            }
            let low_water = self.low_water();
            let caller = self.caller();
            let Some(job) = self.jobs.get_mut(&j) else {
                continue;
            };
            let op = match job {
                Job::Acquire(a) => {
                    if matches!(a.state, AcqState::Asking | AcqState::Queued)
                        && ctx.now >= a.give_up_at
                    {
                        a.state = AcqState::Cancelling;
                        a.next_send = ctx.now;
                        let hist = a.hist;
                        let c = env.history.invoke(
                            ctx.now,
                            Call::Cancel {
                                client: self.id,
                                acquire: hist,
                            },
                        );
                        self.ops += 1;
                        if let Some(Job::Acquire(a)) = self.jobs.get_mut(&j) {
                            a.cancel = Some((c, 0));
                        }
                    }
                    let Some(Job::Acquire(a)) = self.jobs.get_mut(&j) else {
                        continue;
                    };
                    if ctx.now < a.next_send {
                        continue;
                    }
                    match a.state {
                        AcqState::Cancelling => {
                            if let Some((_, n)) = a.cancel.as_mut() {
                                *n += 1;
                            }
                            Op::Cancel {
                                caller,
                                nonce: a.nonce,
                            }
                        }
                        state => {
                            a.attempts += 1;
                            if state == AcqState::Queued {
                                a.next_send = ctx.now + POLL_MS;
                            }
                            a.first_sent.get_or_insert(ctx.now);
                            let (kind, nonce) = (a.kind, a.nonce);
                            let req = LockRequest {
                                caller,
                                zone: a.lock.zone.clone(),
                                name: a.lock.name.clone(),
                                mode: a.mode,
                                kind,
                                ttl_ms: a.ttl_ms,
                                wait_ms: a.wait_ms,
                                lock_delay_ms: a.delay_ms,
                                owner: nonce,
                                nonce,
                                low_water: low_water.min(nonce),
                                key: None,
                            };
                            let key = self.proof(kind);
                            Op::Lock(LockRequest { key, ..req })
                        }
                    }
                }
                Job::Release {
                    token,
                    lock,
                    kind,
                    attempts,
                    ..
                } => {
                    *attempts += 1;
                    let (token, lock, kind) = (*token, lock.clone(), *kind);
                    let key = self.proof(kind);
                    Op::Release {
                        caller,
                        zone: lock.zone,
                        name: lock.name,
                        token,
                        key,
                    }
                }
                Job::Refresh {
                    token,
                    lock,
                    kind,
                    sent,
                    ..
                } => {
                    if *sent {
                        continue;
                    }
                    *sent = true;
                    let (token, lock, kind) = (*token, lock.clone(), *kind);
                    let key = self.proof(kind);
                    Op::Refresh {
                        caller,
                        zone: lock.zone,
                        name: lock.name,
                        token,
                        ttl_ms: 0,
                        key,
                    }
                }
                Job::Close { sent, .. } => {
                    if *sent {
                        continue;
                    }
                    *sent = true;
                    Op::CloseSession { caller }
                }
            };
            self.send(ctx, op, What::Job(j));
        }
    }

    /// One random action.
    fn act(&mut self, ctx: &mut Ctx, env: &mut Env) {
        let acquires = self
            .jobs
            .values()
            .filter(|j| matches!(j, Job::Acquire(_)))
            .count();
        let closing = self.jobs.values().any(|j| matches!(j, Job::Close { .. }));
        if closing {
            return;
        }
        let r = ctx.rng.below(100);
        match r {
            0..=39 if acquires < 2 => self.start_acquire(ctx, env),
            40..=59 => {
                let held: Vec<Token> = self.holds.keys().copied().collect();
                if !held.is_empty() {
                    let t = held[ctx.rng.index(held.len())];
                    self.release(t, ctx, env);
                }
            }
            60..=69 => {
                let ttl: Vec<Token> = self
                    .holds
                    .iter()
                    .filter(|(_, h)| h.ttl_ms > 0)
                    .map(|(t, _)| *t)
                    .collect();
                if !ttl.is_empty() {
                    let token = ttl[ctx.rng.index(ttl.len())];
                    if let Some(h) = self.holds.get(&token) {
                        let (lock, kind) = (h.lock.clone(), h.kind);
                        let hist = self.invoke(
                            env,
                            ctx,
                            Call::Refresh {
                                client: self.id,
                                lock: lock.clone(),
                                token,
                            },
                        );
                        self.add_job(Job::Refresh {
                            token,
                            lock,
                            kind,
                            hist,
                            sent: false,
                        });
                    }
                }
            }
            70..=76 => {
                // Give up a wait early.
                let waiting: Vec<u64> = self
                    .jobs
                    .iter()
                    .filter(|(_, j)| {
                        matches!(j, Job::Acquire(a) if matches!(a.state, AcqState::Asking | AcqState::Queued))
                    })
                    .map(|(k, _)| *k)
                    .collect();
                if !waiting.is_empty() {
                    let j = waiting[ctx.rng.index(waiting.len())];
                    if let Some(Job::Acquire(a)) = self.jobs.get_mut(&j) {
                        a.give_up_at = ctx.now;
                    }
                }
            }
            77 if ctx.rng.chance(300_000) => {
                // Close the session: connection locks and waits go with it.
                let hist = self.invoke(env, ctx, Call::Close { client: self.id });
                self.session_gone();
                self.finish_acquires(ctx, env);
                self.add_job(Job::Close { hist, sent: false });
            }
            78..=81 => {
                let lock = env.locks[ctx.rng.index(env.locks.len())].clone();
                let caller = self.caller();
                let op = if ctx.rng.chance(500_000) {
                    Op::Watch {
                        caller,
                        zone: lock.zone,
                        name: lock.name,
                    }
                } else {
                    Op::Unwatch {
                        caller,
                        zone: lock.zone,
                        name: lock.name,
                    }
                };
                self.send(ctx, op, What::Fire);
            }
            _ => {}
        }
    }

    fn start_acquire(&mut self, ctx: &mut Ctx, env: &mut Env) {
        let lock = env.locks[ctx.rng.index(env.locks.len())].clone();
        let mode = if ctx.rng.chance(250_000) {
            Mode::Shared
        } else {
            Mode::Exclusive
        };
        let kind = if ctx.rng.chance(200_000) {
            Kind::Static
        } else {
            Kind::Connection
        };
        let wait_ms = match ctx.rng.below(10) {
            0..=2 => 0,
            3..=7 => ctx.rng.range(50, 2000),
            _ => WAIT_FOREVER,
        };
        let ttl_ms = match kind {
            Kind::Static if ctx.rng.chance(900_000) => ctx.rng.range(800, 4000),
            Kind::Connection if ctx.rng.chance(300_000) => ctx.rng.range(800, 4000),
            _ => 0,
        };
        let delay_ms = if ctx.rng.chance(100_000) {
            ctx.rng.range(50, 500)
        } else {
            0
        };
        let patience = if wait_ms == WAIT_FOREVER {
            ctx.rng.range(500, 4000)
        } else {
            wait_ms
        };
        let nonce = self.next_nonce;
        self.next_nonce += 1;
        let hist = self.invoke(
            env,
            ctx,
            Call::Acquire {
                client: self.id,
                lock: lock.clone(),
                mode,
                kind,
            },
        );
        self.add_job(Job::Acquire(Acq {
            nonce,
            lock,
            mode,
            kind,
            ttl_ms,
            wait_ms,
            delay_ms,
            hist,
            first_sent: None,
            give_up_at: ctx.now + patience + REQUEST_TIMEOUT_MS,
            state: AcqState::Asking,
            attempts: 0,
            next_send: ctx.now,
            cancel: None,
        }));
    }

    /// The slow read-modify-write of the fenced register, guarded by an
    /// exclusive grant of the first lock.
    fn rmw_step(&mut self, ctx: &mut Ctx, env: &mut Env) {
        if let Some(r) = &self.rmw {
            if ctx.now >= r.write_at {
                if env.register.write(r.token, r.value + 1).is_ok() {
                    *env.acked += 1;
                }
                self.rmw = None;
            }
            return;
        }
        if !ctx.rng.chance(50_000) {
            return;
        }
        let guard = self.holds.iter().find(|(t, h)| {
            h.lock == env.locks[0] && h.mode == Mode::Exclusive && self.believes(**t, ctx.now)
        });
        if let Some((&token, _)) = guard {
            if let Ok(value) = env.register.read(token) {
                self.rmw = Some(Rmw {
                    token,
                    value,
                    write_at: ctx.now + ctx.rng.range(0, 600),
                });
            }
        }
    }
}
