//! (d) The cluster's own record never overlaps conflicting grants: replayed
//! in record order, a grant never begins while a conflicting grant of the
//! same lock has not ended (exclusive conflicts with everything; shared
//! grants may overlap each other). Ends are whatever the record says:
//! release, session expiry, TTL, break — a legitimate expiry is no
//! violation, a grant before it is.

use std::collections::BTreeMap;

use oclocks_core::{Mode, Token};

use crate::history::{History, LockKey, RecordEvent, RecordKind};
use crate::report::{CheckOptions, Involved, Violation};

pub(crate) fn check(history: &History, options: &CheckOptions, out: &mut Vec<Violation>) {
    let mut by_lock: BTreeMap<&LockKey, Vec<&RecordEvent>> = BTreeMap::new();
    for ev in history.record_events() {
        by_lock.entry(&ev.lock).or_default().push(ev);
    }
    for (lock, mut events) in by_lock {
        events.sort_by_key(|e| e.seq);
        let mut holders: BTreeMap<Token, (Mode, u64)> = BTreeMap::new();
        for ev in events {
            match ev.kind {
                RecordKind::Granted { token, mode, .. } => {
                    if let Some((&held, &(_, since))) =
                        holders.iter().find(|(_, (m, _))| mode.conflicts_with(*m))
                    {
                        out.push(Violation::OverlappingGrants {
                            lock: lock.clone(),
                            held,
                            held_since: Involved::Record(since),
                            granted: token,
                            granted_at: Involved::Record(ev.seq),
                        });
                    }
                    if holders.insert(token, (mode, ev.seq)).is_some() {
                        out.push(Violation::RecordInconsistent {
                            lock: lock.clone(),
                            at: Involved::Record(ev.seq),
                            what: format!("token {token} granted while it is current"),
                        });
                    }
                }
                RecordKind::Ended { token, .. } => {
                    if holders.remove(&token).is_none() && options.record_complete {
                        out.push(Violation::RecordInconsistent {
                            lock: lock.clone(),
                            at: Involved::Record(ev.seq),
                            what: format!("token {token} ends but is not current"),
                        });
                    }
                }
            }
        }
    }
}
