//! Linearizability of one lock's sub-history: the Wing–Gong–Lowe search.
//!
//! Every operation becomes a call entry (at its invocation) and a return
//! entry (at its completion; at +∞ for an indeterminate one) in one list
//! sorted by time, calls before returns at equal times (touching intervals
//! count as concurrent, which never reports a false violation). The search
//! walks the list: at a call it tries to apply the operation to the model
//! and, if that works and the pair (set of applied operations, model state)
//! is new, lifts the operation out of the list and starts over; at the
//! return of an operation not yet applied it backtracks. It succeeds when
//! only +∞ returns remain: every definite operation took effect, and each
//! indeterminate one either took effect somewhere after its invocation or
//! never. The memo of (applied set, state) pairs bounds the work by the
//! number of distinct configurations; `states_max` bounds it absolutely.
//!
//! On failure it reports the deepest point it reached: the operation whose
//! return could not be passed, the model state there, and why each pending
//! operation could not be applied.

use std::collections::HashSet;

use crate::history::History;
use crate::model::{Bits, Source, State, Sub};
use crate::report::{Counterexample, Involved};

const NIL: usize = usize::MAX;
/// How many operations of the linearized prefix a counterexample lists.
const PREFIX_SHOWN_MAX: usize = 12;
/// How many pending operations a counterexample explains.
const CANDIDATES_SHOWN_MAX: usize = 16;

pub(crate) enum LinResult {
    Ok {
        states: u64,
    },
    Violation(Box<Counterexample>),
    /// Gave up after `states` configurations.
    Budget {
        states: u64,
    },
}

#[derive(Clone, Copy)]
struct Ent {
    time: u64,
    ret: bool,
    inf: bool,
    op: u32,
}

struct Frame {
    op: u32,
    choice: usize,
    prev: State,
}

struct Deepest {
    linearized: Vec<u32>,
    state: State,
    stuck: u32,
}

struct List {
    next: Vec<usize>,
    prev: Vec<usize>,
    call_of: Vec<usize>,
    ret_of: Vec<usize>,
    head: usize,
}

impl List {
    fn lift(&mut self, op: usize) {
        for e in [self.call_of[op], self.ret_of[op]] {
            let (p, n) = (self.prev[e], self.next[e]);
            self.next[p] = n;
            if n != NIL {
                self.prev[n] = p;
            }
        }
    }

    fn unlift(&mut self, op: usize) {
        for e in [self.ret_of[op], self.call_of[op]] {
            let (p, n) = (self.prev[e], self.next[e]);
            self.next[p] = e;
            if n != NIL {
                self.prev[n] = e;
            }
        }
    }
}

/// The largest number of operations of `sub` pending at one instant.
pub(crate) fn max_concurrency(sub: &Sub) -> usize {
    let mut points: Vec<(u64, i8)> = Vec::with_capacity(sub.ops.len() * 2);
    for op in &sub.ops {
        points.push((op.invoke, 1));
        points.push((op.ret.unwrap_or(u64::MAX), -1));
    }
    // Calls before returns at equal times, as in the search.
    points.sort_by_key(|&(t, d)| (t, -d));
    let (mut cur, mut max) = (0i64, 0i64);
    for (_, d) in points {
        cur += i64::from(d);
        max = max.max(cur);
    }
    usize::try_from(max).unwrap_or(0)
}

