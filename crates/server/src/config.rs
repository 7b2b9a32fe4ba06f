//! The server's configuration file (TOML): what a node is, where it listens,
//! where it keeps its data, which TLS files prove who it is, and the limits
//! it enforces.
//!
//! Loading is strict: unknown keys are errors (a misspelt key must not be
//! silently ignored), and every semantic check names the field it rejects.
//! All of it happens before anything starts. This module owns no I/O beyond
//! reading the one file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use oclocks_core::EngineLimits;
use oclocks_proto::Limits;
use serde::Deserialize;

use crate::raft::MemberRole;

/// A configuration that could not be used; the message names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// TLS files: the CA that signs every node and client certificate, and this
/// node's own certificate chain and private key (PEM).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Session timeout bounds, in milliseconds.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    pub timeout_ms_min: u64,
    pub timeout_ms_max: u64,
    pub timeout_ms_default: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        let l = EngineLimits::default();
        SessionConfig {
            timeout_ms_min: l.session_timeout_ms_min,
            timeout_ms_max: l.session_timeout_ms_max,
            timeout_ms_default: l.session_timeout_ms_default,
        }
    }
}

/// Limits (SPEC 8). Unset fields keep their defaults.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub zone_name_bytes_max: usize,
    pub lock_name_bytes_max: usize,
    pub waiters_per_lock_max: usize,
    pub locks_per_session_max: usize,
    pub sessions_per_identity_max: usize,
    pub message_bytes_max: usize,
    pub requests_in_flight_max: usize,
    /// Responses queued for a client that is not reading before it is
    /// disconnected.
    pub outbound_queue_max: usize,
    /// Client connections served at once.
    pub connections_max: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let e = EngineLimits::default();
        let w = Limits::default();
        LimitsConfig {
            zone_name_bytes_max: e.zone_name_bytes_max,
            lock_name_bytes_max: e.lock_name_bytes_max,
            waiters_per_lock_max: e.waiters_per_lock_max,
            locks_per_session_max: e.locks_per_session_max,
            sessions_per_identity_max: e.sessions_per_identity_max,
            message_bytes_max: w.message_bytes_max,
            requests_in_flight_max: w.requests_in_flight_max,
            outbound_queue_max: 4096,
            connections_max: 10_000,
        }
    }
}

/// Largest `[raft] batch_linger_us`: a linger is meant to be a fraction of
/// a commit, never a visible delay.
pub const MAX_BATCH_LINGER_US: u64 = 10_000;

/// Raft timing, in milliseconds.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    pub heartbeat_ms: u64,
    pub election_timeout_ms_min: u64,
    pub election_timeout_ms_max: u64,
    /// Take a snapshot of the lock table every this many log entries.
    pub snapshot_every_entries: u64,
    /// Log entries kept behind a snapshot, so a follower that lags by fewer
    /// catches up from the log instead of receiving the whole snapshot.
    pub logs_kept_after_snapshot: u64,
    /// Most client commands packed into one log entry (one fsync).
    pub max_batch_commands: usize,
    /// Batches proposed to Raft and not yet applied, at most: with more
    /// than one, the leader makes the next batch durable while the
    /// followers store the previous one.
    pub max_inflight_batches: usize,
    /// How long a batch may wait, in µs, for the next requests of the
    /// clients the previous batch just answered (0: propose at once).
    pub batch_linger_us: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            heartbeat_ms: 100,
            election_timeout_ms_min: 500,
            election_timeout_ms_max: 1000,
            snapshot_every_entries: 20_000,
            logs_kept_after_snapshot: 1_000,
            max_batch_commands: 128,
            max_inflight_batches: 1,
            batch_linger_us: 500,
        }
    }
}

/// The node's configuration file.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// This node's id in the cluster (> 0, unique, never reused).
    pub node_id: u64,
    /// TLS address for clients and peers (ALPN tells them apart).
    pub listen: SocketAddr,
    /// Address peers (and clients, unless `advertise_client` is set) should
    /// use to reach this node; defaults to `listen`.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Address to give clients (in HELLO_OK's server list) when it differs
    /// from `advertise`, e.g. behind a client-side proxy.
    #[serde(default)]
    pub advertise_client: Option<String>,
    /// Local address outgoing peer connections are bound to (default: any).
    #[serde(default)]
    pub peer_source_ip: Option<std::net::IpAddr>,
    /// `voter` (default), `learner` (replicates and serves clients, does not
    /// vote) or `quorum-only` (votes, never leads, serves no clients).
    #[serde(default)]
    pub role: MemberRole,
    /// Plain-HTTP address of /health, /ready and /metrics (keep it on
    /// loopback or a private network).
    #[serde(default = "default_http")]
    pub http: SocketAddr,
    /// Where this node runs (`eu-west-a`), reported to clients.
    #[serde(default = "default_site")]
    pub site: String,
    /// Raft log, snapshots and the cluster id live here.
    pub data_dir: PathBuf,
    pub tls: TlsFiles,
    /// Servers of the cluster to join through (or a load balancer in front
    /// of them), `host:port`; empty for the first node (`--bootstrap`).
    #[serde(default)]
    pub peers: Vec<String>,
    /// Node ids approved as voters: a joining node listed here (or whose
    /// address is in `peers`) is promoted once caught up; any other stays a
    /// learner until an administrator promotes it (`oclocks cluster
    /// promote`). List the same on every server.
    #[serde(default)]
    pub voters: Vec<u64>,
    /// Identities (certificate CN or URI SAN) allowed to BREAK locks.
    #[serde(default)]
    pub admins: Vec<String>,
    #[serde(default)]
    pub session: SessionConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub raft: RaftConfig,
}

