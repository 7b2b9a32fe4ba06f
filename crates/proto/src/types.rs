//! Small value types shared by the wire protocol, the lock engine, the server
//! and the client: lock modes and kinds, why a lock was lost, server roles,
//! the error code table, and the canonical bytes an owner key signs.
//!
//! This module owns no I/O and no cryptography: it only defines the bytes that
//! are signed (see [`signed_message`]); signing and verifying live with the
//! client and the server, which carry the Ed25519 implementation.

use serde::{Deserialize, Serialize};

/// How a lock is held: one exclusive holder, or many shared holders.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[repr(u8)]
pub enum Mode {
    /// One holder, no shared holders (a write lock). The default.
    Exclusive = 0,
    /// Many shared holders, no exclusive one (a read lock).
    Shared = 1,
}

impl Mode {
    /// Whether a holder or waiter in `self` mode conflicts with one in `other`.
    pub fn conflicts_with(self, other: Mode) -> bool {
        self == Mode::Exclusive || other == Mode::Exclusive
    }

    /// The wire value of this mode.
    pub fn to_u8(self) -> u8 {
        self as u8
    }

    /// The mode with this wire value, if any.
    pub fn from_u8(v: u8) -> Option<Mode> {
        match v {
            0 => Some(Mode::Exclusive),
            1 => Some(Mode::Shared),
            _ => None,
        }
    }
}

/// What a lock is tied to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[repr(u8)]
pub enum Kind {
    /// Released when its session expires. The default.
    Connection = 0,
    /// Survives its session; owned by an Ed25519 key; optional TTL.
    Static = 1,
}

impl Kind {
    /// The wire value of this kind.
    pub fn to_u8(self) -> u8 {
        self as u8
    }

    /// The kind with this wire value, if any.
    pub fn from_u8(v: u8) -> Option<Kind> {
        match v {
            0 => Some(Kind::Connection),
            1 => Some(Kind::Static),
            _ => None,
        }
    }
}

/// Why a holder lost a grant it did not release (the LOST event). The wire
/// values start at 1, so a zero byte never passes for a reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[repr(u8)]
pub enum LostReason {
    /// The holder's session expired (connection locks only).
    SessionExpired = 1,
    /// The grant's TTL passed.
    TtlExpired = 2,
    /// An operator broke the lock.
    Broken = 3,
}

impl LostReason {
    /// The wire value of this reason.
    pub fn to_u8(self) -> u8 {
        self as u8
    }

    /// The reason with this wire value, if any.
    pub fn from_u8(v: u8) -> Option<LostReason> {
        match v {
            1 => Some(LostReason::SessionExpired),
            2 => Some(LostReason::TtlExpired),
            3 => Some(LostReason::Broken),
            _ => None,
        }
    }
}

/// A server's role in its Raft group, as STATUS reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[repr(u8)]
pub enum Role {
    /// A voter following a leader.
    Follower = 0,
    /// A voter campaigning for leadership.
    Candidate = 1,
    /// The leader.
    Leader = 2,
    /// A non-voting member.
    Learner = 3,
    /// A voter that never campaigns to lead and serves no clients.
    QuorumOnly = 4,
}

impl Role {
    /// The wire value of this role.
    pub fn to_u8(self) -> u8 {
        self as u8
    }

    /// The role with this wire value, if any.
    pub fn from_u8(v: u8) -> Option<Role> {
        match v {
            0 => Some(Role::Follower),
            1 => Some(Role::Candidate),
            2 => Some(Role::Leader),
            3 => Some(Role::Learner),
            4 => Some(Role::QuorumOnly),
            _ => None,
        }
    }
}

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $name:ident = $value:expr ),* $(,)?) => {
        /// The numeric error codes of ERROR replies. The table in PROTOCOL.md
        /// is checked against this enum by a test.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[repr(u16)]
        pub enum ErrorCode {
            $( $(#[$doc])* $name = $value, )*
        }

        impl ErrorCode {
            /// Every error code, in table order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name),*];

            /// The wire value.
            pub fn to_u16(self) -> u16 {
                self as u16
            }

            /// The code with this wire value, if known.
            pub fn from_u16(v: u16) -> Option<ErrorCode> {
                match v {
                    $( $value => Some(ErrorCode::$name), )*
                    _ => None,
                }
            }

            /// The name used in PROTOCOL.md and in messages (`LOCKED`, ...).
            pub fn name(self) -> &'static str {
                match self {
                    $( ErrorCode::$name => error_codes!(@upper $name), )*
                }
            }
        }
    };
    (@upper Locked) => { "LOCKED" };
    (@upper Timeout) => { "TIMEOUT" };
    (@upper NotOwner) => { "NOT_OWNER" };
    (@upper BadSignature) => { "BAD_SIGNATURE" };
    (@upper Lost) => { "LOST" };
    (@upper UnknownGrant) => { "UNKNOWN_GRANT" };
    (@upper Forbidden) => { "FORBIDDEN" };
    (@upper Deadlock) => { "DEADLOCK" };
    (@upper Limit) => { "LIMIT" };
    (@upper NotLeader) => { "NOT_LEADER" };
    (@upper Unavailable) => { "UNAVAILABLE" };
    (@upper Protocol) => { "PROTOCOL" };
    (@upper Invalid) => { "INVALID" };
    (@upper NoSession) => { "NO_SESSION" };
    (@upper StaleNonce) => { "STALE_NONCE" };
    (@upper Cancelled) => { "CANCELLED" };
    (@upper Internal) => { "INTERNAL" };
}

