//! [`Error`]: everything a client call can fail with.
//!
//! Two families, kept apart:
//!
//! - **The server answered `ERROR`** (one variant per protocol
//!   [`ErrorCode`], see PROTOCOL.md section 7). The request was processed and
//!   refused; apart from [`Error::Internal`], it did not take effect.
//! - **Local failures**: configuration, files, TLS, connecting, and requests
//!   whose reply never arrived. Of these, [`Error::Indeterminate`] is the one
//!   to read carefully: the request was sent, so it **may have taken effect**
//!   on the cluster. [`Error::is_indeterminate`] says which errors leave the
//!   outcome unknown.

use std::path::PathBuf;
use std::time::Duration;

use oclocks_proto::{DecodeError, EncodeError, ErrorCode, ErrorReply, Holder, ServerInfo};

use crate::guard::LostReason;

/// Everything a client call can fail with. Cheap to clone.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ----- The server answered ERROR -----
    /// `LOCKED`: the lock is held (a try-lock, `wait(Duration::ZERO)`), or
    /// this owner already holds it. `holders` says who holds it (it may be
    /// empty when only a lock-delay or earlier waiters stand in the way).
    #[error("LOCKED: the lock is held{}", describe_holders(holders))]
    Locked {
        /// The current holders, oldest first, as the server reported them.
        holders: Vec<Holder>,
        /// The server's message.
        message: String,
    },
    /// `TIMEOUT`: the wait bound passed before the lock was granted.
    #[error(
        "TIMEOUT: the wait ended before the lock was granted{}",
        describe_holders(holders)
    )]
    Timeout {
        /// The holders when the wait ended.
        holders: Vec<Holder>,
        /// The server's message.
        message: String,
    },
    /// `NOT_OWNER`: the token names the current grant, but this client (or
    /// this owner key) does not own it.
    #[error("NOT_OWNER: {message}")]
    NotOwner {
        /// The server's message.
        message: String,
    },
    /// `BAD_SIGNATURE`: the owner-key signature did not verify, or replays
    /// an old counter.
    #[error("BAD_SIGNATURE: {message}")]
    BadSignature {
        /// The server's message.
        message: String,
    },
    /// `LOST`: the grant ended involuntarily (session expired, TTL passed,
    /// broken by an operator) before this request.
    #[error(
        "LOST: the grant ended involuntarily{}: {message}",
        describe_reason(reason)
    )]
    Lost {
        /// Why, when the client knows it (the wire reply carries no reason;
        /// a guard fills it in from the LOST event it saw).
        reason: Option<LostReason>,
        /// The server's message.
        message: String,
    },
    /// `UNKNOWN_GRANT`: the cluster no longer remembers this token; treat
    /// the grant as possibly lost.
    #[error("UNKNOWN_GRANT: {message}")]
    UnknownGrant {
        /// The server's message.
        message: String,
    },
    /// `FORBIDDEN`: this certificate identity may not do this (zone ACL, or
    /// the client id belongs to a session of another identity).
    #[error("FORBIDDEN: {message}")]
    Forbidden {
        /// The server's message.
        message: String,
    },
    /// `DEADLOCK`: waiting would close a wait-for cycle between owners.
    #[error("DEADLOCK: {message}")]
    Deadlock {
        /// The server's message.
        message: String,
    },
    /// `LIMIT`: a configured limit would be exceeded.
    #[error("LIMIT: {message}")]
    Limit {
        /// The server's message.
        message: String,
    },
    /// `NOT_LEADER`: this server cannot serve the request now.
    #[error("NOT_LEADER: {message}")]
    NotLeader {
        /// The leader's node id, if the server knows it.
        leader_id: Option<u64>,
        /// The server's message.
        message: String,
    },
    /// `UNAVAILABLE`: no quorum, or this server serves no clients.
    #[error("UNAVAILABLE: {message}")]
    Unavailable {
        /// The leader's node id, if known.
        leader_id: Option<u64>,
        /// The servers that do serve clients.
        servers: Vec<ServerInfo>,
        /// The server's message.
        message: String,
    },
    /// `PROTOCOL`: the server found the request malformed or out of order.
    #[error("PROTOCOL: {message}")]
    Protocol {
        /// The server's (or, for a reply the client cannot use, the
        /// client's) message.
        message: String,
    },
    /// `INVALID`: a field is out of range or the combination is not allowed.
    #[error("INVALID: {message}")]
    Invalid {
        /// The server's message.
        message: String,
    },
    /// `NO_SESSION`: the session is unknown or has expired.
    #[error("NO_SESSION: {message}")]
    NoSession {
        /// The server's message.
        message: String,
    },
    /// `STALE_NONCE`: the LOCK's nonce is below the session's low-water
    /// mark (a bug in the client if it ever happens).
    #[error("STALE_NONCE: {message}")]
    StaleNonce {
        /// The server's message.
        message: String,
    },
    /// `CANCELLED`: the wait was cancelled.
    #[error("CANCELLED: {message}")]
    Cancelled {
        /// The server's message.
        message: String,
    },
    /// `INTERNAL`: a server-side fault. **Indeterminate**: the request may
    /// or may not have taken effect.
    #[error("INTERNAL (outcome unknown): {message}")]
    Internal {
        /// The server's message.
        message: String,
    },

    // ----- Local failures -----
    /// **The request was sent and its reply never arrived** (the connection
    /// was lost and the request is not safe to resend, or the request
    /// timeout passed). It may or may not have taken effect on the cluster.
    #[error("{action}: outcome unknown (the request may have taken effect): {cause}")]
    Indeterminate {
        /// The request's action (`RELEASE`, `BREAK`, ...).
        action: &'static str,
        /// What happened to the reply.
        cause: String,
    },
    /// The request was never sent: no server could be reached within the
    /// request timeout. It did not take effect.
    #[error("{action}: not sent, no server reachable: {cause}")]
    NotSent {
        /// The request's action.
        action: &'static str,
        /// The last connection error, if any.
        cause: String,
    },
    /// An acquire that waited longer than its wait bound plus the request
    /// timeout without a final reply. The lock is **not** held: a CANCEL has
    /// been sent in the background, which also gives back a grant that raced
    /// it.
    #[error("LOCK: no reply within {waited:?}; the wait was cancelled")]
    AcquireTimeout {
        /// How long the acquire waited.
        waited: Duration,
    },
    /// The configuration is not usable.
    #[error("configuration: {0}")]
    Config(String),
    /// A file could not be read or written.
    #[error("{what} {}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Which file it is (`CA file`, `owner key file`, ...).
        what: &'static str,
        /// What went wrong.
        message: String,
    },
    /// TLS could not be set up, or the handshake with a server failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// The server refused this client's certificate (TLS alert). In TLS 1.3
    /// this surfaces on the first read after the handshake, so it is
    /// reported by connect, not by the handshake itself.
    #[error("server {endpoint} rejected the client certificate ({alert}); check cert_file/key_file and that the server trusts their CA")]
    CertificateRejected {
        /// The server.
        endpoint: String,
        /// The TLS alert it sent.
        alert: String,
    },
    /// Connecting to one server failed.
    #[error("{endpoint}: {message}")]
    Connect {
        /// The server.
        endpoint: String,
        /// What went wrong.
        message: String,
    },
    /// No configured server could be reached; one line per attempt.
    #[error("no server reachable: {}", attempts.join("; "))]
    NoServer {
        /// `endpoint: error`, one per server tried.
        attempts: Vec<String>,
    },
    /// The server belongs to another cluster than the one this client
    /// pinned at its first HELLO. Two clusters must never both grant one
    /// client's locks, so the client refuses it.
    #[error("server {endpoint} belongs to cluster {found:032x}, not {expected:032x}")]
    ClusterMismatch {
        /// The server.
        endpoint: String,
        /// The cluster id pinned at the first HELLO.
        expected: u128,
        /// The cluster id this server reported.
        found: u128,
    },
    /// The server sent bytes that are not a valid message.
    #[error("invalid reply from the server: {0}")]
    Decode(DecodeError),
    /// The request cannot be encoded within the protocol limits (a name too
    /// long, ...). Nothing was sent.
    #[error("request not encodable: {0}")]
    Encode(EncodeError),
    /// The client was closed (or its background task ended).
    #[error("the client is closed")]
    Closed,
}

