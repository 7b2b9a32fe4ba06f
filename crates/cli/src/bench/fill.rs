//! The `fill` workload: take N static locks with distinct names and keep
//! them, to load a cluster's lock table (memory, snapshot and restart
//! measurements: `scripts/bench-memory.sh`).
//!
//! - Static locks are owned by the bench client's Ed25519 owner key (LOCK
//!   is signed), exclusive, taken with a try-once LOCK (the names are
//!   fresh, so nothing waits) and a TTL of `--fill-ttl-s` (0 = none: the
//!   locks stay held after the bench ends). Each guard is `keep()`ed, so
//!   nothing is released.
//! - C workers (`--fill-clients`), each with `--fill-pipeline` acquires in
//!   flight on its own `Client` (own connection and session).
//! - A session's bound holds count against the engine's
//!   `locks_per_session_max` (default 4096), so a worker takes at most
//!   `--fill-per-session` locks on one session, then CLOSEs it (which
//!   detaches its static locks: they stay held) and connects a new one. The
//!   fill therefore needs no limit raised.
//! - Names: `<run prefix>/<label>/fill/<index, 7+ digits>`.
//!
//! Runs once (not per `--runs`). Reports locks/s over the whole fill
//! (connects and session closes included) and the acquire latency.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use oclocks_client::{Client, ClientConfig, Error as ClientError};
use serde::Serialize;
use tokio::time::{sleep, timeout};

use super::workloads::{connect, new_hist, rec, BenchCfg, Errs, Progress, Q};

/// Settings of the fill workload.
#[derive(Clone, Debug)]
pub struct FillCfg {
    /// Locks to take.
    pub locks: u64,
    /// Concurrent clients (each its own connection and session).
    pub clients: usize,
    /// Acquires in flight per client.
    pub pipeline: usize,
    /// Locks taken on one session before it is closed and a new one opened.
    pub per_session: u64,
    /// TTL of every lock; zero = none.
    pub ttl: Duration,
}

/// The result of one fill.
#[derive(Clone, Debug, Serialize)]
pub struct FillRow {
    pub locks_requested: u64,
    /// Locks granted (and kept).
    pub locks_taken: u64,
    pub clients: usize,
    pub pipeline: usize,
    pub per_session: u64,
    /// Sessions opened (and closed) to take them.
    pub sessions: u64,
    pub ttl_s: f64,
    /// Length of the lock names, bytes.
    pub name_bytes: usize,
    /// First connect to the last session closed, seconds.
    pub secs: f64,
    pub locks_per_s: f64,
    /// LOCK call → grant, ms.
    pub acquire: Q,
    /// Failed acquires (each index is tried up to `ATTEMPTS` times).
    pub errors: u64,
    pub first_error: Option<String>,
}

/// Tries per lock index before it counts as not taken.
const ATTEMPTS: u32 = 3;
/// A worker stops after this many errors.
const MAX_ERRORS_PER_WORKER: u64 = 200;

/// What the workers share.
struct Ctx {
    base: ClientConfig,
    zone: String,
    prefix: String,
    ttl: Duration,
    session_ttl: Duration,
    op_timeout: Duration,
    locks: u64,
    pipeline: usize,
    per_session: u64,
    /// The next lock index to take.
    next: AtomicU64,
    /// Locks taken so far (the progress bar reads it).
    taken: Arc<AtomicU64>,
}

impl Ctx {
    fn name(&self, i: u64) -> String {
        format!("{}/{i:07}", self.prefix)
    }
}

/// What one worker (or one session's task) did.
struct Part {
    hist: Histogram<u64>,
    errs: Errs,
    sessions: u64,
}

impl Part {
    fn new() -> Result<Part> {
        Ok(Part {
            hist: new_hist()?,
            errs: Errs::default(),
            sessions: 0,
        })
    }

    fn merge(&mut self, o: Part) {
        self.hist.add(&o.hist).ok();
        self.errs.merge(o.errs);
        self.sessions += o.sessions;
    }
}

