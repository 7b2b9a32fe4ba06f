//! The sequential specification of one lock, and the per-lock split of a
//! history that the linearizability search runs on.
//!
//! The model state is the set of current holders (each tagged with the
//! acquire that made it, its token if known, its client, mode and kind) and
//! the largest token granted so far. The rules, one per operation and
//! outcome, are tabulated in `docs/testing.md` ("History checker"); in
//! short:
//!
//! - acquire ok(t): no conflicting holder, and `t` above every earlier token;
//!   adds the holder. Indeterminate: the same without a known token.
//! - release ok: the token is held, and is removed; ok(already released):
//!   the token is not held afterwards (an earlier attempt of the same
//!   release may have released it); fail(not held): the token is not held.
//! - refresh ok: held; fail(not held): not held.
//! - cancel ok(gave back t): the acquire's grant is held (with token t) and
//!   is removed; ok(nothing): the acquire's grant is not held, and the
//!   acquire can no longer take effect afterwards.
//! - close: every connection holder of the client is removed.
//! - record end(t) (expiry, TTL, break): the grant t is held and is removed.
//!
//! Failed operations ("refused") have no effect and are left out.

use std::collections::{BTreeMap, BTreeSet};

use oclocks_core::{ClientId, EndReason, Kind, LossReason, Mode, Token};

use crate::history::{
    kind_str, mode_str, Call, Fail, History, LockKey, OpId, Outcome, RecordKind, Ret, Time,
};

/// Where a per-lock operation came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    Client(OpId),
    /// Index into the history's record.
    Record(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReleaseRes {
    Released,
    Already,
    NotHeld,
    Maybe,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CancelRes {
    Gave(Token),
    Nothing,
    Maybe,
}

/// One operation as the model sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum MOp {
    Acquire {
        client: u32,
        mode: Mode,
        kind: Kind,
        /// `None`: indeterminate, token unknown.
        token: Option<Token>,
    },
    Release {
        token: Token,
        res: ReleaseRes,
    },
    Refresh {
        token: Token,
        /// ok → held; fail(not held) → not held.
        held: bool,
    },
    Cancel {
        /// Local index of the acquire.
        acquire: u32,
        res: CancelRes,
    },
    Close {
        client: u32,
    },
    /// From the record: grant `token` ended involuntarily.
    End {
        token: Token,
        /// Local client index; `NO_CLIENT` when unknown or not in this lock.
        client: u32,
        reason: LossReason,
        /// Some client operation names this token (as granted or given back).
        claimed: bool,
    },
}

pub(crate) const NO_CLIENT: u32 = u32::MAX;

/// One operation of a lock's sub-history.
#[derive(Clone, Debug)]
pub(crate) struct LOp {
    pub source: Source,
    pub invoke: Time,
    /// `None`: may take effect at any point after `invoke`, or never.
    pub ret: Option<Time>,
    pub m: MOp,
}

/// One lock's share of a history.
#[derive(Clone, Debug)]
pub(crate) struct Sub {
    pub lock: LockKey,
    pub ops: Vec<LOp>,
    /// For each local op that is an acquire: the local indices of its cancels.
    pub cancels_of: Vec<Vec<u32>>,
    pub clients: Vec<ClientId>,
}

/// A holder in the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Holder {
    /// Local index of the acquire that made it.
    pub op: u32,
    pub token: Option<Token>,
    pub client: u32,
    pub mode: Mode,
    pub kind: Kind,
}

/// The model state of one lock.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub(crate) struct State {
    /// Sorted by `op`.
    pub holders: Vec<Holder>,
    pub max_token: Token,
}

impl State {
    fn with(&self, h: Holder) -> State {
        let mut s = self.clone();
        let at = s.holders.partition_point(|x| x.op < h.op);
        s.holders.insert(at, h);
        s
    }

    fn without(&self, i: usize) -> State {
        let mut s = self.clone();
        s.holders.remove(i);
        s
    }

    fn by_token(&self, t: Token) -> Option<usize> {
        self.holders.iter().position(|h| h.token == Some(t))
    }

    fn by_op(&self, op: u32) -> Option<usize> {
        self.holders.iter().position(|h| h.op == op)
    }
}

