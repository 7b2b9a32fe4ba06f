//! The guard registry: every grant a live [`LockGuard`](crate::LockGuard)
//! holds, and the state machine that decides when a guard's `lost()` fires.
//!
//! States of one grant ([`GuardState`]):
//!
//! ```text
//!            LOST event / HELLO_OK not listing it / new session / NO_SESSION
//!   Held ──────────────────────────────────────────────────▶ Lost { ended: true }
//!    │   local lease expired (connection locks) / local TTL passed
//!    ├─────────────────────────────────────────────────────▶ Lost { ended: false }
//!    │   release() answered OK
//!    └─────────────────────────────────────────────────────▶ Released
//! ```
//!
//! The first reason wins: a guard fires at most once. `ended: true` means
//! the cluster said the grant is gone, so dropping the guard sends nothing;
//! `ended: false` means the client only suspects it (it could not confirm
//! its session, or the TTL it knows of has passed) — the grant may still be
//! held, and dropping the guard still sends a RELEASE.
//!
//! Grants are keyed by fencing token: tokens are unique across the cluster.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::time::Instant;

use oclocks_proto::{HeldLock, Kind};
use tokio::sync::watch;

use crate::guard::LostReason;

/// Lock a mutex, ignoring poisoning: every critical section here leaves
/// the data consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a guard knows about its grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GuardState {
    /// Held, as far as the client knows.
    Held,
    /// Lost, or possibly lost.
    Lost {
        /// Why.
        reason: LostReason,
        /// Whether the cluster confirmed the grant is gone.
        ended: bool,
    },
    /// Released by its owner.
    Released,
}

#[derive(Debug)]
struct Entry {
    zone: String,
    name: String,
    kind: Kind,
    ttl_deadline: Option<Instant>,
    tx: watch::Sender<GuardState>,
}

impl Entry {
    fn fire(&mut self, reason: LostReason, ended: bool) -> bool {
        let fired = self.tx.send_if_modified(|s| match s {
            GuardState::Held => {
                *s = GuardState::Lost { reason, ended };
                true
            }
            // A suspicion the cluster later confirms becomes an ended grant
            // (no RELEASE on drop) without firing again.
            GuardState::Lost { ended: e, .. } if ended && !*e => {
                *e = true;
                false
            }
            _ => false,
        });
        if fired {
            tracing::warn!(zone = %self.zone, name = %self.name, ?reason, "lock lost");
        }
        fired
    }

    fn state(&self) -> GuardState {
        *self.tx.borrow()
    }
}

/// The grants of live guards.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    entries: HashMap<u64, Entry>,
}

impl Registry {
    /// Track a new grant. If `lease_expired`, a connection lock is reported
    /// lost at once: the client cannot vouch for its session.
    pub fn insert(
        &mut self,
        zone: &str,
        name: &str,
        token: u64,
        kind: Kind,
        ttl_deadline: Option<Instant>,
        lease_expired: bool,
    ) -> watch::Receiver<GuardState> {
        let (tx, rx) = watch::channel(GuardState::Held);
        let mut entry = Entry {
            zone: zone.to_owned(),
            name: name.to_owned(),
            kind,
            ttl_deadline,
            tx,
        };
        if lease_expired && kind == Kind::Connection {
            entry.fire(LostReason::LeaseExpired, false);
        }
        self.entries.insert(token, entry);
        rx
    }

    /// Stop tracking a grant (its guard is gone).
    pub fn remove(&mut self, token: u64) {
        self.entries.remove(&token);
    }

