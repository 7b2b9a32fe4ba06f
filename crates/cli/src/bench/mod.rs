//! `oclocks bench`: measure a cluster with the workloads of lockbench
//! (`../shared/lockbench`, README section 4), so that our figures sit next to
//! the etcd / Redis / ZooKeeper anchors in the same table format.
//!
//! - **uncontended**: C clients, each its own `Client` (own connection and
//!   session), each acquiring and releasing its own lock name in a loop.
//! - **contended**: C clients on one lock name: blocking acquire, hold ~0,
//!   release; wait percentiles, fairness and a mutual-exclusion check.
//! - **failover**: a victim with a short session timeout holds a lock, a
//!   waiter queues, the victim crashes (its runtime is torn down: keepalives
//!   stop, its sockets close, nothing is released); crash → grant time.
//! - **fill** (only when named): take N static locks and keep them, to load
//!   the lock table for memory and restart measurements (`fill.rs`).
//!
//! Flags, defaults, lock-name scheme and the markdown rows are lockbench's
//! (`report.rs` renders them the same way); `--json` prints the rows as JSON
//! instead. Progress bars go to stderr when it is a terminal. Exit status: 0;
//! 2 when a safety check failed (a mutual-exclusion violation, an early
//! failover grant or a fencing token that went backwards); 1 on errors.

mod fill;
mod report;
mod workloads;

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::client_cmds::ClientArgs;
use workloads::{BenchCfg, Workload};

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    client: ClientArgs,

    /// Workloads to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "uncontended,contended,failover"
    )]
    workloads: Vec<Workload>,

    /// Measurement window of each run, seconds.
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,

    /// Cap on operations per run (all clients together).
    #[arg(long, default_value_t = 1_000_000)]
    max_ops: u64,

    /// Repetitions of every workload (reported separately).
    #[arg(long, default_value_t = 2)]
    runs: usize,

    /// Client counts for the uncontended workload.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    uncontended: Vec<usize>,

    /// Client counts for the contended workload.
    #[arg(long, value_delimiter = ',', default_value = "2,16,64")]
    contended: Vec<usize>,

    /// Session timeout of ordinary clients, seconds.
    #[arg(long, default_value_t = 10)]
    session_ttl_s: u64,

    /// Session timeout of the crashing holder in the failover workload, seconds.
    #[arg(long, default_value_t = 2)]
    failover_ttl_s: u64,

    /// Crash trials per failover run.
    #[arg(long, default_value_t = 5)]
    failover_trials: usize,

    /// Contended workload: cancel the acquires still queued when the window
    /// closes (all at once: each dropped acquire sends CANCEL), instead of
    /// letting them drain (grant, release, stop).
    #[arg(long)]
    cancel_at_deadline: bool,

    /// Contended workload: how long queued waiters may take to drain after
    /// the window, seconds.
    #[arg(long, default_value_t = 60)]
    drain_timeout_s: u64,

    /// Fill workload: static locks to take and keep (it runs once, not per
    /// `--runs`; the locks stay held after the bench unless --fill-ttl-s).
    #[arg(long, default_value_t = 100_000)]
    fill_locks: u64,

    /// Fill workload: concurrent clients (each its own session).
    #[arg(long, default_value_t = 16)]
    fill_clients: usize,

    /// Fill workload: acquires in flight per client.
    #[arg(long, default_value_t = 8)]
    fill_pipeline: usize,

    /// Fill workload: locks per session; then the session is closed (its
    /// static locks stay held) and a new one opened. Keep it under the
    /// servers' `limits.locks_per_session_max` (default 4096).
    #[arg(long, default_value_t = 4000)]
    fill_per_session: u64,

    /// Fill workload: TTL of the locks, seconds (0 = none: they stay held).
    #[arg(long, default_value_t = 0)]
    fill_ttl_s: u64,

    /// Time the waiter is given to queue before the holder crashes, ms.
    #[arg(long, default_value_t = 500)]
    failover_settle_ms: u64,

    /// Hold time in the contended workload, microseconds (0 = just yield).
    #[arg(long, default_value_t = 0)]
    hold_us: u64,

    /// Timeout of a single acquire (uncontended) or release, seconds.
    #[arg(long, default_value_t = 5)]
    op_timeout_s: u64,

    /// Tokio worker threads of the load generator (lockbench uses 2).
    #[arg(long, default_value_t = 2)]
    threads: usize,

    /// The backend column of the tables.
    #[arg(long, default_value = "oclocks")]
    label: String,

    /// The zone the bench's locks live in.
    #[arg(long, default_value = "default")]
    zone: String,

    /// Keep the client config's server probing (round-trip probes at
    /// connect and every `probe_interval`, moves to a faster server). By
    /// default the bench turns it off so that no probe round or session
    /// move falls into a measurement window.
    #[arg(long)]
    probe: bool,

    /// Print the rows as JSON on stdout instead of the markdown report.
    #[arg(long)]
    json: bool,

    /// Write the markdown report to this file too.
    #[arg(long)]
    out: Option<PathBuf>,

    /// Title of the markdown report.
    #[arg(long, default_value = "oclocks bench")]
    title: String,

    /// No per-run summary lines on stderr (errors are still printed).
    #[arg(long, short)]
    quiet: bool,
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

