//! Membership and roles, with real server processes.
//!
//! (a) A 4th node joins a running 3-node cluster through `peers`: the
//!     leader adds it as a learner; not being listed in any server's
//!     `peers`/`voters`, it stays one until an administrator approves it
//!     (PROMOTE_SERVER; refused for bob), then it is a voter; a 5th node
//!     with `role = "learner"` joins and stays a learner, and serves
//!     clients.
//! (b) A 5-node cluster with one quorum-only node: a HELLO to it gets
//!     UNAVAILABLE (with the servers that do serve clients), the cluster
//!     survives the SIGKILL of two other nodes, and across 10 leader kills
//!     the quorum-only node never leads.
//! (c) A member restarted with an empty data directory is refused its old
//!     slot: the server exits non-zero saying it was wiped and how to
//!     remove it (`oclocks cluster remove`).
//! (d) TLS roles both ways: a client certificate cannot speak the peer
//!     protocol (the server closes without answering), and a server
//!     certificate used as a client cannot BREAK even when its CN is listed
//!     in `admins` (an admin client certificate can).

mod common;

use std::time::{Duration, Instant};

use common::cluster::{ClusterOpts, NodeRole, TestCluster};
use common::{rand_client_id, tls_connect, RawConn};
use oclocks_client::{Client, Error};
use oclocks_proto::{Break, ErrorCode, RequestBody, ResponseBody, Role};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// `oclocks acquire --static NAME` as alice through node `via`; the token.
fn acquire_static(c: &TestCluster, via: u64, name: &str) -> u64 {
    let key = c.path("owner.key");
    let out = c.cli_output(
        via,
        &[
            "acquire",
            "--static",
            "--key",
            key.to_str().expect("utf-8 path"),
            name,
        ],
    );
    if !out.status.success() {
        c.fail(&format!(
            "acquire {name} through node {via}: {}",
            stderr(&out)
        ));
    }
    stdout(&out).parse().expect("acquire printed the token")
}

/// Node `id`'s role in node `via`'s server list.
fn role_of(c: &TestCluster, via: u64, id: u64) -> Option<Role> {
    let s = c.status(via).ok()?;
    s.servers.iter().find(|s| s.node_id == id)?.role
}

