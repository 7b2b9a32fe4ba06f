//! Conformance and durability tests of the consensus layer
//! (`oclocks_server::raft`): openraft's own storage test suite against our
//! log store and state machine, restart durability with and without
//! snapshots, typed errors on corrupt data, effects delivery, and group
//! commit (with a printed throughput measurement).
//!
//! These tests use real files (temporary directories) and real fsyncs; they
//! must never depend on timing beyond generous timeouts.

use std::io::Cursor;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use oclocks_core::{
    Caller, Command, Effect, EngineLimits, Kind, LockRequest, Mode, Op, Reply, Token,
};
use oclocks_server::raft::{
    AppliedBatch, LogStore, Member, NodeOptions, ProposeError, RaftError, RaftNode, RaftOptions,
    StateMachineStore, StoreError, TypeConfig, LEGACY_LOG_FILE, LOG_DIR, SNAPSHOT_DIR,
    SNAPSHOT_FILE,
};
use openraft::storage::RaftStateMachine;
use openraft::testing::{StoreBuilder, Suite};
use openraft::{ErrorSubject, ErrorVerb, StorageError};
use tempfile::TempDir;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

// ----------------------------------------------------------------------
// openraft's storage suite
// ----------------------------------------------------------------------

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<u64>> {
        let err = |e: StoreError| {
            StorageError::from_io_error(
                ErrorSubject::Store,
                ErrorVerb::Write,
                std::io::Error::other(e.to_string()),
            )
        };
        let dir = tempfile::tempdir()
            .map_err(|e| StorageError::from_io_error(ErrorSubject::Store, ErrorVerb::Write, e))?;
        let log = LogStore::open(dir.path()).map_err(err)?;
        // Nobody reads the effects here: sends to a closed channel are ignored.
        let (tx, _) = mpsc::unbounded_channel();
        let sm = StateMachineStore::open(dir.path(), EngineLimits::default(), tx).map_err(err)?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    if let Err(e) = Suite::test_all(Builder) {
        panic!("openraft storage suite: {e}");
    }
}

// ----------------------------------------------------------------------
// Helpers
// ----------------------------------------------------------------------

fn options(dir: &Path, bootstrap: bool, raft: RaftOptions) -> NodeOptions {
    NodeOptions {
        node_id: 1,
        data_dir: dir.to_path_buf(),
        limits: EngineLimits::default(),
        options: raft,
        bootstrap,
        member: Member {
            addr: "127.0.0.1:7000".into(),
            client_addr: "127.0.0.1:7000".into(),
            ..Member::default()
        },
    }
}

/// Fast elections so tests do not wait long for a single node to lead.
fn fast() -> RaftOptions {
    RaftOptions {
        heartbeat_interval_ms: 50,
        election_timeout_min_ms: 150,
        election_timeout_max_ms: 300,
        ..RaftOptions::default()
    }
}

async fn start_leader(
    dir: &Path,
    bootstrap: bool,
    raft: RaftOptions,
) -> (RaftNode, mpsc::UnboundedReceiver<AppliedBatch>) {
    let (node, feed) = RaftNode::start(options(dir, bootstrap, raft))
        .await
        .expect("node starts");
    let leader = node.wait_for_leader(WAIT).await.expect("a leader");
    assert_eq!(leader, 1);
    // The leader's own blank entry of the new term must be applied before
    // `leader_term` is reliable for stamping.
    node.raft()
        .wait(Some(WAIT))
        .metrics(|m| m.state.is_leader(), "leader")
        .await
        .expect("leading");
    (node, feed)
}

fn caller(client: u128) -> Caller {
    Caller {
        client,
        identity: format!("client-{client}"),
    }
}

fn cmd(node: &RaftNode, op: Op) -> Command {
    // Any monotonic clock will do for these tests.
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let now_ms = START.get_or_init(Instant::now).elapsed().as_millis() as u64;
    Command {
        term: node.current_term(),
        now_ms,
        op,
    }
}

fn open_session(node: &RaftNode, client: u128) -> Command {
    cmd(
        node,
        Op::OpenSession {
            caller: caller(client),
            timeout_ms: 600_000,
        },
    )
}

