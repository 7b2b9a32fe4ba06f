//! The errors of the consensus layer, as typed values.
//!
//! Owns: [`StoreError`] (what can go wrong reading or writing the log store
//! and snapshot files), [`RaftError`] (starting a node), [`ProposeError`]
//! and [`ReadError`] (a write or a linearizable read that did not happen),
//! and their conversion into openraft's `StorageError` at the trait
//! boundary.
//!
//! Must never: expose openraft's error types outside this module (the rest
//! of the server matches on these enums), or lose the cause of a storage
//! failure (the typed error's text travels inside openraft's `AnyError`).

use std::path::PathBuf;

use openraft::{AnyError, ErrorSubject, ErrorVerb, StorageError, StorageIOError};

use super::NodeId;

/// A failure of the durable stores: I/O, the database, or bytes that do not
/// decode. Corrupt or unknown data is always one of these, never a panic.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The Raft log (the WAL) failed, e.g. its directory is locked by
    /// another process, a record fails its checksum, or a write failed.
    #[error("raft log: cannot {action}: {source}")]
    Wal {
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Data written by a newer release (or garbage in the version byte).
    #[error("{what} has format version {found}; this build reads up to {supported}")]
    UnsupportedVersion {
        what: String,
        found: u64,
        supported: u64,
    },
    #[error("{what} does not decode: {source}")]
    Decode {
        what: String,
        #[source]
        source: postcard::Error,
    },
    #[error("{what} cannot be encoded: {source}")]
    Encode {
        what: String,
        #[source]
        source: postcard::Error,
    },
    #[error("{what} is corrupt: {detail}")]
    Corrupt { what: String, detail: String },
    /// The engine's snapshot inside a snapshot file does not restore.
    #[error("lock table snapshot does not restore: {0}")]
    Engine(#[from] oclocks_core::SnapshotError),
    /// A panic happened while the engine was locked; its state is suspect.
    #[error("the lock engine's mutex is poisoned (a panic during apply)")]
    Poisoned,
    /// A blocking storage task panicked or was cancelled.
    #[error("storage task failed: {0}")]
    Task(String),
}

impl StoreError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        StoreError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// Convert into openraft's storage error (which stops the Raft node).
    pub(crate) fn into_storage(
        self,
        subject: ErrorSubject<NodeId>,
        verb: ErrorVerb,
    ) -> StorageError<NodeId> {
        StorageIOError::new(subject, verb, AnyError::new(&self)).into()
    }
}

/// Why a Raft node could not start.
#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    #[error("raft storage: {0}")]
    Store(#[from] StoreError),
    #[error("invalid raft options: {0}")]
    Config(String),
    #[error("raft failed to start: {0}")]
    Start(String),
    #[error("cannot bootstrap the cluster: {0}")]
    Bootstrap(String),
    #[error("timed out waiting for {0}")]
    Timeout(String),
}

/// Why a proposed command did not produce a reply. Cloneable: one failure
/// of a batch is the failure of each of its commands.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// This node is not the leader (or stopped being it before the command
    /// was committed, and the entry was discarded). The command did **not**
    /// commit; send it to `leader_id` (at `leader_addr`) if known.
    #[error("not the leader (current leader: {leader_id:?})")]
    ForwardToLeader {
        leader_id: Option<NodeId>,
        leader_addr: Option<String>,
    },
    /// Raft is stopped (shut down, or a storage failure stopped it). The
    /// command may or may not have committed.
    #[error("raft is stopped: {0}")]
    Fatal(String),
    /// Anything else; the command may or may not have committed.
    #[error("proposal failed: {0}")]
    Other(String),
}

/// Why a linearizable read could not be served.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// This node is not the leader; read at `leader_id` if known.
    #[error("not the leader (current leader: {leader_id:?})")]
    ForwardToLeader {
        leader_id: Option<NodeId>,
        leader_addr: Option<String>,
    },
    /// The leader could not confirm its leadership with a quorum in time.
    #[error("leadership not confirmed by a quorum: {0}")]
    QuorumNotReached(String),
    /// Raft is stopped.
    #[error("raft is stopped: {0}")]
    Fatal(String),
}
