//! LOCK nonces and the low-water mark (PROTOCOL.md section 4, "Nonces").
//!
//! Every LOCK gets a fresh nonce, a per-session sequence number; a retry of
//! the same LOCK (after a reconnect) re-sends the same nonce, which makes it
//! idempotent on the server. A nonce is **outstanding** until the client no
//! longer needs the server to remember its answer: its final reply arrived,
//! or the CANCEL of it was acknowledged. `LOW_WATER` is the lowest
//! outstanding nonce (or the next nonce when none is), so it never exceeds
//! the nonce of any LOCK the client may still (re)send, and the server may
//! forget every answer below it.
//!
//! The first nonce of a process comes from the wall clock in microseconds
//! (see `identity`), so a process that restarts with a persisted client id
//! does not reuse its predecessor's nonces.

use std::collections::BTreeSet;

/// Nonce allocation and the low-water mark.
#[derive(Debug, Clone)]
pub(crate) struct Nonces {
    next: u64,
    outstanding: BTreeSet<u64>,
}

impl Nonces {
    /// Nonces from `first` (at least 1) upwards.
    pub fn new(first: u64) -> Nonces {
        Nonces {
            next: first.max(1),
            outstanding: BTreeSet::new(),
        }
    }

    /// A new nonce, outstanding until [`Nonces::retire`].
    pub fn allocate(&mut self) -> u64 {
        let n = self.next;
        self.next = self.next.saturating_add(1);
        self.outstanding.insert(n);
        n
    }

    /// The answer to `nonce` is no longer needed.
    pub fn retire(&mut self, nonce: u64) {
        self.outstanding.remove(&nonce);
    }

    /// Whether `nonce` is outstanding.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn is_outstanding(&self, nonce: u64) -> bool {
        self.outstanding.contains(&nonce)
    }

    /// The lowest outstanding nonce, or the next one if none is.
    pub fn low_water(&self) -> u64 {
        self.outstanding.first().copied().unwrap_or(self.next)
    }

    /// How many nonces are outstanding.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_water_is_the_lowest_outstanding() {
        let mut n = Nonces::new(10);
        assert_eq!(n.low_water(), 10);
        let a = n.allocate();
        let b = n.allocate();
        let c = n.allocate();
        assert_eq!((a, b, c), (10, 11, 12));
        assert_eq!(n.low_water(), 10);
        n.retire(b);
        assert_eq!(n.low_water(), 10, "a hole does not move the mark");
        n.retire(a);
        assert_eq!(n.low_water(), 12);
        n.retire(c);
        assert_eq!(n.low_water(), 13, "nothing outstanding: the next nonce");
        n.retire(c);
        assert_eq!(n.outstanding(), 0);
    }

    /// Whatever is retired, the mark never exceeds an outstanding nonce
    /// (the server answers STALE_NONCE to a LOCK below the mark) and never
    /// goes down.
    #[test]
    fn mark_never_passes_an_outstanding_nonce() {
        let mut n = Nonces::new(0);
        let mut live: Vec<u64> = vec![];
        let mut last_mark = 0;
        let mut x: u64 = 12345;
        for _ in 0..2000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if x >> 62 == 0 && !live.is_empty() {
                let i = (x as usize >> 8) % live.len();
                n.retire(live.swap_remove(i));
            } else {
                live.push(n.allocate());
            }
            let mark = n.low_water();
            assert!(live.iter().all(|&l| l >= mark && n.is_outstanding(l)));
            assert!(mark >= last_mark);
            last_mark = mark;
        }
    }

    #[test]
    fn zero_is_never_a_nonce() {
        let mut n = Nonces::new(0);
        assert_eq!(n.allocate(), 1);
    }
}
