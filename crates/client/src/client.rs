//! [`Client`]: the handle applications use, its [`LockBuilder`], and the
//! plumbing from a call to the connection task and back.
//!
//! Each call becomes a [`Pending`] on the task's channel, holding a slot of
//! the in-flight semaphore and a oneshot for its final reply; the call waits
//! with its timeout. A caller that gives up before its request was sent is
//! told [`Error::NotSent`] (and the request is never sent); one that gives up
//! after is told [`Error::Indeterminate`]. An abandoned acquire (future
//! dropped, or timed out) sends CANCEL with its nonce, which also gives back
//! a grant that raced the cancel, so no grant leaks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use oclocks_proto::{
    Break, CheckToken, Holder, Kind, List, Lock, LockInfo, LockRef, Mode, OwnerSig, Refresh,
    Release, RequestBody, ResponseBody, ServerInfo, SigOp, StatusOk, WAIT_FOREVER,
};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::config::{ClientConfig, RESERVED_IN_FLIGHT};
use crate::conn::{
    body_name, close_established, dial_round, round_error, Answer, Command, Connector, Dial,
    Pending, PendingKind, Settings, Shared, Status, Task, Ticket,
};
use crate::endpoints::{redirect_servers, Endpoints, ServerStatus};
use crate::error::Error;
use crate::guard::{HeldGrant, LockGuard, LostReason, ReleaseOutcome};
use crate::identity::{load_or_create_client_id, unix_micros, Counter, OwnerKey};
use crate::nonce::Nonces;
use crate::registry::{lock, Registry};
use crate::tls::TlsConnector;

/// A connected client: one session, kept alive in the background, shared by
/// every clone of the handle. Cheap to clone.
///
/// The session ends when [`Client::close`] is called, or when every handle
/// and every [`LockGuard`] is dropped (pending background releases are
/// finished first, within the request timeout).
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    cmd_tx: mpsc::UnboundedSender<Command>,
    permits: Arc<Semaphore>,
    owner_key: OwnerKey,
    counter: Counter,
    owner_ids: AtomicU64,
    request_timeout: Duration,
    /// Asks the prober for a round.
    probe_tx: mpsc::UnboundedSender<oneshot::Sender<()>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("client_id", &format_args!("{:032x}", self.shared.client_id))
            .field(
                "cluster_id",
                &format_args!("{:032x}", self.shared.cluster_id),
            )
            .finish_non_exhaustive()
    }
}

/// What the client knows about its connection and session.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SessionInfo {
    /// This client's id.
    pub client_id: u128,
    /// The cluster id pinned at the first HELLO.
    pub cluster_id: u128,
    /// Whether a connection is up (HELLO done).
    pub connected: bool,
    /// The server connected to.
    pub endpoint: Option<String>,
    /// Its node id.
    pub node_id: Option<u64>,
    /// Its site.
    pub site: Option<String>,
    /// Its applied shared-config version at HELLO.
    pub config_version: Option<u64>,
    /// The session timeout the server granted.
    pub session_timeout: Duration,
    /// How long the client's conservative lease still runs (`None`: expired
    /// or unknown).
    pub lease_remaining: Option<Duration>,
    /// The last connection error.
    pub last_error: Option<String>,
    /// The servers the last HELLO_OK listed.
    pub servers: Vec<ServerInfo>,
    /// Every server the client knows (configured and learned), with the
    /// measured round-trip times and the primary marked (as
    /// [`Client::servers`]).
    pub known_servers: Vec<ServerStatus>,
    /// Connections established (HELLO_OK received) so far.
    pub connects: u64,
    /// How many of them started a new session (the first one included).
    pub new_sessions: u64,
    /// How many connections were moves to a clearly faster server (each
    /// resumed the session; they count in `connects` too).
    pub switches: u64,
}

/// Who holds a lock and how many wait (QUERY).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockState {
    /// The holders; empty = free.
    pub holders: Vec<Holder>,
    /// Waiters queued.
    pub waiters: u32,
}

/// One page of a zone's locks (LIST).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockPage {
    /// The locks of this page.
    pub locks: Vec<LockInfo>,
    /// Pass it as the cursor for the next page; `None` = last page.
    pub next_cursor: Option<String>,
}

