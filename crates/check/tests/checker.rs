//! The checker against hand-made histories: every check is shown to fail on
//! a history that breaks its guarantee (double grant, token going
//! backwards, lost update, grant before the previous holder's end, a
//! non-linearizable release, ...), and to accept good histories, including
//! indeterminate operations and legitimate expiries. A generated history of
//! thousands of operations from a correct lock (with timeouts) must pass,
//! and the same history with one token corrupted must not.

use oclocks_check::{
    check, check_increments, Call, CheckOptions, Fail, FencedRegister, History, HistoryError,
    LockKey, OpId, Outcome, RecordEvent, RecordKind, Recorder, Report, Ret, Violation,
};
use oclocks_core::{EndReason, Kind, LossReason, Mode};

const A: u128 = 0xa;
const B: u128 = 0xb;
const C: u128 = 0xc;

fn l() -> LockKey {
    LockKey::new("default", "L")
}

/// A tiny builder: each op is (invoke, complete, call, outcome).
struct H {
    h: History,
    seq: u64,
}

impl H {
    fn new() -> H {
        H {
            h: History::new(),
            seq: 0,
        }
    }

    fn op(&mut self, invoke: u64, complete: Option<u64>, call: Call, outcome: Outcome) -> OpId {
        let id = self.h.invoke(invoke, call);
        if let Some(c) = complete {
            self.h.complete(id, c, outcome).expect("well-formed");
        }
        id
    }

    fn acquire(&mut self, c: u128, t: (u64, u64), mode: Mode, token: Option<u64>) -> OpId {
        let outcome = match token {
            Some(token) => Outcome::Ok(Ret::Granted { token }),
            None => Outcome::Indeterminate,
        };
        self.op(
            t.0,
            Some(t.1),
            Call::Acquire {
                client: c,
                lock: l(),
                mode,
                kind: Kind::Connection,
            },
            outcome,
        )
    }

    fn acquire_refused(&mut self, c: u128, t: (u64, u64)) -> OpId {
        self.op(
            t.0,
            Some(t.1),
            Call::Acquire {
                client: c,
                lock: l(),
                mode: Mode::Exclusive,
                kind: Kind::Connection,
            },
            Outcome::Fail(Fail::Refused("LOCKED".into())),
        )
    }

    fn release(&mut self, c: u128, t: (u64, u64), token: u64, outcome: Outcome) -> OpId {
        self.op(
            t.0,
            Some(t.1),
            Call::Release {
                client: c,
                lock: l(),
                token,
            },
            outcome,
        )
    }

    fn released(&mut self, c: u128, t: (u64, u64), token: u64) -> OpId {
        self.release(
            c,
            t,
            token,
            Outcome::Ok(Ret::Released {
                already_released: false,
            }),
        )
    }

    fn event(&mut self, window: (u64, u64), kind: RecordKind) {
        self.seq += 1;
        self.h.record(RecordEvent {
            seq: self.seq,
            lock: l(),
            window,
            kind,
        });
    }

    fn granted(&mut self, at: u64, token: u64, client: u128, mode: Mode) {
        self.event(
            (at, at),
            RecordKind::Granted {
                token,
                client,
                mode,
                kind: Kind::Connection,
            },
        );
    }

    fn ended(&mut self, window: (u64, u64), token: u64, client: u128, reason: EndReason) {
        self.event(
            window,
            RecordKind::Ended {
                token,
                client: Some(client),
                reason,
            },
        );
    }

    fn run(&self) -> Report {
        self.run_with(CheckOptions::default())
    }

    fn run_with(&self, o: CheckOptions) -> Report {
        check(&self.h, &o).expect("well-formed history")
    }
}

fn expired() -> EndReason {
    EndReason::Lost(LossReason::SessionExpired)
}

fn assert_ok(r: &Report) {
    assert!(r.is_ok(), "expected a clean report, got:\n{r}");
}

fn not_linearizable(r: &Report) -> &oclocks_check::Counterexample {
    r.violations
        .iter()
        .find_map(|v| match v {
            Violation::NotLinearizable(c) => Some(&**c),
            _ => None,
        })
        .unwrap_or_else(|| panic!("expected NotLinearizable, got:\n{r}"))
}

// ---------------------------------------------------------------------------
// Good histories
// ---------------------------------------------------------------------------