error_codes! {
    /// The lock is held (try-lock), or the owner already holds it.
    Locked = 1,
    /// The wait bound passed before the lock was granted.
    Timeout = 2,
    /// The token names the current grant, but the requester does not own it.
    NotOwner = 3,
    /// The Ed25519 signature does not verify against the given key.
    BadSignature = 4,
    /// The grant ended involuntarily (session expired, TTL, operator break).
    Lost = 5,
    /// The cluster no longer remembers this token: treat it as possibly lost.
    UnknownGrant = 6,
    /// The identity may not do this (session of another identity, zone ACL).
    Forbidden = 7,
    /// Waiting would close a wait-for cycle.
    Deadlock = 8,
    /// A configured limit would be exceeded.
    Limit = 9,
    /// This server cannot serve the request now; retry on the leader.
    NotLeader = 10,
    /// The cluster has no quorum, or this server serves no clients.
    Unavailable = 11,
    /// The request was malformed on the wire.
    Protocol = 12,
    /// A field is out of range or the combination is not allowed.
    Invalid = 13,
    /// The session is unknown or has expired.
    NoSession = 14,
    /// The request nonce is below the session's low-water mark.
    StaleNonce = 15,
    /// The wait was cancelled.
    Cancelled = 16,
    /// A server-side fault; the request may or may not have taken effect.
    Internal = 17,
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The operation an owner-key signature authorises. Part of the signed bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SigOp {
    /// LOCK: the signed value is the request nonce.
    Lock,
    /// RELEASE: the signed value is the fencing token.
    Release,
    /// REFRESH: the signed value is the fencing token.
    Refresh,
}

impl SigOp {
    /// The operation's name as it appears in the signed message.
    pub fn as_str(self) -> &'static str {
        match self {
            SigOp::Lock => "lock",
            SigOp::Release => "release",
            SigOp::Refresh => "refresh",
        }
    }
}

/// The domain-separation tag that starts every signed message.
pub const SIG_DOMAIN: &str = "oclocks-sig-v1";

/// The canonical message an owner key signs for LOCK, RELEASE and REFRESH of
/// a key-owned lock. Defined once, here, for client and server alike.
///
/// Every field is length-prefixed with a big-endian u32, in this order:
/// `"oclocks-sig-v1"`, cluster id (16 bytes), operation (`lock`, `release`,
/// `refresh`), zone, lock name, token or nonce (u64 BE), ttl in milliseconds
/// (u64 BE, 0 = none), per-grant counter (u64 BE). Length prefixes make the
/// encoding injective: no two different field lists give the same bytes.
pub fn signed_message(
    cluster_id: &[u8; 16],
    op: SigOp,
    zone: &str,
    name: &str,
    token_or_nonce: u64,
    ttl_ms: u64,
    counter: u64,
) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        // Zone and name are bounded far below u32::MAX by the limits; a
        // longer input is a programmer error, not a wire condition.
        let len = u32::try_from(bytes.len()).expect("signed field longer than 4 GiB");
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(bytes);
    }
    let mut out = Vec::with_capacity(96 + zone.len() + name.len());
    field(&mut out, SIG_DOMAIN.as_bytes());
    field(&mut out, cluster_id);
    field(&mut out, op.as_str().as_bytes());
    field(&mut out, zone.as_bytes());
    field(&mut out, name.as_bytes());
    field(&mut out, &token_or_nonce.to_be_bytes());
    field(&mut out, &ttl_ms.to_be_bytes());
    field(&mut out, &counter.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signed bytes are fixed: a change here breaks every deployed client.
    #[test]
    fn signed_message_golden() {
        let msg = signed_message(&[0xab; 16], SigOp::Release, "z", "lk", 7, 0, 1);
        let mut want = Vec::new();
        want.extend_from_slice(&[0, 0, 0, 14]);
        want.extend_from_slice(b"oclocks-sig-v1");
        want.extend_from_slice(&[0, 0, 0, 16]);
        want.extend_from_slice(&[0xab; 16]);
        want.extend_from_slice(&[0, 0, 0, 7]);
        want.extend_from_slice(b"release");
        want.extend_from_slice(&[0, 0, 0, 1, b'z']);
        want.extend_from_slice(&[0, 0, 0, 2, b'l', b'k']);
        want.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 7]);
        want.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(msg, want);
    }

    /// Moving a byte from the zone to the name changes the message.
    #[test]
    fn signed_message_is_injective_across_fields() {
        let a = signed_message(&[0; 16], SigOp::Lock, "ab", "c", 1, 0, 0);
        let b = signed_message(&[0; 16], SigOp::Lock, "a", "bc", 1, 0, 0);
        assert_ne!(a, b);
    }

    #[test]
    fn error_codes_round_trip() {
        for &c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u16(c.to_u16()), Some(c));
        }
        assert_eq!(ErrorCode::from_u16(0), None);
        assert_eq!(ErrorCode::Locked.name(), "LOCKED");
    }

    #[test]
    fn mode_conflicts() {
        assert!(Mode::Exclusive.conflicts_with(Mode::Shared));
        assert!(Mode::Shared.conflicts_with(Mode::Exclusive));
        assert!(Mode::Exclusive.conflicts_with(Mode::Exclusive));
        assert!(!Mode::Shared.conflicts_with(Mode::Shared));
    }

    /// Every u8 enumeration round-trips through its wire value, and the
    /// first value past the last variant is rejected.
    #[test]
    fn u8_enums_round_trip() {
        for v in 0..=255u8 {
            assert_eq!(Mode::from_u8(v).map(Mode::to_u8), (v < 2).then_some(v));
            assert_eq!(Kind::from_u8(v).map(Kind::to_u8), (v < 2).then_some(v));
            assert_eq!(
                LostReason::from_u8(v).map(LostReason::to_u8),
                (1..=3).contains(&v).then_some(v)
            );
            assert_eq!(Role::from_u8(v).map(Role::to_u8), (v < 5).then_some(v));
        }
    }
}
