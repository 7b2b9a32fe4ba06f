//! Hostile input on the peer protocol, from a holder of a valid server
//! certificate: a frame length over `PEER_FRAME_BYTES_MAX`, bytes that do
//! not decode, a request before the handshake, a handshake naming another
//! cluster or another node, and a not-yet-joined caller asking for more
//! than a join. Each closes or refuses that connection only; the cluster
//! keeps serving (checked after each).

mod common;

use std::time::Duration;

use common::cluster::{ClusterOpts, TestCluster};
use common::tls_connect;
use oclocks_server::peer::{Frame, PeerHello, PeerRequest, PeerResponse, PEER_FRAME_BYTES_MAX};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn frame<T: serde::Serialize>(body: &Frame<T>) -> Vec<u8> {
    let bytes = postcard::to_stdvec(body).expect("encode");
    let mut out = u32::try_from(bytes.len())
        .expect("small")
        .to_be_bytes()
        .to_vec();
    out.extend_from_slice(&bytes);
    out
}

/// Send `bytes` as node 3 on the peer protocol to `target`; return what
/// came back before the server closed (or `wait` passed).
async fn exchange_for(c: &TestCluster, target: u64, bytes: &[u8], wait: Duration) -> Vec<u8> {
    let mut tls = tls_connect(
        c.node(target).addr,
        &c.certs,
        "node3",
        oclocks_proto::ALPN_PEER,
    )
    .await
    .expect("TLS with a server certificate");
    let _ = tls.write_all(bytes).await;
    let _ = tls.flush().await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(wait, tls.read_to_end(&mut buf)).await;
    buf
}

async fn exchange(c: &TestCluster, target: u64, bytes: &[u8]) -> Vec<u8> {
    exchange_for(c, target, bytes, Duration::from_secs(5)).await
}

/// Decode the response frames in `buf`.
fn responses(mut buf: &[u8]) -> Vec<PeerResponse> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if buf.len() < 4 + len {
            break;
        }
        let f: Frame<PeerResponse> = postcard::from_bytes(&buf[4..4 + len]).expect("decodes");
        out.push(f.body);
        buf = &buf[4 + len..];
    }
    out
}

fn hello(cluster_id: Option<u128>, to: Option<u64>) -> Frame<PeerRequest> {
    Frame {
        id: 0,
        body: PeerRequest::Hello(PeerHello {
            cluster_id,
            from: 3,
            from_incarnation: 12345,
            to,
            to_incarnation: None,
        }),
    }
}

#[test]
fn hostile_peer_input_closes_only_that_connection() {
    let c = TestCluster::start(ClusterOpts::voters(3));
    let leader = c.wait_for_leader(Duration::from_secs(10));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let still_serves = |what: &str| {
        let out = c.cli_output(leader, &["acquire", "--static", what, "--key", "k.key"]);
        assert!(
            out.status.success(),
            "after {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    // A length over the limit: closed without reading (or allocating) it.
    let over = u32::try_from(PEER_FRAME_BYTES_MAX + 1)
        .expect("fits")
        .to_be_bytes();
    let got = rt.block_on(exchange(&c, leader, &over));
    assert!(got.is_empty(), "answered an over-limit frame: {got:02x?}");
    still_serves("over-limit");

    // Exactly at the limit is a valid length (the frame never completes
    // here; the server waits for it and closes when we do).
    let at = u32::try_from(PEER_FRAME_BYTES_MAX)
        .expect("fits")
        .to_be_bytes();
    let got = rt.block_on(exchange_for(&c, leader, &at, Duration::from_millis(500)));
    assert!(got.is_empty());
    still_serves("at-limit");

    // Garbage that does not decode as a handshake.
    let mut garbage = 7u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xff; 7]);
    assert!(rt.block_on(exchange(&c, leader, &garbage)).is_empty());
    still_serves("garbage");

    // A request before the handshake.
    let early = frame(&Frame {
        id: 1,
        body: PeerRequest::ReadIndex,
    });
    assert!(rt.block_on(exchange(&c, leader, &early)).is_empty());
    still_serves("no-handshake");

    // Another cluster's id: refused with the reason.
    let got = responses(&rt.block_on(exchange(&c, leader, &frame(&hello(Some(42), None)))));
    match got.as_slice() {
        [PeerResponse::Refused(r)] => assert!(r.contains("cluster"), "{r}"),
        other => panic!("another cluster's handshake: {other:?}"),
    }
    // Meant for another node: refused.
    let got = responses(&rt.block_on(exchange(&c, leader, &frame(&hello(None, Some(99))))));
    match got.as_slice() {
        [PeerResponse::Refused(r)] => assert!(r.contains("not node 99"), "{r}"),
        other => panic!("a handshake for node 99: {other:?}"),
    }
    // Not joined (no cluster id): welcomed, but only a join is allowed.
    let mut bytes = frame(&hello(None, None));
    bytes.extend(frame(&Frame {
        id: 1,
        body: PeerRequest::ReadIndex,
    }));
    let got = responses(&rt.block_on(exchange(&c, leader, &bytes)));
    match got.as_slice() {
        [PeerResponse::Welcome(_), PeerResponse::Refused(r)] => {
            assert!(r.contains("only ask to join"), "{r}")
        }
        other => panic!("a read-index from a node that has not joined: {other:?}"),
    }
    still_serves("refusals");
}
