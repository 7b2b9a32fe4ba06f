//! The engine's interface: the commands it applies, the replies it gives the
//! proposer, the effects it returns for others, and the refusals.
//!
//! Everything here is plain data. Instants (`now_ms`) appear only in commands
//! (stamped by the leader); replies and effects carry durations, never a
//! leader-clock instant, so no client ever compares clocks.

use std::borrow::Cow;
use std::sync::Arc;

use oclocks_proto::{ErrorCode, Kind, Mode};
use serde::{Deserialize, Serialize};

/// A client's 128-bit id, made once by the client; it names its session.
pub type ClientId = u128;
/// A fencing token: cluster-wide, strictly increasing, never reused.
pub type Token = u64;
/// A per-session request sequence number.
pub type Nonce = u64;
/// An owner id, scoped by the session that uses it: the node of the
/// wait-for graph. One per acquire by default; reused for nested acquires.
pub type OwnerId = u64;
/// An Ed25519 public key (32 bytes).
pub type PublicKey = [u8; 32];

/// A `wait_ms` that means "wait until granted or cancelled".
pub const WAIT_FOREVER: u64 = u64::MAX;

/// One command of the replicated log, stamped by the leader that proposed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// The Raft term of the leader that proposed it.
    pub term: u64,
    /// The proposing leader's monotonic clock, in milliseconds. Only
    /// comparable with other commands of the same term.
    pub now_ms: u64,
    /// What to do.
    pub op: Op,
}

/// The caller of a session-bound operation: its session and the identity of
/// the connection it arrived on (the certificate subject).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub client: ClientId,
    pub identity: String,
}

/// Proof of key ownership. The server verified the signature against `key`
/// before proposing; the engine checks that `key` is the holder's key and
/// that `counter` is fresh.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyProof {
    pub key: PublicKey,
    /// Per-grant counter: strictly larger than any counter used on this grant.
    pub counter: u64,
}

/// A LOCK request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRequest {
    pub caller: Caller,
    pub zone: String,
    pub name: String,
    pub mode: Mode,
    pub kind: Kind,
    /// Time limit of the grant in ms; 0 = none.
    pub ttl_ms: u64,
    /// 0 = try once; [`WAIT_FOREVER`]; otherwise a bound in ms.
    pub wait_ms: u64,
    /// Unavailability after an involuntary loss, in ms; 0 = none.
    pub lock_delay_ms: u64,
    pub owner: OwnerId,
    pub nonce: Nonce,
    /// The client's lowest unanswered nonce: outcomes below it are forgotten.
    pub low_water: Nonce,
    /// Key ownership (required for static locks, optional for connection).
    pub key: Option<KeyProof>,
}

/// An operation of the lock table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Open a session, or resume it (same client id, same identity).
    OpenSession {
        caller: Caller,
        /// Requested timeout in ms; 0 = the configured default.
        timeout_ms: u64,
    },
    /// Keepalives of many sessions, batched by the leader.
    Keepalive {
        callers: Vec<Caller>,
    },
    /// End a session now, releasing its connection locks voluntarily.
    CloseSession {
        caller: Caller,
    },
    Lock(LockRequest),
    /// End the wait of the LOCK with this nonce, or give back its grant.
    Cancel {
        caller: Caller,
        nonce: Nonce,
    },
    Release {
        caller: Caller,
        zone: String,
        name: String,
        token: Token,
        key: Option<KeyProof>,
    },
    Refresh {
        caller: Caller,
        zone: String,
        name: String,
        token: Token,
        /// New TTL in ms from now; 0 = the grant's own TTL.
        ttl_ms: u64,
        key: Option<KeyProof>,
    },
    /// Administrative break: end every grant, or only `expected_token`.
    Break {
        zone: String,
        name: String,
        expected_token: Option<Token>,
    },
    Watch {
        caller: Caller,
        zone: String,
        name: String,
    },
    Unwatch {
        caller: Caller,
        zone: String,
        name: String,
    },
    /// Time passed: fire what is due (the command's `now_ms` carries it).
    Tick,
    /// Re-base all deadlines on the proposer's clock after a stall: sessions
    /// get a full timeout, everything else keeps its remaining time.
    Rebase,
}

/// Why a grant ended without its owner releasing it (the LOST reason of the
/// wire protocol).
pub use oclocks_proto::LostReason as LossReason;

/// How a grant ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EndReason {
    /// Its owner released it (RELEASE, CANCEL of a raced grant, CLOSE).
    Released,
    /// It was lost involuntarily.
    Lost(LossReason),
}

/// One holder of a lock, as replies describe it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderInfo {
    pub identity: Arc<str>,
    pub client: ClientId,
    pub owner: OwnerId,
    pub token: Token,
    pub mode: Mode,
    pub kind: Kind,
    /// How long it has held the lock, in ms of engine time.
    pub held_ms: u64,
    /// Time left before its TTL, in ms; `None` without a TTL.
    pub expires_in_ms: Option<u64>,
}