fn describe_holders(holders: &[Holder]) -> String {
    match holders.first() {
        None => String::new(),
        Some(h) => {
            let more = match holders.len() {
                1 => String::new(),
                n => format!(" and {} more", n - 1),
            };
            format!(
                " by {} (token {}, for {} ms){more}",
                h.identity, h.token, h.held_ms
            )
        }
    }
}

fn describe_reason(reason: &Option<LostReason>) -> String {
    reason.map(|r| format!(" ({r})")).unwrap_or_default()
}

impl Error {
    /// The error of an `ERROR` reply.
    pub(crate) fn from_reply(reply: ErrorReply) -> Error {
        let ErrorReply {
            code,
            message,
            holders,
            leader_id,
            servers,
        } = reply;
        match code {
            ErrorCode::Locked => Error::Locked { holders, message },
            ErrorCode::Timeout => Error::Timeout { holders, message },
            ErrorCode::NotOwner => Error::NotOwner { message },
            ErrorCode::BadSignature => Error::BadSignature { message },
            ErrorCode::Lost => Error::Lost {
                reason: None,
                message,
            },
            ErrorCode::UnknownGrant => Error::UnknownGrant { message },
            ErrorCode::Forbidden => Error::Forbidden { message },
            ErrorCode::Deadlock => Error::Deadlock { message },
            ErrorCode::Limit => Error::Limit { message },
            ErrorCode::NotLeader => Error::NotLeader { leader_id, message },
            ErrorCode::Unavailable => Error::Unavailable {
                leader_id,
                servers,
                message,
            },
            ErrorCode::Protocol => Error::Protocol { message },
            ErrorCode::Invalid => Error::Invalid { message },
            ErrorCode::NoSession => Error::NoSession { message },
            ErrorCode::StaleNonce => Error::StaleNonce { message },
            ErrorCode::Cancelled => Error::Cancelled { message },
            ErrorCode::Internal => Error::Internal { message },
        }
    }

