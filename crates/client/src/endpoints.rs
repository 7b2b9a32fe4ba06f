//! The servers a client knows, what it measured about them, and the two
//! decisions made from that: **which endpoint to dial first** and **whether
//! to move to a faster server**. Pure code: the connection task feeds it
//! HELLO_OKs, UNAVAILABLE refusals, probe results ([`crate::probe`]) and
//! connection losses; the rules below are unit-tested here.
//!
//! # Dial order ([`Endpoints::round_order`])
//!
//! 1. Servers with a measured round-trip time that are not known to refuse
//!    clients, fastest first (ties: configured order).
//! 2. Unmeasured ones (never probed, probe failed, or demoted after a
//!    connection loss or a failed switch), in configured order then learned
//!    order, starting from the last server that completed HELLO — so without
//!    measurements (probing off) the client sticks to the server that works.
//! 3. Servers whose last probe said they serve no clients (a quorum-only
//!    server, a learner still catching up): tried last, they may have
//!    changed since.
//!
//! # Switch rule ([`switch_candidate`])
//!
//! The client moves from its primary to the fastest other server only when
//! the primary's RTT is measured and the gain is clear on both scales:
//! `best < SWITCH_RATIO_PERCENT % × current` **and** `current − best >
//! SWITCH_MIN_GAIN`. The ratio keeps two servers at similar distance from
//! flapping on noise; the absolute floor keeps a client on a LAN from
//! moving for a 0.3 ms vs 0.1 ms difference. A candidate that is the
//! primary's own node under another address, or that said it serves no
//! clients, is never chosen. A primary whose probe failed is not switched
//! away from on that ground alone: the connection itself is the better
//! witness, and losing it fails over anyway.

use std::time::Duration;

use oclocks_proto::ServerInfo;

use crate::error::Error;

/// Switch only if the best server's RTT is below this percentage of the
/// primary's (strictly).
pub(crate) const SWITCH_RATIO_PERCENT: u32 = 50;
/// ... and only if it is faster by more than this (strictly).
pub(crate) const SWITCH_MIN_GAIN: Duration = Duration::from_millis(2);

/// One server the client knows, as [`Client::servers`](crate::Client::servers)
/// reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStatus {
    /// Where the client reaches it (`host:port`), as configured or learned.
    pub address: String,
    /// Its node id, once a HELLO_OK, a server list or a probe named it.
    pub node_id: Option<u64>,
    /// Its site, once known.
    pub site: Option<String>,
    /// The median round-trip time of the last probe round (STATUS requests
    /// on a separate connection); `None`: not measured yet, the last probe
    /// failed, or the connection to it was lost since.
    pub rtt: Option<Duration>,
    /// Whether it serves clients, as its last probe or a server list said
    /// (`None`: unknown).
    pub serving: Option<bool>,
    /// Why the last probe (or a switch to it) failed, if it did.
    pub probe_error: Option<String>,
    /// Whether this is the server the client is connected to now.
    pub primary: bool,
}

/// What one probe found (see [`crate::probe`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProbeSample {
    /// The median round-trip time of the probe's STATUS requests.
    pub rtt: Duration,
    /// The server's node id (STATUS_OK).
    pub node_id: u64,
    /// Its site.
    pub site: String,
    /// Whether it serves clients (its role and its own server-list entry).
    pub serving: bool,
}

/// What the client knows about one endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Known {
    pub address: String,
    pub node_id: Option<u64>,
    pub site: Option<String>,
    pub rtt: Option<Duration>,
    pub serving: Option<bool>,
    pub probe_error: Option<String>,
}

impl Known {
    fn new(address: String) -> Known {
        Known {
            address,
            node_id: None,
            site: None,
            rtt: None,
            serving: None,
            probe_error: None,
        }
    }

    fn refuses_clients(&self) -> bool {
        self.serving == Some(false)
    }

    /// A measured server that may serve clients.
    fn ranked(&self) -> Option<Duration> {
        self.rtt.filter(|_| !self.refuses_clients())
    }
}

/// The endpoints to dial, in preference order (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct Endpoints {
    list: Vec<Known>,
    /// Index of the last endpoint that completed HELLO.
    preferred: usize,
    learn: bool,
}

impl Endpoints {
    pub fn new(configured: Vec<String>, learn: bool) -> Endpoints {
        let mut list: Vec<Known> = Vec::new();
        for e in configured {
            if !list.iter().any(|k| k.address == e) {
                list.push(Known::new(e));
            }
        }
        Endpoints {
            list,
            preferred: 0,
            learn,
        }
    }

