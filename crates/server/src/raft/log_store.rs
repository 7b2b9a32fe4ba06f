//! The durable Raft log: openraft's `RaftLogStorage` and `RaftLogReader` on
//! redb, in `<data_dir>/raft-log.redb`.
//!
//! Owns: the log entries (table `log`, key = log index as redb's `u64`,
//! which orders numerically), the vote, the committed log id and the last
//! purged log id (table `state`), and the store's format version (table
//! `meta`). Values are versioned encodings (see `codec`).
//!
//! Durability: every `append`, `save_vote`, `truncate` and `purge` is one
//! redb write transaction committed with `Durability::Immediate` (fsync)
//! before openraft is told it is done. One `append` call is one transaction,
//! whatever the number of entries: the group commit of concurrent proposals
//! comes from `RaftNode`'s batching them into one entry (openraft 0.9 calls
//! `append` once per client write and waits for each flush), and a
//! follower's `append` of a replicated batch of entries is one fsync too.
//! `save_committed` alone is not fsynced: the committed index is a hint
//! (it lets a restart re-apply committed entries at once) that the next
//! fsynced transaction makes durable; losing it only delays re-applying
//! until the next commit.
//!
//! The tail: the last [`TAIL_ENTRIES`] entries written are also kept in
//! memory, so the leader's replication reads the entries it just appended
//! without a read transaction, a trip to the blocking pool and a decode.
//! The tail is always a contiguous run of the log (appends extend it,
//! truncate and purge cut it like the table); a read it does not cover
//! entirely goes to redb.
//!
//! Must never: acknowledge (call the `LogFlushed` callback) before the
//! commit returned; block the async runtime on disk I/O (all redb work runs
//! on tokio's blocking pool); panic on what it reads.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, LogState, OptionalSend, RaftLogReader, StorageError};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::codec::{self, STORE_FORMAT_VERSION};
use super::error::StoreError;
use super::{Entry, LogId, NodeId, TypeConfig, Vote};

/// File name of the log database inside the data directory.
pub const LOG_FILE: &str = "raft-log.redb";

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");

const KEY_FORMAT: &str = "format_version";
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";

/// redb's page cache for the log file (its default is 1 GiB).
pub const LOG_CACHE_BYTES: usize = 32 << 20;

/// Entries kept in memory after they are written (see the module docs).
pub const TAIL_ENTRIES: usize = 512;

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
/// metrics) without keeping the database open.
#[derive(Debug, Default)]
pub struct LogStats {
    /// Write transactions committed with fsync.
    pub durable_commits: AtomicU64,
    /// Entries appended.
    pub entries_appended: AtomicU64,
}

struct Inner {
    db: Database,
    path: PathBuf,
    stats: Arc<LogStats>,
    /// The last entries written (see the module docs).
    tail: Mutex<Tail>,
    /// Dropped after `db` (fields drop in order): once no strong reference
    /// is left, the database file is closed and its lock released.
    alive: Arc<()>,
}

/// The Raft log store. Cheap to clone: clones share one database (a clone is
/// also openraft's log reader).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

