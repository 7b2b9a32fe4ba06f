//! The replicated state machine: openraft's `RaftStateMachine` and
//! `RaftSnapshotBuilder` around the lock engine, and the snapshot files.
//!
//! Owns: the [`Engine`] (shared as `Arc<Mutex<Engine>>` for linearizable
//! reads and the leader's timer), the last applied log id and membership,
//! and `<data_dir>/snapshots/`. Applying a normal entry applies each of its
//! commands to the engine in order; the replies go back to the proposer as
//! the entry's response and the effects go, per entry, to the
//! [`AppliedBatch`] channel. Blank and membership entries do not touch the
//! engine. The state machine itself is in memory; what makes it durable is
//! the log plus the latest snapshot: on restart it starts from the snapshot
//! and openraft re-applies the log after it.
//!
//! Snapshot files: written to a temporary file, fsynced, renamed over
//! `snapshots/current.snap`, and the directory fsynced — so the file is
//! always a complete snapshot, and only the latest one is kept.
//!
//! Must never: hold the engine's lock across an `.await`; panic on a corrupt
//! snapshot (restoring one is a typed error); write an older snapshot over
//! a newer one.

use std::fs;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use oclocks_core::{Effect, Engine, EngineLimits};
use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StoredMembership,
};
use tokio::sync::mpsc::UnboundedSender;

use super::codec;
use super::error::StoreError;
use super::member::Member;
use super::{Entry, LogId, NodeId, ProposalReply, TypeConfig};

/// Directory of snapshot files inside the data directory.
pub const SNAPSHOT_DIR: &str = "snapshots";
/// The latest snapshot's file name.
pub const SNAPSHOT_FILE: &str = "current.snap";
const SNAPSHOT_TMP: &str = "current.snap.tmp";

/// The effects of one applied log entry, in apply order. Entries without
/// effects are not sent. After a restart, entries after the snapshot are
/// applied (and their effects sent) again: `log_index` lets a consumer tell.
/// A node that installs a snapshot from a leader (a lagging follower)
/// skips the entries it covers, so no effects are sent for them: it sends a
/// batch with `resync` set instead, and whoever delivers effects must then
/// resynchronise from the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedBatch {
    pub log_index: u64,
    pub effects: Vec<Effect>,
    /// A snapshot replaced the state: effects up to `log_index` were skipped.
    pub resync: bool,
}

type Meta = SnapshotMeta<NodeId, Member>;

/// The snapshot directory, shared by the state machine and its snapshot
/// builders (which run in their own tasks).
struct SnapshotDir {
    dir: PathBuf,
    /// Metadata of the snapshot in `current.snap`. Locked for every file
    /// operation, so writers and readers never interleave.
    current: Mutex<Option<Meta>>,
}

impl SnapshotDir {
    fn file(&self) -> PathBuf {
        self.dir.join(SNAPSHOT_FILE)
    }

    /// Store `bytes` (the encoding of `meta`) as the current snapshot unless
    /// a newer one is already there. Blocking.
    fn store(&self, meta: &Meta, bytes: &[u8]) -> Result<(), StoreError> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cur) = current.as_ref() {
            if cur.last_log_id > meta.last_log_id {
                tracing::info!(
                    kept = ?cur.last_log_id, skipped = ?meta.last_log_id,
                    "a newer snapshot is already stored"
                );
                return Ok(());
            }
        }
        let tmp = self.dir.join(SNAPSHOT_TMP);
        let file = self.file();
        {
            let mut f = fs::File::create(&tmp).map_err(|e| StoreError::io("create", &tmp, e))?;
            f.write_all(bytes)
                .map_err(|e| StoreError::io("write", &tmp, e))?;
            f.sync_all().map_err(|e| StoreError::io("fsync", &tmp, e))?;
        }
        fs::rename(&tmp, &file).map_err(|e| StoreError::io("rename into place", &file, e))?;
        sync_dir(&self.dir)?;
        tracing::info!(last_log_id = ?meta.last_log_id, bytes = bytes.len(), "snapshot stored");
        *current = Some(meta.clone());
        Ok(())
    }

    /// Read back the current snapshot. Blocking.
    fn load(&self) -> Result<Option<(Meta, Vec<u8>)>, StoreError> {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.is_none() {
            return Ok(None);
        }
        let file = self.file();
        let bytes = fs::read(&file).map_err(|e| StoreError::io("read", &file, e))?;
        let (meta, _) = codec::decode_snapshot(&bytes)?;
        Ok(Some((meta, bytes)))
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("fsync directory", dir, e))
}

