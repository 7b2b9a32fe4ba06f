//! Runs one scenario against the engine and the reference model side by side:
//! resolves each abstract step into a concrete command from the model's
//! state, applies it to both, and compares the reply, the effects (as a
//! multiset), the lock table as queries see it, the clock and the token
//! counter, and the engine's own invariants. A snapshot step restores the
//! engine from its snapshot and goes on with the copy, while the original
//! keeps running as a twin whose every result must be identical.
//!
//! On a mismatch it returns the concrete command sequence that led there.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};

use oclocks_core::{
    Applied, Caller, Command, Effect, Engine, EngineLimits, KeyProof, LockInfo, LockRequest,
    LossReason, Nonce, Op, Refusal, Reply, Token,
};

use crate::generate::{
    Action, CancelSel, Clock, LockSel, LowWater, NonceSel, ProofSel, Scenario, Step, TokenSel, Who,
    CLIENTS, KEYS, NAMES, ZONES,
};
use crate::reference::{LockKey, Model, NO_WHAT};

/// What the comparison leaves out.
#[derive(Clone, Copy, Debug)]
pub struct Filter {
    /// Drop `Effect::Watch` from both sides before comparing.
    pub ignore_watch: bool,
}

pub fn identity_of(client_idx: usize, wrong: bool) -> String {
    let alice = client_idx < 2;
    if alice != wrong {
        "alice".to_string()
    } else {
        "bob".to_string()
    }
}

fn caller(client_idx: usize, wrong: bool) -> Caller {
    Caller {
        client: CLIENTS[client_idx],
        identity: identity_of(client_idx, wrong),
    }
}

fn client_index(client: u128) -> usize {
    CLIENTS
        .iter()
        .position(|c| *c == client)
        .expect("harness: client outside the universe")
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-text panic)".to_string()
    }
}

/// A refusal without its free-text `what` (the engine's wording is its own).
fn norm_refusal(r: &Refusal) -> Refusal {
    match r {
        Refusal::Limit { .. } => Refusal::Limit { what: NO_WHAT },
        Refusal::Invalid { .. } => Refusal::Invalid { what: NO_WHAT },
        other => other.clone(),
    }
}

pub fn norm_reply(r: &Reply) -> Reply {
    match r {
        Reply::Refused(x) => Reply::Refused(norm_refusal(x)),
        Reply::Keepalive(v) => Reply::Keepalive(
            v.iter()
                .map(|x| x.as_ref().map_err(norm_refusal).copied())
                .collect(),
        ),
        other => other.clone(),
    }
}

fn norm_effect(e: &Effect) -> Effect {
    match e {
        Effect::WaitEnded {
            client,
            nonce,
            zone,
            name,
            refusal,
        } => Effect::WaitEnded {
            client: *client,
            nonce: *nonce,
            zone: zone.clone(),
            name: name.clone(),
            refusal: norm_refusal(refusal),
        },
        other => other.clone(),
    }
}

/// Effects as a sorted multiset (canonical key: the Debug text).
pub fn effect_multiset(effects: &[Effect], filter: Filter) -> Vec<String> {
    let mut v: Vec<String> = effects
        .iter()
        .filter(|e| !(filter.ignore_watch && matches!(e, Effect::Watch { .. })))
        .map(|e| format!("{:?}", norm_effect(e)))
        .collect();
    v.sort();
    v
}

pub struct Harness {
    pub limits: EngineLimits,
    pub model: Model,
    pub engine: Engine,
    /// The engine a snapshot was taken from, still running beside its copy.
    pub twin: Option<Engine>,
    filter: Filter,
    zones: usize,
    names: usize,
    term: u64,
    leader_now: u64,
    next_nonce: BTreeMap<u128, Nonce>,
    used_nonces: BTreeMap<u128, Vec<Nonce>>,
    sent_low_water: BTreeMap<u128, Nonce>,
    /// LOCK nonce of each grant (token -> (client, nonce)), for CANCEL.
    grant_nonce: BTreeMap<Token, (u128, Nonce)>,
    lock_history: Vec<LockRequest>,
    pub trace: Vec<String>,
    last: Option<Applied>,
    /// Run the model alone (to measure what the generator reaches).
    model_only: bool,
    /// How often each interesting outcome happened (model side).
    pub stats: BTreeMap<&'static str, usize>,
}

