//! `oclocks dev` (issue acceptance 1 by hand, automated): it starts three
//! server processes, records their pids in `cluster.json`, and the cluster
//! carries on when one of them — the leader — is `kill -9`ed: a static lock
//! taken before keeps its token, a new one gets a larger token, and the
//! killed node, restarted, catches up.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::BIN;

/// Kills `oclocks dev` (SIGTERM, so it stops its nodes) and, in any case,
/// every pid it recorded.
struct Dev {
    child: Child,
    dir: tempfile::TempDir,
    extra: Vec<Child>,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let pid = i32::try_from(self.child.id()).unwrap_or(0);
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for n in nodes(self.dir.path()) {
            // SAFETY: best-effort cleanup of processes this test started.
            unsafe { libc::kill(n.pid as i32, libc::SIGKILL) };
        }
        for c in &mut self.extra {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[derive(serde::Deserialize, Debug, Clone)]
struct NodeInfo {
    id: u64,
    pid: u32,
    client_addr: String,
    config: std::path::PathBuf,
}

fn nodes(dir: &std::path::Path) -> Vec<NodeInfo> {
    std::fs::read_to_string(dir.join("dev/cluster.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

fn cli(dev: &Dev, endpoint: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut c = Command::new(BIN);
    c.args(args)
        .env("OCLOCKS_CONFIG", dev.dir.path().join("dev/client.toml"))
        .current_dir(dev.dir.path());
    if let Some(e) = endpoint {
        c.env("OCLOCKS_ENDPOINTS", e);
    }
    c.output().expect("run oclocks")
}

fn leader_of(dev: &Dev, endpoint: &str) -> Option<u64> {
    let out = cli(dev, Some(endpoint), &["status"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("leader: "))
        .and_then(|l| l.trim().parse().ok())
}

/// The token of `name` as `oclocks locks` through `endpoint` shows it.
fn token_via(dev: &Dev, endpoint: &str, name: &str) -> Option<String> {
    let out = cli(dev, Some(endpoint), &["locks"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))?;
    let start = line.find("token ")? + "token ".len();
    Some(line[start..].split([',', ')']).next()?.to_string())
}

#[test]
fn dev_starts_three_nodes_and_survives_a_leader_kill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(BIN)
        .args(["dev", "--dir", "dev"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start oclocks dev");
    let stdout = child.stdout.take().expect("stdout");
    let mut dev = Dev {
        child,
        dir,
        extra: Vec::new(),
    };
    // Wait for the banner.
    let mut lines = BufReader::new(stdout).lines();
    let mut banner = String::new();
    for line in lines.by_ref() {
        let line = line.expect("read dev output");
        banner.push_str(&line);
        banner.push('\n');
        if line.starts_with("Logs:") {
            break;
        }
    }
    assert!(banner.contains("3 node(s)"), "{banner}");
    let ns = nodes(dev.dir.path());
    assert_eq!(ns.len(), 3, "{ns:?}");
    assert!(ns.iter().all(|n| n.pid > 0), "{ns:?}");

    let one = ns[0].client_addr.clone();
    let out = cli(
        &dev,
        Some(&one),
        &["acquire", "--static", "s", "--key", "k.key"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a token");

    let leader = leader_of(&dev, &one).expect("a leader");
    let victim = ns
        .iter()
        .find(|n| n.id == leader)
        .expect("leader in cluster.json")
        .clone();
    // SAFETY: the leader is a process this test started (through dev).
    unsafe { libc::kill(victim.pid as i32, libc::SIGKILL) };
    let killed = Instant::now();
    let survivors: Vec<&NodeInfo> = ns.iter().filter(|n| n.id != leader).collect();
    let new_leader = loop {
        let seen: Vec<Option<u64>> = survivors
            .iter()
            .map(|n| leader_of(&dev, &n.client_addr))
            .collect();
        if let Some(Some(l)) = seen.first() {
            if *l != leader && seen.iter().all(|s| *s == Some(*l)) {
                break *l;
            }
        }
        assert!(
            killed.elapsed() < Duration::from_secs(9),
            "no new leader within 9 s: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    println!(
        "dev: leader {leader} killed; node {new_leader} leads after {:?}",
        killed.elapsed()
    );
    for n in &survivors {
        assert_eq!(
            token_via(&dev, &n.client_addr, "s"),
            Some(token.to_string()),
            "through node {}",
            n.id
        );
    }
    let out = cli(
        &dev,
        Some(&survivors[0].client_addr),
        &["acquire", "--static", "s2", "--key", "k.key"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token2: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a token");
    assert!(token2 > token);

    // Restart the killed node as the banner says; it catches up.
    let restarted = Command::new(BIN)
        .args(["server", "--config"])
        .arg(&victim.config)
        .current_dir(dev.dir.path().join("dev"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("restart the killed node");
    dev.extra.push(restarted);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if token_via(&dev, &victim.client_addr, "s2") == Some(token2.to_string()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted node never caught up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
