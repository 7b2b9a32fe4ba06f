//! The chaos harness: a cluster of real `oclocks server` processes whose
//! peer traffic flows through a fault proxy ([`proxy`]), a workload of many
//! clients ([`workload`]), a nemesis that injects faults from a seeded
//! schedule, and the checks after it: the history checker
//! (`oclocks-check`) against the cluster's own record read back from the
//! Raft logs ([`record`]), the fenced registers, the client-side lease
//! property, liveness after healing, and the replicas' convergence.
//!
//! Entry point: [`run`] with [`ChaosOpts`]; it panics with the seed, the
//! fault schedule and a replay command on any violation.

#![allow(dead_code)]

#[path = "chaos/proxy.rs"]
pub mod proxy;
#[path = "chaos/record.rs"]
pub mod record;
#[path = "chaos/workload.rs"]
pub mod workload;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use oclocks_check::{check, check_increments, CheckOptions, History};
use oclocks_client::{Client, ClientConfig};
use oclocks_core::{EndReason, LossReason, Mode, Token};
use oclocks_proto::Role;
use oclocks_server::config::ServerConfig;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::common::cluster::{ClusterOpts, TestCluster};
use proxy::FaultNet;
use record::{Lifetimes, Ns, Replay};
use workload::{ClientProc, LoopOpts, Shared, EPOCH, LOCKS, STATIC_TTL, ZONE};

/// How to run.
#[derive(Clone, Debug)]
pub struct ChaosOpts {
    /// The test's name (for the replay command).
    pub test: &'static str,
    pub nodes: usize,
    pub clients: usize,
    /// Length of the fault phase.
    pub secs: u64,
    pub seed: u64,
    /// Session timeout of the cluster and of every client.
    pub session_ms: u64,
    /// Only these fault kinds (names as printed), if set.
    pub only: Option<Vec<String>>,
}

impl ChaosOpts {
    /// Defaults for a test, overridden by `OCLOCKS_CHAOS_SECS`,
    /// `OCLOCKS_CHAOS_SEED`, `OCLOCKS_CHAOS_CLIENTS` and
    /// `OCLOCKS_CHAOS_FAULTS` (a comma-separated list of fault kinds).
    pub fn from_env(test: &'static str, nodes: usize, clients: usize, secs: u64) -> ChaosOpts {
        let env_u64 = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let seed = env_u64("OCLOCKS_CHAOS_SEED").unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            (t ^ (u64::from(std::process::id()) << 32)) % 1_000_000_007
        });
        ChaosOpts {
            test,
            nodes,
            clients: env_u64("OCLOCKS_CHAOS_CLIENTS").map_or(clients, |c| c as usize),
            secs: env_u64("OCLOCKS_CHAOS_SECS").unwrap_or(secs),
            seed,
            session_ms: 5000,
            only: std::env::var("OCLOCKS_CHAOS_FAULTS")
                .ok()
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.split(',').map(|f| f.trim().to_string()).collect()),
        }
    }

    fn replay_command(&self) -> String {
        let mut s = format!(
            "OCLOCKS_CHAOS_SEED={} OCLOCKS_CHAOS_SECS={} OCLOCKS_CHAOS_CLIENTS={}",
            self.seed, self.secs, self.clients
        );
        if let Some(only) = &self.only {
            s.push_str(&format!(" OCLOCKS_CHAOS_FAULTS={}", only.join(",")));
        }
        s.push_str(&format!(
            " cargo test -p oclocks --test chaos {} -- --nocapture",
            self.test
        ));
        s
    }
}

/// One fault of the schedule.
#[derive(Clone, Debug)]
pub enum Fault {
    /// SIGKILL a node (the leader, or any), restart it after `down_ms`.
    KillNode { leader: bool, down_ms: u64 },
    /// SIGSTOP the leader, SIGCONT after `ms`.
    StopLeader { ms: u64 },
    /// SIGSTOP every server at once.
    StopAll { ms: u64 },
    /// SIGSTOP a majority of the servers, with or without the leader.
    StopMajority { with_leader: bool, ms: u64 },
    /// Cut the leader off from every other node (and maybe reset its
    /// connections first).
    IsolateLeader { reset: bool, ms: u64 },
    /// A random majority/minority split.
    Split { ms: u64 },
    /// Two sides that only a bridge node connects.
    Bridge { ms: u64 },
    /// The leader can send but not receive (`inbound`), or the reverse.
    OneWayLeader { inbound: bool, ms: u64 },
    /// The server a lock holder is connected to is cut off from the leader.
    CutHolderServer { ms: u64 },
    /// Every node alone.
    PartitionAll { ms: u64 },
    /// Every link slow.
    Slow {
        delay_ms: u64,
        jitter_ms: u64,
        ms: u64,
    },
    /// Every peer connection reset.
    ResetAll,
    /// Kill a client (a holder, or a waiting one) and start a new one.
    KillClient { holding: bool },
    /// Pause a client (a holder, or a waiting one).
    PauseClient { holding: bool, ms: u64 },
    /// Cut a client (a holder, or any) off from every server: the
    /// client-side lease rule put to the test.
    CutClient { holding: bool, ms: u64 },
    /// Many waits on one lock, all cancelled at once.
    MassCancel { waiters: usize, ms: u64 },
    /// Remove a follower, wipe it, let it join again (5+ nodes).
    Membership,
}

impl Fault {
    pub fn name(&self) -> &'static str {
        match self {
            Fault::KillNode { .. } => "kill-node",
            Fault::StopLeader { .. } => "stop-leader",
            Fault::StopAll { .. } => "stop-all",
            Fault::StopMajority { .. } => "stop-majority",
            Fault::IsolateLeader { .. } => "isolate-leader",
            Fault::Split { .. } => "split",
            Fault::Bridge { .. } => "bridge",
            Fault::OneWayLeader { .. } => "one-way-leader",
            Fault::CutHolderServer { .. } => "cut-holder-server",
            Fault::PartitionAll { .. } => "partition-all",
            Fault::Slow { .. } => "slow",
            Fault::ResetAll => "reset-all",
            Fault::KillClient { .. } => "kill-client",
            Fault::PauseClient { .. } => "pause-client",
            Fault::CutClient { .. } => "cut-client",
            Fault::MassCancel { .. } => "mass-cancel",
            Fault::Membership => "membership",
        }
    }

    /// Faults during which no quorum commits anything: by guarantee 3,
    /// every live client keeps its session through them.
    fn cluster_wide_stall(&self) -> bool {
        matches!(
            self,
            Fault::StopAll { .. } | Fault::StopMajority { .. } | Fault::PartitionAll { .. }
        )
    }

    fn hold_ms(&self) -> u64 {
        match self {
            Fault::KillNode { down_ms, .. } => *down_ms,
            Fault::StopLeader { ms }
            | Fault::StopAll { ms }
            | Fault::StopMajority { ms, .. }
            | Fault::IsolateLeader { ms, .. }
            | Fault::Split { ms }
            | Fault::Bridge { ms }
            | Fault::OneWayLeader { ms, .. }
            | Fault::CutHolderServer { ms }
            | Fault::PartitionAll { ms }
            | Fault::Slow { ms, .. }
            | Fault::PauseClient { ms, .. }
            | Fault::CutClient { ms, .. }
            | Fault::MassCancel { ms, .. } => *ms,
            Fault::ResetAll | Fault::KillClient { .. } | Fault::Membership => 0,
        }
    }
}

