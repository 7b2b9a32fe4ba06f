//! [`LockGuard`]: a held grant. It exposes the fencing token, a
//! [`lost()`](LockGuard::lost) future that resolves if the grant is (or may
//! be) gone, [`refresh`](LockGuard::refresh), and
//! [`release`](LockGuard::release); dropping it releases in the background.
//!
//! When does `lost()` fire? See [`LostReason`]: the cluster said so (a LOST
//! event, a reconnect that finds the session new or the grant not listed, a
//! keepalive answered NO_SESSION), or the client can no longer vouch for it
//! (its conservative session lease ran out while it could not reach the
//! cluster, or the TTL it knows of passed). The client side always knows
//! first: a holder cut off from the cluster considers its lock lost no later
//! than the cluster frees it.

use std::future::Future;
use std::time::Duration;

use oclocks_proto::{Kind, Mode, Refresh, Release, RequestBody, ResponseBody, SigOp};

use crate::client::{unexpected, Client};
use crate::conn::{Command, Pending};
use crate::error::Error;
use crate::registry::{GrantHandle, GuardState};

/// Why a guard's grant is lost (or may be).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LostReason {
    /// The cluster expired the session (LOST event, or a KEEPALIVE answered
    /// NO_SESSION). Connection locks only.
    SessionExpired,
    /// The grant's TTL passed: told by the cluster (LOST event), or the
    /// client's own conservative TTL deadline (request send time + the
    /// `expires_in` the server reported − the lease margin,
    /// [`crate::ttl_believed_until`]) passed first.
    TtlExpired,
    /// An operator broke the lock.
    Broken,
    /// The client's conservative session lease ran out: it could not get a
    /// keepalive confirmed in time, so the cluster may free its connection
    /// locks at any moment. The grant may in fact still be held (dropping
    /// the guard still releases it).
    LeaseExpired,
    /// After a reconnect the cluster opened a new session: the old one had
    /// expired, and its connection locks with it.
    SessionNotResumed,
    /// After a reconnect the resumed session did not list this grant.
    NotHeld,
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LostReason::SessionExpired => "session expired",
            LostReason::TtlExpired => "TTL passed",
            LostReason::Broken => "broken by an operator",
            LostReason::LeaseExpired => "session lease expired locally",
            LostReason::SessionNotResumed => "session not resumed after reconnect",
            LostReason::NotHeld => "not held after reconnect",
        })
    }
}

/// The answer to a successful RELEASE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReleaseOutcome {
    /// The grant had already been released by its owner (a retried
    /// RELEASE, or a release of a grant given back earlier).
    pub already_released: bool,
}

/// A grant no guard manages any more (see [`LockGuard::keep`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldGrant {
    /// The zone.
    pub zone: String,
    /// The lock name.
    pub name: String,
    /// The fencing token.
    pub token: u64,
    /// The grant's mode.
    pub mode: Mode,
    /// The grant's kind.
    pub kind: Kind,
}

/// A held lock. Dropping it releases the grant in the background (never
/// blocks; errors are logged). Call [`LockGuard::release`] to see the
/// outcome, or [`LockGuard::keep`] to leave a static lock held.
#[derive(Debug)]
pub struct LockGuard {
    client: Client,
    grant: Option<GrantHandle>,
    held: HeldGrant,
    key_owned: bool,
    expires_in: Option<Duration>,
}

impl LockGuard {
    pub(crate) fn new(
        client: Client,
        grant: GrantHandle,
        held: HeldGrant,
        key_owned: bool,
        expires_in: Option<Duration>,
    ) -> LockGuard {
        LockGuard {
            client,
            grant: Some(grant),
            held,
            key_owned,
            expires_in,
        }
    }

    /// The fencing token: pass it to the protected resource, which rejects
    /// requests carrying an older one.
    pub fn token(&self) -> u64 {
        self.held.token
    }

    /// The zone.
    pub fn zone(&self) -> &str {
        &self.held.zone
    }

    /// The lock name.
    pub fn name(&self) -> &str {
        &self.held.name
    }

    /// Exclusive or shared.
    pub fn mode(&self) -> Mode {
        self.held.mode
    }

    /// Connection or static.
    pub fn kind(&self) -> Kind {
        self.held.kind
    }

    /// Whether RELEASE and REFRESH of this grant are signed with the owner
    /// key (static locks, and connection locks acquired `.key_owned()`).
    pub fn is_key_owned(&self) -> bool {
        self.key_owned
    }

    /// The TTL left when the server granted (or last refreshed) it; `None`
    /// = no TTL.
    pub fn expires_in(&self) -> Option<Duration> {
        self.expires_in
    }

