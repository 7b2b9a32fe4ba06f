//! What the replicated membership records about each server.
//!
//! openraft keeps, next to the voter sets, one node value per member; ours
//! is [`Member`]: where peers and clients reach the server, its site, its
//! role, and the *incarnation* of its data directory. The incarnation is a
//! random number written once when a data directory is created; every peer
//! handshake checks it against the membership, so a server whose directory
//! was wiped (it forgot its vote and its log) can never take back its old
//! voter slot — it has to be removed and added again as a new member.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A member's role in the cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemberRole {
    /// Votes, may lead, serves clients.
    #[default]
    Voter,
    /// Replicates the log and serves clients, does not vote.
    Learner,
    /// Votes, never campaigns to lead, serves no clients.
    QuorumOnly,
}

impl MemberRole {
    /// Whether a member of this role is in the voter set.
    pub fn votes(self) -> bool {
        matches!(self, MemberRole::Voter | MemberRole::QuorumOnly)
    }

    /// Whether clients may use a member of this role.
    pub fn serves_clients(self) -> bool {
        !matches!(self, MemberRole::QuorumOnly)
    }

    /// The name used in config files and output.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberRole::Voter => "voter",
            MemberRole::Learner => "learner",
            MemberRole::QuorumOnly => "quorum-only",
        }
    }

    /// The role named `s` (config spelling).
    pub fn parse(s: &str) -> Option<MemberRole> {
        match s {
            "voter" => Some(MemberRole::Voter),
            "learner" => Some(MemberRole::Learner),
            "quorum-only" => Some(MemberRole::QuorumOnly),
            _ => None,
        }
    }

    pub(crate) fn to_u8(self) -> u8 {
        match self {
            MemberRole::Voter => 0,
            MemberRole::Learner => 1,
            MemberRole::QuorumOnly => 2,
        }
    }

    pub(crate) fn from_u8(v: u8) -> Option<MemberRole> {
        match v {
            0 => Some(MemberRole::Voter),
            1 => Some(MemberRole::Learner),
            2 => Some(MemberRole::QuorumOnly),
            _ => None,
        }
    }
}

impl fmt::Display for MemberRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One member of the cluster, as the replicated membership records it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// Where peers reach it (`host:port`, the TLS port).
    pub addr: String,
    /// Where clients reach it; usually `addr`.
    pub client_addr: String,
    /// Its site label.
    pub site: String,
    /// The incarnation of its data directory.
    pub incarnation: u64,
    /// Its role.
    pub role: MemberRole,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}, site {}, incarnation {:016x})",
            self.addr, self.role, self.site, self.incarnation
        )
    }
}
