//! The typed messages: [`Request`] (client to server) and [`Response`]
//! (server to client: replies and unsolicited events), with their bodies and
//! list entries.
//!
//! These are plain data. The item layout of each is in PROTOCOL.md; the
//! conversions are in the private modules `encode` and `decode`. Durations are
//! relative milliseconds (`*_ms`), never instants. Fields that PROTOCOL.md
//! gives a default (mode, kind, `0 = none` durations, flags) are plain values
//! here: encoders leave a field out when it holds its default, and decoders
//! fill the default in when it is absent.

use bytes::BytesMut;

use crate::error::{DecodeError, EncodeError};
use crate::limits::Limits;
use crate::types::{ErrorCode, Kind, LostReason, Mode, Role};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// The TLS ALPN protocol name of the client protocol (this crate's items).
pub const ALPN_CLIENT: &[u8] = b"oclocks/1";

/// The TLS ALPN protocol name of the server-to-server (peer) protocol.
pub const ALPN_PEER: &[u8] = b"oclocks-peer/1";

/// [`Lock::wait_ms`] for "wait until granted or cancelled".
pub const WAIT_FOREVER: u64 = u64::MAX;

/// A request from a client. Every request has a non-zero id, unique among
/// the connection's requests in flight; replies echo it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The request id (never 0).
    pub id: u64,
    /// What is asked.
    pub body: RequestBody,
}

/// What a request asks, one variant per request action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestBody {
    /// HELLO: open or resume the session. Must be the connection's first
    /// request. Answered by HELLO_OK or ERROR.
    Hello(Hello),
    /// KEEPALIVE: keep the session alive. Answered by OK.
    Keepalive,
    /// CLOSE: end the session and release its connection locks.
    Close,
    /// LOCK: acquire. Answered by OK with the token, or ERROR; a LOCK that
    /// waits may first get QUEUED.
    Lock(Lock),
    /// CANCEL: stop the wait of the LOCK with this nonce (and give back a
    /// grant that raced the cancel). That LOCK is answered ERROR CANCELLED.
    Cancel {
        /// The nonce of the LOCK to cancel.
        nonce: u64,
    },
    /// RELEASE: end a grant.
    Release(Release),
    /// REFRESH: restart a grant's TTL.
    Refresh(Refresh),
    /// QUERY: who holds the lock, and how many wait.
    Query(LockRef),
    /// CHECK_TOKEN: whether a token is the lock's current grant.
    CheckToken(CheckToken),
    /// BREAK: end the current grant(s) of a lock (administrators).
    Break(Break),
    /// LIST: one page of the zone's locks.
    List(List),
    /// WATCH: get WATCH_EVENT whenever the lock's holders change.
    Watch(LockRef),
    /// UNWATCH: stop the WATCH_EVENTs of this lock.
    Unwatch(LockRef),
    /// STATUS: this server's and the cluster's state. Answered by STATUS_OK.
    /// The one request allowed before HELLO (clients probe servers with it).
    Status,
    /// REMOVE_SERVER: take a server out of the cluster (administrators).
    RemoveServer { node_id: u64 },
    /// PROMOTE_SERVER: make a learner a voter (administrators).
    PromoteServer { node_id: u64 },
}

/// HELLO's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The highest protocol version the client speaks.
    pub protocol_version: u16,
    /// The client id, made once by the client and presented to every server.
    pub client_id: u128,
    /// The session timeout the client asks for; `None` = the server default.
    pub session_timeout_ms: Option<u64>,
}

/// The owner key's proof for a key-owned lock: all three or none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerSig {
    /// The owner's Ed25519 public key.
    pub public_key: [u8; 32],
    /// The signature over [`crate::signed_message`].
    pub signature: [u8; 64],
    /// The per-grant counter that is part of the signed message.
    pub counter: u64,
}

/// LOCK's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lock {
    /// The zone.
    pub zone: String,
    /// The lock name.
    pub name: String,
    /// Exclusive (default) or shared.
    pub mode: Mode,
    /// Connection (default) or static.
    pub kind: Kind,
    /// Time to live; 0 = none.
    pub ttl_ms: u64,
    /// Wait bound; 0 = try once, [`WAIT_FOREVER`] = until granted.
    pub wait_ms: u64,
    /// Lock-delay after an involuntary loss; 0 = none.
    pub lock_delay_ms: u64,
    /// Owner id for nested acquisitions; 0 = this acquire is its own owner.
    pub owner_id: u64,
    /// The request nonce: a per-session sequence number.
    pub nonce: u64,
    /// The client's lowest unanswered nonce: answers below it may be
    /// forgotten by the server.
    pub low_water: u64,
    /// For a key-owned lock: the owner key and its signature.
    pub owner_sig: Option<OwnerSig>,
}

