//! The three workloads, with lockbench's definitions and parameters
//! (`../shared/lockbench/src/suite.rs`), on `oclocks_client::Client`. Every
//! run is bounded by a wall-clock window and a cap on operations, every call
//! by a timeout.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use oclocks_client::{lease_margin, Client, ClientConfig, LockGuard};
use rand::Rng;
use serde::Serialize;
use tokio::time::{sleep, timeout};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    Uncontended,
    Contended,
    Failover,
    /// Take N static locks and keep them (see `fill.rs`); runs once, not per
    /// `--runs`, and only when named.
    Fill,
}

/// Everything a suite needs (lockbench's `SuiteCfg`, plus the client config).
#[derive(Clone, Debug)]
pub struct BenchCfg {
    pub client: ClientConfig,
    pub zone: String,
    pub label: String,
    pub duration: Duration,
    pub max_ops: u64,
    pub op_timeout: Duration,
    pub session_ttl: Duration,
    pub runs: usize,
    pub uncontended: Vec<usize>,
    pub contended: Vec<usize>,
    pub failover_ttl: Duration,
    pub failover_trials: usize,
    pub failover_settle: Duration,
    pub hold: Duration,
    pub cancel_at_deadline: bool,
    pub drain_timeout: Duration,
    pub workloads: Vec<Workload>,
    pub run_tag: String,
    /// Draw progress bars (stderr is a terminal).
    pub progress: bool,
    /// No per-run summary lines.
    pub quiet: bool,
}

/// Latency summary in milliseconds (n = samples).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Q {
    pub n: u64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Q {
    pub(super) fn of(h: &Histogram<u64>) -> Q {
        if h.is_empty() {
            return Q::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Q {
            n: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

#[derive(Clone, Debug)]
pub struct UncRow {
    pub c: usize,
    pub run: usize,
    pub cycles: u64,
    pub secs: f64,
    pub acq: Q,
    pub cycle: Q,
    pub errors: u64,
    pub first_error: Option<String>,
}

#[derive(Clone, Debug)]
pub struct ConRow {
    pub c: usize,
    pub run: usize,
    pub handoffs: u64,
    pub secs: f64,
    pub wait: Q,
    pub max_holders: i64,
    pub violations: u64,
    /// Grants whose fencing token was not above every token granted before
    /// (must be 0; not a lockbench column, reported in JSON and as an error).
    pub token_regressions: u64,
    /// fewest / most grants any single client got (fairness)
    pub per_client_min: u64,
    pub per_client_max: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

#[derive(Clone, Debug)]
pub struct FailRow {
    pub run: usize,
    pub ttl: Duration,
    /// Session timeout the server granted the victim.
    pub effective_ttl: Option<Duration>,
    /// crash -> waiter granted, ms, one per successful trial
    pub failover_ms: Vec<f64>,
    /// waiter granted - (victim's last acknowledged keepalive's send time +
    /// granted session timeout), ms (signed)
    pub past_expiry_ms: Vec<f64>,
    pub early_grants: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

#[derive(Clone, Debug)]
pub struct SuiteResult {
    pub label: String,
    pub version: Option<String>,
    pub describe: String,
    pub uncontended: Vec<UncRow>,
    pub contended: Vec<ConRow>,
    pub failover: Vec<FailRow>,
}

impl SuiteResult {
    /// The runs whose safety checks failed, described.
    pub fn safety_failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for r in &self.contended {
            if r.violations > 0 || r.token_regressions > 0 {
                out.push(format!(
                    "contended C={} run {}: {} mutual-exclusion violations, {} fencing-token regressions",
                    r.c, r.run, r.violations, r.token_regressions
                ));
            }
        }
        for r in &self.failover {
            if r.early_grants > 0 {
                out.push(format!(
                    "failover run {}: {} early grants (waiter granted while the holder was alive)",
                    r.run, r.early_grants
                ));
            }
        }
        out
    }
}

pub(super) fn new_hist() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 300_000_000, 3).context("histogram bounds")
}

pub(super) fn rec(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1));
}

/// Error bookkeeping of one worker or run.
#[derive(Default)]
pub(super) struct Errs {
    pub(super) n: u64,
    pub(super) first: Option<String>,
}

impl Errs {
    pub(super) fn add(&mut self, e: impl std::fmt::Display) {
        self.n += 1;
        if self.first.is_none() {
            self.first = Some(e.to_string());
        }
    }
    pub(super) fn merge(&mut self, o: Errs) {
        self.n += o.n;
        if self.first.is_none() {
            self.first = o.first;
        }
    }
}

const MAX_ERRORS_PER_WORKER: u64 = 200;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// One bench client: its own `Client` (own TLS connection, own session)
/// asking for `session_timeout`.
pub(super) async fn connect(base: &ClientConfig, session_timeout: Duration) -> Result<Client> {
    let mut cfg = base.clone();
    cfg.session_timeout = session_timeout;
    timeout(CONNECT_TIMEOUT, Client::connect(cfg))
        .await
        .context("connect timed out")?
        .context("connect")
}

async fn connect_all(base: &ClientConfig, n: usize, ttl: Duration) -> Result<Vec<Client>> {
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let base = base.clone();
            tokio::spawn(async move { connect(&base, ttl).await })
        })
        .collect();
    let mut clients = Vec::with_capacity(n);
    for h in handles {
        clients.push(h.await.context("connect task")??);
    }
    Ok(clients)
}

