//! The report: markdown tables with exactly lockbench's headers, columns and
//! number formatting (`../shared/lockbench/src/report.rs`), so that rows can
//! be pasted next to `results-anchors.md`; and the same rows as JSON.

use std::fmt::Write;

use serde::Serialize;

use super::workloads::{BenchCfg, ConRow, FailRow, SuiteResult, UncRow, Q};

/// lockbench's number format for milliseconds.
fn ms(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else if x < 1.0 {
        format!("{x:.3}")
    } else if x < 100.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.0}")
    }
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        })
}

fn rate(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

pub fn render_tables(results: &[SuiteResult], cfg: &BenchCfg) -> String {
    let mut o = String::new();
    let mut errors: Vec<String> = vec![];

    if results.iter().any(|r| !r.uncontended.is_empty()) {
        let _ = writeln!(
            o,
            "### a. Uncontended: C clients, each acquire+release of its own lock, {} s window per run\n",
            cfg.duration.as_secs_f64()
        );
        o.push_str("| backend | C | run | cycles/s | acquire p50 | p99 | p99.9 | cycle p50 | p99 | p99.9 | cycles | errors |\n");
        o.push_str("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
        for r in results {
            let mut rows = r.uncontended.clone();
            rows.sort_by_key(|x| (x.c, x.run));
            for x in rows {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    r.label,
                    x.c,
                    x.run,
                    rate(x.cycles, x.secs),
                    ms(x.acq.p50),
                    ms(x.acq.p99),
                    ms(x.acq.p999),
                    ms(x.cycle.p50),
                    ms(x.cycle.p99),
                    ms(x.cycle.p999),
                    x.cycles,
                    x.errors
                );
                if let Some(e) = &x.first_error {
                    errors.push(format!(
                        "{} uncontended C={} run {}: {} errors, first: {e}",
                        r.label, x.c, x.run, x.errors
                    ));
                }
            }
        }
        o.push_str("\nLatencies in ms. cycle = acquire + release.\n\n");
    }

    if results.iter().any(|r| !r.contended.is_empty()) {
        let _ = writeln!(
            o,
            "### b. Contended: C clients on ONE lock, blocking acquire, hold ~0 ({}), release; {} s window per run\n",
            if cfg.hold.is_zero() {
                "yield only".to_string()
            } else {
                format!("{:?}", cfg.hold)
            },
            cfg.duration.as_secs_f64()
        );
        o.push_str("| backend | C | run | handoffs/s | wait p50 | p99 | p99.9 | max | handoffs | per-client min/max | max holders | ME violations | errors |\n");
        o.push_str("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
        for r in results {
            let mut rows = r.contended.clone();
            rows.sort_by_key(|x| (x.c, x.run));
            for x in rows {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {}/{} | {} | {} | {} |",
                    r.label,
                    x.c,
                    x.run,
                    rate(x.handoffs, x.secs),
                    ms(x.wait.p50),
                    ms(x.wait.p99),
                    ms(x.wait.p999),
                    ms(x.wait.max),
                    x.handoffs,
                    x.per_client_min,
                    x.per_client_max,
                    x.max_holders,
                    x.violations,
                    x.errors
                );
                if let Some(e) = &x.first_error {
                    errors.push(format!(
                        "{} contended C={} run {}: {} errors, first: {e}",
                        r.label, x.c, x.run, x.errors
                    ));
                }
            }
        }
        o.push_str(
            "\nwait = acquire call -> granted, ms. per-client min/max = fewest and most grants one client got \
             (fairness). ME violations = grants observed while another client of this \
             process still counted itself holder (must be 0).\n\n",
        );
    }

    if results.iter().any(|r| !r.failover.is_empty()) {
        let _ = writeln!(
            o,
            "### c. Failover: holder with TTL {} s crashes (no release, renewals stop, connection dropped) {}–{} ms after acquiring; time until a queued waiter is granted\n",
            cfg.failover_ttl.as_secs_f64(),
            cfg.failover_settle.as_millis(),
            (cfg.failover_settle + cfg.failover_ttl / 2).as_millis()
        );
        o.push_str("| backend | run | granted TTL | trials ok | crash->grant min | p50 | max | past lease expiry p50 | max | early grants | errors |\n");
        o.push_str("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
        for r in results {
            for x in &r.failover {
                let (mn, mx) = min_max(&x.failover_ms);
                let (_, pmx) = min_max(&x.past_expiry_ms);
                let past = if x.past_expiry_ms.is_empty() {
                    ("n/a".to_string(), "n/a".to_string())
                } else {
                    (ms(median(&x.past_expiry_ms)), ms(pmx))
                };
                let none = x.failover_ms.is_empty();
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    r.label,
                    x.run,
                    x.effective_ttl
                        .map(|t| format!("{:.1} s", t.as_secs_f64()))
                        .unwrap_or("?".into()),
                    x.failover_ms.len(),
                    if none { "-".into() } else { ms(mn) },
                    if none {
                        "-".into()
                    } else {
                        ms(median(&x.failover_ms))
                    },
                    if none { "-".into() } else { ms(mx) },
                    past.0,
                    past.1,
                    x.early_grants,
                    x.errors
                );
                if let Some(e) = &x.first_error {
                    errors.push(format!(
                        "{} failover run {}: {} errors, first: {e}",
                        r.label, x.run, x.errors
                    ));
                }
            }
        }
        o.push_str(
            "\nms. past lease expiry = grant time − (victim's last renewal ack + TTL): how long after the \
             session could first have expired the waiter actually got the lock (negative = before the \
             client-side expiry estimate). early grants = waiter granted while the victim was still alive (must be 0).\n\n",
        );
        o.push_str(
            "For oclocks the renewal is the victim's last acknowledged keepalive, timed from its *send* \
             (the instant the client's lease counts from), and TTL is the session timeout the server \
             granted. The crash tears down the victim client's runtime: keepalives stop, its socket is \
             closed without CLOSE, nothing is released.\n\n",
        );
    }

    o.push_str("### Backends\n\n");
    for r in results {
        let _ = writeln!(
            o,
            "- **{}** ({}): {}",
            r.label,
            r.version.as_deref().unwrap_or("version unknown"),
            r.describe
        );
    }
    o.push('\n');
    if !errors.is_empty() {
        o.push_str("### Errors\n\n");
        for e in errors {
            let _ = writeln!(o, "- {e}");
        }
        o.push('\n');
    }
    o
}

#[derive(Serialize)]
pub struct JsonReport {
    pub label: String,
    pub version: Option<String>,
    pub describe: String,
    pub config: JsonConfig,
    pub uncontended: Vec<JsonUnc>,
    pub contended: Vec<JsonCon>,
    pub failover: Vec<JsonFail>,
}

#[derive(Serialize)]
pub struct JsonConfig {
    pub duration_s: f64,
    pub max_ops: u64,
    pub runs: usize,
    pub session_ttl_s: f64,
    pub failover_ttl_s: f64,
    pub failover_trials: usize,
    pub failover_settle_ms: u128,
    pub hold_us: u128,
    pub cancel_at_deadline: bool,
    pub drain_timeout_s: f64,
    pub zone: String,
    pub endpoints: Vec<String>,
}

#[derive(Serialize)]
pub struct JsonUnc {
    pub c: usize,
    pub run: usize,
    pub cycles: u64,
    pub secs: f64,
    pub cycles_per_s: f64,
    /// ms
    pub acquire: Q,
    /// ms
    pub cycle: Q,
    pub errors: u64,
    pub first_error: Option<String>,
}

#[derive(Serialize)]
pub struct JsonCon {
    pub c: usize,
    pub run: usize,
    pub handoffs: u64,
    pub secs: f64,
    pub handoffs_per_s: f64,
    /// ms
    pub wait: Q,
    pub per_client_min: u64,
    pub per_client_max: u64,
    pub max_holders: i64,
    pub violations: u64,
    pub token_regressions: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

#[derive(Serialize)]
pub struct JsonFail {
    pub run: usize,
    pub ttl_s: f64,
    pub granted_ttl_s: Option<f64>,
    pub trials_ok: usize,
    pub failover_ms: Vec<f64>,
    pub past_expiry_ms: Vec<f64>,
    pub early_grants: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

fn unc(x: &UncRow) -> JsonUnc {
    JsonUnc {
        c: x.c,
        run: x.run,
        cycles: x.cycles,
        secs: x.secs,
        cycles_per_s: rate(x.cycles, x.secs),
        acquire: x.acq,
        cycle: x.cycle,
        errors: x.errors,
        first_error: x.first_error.clone(),
    }
}

fn con(x: &ConRow) -> JsonCon {
    JsonCon {
        c: x.c,
        run: x.run,
        handoffs: x.handoffs,
        secs: x.secs,
        handoffs_per_s: rate(x.handoffs, x.secs),
        wait: x.wait,
        per_client_min: x.per_client_min,
        per_client_max: x.per_client_max,
        max_holders: x.max_holders,
        violations: x.violations,
        token_regressions: x.token_regressions,
        errors: x.errors,
        first_error: x.first_error.clone(),
    }
}

fn fail(x: &FailRow) -> JsonFail {
    JsonFail {
        run: x.run,
        ttl_s: x.ttl.as_secs_f64(),
        granted_ttl_s: x.effective_ttl.map(|t| t.as_secs_f64()),
        trials_ok: x.failover_ms.len(),
        failover_ms: x.failover_ms.clone(),
        past_expiry_ms: x.past_expiry_ms.clone(),
        early_grants: x.early_grants,
        errors: x.errors,
        first_error: x.first_error.clone(),
    }
}

pub fn json(r: &SuiteResult, cfg: &BenchCfg) -> JsonReport {
    JsonReport {
        label: r.label.clone(),
        version: r.version.clone(),
        describe: r.describe.clone(),
        config: JsonConfig {
            duration_s: cfg.duration.as_secs_f64(),
            max_ops: cfg.max_ops,
            runs: cfg.runs,
            session_ttl_s: cfg.session_ttl.as_secs_f64(),
            failover_ttl_s: cfg.failover_ttl.as_secs_f64(),
            failover_trials: cfg.failover_trials,
            failover_settle_ms: cfg.failover_settle.as_millis(),
            hold_us: cfg.hold.as_micros(),
            cancel_at_deadline: cfg.cancel_at_deadline,
            drain_timeout_s: cfg.drain_timeout.as_secs_f64(),
            zone: cfg.zone.clone(),
            endpoints: cfg.client.endpoints.clone(),
        },
        uncontended: r.uncontended.iter().map(unc).collect(),
        contended: r.contended.iter().map(con).collect(),
        failover: r.failover.iter().map(fail).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_formatted_like_lockbench() {
        assert_eq!(ms(0.0), "0");
        assert_eq!(ms(0.7394), "0.739");
        assert_eq!(ms(2.304), "2.30");
        assert_eq!(ms(99.904), "99.90");
        assert_eq!(ms(104.6), "105");
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(min_max(&[2.0, -1.0, 5.0]), (-1.0, 5.0));
    }
}
