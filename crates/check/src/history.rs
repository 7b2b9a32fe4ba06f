//! What a test saw: client operations as invoke/complete pairs, and the
//! cluster's own record of how grants began and ended.
//!
//! A [`History`] is plain data, independent of how the events were produced
//! (a deterministic simulation, real processes over TCP, a file). Times are
//! caller-defined `u64`s on one monotonic clock — nanoseconds or
//! milliseconds, only their order matters. [`Recorder`] is the shared,
//! cheap-to-append front end for many tasks; [`History`] itself is the
//! single-threaded builder and the input of [`crate::check`].
//!
//! What it deliberately does not do: interpret outcomes. A timeout is
//! recorded as [`Outcome::Indeterminate`] — it may or may not have taken
//! effect — never as a failure.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use oclocks_core::{ClientId, EndReason, Kind, Mode, Token};
use serde::{Deserialize, Serialize};

/// An instant on the caller's monotonic clock (ns or ms; only order matters).
pub type Time = u64;

/// Names one client operation of a history (its index, in invocation order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OpId(pub u64);

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A lock's address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LockKey {
    pub zone: String,
    pub name: String,
}

impl LockKey {
    pub fn new(zone: impl Into<String>, name: impl Into<String>) -> LockKey {
        LockKey {
            zone: zone.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.zone, self.name)
    }
}

/// What a client asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Call {
    /// LOCK (one nonce: its retries are the same operation).
    Acquire {
        client: ClientId,
        lock: LockKey,
        mode: Mode,
        kind: Kind,
    },
    /// RELEASE of a grant, named by its token.
    Release {
        client: ClientId,
        lock: LockKey,
        token: Token,
    },
    /// REFRESH of a grant, named by its token.
    Refresh {
        client: ClientId,
        lock: LockKey,
        token: Token,
    },
    /// CANCEL of the LOCK that `acquire` recorded (by its nonce).
    Cancel { client: ClientId, acquire: OpId },
    /// CLOSE of the client's session: its connection locks are released.
    Close { client: ClientId },
}

impl Call {
    /// The client that made the call.
    pub fn client(&self) -> ClientId {
        match self {
            Call::Acquire { client, .. }
            | Call::Release { client, .. }
            | Call::Refresh { client, .. }
            | Call::Cancel { client, .. }
            | Call::Close { client } => *client,
        }
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Call::Acquire {
                client,
                lock,
                mode,
                kind,
            } => write!(
                f,
                "acquire {lock} {} {} by client {client:x}",
                mode_str(*mode),
                kind_str(*kind)
            ),
            Call::Release {
                client,
                lock,
                token,
            } => write!(f, "release {lock} token {token} by client {client:x}"),
            Call::Refresh {
                client,
                lock,
                token,
            } => write!(f, "refresh {lock} token {token} by client {client:x}"),
            Call::Cancel { client, acquire } => {
                write!(f, "cancel of {acquire} by client {client:x}")
            }
            Call::Close { client } => write!(f, "close session of client {client:x}"),
        }
    }
}

pub(crate) fn mode_str(m: Mode) -> &'static str {
    match m {
        Mode::Exclusive => "exclusive",
        Mode::Shared => "shared",
    }
}

pub(crate) fn kind_str(k: Kind) -> &'static str {
    match k {
        Kind::Connection => "connection",
        Kind::Static => "static",
    }
}

/// A successful result; which one fits which [`Call`] is checked by
/// [`History::validate`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ret {
    /// Acquire: granted with this fencing token.
    Granted { token: Token },
    /// Release: done now, or (a retry) done before.
    Released { already_released: bool },
    /// Refresh: the grant's TTL was renewed.
    Refreshed,
    /// Cancel: done; `gave_back` the token of a grant that raced the cancel.
    Cancelled { gave_back: Option<Token> },
    /// Close: the session is gone.
    Closed,
}

/// A definite failure: the cluster answered, and the operation did not take
/// effect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fail {
    /// Refused without effect (LOCKED, TIMEOUT, CANCELLED, DEADLOCK, LIMIT,
    /// NO_SESSION, NOT_OWNER, ...); the string is the error code, for reports.
    Refused(String),
    /// Release or refresh: the cluster says the token is not a current grant
    /// of the lock (LOST, UNKNOWN_GRANT). This is checked: the grant must
    /// have ended before.
    NotHeld(String),
}

