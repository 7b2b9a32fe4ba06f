//! Deterministic simulation of an OpenCluster-Locks cluster: N replicas,
//! each with its own lock engine (`oclocks-core`), a Raft-like log between
//! them, leaders that stamp commands with their own skewed and jumping
//! clocks, clients that keep leases, and faults — all derived from one
//! seed, single-threaded, in simulated time. [`run`] executes one seed and
//! either returns [`SimStats`] or a [`SimFailure`] that names the seed and
//! the command line that replays it.
//!
//! The fault model and the checks are described in `docs/testing.md`
//! ("Deterministic simulation"); the observer's checks in `observer.rs`,
//! the replica in `node.rs`, the client in `client.rs`.
//!
//! What it deliberately does not simulate: TLS, the wire protocol, disks
//! (an append is durable at once), openraft itself (the replica implements
//! Raft's rules directly), membership changes. The chaos suite with real
//! processes covers those.

mod client;
mod ctx;
mod net;
mod node;
mod observer;
pub mod rng;
mod world;

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Server heartbeat (crates/server default `raft.heartbeat_ms`).
pub const HEARTBEAT_MS: u64 = 100;
/// The time driver's beat: heartbeat / 4.
pub const BEAT_MS: u64 = HEARTBEAT_MS / 4;
/// A gap in the beat longer than this is a stall: two heartbeats.
pub const STALL_MS: u64 = 2 * HEARTBEAT_MS;
/// Election timeout range (crates/server defaults).
pub const ELECTION_MS_MIN: u64 = 500;
pub const ELECTION_MS_MAX: u64 = 1_000;
/// A leader stamps nothing after this long without quorum contact.
pub const QUORUM_BOUND_MS: u64 = ELECTION_MS_MIN;
/// Keepalives are batched per server for heartbeat / 4.
pub const KEEPALIVE_BATCH_MS: u64 = HEARTBEAT_MS / 4;
/// Entries per AppendEntries message.
pub const APPEND_ENTRIES_MAX: usize = 64;
/// A client gives up on an unanswered request after this long.
pub const REQUEST_TIMEOUT_MS: u64 = 1_000;
/// Simulated time per step: uniform in 1..=STEP_MS_MAX.
pub const STEP_MS_MAX: u64 = 20;

/// A deliberately planted bug, to show that the simulation catches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// The leader does not re-base after a stall (a long pause or a large
    /// forward clock jump): neither the beat nor the proposer notices it.
    SkipStallRebase,
    /// The time driver does not propose a `Rebase` as the first command of
    /// its term. (The engine itself re-bases on a new term, so this alone
    /// must *not* break anything.)
    SkipTermRebase,
    /// Followers apply entries as soon as they append them, before commit.
    ApplyBeforeCommit,
    /// The leader commits entries of earlier terms by counting replicas
    /// (Raft's figure 8).
    CommitOldTermByCount,
    /// Clients run their lease from the keepalive's acknowledgement instead
    /// of its send time, without a margin.
    LeaseFromReceipt,
    /// Clients believe a TTL until first send + TTL, without a margin (what
    /// `crates/client` does today).
    TtlWithoutMargin,
    /// A leader re-bases after a loss of quorum contact only if a proposal
    /// was refused during it (what `crates/server` does today), instead of
    /// whenever it regains contact.
    QuorumRebaseOnlyOnPropose,
}

