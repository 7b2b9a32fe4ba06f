//! The tunables of the consensus layer and their translation into
//! openraft's `Config`.
//!
//! Owns: [`RaftOptions`] and its defaults (the reasons are on each field).
//! Must never: hand openraft a configuration it has not validated.

use openraft::{Config, SnapshotPolicy};

use super::error::RaftError;

/// Consensus settings. Times are in milliseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftOptions {
    /// Name of the Raft group (appears in openraft's logs).
    pub cluster_name: String,
    /// Leader heartbeat interval. Also the time a read-index round waits
    /// for a quorum, so keep it above the peer round trip including TLS.
    /// Default 100 ms.
    pub heartbeat_interval_ms: u64,
    /// Election timeout range. A follower that hears no leader for a random
    /// time in this range campaigns. Default 500–1000 ms: 5–10 heartbeats,
    /// so an fsync or scheduling hiccup on a loaded machine does not depose
    /// a healthy leader, while a dead leader is replaced well within 3 s.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Take a snapshot every this many log entries (`LogsSinceLast`); an
    /// entry is a batch of up to `max_batch_commands` commands. Default
    /// 10,000.
    pub snapshot_every_entries: u64,
    /// Log entries kept after a snapshot covers them, so a briefly lagging
    /// follower catches up from the log instead of a full snapshot. The
    /// rest is purged. Default 1,000.
    pub logs_kept_after_snapshot: u64,
    /// Timeout for sending one snapshot chunk (and installing the last).
    /// Default 5,000 ms.
    pub install_snapshot_timeout_ms: u64,
    /// Snapshot chunk size on the wire. Default 1 MiB.
    pub snapshot_chunk_bytes: u64,
    /// Entries per AppendEntries RPC. Default 64 (each entry is a batch).
    pub max_payload_entries: u64,
    /// Most commands `RaftNode` packs into one log entry (one fsync).
    /// Default 128.
    pub max_batch_commands: usize,
    /// Batches submitted to Raft and not yet applied, at most. With 1, the
    /// next batch collects every command that arrives while the current one
    /// is being made durable — the largest batches, the fewest fsyncs.
    /// Default 1.
    pub max_inflight_batches: usize,
    /// How long a batch may wait for the follow-up requests of the clients
    /// the previous batch just answered (see `run_batcher`), in µs; 0 turns
    /// it off. Default 500.
    pub batch_linger_us: u64,
    /// Proposals queued for batching before `propose` waits. Default 16,384.
    pub proposal_queue_max: usize,
    /// Whether this node may campaign to lead (`false`: a quorum-only
    /// voter). Default true.
    pub elect: bool,
}

impl Default for RaftOptions {
    fn default() -> Self {
        RaftOptions {
            cluster_name: "oclocks".into(),
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            snapshot_every_entries: 10_000,
            logs_kept_after_snapshot: 1_000,
            install_snapshot_timeout_ms: 5_000,
            snapshot_chunk_bytes: 1 << 20,
            max_payload_entries: 64,
            max_batch_commands: 128,
            max_inflight_batches: 1,
            batch_linger_us: 500,
            proposal_queue_max: 16_384,
            elect: true,
        }
    }
}

impl RaftOptions {
    /// openraft's configuration for these options, validated.
    pub fn to_config(&self) -> Result<Config, RaftError> {
        if self.max_batch_commands == 0 {
            return Err(RaftError::Config("max_batch_commands must be > 0".into()));
        }
        if self.max_inflight_batches == 0 {
            return Err(RaftError::Config("max_inflight_batches must be > 0".into()));
        }
        if self.proposal_queue_max == 0 {
            return Err(RaftError::Config("proposal_queue_max must be > 0".into()));
        }
        if self.snapshot_every_entries == 0 {
            return Err(RaftError::Config(
                "snapshot_every_entries must be > 0".into(),
            ));
        }
        let config = Config {
            cluster_name: self.cluster_name.clone(),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            install_snapshot_timeout: self.install_snapshot_timeout_ms,
            max_payload_entries: self.max_payload_entries,
            // A follower further behind than this gets a snapshot. It must
            // exceed the snapshot interval, or a snapshot may not catch it
            // up (openraft's advice).
            replication_lag_threshold: self
                .snapshot_every_entries
                .saturating_add(self.logs_kept_after_snapshot)
                .saturating_mul(2),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every_entries),
            snapshot_max_chunk_size: self.snapshot_chunk_bytes,
            max_in_snapshot_log_to_keep: self.logs_kept_after_snapshot,
            purge_batch_size: 1,
            enable_tick: true,
            enable_heartbeat: true,
            enable_elect: self.elect,
            ..Config::default()
        };
        config
            .validate()
            .map_err(|e| RaftError::Config(e.to_string()))
    }
}
