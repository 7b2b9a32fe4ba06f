//! Model-based property test of the lock engine: random command sequences
//! over a small universe (four clients, two identities, one or two zones, two
//! or three locks) run against the engine and against a deliberately simple
//! reference model written from ARCHITECTURE.md; every reply, every effect
//! (as a multiset), the lock table as queries see it, the clock and the token
//! counter must agree after every command, and the engine's invariants must
//! hold. Snapshot + restore happens mid-sequence; the restored engine must
//! then behave exactly like the original.
//!
//! `PROPTEST_CASES` overrides the number of cases (default 10,000). A failure
//! prints the shrunk scenario and the concrete commands that reproduce it;
//! failing seeds persist in `model.proptest-regressions` beside this file.
//! `MODEL_STATS=1` prints what the generator reaches.
//!
//! The model is in `model/reference.rs`, the scenarios in
//! `model/generate.rs`, the side-by-side runner in `model/harness.rs`.

#[path = "model/generate.rs"]
mod generate;
#[path = "model/harness.rs"]
mod harness;
#[path = "model/reference.rs"]
mod reference;

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, FileFailurePersistence, RngAlgorithm, TestRng, TestRunner};

use harness::Filter;

fn cases() -> u32 {
    match std::env::var("PROPTEST_CASES") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("PROPTEST_CASES={v:?} is not a number")),
        Err(_) => 10_000,
    }
}

const FULL: Filter = Filter {
    ignore_watch: false,
};

proptest! {
    #![proptest_config(Config {
        cases: cases(),
        max_shrink_iters: 20_000,
        // Failing seeds are kept in tests/model.proptest-regressions and
        // replayed first on every run.
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..Config::default()
    })]

    /// The engine agrees with the model on every command of every scenario.
    #[test]
    fn engine_matches_model(s in generate::scenario()) {
        if let Err(msg) = harness::run(&s, FULL) {
            prop_assert!(false, "{}", msg);
        }
    }
}

/// The generator is not vacuous: over a fixed sample of scenarios the model
/// meets every interesting outcome at least once (grants from queues, each
/// kind of loss, timeouts, deadlocks, lock-delays, LIMIT, UNKNOWN_GRANT, ...).
/// Runs the model alone, so it checks the generator, not the engine.
#[test]
fn generator_reaches_every_outcome() {
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let strategy = generate::scenario();
    let mut seen: BTreeMap<&'static str, usize> = BTreeMap::new();
    for _ in 0..500 {
        let s = strategy
            .new_tree(&mut runner)
            .expect("scenario generation")
            .current();
        let stats = harness::model_stats(&s);
        for (what, n) in stats {
            *seen.entry(what).or_default() += n;
        }
    }
    let missing: Vec<&str> = harness::STATS
        .iter()
        .copied()
        .filter(|w| !seen.contains_key(w))
        .collect();
    assert!(
        missing.is_empty(),
        "never reached: {missing:?}\nseen: {seen:#?}"
    );
    if std::env::var_os("MODEL_STATS").is_some() {
        eprintln!("{seen:#?}");
    }
}

/// Focused scenarios: each runs concrete commands through the same
/// comparison (engine against model) and also pins the model's own answer,
/// so a misreading shared by both sides would still show.
mod focused {
    use super::*;
    use oclocks_core::{
        Caller, Command, EngineLimits, LockRequest, Op, Refusal, Reply, WAIT_FOREVER,
    };
    use oclocks_proto::{Kind, Mode};

    fn limits() -> EngineLimits {
        generate::Profile::Roomy.limits()
    }

    fn caller(client: u128) -> Caller {
        let idx = client as usize - 1;
        Caller {
            client,
            identity: harness::identity_of(idx, false),
        }
    }

    fn lock(client: u128, name: &str, owner: u64, nonce: u64, wait_ms: u64) -> Op {
        lock_lw(client, name, owner, nonce, 0, wait_ms)
    }

    fn lock_lw(
        client: u128,
        name: &str,
        owner: u64,
        nonce: u64,
        low_water: u64,
        wait_ms: u64,
    ) -> Op {
        Op::Lock(LockRequest {
            caller: caller(client),
            zone: "z1".into(),
            name: name.into(),
            mode: Mode::Exclusive,
            kind: Kind::Connection,
            ttl_ms: 0,
            wait_ms,
            lock_delay_ms: 0,
            owner,
            nonce,
            low_water,
            key: None,
        })
    }

    /// Applies `ops` at `now_ms` 0,1,2... in term 1 and returns the model's
    /// replies (the harness compares each with the engine's).
    fn run(ops: Vec<Op>) -> Vec<Reply> {
        run_at(
            ops.into_iter()
                .enumerate()
                .map(|(i, op)| (i as u64, op))
                .collect(),
        )
    }