#[test]
fn a_new_node_joins_as_learner_then_voter_and_a_wiped_member_is_refused() {
    let mut c = TestCluster::start(ClusterOpts::voters(3));
    let leader = c.wait_for_leader(Duration::from_secs(10));
    let before = acquire_static(&c, 1, "m-before");

    // (a) Node 4 (voter) joins; watch its role in the leader's list. It is
    // in no other server's `peers` or `voters`, so it joins as a learner and
    // stays one until an administrator approves it.
    let started = Instant::now();
    let four = c.add_node(NodeRole::Voter);
    let mut seen: Vec<Option<Role>> = Vec::new();
    let deadline = started + Duration::from_secs(30);
    loop {
        let r = role_of(&c, leader, four);
        if seen.last() != Some(&r) {
            seen.push(r);
        }
        if matches!(r, Some(Role::Learner)) {
            break;
        }
        if Instant::now() >= deadline {
            c.fail(&format!(
                "node {four} did not become a learner: roles {seen:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    c.wait_ready(four, Duration::from_secs(30));
    c.wait_joined(four, Duration::from_secs(30));
    println!(
        "membership (a): node {four} joined as a learner in {:?}",
        started.elapsed()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        role_of(&c, leader, four),
        Some(Role::Learner),
        "an unapproved node must stay a learner"
    );
    // bob is no administrator; alice is.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut bob = rt.block_on(RawConn::connect_at(c.node(leader).addr, &c.certs, "bob"));
    match rt.block_on(bob.request(RequestBody::PromoteServer { node_id: four })) {
        ResponseBody::Error(e) if e.code == oclocks_proto::ErrorCode::Forbidden => {}
        other => c.fail(&format!("PROMOTE_SERVER by bob answered {other:?}")),
    }
    let mut alice = rt.block_on(RawConn::connect_at(c.node(leader).addr, &c.certs, "alice"));
    match rt.block_on(alice.request(RequestBody::PromoteServer { node_id: four })) {
        ResponseBody::Ok(_) => {}
        other => c.fail(&format!("PROMOTE_SERVER {four} answered {other:?}")),
    }
    let r = role_of(&c, leader, four);
    seen.push(r);
    if !matches!(r, Some(Role::Follower | Role::Leader)) {
        c.fail(&format!(
            "node {four} is not a voter after the promotion: {seen:?}"
        ));
    }
    println!("membership (a): node {four} roles in the leader's status: {seen:?}");
    // The leader's log: added as a learner, then promoted by the admin.
    let log = c.node(leader).log_since_start();
    let added = log
        .lines()
        .position(|l| l.contains("adding a learner") && l.contains(&format!("node={four}")));
    let promoted = log.lines().position(|l| {
        l.contains("promoting a learner to voter") && l.contains(&format!("node={four}"))
    });
    match (added, promoted) {
        (Some(a), Some(p)) if a < p => {}
        _ => c.fail(&format!(
            "the leader's log does not show node {four} added as a learner, then promoted \
             (lines {added:?}, {promoted:?})"
        )),
    }
    assert!(
        !seen.contains(&Some(Role::QuorumOnly)),
        "a voter shown as quorum-only: {seen:?}"
    );
    // The new voter serves and sees the state.
    assert_eq!(c.held_via(four, "m-before"), vec![before]);
    let through_four = acquire_static(&c, four, "m-through-4");
    assert!(through_four > before);

    // Node 5 with role = "learner" joins and stays a learner.
    let five = c.add_node(NodeRole::Learner);
    c.wait_ready(five, Duration::from_secs(30));
    c.wait_joined(five, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    let leader = c.wait_for_leader(Duration::from_secs(10));
    for id in c.ids() {
        let r = role_of(&c, id, five);
        assert_eq!(r, Some(Role::Learner), "node {five} as node {id} sees it");
    }
    let s = c.status(five).expect("status of the learner");
    assert_eq!(s.role, Role::Learner, "{s:?}");
    assert_eq!(c.held_via(five, "m-through-4"), vec![through_four]);
    let through_five = acquire_static(&c, five, "m-through-5");
    assert!(through_five > through_four);
    println!("membership (a): node {five} (learner) serves; leader {leader}");

    // (c) A voter that is not the leader, restarted with an empty data dir.
    let victim = c
        .ids()
        .into_iter()
        .find(|id| *id != leader && *id != five && *id != 1)
        .expect("a follower");
    let wiped_at = Instant::now();
    c.wipe_and_restart(victim);
    let status = c.wait_exit(victim, Duration::from_secs(60));
    let log = c.node(victim).log_since_start();
    println!(
        "membership (c): node {victim} with a wiped data directory exited ({status}) after {:?}; \
         its last line: {}",
        wiped_at.elapsed(),
        log.lines().last().unwrap_or("")
    );
    assert!(!status.success(), "the wiped node exited successfully");
    assert!(
        log.contains("wiped") && log.contains("oclocks cluster remove"),
        "the wiped node's log does not say what happened:\n{log}"
    );
    // The cluster still serves.
    let after = acquire_static(&c, leader, "m-after-wipe");
    assert!(after > through_five);

    // What the message says to do works (through the protocol's
    // REMOVE_SERVER, as an admin): remove it, start it again, and it joins
    // as a new member (approved: it is in the other servers' `peers`).
    let mut raw = rt.block_on(RawConn::connect_at(c.node(leader).addr, &c.certs, "alice"));
    match rt.block_on(raw.request(RequestBody::RemoveServer { node_id: victim })) {
        ResponseBody::Ok(_) => {}
        other => c.fail(&format!("REMOVE_SERVER {victim} answered {other:?}")),
    }
    let members: Vec<u64> = c
        .status(leader)
        .expect("status")
        .servers
        .iter()
        .map(|s| s.node_id)
        .collect();
    assert!(!members.contains(&victim), "{members:?}");
    let rejoin = Instant::now();
    c.spawn(victim);
    c.wait_ready(victim, Duration::from_secs(30));
    c.wait_joined(victim, Duration::from_secs(30));
    let role = role_of(&c, leader, victim);
    println!(
        "membership (c): node {victim} removed, restarted and joined again as a new member in \
         {:?}: {role:?}",
        rejoin.elapsed()
    );
    assert!(matches!(role, Some(Role::Follower)), "{role:?}");
    assert_eq!(c.held_via(victim, "m-after-wipe"), vec![after]);
}

#[test]
fn a_quorum_only_node_serves_no_clients_and_never_leads() {
    const QO: u64 = 5;
    let mut c = TestCluster::start(ClusterOpts::voters(5).roles(&[
        NodeRole::Voter,
        NodeRole::Voter,
        NodeRole::Voter,
        NodeRole::Voter,
        NodeRole::QuorumOnly,
    ]));
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    // HELLO to the quorum-only node: UNAVAILABLE, naming the serving ones.
    let mut raw = rt.block_on(RawConn::open(c.node(QO).addr, &c.certs, "alice"));
    match rt.block_on(raw.hello(rand_client_id(), None)) {
        ResponseBody::Error(e) => {
            println!(
                "membership (b): HELLO to the quorum-only node: {:?} {:?}; servers {:?}",
                e.code,
                e.message,
                e.servers
                    .iter()
                    .map(|s| (s.node_id, s.address.clone()))
                    .collect::<Vec<_>>()
            );
            assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
            assert!(
                !e.servers.is_empty() && e.servers.iter().all(|s| s.node_id != QO),
                "{e:?}"
            );
        }
        other => c.fail(&format!("HELLO to the quorum-only node answered {other:?}")),
    }
    let mut cfg = c.client_cfg(&[QO], "alice");
    cfg.learn_endpoints = false;
    match rt.block_on(Client::connect(cfg)) {
        Err(e) => println!("membership (b): a client pinned to the quorum-only node: {e}"),
        Ok(_) => c.fail("a client connected through the quorum-only node"),
    }
    let s = c.status(QO).expect("status of the quorum-only node");
    assert_eq!(s.role, Role::QuorumOnly, "{s:?}");

    // Survives the loss of two other nodes (the leader and one more).
    let token = acquire_static(&c, 1, "qo-static");
    let leader = c.wait_for_leader(Duration::from_secs(10));
    let second = c
        .ids()
        .into_iter()
        .find(|id| *id != leader && *id != QO)
        .expect("another voter");
    c.kill9(leader);
    c.kill9(second);
    let (l, took) = c.wait_for_leader_other_than(leader, Duration::from_secs(9));
    println!(
        "membership (b): nodes {leader} (leader) and {second} SIGKILLed; leader {l} after {took:?}"
    );
    assert_ne!(l, QO);
    let survivor = c
        .live_ids()
        .into_iter()
        .find(|id| *id != QO)
        .expect("a serving survivor");
    assert_eq!(c.held_via(survivor, "qo-static"), vec![token]);
    let after = acquire_static(&c, survivor, "qo-after");
    assert!(after > token);
    c.restart(leader);
    c.restart(second);

    // Ten leader kills: the quorum-only node never leads.
    let mut times = Vec::new();
    for round in 1..=10 {
        let leader = c.wait_for_leader(Duration::from_secs(10));
        assert_ne!(leader, QO, "round {round}: the quorum-only node leads");
        c.kill9(leader);
        let (next, took) = c.wait_for_leader_other_than(leader, Duration::from_secs(9));
        times.push(took);
        for (id, s) in c.statuses() {
            let s = s.unwrap_or_else(|e| c.fail(&format!("round {round}: status of {id}: {e}")));
            assert_ne!(
                s.leader_id,
                Some(QO),
                "round {round}: node {id} names {QO} leader"
            );
            if id == QO {
                assert_eq!(s.role, Role::QuorumOnly, "round {round}: {s:?}");
            }
        }
        assert_ne!(next, QO, "round {round}: the quorum-only node leads");
        c.restart(leader);
    }
    let mut sorted = times.clone();
    sorted.sort();
    println!(
        "membership (b): 10 leader kills, the quorum-only node never led; elections (kill -> \
         agreed leader): min {:?}, median {:?}, max {:?}; all {times:?}",
        sorted[0], sorted[5], sorted[9]
    );
    assert_eq!(
        c.held_via(1, "qo-static"),
        vec![token],
        "the static lock after 10 failovers"
    );
}

#[test]
fn tls_roles_are_enforced_in_both_directions() {
    let c = TestCluster::start(ClusterOpts::voters(3).admins(&["alice", "node1"]));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    c.wait_for_leader(Duration::from_secs(10));

    // A client certificate on the peer protocol: closed without an answer.
    for target in [1, 2] {
        let addr = c.node(target).addr;
        let got = rt.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut tls = match tls_connect(addr, &c.certs, "alice", oclocks_proto::ALPN_PEER).await
            {
                Ok(t) => t,
                Err(e) => return format!("handshake refused: {e}"),
            };
            let hello = oclocks_server::peer::Frame {
                id: 0,
                body: oclocks_server::peer::PeerRequest::Hello(oclocks_server::peer::PeerHello {
                    cluster_id: None,
                    from: 99,
                    from_incarnation: 1,
                    to: None,
                    to_incarnation: None,
                }),
            };
            let body = postcard::to_stdvec(&hello).expect("encode a peer hello");
            let mut frame = (body.len() as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(&body);
            let wrote = async {
                tls.write_all(&frame).await?;
                tls.flush().await
            }
            .await;
            let mut buf = Vec::new();
            match tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf)).await {
                Err(_) => panic!("the peer connection of a client certificate stayed open"),
                Ok(r) => {
                    assert!(
                        buf.is_empty(),
                        "the server answered a client certificate on the peer protocol: {buf:02x?}"
                    );
                    format!("write {wrote:?}, then closed ({r:?}), nothing read")
                }
            }
        });
        println!("membership (d): alice's certificate on oclocks-peer/1 to node {target}: {got}");
        let log = c.node(target).log_since_start();
        assert!(
            log.contains("peer protocol refused: the certificate lacks the server role"),
            "node {target} did not log the refusal"
        );
    }
    // The cluster keeps working.
    let token = acquire_static(&c, 1, "tls-break");
    c.wait_for_leader(Duration::from_secs(10));

    // node1's server certificate as a client: HELLO works, BREAK does not,
    // though `admins` lists node1.
    for via in [1, 2] {
        let mut raw = rt.block_on(RawConn::connect_at(c.node(via).addr, &c.certs, "node1"));
        let r = rt.block_on(raw.request(RequestBody::Break(Break {
            zone: "default".into(),
            name: "tls-break".into(),
            token: None,
        })));
        match r {
            ResponseBody::Error(e) if e.code == ErrorCode::Forbidden => {
                println!("membership (d): BREAK with node1's certificate via node {via}: {e:?}")
            }
            other => c.fail(&format!(
                "BREAK with a server certificate via node {via} answered {other:?}"
            )),
        }
        assert_eq!(c.held_via(via, "tls-break"), vec![token]);
    }
    // An admin client certificate can.
    let mut raw = rt.block_on(RawConn::connect_at(c.node(2).addr, &c.certs, "alice"));
    match rt.block_on(raw.request(RequestBody::Break(Break {
        zone: "default".into(),
        name: "tls-break".into(),
        token: Some(token),
    }))) {
        ResponseBody::Ok(ok) => assert_eq!(ok.token, Some(token), "{ok:?}"),
        other => c.fail(&format!("alice's BREAK answered {other:?}")),
    }
    assert_eq!(c.held_via(1, "tls-break"), Vec::<u64>::new());
    // bob (not an admin) is refused too.
    let bob = rt
        .block_on(Client::connect(c.client_cfg(&[3], "bob")))
        .expect("connect bob");
    match rt.block_on(bob.break_lock("default", "tls-break", None)) {
        Err(Error::Forbidden { .. }) => {}
        other => c.fail(&format!("bob's BREAK: {other:?}")),
    }
}
