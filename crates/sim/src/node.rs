//! One simulated server: a Raft-like replica with its own lock engine, the
//! leader's proposer and time driver as `crates/server` has them
//! (`proposer.rs`, `driver.rs`), and the server side of client requests
//! (forwarding to the leader, keepalive batching, answering after the local
//! apply, delivering effects, settling waits after a snapshot install).
//!
//! Raft here is the protocol's core, not openraft: terms and votes with the
//! up-to-date-log rule, AppendEntries with the log-matching check and
//! conflict truncation, commit by a majority of current-term entries, log
//! compaction into engine snapshots and InstallSnapshot for a lagging
//! follower. Persistent state (term, vote, log, snapshot) survives a crash;
//! everything else (role, commit and apply indexes, the engine, the
//! proposer's state, connections) is rebuilt on restart from the snapshot
//! and the log.
//!
//! What it deliberately does not model: membership changes, fsync latency,
//! pre-vote, leader leases.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use oclocks_core::{Applied, Caller, ClientId, Command, Engine, EngineLimits, Nonce, Op, Reply};

use crate::ctx::Ctx;
use crate::net::{Addr, Entry, Msg, Snap, Tag};
use crate::{
    Mutation, APPEND_ENTRIES_MAX, BEAT_MS, ELECTION_MS_MAX, ELECTION_MS_MIN, HEARTBEAT_MS,
    KEEPALIVE_BATCH_MS, QUORUM_BOUND_MS, STALL_MS,
};

/// A replica's monotonic clock: `base + t·(1 + drift) + jumps`, where `t` is
/// simulated time. Restarting the process starts a new clock.
#[derive(Clone, Debug)]
pub struct Clock {
    pub base: u64,
    /// Rate error in parts per million (|drift| < 1,000,000).
    pub drift_ppm: i64,
    /// Forward jumps so far.
    pub jumped: u64,
}

impl Clock {
    pub fn read(&self, now: u64) -> u64 {
        let t = i128::from(now);
        let v = i128::from(self.base)
            + t
            + t * i128::from(self.drift_ppm) / 1_000_000
            + i128::from(self.jumped);
        u64::try_from(v.max(0)).unwrap_or(u64::MAX)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Follower,
    Candidate,
    Leader,
}

/// One applied entry, for the observer and for delivery.
pub struct ApplyOut {
    pub index: u64,
    pub entry: Arc<Entry>,
    pub applied: Applied,
    /// FNV-1a of the engine's snapshot bytes after the apply.
    pub hash: u64,
}

pub fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub struct Node {
    pub id: usize,
    pub n: usize,
    pub limits: EngineLimits,
    /// Mutation: commit entries of earlier terms by counting replicas.
    commit_old_terms: bool,
    pub up: bool,
    /// Process restarts so far (names a clock).
    pub incarnation: u64,
    /// Paused (SIGSTOP, VM pause) until this simulated time.
    pub paused_until: u64,
    pub clock: Clock,
    // Persistent.
    pub term: u64,
    pub voted_for: Option<usize>,
    /// Entries after the snapshot: index `snap_index() + 1 + i`.
    pub log: Vec<Arc<Entry>>,
    pub snap: Option<Snap>,
    // Volatile.
    pub role: Role,
    pub leader: Option<usize>,
    pub commit: u64,
    pub applied: u64,
    pub engine: Engine,
    election_at: u64,
    votes: BTreeSet<usize>,
    next: Vec<u64>,
    matched: Vec<u64>,
    /// When each peer last answered this leader (simulated ms).
    pub contact: Vec<Option<u64>>,
    sent_upto: Vec<u64>,
    heartbeat_at: Vec<u64>,
    // Proposer and driver (crates/server/src/proposer.rs, driver.rs).
    last_beat: u64,
    next_beat_at: u64,
    rebase_pending: bool,
    rebased_term: u64,
    tick_inflight: Option<u64>,
    // Server side of client connections.
    /// Each client's connection at this server.
    pub conns: BTreeMap<usize, u64>,
    /// Waiting LOCKs registered here (client, nonce), as the hub does.
    waits: BTreeSet<(usize, Nonce)>,
    ka_batch: Vec<(Caller, usize, u64, u64)>,
    ka_flush_at: Option<u64>,
}

fn engine_new(limits: &EngineLimits) -> Engine {
    let mut e = Engine::new(limits.clone());
    // The simulation checks every replica's invariants after every step.
    e.set_check_invariants(false);
    e
}

impl Node {
    pub fn new(id: usize, n: usize, limits: EngineLimits, clock: Clock, ctx: &mut Ctx) -> Node {
        let engine = engine_new(&limits);
        let mut node = Node {
            id,
            n,
            limits,
            commit_old_terms: ctx.mutated(Mutation::CommitOldTermByCount),
            up: true,
            incarnation: 0,
            paused_until: 0,
            clock,
            term: 0,
            voted_for: None,
            log: Vec::new(),
            snap: None,
            role: Role::Follower,
            leader: None,
            commit: 0,
            applied: 0,
            engine,
            election_at: 0,
            votes: BTreeSet::new(),
            next: vec![1; n],
            matched: vec![0; n],
            contact: vec![None; n],
            sent_upto: vec![0; n],
            heartbeat_at: vec![0; n],
            last_beat: 0,
            next_beat_at: 0,
            rebase_pending: false,
            rebased_term: 0,
            tick_inflight: None,
            conns: BTreeMap::new(),
            waits: BTreeSet::new(),
            ka_batch: Vec::new(),
            ka_flush_at: None,
        };
        node.reset_election(ctx);
        node.last_beat = node.clock.read(ctx.now);
        node
    }