pub(crate) fn search(sub: &Sub, history: &History, states_max: usize) -> LinResult {
    let n = sub.ops.len();
    let mut ents: Vec<Ent> = Vec::with_capacity(2 * n);
    for (i, op) in sub.ops.iter().enumerate() {
        ents.push(Ent {
            time: op.invoke,
            ret: false,
            inf: false,
            op: i as u32,
        });
        ents.push(Ent {
            time: op.ret.unwrap_or(u64::MAX),
            ret: true,
            inf: op.ret.is_none(),
            op: i as u32,
        });
    }
    ents.sort_by_key(|e| (e.inf, e.time, e.ret, e.op));
    let m = ents.len();
    let mut list = List {
        next: vec![NIL; m + 1],
        prev: vec![NIL; m + 1],
        call_of: vec![0; n],
        ret_of: vec![0; n],
        head: m,
    };
    let mut last = list.head;
    for (k, e) in ents.iter().enumerate() {
        list.next[last] = k;
        list.prev[k] = last;
        last = k;
        if e.ret {
            list.ret_of[e.op as usize] = k;
        } else {
            list.call_of[e.op as usize] = k;
        }
    }

    let mut cache: HashSet<(Bits, State)> = HashSet::new();
    let mut lin = Bits::new(n);
    let mut state = State::default();
    let mut stack: Vec<Frame> = Vec::new();
    let mut succ: Vec<State> = Vec::new();
    let mut deepest: Option<Deepest> = None;
    let mut e = list.next[list.head];

    // Try op `op` from `state`, choices from `from`; on success returns the
    // choice and the new state (already memoised).
    let try_op = |op: usize,
                  state: &State,
                  lin: &mut Bits,
                  from: usize,
                  succ: &mut Vec<State>,
                  cache: &mut HashSet<(Bits, State)>|
     -> Option<(usize, State)> {
        if sub.step(state, op, lin, succ).is_err() {
            return None;
        }
        lin.set(op);
        for (c, s) in succ.iter().enumerate().skip(from) {
            if cache.insert((lin.clone(), s.clone())) {
                return Some((c, s.clone()));
            }
        }
        lin.clear(op);
        None
    };

    loop {
        if cache.len() > states_max {
            return LinResult::Budget {
                states: cache.len() as u64,
            };
        }
        if e == NIL {
            break;
        }
        let ent = ents[e];
        if !ent.ret {
            let op = ent.op as usize;
            if let Some((choice, next)) = try_op(op, &state, &mut lin, 0, &mut succ, &mut cache) {
                let prev = std::mem::replace(&mut state, next);
                stack.push(Frame {
                    op: ent.op,
                    choice,
                    prev,
                });
                list.lift(op);
                e = list.next[list.head];
            } else {
                e = list.next[e];
            }
            continue;
        }
        if ent.inf {
            // Only indeterminate operations are left: each may never have
            // taken effect.
            break;
        }
        if deepest
            .as_ref()
            .is_none_or(|d| stack.len() > d.linearized.len())
        {
            deepest = Some(Deepest {
                linearized: stack.iter().map(|f| f.op).collect(),
                state: state.clone(),
                stuck: ent.op,
            });
        }
        // Backtrack: undo the last applied operation and try its next
        // choice, or move past its call.
        let Some(f) = stack.pop() else {
            let d = deepest.unwrap_or(Deepest {
                linearized: Vec::new(),
                state: State::default(),
                stuck: ent.op,
            });
            return LinResult::Violation(Box::new(counterexample(sub, history, d)));
        };
        let op = f.op as usize;
        lin.clear(op);
        list.unlift(op);
        state = f.prev;
        if let Some((choice, next)) =
            try_op(op, &state, &mut lin, f.choice + 1, &mut succ, &mut cache)
        {
            let prev = std::mem::replace(&mut state, next);
            stack.push(Frame {
                op: f.op,
                choice,
                prev,
            });
            list.lift(op);
            e = list.next[list.head];
        } else {
            e = list.next[list.call_of[op]];
        }
    }
    LinResult::Ok {
        states: cache.len() as u64,
    }
}

fn involved(sub: &Sub, history: &History, i: usize) -> Involved {
    match sub.ops[i].source {
        Source::Client(id) => Involved::Op(id),
        Source::Record(r) => Involved::Record(history.record_events().get(r).map_or(0, |e| e.seq)),
    }
}

fn counterexample(sub: &Sub, history: &History, d: Deepest) -> Counterexample {
    let n = sub.ops.len();
    let mut lin = Bits::new(n);
    for &op in &d.linearized {
        lin.set(op as usize);
    }
    let stuck = d.stuck as usize;
    let horizon = sub.ops[stuck].ret.unwrap_or(u64::MAX);
    let mut candidates = Vec::new();
    let mut inv = vec![involved(sub, history, stuck)];
    let mut succ = Vec::new();
    for i in 0..n {
        if i == stuck || lin.get(i) || sub.ops[i].invoke > horizon {
            continue;
        }
        if candidates.len() >= CANDIDATES_SHOWN_MAX {
            break;
        }
        let why = match sub.step(&d.state, i, &lin, &mut succ) {
            Err(w) => sub.explain(history, &w),
            Ok(()) => "could take effect here, but every order from there failed".to_string(),
        };
        inv.push(involved(sub, history, i));
        candidates.push(format!("{} — {why}", sub.describe(history, i)));
    }
    let state: Vec<String> = d
        .state
        .holders
        .iter()
        .map(|h| {
            let i = involved(sub, history, h.op as usize);
            if !inv.contains(&i) {
                inv.push(i);
            }
            sub.describe_holder(history, h)
        })
        .collect();
    let skip = d.linearized.len().saturating_sub(PREFIX_SHOWN_MAX);
    let prefix = d.linearized[skip..]
        .iter()
        .map(|&op| sub.describe(history, op as usize))
        .collect();
    let why_stuck = match sub.step(&d.state, stuck, &lin, &mut succ) {
        Err(w) => sub.explain(history, &w),
        Ok(()) => "it could take effect here, but then a later operation could not".to_string(),
    };
    Counterexample {
        lock: sub.lock.clone(),
        stuck: format!("{} — {why_stuck}", sub.describe(history, stuck)),
        linearized_count: d.linearized.len(),
        linearized_tail: prefix,
        holders: state,
        max_token: d.state.max_token,
        candidates,
        involved: inv,
    }
}
