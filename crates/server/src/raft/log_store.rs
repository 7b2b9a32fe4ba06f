//! The durable Raft log: openraft's `RaftLogStorage` and `RaftLogReader` on
//! a write-ahead log (the `raft-log` crate, by openraft's author), in
//! `<data_dir>/raft-log/`.
//!
//! Why a WAL and not a B-tree: every commit of the Raft log is on the
//! critical path of every acknowledgement (leader fsync, then follower
//! fsync). A copy-on-write B-tree (redb, used until 2026-11) rewrites a
//! root-to-leaf path, the table tree, the free-page tree and the header on
//! each commit: 11–12 scattered 4 KiB pages per fsync, 0.46 ms (leader) and
//! 0.67 ms (follower) per commit here under load. An append-only WAL writes
//! one contiguous record per commit (docs/performance.md has the figures).
//!
//! Owns: the log entries, the vote, the committed log id and the last
//! purged log id (all records of the WAL: raft-log replays them on open),
//! and the store's format version (the WAL's user data). Entry and vote
//! payloads are our versioned encodings (see `codec`); raft-log adds a
//! CRC-32 per record and refuses a store with a gap or a bad checksum in the
//! middle (a torn last record — a write the crash cut — is dropped: it was
//! never acknowledged).
//!
//! Durability: every `append`, `save_vote`, `truncate` and `purge` is
//! written and `fdatasync`ed by raft-log's flush thread before openraft is
//! told it is done (the `LogFlushed` callback, or the awaited answer). One
//! `append` call is one flush whatever the number of entries; the flush
//! thread takes the flushes queued meanwhile into the same fsync. The group
//! commit of concurrent proposals comes from `RaftNode`'s batching them into
//! one entry (openraft 0.9 calls `append` once per client write and waits
//! for each flush). `save_committed` alone is not fsynced: the committed
//! index is a hint (it lets a restart re-apply committed entries at once)
//! that the next fsynced write makes durable; losing it only delays
//! re-applying until the next commit.
//!
//! Files: chunks of at most [`CHUNK_MAX_BYTES`] / [`CHUNK_MAX_RECORDS`];
//! a purge deletes the chunks it covers once the purge record is durable.
//! Memory: raft-log keeps the payloads of the open chunk and a bounded cache
//! ([`CACHE_MAX_ENTRIES`], [`CACHE_MAX_BYTES`]) of older ones; the last
//! [`TAIL_ENTRIES`] entries are also kept decoded (the tail below).
//!
//! The tail: the last [`TAIL_ENTRIES`] entries written are also kept in
//! memory, decoded, so the leader's replication reads the entries it just
//! appended without a trip to the blocking pool and a decode. The tail is
//! always a contiguous run of the log (appends extend it, truncate and purge
//! cut it like the log); a read it does not cover entirely goes to the WAL.
//!
//! Must never: acknowledge (call the `LogFlushed` callback) before the
//! fsync returned; block the async runtime on a disk read (reads that miss
//! the tail run on tokio's blocking pool; an append only encodes into the
//! WAL's buffer and queues the flush — except every [`CHUNK_MAX_BYTES`],
//! when it creates the next chunk file); panic on what it reads.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    CommittedLeaderId, ErrorSubject, ErrorVerb, LogState, OptionalSend, RaftLogReader, StorageError,
};
use raft_log::api::raft_log_writer::RaftLogWriter;
use raft_log::RaftLog;
use tokio::sync::oneshot;

use super::codec::{self, STORE_FORMAT_VERSION};
use super::error::StoreError;
use super::{Entry, LogId, NodeId, TypeConfig, Vote};

/// Directory of the log inside the data directory.
pub const LOG_DIR: &str = "raft-log";

/// The file of the redb log of development builds before 2026-11-24; a
/// data directory holding it is refused with a clear message.
pub const LEGACY_LOG_FILE: &str = "raft-log.redb";

/// A chunk file is closed and the next one started at this size.
pub const CHUNK_MAX_BYTES: usize = 32 << 20;

/// ... or at this many records.
pub const CHUNK_MAX_RECORDS: usize = 65_536;

/// Payloads of closed chunks kept in raft-log's cache (entries).
pub const CACHE_MAX_ENTRIES: usize = 4_096;

/// ... and (bytes).
pub const CACHE_MAX_BYTES: usize = 16 << 20;

/// Entries kept in memory after they are written (see the module docs).
pub const TAIL_ENTRIES: usize = 512;

