//! Loss of quorum and a stalled leader, with real server processes.
//!
//! 1. With 2 of 3 nodes SIGSTOPped — once the two followers (the leader is
//!    alone), once the leader and a follower (a follower is alone) — a lock
//!    request through the remaining node fails (an error, or its wait bound
//!    passes) and is never granted, a try of a held lock is refused, and
//!    `oclocks lock` through it does not run its command. After SIGCONT the
//!    cluster serves again, and the locks held before the stop — a static
//!    lock and a connection lock of a client with a 3 s session, stopped
//!    for twice that — are still held with the same tokens.
//! 2. The leader alone is SIGSTOPped for twice the session timeout (3 s):
//!    the others elect a new leader, a live client connected to a follower
//!    keeps its connection lock (its guard never fires, its session is
//!    resumed, never new), and LOCK requests sent to the old leader during
//!    the stop — answered by it only after SIGCONT, while it may still
//!    believe it leads — grant nothing: the held lock is refused, and a free
//!    lock is either refused or granted in the new term with a token above
//!    every earlier one (the new leader's view confirms it).

mod common;

use std::time::{Duration, Instant};

use common::cluster::{query_retry, ClusterOpts, TestCluster};
use common::{rand_client_id, RawConn};
use oclocks_client::{Client, ClientConfig, Error};
use oclocks_proto::{Kind, Lock, Mode, RequestBody, ResponseBody};

/// The session timeout of the cluster and of every client here.
const SESSION: Duration = Duration::from_secs(3);

fn session_cfg(mut cfg: ClientConfig) -> ClientConfig {
    cfg.session_timeout = SESSION;
    cfg
}

/// A client bound to node `id` only (it does not learn the others), with a
/// short request timeout so that calls to a node without quorum end soon.
/// Connecting is retried for up to 10 s while the node answers NOT_LEADER or
/// UNAVAILABLE: nodes resumed after a long SIGSTOP may start an election
/// (their election timeout passed while they were stopped) right after the
/// cluster agreed on a leader, and HELLO fails until it is over.
/// (`Client::connect` itself asks again for up to `connect_timeout`; this
/// loop allows a longer election on a loaded machine.)
fn pinned_client(c: &TestCluster, rt: &tokio::runtime::Runtime, id: u64, who: &str) -> Client {
    let mut cfg = c.client_cfg(&[id], who);
    cfg.learn_endpoints = false;
    cfg.request_timeout = Duration::from_secs(3);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match rt.block_on(Client::connect(cfg.clone())) {
            Ok(client) => return client,
            Err(e @ (Error::NotLeader { .. } | Error::Unavailable { .. }))
                if Instant::now() < deadline =>
            {
                println!("connect {who} to node {id}: {e}; retrying (an election?)");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => c.fail(&format!("connect {who} to node {id}: {e}")),
        }
    }
}

/// Every live node (through a client pinned to it) shows `name` held by
/// exactly `tokens`.
fn assert_held_everywhere(
    c: &TestCluster,
    rt: &tokio::runtime::Runtime,
    name: &str,
    tokens: &[u64],
    when: &str,
) {
    for id in c.live_ids() {
        if !c.node(id).role.serves_clients() {
            continue;
        }
        let client = pinned_client(c, rt, id, "alice");
        match query_retry(rt, &client, name, Duration::from_secs(10)) {
            Ok((held, _)) if held == tokens => {}
            other => c.fail(&format!(
                "{when}: {name} through node {id}: {other:?}, expected {tokens:?}"
            )),
        }
        let _ = rt.block_on(client.close());
    }
}