impl Mutation {
    pub const ALL: [Mutation; 7] = [
        Mutation::SkipStallRebase,
        Mutation::SkipTermRebase,
        Mutation::ApplyBeforeCommit,
        Mutation::CommitOldTermByCount,
        Mutation::LeaseFromReceipt,
        Mutation::TtlWithoutMargin,
        Mutation::QuorumRebaseOnlyOnPropose,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mutation::SkipStallRebase => "skip-stall-rebase",
            Mutation::SkipTermRebase => "skip-term-rebase",
            Mutation::ApplyBeforeCommit => "apply-before-commit",
            Mutation::CommitOldTermByCount => "commit-old-term-by-count",
            Mutation::LeaseFromReceipt => "lease-from-receipt",
            Mutation::TtlWithoutMargin => "ttl-without-margin",
            Mutation::QuorumRebaseOnlyOnPropose => "quorum-rebase-only-on-propose",
        }
    }

    pub fn parse(s: &str) -> Option<Mutation> {
        Mutation::ALL.into_iter().find(|m| m.name() == s)
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub seed: u64,
    pub steps: u64,
    pub mutation: Option<Mutation>,
    /// Keep an event trace (for replaying a failure).
    pub trace: bool,
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct SimStats {
    pub seed: u64,
    pub nodes: usize,
    pub clients: usize,
    pub steps: u64,
    pub sim_ms: u64,
    /// Log entries committed (first applied).
    pub entries: u64,
    /// Entries applied, all replicas.
    pub applied: u64,
    pub messages: u64,
    pub elections: u64,
    pub crashes: u64,
    pub stalls: u64,
    pub partitions: u64,
    pub snapshots: u64,
    pub installs: u64,
    pub breaks_proposed: u64,
    pub ops: u64,
    pub indeterminate: u64,
    pub record_events: u64,
    pub grants: u64,
    pub expiries: u64,
    pub breaks: u64,
    pub increments: u64,
    /// Register accesses refused for a stale token.
    pub fenced_refusals: u64,
    pub check_states: u64,
    pub client_pauses: u64,
    /// Grants within 2 s after a conflicting holder's client stopped
    /// believing in its grant (lease or TTL ran out).
    pub lease_tests: u64,
    pub lease_slack_ms_min: Option<u64>,
    /// Client outcomes ("acquire ok", "release not held Lost", ...) and
    /// record events, counted.
    pub outcomes: std::collections::BTreeMap<String, u64>,
}

/// A failed run.
#[derive(Clone, Debug)]
pub struct SimFailure {
    pub seed: u64,
    pub steps: u64,
    pub mutation: Option<Mutation>,
    /// The step and simulated time at which it failed (`None`: panicked).
    pub at: Option<(u64, u64)>,
    pub message: String,
    /// The last events, when traced.
    pub trace: Vec<String>,
}

/// The command line that replays one seed.
pub fn replay_command(seed: u64, steps: u64, mutation: Option<Mutation>) -> String {
    let m = mutation.map_or(String::new(), |m| {
        format!("OCLOCKS_SIM_MUTATION={} ", m.name())
    });
    format!(
        "{m}OCLOCKS_SIM_SEED={seed:#x} OCLOCKS_SIM_STEPS={steps} \
         cargo test -p oclocks-sim --test sim -- sweep --exact --nocapture"
    )
}

impl fmt::Display for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "simulation failed: seed {:#x}", self.seed)?;
        if let Some(m) = self.mutation {
            write!(f, " (mutation {})", m.name())?;
        }
        match self.at {
            Some((step, ms)) => writeln!(f, " at step {step} ({ms} ms simulated):")?,
            None => writeln!(f, ":")?,
        }
        writeln!(f, "{}", self.message)?;
        if !self.trace.is_empty() {
            writeln!(f, "last {} events:", self.trace.len())?;
            for t in &self.trace {
                writeln!(f, "  {t}")?;
            }
        }
        write!(
            f,
            "replay: {}",
            replay_command(self.seed, self.steps, self.mutation)
        )
    }
}

/// How many trace lines a failure keeps.
const TRACE_SHOWN_MAX: usize = 400;

/// Run one seed for `opts.steps` steps (or until the first failure).
pub fn run(opts: &SimOptions) -> Result<SimStats, SimFailure> {
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut w = world::World::new(opts);
        for _ in 0..opts.steps {
            w.step();
            if w.ctx.failure.is_some() {
                break;
            }
        }
        w.finish();
        let trace = w.ctx.trace.take().unwrap_or_default();
        match w.ctx.failure.take() {
            None => Ok(w.stats),
            Some(message) => Err((Some((w.stats.steps, w.ctx.now)), message, trace)),
        }
    }));
    let fail = |at, message, mut trace: Vec<String>| {
        let keep = trace.len().saturating_sub(TRACE_SHOWN_MAX);
        trace.drain(..keep);
        SimFailure {
            seed: opts.seed,
            steps: opts.steps,
            mutation: opts.mutation,
            at,
            message,
            trace,
        }
    };
    match result {
        Ok(Ok(stats)) => Ok(stats),
        Ok(Err((at, message, trace))) => Err(fail(at, message, trace)),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".to_string());
            Err(fail(None, format!("panicked: {msg}"), Vec::new()))
        }
    }
}