/// Close every session (CLOSE), together, within 30 s.
async fn close_all(clients: Vec<Client>) {
    let handles: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(async move { c.close().await }))
        .collect();
    let _ = timeout(Duration::from_secs(30), async {
        for h in handles {
            let _ = h.await;
        }
    })
    .await;
}

/// Blocking acquire of the exclusive connection lock `name` (wait forever;
/// callers bound it with a timeout, and dropping the future cancels it).
async fn acquire(client: &Client, zone: &str, name: &str) -> Result<LockGuard> {
    Ok(client.lock(zone, name).wait_forever().acquire().await?)
}

/// Release; a release that finds its grant already released is an error here.
async fn release(guard: LockGuard) -> Result<()> {
    let out = guard.release().await?;
    if out.already_released {
        return Err(anyhow!("the grant was already released"));
    }
    Ok(())
}

/// A progress bar on stderr for one run (hidden unless stderr is a terminal).
pub(super) struct Progress {
    pub(super) bar: ProgressBar,
    quiet: bool,
}

impl Progress {
    pub(super) fn new(cfg: &BenchCfg, prefix: String, len: u64, template: &str) -> Progress {
        let bar = if cfg.progress {
            let bar = ProgressBar::new(len);
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(prefix);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        } else {
            ProgressBar::hidden()
        };
        Progress {
            bar,
            quiet: cfg.quiet,
        }
    }

    /// A bar over a time window: position in ms, message from `ops`.
    fn window(cfg: &BenchCfg, prefix: String, ops: Arc<AtomicU64>, start: Instant) -> Progress {
        let p = Progress::new(
            cfg,
            prefix,
            u64::try_from(cfg.duration.as_millis()).unwrap_or(u64::MAX),
            "{prefix:.bold} [{bar:30}] {msg}",
        );
        if !p.bar.is_hidden() {
            let bar = p.bar.clone();
            let window = cfg.duration;
            tokio::spawn(async move {
                while !bar.is_finished() {
                    let el = start.elapsed();
                    let n = ops.load(Ordering::Relaxed);
                    bar.set_position(u64::try_from(el.as_millis()).unwrap_or(u64::MAX));
                    if el < window {
                        bar.set_message(format!(
                            "{:.1}/{:.1} s  {n} ops  {:.0}/s",
                            el.as_secs_f64(),
                            window.as_secs_f64(),
                            n as f64 / el.as_secs_f64().max(1e-3)
                        ));
                    } else {
                        bar.set_message(format!("{n} ops; draining and closing"));
                    }
                    sleep(Duration::from_millis(100)).await;
                }
            });
        }
        p
    }

    /// Clear the bar and print the run's summary line.
    pub(super) fn done(self, line: String) {
        self.bar.finish_and_clear();
        if !self.quiet {
            eprintln!("{line}");
        }
    }
}