/// The WAL's types: log ids as `((term, node id), index)` (the order of
/// openraft's `LogId`), payloads and votes as our versioned encodings.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct WalTypes;

type WalLogId = ((u64, u64), u64);

impl raft_log::Types for WalTypes {
    type LogId = WalLogId;
    type LogPayload = Vec<u8>;
    type Vote = Vec<u8>;
    type Callback = Flushed;
    type UserData = u64;

    fn log_index(log_id: &WalLogId) -> u64 {
        log_id.1
    }

    fn payload_size(payload: &Vec<u8>) -> u64 {
        payload.len() as u64
    }
}

fn to_wal(id: &LogId) -> WalLogId {
    ((id.leader_id.term, id.leader_id.node_id), id.index)
}

fn from_wal(id: &WalLogId) -> LogId {
    LogId::new(CommittedLeaderId::new(id.0 .0, id.0 .1), id.1)
}

/// Who hears that a flush reached the disk (called on raft-log's flush
/// thread).
pub(crate) enum Flushed {
    /// An append: openraft's callback.
    Raft(LogFlushed<TypeConfig>, Arc<LogStats>, u64),
    /// A write awaited by the async caller.
    Wait(oneshot::Sender<io::Result<()>>, Arc<LogStats>),
    /// A write awaited by a blocking caller (opening the store).
    Sync(std::sync::mpsc::SyncSender<io::Result<()>>),
}

impl raft_log::Callback for Flushed {
    fn send(self, res: io::Result<()>) {
        match self {
            Flushed::Raft(cb, stats, entries) => {
                if res.is_ok() {
                    stats.durable_commits.fetch_add(1, Ordering::Relaxed);
                    stats.entries_appended.fetch_add(entries, Ordering::Relaxed);
                }
                let mut held = lock_held(&stats);
                match held.as_mut() {
                    Some(parked) => parked.push((cb, res)),
                    None => {
                        drop(held);
                        cb.log_io_completed(res);
                    }
                }
            }
            Flushed::Wait(tx, stats) => {
                if res.is_ok() {
                    stats.durable_commits.fetch_add(1, Ordering::Relaxed);
                }
                let _ = tx.send(res);
            }
            Flushed::Sync(tx) => {
                tx.send(res);
            }
        }
    }
}

impl std::fmt::Debug for Flushed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Flushed::Raft(..) => "Flushed::Raft",
            Flushed::Wait(..) => "Flushed::Wait",
            Flushed::Sync(..) => "Flushed::Sync",
        })
    }
}

/// The last entries written, contiguous: `entries[i]` has index `first + i`.
#[derive(Default)]
struct Tail {
    first: u64,
    entries: VecDeque<Entry>,
}

impl Tail {
    /// One past the last index held.
    fn end(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    /// Entries just written, in index order.
    fn extend(&mut self, written: &[Entry]) {
        for e in written {
            let index = e.log_id.index;
            if self.entries.is_empty() || index < self.first || index > self.end() {
                // A gap or a rewrite below the tail: start over here.
                self.entries.clear();
                self.first = index;
            } else if index < self.end() {
                self.truncate(index);
            }
            self.entries.push_back(e.clone());
        }
        while self.entries.len() > TAIL_ENTRIES {
            self.entries.pop_front();
            self.first += 1;
        }
    }

    /// Forget indexes `since..`.
    fn truncate(&mut self, since: u64) {
        if since <= self.first {
            self.entries.clear();
        } else if since < self.end() {
            self.entries.truncate((since - self.first) as usize);
        }
    }

    /// Forget indexes `..=upto`.
    fn purge(&mut self, upto: u64) {
        while !self.entries.is_empty() && self.first <= upto {
            self.entries.pop_front();
            self.first += 1;
        }
    }

    /// The entries of `range` if the tail holds all of them.
    fn get(&self, range: (Bound<u64>, Bound<u64>)) -> Option<Vec<Entry>> {
        let start = match range.0 {
            Bound::Included(s) => s,
            Bound::Excluded(s) => s.checked_add(1)?,
            Bound::Unbounded => return None,
        };
        let end = match range.1 {
            Bound::Included(e) => e.checked_add(1)?,
            Bound::Excluded(e) => e,
            Bound::Unbounded => self.end(),
        };
        if self.entries.is_empty() || start < self.first || end > self.end() || start > end {
            return None;
        }
        let from = (start - self.first) as usize;
        let to = (end - self.first) as usize;
        Some(self.entries.range(from..to).cloned().collect())
    }
}

/// Counters of the log store, shared with whoever wants them (tests,
/// metrics) without keeping the store open.
#[derive(Default)]
pub struct LogStats {
    /// Writes made durable with fsync (appends, votes, truncations,
    /// purges), counted as each one's flush completes; the flush thread may
    /// cover several of them with one fsync.
    pub durable_commits: AtomicU64,
    /// Entries appended.
    pub entries_appended: AtomicU64,
    /// Test hook: while `Some`, the reports to openraft that an append is
    /// on disk are parked here instead of delivered (a disk that is slow to
    /// say so). See [`LogStats::hold_append_reports_for_tests`].
    held: Mutex<Option<Vec<HeldReport>>>,
}

impl std::fmt::Debug for LogStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStats")
            .field("durable_commits", &self.durable_commits)
            .field("entries_appended", &self.entries_appended)
            .finish_non_exhaustive()
    }
}

