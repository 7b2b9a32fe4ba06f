//! A follower that lags behind the leader's purged log catches up by
//! receiving the snapshot over the peer protocol (openraft's chunked
//! InstallSnapshot, our framing) and then serves the same state.

mod common;

use std::time::Duration;

use common::cluster::{ClusterOpts, TestCluster};
use oclocks_client::Client;

#[test]
fn a_lagging_follower_catches_up_from_a_streamed_snapshot() {
    // A snapshot every 40 entries, 5 entries kept behind it: a node that
    // misses a few hundred entries can only catch up from the snapshot.
    let mut c = TestCluster::start(ClusterOpts::voters(3).snapshots(40, 5));
    let leader = c.wait_for_leader(Duration::from_secs(10));
    let lagging = c
        .ids()
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");
    c.kill9(lagging);
    let up: Vec<u64> = c.ids().into_iter().filter(|id| *id != lagging).collect();

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (client, guard, last) = rt.block_on(async {
        let client = Client::connect(c.client_cfg(&up, "alice"))
            .await
            .expect("connect");
        let held = client
            .lock("default", "kept")
            .try_once()
            .acquire()
            .await
            .expect("take the lock that stays held");
        let mut last = 0;
        for i in 0..150 {
            let g = client
                .lock("default", format!("cycle-{}", i % 7))
                .try_once()
                .acquire()
                .await
                .expect("acquire");
            last = g.token();
            g.release().await.expect("release");
        }
        (client, held, last)
    });
    // The guard and its client stay alive to the end: the lock stays held.
    let held = guard.token();
    println!("held token {held}; last token {last} while node {lagging} was down");

    c.restart(lagging);
    c.wait_caught_up(lagging, Duration::from_secs(30));
    let log = c.node(lagging).log_since_start();
    assert!(
        log.contains("snapshot installed"),
        "node {lagging} caught up without installing a snapshot (is the log still unpurged?):\n{log}"
    );
    assert_eq!(c.held_via(lagging, "kept"), vec![held]);
    // It serves writes too, and its tokens continue the sequence.
    let out = c.cli_output(lagging, &["acquire", "--static", "after", "--key", "k.key"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a token");
    assert!(token > last, "token {token} after {last}");
    drop(guard);
    drop(client);
}
