//! The OpenCluster-Locks lock engine: a pure, deterministic lock table.
//!
//! The principal type is [`Engine`]: the state machine every replica applies
//! in log order. It holds zones, locks (exclusive or shared, connection or
//! static), their FIFO queues of waiters, sessions, fencing tokens, ended
//! grants and watches. [`Engine::apply`] takes a [`Command`] — an [`Op`]
//! stamped with the proposing leader's term and monotonic clock — and
//! returns an [`Applied`]: the [`Reply`] for the proposer and the
//! [`Effect`]s for other sessions (grants to waiters, lost locks, watch
//! events).
//!
//! What this crate deliberately does not have: a clock, randomness, I/O,
//! logging or any knowledge of Raft. Time arrives in commands; outputs leave
//! as values. See ARCHITECTURE.md, "The lock engine", for the semantics and
//! the invariants [`Engine::check_invariants`] verifies.

mod engine;
mod limits;
mod types;

pub use engine::{Engine, SnapshotError};
pub use limits::EngineLimits;
pub use oclocks_proto::{Kind, Mode};
pub use types::*;
