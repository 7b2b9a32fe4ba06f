//! Plain HTTP for operators and load balancers, on its own (by default
//! loopback) address: `GET /health` (the process is up), `GET /ready` (200
//! only while this node serves clients; JSON with node, site, config
//! version, leader, term) and `GET /metrics` (Prometheus text format).
//!
//! Deliberately tiny: three GET routes, no keep-alive, a request head of at
//! most `REQUEST_HEAD_BYTES_MAX` read within `REQUEST_TIMEOUT`. A full HTTP
//! stack would be a large dependency for three fixed answers.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::raft::RaftNode;

/// Largest request head read, in bytes.
pub const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;
/// Time a client has to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Counters the rest of the server updates.
#[derive(Default)]
pub struct Metrics {
    pub connections: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub requests: Counter<u64, AtomicU64>,
    pub protocol_errors: Counter<u64, AtomicU64>,
    pub tls_refused: Counter<u64, AtomicU64>,
}

/// What `/ready` and `/metrics` read.
pub struct HttpState {
    pub node: Arc<RaftNode>,
    pub node_id: u64,
    pub site: String,
    pub metrics: Arc<Metrics>,
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

impl HttpState {
    /// Whether this node is a member of a cluster that has a leader it
    /// knows of (a quorum-only member is ready too, though it serves no
    /// clients).
    fn ready(&self) -> bool {
        self.node.current_leader().is_some() && self.node.member(self.node_id).is_some()
    }

    fn ready_json(&self) -> String {
        let m = self.node.raft().metrics().borrow().clone();
        format!(
            "{{\"ready\":{},\"node\":{},\"site\":\"{}\",\"config_version\":0,\"leader\":{},\"term\":{}}}\n",
            self.ready(),
            self.node_id,
            json_escape(&self.site),
            m.current_leader.map_or("null".to_string(), |l| l.to_string()),
            m.current_term
        )
    }

    fn metrics_text(&self) -> String {
        let mut reg = Registry::with_prefix("oclocks");
        let raft = self.node.raft().metrics().borrow().clone();
        let gauge = |v: u64| {
            let g: Gauge<i64, std::sync::atomic::AtomicI64> = Gauge::default();
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
            g
        };
        reg.register("raft_term", "Current Raft term", gauge(raft.current_term));
        reg.register(
            "raft_applied_index",
            "Last applied log index",
            gauge(raft.last_applied.map_or(0, |l| l.index)),
        );
        reg.register(
            "raft_is_leader",
            "1 while this node leads",
            gauge(u64::from(self.node.leader_term().is_some())),
        );
        let (sessions, locks, holders, waiters) = {
            let engine = self.node.engine();
            let e = engine.lock().unwrap_or_else(|p| p.into_inner());
            let (mut l, mut h, mut w) = (0, 0, 0);
            for (_, c) in e.zone_counts() {
                l += c.locks;
                h += c.holders;
                w += c.waiters;
            }
            (e.session_count(), l, h, w)
        };
        reg.register("sessions", "Open sessions", gauge(sessions as u64));
        reg.register(
            "locks",
            "Lock entries (held, queued or delayed)",
            gauge(locks as u64),
        );
        reg.register("holders", "Grants held", gauge(holders as u64));
        reg.register("waiters", "Queued LOCK requests", gauge(waiters as u64));
        reg.register(
            "client_connections",
            "Client connections open",
            self.metrics.connections.clone(),
        );
        reg.register(
            "requests",
            "Client requests received",
            self.metrics.requests.clone(),
        );
        reg.register(
            "protocol_errors",
            "Connections closed for undecodable input",
            self.metrics.protocol_errors.clone(),
        );
        reg.register(
            "tls_refused",
            "TLS handshakes refused",
            self.metrics.tls_refused.clone(),
        );
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &reg).is_err() {
            out.clear();
        }
        out
    }
}

async fn respond(mut tcp: TcpStream, state: &HttpState) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        loop {
            let n = tcp.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if head.len() > REQUEST_HEAD_BYTES_MAX {
                return Ok(false);
            }
        }
    })
    .await;
    let complete = matches!(read, Ok(Ok(true)));
    let line = String::from_utf8_lossy(head.split(|&b| b == b'\r').next().unwrap_or(&[]));
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = if !complete {
        ("400 Bad Request", "text/plain", "bad request\n".to_string())
    } else if method != "GET" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        )
    } else {
        match path {
            "/health" => ("200 OK", "text/plain", "ok\n".to_string()),
            "/ready" if state.ready() => ("200 OK", "application/json", state.ready_json()),
            "/ready" => (
                "503 Service Unavailable",
                "application/json",
                state.ready_json(),
            ),
            "/metrics" => ("200 OK", "text/plain; version=0.0.4", state.metrics_text()),
            _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
        }
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.write_all(resp.as_bytes()).await;
    let _ = tcp.shutdown().await;
}

/// Serve HTTP on `listener` until `stop` changes.
pub async fn serve(
    listener: TcpListener,
    state: Arc<HttpState>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => {
                if let Ok((tcp, _)) = accepted {
                    let state = state.clone();
                    tokio::spawn(async move { respond(tcp, &state).await });
                }
            }
        }
    }
}
