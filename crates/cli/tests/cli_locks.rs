//! Acceptance tests of `oclocks lock`, `acquire` and `release` against a
//! real single-node server process (issue 4, items 2, 3 and 4).

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{Node, RawConn};
use oclocks_proto::{ErrorCode, OwnerSig, Release, RequestBody, ResponseBody};

/// Five `oclocks lock demo -- sh -c 'mkdir m && sleep 0.3 && rmdir m'`
/// started together in one directory all succeed — an overlap would make
/// a `mkdir` fail — and each ran with its own fencing token.
#[test]
fn five_concurrent_lock_commands_never_overlap() {
    let node = Node::start(10_000);
    let children: Vec<_> = (0..5)
        .map(|_| {
            node.cli(&[
                "lock",
                "demo",
                "--",
                "sh",
                "-c",
                "mkdir m && sleep 0.3 && rmdir m && echo $OCLOCKS_TOKEN",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start oclocks lock")
        })
        .collect();
    let mut tokens = Vec::new();
    for c in children {
        let out = c.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "a lock command failed (overlap?): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("the command printed its token");
        tokens.push(token);
    }
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), 5, "tokens must be distinct: {tokens:?}");
}

/// A try-lock (`--wait 0`) of a held lock exits 3 and names the holder.
#[test]
fn try_lock_of_held_lock_exits_3() {
    let node = Node::start(10_000);
    let mut holder = node
        .cli(&["lock", "demo", "--", "sleep", "30"])
        .stderr(Stdio::null())
        .spawn()
        .expect("start holder");
    // Wait until the holder has it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = node.cli_output(&["locks"]);
        if String::from_utf8_lossy(&out.stdout).contains("demo") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "holder never got the lock"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = node.cli_output(&["lock", "--wait", "0", "demo", "--", "true"]);
    assert_eq!(out.status.code(), Some(3));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("is held by alice"), "{msg}");
    let _ = holder.kill();
    let _ = holder.wait();
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// The lock `st` is still held with `token` (a try-lock conflicts and the
/// listing names the token).
fn assert_held(node: &Node, token: u64) {
    let out = node.cli_output(&["locks"]);
    assert!(
        stdout(&out).contains(&format!("token {token}")),
        "lock not held with token {token}: {}",
        stdout(&out)
    );
}

/// A static lock survives a SIGKILL and restart of the server with the same
/// token; releases with another key (NOT_OWNER), a corrupted signature
/// (BAD_SIGNATURE) or a never-issued token (UNKNOWN_GRANT) fail and leave it
/// held; the right key and token release it, and a repeat answers
/// "already released".
#[test]
fn static_lock_survives_restart_and_only_its_key_releases_it() {
    let mut node = Node::start(10_000);
    let key = node.path("owner.key");
    let key_s = key.to_str().expect("utf-8");
    let out = node.cli_output(&["acquire", "--static", "--key", key_s, "st"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token: u64 = stdout(&out).parse().expect("token printed");

    node.kill9();
    node.spawn(false);
    assert_held(&node, token);

    let t = token.to_string();
    let other = node.path("other.key");
    let out = node.cli_output(&[
        "release",
        "--token",
        &t,
        "--key",
        other.to_str().expect("utf-8"),
        "st",
    ]);
    // The other key file does not exist: refused before anything is sent.
    assert_eq!(out.status.code(), Some(1));
    // Make the other key exist (acquire something else with it), then try.
    let out = node.cli_output(&[
        "acquire",
        "--static",
        "--key",
        other.to_str().expect("utf-8"),
        "elsewhere",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = node.cli_output(&[
        "release",
        "--token",
        &t,
        "--key",
        other.to_str().expect("utf-8"),
        "st",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("NOT_OWNER"), "{}", stderr(&out));
    assert_held(&node, token);

    // A corrupted signature, sent raw: the right public key, a bad signature.
    let public_key = oclocks_client::OwnerKey::load(&key)
        .expect("owner key")
        .public_key();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let reply = rt.block_on(async {
        let mut raw = RawConn::connect(&node, "alice").await;
        raw.request(RequestBody::Release(Release {
            zone: "default".into(),
            name: "st".into(),
            token,
            owner_sig: Some(OwnerSig {
                public_key,
                signature: [0x55; 64],
                counter: u64::MAX / 2,
            }),
        }))
        .await
    });
    match reply {
        ResponseBody::Error(e) => assert_eq!(e.code, ErrorCode::BadSignature),
        other => panic!("expected BAD_SIGNATURE, got {other:?}"),
    }
    assert_held(&node, token);

    let out = node.cli_output(&["release", "--token", "999999", "--key", key_s, "st"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("UNKNOWN_GRANT"), "{}", stderr(&out));
    assert_held(&node, token);

    let out = node.cli_output(&["release", "--token", &t, "--key", key_s, "st"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "released");
    let out = node.cli_output(&["release", "--token", &t, "--key", key_s, "st"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "already released");
    let out = node.cli_output(&["lock", "--wait", "0", "st", "--", "true"]);
    assert!(
        out.status.success(),
        "the lock is free again: {}",
        stderr(&out)
    );
}

/// GET over plain HTTP: the whole response as text.
fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect http");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// The operator endpoints answer: /health is up, /ready is 200 with the
/// node's JSON while it serves, /metrics speaks Prometheus text, anything
/// else is 404.
#[test]
fn http_health_ready_metrics() {
    let node = Node::start(10_000);
    assert!(http_get(node.http, "/health").starts_with("HTTP/1.1 200"));
    let ready = http_get(node.http, "/ready");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(
        ready.contains("\"node\":1") && ready.contains("\"leader\":1"),
        "{ready}"
    );
    let metrics = http_get(node.http, "/metrics");
    assert!(metrics.contains("oclocks_raft_term 1"), "{metrics}");
    assert!(metrics.contains("oclocks_sessions"), "{metrics}");
    assert!(http_get(node.http, "/nope").starts_with("HTTP/1.1 404"));
}

/// Two acquires of one lock through one `Client` (two tasks, default
/// owners): the second waits and is granted when the first is released —
/// each acquire is its own owner, not "the session".
#[test]
fn second_acquire_through_the_same_client_waits() {
    let node = Node::start(10_000);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let cfg = oclocks_client::ClientConfig::from_file(&node.client_config).expect("config");
        let client = oclocks_client::Client::connect(cfg).await.expect("connect");
        let first = client
            .lock("default", "x")
            .try_once()
            .acquire()
            .await
            .expect("first acquire");
        let c2 = client.clone();
        let second = tokio::spawn(async move {
            c2.lock("default", "x")
                .wait(Duration::from_secs(10))
                .acquire()
                .await
        });
        // The second is queued behind the first, not refused.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let q = client.query("default", "x").await.expect("query");
            if q.waiters == 1 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "second acquire never queued"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let t1 = first.token();
        first.release().await.expect("release");
        let g = second.await.expect("join").expect("second acquire granted");
        assert!(g.token() > t1);
    });
}