    /// Whether servers listed by HELLO_OK or UNAVAILABLE are added.
    pub fn learns(&self) -> bool {
        self.learn
    }

    /// Every known address, configured first (what the prober measures).
    pub fn addresses(&self) -> Vec<String> {
        self.list.iter().map(|k| k.address.clone()).collect()
    }

    /// The order for the next dial round.
    pub fn round_order(&self) -> Vec<String> {
        dial_order(&self.list, self.preferred)
            .into_iter()
            .map(|i| self.list[i].address.clone())
            .collect()
    }

    fn get_mut(&mut self, address: &str) -> Option<&mut Known> {
        self.list.iter_mut().find(|k| k.address == address)
    }

    /// `endpoint` completed HELLO as node `node_id` of `site`: prefer it
    /// among unmeasured endpoints next time.
    pub fn mark_good(&mut self, endpoint: &str, node_id: u64, site: &str) {
        if let Some(i) = self.list.iter().position(|k| k.address == endpoint) {
            self.preferred = i;
            let k = &mut self.list[i];
            k.node_id = Some(node_id);
            k.site = Some(site.to_owned());
            k.serving = Some(true);
        }
    }

    /// Take in the servers of a HELLO_OK or an UNAVAILABLE reply: fill in
    /// what is known of listed addresses, and (if learning) add the serving
    /// ones not known yet. Returns whether an address was added.
    pub fn learn(&mut self, servers: &[ServerInfo]) -> bool {
        let mut added = false;
        for s in servers.iter().filter(|s| !s.address.is_empty()) {
            if let Some(k) = self.get_mut(&s.address) {
                k.node_id = Some(s.node_id);
                k.site = Some(s.site.clone());
                k.serving = Some(s.serving);
            } else if self.learn && s.serving {
                tracing::debug!(address = %s.address, node = s.node_id, "learned endpoint");
                let mut k = Known::new(s.address.clone());
                k.node_id = Some(s.node_id);
                k.site = Some(s.site.clone());
                k.serving = Some(true);
                self.list.push(k);
                added = true;
            }
        }
        added
    }

    /// Take in one probe's outcome.
    pub fn record_probe(&mut self, endpoint: &str, outcome: &Result<ProbeSample, Error>) {
        let Some(k) = self.get_mut(endpoint) else {
            return;
        };
        match outcome {
            Ok(p) => {
                k.rtt = Some(p.rtt);
                k.node_id = Some(p.node_id);
                k.site = Some(p.site.clone());
                k.serving = Some(p.serving);
                k.probe_error = None;
            }
            Err(e) => {
                k.rtt = None;
                k.probe_error = Some(e.to_string());
            }
        }
    }

    /// Forget `endpoint`'s measurement (its connection was lost, or a
    /// switch to it failed): it is dialled after the measured ones until
    /// the next probe round measures it again.
    pub fn demote(&mut self, endpoint: &str, why: Option<String>) {
        if let Some(k) = self.get_mut(endpoint) {
            k.rtt = None;
            if why.is_some() {
                k.probe_error = why;
            }
        }
    }

    /// The server to move to from `current`, if the switch rule says so.
    pub fn switch_target(&self, current: &str) -> Option<String> {
        let i = self.list.iter().position(|k| k.address == current)?;
        switch_candidate(&self.list, i).map(|j| self.list[j].address.clone())
    }

    /// The known servers as reported to the API (`primary` unset).
    pub fn snapshot(&self) -> Vec<ServerStatus> {
        self.list
            .iter()
            .map(|k| ServerStatus {
                address: k.address.clone(),
                node_id: k.node_id,
                site: k.site.clone(),
                rtt: k.rtt,
                serving: k.serving,
                probe_error: k.probe_error.clone(),
                primary: false,
            })
            .collect()
    }
}

/// The servers an error tells the client to go to instead: UNAVAILABLE's
/// list of serving servers (a quorum-only server, or one without a quorum,
/// refuses HELLO this way).
pub(crate) fn redirect_servers(e: &Error) -> &[ServerInfo] {
    match e {
        Error::Unavailable { servers, .. } => servers,
        _ => &[],
    }
}

/// Indices of `list` in dial order (see the module docs). `preferred`: the
/// last endpoint that completed HELLO.
pub(crate) fn dial_order(list: &[Known], preferred: usize) -> Vec<usize> {
    let n = list.len();
    let mut measured: Vec<usize> = (0..n).filter(|&i| list[i].ranked().is_some()).collect();
    // A stable sort keeps configured order among equal times.
    measured.sort_by_key(|&i| list[i].ranked());
    let start = if preferred < n { preferred } else { 0 };
    let unmeasured = (0..n)
        .map(|k| (start + k) % n)
        .filter(|&i| list[i].ranked().is_none() && !list[i].refuses_clients());
    let refusing = (0..n).filter(|&i| list[i].refuses_clients());
    measured
        .into_iter()
        .chain(unmeasured)
        .chain(refusing)
        .collect()
}