/// Why an operation cannot take effect in a state.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Why {
    Conflict(Holder),
    TokenNotAbove {
        max: Token,
    },
    CancelledBefore {
        cancel: u32,
    },
    NotHeld,
    StillHeld(Holder),
    WrongToken {
        holder: Holder,
        token: Token,
    },
    /// Record end of a token whose client operation must come first, or
    /// that ended already.
    EndOfClaimed,
    /// Session expiry of a static holder.
    StaticSessionEnd(Holder),
}

/// A set of local op indices.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Bits(Vec<u64>);

impl Bits {
    pub fn new(n: usize) -> Bits {
        Bits(vec![0; n.div_ceil(64)])
    }
    pub fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    pub fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
    pub fn get(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
}

impl Sub {
    /// The successor states of applying op `i` in state `s` (several when
    /// the model must guess which unknown grant a record event names);
    /// `Err` with the reason when there is none.
    pub fn step(&self, s: &State, i: usize, lin: &Bits, out: &mut Vec<State>) -> Result<(), Why> {
        out.clear();
        let op = i as u32;
        match self.ops[i].m {
            MOp::Acquire {
                client,
                mode,
                kind,
                token,
            } => {
                for &c in &self.cancels_of[i] {
                    let blocks = matches!(
                        self.ops[c as usize].m,
                        MOp::Cancel {
                            res: CancelRes::Nothing | CancelRes::Maybe,
                            ..
                        }
                    );
                    if blocks && lin.get(c as usize) {
                        return Err(Why::CancelledBefore { cancel: c });
                    }
                }
                if let Some(h) = s.holders.iter().find(|h| mode.conflicts_with(h.mode)) {
                    return Err(Why::Conflict(*h));
                }
                let mut next = s.with(Holder {
                    op,
                    token,
                    client,
                    mode,
                    kind,
                });
                if let Some(t) = token {
                    if t <= s.max_token {
                        return Err(Why::TokenNotAbove { max: s.max_token });
                    }
                    next.max_token = t;
                }
                out.push(next);
            }
            // "Already released" may answer a retry of this very release
            // (client libraries resend RELEASE after a reconnect): the
            // token is not held afterwards, whoever released it.
            MOp::Release { token, res } => match (res, s.by_token(token)) {
                (ReleaseRes::Released | ReleaseRes::Already | ReleaseRes::Maybe, Some(h)) => {
                    out.push(s.without(h))
                }
                (ReleaseRes::Released, None) => return Err(Why::NotHeld),
                (ReleaseRes::NotHeld, Some(h)) => return Err(Why::StillHeld(s.holders[h])),
                (ReleaseRes::Already | ReleaseRes::NotHeld | ReleaseRes::Maybe, None) => {
                    out.push(s.clone())
                }
            },
            MOp::Refresh { token, held } => match (held, s.by_token(token)) {
                (true, Some(_)) | (false, None) => out.push(s.clone()),
                (true, None) => return Err(Why::NotHeld),
                (false, Some(h)) => return Err(Why::StillHeld(s.holders[h])),
            },
            MOp::Cancel { acquire, res } => match (res, s.by_op(acquire)) {
                (CancelRes::Gave(t), Some(h)) => {
                    let holder = s.holders[h];
                    match holder.token {
                        Some(x) if x != t => return Err(Why::WrongToken { holder, token: t }),
                        _ => out.push(s.without(h)),
                    }
                }
                (CancelRes::Gave(_), None) => return Err(Why::NotHeld),
                (CancelRes::Nothing, Some(h)) => return Err(Why::StillHeld(s.holders[h])),
                (CancelRes::Maybe, Some(h)) => out.push(s.without(h)),
                (CancelRes::Nothing | CancelRes::Maybe, None) => out.push(s.clone()),
            },
            MOp::Close { client } => {
                let mut next = s.clone();
                next.holders
                    .retain(|h| !(h.client == client && h.kind == Kind::Connection));
                out.push(next);
            }
            MOp::End {
                token,
                client,
                reason,
                claimed,
            } => {
                if let Some(h) = s.by_token(token) {
                    let holder = s.holders[h];
                    if reason == LossReason::SessionExpired && holder.kind == Kind::Static {
                        return Err(Why::StaticSessionEnd(holder));
                    }
                    out.push(s.without(h));
                } else if claimed {
                    return Err(Why::EndOfClaimed);
                } else {
                    // A grant no client operation names: the grant of an
                    // indeterminate acquire of that client, or one this
                    // history does not see at all.
                    for (h, holder) in s.holders.iter().enumerate() {
                        let fits = holder.token.is_none()
                            && (client == NO_CLIENT || holder.client == client)
                            && !(reason == LossReason::SessionExpired
                                && holder.kind == Kind::Static);
                        if fits {
                            out.push(s.without(h));
                        }
                    }
                    out.push(s.clone());
                }
            }
        }
        Ok(())
    }