/// How an operation ended, as far as the client knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Ok(Ret),
    Fail(Fail),
    /// No answer (timeout, lost connection): it may have taken effect at any
    /// point after its invocation, or never.
    Indeterminate,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ok(Ret::Granted { token }) => write!(f, "ok token {token}"),
            Outcome::Ok(Ret::Released { already_released }) => {
                if *already_released {
                    write!(f, "ok (already released)")
                } else {
                    write!(f, "ok released")
                }
            }
            Outcome::Ok(Ret::Refreshed) => write!(f, "ok refreshed"),
            Outcome::Ok(Ret::Cancelled { gave_back: Some(t) }) => {
                write!(f, "ok cancelled, gave back token {t}")
            }
            Outcome::Ok(Ret::Cancelled { gave_back: None }) => write!(f, "ok cancelled"),
            Outcome::Ok(Ret::Closed) => write!(f, "ok closed"),
            Outcome::Fail(Fail::Refused(code)) => write!(f, "fail {code}"),
            Outcome::Fail(Fail::NotHeld(code)) => write!(f, "fail {code} (not held)"),
            Outcome::Indeterminate => write!(f, "indeterminate"),
        }
    }
}

/// One client operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    pub id: OpId,
    pub call: Call,
    pub invoke: Time,
    /// When the outcome arrived; `None` while (or if forever) pending.
    pub complete: Option<Time>,
    /// `Indeterminate` until completed.
    pub outcome: Outcome,
}

impl Op {
    /// The instant after which the operation cannot take effect: its
    /// completion if it completed definitely; `None` (never) if it is
    /// indeterminate or pending.
    pub fn effect_deadline(&self) -> Option<Time> {
        match self.outcome {
            Outcome::Indeterminate => None,
            _ => self.complete,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} → {} [{}..",
            self.id, self.call, self.outcome, self.invoke
        )?;
        match self.complete {
            Some(c) => write!(f, "{c}]"),
            None => write!(f, "]"),
        }
    }
}

/// A fact from the cluster's committed record (not a client's claim).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordEvent {
    /// Position in the record: a total order of all record events (for a
    /// replicated log, the entry's index and the event's place within it).
    pub seq: u64,
    pub lock: LockKey,
    /// When it happened, in history time: no earlier than `window.0` and no
    /// later than `window.1` (for a log entry: proposed .. first applied).
    pub window: (Time, Time),
    pub kind: RecordKind,
}

/// What the record says happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordKind {
    /// A grant began.
    Granted {
        token: Token,
        client: ClientId,
        mode: Mode,
        kind: Kind,
    },
    /// A grant ended: released by its owner (release, cancel, close) or lost
    /// involuntarily (session expired, TTL passed, broken). `client` is the
    /// session it belonged to, if known.
    Ended {
        token: Token,
        client: Option<ClientId>,
        reason: EndReason,
    },
}

impl fmt::Display for RecordEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            RecordKind::Granted {
                token,
                client,
                mode,
                kind,
            } => write!(
                f,
                "record@{} {} granted token {token} {} {} to client {client:x}",
                self.seq,
                self.lock,
                mode_str(*mode),
                kind_str(*kind)
            ),
            RecordKind::Ended {
                token,
                client,
                reason,
            } => {
                write!(f, "record@{} {} token {token} ended: ", self.seq, self.lock)?;
                match reason {
                    EndReason::Released => write!(f, "released")?,
                    EndReason::Lost(r) => write!(f, "lost ({r:?})")?,
                }
                if let Some(c) = client {
                    write!(f, " (client {c:x})")?;
                }
                Ok(())
            }
        }?;
        write!(f, " [{}..{}]", self.window.0, self.window.1)
    }
}

/// A malformed history: the recording, not the system under test, is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    #[error("operation {0} does not exist")]
    UnknownOp(OpId),
    #[error("operation {0} completed twice")]
    CompletedTwice(OpId),
    #[error("operation {id} completes at {complete}, before its invocation at {invoke}")]
    CompletesBeforeInvoke {
        id: OpId,
        invoke: Time,
        complete: Time,
    },
    #[error("operation {id}: outcome '{outcome}' does not fit '{call}'")]
    OutcomeMismatch {
        id: OpId,
        call: String,
        outcome: String,
    },
    #[error("cancel {cancel} names {acquire}, which is not an acquire of the same client")]
    CancelTarget { cancel: OpId, acquire: OpId },
    #[error("record event {seq}: its window ends before it starts")]
    RecordWindow { seq: u64 },
    #[error("record event seq {seq} appears twice")]
    RecordSeq { seq: u64 },
}

/// A history under construction, or complete. Append with
/// [`History::invoke`], [`History::complete`] and [`History::record`];
/// check with [`crate::check`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    ops: Vec<Op>,
    record: Vec<RecordEvent>,
}

impl History {
    pub fn new() -> History {
        History::default()
    }

    /// Record the invocation of `call` at `at`; returns its id.
    pub fn invoke(&mut self, at: Time, call: Call) -> OpId {
        let id = OpId(self.ops.len() as u64);
        self.ops.push(Op {
            id,
            call,
            invoke: at,
            complete: None,
            outcome: Outcome::Indeterminate,
        });
        id
    }