/// `known` with the connected endpoint marked primary.
fn with_primary(
    mut known: Vec<ServerStatus>,
    connected: bool,
    endpoint: Option<&str>,
) -> Vec<ServerStatus> {
    for k in &mut known {
        k.primary = connected && endpoint == Some(k.address.as_str());
    }
    known
}

/// A duration in whole milliseconds, rounded up (so a sub-millisecond
/// duration never turns into the `0` that means "none").
pub(crate) fn ceil_millis(d: Duration) -> u64 {
    let ms = d.as_millis() + u128::from(d.subsec_nanos() % 1_000_000 != 0);
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// The error for a reply of the wrong kind.
pub(crate) fn unexpected(action: &str, body: &ResponseBody) -> Error {
    Error::Protocol {
        message: format!("{action} answered with {}", body_name(body)),
    }
}

fn expect_ok(action: &str, answer: Answer) -> Result<oclocks_proto::OkReply, Error> {
    match answer.body {
        ResponseBody::Ok(ok) => Ok(ok),
        other => Err(unexpected(action, &other)),
    }
}

impl Client {
    /// Connect: load or make the client id and owner key, reach the first
    /// endpoint that answers (each tried once, in order), HELLO, and start
    /// the background task. Fails if no endpoint completes HELLO.
    ///
    /// If the server resumes a session of this client id (a persisted
    /// `client_id_file` of an earlier process), that session is closed first
    /// — releasing the connection locks and waits no guard of this process
    /// owns — and a new one is opened. Static locks survive it.
    pub async fn connect(config: ClientConfig) -> Result<Client, Error> {
        config.validate()?;
        let connector = TlsConnector::new(&config)?;
        Client::connect_with(config, Arc::new(connector)).await
    }

    /// [`Client::connect`] over any [`Connector`].
    pub(crate) async fn connect_with(
        config: ClientConfig,
        connector: Arc<dyn Connector>,
    ) -> Result<Client, Error> {
        config.validate()?;
        let client_id = load_or_create_client_id(config.client_id_file.as_deref())?;
        let owner_key = match &config.owner_key_file {
            Some(path) => OwnerKey::load_or_create(path)?,
            None => OwnerKey::generate(),
        };
        let dial = Arc::new(Dial {
            connector,
            client_id,
            session_timeout: config.session_timeout,
            connect_timeout: config.connect_timeout,
            limits: config.limits.clone(),
        });
        let mut endpoints = Endpoints::new(config.endpoints.clone(), config.learn_endpoints);
        let learn = config.learn_endpoints;
        // Servers that answer but cannot take a session yet (NOT_LEADER,
        // UNAVAILABLE: an election, a cluster still forming) are asked
        // again, with the reconnect backoff, for up to `connect_timeout`
        // from the first attempt. Any other failure of a whole round ends
        // `connect` at once.
        let started = Instant::now();
        let mut backoff = Backoff::new(config.reconnect_backoff_min, config.reconnect_backoff_max);
        let mut est = loop {
            let (est, failures) =
                dial_round(dial.clone(), endpoints.round_order(), None, learn).await;
            for (_, e) in &failures {
                endpoints.learn(redirect_servers(e));
            }
            if let Some(est) = est {
                break est;
            }
            let no_leader_yet = !failures.is_empty()
                && failures
                    .iter()
                    .all(|(_, e)| matches!(e, Error::NotLeader { .. } | Error::Unavailable { .. }));
            let delay = backoff.next_delay(&mut rand::thread_rng());
            if !no_leader_yet || started.elapsed() + delay >= config.connect_timeout {
                return Err(round_error(failures));
            }
            tracing::debug!(
                ?delay,
                "no server can open a session yet (no leader?): trying the endpoints again"
            );
            tokio::time::sleep(delay).await;
        };
        if est.hello.resumed {
            tracing::info!(
                client_id = format_args!("{client_id:032x}"),
                held = est.hello.held.len(),
                waits = est.hello.waits.len(),
                "closing the session of an earlier process with this client id"
            );
            close_established(&mut est, &config.limits).await?;
            let pin = Some(est.hello.cluster_id);
            let (again, failures) =
                dial_round(dial.clone(), endpoints.round_order(), pin, learn).await;
            for (_, e) in &failures {
                endpoints.learn(redirect_servers(e));
            }
            est = match again {
                Some(est) => est,
                None => return Err(round_error(failures)),
            };
            if est.hello.resumed {
                return Err(Error::Protocol {
                    message: "the server resumed a session that was just closed".into(),
                });
            }
        }
        let shared = Arc::new(Shared {
            client_id,
            cluster_id: est.hello.cluster_id,
            registry: Arc::new(std::sync::Mutex::new(Registry::default())),
            nonces: std::sync::Mutex::new(Nonces::new(unix_micros())),
            status: std::sync::Mutex::new(Status::default()),
        });
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let settings = Settings {
            request_timeout: config.request_timeout,
            backoff_min: config.reconnect_backoff_min,
            backoff_max: reconnect_cap(&config),
            probe_interval: Some(config.probe_interval).filter(|d| !d.is_zero()),
        };
        let (probe_tx, probe_rx) = mpsc::unbounded_channel();
        let task = Task::new(shared.clone(), dial, settings, endpoints, cmd_rx, probe_rx);
        tokio::spawn(task.start(est));
        Ok(Client {
            inner: Arc::new(Inner {
                shared,
                cmd_tx,
                permits: Arc::new(Semaphore::new(
                    config.requests_in_flight_max - RESERVED_IN_FLIGHT,
                )),
                owner_key,
                counter: Counter::default(),
                owner_ids: AtomicU64::new(1),
                request_timeout: config.request_timeout,
                probe_tx,
            }),
        })
    }

    /// Start building an acquire of `name` in `zone`.
    pub fn lock(&self, zone: impl Into<String>, name: impl Into<String>) -> LockBuilder {
        LockBuilder {
            client: self.clone(),
            zone: zone.into(),
            name: name.into(),
            mode: Mode::Exclusive,
            kind: Kind::Connection,
            key_owned: false,
            ttl: Duration::ZERO,
            wait: None,
            lock_delay: Duration::ZERO,
            owner: 0,
        }
    }

    /// This client's id (the session's name).
    pub fn client_id(&self) -> u128 {
        self.inner.shared.client_id
    }

    /// The cluster id pinned at the first HELLO.
    pub fn cluster_id(&self) -> u128 {
        self.inner.shared.cluster_id
    }

    /// The owner key's public half (stored with key-owned locks).
    pub fn owner_public_key(&self) -> [u8; 32] {
        self.inner.owner_key.public_key()
    }

    /// A fresh owner id, for nested acquisitions that should count as one
    /// owner in deadlock detection ([`LockBuilder::owner`]).
    pub fn new_owner_id(&self) -> u64 {
        self.inner.owner_ids.fetch_add(1, Ordering::Relaxed)
    }

    /// The connection and session as the client sees them now.
    pub fn session(&self) -> SessionInfo {
        let s = lock(&self.inner.shared.status).clone();
        let now = Instant::now();
        let known_servers = with_primary(s.known, s.connected, s.endpoint.as_deref());
        SessionInfo {
            client_id: self.client_id(),
            cluster_id: self.cluster_id(),
            connected: s.connected,
            endpoint: s.endpoint,
            node_id: s.node_id,
            site: s.site,
            config_version: s.config_version,
            session_timeout: s.session_timeout,
            lease_remaining: s
                .lease_deadline
                .and_then(|d| d.checked_duration_since(now))
                .filter(|d| !d.is_zero()),
            last_error: s.last_error,
            known_servers,
            servers: s.servers,
            connects: s.connects,
            new_sessions: s.new_sessions,
            switches: s.switches,
        }
    }

    /// Every server the client knows — configured, and learned from
    /// HELLO_OK and UNAVAILABLE replies — with the round-trip time its last
    /// probe measured, and the one connected to now marked `primary`.
    /// Measurements run in the background (see
    /// [`ClientConfig::probe_interval`]); [`Client::probe_servers`]
    /// measures now.
    pub fn servers(&self) -> Vec<ServerStatus> {
        let s = lock(&self.inner.shared.status);
        with_primary(s.known.clone(), s.connected, s.endpoint.as_deref())
    }

    /// Measure every known server now (a probe round: a few STATUS round
    /// trips each, one server at a time, each bounded by `connect_timeout`)
    /// and return [`Client::servers`] with the results. Measuring alone
    /// never moves the client; the scheduled rounds do.
    pub async fn probe_servers(&self) -> Vec<ServerStatus> {
        let (tx, rx) = oneshot::channel();
        if self.inner.probe_tx.send(tx).is_ok() {
            // An error: the prober is gone with the connection task; report
            // what is known.
            let _ = rx.await;
        }
        self.servers()
    }

    /// Who holds the lock and how many wait.
    pub async fn query(&self, zone: &str, name: &str) -> Result<LockState, Error> {
        let body = RequestBody::Query(LockRef {
            zone: zone.into(),
            name: name.into(),
        });
        let ok = expect_ok("QUERY", self.call_default("QUERY", body, true).await?)?;
        Ok(LockState {
            holders: ok.holders,
            waiters: ok.waiters.unwrap_or(0),
        })
    }

    /// Whether `token` is the lock's current grant (what a protected
    /// resource asks before accepting a request fenced with it).
    pub async fn check_token(&self, zone: &str, name: &str, token: u64) -> Result<bool, Error> {
        let body = RequestBody::CheckToken(CheckToken {
            zone: zone.into(),
            name: name.into(),
            token,
        });
        let ok = expect_ok(
            "CHECK_TOKEN",
            self.call_default("CHECK_TOKEN", body, true).await?,
        )?;
        ok.token_current.ok_or_else(|| Error::Protocol {
            message: "CHECK_TOKEN answered without TOKEN_CURRENT".into(),
        })
    }

    /// One page of the zone's locks, after `cursor` (the previous page's
    /// `next_cursor`); `page_size` 0 = the server's default.
    pub async fn list(
        &self,
        zone: &str,
        cursor: Option<&str>,
        page_size: u32,
    ) -> Result<LockPage, Error> {
        let body = RequestBody::List(List {
            zone: zone.into(),
            start_after: cursor.map(str::to_owned),
            page_size,
        });
        let ok = expect_ok("LIST", self.call_default("LIST", body, true).await?)?;
        Ok(LockPage {
            locks: ok.locks,
            next_cursor: ok.next_cursor,
        })
    }

    /// Break the lock (an administrator's request): end its current
    /// grant(s), or only `expected_token` if it is current (then a retried
    /// BREAK never breaks the next holder, and it is resent after a
    /// connection loss; without a token it is not, and a lost reply is
    /// [`Error::Indeterminate`]). Returns the token broken, if the server
    /// names one.
    pub async fn break_lock(
        &self,
        zone: &str,
        name: &str,
        expected_token: Option<u64>,
    ) -> Result<Option<u64>, Error> {
        let body = RequestBody::Break(Break {
            zone: zone.into(),
            name: name.into(),
            token: expected_token,
        });
        let ok = expect_ok(
            "BREAK",
            self.call_default("BREAK", body, expected_token.is_some())
                .await?,
        )?;
        Ok(ok.token)
    }

    /// Make learner `node_id` a voter (PROMOTE_SERVER; administrators): the
    /// administrator's approval of a node that joined without being listed
    /// in the servers' `voters` or `peers`.
    pub async fn promote_server(&self, node_id: u64) -> Result<(), Error> {
        let body = RequestBody::PromoteServer { node_id };
        expect_ok(
            "PROMOTE_SERVER",
            self.call_default("PROMOTE_SERVER", body, true).await?,
        )?;
        Ok(())
    }

    /// Remove server `node_id` from the cluster (REMOVE_SERVER; the
    /// client's identity must be an administrator). Refused with
    /// `INVALID` when the remaining voters could not form a quorum.
    pub async fn remove_server(&self, node_id: u64) -> Result<(), Error> {
        let body = RequestBody::RemoveServer { node_id };
        expect_ok(
            "REMOVE_SERVER",
            self.call_default("REMOVE_SERVER", body, false).await?,
        )?;
        Ok(())
    }

    /// The connected server's view of itself and the cluster.
    pub async fn status(&self) -> Result<StatusOk, Error> {
        match self
            .call_default("STATUS", RequestBody::Status, true)
            .await?
            .body
        {
            ResponseBody::StatusOk(s) => Ok(s),
            other => Err(unexpected("STATUS", &other)),
        }
    }

    /// Release a static (key-owned) lock by token with this client's owner
    /// key — for a process that restarted with its key file.
    pub async fn release_static(
        &self,
        zone: &str,
        name: &str,
        token: u64,
    ) -> Result<ReleaseOutcome, Error> {
        let owner_sig = Some(self.sign(SigOp::Release, zone, name, token, 0));
        let body = RequestBody::Release(Release {
            zone: zone.into(),
            name: name.into(),
            token,
            owner_sig,
        });
        let ok = expect_ok("RELEASE", self.call_default("RELEASE", body, true).await?)?;
        Ok(ReleaseOutcome {
            already_released: ok.already_released,
        })
    }

    /// Restart a static (key-owned) lock's TTL by token with this client's
    /// owner key; `Duration::ZERO` = no TTL. Returns the TTL the server
    /// reports. Signed with a fresh counter, so not resent after a
    /// connection loss: retry an [`Error::Indeterminate`].
    pub async fn refresh_static(
        &self,
        zone: &str,
        name: &str,
        token: u64,
        ttl: Duration,
    ) -> Result<Option<Duration>, Error> {
        let ttl_ms = ceil_millis(ttl);
        let owner_sig = Some(self.sign(SigOp::Refresh, zone, name, token, ttl_ms));
        let body = RequestBody::Refresh(Refresh {
            zone: zone.into(),
            name: name.into(),
            token,
            ttl_ms,
            owner_sig,
        });
        let ok = expect_ok("REFRESH", self.call_default("REFRESH", body, false).await?)?;
        Ok(ok.expires_in_ms.map(Duration::from_millis))
    }

    /// End the session (CLOSE): the cluster releases its connection locks
    /// and cancels its waits; static locks stay held. Then the background
    /// task stops, and every call on any clone fails with
    /// [`Error::Closed`].
    pub async fn close(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmd_tx
            .send(Command::Close(tx))
            .map_err(|_| Error::Closed)?;
        match tokio::time::timeout(self.inner.request_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Indeterminate {
                action: "CLOSE",
                cause: format!("no reply within {:?}", self.inner.request_timeout),
            }),
        }
    }

    #[cfg(test)]
    pub(crate) fn inner_shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        self.inner.request_timeout
    }

    pub(crate) fn send_command(&self, cmd: Command) {
        // If the task is gone, so is the session: nothing left to do.
        let _ = self.inner.cmd_tx.send(cmd);
    }

    /// Sign for a key-owned lock with a fresh counter.
    pub(crate) fn sign(
        &self,
        op: SigOp,
        zone: &str,
        name: &str,
        token_or_nonce: u64,
        ttl_ms: u64,
    ) -> OwnerSig {
        let counter = self.inner.counter.next();
        self.inner.owner_key.sign(
            self.cluster_id(),
            op,
            zone,
            name,
            token_or_nonce,
            ttl_ms,
            counter,
        )
    }

    async fn call_default(
        &self,
        action: &'static str,
        body: RequestBody,
        resend: bool,
    ) -> Result<Answer, Error> {
        self.call(action, body, resend, Some(self.inner.request_timeout))
            .await
    }

    /// Send a request and wait for its final reply, at most `timeout`
    /// (`None`: as long as it takes).
    pub(crate) async fn call(
        &self,
        action: &'static str,
        body: RequestBody,
        resend: bool,
        timeout: Option<Duration>,
    ) -> Result<Answer, Error> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let acquire = self.inner.permits.clone().acquire_owned();
        let permit = match deadline {
            Some(d) => match tokio::time::timeout_at(d, acquire).await {
                Ok(p) => p,
                Err(_) => {
                    return Err(Error::NotSent {
                        action,
                        cause: "every in-flight slot stayed busy (requests_in_flight_max)".into(),
                    })
                }
            },
            None => acquire.await,
        }
        .map_err(|_| Error::Closed)?;
        let (tx, rx) = oneshot::channel();
        let ticket = Arc::new(Ticket::default());
        let pending = Pending {
            action,
            body,
            kind: PendingKind::User(tx),
            resend,
            ticket: Some(ticket.clone()),
            permit: Some(permit),
            first_sent_at: None,
            retries: 0,
        };
        self.inner
            .cmd_tx
            .send(Command::Submit(Box::new(pending)))
            .map_err(|_| Error::Closed)?;
        let reply = match deadline {
            Some(d) => match tokio::time::timeout_at(d, rx).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(if ticket.try_abandon() {
                        let cause = lock(&self.inner.shared.status)
                            .last_error
                            .clone()
                            .unwrap_or_else(|| "not connected".into());
                        Error::NotSent { action, cause }
                    } else {
                        Error::Indeterminate {
                            action,
                            cause: format!("no reply within {:?}", timeout.unwrap_or_default()),
                        }
                    })
                }
            },
            None => rx.await,
        };
        reply.map_err(|_| Error::Closed)?
    }
}