    /// Resolves when the grant is lost or may be lost, with the reason. It
    /// never resolves for a grant that stays held or is released. The future
    /// is independent of the guard (it can be moved into another task).
    pub fn lost(&self) -> impl Future<Output = LostReason> + Send + 'static {
        let rx = self.grant.as_ref().map(GrantHandle::subscribe);
        async move {
            let Some(mut rx) = rx else {
                return std::future::pending().await;
            };
            loop {
                let state = *rx.borrow_and_update();
                if let GuardState::Lost { reason, .. } = state {
                    return reason;
                }
                if rx.changed().await.is_err() {
                    // The guard is gone (released): never lost.
                    return std::future::pending().await;
                }
            }
        }
    }

    /// The reason, if the grant is lost or may be lost.
    pub fn lost_reason(&self) -> Option<LostReason> {
        match self.grant.as_ref().map(GrantHandle::state) {
            Some(GuardState::Lost { reason, .. }) => Some(reason),
            _ => None,
        }
    }

    /// Whether [`LockGuard::lost`] has fired.
    pub fn is_lost(&self) -> bool {
        self.lost_reason().is_some()
    }

    /// Restart the grant's TTL: `ttl` from now (`Duration::ZERO` = no TTL,
    /// per PROTOCOL.md). Returns the TTL the server reports (`None` = no
    /// TTL). A key-owned grant's REFRESH is signed with a fresh counter, so
    /// it is not resent after a connection loss (that would be a replay):
    /// an [`Error::Indeterminate`] can simply be retried.
    pub async fn refresh(&mut self, ttl: Duration) -> Result<Option<Duration>, Error> {
        let ttl_ms = crate::client::ceil_millis(ttl);
        let owner_sig = self.key_owned.then(|| {
            self.client.sign(
                SigOp::Refresh,
                &self.held.zone,
                &self.held.name,
                self.held.token,
                ttl_ms,
            )
        });
        let body = RequestBody::Refresh(Refresh {
            zone: self.held.zone.clone(),
            name: self.held.name.clone(),
            token: self.held.token,
            ttl_ms,
            owner_sig,
        });
        let result = self
            .client
            .call(
                "REFRESH",
                body,
                !self.key_owned,
                Some(self.client.request_timeout()),
            )
            .await;
        match result {
            Ok(answer) => match answer.body {
                ResponseBody::Ok(ok) => {
                    let expires = ok.expires_in_ms.map(Duration::from_millis);
                    self.expires_in = expires;
                    if let Some(g) = &self.grant {
                        g.with_registry(|r, t| {
                            r.set_ttl_deadline(
                                t,
                                expires
                                    .map(|e| crate::lease::ttl_believed_until(answer.sent_at, e)),
                            )
                        });
                    }
                    Ok(expires)
                }
                other => Err(unexpected("REFRESH", &other)),
            },
            Err(e) => Err(self.note_gone(e)),
        }
    }

    /// Release the grant and report the outcome. If the reply cannot be
    /// had (connection lost, timeout), the release is also queued in the
    /// background, where it is retried (RELEASE is idempotent).
    pub async fn release(mut self) -> Result<ReleaseOutcome, Error> {
        let Some(grant) = self.grant.take() else {
            return Ok(ReleaseOutcome {
                already_released: true,
            });
        };
        match grant.state() {
            GuardState::Released => {
                return Ok(ReleaseOutcome {
                    already_released: true,
                })
            }
            GuardState::Lost {
                reason,
                ended: true,
            } => {
                return Err(Error::Lost {
                    reason: Some(reason),
                    message: "the cluster ended this grant earlier".into(),
                })
            }
            _ => {}
        }
        let result = self
            .client
            .call(
                "RELEASE",
                self.release_body(),
                true,
                Some(self.client.request_timeout()),
            )
            .await;
        match result {
            Ok(answer) => match answer.body {
                ResponseBody::Ok(ok) => {
                    grant.with_registry(|r, t| r.mark_released(t));
                    Ok(ReleaseOutcome {
                        already_released: ok.already_released,
                    })
                }
                other => Err(unexpected("RELEASE", &other)),
            },
            Err(Error::Lost { message, .. }) => {
                let reason = match grant.state() {
                    GuardState::Lost { reason, .. } => Some(reason),
                    _ => None,
                };
                Err(Error::Lost { reason, message })
            }
            Err(
                e @ (Error::Indeterminate { .. }
                | Error::NotSent { .. }
                | Error::NotLeader { .. }
                | Error::Unavailable { .. }),
            ) => {
                // Not done (or not known to be): keep trying in the
                // background, or the grant stays held by this live session.
                self.release_in_background();
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Stop managing the grant: dropping the guard no longer releases it,
    /// and `lost()` no longer fires. For static locks meant to outlive this
    /// process (release them later with
    /// [`Client::release_static`](crate::Client::release_static)).
    pub fn keep(mut self) -> HeldGrant {
        self.grant = None;
        self.held.clone()
    }

    fn release_body(&self) -> RequestBody {
        let owner_sig = self.key_owned.then(|| {
            self.client.sign(
                SigOp::Release,
                &self.held.zone,
                &self.held.name,
                self.held.token,
                0,
            )
        });
        RequestBody::Release(Release {
            zone: self.held.zone.clone(),
            name: self.held.name.clone(),
            token: self.held.token,
            owner_sig,
        })
    }

    fn release_in_background(&self) {
        let p = Pending::background("RELEASE", self.release_body());
        self.client.send_command(Command::Submit(Box::new(p)));
    }

    /// A refresh that says the grant is gone updates the guard's state.
    fn note_gone(&self, e: Error) -> Error {
        let reason = match &e {
            Error::Lost { .. } => Some(LostReason::NotHeld),
            Error::UnknownGrant { .. } => Some(LostReason::NotHeld),
            _ => None,
        };
        if let (Some(reason), Some(g)) = (reason, &self.grant) {
            g.with_registry(|r, t| r.mark_ended(t, reason));
        }
        e
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let Some(grant) = self.grant.take() else {
            return;
        };
        match grant.state() {
            GuardState::Held | GuardState::Lost { ended: false, .. } => {
                tracing::debug!(zone = %self.held.zone, name = %self.held.name, token = self.held.token, "guard dropped: releasing in the background");
                self.release_in_background();
            }
            GuardState::Lost { ended: true, .. } | GuardState::Released => {}
        }
    }
}