/// Why a request was refused. Each maps to one wire [`ErrorCode`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// Held by someone else (or by this owner itself); `None` while only a
    /// lock-delay or earlier waiters stand in the way.
    #[error("lock is held")]
    Locked { holder: Option<HolderInfo> },
    #[error("wait timed out")]
    Timeout { holder: Option<HolderInfo> },
    #[error("not the owner of this grant")]
    NotOwner,
    /// A key-owned grant's counter was not fresh: a replayed request.
    #[error("signature counter is not fresh (replay)")]
    Replay,
    #[error("grant was lost: {reason:?}")]
    Lost { reason: LossReason },
    #[error("grant is not remembered; treat it as possibly lost")]
    UnknownGrant,
    #[error("forbidden for this identity")]
    Forbidden,
    #[error("waiting would close a wait-for cycle")]
    Deadlock,
    /// `what` names the limit (`waiters_per_lock_max`, ...).
    #[error("limit reached: {what}")]
    Limit { what: Cow<'static, str> },
    #[error("invalid request: {what}")]
    Invalid { what: Cow<'static, str> },
    #[error("no such session")]
    NoSession,
    #[error("nonce below the session's low-water mark")]
    StaleNonce,
    #[error("wait cancelled")]
    Cancelled,
}

impl Refusal {
    /// The wire error code of this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            Refusal::Locked { .. } => ErrorCode::Locked,
            Refusal::Timeout { .. } => ErrorCode::Timeout,
            Refusal::NotOwner => ErrorCode::NotOwner,
            Refusal::Replay => ErrorCode::BadSignature,
            Refusal::Lost { .. } => ErrorCode::Lost,
            Refusal::UnknownGrant => ErrorCode::UnknownGrant,
            Refusal::Forbidden => ErrorCode::Forbidden,
            Refusal::Deadlock => ErrorCode::Deadlock,
            Refusal::Limit { .. } => ErrorCode::Limit,
            Refusal::Invalid { .. } => ErrorCode::Invalid,
            Refusal::NoSession => ErrorCode::NoSession,
            Refusal::StaleNonce => ErrorCode::StaleNonce,
            Refusal::Cancelled => ErrorCode::Cancelled,
        }
    }
}

/// A lock the session holds, as HELLO reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLock {
    pub zone: Arc<str>,
    pub name: Arc<str>,
    pub token: Token,
    pub mode: Mode,
    pub kind: Kind,
}

/// A wait the session has, as HELLO reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitInfo {
    pub zone: Arc<str>,
    pub name: Arc<str>,
    pub nonce: Nonce,
}

/// A grant of the session that ended without it being told.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostGrant {
    pub zone: Arc<str>,
    pub name: Arc<str>,
    pub token: Token,
    pub reason: LossReason,
}

/// The reply to the proposer of a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// OpenSession.
    Session {
        resumed: bool,
        timeout_ms: u64,
        held: Vec<HeldLock>,
        waits: Vec<WaitInfo>,
        /// Grants lost while the client was away (reported once).
        lost: Vec<LostGrant>,
    },
    /// Keepalive: one result per caller, in order.
    Keepalive(Vec<Result<(), Refusal>>),
    /// LOCK granted (now, or a retry of a granted LOCK).
    Granted { token: Token },
    /// LOCK queued; `position` 0 is the head of the queue.
    Queued { position: usize },
    /// RELEASE done; `already_released` for a retry of a done release.
    Released { already_released: bool },
    /// REFRESH done; the grant's TTL left, in ms (`None`: no TTL).
    Refreshed { expires_in_ms: Option<u64> },
    /// CANCEL done; `gave_back` the token of a grant that raced it.
    Cancelled { gave_back: Option<Token> },
    /// BREAK done: the tokens of the grants it ended.
    Broken { tokens: Vec<Token> },
    /// Any other success (close, watch, unwatch, tick, rebase).
    Done,
    /// Refused; nothing changed beyond what the refusal says.
    Refused(Refusal),
}

/// Something the command caused for others, to deliver to the sessions'
/// connections. Returned from `apply`, never sent by the engine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Effect {
    /// A queued LOCK was granted.
    Granted {
        client: ClientId,
        nonce: Nonce,
        zone: Arc<str>,
        name: Arc<str>,
        token: Token,
    },
    /// A queued LOCK ended without a grant (timeout, deadlock).
    WaitEnded {
        client: ClientId,
        nonce: Nonce,
        zone: Arc<str>,
        name: Arc<str>,
        refusal: Refusal,
    },
    /// A grant was lost involuntarily. `client` is the session it belonged
    /// to, if that session still exists.
    Lost {
        client: Option<ClientId>,
        zone: Arc<str>,
        name: Arc<str>,
        token: Token,
        reason: LossReason,
    },
    /// A session expired (its connection locks are gone, its waits dropped).
    SessionExpired { client: ClientId },
    /// A watched lock's holders changed.
    Watch {
        client: ClientId,
        zone: Arc<str>,
        name: Arc<str>,
        holders: Vec<HolderInfo>,
    },
}

/// The result of applying one command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub reply: Reply,
    pub effects: Vec<Effect>,
}

/// A lock as QUERY and LIST describe it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub zone: Arc<str>,
    pub name: Arc<str>,
    pub holders: Vec<HolderInfo>,
    pub waiters: usize,
    /// Time left of a lock-delay, in ms (0 = none).
    pub delay_ms: u64,
}

/// Per-zone counts.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ZoneCounts {
    pub locks: usize,
    pub holders: usize,
    pub waiters: usize,
}

/// Where a LOCK stands ([`crate::Engine::lock_outcome`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockOutcome {
    /// Queued, not granted yet.
    Waiting,
    /// Granted with this token (it may have ended since).
    Granted(Token),
    /// Refused, cancelled, timed out, or its session ended.
    Refused(Refusal),
}
