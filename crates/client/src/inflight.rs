//! Request ids of one connection and the requests awaiting their final
//! reply (PROTOCOL.md section 4: ids are chosen by the client, never 0, and
//! unique among the connection's requests awaiting their final reply).
//!
//! Ids are per connection: a request resent on a new connection gets a new
//! id there.

use std::collections::HashMap;

/// Requests in flight on one connection, by request id.
#[derive(Debug)]
pub(crate) struct InFlight<P> {
    next_id: u64,
    map: HashMap<u64, P>,
}

impl<P> InFlight<P> {
    /// Ids from `first_id` on (0 is skipped).
    pub fn new(first_id: u64) -> InFlight<P> {
        InFlight {
            next_id: first_id.max(1),
            map: HashMap::new(),
        }
    }

    /// A fresh id: never 0 and not in use (ids wrap around after `u64::MAX`).
    pub fn allocate(&mut self) -> u64 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            if id != 0 && !self.map.contains_key(&id) {
                return id;
            }
        }
    }

    /// Record `pending` under `id` (from [`InFlight::allocate`]).
    pub fn insert(&mut self, id: u64, pending: P) {
        debug_assert!(id != 0 && !self.map.contains_key(&id));
        self.map.insert(id, pending);
    }

    /// The request with this id, if awaiting its reply.
    pub fn get(&self, id: u64) -> Option<&P> {
        self.map.get(&id)
    }

    /// Take the request with this id out (its final reply arrived).
    pub fn remove(&mut self, id: u64) -> Option<P> {
        self.map.remove(&id)
    }

    /// How many requests await their reply.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether none does.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The requests, for inspection.
    pub fn values(&self) -> impl Iterator<Item = &P> {
        self.map.values()
    }

    /// Take every request out, in id order (the order they were sent,
    /// barring wrap-around).
    pub fn drain_in_order(&mut self) -> Vec<P> {
        let mut all: Vec<(u64, P)> = self.map.drain().collect();
        all.sort_by_key(|(id, _)| *id);
        all.into_iter().map(|(_, p)| p).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_fresh_and_never_zero() {
        let mut f = InFlight::new(0);
        let a = f.allocate();
        assert_eq!(a, 1);
        f.insert(a, "a");
        let b = f.allocate();
        f.insert(b, "b");
        assert_eq!(b, 2);
        assert_eq!(f.get(a), Some(&"a"));
        assert_eq!(f.remove(a), Some("a"));
        assert_eq!(f.remove(a), None, "a final reply completes it once");
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn wrap_around_skips_zero_and_ids_in_use() {
        let mut f = InFlight::new(u64::MAX - 1);
        let a = f.allocate();
        f.insert(a, 'a');
        let b = f.allocate();
        f.insert(b, 'b');
        assert_eq!((a, b), (u64::MAX - 1, u64::MAX));
        assert_eq!(f.allocate(), 1, "0 is skipped");
        // Force the allocator onto ids in use.
        let mut g = InFlight::new(5);
        g.insert(5, ());
        g.insert(6, ());
        assert_eq!(g.allocate(), 7);
    }

    #[test]
    fn drain_returns_send_order() {
        let mut f = InFlight::new(1);
        for c in ['x', 'y', 'z'] {
            let id = f.allocate();
            f.insert(id, c);
        }
        f.remove(2);
        assert_eq!(f.drain_in_order(), vec!['x', 'z']);
        assert!(f.is_empty());
        assert_eq!(f.values().count(), 0);
    }
}