/// Sends CANCEL for an acquire's nonce unless disarmed: an acquire that
/// ends without its final reply (future dropped, local timeout) must not
/// leave a wait or a grant behind.
struct CancelOnDrop {
    client: Client,
    nonce: u64,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            tracing::debug!(nonce = self.nonce, "acquire abandoned: cancelling");
            self.client
                .send_command(Command::Cancel { nonce: self.nonce });
        }
    }
}

/// Builds an acquire: `client.lock(zone, name).ttl(..).wait(..).acquire()`.
#[derive(Debug)]
#[must_use = "nothing is acquired until .acquire().await"]
pub struct LockBuilder {
    client: Client,
    zone: String,
    name: String,
    mode: Mode,
    kind: Kind,
    key_owned: bool,
    ttl: Duration,
    /// `None` = forever.
    wait: Option<Duration>,
    lock_delay: Duration,
    owner: u64,
}

impl LockBuilder {
    /// A shared (read) lock: many shared holders, no exclusive one.
    pub fn shared(mut self) -> Self {
        self.mode = Mode::Shared;
        self
    }

    /// An exclusive (write) lock — the default.
    pub fn exclusive(mut self) -> Self {
        self.mode = Mode::Exclusive;
        self
    }

    /// A static lock: survives the session, owned by this client's owner
    /// key (LOCK, RELEASE and REFRESH are signed).
    pub fn static_lock(mut self) -> Self {
        self.kind = Kind::Static;
        self.key_owned = true;
        self
    }

