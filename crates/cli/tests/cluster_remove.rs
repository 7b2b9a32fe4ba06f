//! `oclocks cluster members` and `oclocks cluster remove`: a removal that
//! would leave the remaining voters without a reachable quorum is refused,
//! one that leaves a quorum goes through Raft, and only administrators may
//! remove.

mod common;

use std::time::{Duration, Instant};

use common::{write_client_config, Node};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn removal_is_refused_without_a_reachable_quorum_and_needs_an_admin() {
    let mut node = Node::start(10_000);
    if node.others.len() < 2 {
        eprintln!("needs a 3-node cluster (OCLOCKS_TEST_NODES=1 given): skipped");
        return;
    }
    let members = node.cli_output(&["cluster", "members"]);
    assert!(members.status.success(), "{}", stderr(&members));
    let text = stdout(&members);
    println!("{text}");
    for id in ["1", "2", "3"] {
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().next() == Some(id)),
            "node {id} missing from:\n{text}"
        );
    }
    assert!(text.contains("leader"), "{text}");

    // bob is not an administrator.
    let bob_toml = node.path("bob.toml");
    write_client_config(&bob_toml, node.dir.path(), node.addr, "bob");
    let out = node
        .cli(&["cluster", "remove", "3"])
        .env("OCLOCKS_CONFIG", &bob_toml)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("FORBIDDEN"), "{}", stderr(&out));

    // Node 3 dies: removing node 2 would leave {1, 3} with only node 1
    // reachable — refused; the cluster is unchanged.
    let mut third = node.others.pop().expect("node 3");
    let _ = third.kill();
    let _ = third.wait();
    // Let the leader notice (its last contact with node 3 ages past the
    // window of two election timeouts).
    std::thread::sleep(Duration::from_millis(2500));
    let out = node.cli_output(&["cluster", "remove", "2"]);
    assert!(!out.status.success(), "removal of node 2 was accepted");
    let err = stderr(&out);
    assert!(err.contains("could not form a quorum"), "{err}");
    println!("refused as expected: {err}");

    // Removing the dead node 3 leaves {1, 2}, both reachable: accepted.
    let out = node.cli_output(&["cluster", "remove", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = stdout(&node.cli_output(&["cluster", "members"]));
        let ids: Vec<&str> = text
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        if ids == ["1", "2"] {
            break;
        }
        assert!(Instant::now() < deadline, "members after removal:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The two-node cluster still serves.
    let out = node.cli_output(&["acquire", "--static", "after-removal", "--key", "k.key"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Removing a node that is not a member is refused.
    let out = node.cli_output(&["cluster", "remove", "3"]);
    assert!(stderr(&out).contains("not a member"), "{}", stderr(&out));
    node.kill9();
}