/// One step: a fault, then a quiet period.
#[derive(Clone, Debug)]
pub struct Step {
    pub fault: Fault,
    pub quiet_ms: u64,
}

/// The schedule of `seed`: faults and quiet periods filling `secs` (and a
/// little more; the run stops starting steps after `secs`).
pub fn schedule(seed: u64, secs: u64, nodes: usize, t: u64, only: Option<&[String]>) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut steps = Vec::new();
    let mut total = 0;
    let mut tries = 0;
    while total < secs * 1000 + 60_000 && tries < 100_000 {
        tries += 1;
        let r = |rng: &mut StdRng, lo: u64, hi: u64| rng.gen_range(lo..=hi.max(lo));
        let fault = match rng.gen_range(0..19) {
            0 => Fault::KillNode {
                leader: true,
                down_ms: r(&mut rng, 500, 2 * t),
            },
            1 => Fault::KillNode {
                leader: false,
                down_ms: r(&mut rng, 500, 2 * t),
            },
            2 => Fault::StopLeader {
                ms: r(&mut rng, 500, 2 * t),
            },
            3 => Fault::StopAll {
                ms: r(&mut rng, t / 2, 5 * t / 2),
            },
            4 => Fault::StopMajority {
                with_leader: rng.gen_bool(0.5),
                ms: r(&mut rng, t, 5 * t / 2),
            },
            5 => Fault::IsolateLeader {
                reset: rng.gen_bool(0.5),
                ms: r(&mut rng, 1000, 2 * t),
            },
            6 => Fault::Split {
                ms: r(&mut rng, 1000, 2 * t),
            },
            7 => Fault::Bridge {
                ms: r(&mut rng, 1000, 2 * t),
            },
            8 => Fault::OneWayLeader {
                inbound: rng.gen_bool(0.5),
                ms: r(&mut rng, 1000, t),
            },
            9 => Fault::CutHolderServer {
                ms: r(&mut rng, t / 2, 2 * t),
            },
            10 => Fault::PartitionAll {
                ms: r(&mut rng, 1000, 2 * t),
            },
            11 => Fault::Slow {
                delay_ms: r(&mut rng, 10, 150),
                jitter_ms: r(&mut rng, 0, 100),
                ms: r(&mut rng, 2000, 6000),
            },
            12 => Fault::ResetAll,
            13 => Fault::KillClient {
                holding: rng.gen_bool(0.7),
            },
            14 => Fault::PauseClient {
                holding: rng.gen_bool(0.7),
                ms: r(&mut rng, t / 2, 2 * t),
            },
            16 | 17 => Fault::CutClient {
                holding: rng.gen_bool(0.8),
                ms: r(&mut rng, 3 * t / 2, 5 * t / 2),
            },
            15 => Fault::MassCancel {
                waiters: rng.gen_range(10..=30),
                ms: r(&mut rng, 300, 1500),
            },
            _ => {
                if nodes >= 5 {
                    Fault::Membership
                } else {
                    continue;
                }
            }
        };
        if only.is_some_and(|o| !o.iter().any(|n| n == fault.name())) {
            continue;
        }
        // After a cluster-wide stall: a session timeout and some, so a
        // client whose session the cluster wrongly expired has found out
        // (it reconnects within its backoff) before the check.
        let quiet_ms = if fault.cluster_wide_stall() {
            t + 2500
        } else {
            rng.gen_range(500..=2000)
        };
        total += fault.hold_ms() + quiet_ms;
        steps.push(Step { fault, quiet_ms });
    }
    steps
}

/// What a run found and measured.
#[derive(Debug, Default)]
pub struct Summary {
    pub ops: usize,
    pub grants: u64,
    pub increments: u64,
    pub fenced: u64,
    pub lost_events: u64,
    pub faults: BTreeMap<&'static str, u64>,
    pub record_events: usize,
    pub log_entries: u64,
    pub session_expiries: usize,
    pub lease_tests: usize,
    pub lease_slack_min_ms: Option<f64>,
    pub duration: Duration,
}

struct Run {
    procs: Vec<ClientProc>,
    shared: Arc<Shared>,
    net: FaultNet,
    c: TestCluster,
    rt: tokio::runtime::Runtime,
    opts: ChaosOpts,
    rng: StdRng,
    log: Vec<String>,
    violations: Vec<String>,
    faults: BTreeMap<&'static str, u64>,
    request_timeout: Duration,
    started: Instant,
}

/// The proxy's pseudo-node id of routed client `idx`.
fn client_tag(idx: usize) -> u64 {
    1000 + idx as u64
}

fn ms(d: u64) -> Duration {
    Duration::from_millis(d)
}

impl Run {
    fn t(&self) -> u64 {
        self.opts.session_ms
    }

    fn note(&mut self, msg: String) {
        let at = self.shared.now() as f64 / 1e9;
        let line = format!("[{at:8.3}s] {msg}");
        println!("chaos: {line}");
        self.log.push(line);
    }

    fn violation(&mut self, msg: String) {
        self.note(format!("VIOLATION: {msg}"));
        self.violations.push(msg);
    }

    /// The node that says it leads, in the highest term (live nodes only).
    fn leader(&self) -> Option<u64> {
        let mut best: Option<(u64, u64)> = None;
        for id in self.c.live_ids() {
            if let Ok(s) = self.c.status(id) {
                if s.role == Role::Leader && best.is_none_or(|(t, _)| s.term > t) {
                    best = Some((s.term, id));
                }
            }
        }
        best.map(|(_, id)| id)
    }

