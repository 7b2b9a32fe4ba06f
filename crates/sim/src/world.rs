//! One simulated run: a cluster of replicas, clients, an admin breaking
//! locks, and the faults, all derived from one seed and stepped in
//! simulated time. After every step every running replica's engine must
//! pass `check_invariants`; at the end the history goes through the
//! checker of `oclocks-check` and the fenced register must have lost no
//! acknowledged increment.

use std::collections::BTreeMap;

use oclocks_check::{check, check_increments, CheckOptions, FencedRegister, History, LockKey};
use oclocks_core::{EngineLimits, Op};

use crate::client::{Client, Env};
use crate::ctx::Ctx;
use crate::net::{Addr, Net, NetConfig, Tag};
use crate::node::{Clock, Node, Role};
use crate::observer::Observer;
use crate::rng::Rng;
use crate::{SimOptions, SimStats, STEP_MS_MAX};

/// Fault rates of one run, in chances per million per step.
#[derive(Clone, Debug)]
pub struct Faults {
    pub crash: u64,
    pub pause: u64,
    pub jump: u64,
    pub partition: u64,
    pub client_cut: u64,
    pub client_pause: u64,
    pub compact: u64,
    pub brk: u64,
}

pub struct World {
    pub ctx: Ctx,
    pub nodes: Vec<Node>,
    pub clients: Vec<Client>,
    pub obs: Observer,
    pub history: History,
    pub register: FencedRegister,
    pub acked: u64,
    pub locks: Vec<LockKey>,
    pub faults: Faults,
    restart_at: Vec<Option<u64>>,
    pub stats: SimStats,
}

impl World {
    pub fn new(opts: &SimOptions) -> World {
        let mut rng = Rng::new(opts.seed);
        let n = [1usize, 3, 3, 3, 5, 5][rng.index(6)];
        let clients = rng.range(3, 6) as usize;
        let mut locks = vec![LockKey::new("z0", "L0"), LockKey::new("z0", "L1")];
        if rng.chance(500_000) {
            locks.push(LockKey::new("z1", "L0"));
        }
        let intensity = rng.range(0, 3);
        let net = NetConfig {
            drop_per_million: rng.range(0, 20_000 * intensity),
            delay_ms_min: 1,
            delay_ms_max: rng.range(2, 15),
            spike_per_million: rng.range(0, 10_000 * intensity),
            spike_ms_max: 400,
        };
        let faults = Faults {
            crash: rng.range(0, 700 * intensity),
            pause: rng.range(0, 1_000 * intensity),
            jump: rng.range(0, 500 * intensity),
            partition: rng.range(0, 1_000 * intensity),
            client_cut: rng.range(0, 1_000 * intensity),
            client_pause: rng.range(0, 3_000 * intensity),
            compact: rng.range(2_000, 30_000),
            brk: rng.range(0, 1_000 * intensity),
        };
        let limits = EngineLimits {
            // Small memories of ended grants, so RELEASE and REFRESH also
            // meet UNKNOWN_GRANT.
            ended_grants_max: rng.range(4, 64) as usize,
            ended_per_session_max: rng.range(1, 8) as usize,
            ..EngineLimits::default()
        };
        let mut ctx = Ctx {
            now: 0,
            rng,
            net: Net::new(net),
            mutation: opts.mutation,
            failure: None,
            trace: opts.trace.then(Vec::new),
            client_ix: BTreeMap::new(),
        };
        let nodes: Vec<Node> = (0..n)
            .map(|id| {
                let clock = Clock {
                    base: ctx.rng.range(0, 1_000_000_000),
                    drift_ppm: ctx.rng.range(0, 20_000) as i64 - 10_000,
                    jumped: 0,
                };
                Node::new(id, n, limits.clone(), clock, &mut ctx)
            })
            .collect();
        let clients: Vec<Client> = (0..clients)
            .map(|i| {
                let id = (u128::from(opts.seed) << 64) | (0x5eed_0000 + i as u128);
                ctx.client_ix.insert(id, i);
                let server = ctx.rng.index(n);
                let timeout = ctx.rng.range(1_000, 3_000);
                Client::new(i, id, server, timeout)
            })
            .collect();
        let stats = SimStats {
            seed: opts.seed,
            nodes: n,
            clients: clients.len(),
            ..SimStats::default()
        };
        World {
            ctx,
            restart_at: vec![None; n],
            nodes,
            clients,
            obs: Observer::default(),
            history: History::new(),
            register: FencedRegister::new(),
            acked: 0,
            locks,
            faults,
            stats,
        }
    }

