//! Consensus and storage: the lock engine replicated with openraft, on a
//! durable write-ahead log and snapshot files.
//!
//! Owns: everything that knows openraft — the type configuration
//! ([`TypeConfig`]), the log store ([`LogStore`], `<data_dir>/raft-log/`),
//! the state machine and snapshots ([`StateMachineStore`],
//! `<data_dir>/snapshots/`), the peer-network seam ([`Network`],
//! [`PeerTransport`]), and a running node ([`RaftNode`]) with its proposal
//! batching (group commit) and linearizable reads. The rest of the server
//! uses [`RaftNode`], [`NodeOptions`], [`RaftOptions`], [`AppliedBatch`] and
//! the error enums; openraft's own types do not leave this module except
//! through [`RaftNode::raft`].
//!
//! A log entry's application data is a [`Proposal`]: a batch of engine
//! commands, applied in order, answered by a [`ProposalReply`] with one
//! reply per command. Batching is what turns concurrent proposals into one
//! fsync (openraft 0.9 appends and flushes each client write separately).
//!
//! Must never: acknowledge anything before it is durable on a quorum;
//! panic on what it reads from disk or from peers; block the async runtime
//! on disk I/O.

use std::io::Cursor;

use oclocks_core::{Command, Reply};
use serde::{Deserialize, Serialize};

mod codec;
mod error;
mod log_store;
mod member;
mod network;
mod node;
mod options;
mod state_machine;

pub use error::{ProposeError, RaftError, ReadError, StoreError};
pub use log_store::{LogStats, LogStore, LEGACY_LOG_FILE, LOG_DIR};
pub use member::{Member, MemberRole};
pub use network::{Network, NoPeerTransport, NoPeers, PeerClient, PeerTransport, RpcError};
pub use node::{Applied, NodeOptions, PendingReply, RaftNode};
pub use options::RaftOptions;
pub use state_machine::{
    AppliedBatch, SnapshotBuilder, StateMachineStore, SNAPSHOT_DIR, SNAPSHOT_FILE,
};

/// A node's id in the Raft group.
pub type NodeId = u64;

/// The application data of one log entry: engine commands, applied in
/// order as one step of the log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub commands: Vec<Command>,
}

/// The response to one applied entry: one reply per command of its
/// [`Proposal`], in order (empty for blank and membership entries).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposalReply {
    pub replies: Vec<Reply>,
    /// Waiting LOCKs this entry granted (their clients hear of it now).
    pub granted: usize,
}

openraft::declare_raft_types!(
    /// openraft's type configuration of the lock service.
    pub TypeConfig:
        D = Proposal,
        R = ProposalReply,
        NodeId = u64,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The openraft handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id (term, leader, index).
pub type LogId = openraft::LogId<NodeId>;
/// A vote.
pub type Vote = openraft::Vote<NodeId>;