    /// A connection lock that also carries the owner key, so RELEASE and
    /// REFRESH must be signed (static locks always are).
    pub fn key_owned(mut self) -> Self {
        self.key_owned = true;
        self
    }

    /// Time to live: the cluster ends the grant this long after it is
    /// granted (or last refreshed). `Duration::ZERO` = none (the default).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long to wait for the lock: `Duration::ZERO` = try once (fail with
    /// [`Error::Locked`] if held). Default: forever.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// Wait until granted (the default).
    pub fn wait_forever(mut self) -> Self {
        self.wait = None;
        self
    }

    /// Try once: `.wait(Duration::ZERO)`.
    pub fn try_once(self) -> Self {
        self.wait(Duration::ZERO)
    }

    /// After an involuntary loss of this grant (session expired, TTL,
    /// broken), nobody gets the lock for this long. `Duration::ZERO` = none
    /// (the default).
    pub fn lock_delay(mut self, delay: Duration) -> Self {
        self.lock_delay = delay;
        self
    }

    /// The owner, for nested acquisitions that count as one party in
    /// deadlock detection (from [`Client::new_owner_id`]). Default: this
    /// acquire is its own owner.
    pub fn owner(mut self, owner_id: u64) -> Self {
        self.owner = owner_id;
        self
    }