pub async fn run_suite(cfg: &BenchCfg) -> Result<SuiteResult> {
    let label = &cfg.label;
    // One client to ask the cluster who it is (and to fail early).
    let probe = connect(&cfg.client, cfg.session_ttl)
        .await
        .context("cannot reach the cluster")?;
    let status = timeout(cfg.op_timeout, probe.status()).await;
    let info = probe.session();
    let _ = probe.close().await;
    let version = format!("oclocks {}", env!("CARGO_PKG_VERSION"));
    let cluster = match status {
        Ok(Ok(s)) => format!(
            "{} servers, leader node {}",
            s.servers.len(),
            s.leader_id.map_or("unknown".to_string(), |l| l.to_string())
        ),
        _ => "cluster status unknown".to_string(),
    };
    if !cfg.quiet {
        eprintln!("== {label}: {version}, {cluster}");
    }
    let describe = format!(
        "OpenCluster-Locks exclusive connection locks (LOCK waiting forever, RELEASE) on the Rust \
         client; one Client (one TLS 1.3 connection, one session) per bench client, session \
         timeout = the TTL, keepalive every timeout/3; {cluster}; endpoints {}; first connected \
         to {}",
        cfg.client.endpoints.join(","),
        info.endpoint.as_deref().unwrap_or("?")
    );
    let mut res = SuiteResult {
        label: label.clone(),
        version: Some(version),
        describe,
        uncontended: vec![],
        contended: vec![],
        failover: vec![],
    };
    for run in 1..=cfg.runs {
        if cfg.workloads.contains(&Workload::Uncontended) {
            for &c in &cfg.uncontended {
                res.uncontended.push(uncontended(cfg, c, run).await?);
            }
        }
        if cfg.workloads.contains(&Workload::Contended) {
            for &c in &cfg.contended {
                res.contended.push(contended(cfg, c, run).await?);
            }
        }
        if cfg.workloads.contains(&Workload::Failover) {
            res.failover.push(failover(cfg, run).await?);
        }
    }
    Ok(res)
}

