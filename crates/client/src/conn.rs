//! The connection task: one background task per [`Client`](crate::Client)
//! that owns the connection to a server and everything that must happen
//! whether or not anyone is calling.
//!
//! - **Dialing** ([`dial_round`], [`establish`]): TCP + TLS (through a
//!   [`Connector`]), then HELLO (protocol version, client id, session
//!   timeout) and its HELLO_OK, all within `connect_timeout`. The cluster id
//!   of the first HELLO_OK is pinned: a server of another cluster is refused
//!   ([`Error::ClusterMismatch`]) and the next endpoint is tried.
//! - **Serving** ([`Task::serve`]): requests from callers arrive on a
//!   channel as [`Pending`]s, get a request id ([`InFlight`]), are encoded
//!   and handed to a writer task (so a slow socket never stops the reading
//!   of replies); replies are matched by id, out of order, and delivered on
//!   the caller's oneshot. A LOCK's interim QUEUED is noted; its final
//!   reply follows. LOST events (id 0) fire the matching guard.
//! - **Keepalives**: every `timeout / 3`, a KEEPALIVE; its acknowledgement
//!   moves the conservative [`Lease`] (from the keepalive's *send* time).
//!   If the lease runs out, every connection-lock guard fires `lost()`. A
//!   connection on which no keepalive was acknowledged for two intervals is
//!   given up (the server or its leader is stuck) and another is dialled.
//! - **Reconnecting** ([`Task::reconnect`]): on any connection error, rounds
//!   over the endpoints with exponential backoff and jitter ([`Backoff`]),
//!   fastest measured server first ([`Endpoints::round_order`]; the server
//!   just lost goes after the measured ones), then HELLO again with the
//!   same client id; HELLO_OK's `resumed` and `held` decide which guards
//!   fire. Requests that are safe to repeat (LOCK with the same nonce,
//!   CANCEL, RELEASE, reads, ...) are resent on the new connection; the
//!   others fail [`Error::Indeterminate`]. The lease and TTL timers keep
//!   running while disconnected. A server that refuses HELLO with
//!   UNAVAILABLE and names the serving servers sends the round there at
//!   once ([`dial_round`]).
//! - **Retrying "not now"**: a request that is safe to repeat and is
//!   answered `NOT_LEADER` or `UNAVAILABLE` (leadership moving, quorum
//!   briefly lost) is sent again after a growing pause ([`RETRY_MIN`] to
//!   [`RETRY_MAX`], jittered) instead of being reported: a caller's request
//!   until its own deadline, a background RELEASE or CANCEL until it is
//!   answered (or the client shuts down). A LOCK keeps its nonce (retired
//!   only on a definite answer), so a retry finds a grant the first attempt
//!   may have made.
//! - **Measuring and switching**: a [`Prober`] task beside this one times
//!   STATUS round trips to every known server ([`crate::probe`]) and
//!   reports each round here. After a scheduled round, if another server is
//!   clearly faster than the primary ([`crate::endpoints`] has the rule),
//!   the task moves there gracefully: once nothing that may not be resent
//!   is in flight (and, for up to [`SWITCH_QUIET_WAIT`], nothing but
//!   keepalives and waiting LOCKs), it opens the new stream (TCP + TLS)
//!   while still serving the old connection; then, with the old connection
//!   no longer read, HELLO with the same client id resumes the session on
//!   the new server; only then is the old connection dropped and its
//!   in-flight requests resent on the new one (waiting LOCKs with their
//!   nonces). If the new server cannot be reached or refuses, the client
//!   simply stays. Not reading the old connection during that HELLO keeps
//!   its replies from racing the new HELLO_OK's list of held locks.
//! - **Shutdown**: when every `Client` handle and guard is gone, the task
//!   finishes what is in flight (bounded by the request timeout), sends
//!   CLOSE and ends. [`Command::Close`] does the same at once.
//!
//! In-flight budget: callers hold a semaphore permit per request
//! (`requests_in_flight_max − RESERVED_IN_FLIGHT`); the task's own traffic
//! (at most 2 keepalives, up to [`BACKGROUND_MAX`] background requests)
//! fits in the reserve, so the connection never exceeds the server's limit.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::StreamExt;
use oclocks_proto::{
    ErrorCode, Hello, HelloOk, Limits, Request, RequestBody, Response, ResponseBody, ResponseCodec,
    ServerInfo, PROTOCOL_VERSION,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::codec::FramedRead;

use crate::backoff::Backoff;
use crate::config::RESERVED_IN_FLIGHT;
use crate::endpoints::{redirect_servers, Endpoints, ServerStatus};
use crate::error::Error;
use crate::guard::LostReason;
use crate::inflight::InFlight;
use crate::lease::{keepalive_interval, Lease};
use crate::nonce::Nonces;
use crate::probe::{ProbeReport, Prober};
use crate::registry::{lock, GrantHandle, Registry};

/// Background requests (CANCELs, RELEASEs of dropped guards) in flight at
/// most; the rest wait in the task's queue.
pub(crate) const BACKGROUND_MAX: usize = RESERVED_IN_FLIGHT - 3;
/// Keepalives in flight at most.
const KEEPALIVES_MAX: usize = 2;
/// Bytes the writer coalesces into one write.
const WRITE_BATCH_BYTES: usize = 256 * 1024;
/// The first pause before a request answered `NOT_LEADER`/`UNAVAILABLE` is
/// sent again (an election takes about an election timeout).
pub(crate) const RETRY_MIN: Duration = Duration::from_millis(25);
/// The longest such pause.
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(1);
/// Every this many retries of one request, a warning is logged.
const RETRY_WARN_EVERY: u32 = 8;

/// A byte stream to a server (TLS in production).
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed [`Io`].
pub(crate) type BoxIo = Box<dyn Io>;

/// Opens byte streams to endpoints. [`crate::tls::TlsConnector`] in
/// production; unit tests plug in in-memory pipes.
pub(crate) trait Connector: Send + Sync + 'static {
    /// Open a stream to `endpoint` (`host:port`), handshakes included.
    fn connect(&self, endpoint: String) -> BoxFuture<'static, Result<BoxIo, Error>>;
}

/// State shared by the connection task and the API.
pub(crate) struct Shared {
    /// This client's id.
    pub client_id: u128,
    /// The cluster id pinned at the first HELLO.
    pub cluster_id: u128,
    /// The grants of live guards.
    pub registry: Arc<Mutex<Registry>>,
    /// LOCK nonces.
    pub nonces: Mutex<Nonces>,
    /// What the client reports about its connection.
    pub status: Mutex<Status>,
}

/// The connection state published by the task.
#[derive(Clone, Debug, Default)]
pub(crate) struct Status {
    pub connected: bool,
    pub endpoint: Option<String>,
    pub node_id: Option<u64>,
    pub site: Option<String>,
    pub config_version: Option<u64>,
    pub session_timeout: Duration,
    pub lease_deadline: Option<Instant>,
    pub last_error: Option<String>,
    pub servers: Vec<ServerInfo>,
    /// Every known endpoint with its measurements (`primary` unset).
    pub known: Vec<ServerStatus>,
    pub connects: u64,
    pub new_sessions: u64,
    /// Moves to a faster server.
    pub switches: u64,
}

/// Whether a caller's request has been handed to a connection, decided
/// once between the task (which sends) and the caller (which may give up
/// first): the winner of the race decides whether a timeout is "not sent"
/// or "indeterminate".
#[derive(Debug, Default)]
pub(crate) struct Ticket(AtomicU8);

const UNSENT: u8 = 0;
const SENT: u8 = 1;
const ABANDONED: u8 = 2;

