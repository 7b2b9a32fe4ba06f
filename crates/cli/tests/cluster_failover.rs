//! Failover of a 3-node cluster of real server processes: the leader is
//! SIGKILLed while locks are held.
//!
//! (a) A static lock taken through node 1 survives a SIGKILL of the leader:
//!     the two survivors elect a leader (measured from the kill; the target
//!     is 3 s, the assertion 9 s), both still list the lock with its token, a
//!     new grant gets a larger token, and the killed node, restarted with its
//!     data, catches up and lists the same.
//! (b) A connection lock held by a Rust client connected to a follower
//!     survives a SIGKILL of the leader and then a SIGKILL of the server the
//!     client is connected to (it fails over): its guard never reports the
//!     lock lost, a second client that keeps trying the lock is never
//!     granted it, and a third that waits for it gets it once the holder
//!     releases — with a larger token.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{query_retry, ClusterOpts, TestCluster};
use oclocks_client::{Client, Error};

/// The election target of the spec; the tests assert 3× it.
const ELECTION_TARGET: Duration = Duration::from_secs(3);

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn static_lock_survives_a_leader_kill_and_the_killed_node_catches_up() {
    let mut c = TestCluster::start(ClusterOpts::voters(3));
    let leader = c.wait_for_leader(Duration::from_secs(10));
    let key = c.path("owner.key");
    let key_s = key.to_str().expect("utf-8 path");

    let out = c.cli_output(1, &["acquire", "--static", "--key", key_s, "fo-static"]);
    assert!(out.status.success(), "acquire: {}", stderr(&out));
    let token: u64 = stdout(&out).parse().expect("acquire printed the token");
    for id in c.ids() {
        assert_eq!(
            c.held_via(id, "fo-static"),
            vec![token],
            "through node {id}"
        );
    }

    c.kill9(leader);
    let (new_leader, took) =
        c.wait_for_leader_other_than(leader, ELECTION_TARGET * 3 + Duration::from_millis(1));
    println!(
        "failover (a): node {leader} (leader) SIGKILLed; nodes agreed on leader {new_leader} \
         after {took:?}"
    );
    assert!(took <= ELECTION_TARGET * 3, "election took {took:?}");

    let survivors: Vec<u64> = c.live_ids();
    assert_eq!(survivors.len(), 2);
    for id in &survivors {
        assert_eq!(
            c.held_via(*id, "fo-static"),
            vec![token],
            "the static lock through survivor {id}"
        );
        // Still held: a try through this survivor is refused (exit 3).
        let other_key = c.path(&format!("other-{id}.key"));
        let out = c.cli_output(
            *id,
            &[
                "acquire",
                "--static",
                "--key",
                other_key.to_str().expect("utf-8 path"),
                "fo-static",
            ],
        );
        assert_eq!(
            out.status.code(),
            Some(3),
            "a second acquire of the held lock through node {id}: {} {}",
            stdout(&out),
            stderr(&out)
        );
    }
    let out = c.cli_output(
        survivors[0],
        &["acquire", "--static", "--key", key_s, "fo-after"],
    );
    assert!(
        out.status.success(),
        "acquire after failover: {}",
        stderr(&out)
    );
    let after: u64 = stdout(&out).parse().expect("token printed");
    println!("failover (a): token before the kill {token}, new grant after it {after}");
    assert!(after > token, "new token {after} not above {token}");

    let restarted = Instant::now();
    c.restart(leader);
    // Caught up: the restarted node lists both locks (a linearizable read
    // through it waits until it has applied the leader's commit index).
    let deadline = restarted + Duration::from_secs(30);
    loop {
        let a = c.held_via(leader, "fo-static");
        let b = c.held_via(leader, "fo-after");
        if a == vec![token] && b == vec![after] {
            break;
        }
        if Instant::now() >= deadline {
            c.fail(&format!(
                "restarted node {leader} does not show the state: fo-static {a:?}, fo-after {b:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let applied: Vec<(u64, u64)> = c
        .ids()
        .into_iter()
        .map(|id| {
            let s = c.status(id).expect("status");
            (id, s.applied_index)
        })
        .collect();
    println!(
        "failover (a): node {leader} restarted and caught up after {:?}; applied indexes {applied:?}",
        restarted.elapsed()
    );
}

/// What the contender saw.
#[derive(Default)]
struct Contender {
    /// Try-locks that were granted (token, when).
    granted: Vec<(u64, Instant)>,
    refused: usize,
    errors: Vec<String>,
}

#[test]
fn connection_lock_survives_leader_kill_and_failover_of_its_server() {
    let mut c = TestCluster::start(ClusterOpts::voters(3));
    let leader = c.wait_for_leader(Duration::from_secs(10));
    let follower = c
        .ids()
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    // The holder: endpoints = the follower only (it may learn the others).
    let holder = rt
        .block_on(Client::connect(c.client_cfg(&[follower], "alice")))
        .expect("connect the holder");
    let guard = rt
        .block_on(holder.lock("default", "fo-conn").try_once().acquire())
        .expect("the holder takes the lock");
    let token = guard.token();
    let before = holder.session();
    assert_eq!(before.node_id, Some(follower), "{before:?}");

    // A waiter (bob) queued for the lock through all nodes.
    let waiter = rt
        .block_on(Client::connect(c.client_cfg(&c.ids(), "bob")))
        .expect("connect the waiter");
    let waiting = {
        let waiter = waiter.clone();
        rt.spawn(async move {
            let r = waiter
                .lock("default", "fo-conn")
                .wait(Duration::from_secs(120))
                .acquire()
                .await;
            (Instant::now(), r)
        })
    };
    // A contender (bob, another session) trying once every 100 ms.
    let contender = rt
        .block_on(Client::connect(c.client_cfg(&c.ids(), "bob")))
        .expect("connect the contender");
    let seen = Arc::new(Mutex::new(Contender::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trying = {
        let (seen, stop, contender) = (seen.clone(), stop.clone(), contender.clone());
        rt.spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let r = contender
                    .lock("default", "fo-conn")
                    .try_once()
                    .acquire()
                    .await;
                {
                    let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
                    match r {
                        Ok(g) => {
                            s.granted.push((g.token(), Instant::now()));
                            // Keep it: releasing would hide a second grant.
                            let _ = g.keep();
                        }
                        Err(Error::Locked { .. }) => s.refused += 1,
                        Err(e) => s.errors.push(e.to_string()),
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // The waiter is queued before anything is killed.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = query_retry(&rt, &holder, "fo-conn", Duration::from_secs(10));
        if st.as_ref().is_ok_and(|(_, waiters)| *waiters >= 1) {
            break;
        }
        assert!(Instant::now() < deadline, "the waiter never queued: {st:?}");
        std::thread::sleep(Duration::from_millis(20));
    }

    let check_held = |c: &TestCluster, when: &str| {
        assert!(
            guard.lost_reason().is_none(),
            "{when}: the holder's guard fired {:?}",
            guard.lost_reason()
        );
        match query_retry(&rt, &holder, "fo-conn", Duration::from_secs(10)) {
            Ok((tokens, _)) if tokens == vec![token] => {}
            other => c.fail(&format!("{when}: the lock changed hands: {other:?}")),
        }
        let s = seen.lock().unwrap_or_else(|p| p.into_inner());
        if !s.granted.is_empty() {
            c.fail(&format!(
                "{when}: the contender was granted the held lock: {:?}",
                s.granted
            ));
        }
    };

    // 1. SIGKILL the leader.
    c.kill9(leader);
    let (l2, took) = c.wait_for_leader_other_than(leader, ELECTION_TARGET * 3);
    println!("failover (b): leader {leader} SIGKILLed; new leader {l2} after {took:?}");
    check_held(&c, "after the leader's kill");
    c.restart(leader);
    c.wait_for_leader(Duration::from_secs(10));
    check_held(&c, "after the old leader's restart");

    // 2. SIGKILL the server the holder is connected to.
    let connected = holder.session().node_id.expect("the holder is connected");
    c.kill9(connected);
    let killed_at = Instant::now();
    let (l3, took) = c.wait_for_leader_other_than(connected, ELECTION_TARGET * 3);
    let deadline = killed_at + Duration::from_secs(30);
    let after = loop {
        let s = holder.session();
        if s.connected && s.node_id.is_some_and(|n| n != connected) && s.lease_remaining.is_some() {
            break s;
        }
        if Instant::now() >= deadline {
            c.fail(&format!(
                "the holder did not fail over from node {connected}: {s:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "failover (b): holder's server {connected} SIGKILLed; leader {l3} after {took:?}; the \
         holder reconnected to node {:?} after {:?} (connects {} -> {}, new sessions {} -> {})",
        after.node_id,
        killed_at.elapsed(),
        before.connects,
        after.connects,
        before.new_sessions,
        after.new_sessions
    );
    assert_eq!(
        after.new_sessions, before.new_sessions,
        "the failover started a new session: {after:?}"
    );
    check_held(&c, "after the holder's server was killed");
    c.restart(connected);
    c.wait_for_leader(Duration::from_secs(10));
    // Past a keepalive round or two, still held.
    std::thread::sleep(Duration::from_secs(2));
    check_held(&c, "after the holder's server restarted");
    assert!(
        !waiting.is_finished(),
        "the waiter's acquire ended while the lock was held"
    );

    // 3. The holder releases: the waiter gets it with a larger token.
    let released_at = Instant::now();
    rt.block_on(guard.release()).expect("release");
    let (granted_at, r) = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(30), waiting).await })
        .expect("the waiter got an answer within 30 s")
        .expect("waiter task");
    let g = match r {
        Ok(g) => g,
        Err(e) => c.fail(&format!("the waiter did not get the lock: {e}")),
    };
    let w = waiter.session();
    println!(
        "failover (b): released token {token}; the waiter got token {} after {:?} (it is on node \
         {:?}; connects {}, new sessions {})",
        g.token(),
        granted_at - released_at,
        w.node_id,
        w.connects,
        w.new_sessions
    );
    assert!(g.token() > token, "{} not above {token}", g.token());
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(15), trying).await })
        .expect("the contender stops")
        .expect("contender task");
    let s = seen.lock().unwrap_or_else(|p| p.into_inner());
    println!(
        "failover (b): contender tries: {} refused, {} granted, {} errors {:?}",
        s.refused,
        s.granted.len(),
        s.errors.len(),
        s.errors
    );
    assert!(
        s.granted.is_empty(),
        "the contender was granted the lock: {:?}",
        s.granted
    );
    assert!(s.refused > 0, "the contender never got a LOCKED answer");
    drop(s);
    rt.block_on(g.release()).expect("the waiter releases");
}