    /// The protocol error code, if the server answered `ERROR`.
    pub fn code(&self) -> Option<ErrorCode> {
        Some(match self {
            Error::Locked { .. } => ErrorCode::Locked,
            Error::Timeout { .. } => ErrorCode::Timeout,
            Error::NotOwner { .. } => ErrorCode::NotOwner,
            Error::BadSignature { .. } => ErrorCode::BadSignature,
            Error::Lost { .. } => ErrorCode::Lost,
            Error::UnknownGrant { .. } => ErrorCode::UnknownGrant,
            Error::Forbidden { .. } => ErrorCode::Forbidden,
            Error::Deadlock { .. } => ErrorCode::Deadlock,
            Error::Limit { .. } => ErrorCode::Limit,
            Error::NotLeader { .. } => ErrorCode::NotLeader,
            Error::Unavailable { .. } => ErrorCode::Unavailable,
            Error::Protocol { .. } => ErrorCode::Protocol,
            Error::Invalid { .. } => ErrorCode::Invalid,
            Error::NoSession { .. } => ErrorCode::NoSession,
            Error::StaleNonce { .. } => ErrorCode::StaleNonce,
            Error::Cancelled { .. } => ErrorCode::Cancelled,
            Error::Internal { .. } => ErrorCode::Internal,
            _ => return None,
        })
    }

    /// Whether the request may have taken effect although it failed: the
    /// reply never arrived ([`Error::Indeterminate`]) or the server reported
    /// an internal fault ([`Error::Internal`]).
    pub fn is_indeterminate(&self) -> bool {
        matches!(self, Error::Indeterminate { .. } | Error::Internal { .. })
    }

    /// The lock's holders, for `LOCKED` and `TIMEOUT`; empty otherwise.
    pub fn holders(&self) -> &[Holder] {
        match self {
            Error::Locked { holders, .. } | Error::Timeout { holders, .. } => holders,
            _ => &[],
        }
    }

    /// Whether the lock was not obtained because someone else holds it or
    /// the wait ran out (`LOCKED`, `TIMEOUT`, or a local acquire timeout):
    /// the error a `flock`-like tool reports as "conflict".
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            Error::Locked { .. } | Error::Timeout { .. } | Error::AcquireTimeout { .. }
        )
    }

    pub(crate) fn file(
        path: &std::path::Path,
        what: &'static str,
        message: impl ToString,
    ) -> Error {
        Error::File {
            path: path.to_path_buf(),
            what,
            message: message.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oclocks_proto::{Kind, Mode};

    fn reply(code: ErrorCode) -> ErrorReply {
        ErrorReply {
            code,
            message: "m".into(),
            holders: vec![],
            leader_id: None,
            servers: vec![],
        }
    }

    /// Every protocol error code maps to its own variant and back.
    #[test]
    fn every_code_round_trips() {
        for &code in ErrorCode::ALL {
            let err = Error::from_reply(reply(code));
            assert_eq!(err.code(), Some(code), "{code}");
            assert!(err.to_string().starts_with(code.name()), "{err}");
        }
        assert_eq!(Error::Closed.code(), None);
    }

    #[test]
    fn indeterminate_errors_say_so() {
        assert!(Error::from_reply(reply(ErrorCode::Internal)).is_indeterminate());
        let e = Error::Indeterminate {
            action: "RELEASE",
            cause: "connection lost".into(),
        };
        assert!(e.is_indeterminate());
        assert!(e.to_string().contains("may have taken effect"), "{e}");
        for &code in ErrorCode::ALL {
            if code != ErrorCode::Internal {
                assert!(!Error::from_reply(reply(code)).is_indeterminate());
            }
        }
        assert!(!Error::NotSent {
            action: "LOCK",
            cause: String::new()
        }
        .is_indeterminate());
    }

    #[test]
    fn locked_names_the_holder() {
        let mut r = reply(ErrorCode::Locked);
        r.holders.push(Holder {
            identity: "svc-a".into(),
            token: 1001,
            mode: Mode::Exclusive,
            kind: Kind::Connection,
            held_ms: 1500,
            expires_in_ms: None,
        });
        let e = Error::from_reply(r);
        assert_eq!(e.holders().len(), 1);
        assert!(e.is_conflict());
        let text = e.to_string();
        assert!(
            text.contains("svc-a") && text.contains("1001") && text.contains("1500"),
            "{text}"
        );
    }
}
