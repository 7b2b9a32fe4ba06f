//! Criterion benchmarks of the lock engine (signature verification excluded:
//! it happens before a command enters the log).
//!
//! - `acquire_release_distinct`: one session takes and releases locks of
//!   distinct names; throughput counts applied commands (2 per cycle).
//! - `handoff_queue_1000`: 1,000 waiters queue on one lock; each iteration
//!   the holder releases (the head waiter is granted: one handoff) and
//!   queues again at the back, so the queue stays 1,000 long.
//!
//! Run: `cargo bench -p oclocks-core --bench engine`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use oclocks_core::*;

fn caller(client: ClientId) -> Caller {
    Caller {
        client,
        identity: "bench".into(),
    }
}

fn cmd(now: u64, op: Op) -> Command {
    Command {
        term: 1,
        now_ms: now,
        op,
    }
}

fn lock_req(client: ClientId, name: String, nonce: Nonce, wait_ms: u64) -> LockRequest {
    LockRequest {
        caller: caller(client),
        zone: "default".into(),
        name,
        mode: Mode::Exclusive,
        kind: Kind::Connection,
        ttl_ms: 0,
        wait_ms,
        lock_delay_ms: 0,
        owner: nonce,
        nonce,
        low_water: nonce,
        key: None,
    }
}

fn open(e: &mut Engine, client: ClientId) {
    e.apply(cmd(
        1,
        Op::OpenSession {
            caller: caller(client),
            timeout_ms: 600_000,
        },
    ));
}

fn acquire_release(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(2));
    let mut e = Engine::new(EngineLimits::default());
    e.set_check_invariants(false);
    open(&mut e, 1);
    let names: Vec<String> = (0..100_000).map(|i| format!("lock-{i:08}")).collect();
    let mut nonce = 0u64;
    g.bench_function("acquire_release_distinct", |b| {
        b.iter_batched(
            || {
                nonce += 1;
                let name = names[(nonce % names.len() as u64) as usize].clone();
                (lock_req(1, name.clone(), nonce, 0), name)
            },
            |(req, name)| {
                let token = match e.apply(cmd(2, Op::Lock(req))).reply {
                    Reply::Granted { token } => token,
                    other => panic!("{other:?}"),
                };
                let out = e.apply(cmd(
                    2,
                    Op::Release {
                        caller: caller(1),
                        zone: "default".into(),
                        name,
                        token,
                        key: None,
                    },
                ));
                debug_assert!(matches!(out.reply, Reply::Released { .. }));
                out
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn handoff(c: &mut Criterion) {
    const WAITERS: u64 = 1000;
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(1));
    let mut e = Engine::new(EngineLimits::default());
    e.set_check_invariants(false);
    let mut nonces = vec![0u64; WAITERS as usize + 2];
    let mut next = |client: ClientId| {
        nonces[client as usize] += 1;
        nonces[client as usize]
    };
    for c in 1..=WAITERS + 1 {
        open(&mut e, c as ClientId);
    }
    let n = next(1);
    let Reply::Granted { token } = e
        .apply(cmd(2, Op::Lock(lock_req(1, "hot".into(), n, 0))))
        .reply
    else {
        panic!("first acquire");
    };
    for c in 2..=WAITERS + 1 {
        let n = next(c as ClientId);
        e.apply(cmd(
            2,
            Op::Lock(lock_req(c as ClientId, "hot".into(), n, u64::MAX)),
        ));
    }
    let mut holder: ClientId = 1;
    let mut token = token;
    g.bench_function("handoff_queue_1000", |b| {
        b.iter(|| {
            let out = e.apply(cmd(
                2,
                Op::Release {
                    caller: caller(holder),
                    zone: "default".into(),
                    name: "hot".into(),
                    token,
                    key: None,
                },
            ));
            let Some(Effect::Granted {
                client, token: t, ..
            }) = out.effects.first()
            else {
                panic!("no handoff: {out:?}");
            };
            let old = holder;
            holder = *client;
            token = *t;
            let n = next(old);
            e.apply(cmd(2, Op::Lock(lock_req(old, "hot".into(), n, u64::MAX))))
        })
    });
    g.finish();
}

criterion_group!(benches, acquire_release, handoff);
criterion_main!(benches);