    /// Acquire. Waits up to the wait bound (the server decides; the client
    /// gives up itself after the wait bound plus the request timeout, with
    /// [`Error::AcquireTimeout`]). Survives reconnects: the LOCK is resent
    /// with the same nonce. Dropping the future cancels the wait.
    pub async fn acquire(self) -> Result<LockGuard, Error> {
        let LockBuilder {
            client,
            zone,
            name,
            mode,
            kind,
            key_owned,
            ttl,
            wait,
            lock_delay,
            owner,
        } = self;
        if zone.is_empty() || name.is_empty() {
            return Err(Error::Invalid {
                message: "zone and lock name must not be empty".into(),
            });
        }
        let ttl_ms = ceil_millis(ttl);
        // Each acquire is its own owner unless told otherwise: to the engine
        // owner 0 is an ordinary id, so sending it for every acquire would
        // make all tasks of one client one owner (a second acquire of a held
        // lock would be "held by itself", and deadlock detection would merge
        // unrelated acquires).
        let owner = if owner == 0 {
            client.new_owner_id()
        } else {
            owner
        };
        let wait_ms = wait.map_or(WAIT_FOREVER, ceil_millis);
        let nonce = lock(&client.inner.shared.nonces).allocate();
        let mut cancel = CancelOnDrop {
            client: client.clone(),
            nonce,
            armed: true,
        };
        let owner_sig = key_owned.then(|| client.sign(SigOp::Lock, &zone, &name, nonce, ttl_ms));
        let body = RequestBody::Lock(Lock {
            zone: zone.clone(),
            name: name.clone(),
            mode,
            kind,
            ttl_ms,
            wait_ms,
            lock_delay_ms: ceil_millis(lock_delay),
            owner_id: owner,
            nonce,
            low_water: 0,
            owner_sig,
        });
        let started = Instant::now();
        let timeout = match wait_ms {
            WAIT_FOREVER => None,
            _ => wait.map(|w| w.saturating_add(client.request_timeout())),
        };
        let result = client.call("LOCK", body, true, timeout).await;
        let answer = match result {
            Ok(answer) => answer,
            Err(Error::Indeterminate { .. }) => {
                // Timed out after sending: `cancel` sends CANCEL.
                return Err(Error::AcquireTimeout {
                    waited: started.elapsed(),
                });
            }
            Err(e @ (Error::NotSent { .. } | Error::Closed)) => return Err(e),
            // May have taken effect (a forwarded LOCK committed before the
            // leader changed; a server fault): `cancel` sends CANCEL.
            Err(
                e @ (Error::Internal { .. } | Error::NotLeader { .. } | Error::Unavailable { .. }),
            ) => return Err(e),
            Err(e) => {
                // A final ERROR: nothing is held, nothing to cancel.
                cancel.armed = false;
                return Err(e);
            }
        };
        let ResponseBody::Ok(ok) = &answer.body else {
            return Err(unexpected("LOCK", &answer.body));
        };
        let (Some(token), Some(grant)) = (ok.token, answer.grant) else {
            return Err(Error::Protocol {
                message: "LOCK answered OK without a TOKEN".into(),
            });
        };
        cancel.armed = false;
        let expires_in = ok.expires_in_ms.map(Duration::from_millis);
        tracing::debug!(%zone, %name, token, "acquired");
        let guard = LockGuard::new(
            client,
            grant,
            HeldGrant {
                zone,
                name,
                token,
                mode,
                kind,
            },
            key_owned,
            expires_in,
        );
        // A grant that the client can no longer believe in by the time its
        // reply arrived (its TTL or the session lease ran out meanwhile:
        // a slow answer) is never handed out: another client may hold the
        // lock already. Dropping the guard releases it in the background.
        if let Some(reason) = guard.lost_reason() {
            tracing::warn!(%token, ?reason, "granted, but lost before the reply arrived");
            drop(guard);
            return Err(Error::Lost {
                reason: Some(reason),
                message: format!(
                    "the lock was granted (token {token}) but its {} ran out before the \
                     reply arrived; it is released",
                    match reason {
                        LostReason::TtlExpired => "TTL",
                        _ => "session lease",
                    }
                ),
            });
        }
        Ok(guard)
    }
}