impl Ticket {
    /// The task is about to send: false if the caller gave up first.
    pub fn try_send(&self) -> bool {
        match self
            .0
            .compare_exchange(UNSENT, SENT, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => true,
            Err(state) => state == SENT,
        }
    }

    /// The caller gives up: true if the request was never sent (and now
    /// never will be).
    pub fn try_abandon(&self) -> bool {
        self.0
            .compare_exchange(UNSENT, ABANDONED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
}

/// A successful final reply, as delivered to a caller.
#[derive(Debug)]
pub(crate) struct Answer {
    /// The reply (never `Error`: that is delivered as `Err`).
    pub body: ResponseBody,
    /// When the request was first sent (lease and TTL arithmetic).
    pub sent_at: Instant,
    /// For a LOCK answered with a token: its registry entry.
    pub grant: Option<GrantHandle>,
}

/// Who waits for a request's reply.
#[derive(Debug)]
pub(crate) enum PendingKind {
    /// A caller of the API.
    User(oneshot::Sender<Result<Answer, Error>>),
    /// The task's own KEEPALIVE.
    Keepalive,
    /// A CANCEL of the LOCK with this nonce (the acquire was abandoned).
    Cancel { nonce: u64 },
    /// Fire-and-forget (the RELEASE of a dropped guard).
    Background,
    /// CLOSE; the sender, if a caller asked for it.
    Close(Option<oneshot::Sender<Result<(), Error>>>),
}

/// A request on its way: queued, or in flight on a connection.
#[derive(Debug)]
pub(crate) struct Pending {
    /// The action's name, for errors and logs.
    pub action: &'static str,
    /// The request (a LOCK's `low_water` is set at each send).
    pub body: RequestBody,
    /// Who waits.
    pub kind: PendingKind,
    /// Whether it may be sent again on a new connection after the old one
    /// was lost with the request unanswered (it is idempotent on the
    /// server).
    pub resend: bool,
    /// Callers: the sent/abandoned race.
    pub ticket: Option<Arc<Ticket>>,
    /// Callers: the in-flight slot, released with the pending.
    pub permit: Option<OwnedSemaphorePermit>,
    /// When it was first sent.
    pub first_sent_at: Option<Instant>,
    /// How many times a server answered it "not now" (`NOT_LEADER`,
    /// `UNAVAILABLE`) and it was sent again; paces the next retry.
    pub retries: u32,
}

impl Pending {
    /// A fire-and-forget request that is safe to resend.
    pub fn background(action: &'static str, body: RequestBody) -> Pending {
        Pending {
            action,
            body,
            kind: PendingKind::Background,
            resend: true,
            ticket: None,
            permit: None,
            first_sent_at: None,
            retries: 0,
        }
    }

    fn internal(action: &'static str, body: RequestBody, kind: PendingKind) -> Pending {
        Pending {
            action,
            body,
            kind,
            resend: false,
            ticket: None,
            permit: None,
            first_sent_at: None,
            retries: 0,
        }
    }

    fn is_background(&self) -> bool {
        matches!(
            self.kind,
            PendingKind::Background | PendingKind::Cancel { .. }
        )
    }

    /// Whether `reply` means "not done, ask again" for this request: a
    /// resendable (idempotent) request answered `NOT_LEADER` or
    /// `UNAVAILABLE` is sent again after a pause rather than reported (a
    /// caller's request until the caller's deadline). Such
    /// an answer does not say the request had no effect (a forwarded
    /// operation may have committed before leadership moved), which is why
    /// only requests that are safe to repeat are retried: a RELEASE, CANCEL
    /// or LOCK (same nonce) left unanswered would leave a grant or a wait
    /// behind in a live session.
    ///
    /// A background request (a CANCEL, or a RELEASE nobody waits for)
    /// answered `LIMIT` is asked again too: the server's
    /// `requests_in_flight_max` refuses it before proposing, and a CANCEL
    /// whose LOCK has not arrived yet can meet `outcomes_per_session_max`;
    /// both pass, and dropping the request would leave a grant behind (a
    /// caller sees its own `LIMIT`).
    fn retry_on(&self, reply: &ResponseBody) -> bool {
        let ResponseBody::Error(e) = reply else {
            return false;
        };
        let not_done = match e.code {
            ErrorCode::NotLeader | ErrorCode::Unavailable => true,
            ErrorCode::Limit => self.is_background(),
            _ => false,
        };
        self.resend
            && not_done
            && !matches!(self.kind, PendingKind::Keepalive | PendingKind::Close(_))
            // STATUS reports the server as it is, "not serving" included.
            && !matches!(self.body, RequestBody::Status)
    }

    /// Whether nobody waits for this request any more.
    fn is_abandoned(&self) -> bool {
        match &self.kind {
            PendingKind::User(tx) => tx.is_closed(),
            _ => false,
        }
    }
}

/// What callers ask of the task.
#[derive(Debug)]
pub(crate) enum Command {
    /// Send a request.
    Submit(Box<Pending>),
    /// The acquire with this nonce was abandoned: CANCEL it.
    Cancel { nonce: u64 },
    /// CLOSE the session and stop.
    Close(oneshot::Sender<Result<(), Error>>),
}

/// What dialing needs; immutable, shared with dial futures.
pub(crate) struct Dial {
    pub connector: Arc<dyn Connector>,
    pub client_id: u128,
    pub session_timeout: Duration,
    pub connect_timeout: Duration,
    pub limits: Limits,
}

/// A connection that has completed HELLO.
pub(crate) struct Established {
    pub endpoint: String,
    pub reader: FramedRead<ReadHalf<BoxIo>, ResponseCodec>,
    pub writer: WriteHalf<BoxIo>,
    pub hello: HelloOk,
    /// When HELLO was sent (the lease's first acknowledgement).
    pub sent_at: Instant,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The name of a response's action.
pub(crate) fn body_name(body: &ResponseBody) -> &'static str {
    match body {
        ResponseBody::HelloOk(_) => "HELLO_OK",
        ResponseBody::Ok(_) => "OK",
        ResponseBody::Error(_) => "ERROR",
        ResponseBody::Queued { .. } => "QUEUED",
        ResponseBody::StatusOk(_) => "STATUS_OK",
        ResponseBody::Lost(_) => "LOST",
        ResponseBody::WatchEvent(_) => "WATCH_EVENT",
    }
}

fn read_error(endpoint: &str, err: oclocks_proto::CodecError) -> Error {
    match err {
        oclocks_proto::CodecError::Io(e) => crate::tls::classify_io(endpoint, &e),
        oclocks_proto::CodecError::Decode(e) => Error::Decode(e),
        oclocks_proto::CodecError::Encode(e) => Error::Encode(e),
    }
}

/// Send one request and read until its final reply (skipping events), on a
/// connection that is not yet served by the task.
pub(crate) async fn exchange(
    endpoint: &str,
    reader: &mut FramedRead<ReadHalf<BoxIo>, ResponseCodec>,
    writer: &mut WriteHalf<BoxIo>,
    limits: &Limits,
    request: Request,
) -> Result<ResponseBody, Error> {
    let mut buf = BytesMut::new();
    request.encode(&mut buf, limits).map_err(Error::Encode)?;
    let io = |e: std::io::Error| crate::tls::classify_io(endpoint, &e);
    writer.write_all(&buf).await.map_err(io)?;
    writer.flush().await.map_err(io)?;
    loop {
        match reader.next().await {
            None => {
                return Err(Error::Connect {
                    endpoint: endpoint.to_owned(),
                    message: format!(
                        "the server closed the connection before answering {}",
                        request_name(&request.body)
                    ),
                })
            }
            Some(Err(e)) => return Err(read_error(endpoint, e)),
            Some(Ok(Response { id, body })) if id == request.id => return Ok(body),
            Some(Ok(Response {
                id: 0,
                body: ResponseBody::Error(e),
            })) => return Err(Error::from_reply(e)),
            Some(Ok(other)) => {
                tracing::debug!(
                    endpoint,
                    id = other.id,
                    action = body_name(&other.body),
                    "ignored before HELLO_OK"
                );
            }
        }
    }
}

fn request_name(body: &RequestBody) -> &'static str {
    match body {
        RequestBody::Hello(_) => "HELLO",
        RequestBody::Keepalive => "KEEPALIVE",
        RequestBody::Close => "CLOSE",
        RequestBody::Lock(_) => "LOCK",
        RequestBody::Cancel { .. } => "CANCEL",
        RequestBody::Release(_) => "RELEASE",
        RequestBody::Refresh(_) => "REFRESH",
        RequestBody::Query(_) => "QUERY",
        RequestBody::CheckToken(_) => "CHECK_TOKEN",
        RequestBody::Break(_) => "BREAK",
        RequestBody::List(_) => "LIST",
        RequestBody::Watch(_) => "WATCH",
        RequestBody::Unwatch(_) => "UNWATCH",
        RequestBody::Status => "STATUS",
        RequestBody::RemoveServer { .. } => "REMOVE_SERVER",
        RequestBody::PromoteServer { .. } => "PROMOTE_SERVER",
    }
}

/// Open a stream to one endpoint (TCP and TLS), within `connect_timeout`.
pub(crate) async fn open(dial: &Dial, endpoint: &str) -> Result<BoxIo, Error> {
    let connect = dial.connector.connect(endpoint.to_owned());
    match tokio::time::timeout(dial.connect_timeout, connect).await {
        Ok(result) => result,
        Err(_) => Err(Error::Connect {
            endpoint: endpoint.to_owned(),
            message: format!("not connected within {:?}", dial.connect_timeout),
        }),
    }
}

/// HELLO on an open stream, without a time bound of its own. `pin`: the
/// cluster id the server must report.
async fn hello_on(
    dial: &Dial,
    endpoint: &str,
    io: BoxIo,
    pin: Option<u128>,
) -> Result<Established, Error> {
    let (rd, mut writer) = tokio::io::split(io);
    let mut reader = FramedRead::new(rd, ResponseCodec::new(dial.limits.clone()));
    let hello = Request {
        id: 1,
        body: RequestBody::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            client_id: dial.client_id,
            session_timeout_ms: Some(millis(dial.session_timeout)),
        }),
    };
    let sent_at = Instant::now();
    let reply = exchange(endpoint, &mut reader, &mut writer, &dial.limits, hello).await?;
    let hello = match reply {
        ResponseBody::HelloOk(h) => h,
        ResponseBody::Error(e) => return Err(Error::from_reply(e)),
        other => {
            return Err(Error::Protocol {
                message: format!("{endpoint} answered HELLO with {}", body_name(&other)),
            })
        }
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(Error::Protocol {
            message: format!(
                "{endpoint} chose protocol version {}, this client speaks {PROTOCOL_VERSION}",
                hello.protocol_version
            ),
        });
    }
    if hello.session_timeout_ms == 0 {
        return Err(Error::Protocol {
            message: format!("{endpoint} granted a session timeout of 0"),
        });
    }
    if let Some(expected) = pin {
        if hello.cluster_id != expected {
            return Err(Error::ClusterMismatch {
                endpoint: endpoint.to_owned(),
                expected,
                found: hello.cluster_id,
            });
        }
    }
    Ok(Established {
        endpoint: endpoint.to_owned(),
        reader,
        writer,
        hello,
        sent_at,
    })
}