/// Two clients take turns; tokens rise; a LOCKED try in between.
#[test]
fn sequential_turns_pass() {
    let mut h = H::new();
    h.acquire(A, (0, 1), Mode::Exclusive, Some(1));
    h.acquire_refused(B, (2, 3));
    h.released(A, (4, 5), 1);
    h.acquire(B, (6, 7), Mode::Exclusive, Some(2));
    h.released(B, (8, 9), 2);
    h.release(
        B,
        (10, 11),
        2,
        Outcome::Ok(Ret::Released {
            already_released: true,
        }),
    );
    assert_ok(&h.run());
}

/// A release whose first attempt was lost and whose resend is answered
/// "already released" (the client library resends RELEASE after a
/// reconnect) did release the grant.
#[test]
fn retried_release_answered_already_released() {
    let mut h = H::new();
    h.acquire(A, (0, 1), Mode::Exclusive, Some(1));
    h.release(
        A,
        (2, 9),
        1,
        Outcome::Ok(Ret::Released {
            already_released: true,
        }),
    );
    h.acquire(B, (10, 11), Mode::Exclusive, Some(2));
    assert_ok(&h.run());
}

/// Concurrent acquires: B's grant must be placed after A's release, which
/// overlaps it in time.
#[test]
fn overlapping_intervals_pass() {
    let mut h = H::new();
    h.acquire(A, (0, 10), Mode::Exclusive, Some(1));
    h.acquire(B, (5, 30), Mode::Exclusive, Some(2));
    h.released(A, (12, 20), 1);
    assert_ok(&h.run());
}

/// Shared holders overlap each other; an exclusive one waits for both.
#[test]
fn shared_holders_overlap() {
    let mut h = H::new();
    h.acquire(A, (0, 1), Mode::Shared, Some(1));
    h.acquire(B, (2, 3), Mode::Shared, Some(2));
    h.released(A, (4, 5), 1);
    h.released(B, (6, 7), 2);
    h.acquire(C, (8, 9), Mode::Exclusive, Some(3));
    assert_ok(&h.run());
}

/// A's session expires by the record; B's grant after that is fine, and A's
/// late release is told LOST.
#[test]
fn legitimate_expiry_passes() {
    let mut h = H::new();
    h.acquire(A, (0, 1), Mode::Exclusive, Some(1));
    h.ended((10, 12), 1, A, expired());
    h.acquire(B, (11, 20), Mode::Exclusive, Some(2));
    h.release(A, (25, 26), 1, Outcome::Fail(Fail::NotHeld("LOST".into())));
    assert_ok(&h.run());
}

/// An acquire that timed out may never have happened...
#[test]
fn indeterminate_acquire_that_never_happened() {
    let mut h = H::new();
    h.acquire(A, (0, 5), Mode::Exclusive, None);
    h.acquire(B, (10, 11), Mode::Exclusive, Some(1));
    assert_ok(&h.run());
}

/// ...or may have happened, its unknown grant ending by session expiry
/// (the record names the token, the model guesses whose it was).
#[test]
fn indeterminate_acquire_that_happened_and_expired() {
    let mut h = H::new();
    h.acquire(A, (0, 5), Mode::Exclusive, None);
    h.acquire(B, (1, 2), Mode::Exclusive, Some(2));
    h.released(B, (3, 4), 2);
    h.ended((30, 31), 3, A, expired());
    h.acquire(C, (40, 41), Mode::Exclusive, Some(4));
    assert_ok(&h.run());
}

/// An indeterminate release may have taken effect.
#[test]
fn indeterminate_release_then_grant() {
    let mut h = H::new();
    h.acquire(A, (0, 1), Mode::Exclusive, Some(1));
    h.release(A, (2, 3), 1, Outcome::Indeterminate);
    h.acquire(B, (10, 11), Mode::Exclusive, Some(2));
    assert_ok(&h.run());
}

