//! Measuring the servers: the prober, a background task beside the
//! connection task, that times a few STATUS round trips to every known
//! server so the client can use the fastest one
//! ([`crate::endpoints`] decides what to do with the numbers).
//!
//! - **One probe** ([`probe`]): open a separate connection to the server
//!   (TCP + TLS through the same [`Connector`](crate::conn::Connector),
//!   client ALPN, so the same certificate checks apply), send
//!   [`PROBE_SAMPLES`] STATUS requests one after the other and take the
//!   median of their round-trip times. STATUS is allowed before HELLO, so
//!   a probe creates no session and touches no lock state; the connection
//!   setup is not timed (it costs several round trips and CPU, not what
//!   requests will see). The whole probe is bounded by `connect_timeout`.
//!   STATUS_OK also says whether the server serves clients (a quorum-only
//!   server does not).
//! - **Rounds** ([`Prober::run`]): the known servers one at a time — at most
//!   one probe connection open per client, so probing is cheap for the
//!   client and invisible to the main connection, which never waits for
//!   it. A round runs at once when the client connects, then every
//!   `probe_interval`; also [`ROUND_GAP_MIN`] after new servers are
//!   learned (not waiting for the next scheduled round), and on demand
//!   ([`Client::probe_servers`](crate::Client::probe_servers)).
//! - **No kept connections.** Each probe connection is closed when its
//!   probe ends. Keeping one idle connection per server would count against
//!   every server's connection limits for each client and need keepalives
//!   of its own; a TLS handshake per server every 30 s costs less.
//!
//! Each round ends with a [`ProbeReport`] to the connection task, which
//! records the times, publishes them, and — for scheduled rounds — applies
//! the switch rule. The prober ends with the connection task.

use std::sync::Arc;
use std::time::Duration;

use oclocks_proto::{Request, RequestBody, ResponseBody, ResponseCodec, Role, StatusOk};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;

use crate::conn::{body_name, exchange, Dial};
use crate::endpoints::ProbeSample;
use crate::error::Error;

/// STATUS round trips per probe; the probe reports their median.
pub(crate) const PROBE_SAMPLES: usize = 3;
/// Least time between the end of a round and the start of one triggered by
/// newly learned servers.
pub(crate) const ROUND_GAP_MIN: Duration = Duration::from_secs(1);

/// The outcome of one round, for the connection task.
#[derive(Debug)]
pub(crate) struct ProbeReport {
    /// Every server probed, with what was found.
    pub results: Vec<(String, Result<ProbeSample, Error>)>,
    /// A scheduled round (periodic or after learning servers), as opposed to
    /// one asked for: only these may move the client.
    pub scheduled: bool,
    /// Callers of `probe_servers` to answer once the results are recorded.
    pub waiters: Vec<oneshot::Sender<()>>,
}

/// The median of `samples` (the upper one of an even count); `None` if
/// empty.
pub(crate) fn median(mut samples: Vec<Duration>) -> Option<Duration> {
    samples.sort_unstable();
    samples.get(samples.len() / 2).copied()
}

/// Whether a STATUS_OK says its server serves clients.
fn serves_clients(s: &StatusOk) -> bool {
    s.role != Role::QuorumOnly
        && s.servers
            .iter()
            .find(|srv| srv.node_id == s.node_id)
            .is_none_or(|srv| srv.serving)
}

/// Measure one server (see the module docs), within `connect_timeout`.
pub(crate) async fn probe(dial: &Dial, endpoint: &str) -> Result<ProbeSample, Error> {
    let attempt = async {
        let io = dial.connector.connect(endpoint.to_owned()).await?;
        let (rd, mut writer) = tokio::io::split(io);
        let mut reader = FramedRead::new(rd, ResponseCodec::new(dial.limits.clone()));
        let mut rtts = Vec::with_capacity(PROBE_SAMPLES);
        let mut last = None;
        for id in 1..=PROBE_SAMPLES as u64 {
            let request = Request {
                id,
                body: RequestBody::Status,
            };
            let started = Instant::now();
            let reply = exchange(endpoint, &mut reader, &mut writer, &dial.limits, request).await?;
            let rtt = started.elapsed();
            match reply {
                ResponseBody::StatusOk(s) => {
                    rtts.push(rtt);
                    last = Some(s);
                }
                ResponseBody::Error(e) => return Err(Error::from_reply(e)),
                other => {
                    return Err(Error::Protocol {
                        message: format!("{endpoint} answered STATUS with {}", body_name(&other)),
                    })
                }
            }
        }
        // Hang up politely; the server's answer to that does not matter.
        let _ = writer.shutdown().await;
        match (median(rtts), last) {
            (Some(rtt), Some(status)) => Ok(ProbeSample {
                rtt,
                node_id: status.node_id,
                site: status.site.clone(),
                serving: serves_clients(&status),
            }),
            _ => Err(Error::Protocol {
                message: format!("{endpoint}: no STATUS sample"),
            }),
        }
    };
    match tokio::time::timeout(dial.connect_timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(Error::Connect {
            endpoint: endpoint.to_owned(),
            message: format!("probe not answered within {:?}", dial.connect_timeout),
        }),
    }
}