    pub fn snap_index(&self) -> u64 {
        self.snap.as_ref().map_or(0, |s| s.index)
    }

    pub fn last_index(&self) -> u64 {
        self.snap_index() + self.log.len() as u64
    }

    pub fn term_at(&self, i: u64) -> Option<u64> {
        let si = self.snap_index();
        if i == 0 {
            Some(0)
        } else if i == si {
            self.snap.as_ref().map(|s| s.term)
        } else if i > si && i <= self.last_index() {
            Some(self.log[(i - si - 1) as usize].term)
        } else {
            None
        }
    }

    pub fn entry(&self, i: u64) -> Option<&Arc<Entry>> {
        let si = self.snap_index();
        if i > si && i <= self.last_index() {
            Some(&self.log[(i - si - 1) as usize])
        } else {
            None
        }
    }

    fn last_term(&self) -> u64 {
        self.term_at(self.last_index()).unwrap_or(0)
    }

    /// Running: up and not paused.
    pub fn serving(&self, now: u64) -> bool {
        self.up && self.paused_until <= now
    }

    fn majority(&self) -> usize {
        self.n / 2 + 1
    }

    fn me(&self) -> Addr {
        Addr::Node(self.id)
    }

    fn reset_election(&mut self, ctx: &mut Ctx) {
        self.election_at = ctx.now + ctx.rng.range(ELECTION_MS_MIN, ELECTION_MS_MAX);
    }

    // ------------------------------------------------------------------
    // Faults
    // ------------------------------------------------------------------

    pub fn crash(&mut self) {
        self.up = false;
    }

    /// Restart from persistent state with a fresh process clock.
    pub fn restart(&mut self, ctx: &mut Ctx, clock_base: u64) -> Result<(), String> {
        self.up = true;
        self.incarnation += 1;
        self.paused_until = 0;
        self.clock.base = clock_base;
        self.clock.jumped = 0;
        self.engine = match &self.snap {
            Some(s) => {
                let mut e = Engine::restore(self.limits.clone(), &s.bytes).map_err(|e| {
                    format!("node {} cannot restore its own snapshot: {e}", self.id)
                })?;
                e.set_check_invariants(false);
                e
            }
            None => engine_new(&self.limits),
        };
        self.role = Role::Follower;
        self.leader = None;
        self.commit = self.snap_index();
        self.applied = self.snap_index();
        self.votes.clear();
        self.contact = vec![None; self.n];
        self.last_beat = self.clock.read(ctx.now);
        self.next_beat_at = ctx.now;
        self.rebase_pending = false;
        self.rebased_term = 0;
        self.tick_inflight = None;
        self.conns.clear();
        self.waits.clear();
        self.ka_batch.clear();
        self.ka_flush_at = None;
        self.reset_election(ctx);
        Ok(())
    }