fn lock(node: &RaftNode, client: u128, name: &str, nonce: u64, wait_ms: u64) -> Command {
    cmd(
        node,
        Op::Lock(LockRequest {
            caller: caller(client),
            zone: "default".into(),
            name: name.into(),
            mode: Mode::Exclusive,
            kind: Kind::Connection,
            ttl_ms: 0,
            wait_ms,
            lock_delay_ms: 0,
            owner: nonce,
            nonce,
            low_water: 0,
            key: None,
        }),
    )
}

async fn granted(node: &RaftNode, c: Command) -> Token {
    match node.propose(c).await {
        Ok(Reply::Granted { token }) => token,
        other => panic!("expected a grant, got {other:?}"),
    }
}

async fn holder_token(node: &RaftNode, name: &str) -> Option<Token> {
    let name = name.to_string();
    node.linearizable_read(move |e| {
        e.query("default", &name)
            .and_then(|l| l.holders.first().map(|h| h.token))
    })
    .await
    .expect("linearizable read")
}

/// CRC-32 (IEEE), to forge snapshot files whose checksum is right.
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn with_crc(mut content: Vec<u8>) -> Vec<u8> {
    let crc = crc32(&content);
    content.extend_from_slice(&crc.to_le_bytes());
    content
}

// ----------------------------------------------------------------------
// Durability across restarts
// ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_survive_restart_without_bootstrap() {
    let dir = tempfile::tempdir().unwrap();
    let (node, _feed) = start_leader(dir.path(), true, fast()).await;
    match node.propose(open_session(&node, 7)).await {
        Ok(Reply::Session { resumed: false, .. }) => {}
        other => panic!("unexpected {other:?}"),
    }
    let t1 = granted(&node, lock(&node, 7, "alpha", 1, 0)).await;
    assert_eq!(holder_token(&node, "alpha").await, Some(t1));
    node.shutdown().await;
    drop(node);

    // No bootstrap: the data directory carries the cluster.
    let (node, _feed) = start_leader(dir.path(), false, fast()).await;
    assert_eq!(holder_token(&node, "alpha").await, Some(t1), "lock kept");
    let t2 = granted(&node, lock(&node, 7, "beta", 2, 0)).await;
    assert_eq!(t2, t1 + 1, "tokens continue after restart");
    // A retry of the first LOCK is answered from the recorded outcome.
    assert_eq!(granted(&node, lock(&node, 7, "alpha", 1, 0)).await, t1);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_directory_without_bootstrap_does_not_elect() {
    let dir = tempfile::tempdir().unwrap();
    let (node, _feed) = RaftNode::start(options(dir.path(), false, fast()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(node.current_leader(), None);
    match node.propose(open_session(&node, 1)).await {
        Err(ProposeError::ForwardToLeader {
            leader_id: None, ..
        }) => {}
        other => panic!("expected ForwardToLeader, got {other:?}"),
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_purge_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let opts = RaftOptions {
        logs_kept_after_snapshot: 0,
        ..fast()
    };
    let (node, _feed) = start_leader(dir.path(), true, opts.clone()).await;
    node.propose(open_session(&node, 9)).await.unwrap();
    let mut tokens = Vec::new();
    for i in 0..10u64 {
        tokens.push(granted(&node, lock(&node, 9, &format!("s{i}"), i + 1, 0)).await);
    }

    let applied = node.raft().metrics().borrow().last_applied.unwrap();
    node.raft().trigger().snapshot().await.unwrap();
    let m = node
        .raft()
        .wait(Some(WAIT))
        .metrics(
            |m| m.snapshot.map(|s| s.index) >= Some(applied.index) && m.purged.is_some(),
            "snapshot taken and log purged",
        )
        .await
        .expect("snapshot and purge");
    assert_eq!(
        m.purged, m.snapshot,
        "everything the snapshot covers is purged"
    );
    assert!(dir.path().join(SNAPSHOT_DIR).join(SNAPSHOT_FILE).exists());

    // More commands after the snapshot: they live only in the log.
    for i in 10..15u64 {
        tokens.push(granted(&node, lock(&node, 9, &format!("s{i}"), i + 1, 0)).await);
    }
    node.shutdown().await;
    drop(node);

    // Only the entries after the snapshot remain in the log.
    {
        let log = LogStore::open(dir.path()).unwrap();
        let (purged, last) = log.load_log_state().await.unwrap();
        let purged = purged.expect("purged");
        assert!(purged.index >= applied.index);
        let rest = log
            .load_entries((std::ops::Bound::Unbounded, std::ops::Bound::Unbounded))
            .await
            .unwrap();
        assert_eq!(rest.first().map(|e| e.log_id.index), Some(purged.index + 1));
        assert_eq!(rest.last().map(|e| e.log_id), last);
    }

    let (node, _feed) = start_leader(dir.path(), false, opts).await;
    for (i, t) in tokens.iter().enumerate() {
        assert_eq!(
            holder_token(&node, &format!("s{i}")).await,
            Some(*t),
            "lock s{i}"
        );
    }
    let next = granted(&node, lock(&node, 9, "after", 100, 0)).await;
    assert_eq!(next, tokens.last().unwrap() + 1);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_snapshots_by_policy() {
    let dir = tempfile::tempdir().unwrap();
    let opts = RaftOptions {
        snapshot_every_entries: 5,
        logs_kept_after_snapshot: 2,
        ..fast()
    };
    let (node, _feed) = start_leader(dir.path(), true, opts.clone()).await;
    node.propose(open_session(&node, 3)).await.unwrap();
    for i in 0..12u64 {
        granted(&node, lock(&node, 3, &format!("p{i}"), i + 1, 0)).await;
    }
    let m = node
        .raft()
        .wait(Some(WAIT))
        .metrics(
            |m| m.snapshot.is_some() && m.purged.is_some(),
            "policy snapshot",
        )
        .await
        .expect("a snapshot by policy");
    let (snap, purged) = (m.snapshot.unwrap().index, m.purged.unwrap().index);
    assert!(
        purged + 2 <= snap,
        "keeps {} logs: purged {purged}, snapshot {snap}",
        2
    );
    node.shutdown().await;
    drop(node);
    let (node, _feed) = start_leader(dir.path(), false, opts).await;
    for i in 0..12u64 {
        assert!(holder_token(&node, &format!("p{i}")).await.is_some());
    }
    node.shutdown().await;
}

// ----------------------------------------------------------------------
// Effects
// ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effects_reach_the_feed() {
    let dir = tempfile::tempdir().unwrap();
    let (node, mut feed) = start_leader(dir.path(), true, fast()).await;
    node.propose(open_session(&node, 1)).await.unwrap();
    node.propose(open_session(&node, 2)).await.unwrap();
    let t1 = granted(&node, lock(&node, 1, "x", 1, 0)).await;
    match node.propose(lock(&node, 2, "x", 1, 60_000)).await {
        Ok(Reply::Queued { position: 0 }) => {}
        other => panic!("expected queued, got {other:?}"),
    }
    let release = cmd(
        &node,
        Op::Release {
            caller: caller(1),
            zone: "default".into(),
            name: "x".into(),
            token: t1,
            key: None,
        },
    );
    match node.propose(release).await {
        Ok(Reply::Released {
            already_released: false,
        }) => {}
        other => panic!("unexpected {other:?}"),
    }
    let batch = tokio::time::timeout(WAIT, feed.recv())
        .await
        .expect("an effect in time")
        .expect("feed open");
    assert!(batch.log_index > 0);
    assert!(
        batch.effects.iter().any(|e| matches!(
            e,
            Effect::Granted { client: 2, nonce: 1, token, .. } if *token == t1 + 1
        )),
        "grant to the waiter: {:?}",
        batch.effects
    );
    node.shutdown().await;
}

// ----------------------------------------------------------------------
// Corrupt data
// ----------------------------------------------------------------------

/// A data directory with a snapshot and a few entries after it.
async fn populated_dir() -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    let opts = RaftOptions {
        logs_kept_after_snapshot: 0,
        ..fast()
    };
    let (node, _feed) = start_leader(dir.path(), true, opts).await;
    node.propose(open_session(&node, 5)).await.unwrap();
    for i in 0..3u64 {
        granted(&node, lock(&node, 5, &format!("c{i}"), i + 1, 0)).await;
    }
    node.raft().trigger().snapshot().await.unwrap();
    node.raft()
        .wait(Some(WAIT))
        .metrics(|m| m.snapshot.is_some(), "snapshot")
        .await
        .unwrap();
    for i in 3..5u64 {
        granted(&node, lock(&node, 5, &format!("c{i}"), i + 1, 0)).await;
    }
    node.shutdown().await;
    dir
}

fn open_sm(dir: &Path) -> Result<StateMachineStore, StoreError> {
    let (tx, _) = mpsc::unbounded_channel();
    StateMachineStore::open(dir, EngineLimits::default(), tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_snapshot_is_a_typed_error() {
    let dir = populated_dir().await;
    let file = dir.path().join(SNAPSHOT_DIR).join(SNAPSHOT_FILE);
    let good = std::fs::read(&file).unwrap();
    assert!(open_sm(dir.path()).is_ok());

    // A flipped bit: the checksum catches it.
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x10;
    std::fs::write(&file, &bad).unwrap();
    assert!(matches!(
        open_sm(dir.path()),
        Err(StoreError::Corrupt { .. })
    ));
    match RaftNode::start(options(dir.path(), false, fast())).await {
        Err(RaftError::Store(StoreError::Corrupt { .. })) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("started on a corrupt snapshot"),
    }

    // Truncated, empty.
    std::fs::write(&file, &good[..good.len() / 3]).unwrap();
    assert!(open_sm(dir.path()).is_err());
    std::fs::write(&file, b"").unwrap();
    assert!(matches!(
        open_sm(dir.path()),
        Err(StoreError::Corrupt { .. })
    ));

    // A newer format version.
    let mut newer = good[..good.len() - 4].to_vec();
    newer[0] = 200;
    std::fs::write(&file, with_crc(newer)).unwrap();
    assert!(matches!(
        open_sm(dir.path()),
        Err(StoreError::UnsupportedVersion { found: 200, .. })
    ));

    // Garbage with a valid checksum: every single-byte change of the body
    // either still restores or is a typed error — never a panic.
    let body = &good[..good.len() - 4];
    let mut errors = 0;
    for i in 1..body.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut b = body.to_vec();
            b[i] ^= flip;
            std::fs::write(&file, with_crc(b)).unwrap();
            if open_sm(dir.path()).is_err() {
                errors += 1;
            }
        }
    }
    assert!(errors > 0);
    // The engine's part cut short, checksum fixed: a decode error.
    std::fs::write(&file, with_crc(body[..body.len() - 1].to_vec())).unwrap();
    assert!(open_sm(dir.path()).is_err());

    // Installing corrupt snapshot data received from a leader fails too,
    // and leaves the state machine as it was.
    std::fs::write(&file, &good).unwrap();
    let mut sm = open_sm(dir.path()).unwrap();
    let current = sm
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("a snapshot");
    let mut data = current.snapshot.into_inner();
    let before = sm.last_applied();
    data[mid] ^= 0x10;
    let err = sm
        .install_snapshot(&current.meta, Box::new(Cursor::new(data)))
        .await
        .expect_err("corrupt data refused");
    assert!(err.to_string().contains("corrupt"), "{err}");
    assert_eq!(sm.last_applied(), before);
    // The stored snapshot is untouched.
    assert_eq!(std::fs::read(&file).unwrap(), good);
}

/// The last entry of the log in `dir` (the node must be stopped).
async fn last_entry(dir: &Path) -> openraft::LogId<u64> {
    let log = LogStore::open(dir).unwrap();
    let (_, last) = log.load_log_state().await.unwrap();
    last.expect("entries")
}

/// Append a committed entry holding `payload` (bytes that pass the WAL's
/// checksum) after the last one of the log in `dir`; its index.
async fn poke_next(dir: &Path, payload: Vec<u8>) -> u64 {
    let last = last_entry(dir).await;
    let id = openraft::LogId::new(last.leader_id, last.index + 1);
    let log = LogStore::open(dir).unwrap();
    log.append_raw_for_tests(id, payload).await.unwrap();
    id.index
}

fn only(index: u64) -> (std::ops::Bound<u64>, std::ops::Bound<u64>) {
    (
        std::ops::Bound::Included(index),
        std::ops::Bound::Included(index),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_log_value_is_a_typed_error() {
    let dir = populated_dir().await;
    let good = last_entry(dir.path()).await;

    // Garbage after a valid version byte, committed: a restart re-applies
    // it and must fail with a typed error.
    let at = poke_next(dir.path(), vec![1u8, 0xff, 0xff, 0xff]).await;
    {
        let log = LogStore::open(dir.path()).unwrap();
        let err = log.load_entries(only(at)).await.expect_err("decode error");
        assert!(matches!(err, StoreError::Decode { .. }), "{err}");
    }
    match RaftNode::start(options(dir.path(), false, fast())).await {
        Err(RaftError::Start(msg)) => assert!(msg.contains("does not decode"), "{msg}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("started on a corrupt log"),
    }

    // An entry from a newer format.
    let at = poke_next(dir.path(), vec![7u8, 0, 0]).await;
    {
        let log = LogStore::open(dir.path()).unwrap();
        let err = log.load_entries(only(at)).await.expect_err("version error");
        assert!(
            matches!(err, StoreError::UnsupportedVersion { found: 7, .. }),
            "{err}"
        );
    }

    // An entry stored under the wrong log id: the bytes of an earlier one.
    let earlier = {
        let log = LogStore::open(dir.path()).unwrap();
        let e = log.load_entries(only(good.index)).await.unwrap();
        assert_eq!(e.len(), 1);
        LogStore::encode_entry_for_tests(&e[0]).unwrap()
    };
    let at = poke_next(dir.path(), earlier).await;
    {
        let log = LogStore::open(dir.path()).unwrap();
        let err = log
            .load_entries(only(at))
            .await
            .expect_err("index mismatch");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    }

    // Empty value.
    let at = poke_next(dir.path(), vec![]).await;
    {
        let log = LogStore::open(dir.path()).unwrap();
        assert!(matches!(
            log.load_entries(only(at)).await,
            Err(StoreError::Corrupt { .. })
        ));
    }
}

/// A flipped byte inside the WAL (not its last record) fails the record's
/// checksum: opening the store is a typed error, never a panic or a
/// silently shorter log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_log_file_is_a_typed_error() {
    let dir = populated_dir().await;
    let log_dir = dir.path().join(LOG_DIR);
    let mut chunks: Vec<_> = std::fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && std::fs::metadata(p).unwrap().len() > 256)
        .collect();
    chunks.sort();
    let chunk = chunks.first().expect("a chunk file with records");
    let mut bytes = std::fs::read(chunk).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x5a;
    std::fs::write(chunk, &bytes).unwrap();
    match LogStore::open(dir.path()) {
        Err(StoreError::Wal { action, .. }) => assert_eq!(action, "open"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("opened a damaged log"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_log_store_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = LogStore::open(dir.path()).unwrap();
        log.set_format_version_for_tests(99).await.unwrap();
    }
    assert!(matches!(
        LogStore::open(dir.path()),
        Err(StoreError::UnsupportedVersion { found: 99, .. })
    ));
}

#[test]
fn legacy_redb_log_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(LEGACY_LOG_FILE), b"redb").unwrap();
    match LogStore::open(dir.path()) {
        Err(StoreError::Corrupt { detail, .. }) => {
            assert!(detail.contains("join it again"), "{detail}")
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("opened a legacy data directory"),
    }
}

#[test]
fn data_dir_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _open = LogStore::open(dir.path()).unwrap();
    assert!(matches!(
        LogStore::open(dir.path()),
        Err(StoreError::Wal { action: "open", .. })
    ));
}

// ----------------------------------------------------------------------
// Group commit
// ----------------------------------------------------------------------

fn release(node: &RaftNode, client: u128, name: &str, token: Token) -> Command {
    cmd(
        node,
        Op::Release {
            caller: caller(client),
            zone: "default".into(),
            name: name.into(),
            token,
            key: None,
        },
    )
}

/// The batcher's linger: right after a batch answered two clients (a
/// release, and the grant it handed to the waiter), their next requests —
/// the new holder's RELEASE, then 2 ms later the old holder's next LOCK —
/// go out as ONE log entry; with the linger off, as two. (The linger is
/// 20 ms here so that the 2 ms gap holds on a loaded machine.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linger_puts_a_handoffs_follow_ups_in_one_entry() {
    for (linger_us, want_entries) in [(20_000, 1), (0, 2)] {
        let dir = tempfile::tempdir().unwrap();
        let raft = RaftOptions {
            batch_linger_us: linger_us,
            ..fast()
        };
        let (node, _feed) = start_leader(dir.path(), true, raft).await;
        node.propose(open_session(&node, 1)).await.unwrap();
        node.propose(open_session(&node, 2)).await.unwrap();
        let t1 = granted(&node, lock(&node, 1, "h", 1, 0)).await;
        match node.propose(lock(&node, 2, "h", 1, 60_000)).await {
            Ok(Reply::Queued { .. }) => {}
            other => panic!("expected client 2 to queue, got {other:?}"),
        }
        match node.propose(release(&node, 1, "h", t1)).await {
            Ok(Reply::Released { .. }) => {}
            other => panic!("expected a release, got {other:?}"),
        }
        let t2 = holder_token(&node, "h").await.expect("client 2 holds");
        assert!(t2 > t1);

        let stats = node.log_stats();
        let before = stats.entries_appended.load(Ordering::Relaxed);
        let n2 = node.clone();
        let second = tokio::spawn(async move { n2.propose(release(&n2, 2, "h", t2)).await });
        tokio::time::sleep(Duration::from_millis(2)).await;
        let again = node.propose(lock(&node, 1, "h", 2, 0)).await;
        let released = second.await.unwrap();
        assert!(
            matches!(released, Ok(Reply::Released { .. })),
            "{released:?}"
        );
        assert!(matches!(again, Ok(Reply::Granted { .. })), "{again:?}");
        let entries = stats.entries_appended.load(Ordering::Relaxed) - before;
        assert_eq!(
            entries, want_entries,
            "linger {linger_us} us: the two follow-ups took {entries} log entries"
        );
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_shares_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let (node, _feed) = start_leader(dir.path(), true, RaftOptions::default()).await;
    node.propose(open_session(&node, 11)).await.unwrap();
    let stats = node.log_stats();

    // Sequential: every proposal waits for the previous one.
    const SEQ: u64 = 50;
    let before = stats.durable_commits.load(Ordering::Relaxed);
    let t0 = Instant::now();
    for i in 0..SEQ {
        granted(&node, lock(&node, 11, &format!("seq{i}"), i + 1, 0)).await;
    }
    let seq_time = t0.elapsed();
    let seq_fsyncs = stats.durable_commits.load(Ordering::Relaxed) - before;

    // Concurrent: all at once, from many tasks.
    const N: u64 = 500;
    let before = stats.durable_commits.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..N {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            let c = lock(&node, 11, &format!("con{i}"), SEQ + 1 + i, 0);
            granted(&node, c).await
        }));
    }
    let mut tokens = Vec::new();
    for t in tasks {
        tokens.push(t.await.unwrap());
    }
    let con_time = t0.elapsed();
    let con_fsyncs = stats.durable_commits.load(Ordering::Relaxed) - before;
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len() as u64, N, "distinct tokens");
    assert!(
        con_fsyncs < N,
        "{N} concurrent proposals took {con_fsyncs} fsyncs"
    );

    println!(
        "group commit: sequential {SEQ} proposals in {:.0?} ({:.0} proposals/s, {seq_fsyncs} fsyncs); \
         concurrent {N} proposals in {:.0?} ({:.0} proposals/s, {con_fsyncs} fsyncs, {:.1} per fsync)",
        seq_time,
        SEQ as f64 / seq_time.as_secs_f64(),
        con_time,
        N as f64 / con_time.as_secs_f64(),
        N as f64 / con_fsyncs.max(1) as f64,
    );
    node.shutdown().await;
}
