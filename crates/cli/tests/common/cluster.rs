//! Multi-node harness: a cluster of real `oclocks server` processes on
//! 127.0.0.1, in one temporary directory (certificates made by `oclocks
//! certs`, one config, data directory and log per node).
//!
//! Node 1 bootstraps the cluster; every other node lists the others in
//! `peers` and joins through them. Ports are chosen by the OS. Each node can
//! be SIGKILLed, SIGSTOPped and SIGCONTed, restarted with its data or with an
//! empty data directory. Every process is killed when the cluster drops
//! (a stopped one gets SIGCONT first), and when the drop happens during a
//! panic the tail of every node's log is printed (set `OCLOCKS_TEST_KEEP=1`
//! to keep the whole directory, pass or fail; the servers inherit
//! `OCLOCKS_LOG`).
//!
//! Only one cluster runs at a time in a test process: `TestCluster::start`
//! takes a process-wide lock that the cluster holds until it drops, so the
//! test functions of one file do not compete for the machine's two cores.
//!
//! [`TestCluster::prepare`] + [`TestCluster::launch`] split the start for
//! harnesses that must know the nodes' addresses before any process runs
//! (the chaos suite puts a fault proxy in front of every node: it sets a
//! node's peer address — `advertise`, and what the others list in `peers` —
//! and extra config lines between the two).
//!
//! Cluster state is read with STATUS before HELLO on a fresh TLS connection
//! ([`TestCluster::status`]): it answers from the node's own Raft metrics
//! without committing anything, so it works during an election, on a node
//! without quorum and on a quorum-only node — where a full client (whose
//! HELLO opens a session through Raft) could not connect.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use oclocks_client::ClientConfig;
use oclocks_proto::{Request, RequestBody, ResponseBody, ResponseCodec, Role, StatusOk};
use tokio_util::codec::{Decoder, Encoder};

use super::{oclocks, run_ok, BIN};

/// One test cluster at a time per process.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// What a node is in the cluster (its config's `role`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeRole {
    Voter,
    Learner,
    QuorumOnly,
}

impl NodeRole {
    fn as_config(self) -> &'static str {
        match self {
            NodeRole::Voter => "voter",
            NodeRole::Learner => "learner",
            NodeRole::QuorumOnly => "quorum-only",
        }
    }

    /// Whether clients may use a node of this role.
    pub fn serves_clients(self) -> bool {
        self != NodeRole::QuorumOnly
    }
}

/// How to build a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOpts {
    /// One entry per node; node ids are 1, 2, ... in this order. Node 1
    /// bootstraps and must be a voter.
    pub roles: Vec<NodeRole>,
    /// `session.timeout_ms_default` (and `timeout_ms_min` is 1000).
    pub session_timeout_ms: u64,
    pub heartbeat_ms: u64,
    pub election_timeout_ms_min: u64,
    pub election_timeout_ms_max: u64,
    /// Identities allowed to BREAK.
    pub admins: Vec<String>,
    /// How long startup (every node ready) may take.
    pub start_timeout: Duration,
    /// `raft.snapshot_every_entries` and `raft.logs_kept_after_snapshot`.
    pub snapshots: (u64, u64),
}

impl ClusterOpts {
    /// `n` voters with the project's default Raft timings (heartbeat 100 ms,
    /// election timeout 500–1000 ms) and a 10 s default session timeout.
    pub fn voters(n: usize) -> ClusterOpts {
        ClusterOpts {
            roles: vec![NodeRole::Voter; n],
            session_timeout_ms: 10_000,
            heartbeat_ms: 100,
            election_timeout_ms_min: 500,
            election_timeout_ms_max: 1000,
            admins: vec!["alice".into()],
            start_timeout: Duration::from_secs(60),
            snapshots: (20_000, 1_000),
        }
    }

    /// Snapshot every `every` entries, keeping `kept` log entries behind.
    pub fn snapshots(mut self, every: u64, kept: u64) -> ClusterOpts {
        self.snapshots = (every, kept);
        self
    }