    fn wait_leader(&self, within: Duration) -> Option<u64> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.leader() {
                return Some(l);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(ms(50));
        }
    }

    /// Every third client reaches the servers through the proxy (and only
    /// through it), so it can be cut off from the cluster.
    fn routed(idx: usize) -> bool {
        idx % 3 == 2
    }

    fn client_cfg(&mut self, idx: usize) -> ClientConfig {
        let mut ids = self.c.serving_ids();
        let n = ids.len();
        ids.rotate_left(idx % n);
        let who = if idx % 2 == 0 { "alice" } else { "bob" };
        let mut cfg = self.c.client_cfg(&ids, who);
        if Self::routed(idx) {
            cfg.endpoints = ids
                .iter()
                .map(|s| self.net.add_route(client_tag(idx), *s).to_string())
                .collect();
            cfg.learn_endpoints = false;
        }
        cfg.session_timeout = ms(self.t());
        cfg.request_timeout = self.request_timeout;
        cfg.probe_interval = Duration::ZERO;
        cfg
    }

    fn spawn_client(&mut self) {
        let idx = self.shared.facts().clients.len();
        let cfg = self.client_cfg(idx);
        let seed = self
            .opts
            .seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(idx as u64);
        let opts = LoopOpts {
            request_timeout: self.request_timeout,
            think_ms: 100,
            long_hold_p: 0.1,
            session_timeout: ms(self.t()),
        };
        // Reserve the index before the thread starts.
        self.shared
            .facts()
            .clients
            .push(workload::ClientFacts::default());
        match ClientProc::spawn(&self.shared, idx, cfg, seed, opts) {
            Ok(p) => self.procs.push(p),
            Err(e) => {
                let msg = format!("client {idx} could not start: {e}");
                self.violation(msg);
            }
        }
    }

    fn live_procs(&self) -> Vec<usize> {
        self.procs
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.killed && !p.is_closed())
            .map(|(i, _)| i)
            .collect()
    }

    fn proc_by_idx(&self, idx: usize) -> Option<usize> {
        self.procs
            .iter()
            .position(|p| p.idx == idx && !p.killed && !p.is_closed())
    }

    /// A live client: a holder (`holding`) or one waiting, else any.
    fn pick_client(&mut self, holding: bool) -> Option<usize> {
        let candidates: Vec<usize> = {
            let f = self.shared.facts();
            if holding {
                f.holders()
            } else {
                f.waiting.iter().copied().collect()
            }
        };
        let mut live: Vec<usize> = candidates
            .into_iter()
            .filter_map(|idx| self.proc_by_idx(idx))
            .collect();
        if live.is_empty() {
            live = self.live_procs();
        }
        live.choose(&mut self.rng).copied()
    }

    fn cont_all(&mut self) {
        for id in self.c.ids() {
            if self.c.node(id).is_stopped() {
                self.c.cont(id);
            }
        }
    }

    fn restart_dead(&mut self) {
        for id in self.c.ids() {
            if self.c.pid(id).is_none() {
                self.c.spawn(id);
            }
        }
    }

    /// Run one step.
    fn step(&mut self, n: usize, step: &Step) {
        let t = self.t();
        let fault = step.fault.clone();
        *self.faults.entry(fault.name()).or_default() += 1;
        let ids = self.c.ids();
        let leader = self.wait_leader(Duration::from_secs(5));
        let before: Vec<(usize, u64)> = if fault.cluster_wide_stall() {
            self.live_procs()
                .into_iter()
                .map(|i| (i, self.procs[i].client.session().new_sessions))
                .collect()
        } else {
            Vec::new()
        };
        let fault_start = self.shared.now();
        let desc = match &fault {
            Fault::KillNode {
                leader: want,
                down_ms,
            } => {
                let victim = if *want {
                    leader
                } else {
                    ids.choose(&mut self.rng).copied()
                };
                match victim {
                    Some(v) => {
                        self.c.kill9(v);
                        std::thread::sleep(ms(*down_ms));
                        self.c.spawn(v);
                        format!(
                            "SIGKILL node {v} (leader {leader:?}), restarted after {down_ms} ms"
                        )
                    }
                    None => "no leader to kill".into(),
                }
            }
            Fault::StopLeader { ms: d } => match leader {
                Some(l) => {
                    self.c.stop(l);
                    std::thread::sleep(ms(*d));
                    self.c.cont(l);
                    format!("SIGSTOP leader {l} for {d} ms")
                }
                None => "no leader to stop".into(),
            },
            Fault::StopAll { ms: d } => {
                for id in &ids {
                    self.c.stop(*id);
                }
                std::thread::sleep(ms(*d));
                self.cont_all();
                format!("SIGSTOP all servers for {d} ms")
            }
            Fault::StopMajority { with_leader, ms: d } => {
                let need = ids.len() / 2 + 1;
                let mut pool: Vec<u64> = ids
                    .iter()
                    .copied()
                    .filter(|id| Some(*id) != leader)
                    .collect();
                pool.shuffle(&mut self.rng);
                let mut victims: Vec<u64> = Vec::new();
                if *with_leader {
                    if let Some(l) = leader {
                        victims.push(l);
                    }
                }
                victims.extend(pool.into_iter().take(need - victims.len()));
                for v in &victims {
                    self.c.stop(*v);
                }
                std::thread::sleep(ms(*d));
                self.cont_all();
                format!("SIGSTOP majority {victims:?} (leader {leader:?}) for {d} ms")
            }
            Fault::IsolateLeader { reset, ms: d } => match leader {
                Some(l) => {
                    let others: Vec<u64> = ids.iter().copied().filter(|i| *i != l).collect();
                    self.net.partition(&[vec![l], others]);
                    if *reset {
                        self.net.reset(l, None);
                    }
                    std::thread::sleep(ms(*d));
                    self.net.heal_all();
                    format!("leader {l} cut off from all (reset {reset}) for {d} ms")
                }
                None => "no leader to isolate".into(),
            },
            Fault::Split { ms: d } => {
                let mut all = ids.clone();
                all.shuffle(&mut self.rng);
                let minority = all.split_off(ids.len() / 2 + 1);
                self.net.partition(&[all.clone(), minority.clone()]);
                std::thread::sleep(ms(*d));
                self.net.heal_all();
                format!("split {all:?} | {minority:?} (leader {leader:?}) for {d} ms")
            }
            Fault::Bridge { ms: d } => {
                let mut all = ids.clone();
                all.shuffle(&mut self.rng);
                let bridge = all.pop().expect("nodes");
                let right = all.split_off(all.len() / 2);
                self.net.partition(&[all.clone(), right.clone()]);
                std::thread::sleep(ms(*d));
                self.net.heal_all();
                format!("bridge: {all:?} <-> {bridge} <-> {right:?} (leader {leader:?}) for {d} ms")
            }
            Fault::OneWayLeader { inbound, ms: d } => match leader {
                Some(l) => {
                    for o in ids.iter().filter(|i| **i != l) {
                        if *inbound {
                            self.net.cut(*o, l);
                        } else {
                            self.net.cut(l, *o);
                        }
                    }
                    std::thread::sleep(ms(*d));
                    self.net.heal_all();
                    let dir = if *inbound {
                        "receives nothing"
                    } else {
                        "sends nothing"
                    };
                    format!("leader {l} {dir} for {d} ms")
                }
                None => "no leader for a one-way cut".into(),
            },
            Fault::CutHolderServer { ms: d } => {
                let holder = self.pick_client(true);
                let server = holder.and_then(|i| self.procs[i].client.session().node_id);
                match (holder, server, leader) {
                    (Some(h), Some(s), Some(l)) => {
                        let idx = self.procs[h].idx;
                        if s == l {
                            let others: Vec<u64> =
                                ids.iter().copied().filter(|i| *i != l).collect();
                            self.net.partition(&[vec![l], others]);
                        } else {
                            self.net.cut_both(s, l);
                        }
                        std::thread::sleep(ms(*d));
                        self.net.heal_all();
                        format!("client {idx}'s server {s} cut off from leader {l} for {d} ms")
                    }
                    _ => "no holder/server/leader to cut".into(),
                }
            }
            Fault::PartitionAll { ms: d } => {
                let groups: Vec<Vec<u64>> = ids.iter().map(|i| vec![*i]).collect();
                self.net.partition(&groups);
                std::thread::sleep(ms(*d));
                self.net.heal_all();
                format!("every node alone for {d} ms")
            }
            Fault::Slow {
                delay_ms,
                jitter_ms,
                ms: d,
            } => {
                for a in &ids {
                    for b in &ids {
                        if a != b {
                            self.net.delay(*a, *b, *delay_ms, *jitter_ms);
                        }
                    }
                }
                std::thread::sleep(ms(*d));
                self.net.heal_all();
                format!("every link +{delay_ms}±{jitter_ms} ms for {d} ms")
            }
            Fault::ResetAll => {
                let mut n = 0;
                for id in &ids {
                    n += self.net.reset(*id, None);
                }
                format!("reset {n} peer connections")
            }
            Fault::KillClient { holding } => match self.pick_client(*holding) {
                Some(i) => {
                    let idx = self.procs[i].idx;
                    let shared = self.shared.clone();
                    self.procs[i].kill(&shared);
                    self.spawn_client();
                    format!("killed client {idx} (holding {holding}); started a new one")
                }
                None => "no client to kill".into(),
            },
            Fault::PauseClient { holding, ms: d } => match self.pick_client(*holding) {
                Some(i) => {
                    let idx = self.procs[i].idx;
                    self.procs[i].pause(&self.shared, ms(*d));
                    std::thread::sleep(ms(*d));
                    format!("paused client {idx} (holding {holding}) for {d} ms")
                }
                None => "no client to pause".into(),
            },
            Fault::CutClient { holding, ms: d } => {
                let mut routed: Vec<usize> = {
                    let f = self.shared.facts();
                    if *holding {
                        f.holders()
                    } else {
                        Vec::new()
                    }
                };
                routed.retain(|idx| Self::routed(*idx) && self.proc_by_idx(*idx).is_some());
                if routed.is_empty() {
                    routed = self
                        .live_procs()
                        .into_iter()
                        .map(|i| self.procs[i].idx)
                        .filter(|idx| Self::routed(*idx))
                        .collect();
                }
                match routed.choose(&mut self.rng).copied() {
                    Some(idx) => {
                        for s in &ids {
                            self.net.cut_both(client_tag(idx), *s);
                        }
                        std::thread::sleep(ms(*d));
                        self.net.heal_all();
                        format!(
                            "client {idx} (holding {holding}) cut off from every server for {d} ms"
                        )
                    }
                    None => "no routed client to cut off".into(),
                }
            }
            Fault::MassCancel { waiters, ms: d } => {
                let spec = *LOCKS.choose(&mut self.rng).expect("locks");
                let name = self.shared.lock_name(&spec);
                let live = self.live_procs();
                let (tx, rx) = tokio::sync::watch::channel(false);
                let mut handles = Vec::new();
                for k in 0..*waiters {
                    let p = &self.procs[live[k % live.len()]];
                    handles.push(p.handle.spawn(workload::cancelled_wait(
                        self.shared.clone(),
                        p.client.clone(),
                        p.idx,
                        spec,
                        name.clone(),
                        rx.clone(),
                    )));
                }
                std::thread::sleep(ms(*d));
                let _ = tx.send(true);
                // Their releases (of waits granted before the cancel) are
                // recorded by the tasks themselves.
                std::thread::sleep(ms(200));
                format!("{waiters} waits on {name} cancelled at once after {d} ms")
            }
            Fault::Membership => self.membership(leader),
        };
        self.restart_dead();
        self.note(format!("#{n} {}: {desc}", fault.name()));
        std::thread::sleep(ms(step.quiet_ms));
        if fault.cluster_wide_stall() {
            // Guarantee 3: no quorum committed anything, so no live
            // client's session may have expired.
            let now = self.shared.now();
            for (i, n0) in before {
                let p = &self.procs[i];
                if p.killed || p.is_closed() {
                    continue;
                }
                let impaired = self.shared.facts().clients[p.idx].impaired(fault_start, now);
                let n1 = p.client.session().new_sessions;
                if !impaired && n1 > n0 {
                    let idx = p.idx;
                    self.violation(format!(
                        "client {idx} lost its session across {} #{n} (guarantee 3: a stall or \
                         loss of quorum expires no live client): new sessions {n0} -> {n1}",
                        fault.name()
                    ));
                }
            }
        }
        let _ = t;
    }

    /// Remove a follower, wipe it, start it again: it joins as a new
    /// member (its address is in the others' `peers`).
    fn membership(&mut self, leader: Option<u64>) -> String {
        let Some(l) = leader else {
            return "no leader for a membership change".into();
        };
        let ids = self.c.ids();
        let followers: Vec<u64> = ids.iter().copied().filter(|i| *i != l).collect();
        let Some(&victim) = followers.choose(&mut self.rng) else {
            return "no follower".into();
        };
        let mut cfg = self.c.client_cfg(&[l], "alice");
        cfg.learn_endpoints = false;
        cfg.request_timeout = Duration::from_secs(10);
        let removed = self.rt.block_on(async move {
            let client = Client::connect(cfg).await?;
            let r = client.remove_server(victim).await;
            let _ = client.close().await;
            r
        });
        if let Err(e) = removed {
            return format!("removal of node {victim} refused: {e}");
        }
        let t0 = Instant::now();
        self.c.wipe_and_restart(victim);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self
                .c
                .node(victim)
                .log_since_start()
                .contains("member of the cluster")
            {
                return format!(
                    "removed node {victim}, wiped it, joined again in {:?}",
                    t0.elapsed()
                );
            }
            if let Some(st) = self.c.try_exited(victim) {
                let tail: String = self.c.node(victim).log_since_start();
                let last = tail.lines().last().unwrap_or("").to_string();
                self.violation(format!(
                    "node {victim} exited ({st}) while joining again after its removal: {last}"
                ));
                return format!("node {victim} failed to join again");
            }
            if Instant::now() >= deadline {
                self.violation(format!(
                    "node {victim} did not join again within 60 s after its removal"
                ));
                return format!("node {victim} did not join again");
            }
            std::thread::sleep(ms(100));
        }
    }
}