impl LogStore {
    /// Open (or create) the log store in `data_dir`. Blocking.
    ///
    /// Fails with [`StoreError::UnsupportedVersion`] if the store was
    /// written by a newer release, and with [`StoreError::Db`] if another
    /// process has it open or it is not a redb file.
    pub fn open(data_dir: &Path) -> Result<LogStore, StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| StoreError::io("create directory", data_dir, e))?;
        let path = data_dir.join(LOG_FILE);
        // redb's page cache defaults to 1 GiB and grows with the file; the
        // log is read back rarely (the tail is in memory, catch-up reads are
        // sequential), so a small cache keeps the resident size down.
        let db = redb::Builder::new()
            .set_cache_size(LOG_CACHE_BYTES)
            .create(&path)?;
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut meta = txn.open_table(META)?;
            let found = meta.get(KEY_FORMAT)?.map(|g| g.value());
            match found {
                Some(v) if v == STORE_FORMAT_VERSION => {}
                None => {
                    meta.insert(KEY_FORMAT, STORE_FORMAT_VERSION)?;
                }
                Some(v) => {
                    return Err(StoreError::UnsupportedVersion {
                        what: format!("raft log store {}", path.display()),
                        found: v,
                        supported: STORE_FORMAT_VERSION,
                    })
                }
            }
            txn.open_table(LOG)?;
            txn.open_table(STATE)?;
        }
        txn.commit()?;
        tracing::debug!(path = %path.display(), "raft log store open");
        Ok(LogStore {
            inner: Arc::new(Inner {
                db,
                path,
                stats: Arc::new(LogStats::default()),
                tail: Mutex::new(Tail::default()),
                alive: Arc::new(()),
            }),
        })
    }

    /// The path of the database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The store's counters.
    pub fn stats(&self) -> Arc<LogStats> {
        self.inner.stats.clone()
    }

    /// A handle that stops upgrading once every clone of this store is gone
    /// and the database file is closed.
    pub fn closed_token(&self) -> Weak<()> {
        Arc::downgrade(&self.inner.alive)
    }

    /// Run `f` on the blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Whether nothing was ever stored: no vote, no entry, nothing purged.
    pub async fn is_pristine(&self) -> Result<bool, StoreError> {
        self.blocking(|inner| {
            let txn = inner.db.begin_read()?;
            let state = txn.open_table(STATE)?;
            let log = txn.open_table(LOG)?;
            Ok(state.get(KEY_VOTE)?.is_none()
                && state.get(KEY_PURGED)?.is_none()
                && log.first()?.is_none())
        })
        .await
    }

    /// The stored vote.
    pub async fn load_vote(&self) -> Result<Option<Vote>, StoreError> {
        self.blocking(|inner| {
            let txn = inner.db.begin_read()?;
            let state = txn.open_table(STATE)?;
            let vote = state.get(KEY_VOTE)?;
            vote.map(|v| codec::decode_vote(v.value())).transpose()
        })
        .await
    }

    /// The stored committed log id (a hint; see the module docs).
    pub async fn load_committed(&self) -> Result<Option<LogId>, StoreError> {
        self.blocking(|inner| {
            let txn = inner.db.begin_read()?;
            let state = txn.open_table(STATE)?;
            let c = state.get(KEY_COMMITTED)?;
            c.map(|v| codec::decode_log_id("committed log id", v.value()))
                .transpose()
        })
        .await
    }

    /// `(last purged log id, last log id)`; the last log id is the last
    /// purged one when the log is empty.
    pub async fn load_log_state(&self) -> Result<(Option<LogId>, Option<LogId>), StoreError> {
        self.blocking(|inner| {
            let txn = inner.db.begin_read()?;
            let state = txn.open_table(STATE)?;
            let log = txn.open_table(LOG)?;
            let purged = state
                .get(KEY_PURGED)?
                .map(|v| codec::decode_log_id("last purged log id", v.value()))
                .transpose()?;
            let last = match log.last()? {
                Some((k, v)) => Some(codec::decode_entry_log_id(k.value(), v.value())?),
                None => purged,
            };
            Ok((purged, last))
        })
        .await
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.inner
            .tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The entries with an index in `range`, in order.
    pub async fn load_entries(
        &self,
        range: (Bound<u64>, Bound<u64>),
    ) -> Result<Vec<Entry>, StoreError> {
        if let Some(entries) = self.tail().get(range) {
            return Ok(entries);
        }
        self.blocking(move |inner| {
            let txn = inner.db.begin_read()?;
            let log = txn.open_table(LOG)?;
            let mut out = Vec::new();
            for item in log.range::<u64>(range)? {
                let (k, v) = item?;
                out.push(codec::decode_entry(k.value(), v.value())?);
            }
            Ok(out)
        })
        .await
    }

    /// Write entries in one fsynced transaction.
    pub async fn store_entries(&self, entries: Vec<Entry>) -> Result<(), StoreError> {
        let mut encoded = Vec::with_capacity(entries.len());
        for e in &entries {
            encoded.push((e.log_id.index, codec::encode_entry(e)?));
        }
        self.blocking(move |inner| {
            let mut txn = inner.db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            {
                let mut log = txn.open_table(LOG)?;
                for (index, bytes) in &encoded {
                    log.insert(*index, bytes.as_slice())?;
                }
            }
            txn.commit()?;
            inner.stats.durable_commits.fetch_add(1, Ordering::Relaxed);
            inner
                .stats
                .entries_appended
                .fetch_add(encoded.len() as u64, Ordering::Relaxed);
            Ok(())
        })
        .await?;
        self.tail().extend(&entries);
        Ok(())
    }

    /// One write transaction on the `log` and `state` tables.
    async fn write<F>(&self, durability: Durability, f: F) -> Result<(), StoreError>
    where
        F: FnOnce(
                &mut redb::Table<u64, &[u8]>,
                &mut redb::Table<&str, &[u8]>,
            ) -> Result<(), StoreError>
            + Send
            + 'static,
    {
        self.blocking(move |inner| {
            let mut txn = inner.db.begin_write()?;
            txn.set_durability(durability)?;
            {
                let mut log = txn.open_table(LOG)?;
                let mut state = txn.open_table(STATE)?;
                f(&mut log, &mut state)?;
            }
            txn.commit()?;
            if matches!(durability, Durability::Immediate) {
                inner.stats.durable_commits.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
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
        self.write(Durability::Immediate, move |_, state| {
            state.insert(KEY_VOTE, bytes.as_slice())?;
            Ok(())
        })
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
        let to_err = |e: StoreError| e.into_storage(ErrorSubject::Store, ErrorVerb::Write);
        let bytes = committed
            .map(|c| codec::encode_log_id("committed log id", &c))
            .transpose()
            .map_err(to_err)?;
        // Not fsynced on its own: see the module docs.
        self.write(Durability::None, move |_, state| {
            match bytes {
                Some(b) => state.insert(KEY_COMMITTED, b.as_slice())?,
                None => state.remove(KEY_COMMITTED)?,
            };
            Ok(())
        })
        .await
        .map_err(to_err)
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
        if let Err(e) = self.store_entries(entries).await {
            tracing::error!("raft log append failed: {e}");
            callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
            return Err(e.into_storage(ErrorSubject::Logs, ErrorVerb::Write));
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError<NodeId>> {
        tracing::debug!(since = log_id.index, "raft log truncate");
        // Cut the tail first: no read may see an entry being removed.
        self.tail().truncate(log_id.index);
        self.write(Durability::Immediate, move |log, _| {
            log.retain_in::<u64, _>(log_id.index.., |_, _| false)?;
            Ok(())
        })
        .await
        .map_err(|e| e.into_storage(ErrorSubject::Logs, ErrorVerb::Delete))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError<NodeId>> {
        tracing::debug!(upto = log_id.index, "raft log purge");
        let to_err = |e: StoreError| e.into_storage(ErrorSubject::Logs, ErrorVerb::Delete);
        let bytes = codec::encode_log_id("last purged log id", &log_id).map_err(to_err)?;
        self.tail().purge(log_id.index);
        self.write(Durability::Immediate, move |log, state| {
            state.insert(KEY_PURGED, bytes.as_slice())?;
            log.retain_in::<u64, _>(..=log_id.index, |_, _| false)?;
            Ok(())
        })
        .await
        .map_err(to_err)
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