    pub fn roles(mut self, roles: &[NodeRole]) -> ClusterOpts {
        self.roles = roles.to_vec();
        self
    }

    pub fn session_timeout_ms(mut self, ms: u64) -> ClusterOpts {
        self.session_timeout_ms = ms;
        self
    }

    pub fn raft_ms(mut self, heartbeat: u64, election_min: u64, election_max: u64) -> ClusterOpts {
        self.heartbeat_ms = heartbeat;
        self.election_timeout_ms_min = election_min;
        self.election_timeout_ms_max = election_max;
        self
    }

    pub fn admins(mut self, admins: &[&str]) -> ClusterOpts {
        self.admins = admins.iter().map(|s| s.to_string()).collect();
        self
    }
}

/// One server of the cluster.
pub struct ClusterNode {
    pub id: u64,
    pub role: NodeRole,
    /// The TLS address (clients and peers).
    pub addr: SocketAddr,
    /// The plain-HTTP address (/health, /ready, /metrics).
    pub http: SocketAddr,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// The address peers use for this node (its `advertise`, and what the
    /// other nodes list in `peers`); `None`: its TLS address.
    pub peer_addr: Option<String>,
    /// Extra top-level config lines (e.g. `peer_source_ip = "127.0.0.11"`).
    pub extra_config: String,
    /// Every process this node ran: when it was spawned and, once known,
    /// when it was killed or found exited (the test process's clock).
    pub lifetimes: Vec<(Instant, Option<Instant>)>,
    child: Option<Child>,
    stopped: bool,
    /// Length of the log when the current process started.
    log_offset: u64,
    /// Whether this node's first start used --bootstrap already.
    bootstrapped: bool,
}

impl ClusterNode {
    /// The process id of the running server, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Running and not SIGSTOPped.
    pub fn is_live(&self) -> bool {
        self.child.is_some() && !self.stopped
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    fn signal(&self, sig: i32) {
        let pid = self.pid().expect("the node is running");
        let pid = i32::try_from(pid).expect("pid fits");
        // SAFETY: kill(2) has no memory-safety preconditions; the process is
        // our own child (not yet reaped, so the pid is still ours).
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}) for node {}", self.id);
    }

    /// The log written since the current (or last) process started.
    /// Record the end of the current process's lifetime.
    fn ended(&mut self) {
        if let Some((_, end)) = self.lifetimes.last_mut() {
            if end.is_none() {
                *end = Some(Instant::now());
            }
        }
    }

    pub fn log_since_start(&self) -> String {
        let all = std::fs::read(&self.log).unwrap_or_default();
        let from = usize::try_from(self.log_offset)
            .unwrap_or(usize::MAX)
            .min(all.len());
        String::from_utf8_lossy(&all[from..]).into_owned()
    }
}

/// A running test cluster. Dropping it kills every process.
pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub certs: PathBuf,
    pub opts: ClusterOpts,
    nodes: Vec<ClusterNode>,
    /// Keep the directory when the cluster drops (as `OCLOCKS_TEST_KEEP`).
    pub keep_dir: bool,
    _one_at_a_time: MutexGuard<'static, ()>,
}

fn free_ports(n: usize) -> Vec<SocketAddr> {
    // Hold every listener until all are chosen, so the ports are distinct.
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr"))
        .collect()
}

