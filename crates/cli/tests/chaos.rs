//! The chaos suite: real `oclocks server` processes, their peer traffic
//! through a fault proxy, many clients contending on a few locks, and a
//! seeded nemesis — node kills and restarts, SIGSTOP of the leader, of a
//! majority and of every server, partitions (leader isolated, majority |
//! minority, bridges, one-way, a holder's server cut off from the leader,
//! everyone alone), slow links, connection resets, clients killed or
//! paused while holding or waiting, many waits cancelled at once, and (5
//! nodes) a member removed, wiped and joining again. Then everything heals
//! and the run checks liveness, convergence, the history against the
//! cluster's own record, the fenced registers and the client-side lease
//! rule. See `docs/testing.md` ("Chaos suite") and
//! `tests/common/chaos.rs`.
//!
//! `OCLOCKS_CHAOS_SECS` (fault phase, per test), `OCLOCKS_CHAOS_SEED`,
//! `OCLOCKS_CHAOS_CLIENTS` and `OCLOCKS_CHAOS_FAULTS` (a comma-separated
//! list of fault kinds) change a run; a failure prints its replay command.

mod common;

#[path = "common/chaos.rs"]
mod chaos;

use chaos::{run, ChaosOpts};

#[test]
fn chaos_three_nodes() {
    let opts = ChaosOpts::from_env("chaos_three_nodes", 3, 16, 75);
    let s = run(opts);
    assert!(s.grants > 0, "no grants at all: {s:?}");
}

#[test]
fn chaos_five_nodes() {
    let opts = ChaosOpts::from_env("chaos_five_nodes", 5, 24, 75);
    let s = run(opts);
    assert!(s.grants > 0, "no grants at all: {s:?}");
}