/// The outcomes the generator must reach (see `generator_reaches_every_outcome`).
pub const STATS: &[&str] = &[
    "reply Granted",
    "reply Granted (retry)",
    "reply Queued",
    "reply Queued (retry)",
    "reply Locked",
    "reply Locked (itself)",
    "reply Deadlock",
    "reply Limit",
    "reply Invalid",
    "reply Forbidden",
    "reply NoSession",
    "reply StaleNonce",
    "reply Cancelled (refusal)",
    "reply Timeout (retry)",
    "reply UnknownGrant",
    "reply Lost",
    "reply Replay",
    "reply NotOwner",
    "reply Released",
    "reply Released (already)",
    "reply Refreshed",
    "reply Cancelled (gave back)",
    "reply Cancelled (wait)",
    "reply Broken",
    "reply Session (resumed)",
    "reply Session (lost)",
    "effect Granted",
    "effect WaitEnded Timeout",
    "effect Lost SessionExpired",
    "effect Lost TtlExpired",
    "effect Lost Broken",
    "effect Lost (detached)",
    "effect SessionExpired",
    "effect Watch",
    "shared holders",
    "lock-delay",
    "ended grant evicted",
    "rebase",
    "snapshot",
];

impl Harness {
    pub fn new(s: &Scenario, filter: Filter) -> Harness {
        Harness::bare(s.profile.limits(), s.zones, s.names, filter)
    }

    pub fn bare(limits: EngineLimits, zones: usize, names: usize, filter: Filter) -> Harness {
        Harness {
            model: Model::new(limits.clone()),
            engine: Engine::new(limits.clone()),
            limits,
            twin: None,
            filter,
            zones,
            names,
            term: 0,
            leader_now: 0,
            next_nonce: BTreeMap::new(),
            used_nonces: BTreeMap::new(),
            sent_low_water: BTreeMap::new(),
            grant_nonce: BTreeMap::new(),
            lock_history: Vec::new(),
            trace: Vec::new(),
            last: None,
            model_only: false,
            stats: BTreeMap::new(),
        }
    }