fn default_http() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn default_site() -> String {
    "default".into()
}

impl ServerConfig {
    /// Read and check a config file. Relative paths in it are taken relative
    /// to the file's directory.
    pub fn load(path: &Path) -> Result<ServerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = ServerConfig::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        if let Some(base) = path.parent() {
            cfg.resolve_relative(base);
        }
        Ok(cfg)
    }

    /// Parse and check config text.
    pub fn parse(text: &str) -> Result<ServerConfig, ConfigError> {
        let cfg: ServerConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_relative(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        fix(&mut self.tls.ca);
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
    }

    /// Semantic checks, each naming its field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(invalid("node_id", "must be greater than 0"));
        }
        if self.site.is_empty() || self.site.len() > 63 {
            return Err(invalid("site", "must be 1 to 63 bytes"));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        for p in &self.peers {
            if p.is_empty() || p.len() > 255 || !p.contains(':') {
                return Err(invalid("peers", "each entry must be host:port"));
            }
        }
        let s = &self.session;
        if s.timeout_ms_min == 0 {
            return Err(invalid("session.timeout_ms_min", "must be greater than 0"));
        }
        if s.timeout_ms_min > s.timeout_ms_max {
            return Err(invalid(
                "session.timeout_ms_min",
                "must not exceed session.timeout_ms_max",
            ));
        }
        if !(s.timeout_ms_min..=s.timeout_ms_max).contains(&s.timeout_ms_default) {
            return Err(invalid(
                "session.timeout_ms_default",
                "must lie within [timeout_ms_min, timeout_ms_max]",
            ));
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0 {
            return Err(invalid("raft.heartbeat_ms", "must be greater than 0"));
        }
        if r.election_timeout_ms_min <= r.heartbeat_ms * 2 {
            return Err(invalid(
                "raft.election_timeout_ms_min",
                "must exceed twice raft.heartbeat_ms",
            ));
        }
        if r.max_batch_commands == 0 {
            return Err(invalid("raft.max_batch_commands", "must be greater than 0"));
        }
        if !(1..=64).contains(&r.max_inflight_batches) {
            return Err(invalid(
                "raft.max_inflight_batches",
                "must be between 1 and 64",
            ));
        }
        if r.batch_linger_us > MAX_BATCH_LINGER_US {
            return Err(invalid(
                "raft.batch_linger_us",
                "must be at most 10000 (10 ms)",
            ));
        }
        if r.election_timeout_ms_max <= r.election_timeout_ms_min {
            return Err(invalid(
                "raft.election_timeout_ms_max",
                "must exceed raft.election_timeout_ms_min",
            ));
        }
        if s.timeout_ms_min <= 2 * r.heartbeat_ms {
            return Err(invalid(
                "session.timeout_ms_min",
                "must exceed twice raft.heartbeat_ms (keepalives are batched per heartbeat)",
            ));
        }
        let l = &self.limits;
        let positive: [(&'static str, usize); 8] = [
            ("limits.zone_name_bytes_max", l.zone_name_bytes_max),
            ("limits.lock_name_bytes_max", l.lock_name_bytes_max),
            ("limits.waiters_per_lock_max", l.waiters_per_lock_max),
            ("limits.locks_per_session_max", l.locks_per_session_max),
            (
                "limits.sessions_per_identity_max",
                l.sessions_per_identity_max,
            ),
            ("limits.requests_in_flight_max", l.requests_in_flight_max),
            ("limits.outbound_queue_max", l.outbound_queue_max),
            ("limits.connections_max", l.connections_max),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(invalid(field, "must be greater than 0"));
            }
        }
        if l.zone_name_bytes_max > 255 {
            return Err(invalid("limits.zone_name_bytes_max", "must be at most 255"));
        }
        if l.lock_name_bytes_max > 65_535 {
            return Err(invalid(
                "limits.lock_name_bytes_max",
                "must be at most 65535",
            ));
        }
        if l.message_bytes_max < 1024 || l.message_bytes_max > 64 << 20 {
            return Err(invalid(
                "limits.message_bytes_max",
                "must be between 1 KiB and 64 MiB",
            ));
        }
        Ok(())
    }

    /// The engine limits this node applies. Every replica must use the same
    /// values (the next milestone moves them into the replicated config).
    pub fn engine_limits(&self) -> EngineLimits {
        EngineLimits {
            zone_name_bytes_max: self.limits.zone_name_bytes_max,
            lock_name_bytes_max: self.limits.lock_name_bytes_max,
            waiters_per_lock_max: self.limits.waiters_per_lock_max,
            locks_per_session_max: self.limits.locks_per_session_max,
            sessions_per_identity_max: self.limits.sessions_per_identity_max,
            session_timeout_ms_min: self.session.timeout_ms_min,
            session_timeout_ms_max: self.session.timeout_ms_max,
            session_timeout_ms_default: self.session.timeout_ms_default,
            ..EngineLimits::default()
        }
    }

    /// The wire limits this node's decoder enforces.
    pub fn wire_limits(&self) -> Limits {
        Limits {
            zone_name_bytes_max: self.limits.zone_name_bytes_max,
            lock_name_bytes_max: self.limits.lock_name_bytes_max,
            message_bytes_max: self.limits.message_bytes_max,
            requests_in_flight_max: self.limits.requests_in_flight_max,
            ..Limits::default()
        }
    }

    /// The address to advertise to peers.
    pub fn advertise_addr(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }

    /// The address to advertise to clients.
    pub fn client_addr(&self) -> String {
        self.advertise_client
            .clone()
            .unwrap_or_else(|| self.advertise_addr())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
node_id = 1
listen = "127.0.0.1:7700"
data_dir = "data"
[tls]
ca = "ca.pem"
cert = "node.pem"
key = "node.key"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = ServerConfig::parse(MINIMAL).expect("valid");
        assert_eq!(c.node_id, 1);
        assert_eq!(c.site, "default");
        assert_eq!(c.session.timeout_ms_default, 15_000);
        assert_eq!(c.engine_limits().waiters_per_lock_max, 10_000);
        assert_eq!(c.advertise_addr(), "127.0.0.1:7700");
    }

    fn err_of(text: &str) -> String {
        match ServerConfig::parse(text) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e.to_string(),
        }
    }

    /// Every rejection names the field at fault.
    #[test]
    fn bad_configs_name_their_field() {
        assert!(err_of(&MINIMAL.replace("node_id = 1", "node_id = 0")).contains("node_id"));
        assert!(err_of(&MINIMAL.replace("127.0.0.1:7700", "nowhere")).contains("listen"));
        assert!(err_of(&format!("{MINIMAL}\nbogus = 3")).contains("bogus"));
        let s = format!("{MINIMAL}\n[session]\ntimeout_ms_min = 5000\ntimeout_ms_max = 1000\n");
        assert!(err_of(&s).contains("session.timeout_ms_min"));
        let s = format!("{MINIMAL}\n[limits]\nwaiters_per_lock_max = 0\n");
        assert!(err_of(&s).contains("limits.waiters_per_lock_max"));
        let s = format!("{MINIMAL}\n[raft]\nheartbeat_ms = 400\n");
        assert!(err_of(&s).contains("raft.election_timeout_ms_min"));
        assert!(err_of(&MINIMAL.replace("[tls]", "[tlsx]")).contains("tls"));
    }

    /// The batching settings at their edges: 1 and 64 in flight are
    /// accepted, 0 and 65 are not; at least one command per batch.
    #[test]
    fn batching_settings_are_bounded() {
        let raft = |body: &str| format!("{MINIMAL}\n[raft]\n{body}\n");
        for ok in [
            "max_inflight_batches = 1",
            "max_inflight_batches = 64",
            "max_batch_commands = 1",
            "batch_linger_us = 0",
            "batch_linger_us = 10000",
        ] {
            ServerConfig::parse(&raft(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        assert!(err_of(&raft("max_inflight_batches = 0")).contains("raft.max_inflight_batches"));
        assert!(err_of(&raft("max_inflight_batches = 65")).contains("raft.max_inflight_batches"));
        assert!(err_of(&raft("max_batch_commands = 0")).contains("raft.max_batch_commands"));
        assert!(err_of(&raft("batch_linger_us = 10001")).contains("raft.batch_linger_us"));
    }

    #[test]
    fn relative_paths_resolve_against_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        std::fs::write(&path, MINIMAL).expect("write");
        let c = ServerConfig::load(&path).expect("loads");
        assert_eq!(c.data_dir, dir.path().join("data"));
        assert_eq!(c.tls.ca, dir.path().join("ca.pem"));
        let missing = ServerConfig::load(&dir.path().join("nope.toml"));
        assert!(matches!(missing, Err(ConfigError::Read { .. })));
    }
}