/// The reconnect backoff's largest delay: `reconnect_backoff_max`, but at
/// most a quarter of the session timeout (never below
/// `reconnect_backoff_min`). The session outlives a disconnect by its
/// timeout; a client that sleeps most of it between rounds can come back
/// too late — e.g. just after every server was stalled for longer than the
/// backoff's ceiling — so it tries at least about four times within it.
fn reconnect_cap(config: &ClientConfig) -> Duration {
    config
        .reconnect_backoff_max
        .min(config.session_timeout / 4)
        .max(config.reconnect_backoff_min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_round_up() {
        assert_eq!(ceil_millis(Duration::ZERO), 0);
        assert_eq!(ceil_millis(Duration::from_micros(1)), 1);
        assert_eq!(ceil_millis(Duration::from_millis(1500)), 1500);
        assert_eq!(ceil_millis(Duration::from_micros(1500)), 2);
        assert_eq!(ceil_millis(Duration::MAX), u64::MAX);
    }

    #[test]
    fn tickets_decide_once() {
        let t = Ticket::default();
        assert!(t.try_send());
        assert!(t.try_send(), "resending is still sending");
        assert!(
            !t.try_abandon(),
            "sent: the caller's timeout is indeterminate"
        );
        let t = Ticket::default();
        assert!(t.try_abandon());
        assert!(!t.try_send(), "abandoned: never sent");
    }
}
