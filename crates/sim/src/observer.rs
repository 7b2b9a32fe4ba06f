//! The omniscient observer: everything the simulation checks while it runs,
//! from a vantage point no real component has (simulated time is global
//! and exact here).
//!
//! - **Replicas agree.** The first replica to apply log index `i` fixes the
//!   entry, the reply, the effects and the hash of the engine's snapshot
//!   bytes after it; every other replica applying `i` must produce exactly
//!   the same. Snapshots taken or installed at `i` must hash the same.
//! - **The record.** From the first apply of each entry it derives the
//!   cluster's record — grants (new tokens) and ends (voluntary, expiry,
//!   TTL, break) — for the history checker.
//! - **Client leases.** At every new grant, no client may still validly
//!   believe (by its lease and TTL rules, at this exact instant) that it
//!   holds a conflicting grant of the same lock, unless an operator broke
//!   that grant.
//! - **Time accounting.** Between two consecutive commands of one term, no
//!   stall of the leader (a long pause, a large forward clock jump, a loss
//!   of quorum contact beyond the bound) may lie unless the later command is
//!   a `Rebase`: time during which no keepalive could commit must never
//!   count against sessions (SPEC guarantee 3).

use std::collections::{BTreeMap, BTreeSet};

use oclocks_check::{History, LockKey, RecordEvent, RecordKind};
use oclocks_core::{
    Applied, ClientId, Command, Effect, EndReason, Engine, Kind, LossReason, Mode, Nonce, Op,
    Reply, Token,
};

use crate::client::Client;
use crate::ctx::Ctx;
use crate::node::ApplyOut;

struct Committed {
    term: u64,
    cmd: Command,
    applied: Applied,
    hash: u64,
}

#[derive(Clone)]
struct Grant {
    lock: LockKey,
    client: ClientId,
}