/// Stop every node but `survivor` for twice the session timeout; check that
/// nothing is granted through the survivor meanwhile and that `held` locks
/// are still held afterwards.
fn two_of_three_stopped(
    c: &mut TestCluster,
    rt: &tokio::runtime::Runtime,
    survivor: u64,
    held: &[(&str, u64)],
    tag: &str,
) {
    let bob = pinned_client(c, rt, survivor, "bob");
    let others: Vec<u64> = c.ids().into_iter().filter(|id| *id != survivor).collect();
    let stopped_at = Instant::now();
    for id in &others {
        c.stop(*id);
    }
    // Well past the election timeout (0.75-1 s with these timings): the
    // survivor knows it has no quorum, or that its leader is gone.
    std::thread::sleep(Duration::from_secs(2));

    let free = format!("q-free-{tag}");
    let t = Instant::now();
    let r = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(30),
            bob.lock("default", free.as_str())
                .wait(Duration::from_secs(2))
                .acquire(),
        )
        .await
    });
    let took = t.elapsed();
    let outcome = match r {
        Err(_) => c.fail(&format!("{tag}: the acquire did not end within 30 s")),
        Ok(Ok(g)) => c.fail(&format!(
            "{tag}: granted {free} (token {}) without a quorum",
            g.token()
        )),
        Ok(Err(e)) => e,
    };
    println!("quorum {tag}: acquire of a free lock through node {survivor} failed after {took:?}: {outcome}");

    for (name, _) in held {
        let r = rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(30),
                bob.lock("default", *name).try_once().acquire(),
            )
            .await
        });
        match r {
            Ok(Err(e)) => println!("quorum {tag}: try of held {name}: {e}"),
            Ok(Ok(g)) => c.fail(&format!(
                "{tag}: granted held {name} (token {}) without a quorum",
                g.token()
            )),
            Err(_) => c.fail(&format!("{tag}: the try of {name} did not end within 30 s")),
        }
    }

    let cli_lock = format!("q-cli-{tag}");
    let out = c.cli_output(survivor, &["lock", "--wait", "0", &cli_lock, "--", "true"]);
    println!(
        "quorum {tag}: `oclocks lock` through node {survivor} exited {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    assert_ne!(
        out.status.code(),
        Some(0),
        "{tag}: `oclocks lock` ran its command without a quorum"
    );

    if let Some(rest) = (SESSION * 2).checked_sub(stopped_at.elapsed()) {
        std::thread::sleep(rest);
    }
    for id in &others {
        c.cont(*id);
    }
    let resumed = Instant::now();
    let leader = c.wait_for_leader(Duration::from_secs(15));
    println!(
        "quorum {tag}: stopped {others:?} for {:?}; after SIGCONT leader {leader} agreed in {:?}",
        resumed - stopped_at,
        resumed.elapsed()
    );
    for (name, token) in held {
        assert_held_everywhere(c, rt, name, &[*token], &format!("{tag} after SIGCONT"));
    }
    // An acquire whose reply never came is cancelled by the client (CANCEL
    // with its nonce, which also gives back a grant that raced it): if its
    // LOCK reached a log after all — committed only once the quorum was
    // back — the lock is free again soon.
    let free_at = Instant::now() + Duration::from_secs(10);
    let probe = pinned_client(c, rt, leader, "alice");
    loop {
        match query_retry(rt, &probe, &free, Duration::from_secs(10)) {
            Ok((held, _)) if held.is_empty() => break,
            Ok((held, _)) if Instant::now() < free_at => {
                println!("quorum {tag}: {free} held by {held:?} after SIGCONT (a late grant?)");
                std::thread::sleep(Duration::from_millis(100));
            }
            other => c.fail(&format!("{tag}: {free} after SIGCONT: {other:?}")),
        }
    }
    let _ = rt.block_on(probe.close());
    assert_held_everywhere(c, rt, &free, &[], &format!("{tag} after SIGCONT"));
    assert_held_everywhere(c, rt, &cli_lock, &[], &format!("{tag} after SIGCONT"));
    let _ = rt.block_on(bob.close());
}