/// Run a chaos test; panics (with the seed, the schedule and a replay
/// command) on any violation. Returns what it measured.
pub fn run(opts: ChaosOpts) -> Summary {
    let started = Instant::now();
    let origin = Instant::now();
    let t = opts.session_ms;
    println!(
        "chaos: {} nodes, {} clients, {} s of faults, seed {}, session timeout {t} ms",
        opts.nodes, opts.clients, opts.secs, opts.seed
    );
    let shared = Shared::new(origin);
    let mut net = FaultNet::new(opts.seed);
    let mut c = TestCluster::prepare(
        ClusterOpts::voters(opts.nodes)
            .session_timeout_ms(t)
            // Snapshots are taken (and restored from at restarts), but the
            // log is never purged: it is the record read back afterwards.
            .snapshots(5_000, 1_000_000_000),
    );
    for id in c.ids() {
        let paddr = net.add_node(id);
        net.set_upstream(id, c.node(id).addr);
        c.set_peer_addr(id, &paddr.to_string());
        let client_addr = c.node(id).addr;
        c.set_extra_config(
            id,
            &format!(
                "peer_source_ip = \"{}\"\nadvertise_client = \"{client_addr}\"",
                proxy::source_ip(id)
            ),
        );
    }
    c.launch();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("harness runtime");
    let mut run = Run {
        procs: Vec::new(),
        shared,
        net,
        c,
        rt,
        rng: StdRng::seed_from_u64(opts.seed ^ 0x5eed),
        opts: opts.clone(),
        log: Vec::new(),
        violations: Vec::new(),
        faults: BTreeMap::new(),
        request_timeout: Duration::from_secs(6),
        started,
    };
    let steps = schedule(opts.seed, opts.secs, opts.nodes, t, opts.only.as_deref());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_phases(&mut run, &steps)
    }));
    match result {
        Ok(summary) => {
            if run.violations.is_empty() {
                println!("chaos: PASSED: {summary:#?}");
                return summary;
            }
            run.c.keep_dir = true;
            let report = failure_report(&run);
            panic!("{report}");
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            run.violations.push(format!("harness panic: {msg}"));
            run.c.keep_dir = true;
            let report = failure_report(&run);
            panic!("{report}");
        }
    }
}