    /// The state of a tracked grant.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn state(&self, token: u64) -> Option<GuardState> {
        self.entries.get(&token).map(Entry::state)
    }

    /// How many grants are tracked.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// A REFRESH moved (or removed) the grant's TTL.
    pub fn set_ttl_deadline(&mut self, token: u64, deadline: Option<Instant>) {
        if let Some(e) = self.entries.get_mut(&token) {
            e.ttl_deadline = deadline;
        }
    }

    /// The owner released the grant.
    pub fn mark_released(&mut self, token: u64) {
        if let Some(e) = self.entries.get_mut(&token) {
            e.tx.send_replace(GuardState::Released);
        }
    }

    /// The cluster ended the grant (RELEASE or REFRESH answered LOST or
    /// UNKNOWN_GRANT).
    pub fn mark_ended(&mut self, token: u64, reason: LostReason) {
        if let Some(e) = self.entries.get_mut(&token) {
            e.fire(reason, true);
        }
    }

    /// A LOST event. Returns whether a guard fired.
    pub fn on_lost_event(
        &mut self,
        zone: &str,
        name: &str,
        token: u64,
        reason: LostReason,
    ) -> bool {
        match self.entries.get_mut(&token) {
            Some(e) if e.zone == zone && e.name == name => e.fire(reason, true),
            _ => false,
        }
    }

    /// The local lease expired: every connection lock may be gone.
    pub fn on_lease_expired(&mut self) -> usize {
        self.fire_where(
            |e| e.kind == Kind::Connection,
            LostReason::LeaseExpired,
            false,
        )
    }

    /// A KEEPALIVE was answered NO_SESSION: the session expired, and with it
    /// every connection lock.
    pub fn on_session_expired(&mut self) -> usize {
        self.fire_where(
            |e| e.kind == Kind::Connection,
            LostReason::SessionExpired,
            true,
        )
    }

    /// A HELLO_OK after a reconnect. A new session (`resumed == false`)
    /// means the old one expired: every connection lock is gone (static
    /// locks outlive sessions). A resumed session lists what it holds:
    /// every grant not listed is gone.
    pub fn on_hello(&mut self, resumed: bool, held: &[HeldLock]) -> usize {
        if !resumed {
            return self.fire_where(
                |e| e.kind == Kind::Connection,
                LostReason::SessionNotResumed,
                true,
            );
        }
        let listed: HashSet<(&str, &str, u64)> = held
            .iter()
            .map(|h| (h.zone.as_str(), h.name.as_str(), h.token))
            .collect();
        let mut fired = 0;
        for (&token, e) in self.entries.iter_mut() {
            if !listed.contains(&(e.zone.as_str(), e.name.as_str(), token))
                && e.fire(LostReason::NotHeld, true)
            {
                fired += 1;
            }
        }
        fired
    }

    /// CLOSE was answered: the server released every connection lock of the
    /// session (static locks stay held).
    pub fn on_closed(&mut self) {
        for e in self.entries.values_mut() {
            if e.kind == Kind::Connection {
                e.tx.send_replace(GuardState::Released);
            }
        }
    }

    /// The earliest TTL deadline of a grant still held.
    pub fn next_ttl_deadline(&self) -> Option<Instant> {
        self.entries
            .values()
            .filter(|e| e.state() == GuardState::Held)
            .filter_map(|e| e.ttl_deadline)
            .min()
    }

    /// Fire every held grant whose TTL deadline is at or before `now`.
    pub fn on_ttl_due(&mut self, now: Instant) -> usize {
        self.fire_where(
            |e| e.ttl_deadline.is_some_and(|d| d <= now),
            LostReason::TtlExpired,
            false,
        )
    }

    fn fire_where(
        &mut self,
        pred: impl Fn(&Entry) -> bool,
        reason: LostReason,
        ended: bool,
    ) -> usize {
        self.entries
            .values_mut()
            .filter(|e| pred(e))
            .map(|e| e.fire(reason, ended))
            .filter(|&f| f)
            .count()
    }
}

/// A guard's hold on its registry entry: removes the entry when dropped.
#[derive(Debug)]
pub(crate) struct GrantHandle {
    registry: Arc<Mutex<Registry>>,
    token: u64,
    rx: watch::Receiver<GuardState>,
}

impl GrantHandle {
    /// Register a grant and return the handle that owns the entry.
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        registry: &Arc<Mutex<Registry>>,
        zone: &str,
        name: &str,
        token: u64,
        kind: Kind,
        ttl_deadline: Option<Instant>,
        lease_expired: bool,
    ) -> GrantHandle {
        let rx = lock(registry).insert(zone, name, token, kind, ttl_deadline, lease_expired);
        GrantHandle {
            registry: registry.clone(),
            token,
            rx,
        }
    }

    /// The grant's current state.
    pub fn state(&self) -> GuardState {
        *self.rx.borrow()
    }

    /// A receiver of state changes.
    pub fn subscribe(&self) -> watch::Receiver<GuardState> {
        self.rx.clone()
    }

    /// Run `f` on the registry.
    pub fn with_registry<R>(&self, f: impl FnOnce(&mut Registry, u64) -> R) -> R {
        f(&mut lock(&self.registry), self.token)
    }
}