    fn inc(&self, i: usize) -> u64 {
        self.nodes[i].incarnation
    }

    pub fn step(&mut self) {
        let dt = self.ctx.rng.range(1, STEP_MS_MAX);
        self.ctx.now += dt;
        self.ctx.net.heal(self.ctx.now);
        self.inject_faults();
        while let Some(env) = self.ctx.net.pop_due(self.ctx.now) {
            self.deliver(env);
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].serving(self.ctx.now) {
                let (term, was_leader) = (self.nodes[i].term, self.nodes[i].role == Role::Leader);
                self.nodes[i].timers(&mut self.ctx);
                self.note_leader(i, term, was_leader);
                self.apply(i);
            }
        }
        let locks = self.locks.clone();
        let nodes = self.nodes.len();
        for c in 0..self.clients.len() {
            if self.clients[c].paused_until > self.ctx.now {
                continue;
            }
            let mut env = Env {
                history: &mut self.history,
                register: &self.register,
                acked: &mut self.acked,
                locks: &locks,
                nodes,
            };
            self.clients[c].tick(&mut self.ctx, &mut env);
        }
        for i in 0..self.nodes.len() {
            let node = &self.nodes[i];
            if !node.up {
                self.obs.crashed(i);
                continue;
            }
            let now = self.ctx.now;
            let since = node.quorum_lost_since(now).map(|t| node.clock.read(t));
            self.obs
                .quorum(i, node.incarnation, since, node.clock.read(now));
        }
        for node in &self.nodes {
            if node.up {
                if let Err(e) = node.engine.check_invariants() {
                    self.ctx
                        .fail(format!("node {}: engine invariant: {e}", node.id));
                }
            }
        }
        self.stats.steps += 1;
    }

    /// Remember which replica leads which term (for time accounting).
    fn note_leader(&mut self, i: usize, old_term: u64, was_leader: bool) {
        let n = &self.nodes[i];
        if n.role == Role::Leader && (!was_leader || n.term != old_term) {
            self.stats.elections += 1;
            let key = (i, n.incarnation);
            if let Some(prev) = self.obs.term_leader.insert(n.term, key) {
                if prev != key {
                    self.ctx.fail(format!(
                        "two leaders in term {}: node {} and node {}",
                        n.term, prev.0, i
                    ));
                }
            }
        }
    }

    fn deliver(&mut self, env: crate::net::Envelope) {
        match env.to {
            Addr::Node(i) => {
                let node = &self.nodes[i];
                if !node.up {
                    return;
                }
                if node.paused_until > self.ctx.now {
                    let at = node.paused_until;
                    self.ctx.net.push(at, env);
                    return;
                }
                let (term, was_leader) = (node.term, node.role == Role::Leader);
                let installed = self.nodes[i].handle(env.from, env.msg, &mut self.ctx);
                self.note_leader(i, term, was_leader);
                if let Some(index) = installed {
                    self.stats.installs += 1;
                    let hash = self.nodes[i]
                        .snap
                        .as_ref()
                        .map_or(0, |s| crate::node::fnv(&s.bytes));
                    self.obs
                        .check_snapshot(i, index, hash, "installed", &mut self.ctx);
                }
                self.apply(i);
            }
            Addr::Client(c) => {
                if self.clients[c].paused_until > self.ctx.now {
                    let at = self.clients[c].paused_until;
                    self.ctx.net.push(at, env);
                    return;
                }
                let locks = self.locks.clone();
                let mut e = Env {
                    history: &mut self.history,
                    register: &self.register,
                    acked: &mut self.acked,
                    locks: &locks,
                    nodes: self.nodes.len(),
                };
                self.clients[c].on_msg(env.msg, &mut self.ctx, &mut e);
            }
        }
    }

    fn apply(&mut self, i: usize) {
        while let Some(out) = self.nodes[i].apply_one(&self.ctx) {
            self.stats.applied += 1;
            self.obs.on_apply(
                i,
                &out,
                &self.nodes[i].engine,
                &mut self.ctx,
                &self.clients,
                &mut self.history,
            );
            self.nodes[i].deliver(&out, &mut self.ctx);
        }
    }

    fn inject_faults(&mut self) {
        let now = self.ctx.now;
        let n = self.nodes.len();
        for i in 0..n {
            if self.restart_at[i].is_some_and(|t| now >= t) {
                self.restart_at[i] = None;
                let base = self.ctx.rng.range(0, 1_000_000_000);
                if let Err(e) = self.nodes[i].restart(&mut self.ctx, base) {
                    self.ctx.fail(e);
                }
                let si = self.nodes[i].snap_index();
                if let Some(s) = &self.nodes[i].snap {
                    let hash = crate::node::fnv(&s.bytes);
                    self.obs
                        .check_snapshot(i, si, hash, "restored", &mut self.ctx);
                }
                self.ctx.trace(|| format!("node {i} restarts"));
            }
        }
        let f = self.faults.clone();
        let rng = &mut self.ctx.rng;
        if rng.chance(f.crash) {
            let i = rng.index(n);
            if self.nodes[i].up {
                self.nodes[i].crash();
                self.restart_at[i] = Some(now + self.ctx.rng.range(100, 3_000));
                self.stats.crashes += 1;
                self.ctx.trace(|| format!("node {i} crashes"));
            }
        }
        if self.ctx.rng.chance(f.pause) {
            let i = self.ctx.rng.index(n);
            if self.nodes[i].serving(now) {
                let long = self.ctx.rng.chance(500_000);
                let d = if long {
                    self.ctx.rng.range(400, 2_500)
                } else {
                    self.ctx.rng.range(5, 100)
                };
                self.nodes[i].paused_until = now + d;
                if long {
                    let c = &self.nodes[i].clock;
                    let (a, b) = (c.read(now), c.read(now + d));
                    self.obs.stall(i, self.inc(i), a, b, "paused");
                    self.stats.stalls += 1;
                }
                self.ctx.trace(|| format!("node {i} pauses for {d} ms"));
            }
        }
        if self.ctx.rng.chance(f.jump) {
            let i = self.ctx.rng.index(n);
            let big = self.ctx.rng.chance(300_000);
            let j = if big {
                self.ctx.rng.range(400, 2_000)
            } else {
                self.ctx.rng.range(5, 100)
            };
            let before = self.nodes[i].clock.read(now);
            self.nodes[i].clock.jumped += j;
            if big {
                let after = self.nodes[i].clock.read(now);
                self.obs.stall(i, self.inc(i), before, after, "clock jump");
                self.stats.stalls += 1;
            }
            self.ctx
                .trace(|| format!("node {i} clock jumps forward {j} ms"));
        }
        if n > 1 && self.ctx.rng.chance(f.partition) {
            let i = self.ctx.rng.index(n);
            let until = now + self.ctx.rng.range(100, 2_500);
            let dir = self.ctx.rng.below(3);
            for p in 0..n {
                if p != i {
                    if dir != 1 {
                        self.ctx.net.cut(Addr::Node(i), Addr::Node(p), until);
                    }
                    if dir != 2 {
                        self.ctx.net.cut(Addr::Node(p), Addr::Node(i), until);
                    }
                }
            }
            self.stats.partitions += 1;
            self.ctx
                .trace(|| format!("node {i} partitioned (mode {dir}) until {until}"));
        }
        if self.ctx.rng.chance(f.client_pause) {
            let c = self.ctx.rng.index(self.clients.len());
            let d = self.ctx.rng.range(50, 4_000);
            self.clients[c].paused_until = self.clients[c].paused_until.max(now + d);
            self.stats.client_pauses += 1;
            self.ctx.trace(|| format!("client {c} pauses for {d} ms"));
        }
        if self.ctx.rng.chance(f.client_cut) {
            let c = self.ctx.rng.index(self.clients.len());
            let s = self.clients[c].server;
            let until = now + self.ctx.rng.range(100, 3_000);
            self.ctx.net.cut(Addr::Client(c), Addr::Node(s), until);
            if self.ctx.rng.chance(500_000) {
                self.ctx.net.cut(Addr::Node(s), Addr::Client(c), until);
            }
            self.ctx
                .trace(|| format!("client {c} cut from node {s} until {until}"));
        }
        for i in 0..n {
            if self.nodes[i].up
                && self.nodes[i].applied >= self.nodes[i].snap_index() + 8
                && self.ctx.rng.chance(f.compact)
            {
                if let Some((index, hash)) = self.nodes[i].compact() {
                    self.stats.snapshots += 1;
                    self.obs
                        .check_snapshot(i, index, hash, "taken", &mut self.ctx);
                }
            }
        }
        if self.ctx.rng.chance(f.brk) {
            let leader =
                (0..n).find(|&i| self.nodes[i].serving(now) && self.nodes[i].role == Role::Leader);
            if let Some(l) = leader {
                let lock = self.locks[self.ctx.rng.index(self.locks.len())].clone();
                let expected_token = if self.ctx.rng.chance(500_000) {
                    self.nodes[l]
                        .engine
                        .query(&lock.zone, &lock.name)
                        .and_then(|q| q.holders.first().map(|h| h.token))
                } else {
                    None
                };
                let op = Op::Break {
                    zone: lock.zone,
                    name: lock.name,
                    expected_token,
                };
                if self.nodes[l].propose(op, Tag::None, &mut self.ctx).is_ok() {
                    self.stats.breaks_proposed += 1;
                }
            }
        }
    }

    /// How often each kind of outcome occurred (non-vacuity of the run).
    fn count_outcomes(&mut self) {
        use oclocks_check::{Call, Fail, Outcome, RecordKind, Ret};
        use oclocks_core::{EndReason, LossReason};
        let mut add = |k: String| *self.stats.outcomes.entry(k).or_insert(0) += 1;
        for op in self.history.ops() {
            let call = match &op.call {
                Call::Acquire { .. } => "acquire",
                Call::Release { .. } => "release",
                Call::Refresh { .. } => "refresh",
                Call::Cancel { .. } => "cancel",
                Call::Close { .. } => "close",
            };
            let outcome = match &op.outcome {
                Outcome::Ok(Ret::Released {
                    already_released: true,
                }) => "ok already released".to_string(),
                Outcome::Ok(Ret::Cancelled { gave_back: Some(_) }) => "ok gave back".to_string(),
                Outcome::Ok(Ret::Cancelled { gave_back: None }) => "ok nothing".to_string(),
                Outcome::Ok(_) => "ok".to_string(),
                Outcome::Fail(Fail::Refused(c)) => format!("refused {c}"),
                Outcome::Fail(Fail::NotHeld(c)) => format!("not held {c}"),
                Outcome::Indeterminate => "indeterminate".to_string(),
            };
            add(format!("{call} {outcome}"));
        }
        for ev in self.history.record_events() {
            let k = match ev.kind {
                RecordKind::Granted { .. } => "record granted",
                RecordKind::Ended {
                    reason: EndReason::Released,
                    ..
                } => "record released",
                RecordKind::Ended {
                    reason: EndReason::Lost(LossReason::SessionExpired),
                    ..
                } => "record session expired",
                RecordKind::Ended {
                    reason: EndReason::Lost(LossReason::TtlExpired),
                    ..
                } => "record TTL expired",
                RecordKind::Ended {
                    reason: EndReason::Lost(LossReason::Broken),
                    ..
                } => "record broken",
            };
            add(k.to_string());
        }
    }

    /// The end-of-run checks.
    pub fn finish(&mut self) {
        self.stats.sim_ms = self.ctx.now;
        self.stats.entries = self.obs.committed_len();
        self.stats.ops = self.history.ops().len() as u64;
        self.stats.record_events = self.history.record_events().len() as u64;
        self.stats.grants = self.obs.grants;
        self.stats.expiries = self.obs.expiries;
        self.stats.breaks = self.obs.breaks;
        self.stats.increments = self.acked;
        self.stats.fenced_refusals = self.register.state().refused;
        self.stats.messages = self.ctx.net.sent;
        self.stats.lease_tests = self.obs.lease_tests;
        self.stats.lease_slack_ms_min = self.obs.lease_slack_min;
        self.count_outcomes();
        if self.ctx.failure.is_some() {
            return;
        }
        let options = CheckOptions {
            record_complete: true,
            ..CheckOptions::default()
        };
        match check(&self.history, &options) {
            Ok(report) => {
                self.stats.check_states = report.states;
                self.stats.indeterminate = self
                    .history
                    .ops()
                    .iter()
                    .filter(|o| matches!(o.outcome, oclocks_check::Outcome::Indeterminate))
                    .count() as u64;
                if !report.is_ok() {
                    self.ctx.fail(format!("history check failed:\n{report}"));
                }
            }
            Err(e) => self.ctx.fail(format!("malformed history: {e}")),
        }
        if let Err(v) = check_increments(&self.register.state(), self.acked, 0) {
            self.ctx.fail(format!("fenced register: {v}"));
        }
    }
}