/// `GET /ready` on `http`: `Some(body)` when it answers 200.
pub fn ready_at(http: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&http, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /ready HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    (text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200")).then_some(text)
}

/// STATUS (before any HELLO) on a fresh TLS connection to `addr`, as `who`.
/// Bounded by a few seconds; a stopped or dead server is an `Err`.
pub fn status_at(addr: SocketAddr, certs: &Path, who: &str) -> Result<StatusOk, String> {
    let cfg = super::tls_client_config(certs, who, oclocks_proto::ALPN_CLIENT);
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("server name");
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut codec = ResponseCodec::default();
    let mut out = bytes::BytesMut::new();
    codec
        .encode(
            Request {
                id: 1,
                body: RequestBody::Status,
            },
            &mut out,
        )
        .map_err(|e| format!("encode: {e}"))?;
    tls.write_all(&out).map_err(|e| format!("write: {e}"))?;
    tls.flush().map_err(|e| format!("flush: {e}"))?;
    let mut inbuf = bytes::BytesMut::new();
    let mut chunk = [0_u8; 4096];
    loop {
        if let Some(resp) = codec
            .decode(&mut inbuf)
            .map_err(|e| format!("decode: {e}"))?
        {
            match resp.body {
                ResponseBody::StatusOk(s) if resp.id == 1 => return Ok(s),
                other => return Err(format!("STATUS answered {other:?}")),
            }
        }
        let n = tls.read(&mut chunk).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed before answering STATUS".into());
        }
        inbuf.extend_from_slice(&chunk[..n]);
    }
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl TestCluster {
    /// Certificates, configs, node 1 with --bootstrap, then the others
    /// joining through `peers`; returns once every node's `/ready` answers
    /// 200 and every node that is not node 1 has logged that it is a member
    /// (its join, including a promotion to voter, is done).
    pub fn start(opts: ClusterOpts) -> TestCluster {
        let mut c = TestCluster::prepare(opts);
        c.launch();
        c
    }

    /// Certificates and node definitions (ids, ports, paths), nothing
    /// started and no config written yet: set peer addresses and extra
    /// config lines, then [`TestCluster::launch`].
    pub fn prepare(opts: ClusterOpts) -> TestCluster {
        assert!(!opts.roles.is_empty(), "a cluster needs a node");
        assert_eq!(opts.roles[0], NodeRole::Voter, "node 1 bootstraps");
        let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        let d = certs.to_str().expect("utf-8 path");
        run_ok(&mut oclocks(&["certs", "init", "--dir", d]));
        for who in ["alice", "bob"] {
            run_ok(&mut oclocks(&[
                "certs", "issue", "--dir", d, "--client", who,
            ]));
        }
        let mut c = TestCluster {
            dir,
            certs,
            opts: opts.clone(),
            nodes: Vec::new(),
            keep_dir: false,
            _one_at_a_time: guard,
        };
        let ports = free_ports(2 * opts.roles.len());
        for (i, role) in opts.roles.iter().enumerate() {
            c.define_node(*role, ports[2 * i], ports[2 * i + 1]);
        }
        c
    }

    /// Node `id`'s peer address (its `advertise`; the others list it in
    /// `peers`). Takes effect when its config is (re)written.
    pub fn set_peer_addr(&mut self, id: u64, addr: &str) {
        self.node_mut(id).peer_addr = Some(addr.to_string());
    }

    /// Extra top-level config lines of node `id`. Takes effect when its
    /// config is (re)written.
    pub fn set_extra_config(&mut self, id: u64, lines: &str) {
        self.node_mut(id).extra_config = lines.to_string();
    }

    /// Write every config, start node 1 with --bootstrap, then the others;
    /// returns once every node is ready and has joined (see
    /// [`TestCluster::start`]).
    pub fn launch(&mut self) {
        let opts = self.opts.clone();
        let c = self;
        for id in c.ids() {
            c.write_config(id);
        }
        let started = Instant::now();
        c.spawn(1);
        c.wait_ready(1, opts.start_timeout);
        for id in c.ids().into_iter().skip(1) {
            c.spawn(id);
        }
        for id in c.ids() {
            c.wait_ready(id, opts.start_timeout.saturating_sub(started.elapsed()));
        }
        for id in c.ids().into_iter().skip(1) {
            c.wait_joined(id, opts.start_timeout.saturating_sub(started.elapsed()));
        }
        println!(
            "cluster of {} node(s) ready in {:?} (dir {})",
            c.nodes.len(),
            started.elapsed(),
            c.dir.path().display()
        );
    }

    /// A new node (certificate, ports) that is not started yet.
    fn define_node(&mut self, role: NodeRole, addr: SocketAddr, http: SocketAddr) -> u64 {
        let id = self.nodes.len() as u64 + 1;
        let name = format!("node{id}");
        let d = self.certs.to_str().expect("utf-8 path");
        run_ok(&mut oclocks(&[
            "certs", "issue", "--dir", d, "--server", &name,
        ]));
        let dir = self.dir.path();
        self.nodes.push(ClusterNode {
            id,
            role,
            addr,
            http,
            config: dir.join(format!("{name}.toml")),
            data_dir: dir.join(format!("{name}-data")),
            log: dir.join(format!("{name}.log")),
            peer_addr: None,
            extra_config: String::new(),
            lifetimes: Vec::new(),
            child: None,
            stopped: false,
            log_offset: 0,
            bootstrapped: id != 1,
        });
        id
    }

    /// Write node `id`'s config: `peers` are all the other nodes known now.
    fn write_config(&self, id: u64) {
        let n = self.node(id);
        let peers = self
            .nodes
            .iter()
            .filter(|o| o.id != id)
            .map(|o| match &o.peer_addr {
                Some(a) => format!("\"{a}\""),
                None => format!("\"{}\"", o.addr),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let admins = self
            .opts
            .admins
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let o = &self.opts;
        let mut extra = String::new();
        if let Some(a) = &n.peer_addr {
            extra.push_str(&format!("advertise = \"{a}\"\n"));
        }
        if !n.extra_config.is_empty() {
            extra.push_str(n.extra_config.trim_end());
            extra.push('\n');
        }
        let text = format!(
            r#"node_id = {id}
listen = "{addr}"
http = "{http}"
data_dir = "node{id}-data"
role = "{role}"
peers = [{peers}]
admins = [{admins}]
{extra}
[tls]
ca = "certs/ca.pem"
cert = "certs/node{id}.pem"
key = "certs/node{id}.key"

[session]
timeout_ms_min = 1000
timeout_ms_default = {session}

[raft]
heartbeat_ms = {hb}
election_timeout_ms_min = {emin}
election_timeout_ms_max = {emax}
snapshot_every_entries = {snap}
logs_kept_after_snapshot = {kept}
"#,
            addr = n.addr,
            http = n.http,
            role = n.role.as_config(),
            session = o.session_timeout_ms,
            hb = o.heartbeat_ms,
            emin = o.election_timeout_ms_min,
            emax = o.election_timeout_ms_max,
            snap = o.snapshots.0,
            kept = o.snapshots.1,
        );
        std::fs::write(&n.config, text).expect("write node config");
    }

    /// Add a node to the running cluster (its `peers` are all the others)
    /// and start it; returns its id. Wait with [`TestCluster::wait_ready`] /
    /// [`TestCluster::wait_joined`].
    pub fn add_node(&mut self, role: NodeRole) -> u64 {
        let ports = free_ports(2);
        let id = self.define_node(role, ports[0], ports[1]);
        self.write_config(id);
        self.spawn(id);
        id
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    pub fn node(&self, id: u64) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    fn node_mut(&mut self, id: u64) -> &mut ClusterNode {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// Ids of the nodes that are running and not stopped.
    pub fn live_ids(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|n| n.is_live())
            .map(|n| n.id)
            .collect()
    }

    /// Ids of the nodes that serve clients (every role but quorum-only).
    pub fn serving_ids(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|n| n.role.serves_clients())
            .map(|n| n.id)
            .collect()
    }

    /// Start node `id`'s server process (node 1's very first start with
    /// --bootstrap). Does not wait.
    pub fn spawn(&mut self, id: u64) {
        let dir = self.dir.path().to_path_buf();
        let n = self.node_mut(id);
        assert!(n.child.is_none(), "node {id} is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .expect("open node log");
        n.log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log2 = log.try_clone().expect("clone log handle");
        let mut cmd = Command::new(BIN);
        cmd.arg("server")
            .arg("--config")
            .arg(&n.config)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        if !n.bootstrapped {
            cmd.arg("--bootstrap");
            n.bootstrapped = true;
        }
        n.lifetimes.push((Instant::now(), None));
        n.child = Some(cmd.spawn().expect("start oclocks server"));
        n.stopped = false;
    }

    /// SIGKILL node `id` and reap it.
    pub fn kill9(&mut self, id: u64) {
        let n = self.node_mut(id);
        if let Some(mut c) = n.child.take() {
            if n.stopped {
                // A stopped process dies of SIGKILL too; SIGCONT first so
                // nothing of it lingers stopped.
                if let Ok(pid) = i32::try_from(c.id()) {
                    // SAFETY: kill(2) has no memory-safety preconditions;
                    // the process is our unreaped child.
                    unsafe {
                        libc::kill(pid, libc::SIGCONT);
                    }
                }
            }
            let _ = c.kill();
            let _ = c.wait();
            n.ended();
        }
        n.stopped = false;
    }

    /// SIGSTOP node `id`.
    pub fn stop(&mut self, id: u64) {
        let n = self.node_mut(id);
        n.signal(libc::SIGSTOP);
        n.stopped = true;
    }

    /// SIGCONT node `id`.
    pub fn cont(&mut self, id: u64) {
        let n = self.node_mut(id);
        n.signal(libc::SIGCONT);
        n.stopped = false;
    }

    pub fn pid(&self, id: u64) -> Option<u32> {
        self.node(id).pid()
    }

    /// SIGKILL (if running) and start again with the same data; waits until
    /// it is ready and has caught up with the leader's log.
    pub fn restart(&mut self, id: u64) {
        self.kill9(id);
        self.spawn(id);
        self.wait_ready(id, Duration::from_secs(30));
        self.wait_caught_up(id, Duration::from_secs(30));
    }

    /// Wait until node `id` has applied as much of the log as the leader
    /// had applied when the wait began. (`/ready` only says that a node
    /// knows a leader; a node that restarted behind would lose the next
    /// election on its log and delay it.)
    pub fn wait_caught_up(&mut self, id: u64, within: Duration) {
        let deadline = Instant::now() + within;
        let leader = self.wait_for_leader(within);
        let target = match self.status(leader) {
            Ok(s) => s.applied_index,
            Err(e) => self.fail(&format!("status of leader {leader}: {e}")),
        };
        loop {
            let applied = self.status(id).map(|s| s.applied_index);
            if applied.as_ref().is_ok_and(|a| *a >= target) {
                return;
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "node {id} did not catch up to index {target} of leader {leader} within \
                     {within:?}: {applied:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL (if running), empty the data directory and start again. Does
    /// not wait (a wiped member is expected to be refused and exit).
    pub fn wipe_and_restart(&mut self, id: u64) {
        self.kill9(id);
        let data = self.node(id).data_dir.clone();
        if data.exists() {
            std::fs::remove_dir_all(&data).expect("wipe the data directory");
        }
        std::fs::create_dir_all(&data).expect("recreate the data directory");
        self.spawn(id);
    }

    /// Wait for node `id`'s process to exit on its own.
    pub fn wait_exit(&mut self, id: u64, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            let status = {
                let n = self.node_mut(id);
                let child = n.child.as_mut().expect("the node is running");
                child.try_wait().expect("try_wait")
            };
            if let Some(status) = status {
                let n = self.node_mut(id);
                n.child = None;
                n.ended();
                return status;
            }
            if Instant::now() >= deadline {
                self.fail(&format!("node {id} did not exit within {within:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Panic with `msg` (the cluster's drop then prints every node's log
    /// tail).
    pub fn fail(&self, msg: &str) -> ! {
        panic!("{msg}");
    }

    /// The tail of every node's log.
    pub fn logs_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let text = std::fs::read_to_string(&n.log).unwrap_or_default();
            out.push_str(&format!(
                "----- node {} ({:?}) log, last {lines} lines -----\n{}\n",
                n.id,
                n.role,
                tail(&text, lines)
            ));
        }
        out
    }

    /// Whether node `id`'s process has exited on its own (reaped if so);
    /// `None` while it runs or if it was not running.
    pub fn try_exited(&mut self, id: u64) -> Option<ExitStatus> {
        self.exited(id)
    }

    /// Whether node `id`'s process has exited (and reap it if so).
    fn exited(&mut self, id: u64) -> Option<ExitStatus> {
        let n = self.node_mut(id);
        let status = n.child.as_mut()?.try_wait().ok()??;
        n.child = None;
        n.ended();
        Some(status)
    }

    /// Wait until node `id`'s `/ready` answers 200.
    pub fn wait_ready(&mut self, id: u64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if ready_at(self.node(id).http).is_some() {
                return;
            }
            if let Some(status) = self.exited(id) {
                self.fail(&format!(
                    "node {id} exited ({status}) before it was ready; its log:\n{}",
                    self.node(id).log_since_start()
                ));
            }
            if Instant::now() >= deadline {
                self.fail(&format!("node {id} was not ready within {within:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until node `id` has logged, since its current start, that it is
    /// a member of the cluster (its join, with any promotion, is complete).
    pub fn wait_joined(&mut self, id: u64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if self
                .node(id)
                .log_since_start()
                .contains("member of the cluster")
            {
                return;
            }
            if let Some(status) = self.exited(id) {
                self.fail(&format!(
                    "node {id} exited ({status}) before it joined; its log:\n{}",
                    self.node(id).log_since_start()
                ));
            }
            if Instant::now() >= deadline {
                self.fail(&format!("node {id} did not join within {within:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Node `id`'s `/ready` body if it answers 200.
    pub fn ready(&self, id: u64) -> Option<String> {
        ready_at(self.node(id).http)
    }

    /// Node `id`'s own view (STATUS before HELLO, as alice).
    pub fn status(&self, id: u64) -> Result<StatusOk, String> {
        status_at(self.node(id).addr, &self.certs, "alice")
    }

    /// The statuses of the live nodes (those that answered).
    pub fn statuses(&self) -> Vec<(u64, Result<StatusOk, String>)> {
        self.live_ids()
            .into_iter()
            .map(|id| (id, self.status(id)))
            .collect()
    }

    /// The leader every live node agrees on: `Some(l)` when node `l` says
    /// it leads and every live node answers STATUS naming `l` as the
    /// leader in the same term.
    pub fn leader(&self) -> Option<u64> {
        let statuses = self.statuses();
        let leader = statuses.iter().find_map(|(id, s)| match s {
            Ok(s) if s.role == Role::Leader => Some((*id, s.term)),
            _ => None,
        })?;
        statuses
            .iter()
            .all(|(_, s)| {
                s.as_ref()
                    .is_ok_and(|s| s.leader_id == Some(leader.0) && s.term == leader.1)
            })
            .then_some(leader.0)
    }

    /// Wait until the live nodes agree on a leader; returns it.
    pub fn wait_for_leader(&self, within: Duration) -> u64 {
        self.wait_for_leader_where(within, |_| true).0
    }

    /// Wait until the live nodes agree on a leader other than `id`; returns
    /// it and how long the wait took.
    pub fn wait_for_leader_other_than(&self, id: u64, within: Duration) -> (u64, Duration) {
        self.wait_for_leader_where(within, |l| l != id)
    }

    fn wait_for_leader_where(&self, within: Duration, ok: impl Fn(u64) -> bool) -> (u64, Duration) {
        let start = Instant::now();
        loop {
            if let Some(l) = self.leader() {
                if ok(l) {
                    return (l, start.elapsed());
                }
            }
            if start.elapsed() >= within {
                let view: Vec<String> = self
                    .statuses()
                    .into_iter()
                    .map(|(id, s)| match s {
                        Ok(s) => format!(
                            "node {id}: {:?} term {} leader {:?}",
                            s.role, s.term, s.leader_id
                        ),
                        Err(e) => format!("node {id}: {e}"),
                    })
                    .collect();
                self.fail(&format!(
                    "no (acceptable) leader agreed within {within:?}: {view:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A client config file for `who` with only node `id` as endpoint.
    pub fn client_config(&self, id: u64, who: &str) -> PathBuf {
        self.client_config_for(&[id], who)
    }

    /// A client config file for `who` with every serving node as endpoint.
    pub fn client_config_all(&self, who: &str) -> PathBuf {
        self.client_config_for(&self.serving_ids(), who)
    }

    /// A client config file for `who` with nodes `ids` as endpoints.
    pub fn client_config_for(&self, ids: &[u64], who: &str) -> PathBuf {
        let tag = ids.iter().map(u64::to_string).collect::<Vec<_>>().join("-");
        let path = self.dir.path().join(format!("client-{who}-{tag}.toml"));
        let endpoints = ids
            .iter()
            .map(|id| format!("\"{}\"", self.node(*id).addr))
            .collect::<Vec<_>>()
            .join(", ");
        std::fs::write(
            &path,
            format!(
                "endpoints = [{endpoints}]\nca_file = \"{ca}\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n",
                ca = self.certs.join("ca.pem").display(),
                cert = self.certs.join(format!("{who}.pem")).display(),
                key = self.certs.join(format!("{who}.key")).display(),
            ),
        )
        .expect("write client config");
        path
    }

    /// A Rust client configuration for `who` with nodes `ids` as endpoints.
    pub fn client_cfg(&self, ids: &[u64], who: &str) -> ClientConfig {
        ClientConfig::from_file(self.client_config_for(ids, who)).expect("client config")
    }

    /// An `oclocks` client command as alice, with only node `id` as
    /// endpoint, run in the cluster's directory.
    pub fn cli(&self, id: u64, args: &[&str]) -> Command {
        let mut c = oclocks(args);
        c.env("OCLOCKS_CONFIG", self.client_config(id, "alice"))
            .current_dir(self.dir.path());
        c
    }

    pub fn cli_output(&self, id: u64, args: &[&str]) -> Output {
        self.cli(id, args).output().expect("run oclocks")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                if n.stopped {
                    if let Ok(pid) = i32::try_from(c.id()) {
                        // SAFETY: kill(2) has no memory-safety preconditions;
                        // the process is our unreaped child.
                        unsafe {
                            libc::kill(pid, libc::SIGCONT);
                        }
                    }
                }
                let _ = c.kill();
                let _ = c.wait();
                n.stopped = false;
                n.ended();
            }
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs_tail(150));
        }
        if self.keep_dir || std::env::var_os("OCLOCKS_TEST_KEEP").is_some() {
            let kept = std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().expect("placeholder tempdir"),
            );
            eprintln!("kept the cluster directory {}", kept.keep().display());
        }
    }
}

/// The tokens holding `name` in `oclocks locks` output (`None`: the lock
/// is not listed).
pub fn tokens_in_listing(listing: &str, name: &str) -> Option<Vec<u64>> {
    let line = listing
        .lines()
        .skip(1)
        .find(|l| l.split_whitespace().next() == Some(name))?;
    Some(
        line.split("(token ")
            .skip(1)
            .filter_map(|rest| rest.split(',').next()?.trim().parse().ok())
            .collect(),
    )
}

impl TestCluster {
    /// `oclocks locks` through node `id` only: the tokens holding `name`
    /// (empty if it is not listed). Panics (with logs) if the command fails.
    pub fn held_via(&self, id: u64, name: &str) -> Vec<u64> {
        let out = self.cli_output(id, &["locks"]);
        if !out.status.success() {
            self.fail(&format!(
                "`oclocks locks` through node {id} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let listing = String::from_utf8_lossy(&out.stdout);
        tokens_in_listing(&listing, name).unwrap_or_default()
    }
}

/// QUERY through `client` until it answers (a client failing over may
/// return errors for a while): the tokens holding the lock and the number
/// of waiters.
pub fn query_retry(
    rt: &tokio::runtime::Runtime,
    client: &oclocks_client::Client,
    name: &str,
    within: Duration,
) -> Result<(Vec<u64>, u32), String> {
    let deadline = Instant::now() + within;
    loop {
        let r = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), client.query("default", name)).await
        });
        match r {
            Ok(Ok(st)) => return Ok((st.holders.iter().map(|h| h.token).collect(), st.waiters)),
            Ok(Err(e)) if Instant::now() >= deadline => return Err(e.to_string()),
            Err(_) if Instant::now() >= deadline => return Err("QUERY timed out".into()),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
