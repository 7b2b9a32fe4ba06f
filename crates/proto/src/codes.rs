//! The code table: every item code the protocol defines, as named constants
//! grouped by purpose, plus [`ALL`] and [`lookup`] over the same list.
//!
//! The kind of an item is implied by its value (see [`ParamKind::of`]); the
//! second nibble names the group, so `0x3201` is an 8-byte integer of the lock
//! group and `0x7201` an action of the lock group. Low bytes start at `01`.
//!
//! | nibble 2 | group    |
//! | -------- | -------- |
//! | `0`      | common   |
//! | `1`      | session  |
//! | `2`      | lock     |
//! | `3`      | kv (reserved for the key-value issue) |
//! | `4`      | config (reserved for the shared-config issue) |
//! | `5`      | cluster  |
//! | `6`      | reply    |
//! | `7`      | event    |
//! | `8`–`f`  | reserved |
//!
//! Entry items (`0xc0xx`) form their own group, `entry`. Kinds `0xd`–`0xf`
//! are reserved.
//!
//! A string field is listed once, with its `0x8xxx` code; on the wire it may
//! use any of the four widths (`0x8xxx`, `0x9xxx`, `0xaxxx`, `0xbxxx`) with
//! the same low 12 bits. [`lookup`] accepts all four.
//!
//! This module only names codes. Which fields a message takes is in
//! [`crate::message`] and its decoder; the prose is in PROTOCOL.md, whose
//! table a test compares against [`ALL`] in both directions.

use crate::item::{canonical, ParamKind};

/// One row of the code table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CodeInfo {
    /// The constant's name, unique across groups (`ZONE`, `LOCK`, ...).
    pub name: &'static str,
    /// The code; for strings the `0x8xxx` one.
    pub value: u16,
    /// The kind implied by `value`.
    pub kind: ParamKind,
    /// The module that defines it (`lock`, `reply`, ...).
    pub group: &'static str,
}

impl CodeInfo {
    /// The kind as written in PROTOCOL.md: the kind's name, except that the
    /// four string kinds are one, `str`.
    pub fn table_kind(&self) -> &'static str {
        if self.kind.is_string() {
            "str"
        } else {
            self.kind.name()
        }
    }
}

