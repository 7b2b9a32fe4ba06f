//! Memory per held lock: 1,000,000 exclusive connection locks held by 1,000
//! sessions, measured with a counting global allocator (live bytes requested
//! from the allocator; the allocator's own per-block overhead comes on top).
//!
//! Run: `cargo bench -p oclocks-core --bench memory`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use oclocks_core::*;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only counting sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        LIVE.fetch_add(new, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn main() {
    // `cargo bench` passes `--bench`; accept and ignore arguments.
    const SESSIONS: u128 = 1000;
    const PER_SESSION: u64 = 1000;
    let mut e = Engine::new(EngineLimits::default());
    e.set_check_invariants(false);
    let caller = |c: u128| Caller {
        client: c,
        identity: format!("client-{c}"),
    };
    for c in 0..SESSIONS {
        e.apply(Command {
            term: 1,
            now_ms: 1,
            op: Op::OpenSession {
                caller: caller(c),
                timeout_ms: 600_000,
            },
        });
    }
    let before = LIVE.load(Ordering::Relaxed);
    for c in 0..SESSIONS {
        for i in 0..PER_SESSION {
            let nonce = i + 1;
            let out = e.apply(Command {
                term: 1,
                now_ms: 2,
                op: Op::Lock(LockRequest {
                    caller: caller(c),
                    zone: "default".into(),
                    name: format!("lock-{:010}", c as u64 * PER_SESSION + i),
                    mode: Mode::Exclusive,
                    kind: Kind::Connection,
                    ttl_ms: 0,
                    wait_ms: 0,
                    lock_delay_ms: 0,
                    owner: nonce,
                    nonce,
                    low_water: nonce,
                    key: None,
                }),
            });
            assert!(matches!(out.reply, Reply::Granted { .. }), "{out:?}");
        }
    }
    let after = LIVE.load(Ordering::Relaxed);
    let locks = SESSIONS as u64 * PER_SESSION;
    let per_lock = (after - before) as f64 / locks as f64;
    println!(
        "{locks} locks held: {} MiB live, {per_lock:.0} bytes per held lock (names of 15 bytes)",
        (after - before) / (1 << 20)
    );
}
