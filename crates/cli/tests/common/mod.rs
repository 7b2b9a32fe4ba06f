//! Test harness: real `oclocks server` processes on 127.0.0.1 with
//! certificates made by `oclocks certs`, in a temporary directory that is
//! removed afterwards. Every process a test starts is killed when its
//! handle drops, so a failing test leaves nothing running.
//!
//! [`Node`] is "the server" of the end-to-end tests: node 1 of a cluster of
//! [`cluster_size`] nodes (3 unless `OCLOCKS_TEST_NODES=1`), so every such
//! test runs against a replicated cluster. Node 1 bootstraps, the others
//! join through `peers`; the client config points at node 1 only (clients
//! learn the others from HELLO); `kill9`, `spawn` and `signal` act on
//! node 1.

#![allow(dead_code)]

pub mod cluster;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_oclocks");

/// Node 1 of a test cluster in a temporary directory.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub client_config: PathBuf,
    pub addr: SocketAddr,
    /// The plain-HTTP address (/health, /ready, /metrics).
    pub http: SocketAddr,
    pub child: Option<Child>,
    /// The other nodes of the cluster (2..): their processes.
    pub others: Vec<Child>,
    /// Their client addresses.
    pub other_addrs: Vec<SocketAddr>,
}

/// Nodes per test cluster: `OCLOCKS_TEST_NODES` (1 or 3; default 3).
pub fn cluster_size() -> usize {
    match std::env::var("OCLOCKS_TEST_NODES").ok().as_deref() {
        Some("1") => 1,
        _ => 3,
    }
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
        Node::start_with(session_timeout_ms, &|_| String::new())
    }

    /// [`Node::start`] with extra top-level config lines for node `id`
    /// (`extra(id)`, e.g. an `advertise_client`).
    pub fn start_with(session_timeout_ms: u64, extra: &dyn Fn(usize) -> String) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        let d = certs.to_str().expect("utf-8 path");
        let n = cluster_size();
        run_ok(&mut oclocks(&["certs", "init", "--dir", d]));
        for i in 1..=n {
            run_ok(&mut oclocks(&[
                "certs",
                "issue",
                "--dir",
                d,
                "--server",
                &format!("node{i}"),
            ]));
        }
        run_ok(&mut oclocks(&[
            "certs", "issue", "--dir", d, "--client", "alice",
        ]));
        run_ok(&mut oclocks(&[
            "certs", "issue", "--dir", d, "--client", "bob",
        ]));
        let addrs: Vec<(SocketAddr, SocketAddr)> =
            (0..n).map(|_| (free_port(), free_port())).collect();
        for (i, (addr, http)) in addrs.iter().enumerate() {
            let id = i + 1;
            let peers = addrs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (a, _))| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ");
            let data = if id == 1 {
                "data".to_string()
            } else {
                format!("data{id}")
            };
            let extra = extra(id);
            std::fs::write(
                dir.path().join(format!("node{id}.toml")),
                format!(
                    r#"node_id = {id}
listen = "{addr}"
http = "{http}"
data_dir = "{data}"
admins = ["alice"]
peers = [{peers}]
{extra}
[tls]
ca = "certs/ca.pem"
cert = "certs/node{id}.pem"
key = "certs/node{id}.key"
[session]
timeout_ms_min = 1000
timeout_ms_default = {session_timeout_ms}
"#
                ),
            )
            .expect("write config");
        }
        let (addr, http) = addrs[0];
        let config = dir.path().join("node1.toml");
        let client_config = dir.path().join("client.toml");
        write_client_config(&client_config, dir.path(), addr, "alice");
        let mut node = Node {
            dir,
            config,
            client_config,
            addr,
            http,
            child: None,
            others: Vec::new(),
            other_addrs: addrs[1..].iter().map(|(a, _)| *a).collect(),
        };
        node.spawn(true);
        for id in 2..=n {
            let child = node.spawn_process(&node.path(&format!("node{id}.toml")), id, false);
            node.others.push(child);
        }
        for (i, (_, http)) in addrs.iter().enumerate() {
            wait_ready(
                *http,
                Duration::from_secs(30),
                &node.path(&format!("node{}.log", i + 1)),
            );
        }
        node
    }

    fn spawn_process(&self, config: &Path, id: usize, bootstrap: bool) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node{id}.log")))
            .expect("log file");
        let mut cmd = oclocks(&["server", "--config", config.to_str().expect("utf-8")]);
        if bootstrap {
            cmd.arg("--bootstrap");
        }
        cmd.stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start oclocks server")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Start (or restart) node 1 and wait until it serves.
    pub fn spawn(&mut self, bootstrap: bool) {
        let child = self.spawn_process(&self.config, 1, bootstrap);
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
        for c in &mut self.others {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Wait until `GET /ready` on `http` answers 200.
pub fn wait_ready(http: SocketAddr, within: Duration, log: &Path) {
    use std::io::{Read, Write};
    let deadline = Instant::now() + within;
    loop {
        let ok = std::net::TcpStream::connect(http)
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.write_all(b"GET /ready HTTP/1.0\r\n\r\n")?;
                let mut buf = String::new();
                s.read_to_string(&mut buf)?;
                Ok(buf.starts_with("HTTP/1.1 200"))
            })
            .unwrap_or(false);
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node at {http} not ready within {within:?}; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
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

/// A raw protocol connection (TLS 1.3, a client certificate, ALPN
/// `oclocks/1`) for tests that must send what the client library never
/// would, such as a corrupted signature.
pub struct RawConn {
    framed: tokio_util::codec::Framed<
        tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        oclocks_proto::ResponseCodec,
    >,
    next_id: u64,
    /// Final replies read while waiting for another request's.
    early: Vec<oclocks_proto::Response>,
}

impl RawConn {
    pub async fn connect(node: &Node, who: &str) -> RawConn {
        RawConn::connect_at(node.addr, &node.path("certs"), who).await
    }

    /// Connect to `addr` as `who` (certificates in `certs`) and HELLO; the
    /// HELLO must succeed.
    pub async fn connect_at(addr: SocketAddr, certs: &Path, who: &str) -> RawConn {
        let mut c = RawConn::open(addr, certs, who).await;
        let hello = c.hello(rand_client_id(), None).await;
        assert!(
            matches!(hello, oclocks_proto::ResponseBody::HelloOk(_)),
            "{hello:?}"
        );
        c
    }

    /// Only the TLS handshake (ALPN `oclocks/1`): no HELLO yet.
    pub async fn open(addr: SocketAddr, certs: &Path, who: &str) -> RawConn {
        let tls = tls_connect(addr, certs, who, oclocks_proto::ALPN_CLIENT)
            .await
            .expect("tls handshake");
        let framed = tokio_util::codec::Framed::new(
            tls,
            oclocks_proto::ResponseCodec::new(oclocks_proto::Limits::default()),
        );
        RawConn {
            framed,
            next_id: 1,
            early: Vec::new(),
        }
    }

    /// Send HELLO and return its reply.
    pub async fn hello(
        &mut self,
        client_id: u128,
        session_timeout_ms: Option<u64>,
    ) -> oclocks_proto::ResponseBody {
        self.request(oclocks_proto::RequestBody::Hello(oclocks_proto::Hello {
            protocol_version: oclocks_proto::PROTOCOL_VERSION,
            client_id,
            session_timeout_ms,
        }))
        .await
    }

    /// Send one request without waiting for its reply; returns its id.
    pub async fn send(&mut self, body: oclocks_proto::RequestBody) -> u64 {
        use futures::SinkExt;
        let id = self.next_id;
        self.next_id += 1;
        self.framed
            .send(oclocks_proto::Request { id, body })
            .await
            .expect("send");
        id
    }

    /// The final reply to request `id` (events and QUEUED are skipped);
    /// `None` if the connection ends first (bytes that do not decode
    /// panic). Final replies to other requests
    /// that arrive first are kept for their own `reply_to`.
    pub async fn reply_to(&mut self, id: u64) -> Option<oclocks_proto::ResponseBody> {
        use futures::StreamExt;
        if let Some(i) = self.early.iter().position(|r| r.id == id) {
            return Some(self.early.remove(i).body);
        }
        loop {
            let r = match self.framed.next().await? {
                Ok(r) => r,
                Err(e) => panic!("a reply that does not decode: {e}"),
            };
            if r.id == 0 || matches!(r.body, oclocks_proto::ResponseBody::Queued { .. }) {
                continue;
            }
            if r.id == id {
                return Some(r.body);
            }
            if !matches!(r.body, oclocks_proto::ResponseBody::WatchEvent(_)) {
                self.early.push(r);
            }
        }
    }

    /// Send one request and return its final reply (events are skipped).
    pub async fn request(
        &mut self,
        body: oclocks_proto::RequestBody,
    ) -> oclocks_proto::ResponseBody {
        let id = self.send(body).await;
        self.reply_to(id).await.expect("connection open")
    }
}

/// The rustls client configuration of `who` (certificates in `certs`),
/// TLS 1.3 only, offering `alpn`.
pub fn tls_client_config(certs: &Path, who: &str, alpn: &[u8]) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(certs.join("ca.pem")).expect("ca") {
        roots.add(c.expect("ca cert")).expect("add ca");
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(certs.join(format!("{who}.pem")))
            .expect("cert")
            .map(|c| c.expect("cert"))
            .collect();
    let key = PrivateKeyDer::from_pem_file(certs.join(format!("{who}.key"))).expect("key");
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client auth");
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg
}

/// A TLS 1.3 connection to `addr` as `who`, offering ALPN `alpn`.
pub async fn tls_connect(
    addr: SocketAddr,
    certs: &Path,
    who: &str,
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let cfg = tls_client_config(certs, who, alpn);
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
}

pub fn rand_client_id() -> u128 {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};
    static SEQ: AtomicU64 = AtomicU64::new(1);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seq = u128::from(SEQ.fetch_add(1, Ordering::Relaxed));
    t ^ (u128::from(std::process::id()) << 64) ^ (seq << 96)
}