/// Take `fc.locks` static locks and keep them.
pub async fn fill(cfg: &BenchCfg, fc: &FillCfg) -> Result<FillRow> {
    let label = &cfg.label;
    let mut base = cfg.client.clone();
    // Many sessions at once and one after another: never one persisted id.
    base.client_id_file = None;
    let taken = Arc::new(AtomicU64::new(0));
    let ctx = Arc::new(Ctx {
        base,
        zone: cfg.zone.clone(),
        prefix: format!("{}/{label}/fill", cfg.run_tag),
        ttl: fc.ttl,
        session_ttl: cfg.session_ttl,
        op_timeout: cfg.op_timeout,
        locks: fc.locks,
        pipeline: fc.pipeline,
        per_session: fc.per_session,
        next: AtomicU64::new(0),
        taken: taken.clone(),
    });
    let name_bytes = ctx.name(fc.locks.saturating_sub(1)).len();
    let progress = Progress::new(
        cfg,
        format!("[{label}] fill {} locks", fc.locks),
        fc.locks,
        "{prefix:.bold} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}",
    );
    let ticker = {
        let bar = progress.bar.clone();
        let taken = taken.clone();
        tokio::spawn(async move {
            while !bar.is_finished() {
                bar.set_position(taken.load(Ordering::Relaxed));
                sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let start = Instant::now();
    let workers: Vec<_> = (0..fc.clients)
        .map(|_| tokio::spawn(worker(ctx.clone())))
        .collect();
    let mut all = Part::new()?;
    for w in workers {
        all.merge(w.await.context("fill worker")??);
    }
    let secs = start.elapsed().as_secs_f64();
    ticker.abort();
    let locks_taken = taken.load(Ordering::Relaxed);
    let row = FillRow {
        locks_requested: fc.locks,
        locks_taken,
        clients: fc.clients,
        pipeline: fc.pipeline,
        per_session: fc.per_session,
        sessions: all.sessions,
        ttl_s: fc.ttl.as_secs_f64(),
        name_bytes,
        secs,
        locks_per_s: if secs > 0.0 {
            locks_taken as f64 / secs
        } else {
            0.0
        },
        acquire: Q::of(&all.hist),
        errors: all.errs.n,
        first_error: all.errs.first,
    };
    progress.done(format!(
        "  [{label}] fill: {} of {} locks in {:.1} s, {:.0} locks/s, acq p50 {:.3} ms p99 {:.3} ms, {} sessions, errors {}",
        row.locks_taken,
        row.locks_requested,
        row.secs,
        row.locks_per_s,
        row.acquire.p50,
        row.acquire.p99,
        row.sessions,
        row.errors
    ));
    Ok(row)
}

/// One client: sessions one after another, each taking up to
/// `per_session` locks with `pipeline` acquires in flight.
async fn worker(ctx: Arc<Ctx>) -> Result<Part> {
    let mut part = Part::new()?;
    let mut connect_failures = 0u32;
    while ctx.next.load(Ordering::Relaxed) < ctx.locks && part.errs.n < MAX_ERRORS_PER_WORKER {
        let client = match connect(&ctx.base, ctx.session_ttl).await {
            Ok(c) => c,
            Err(e) => {
                part.errs.add(format!("{e:#}"));
                connect_failures += 1;
                if connect_failures >= ATTEMPTS {
                    break;
                }
                sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        connect_failures = 0;
        part.sessions += 1;
        let quota = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..ctx.pipeline)
            .map(|_| tokio::spawn(session_task(ctx.clone(), client.clone(), quota.clone())))
            .collect();
        for t in tasks {
            part.merge(t.await.context("fill task")??);
        }
        // CLOSE detaches the session's static locks: they stay held.
        match timeout(Duration::from_secs(30), client.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => part.errs.add(format!("close: {e:#}")),
            Err(_) => part.errs.add("close: timeout"),
        }
    }
    Ok(part)
}

/// One acquire slot of a session: take indexes until the session's quota
/// or the fill is used up.
async fn session_task(ctx: Arc<Ctx>, client: Client, quota: Arc<AtomicU64>) -> Result<Part> {
    let mut part = Part::new()?;
    while part.errs.n < MAX_ERRORS_PER_WORKER {
        if quota.fetch_add(1, Ordering::Relaxed) >= ctx.per_session {
            break;
        }
        let i = ctx.next.fetch_add(1, Ordering::Relaxed);
        if i >= ctx.locks {
            break;
        }
        let name = ctx.name(i);
        for attempt in 1..=ATTEMPTS {
            let t0 = Instant::now();
            let acquire = client
                .lock(ctx.zone.as_str(), name.as_str())
                .static_lock()
                .ttl(ctx.ttl)
                .try_once()
                .acquire();
            // A timed-out acquire is dropped, which CANCELs it (and gives a
            // grant that raced the cancel back), so the retry starts clean.
            match timeout(ctx.op_timeout, acquire).await {
                Ok(Ok(guard)) => {
                    rec(&mut part.hist, t0.elapsed());
                    // Not released when dropped: the lock stays held.
                    guard.keep();
                    ctx.taken.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Ok(Err(e @ ClientError::Limit { .. })) => {
                    part.errs.add(format!(
                        "acquire {name}: {e} (lower --fill-per-session or raise the servers' \
                         limits.locks_per_session_max)"
                    ));
                    // This session is full: end it, the next one goes on.
                    return Ok(part);
                }
                Ok(Err(e)) => {
                    part.errs
                        .add(format!("acquire {name} (try {attempt}): {e}"));
                    if e.is_conflict() {
                        // Held: by an earlier try of ours that was granted
                        // after all, or by someone else. Not ours to take.
                        break;
                    }
                    sleep(Duration::from_millis(50)).await;
                }
                Err(_) => part
                    .errs
                    .add(format!("acquire {name} (try {attempt}): timeout")),
            }
        }
    }
    Ok(part)
}

/// The markdown section of the fill rows.
pub fn render(rows: &[FillRow], label: &str) -> String {
    let mut o = String::new();
    if rows.is_empty() {
        return o;
    }
    o.push_str(
        "### Fill: N static locks (owner-key signed, exclusive, try-once), kept held\n\n\
         | backend | locks | taken | clients × in flight | sessions | name bytes | TTL | secs | locks/s | acquire p50 | p99 | p99.9 | max | errors |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    let mut errors = Vec::new();
    for r in rows {
        let _ = writeln!(
            o,
            "| {label} | {} | {} | {} × {} | {} | {} | {} | {:.1} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            r.locks_requested,
            r.locks_taken,
            r.clients,
            r.pipeline,
            r.sessions,
            r.name_bytes,
            if r.ttl_s > 0.0 {
                format!("{} s", r.ttl_s)
            } else {
                "none".into()
            },
            r.secs,
            r.locks_per_s,
            r.acquire.p50,
            r.acquire.p99,
            r.acquire.p999,
            r.acquire.max,
            r.errors
        );
        if let Some(e) = &r.first_error {
            errors.push(format!("{label} fill: {} errors, first: {e}", r.errors));
        }
    }
    let per_session = rows.first().map_or(0, |r| r.per_session);
    let _ = writeln!(
        o,
        "\nLatencies in ms (LOCK call → grant). secs and locks/s cover the whole fill, \
         connects and session closes included. Each session took at most {per_session} locks, \
         then closed (static locks outlive their session). The locks stay held after the \
         bench (no TTL unless --fill-ttl-s).\n"
    );
    if !errors.is_empty() {
        o.push_str("Fill errors:\n\n");
        for e in errors {
            let _ = writeln!(o, "- {e}");
        }
        o.push('\n');
    }
    o
}
