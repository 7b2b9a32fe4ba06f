//! (b) Fencing tokens: unique, and increasing per lock in grant order.
//!
//! Three views, each usable alone: the clients' own grants (a grant that
//! completed before another was invoked must carry the smaller token), the
//! record's grants in record order, and — when the record is complete —
//! every grant a client was told of must be in the record.

use std::collections::{BTreeMap, BTreeSet};

use oclocks_core::Token;

use crate::history::{Call, History, LockKey, OpId, Outcome, RecordKind, Ret, Time};
use crate::report::{CheckOptions, Involved, Violation};

struct Grant {
    id: OpId,
    invoke: Time,
    complete: Time,
    token: Token,
}

pub(crate) fn check(history: &History, options: &CheckOptions, out: &mut Vec<Violation>) {
    // Client grants: unique tokens, real-time order per lock.
    let mut by_token: BTreeMap<Token, OpId> = BTreeMap::new();
    let mut by_lock: BTreeMap<&LockKey, Vec<Grant>> = BTreeMap::new();
    for op in history.ops() {
        let (Call::Acquire { lock, .. }, Outcome::Ok(Ret::Granted { token }), Some(complete)) =
            (&op.call, &op.outcome, op.complete)
        else {
            continue;
        };
        if let Some(first) = by_token.insert(*token, op.id) {
            out.push(Violation::TokenReused {
                token: *token,
                first: Involved::Op(first),
                second: Involved::Op(op.id),
            });
        }
        by_lock.entry(lock).or_default().push(Grant {
            id: op.id,
            invoke: op.invoke,
            complete,
            token: *token,
        });
    }
    for (lock, grants) in &by_lock {
        let mut done: Vec<&Grant> = grants.iter().collect();
        done.sort_by_key(|g| (g.complete, g.id));
        let mut started: Vec<&Grant> = grants.iter().collect();
        started.sort_by_key(|g| (g.invoke, g.id));
        let mut k = 0;
        let mut max: Option<&Grant> = None;
        for b in started {
            while k < done.len() && done[k].complete < b.invoke {
                if max.is_none_or(|m| done[k].token > m.token) {
                    max = Some(done[k]);
                }
                k += 1;
            }
            if let Some(a) = max.filter(|a| a.token >= b.token) {
                out.push(Violation::TokensOutOfOrder {
                    lock: (*lock).clone(),
                    earlier: Involved::Op(a.id),
                    earlier_token: a.token,
                    later: Involved::Op(b.id),
                    later_token: b.token,
                });
                break;
            }
        }
    }

    // Record grants: unique, increasing per lock in record order.
    let mut events: Vec<_> = history
        .record_events()
        .iter()
        .filter_map(|ev| match ev.kind {
            RecordKind::Granted { token, client, .. } => Some((ev.seq, &ev.lock, token, client)),
            RecordKind::Ended { .. } => None,
        })
        .collect();
    events.sort_by_key(|e| e.0);
    let mut record_token: BTreeMap<Token, (u64, &LockKey, u128)> = BTreeMap::new();
    let mut lock_max: BTreeMap<&LockKey, (Token, u64)> = BTreeMap::new();
    let mut out_of_order: BTreeSet<&LockKey> = BTreeSet::new();
    for &(seq, lock, token, client) in &events {
        if let Some((first, _, _)) = record_token.insert(token, (seq, lock, client)) {
            out.push(Violation::TokenReused {
                token,
                first: Involved::Record(first),
                second: Involved::Record(seq),
            });
        }
        match lock_max.get(lock) {
            Some(&(max, at)) if max >= token => {
                if out_of_order.insert(lock) {
                    out.push(Violation::TokensOutOfOrder {
                        lock: lock.clone(),
                        earlier: Involved::Record(at),
                        earlier_token: max,
                        later: Involved::Record(seq),
                        later_token: token,
                    });
                }
            }
            _ => {
                lock_max.insert(lock, (token, seq));
            }
        }
    }

    // Every grant a client heard of is in a complete record.
    if options.record_complete {
        for op in history.ops() {
            let (lock, token) = match (&op.call, &op.outcome) {
                (Call::Acquire { lock, .. }, Outcome::Ok(Ret::Granted { token })) => (lock, *token),
                (
                    Call::Cancel { acquire, .. },
                    Outcome::Ok(Ret::Cancelled {
                        gave_back: Some(token),
                    }),
                ) => match history.op(*acquire).map(|a| &a.call) {
                    Some(Call::Acquire { lock, .. }) => (lock, *token),
                    _ => continue,
                },
                _ => continue,
            };
            let known = record_token
                .get(&token)
                .is_some_and(|(_, l, c)| *l == lock && *c == op.call.client());
            if !known {
                out.push(Violation::GrantNotInRecord {
                    op: op.id,
                    lock: lock.clone(),
                    token,
                });
            }
        }
    }
}