pub fn run(a: BenchArgs) -> Result<ExitCode> {
    if !(a.duration_s.is_finite() && a.duration_s > 0.0 && a.duration_s <= 86_400.0) {
        bail!("--duration-s must be in (0, 86400]");
    }
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if a.uncontended.contains(&0) || a.contended.contains(&0) {
        bail!("client counts must be at least 1");
    }
    const DAY: u64 = 86_400;
    for (flag, v, min) in [
        ("--session-ttl-s", a.session_ttl_s, 1),
        ("--failover-ttl-s", a.failover_ttl_s, 1),
        ("--op-timeout-s", a.op_timeout_s, 1),
        ("--drain-timeout-s", a.drain_timeout_s, 0),
        ("--failover-settle-ms", a.failover_settle_ms / 1000, 0),
        ("--hold-us", a.hold_us / 1_000_000, 0),
    ] {
        if v < min || v > DAY {
            bail!("{flag} must be at least {min} and at most a day");
        }
    }
    if a.fill_clients == 0 || a.fill_pipeline == 0 || a.fill_per_session == 0 {
        bail!("--fill-clients, --fill-pipeline and --fill-per-session must be at least 1");
    }
    if a.fill_locks == 0 || a.fill_locks > 100_000_000 {
        bail!("--fill-locks must be in 1..=100000000");
    }
    if a.fill_ttl_s > 366 * DAY {
        bail!("--fill-ttl-s must be at most a year");
    }
    if a.threads == 0 || a.threads > 256 {
        bail!("--threads must be in 1..=256");
    }
    let mut client = a.client.client_config()?;
    if !a.probe {
        client.probe_interval = Duration::ZERO;
    }
    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let cfg = BenchCfg {
        client,
        zone: a.zone.clone(),
        label: a.label.clone(),
        duration: Duration::from_secs_f64(a.duration_s),
        max_ops: a.max_ops,
        op_timeout: secs(a.op_timeout_s),
        session_ttl: secs(a.session_ttl_s),
        runs: a.runs,
        uncontended: a.uncontended.clone(),
        contended: a.contended.clone(),
        failover_ttl: secs(a.failover_ttl_s),
        failover_trials: a.failover_trials,
        failover_settle: Duration::from_millis(a.failover_settle_ms),
        hold: Duration::from_micros(a.hold_us),
        cancel_at_deadline: a.cancel_at_deadline,
        drain_timeout: secs(a.drain_timeout_s),
        workloads: a.workloads.clone(),
        run_tag: format!("oclocks-bench/{started_unix}-{}", std::process::id()),
        progress: std::io::stderr().is_terminal(),
        quiet: a.quiet,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.threads)
        .thread_name("bench")
        .enable_all()
        .build()?;
    let started = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let result = rt.block_on(workloads::run_suite(&cfg))?;
    let fill_rows = if a.workloads.contains(&Workload::Fill) {
        let fc = fill::FillCfg {
            locks: a.fill_locks,
            clients: a.fill_clients,
            pipeline: a.fill_pipeline,
            per_session: a.fill_per_session,
            ttl: secs(a.fill_ttl_s),
        };
        vec![rt.block_on(fill::fill(&cfg, &fc))?]
    } else {
        vec![]
    };
    let finished = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    // Clients' background tasks (closing sessions) get a moment, no more.
    rt.shutdown_timeout(Duration::from_secs(2));

    let md = {
        let mut md = String::new();
        let _ = writeln!(md, "# {}\n", a.title);
        let _ = writeln!(md, "- date: {started} → {finished}");
        md.push_str(&machine_md());
        let _ = writeln!(
            md,
            "- {}: {}",
            result.label,
            result.version.as_deref().unwrap_or("version unknown")
        );
        let _ = writeln!(
            md,
            "- load generator: oclocks bench {} (tokio, {} worker threads), in the same box as the servers",
            env!("CARGO_PKG_VERSION"),
            a.threads
        );
        let argv: Vec<String> = std::env::args().map(|x| shell_quote(&x)).collect();
        let _ = writeln!(md, "- command: `{}`\n", argv.join(" "));
        md.push_str(&fill::render(&fill_rows, &result.label));
        md.push_str(&report::render_tables(std::slice::from_ref(&result), &cfg));
        md
    };
    if let Some(out) = &a.out {
        std::fs::write(out, &md).with_context(|| format!("write {}", out.display()))?;
    }
    if a.json {
        let mut json = serde_json::to_value(report::json(&result, &cfg))?;
        if let Some(obj) = json.as_object_mut() {
            obj.insert("fill".into(), serde_json::to_value(&fill_rows)?);
        }
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{md}");
    }
    let unsafe_runs = result.safety_failures();
    if unsafe_runs.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        for f in unsafe_runs {
            eprintln!("oclocks bench: SAFETY CHECK FAILED: {f}");
        }
        Ok(ExitCode::from(2))
    }
}

fn read_first(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| l.strip_prefix(key)).map(|v| {
        v.trim()
            .trim_matches('"')
            .trim_start_matches(':')
            .trim()
            .to_string()
    })
}

/// The machine line of lockbench's report.
fn machine_md() -> String {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpu = read_first("/proc/cpuinfo", "model name").unwrap_or_else(|| "?".into());
    let mem_kb: f64 = read_first("/proc/meminfo", "MemTotal:")
        .and_then(|v| v.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0.0);
    let os = read_first("/etc/os-release", "PRETTY_NAME=").unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "- machine: nproc {nproc}, CPU {cpu}, RAM {:.1} GiB, {os}, kernel {}\n",
        mem_kb / 1024.0 / 1024.0,
        kernel.trim()
    )
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=./:,@+".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}
