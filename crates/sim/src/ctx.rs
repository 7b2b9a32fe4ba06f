//! What every part of the simulation shares: the clock, the random stream,
//! the network, the mutation under test, the first failure, the trace.

use std::collections::BTreeMap;

use oclocks_core::{ClientId, Kind, Mode, Op, WAIT_FOREVER};

use crate::net::{Addr, Msg, Net};
use crate::rng::Rng;
use crate::Mutation;

pub struct Ctx {
    /// Simulated time in ms: global and exact (no component reads it
    /// directly except through its own clock, and the checks).
    pub now: u64,
    pub rng: Rng,
    pub net: Net,
    pub mutation: Option<Mutation>,
    /// The first broken property; the run stops at the end of the step.
    pub failure: Option<String>,
    /// Event trace, when replaying a seed with tracing on.
    pub trace: Option<Vec<String>>,
    /// Client id → client index.
    pub client_ix: BTreeMap<ClientId, usize>,
}

impl Ctx {
    pub fn fail(&mut self, msg: String) {
        if self.failure.is_none() {
            self.trace(|| format!("FAILURE: {msg}"));
            self.failure = Some(msg);
        }
    }

    pub fn trace(&mut self, f: impl FnOnce() -> String) {
        if let Some(t) = self.trace.as_mut() {
            t.push(format!("{:>8} {}", self.now, f()));
        }
    }

    pub fn mutated(&self, m: Mutation) -> bool {
        self.mutation == Some(m)
    }

    pub fn send(&mut self, from: Addr, to: Addr, msg: Msg) {
        self.net.send(&mut self.rng, self.now, from, to, msg);
    }
}

impl Ctx {
    /// A client id as "c<index>" (or hex when unknown), for traces.
    pub fn who(&self, id: ClientId) -> String {
        match self.client_ix.get(&id) {
            Some(i) => format!("c{i}/{:x}", (id >> 32) as u32),
            None => format!("{id:x}"),
        }
    }

    /// A one-line summary of an operation, for traces.
    pub fn brief(&self, op: &Op) -> String {
        let m = |m: Mode| {
            if m == Mode::Exclusive {
                "excl"
            } else {
                "shared"
            }
        };
        let k = |k: Kind| if k == Kind::Static { "static" } else { "conn" };
        match op {
            Op::OpenSession { caller, timeout_ms } => {
                format!("Open {} timeout {timeout_ms}", self.who(caller.client))
            }
            Op::Keepalive { callers } => format!(
                "Keepalive [{}]",
                callers
                    .iter()
                    .map(|c| self.who(c.client))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            Op::CloseSession { caller } => format!("Close {}", self.who(caller.client)),
            Op::Lock(l) => {
                let wait = if l.wait_ms == WAIT_FOREVER {
                    "forever".to_string()
                } else {
                    l.wait_ms.to_string()
                };
                format!(
                    "Lock {} {}/{} {} {} nonce {} wait {wait} ttl {} delay {}",
                    self.who(l.caller.client),
                    l.zone,
                    l.name,
                    m(l.mode),
                    k(l.kind),
                    l.nonce,
                    l.ttl_ms,
                    l.lock_delay_ms
                )
            }
            Op::Cancel { caller, nonce } => {
                format!("Cancel {} nonce {nonce}", self.who(caller.client))
            }
            Op::Release {
                caller,
                zone,
                name,
                token,
                ..
            } => format!(
                "Release {} {zone}/{name} token {token}",
                self.who(caller.client)
            ),
            Op::Refresh {
                caller,
                zone,
                name,
                token,
                ..
            } => format!(
                "Refresh {} {zone}/{name} token {token}",
                self.who(caller.client)
            ),
            Op::Break {
                zone,
                name,
                expected_token,
            } => format!("Break {zone}/{name} expected {expected_token:?}"),
            Op::Watch { caller, zone, name } => {
                format!("Watch {} {zone}/{name}", self.who(caller.client))
            }
            Op::Unwatch { caller, zone, name } => {
                format!("Unwatch {} {zone}/{name}", self.who(caller.client))
            }
            Op::Tick => "Tick".to_string(),
            Op::Rebase => "Rebase".to_string(),
        }
    }
}