    /// A one-line description of local op `i`.
    pub fn describe(&self, history: &History, i: usize) -> String {
        match self.ops[i].source {
            Source::Client(id) => match history.op(id) {
                Some(op) => op.to_string(),
                None => format!("{id} (missing)"),
            },
            Source::Record(r) => match history.record_events().get(r) {
                Some(ev) => ev.to_string(),
                None => format!("record event {r} (missing)"),
            },
        }
    }

    pub fn describe_holder(&self, history: &History, h: &Holder) -> String {
        let token = h.token.map_or("unknown".to_string(), |t| t.to_string());
        format!(
            "token {token} {} {} of client {:x}, from {}",
            mode_str(h.mode),
            kind_str(h.kind),
            self.clients.get(h.client as usize).copied().unwrap_or(0),
            self.describe(history, h.op as usize)
        )
    }

    pub fn explain(&self, history: &History, why: &Why) -> String {
        match why {
            Why::Conflict(h) => {
                format!("conflicts with holder {}", self.describe_holder(history, h))
            }
            Why::TokenNotAbove { max } => {
                format!("its token is not above token {max}, granted earlier")
            }
            Why::CancelledBefore { cancel } => format!(
                "its cancel took effect before: {}",
                self.describe(history, *cancel as usize)
            ),
            Why::NotHeld => "the grant it names is not held".to_string(),
            Why::StillHeld(h) => format!(
                "the grant is still held: {}",
                self.describe_holder(history, h)
            ),
            Why::WrongToken { holder, token } => format!(
                "gave back token {token} but the acquire holds {}",
                self.describe_holder(history, holder)
            ),
            Why::EndOfClaimed => {
                "the grant it ends is not held (not granted yet, or ended already)".to_string()
            }
            Why::StaticSessionEnd(h) => format!(
                "a static grant does not end with its session: {}",
                self.describe_holder(history, h)
            ),
        }
    }
}

/// Split a (validated) history into per-lock sub-histories.
pub(crate) fn split(history: &History) -> Vec<Sub> {
    let ops = history.ops();
    let mut claimed: BTreeSet<Token> = BTreeSet::new();
    for op in ops {
        match op.outcome {
            Outcome::Ok(Ret::Granted { token }) => {
                claimed.insert(token);
            }
            Outcome::Ok(Ret::Cancelled {
                gave_back: Some(token),
            }) => {
                claimed.insert(token);
            }
            _ => {}
        }
    }
    // Locks each client acquires (for Close).
    let mut client_locks: BTreeMap<ClientId, BTreeSet<LockKey>> = BTreeMap::new();
    for op in ops {
        if let Call::Acquire { client, lock, .. } = &op.call {
            client_locks
                .entry(*client)
                .or_default()
                .insert(lock.clone());
        }
    }
    struct Builder {
        sub: Sub,
        acquires: BTreeMap<OpId, u32>,
        client_ix: BTreeMap<ClientId, u32>,
    }
    impl Builder {
        fn client(&mut self, c: ClientId) -> u32 {
            let n = self.sub.clients.len() as u32;
            *self.client_ix.entry(c).or_insert_with(|| {
                self.sub.clients.push(c);
                n
            })
        }
        fn push(&mut self, op: LOp) -> u32 {
            self.sub.ops.push(op);
            self.sub.cancels_of.push(Vec::new());
            (self.sub.ops.len() - 1) as u32
        }
    }
    let mut subs: BTreeMap<LockKey, Builder> = BTreeMap::new();
    fn get<'a>(subs: &'a mut BTreeMap<LockKey, Builder>, lock: &LockKey) -> &'a mut Builder {
        subs.entry(lock.clone()).or_insert_with(|| Builder {
            sub: Sub {
                lock: lock.clone(),
                ops: Vec::new(),
                cancels_of: Vec::new(),
                clients: Vec::new(),
            },
            acquires: BTreeMap::new(),
            client_ix: BTreeMap::new(),
        })
    }

    let lop = |op: &crate::history::Op, m: MOp| LOp {
        source: Source::Client(op.id),
        invoke: op.invoke,
        ret: op.effect_deadline(),
        m,
    };
    for op in ops {
        match &op.call {
            Call::Acquire {
                client,
                lock,
                mode,
                kind,
            } => {
                let token = match op.outcome {
                    Outcome::Ok(Ret::Granted { token }) => Some(token),
                    Outcome::Indeterminate => None,
                    _ => continue,
                };
                let b = get(&mut subs, lock);
                let client = b.client(*client);
                let i = b.push(lop(
                    op,
                    MOp::Acquire {
                        client,
                        mode: *mode,
                        kind: *kind,
                        token,
                    },
                ));
                b.acquires.insert(op.id, i);
            }
            Call::Release { lock, token, .. } => {
                let res = match op.outcome {
                    Outcome::Ok(Ret::Released { already_released }) => {
                        if already_released {
                            ReleaseRes::Already
                        } else {
                            ReleaseRes::Released
                        }
                    }
                    Outcome::Fail(Fail::NotHeld(_)) => ReleaseRes::NotHeld,
                    Outcome::Indeterminate => ReleaseRes::Maybe,
                    _ => continue,
                };
                let b = get(&mut subs, lock);
                b.push(lop(op, MOp::Release { token: *token, res }));
            }
            Call::Refresh { lock, token, .. } => {
                let held = match op.outcome {
                    Outcome::Ok(_) => true,
                    Outcome::Fail(Fail::NotHeld(_)) => false,
                    _ => continue,
                };
                let b = get(&mut subs, lock);
                b.push(lop(
                    op,
                    MOp::Refresh {
                        token: *token,
                        held,
                    },
                ));
            }
            Call::Cancel { acquire, .. } => {
                if matches!(op.outcome, Outcome::Fail(_)) {
                    continue;
                }
                let res = match op.outcome {
                    Outcome::Ok(Ret::Cancelled { gave_back: Some(t) }) => CancelRes::Gave(t),
                    Outcome::Ok(_) => CancelRes::Nothing,
                    _ => CancelRes::Maybe,
                };
                let Some(Call::Acquire { lock, .. }) = history.op(*acquire).map(|a| &a.call) else {
                    continue;
                };
                let b = get(&mut subs, lock);
                let Some(&a) = b.acquires.get(acquire) else {
                    // The acquire was refused: nothing for a cancel to do,
                    // unless it gave something back.
                    if let CancelRes::Gave(_) = res {
                        // Keep it: it cannot linearize and is reported.
                        b.push(lop(
                            op,
                            MOp::Cancel {
                                acquire: u32::MAX,
                                res,
                            },
                        ));
                    }
                    continue;
                };
                let i = b.push(lop(op, MOp::Cancel { acquire: a, res }));
                b.sub.cancels_of[a as usize].push(i);
            }
            Call::Close { client } => {
                if matches!(op.outcome, Outcome::Fail(_)) {
                    continue;
                }
                let Some(locks) = client_locks.get(client) else {
                    continue;
                };
                for lock in locks {
                    let b = get(&mut subs, lock);
                    let c = b.client(*client);
                    b.push(lop(op, MOp::Close { client: c }));
                }
            }
        }
    }
    for (r, ev) in history.record_events().iter().enumerate() {
        let RecordKind::Ended {
            token,
            client,
            reason: EndReason::Lost(reason),
        } = ev.kind
        else {
            continue;
        };
        let b = get(&mut subs, &ev.lock);
        let client = match client {
            Some(c) => b.client_ix.get(&c).copied().unwrap_or(NO_CLIENT),
            None => NO_CLIENT,
        };
        b.push(LOp {
            source: Source::Record(r),
            invoke: ev.window.0,
            ret: Some(ev.window.1),
            m: MOp::End {
                token,
                client,
                reason,
                claimed: claimed.contains(&token),
            },
        });
    }
    subs.into_values().map(|b| b.sub).collect()
}