fn failure_report(run: &Run) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "CHAOS FAILED: seed {} ({} nodes, {} clients, {} s)",
        run.opts.seed, run.opts.nodes, run.opts.clients, run.opts.secs
    );
    let _ = writeln!(s, "replay: {}", run.opts.replay_command());
    let _ = writeln!(s, "violations:");
    for v in &run.violations {
        let _ = writeln!(s, "  - {v}");
    }
    let _ = writeln!(s, "fault log:");
    for l in &run.log {
        let _ = writeln!(s, "  {l}");
    }
    s
}

fn run_phases(run: &mut Run, steps: &[Step]) -> Summary {
    let t = run.t();
    if run.wait_leader(Duration::from_secs(30)).is_none() {
        run.c.fail("no leader after start");
    }
    for _ in 0..run.opts.clients {
        run.spawn_client();
    }
    run.note(format!(
        "{} clients running on nodes {:?}; schedule of seed {}: {}",
        run.procs.len(),
        run.c.serving_ids(),
        run.opts.seed,
        steps
            .iter()
            .take(40)
            .map(|s| s.fault.name())
            .collect::<Vec<_>>()
            .join(" ")
    ));
    // Warm-up on purpose: the first fault falls on a loaded cluster (every
    // client has its session and is acquiring), not on an idle one.
    std::thread::sleep(Duration::from_secs(2));

    // ---- Faults.
    let fault_phase = Instant::now();
    for (n, step) in steps.iter().enumerate() {
        if fault_phase.elapsed() >= Duration::from_secs(run.opts.secs) {
            break;
        }
        let epoch = fault_phase.elapsed().as_secs() / EPOCH.as_secs();
        if run.shared.epoch.load(Ordering::SeqCst) < epoch {
            run.shared.epoch.store(epoch, Ordering::SeqCst);
            run.note(format!("epoch {epoch}: new lock names"));
        }
        run.step(n + 1, step);
    }
    // ---- Heal.
    run.net.heal_all();
    run.cont_all();
    run.restart_dead();
    for id in run.c.ids() {
        if let Some(st) = run.c.try_exited(id) {
            let msg = format!("node {id} exited on its own ({st})");
            run.violation(msg);
            run.c.spawn(id);
        }
    }
    run.note(format!(
        "healed after {:?} of faults; proxy: {} connections, {} resets, {} MB",
        fault_phase.elapsed(),
        run.net.stats().connections.load(Ordering::Relaxed),
        run.net.stats().resets.load(Ordering::Relaxed),
        run.net.stats().bytes.load(Ordering::Relaxed) / 1_000_000
    ));
    let Some(leader) = run.wait_leader(Duration::from_secs(60)) else {
        run.violation("no leader within 60 s after healing".into());
        return Summary::default();
    };
    // A paused client wakes by itself (pauses are at most 2 T).
    std::thread::sleep(ms(500));

    // ---- Liveness 1: every live client's operations end.
    run.shared.stop.store(true, Ordering::SeqCst);
    let stop_at = Instant::now();
    // A wait is at most 8 s, plus the request timeout, plus a reconnect.
    let bound = (Duration::from_secs(8) + run.request_timeout + ms(t)) * 3;
    loop {
        let pending: Vec<usize> = run
            .procs
            .iter()
            .filter(|p| !p.killed && !p.workload_done())
            .map(|p| p.idx)
            .collect();
        if pending.is_empty() {
            break;
        }
        if stop_at.elapsed() >= bound {
            run.violation(format!(
                "clients {pending:?} still had operations running {bound:?} after the heal"
            ));
            break;
        }
        std::thread::sleep(ms(100));
    }
    let ops_ended = stop_at.elapsed();
    // Background releases and cancels of the live clients finish.
    std::thread::sleep(ms(1000));

    // ---- Liveness 2: every lock is free within its bound (killed clients'
    // sessions and static TTLs expire; live clients released everything).
    let free_bound = ms(3 * (t + t / 3 + 1000 + 1000)).max(STATIC_TTL * 3);
    let free_start = Instant::now();
    let mut probe_cfg = run.c.client_cfg(&run.c.serving_ids(), "alice");
    probe_cfg.session_timeout = ms(t);
    let probe = run
        .rt
        .block_on(Client::connect(probe_cfg))
        .unwrap_or_else(|e| run.c.fail(&format!("probe client: {e}")));
    let mut still_held: Vec<(String, Vec<u64>)>;
    let names = run.shared.resources();
    loop {
        still_held = Vec::new();
        for (name, _) in &names {
            let q = run.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), probe.query(ZONE, name)).await
            });
            match q {
                Ok(Ok(st)) if st.holders.is_empty() => {}
                Ok(Ok(st)) => {
                    still_held.push((name.clone(), st.holders.iter().map(|h| h.token).collect()))
                }
                Ok(Err(_)) | Err(_) => still_held.push((name.clone(), vec![])),
            }
        }
        if still_held.is_empty() || free_start.elapsed() >= free_bound {
            break;
        }
        std::thread::sleep(ms(200));
    }
    let freed_in = free_start.elapsed();
    run.note(format!(
        "operations ended {ops_ended:?} after the stop; locks free after {freed_in:?} more \
         (bound {free_bound:?}); leader {leader}"
    ));
    // Every lock can be taken now (recorded like any client's operation).
    if still_held.is_empty() {
        for spec in LOCKS {
            let shared = run.shared.clone();
            let name = shared.lock_name(spec);
            let r = run.rt.block_on(probe_take(&shared, &probe, spec, &name));
            if let Err(e) = r {
                run.violation(format!("after the heal, {name} cannot be taken: {e}"));
            }
        }
    }
    let _ = run.rt.block_on(probe.close());

    // ---- Close the live clients.
    let shared = run.shared.clone();
    for p in &mut run.procs {
        p.close(&shared);
    }

    // ---- Convergence (live): every node lists the same, then applies the
    // same index.
    let ids = run.c.ids();
    let listings: Vec<(u64, String)> = ids
        .iter()
        .map(|id| {
            let out = run.c.cli_output(*id, &["locks"]);
            (*id, String::from_utf8_lossy(&out.stdout).into_owned())
        })
        .collect();
    for (name, _) in &names {
        let views: Vec<(u64, Option<Vec<u64>>)> = listings
            .iter()
            .map(|(id, l)| (*id, crate::common::cluster::tokens_in_listing(l, name)))
            .collect();
        if views.iter().any(|(_, v)| *v != views[0].1) {
            run.violation(format!("nodes list {name} differently: {views:?}"));
        }
    }
    let conv_start = Instant::now();
    let mut applied: Vec<(u64, Result<u64, String>)>;
    let mut stable_since: Option<(Instant, u64)> = None;
    loop {
        applied = ids
            .iter()
            .map(|id| (*id, run.c.status(*id).map(|s| s.applied_index)))
            .collect();
        let first = applied[0].1.clone();
        let equal = first.is_ok() && applied.iter().all(|(_, a)| *a == first);
        if equal {
            let idx = first.clone().unwrap_or(0);
            match stable_since {
                Some((since, i)) if i == idx => {
                    if since.elapsed() >= ms(1000) {
                        break;
                    }
                }
                _ => stable_since = Some((Instant::now(), idx)),
            }
        } else {
            stable_since = None;
        }
        if conv_start.elapsed() >= Duration::from_secs(30) {
            run.violation(format!(
                "applied indexes did not converge within 30 s: {applied:?}"
            ));
            break;
        }
        std::thread::sleep(ms(100));
    }
    run.note(format!("applied indexes converged: {applied:?}"));

    // ---- Post-mortem: stop the servers, read every log back.
    let end_ns = run.shared.now();
    let lifetimes: Lifetimes = ids
        .iter()
        .map(|id| {
            let spans = run
                .c
                .node(*id)
                .lifetimes
                .iter()
                .map(|(s, e)| (run.shared.ns(*s), e.map(|e| run.shared.ns(e))))
                .collect();
            (*id, spans)
        })
        .collect();
    for id in &ids {
        run.c.kill9(*id);
    }
    let limits = ServerConfig::load(&run.c.node(ids[0]).config)
        .expect("node config")
        .engine_limits();
    let mut replays: Vec<(u64, Replay)> = Vec::new();
    for id in &ids {
        match record::read_log(&run.c.node(*id).data_dir) {
            Ok(entries) => {
                let r = record::replay(&entries, limits.clone(), &lifetimes);
                replays.push((*id, r));
            }
            Err(e) => run.violation(format!("node {id}'s log: {e}")),
        }
    }
    if replays.is_empty() {
        return Summary::default();
    }
    let summary_line: Vec<String> = replays
        .iter()
        .map(|(id, r)| {
            format!(
                "node {id}: {} entries, last {}, log {:016x}, state {:016x}",
                r.entries, r.last_index, r.log_hash, r.state_hash
            )
        })
        .collect();
    run.note(format!("replayed logs: {}", summary_line.join("; ")));
    let (_, first) = &replays[0];
    if replays
        .iter()
        .any(|(_, r)| r.log_hash != first.log_hash || r.state_hash != first.state_hash)
    {
        // Tails may differ by entries committed while the nodes were
        // killed; the states must agree on the common prefix.
        let min_last = replays.iter().map(|(_, r)| r.last_index).min().unwrap_or(0);
        let mut prefix_states = Vec::new();
        for id in &ids {
            if let Ok(mut entries) = record::read_log(&run.c.node(*id).data_dir) {
                entries.retain(|e| e.log_id.index <= min_last);
                let r = record::replay(&entries, limits.clone(), &lifetimes);
                prefix_states.push((*id, r.log_hash, r.state_hash));
            }
        }
        if prefix_states
            .iter()
            .any(|(_, l, s)| (*l, *s) != (prefix_states[0].1, prefix_states[0].2))
        {
            run.violation(format!(
                "replicas diverged: up to index {min_last}, (node, log hash, state hash) = \
                 {prefix_states:?}"
            ));
        } else {
            run.note(format!(
                "logs differ only after index {min_last} (entries after the last status); \
                 identical before"
            ));
        }
    }
    // The record: the longest log.
    let (rec_node, mut replay) = replays
        .into_iter()
        .max_by_key(|(_, r)| r.last_index)
        .expect("a replay");
    let granted_at: BTreeMap<Token, Ns> = run
        .shared
        .facts()
        .granted
        .iter()
        .map(|(t, g)| (*t, g.at))
        .collect();
    replay.close_windows(&granted_at, end_ns);
    for a in replay.anomalies.iter().take(20) {
        run.note(format!("record anomaly (harness): {a}"));
    }
    if !replay.anomalies.is_empty() {
        let n = replay.anomalies.len();
        run.violation(format!(
            "the record of node {rec_node} could not be derived cleanly ({n} anomalies)"
        ));
    }

    let mut history: History = run.shared.rec.history();
    for ev in &replay.events {
        history.record(ev.clone());
    }

    // ---- Leaked grants: anything still held when the live clients had
    // stopped.
    for (name, tokens) in &still_held {
        for t in tokens {
            let who = describe_token(run, &replay, &history, *t);
            let msg = format!(
                "{name} still held by token {t} {freed_in:?} after every live client stopped \
                 (bound {free_bound:?}): {who}"
            );
            run.violation(msg);
        }
        if tokens.is_empty() {
            run.violation(format!("{name} could not be queried after the heal"));
        }
    }

    // ---- The history checker.
    let check_start = Instant::now();
    let options = CheckOptions {
        record_complete: true,
        states_max: 2_000_000,
    };
    match check(&history, &options) {
        Ok(report) => {
            run.note(format!(
                "checker ({:?}): {}",
                check_start.elapsed(),
                report.to_string().trim_end()
            ));
            for v in &report.violations {
                run.violations.push(format!("checker: {v}"));
            }
            for i in &report.inconclusive {
                run.violations.push(format!(
                    "checker inconclusive on {} ({} operations, concurrency {}): raise \
                     states_max or lower the load",
                    i.lock, i.ops, i.max_concurrency
                ));
            }
        }
        Err(e) => run.violation(format!("malformed history (harness bug): {e}")),
    }

    // ---- Fenced registers: no acknowledged increment lost.
    for (name, res) in run.shared.resources() {
        let st = res.reg.state();
        let acked = res.acked.load(Ordering::Relaxed);
        if let Err(v) = check_increments(&st, acked, 0) {
            run.violation(format!("register {name}: {v}"));
        }
    }

    // ---- Client side: a holder cut off knows first.
    let (tests, slack_min) = lease_checks(run, &replay, &history);

    let fenced = run.shared.facts().fenced.clone();
    let mut fenced_seen = std::collections::BTreeSet::new();
    for f in &fenced {
        if !f.guard_held || !fenced_seen.insert((f.client, f.token)) {
            continue;
        }
        let facts = run.shared.facts();
        let granted_at = facts.granted.get(&f.token).map_or(0, |g| g.at);
        let impaired = facts.clients[f.client].impaired(granted_at, f.at);
        drop(facts);
        if !impaired {
            run.violation(format!(
                "client {} was fenced on {} with token {} while its guard still held the lock \
                 and it was neither paused nor killed",
                f.client, f.lock, f.token
            ));
        }
    }

    let stats = &run.shared.stats;
    let summary = Summary {
        ops: history.ops().len(),
        grants: stats.grants.load(Ordering::Relaxed),
        increments: stats.increments.load(Ordering::Relaxed),
        fenced: stats.fenced.load(Ordering::Relaxed),
        lost_events: stats.lost.load(Ordering::Relaxed),
        faults: run.faults.clone(),
        record_events: replay.events.len(),
        log_entries: replay.entries,
        session_expiries: replay.session_expiries.len(),
        lease_tests: tests,
        lease_slack_min_ms: slack_min.map(|s| s as f64 / 1e6),
        duration: run.started.elapsed(),
    };
    run.note(format!(
        "{} ops ({} grants, {} refused, {} indeterminate), {} increments, {} fenced, {} lost \
         events, {} cancelled waits; record: {} events, {} session expiries, {} rebases; {} \
         lease tests; client runtimes starved {} times (longest {} ms)",
        summary.ops,
        summary.grants,
        stats.refused.load(Ordering::Relaxed),
        stats.indeterminate.load(Ordering::Relaxed),
        summary.increments,
        summary.fenced,
        summary.lost_events,
        stats.cancelled_waits.load(Ordering::Relaxed),
        summary.record_events,
        summary.session_expiries,
        replay.rebases,
        tests,
        stats.starved.load(Ordering::Relaxed),
        stats.starved_max_ms.load(Ordering::Relaxed),
    ));
    summary
}

