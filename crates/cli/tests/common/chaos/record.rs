//! The cluster's own record, read after the run: every node's Raft log
//! (its log store, opened once the node is stopped) is replayed through a
//! fresh lock engine — exactly what each replica's state machine did — and
//! the replay yields:
//!
//! - the **record** for the history checker: every grant (token, lock,
//!   client, mode, kind) and every end (released, session expired, TTL,
//!   broken), in log order, with the first apply's order inside an entry;
//! - per node, the hash of the engine's snapshot bytes after the last entry
//!   and the hash of the log itself: replicas converged iff these agree.
//!
//! Time windows. A record event happened between the moment its command was
//! stamped and the moment its entry committed. The stamp is the leader's
//! `now_ms`: milliseconds since *that process* started, so it maps onto
//! the test's clock through the spawn instant of the leader's process
//! (log id → term → leader node → the earliest of its processes that could
//! have stamped it — an earlier one only loosens the bound): `spawn +
//! now_ms` is never after the true stamp. Committed entries' stamps are in
//! log order (a leader stamps only once elected, after every entry of
//! earlier terms existed), so the bound is carried forward as a running
//! maximum. The upper bound — commit — is no later than the completion of
//! any client's grant from the same or a later entry (its reply came after
//! that entry was applied), else the end of the run; the harness fills it
//! in ([`Replay::close_windows`]).

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::ops::Bound;
use std::path::Path;

use oclocks_check::{LockKey, RecordEvent, RecordKind};
use oclocks_core::{
    ClientId, Command, Effect, EndReason, Engine, EngineLimits, Kind, LossReason, Mode, Nonce, Op,
    Reply, Token,
};
use oclocks_server::raft::{Entry, LogStore};
use openraft::EntryPayload;

/// Nanoseconds on the harness clock.
pub type Ns = u64;

/// The processes each node ran: (spawned, ended) on the harness clock.
pub type Lifetimes = BTreeMap<u64, Vec<(Ns, Option<Ns>)>>;

/// A node's log, read from its data directory (the node must not run).
pub fn read_log(data_dir: &Path) -> Result<Vec<Entry>, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let store = LogStore::open(data_dir).map_err(|e| format!("open log: {e}"))?;
        let (purged, _last) = store
            .load_log_state()
            .await
            .map_err(|e| format!("log state: {e}"))?;
        if let Some(p) = purged {
            return Err(format!(
                "the log was purged up to {p:?}: the record is incomplete"
            ));
        }
        store
            .load_entries((Bound::Unbounded, Bound::Unbounded))
            .await
            .map_err(|e| format!("load entries: {e}"))
    })
}

/// Hash of a log's entries (log id and payload, in order).
pub fn log_hash(entries: &[Entry]) -> u64 {
    let mut h = DefaultHasher::new();
    for e in entries {
        e.log_id.leader_id.term.hash(&mut h);
        e.log_id.leader_id.node_id.hash(&mut h);
        e.log_id.index.hash(&mut h);
        format!("{:?}", e.payload).hash(&mut h);
    }
    h.finish()
}

/// One grant, as the record has it.
#[derive(Clone, Debug)]
pub struct GrantInfo {
    pub lock: LockKey,
    pub client: ClientId,
    pub mode: Mode,
    pub kind: Kind,
    pub nonce: Nonce,
    pub index: u64,
    pub seq: u64,
}

/// One end, as the record has it.
#[derive(Clone, Debug)]
pub struct EndInfo {
    pub reason: EndReason,
    pub index: u64,
    pub seq: u64,
    /// Lower bound of the stamp (harness clock).
    pub lb: Ns,
}

/// The replay of one log.
#[derive(Default)]
pub struct Replay {
    pub entries: u64,
    pub commands: u64,
    pub last_index: u64,
    /// Hash of the engine's snapshot after the last entry.
    pub state_hash: u64,
    pub log_hash: u64,
    /// Record events, in log order; windows are `(lb, u64::MAX)` until
    /// [`Replay::close_windows`].
    pub events: Vec<RecordEvent>,
    /// Log index of each event.
    pub event_index: Vec<u64>,
    pub grants: BTreeMap<Token, GrantInfo>,
    pub ends: BTreeMap<Token, EndInfo>,
    /// Terms and their leaders.
    pub term_leader: BTreeMap<u64, u64>,
    /// Session expiries: (client, log index, stamp lower bound).
    pub session_expiries: Vec<(ClientId, u64, Ns)>,
    pub rebases: u64,
    pub ticks: u64,
    /// Things the replay could not explain (a harness problem, not a
    /// verdict on the cluster).
    pub anomalies: Vec<String>,
}

