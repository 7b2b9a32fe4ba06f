//! What a check found: violations with the operations involved, and the
//! cost of the search.

use std::fmt;

use oclocks_core::Token;
use serde::{Deserialize, Serialize};

use crate::history::{LockKey, OpId};

/// An operation or record event that a violation involves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Involved {
    Op(OpId),
    /// A record event, by its `seq`.
    Record(u64),
}

impl fmt::Display for Involved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Involved::Op(id) => write!(f, "{id}"),
            Involved::Record(seq) => write!(f, "record@{seq}"),
        }
    }
}

/// Why a lock's sub-history is not linearizable, at the deepest point the
/// search reached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counterexample {
    pub lock: LockKey,
    /// The operation that completed before it could take effect in any
    /// order of the operations concurrent with it, and why.
    pub stuck: String,
    /// How many operations were placed before it.
    pub linearized_count: usize,
    /// The last of them, in order.
    pub linearized_tail: Vec<String>,
    /// The model's holders at that point.
    pub holders: Vec<String>,
    /// The largest token granted at that point.
    pub max_token: Token,
    /// The operations pending there, each with why it could not go next.
    pub candidates: Vec<String>,
    /// Every operation and record event named above.
    pub involved: Vec<Involved>,
}

impl fmt::Display for Counterexample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "lock {} is not linearizable; after {} operations took effect in order (last {} shown):",
            self.lock,
            self.linearized_count,
            self.linearized_tail.len()
        )?;
        for l in &self.linearized_tail {
            writeln!(f, "    {l}")?;
        }
        writeln!(
            f,
            "  the model then had {} holder(s) (largest token so far {}):",
            self.holders.len(),
            self.max_token
        )?;
        for h in &self.holders {
            writeln!(f, "    {h}")?;
        }
        writeln!(
            f,
            "  and this operation could not take effect before it completed:"
        )?;
        writeln!(f, "    {}", self.stuck)?;
        writeln!(f, "  pending operations at that point:")?;
        for c in &self.candidates {
            writeln!(f, "    {c}")?;
        }
        Ok(())
    }
}

/// A broken guarantee.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Violation {
    /// (a) No order of the operations agrees with the lock model.
    NotLinearizable(Box<Counterexample>),
    /// (b) Two grants carry the same token.
    TokenReused {
        token: Token,
        first: Involved,
        second: Involved,
    },
    /// (b) A later grant of a lock has a token not above an earlier one.
    TokensOutOfOrder {
        lock: LockKey,
        earlier: Involved,
        earlier_token: Token,
        later: Involved,
        later_token: Token,
    },
    /// (b) A client was told of a grant the cluster's record never made.
    GrantNotInRecord {
        op: OpId,
        lock: LockKey,
        token: Token,
    },
    /// (d) The record grants a lock while a conflicting grant is current.
    OverlappingGrants {
        lock: LockKey,
        held: Token,
        held_since: Involved,
        granted: Token,
        granted_at: Involved,
    },
    /// (d) The record contradicts itself (an end without a grant, a grant
    /// ended twice).
    RecordInconsistent {
        lock: LockKey,
        at: Involved,
        what: String,
    },
    /// (c) The fenced register lost acknowledged increments (or gained
    /// some nobody made).
    LostUpdate {
        value: u64,
        acknowledged: u64,
        indeterminate: u64,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::NotLinearizable(c) => write!(f, "{c}"),
            Violation::TokenReused {
                token,
                first,
                second,
            } => write!(f, "token {token} was granted twice: {first} and {second}"),
            Violation::TokensOutOfOrder {
                lock,
                earlier,
                earlier_token,
                later,
                later_token,
            } => write!(
                f,
                "lock {lock}: token {later_token} ({later}) was granted after token \
                 {earlier_token} ({earlier}) but is not larger"
            ),
            Violation::GrantNotInRecord { op, lock, token } => write!(
                f,
                "lock {lock}: {op} was told it holds token {token}, which the cluster's record never granted"
            ),
            Violation::OverlappingGrants {
                lock,
                held,
                held_since,
                granted,
                granted_at,
            } => write!(
                f,
                "lock {lock}: the record grants token {granted} ({granted_at}) while token \
                 {held} (granted {held_since}) is still current and conflicts"
            ),
            Violation::RecordInconsistent { lock, at, what } => {
                write!(f, "lock {lock}: record inconsistent at {at}: {what}")
            }
            Violation::LostUpdate {
                value,
                acknowledged,
                indeterminate,
            } => write!(
                f,
                "fenced register holds {value} after {acknowledged} acknowledged increments \
                 (and {indeterminate} indeterminate): updates were lost or invented"
            ),
        }
    }
}

/// A lock whose linearizability could not be decided within the budget.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inconclusive {
    pub lock: LockKey,
    pub ops: usize,
    pub max_concurrency: usize,
    pub states: u64,
}

/// Knobs of [`crate::check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckOptions {
    /// Configurations (applied set, model state) the search of one lock may
    /// memoise before it gives up as inconclusive. Each costs about
    /// (operations of the lock / 8 + 100) bytes: the default bounds a lock
    /// of 1,000 operations to about 120 MB.
    pub states_max: usize,
    /// The record holds every grant and every end of every grant (as a
    /// simulation's does). Then a client's grant missing from the record,
    /// and a record end without its grant, are violations.
    pub record_complete: bool,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            states_max: 500_000,
            record_complete: false,
        }
    }
}

/// The result of [`crate::check`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Locks checked.
    pub locks: usize,
    /// Client operations and record events in the history.
    pub ops: usize,
    pub record_events: usize,
    /// Configurations the linearizability search memoised, all locks.
    pub states: u64,
    /// The largest number of operations pending at once on one lock.
    pub max_concurrency: usize,
    pub violations: Vec<Violation>,
    pub inconclusive: Vec<Inconclusive>,
}

impl Report {
    /// No violation, and every lock decided.
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty() && self.inconclusive.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} locks, {} operations, {} record events, {} search states, concurrency ≤ {}: {}",
            self.locks,
            self.ops,
            self.record_events,
            self.states,
            self.max_concurrency,
            if self.is_ok() { "ok" } else { "FAILED" }
        )?;
        for v in &self.violations {
            writeln!(f, "violation: {v}")?;
        }
        for i in &self.inconclusive {
            writeln!(
                f,
                "inconclusive: lock {} ({} operations, concurrency {}) exceeded {} states",
                i.lock, i.ops, i.max_concurrency, i.states
            )?;
        }
        Ok(())
    }
}