    /// Take a snapshot at the applied index and drop the log before it.
    pub fn compact(&mut self) -> Option<(u64, u64)> {
        let si = self.snap_index();
        if self.applied <= si {
            return None;
        }
        let term = self.term_at(self.applied)?;
        let bytes = self.engine.snapshot();
        let hash = fnv(&bytes);
        let drop = (self.applied - si) as usize;
        self.log.drain(..drop);
        self.snap = Some(Snap {
            index: self.applied,
            term,
            bytes: Arc::new(bytes),
        });
        Some((self.applied, hash))
    }

    // ------------------------------------------------------------------
    // Raft
    // ------------------------------------------------------------------

    fn become_follower(&mut self, term: u64, leader: Option<usize>) {
        if term > self.term {
            self.term = term;
            self.voted_for = None;
        }
        self.role = Role::Follower;
        self.leader = leader;
        self.tick_inflight = None;
    }

    fn start_election(&mut self, ctx: &mut Ctx) {
        self.term += 1;
        self.voted_for = Some(self.id);
        self.role = Role::Candidate;
        self.leader = None;
        self.votes = BTreeSet::from([self.id]);
        self.reset_election(ctx);
        ctx.trace(|| format!("node {} campaigns in term {}", self.id, self.term));
        let (term, last_index, last_term) = (self.term, self.last_index(), self.last_term());
        for p in 0..self.n {
            if p != self.id {
                ctx.send(
                    self.me(),
                    Addr::Node(p),
                    Msg::Vote {
                        term,
                        last_index,
                        last_term,
                    },
                );
            }
        }
        if self.votes.len() >= self.majority() {
            self.become_leader(ctx);
        }
    }

    fn become_leader(&mut self, ctx: &mut Ctx) {
        self.role = Role::Leader;
        self.leader = Some(self.id);
        let next = self.last_index() + 1;
        self.next = vec![next; self.n];
        self.matched = vec![0; self.n];
        self.sent_upto = vec![0; self.n];
        self.heartbeat_at = vec![ctx.now; self.n];
        let now = ctx.now;
        self.contact = (0..self.n)
            .map(|p| self.votes.contains(&p).then_some(now))
            .collect();
        self.tick_inflight = None;
        ctx.trace(|| format!("node {} leads term {}", self.id, self.term));
    }

    fn on_vote(&mut self, from: usize, term: u64, last_index: u64, last_term: u64, ctx: &mut Ctx) {
        if term > self.term {
            self.become_follower(term, None);
        }
        let up_to_date = (last_term, last_index) >= (self.last_term(), self.last_index());
        let granted = term == self.term
            && self.voted_for.is_none_or(|v| v == from)
            && up_to_date
            && self.role != Role::Leader;
        if granted {
            self.voted_for = Some(from);
            self.reset_election(ctx);
        }
        ctx.send(
            self.me(),
            Addr::Node(from),
            Msg::VoteReply {
                term: self.term,
                granted,
            },
        );
    }