macro_rules! codes {
    ($(
        $(#[$mdoc:meta])*
        pub mod $group:ident {
            $( $(#[$doc:meta])* $name:ident = $value:literal; )*
        }
    )*) => {
        $(
            $(#[$mdoc])*
            pub mod $group {
                $( $(#[$doc])* pub const $name: u16 = $value; )*
            }
        )*

        /// Every code, grouped as in the modules above.
        pub const ALL: &[CodeInfo] = &[
            $( $( CodeInfo {
                name: stringify!($name),
                value: $value,
                kind: ParamKind::of($value),
                group: stringify!($group),
            }, )* )*
        ];

        /// The table row of `code`, if the protocol defines it. String codes
        /// of any length width are found under their `0x8xxx` row.
        pub fn lookup(code: u16) -> Option<&'static CodeInfo> {
            match canonical(code) {
                $( $( $value => {
                    const INFO: CodeInfo = CodeInfo {
                        name: stringify!($name),
                        value: $value,
                        kind: ParamKind::of($value),
                        group: stringify!($group),
                    };
                    Some(&INFO)
                } )* )*
                _ => None,
            }
        }
    };
}

codes! {
    /// Items every message carries.
    pub mod common {
        /// u64: the request id. Every request carries one (never 0); every
        /// reply echoes it. Unsolicited LOST events carry 0.
        REQUEST_ID = 0x3001;
    }

    /// Session set-up and life: HELLO, KEEPALIVE, CLOSE.
    pub mod session {
        /// u8 flag in HELLO_OK: 1 = the session existed and was resumed,
        /// 0 = it is new (any earlier session of this client id is gone).
        SESSION_RESUMED = 0x0101;
        /// u16: the protocol version (HELLO: the highest the client speaks;
        /// HELLO_OK: the one the server will speak).
        PROTOCOL_VERSION = 0x1101;
        /// u64: session timeout in ms (HELLO: requested, optional;
        /// HELLO_OK: granted).
        SESSION_TIMEOUT_MS = 0x3101;
        /// u128: the client id, made once by the client.
        CLIENT_ID = 0x4101;
        /// u128: the cluster id (HELLO_OK); part of every signed message.
        CLUSTER_ID = 0x4102;
        /// Action: open or resume the session. Must be the first request.
        HELLO = 0x7101;
        /// Action: keep the session alive.
        KEEPALIVE = 0x7102;
        /// Action: end the session (its connection locks are released).
        CLOSE = 0x7103;
    }

    /// Locks: acquire, release, inspect.
    pub mod lock {
        /// u8: [`crate::Mode`]; absent = exclusive.
        MODE = 0x0201;
        /// u8: [`crate::Kind`]; absent = connection.
        KIND = 0x0202;
        /// u32: LIST page size; absent or 0 = the server's default.
        PAGE_SIZE = 0x2201;
        /// u64: time to live in ms; absent or 0 = none.
        TTL_MS = 0x3201;
        /// u64: how long to wait in ms; absent or 0 = try once,
        /// `u64::MAX` = forever.
        WAIT_MS = 0x3202;
        /// u64: lock-delay in ms after an involuntary loss; absent or 0 = none.
        LOCK_DELAY_MS = 0x3203;
        /// u64: owner id for nested acquisitions; absent or 0 = this acquire
        /// is its own owner.
        OWNER_ID = 0x3204;
        /// u64: the request nonce, a per-session sequence number.
        NONCE = 0x3205;
        /// u64: the client's lowest unanswered nonce; absent = 0.
        LOW_WATER = 0x3206;
        /// u64: a fencing token.
        TOKEN = 0x3207;
        /// u64: the per-grant signature counter.
        SIG_COUNTER = 0x3208;
        /// b32: the owner's Ed25519 public key.
        OWNER_KEY = 0x5201;
        /// b64: the owner's Ed25519 signature over the signed message.
        SIGNATURE = 0x6201;
        /// Action: acquire a lock.
        LOCK = 0x7201;
        /// Action: cancel the wait of the LOCK with this nonce.
        CANCEL = 0x7202;
        /// Action: release a grant.
        RELEASE = 0x7203;
        /// Action: refresh a grant's TTL.
        REFRESH = 0x7204;
        /// Action: who holds a lock.
        QUERY = 0x7205;
        /// Action: is this token the current grant.
        CHECK_TOKEN = 0x7206;
        /// Action: break a lock (administrators).
        BREAK = 0x7207;
        /// Action: list the locks of a zone, one page.
        LIST = 0x7208;
        /// Action: be told when a lock's holders change.
        WATCH = 0x7209;
        /// Action: stop watching.
        UNWATCH = 0x720a;
        /// str: the zone.
        ZONE = 0x8201;
        /// str: the lock name.
        NAME = 0x8202;
        /// str: LIST cursor, list names after this one.
        START_AFTER = 0x8203;
    }

    /// Cluster membership and status.
    pub mod cluster {
        /// u8 flag: the server serves clients.
        SERVING = 0x0501;
        /// u8: [`crate::Role`].
        ROLE = 0x0502;
        /// u64: a server's node id.
        NODE_ID = 0x3501;
        /// u64: the shared-config version.
        CONFIG_VERSION = 0x3502;
        /// u64: the Raft term.
        TERM = 0x3503;
        /// u64: the leader's node id.
        LEADER_ID = 0x3504;
        /// u64: the last applied log index.
        APPLIED_INDEX = 0x3505;
        /// u64: log entries a server is behind the leader.
        LAG = 0x3506;
        /// Action: report this server's and the cluster's status.
        STATUS = 0x7501;
        /// Action: remove a server from the cluster (administrators).
        REMOVE_SERVER = 0x7502;
        /// Action: make a learner a voter (administrators).
        PROMOTE_SERVER = 0x7503;
        /// str: a server's client address (`host:port`).
        ADDRESS = 0x8501;
        /// str: a site label.
        SITE = 0x8502;
    }

    /// Replies: OK, ERROR, HELLO_OK, STATUS_OK, QUEUED and their fields.
    pub mod reply {
        /// u8 flag: the grant was already released (a retried RELEASE).
        ALREADY_RELEASED = 0x0601;
        /// u8 flag: CHECK_TOKEN result, 1 = the token is the current grant.
        TOKEN_CURRENT = 0x0602;
        /// u16: an [`crate::ErrorCode`].
        ERROR_CODE = 0x1601;
        /// u32: number of waiters.
        WAITERS = 0x2601;
        /// u32: number of holders.
        HOLDER_COUNT = 0x2602;
        /// u32: position in the wait queue, 1 = next.
        QUEUE_POSITION = 0x2603;
        /// u64: ms since the grant.
        HELD_MS = 0x3601;
        /// u64: ms until the grant's TTL ends; absent = no TTL.
        EXPIRES_IN_MS = 0x3602;
        /// Action: the request succeeded.
        OK = 0x7601;
        /// Action: the request failed.
        ERROR = 0x7602;
        /// Action: the reply to HELLO.
        HELLO_OK = 0x7603;
        /// Action: the reply to STATUS.
        STATUS_OK = 0x7604;
        /// Action: interim reply to LOCK: the request waits in the queue.
        QUEUED = 0x7605;
        /// str: a human-readable error message.
        MESSAGE = 0x8601;
        /// str: a holder's certificate identity.
        IDENTITY = 0x8602;
        /// str: LIST cursor for the next page; absent = last page.
        NEXT_CURSOR = 0x8603;
    }

    /// Unsolicited events.
    pub mod event {
        /// u8: [`crate::LostReason`].
        LOST_REASON = 0x0701;
        /// Action: a lock this session held was lost.
        LOST = 0x7701;
        /// Action: a watched lock's holders changed.
        WATCH_EVENT = 0x7702;
    }

    /// Entry items: each opens one entry of a list in the message; the
    /// parameters after it, up to the next entry item or the action, are
    /// that entry's fields.
    pub mod entry {
        /// Entry: a holder of a lock.
        HOLDER = 0xc001;
        /// Entry: a lock the session holds (HELLO_OK).
        HELD_LOCK = 0xc002;
        /// Entry: a wait the session has queued (HELLO_OK).
        WAIT = 0xc003;
        /// Entry: a server of the cluster.
        SERVER = 0xc004;
        /// Entry: a lock of a LIST page.
        LOCK_INFO = 0xc005;
    }
}

/// The name of `code` (any string width), or `"?"` if the protocol does not
/// define it.
pub fn name(code: u16) -> &'static str {
    lookup(code).map_or("?", |i| i.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values and names are unique, and every value is in its group's range.
    #[test]
    fn table_is_consistent() {
        let mut values: Vec<u16> = ALL.iter().map(|c| c.value).collect();
        values.sort_unstable();
        values.dedup();
        assert_eq!(values.len(), ALL.len(), "duplicate code value");
        let mut names: Vec<&str> = ALL.iter().map(|c| c.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len(), "duplicate code name");
        for c in ALL {
            assert_eq!(lookup(c.value), Some(c));
            assert_ne!(c.value & 0xff, 0, "{}: low byte 00 is unused", c.name);
            if c.kind.is_string() {
                assert_eq!(
                    c.kind,
                    ParamKind::Str1,
                    "{}: list strings as 0x8xxx",
                    c.name
                );
                for width in [0x9000, 0xa000, 0xb000] {
                    assert_eq!(lookup((c.value & 0x0fff) | width), Some(c));
                }
            }
            let group = match c.kind {
                ParamKind::Entry => "entry",
                _ => match (c.value >> 8) & 0xf {
                    0 => "common",
                    1 => "session",
                    2 => "lock",
                    5 => "cluster",
                    6 => "reply",
                    7 => "event",
                    g => panic!("{}: group nibble {g} is reserved", c.name),
                },
            };
            assert_eq!(c.group, group, "{}", c.name);
        }
        assert_eq!(lookup(0x7fff), None);
        assert_eq!(name(0x9201), "ZONE");
    }
}