/// A cancel that raced a grant gives it back; a cancel that found nothing
/// stops the acquire from happening later.
#[test]
fn cancels_pass() {
    let mut h = H::new();
    let a = h.acquire(A, (0, 100), Mode::Exclusive, Some(1));
    h.op(
        50,
        Some(60),
        Call::Cancel {
            client: A,
            acquire: a,
        },
        Outcome::Ok(Ret::Cancelled { gave_back: Some(1) }),
    );
    let b = h.acquire(B, (70, 80), Mode::Exclusive, None);
    h.op(
        81,
        Some(82),
        Call::Cancel {
            client: B,
            acquire: b,
        },
        Outcome::Ok(Ret::Cancelled { gave_back: None }),
    );
    h.acquire(C, (90, 91), Mode::Exclusive, Some(2));
    assert_ok(&h.run());
}

/// Closing a session releases its connection locks.
#[test]
fn close_releases() {
    let mut h = H::new();
    h.acquire(A, (0, 1), Mode::Exclusive, Some(1));
    h.op(
        2,
        Some(3),
        Call::Close { client: A },
        Outcome::Ok(Ret::Closed),
    );
    h.acquire(B, (4, 5), Mode::Exclusive, Some(2));
    assert_ok(&h.run());
}

/// A complete record that agrees with the clients.
#[test]
fn record_agrees() {
    let mut h = H::new();
    h.acquire(A, (0, 2), Mode::Exclusive, Some(1));
    h.granted(1, 1, A, Mode::Exclusive);
    h.ended((3, 4), 1, A, EndReason::Lost(LossReason::TtlExpired));
    h.acquire(B, (5, 7), Mode::Exclusive, Some(2));
    h.granted(6, 2, B, Mode::Exclusive);
    h.released(B, (8, 10), 2);
    h.ended((9, 9), 2, B, EndReason::Released);
    assert_ok(&h.run_with(CheckOptions {
        record_complete: true,
        ..CheckOptions::default()
    }));
}