/// Run a blocking closure on tokio's blocking pool.
async fn blocking<T, F>(f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
}

/// A unique snapshot id: last index, term, and the wall clock (to tell
/// apart two snapshots of the same log position).
fn snapshot_id(last: Option<&LogId>) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    match last {
        Some(l) => format!("{}-{}-{nanos}-{seq}", l.index, l.leader_id.term),
        None => format!("none-{nanos}-{seq}"),
    }
}

/// The lock engine as openraft's state machine.
pub struct StateMachineStore {
    engine: Arc<Mutex<Engine>>,
    limits: EngineLimits,
    last_applied: Option<LogId>,
    last_membership: StoredMembership<NodeId, Member>,
    snapshots: Arc<SnapshotDir>,
    effects: UnboundedSender<AppliedBatch>,
}

impl StateMachineStore {
    /// Open the state machine of `data_dir`: from its latest snapshot if
    /// there is one, else an empty table. Blocking.
    ///
    /// A snapshot that does not decode or restore is an error
    /// ([`StoreError::Corrupt`], [`StoreError::Decode`],
    /// [`StoreError::UnsupportedVersion`], [`StoreError::Engine`]).
    pub fn open(
        data_dir: &Path,
        limits: EngineLimits,
        effects: UnboundedSender<AppliedBatch>,
    ) -> Result<StateMachineStore, StoreError> {
        let dir = data_dir.join(SNAPSHOT_DIR);
        fs::create_dir_all(&dir).map_err(|e| StoreError::io("create directory", &dir, e))?;
        let tmp = dir.join(SNAPSHOT_TMP);
        if tmp.exists() {
            // An interrupted write: the previous snapshot is still whole.
            fs::remove_file(&tmp).map_err(|e| StoreError::io("remove", &tmp, e))?;
        }
        let file = dir.join(SNAPSHOT_FILE);
        let (engine, current) = match fs::read(&file) {
            Ok(bytes) => {
                let (meta, engine_bytes) = codec::decode_snapshot(&bytes)?;
                let engine = Engine::restore(limits.clone(), engine_bytes)?;
                tracing::info!(last_log_id = ?meta.last_log_id, "state machine restored from snapshot");
                (engine, Some(meta))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (Engine::new(limits.clone()), None)
            }
            Err(e) => return Err(StoreError::io("read", &file, e)),
        };
        let (last_applied, last_membership) = match &current {
            Some(m) => (m.last_log_id, m.last_membership.clone()),
            None => (None, StoredMembership::default()),
        };
        Ok(StateMachineStore {
            engine: Arc::new(Mutex::new(engine)),
            limits,
            last_applied,
            last_membership,
            snapshots: Arc::new(SnapshotDir {
                dir,
                current: Mutex::new(current),
            }),
            effects,
        })
    }

    /// The engine, for linearizable reads (after `ensure_linearizable`) and
    /// the leader's timer. Never hold its lock across an `.await`.
    pub fn engine(&self) -> Arc<Mutex<Engine>> {
        self.engine.clone()
    }