impl Replay {
    /// Fill in the windows' upper bounds: no later than `end`, and no later
    /// than the earliest completion of a client's grant from the same or a
    /// later entry (`granted_at`: token → completion).
    pub fn close_windows(&mut self, granted_at: &BTreeMap<Token, Ns>, end: Ns) {
        let mut by_index: BTreeMap<u64, Ns> = BTreeMap::new();
        for (token, at) in granted_at {
            if let Some(g) = self.grants.get(token) {
                let e = by_index.entry(g.index).or_insert(*at);
                *e = (*e).min(*at);
            }
        }
        // Suffix minimum over entry indexes.
        let mut suffix: Vec<(u64, Ns)> = Vec::new();
        let mut min = end;
        for (idx, at) in by_index.iter().rev() {
            min = min.min(*at);
            suffix.push((*idx, min));
        }
        suffix.reverse();
        for (ev, idx) in self.events.iter_mut().zip(&self.event_index) {
            let pos = suffix.partition_point(|(i, _)| i < idx);
            let ub = suffix.get(pos).map_or(end, |(_, m)| *m);
            if ub < ev.window.0 {
                self.anomalies.push(format!(
                    "record@{} (index {idx}): stamp bound {} after commit bound {ub}; widened",
                    ev.seq, ev.window.0
                ));
                ev.window.0 = ub;
            }
            ev.window.1 = ub;
        }
        for end_info in self.ends.values_mut() {
            end_info.lb = end_info.lb.min(end);
        }
    }
}

struct Mirror {
    lock: LockKey,
}

/// Replay `entries` through a fresh engine with `limits`.
pub fn replay(entries: &[Entry], limits: EngineLimits, lifetimes: &Lifetimes) -> Replay {
    let mut r = Replay {
        entries: entries.len() as u64,
        log_hash: log_hash(entries),
        ..Replay::default()
    };
    // Pass 1: per term, its leader and the largest stamp.
    let mut term_max: BTreeMap<u64, u64> = BTreeMap::new();
    for e in entries {
        let term = e.log_id.leader_id.term;
        r.term_leader.insert(term, e.log_id.leader_id.node_id);
        if let EntryPayload::Normal(p) = &e.payload {
            for c in &p.commands {
                let m = term_max.entry(term).or_insert(0);
                *m = (*m).max(c.now_ms);
            }
        }
    }
    // Per term: the earliest process of its leader that could have stamped
    // its largest stamp (spawned + stamp no later than its end).
    let mut term_origin: BTreeMap<u64, Ns> = BTreeMap::new();
    for (term, max_ms) in &term_max {
        let leader = r.term_leader[term];
        let spans = lifetimes.get(&leader).map(Vec::as_slice).unwrap_or(&[]);
        let max_ns = max_ms.saturating_mul(1_000_000);
        let origin = spans
            .iter()
            .find(|(s, e)| e.is_none_or(|e| s.saturating_add(max_ns) <= e))
            .map(|(s, _)| *s);
        match origin {
            Some(o) => {
                term_origin.insert(*term, o);
            }
            None => {
                r.anomalies.push(format!(
                    "term {term}: no process of leader {leader} lived {max_ms} ms; stamps unbounded"
                ));
                term_origin.insert(*term, 0);
            }
        }
    }

    let mut engine = Engine::new(limits);
    let mut lock_reqs: BTreeMap<(ClientId, Nonce), (LockKey, Mode, Kind)> = BTreeMap::new();
    let mut mirror: BTreeMap<Token, Mirror> = BTreeMap::new();
    let mut last_token: Token = 0;
    let mut running_lb: Ns = 0;
    let mut seq: u64 = 0;
    for e in entries {
        r.last_index = e.log_id.index;
        let EntryPayload::Normal(p) = &e.payload else {
            continue;
        };
        let origin = term_origin
            .get(&e.log_id.leader_id.term)
            .copied()
            .unwrap_or(0);
        for cmd in &p.commands {
            r.commands += 1;
            let lb = origin.saturating_add(cmd.now_ms.saturating_mul(1_000_000));
            running_lb = running_lb.max(lb);
            match cmd.op {
                Op::Rebase => r.rebases += 1,
                Op::Tick => r.ticks += 1,
                _ => {}
            }
            let applied = engine.apply(cmd.clone());
            derive(
                &mut r,
                &engine,
                cmd,
                &applied.reply,
                &applied.effects,
                e.log_id.index,
                running_lb,
                &mut lock_reqs,
                &mut mirror,
                &mut last_token,
                &mut seq,
            );
            last_token = last_token.max(engine.last_token());
        }
    }
    let mut h = DefaultHasher::new();
    engine.snapshot().hash(&mut h);
    r.state_hash = h.finish();
    r
}

