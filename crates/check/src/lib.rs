//! History checker for OpenCluster-Locks: did the lock service keep its
//! guarantees (SPEC section 4) in what a test saw?
//!
//! A test records a [`History`] — client operations as invoke/complete
//! pairs with outcome ok, fail or indeterminate, plus facts from the
//! cluster's own committed record ([`RecordEvent`]: grants and how they
//! ended) — through a [`Recorder`] shared by its tasks, and hands it to
//! [`check`], which returns a [`Report`]:
//!
//! - **(a) linearizability** of acquire/release/refresh/cancel/close
//!   against a lock model with fencing tokens, where involuntary ends
//!   (session expiry, TTL, break) come from the record. A Wing–Gong–Lowe
//!   search with memoisation, per lock (locks are independent), in which an
//!   indeterminate operation may take effect at any point after its
//!   invocation or never. A failure names the operations involved.
//! - **(b) tokens**: unique, and increasing per lock in grant order, both
//!   by the clients' real-time order and by the record's order.
//! - **(c) fenced resource**: [`FencedRegister`] and [`check_increments`]
//!   — no acknowledged read-modify-write increment is lost.
//! - **(d) the record**: no grant while a conflicting grant of the same lock
//!   is still current by the record (shared grants may overlap).
//!
//! What it deliberately does not know: how events were produced. The
//! deterministic simulation (`oclocks-sim`) and the chaos suite with real
//! processes record the same types.

mod history;
mod linear;
mod model;
mod record;
mod register;
mod report;
mod tokens;

pub use history::{
    Call, Fail, History, HistoryError, LockKey, Op, OpId, Outcome, RecordEvent, RecordKind,
    Recorder, Ret, Time,
};
pub use register::{check_increments, Fenced, FencedRegister, RegisterState};
pub use report::{CheckOptions, Counterexample, Inconclusive, Involved, Report, Violation};

/// Check every guarantee the history can show (all but (c), which needs the
/// register: see [`check_increments`]). `Err` only for a malformed history.
pub fn check(history: &History, options: &CheckOptions) -> Result<Report, HistoryError> {
    history.validate()?;
    let mut report = Report {
        ops: history.ops().len(),
        record_events: history.record_events().len(),
        ..Report::default()
    };
    let subs = model::split(history);
    report.locks = subs.len();
    for sub in &subs {
        let concurrency = linear::max_concurrency(sub);
        report.max_concurrency = report.max_concurrency.max(concurrency);
        match linear::search(sub, history, options.states_max) {
            linear::LinResult::Ok { states } => report.states += states,
            linear::LinResult::Violation(c) => {
                report.violations.push(Violation::NotLinearizable(c));
            }
            linear::LinResult::Budget { states } => {
                report.states += states;
                report.inconclusive.push(Inconclusive {
                    lock: sub.lock.clone(),
                    ops: sub.ops.len(),
                    max_concurrency: concurrency,
                    states,
                });
            }
        }
    }
    tokens::check(history, options, &mut report.violations);
    record::check(history, options, &mut report.violations);
    Ok(report)
}