    /// Whether a snapshot is stored.
    pub fn has_snapshot(&self) -> bool {
        self.snapshots
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// The last applied log id.
    pub fn last_applied(&self) -> Option<LogId> {
        self.last_applied
    }

    /// Restore `received` (snapshot data as sent by a leader) into the
    /// engine and store it as the current snapshot under `meta`. On any
    /// error the state machine and the stored snapshot are left unchanged.
    pub async fn install(&mut self, meta: &Meta, received: Vec<u8>) -> Result<(), StoreError> {
        let (engine, reencoded) = {
            let (file_meta, engine_bytes) = codec::decode_snapshot(&received)?;
            if file_meta.last_log_id != meta.last_log_id
                || file_meta.last_membership != meta.last_membership
            {
                return Err(StoreError::Corrupt {
                    what: "received snapshot".into(),
                    detail: format!(
                        "data is of {:?}, metadata says {:?}",
                        file_meta.last_log_id, meta.last_log_id
                    ),
                });
            }
            let engine = Engine::restore(self.limits.clone(), engine_bytes)?;
            // Store it under the id openraft knows it by.
            let bytes = if file_meta.snapshot_id == meta.snapshot_id {
                None
            } else {
                Some(codec::encode_snapshot(meta, engine_bytes)?)
            };
            (engine, bytes)
        };
        let bytes = reencoded.unwrap_or(received);
        let dir = self.snapshots.clone();
        let m = meta.clone();
        blocking(move || dir.store(&m, &bytes)).await?;
        {
            let mut guard = self.engine.lock().unwrap_or_else(PoisonError::into_inner);
            *guard = engine;
        }
        self.engine.clear_poison();
        self.last_applied = meta.last_log_id;
        self.last_membership = meta.last_membership.clone();
        let _ = self.effects.send(AppliedBatch {
            log_index: meta.last_log_id.map_or(0, |l| l.index),
            effects: Vec::new(),
            resync: true,
        });
        tracing::info!(last_log_id = ?meta.last_log_id, "snapshot installed");
        Ok(())
    }
}

/// The builder of one snapshot: the engine's snapshot bytes and the applied
/// state, copied together on the state machine's task (so they agree);
/// encoding and the durable write happen in the builder's own task.
pub struct SnapshotBuilder {
    last_applied: Option<LogId>,
    last_membership: StoredMembership<NodeId, Member>,
    engine: Result<Vec<u8>, StoreError>,
    snapshots: Arc<SnapshotDir>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let to_err = |e: StoreError| e.into_storage(ErrorSubject::Snapshot(None), ErrorVerb::Write);
        let engine = std::mem::replace(&mut self.engine, Ok(Vec::new())).map_err(to_err)?;
        let meta = Meta {
            last_log_id: self.last_applied,
            last_membership: self.last_membership.clone(),
            snapshot_id: snapshot_id(self.last_applied.as_ref()),
        };
        let bytes = codec::encode_snapshot(&meta, &engine).map_err(to_err)?;
        drop(engine);
        let dir = self.snapshots.clone();
        let m = meta.clone();
        let bytes = blocking(move || dir.store(&m, &bytes).map(|()| bytes))
            .await
            .map_err(to_err)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, Member>), StorageError<NodeId>> {
        Ok((self.last_applied, self.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ProposalReply>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut out = Vec::new();
        for entry in entries {
            let log_id = entry.log_id;
            let reply = match entry.payload {
                EntryPayload::Blank => ProposalReply::default(),
                EntryPayload::Membership(m) => {
                    self.last_membership = StoredMembership::new(Some(log_id), m);
                    ProposalReply::default()
                }
                EntryPayload::Normal(p) => {
                    let mut replies = Vec::with_capacity(p.commands.len());
                    let mut effects = Vec::new();
                    {
                        let mut engine = self.engine.lock().map_err(|_| {
                            StoreError::Poisoned
                                .into_storage(ErrorSubject::Apply(log_id), ErrorVerb::Write)
                        })?;
                        for cmd in p.commands {
                            let applied = engine.apply(cmd);
                            replies.push(applied.reply);
                            effects.extend(applied.effects);
                        }
                    }
                    let granted = effects
                        .iter()
                        .filter(|e| matches!(e, Effect::Granted { .. }))
                        .count();
                    if !effects.is_empty() {
                        // A closed receiver means nobody delivers effects
                        // (shutting down, or a test): nothing to do.
                        let _ = self.effects.send(AppliedBatch {
                            log_index: log_id.index,
                            effects,
                            resync: false,
                        });
                    }
                    ProposalReply { replies, granted }
                }
            };
            self.last_applied = Some(log_id);
            out.push(reply);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        // Serialise here, on the state machine's task, so the copy is
        // consistent with `last_applied` (no apply can run meanwhile).
        let engine = match self.engine.lock() {
            Ok(e) => Ok(e.snapshot()),
            Err(_) => Err(StoreError::Poisoned),
        };
        SnapshotBuilder {
            last_applied: self.last_applied,
            last_membership: self.last_membership.clone(),
            engine,
            snapshots: self.snapshots.clone(),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = snapshot.into_inner();
        self.install(meta, bytes).await.map_err(|e| {
            tracing::error!("installing snapshot {:?} failed: {e}", meta.last_log_id);
            e.into_storage(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
            )
        })
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let dir = self.snapshots.clone();
        let loaded = blocking(move || dir.load())
            .await
            .map_err(|e| e.into_storage(ErrorSubject::Snapshot(None), ErrorVerb::Read))?;
        Ok(loaded.map(|(meta, bytes)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        }))
    }
}
