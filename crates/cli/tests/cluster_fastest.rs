//! The client uses the fastest server (issue acceptance 5): a client given
//! only one endpoint learns the others from HELLO, measures their
//! round-trip times, and moves its primary connection to a faster server —
//! without a new session and without losing its lock.
//!
//! Node 3's client port is reached through a delaying TCP proxy in this
//! test, and node 3 advertises the proxy's address to clients
//! (`advertise_client`), so HELLO lists the slow path. The client starts
//! with that one endpoint.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Node;
use oclocks_client::{Client, ClientConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Added to each direction of every byte through the proxy.
const DELAY: Duration = Duration::from_millis(40);

/// Copy `from` to `to`, delivering each chunk `DELAY` after it was read
/// (order kept).
async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx
                    .send((tokio::time::Instant::now() + DELAY, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// A delaying proxy; its target is set once the cluster has started.
async fn proxy(listener: TcpListener, target: Arc<Mutex<Option<SocketAddr>>>) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            return;
        };
        let t = *target.lock().expect("target lock");
        let Some(t) = t else { continue };
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(t).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (ir, iw) = inbound.into_split();
            let (or, ow) = outbound.into_split();
            tokio::join!(pump(ir, ow), pump(or, iw));
        });
    }
}

#[test]
fn a_client_given_a_slow_endpoint_moves_to_a_faster_server() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let listener = rt
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("bind the proxy");
    let proxy_addr = listener.local_addr().expect("proxy addr");
    let target = Arc::new(Mutex::new(None));
    rt.spawn(proxy(listener, target.clone()));
    let node = Node::start_with(10_000, &|id| {
        if id == 3 {
            format!("advertise_client = \"{proxy_addr}\"")
        } else {
            String::new()
        }
    });
    if node.other_addrs.len() < 2 {
        eprintln!("needs a 3-node cluster (OCLOCKS_TEST_NODES=1 given): skipped");
        return;
    }
    *target.lock().expect("target lock") = Some(node.other_addrs[1]);

    rt.block_on(async {
        let mut cfg = ClientConfig::from_file(&node.client_config).expect("client config");
        cfg.endpoints = vec![proxy_addr.to_string()];
        cfg.probe_interval = Duration::from_millis(500);
        let client = Client::connect(cfg)
            .await
            .expect("connect through the slow proxy");
        let first = client.servers();
        println!("at connect: {first:#?}");
        assert!(
            first
                .iter()
                .any(|s| s.primary && s.address == proxy_addr.to_string()),
            "the client starts on its only endpoint, the proxy: {first:#?}"
        );
        let guard = client
            .lock("default", "fastest")
            .try_once()
            .acquire()
            .await
            .expect("take a lock through the slow server");
        let token = guard.token();
        let sessions_before = client.session().new_sessions;

        // It learns the others, measures them, and moves.
        let deadline = Instant::now() + Duration::from_secs(30);
        let moved = loop {
            let servers = client.servers();
            if let Some(p) = servers.iter().find(|s| s.primary) {
                if p.address != proxy_addr.to_string() {
                    break servers;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the client never left the slow server: {servers:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        println!("after the move: {moved:#?}");
        let primary = moved.iter().find(|s| s.primary).expect("a primary");
        let slow = moved
            .iter()
            .find(|s| s.address == proxy_addr.to_string())
            .expect("the proxy is still a known server");
        let (Some(fast_rtt), Some(slow_rtt)) = (primary.rtt, slow.rtt) else {
            panic!("both round-trip times are measured: {moved:#?}");
        };
        assert!(
            fast_rtt < slow_rtt && slow_rtt >= DELAY * 2,
            "primary {fast_rtt:?} must be faster than the proxied {slow_rtt:?} (≥ {:?})",
            DELAY * 2
        );
        println!("primary rtt {fast_rtt:?}, proxied rtt {slow_rtt:?}");

        // Same session, lock still held with the same token.
        let s = client.session();
        assert_eq!(
            s.new_sessions, sessions_before,
            "the move opened a new session: {s:?}"
        );
        assert!(
            guard.lost_reason().is_none(),
            "the lock was lost by the move"
        );
        let state = client.query("default", "fastest").await.expect("query");
        assert_eq!(
            state.holders.iter().map(|h| h.token).collect::<Vec<_>>(),
            vec![token]
        );
        guard.release().await.expect("release");
        client.close().await.expect("close");
    });
}