/// HELLO on an open stream, within `connect_timeout`.
pub(crate) async fn hello_within(
    dial: &Dial,
    endpoint: &str,
    io: BoxIo,
    pin: Option<u128>,
) -> Result<Established, Error> {
    let hello = hello_on(dial, endpoint, io, pin);
    match tokio::time::timeout(dial.connect_timeout, hello).await {
        Ok(result) => result,
        Err(_) => Err(Error::Connect {
            endpoint: endpoint.to_owned(),
            message: format!("no HELLO_OK within {:?}", dial.connect_timeout),
        }),
    }
}

/// Connect to one endpoint and complete HELLO, within `connect_timeout`.
/// `pin`: the cluster id the server must report.
pub(crate) async fn establish(
    dial: &Dial,
    endpoint: &str,
    pin: Option<u128>,
) -> Result<Established, Error> {
    let attempt = async {
        let io = dial.connector.connect(endpoint.to_owned()).await?;
        hello_on(dial, endpoint, io, pin).await
    };
    match tokio::time::timeout(dial.connect_timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(Error::Connect {
            endpoint: endpoint.to_owned(),
            message: format!("no HELLO_OK within {:?}", dial.connect_timeout),
        }),
    }
}

/// Try the endpoints in order; the first that completes HELLO wins. Also
/// returns the errors of the endpoints tried before it (all of them if none
/// worked). A server that refuses HELLO with UNAVAILABLE naming the serving
/// servers (a quorum-only server does) does not end the round: with
/// `learn`, the servers it names that the round does not include yet are
/// tried next, at once. (The caller adds them to its [`Endpoints`] from the
/// returned errors.)
pub(crate) async fn dial_round(
    dial: Arc<Dial>,
    endpoints: Vec<String>,
    pin: Option<u128>,
    learn: bool,
) -> (Option<Established>, Vec<(String, Error)>) {
    let mut failures = Vec::new();
    let mut seen = endpoints.clone();
    let mut queue: VecDeque<String> = endpoints.into();
    while let Some(endpoint) = queue.pop_front() {
        match establish(&dial, &endpoint, pin).await {
            Ok(est) => return (Some(est), failures),
            Err(e) => {
                match &e {
                    Error::ClusterMismatch { .. } | Error::CertificateRejected { .. } => {
                        tracing::error!(%endpoint, error = %e, "server refused")
                    }
                    Error::Unavailable { .. } => {
                        tracing::info!(%endpoint, error = %e, "server serves no clients now")
                    }
                    _ => tracing::debug!(%endpoint, error = %e, "connect failed"),
                }
                if learn {
                    // In the order listed, ahead of the rest of the round.
                    let named: Vec<String> = redirect_servers(&e)
                        .iter()
                        .filter(|s| s.serving && !s.address.is_empty())
                        .map(|s| s.address.clone())
                        .filter(|a| !seen.contains(a))
                        .collect();
                    for address in named.into_iter().rev() {
                        tracing::debug!(from = %endpoint, to = %address, "redirected");
                        seen.push(address.clone());
                        queue.push_front(address);
                    }
                }
                failures.push((endpoint, e));
            }
        }
    }
    (None, failures)
}

/// One error for a failed round: the endpoint's own if there was one, else
/// a list.
pub(crate) fn round_error(mut failures: Vec<(String, Error)>) -> Error {
    match failures.len() {
        0 => Error::NoServer { attempts: vec![] },
        1 => failures.remove(0).1,
        _ => Error::NoServer {
            attempts: failures
                .into_iter()
                .map(|(endpoint, e)| match e {
                    Error::Connect { message, .. } => format!("{endpoint}: {message}"),
                    e => format!("{endpoint}: {e}"),
                })
                .collect(),
        },
    }
}

/// Send CLOSE on an established connection and wait for its reply.
pub(crate) async fn close_established(est: &mut Established, limits: &Limits) -> Result<(), Error> {
    let req = Request {
        id: 2,
        body: RequestBody::Close,
    };
    match exchange(&est.endpoint, &mut est.reader, &mut est.writer, limits, req).await? {
        ResponseBody::Ok(_) => Ok(()),
        ResponseBody::Error(e) => Err(Error::from_reply(e)),
        other => Err(Error::Protocol {
            message: format!("CLOSE answered with {}", body_name(&other)),
        }),
    }
}

