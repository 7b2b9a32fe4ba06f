//! The engine's limits: every queue, table and search in the lock table has a
//! bound, named `*_max` with its unit, and its default here.
//!
//! Limits are part of the replicated configuration: every replica must apply
//! the same limits, or replicas would diverge. The engine takes them at
//! construction; the server passes the cluster's configured values.

use serde::{Deserialize, Serialize};

/// Bounds enforced by the lock engine. A request past a bound is refused with
/// `LIMIT` (a count) or `INVALID` (a malformed field), never truncated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineLimits {
    /// Zone name length in bytes (SPEC 8: 63).
    pub zone_name_bytes_max: usize,
    /// Lock name length in bytes (SPEC 8: 255).
    pub lock_name_bytes_max: usize,
    /// Identity (certificate subject) length in bytes.
    pub identity_bytes_max: usize,
    /// Waiters queued on one lock (SPEC 8: 10,000).
    pub waiters_per_lock_max: usize,
    /// Holds plus waits of one session. Kept well under the wire's
    /// `list_entries_max` and message size, so that a HELLO reply can list
    /// all of a session's holds and waits in one message.
    pub locks_per_session_max: usize,
    /// Open sessions bound to one identity.
    pub sessions_per_identity_max: usize,
    /// Open sessions in the whole table.
    pub sessions_max: usize,
    /// Remembered LOCK outcomes per session (nonces at or above the low-water
    /// mark); equals the requests in flight a client may have.
    pub outcomes_per_session_max: usize,
    /// Locks one session may watch.
    pub watches_per_session_max: usize,
    /// Ended grants remembered cluster-wide, for RELEASE/REFRESH retries.
    pub ended_grants_max: usize,
    /// Ended grants remembered per live session (its own, newest first).
    pub ended_per_session_max: usize,
    /// Smallest session timeout a client may ask for, in milliseconds.
    pub session_timeout_ms_min: u64,
    /// Largest session timeout a client may ask for, in milliseconds.
    pub session_timeout_ms_max: u64,
    /// Session timeout when the client asks for none, in milliseconds.
    pub session_timeout_ms_default: u64,
    /// Largest lock TTL, in milliseconds.
    pub ttl_ms_max: u64,
    /// Largest finite wait, in milliseconds (`WAIT_FOREVER` is always allowed).
    pub wait_ms_max: u64,
    /// Largest lock-delay, in milliseconds.
    pub lock_delay_ms_max: u64,
    /// Owners the deadlock search visits before it gives up (and lets the
    /// request wait; the check runs again at the next grant).
    pub deadlock_search_nodes_max: usize,
    /// Wait-for edges the deadlock search examines before it gives up.
    pub deadlock_search_edges_max: usize,
    /// Locks in one LIST page.
    pub list_page_max: usize,
}

impl Default for EngineLimits {
    fn default() -> Self {
        EngineLimits {
            zone_name_bytes_max: 63,
            lock_name_bytes_max: 255,
            identity_bytes_max: 1024,
            waiters_per_lock_max: 10_000,
            locks_per_session_max: 4096,
            sessions_per_identity_max: 10_000,
            sessions_max: 1_000_000,
            outcomes_per_session_max: 1024,
            watches_per_session_max: 1024,
            ended_grants_max: 65_536,
            ended_per_session_max: 256,
            session_timeout_ms_min: 1_000,
            session_timeout_ms_max: 600_000,
            session_timeout_ms_default: 15_000,
            ttl_ms_max: 366 * 24 * 3600 * 1000,
            wait_ms_max: 366 * 24 * 3600 * 1000,
            lock_delay_ms_max: 3_600_000,
            deadlock_search_nodes_max: 1024,
            deadlock_search_edges_max: 65_536,
            list_page_max: 1000,
        }
    }
}
