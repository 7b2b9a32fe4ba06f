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
//! Must never: acknowledge (call the `LogFlushed` callback) before the
//! commit returned; block the async runtime on disk I/O (all redb work runs
//! on tokio's blocking pool); panic on what it reads.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

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
        let db = Database::create(&path)?;
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

    /// The entries with an index in `range`, in order.
    pub async fn load_entries(
        &self,
        range: (Bound<u64>, Bound<u64>),
    ) -> Result<Vec<Entry>, StoreError> {
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
        drop(entries);
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
        .await
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
        self.write(Durability::Immediate, move |log, state| {
            state.insert(KEY_PURGED, bytes.as_slice())?;
            log.retain_in::<u64, _>(..=log_id.index, |_, _| false)?;
            Ok(())
        })
        .await
        .map_err(to_err)
    }
}