/// The prober task (see the module docs).
pub(crate) struct Prober {
    pub dial: Arc<Dial>,
    /// The servers to measure, kept current by the connection task.
    pub targets: watch::Receiver<Vec<String>>,
    /// `probe_servers` calls.
    pub asks: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
    /// To the connection task.
    pub reports: mpsc::UnboundedSender<ProbeReport>,
    /// `None`: no scheduled rounds (probing on demand only).
    pub interval: Option<Duration>,
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Prober {
    /// Run rounds until the connection task is gone.
    pub async fn run(mut self) {
        let mut next_scheduled = self.interval.map(|_| Instant::now());
        let mut asks_open = true;
        loop {
            let mut waiters = Vec::new();
            let scheduled = tokio::select! {
                _ = sleep_until_opt(next_scheduled) => true,
                ask = self.asks.recv(), if asks_open => match ask {
                    Some(tx) => {
                        waiters.push(tx);
                        false
                    }
                    None => {
                        // Every Client handle is gone; the connection task
                        // still runs (finishing its queues): keep measuring
                        // on schedule until it ends.
                        asks_open = false;
                        continue;
                    }
                },
                changed = self.targets.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if self.interval.is_some() {
                        // New servers: measure them soon, not only at the
                        // next scheduled round.
                        let soon = Instant::now() + ROUND_GAP_MIN;
                        next_scheduled = Some(next_scheduled.map_or(soon, |n| n.min(soon)));
                    }
                    continue;
                },
                _ = self.reports.closed() => return,
            };
            while let Ok(tx) = self.asks.try_recv() {
                waiters.push(tx);
            }
            let targets = self.targets.borrow_and_update().clone();
            let mut results = Vec::with_capacity(targets.len());
            for endpoint in targets {
                let outcome = probe(&self.dial, &endpoint).await;
                match &outcome {
                    Ok(s) => {
                        tracing::debug!(%endpoint, rtt = ?s.rtt, node = s.node_id, serving = s.serving, "probed")
                    }
                    Err(e) => tracing::debug!(%endpoint, error = %e, "probe failed"),
                }
                results.push((endpoint, outcome));
            }
            let report = ProbeReport {
                results,
                scheduled,
                waiters,
            };
            if self.reports.send(report).is_err() {
                return;
            }
            if scheduled {
                next_scheduled = self.interval.map(|i| Instant::now() + i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oclocks_proto::ServerInfo;

    #[test]
    fn median_of_samples() {
        let ms = Duration::from_millis;
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![ms(5)]), Some(ms(5)));
        assert_eq!(median(vec![ms(9), ms(1), ms(4)]), Some(ms(4)));
        assert_eq!(
            median(vec![ms(1), ms(500), ms(2)]),
            Some(ms(2)),
            "an outlier does not count"
        );
        assert_eq!(median(vec![ms(3), ms(1)]), Some(ms(3)));
    }

    #[test]
    fn status_says_whether_the_server_serves_clients() {
        let entry = |node_id, serving| ServerInfo {
            node_id,
            address: format!("n{node_id}:1"),
            site: "s".into(),
            serving,
            role: None,
            config_version: None,
            lag: None,
        };
        let mut s = StatusOk {
            node_id: 2,
            site: "s".into(),
            role: Role::Follower,
            term: 1,
            leader_id: Some(1),
            config_version: 1,
            applied_index: 10,
            servers: vec![entry(1, true), entry(2, true)],
        };
        assert!(serves_clients(&s));
        s.servers[1].serving = false;
        assert!(!serves_clients(&s));
        s.servers.clear();
        assert!(serves_clients(&s), "not listed: assume it does");
        s.role = Role::QuorumOnly;
        assert!(!serves_clients(&s));
    }
}