    fn fail(&self, what: String) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "model/engine mismatch: {what}");
        let _ = writeln!(out, "limits: {:?}", self.limits);
        let _ = writeln!(out, "commands applied (the last one failed):");
        for (i, t) in self.trace.iter().enumerate() {
            let _ = writeln!(out, "  #{i:<3} {t}");
        }
        out
    }

    fn lock_key(&self, sel: LockSel) -> LockKey {
        match sel {
            LockSel::At(z, n) => (
                ZONES[z % self.zones].to_string(),
                NAMES[n % self.names].to_string(),
            ),
            LockSel::EmptyName => (ZONES[0].to_string(), String::new()),
            LockSel::EmptyZone => (String::new(), NAMES[0].to_string()),
            LockSel::LongName => (ZONES[0].to_string(), "name-too-long".to_string()),
            LockSel::LongZone => ("zone-too-long".to_string(), NAMES[0].to_string()),
        }
    }

    fn all_holder_tokens(&self) -> Vec<Token> {
        let mut v: Vec<Token> = self
            .model
            .locks
            .values()
            .flat_map(|l| l.holders.iter().map(|h| h.token))
            .collect();
        v.sort();
        v
    }

    fn token(&self, key: &LockKey, sel: TokenSel) -> Token {
        let last = self.model.last_token;
        match sel {
            TokenSel::Holder(i) => {
                let t = self.model.holder_tokens(key);
                if t.is_empty() {
                    last
                } else {
                    t[i % t.len()]
                }
            }
            TokenSel::AnyHolder(i) => {
                let t = self.all_holder_tokens();
                if t.is_empty() {
                    last
                } else {
                    t[i % t.len()]
                }
            }
            TokenSel::Recent(k) => last.saturating_sub(k),
            TokenSel::Never(zero) => {
                if zero {
                    0
                } else {
                    last + 1
                }
            }
        }
    }

    fn who(&self, who: Who, token: Token) -> Caller {
        match who {
            Who::Client(c, w) => caller(c, w),
            Who::TokenOwner => match self.model.find_holder(token) {
                Some((_, h)) => caller(client_index(h.client), false),
                None => caller(0, false),
            },
        }
    }

    fn proof(&self, token: Token, sel: ProofSel) -> Option<KeyProof> {
        let (key, counter) = match self.model.find_holder(token) {
            Some((_, h)) => (h.key.unwrap_or(KEYS[0]), h.counter),
            None => (KEYS[0], 5),
        };
        let other = if key == KEYS[0] { KEYS[1] } else { KEYS[0] };
        match sel {
            ProofSel::None => None,
            ProofSel::Fresh => Some(KeyProof {
                key,
                counter: counter + 1,
            }),
            ProofSel::Replay => Some(KeyProof { key, counter }),
            ProofSel::WrongKey => Some(KeyProof {
                key: other,
                counter: counter + 1,
            }),
        }
    }

    fn nonce(&mut self, client: u128, sel: NonceSel) -> Nonce {
        let next = *self.next_nonce.get(&client).unwrap_or(&1);
        match sel {
            NonceSel::Fresh => {
                self.next_nonce.insert(client, next + 1);
                self.used_nonces.entry(client).or_default().push(next);
                next
            }
            NonceSel::Peek => next,
            NonceSel::Old(k) => {
                let used = self.used_nonces.get(&client).cloned().unwrap_or_default();
                if used.is_empty() {
                    next
                } else {
                    used[used.len() - 1 - k % used.len()]
                }
            }
        }
    }

    fn resolve(&mut self, action: &Action) -> Option<Op> {
        Some(match action {
            Action::Open {
                client,
                wrong_identity,
                timeout_ms,
            } => Op::OpenSession {
                caller: caller(*client, *wrong_identity),
                timeout_ms: *timeout_ms,
            },
            Action::Keepalive(v) => Op::Keepalive {
                callers: v.iter().map(|(c, w)| caller(*c, *w)).collect(),
            },
            Action::KeepaliveAll => Op::Keepalive {
                callers: (0..CLIENTS.len()).map(|c| caller(c, false)).collect(),
            },
            Action::Close {
                client,
                wrong_identity,
            } => Op::CloseSession {
                caller: caller(*client, *wrong_identity),
            },
            Action::Lock(l) => {
                let mut who = caller(l.client, l.wrong_identity);
                let mut owner = l.owner;
                if let Some((contended, i)) = l.nested {
                    let holders = |only_contended: bool| -> Vec<(u128, u64)> {
                        self.model
                            .locks
                            .values()
                            .filter(|lk| !only_contended || !lk.queue.is_empty())
                            .flat_map(|lk| {
                                lk.holders
                                    .iter()
                                    .filter(|h| h.attached)
                                    .map(|h| (h.client, h.owner))
                            })
                            .collect()
                    };
                    let mut held = if contended { holders(true) } else { Vec::new() };
                    if held.is_empty() {
                        held = holders(false);
                    }
                    if !held.is_empty() {
                        let (c, o) = held[i % held.len()];
                        who = caller(client_index(c), false);
                        owner = o;
                    }
                }
                let (zone, name) = self.lock_key(l.lock);
                let nonce = self.nonce(who.client, l.nonce);
                let kept = *self.sent_low_water.get(&who.client).unwrap_or(&0);
                let low_water = match l.low_water {
                    LowWater::Keep => kept.min(nonce),
                    LowWater::UpTo => nonce,
                    LowWater::Lag(k) => nonce.saturating_sub(k),
                    LowWater::Over => nonce + 1,
                };
                if low_water <= nonce {
                    self.sent_low_water.insert(who.client, kept.max(low_water));
                }
                let req = LockRequest {
                    caller: who,
                    zone,
                    name,
                    mode: l.mode,
                    kind: l.kind,
                    ttl_ms: l.ttl_ms,
                    wait_ms: l.wait_ms,
                    lock_delay_ms: l.lock_delay_ms,
                    owner,
                    nonce,
                    low_water,
                    key: l.key.map(|(k, counter)| KeyProof {
                        key: KEYS[k],
                        counter,
                    }),
                };
                self.lock_history.push(req.clone());
                Op::Lock(req)
            }
            Action::RetryLock(i) => {
                if self.lock_history.is_empty() {
                    return None;
                }
                let n = self.lock_history.len();
                Op::Lock(self.lock_history[n - 1 - i % n].clone())
            }
            Action::Cancel(sel) => match sel {
                CancelSel::Waiter(i) => {
                    let waiters: Vec<(u128, Nonce)> = self
                        .model
                        .locks
                        .values()
                        .flat_map(|l| l.queue.iter().map(|w| (w.client, w.nonce)))
                        .collect();
                    if waiters.is_empty() {
                        return None;
                    }
                    let (c, nonce) = waiters[i % waiters.len()];
                    Op::Cancel {
                        caller: caller(client_index(c), false),
                        nonce,
                    }
                }
                CancelSel::Holder(i) => {
                    let held: Vec<(u128, Nonce)> = self
                        .all_holder_tokens()
                        .into_iter()
                        .filter_map(|t| self.grant_nonce.get(&t).copied())
                        .collect();
                    if held.is_empty() {
                        return None;
                    }
                    let (c, nonce) = held[i % held.len()];
                    Op::Cancel {
                        caller: caller(client_index(c), false),
                        nonce,
                    }
                }
                CancelSel::Nonce(c, w, n) => {
                    let who = caller(*c, *w);
                    let nonce = self.nonce(who.client, *n);
                    Op::Cancel { caller: who, nonce }
                }
            },
            Action::Release {
                who,
                lock,
                token,
                proof,
            } => {
                let (zone, name) = self.lock_key(*lock);
                let token = self.token(&(zone.clone(), name.clone()), *token);
                Op::Release {
                    caller: self.who(*who, token),
                    zone,
                    name,
                    token,
                    key: self.proof(token, *proof),
                }
            }
            Action::Refresh {
                who,
                lock,
                token,
                ttl_ms,
                proof,
            } => {
                let (zone, name) = self.lock_key(*lock);
                let token = self.token(&(zone.clone(), name.clone()), *token);
                Op::Refresh {
                    caller: self.who(*who, token),
                    zone,
                    name,
                    token,
                    ttl_ms: *ttl_ms,
                    key: self.proof(token, *proof),
                }
            }
            Action::Break { lock, expected } => {
                let (zone, name) = self.lock_key(*lock);
                let key = (zone.clone(), name.clone());
                let expected_token = expected.map(|t| self.token(&key, t));
                Op::Break {
                    zone,
                    name,
                    expected_token,
                }
            }
            Action::Watch { client, lock } => {
                let (zone, name) = self.lock_key(*lock);
                Op::Watch {
                    caller: caller(*client, false),
                    zone,
                    name,
                }
            }
            Action::Unwatch { client, lock } => {
                let (zone, name) = self.lock_key(*lock);
                Op::Unwatch {
                    caller: caller(*client, false),
                    zone,
                    name,
                }
            }
            Action::Tick => Op::Tick,
            Action::Rebase => Op::Rebase,
            Action::Snapshot => return None,
        })
    }

    fn stamp(&mut self, clock: &Clock, op: Op) -> Command {
        let now_ms = match clock {
            Clock::Advance(d) => {
                self.leader_now += d;
                self.leader_now
            }
            Clock::Behind(d) => {
                if matches!(op, Op::Rebase) {
                    self.leader_now
                } else {
                    self.leader_now.saturating_sub(*d)
                }
            }
            Clock::NewTerm(base) => {
                self.term += 1;
                self.leader_now = *base;
                self.leader_now
            }
        };
        Command {
            term: self.term,
            now_ms,
            op,
        }
    }

    /// Open the first `n` clients' sessions at time 0.
    pub fn open_initial(&mut self, n: usize) -> Result<(), String> {
        for c in 0..n {
            let cmd = Command {
                term: 0,
                now_ms: 0,
                op: Op::OpenSession {
                    caller: caller(c, false),
                    timeout_ms: 0,
                },
            };
            self.apply(cmd)?;
        }
        Ok(())
    }

    pub fn step(&mut self, step: &Step) -> Result<(), String> {
        if let Action::Snapshot = step.action {
            return self.snapshot_restore();
        }
        let Some(op) = self.resolve(&step.action) else {
            return Ok(());
        };
        let cmd = self.stamp(&step.clock, op);
        let (term, now_ms) = (cmd.term, cmd.now_ms);
        let reopen = match &cmd.op {
            Op::Lock(LockRequest { caller, .. })
            | Op::Cancel { caller, .. }
            | Op::Release { caller, .. }
            | Op::Refresh { caller, .. }
            | Op::Watch { caller, .. } => Some(caller.clone()),
            _ => None,
        };
        self.apply(cmd)?;
        // Like a real client, one told NO_SESSION opens a new session.
        if let Some(caller) = reopen {
            let right = identity_of(client_index(caller.client), false) == caller.identity;
            if right && !self.model.sessions.contains_key(&caller.client) {
                let op = Op::OpenSession {
                    caller,
                    timeout_ms: 0,
                };
                self.apply(Command { term, now_ms, op })?;
            }
        }
        Ok(())
    }

    fn snapshot_restore(&mut self) -> Result<(), String> {
        self.count("snapshot");
        if self.model_only {
            return Ok(());
        }
        let bytes = self.engine.snapshot();
        let restored = match Engine::restore(self.limits.clone(), &bytes) {
            Ok(e) => e,
            Err(e) => return Err(self.fail(format!("restore of a fresh snapshot failed: {e:?}"))),
        };
        if restored.snapshot() != bytes {
            return Err(self.fail(
                "snapshot of the restored engine differs from the original snapshot".into(),
            ));
        }
        self.trace.push(
            "-- snapshot + restore: the copy goes on, the original runs beside it as a twin".into(),
        );
        let original = std::mem::replace(&mut self.engine, restored);
        self.twin = Some(original);
        self.compare_state()
    }

    /// The model's result of the last command (for focused tests).
    pub fn last(&self) -> Option<&Applied> {
        self.last.as_ref()
    }

    pub fn apply(&mut self, cmd: Command) -> Result<(), String> {
        self.trace.push(format!("{cmd:?}"));
        let last_before = self.model.last_token;
        let queued_before = self
            .model
            .locks
            .values()
            .map(|l| l.queue.len())
            .sum::<usize>();
        let rebased = cmd.term > self.model.term || matches!(cmd.op, Op::Rebase);
        let want = self.model.apply(&cmd);
        self.model.check();
        self.tally(&cmd, &want, last_before, queued_before, rebased);
        if self.model_only {
            self.remember_grants(&cmd, &want);
            self.last = Some(want);
            return Ok(());
        }
        let got = match catch_unwind(AssertUnwindSafe(|| self.engine.apply(cmd.clone()))) {
            Ok(got) => got,
            Err(p) => return Err(self.fail(format!("the engine panicked: {}", panic_text(&p)))),
        };
        let twin_result = self.twin.as_mut().map(|twin| {
            catch_unwind(AssertUnwindSafe(|| twin.apply(cmd.clone())))
                .map_err(|p| panic_text(&p))
                .map(|got| (got, twin.check_invariants()))
        });
        match twin_result {
            None => {}
            Some(Err(p)) => {
                return Err(self.fail(format!("the original (twin) engine panicked: {p}")))
            }
            Some(Ok((twin_got, invariants))) => {
                if twin_got != got {
                    return Err(self.fail(format!(
                        "the restored engine and its original disagree:\n  restored: {got:?}\n  original: {twin_got:?}"
                    )));
                }
                if let Err(e) = invariants {
                    return Err(self.fail(format!("twin engine invariant broken: {e}")));
                }
            }
        }
        if let Err(e) = self.engine.check_invariants() {
            return Err(self.fail(format!("engine invariant broken: {e}\n  applied: {got:?}")));
        }
        self.compare_applied(&want, &got)?;
        self.check_tokens(last_before, &got)?;
        self.remember_grants(&cmd, &want);
        self.last = Some(want);
        self.compare_state()
    }

    fn compare_applied(&self, want: &Applied, got: &Applied) -> Result<(), String> {
        let (wr, gr) = (norm_reply(&want.reply), norm_reply(&got.reply));
        let (we, ge) = (
            effect_multiset(&want.effects, self.filter),
            effect_multiset(&got.effects, self.filter),
        );
        if wr != gr || we != ge {
            let mut msg = String::new();
            if wr != gr {
                let _ = write!(msg, "reply differs\n  model:  {wr:?}\n  engine: {gr:?}\n");
            }
            if we != ge {
                let _ = writeln!(msg, "effects differ (sorted)");
                let _ = writeln!(msg, "  model:");
                for e in &we {
                    let _ = writeln!(msg, "    {e}");
                }
                let _ = writeln!(msg, "  engine:");
                for e in &ge {
                    let _ = writeln!(msg, "    {e}");
                }
            }
            return Err(self.fail(msg));
        }
        Ok(())
    }

    /// Tokens of new grants strictly increase (in the order the engine
    /// reports them) and continue the counter.
    fn check_tokens(&self, last_before: Token, got: &Applied) -> Result<(), String> {
        let mut new: Vec<Token> = got
            .effects
            .iter()
            .filter_map(|e| match e {
                Effect::Granted { token, .. } => Some(*token),
                _ => None,
            })
            .collect();
        if let Reply::Granted { token } = got.reply {
            // A retry may answer with a token granted earlier in this command.
            if token > last_before && !new.contains(&token) {
                new.push(token);
            }
        }
        let mut prev = last_before;
        for t in &new {
            if *t <= prev {
                return Err(self.fail(format!(
                    "grant tokens {new:?} do not strictly increase from {last_before}"
                )));
            }
            prev = *t;
        }
        if self.engine.last_token() < prev {
            return Err(self.fail(format!(
                "last_token {} but a grant has {prev}",
                self.engine.last_token()
            )));
        }
        Ok(())
    }

    fn remember_grants(&mut self, cmd: &Command, want: &Applied) {
        if let (Op::Lock(req), Reply::Granted { token }) = (&cmd.op, &want.reply) {
            self.grant_nonce
                .insert(*token, (req.caller.client, req.nonce));
        }
        for e in &want.effects {
            if let Effect::Granted {
                client,
                nonce,
                token,
                ..
            } = e
            {
                self.grant_nonce.insert(*token, (*client, *nonce));
            }
        }
    }

    fn compare_state(&self) -> Result<(), String> {
        if self.engine.now_ms() != self.model.now {
            return Err(self.fail(format!(
                "engine now {} but model now {}",
                self.engine.now_ms(),
                self.model.now
            )));
        }
        if self.engine.last_token() != self.model.last_token {
            return Err(self.fail(format!(
                "engine last_token {} but model {}",
                self.engine.last_token(),
                self.model.last_token
            )));
        }
        let last = self.model.last_token;
        for z in ZONES.iter().take(self.zones) {
            for n in NAMES.iter().take(self.names) {
                let want: Option<LockInfo> = self.model.query(z, n);
                let got = self.engine.query(z, n);
                if want != got {
                    return Err(self.fail(format!(
                        "query({z}, {n}) differs\n  model:  {want:?}\n  engine: {got:?}"
                    )));
                }
                for t in last.saturating_sub(4)..=last + 1 {
                    let w = self.model.check_token(z, n, t);
                    let g = self.engine.check_token(z, n, t);
                    if w != g {
                        return Err(
                            self.fail(format!("check_token({z}, {n}, {t}): model {w}, engine {g}"))
                        );
                    }
                }
            }
        }
        for (key, lock) in &self.model.locks {
            for h in &lock.holders {
                if !self.engine.check_token(&key.0, &key.1, h.token) {
                    return Err(self.fail(format!(
                        "check_token{key:?} {} is false for a holder",
                        h.token
                    )));
                }
            }
        }
        Ok(())
    }

    /// At the end: the twin and the copy hold the same state.
    pub fn finish(&self) -> Result<(), String> {
        if let Some(twin) = &self.twin {
            if twin.snapshot() != self.engine.snapshot() {
                return Err(self.fail(
                    "the restored engine and its original ended in different states".into(),
                ));
            }
        }
        Ok(())
    }

    fn count(&mut self, what: &'static str) {
        *self.stats.entry(what).or_default() += 1;
    }

    fn tally(
        &mut self,
        cmd: &Command,
        want: &Applied,
        last_before: Token,
        queued_before: usize,
        rebased: bool,
    ) {
        if rebased {
            self.count("rebase");
        }
        let reply: Option<&'static str> = match &want.reply {
            Reply::Granted { token } if *token > last_before => Some("reply Granted"),
            Reply::Granted { .. } => Some("reply Granted (retry)"),
            Reply::Queued { .. } => {
                let now: usize = self.model.locks.values().map(|l| l.queue.len()).sum();
                Some(if now > queued_before {
                    "reply Queued"
                } else {
                    "reply Queued (retry)"
                })
            }
            Reply::Refused(r) => Some(match r {
                Refusal::Locked { holder } => match (holder, &cmd.op) {
                    (Some(h), Op::Lock(req))
                        if h.client == req.caller.client && h.owner == req.owner =>
                    {
                        "reply Locked (itself)"
                    }
                    _ => "reply Locked",
                },
                Refusal::Timeout { .. } => "reply Timeout (retry)",
                Refusal::NotOwner => "reply NotOwner",
                Refusal::Replay => "reply Replay",
                Refusal::Lost { .. } => "reply Lost",
                Refusal::UnknownGrant => "reply UnknownGrant",
                Refusal::Forbidden => "reply Forbidden",
                Refusal::Deadlock => "reply Deadlock",
                Refusal::Limit { .. } => "reply Limit",
                Refusal::Invalid { .. } => "reply Invalid",
                Refusal::NoSession => "reply NoSession",
                Refusal::StaleNonce => "reply StaleNonce",
                Refusal::Cancelled => "reply Cancelled (refusal)",
            }),
            Reply::Released {
                already_released: false,
            } => Some("reply Released"),
            Reply::Released {
                already_released: true,
            } => Some("reply Released (already)"),
            Reply::Refreshed { .. } => Some("reply Refreshed"),
            Reply::Cancelled { gave_back: Some(_) } => Some("reply Cancelled (gave back)"),
            Reply::Broken { tokens } if !tokens.is_empty() => Some("reply Broken"),
            Reply::Session {
                resumed: true,
                lost,
                ..
            } => {
                if !lost.is_empty() {
                    self.count("reply Session (lost)");
                }
                Some("reply Session (resumed)")
            }
            _ => None,
        };
        if let Some(r) = reply {
            self.count(r);
        }
        if let (Op::Cancel { .. }, Reply::Cancelled { gave_back: None }) = (&cmd.op, &want.reply) {
            let now: usize = self.model.locks.values().map(|l| l.queue.len()).sum();
            if now < queued_before {
                self.count("reply Cancelled (wait)");
            }
        }
        for e in &want.effects {
            let what = match e {
                Effect::Granted { .. } => "effect Granted",
                Effect::WaitEnded { .. } => "effect WaitEnded Timeout",
                Effect::Lost { client: None, .. } => "effect Lost (detached)",
                Effect::Lost {
                    reason: LossReason::SessionExpired,
                    ..
                } => "effect Lost SessionExpired",
                Effect::Lost {
                    reason: LossReason::TtlExpired,
                    ..
                } => "effect Lost TtlExpired",
                Effect::Lost {
                    reason: LossReason::Broken,
                    ..
                } => "effect Lost Broken",
                Effect::SessionExpired { .. } => "effect SessionExpired",
                Effect::Watch { .. } => "effect Watch",
            };
            self.count(what);
        }
        if self.model.locks.values().any(|l| l.holders.len() > 1) {
            self.count("shared holders");
        }
        if self.model.locks.values().any(|l| l.delay_until.is_some()) {
            self.count("lock-delay");
        }
        if self.model.ended.len() == self.limits.ended_grants_max {
            self.count("ended grant evicted");
        }
    }
}

/// Run a scenario on the model alone and tell what it reached.
pub fn model_stats(s: &Scenario) -> BTreeMap<&'static str, usize> {
    let mut h = Harness::new(
        s,
        Filter {
            ignore_watch: false,
        },
    );
    h.model_only = true;
    h.open_initial(s.opened)
        .expect("model only: no comparison can fail");
    for step in &s.steps {
        h.step(step).expect("model only: no comparison can fail");
    }
    h.stats
}

/// Run a whole scenario.
pub fn run(s: &Scenario, filter: Filter) -> Result<(), String> {
    let mut h = Harness::new(s, filter);
    h.open_initial(s.opened)?;
    for step in &s.steps {
        h.step(step)?;
    }
    h.finish()
}