/// C clients, each acquiring and releasing its own lock name in a loop.
async fn uncontended(cfg: &BenchCfg, c: usize, run: usize) -> Result<UncRow> {
    let label = &cfg.label;
    let clients = connect_all(&cfg.client, c, cfg.session_ttl).await?;
    let names: Vec<String> = (0..c)
        .map(|i| format!("{}/{label}/unc-c{c}-r{run}/{i}", cfg.run_tag))
        .collect();
    // Warm-up: one untimed cycle per client (connection, caches).
    for (cl, name) in clients.iter().zip(&names) {
        let g = timeout(cfg.op_timeout, acquire(cl, &cfg.zone, name))
            .await
            .context("warm-up acquire timed out")??;
        timeout(cfg.op_timeout, release(g))
            .await
            .context("warm-up release timed out")??;
    }

    let issued = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let progress = Progress::window(
        cfg,
        format!("[{label}] uncontended C={c} run {run}"),
        done.clone(),
        start,
    );
    let mut handles = Vec::with_capacity(c);
    for (cl, name) in clients.into_iter().zip(names) {
        let (issued, done) = (issued.clone(), done.clone());
        let (op_timeout, max_ops, zone) = (cfg.op_timeout, cfg.max_ops, cfg.zone.clone());
        let (mut acq, mut cyc) = (new_hist()?, new_hist()?);
        handles.push(tokio::spawn(async move {
            let (mut ops, mut errs) = (0u64, Errs::default());
            while Instant::now() < deadline && errs.n < MAX_ERRORS_PER_WORKER {
                if issued.fetch_add(1, Ordering::Relaxed) >= max_ops {
                    break;
                }
                let t0 = Instant::now();
                let guard = match timeout(op_timeout, acquire(&cl, &zone, &name)).await {
                    Ok(Ok(g)) => g,
                    Ok(Err(e)) => {
                        errs.add(format!("acquire: {e:#}"));
                        sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    Err(_) => {
                        errs.add("acquire: timeout");
                        continue;
                    }
                };
                let t1 = Instant::now();
                match timeout(op_timeout, release(guard)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        errs.add(format!("release: {e:#}"));
                        continue;
                    }
                    Err(_) => {
                        errs.add("release: timeout");
                        continue;
                    }
                }
                let t2 = Instant::now();
                rec(&mut acq, t1 - t0);
                rec(&mut cyc, t2 - t0);
                ops += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
            (cl, acq, cyc, ops, errs)
        }));
    }
    let (mut acq, mut cyc, mut ops, mut errs, mut back) =
        (new_hist()?, new_hist()?, 0, Errs::default(), vec![]);
    for h in handles {
        let (cl, a, y, o, e) = h.await.context("uncontended worker")?;
        acq.add(&a).ok();
        cyc.add(&y).ok();
        ops += o;
        errs.merge(e);
        back.push(cl);
    }
    let secs = start.elapsed().as_secs_f64();
    close_all(back).await;
    let row = UncRow {
        c,
        run,
        cycles: ops,
        secs,
        acq: Q::of(&acq),
        cycle: Q::of(&cyc),
        errors: errs.n,
        first_error: errs.first,
    };
    progress.done(format!(
        "  [{label}] uncontended C={c} run {run}: {:.0} cycles/s, acq p50 {:.3} ms p99 {:.3} ms, errors {}",
        row.cycles as f64 / row.secs,
        row.acq.p50,
        row.acq.p99,
        row.errors
    ));
    Ok(row)
}

/// Shared state of one contended run.
struct Shared {
    name: String,
    holders: AtomicI64,
    max_holders: AtomicI64,
    violations: AtomicU64,
    last_token: AtomicU64,
    token_regressions: AtomicU64,
    issued: AtomicU64,
    done: Arc<AtomicU64>,
}

/// C clients all on one lock name: blocking acquire, hold ~0, release.
async fn contended(cfg: &BenchCfg, c: usize, run: usize) -> Result<ConRow> {
    let label = &cfg.label;
    let clients = connect_all(&cfg.client, c, cfg.session_ttl).await?;
    let done = Arc::new(AtomicU64::new(0));
    let shared = Arc::new(Shared {
        name: format!("{}/{label}/con-c{c}-r{run}", cfg.run_tag),
        holders: AtomicI64::new(0),
        max_holders: AtomicI64::new(0),
        violations: AtomicU64::new(0),
        last_token: AtomicU64::new(0),
        token_regressions: AtomicU64::new(0),
        issued: AtomicU64::new(0),
        done: done.clone(),
    });
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let progress = Progress::window(
        cfg,
        format!("[{label}] contended C={c} run {run}"),
        done,
        start,
    );
    let mut handles = Vec::with_capacity(c);
    for cl in clients {
        let s = shared.clone();
        let (op_timeout, max_ops, hold, zone) =
            (cfg.op_timeout, cfg.max_ops, cfg.hold, cfg.zone.clone());
        let (cancel_at_deadline, drain_until) =
            (cfg.cancel_at_deadline, deadline + cfg.drain_timeout);
        let mut wait = new_hist()?;
        handles.push(tokio::spawn(async move {
            let (mut ops, mut errs) = (0u64, Errs::default());
            while errs.n < MAX_ERRORS_PER_WORKER {
                let t0 = Instant::now();
                if t0 >= deadline || s.issued.fetch_add(1, Ordering::Relaxed) >= max_ops {
                    break;
                }
                // A request queued when the window closes is normally left
                // to drain (granted, released, not counted). With
                // --cancel-at-deadline every queued acquire is dropped at
                // the deadline, which sends its CANCEL: a mass cancel.
                let limit = if cancel_at_deadline {
                    deadline - t0
                } else {
                    drain_until - t0
                };
                let guard = match timeout(limit, acquire(&cl, &zone, &s.name)).await {
                    Err(_) => {
                        if !cancel_at_deadline {
                            errs.add(format!(
                                "acquire: still not granted {limit:?} after the request (drain)"
                            ));
                        }
                        break;
                    }
                    Ok(Err(e)) => {
                        errs.add(format!("acquire: {e:#}"));
                        sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    Ok(Ok(g)) => g,
                };
                let t1 = Instant::now();
                let h = s.holders.fetch_add(1, Ordering::SeqCst) + 1;
                s.max_holders.fetch_max(h, Ordering::SeqCst);
                if h > 1 {
                    s.violations.fetch_add(1, Ordering::SeqCst);
                }
                // Grants of one lock are serial: each token is above every
                // token granted before it.
                let token = guard.token();
                if s.last_token.fetch_max(token, Ordering::SeqCst) >= token {
                    s.token_regressions.fetch_add(1, Ordering::SeqCst);
                }
                if hold.is_zero() {
                    tokio::task::yield_now().await;
                } else {
                    sleep(hold).await;
                }
                // We stop considering ourselves the holder before asking to release.
                s.holders.fetch_sub(1, Ordering::SeqCst);
                match timeout(op_timeout, release(guard)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => errs.add(format!("release: {e:#}")),
                    Err(_) => errs.add("release: timeout"),
                }
                if t1 <= deadline {
                    rec(&mut wait, t1 - t0);
                    ops += 1;
                    s.done.fetch_add(1, Ordering::Relaxed);
                }
            }
            (cl, wait, ops, errs)
        }));
    }
    let (mut wait, mut ops, mut errs, mut back) = (new_hist()?, 0, Errs::default(), vec![]);
    let (mut pmin, mut pmax) = (u64::MAX, 0u64);
    for h in handles {
        let (cl, w, o, e) = h.await.context("contended worker")?;
        wait.add(&w).ok();
        ops += o;
        pmin = pmin.min(o);
        pmax = pmax.max(o);
        errs.merge(e);
        back.push(cl);
    }
    // Grants are counted inside the window only.
    let secs = start.elapsed().min(cfg.duration).as_secs_f64();
    close_all(back).await;
    let token_regressions = shared.token_regressions.load(Ordering::SeqCst);
    if token_regressions > 0 {
        errs.add(format!(
            "{token_regressions} grants carried a fencing token not above an earlier grant's"
        ));
    }
    let row = ConRow {
        c,
        run,
        handoffs: ops,
        secs,
        wait: Q::of(&wait),
        max_holders: shared.max_holders.load(Ordering::SeqCst),
        violations: shared.violations.load(Ordering::SeqCst),
        token_regressions,
        per_client_min: if pmin == u64::MAX { 0 } else { pmin },
        per_client_max: pmax,
        errors: errs.n,
        first_error: errs.first,
    };
    progress.done(format!(
        "  [{label}] contended C={c} run {run}: {:.0} handoffs/s, wait p50 {:.3} ms p99 {:.3} ms, violations {}, errors {}",
        row.handoffs as f64 / row.secs,
        row.wait.p50,
        row.wait.p99,
        row.violations,
        row.errors
    ));
    Ok(row)
}

/// The victim of a failover trial: a `Client` (and the guard of its lock)
/// living on a runtime of their own, so that the crash can stop all of it
/// at once.
struct Victim {
    rt: tokio::runtime::Runtime,
    /// A handle to read its session info (the task on `rt` holds the rest).
    client: Client,
}

impl Victim {
    /// Connect with session timeout `ttl` and take `name`, on a fresh
    /// one-thread runtime. The client and its guard are parked in a task
    /// of that runtime until the crash.
    async fn start(cfg: &BenchCfg, name: &str, ttl: Duration) -> Result<Victim> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-victim")
            .enable_all()
            .build()
            .context("victim runtime")?;
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<Client>>();
        let (base, zone, name, op_timeout) = (
            cfg.client.clone(),
            cfg.zone.clone(),
            name.to_string(),
            cfg.op_timeout,
        );
        rt.spawn(async move {
            let r = async {
                let client = connect(&base, ttl).await.context("victim connect")?;
                let guard = timeout(op_timeout, acquire(&client, &zone, &name))
                    .await
                    .context("victim acquire timed out")?
                    .context("victim acquire")?;
                Ok((client, guard))
            }
            .await;
            match r {
                Ok((client, guard)) => {
                    let _ = tx.send(Ok(client.clone()));
                    // Held until the runtime is torn down: nothing after this
                    // line ever runs, so neither RELEASE nor CLOSE is sent.
                    std::future::pending::<()>().await;
                    drop((client, guard));
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
        let client = match timeout(CONNECT_TIMEOUT + op_timeout, rx).await {
            Ok(Ok(Ok(c))) => c,
            Ok(Ok(Err(e))) => {
                rt.shutdown_background();
                return Err(e);
            }
            Ok(Err(_)) | Err(_) => {
                rt.shutdown_background();
                return Err(anyhow!("victim did not get its lock"));
            }
        };
        Ok(Victim { rt, client })
    }

    /// The crash: the runtime goes away with every task on it — the
    /// connection task (keepalives stop), the writer (its socket is closed
    /// by the kernel, without CLOSE) and the task holding the guard (no
    /// RELEASE). What the cluster sees is a client process that died.
    fn crash(self) {
        let Victim { rt, client } = self;
        rt.shutdown_background();
        drop(client);
    }
}

/// A victim with a short session timeout takes the lock, a waiter queues
/// behind it, the victim crashes; we time crash -> waiter granted.
async fn failover(cfg: &BenchCfg, run: usize) -> Result<FailRow> {
    let label = &cfg.label;
    let ttl = cfg.failover_ttl;
    let mut row = FailRow {
        run,
        ttl,
        effective_ttl: None,
        failover_ms: vec![],
        past_expiry_ms: vec![],
        early_grants: 0,
        errors: 0,
        first_error: None,
    };
    let progress = Progress::new(
        cfg,
        format!("[{label}] failover TTL={ttl:?} run {run}"),
        cfg.failover_trials as u64,
        "{prefix:.bold} [{bar:30}] {pos}/{len} trials done; {msg}",
    );
    let mut errs = Errs::default();
    for trial in 0..cfg.failover_trials {
        progress.bar.set_message("holder and waiter");
        let name = format!("{}/{label}/failover-r{run}/t{trial}", cfg.run_tag);
        let r: Result<()> = async {
            let victim = Victim::start(cfg, &name, ttl).await?;
            let waiter = match connect(&cfg.client, cfg.session_ttl).await {
                Ok(w) => w,
                Err(e) => {
                    victim.crash();
                    return Err(e.context("waiter connect"));
                }
            };
            let (wname, zone) = (name.clone(), cfg.zone.clone());
            let limit = ttl * 5 + Duration::from_secs(10);
            let wclient = waiter.clone();
            let wtask = tokio::spawn(async move {
                let r = timeout(limit, acquire(&wclient, &zone, &wname)).await;
                (r, Instant::now())
            });
            // Let the waiter queue up, then crash at a random phase of the
            // victim's keepalive cycle (uniform over half the timeout).
            let half = u64::try_from(ttl.as_micros() / 2)
                .unwrap_or(u64::MAX)
                .max(1);
            let phase = Duration::from_micros(rand::thread_rng().gen_range(0..half));
            sleep(cfg.failover_settle + phase).await;
            let early = wtask.is_finished();
            // The cluster frees the victim's session no earlier than the
            // send time of its last acknowledged keepalive + the granted
            // timeout; the client's lease deadline is that minus the margin.
            let info = victim.client.session();
            let now = tokio::time::Instant::now();
            let timeout_granted = info.session_timeout;
            row.effective_ttl = Some(timeout_granted);
            let expiry = info
                .lease_remaining
                .map(|left| (now + left + lease_margin(timeout_granted)).into_std());
            let t_crash = Instant::now();
            victim.crash();
            progress
                .bar
                .set_message("crashed; waiting for the waiter's grant");
            let (r, at) = wtask.await.context("waiter task")?;
            let result = match r {
                Err(_) => Err(anyhow!("waiter not granted within {limit:?} of the crash")),
                Ok(Err(e)) => Err(e.context("waiter acquire")),
                Ok(Ok(guard)) => {
                    if early {
                        row.early_grants += 1;
                    } else {
                        row.failover_ms.push((at - t_crash).as_secs_f64() * 1000.0);
                        if let Some(expiry) = expiry {
                            let past = if at >= expiry {
                                (at - expiry).as_secs_f64()
                            } else {
                                -(expiry - at).as_secs_f64()
                            };
                            row.past_expiry_ms.push(past * 1000.0);
                        }
                    }
                    let _ = timeout(cfg.op_timeout, release(guard)).await;
                    Ok(())
                }
            };
            let _ = waiter.close().await;
            result
        }
        .await;
        if let Err(e) = r {
            errs.add(format!("{e:#}"));
        }
        progress.bar.inc(1);
    }
    row.errors = errs.n;
    row.first_error = errs.first;
    progress.done(format!(
        "  [{label}] failover TTL={:?} run {run}: {:?} ms, early grants {}, errors {}",
        row.ttl,
        row.failover_ms
            .iter()
            .map(|x| x.round())
            .collect::<Vec<_>>(),
        row.early_grants,
        row.errors
    ));
    Ok(row)
}