/// A flush report parked by the test hook.
type HeldReport = (LogFlushed<TypeConfig>, io::Result<()>);

fn lock_held(stats: &LogStats) -> MutexGuard<'_, Option<Vec<HeldReport>>> {
    stats.held.lock().unwrap_or_else(|p| p.into_inner())
}

impl LogStats {
    /// Test hook: from now on, park the reports that appends reached the
    /// disk (the data is still written and fsynced) until
    /// [`LogStats::release_append_reports_for_tests`].
    #[doc(hidden)]
    pub fn hold_append_reports_for_tests(&self) {
        let mut held = lock_held(self);
        if held.is_none() {
            *held = Some(Vec::new());
        }
    }

    /// Test hook: deliver the parked reports, in order, and stop parking.
    /// Delivered under the lock, so that a flush completing meanwhile
    /// reports after them.
    #[doc(hidden)]
    pub fn release_append_reports_for_tests(&self) {
        let mut held = lock_held(self);
        for (cb, res) in held.take().unwrap_or_default() {
            cb.log_io_completed(res);
        }
    }
}

struct Inner {
    /// Dropped first (fields drop in order): raft-log's drop flushes, joins
    /// its flush thread and releases the directory lock.
    wal: Mutex<RaftLog<WalTypes>>,
    path: PathBuf,
    stats: Arc<LogStats>,
    /// The last entries written (see the module docs).
    tail: Mutex<Tail>,
    /// Dropped after `wal`: once no strong reference is left, the log is
    /// closed and its lock released.
    alive: Arc<()>,
}

/// The Raft log store. Cheap to clone: clones share one WAL (a clone is
/// also openraft's log reader).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

fn wal_err(action: &'static str) -> impl FnOnce(io::Error) -> StoreError {
    move |source| StoreError::Wal { action, source }
}

impl LogStore {
    /// Open (or create) the log store in `data_dir`. Blocking.
    ///
    /// Fails with [`StoreError::UnsupportedVersion`] if the store was
    /// written by a newer release, with [`StoreError::Wal`] if another
    /// process has it open or a record in it is damaged, and with
    /// [`StoreError::Corrupt`] if the directory holds the redb log of an
    /// earlier development build.
    pub fn open(data_dir: &Path) -> Result<LogStore, StoreError> {
        let legacy = data_dir.join(LEGACY_LOG_FILE);
        if legacy.exists() {
            return Err(StoreError::Corrupt {
                what: format!("data directory {}", data_dir.display()),
                detail: format!(
                    "it holds {LEGACY_LOG_FILE}, the Raft log format of development builds \
                     before 2026-11-24, which this build does not read; remove the node \
                     from the cluster, empty its data directory and join it again (it \
                     catches up from the leader)"
                ),
            });
        }
        let path = data_dir.join(LOG_DIR);
        std::fs::create_dir_all(&path).map_err(|e| StoreError::io("create directory", &path, e))?;
        let dir = path
            .to_str()
            .ok_or_else(|| StoreError::Corrupt {
                what: format!("log directory {}", path.display()),
                detail: "the path is not UTF-8".into(),
            })?
            .to_string();
        let mut config = raft_log::Config::new(dir);
        config.wal.chunk_max_size = Some(CHUNK_MAX_BYTES);
        config.wal.chunk_max_records = Some(CHUNK_MAX_RECORDS);
        // The flush thread would otherwise wait up to 1 ms for more writes
        // before each fsync: added latency on every commit. Batching is
        // ours (see the module docs); what queued meanwhile still shares
        // the fsync.
        config.wal.flush_batch_wait = Some(Duration::ZERO);
        config.log_cache_max_items = Some(CACHE_MAX_ENTRIES);
        config.log_cache_capacity = Some(CACHE_MAX_BYTES);
        let mut wal = RaftLog::<WalTypes>::open(Arc::new(config)).map_err(wal_err("open"))?;
        let state = wal.log_state();
        match state.user_data {
            Some(v) if v == STORE_FORMAT_VERSION => {}
            Some(v) => {
                return Err(StoreError::UnsupportedVersion {
                    what: format!("raft log store {}", path.display()),
                    found: v,
                    supported: STORE_FORMAT_VERSION,
                })
            }
            None => {
                if state.vote().is_some() || state.last().is_some() || state.purged().is_some() {
                    return Err(StoreError::Corrupt {
                        what: format!("raft log store {}", path.display()),
                        detail: "it holds data but no format version".into(),
                    });
                }
                wal.save_user_data(Some(STORE_FORMAT_VERSION))
                    .map_err(wal_err("write the format version"))?;
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                wal.flush(true, Some(Flushed::Sync(tx)))
                    .map_err(wal_err("flush"))?;
                rx.recv()
                    .map_err(|_| StoreError::Task("the log's flush thread stopped".into()))?
                    .map_err(wal_err("flush"))?;
            }
        }
        tracing::debug!(path = %path.display(), "raft log store open");
        Ok(LogStore {
            inner: Arc::new(Inner {
                wal: Mutex::new(wal),
                path,
                stats: Arc::new(LogStats::default()),
                tail: Mutex::new(Tail::default()),
                alive: Arc::new(()),
            }),
        })
    }