/// RELEASE's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    /// The zone.
    pub zone: String,
    /// The lock name.
    pub name: String,
    /// The grant's fencing token.
    pub token: u64,
    /// For a key-owned lock: the owner key and its signature.
    pub owner_sig: Option<OwnerSig>,
}

/// REFRESH's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refresh {
    /// The zone.
    pub zone: String,
    /// The lock name.
    pub name: String,
    /// The grant's fencing token.
    pub token: u64,
    /// The new TTL, counted from now; 0 = none (the grant stops expiring).
    pub ttl_ms: u64,
    /// For a key-owned lock: the owner key and its signature.
    pub owner_sig: Option<OwnerSig>,
}

/// A lock by zone and name (QUERY, WATCH, UNWATCH).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockRef {
    /// The zone.
    pub zone: String,
    /// The lock name.
    pub name: String,
}

/// CHECK_TOKEN's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckToken {
    /// The zone.
    pub zone: String,
    /// The lock name.
    pub name: String,
    /// The token to check.
    pub token: u64,
}

/// BREAK's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Break {
    /// The zone.
    pub zone: String,
    /// The lock name.
    pub name: String,
    /// Break only if this is the current grant, so a retried BREAK never
    /// breaks the next holder; `None` = whatever is held.
    pub token: Option<u64>,
}

/// LIST's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct List {
    /// The zone.
    pub zone: String,
    /// List the names after this one (the previous page's `next_cursor`).
    pub start_after: Option<String>,
    /// Entries wanted; 0 = the server's default. The server caps it at its
    /// `list_entries_max`.
    pub page_size: u32,
}

/// A message from a server: a reply (its id echoes the request's) or an
/// unsolicited event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The id of the request answered; for LOST, 0; for WATCH_EVENT, the
    /// id of the WATCH; for an ERROR not tied to a request, 0.
    pub id: u64,
    /// The reply or event.
    pub body: ResponseBody,
}

/// The reply or event, one variant per response action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResponseBody {
    /// HELLO_OK: the reply to HELLO.
    HelloOk(HelloOk),
    /// OK: the request succeeded; the fields that apply are set.
    Ok(OkReply),
    /// ERROR: the request failed.
    Error(ErrorReply),
    /// QUEUED: interim reply to a LOCK that waits in the queue; its final
    /// reply follows with the same id.
    Queued {
        /// Position in the queue, 1 = next.
        position: u32,
    },
    /// STATUS_OK: the reply to STATUS.
    StatusOk(StatusOk),
    /// LOST: a grant this session held ended involuntarily (id 0).
    Lost(Lost),
    /// WATCH_EVENT: a watched lock's holders changed (id of the WATCH).
    WatchEvent(WatchEvent),
}

/// HELLO_OK's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloOk {
    /// The protocol version both sides speak from now on.
    pub protocol_version: u16,
    /// The cluster id (part of every signed message).
    pub cluster_id: u128,
    /// Whether an existing session was resumed (false: the session is new,
    /// and any earlier session of this client id has expired).
    pub resumed: bool,
    /// The session timeout granted.
    pub session_timeout_ms: u64,
    /// This server's node id.
    pub node_id: u64,
    /// This server's site.
    pub site: String,
    /// The shared-config version this server has applied.
    pub config_version: u64,
    /// The locks the session holds.
    pub held: Vec<HeldLock>,
    /// The waits the session has queued.
    pub waits: Vec<PendingWait>,
    /// The cluster's servers.
    pub servers: Vec<ServerInfo>,
}

/// OK's fields: each request sets the ones that apply (see PROTOCOL.md).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OkReply {
    /// LOCK: the grant's fencing token. BREAK: the token broken.
    pub token: Option<u64>,
    /// LOCK, REFRESH: time until the grant's TTL ends.
    pub expires_in_ms: Option<u64>,
    /// RELEASE: the grant had already been released (a retry).
    pub already_released: bool,
    /// CHECK_TOKEN: whether the token is the current grant.
    pub token_current: Option<bool>,
    /// QUERY, WATCH: the current holders.
    pub holders: Vec<Holder>,
    /// QUERY: how many wait.
    pub waiters: Option<u32>,
    /// LIST: one page of locks.
    pub locks: Vec<LockInfo>,
    /// LIST: the cursor of the next page; `None` = this was the last.
    pub next_cursor: Option<String>,
}