/// A clock interval of a replica during which it could not stamp, and what
/// it was.
type Stall = (u64, u64, &'static str);

#[derive(Default)]
pub struct Observer {
    committed: Vec<Committed>,
    last_token: Token,
    /// Current grants by the record.
    mirror: BTreeMap<Token, Grant>,
    /// Every LOCK applied: (client, nonce) → lock, mode, kind.
    lock_reqs: BTreeMap<(ClientId, Nonce), (LockKey, Mode, Kind)>,
    broken: BTreeSet<Token>,
    /// Grants that ended by session expiry or TTL.
    expired: BTreeSet<Token>,
    /// Term → leader (node, incarnation).
    pub term_leader: BTreeMap<u64, (usize, u64)>,
    /// (node, incarnation) → clock intervals during which it could not
    /// have stamped and after which it must re-base.
    unhealthy: BTreeMap<(usize, u64), Vec<Stall>>,
    /// Open quorum-loss intervals: (node, incarnation) → start (clock).
    quorum_loss: BTreeMap<(usize, u64), u64>,
    prev_stamp: Option<(u64, u64)>,
    seq: u64,
    pub grants: u64,
    pub expiries: u64,
    pub breaks: u64,
    /// Grants made within 2 s after a conflicting holder's lease or TTL ran
    /// out on its client's side and its grant expired in the cluster: the
    /// lease rule put to the test.
    pub lease_tests: u64,
    /// The smallest time between such a belief ending and the grant.
    pub lease_slack_min: Option<u64>,
}

impl Observer {
    pub fn committed_len(&self) -> u64 {
        self.committed.len() as u64
    }

    pub fn state_hash(&self, index: u64) -> Option<u64> {
        usize::try_from(index)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| self.committed.get(i))
            .map(|c| c.hash)
    }

    /// A snapshot at `index` (taken or installed) must match the state the
    /// first replica reached there.
    pub fn check_snapshot(&self, node: usize, index: u64, hash: u64, what: &str, ctx: &mut Ctx) {
        match self.state_hash(index) {
            Some(h) if h == hash => {}
            Some(h) => ctx.fail(format!(
                "node {node}: snapshot {what} at index {index} hashes {hash:016x}, \
                 but the state there is {h:016x}"
            )),
            None => ctx.fail(format!(
                "node {node}: snapshot {what} at index {index}, which no replica applied"
            )),
        }
    }

    /// A stall (`what`) of `node` (incarnation `inc`) between these clock
    /// readings.
    pub fn stall(&mut self, node: usize, inc: u64, from: u64, to: u64, what: &'static str) {
        self.unhealthy
            .entry((node, inc))
            .or_default()
            .push((from, to, what));
    }

    /// A crashed replica's open quorum-loss interval ends with its process.
    pub fn crashed(&mut self, node: usize) {
        self.quorum_loss.retain(|(n, _), _| *n != node);
    }

    /// Per step: track each leader's loss of quorum contact.
    pub fn quorum(&mut self, node: usize, inc: u64, lost_since_clock: Option<u64>, clock_now: u64) {
        let key = (node, inc);
        match (lost_since_clock, self.quorum_loss.get(&key).copied()) {
            (Some(since), None) => {
                self.quorum_loss.insert(key, since);
            }
            (None, Some(start)) => {
                self.quorum_loss.remove(&key);
                self.stall(node, inc, start, clock_now, "no quorum contact");
            }
            _ => {}
        }
    }

    pub fn on_apply(
        &mut self,
        node: usize,
        out: &ApplyOut,
        engine: &Engine,
        ctx: &mut Ctx,
        clients: &[Client],
        history: &mut History,
    ) {
        let i = out.index as usize;
        if i <= self.committed.len() {
            let c = &self.committed[i - 1];
            if c.term != out.entry.term || c.cmd != out.entry.cmd {
                let (a, b) = (ctx.brief(&out.entry.cmd.op), ctx.brief(&c.cmd.op));
                ctx.fail(format!(
                    "node {node} applied a different entry at index {i}: term {} {a}, \
                     but the first replica applied term {} {b}",
                    out.entry.term, c.term
                ));
            } else if c.applied != out.applied {
                let op = ctx.brief(&c.cmd.op);
                ctx.fail(format!(
                    "node {node} diverged at index {i} ({op}): reply/effects {:?} vs {:?}",
                    out.applied, c.applied
                ));
            } else if c.hash != out.hash {
                let op = ctx.brief(&c.cmd.op);
                ctx.fail(format!(
                    "node {node} diverged at index {i} ({op}): state hash {:016x} vs {:016x}",
                    out.hash, c.hash
                ));
            }
            return;
        }
        if i != self.committed.len() + 1 {
            ctx.fail(format!(
                "node {node} applied index {i} before index {}",
                self.committed.len() + 1
            ));
            return;
        }
        self.committed.push(Committed {
            term: out.entry.term,
            cmd: out.entry.cmd.clone(),
            applied: out.applied.clone(),
            hash: out.hash,
        });
        self.time_accounting(out, ctx);
        self.derive_record(out, engine, ctx, clients, history);
    }

    fn time_accounting(&mut self, out: &ApplyOut, ctx: &mut Ctx) {
        let (term, now_ms) = (out.entry.term, out.entry.cmd.now_ms);
        if let Some((pt, pnow)) = self.prev_stamp {
            if pt == term && !matches!(out.entry.cmd.op, Op::Rebase) {
                if let Some(key) = self.term_leader.get(&term) {
                    let stalls = self.unhealthy.get(key).map(Vec::as_slice).unwrap_or(&[]);
                    if let Some((a, b, what)) =
                        stalls.iter().find(|(a, b, _)| *a >= pnow && *b <= now_ms)
                    {
                        let op = ctx.brief(&out.entry.cmd.op);
                        ctx.fail(format!(
                            "time accounting: node {} stamped [{}] {op} at {now_ms} in term {term} \
                             with no Rebase after its stall ({what}) from {a} to {b} (previous \
                             command at {pnow}): the stall counts against sessions",
                            key.0, out.index
                        ));
                    }
                }
            }
        }
        self.prev_stamp = Some((term, now_ms));
    }

    fn event(&mut self, out: &ApplyOut, ctx: &Ctx, lock: LockKey, kind: RecordKind) -> RecordEvent {
        self.seq += 1;
        RecordEvent {
            seq: out.index * 4096 + self.seq % 4096,
            lock,
            window: (out.entry.stamped_at, ctx.now),
            kind,
        }
    }

    /// The record of one entry, in the order things happened inside it as
    /// far as the effects show: timers fire first (their losses and grants
    /// in effect order), then the operation (a voluntary end: release,
    /// cancel give-back, close; or a direct grant), then queues are served.
    /// A voluntary end is placed right after the grant of its token when
    /// that grant happened in the same entry (a cancel racing a grant),
    /// otherwise first: every grant before it in the entry is compatible
    /// with it (the engine asserts that), every grant it enables comes after.
    fn derive_record(
        &mut self,
        out: &ApplyOut,
        engine: &Engine,
        ctx: &mut Ctx,
        clients: &[Client],
        history: &mut History,
    ) {
        self.seq = 0;
        if let Op::Lock(l) = &out.entry.cmd.op {
            self.lock_reqs
                .entry((l.caller.client, l.nonce))
                .or_insert_with(|| (LockKey::new(&l.zone, &l.name), l.mode, l.kind));
        }
        enum Ev {
            Lost(Token, LossReason),
            Grant(Token, LockKey, ClientId, Mode, Kind),
        }
        let mut evs: Vec<Ev> = Vec::new();
        for e in &out.applied.effects {
            match e {
                Effect::Lost { token, reason, .. } => evs.push(Ev::Lost(*token, *reason)),
                Effect::Granted {
                    client,
                    nonce,
                    token,
                    ..
                } => match self.lock_reqs.get(&(*client, *nonce)).cloned() {
                    Some((lock, mode, kind)) => {
                        evs.push(Ev::Grant(*token, lock, *client, mode, kind))
                    }
                    None => ctx.fail(format!(
                        "index {}: grant of token {token} to a LOCK never applied",
                        out.index
                    )),
                },
                _ => {}
            }
        }
        if let (Op::Lock(l), Reply::Granted { token }) = (&out.entry.cmd.op, &out.applied.reply) {
            // A retried LOCK answers its old token again: not a grant
            // (nor when its queued grant came in this same entry).
            let seen = evs
                .iter()
                .any(|e| matches!(e, Ev::Grant(t, ..) if t == token));
            if *token > self.last_token && !seen {
                evs.push(Ev::Grant(
                    *token,
                    LockKey::new(&l.zone, &l.name),
                    l.caller.client,
                    l.mode,
                    l.kind,
                ));
            }
        }
        let lost: BTreeSet<Token> = evs
            .iter()
            .filter_map(|e| match e {
                Ev::Lost(t, _) => Some(*t),
                Ev::Grant(..) => None,
            })
            .collect();
        let is_current = |lock: &LockKey, t: Token| engine.check_token(&lock.zone, &lock.name, t);
        let mut voluntary: BTreeSet<Token> = BTreeSet::new();
        for (t, g) in &self.mirror {
            if !lost.contains(t) && !is_current(&g.lock, *t) {
                voluntary.insert(*t);
            }
        }
        for e in &evs {
            if let Ev::Grant(t, lock, ..) = e {
                if !lost.contains(t) && !is_current(lock, *t) {
                    voluntary.insert(*t);
                }
            }
        }
        let early: Vec<Token> = voluntary
            .iter()
            .copied()
            .filter(|t| self.mirror.contains_key(t))
            .collect();
        for t in early {
            self.end(out, ctx, history, t, EndReason::Released);
        }
        let mut new_grants = 0u64;
        for e in evs {
            match e {
                Ev::Lost(t, reason) => {
                    if reason == LossReason::Broken {
                        self.broken.insert(t);
                        self.breaks += 1;
                    } else {
                        self.expired.insert(t);
                        self.expiries += 1;
                    }
                    self.end(out, ctx, history, t, EndReason::Lost(reason));
                }
                Ev::Grant(t, lock, client, mode, kind) => {
                    new_grants += 1;
                    self.grant(out, ctx, clients, history, lock, client, mode, kind, t);
                    if voluntary.contains(&t) {
                        self.end(out, ctx, history, t, EndReason::Released);
                    }
                }
            }
        }
        let issued = engine.last_token().saturating_sub(self.last_token);
        if issued != new_grants {
            ctx.fail(format!(
                "index {}: the engine issued {issued} tokens but the record saw {new_grants} grants",
                out.index
            ));
        }
        self.last_token = engine.last_token();
    }

    fn end(
        &mut self,
        out: &ApplyOut,
        ctx: &mut Ctx,
        history: &mut History,
        token: Token,
        reason: EndReason,
    ) {
        ctx.trace(|| format!("record [{}]: token {token} ended {reason:?}", out.index));
        let Some(g) = self.mirror.remove(&token) else {
            ctx.fail(format!(
                "index {}: token {token} ends ({reason:?}) but the record does not hold it",
                out.index
            ));
            return;
        };
        let ev = self.event(
            out,
            ctx,
            g.lock,
            RecordKind::Ended {
                token,
                client: Some(g.client),
                reason,
            },
        );
        history.record(ev);
    }

    #[allow(clippy::too_many_arguments)]
    fn grant(
        &mut self,
        out: &ApplyOut,
        ctx: &mut Ctx,
        clients: &[Client],
        history: &mut History,
        lock: LockKey,
        client: ClientId,
        mode: Mode,
        kind: Kind,
        token: Token,
    ) {
        self.grants += 1;
        for c in clients {
            if let Some(&(t, end, m)) = c.belief_ends.get(&lock) {
                if t != token && mode.conflicts_with(m) && self.expired.contains(&t) {
                    let slack = ctx.now.saturating_sub(end);
                    if slack < 2_000 {
                        self.lease_tests += 1;
                        self.lease_slack_min =
                            Some(self.lease_slack_min.map_or(slack, |x| x.min(slack)));
                    }
                }
            }
        }
        // The client-side lease rule: nobody may still believe it holds a
        // conflicting grant of this lock.
        for c in clients {
            for (&t, h) in &c.holds {
                if t == token || h.lock != lock || !mode.conflicts_with(h.mode) {
                    continue;
                }
                if c.believes(t, ctx.now) && !self.broken.contains(&t) {
                    ctx.fail(format!(
                        "lease overlap on {lock}: token {token} granted to {} at {} (log index {}) \
                         while client c{} still validly believes it holds token {t} (lease until \
                         {:?}, TTL until {:?})",
                        ctx.who(client), ctx.now, out.index, c.idx, c.lease, h.ttl_deadline
                    ));
                }
            }
        }
        if ctx.trace.is_some() {
            let line = format!(
                "record [{}]: {lock} token {token} granted to {}",
                out.index,
                ctx.who(client)
            );
            ctx.trace(|| line);
        }
        let ev = self.event(
            out,
            ctx,
            lock.clone(),
            RecordKind::Granted {
                token,
                client,
                mode,
                kind,
            },
        );
        history.record(ev);
        self.mirror.insert(token, Grant { lock, client });
    }
}