#[test]
fn no_quorum_grants_nothing_and_a_stalled_leader_grants_nothing_after_it_resumes() {
    let mut c = TestCluster::start(
        ClusterOpts::voters(3)
            .session_timeout_ms(3000)
            .raft_ms(50, 250, 500),
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let leader = c.wait_for_leader(Duration::from_secs(10));

    // Locks held before the stops.
    let key = c.path("owner.key");
    let out = c.cli_output(
        1,
        &[
            "acquire",
            "--static",
            "--key",
            key.to_str().expect("utf-8"),
            "q-static",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let static_token: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("token");
    let holder = rt
        .block_on(Client::connect(session_cfg(
            c.client_cfg(&c.ids(), "alice"),
        )))
        .expect("connect the holder");
    let guard = rt
        .block_on(holder.lock("default", "q-conn").try_once().acquire())
        .expect("take q-conn");
    let conn_token = guard.token();
    let held = [("q-static", static_token), ("q-conn", conn_token)];

    // 1a. The leader alone.
    two_of_three_stopped(&mut c, &rt, leader, &held, "leader-alone");
    // 1b. A follower alone.
    let leader = c.wait_for_leader(Duration::from_secs(10));
    let follower = c
        .ids()
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");
    two_of_three_stopped(&mut c, &rt, follower, &held, "follower-alone");
    println!(
        "quorum: the first holder's guard after both stops: {:?} (a client cut off may give up \
         locally; the cluster kept the lock)",
        guard.lost_reason()
    );

    // 2. The leader alone stalls for twice the session timeout.
    let old = c.wait_for_leader(Duration::from_secs(10));
    let follower = c
        .ids()
        .into_iter()
        .find(|id| *id != old)
        .expect("a follower");
    let mut cfg = session_cfg(c.client_cfg(&[follower], "alice"));
    cfg.learn_endpoints = false;
    let holder2 = rt.block_on(Client::connect(cfg)).expect("connect holder 2");
    let guard2 = rt
        .block_on(holder2.lock("default", "q-conn2").try_once().acquire())
        .expect("take q-conn2");
    let conn2 = guard2.token();
    let before = holder2.session();
    // bob, through the follower too, for a grant during the stall.
    let bob = pinned_client(&c, &rt, follower, "bob");
    // A raw session on the old leader (15 s session, so it outlives the
    // stall) whose LOCKs are sent during the stall.
    let mut raw = rt.block_on(RawConn::open(c.node(old).addr, &c.certs, "bob"));
    let hello = rt.block_on(raw.hello(rand_client_id(), Some(15_000)));
    assert!(matches!(hello, ResponseBody::HelloOk(_)), "{hello:?}");

    c.stop(old);
    let stopped_at = Instant::now();
    let (new_leader, took) = c.wait_for_leader_other_than(old, Duration::from_secs(9));
    println!(
        "quorum stall: leader {old} SIGSTOPped; nodes agreed on leader {new_leader} after {took:?}"
    );
    let during = rt
        .block_on(bob.lock("default", "q-during").try_once().acquire())
        .unwrap_or_else(|e| c.fail(&format!("no grant through the new leader: {e}")));
    let max_earlier = during.token();
    let lock = |name: &str, nonce: u64| {
        RequestBody::Lock(Lock {
            zone: "default".into(),
            name: name.into(),
            mode: Mode::Exclusive,
            kind: Kind::Connection,
            ttl_ms: 0,
            wait_ms: 0,
            lock_delay_ms: 0,
            owner_id: 0,
            nonce,
            low_water: 1,
            owner_sig: None,
        })
    };
    let id_held = rt.block_on(raw.send(lock("q-conn2", 1)));
    let id_free = rt.block_on(raw.send(lock("q-fresh", 2)));
    if let Some(rest) = (SESSION * 2).checked_sub(stopped_at.elapsed()) {
        std::thread::sleep(rest);
    }
    assert!(
        guard2.lost_reason().is_none(),
        "during the stall the holder's guard fired {:?}",
        guard2.lost_reason()
    );
    c.cont(old);
    let resumed = Instant::now();
    // The old leader must answer (or close the connection): its requests
    // are bounded by the forwarding and apply timeouts (5 s + 5 s).
    let (held_reply, free_reply) = rt.block_on(async {
        let a = tokio::time::timeout(Duration::from_secs(30), raw.reply_to(id_held)).await;
        let b = tokio::time::timeout(Duration::from_secs(30), raw.reply_to(id_free)).await;
        (a, b)
    });
    println!(
        "quorum stall: stopped {:?}; the old leader answered after SIGCONT in {:?}: q-conn2 -> \
         {held_reply:?}; q-fresh -> {free_reply:?}",
        resumed - stopped_at,
        resumed.elapsed()
    );
    match held_reply {
        Ok(Some(ResponseBody::Ok(ok))) => c.fail(&format!(
            "the old leader granted the held q-conn2 (held by token {conn2}): {ok:?}"
        )),
        Ok(Some(ResponseBody::Error(_)) | None) => {}
        Ok(Some(other)) => c.fail(&format!("unexpected reply {other:?}")),
        Err(_) => c.fail("the old leader never answered the LOCK of q-conn2"),
    }
    if free_reply.is_err() {
        c.fail("the old leader never answered the LOCK of q-fresh");
    }
    let new_term = c.status(new_leader).map(|s| s.term).unwrap_or(0);
    if let Ok(Some(ResponseBody::Ok(ok))) = &free_reply {
        let t = ok.token.unwrap_or(0);
        assert!(
            t > max_earlier,
            "q-fresh granted through the old leader with token {t}, not above {max_earlier}"
        );
        c.wait_for_leader(Duration::from_secs(10));
        assert_held_everywhere(&c, &rt, "q-fresh", &[t], "q-fresh granted after the stall");
        println!("quorum stall: q-fresh granted with token {t} in the new term (> {max_earlier})");
    }
    let agreed = c.wait_for_leader(Duration::from_secs(10));
    let old_status = c.status(old).expect("status of the old leader");
    println!(
        "quorum stall: after SIGCONT leader {agreed}; old leader {old} now {:?} in term {} (new \
         leader's term at resume {new_term})",
        old_status.role, old_status.term
    );
    assert!(old_status.term >= new_term);

    // The holder kept its lock, through and after the stall.
    let window_end = resumed + SESSION + Duration::from_secs(1);
    while Instant::now() < window_end {
        assert!(
            guard2.lost_reason().is_none(),
            "after the stall the holder's guard fired {:?}",
            guard2.lost_reason()
        );
        match query_retry(&rt, &holder2, "q-conn2", Duration::from_secs(10)) {
            Ok((tokens, _)) if tokens == vec![conn2] => {}
            other => c.fail(&format!("q-conn2 changed hands: {other:?}")),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_held_everywhere(&c, &rt, "q-conn2", &[conn2], "after the stall");
    assert_held_everywhere(&c, &rt, "q-static", &[static_token], "after the stall");
    let after = holder2.session();
    println!(
        "quorum stall: holder connects {} -> {}, new sessions {} -> {}",
        before.connects, after.connects, before.new_sessions, after.new_sessions
    );
    assert_eq!(after.new_sessions, before.new_sessions, "{after:?}");

    // The holder releases; the next grant is above every earlier token.
    rt.block_on(guard2.release()).expect("release q-conn2");
    let next = rt
        .block_on(
            bob.lock("default", "q-conn2")
                .wait(Duration::from_secs(10))
                .acquire(),
        )
        .unwrap_or_else(|e: Error| c.fail(&format!("q-conn2 after release: {e}")));
    println!(
        "quorum stall: q-conn2 after release: token {}",
        next.token()
    );
    assert!(next.token() > max_earlier && next.token() > conn2);
    drop(guard);
}
