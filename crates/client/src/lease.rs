//! The client's conservative session lease: until when the client can be
//! sure its session — and so its connection locks — are still alive,
//! measured on its own monotonic clock, never compared with a server's.
//!
//! **Formula.** When a KEEPALIVE (or the HELLO) sent at local instant `s` is
//! acknowledged, the cluster had confirmed the session no earlier than `s`,
//! so the cluster's deadline for it is at least `s + timeout` (the server
//! stamps the keepalive with its own later `now`, and a leader change
//! re-bases every session to a fresh full timeout). The client takes
//!
//! ```text
//! lease_deadline = s + timeout − margin,   margin = min(max(timeout / 10, 500 ms), timeout / 2)
//! ```
//!
//! keeping the latest deadline over all acknowledgements (an old, slow ack
//! never shortens it). The margin absorbs clock-rate differences between
//! machines (10 %) and the time the client needs to act on a loss (at least
//! 500 ms), and is capped at half the timeout so very short timeouts still
//! leave a lease. Once `now ≥ lease_deadline` without a newer ack, the
//! client must assume the cluster may free its connection locks at any
//! moment, and every connection-lock guard reports `lost()`.
//!
//! Keepalives go out every `timeout / 3`, so in steady state the deadline
//! stays about `2/3 · timeout − margin` ahead.

use std::time::Duration;

use tokio::time::Instant;

/// The smallest margin kept between the lease and the cluster's deadline.
pub const LEASE_MARGIN_MIN: Duration = Duration::from_millis(500);

/// The safety margin for a session timeout (see the module docs).
pub fn lease_margin(timeout: Duration) -> Duration {
    (timeout / 10).max(LEASE_MARGIN_MIN).min(timeout / 2)
}

/// Until when a client may believe a grant with a TTL of `ttl` is still
/// its own, the grant having been requested at `sent_at`: the send time
/// plus the TTL minus the same margin as the lease ([`lease_margin`]), so a
/// leader clock running a little fast, or jumping by less than the stall
/// bound, expires the grant in the cluster only after the client stopped
/// believing in it.
pub fn ttl_believed_until(sent_at: Instant, ttl: Duration) -> Instant {
    sent_at + ttl.saturating_sub(lease_margin(ttl))
}

/// The keepalive interval for a session timeout.
pub fn keepalive_interval(timeout: Duration) -> Duration {
    (timeout / 3).max(Duration::from_millis(1))
}

/// The lease state of one session.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    timeout: Duration,
    deadline: Option<Instant>,
    /// Whether the expiry of the current deadline was reported.
    reported: bool,
}

impl Lease {
    /// No lease yet (nothing acknowledged), for this session timeout.
    pub fn new(timeout: Duration) -> Lease {
        Lease {
            timeout,
            deadline: None,
            reported: false,
        }
    }

    /// The session timeout the server granted (HELLO_OK). Applies to acks
    /// from now on.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The timeout in force.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A new session: forget the old deadline (it belonged to a session
    /// that no longer exists).
    pub fn reset(&mut self) {
        self.deadline = None;
        self.reported = false;
    }

    /// A KEEPALIVE or HELLO sent at `sent_at` was acknowledged. Returns
    /// whether the deadline moved forward.
    pub fn on_ack(&mut self, sent_at: Instant) -> bool {
        let candidate = sent_at + self.timeout.saturating_sub(lease_margin(self.timeout));
        if self.deadline.is_some_and(|d| d >= candidate) {
            return false;
        }
        self.deadline = Some(candidate);
        self.reported = false;
        true
    }

    /// Until when the session is known alive; `None` before the first ack.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether the session may have expired at `now` (also before any ack).
    pub fn is_expired(&self, now: Instant) -> bool {
        self.deadline.is_none_or(|d| now >= d)
    }

    /// The deadline still to be watched: `None` once its expiry has been
    /// reported (until a newer ack moves it).
    pub fn pending_deadline(&self) -> Option<Instant> {
        self.deadline.filter(|_| !self.reported)
    }

    /// Whether the lease has expired at `now` and this was not yet
    /// reported. Returns true once per expiry.
    pub fn poll_expired(&mut self, now: Instant) -> bool {
        match self.deadline {
            Some(d) if now >= d && !self.reported => {
                self.reported = true;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn margin_formula() {
        assert_eq!(lease_margin(Duration::from_secs(15)), 1500 * MS);
        assert_eq!(lease_margin(Duration::from_secs(60)), 6000 * MS);
        assert_eq!(lease_margin(Duration::from_secs(5)), 500 * MS, "floor");
        assert_eq!(lease_margin(Duration::from_secs(1)), 500 * MS);
        assert_eq!(lease_margin(600 * MS), 300 * MS, "capped at half");
        assert_eq!(
            keepalive_interval(Duration::from_secs(15)),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn deadline_runs_from_the_send_time() {
        let t0 = Instant::now();
        let mut lease = Lease::new(Duration::from_secs(15));
        assert!(lease.is_expired(t0), "no ack yet");
        assert_eq!(lease.pending_deadline(), None);
        // Sent at t0, acknowledged much later: the deadline still counts
        // from t0.
        assert!(lease.on_ack(t0));
        assert_eq!(lease.deadline(), Some(t0 + 13_500 * MS));
        assert!(!lease.is_expired(t0 + 13_499 * MS));
        assert!(lease.is_expired(t0 + 13_500 * MS));
    }

    #[test]
    fn an_older_ack_never_shortens_the_lease() {
        let t0 = Instant::now();
        let mut lease = Lease::new(Duration::from_secs(15));
        assert!(lease.on_ack(t0 + Duration::from_secs(5)));
        assert!(!lease.on_ack(t0), "keepalive acks may arrive out of order");
        assert_eq!(lease.deadline(), Some(t0 + 18_500 * MS));
        assert!(lease.on_ack(t0 + Duration::from_secs(10)));
        assert_eq!(lease.deadline(), Some(t0 + 23_500 * MS));
    }

    #[test]
    fn expiry_is_reported_once_until_a_newer_ack() {
        let t0 = Instant::now();
        let mut lease = Lease::new(Duration::from_secs(3));
        lease.on_ack(t0);
        let d = t0 + 2500 * MS;
        assert_eq!(lease.pending_deadline(), Some(d));
        assert!(!lease.poll_expired(d - MS));
        assert!(lease.poll_expired(d));
        assert!(!lease.poll_expired(d + MS), "reported once");
        assert_eq!(lease.pending_deadline(), None);
        // A late ack of a keepalive sent before the expiry moves the
        // deadline but it is already past: reported again.
        assert!(lease.on_ack(t0 + 100 * MS));
        assert!(!lease.poll_expired(d + 99 * MS));
        assert!(lease.poll_expired(d + 100 * MS));
        // A fresh ack revives the lease.
        assert!(lease.on_ack(d + MS));
        assert!(!lease.is_expired(d + 2 * MS));
        assert_eq!(lease.pending_deadline(), Some(d + MS + 2500 * MS));
    }

    #[test]
    fn granted_timeout_applies_and_reset_forgets() {
        let t0 = Instant::now();
        let mut lease = Lease::new(Duration::from_secs(15));
        lease.set_timeout(Duration::from_secs(30));
        assert_eq!(lease.timeout(), Duration::from_secs(30));
        lease.on_ack(t0);
        assert_eq!(lease.deadline(), Some(t0 + 27_000 * MS));
        lease.reset();
        assert_eq!(lease.deadline(), None);
        assert!(lease.is_expired(t0));
    }
}
