//! `oclocks-client`: the async (tokio) Rust client of OpenCluster-Locks.
//!
//! A [`Client`] holds one session with the cluster over one mutually
//! authenticated TLS 1.3 connection, and keeps it alive in the background:
//! keepalives every third of the session timeout, reconnects with backoff
//! and jitter (to any configured or learned endpoint, fastest first, with
//! the same client id, so the session and its locks survive), and many
//! requests pipelined on the one connection. Locks come back as
//! [`LockGuard`]s carrying the fencing token.
//!
//! The client measures the round-trip time to every server it knows in the
//! background ([`ClientConfig::probe_interval`]) and moves its session to a
//! clearly faster server when there is one — same client id, locks kept.
//! [`Client::servers`] shows the servers, their times and the primary.
//!
//! ```no_run
//! use std::time::Duration;
//! use oclocks_client::{Client, ClientConfig, Error};
//!
//! # async fn run() -> Result<(), Error> {
//! let config = ClientConfig::from_file(".oclocks-dev/client.toml")?;
//! // Or in code:
//! // let config = ClientConfig::new(["127.0.0.1:7001"], "ca.pem", "client.pem", "client.key");
//! let client = Client::connect(config).await?;
//!
//! // Wait up to 5 s for the lock; hold it at most 30 s.
//! let guard = client
//!     .lock("default", "acct:4587")
//!     .wait(Duration::from_secs(5))
//!     .ttl(Duration::from_secs(30))
//!     .acquire()
//!     .await?;
//! println!("holding {} with fencing token {}", guard.name(), guard.token());
//!
//! // Do the work, but stop as soon as the lock may be lost.
//! tokio::select! {
//!     reason = guard.lost() => eprintln!("lock lost: {reason}"),
//!     _ = tokio::time::sleep(Duration::from_secs(1)) => {
//!         // ... the protected work, passing guard.token() along ...
//!     }
//! }
//! let outcome = guard.release().await?;
//! assert!(!outcome.already_released);
//!
//! // A try-lock that finds the lock held says by whom.
//! match client.lock("default", "migration").try_once().acquire().await {
//!     Ok(guard) => drop(guard), // dropping releases in the background
//!     Err(Error::Locked { holders, .. }) => eprintln!("held by {:?}", holders.first()),
//!     Err(e) => return Err(e),
//! }
//! client.close().await
//! # }
//! ```
//!
//! # What the client guarantees
//!
//! - **It knows first.** The client keeps a conservative lease on its
//!   session: from the *send* time of the last acknowledged keepalive, plus
//!   the session timeout, minus a margin (see [`lease_margin`]). When the
//!   lease runs out without a newer acknowledgement — the client is cut off
//!   — every connection-lock guard's [`LockGuard::lost`] fires, no later
//!   than the cluster could free the lock. LOST events, a reconnect that
//!   finds the session new or a grant missing, and the client's own view of
//!   a TTL fire it too ([`LostReason`]).
//! - **No grant leaks.** An acquire whose future is dropped or that times
//!   out locally sends CANCEL with its nonce, which also gives back a grant
//!   that raced it. A LOCK retried after a reconnect re-sends the same
//!   nonce, so it is granted at most once. Dropping a guard releases it.
//! - **Unknown outcomes are explicit.** A request whose reply never arrived
//!   fails with [`Error::Indeterminate`]: it may have taken effect.
//!   Requests that are safe to repeat (LOCK, RELEASE, CANCEL, reads, BREAK
//!   with a token) are resent after a reconnect instead.
//! - **One cluster.** The cluster id of the first HELLO is pinned; a server
//!   of another cluster is refused ([`Error::ClusterMismatch`]).
//!
//! # Static locks
//!
//! `.static_lock()` makes a lock that survives the session, owned by the
//! client's Ed25519 owner key ([`ClientConfig::owner_key_file`]). A process
//! that restarts with the same key file can release or refresh it by token
//! ([`Client::release_static`], [`Client::refresh_static`]); use
//! [`LockGuard::keep`] to leave it held when the guard goes away.

mod backoff;
mod client;
mod config;
mod conn;
mod endpoints;
mod error;
mod guard;
mod identity;
mod inflight;
mod lease;
mod nonce;
mod probe;
mod registry;
mod tls;

pub use client::{Client, LockBuilder, LockPage, LockState, SessionInfo};
pub use config::{format_duration, parse_duration, ClientConfig};
pub use endpoints::ServerStatus;
pub use error::Error;
pub use guard::{HeldGrant, LockGuard, LostReason, ReleaseOutcome};
pub use identity::OwnerKey;
pub use lease::{keepalive_interval, lease_margin, ttl_believed_until, LEASE_MARGIN_MIN};
pub use oclocks_proto::{
    ErrorCode, Holder, Kind, Limits, LockInfo, Mode, Role, ServerInfo, StatusOk,
};
