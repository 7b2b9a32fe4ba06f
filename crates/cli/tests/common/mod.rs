//! Test harness: real `oclocks server` processes on 127.0.0.1 with
//! certificates made by `oclocks certs`, in a temporary directory that is
//! removed afterwards. Every process a test starts is killed when its
//! handle drops, so a failing test leaves nothing running.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_oclocks");

/// A single-node cluster in a temporary directory.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub client_config: PathBuf,
    pub addr: SocketAddr,
    pub child: Option<Child>,
}

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr")
}

pub fn oclocks(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args);
    c
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("run oclocks");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Node {
    /// Make certificates and a config with a `session_timeout_ms_default`,
    /// then start the server with --bootstrap and wait until it serves.
    pub fn start(session_timeout_ms: u64) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        let d = certs.to_str().expect("utf-8 path");
        run_ok(&mut oclocks(&["certs", "init", "--dir", d]));
        run_ok(&mut oclocks(&["certs", "issue", "--dir", d, "--server", "node1"]));
        run_ok(&mut oclocks(&["certs", "issue", "--dir", d, "--client", "alice"]));
        run_ok(&mut oclocks(&["certs", "issue", "--dir", d, "--client", "bob"]));
        let addr = free_port();
        let config = dir.path().join("node1.toml");
        std::fs::write(
            &config,
            format!(
                r#"node_id = 1
listen = "{addr}"
data_dir = "data"
admins = ["alice"]
[tls]
ca = "certs/ca.pem"
cert = "certs/node1.pem"
key = "certs/node1.key"
[session]
timeout_ms_min = 1000
timeout_ms_default = {session_timeout_ms}
"#
            ),
        )
        .expect("write config");
        let client_config = dir.path().join("client.toml");
        write_client_config(&client_config, dir.path(), addr, "alice");
        let mut n = Node {
            dir,
            config,
            client_config,
            addr,
            child: None,
        };
        n.spawn(true);
        n
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Start (or restart) the server process and wait until it serves.
    pub fn spawn(&mut self, bootstrap: bool) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("node1.log"))
            .expect("log file");
        let mut cmd = oclocks(&["server", "--config", self.config.to_str().expect("utf-8")]);
        if bootstrap {
            cmd.arg("--bootstrap");
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start oclocks server");
        self.child = Some(child);
        self.wait_serving(Duration::from_secs(30));
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Wait until `oclocks status` answers.
    pub fn wait_serving(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let out = self.cli(&["status"]).output().expect("run status");
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server did not serve within {within:?}: {}\nlog:\n{}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(self.dir.path().join("node1.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// An `oclocks` client command pointed at this node (as alice).
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut c = oclocks(args);
        c.env("OCLOCKS_CONFIG", &self.client_config)
            .current_dir(self.dir.path());
        c
    }

    pub fn cli_output(&self, args: &[&str]) -> Output {
        self.cli(args).output().expect("run oclocks")
    }

    pub fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.pid()).expect("pid fits");
        // SAFETY: sending a signal to our own child process.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig})");
    }

    /// SIGKILL the server and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn write_client_config(path: &Path, dir: &Path, addr: SocketAddr, who: &str) {
    std::fs::write(
        path,
        format!(
            r#"endpoints = ["{addr}"]
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
"#,
            ca = dir.join("certs/ca.pem").display(),
            cert = dir.join(format!("certs/{who}.pem")).display(),
            key = dir.join(format!("certs/{who}.key")).display(),
        ),
    )
    .expect("write client config");
}