/// Whether a server at `best` is enough faster than the primary at
/// `current` to move (both strict: see [`SWITCH_RATIO_PERCENT`],
/// [`SWITCH_MIN_GAIN`]).
pub(crate) fn clearly_faster(best: Duration, current: Duration) -> bool {
    let ratio_ok = best.as_nanos() * 100 < current.as_nanos() * u128::from(SWITCH_RATIO_PERCENT);
    ratio_ok && current.saturating_sub(best) > SWITCH_MIN_GAIN
}

/// The index to move to from the primary at `current`, if any (see the
/// module docs).
pub(crate) fn switch_candidate(list: &[Known], current: usize) -> Option<usize> {
    let primary = list.get(current)?;
    let current_rtt = primary.rtt?;
    let best = (0..list.len())
        .filter(|&i| i != current)
        .filter(|&i| primary.node_id.is_none() || list[i].node_id != primary.node_id)
        .filter_map(|i| list[i].ranked().map(|rtt| (rtt, i)))
        .min()?;
    clearly_faster(best.0, current_rtt).then_some(best.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn us(v: u64) -> Duration {
        Duration::from_micros(v)
    }

    fn known(address: &str, rtt: Option<Duration>) -> Known {
        Known {
            rtt,
            ..Known::new(address.into())
        }
    }

    fn server(node_id: u64, address: &str, serving: bool) -> ServerInfo {
        ServerInfo {
            node_id,
            address: address.into(),
            site: format!("site{node_id}"),
            serving,
            role: None,
            config_version: None,
            lag: None,
        }
    }

    fn sample(rtt: Duration, node_id: u64, serving: bool) -> ProbeSample {
        ProbeSample {
            rtt,
            node_id,
            site: "s".into(),
            serving,
        }
    }

    #[test]
    fn measured_first_by_rtt_then_unmeasured_in_configured_order() {
        let list = vec![
            known("a", None),
            known("b", Some(ms(9))),
            known("c", None),
            known("d", Some(ms(3))),
            known("e", Some(ms(9))),
        ];
        assert_eq!(dial_order(&list, 0), vec![3, 1, 4, 0, 2]);
        // Unmeasured ones start from the last that worked, rotating.
        assert_eq!(dial_order(&list, 2), vec![3, 1, 4, 2, 0]);
        // Out of range (never happens, never panics).
        assert_eq!(dial_order(&list, 99), vec![3, 1, 4, 0, 2]);
        assert!(dial_order(&[], 0).is_empty());
    }

    #[test]
    fn servers_refusing_clients_go_last_even_if_fast() {
        let mut list = vec![
            known("quorum", Some(us(100))),
            known("far", Some(ms(40))),
            known("new", None),
        ];
        list[0].serving = Some(false);
        assert_eq!(dial_order(&list, 0), vec![1, 2, 0]);
        assert_eq!(switch_candidate(&list, 1), None, "never to a quorum-only");
    }

    #[test]
    fn without_measurements_the_old_order_holds() {
        let mut e = Endpoints::new(vec!["a:1".into(), "b:1".into(), "a:1".into()], true);
        assert_eq!(e.round_order(), vec!["a:1", "b:1"]);
        e.mark_good("b:1", 2, "x");
        assert_eq!(e.round_order(), vec!["b:1", "a:1"]);
    }

    #[test]
    fn hysteresis_edges() {
        // Ratio: strictly below half.
        assert!(!clearly_faster(ms(10), ms(20)), "exactly half: stay");
        assert!(clearly_faster(ms(10) - us(1), ms(20)));
        // Absolute gain: strictly more than 2 ms.
        assert!(!clearly_faster(ms(1), ms(3)), "3 ms → 1 ms: gain is 2 ms");
        assert!(clearly_faster(ms(1), ms(3) + us(1)));
        assert!(!clearly_faster(us(100), us(900)), "LAN noise: stay");
        assert!(!clearly_faster(ms(30), ms(40)), "similar distance: stay");
        assert!(clearly_faster(ms(1), ms(40)));
        assert!(clearly_faster(Duration::ZERO, ms(3)));
        assert!(!clearly_faster(ms(5), ms(5)));
        assert!(!clearly_faster(ms(6), ms(5)));
        // Huge values do not overflow.
        assert!(clearly_faster(ms(1), Duration::MAX));
        assert!(!clearly_faster(Duration::MAX, Duration::MAX));
    }

    #[test]
    fn switch_target_picks_the_fastest_other_server() {
        let list = vec![
            known("a", Some(ms(40))),
            known("b", Some(ms(5))),
            known("c", Some(ms(2))),
            known("d", None),
        ];
        assert_eq!(switch_candidate(&list, 0), Some(2));
        assert_eq!(switch_candidate(&list, 2), None, "already the fastest");
        // b → c: 2 < 2.5 but the gain is only 3 ms > 2 ms: yes.
        assert_eq!(switch_candidate(&list, 1), Some(2));
        // An unmeasured primary stays.
        assert_eq!(switch_candidate(&list, 3), None);
        assert_eq!(switch_candidate(&list, 9), None);
        // Nothing else measured: stay.
        let alone = vec![known("a", Some(ms(40))), known("b", None)];
        assert_eq!(switch_candidate(&alone, 0), None);
    }

    #[test]
    fn the_same_node_under_another_address_is_no_gain() {
        let mut list = vec![known("name:1", Some(ms(10))), known("ip:1", Some(ms(1)))];
        list[0].node_id = Some(7);
        list[1].node_id = Some(7);
        assert_eq!(switch_candidate(&list, 0), None);
        list[1].node_id = Some(8);
        assert_eq!(switch_candidate(&list, 0), Some(1));
    }

    #[test]
    fn probes_fill_in_and_demotion_forgets() {
        let mut e = Endpoints::new(vec!["a:1".into(), "b:1".into()], true);
        e.record_probe("a:1", &Ok(sample(ms(30), 1, true)));
        e.record_probe("b:1", &Ok(sample(ms(4), 2, true)));
        e.record_probe("zz:1", &Ok(sample(ms(1), 9, true)));
        assert_eq!(e.round_order(), vec!["b:1", "a:1"]);
        assert_eq!(e.switch_target("a:1").as_deref(), Some("b:1"));
        assert_eq!(e.switch_target("b:1"), None);
        let snap = e.snapshot();
        assert_eq!(snap.len(), 2, "an unknown address is not added by a probe");
        assert_eq!((snap[1].node_id, snap[1].rtt), (Some(2), Some(ms(4))));

        e.demote("b:1", Some("switch failed".into()));
        assert_eq!(e.round_order(), vec!["a:1", "b:1"]);
        assert_eq!(e.switch_target("a:1"), None);
        assert_eq!(
            e.snapshot()[1].probe_error.as_deref(),
            Some("switch failed")
        );

        let err = Error::Connect {
            endpoint: "a:1".into(),
            message: "refused".into(),
        };
        e.record_probe("a:1", &Err(err));
        let snap = e.snapshot();
        assert_eq!(snap[0].rtt, None);
        assert!(snap[0].probe_error.as_deref().unwrap().contains("refused"));
        e.record_probe("a:1", &Ok(sample(ms(3), 1, false)));
        assert_eq!(e.round_order(), vec!["b:1", "a:1"], "not serving: last");
    }

    #[test]
    fn unavailable_refusals_teach_the_serving_servers() {
        let reply = oclocks_proto::ErrorReply {
            code: oclocks_proto::ErrorCode::Unavailable,
            message: "this server only votes".into(),
            holders: vec![],
            leader_id: Some(2),
            servers: vec![
                server(2, "b:1", true),
                server(3, "c:1", false),
                server(4, "", true),
                server(5, "a:1", true),
            ],
        };
        let err = Error::from_reply(reply);
        assert_eq!(redirect_servers(&err).len(), 4);
        let mut e = Endpoints::new(vec!["a:1".into()], true);
        assert!(e.learn(redirect_servers(&err)));
        assert_eq!(
            e.addresses(),
            vec!["a:1", "b:1"],
            "serving, with an address, not known yet"
        );
        assert!(
            !e.learn(redirect_servers(&err)),
            "nothing new the second time"
        );
        let snap = e.snapshot();
        assert_eq!((snap[1].node_id, snap[1].serving), (Some(2), Some(true)));
        assert_eq!(snap[0].node_id, Some(5), "a known address is filled in");

        let mut fixed = Endpoints::new(vec!["a:1".into()], false);
        assert!(!fixed.learn(redirect_servers(&err)));
        assert_eq!(fixed.addresses(), vec!["a:1"], "learning is off");

        let other = Error::NotLeader {
            leader_id: None,
            message: String::new(),
        };
        assert!(redirect_servers(&other).is_empty());
    }
}