/// ERROR's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorReply {
    /// What went wrong.
    pub code: ErrorCode,
    /// For people; may be empty.
    pub message: String,
    /// LOCKED, TIMEOUT: who holds the lock.
    pub holders: Vec<Holder>,
    /// NOT_LEADER, UNAVAILABLE: the leader's node id, if known.
    pub leader_id: Option<u64>,
    /// UNAVAILABLE: the servers that do serve clients.
    pub servers: Vec<ServerInfo>,
}

/// STATUS_OK's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusOk {
    /// This server's node id.
    pub node_id: u64,
    /// This server's site.
    pub site: String,
    /// This server's role.
    pub role: Role,
    /// This server's Raft term.
    pub term: u64,
    /// The leader's node id, if known.
    pub leader_id: Option<u64>,
    /// The shared-config version this server has applied.
    pub config_version: u64,
    /// This server's last applied log index.
    pub applied_index: u64,
    /// Every server as this one knows it.
    pub servers: Vec<ServerInfo>,
}

/// LOST's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lost {
    /// The zone.
    pub zone: String,
    /// The lock name.
    pub name: String,
    /// The grant that ended.
    pub token: u64,
    /// Why it ended.
    pub reason: LostReason,
}

/// WATCH_EVENT's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    /// The zone.
    pub zone: String,
    /// The lock name.
    pub name: String,
    /// The holders now; empty = free.
    pub holders: Vec<Holder>,
}

/// List entry HOLDER: one holder of a lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The holder's certificate identity.
    pub identity: String,
    /// The grant's fencing token.
    pub token: u64,
    /// The grant's mode.
    pub mode: Mode,
    /// The grant's kind.
    pub kind: Kind,
    /// Time since the grant.
    pub held_ms: u64,
    /// Time until the grant's TTL ends; `None` = no TTL.
    pub expires_in_ms: Option<u64>,
}

/// List entry HELD_LOCK: a lock the session holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldLock {
    /// The zone.
    pub zone: String,
    /// The lock name.
    pub name: String,
    /// The grant's fencing token.
    pub token: u64,
    /// The grant's mode.
    pub mode: Mode,
    /// The grant's kind.
    pub kind: Kind,
}

/// List entry WAIT: a LOCK of the session that waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingWait {
    /// The zone.
    pub zone: String,
    /// The lock name.
    pub name: String,
    /// The LOCK's nonce.
    pub nonce: u64,
}

/// List entry SERVER: a server of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerInfo {
    /// The node id.
    pub node_id: u64,
    /// Where clients reach it (`host:port`).
    pub address: String,
    /// Its site.
    pub site: String,
    /// Whether it serves clients.
    pub serving: bool,
    /// STATUS_OK: its role, if known.
    pub role: Option<Role>,
    /// STATUS_OK: its applied shared-config version, if known.
    pub config_version: Option<u64>,
    /// STATUS_OK: log entries it is behind the leader, if known.
    pub lag: Option<u64>,
}

/// List entry LOCK_INFO: one lock of a LIST page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockInfo {
    /// The lock name.
    pub name: String,
    /// The mode of its current holders (exclusive when it has none).
    pub mode: Mode,
    /// Number of holders.
    pub holders: u32,
    /// Number of waiters.
    pub waiters: u32,
}

impl Request {
    /// Append this request's items to `dst`, checking `limits`. On error
    /// nothing is appended.
    pub fn encode(&self, dst: &mut BytesMut, limits: &Limits) -> Result<(), EncodeError> {
        crate::encode::encode_message(self, dst, limits)
    }

    /// Decode exactly one request from `src`: an error if `src` ends before
    /// its action or holds bytes after it.
    pub fn decode(src: &[u8], limits: &Limits) -> Result<Request, DecodeError> {
        crate::codec::decode_one(src, limits)
    }

    /// The name of this request's action (`LOCK`, ...).
    pub fn action(&self) -> &'static str {
        crate::codes::name(crate::encode::request_action(&self.body))
    }
}

impl Response {
    /// Append this response's items to `dst`, checking `limits`. On error
    /// nothing is appended.
    pub fn encode(&self, dst: &mut BytesMut, limits: &Limits) -> Result<(), EncodeError> {
        crate::encode::encode_message(self, dst, limits)
    }

    /// Decode exactly one response from `src`: an error if `src` ends before
    /// its action or holds bytes after it.
    pub fn decode(src: &[u8], limits: &Limits) -> Result<Response, DecodeError> {
        crate::codec::decode_one(src, limits)
    }

    /// The name of this response's action (`OK`, ...).
    pub fn action(&self) -> &'static str {
        crate::codes::name(crate::encode::response_action(&self.body))
    }
}