    /// Applies each op at its own `now_ms`, in term 1.
    fn run_at(ops: Vec<(u64, Op)>) -> Vec<Reply> {
        run_with(limits(), ops)
    }

    fn run_with(limits: EngineLimits, ops: Vec<(u64, Op)>) -> Vec<Reply> {
        let mut h = harness::Harness::bare(limits, 1, 3, FULL);
        let mut replies = Vec::new();
        for (now_ms, op) in ops {
            let cmd = Command {
                term: 1,
                now_ms,
                op,
            };
            if let Err(msg) = h.apply(cmd) {
                panic!("{msg}");
            }
            replies.push(h.last().expect("a command was applied").reply.clone());
        }
        replies
    }

    fn open(client: u128) -> Op {
        Op::OpenSession {
            caller: caller(client),
            timeout_ms: 0,
        }
    }

    /// Two owners each hold one lock and wait for the other's: the second
    /// wait closes the cycle.
    #[test]
    fn deadlock_through_holders() {
        let r = run(vec![
            open(1),
            open(2),
            lock(1, "a", 0, 1, 0),
            lock(2, "b", 0, 1, 0),
            lock(1, "b", 0, 2, WAIT_FOREVER),
            lock(2, "a", 0, 2, WAIT_FOREVER),
        ]);
        assert_eq!(r[4], Reply::Queued { position: 0 });
        assert_eq!(r[5], Reply::Refused(Refusal::Deadlock));
    }

    /// A cycle through an earlier waiter in a FIFO queue: 3 waits behind 2 on
    /// `b`, and 2's owner waits on `c`, which 3's owner holds.
    #[test]
    fn deadlock_through_queue() {
        let r = run(vec![
            open(1),
            open(2),
            open(3),
            lock(1, "b", 0, 1, 0),            // 1 holds b
            lock(3, "c", 0, 1, 0),            // 3 holds c
            lock(2, "b", 0, 1, WAIT_FOREVER), // 2 waits on b (for 1)
            lock(2, "c", 1, 2, WAIT_FOREVER), // 2/1 waits on c (for 3)
            lock(3, "b", 0, 2, WAIT_FOREVER), // 3 waits on b: for 1 and for 2, not a cycle
            lock(2, "c", 0, 3, WAIT_FOREVER), // 2/0 waits on c: 2 -> 3 -> 2 (3 waits behind 2)
        ]);
        assert_eq!(r[5], Reply::Queued { position: 0 });
        assert_eq!(r[6], Reply::Queued { position: 0 });
        assert_eq!(r[7], Reply::Queued { position: 1 });
        assert_eq!(r[8], Reply::Refused(Refusal::Deadlock));
    }

    /// A queued LOCK whose nonce the client then declares answered (the mark
    /// rises past it) keeps waiting; when the wait times out, its outcome is
    /// below the mark and must not be recorded (it is forgotten, and a retry
    /// gets STALE_NONCE). Found by the model test: the engine recorded it and
    /// its own invariant "no outcome below the mark" failed inside `apply`.
    #[test]
    fn wait_ending_below_the_low_water_mark() {
        let r = run_at(vec![
            (0, open(1)),
            (0, open(3)),
            (0, lock(1, "b", 0, 1, 0)),
            (0, lock(3, "b", 0, 1, 5)),
            (0, lock_lw(3, "a", 0, 2, 2, 0)), // the mark rises to 2: nonce 1 is forgotten
            (5, Op::Tick),                    // nonce 1's wait times out
            (6, lock(3, "b", 0, 1, 5)),
        ]);
        assert_eq!(r[3], Reply::Queued { position: 0 });
        assert_eq!(r[6], Reply::Refused(Refusal::StaleNonce));
    }

    /// Two sessions expire at the same instant; the first one's lock has the
    /// second one waiting. Expired sessions lose their waits before anything
    /// is granted, so nothing is granted. Found by the model test: the
    /// engine served the queue between the two expiries and hit its own
    /// "grant to a dead session" assertion.
    #[test]
    fn sessions_expiring_together_grant_nothing() {
        let r = run_at(vec![
            (0, open(1)),
            (0, open(2)),
            (60, lock(1, "a", 0, 1, 0)),
            (60, lock(2, "a", 0, 1, 50)),
            (120, Op::Tick), // both sessions' deadlines (100) pass
        ]);
        assert_eq!(r[3], Reply::Queued { position: 0 });
        assert_eq!(r[4], Reply::Done);
    }