/// Take and release `spec` once through `probe`, recorded.
async fn probe_take(
    shared: &Arc<Shared>,
    probe: &Client,
    spec: &workload::LockSpec,
    name: &str,
) -> Result<(), String> {
    use oclocks_check::{Call, LockKey, Outcome, Ret};
    let lock = LockKey::new(ZONE, name);
    let id = shared.rec.invoke_at(
        shared.now(),
        Call::Acquire {
            client: probe.client_id(),
            lock: lock.clone(),
            mode: Mode::Exclusive,
            kind: spec.kind,
        },
    );
    let mut b = probe.lock(ZONE, name).wait(Duration::from_secs(5));
    if spec.kind == oclocks_core::Kind::Static {
        b = b.static_lock().ttl(STATIC_TTL);
    }
    let guard = match b.acquire().await {
        Ok(g) => g,
        Err(e) => {
            let _ = shared
                .rec
                .complete_at(id, shared.now(), Outcome::Indeterminate);
            return Err(e.to_string());
        }
    };
    let token = guard.token();
    let _ = shared
        .rec
        .complete_at(id, shared.now(), Outcome::Ok(Ret::Granted { token }));
    let rid = shared.rec.invoke_at(
        shared.now(),
        Call::Release {
            client: probe.client_id(),
            lock,
            token,
        },
    );
    let out = match guard.release().await {
        Ok(o) => Outcome::Ok(Ret::Released {
            already_released: o.already_released,
        }),
        Err(_) => Outcome::Indeterminate,
    };
    let _ = shared.rec.complete_at(rid, shared.now(), out);
    Ok(())
}

