//! Criterion benchmark of the hot path: encode a LOCK request and decode it
//! again with the server's codec. Three shapes: a signed static LOCK (the
//! golden one, 13 items, 190 bytes), a plain connection LOCK with a wait
//! bound (7 items), and 1,000 plain LOCKs pipelined through one buffer.
//! Each is measured twice, once reported in bytes/s and once in items/s;
//! requests/s is items/s divided by the items per request.

#[path = "../tests/common/mod.rs"]
mod common;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use oclocks_proto::*;
use std::hint::black_box;
use tokio_util::codec::Decoder;

/// The golden signed static LOCK, shared with the tests.
fn signed_lock() -> Request {
    common::example_lock_request()
}

fn plain_lock(id: u64) -> Request {
    Request {
        id,
        body: RequestBody::Lock(Lock {
            zone: "default".into(),
            name: format!("orders/{id}"),
            mode: Mode::Exclusive,
            kind: Kind::Connection,
            ttl_ms: 0,
            wait_ms: 10_000,
            lock_delay_ms: 0,
            owner_id: 0,
            nonce: id,
            low_water: id.saturating_sub(8),
            owner_sig: None,
        }),
    }
}

/// Encode all of `reqs` into `buf`, then decode them all back.
fn round_trip(reqs: &[Request], buf: &mut BytesMut, codec: &mut RequestCodec, limits: &Limits) {
    buf.clear();
    for r in reqs {
        r.encode(buf, limits).expect("encodes");
    }
    let mut n = 0;
    while let Some(r) = codec.decode(buf).expect("decodes") {
        black_box(&r);
        n += 1;
    }
    assert_eq!(n, reqs.len());
}

fn bench(c: &mut Criterion) {
    let limits = Limits::default();
    let cases: Vec<(&str, Vec<Request>, u64)> = vec![
        ("signed", vec![signed_lock()], 13),
        ("plain", vec![plain_lock(1_000_000)], 7),
        (
            "pipelined_x1000",
            (1_000_000..1_001_000).map(plain_lock).collect(),
            7 * 1000,
        ),
    ];
    for (unit, bytes) in [("bytes", true), ("items", false)] {
        let mut group = c.benchmark_group(format!("lock_encode_decode_{unit}"));
        for (name, reqs, items) in &cases {
            let mut buf = BytesMut::new();
            for r in reqs {
                r.encode(&mut buf, &limits).expect("encodes");
            }
            group.throughput(if bytes {
                Throughput::Bytes(buf.len() as u64)
            } else {
                Throughput::Elements(*items)
            });
            let mut codec = RequestCodec::new(limits.clone());
            group.bench_with_input(BenchmarkId::from_parameter(name), reqs, |b, reqs| {
                b.iter(|| round_trip(black_box(reqs), &mut buf, &mut codec, &limits))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