/// The recorder is shared by threads.
#[test]
fn recorder_from_threads() {
    let rec = Recorder::new();
    let handles: Vec<_> = (0..4u64)
        .map(|i| {
            let rec = rec.clone();
            std::thread::spawn(move || {
                let lock = LockKey::new("z", format!("l{i}"));
                for k in 0..50 {
                    let id = rec.invoke(Call::Acquire {
                        client: u128::from(i),
                        lock: lock.clone(),
                        mode: Mode::Exclusive,
                        kind: Kind::Connection,
                    });
                    let token = i * 1000 + 2 * k + 1;
                    rec.complete(id, Outcome::Ok(Ret::Granted { token }))
                        .expect("complete");
                    let id = rec.invoke(Call::Release {
                        client: u128::from(i),
                        lock: lock.clone(),
                        token,
                    });
                    rec.complete(
                        id,
                        Outcome::Ok(Ret::Released {
                            already_released: false,
                        }),
                    )
                    .expect("complete");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    let h = rec.history();
    assert_eq!(h.ops().len(), 400);
    assert_ok(&check(&h, &CheckOptions::default()).expect("well formed"));
}

// ---------------------------------------------------------------------------
// Bad histories: each check fails
// ---------------------------------------------------------------------------

/// Two clients hold the exclusive lock at once.
#[test]
fn double_grant_is_caught() {
    let mut h = H::new();
    let a = h.acquire(A, (0, 1), Mode::Exclusive, Some(1));
    let b = h.acquire(B, (2, 3), Mode::Exclusive, Some(2));
    h.released(A, (4, 5), 1);
    let r = h.run();
    let c = not_linearizable(&r);
    assert!(c.involved.contains(&oclocks_check::Involved::Op(a)), "{c}");
    assert!(c.involved.contains(&oclocks_check::Involved::Op(b)), "{c}");
    assert!(c.stuck.contains("conflicts with holder"), "{c}");
}

/// A shared grant while an exclusive one is held.
#[test]
fn shared_with_exclusive_is_caught() {
    let mut h = H::new();
    h.acquire(A, (0, 1), Mode::Exclusive, Some(1));
    h.acquire(B, (2, 3), Mode::Shared, Some(2));
    not_linearizable(&h.run());
}

/// A later grant with a smaller token.
#[test]
fn token_going_backwards_is_caught() {
    let mut h = H::new();
    h.acquire(A, (0, 1), Mode::Exclusive, Some(5));
    h.released(A, (2, 3), 5);
    h.acquire(B, (4, 5), Mode::Exclusive, Some(3));
    let r = h.run();
    assert!(
        r.violations.iter().any(|v| matches!(
            v,
            Violation::TokensOutOfOrder {
                earlier_token: 5,
                later_token: 3,
                ..
            }
        )),
        "{r}"
    );
    not_linearizable(&r);
}

/// The same token handed out twice (to different locks, even).
#[test]
fn token_reuse_is_caught() {
    let mut h = H::new();
    h.acquire(A, (0, 1), Mode::Exclusive, Some(7));
    h.op(
        2,
        Some(3),
        Call::Acquire {
            client: B,
            lock: LockKey::new("default", "M"),
            mode: Mode::Exclusive,
            kind: Kind::Connection,
        },
        Outcome::Ok(Ret::Granted { token: 7 }),
    );
    let r = h.run();
    assert!(
        r.violations
            .iter()
            .any(|v| matches!(v, Violation::TokenReused { token: 7, .. })),
        "{r}"
    );
}

/// Record order: token 4 granted after token 6 on the same lock.
#[test]
fn record_token_order_is_caught() {
    let mut h = H::new();
    h.granted(1, 6, A, Mode::Exclusive);
    h.ended((2, 2), 6, A, EndReason::Released);
    h.granted(3, 4, B, Mode::Exclusive);
    let r = h.run();
    assert!(
        r.violations.iter().any(|v| matches!(
            v,
            Violation::TokensOutOfOrder {
                earlier_token: 6,
                later_token: 4,
                ..
            }
        )),
        "{r}"
    );
}

/// The record grants B while A's grant has not yet ended (A's expiry comes
/// after B's grant).
#[test]
fn grant_before_previous_expiry_is_caught() {
    let mut h = H::new();
    h.granted(1, 1, A, Mode::Exclusive);
    h.granted(5, 2, B, Mode::Exclusive);
    h.ended((6, 6), 1, A, expired());
    let r = h.run();
    assert!(
        r.violations.iter().any(|v| matches!(
            v,
            Violation::OverlappingGrants {
                held: 1,
                granted: 2,
                ..
            }
        )),
        "{r}"
    );
}

/// Shared grants may overlap in the record, an exclusive one may not.
#[test]
fn record_shared_overlap_ok_exclusive_not() {
    let mut h = H::new();
    h.granted(1, 1, A, Mode::Shared);
    h.granted(2, 2, B, Mode::Shared);
    assert_ok(&h.run());
    h.granted(3, 3, C, Mode::Exclusive);
    let r = h.run();
    assert!(
        r.violations
            .iter()
            .any(|v| matches!(v, Violation::OverlappingGrants { granted: 3, .. })),
        "{r}"
    );
}

/// A grant that came back to a client but never made it into the record
/// (e.g. answered from an uncommitted log entry).
#[test]
fn grant_missing_from_record_is_caught() {
    let mut h = H::new();
    h.acquire(A, (0, 2), Mode::Exclusive, Some(1));
    h.granted(1, 1, A, Mode::Exclusive);
    h.acquire(B, (5, 7), Mode::Exclusive, Some(2));
    let r = h.run_with(CheckOptions {
        record_complete: true,
        ..CheckOptions::default()
    });
    assert!(
        r.violations
            .iter()
            .any(|v| matches!(v, Violation::GrantNotInRecord { token: 2, .. })),
        "{r}"
    );
}

/// B's grant completes before A's release of the exclusive lock even
/// started: no order explains it.
#[test]
fn release_after_takeover_is_caught() {
    let mut h = H::new();
    h.acquire(A, (0, 1), Mode::Exclusive, Some(1));
    h.acquire(B, (2, 3), Mode::Exclusive, Some(2));
    h.released(A, (10, 11), 1);
    not_linearizable(&h.run());
}

/// A release that succeeds twice (not as a retry) is not linearizable.
#[test]
fn double_release_is_caught() {
    let mut h = H::new();
    h.acquire(A, (0, 1), Mode::Exclusive, Some(1));
    h.released(A, (2, 3), 1);
    h.released(A, (4, 5), 1);
    let r = h.run();
    let c = not_linearizable(&r);
    assert!(c.stuck.contains("not held"), "{c}");
}

/// LOST for a grant that nothing ended.
#[test]
fn lost_without_an_end_is_caught() {
    let mut h = H::new();
    h.acquire(A, (0, 1), Mode::Exclusive, Some(1));
    h.release(A, (2, 3), 1, Outcome::Fail(Fail::NotHeld("LOST".into())));
    not_linearizable(&h.run());
}

/// An expiry in the record does not excuse a grant before it.
#[test]
fn grant_before_record_expiry_is_caught() {
    let mut h = H::new();
    h.acquire(A, (0, 1), Mode::Exclusive, Some(1));
    h.acquire(B, (2, 3), Mode::Exclusive, Some(2));
    h.ended((10, 12), 1, A, expired());
    not_linearizable(&h.run());
}

/// A cancel that "found nothing" while the grant it would give back is
/// still held.
#[test]
fn cancel_missing_a_held_grant_is_caught() {
    let mut h = H::new();
    let a = h.acquire(A, (0, 1), Mode::Exclusive, Some(1));
    h.op(
        2,
        Some(3),
        Call::Cancel {
            client: A,
            acquire: a,
        },
        Outcome::Ok(Ret::Cancelled { gave_back: None }),
    );
    not_linearizable(&h.run());
}

/// Lost update: two holders with one token interleave their
/// read-modify-writes on the fenced register.
#[test]
fn lost_update_is_caught() {
    let reg = FencedRegister::new();
    let va = reg.read(4).expect("read");
    let vb = reg.read(4).expect("read");
    reg.write(4, va + 1).expect("write");
    reg.write(4, vb + 1).expect("write");
    let r = check_increments(&reg.state(), 2, 0);
    assert!(
        matches!(
            r,
            Err(Violation::LostUpdate {
                value: 1,
                acknowledged: 2,
                ..
            })
        ),
        "{r:?}"
    );
}

/// With distinct, increasing tokens the stale holder's write is refused and
/// nothing acknowledged is lost.
#[test]
fn fencing_refuses_the_stale_holder() {
    let reg = FencedRegister::new();
    let old = reg.read(1).expect("read");
    let new = reg.read(2).expect("read");
    assert!(reg.write(1, old + 1).is_err(), "stale write must be fenced");
    reg.write(2, new + 1).expect("write");
    check_increments(&reg.state(), 1, 0).expect("no lost update");
    assert!(reg.read(1).is_err());
    assert_eq!(reg.state().refused, 2);
}

/// A search that exceeds its budget says so instead of passing or hanging.
#[test]
fn budget_exhaustion_is_inconclusive() {
    let h = correct_history(3, 8, 100, 1);
    let r = check(
        &h,
        &CheckOptions {
            states_max: 10,
            ..CheckOptions::default()
        },
    )
    .expect("well formed");
    assert!(!r.is_ok());
    assert!(r.violations.is_empty(), "{r}");
    assert_eq!(r.inconclusive.len(), 1, "{r}");
}

/// Malformed histories are errors, not verdicts.
#[test]
fn malformed_histories_are_errors() {
    let mut h = History::new();
    let id = h.invoke(
        5,
        Call::Release {
            client: A,
            lock: l(),
            token: 1,
        },
    );
    assert!(matches!(
        h.complete(id, 4, Outcome::Indeterminate),
        Err(HistoryError::CompletesBeforeInvoke { .. })
    ));
    h.complete(id, 6, Outcome::Ok(Ret::Granted { token: 1 }))
        .expect("complete");
    assert!(matches!(
        h.complete(id, 7, Outcome::Indeterminate),
        Err(HistoryError::CompletedTwice(_))
    ));
    assert!(matches!(
        check(&h, &CheckOptions::default()),
        Err(HistoryError::OutcomeMismatch { .. })
    ));
    let mut h = History::new();
    h.invoke(
        0,
        Call::Cancel {
            client: A,
            acquire: OpId(9),
        },
    );
    assert!(matches!(
        check(&h, &CheckOptions::default()),
        Err(HistoryError::CancelTarget { .. })
    ));
}

// ---------------------------------------------------------------------------
// A generated history from a correct lock
// ---------------------------------------------------------------------------

/// A small deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Clients run acquire/release loops against a correct in-memory lock per
/// name; each operation takes effect at a random instant inside its
/// interval; some replies are lost (indeterminate); some grants expire
/// (recorded). Returns the history and the number of ops.
fn correct_history(seed: u64, clients: u64, rounds: u64, locks: u64) -> History {
    #[derive(Clone)]
    enum St {
        Idle,
        Holding(u64, u64),
    }
    let mut rng = Rng(seed);
    let mut h = History::new();
    let mut holder: Vec<Option<(u128, u64)>> = vec![None; locks as usize];
    let mut state = vec![St::Idle; clients as usize];
    let mut token = 0;
    let mut seq = 0;
    let mut t = 0;
    let mut last_effect = 0;
    for _ in 0..rounds {
        for c in 0..clients {
            t += 1 + rng.below(3);
            let client = u128::from(c);
            let invoke = t;
            // Effects happen in processing order, inside each interval.
            let effect = (t + rng.below(5)).max(last_effect + 1);
            last_effect = effect;
            let complete = effect + rng.below(5);
            let lost = rng.below(20) == 0;
            match state[c as usize].clone() {
                St::Idle => {
                    let li = rng.below(locks);
                    let lock = LockKey::new("z", format!("l{li}"));
                    let id = h.invoke(
                        invoke,
                        Call::Acquire {
                            client,
                            lock: lock.clone(),
                            mode: Mode::Exclusive,
                            kind: Kind::Connection,
                        },
                    );
                    let outcome = if holder[li as usize].is_none() {
                        token += 1;
                        holder[li as usize] = Some((client, token));
                        state[c as usize] = St::Holding(li, token);
                        Outcome::Ok(Ret::Granted { token })
                    } else {
                        Outcome::Fail(Fail::Refused("LOCKED".into()))
                    };
                    let outcome = if lost {
                        Outcome::Indeterminate
                    } else {
                        outcome
                    };
                    if lost {
                        // The client lost track: the grant, if any, expires.
                        if let St::Holding(li, tok) = state[c as usize] {
                            let at = effect + 10 + rng.below(10);
                            t = t.max(at);
                            last_effect = at + 1;
                            holder[li as usize] = None;
                            seq += 1;
                            h.record(RecordEvent {
                                seq,
                                lock: lock.clone(),
                                window: (at, at + 1),
                                kind: RecordKind::Ended {
                                    token: tok,
                                    client: Some(client),
                                    reason: EndReason::Lost(LossReason::SessionExpired),
                                },
                            });
                            state[c as usize] = St::Idle;
                        }
                    }
                    h.complete(id, complete, outcome).expect("complete");
                }
                St::Holding(li, tok) => {
                    let lock = LockKey::new("z", format!("l{li}"));
                    let id = h.invoke(
                        invoke,
                        Call::Release {
                            client,
                            lock,
                            token: tok,
                        },
                    );
                    holder[li as usize] = None;
                    state[c as usize] = St::Idle;
                    let outcome = if lost {
                        Outcome::Indeterminate
                    } else {
                        Outcome::Ok(Ret::Released {
                            already_released: false,
                        })
                    };
                    h.complete(id, complete, outcome).expect("complete");
                }
            }
        }
    }
    h
}

/// Thousands of operations from a correct lock pass; corrupting one token
/// makes them fail.
#[test]
fn generated_correct_history_passes_and_corruption_fails() {
    for seed in 0..5 {
        let h = correct_history(seed, 8, 400, 3);
        assert!(h.ops().len() >= 3000);
        let r = check(&h, &CheckOptions::default()).expect("well formed");
        assert_ok(&r);

        // Corrupt: give a later grant an old token.
        let mut bad = History::new();
        let mut done = false;
        let mut granted = Vec::new();
        for op in h.ops() {
            let id = bad.invoke(op.invoke, op.call.clone());
            let mut outcome = op.outcome.clone();
            if let Outcome::Ok(Ret::Granted { token }) = outcome {
                if !done && granted.len() > 50 {
                    outcome = Outcome::Ok(Ret::Granted {
                        token: granted[granted.len() / 2],
                    });
                    done = true;
                }
                granted.push(token);
            }
            if let Some(c) = op.complete {
                bad.complete(id, c, outcome).expect("complete");
            }
        }
        for ev in h.record_events() {
            bad.record(ev.clone());
        }
        let r = check(&bad, &CheckOptions::default()).expect("well formed");
        assert!(
            !r.violations.is_empty(),
            "corruption not caught (seed {seed})"
        );
    }
}