/// Why [`Task::serve`] returned.
enum Exit {
    Reconnect,
    Stop,
    /// Moved to a faster server: serve this connection (HELLO done) next.
    Switched(Box<Established>),
}

/// A move to a faster server, decided and not done yet.
struct Switch {
    endpoint: String,
    /// When it was decided (the quiet wait runs from here).
    decided: Instant,
    /// The new stream being opened (TCP + TLS), once the connection allows.
    opening: Option<BoxFuture<'static, Result<BoxIo, Error>>>,
}

/// Whether the connection allows a switch now.
#[derive(Debug, PartialEq, Eq)]
enum Readiness {
    /// Never on this connection (CLOSE sent, shutting down).
    Cancel,
    /// A request that may not be resent is in flight: wait for its reply.
    Blocked,
    /// Resendable requests are in flight: wait until then for a quiet
    /// moment, then resend them on the new connection.
    Wait(Instant),
    Ready,
}

/// How long a decided switch waits for a moment with nothing in flight but
/// keepalives and waiting LOCKs, before it goes ahead and resends the
/// (idempotent) requests in flight on the new connection.
pub(crate) const SWITCH_QUIET_WAIT: Duration = Duration::from_secs(1);

/// Aborts the task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A live connection, as the task serves it.
struct Conn {
    endpoint: String,
    reader: FramedRead<ReadHalf<BoxIo>, ResponseCodec>,
    out: mpsc::UnboundedSender<Bytes>,
    writer: JoinHandle<std::io::Result<()>>,
    inflight: InFlight<Pending>,
    background: usize,
    keepalives: usize,
    /// Send time of the latest acknowledged KEEPALIVE (or of HELLO).
    last_ack_sent: Instant,
    close_sent: bool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

/// Write what the task hands over, coalescing whatever is queued into one
/// write and one flush. Ends with the channel (shutting the stream down).
async fn write_loop(
    mut w: WriteHalf<BoxIo>,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
) -> std::io::Result<()> {
    let mut batch = BytesMut::new();
    while let Some(first) = rx.recv().await {
        batch.extend_from_slice(&first);
        while batch.len() < WRITE_BATCH_BYTES {
            match rx.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        w.write_all(&batch).await?;
        w.flush().await?;
        batch.clear();
    }
    w.shutdown().await
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Await `f` if there is one; else never.
async fn poll_opt<F: std::future::Future + Unpin>(f: Option<&mut F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// The task's settings.
pub(crate) struct Settings {
    pub request_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Scheduled probe rounds; `None`: on demand only.
    pub probe_interval: Option<Duration>,
}

/// The connection task (see the module docs).
pub(crate) struct Task {
    shared: Arc<Shared>,
    dial: Arc<Dial>,
    settings: Settings,
    cmd_rx: mpsc::UnboundedReceiver<Command>,
    cmd_closed: bool,
    /// Callers' requests waiting for a connection.
    user_queue: VecDeque<Pending>,
    /// Background requests waiting for a connection or a slot.
    background: VecDeque<Pending>,
    /// Requests answered "not now" ([`Pending::retry_on`]), each with the
    /// time it is to be sent again.
    retry_later: Vec<(Instant, Pending)>,
    lease: Lease,
    backoff: Backoff,
    endpoints: Endpoints,
    rng: StdRng,
    /// Set when the task must end (CLOSE answered, close asked while
    /// offline).
    stop: bool,
    /// When every handle is gone: the latest time to finish.
    shutdown_deadline: Option<Instant>,
    /// Probe rounds' results.
    probe_rx: mpsc::UnboundedReceiver<ProbeReport>,
    /// Whether the prober may still report.
    probe_open: bool,
    /// The servers the prober measures.
    targets: watch::Sender<Vec<String>>,
    /// The prober, until [`Task::start`] spawns it.
    prober: Option<Prober>,
    /// The running prober; ends with the task.
    _prober_task: Option<AbortOnDrop>,
    /// A CLOSE asked for while a switch's HELLO was under way.
    deferred_close: Option<oneshot::Sender<Result<(), Error>>>,
}

impl Task {
    pub fn new(
        shared: Arc<Shared>,
        dial: Arc<Dial>,
        settings: Settings,
        endpoints: Endpoints,
        cmd_rx: mpsc::UnboundedReceiver<Command>,
        probe_asks: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
    ) -> Task {
        let backoff = Backoff::new(settings.backoff_min, settings.backoff_max);
        let (targets, targets_rx) = watch::channel(endpoints.addresses());
        let (reports, probe_rx) = mpsc::unbounded_channel();
        let prober = Prober {
            dial: dial.clone(),
            targets: targets_rx,
            asks: probe_asks,
            reports,
            interval: settings.probe_interval,
        };
        Task {
            lease: Lease::new(dial.session_timeout),
            shared,
            dial,
            settings,
            cmd_rx,
            cmd_closed: false,
            user_queue: VecDeque::new(),
            background: VecDeque::new(),
            retry_later: Vec::new(),
            backoff,
            endpoints,
            rng: StdRng::from_entropy(),
            stop: false,
            shutdown_deadline: None,
            probe_rx,
            probe_open: true,
            targets,
            prober: Some(prober),
            _prober_task: None,
            deferred_close: None,
        }
    }

    /// Take over the first connection (its HELLO_OK is applied now, so the
    /// client's status is current when `connect` returns) and return the
    /// task's future: serve it, then reconnect and serve again until
    /// stopped.
    /// The prober starts here too (its first round at once).
    pub fn start(mut self, first: Established) -> impl std::future::Future<Output = ()> + Send {
        self.on_hello(&first.endpoint, &first.hello, first.sent_at);
        if let Some(prober) = self.prober.take() {
            self._prober_task = Some(AbortOnDrop(tokio::spawn(prober.run())));
        }
        self.run(first)
    }

    async fn run(mut self, first: Established) {
        let mut next = Some(first);
        loop {
            let est = match next.take() {
                Some(est) => est,
                None => match self.reconnect().await {
                    Some(est) => {
                        self.on_hello(&est.endpoint, &est.hello, est.sent_at);
                        est
                    }
                    None => break,
                },
            };
            match self.serve(est).await {
                Exit::Stop => break,
                Exit::Reconnect => {}
                Exit::Switched(est) => {
                    self.on_hello(&est.endpoint, &est.hello, est.sent_at);
                    self.publish(|s| s.switches += 1);
                    next = Some(*est);
                }
            }
        }
        self.publish(|s| {
            s.connected = false;
            s.endpoint = None;
        });
        tracing::debug!("connection task ended");
        // Dropping the queues answers their callers with Error::Closed.
    }

    fn publish(&self, f: impl FnOnce(&mut Status)) {
        f(&mut lock(&self.shared.status));
    }

    fn note_error(&self, message: String) {
        self.publish(|s| s.last_error = Some(message));
    }

    /// The endpoints changed: publish them, and tell the prober.
    fn publish_endpoints(&self) {
        let addresses = self.endpoints.addresses();
        self.targets.send_if_modified(|t| {
            let changed = *t != addresses;
            if changed {
                *t = addresses;
            }
            changed
        });
        let known = self.endpoints.snapshot();
        self.publish(|s| s.known = known);
    }

    /// Record a probe round; answer who waited for it. Returns whether it
    /// was a scheduled round (which may move the client).
    fn on_probe_report(&mut self, report: Option<ProbeReport>) -> bool {
        let Some(report) = report else {
            self.probe_open = false;
            return false;
        };
        for (endpoint, outcome) in &report.results {
            self.endpoints.record_probe(endpoint, outcome);
        }
        self.publish_endpoints();
        for waiter in report.waiters {
            let _ = waiter.send(());
        }
        report.scheduled
    }

    /// The next instant a local timer is due: lease expiry, a TTL, the
    /// shutdown deadline.
    fn next_wake(&self) -> Option<Instant> {
        let ttl = lock(&self.shared.registry).next_ttl_deadline();
        let retry = self.retry_later.iter().map(|(at, _)| *at).min();
        [
            self.lease.pending_deadline(),
            ttl,
            self.shutdown_deadline,
            retry,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Run the local timers that are due.
    fn on_wake(&mut self) {
        let now = Instant::now();
        if self.lease.poll_expired(now) {
            let fired = lock(&self.shared.registry).on_lease_expired();
            tracing::warn!(
                fired,
                "session lease expired locally: the session could not be confirmed in time; connection locks reported lost"
            );
        }
        lock(&self.shared.registry).on_ttl_due(now);
        if self.retry_later.iter().any(|(at, _)| *at <= now) {
            let (due, later) = std::mem::take(&mut self.retry_later)
                .into_iter()
                .partition(|(at, _)| *at <= now);
            self.retry_later = later;
            let mut due: Vec<(Instant, Pending)> = due;
            due.sort_by_key(|(at, _)| *at);
            for (_, p) in due {
                self.enqueue(p);
            }
        }
        if self.shutdown_deadline.is_some_and(|d| now >= d) {
            tracing::debug!("shutdown deadline passed");
            self.stop = true;
        }
    }

    /// All handles are gone: finish within the request timeout.
    fn on_commands_closed(&mut self) {
        self.cmd_closed = true;
        self.shutdown_deadline = Some(Instant::now() + self.settings.request_timeout);
    }

    fn enqueue(&mut self, p: Pending) {
        if p.is_background() {
            self.background.push_back(p);
        } else {
            self.user_queue.push_back(p);
        }
    }

    fn cancel_pending(nonce: u64) -> Pending {
        Pending {
            resend: true,
            ..Pending::internal(
                "CANCEL",
                RequestBody::Cancel { nonce },
                PendingKind::Cancel { nonce },
            )
        }
    }

    fn on_command_offline(&mut self, cmd: Option<Command>) {
        match cmd {
            None => self.on_commands_closed(),
            Some(Command::Submit(p)) => self.enqueue(*p),
            Some(Command::Cancel { nonce }) => {
                self.background.push_back(Self::cancel_pending(nonce))
            }
            Some(Command::Close(done)) => {
                let cause = lock(&self.shared.status)
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "not connected".into());
                let _ = done.send(Err(Error::NotSent {
                    action: "CLOSE",
                    cause: format!("{cause}; the session expires after its timeout"),
                }));
                self.stop = true;
            }
        }
    }

    fn offline_done(&self) -> bool {
        self.stop
            || (self.cmd_closed
                && self.user_queue.is_empty()
                && self.background.is_empty()
                && self.retry_later.is_empty())
    }

    /// Send `p` again after a pause that grows with its retries (from
    /// [`RETRY_MIN`] doubling to [`RETRY_MAX`], with jitter).
    fn retry_later(&mut self, mut p: Pending, reply: &ResponseBody) {
        let delay = Backoff::new(RETRY_MIN, RETRY_MAX)
            .after(p.retries)
            .next_delay(&mut self.rng);
        p.retries = p.retries.saturating_add(1);
        let level_warn = p.retries % RETRY_WARN_EVERY == 0;
        if level_warn {
            tracing::warn!(action = p.action, retries = p.retries, reply = ?reply, "still not done; retrying");
        } else {
            tracing::debug!(action = p.action, retries = p.retries, ?delay, reply = ?reply, "answered not now; retrying");
        }
        self.retry_later.push((Instant::now() + delay, p));
    }

    /// Dial rounds with backoff until a server completes HELLO. `None`: the
    /// task is to stop.
    async fn reconnect(&mut self) -> Option<Established> {
        loop {
            if self.offline_done() {
                return None;
            }
            let delay = self.backoff.next_delay(&mut self.rng);
            let order = self.endpoints.round_order();
            let dial = self.dial.clone();
            let pin = Some(self.shared.cluster_id);
            let learn = self.endpoints.learns();
            tracing::debug!(
                ?delay,
                round = self.backoff.attempts(),
                ?order,
                "reconnecting"
            );
            let attempt = async move {
                tokio::time::sleep(delay).await;
                dial_round(dial, order, pin, learn).await
            };
            tokio::pin!(attempt);
            loop {
                let wake = self.next_wake();
                tokio::select! {
                    (est, failures) = &mut attempt => {
                        for (_, e) in &failures {
                            self.endpoints.learn(redirect_servers(e));
                        }
                        self.publish_endpoints();
                        if let Some(est) = est {
                            if let Some((endpoint, e)) = failures.last() {
                                self.note_error(format!("{endpoint}: {e}"));
                            }
                            return Some(est);
                        }
                        let err = round_error(failures);
                        tracing::warn!(error = %err, "reconnect failed");
                        self.note_error(err.to_string());
                        break;
                    },
                    cmd = self.cmd_rx.recv(), if !self.cmd_closed => self.on_command_offline(cmd),
                    report = self.probe_rx.recv(), if self.probe_open => {
                        // Recorded for the next round's order; nothing to
                        // switch from.
                        self.on_probe_report(report);
                    },
                    _ = sleep_until_opt(wake) => self.on_wake(),
                }
                // Callers that gave up while no server was reachable were
                // told "not sent": drop their requests (and free their
                // in-flight slots).
                self.user_queue.retain(|p| !p.is_abandoned());
                if self.offline_done() {
                    return None;
                }
            }
        }
    }

    /// A new connection's HELLO_OK.
    fn on_hello(&mut self, endpoint: &str, hello: &HelloOk, sent_at: Instant) {
        let timeout = Duration::from_millis(hello.session_timeout_ms);
        if !hello.resumed {
            self.lease.reset();
        }
        self.lease.set_timeout(timeout);
        self.lease.on_ack(sent_at);
        let fired = lock(&self.shared.registry).on_hello(hello.resumed, &hello.held);
        self.backoff.reset();
        self.endpoints
            .mark_good(endpoint, hello.node_id, &hello.site);
        self.endpoints.learn(&hello.servers);
        self.publish_endpoints();
        let deadline = self.lease.deadline();
        self.publish(|s| {
            s.connected = true;
            s.endpoint = Some(endpoint.to_owned());
            s.node_id = Some(hello.node_id);
            s.site = Some(hello.site.clone());
            s.config_version = Some(hello.config_version);
            s.session_timeout = timeout;
            s.lease_deadline = deadline;
            s.servers = hello.servers.clone();
            s.connects += 1;
            if !hello.resumed {
                s.new_sessions += 1;
            }
        });
        tracing::info!(
            endpoint,
            node = hello.node_id,
            site = %hello.site,
            resumed = hello.resumed,
            held = hello.held.len(),
            waits = hello.waits.len(),
            guards_lost = fired,
            "connected"
        );
    }

    /// Serve one connection (its HELLO_OK applied) until it fails
    /// (reconnect), the client moves to a faster server, or the task stops.
    async fn serve(&mut self, est: Established) -> Exit {
        let Established {
            endpoint,
            reader,
            writer,
            sent_at,
            ..
        } = est;
        let (out, out_rx) = mpsc::unbounded_channel();
        let mut conn = Conn {
            endpoint,
            reader,
            out,
            writer: tokio::spawn(write_loop(writer, out_rx)),
            inflight: InFlight::new(2),
            background: 0,
            keepalives: 0,
            last_ack_sent: sent_at,
            close_sent: false,
        };
        let interval = keepalive_interval(self.lease.timeout());
        let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut switch: Option<Switch> = None;

        // What waited for a connection goes first, in order.
        self.flush_queues(&mut conn);

        loop {
            if self.stop {
                return Exit::Stop;
            }
            self.maybe_shutdown(&mut conn);
            let wake = self.next_wake();
            let switch_wake = self.advance_switch(&conn, &mut switch);
            tokio::select! {
                msg = conn.reader.next() => match msg {
                    Some(Ok(resp)) => {
                        if let Err(reason) = self.on_response(&mut conn, resp) {
                            return self.lose(conn, reason);
                        }
                    }
                    Some(Err(e)) => {
                        let err = read_error(&conn.endpoint, e);
                        return self.lose(conn, err.to_string());
                    }
                    None => return self.lose(conn, "the server closed the connection".into()),
                },
                result = &mut conn.writer => {
                    let reason = match result {
                        Ok(Ok(())) => "writer ended".to_string(),
                        Ok(Err(e)) => crate::tls::classify_io(&conn.endpoint, &e).to_string(),
                        Err(e) => format!("writer task failed: {e}"),
                    };
                    return self.lose(conn, reason);
                },
                cmd = self.cmd_rx.recv(), if !self.cmd_closed => self.on_command_online(&mut conn, cmd),
                _ = ticker.tick() => {
                    if let Err(reason) = self.on_tick(&mut conn, interval) {
                        return self.lose(conn, reason);
                    }
                },
                report = self.probe_rx.recv(), if self.probe_open => {
                    if self.on_probe_report(report) {
                        self.reconsider_switch(&conn, &mut switch);
                    }
                },
                opened = poll_opt(switch.as_mut().and_then(|s| s.opening.as_mut())) => {
                    if let Some(sw) = switch.take() {
                        match self.on_switch_opened(&mut conn, sw, opened).await {
                            Ok(est) => {
                                self.salvage(conn, "the client moved to a faster server");
                                return Exit::Switched(Box::new(est));
                            }
                            Err(retry) => switch = retry,
                        }
                    }
                },
                _ = sleep_until_opt(switch_wake) => {},
                _ = sleep_until_opt(wake) => {
                    self.on_wake();
                    self.send_queued(&mut conn);
                },
            }
        }
    }

    /// Send what waits in the queues (requests due for a retry), in order.
    fn send_queued(&mut self, conn: &mut Conn) {
        for p in std::mem::take(&mut self.user_queue) {
            self.send(conn, p);
        }
        self.pump_background(conn);
    }

    /// What was queued while there was no connection to send it on (or
    /// while a switch's HELLO was under way): send it now, in order.
    fn flush_queues(&mut self, conn: &mut Conn) {
        self.send_queued(conn);
        if let Some(done) = self.deferred_close.take() {
            self.on_command_online(conn, Some(Command::Close(done)));
        }
    }

    /// After a scheduled probe round: decide (again) whether to move, and
    /// where. A switch already opening its stream is left alone.
    fn reconsider_switch(&self, conn: &Conn, switch: &mut Option<Switch>) {
        if switch.as_ref().is_some_and(|s| s.opening.is_some()) {
            return;
        }
        let target = self.endpoints.switch_target(&conn.endpoint);
        match (target, switch.as_ref()) {
            (Some(t), Some(s)) if s.endpoint == t => {}
            (Some(t), _) => {
                tracing::info!(from = %conn.endpoint, to = %t, "a clearly faster server: switching when the connection allows");
                *switch = Some(Switch {
                    endpoint: t,
                    decided: Instant::now(),
                    opening: None,
                });
            }
            (None, Some(s)) => {
                tracing::debug!(to = %s.endpoint, "switch no longer worth it");
                *switch = None;
            }
            (None, None) => {}
        }
    }

    /// Whether `conn` allows moving to another server now (see
    /// [`Readiness`]): in-flight requests that are not safe to resend
    /// block it; resendable ones make it wait for a quiet moment, at most
    /// [`SWITCH_QUIET_WAIT`] after `decided`.
    fn switch_readiness(&self, conn: &Conn, decided: Instant) -> Readiness {
        if conn.close_sent || self.cmd_closed || self.stop {
            return Readiness::Cancel;
        }
        let mut quiet = true;
        for p in conn.inflight.values() {
            match (&p.kind, &p.body) {
                (PendingKind::Keepalive, _) => {}
                (PendingKind::Close(_), _) => return Readiness::Cancel,
                _ if !p.resend => return Readiness::Blocked,
                // A waiting LOCK is resent with its nonce: no reason to wait.
                (_, RequestBody::Lock(_)) => {}
                _ => quiet = false,
            }
        }
        let until = decided + SWITCH_QUIET_WAIT;
        if quiet || Instant::now() >= until {
            Readiness::Ready
        } else {
            Readiness::Wait(until)
        }
    }

    /// Move a decided switch along: start opening the new stream when the
    /// connection allows. Returns when to look again (quiet wait).
    fn advance_switch(&self, conn: &Conn, switch: &mut Option<Switch>) -> Option<Instant> {
        let sw = switch.as_mut()?;
        if sw.opening.is_some() {
            return None;
        }
        match self.switch_readiness(conn, sw.decided) {
            Readiness::Cancel => {
                *switch = None;
                None
            }
            // Replies wake the loop.
            Readiness::Blocked => None,
            Readiness::Wait(until) => Some(until),
            Readiness::Ready => {
                let dial = self.dial.clone();
                let endpoint = sw.endpoint.clone();
                sw.opening = Some(Box::pin(async move { open(&dial, &endpoint).await }));
                None
            }
        }
    }

    /// The new stream of a switch is open (or failed): HELLO on it while
    /// the old connection waits. `Ok`: move (the caller drops the old
    /// connection); `Err`: stay, with the switch to retry, if any.
    async fn on_switch_opened(
        &mut self,
        conn: &mut Conn,
        sw: Switch,
        opened: Result<BoxIo, Error>,
    ) -> Result<Established, Option<Switch>> {
        let io = match opened {
            Ok(io) => io,
            Err(e) => {
                self.switch_failed(&sw.endpoint, &e);
                return Err(None);
            }
        };
        match self.switch_readiness(conn, sw.decided) {
            Readiness::Cancel => return Err(None),
            Readiness::Blocked => {
                // A request that may not be resent went out meanwhile: try
                // again once it is answered.
                return Err(Some(Switch {
                    opening: None,
                    ..sw
                }));
            }
            Readiness::Wait(_) | Readiness::Ready => {}
        }
        match self.switch_hello(&sw.endpoint, io).await {
            Some(est) => Ok(est),
            None => {
                // Stay: what arrived for the old connection meanwhile goes
                // out on it now.
                self.flush_queues(conn);
                Err(None)
            }
        }
    }

    fn switch_failed(&mut self, endpoint: &str, e: &Error) {
        tracing::warn!(endpoint, error = %e, "could not move to the faster server; staying");
        self.endpoints.learn(redirect_servers(e));
        self.endpoints
            .demote(endpoint, Some(format!("switch failed: {e}")));
        self.publish_endpoints();
    }

    /// HELLO (same client id: the session is resumed) on the new server's
    /// stream. Meanwhile the old connection is not read, so nothing it
    /// answers can race the new HELLO_OK's list of held locks; requests
    /// and a CLOSE asked for meanwhile are queued.
    async fn switch_hello(&mut self, endpoint: &str, io: BoxIo) -> Option<Established> {
        let dial = self.dial.clone();
        let pin = Some(self.shared.cluster_id);
        let target = endpoint.to_owned();
        let hello = async move { hello_within(&dial, &target, io, pin).await };
        tokio::pin!(hello);
        loop {
            let wake = self.next_wake();
            tokio::select! {
                result = &mut hello => {
                    return match result {
                        Ok(est) => Some(est),
                        Err(e) => {
                            self.switch_failed(endpoint, &e);
                            None
                        }
                    };
                },
                cmd = self.cmd_rx.recv(), if !self.cmd_closed => self.on_command_switching(cmd),
                _ = sleep_until_opt(wake) => self.on_wake(),
            }
        }
    }

    fn on_command_switching(&mut self, cmd: Option<Command>) {
        match cmd {
            None => self.on_commands_closed(),
            Some(Command::Submit(p)) => self.enqueue(*p),
            Some(Command::Cancel { nonce }) => {
                self.background.push_back(Self::cancel_pending(nonce))
            }
            Some(Command::Close(done)) => {
                if self.deferred_close.is_some() {
                    let _ = done.send(Err(Error::Closed));
                } else {
                    self.deferred_close = Some(done);
                }
            }
        }
    }

    /// The connection is gone: requeue what may be resent, fail the rest.
    fn lose(&mut self, conn: Conn, reason: String) -> Exit {
        tracing::warn!(endpoint = %conn.endpoint, %reason, "connection lost");
        self.publish(|s| {
            s.connected = false;
            s.last_error = Some(format!("{}: {reason}", conn.endpoint));
        });
        // Dial the others first (by measured time); the next probe round
        // measures this one again.
        self.endpoints.demote(&conn.endpoint, None);
        self.publish_endpoints();
        self.salvage(conn, &reason)
    }

    /// Take the requests in flight off a connection that is being dropped:
    /// requeue what may be resent, fail the rest.
    fn salvage(&mut self, mut conn: Conn, reason: &str) -> Exit {
        let mut user = Vec::new();
        let mut background = Vec::new();
        for p in conn.inflight.drain_in_order() {
            match p.kind {
                PendingKind::Keepalive => {}
                PendingKind::Close(done) => {
                    if let Some(done) = done {
                        let _ = done.send(Err(Error::Indeterminate {
                            action: "CLOSE",
                            cause: format!("connection lost: {reason}"),
                        }));
                    }
                    self.stop = true;
                }
                _ if p.is_abandoned() => {}
                _ if p.resend => {
                    if p.is_background() {
                        background.push(p);
                    } else {
                        user.push(p);
                    }
                }
                PendingKind::User(tx) => {
                    let _ = tx.send(Err(Error::Indeterminate {
                        action: p.action,
                        cause: format!("connection lost before the reply: {reason}"),
                    }));
                }
                PendingKind::Background | PendingKind::Cancel { .. } => {
                    tracing::warn!(
                        action = p.action,
                        "background request lost with the connection"
                    );
                }
            }
        }
        for p in user.into_iter().rev() {
            self.user_queue.push_front(p);
        }
        for p in background.into_iter().rev() {
            self.background.push_front(p);
        }
        if self.stop {
            Exit::Stop
        } else {
            Exit::Reconnect
        }
    }

    fn on_command_online(&mut self, conn: &mut Conn, cmd: Option<Command>) {
        match cmd {
            None => self.on_commands_closed(),
            Some(Command::Submit(p)) if conn.close_sent => {
                if let PendingKind::User(tx) = p.kind {
                    let _ = tx.send(Err(Error::Closed));
                }
            }
            Some(Command::Submit(p)) => {
                let p = *p;
                if p.is_background() {
                    self.background.push_back(p);
                    self.pump_background(conn);
                } else {
                    self.send(conn, p);
                }
            }
            Some(Command::Cancel { nonce }) => {
                self.background.push_back(Self::cancel_pending(nonce));
                self.pump_background(conn);
            }
            Some(Command::Close(done)) => {
                if conn.close_sent {
                    let _ = done.send(Err(Error::Closed));
                } else {
                    conn.close_sent = true;
                    let p = Pending::internal(
                        "CLOSE",
                        RequestBody::Close,
                        PendingKind::Close(Some(done)),
                    );
                    self.send(conn, p);
                }
            }
        }
    }

    /// After every handle is gone and everything is answered: CLOSE.
    fn maybe_shutdown(&mut self, conn: &mut Conn) {
        if !self.cmd_closed || conn.close_sent {
            return;
        }
        let busy = conn
            .inflight
            .values()
            .any(|p| !matches!(p.kind, PendingKind::Keepalive));
        if busy
            || !self.user_queue.is_empty()
            || !self.background.is_empty()
            || !self.retry_later.is_empty()
        {
            return;
        }
        conn.close_sent = true;
        tracing::debug!("client dropped: closing the session");
        let p = Pending::internal("CLOSE", RequestBody::Close, PendingKind::Close(None));
        self.send(conn, p);
    }

    fn on_tick(&mut self, conn: &mut Conn, interval: Duration) -> Result<(), String> {
        let now = Instant::now();
        let silent = now.saturating_duration_since(conn.last_ack_sent);
        if silent >= interval * 2 + interval / 2 {
            return Err(format!(
                "no KEEPALIVE acknowledged for {silent:?} (keepalive interval {interval:?})"
            ));
        }
        if conn.keepalives < KEEPALIVES_MAX {
            conn.keepalives += 1;
            let p = Pending::internal("KEEPALIVE", RequestBody::Keepalive, PendingKind::Keepalive);
            self.send(conn, p);
        }
        Ok(())
    }

    /// Send queued background requests while there is room.
    fn pump_background(&mut self, conn: &mut Conn) {
        while conn.background < BACKGROUND_MAX {
            let Some(p) = self.background.pop_front() else {
                break;
            };
            conn.background += 1;
            self.send(conn, p);
        }
    }

    /// Encode and hand over one request.
    fn send(&mut self, conn: &mut Conn, mut p: Pending) {
        if let Some(ticket) = &p.ticket {
            if !ticket.try_send() || p.is_abandoned() {
                // The caller gave up before it was sent (it was told "not
                // sent") or while it waited to be resent.
                return;
            }
        }
        let id = conn.inflight.allocate();
        if let RequestBody::Lock(l) = &mut p.body {
            l.low_water = lock(&self.shared.nonces).low_water();
        }
        let request = Request { id, body: p.body };
        let mut buf = BytesMut::new();
        let encoded = request.encode(&mut buf, &self.dial.limits);
        p.body = request.body;
        if let Err(e) = encoded {
            if p.is_background() {
                conn.background -= 1;
            }
            if matches!(p.kind, PendingKind::Keepalive) {
                conn.keepalives -= 1;
            }
            // An encoding error is final for the request, never for the
            // connection.
            let _ = self.finish(p, Err(Error::Encode(e)));
            return;
        }
        p.first_sent_at.get_or_insert_with(Instant::now);
        // If the writer is gone, the connection is about to be declared
        // lost, and this request is salvaged with the others.
        let _ = conn.out.send(buf.freeze());
        conn.inflight.insert(id, p);
    }

    /// A message from the server. `Err`: give up this connection.
    fn on_response(&mut self, conn: &mut Conn, resp: Response) -> Result<(), String> {
        let Response { id, body } = resp;
        match body {
            ResponseBody::Lost(l) => {
                let fired = lock(&self.shared.registry).on_lost_event(
                    &l.zone,
                    &l.name,
                    l.token,
                    l.reason.into(),
                );
                tracing::info!(zone = %l.zone, name = %l.name, token = l.token, reason = ?l.reason, fired, "LOST event");
                return Ok(());
            }
            ResponseBody::Error(e) if id == 0 => {
                return Err(format!("the server reported {}: {}", e.code, e.message));
            }
            ResponseBody::Queued { position } => {
                match conn.inflight.get(id) {
                    Some(p) if matches!(p.body, RequestBody::Lock(_)) => {
                        tracing::debug!(id, position, "LOCK queued");
                    }
                    _ => tracing::warn!(id, "QUEUED for a request that is not a waiting LOCK"),
                }
                return Ok(());
            }
            ResponseBody::WatchEvent(_) => {
                tracing::warn!(id, "WATCH_EVENT without a WATCH; ignored");
                return Ok(());
            }
            _ if id == 0 => {
                return Err(format!("unexpected {} with request id 0", body_name(&body)));
            }
            _ => {}
        }
        let Some(p) = conn.inflight.remove(id) else {
            tracing::warn!(
                id,
                action = body_name(&body),
                "reply to no request in flight; ignored"
            );
            return Ok(());
        };
        if p.is_background() {
            conn.background -= 1;
        }
        if let PendingKind::Keepalive = p.kind {
            conn.keepalives -= 1;
            if let (ResponseBody::Ok(_), Some(sent)) = (&body, p.first_sent_at) {
                if sent > conn.last_ack_sent {
                    conn.last_ack_sent = sent;
                }
            }
        }
        if p.retry_on(&body) && !p.is_abandoned() {
            self.retry_later(p, &body);
            self.pump_background(conn);
            return Ok(());
        }
        let result = self.finish(p, Ok(body));
        self.pump_background(conn);
        result
    }

    /// Deliver a final outcome. `Err`: the connection must be given up.
    fn finish(&mut self, p: Pending, outcome: Result<ResponseBody, Error>) -> Result<(), String> {
        let Pending {
            action,
            body,
            kind,
            first_sent_at,
            permit,
            ..
        } = p;
        // A LOCK's definite final reply retires its nonce. An answer that
        // leaves open whether it took effect (`NOT_LEADER`, `UNAVAILABLE`,
        // `INTERNAL`: the LOCK may have committed, and been granted, after
        // all) does not: the nonce stays outstanding — so later requests'
        // low-water mark stays at or below it and the server keeps its
        // outcome — until the CANCEL that such an acquire always sends is
        // answered. Retiring it here let a CANCEL arrive after the next
        // LOCK had raised the low-water mark past it, when the server no
        // longer knew the grant it was meant to give back (chaos seed
        // 240514447: a grant leaked to a live session).
        if let RequestBody::Lock(l) = &body {
            let maybe_took_effect = matches!(
                &outcome,
                Ok(ResponseBody::Error(e))
                    if matches!(e.code, ErrorCode::NotLeader | ErrorCode::Unavailable | ErrorCode::Internal)
            );
            if !maybe_took_effect {
                lock(&self.shared.nonces).retire(l.nonce);
            }
        }
        let now = Instant::now();
        let sent_at = first_sent_at.unwrap_or(now);
        match kind {
            PendingKind::User(tx) => {
                let result = match outcome {
                    Ok(ResponseBody::Error(e)) => Err(Error::from_reply(e)),
                    Ok(reply) => {
                        let grant = self.register_grant(&body, &reply, sent_at);
                        Ok(Answer {
                            body: reply,
                            sent_at,
                            grant,
                        })
                    }
                    Err(e) => Err(e),
                };
                // If the caller is gone, the answer (and its grant's
                // registry entry) is dropped here; the CANCEL its acquire
                // sent gives such a grant back.
                let _ = tx.send(result);
                drop(permit);
                Ok(())
            }
            PendingKind::Keepalive => match outcome {
                Ok(ResponseBody::Ok(_)) => {
                    if self.lease.on_ack(sent_at) {
                        let deadline = self.lease.deadline();
                        self.publish(|s| s.lease_deadline = deadline);
                    }
                    Ok(())
                }
                Ok(ResponseBody::Error(e)) if e.code == ErrorCode::NoSession => {
                    let fired = lock(&self.shared.registry).on_session_expired();
                    self.lease.reset();
                    tracing::warn!(fired, "KEEPALIVE answered NO_SESSION: the session expired");
                    Err("the session expired (KEEPALIVE answered NO_SESSION)".into())
                }
                Ok(other) => {
                    tracing::warn!(reply = ?other, "KEEPALIVE not acknowledged");
                    Ok(())
                }
                Err(e) => {
                    tracing::warn!(error = %e, "KEEPALIVE failed");
                    Ok(())
                }
            },
            PendingKind::Cancel { nonce } => {
                lock(&self.shared.nonces).retire(nonce);
                match outcome {
                    Ok(ResponseBody::Ok(ok)) => {
                        tracing::debug!(nonce, gave_back = ?ok.token, "CANCEL acknowledged");
                    }
                    other => tracing::debug!(nonce, reply = ?other, "CANCEL answered"),
                }
                Ok(())
            }
            PendingKind::Background => {
                match outcome {
                    Ok(ResponseBody::Ok(_)) => tracing::debug!(action, "background request done"),
                    Ok(ResponseBody::Error(e))
                        if matches!(e.code, ErrorCode::Lost | ErrorCode::UnknownGrant) =>
                    {
                        tracing::debug!(action, code = %e.code, "background request: grant already gone")
                    }
                    other => tracing::warn!(action, reply = ?other, "background request failed"),
                }
                Ok(())
            }
            PendingKind::Close(done) => {
                let result = match outcome {
                    Ok(ResponseBody::Ok(_)) => Ok(()),
                    Ok(ResponseBody::Error(e)) => Err(Error::from_reply(e)),
                    Ok(other) => Err(Error::Protocol {
                        message: format!("CLOSE answered with {}", body_name(&other)),
                    }),
                    Err(e) => Err(e),
                };
                if result.is_ok() {
                    // The server released the session's connection locks.
                    lock(&self.shared.registry).on_closed();
                }
                if let Some(done) = done {
                    let _ = done.send(result);
                }
                self.stop = true;
                Ok(())
            }
        }
    }

    /// A LOCK answered with a token: register the grant, so LOST events and
    /// lease expiry reach its guard even before the caller has it.
    fn register_grant(
        &self,
        req: &RequestBody,
        reply: &ResponseBody,
        sent_at: Instant,
    ) -> Option<GrantHandle> {
        let (RequestBody::Lock(l), ResponseBody::Ok(ok)) = (req, reply) else {
            return None;
        };
        let token = ok.token?;
        let ttl_deadline = ok
            .expires_in_ms
            .map(|ms| crate::lease::ttl_believed_until(sent_at, Duration::from_millis(ms)));
        let now = Instant::now();
        let handle = GrantHandle::register(
            &self.shared.registry,
            &l.zone,
            &l.name,
            token,
            l.kind,
            ttl_deadline,
            self.lease.is_expired(now),
        );
        if ttl_deadline.is_some_and(|d| d <= now) {
            // The reply came later than the TTL can be believed (a slow
            // answer): the grant is lost before anyone sees it.
            lock(&self.shared.registry).on_ttl_due(now);
        }
        Some(handle)
    }
}

impl From<oclocks_proto::LostReason> for LostReason {
    fn from(r: oclocks_proto::LostReason) -> LostReason {
        match r {
            oclocks_proto::LostReason::SessionExpired => LostReason::SessionExpired,
            oclocks_proto::LostReason::TtlExpired => LostReason::TtlExpired,
            oclocks_proto::LostReason::Broken => LostReason::Broken,
        }
    }
}

#[cfg(test)]
mod tests;