    /// Record the outcome of `id` at `at`. Completing with
    /// [`Outcome::Indeterminate`] says "gave up waiting" and is the same as
    /// never completing.
    pub fn complete(&mut self, id: OpId, at: Time, outcome: Outcome) -> Result<(), HistoryError> {
        let op = usize::try_from(id.0)
            .ok()
            .and_then(|i| self.ops.get_mut(i))
            .ok_or(HistoryError::UnknownOp(id))?;
        if op.complete.is_some() {
            return Err(HistoryError::CompletedTwice(id));
        }
        if at < op.invoke {
            return Err(HistoryError::CompletesBeforeInvoke {
                id,
                invoke: op.invoke,
                complete: at,
            });
        }
        op.complete = Some(at);
        op.outcome = outcome;
        Ok(())
    }

    /// Append a fact from the cluster's record.
    pub fn record(&mut self, event: RecordEvent) {
        self.record.push(event);
    }

    /// Every client operation, in invocation-id order.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// One operation.
    pub fn op(&self, id: OpId) -> Option<&Op> {
        usize::try_from(id.0).ok().and_then(|i| self.ops.get(i))
    }

    /// The record, in the order it was appended.
    pub fn record_events(&self) -> &[RecordEvent] {
        &self.record
    }

    /// Check that the history is well formed: outcomes fit their calls,
    /// cancels name acquires of the same client, record windows and
    /// sequence numbers are sane.
    pub fn validate(&self) -> Result<(), HistoryError> {
        for op in &self.ops {
            let fits = matches!(
                (&op.call, &op.outcome),
                (_, Outcome::Indeterminate | Outcome::Fail(_))
                    | (Call::Acquire { .. }, Outcome::Ok(Ret::Granted { .. }))
                    | (Call::Release { .. }, Outcome::Ok(Ret::Released { .. }))
                    | (Call::Refresh { .. }, Outcome::Ok(Ret::Refreshed))
                    | (Call::Cancel { .. }, Outcome::Ok(Ret::Cancelled { .. }))
                    | (Call::Close { .. }, Outcome::Ok(Ret::Closed))
            );
            if !fits {
                return Err(HistoryError::OutcomeMismatch {
                    id: op.id,
                    call: op.call.to_string(),
                    outcome: op.outcome.to_string(),
                });
            }
            if let Call::Cancel { client, acquire } = &op.call {
                let ok = self.op(*acquire).is_some_and(
                    |a| matches!(&a.call, Call::Acquire { client: c, .. } if c == client),
                );
                if !ok {
                    return Err(HistoryError::CancelTarget {
                        cancel: op.id,
                        acquire: *acquire,
                    });
                }
            }
        }
        let mut seqs = std::collections::BTreeSet::new();
        for ev in &self.record {
            if ev.window.1 < ev.window.0 {
                return Err(HistoryError::RecordWindow { seq: ev.seq });
            }
            if !seqs.insert(ev.seq) {
                return Err(HistoryError::RecordSeq { seq: ev.seq });
            }
        }
        Ok(())
    }
}

/// A [`History`] shared by many tasks: clone it freely; every method takes
/// the lock briefly. Times come from the caller (`*_at`) or from this
/// recorder's monotonic clock ([`Recorder::now`], nanoseconds since
/// [`Recorder::new`]).
#[derive(Clone, Debug)]
pub struct Recorder {
    shared: Arc<Mutex<History>>,
    origin: Instant,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            shared: Arc::new(Mutex::new(History::new())),
            origin: Instant::now(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, History> {
        // A task that panicked while appending leaves a history that is
        // still well formed (each append is one push or one field write).
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Nanoseconds since this recorder was made (monotonic).
    pub fn now(&self) -> Time {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Record an invocation now.
    pub fn invoke(&self, call: Call) -> OpId {
        let at = self.now();
        self.invoke_at(at, call)
    }

    pub fn invoke_at(&self, at: Time, call: Call) -> OpId {
        self.lock().invoke(at, call)
    }

    /// Record an outcome now.
    pub fn complete(&self, id: OpId, outcome: Outcome) -> Result<(), HistoryError> {
        let at = self.now();
        self.complete_at(id, at, outcome)
    }

    pub fn complete_at(&self, id: OpId, at: Time, outcome: Outcome) -> Result<(), HistoryError> {
        self.lock().complete(id, at, outcome)
    }

    /// Append a fact from the cluster's record.
    pub fn record(&self, event: RecordEvent) {
        self.lock().record(event);
    }

    /// A copy of the history so far.
    pub fn history(&self) -> History {
        self.lock().clone()
    }
}