    /// The path of the log directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The store's counters.
    pub fn stats(&self) -> Arc<LogStats> {
        self.inner.stats.clone()
    }

    /// A handle that stops upgrading once every clone of this store is gone
    /// and the log is closed.
    pub fn closed_token(&self) -> Weak<()> {
        Arc::downgrade(&self.inner.alive)
    }

    fn wal(&self) -> MutexGuard<'_, RaftLog<WalTypes>> {
        self.inner
            .wal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn tail(&self) -> MutexGuard<'_, Tail> {
        self.inner
            .tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Queue a write with `f`, flush it with fsync and wait for the flush.
    async fn write_durable<F>(&self, action: &'static str, f: F) -> Result<(), StoreError>
    where
        F: FnOnce(&mut RaftLog<WalTypes>) -> io::Result<()>,
    {
        let (tx, rx) = oneshot::channel();
        {
            let mut wal = self.wal();
            f(&mut wal).map_err(wal_err(action))?;
            wal.flush(true, Some(Flushed::Wait(tx, self.inner.stats.clone())))
                .map_err(wal_err(action))?;
        }
        rx.await
            .map_err(|_| StoreError::Task("the log's flush thread stopped".into()))?
            .map_err(wal_err(action))
    }

    /// Whether nothing was ever stored: no vote, no entry, nothing purged.
    pub async fn is_pristine(&self) -> Result<bool, StoreError> {
        let wal = self.wal();
        let s = wal.log_state();
        Ok(s.vote().is_none() && s.last().is_none() && s.purged().is_none())
    }

    /// The stored vote.
    pub async fn load_vote(&self) -> Result<Option<Vote>, StoreError> {
        let bytes = self.wal().log_state().vote().cloned();
        bytes.map(|v| codec::decode_vote(&v)).transpose()
    }

    /// The stored committed log id (a hint; see the module docs).
    pub async fn load_committed(&self) -> Result<Option<LogId>, StoreError> {
        Ok(self.wal().log_state().committed().map(from_wal))
    }

    /// `(last purged log id, last log id)`; the last log id is the last
    /// purged one when the log is empty.
    pub async fn load_log_state(&self) -> Result<(Option<LogId>, Option<LogId>), StoreError> {
        let wal = self.wal();
        let s = wal.log_state();
        let purged = s.purged().map(from_wal);
        let last = s.last().map(from_wal).or(purged);
        Ok((purged, last))
    }

    /// The entries with an index in `range`, in order.
    pub async fn load_entries(
        &self,
        range: (Bound<u64>, Bound<u64>),
    ) -> Result<Vec<Entry>, StoreError> {
        if let Some(entries) = self.tail().get(range) {
            return Ok(entries);
        }
        let from = match range.0 {
            Bound::Included(s) => s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let to = match range.1 {
            Bound::Included(e) => e.saturating_add(1),
            Bound::Excluded(e) => e,
            Bound::Unbounded => u64::MAX,
        };
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let wal = inner.wal.lock().unwrap_or_else(PoisonError::into_inner);
            let mut out = Vec::new();
            for item in wal.read(from, to) {
                let (id, payload) = item.map_err(wal_err("read"))?;
                let entry = codec::decode_entry(id.1, &payload)?;
                if to_wal(&entry.log_id) != id {
                    return Err(StoreError::Corrupt {
                        what: format!("raft log entry {}", id.1),
                        detail: format!("stored under log id {:?}, holds {}", id, entry.log_id),
                    });
                }
                out.push(entry);
            }
            Ok(out)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Queue `entries` in the WAL and a flush with fsync; `done` hears when
    /// they are durable. Does not wait.
    fn queue_entries(&self, entries: &[Entry], done: Flushed) -> Result<(), StoreError> {
        let mut wal = self.wal();
        // Entries at or below the purge point are already covered by a
        // snapshot: storing them would be undone by the purge at once, so
        // they are dropped here (raft-log refuses them). openraft does not
        // send such entries in a running cluster; its storage test suite
        // does (a state machine ahead of an empty log).
        let keep_from = wal.log_state().purged().map_or(0, |p| p.1 + 1);
        let kept: &[Entry] = match entries.iter().position(|e| e.log_id.index >= keep_from) {
            Some(i) => &entries[i..],
            None => &[],
        };
        let mut encoded = Vec::with_capacity(kept.len());
        for e in kept {
            encoded.push((to_wal(&e.log_id), codec::encode_entry(e)?));
        }
        wal.append(encoded).map_err(wal_err("append"))?;
        wal.flush(true, Some(done)).map_err(wal_err("flush"))?;
        drop(wal);
        self.tail().extend(kept);
        Ok(())
    }

    /// Write entries and wait until they are durable.
    pub async fn store_entries(&self, entries: Vec<Entry>) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.queue_entries(&entries, Flushed::Wait(tx, self.inner.stats.clone()))?;
        self.inner
            .stats
            .entries_appended
            .fetch_add(entries.len() as u64, Ordering::Relaxed);
        rx.await
            .map_err(|_| StoreError::Task("the log's flush thread stopped".into()))?
            .map_err(wal_err("flush"))
    }

    /// For tests of damaged stores: append one record holding `payload`
    /// under `log_id` (bytes that pass the WAL's checksum but maybe not our
    /// decoding) and record it as committed, durably.
    #[doc(hidden)]
    pub async fn append_raw_for_tests(
        &self,
        log_id: LogId,
        payload: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.write_durable("append", move |wal| {
            wal.append([(to_wal(&log_id), payload)])?;
            wal.commit(to_wal(&log_id))?;
            Ok(())
        })
        .await
    }

    /// For tests of damaged stores: an entry's stored bytes.
    #[doc(hidden)]
    pub fn encode_entry_for_tests(entry: &Entry) -> Result<Vec<u8>, StoreError> {
        codec::encode_entry(entry)
    }

    /// For tests of stores from newer releases: record `version` as the
    /// store's format version, durably.
    #[doc(hidden)]
    pub async fn set_format_version_for_tests(&self, version: u64) -> Result<(), StoreError> {
        self.write_durable("write the format version", move |wal| {
            wal.save_user_data(Some(version)).map(|_| ())
        })
        .await
    }
}

fn owned_bounds<RB: RangeBounds<u64>>(range: &RB) -> (Bound<u64>, Bound<u64>) {
    (range.start_bound().cloned(), range.end_bound().cloned())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<NodeId>> {
        self.load_entries(owned_bounds(&range))
            .await
            .map_err(|e| e.into_storage(ErrorSubject::Logs, ErrorVerb::Read))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let (last_purged_log_id, last_log_id) = self
            .load_log_state()
            .await
            .map_err(|e| e.into_storage(ErrorSubject::Logs, ErrorVerb::Read))?;
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError<NodeId>> {
        let to_err = |e: StoreError| e.into_storage(ErrorSubject::Vote, ErrorVerb::Write);
        let bytes = codec::encode_vote(vote).map_err(to_err)?;
        self.write_durable("save the vote", move |wal| wal.save_vote(bytes).map(|_| ()))
            .await
            .map_err(to_err)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError<NodeId>> {
        self.load_vote()
            .await
            .map_err(|e| e.into_storage(ErrorSubject::Vote, ErrorVerb::Read))
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId>,
    ) -> Result<(), StorageError<NodeId>> {
        // Not fsynced on its own (see the module docs): written with the
        // next flush. openraft never moves the committed id back, and
        // raft-log keeps the last one recorded, so `None` records nothing.
        let Some(c) = committed else {
            return Ok(());
        };
        let mut wal = self.wal();
        wal.commit(to_wal(&c))
            .and_then(|_| wal.flush(false, None))
            .map_err(wal_err("save the committed log id"))
            .map_err(|e| e.into_storage(ErrorSubject::Store, ErrorVerb::Write))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError<NodeId>> {
        self.load_committed()
            .await
            .map_err(|e| e.into_storage(ErrorSubject::Store, ErrorVerb::Read))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let done = Flushed::Raft(callback, self.inner.stats.clone(), entries.len() as u64);
        // On an error the callback is dropped unanswered: openraft stops on
        // the returned error anyway.
        self.queue_entries(&entries, done).map_err(|e| {
            tracing::error!("raft log append failed: {e}");
            e.into_storage(ErrorSubject::Logs, ErrorVerb::Write)
        })
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError<NodeId>> {
        tracing::debug!(since = log_id.index, "raft log truncate");
        // Cut the tail first: no read may see an entry being removed.
        self.tail().truncate(log_id.index);
        self.write_durable("truncate", move |wal| {
            wal.truncate(log_id.index).map(|_| ())
        })
        .await
        .map_err(|e| e.into_storage(ErrorSubject::Logs, ErrorVerb::Delete))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError<NodeId>> {
        tracing::debug!(upto = log_id.index, "raft log purge");
        self.tail().purge(log_id.index);
        self.write_durable("purge", move |wal| wal.purge(to_wal(&log_id)).map(|_| ()))
            .await
            .map_err(|e| e.into_storage(ErrorSubject::Logs, ErrorVerb::Delete))
    }
}

#[cfg(test)]
mod tail_tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn ids(v: Option<Vec<Entry>>) -> Option<Vec<(u64, u64)>> {
        v.map(|v| {
            v.iter()
                .map(|e| (e.log_id.index, e.log_id.leader_id.term))
                .collect()
        })
    }

    fn r(a: u64, b: u64) -> (Bound<u64>, Bound<u64>) {
        (Bound::Included(a), Bound::Excluded(b))
    }

    #[test]
    fn the_tail_stays_a_contiguous_run_of_the_log() {
        let mut t = Tail::default();
        assert_eq!(ids(t.get(r(1, 2))), None, "empty");
        t.extend(&[entry(5, 1), entry(6, 1), entry(7, 1)]);
        assert_eq!(ids(t.get(r(5, 8))), Some(vec![(5, 1), (6, 1), (7, 1)]));
        assert_eq!(ids(t.get(r(4, 6))), None, "starts before the tail");
        assert_eq!(ids(t.get(r(6, 9))), None, "ends after it");
        assert_eq!(
            ids(t.get((Bound::Included(6), Bound::Unbounded))),
            Some(vec![(6, 1), (7, 1)])
        );
        // A rewrite from 6 on (a new leader's entries).
        t.extend(&[entry(6, 2)]);
        assert_eq!(ids(t.get(r(5, 7))), Some(vec![(5, 1), (6, 2)]));
        assert_eq!(ids(t.get(r(5, 8))), None, "7 was cut with the rewrite");
        t.truncate(6);
        assert_eq!(ids(t.get(r(5, 6))), Some(vec![(5, 1)]));
        t.extend(&[entry(6, 3), entry(7, 3)]);
        t.purge(6);
        assert_eq!(ids(t.get(r(6, 8))), None);
        assert_eq!(ids(t.get(r(7, 8))), Some(vec![(7, 3)]));
        // A gap (a snapshot installed meanwhile) starts over.
        t.extend(&[entry(100, 4)]);
        assert_eq!(ids(t.get(r(7, 8))), None);
        assert_eq!(ids(t.get(r(100, 101))), Some(vec![(100, 4)]));
        t.truncate(0);
        assert_eq!(ids(t.get(r(100, 101))), None);
    }

    #[test]
    fn the_tail_is_bounded() {
        let mut t = Tail::default();
        let many: Vec<Entry> = (1..=(TAIL_ENTRIES as u64 + 10))
            .map(|i| entry(i, 1))
            .collect();
        t.extend(&many);
        assert_eq!(t.entries.len(), TAIL_ENTRIES);
        assert_eq!(t.first, 11);
        assert_eq!(ids(t.get(r(10, 12))), None);
        assert!(t.get(r(11, TAIL_ENTRIES as u64 + 11)).is_some());
    }
}