/// The operations that name `token`, and the acquire `op` that got it.
fn token_ops(history: &History, token: Token, op: oclocks_check::OpId) -> String {
    use oclocks_check::Call;
    history
        .ops()
        .iter()
        .filter(|o| {
            o.id == op
                || matches!(&o.call, Call::Release { token: t, .. } | Call::Refresh { token: t, .. } if *t == token)
        })
        .map(|o| format!("[{o}]"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Who held `token`, by the record and the clients' facts; for a grant
/// its client never heard of, that client's acquires of the lock around
/// the grant.
fn describe_token(run: &Run, replay: &Replay, history: &History, token: Token) -> String {
    use oclocks_check::Call;
    let Some(g) = replay.grants.get(&token) else {
        return "not in the record".into();
    };
    let facts = run.shared.facts();
    let mut acquires = String::new();
    if !facts.granted.contains_key(&token) {
        let ev = replay
            .events
            .iter()
            .find(|e| e.seq == g.seq)
            .map_or((0, u64::MAX), |e| e.window);
        for op in history.ops() {
            let Call::Acquire { client, lock, .. } = &op.call else {
                continue;
            };
            if *client != g.client || *lock != g.lock || op.invoke > ev.1 {
                continue;
            }
            if op.complete.is_some_and(|c| c + 30_000_000_000 < ev.0) {
                continue;
            }
            let err = facts
                .acquire_errors
                .get(&op.id)
                .map_or(String::new(), |e| format!(" ({e})"));
            let _ = write!(acquires, "; its acquire {op}{err}");
        }
        let _ = write!(
            acquires,
            "; the grant's commit window [{:.3}s, {:.3}s]",
            ev.0 as f64 / 1e9,
            ev.1 as f64 / 1e9
        );
    }
    let idx = facts.clients.iter().position(|c| c.client_id == g.client);
    let told = facts.granted.get(&token);
    let state = match idx.map(|i| &facts.clients[i]) {
        Some(c) if c.killed.is_some() => "killed",
        Some(_) => "live",
        None => "unknown",
    };
    format!(
        "granted at log index {} to client {idx:?} ({state}, nonce {}), {}",
        g.index,
        g.nonce,
        match told {
            Some(_) => "which was told of the grant".to_string(),
            None => format!("which was never told of it (a leaked grant){acquires}"),
        }
    )
}

/// The client-side property: when the record ends a grant involuntarily
/// and then grants the lock to another client, the first holder's guard
/// reported the lock lost before the second client heard of its grant —
/// unless the holder was paused or killed meanwhile, or had already begun
/// to release. Returns how many cases were tested and the smallest slack.
fn lease_checks(run: &mut Run, replay: &Replay, history: &History) -> (usize, Option<u64>) {
    let facts = run.shared.facts();
    let by_id: BTreeMap<u128, usize> = facts
        .clients
        .iter()
        .enumerate()
        .map(|(i, c)| (c.client_id, i))
        .collect();
    let mut grants_by_lock: BTreeMap<&str, Vec<(u64, Token)>> = BTreeMap::new();
    for (t, g) in &replay.grants {
        grants_by_lock
            .entry(g.lock.name.as_str())
            .or_default()
            .push((g.seq, *t));
    }
    for v in grants_by_lock.values_mut() {
        v.sort_unstable();
    }
    let mut tested = 0;
    let mut slack_min: Option<u64> = None;
    let mut out = Vec::new();
    for (token, end) in &replay.ends {
        let EndReason::Lost(reason) = end.reason else {
            continue;
        };
        if reason == LossReason::Broken {
            continue;
        }
        let Some(g) = replay.grants.get(token) else {
            continue;
        };
        let Some(told) = facts.granted.get(token) else {
            continue;
        };
        let Some(&a) = by_id.get(&g.client) else {
            continue;
        };
        let next = grants_by_lock[g.lock.name.as_str()]
            .iter()
            .filter(|(seq, _)| *seq > end.seq)
            .map(|(_, t)| (*t, &replay.grants[t]))
            .find(|(_, g2)| g2.client != g.client && g2.mode.conflicts_with(g.mode));
        let Some((t2, _)) = next else {
            continue;
        };
        let Some(b) = facts.granted.get(&t2) else {
            continue;
        };
        let c_b = b.at;
        if facts.clients[a].impaired(told.at, c_b) {
            continue;
        }
        let released = facts.release_invoked.get(token).copied();
        match facts.lost.get(token) {
            Some((l, _)) if *l <= c_b => {
                tested += 1;
                let slack = c_b - l;
                slack_min = Some(slack_min.map_or(slack, |s: u64| s.min(slack)));
            }
            // It had stopped using the lock (began to release) before.
            _ if released.is_some_and(|r| r <= c_b) => {}
            other => {
                let ops = token_ops(history, *token, told.op);
                let ev = replay
                    .events
                    .iter()
                    .find(|e| e.seq == end.seq)
                    .map_or((0, 0), |e| e.window);
                out.push(format!(
                    "client {a} held {} token {token} ({:?} mode); the record ended it \
                     ({reason:?}, log index {}, window [{:.3}s, {:.3}s]) and granted token {t2} \
                     to client {}, told at {:.3}s, but the holder's guard reported {} \
                     (guarantee 4: the client side knows first); the holder's operations on \
                     it: {ops}",
                    g.lock.name,
                    g.mode,
                    end.index,
                    ev.0 as f64 / 1e9,
                    ev.1 as f64 / 1e9,
                    b.client,
                    c_b as f64 / 1e9,
                    match other {
                        Some((l, r)) => format!("{r:?} only at {:.3}s", *l as f64 / 1e9),
                        None => "nothing".into(),
                    }
                ))
            }
        }
    }
    drop(facts);
    for v in out {
        run.violation(v);
    }
    let _ = Mode::Exclusive;
    (tested, slack_min)
}