impl Drop for GrantHandle {
    fn drop(&mut self) {
        lock(&self.registry).remove(self.token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oclocks_proto::Mode;
    use std::time::Duration;

    fn held(zone: &str, name: &str, token: u64) -> HeldLock {
        HeldLock {
            zone: zone.into(),
            name: name.into(),
            token,
            mode: Mode::Exclusive,
            kind: Kind::Connection,
        }
    }

    fn lost(reason: LostReason, ended: bool) -> GuardState {
        GuardState::Lost { reason, ended }
    }

    #[test]
    fn lost_event_fires_the_matching_guard_once() {
        let mut r = Registry::default();
        let a = r.insert("z", "a", 1, Kind::Connection, None, false);
        let b = r.insert("z", "b", 2, Kind::Static, None, false);
        assert!(
            !r.on_lost_event("z", "a", 2, LostReason::Broken),
            "name must match"
        );
        assert!(
            !r.on_lost_event("z", "a", 9, LostReason::Broken),
            "unknown token"
        );
        assert!(r.on_lost_event("z", "a", 1, LostReason::Broken));
        assert!(
            !r.on_lost_event("z", "a", 1, LostReason::TtlExpired),
            "first reason wins"
        );
        assert_eq!(*a.borrow(), lost(LostReason::Broken, true));
        assert_eq!(*b.borrow(), GuardState::Held);
    }

    #[test]
    fn lease_expiry_fires_connection_locks_only_and_keeps_them_releasable() {
        let mut r = Registry::default();
        let c = r.insert("z", "c", 1, Kind::Connection, None, false);
        let s = r.insert("z", "s", 2, Kind::Static, None, false);
        assert_eq!(r.on_lease_expired(), 1);
        assert_eq!(r.on_lease_expired(), 0);
        assert_eq!(*c.borrow(), lost(LostReason::LeaseExpired, false));
        assert_eq!(*s.borrow(), GuardState::Held);
        // The cluster later confirms: the guard does not fire again but
        // now knows no RELEASE is needed.
        assert!(!r.on_lost_event("z", "c", 1, LostReason::SessionExpired));
        assert_eq!(*c.borrow(), lost(LostReason::LeaseExpired, true));
    }

    #[test]
    fn new_session_ends_connection_locks_not_static_ones() {
        let mut r = Registry::default();
        let c = r.insert("z", "c", 1, Kind::Connection, None, false);
        let s = r.insert("z", "s", 2, Kind::Static, None, false);
        assert_eq!(r.on_hello(false, &[]), 1);
        assert_eq!(*c.borrow(), lost(LostReason::SessionNotResumed, true));
        assert_eq!(*s.borrow(), GuardState::Held);
    }

    #[test]
    fn resumed_session_ends_what_it_does_not_list() {
        let mut r = Registry::default();
        let kept = r.insert("z", "kept", 1, Kind::Connection, None, false);
        let gone = r.insert("z", "gone", 2, Kind::Connection, None, false);
        let moved = r.insert("z", "moved", 3, Kind::Static, None, false);
        let listed = [
            held("z", "kept", 1),
            held("z", "moved", 4),
            held("z", "other", 9),
        ];
        assert_eq!(r.on_hello(true, &listed), 2);
        assert_eq!(*kept.borrow(), GuardState::Held);
        assert_eq!(*gone.borrow(), lost(LostReason::NotHeld, true));
        assert_eq!(
            *moved.borrow(),
            lost(LostReason::NotHeld, true),
            "another token is another grant"
        );
    }

    #[test]
    fn session_expired_ends_connection_locks() {
        let mut r = Registry::default();
        let c = r.insert("z", "c", 1, Kind::Connection, None, false);
        assert_eq!(r.on_session_expired(), 1);
        assert_eq!(*c.borrow(), lost(LostReason::SessionExpired, true));
    }

    #[test]
    fn insert_while_lease_expired_fires_at_once() {
        let mut r = Registry::default();
        let c = r.insert("z", "c", 1, Kind::Connection, None, true);
        let s = r.insert("z", "s", 2, Kind::Static, None, true);
        assert_eq!(*c.borrow(), lost(LostReason::LeaseExpired, false));
        assert_eq!(*s.borrow(), GuardState::Held);
    }

    #[test]
    fn ttl_deadlines() {
        let t0 = Instant::now();
        let sec = Duration::from_secs(1);
        let mut r = Registry::default();
        let a = r.insert("z", "a", 1, Kind::Static, Some(t0 + 2 * sec), false);
        let _b = r.insert("z", "b", 2, Kind::Static, Some(t0 + 5 * sec), false);
        let _c = r.insert("z", "c", 3, Kind::Connection, None, false);
        assert_eq!(r.next_ttl_deadline(), Some(t0 + 2 * sec));
        assert_eq!(r.on_ttl_due(t0 + sec), 0);
        assert_eq!(r.on_ttl_due(t0 + 2 * sec), 1);
        assert_eq!(*a.borrow(), lost(LostReason::TtlExpired, false));
        assert_eq!(
            r.next_ttl_deadline(),
            Some(t0 + 5 * sec),
            "fired ones are not watched"
        );
        r.set_ttl_deadline(2, None);
        assert_eq!(r.next_ttl_deadline(), None, "refreshed to no TTL");
    }

    #[test]
    fn released_and_ended() {
        let mut r = Registry::default();
        let a = r.insert("z", "a", 1, Kind::Connection, None, false);
        r.mark_released(1);
        assert_eq!(*a.borrow(), GuardState::Released);
        assert_eq!(r.on_lease_expired(), 0, "a released grant never fires");
        let b = r.insert("z", "b", 2, Kind::Connection, None, false);
        r.mark_ended(2, LostReason::NotHeld);
        assert_eq!(*b.borrow(), lost(LostReason::NotHeld, true));
    }

    #[test]
    fn handle_drop_removes_the_entry() {
        let reg = Arc::new(Mutex::new(Registry::default()));
        let h = GrantHandle::register(&reg, "z", "a", 7, Kind::Connection, None, false);
        assert_eq!(lock(&reg).len(), 1);
        assert_eq!(h.state(), GuardState::Held);
        h.with_registry(|r, t| r.mark_released(t));
        assert_eq!(h.state(), GuardState::Released);
        drop(h);
        assert_eq!(lock(&reg).len(), 0);
        assert_eq!(lock(&reg).state(7), None);
    }
}