    /// A static grant outlives its session (detached); the client opens a
    /// new session and waits for the lock with the same owner id. The
    /// detached grant belongs to no session, so a second LOCK by that owner
    /// is "already waits on it" (INVALID), not LOCKED naming the detached
    /// grant as if the new session held it. Found by the model test.
    #[test]
    fn detached_grant_is_not_held_by_the_new_session() {
        let key = Some(oclocks_core::KeyProof {
            key: [7; 32],
            counter: 1,
        });
        let static_lock = |nonce: u64, wait_ms: u64| match lock(3, "a", 0, nonce, wait_ms) {
            Op::Lock(r) => Op::Lock(LockRequest {
                kind: Kind::Static,
                key: key.clone(),
                ..r
            }),
            _ => unreachable!("lock() builds a LOCK"),
        };
        let r = run(vec![
            open(3),
            static_lock(1, 0),
            Op::CloseSession { caller: caller(3) }, // the static grant stays, detached
            open(3),
            static_lock(1, WAIT_FOREVER), // a new session: queued behind it
            lock(3, "a", 0, 2, 0),
        ]);
        assert_eq!(r[1], Reply::Granted { token: 1 });
        assert_eq!(r[4], Reply::Queued { position: 0 });
        assert!(
            matches!(r[5], Reply::Refused(Refusal::Invalid { .. })),
            "{:?}",
            r[5]
        );
    }

    /// A session that holds two locks, each with a waiter, expires: its
    /// grants end (token order) and then the freed queues are served. Which
    /// queue is served first decides which waiter gets which token; the model
    /// serves them in (zone, name) order. Found by the model test: the
    /// engine granted `b` first.
    #[test]
    fn session_expiry_serves_freed_queues_in_lock_order() {
        let r = run_at(vec![
            (0, open(1)),
            (0, open(3)),
            (
                0,
                Op::OpenSession {
                    caller: caller(4),
                    timeout_ms: 50,
                },
            ),
            (0, lock(4, "a", 0, 1, 0)),            // token 1
            (0, lock(3, "b", 0, 1, 0)),            // token 2
            (0, lock(1, "a", 0, 1, WAIT_FOREVER)), // 1 waits on a
            (0, lock(4, "b", 0, 2, 50)),           // 4 waits on b
            (0, lock(1, "b", 0, 2, WAIT_FOREVER)), // 1 waits on b behind 4
            (
                0,
                Op::Break {
                    zone: "z1".into(),
                    name: "b".into(),
                    expected_token: None,
                },
            ), // b -> 4 (token 3)
            (60, Op::Tick),                        // session 4 expires at 50: a and b are freed
        ]);
        assert_eq!(r[8], Reply::Broken { tokens: vec![2] });
        assert_eq!(r[9], Reply::Done);
    }

    /// The cluster-wide ended-grant table is full (3): when a grant held
    /// since token 1 is released, the table forgets the entry that ended
    /// first (token 2), not the smallest token, so a retry of the release
    /// from another session is still recognised. ARCHITECTURE says "the
    /// oldest tokens are forgotten first"; the engine and the model forget
    /// in end order, which keeps a long-held grant's end remembered.
    #[test]
    fn ended_table_forgets_in_end_order() {
        let limits = EngineLimits {
            ended_grants_max: 3,
            ..limits()
        };
        let key = Some(oclocks_core::KeyProof {
            key: [9; 32],
            counter: 1,
        });
        let key2 = Some(oclocks_core::KeyProof {
            key: [9; 32],
            counter: 2,
        });
        let keyed = match lock(1, "a", 0, 1, 0) {
            Op::Lock(r) => Op::Lock(LockRequest {
                key: key.clone(),
                ..r
            }),
            _ => unreachable!("lock() builds a LOCK"),
        };
        let release = |client: u128,
                       name: &str,
                       token: u64,
                       key: Option<oclocks_core::KeyProof>| Op::Release {
            caller: caller(client),
            zone: "z1".into(),
            name: name.into(),
            token,
            key,
        };
        let r = run_with(
            limits,
            vec![
                (0, open(1)),
                (0, open(2)),
                (0, keyed),                 // token 1, key-owned
                (0, lock(2, "b", 0, 1, 0)), // token 2
                (0, release(2, "b", 2, None)),
                (0, lock(2, "b", 0, 2, 0)), // token 3
                (0, release(2, "b", 3, None)),
                (0, lock(2, "b", 0, 3, 0)),            // token 4
                (0, release(2, "b", 4, None)),         // table: 2, 3, 4
                (0, release(1, "a", 1, key2.clone())), // table: 3, 4, 1
                (0, release(2, "a", 1, key2)),         // a retry from another session
                (0, release(1, "b", 2, None)), // forgotten (and not in session 1's own ring)
            ],
        );
        assert_eq!(
            r[9],
            Reply::Released {
                already_released: false
            }
        );
        assert_eq!(
            r[10],
            Reply::Released {
                already_released: true
            }
        );
        assert_eq!(r[11], Reply::Refused(Refusal::UnknownGrant));
    }
}