    fn on_vote_reply(&mut self, from: usize, term: u64, granted: bool, ctx: &mut Ctx) {
        if term > self.term {
            self.become_follower(term, None);
            return;
        }
        if self.role == Role::Candidate && term == self.term && granted {
            self.votes.insert(from);
            if self.votes.len() >= self.majority() {
                self.become_leader(ctx);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_append(
        &mut self,
        from: usize,
        term: u64,
        prev_index: u64,
        prev_term: u64,
        entries: Vec<Arc<Entry>>,
        leader_commit: u64,
        ctx: &mut Ctx,
    ) {
        let reply = |node: &Node, ctx: &mut Ctx, ok: bool, index: u64| {
            ctx.send(
                node.me(),
                Addr::Node(from),
                Msg::AppendReply {
                    term: node.term,
                    ok,
                    index,
                },
            );
        };
        if term < self.term {
            reply(self, ctx, false, self.last_index() + 1);
            return;
        }
        if term > self.term || self.role != Role::Follower || self.leader != Some(from) {
            self.become_follower(term, Some(from));
        }
        self.reset_election(ctx);
        let si = self.snap_index();
        if prev_index > self.last_index() {
            reply(self, ctx, false, self.last_index() + 1);
            return;
        }
        if prev_index >= si && self.term_at(prev_index) != Some(prev_term) {
            // Everything up to our commit index matches every leader's log.
            reply(self, ctx, false, (self.commit + 1).min(prev_index).max(1));
            return;
        }
        let count = entries.len() as u64;
        for (k, e) in entries.into_iter().enumerate() {
            let i = prev_index + 1 + k as u64;
            if i <= self.snap_index() {
                continue;
            }
            match self.term_at(i) {
                Some(t) if t == e.term => continue,
                Some(_) => {
                    if i <= self.commit {
                        ctx.fail(format!(
                            "node {} was told to overwrite committed entry {i} (commit {})",
                            self.id, self.commit
                        ));
                        return;
                    }
                    if i <= self.applied {
                        ctx.fail(format!(
                            "node {} must overwrite entry {i}, which it has already applied \
                             (applied {}, commit {})",
                            self.id, self.applied, self.commit
                        ));
                        return;
                    }
                    let keep = (i - self.snap_index() - 1) as usize;
                    self.log.truncate(keep);
                    self.log.push(e);
                }
                None => self.log.push(e),
            }
        }
        let last_new = prev_index + count;
        if leader_commit > self.commit {
            self.commit = leader_commit.min(last_new).max(self.commit);
        }
        reply(self, ctx, true, last_new);
    }

    fn quorum_age(&self, now: u64) -> u64 {
        let mut ages: Vec<u64> = (0..self.n)
            .map(|p| {
                if p == self.id {
                    0
                } else {
                    self.contact[p].map_or(u64::MAX, |c| now.saturating_sub(c))
                }
            })
            .collect();
        ages.sort_unstable();
        ages[self.majority() - 1]
    }

    /// When the majority's contact ran out (for the observer), if it has.
    pub fn quorum_lost_since(&self, now: u64) -> Option<u64> {
        if self.role != Role::Leader || self.quorum_age(now) <= QUORUM_BOUND_MS {
            return None;
        }
        let mut seen: Vec<u64> = (0..self.n)
            .map(|p| {
                if p == self.id {
                    now
                } else {
                    self.contact[p].unwrap_or(0)
                }
            })
            .collect();
        seen.sort_unstable_by(|a, b| b.cmp(a));
        Some(seen[self.majority() - 1] + QUORUM_BOUND_MS)
    }

    fn on_append_reply(&mut self, from: usize, term: u64, ok: bool, index: u64, ctx: &mut Ctx) {
        if term > self.term {
            self.become_follower(term, None);
            return;
        }
        if self.role != Role::Leader || term < self.term {
            return;
        }
        let before = self.quorum_age(ctx.now);
        self.contact[from] = Some(ctx.now);
        // ARCHITECTURE.md: once a leader that went without quorum contact
        // for over the bound hears from a quorum again, its next command
        // is a Rebase.
        if before > QUORUM_BOUND_MS
            && self.quorum_age(ctx.now) <= QUORUM_BOUND_MS
            && !ctx.mutated(Mutation::QuorumRebaseOnlyOnPropose)
        {
            self.rebase_pending = true;
        }
        if ok {
            self.matched[from] = self.matched[from].max(index);
            self.next[from] = self.next[from].max(index + 1);
            self.advance_commit();
        } else {
            self.next[from] = index.clamp(1, self.last_index() + 1);
            self.sent_upto[from] = 0;
        }
    }

    fn advance_commit(&mut self) {
        let last = self.last_index();
        let mut n = last;
        while n > self.commit {
            let current = self.term_at(n) == Some(self.term) || self.commit_old_terms;
            if current {
                let count = (0..self.n)
                    .filter(|&p| p == self.id || self.matched[p] >= n)
                    .count();
                if count >= self.majority() {
                    self.commit = n;
                    return;
                }
            }
            n -= 1;
        }
    }

    fn on_install(&mut self, from: usize, term: u64, snap: Snap, ctx: &mut Ctx) -> Option<u64> {
        if term < self.term {
            ctx.send(
                self.me(),
                Addr::Node(from),
                Msg::AppendReply {
                    term: self.term,
                    ok: false,
                    index: self.last_index() + 1,
                },
            );
            return None;
        }
        if term > self.term || self.role != Role::Follower || self.leader != Some(from) {
            self.become_follower(term, Some(from));
        }
        self.reset_election(ctx);
        let mut installed = None;
        if snap.index > self.commit {
            let mut engine = match Engine::restore(self.limits.clone(), &snap.bytes) {
                Ok(e) => e,
                Err(e) => {
                    ctx.fail(format!("node {} cannot restore a snapshot: {e}", self.id));
                    return None;
                }
            };
            engine.set_check_invariants(false);
            if snap.index < self.applied {
                ctx.fail(format!(
                    "node {} installs a snapshot at {} behind its applied index {}",
                    self.id, snap.index, self.applied
                ));
                return None;
            }
            let keep_suffix = self.term_at(snap.index) == Some(snap.term);
            if keep_suffix {
                let drop = (snap.index - self.snap_index()) as usize;
                self.log.drain(..drop);
            } else {
                self.log.clear();
            }
            self.engine = engine;
            self.commit = snap.index;
            self.applied = snap.index;
            ctx.trace(|| format!("node {} installs snapshot at {}", self.id, snap.index));
            installed = Some(snap.index);
            self.snap = Some(snap);
            self.settle_waits(ctx);
        }
        let index = self.snap_index().max(self.commit);
        ctx.send(
            self.me(),
            Addr::Node(from),
            Msg::AppendReply {
                term: self.term,
                ok: true,
                index,
            },
        );
        installed
    }

    /// Leader: send AppendEntries (or the snapshot) where due.
    fn replicate(&mut self, ctx: &mut Ctx) {
        if self.role != Role::Leader {
            return;
        }
        let last = self.last_index();
        for p in 0..self.n {
            if p == self.id {
                continue;
            }
            let fresh = last >= self.next[p] && self.sent_upto[p] < last;
            if !(fresh || ctx.now >= self.heartbeat_at[p]) {
                continue;
            }
            self.heartbeat_at[p] = ctx.now + HEARTBEAT_MS;
            let si = self.snap_index();
            if self.next[p] <= si {
                if let Some(snap) = self.snap.clone() {
                    self.sent_upto[p] = si;
                    ctx.send(
                        self.me(),
                        Addr::Node(p),
                        Msg::InstallSnapshot {
                            term: self.term,
                            snap,
                        },
                    );
                }
                continue;
            }
            let prev_index = self.next[p] - 1;
            let prev_term = self.term_at(prev_index).unwrap_or(0);
            let from = (self.next[p] - si - 1) as usize;
            let to = (from + APPEND_ENTRIES_MAX).min(self.log.len());
            let entries: Vec<Arc<Entry>> = self.log[from..to].to_vec();
            self.sent_upto[p] = prev_index + entries.len() as u64;
            ctx.send(
                self.me(),
                Addr::Node(p),
                Msg::Append {
                    term: self.term,
                    prev_index,
                    prev_term,
                    entries,
                    commit: self.commit,
                },
            );
        }
    }

    // ------------------------------------------------------------------
    // Proposer (crates/server/src/proposer.rs)
    // ------------------------------------------------------------------

    fn append(&mut self, op: Op, tag: Tag, ctx: &mut Ctx) -> u64 {
        let cmd = Command {
            term: self.term,
            now_ms: self.clock.read(ctx.now),
            op,
        };
        if ctx.trace.is_some() {
            let (op, i) = (ctx.brief(&cmd.op), self.last_index() + 1);
            ctx.trace(|| {
                format!(
                    "node {} stamps [{i}] term {} @{}: {op}",
                    self.id, self.term, cmd.now_ms
                )
            });
        }
        self.log.push(Arc::new(Entry {
            term: self.term,
            cmd,
            tag,
            stamped_at: ctx.now,
        }));
        let i = self.last_index();
        self.matched[self.id] = i;
        if self.n == 1 {
            self.advance_commit();
        }
        i
    }

    /// Stamp and append `op` (after a Rebase when one is due). `Err` when
    /// this node may not stamp: not the leader, or no quorum contact.
    pub fn propose(&mut self, op: Op, tag: Tag, ctx: &mut Ctx) -> Result<u64, ()> {
        if self.role != Role::Leader {
            return Err(());
        }
        if self.quorum_age(ctx.now) > QUORUM_BOUND_MS {
            self.rebase_pending = true;
            return Err(());
        }
        let clk = self.clock.read(ctx.now);
        let stalled = clk.saturating_sub(self.last_beat) > STALL_MS
            && !ctx.mutated(Mutation::SkipStallRebase);
        if self.rebase_pending || stalled {
            self.rebase_pending = false;
            self.last_beat = clk;
            self.append(Op::Rebase, Tag::None, ctx);
        }
        Ok(self.append(op, tag, ctx))
    }

    // ------------------------------------------------------------------
    // Time driver (crates/server/src/driver.rs)
    // ------------------------------------------------------------------

    /// The tick loop's beat, every `BEAT_MS` while the process runs.
    fn beat(&mut self, ctx: &mut Ctx) {
        let clk = self.clock.read(ctx.now);
        if clk.saturating_sub(self.last_beat) > STALL_MS && !ctx.mutated(Mutation::SkipStallRebase)
        {
            ctx.trace(|| format!("node {} beat: stall detected", self.id));
            self.rebase_pending = true;
        }
        self.last_beat = clk;
        if self.role != Role::Leader {
            return;
        }
        if self.quorum_age(ctx.now) > QUORUM_BOUND_MS
            && !ctx.mutated(Mutation::QuorumRebaseOnlyOnPropose)
        {
            self.rebase_pending = true;
        }
        if self.rebased_term != self.term {
            // The mutation skips proposing it (and counts it as done).
            let done = ctx.mutated(Mutation::SkipTermRebase)
                || self.propose(Op::Rebase, Tag::None, ctx).is_ok();
            if done {
                self.rebased_term = self.term;
            }
            return;
        }
        if self.tick_inflight.is_some_and(|i| self.applied < i) {
            return;
        }
        self.tick_inflight = None;
        let due = (self.engine.term() == self.term)
            .then(|| {
                self.engine
                    .next_deadline()
                    .map(|d| self.engine.leader_clock_at(d))
            })
            .flatten();
        if due.is_some_and(|d| d <= clk) {
            if let Ok(i) = self.propose(Op::Tick, Tag::None, ctx) {
                self.tick_inflight = Some(i);
            }
        }
    }

    /// Timers of a running node: beat, election, replication, keepalive
    /// batch.
    pub fn timers(&mut self, ctx: &mut Ctx) {
        if ctx.now >= self.next_beat_at {
            self.next_beat_at = ctx.now + BEAT_MS;
            self.beat(ctx);
        }
        if self.role != Role::Leader && ctx.now >= self.election_at {
            self.start_election(ctx);
        }
        if self.ka_flush_at.is_some_and(|t| ctx.now >= t) {
            self.flush_keepalives(ctx);
        }
        self.replicate(ctx);
    }

    // ------------------------------------------------------------------
    // Client requests (server side)
    // ------------------------------------------------------------------

    fn unavailable(&self, tag: &Tag, ctx: &mut Ctx) {
        match tag {
            Tag::None => {}
            Tag::Reply {
                client, conn, req, ..
            } => ctx.send(
                self.me(),
                Addr::Client(*client),
                Msg::Reply {
                    conn: *conn,
                    req: *req,
                    reply: None,
                },
            ),
            Tag::Keepalive { reqs, .. } => {
                for &(client, conn, req) in reqs {
                    ctx.send(
                        self.me(),
                        Addr::Client(client),
                        Msg::KeepaliveAck {
                            conn,
                            req,
                            result: None,
                        },
                    );
                }
            }
        }
    }

    /// Propose here if leading, else forward to the leader we know.
    fn submit(&mut self, op: Op, tag: Tag, ctx: &mut Ctx) {
        if self.role == Role::Leader {
            if self.propose(op, tag.clone(), ctx).is_err() {
                self.unavailable(&tag, ctx);
            }
        } else if let Some(l) = self.leader.filter(|&l| l != self.id) {
            ctx.send(self.me(), Addr::Node(l), Msg::Forward { op, tag });
        } else {
            self.unavailable(&tag, ctx);
        }
    }

    fn flush_keepalives(&mut self, ctx: &mut Ctx) {
        self.ka_flush_at = None;
        if self.ka_batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.ka_batch);
        let callers = batch.iter().map(|(c, ..)| c.clone()).collect();
        let reqs = batch
            .iter()
            .map(|&(_, cl, conn, req)| (cl, conn, req))
            .collect();
        self.submit(
            Op::Keepalive { callers },
            Tag::Keepalive {
                node: self.id,
                reqs,
            },
            ctx,
        );
    }

    /// Settle the registered waits from the engine's outcome memory (after
    /// a snapshot install skipped the entries with their effects).
    fn settle_waits(&mut self, ctx: &mut Ctx) {
        let waits: Vec<(usize, Nonce)> = self.waits.iter().copied().collect();
        for (client, nonce) in waits {
            let Some(&conn) = self.conns.get(&client) else {
                self.waits.remove(&(client, nonce));
                continue;
            };
            let Some(cid) = ctx
                .client_ix
                .iter()
                .find(|(_, &i)| i == client)
                .map(|(c, _)| *c)
            else {
                continue;
            };
            match self.engine.lock_outcome(cid, nonce) {
                Some(oclocks_core::LockOutcome::Waiting) => {}
                Some(outcome) => {
                    self.waits.remove(&(client, nonce));
                    ctx.send(
                        self.me(),
                        Addr::Client(client),
                        Msg::Settled {
                            conn,
                            nonce,
                            outcome,
                        },
                    );
                }
                None => {
                    self.waits.remove(&(client, nonce));
                }
            }
        }
    }

    /// Handle one delivered message. Returns the index of a snapshot it
    /// installed, if any (for the observer).
    pub fn handle(&mut self, from: Addr, msg: Msg, ctx: &mut Ctx) -> Option<u64> {
        match (from, msg) {
            (
                Addr::Node(p),
                Msg::Append {
                    term,
                    prev_index,
                    prev_term,
                    entries,
                    commit,
                },
            ) => self.on_append(p, term, prev_index, prev_term, entries, commit, ctx),
            (Addr::Node(p), Msg::AppendReply { term, ok, index }) => {
                self.on_append_reply(p, term, ok, index, ctx)
            }
            (
                Addr::Node(p),
                Msg::Vote {
                    term,
                    last_index,
                    last_term,
                },
            ) => self.on_vote(p, term, last_index, last_term, ctx),
            (Addr::Node(p), Msg::VoteReply { term, granted }) => {
                self.on_vote_reply(p, term, granted, ctx)
            }
            (Addr::Node(p), Msg::InstallSnapshot { term, snap }) => {
                return self.on_install(p, term, snap, ctx);
            }
            (Addr::Node(p), Msg::Forward { op, tag }) => {
                let proposed =
                    self.role == Role::Leader && self.propose(op, tag.clone(), ctx).is_ok();
                if !proposed {
                    ctx.send(self.me(), Addr::Node(p), Msg::ForwardFail { tag });
                }
            }
            (Addr::Node(_), Msg::ForwardFail { tag }) => self.unavailable(&tag, ctx),
            (Addr::Client(c), Msg::Request { conn, req, op }) => {
                self.conns.insert(c, conn);
                if let Op::Lock(l) = &op {
                    if l.wait_ms != 0 {
                        self.waits.insert((c, l.nonce));
                    }
                }
                let tag = Tag::Reply {
                    node: self.id,
                    client: c,
                    conn,
                    req,
                };
                self.submit(op, tag, ctx);
            }
            (Addr::Client(c), Msg::Keepalive { conn, req, caller }) => {
                self.conns.insert(c, conn);
                self.ka_batch.push((caller, c, conn, req));
                if self.ka_flush_at.is_none() {
                    self.ka_flush_at = Some(ctx.now + KEEPALIVE_BATCH_MS);
                }
            }
            _ => {}
        }
        None
    }

    // ------------------------------------------------------------------
    // Apply
    // ------------------------------------------------------------------

    /// Apply the next committed entry, if any.
    pub fn apply_one(&mut self, ctx: &Ctx) -> Option<ApplyOut> {
        let limit = if ctx.mutated(Mutation::ApplyBeforeCommit) {
            self.last_index()
        } else {
            self.commit
        };
        if self.applied >= limit {
            return None;
        }
        let index = self.applied + 1;
        let entry = self.entry(index)?.clone();
        let applied = self.engine.apply(entry.cmd.clone());
        self.applied = index;
        let hash = fnv(&self.engine.snapshot());
        Some(ApplyOut {
            index,
            entry,
            applied,
            hash,
        })
    }

    /// Answer the proposer's client and deliver effects to the clients
    /// connected here.
    pub fn deliver(&mut self, out: &ApplyOut, ctx: &mut Ctx) {
        match &out.entry.tag {
            Tag::Reply {
                node,
                client,
                conn,
                req,
            } if *node == self.id => ctx.send(
                self.me(),
                Addr::Client(*client),
                Msg::Reply {
                    conn: *conn,
                    req: *req,
                    reply: Some(out.applied.reply.clone()),
                },
            ),
            Tag::Keepalive { node, reqs } if *node == self.id => {
                if let Reply::Keepalive(results) = &out.applied.reply {
                    for (&(client, conn, req), r) in reqs.iter().zip(results) {
                        ctx.send(
                            self.me(),
                            Addr::Client(client),
                            Msg::KeepaliveAck {
                                conn,
                                req,
                                result: Some(r.clone()),
                            },
                        );
                    }
                }
            }
            _ => {}
        }
        for effect in &out.applied.effects {
            use oclocks_core::Effect;
            let (client, nonce): (ClientId, Option<Nonce>) = match effect {
                Effect::Granted { client, nonce, .. } | Effect::WaitEnded { client, nonce, .. } => {
                    (*client, Some(*nonce))
                }
                Effect::Lost {
                    client: Some(client),
                    ..
                }
                | Effect::SessionExpired { client }
                | Effect::Watch { client, .. } => (*client, None),
                Effect::Lost { client: None, .. } => continue,
            };
            let Some(&ci) = ctx.client_ix.get(&client) else {
                continue;
            };
            if let Some(n) = nonce {
                self.waits.remove(&(ci, n));
            }
            if let Some(&conn) = self.conns.get(&ci) {
                ctx.send(
                    self.me(),
                    Addr::Client(ci),
                    Msg::Event {
                        conn,
                        effect: effect.clone(),
                    },
                );
            }
        }
    }
}