#[allow(clippy::too_many_arguments)]
fn derive(
    r: &mut Replay,
    engine: &Engine,
    cmd: &Command,
    reply: &Reply,
    effects: &[Effect],
    index: u64,
    lb: Ns,
    lock_reqs: &mut BTreeMap<(ClientId, Nonce), (LockKey, Mode, Kind)>,
    mirror: &mut BTreeMap<Token, Mirror>,
    last_token: &mut Token,
    seq: &mut u64,
) {
    if let Op::Lock(l) = &cmd.op {
        lock_reqs
            .entry((l.caller.client, l.nonce))
            .or_insert_with(|| (LockKey::new(&l.zone, &l.name), l.mode, l.kind));
    }
    enum Ev {
        Lost(Token, LossReason, Option<ClientId>),
        Grant(Token, LockKey, ClientId, Mode, Kind, Nonce),
    }
    let mut evs: Vec<Ev> = Vec::new();
    for ef in effects {
        match ef {
            Effect::Lost {
                token,
                reason,
                client,
                ..
            } => evs.push(Ev::Lost(*token, *reason, *client)),
            Effect::Granted {
                client,
                nonce,
                token,
                ..
            } => match lock_reqs.get(&(*client, *nonce)).cloned() {
                Some((lock, mode, kind)) => {
                    evs.push(Ev::Grant(*token, lock, *client, mode, kind, *nonce))
                }
                None => r.anomalies.push(format!(
                    "index {index}: grant of token {token} to a LOCK never applied"
                )),
            },
            Effect::SessionExpired { client } => r.session_expiries.push((*client, index, lb)),
            _ => {}
        }
    }
    if let (Op::Lock(l), Reply::Granted { token }) = (&cmd.op, reply) {
        let seen = evs
            .iter()
            .any(|e| matches!(e, Ev::Grant(t, ..) if t == token));
        if *token > *last_token && !seen {
            evs.push(Ev::Grant(
                *token,
                LockKey::new(&l.zone, &l.name),
                l.caller.client,
                l.mode,
                l.kind,
                l.nonce,
            ));
        }
    }
    let lost: BTreeSet<Token> = evs
        .iter()
        .filter_map(|e| match e {
            Ev::Lost(t, ..) => Some(*t),
            Ev::Grant(..) => None,
        })
        .collect();
    let is_current = |lock: &LockKey, t: Token| engine.check_token(&lock.zone, &lock.name, t);
    // Voluntary ends (release, cancel give-back, close): grants current
    // before (or made in) this command, gone after it, not lost.
    let mut voluntary: BTreeSet<Token> = BTreeSet::new();
    for (t, m) in mirror.iter() {
        if !lost.contains(t) && !is_current(&m.lock, *t) {
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
        .filter(|t| mirror.contains_key(t))
        .collect();
    for t in early {
        end(r, mirror, index, lb, seq, t, EndReason::Released, None);
    }
    for e in evs {
        match e {
            Ev::Lost(t, reason, client) => end(
                r,
                mirror,
                index,
                lb,
                seq,
                t,
                EndReason::Lost(reason),
                client,
            ),
            Ev::Grant(t, lock, client, mode, kind, nonce) => {
                *seq += 1;
                r.grants.insert(
                    t,
                    GrantInfo {
                        lock: lock.clone(),
                        client,
                        mode,
                        kind,
                        nonce,
                        index,
                        seq: *seq,
                    },
                );
                r.events.push(RecordEvent {
                    seq: *seq,
                    lock: lock.clone(),
                    window: (lb, u64::MAX),
                    kind: RecordKind::Granted {
                        token: t,
                        client,
                        mode,
                        kind,
                    },
                });
                r.event_index.push(index);
                mirror.insert(t, Mirror { lock });
                *last_token = (*last_token).max(t);
                if voluntary.contains(&t) {
                    end(r, mirror, index, lb, seq, t, EndReason::Released, None);
                }
            }
        }
    }
    // Self-check: the mirror holds exactly the engine's current grants of
    // the locks it knows.
    for (t, m) in mirror.iter() {
        if !is_current(&m.lock, *t) {
            r.anomalies.push(format!(
                "index {index}: mirror holds {t}, the engine does not"
            ));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn end(
    r: &mut Replay,
    mirror: &mut BTreeMap<Token, Mirror>,
    index: u64,
    lb: Ns,
    seq: &mut u64,
    token: Token,
    reason: EndReason,
    client: Option<ClientId>,
) {
    let Some(m) = mirror.remove(&token) else {
        r.anomalies.push(format!(
            "index {index}: end of token {token} ({reason:?}) that is not current"
        ));
        return;
    };
    *seq += 1;
    let client = client.or_else(|| r.grants.get(&token).map(|g| g.client));
    r.ends.insert(
        token,
        EndInfo {
            reason,
            index,
            seq: *seq,
            lb,
        },
    );
    r.events.push(RecordEvent {
        seq: *seq,
        lock: m.lock,
        window: (lb, u64::MAX),
        kind: RecordKind::Ended {
            token,
            client,
            reason,
        },
    });
    r.event_index.push(index);
}
