//! The simulated network: every message between replicas and between
//! clients and replicas goes through one queue ordered by delivery time
//! (ties by send order), with per-seed loss, delay and delay spikes, and
//! directed links that can be cut (partitions) and healed.
//!
//! Messages to a paused replica wait until it wakes (its socket buffers
//! hold them); messages to a crashed one are lost.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Arc;

use oclocks_core::{Caller, Command, Effect, LockOutcome, Nonce, Op, Refusal, Reply};

use crate::rng::Rng;

/// An endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Addr {
    Node(usize),
    Client(usize),
}

/// Who should hear about an entry once it is applied: which replica
/// answers which client request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tag {
    None,
    /// Replica `node` answers request `req` of `client` on connection `conn`.
    Reply {
        node: usize,
        client: usize,
        conn: u64,
        req: u64,
    },
    /// Replica `node` acknowledges a keepalive batch: (client, conn, req) per
    /// caller, in order.
    Keepalive {
        node: usize,
        reqs: Vec<(usize, u64, u64)>,
    },
}

/// One log entry: a stamped command plus simulation metadata (who to
/// answer, when it was stamped) that the engine never sees.
#[derive(Debug)]
pub struct Entry {
    pub term: u64,
    pub cmd: Command,
    pub tag: Tag,
    /// Simulated time at which the leader stamped it.
    pub stamped_at: u64,
}

/// A replica's snapshot: the engine's bytes at `index`.
#[derive(Clone, Debug)]
pub struct Snap {
    pub index: u64,
    pub term: u64,
    pub bytes: Arc<Vec<u8>>,
}

/// Everything that travels.
#[derive(Clone, Debug)]
pub enum Msg {
    // Raft.
    Append {
        term: u64,
        prev_index: u64,
        prev_term: u64,
        entries: Vec<Arc<Entry>>,
        commit: u64,
    },
    /// `ok`: `index` is the follower's match; otherwise the index the leader
    /// should try next.
    AppendReply {
        term: u64,
        ok: bool,
        index: u64,
    },
    Vote {
        term: u64,
        last_index: u64,
        last_term: u64,
    },
    VoteReply {
        term: u64,
        granted: bool,
    },
    InstallSnapshot {
        term: u64,
        snap: Snap,
    },
    // Client → replica.
    Request {
        conn: u64,
        req: u64,
        op: Op,
    },
    Keepalive {
        conn: u64,
        req: u64,
        caller: Caller,
    },
    // Replica → leader, and back.
    Forward {
        op: Op,
        tag: Tag,
    },
    ForwardFail {
        tag: Tag,
    },
    // Replica → client. `None`: unavailable (not proposed, or no leader).
    Reply {
        conn: u64,
        req: u64,
        reply: Option<Reply>,
    },
    KeepaliveAck {
        conn: u64,
        req: u64,
        result: Option<Result<(), Refusal>>,
    },
    Event {
        conn: u64,
        effect: Effect,
    },
    /// A wait settled from the engine's outcome memory after the replica
    /// installed a snapshot (and so skipped the entries with the effect).
    Settled {
        conn: u64,
        nonce: Nonce,
        outcome: LockOutcome,
    },
}

pub struct Envelope {
    pub from: Addr,
    pub to: Addr,
    pub msg: Msg,
}

struct Queued {
    at: u64,
    seq: u64,
    env: Envelope,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    // Reversed: BinaryHeap is a max-heap, we want the earliest first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// Per-seed network behaviour.
#[derive(Clone, Debug)]
pub struct NetConfig {
    pub drop_per_million: u64,
    pub delay_ms_min: u64,
    pub delay_ms_max: u64,
    pub spike_per_million: u64,
    pub spike_ms_max: u64,
}

pub struct Net {
    heap: BinaryHeap<Queued>,
    seq: u64,
    pub cfg: NetConfig,
    /// Cut directed links, with the time they heal.
    cut: BTreeMap<(Addr, Addr), u64>,
    pub sent: u64,
    pub dropped: u64,
}

impl Net {
    pub fn new(cfg: NetConfig) -> Net {
        Net {
            heap: BinaryHeap::new(),
            seq: 0,
            cfg,
            cut: BTreeMap::new(),
            sent: 0,
            dropped: 0,
        }
    }

    pub fn is_cut(&self, from: Addr, to: Addr) -> bool {
        self.cut.contains_key(&(from, to))
    }

    /// Cut `from → to` until `until`.
    pub fn cut(&mut self, from: Addr, to: Addr, until: u64) {
        let e = self.cut.entry((from, to)).or_insert(until);
        *e = (*e).max(until);
    }

    /// Heal the links whose time has come.
    pub fn heal(&mut self, now: u64) {
        self.cut.retain(|_, until| *until > now);
    }

    pub fn send(&mut self, rng: &mut Rng, now: u64, from: Addr, to: Addr, msg: Msg) {
        self.sent += 1;
        if self.is_cut(from, to) || rng.chance(self.cfg.drop_per_million) {
            self.dropped += 1;
            return;
        }
        let mut delay = rng.range(self.cfg.delay_ms_min, self.cfg.delay_ms_max);
        if rng.chance(self.cfg.spike_per_million) {
            delay += rng.range(1, self.cfg.spike_ms_max);
        }
        self.push(now + delay.max(1), Envelope { from, to, msg });
    }

    /// Queue for delivery at `at` exactly (a deferred delivery).
    pub fn push(&mut self, at: u64, env: Envelope) {
        self.seq += 1;
        self.heap.push(Queued {
            at,
            seq: self.seq,
            env,
        });
    }

    /// The next message due at or before `now`.
    pub fn pop_due(&mut self, now: u64) -> Option<Envelope> {
        if self.heap.peek().is_some_and(|q| q.at <= now) {
            self.heap.pop().map(|q| q.env)
        } else {
            None
        }
    }
}
