//! The OpenCluster-Locks server: configuration, TLS, client connections, the
//! leader's time and keepalive drivers, and the openraft glue that
//! replicates the lock engine's commands.
//!
//! Principal entry point: [`server::run`] with a [`config::ServerConfig`].
//! Data flow: a connection ([`conn`]) decodes a request, checks what it can
//! alone (HELLO first, limits, Ed25519 signatures), and hands an engine
//! operation to the [`proposer`], which stamps it with the leader's term and
//! clock and submits it to Raft ([`raft`]). Every applied command's reply
//! returns to its proposer; its effects go to the [`hub`], which delivers
//! them to the connections of the sessions they concern.
//!
//! Architecture invariants: no lock semantics live here (they are all in
//! `oclocks-core`); openraft's types stay in [`raft`] and [`proposer`]; no
//! request is acknowledged before the command behind it is committed.

mod cluster;
pub mod config;
mod conn;
mod driver;
pub mod http;
mod hub;
pub mod identity;
pub mod peer;
mod proposer;
pub mod raft;
mod reply;
pub mod server;
pub mod tls;

/// The host part of `host:port` (`[v6]:port` gives `v6`).
pub(crate) fn split_host(addr: &str) -> Option<&str> {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split_once(']').map(|(h, _)| h);
    }
    addr.rsplit_once(':')
        .map(|(h, _)| h)
        .filter(|h| !h.is_empty())
}
