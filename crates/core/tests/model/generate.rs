//! Random scenarios for the model test: a small universe (four clients under
//! two identities, one or two zones, two or three lock names, owners 0-3,
//! small TTLs, waits and lock-delays) so that requests collide, plus two
//! limit profiles, the roomy one and a tight one that hits every LIMIT edge
//! and evicts ended grants.
//!
//! A step is abstract: "release the second holder of lock b with its owner's
//! key and a replayed counter". The harness resolves it against the model's
//! state into a concrete `Command`, so tokens, nonces and counters are real
//! ones, and shrinking a scenario keeps it meaningful.

use oclocks_core::{EngineLimits, WAIT_FOREVER};
use oclocks_proto::{Kind, Mode};
use proptest::prelude::*;

/// Which limits the engine and the model run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// Defaults, except small time bounds and short names.
    Roomy,
    /// Every count limit tiny: LIMIT edges and ended-grant eviction.
    Tight,
}

impl Profile {
    pub fn limits(self) -> EngineLimits {
        let base = EngineLimits {
            zone_name_bytes_max: 8,
            lock_name_bytes_max: 8,
            session_timeout_ms_min: 20,
            session_timeout_ms_max: 300,
            session_timeout_ms_default: 100,
            ttl_ms_max: 100,
            wait_ms_max: 100,
            lock_delay_ms_max: 100,
            ..EngineLimits::default()
        };
        match self {
            Profile::Roomy => base,
            Profile::Tight => EngineLimits {
                waiters_per_lock_max: 2,
                locks_per_session_max: 3,
                sessions_per_identity_max: 2,
                sessions_max: 3,
                outcomes_per_session_max: 4,
                watches_per_session_max: 1,
                ended_grants_max: 3,
                ended_per_session_max: 2,
                ttl_ms_max: 50,
                wait_ms_max: 50,
                lock_delay_ms_max: 50,
                ..base
            },
        }
    }
}

/// The shape of one scenario.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub profile: Profile,
    /// Zones used: 1 or 2.
    pub zones: usize,
    /// Lock names used per zone: 2 or 3.
    pub names: usize,
    /// Clients whose sessions are opened before the steps: 0..=4.
    pub opened: usize,
    pub steps: Vec<Step>,
}

pub const ZONES: [&str; 2] = ["z1", "z2"];
pub const NAMES: [&str; 3] = ["a", "b", "c"];
pub const CLIENTS: [u128; 4] = [1, 2, 3, 4];
pub const KEYS: [[u8; 32]; 2] = [[0x11; 32], [0x22; 32]];

/// How the command's clock moves.
#[derive(Clone, Debug)]
pub enum Clock {
    /// Same term, leader clock advances by this much.
    Advance(u64),
    /// Same term, but the stamp is this much behind the leader's clock (a
    /// command stamped earlier than its predecessor).
    Behind(u64),
    /// A new term whose leader clock reads this (may be below the old one).
    NewTerm(u64),
}

/// A lock of the universe, or a malformed address.
#[derive(Clone, Copy, Debug)]
pub enum LockSel {
    At(usize, usize),
    EmptyName,
    EmptyZone,
    LongName,
    LongZone,
}

/// Who sends a session-bound request.
#[derive(Clone, Copy, Debug)]
pub enum Who {
    /// Client `CLIENTS[i]`, with its identity or (`wrong`) the other one.
    Client(usize, bool),
    /// The client of the chosen token's holder (its right identity).
    TokenOwner,
}

/// A token named by RELEASE, REFRESH or BREAK.
#[derive(Clone, Copy, Debug)]
pub enum TokenSel {
    /// The i-th current holder of the selected lock (else the last token).
    Holder(usize),
    /// The i-th current holder of any lock.
    AnyHolder(usize),
    /// `last_token - k`.
    Recent(u64),
    /// A token never issued (`last_token + 1`), or 0.
    Never(bool),
}

/// The key proof of RELEASE/REFRESH.
#[derive(Clone, Copy, Debug)]
pub enum ProofSel {
    None,
    /// The holder's key with a fresh counter.
    Fresh,
    /// The holder's key with its last counter (a replay).
    Replay,
    /// The other key.
    WrongKey,
}

/// The nonce of a LOCK or CANCEL.
#[derive(Clone, Copy, Debug)]
pub enum NonceSel {
    /// The client's next nonce (consumed).
    Fresh,
    /// The client's next nonce, not consumed (CANCEL overtaking its LOCK).
    Peek,
    /// The k-th most recent nonce the client used.
    Old(usize),
}

/// The low-water mark a LOCK reports.
#[derive(Clone, Copy, Debug)]
pub enum LowWater {
    /// The last mark this client sent.
    Keep,
    /// Everything before this request answered: mark = nonce.
    UpTo,
    /// mark = nonce - k.
    Lag(u64),
    /// mark = nonce + 1 (INVALID).
    Over,
}

#[derive(Clone, Debug)]
pub struct LockStep {
    pub client: usize,
    pub wrong_identity: bool,
    pub lock: LockSel,
    pub mode: Mode,
    pub kind: Kind,
    pub ttl_ms: u64,
    pub wait_ms: u64,
    pub lock_delay_ms: u64,
    pub owner: u64,
    pub nonce: NonceSel,
    pub low_water: LowWater,
    /// Owner key index and the request's counter.
    pub key: Option<(usize, u64)>,
    /// A nested acquire: client and owner of the i-th current holder
    /// (attached), instead of `client` and `owner`; with `true`, preferably
    /// of a lock that has waiters (the request that closes a cycle).
    pub nested: Option<(bool, usize)>,
}

#[derive(Clone, Debug)]
pub enum CancelSel {
    /// The i-th waiter of the whole table, by its own client.
    Waiter(usize),
    /// The LOCK nonce of the i-th current holder, by its client.
    Holder(usize),
    Nonce(usize, bool, NonceSel),
}

#[derive(Clone, Debug)]
pub enum Action {
    Open {
        client: usize,
        wrong_identity: bool,
        timeout_ms: u64,
    },
    /// Keepalive of these clients (with right or wrong identity).
    Keepalive(Vec<(usize, bool)>),
    /// Keepalive of every client with its right identity.
    KeepaliveAll,
    Close {
        client: usize,
        wrong_identity: bool,
    },
    Lock(LockStep),
    /// Send again the i-th LOCK of the history, unchanged.
    RetryLock(usize),
    Cancel(CancelSel),
    Release {
        who: Who,
        lock: LockSel,
        token: TokenSel,
        proof: ProofSel,
    },
    Refresh {
        who: Who,
        lock: LockSel,
        token: TokenSel,
        ttl_ms: u64,
        proof: ProofSel,
    },
    Break {
        lock: LockSel,
        expected: Option<TokenSel>,
    },
    Watch {
        client: usize,
        lock: LockSel,
    },
    Unwatch {
        client: usize,
        lock: LockSel,
    },
    Tick,
    Rebase,
    /// Snapshot the engine and go on with the restored copy.
    Snapshot,
}

#[derive(Clone, Debug)]
pub struct Step {
    pub clock: Clock,
    pub action: Action,
}

fn clock() -> impl Strategy<Value = Clock> {
    prop_oneof![
        30 => prop::sample::select(vec![0u64, 0, 0, 1, 1, 2, 3, 5, 5, 10, 10, 20]).prop_map(Clock::Advance),
        1 => Just(Clock::Advance(60)),
        2 => (1u64..20).prop_map(Clock::Behind),
        3 => (0u64..400).prop_map(Clock::NewTerm),
    ]
}

fn lock_sel() -> impl Strategy<Value = LockSel> {
    prop_oneof![
        60 => (0usize..2, 0usize..3).prop_map(|(z, n)| LockSel::At(z, n)),
        1 => Just(LockSel::EmptyName),
        1 => Just(LockSel::EmptyZone),
        1 => Just(LockSel::LongName),
        1 => Just(LockSel::LongZone),
    ]
}

fn good_lock() -> impl Strategy<Value = LockSel> {
    (0usize..2, 0usize..3).prop_map(|(z, n)| LockSel::At(z, n))
}

fn client() -> impl Strategy<Value = usize> {
    0usize..4
}

fn wrong() -> impl Strategy<Value = bool> {
    prop::bool::weighted(0.04)
}

fn nonce_sel() -> impl Strategy<Value = NonceSel> {
    prop_oneof![
        20 => Just(NonceSel::Fresh),
        1 => Just(NonceSel::Peek),
        3 => (0usize..4).prop_map(NonceSel::Old),
    ]
}

fn low_water() -> impl Strategy<Value = LowWater> {
    prop_oneof![
        5 => Just(LowWater::Keep),
        10 => Just(LowWater::UpTo),
        5 => (1u64..4).prop_map(LowWater::Lag),
        1 => Just(LowWater::Over),
    ]
}

fn token_sel() -> impl Strategy<Value = TokenSel> {
    prop_oneof![
        12 => (0usize..3).prop_map(TokenSel::Holder),
        3 => (0usize..6).prop_map(TokenSel::AnyHolder),
        4 => (0u64..6).prop_map(TokenSel::Recent),
        1 => any::<bool>().prop_map(TokenSel::Never),
    ]
}

fn proof_sel() -> impl Strategy<Value = ProofSel> {
    prop_oneof![
        3 => Just(ProofSel::None),
        8 => Just(ProofSel::Fresh),
        2 => Just(ProofSel::Replay),
        1 => Just(ProofSel::WrongKey),
    ]
}

fn who() -> impl Strategy<Value = Who> {
    prop_oneof![
        6 => Just(Who::TokenOwner),
        2 => (client(), wrong()).prop_map(|(c, w)| Who::Client(c, w)),
    ]
}

fn lock_step() -> impl Strategy<Value = LockStep> {
    let mode = prop_oneof![Just(Mode::Exclusive), Just(Mode::Shared)];
    let kind = prop_oneof![4 => Just(Kind::Connection), 1 => Just(Kind::Static)];
    // 120 is over every profile's maximum: LIMIT.
    let ttl = prop_oneof![60 => prop::sample::select(vec![0u64, 0, 0, 0, 0, 0, 0, 0, 5, 10, 50, 50]), 1 => Just(120u64)];
    let wait = prop_oneof![
        60 => prop::sample::select(vec![0u64, 0, 5, 10, 50, WAIT_FOREVER, WAIT_FOREVER, WAIT_FOREVER]),
        1 => Just(120u64),
    ];
    let delay = prop_oneof![60 => prop::sample::select(vec![0u64, 0, 0, 0, 0, 0, 5, 10, 50]), 1 => Just(120u64)];
    let owner = prop_oneof![3 => Just(0u64), 1 => 1u64..4];
    let key = prop_oneof![
        2 => Just(None),
        1 => (0usize..2, 0u64..3).prop_map(Some),
    ];
    (
        (client(), wrong(), lock_sel(), mode, kind),
        (ttl, wait, delay, owner),
        (
            nonce_sel(),
            low_water(),
            key,
            0usize..8,
            prop::option::weighted(0.35, (any::<bool>(), 0usize..6)),
        ),
    )
        .prop_map(
            |(
                (client, wrong_identity, lock, mode, kind),
                (ttl_ms, wait_ms, lock_delay_ms, owner),
                (nonce, low_water, key, k, nested),
            )| {
                // Static locks mostly carry their key, so that they are granted.
                let key = match (kind, key) {
                    (Kind::Static, None) if k > 0 => Some((k % 2, 1)),
                    (_, key) => key,
                };
                LockStep {
                    client,
                    wrong_identity,
                    lock,
                    mode,
                    kind,
                    ttl_ms,
                    wait_ms,
                    lock_delay_ms,
                    owner,
                    nonce,
                    low_water,
                    key,
                    nested,
                }
            },
        )
}

fn action() -> impl Strategy<Value = Action> {
    let timeout = prop::sample::select(vec![0u64, 0, 0, 10, 50, 150, 1000]);
    prop_oneof![
        8 => (client(), wrong(), timeout).prop_map(|(client, wrong_identity, timeout_ms)| Action::Open {
            client,
            wrong_identity,
            timeout_ms
        }),
        3 => prop::collection::vec((client(), wrong()), 0..4).prop_map(Action::Keepalive),
        20 => Just(Action::KeepaliveAll),
        2 => (client(), wrong()).prop_map(|(client, wrong_identity)| Action::Close { client, wrong_identity }),
        30 => lock_step().prop_map(Action::Lock),
        5 => (0usize..16).prop_map(Action::RetryLock),
        8 => prop_oneof![
            3 => (0usize..8).prop_map(CancelSel::Waiter),
            2 => (0usize..8).prop_map(CancelSel::Holder),
            1 => (client(), wrong(), nonce_sel()).prop_map(|(c, w, n)| CancelSel::Nonce(c, w, n)),
        ]
        .prop_map(Action::Cancel),
        8 => (who(), lock_sel(), token_sel(), proof_sel())
            .prop_map(|(who, lock, token, proof)| Action::Release { who, lock, token, proof }),
        5 => (who(), good_lock(), token_sel(), prop::sample::select(vec![0u64, 0, 5, 30, 120]), proof_sel())
            .prop_map(|(who, lock, token, ttl_ms, proof)| Action::Refresh { who, lock, token, ttl_ms, proof }),
        4 => (good_lock(), prop::option::weighted(0.6, token_sel()))
            .prop_map(|(lock, expected)| Action::Break { lock, expected }),
        3 => (client(), good_lock()).prop_map(|(client, lock)| Action::Watch { client, lock }),
        1 => (client(), good_lock()).prop_map(|(client, lock)| Action::Unwatch { client, lock }),
        5 => Just(Action::Tick),
        2 => Just(Action::Rebase),
        2 => Just(Action::Snapshot),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    (clock(), action()).prop_map(|(clock, action)| Step { clock, action })
}

/// The general mix: every operation, every field, both limit profiles.
fn general() -> impl Strategy<Value = Scenario> {
    (
        prop_oneof![2 => Just(Profile::Roomy), 1 => Just(Profile::Tight)],
        prop_oneof![2 => Just(1usize), 1 => Just(2usize)],
        prop_oneof![2 => Just(2usize), 1 => Just(3usize)],
        prop_oneof![4 => Just(4usize), 1 => 0usize..4],
        prop::collection::vec(step(), 1..64),
    )
        .prop_map(|(profile, zones, names, opened, steps)| Scenario {
            profile,
            zones,
            names,
            opened,
            steps,
        })
}

/// A nested or plain LOCK that mostly waits: queues, FIFO service, shared
/// batches and wait-for cycles through holders and earlier waiters.
fn contended_lock() -> impl Strategy<Value = LockStep> {
    (
        (
            0usize..4,
            0usize..3,
            prop_oneof![3 => Just(Mode::Exclusive), 1 => Just(Mode::Shared)],
        ),
        prop_oneof![6 => Just(WAIT_FOREVER), 1 => Just(50u64), 1 => Just(0u64)],
        (
            0u64..2,
            prop::option::weighted(0.6, (prop::bool::weighted(0.7), 0usize..6)),
        ),
        prop_oneof![4 => Just(LowWater::Keep), 1 => Just(LowWater::UpTo)],
    )
        .prop_map(
            |((client, name, mode), wait_ms, (owner, nested), low_water)| LockStep {
                client,
                wrong_identity: false,
                lock: LockSel::At(0, name),
                mode,
                kind: Kind::Connection,
                ttl_ms: 0,
                wait_ms,
                lock_delay_ms: 0,
                owner,
                nonce: NonceSel::Fresh,
                low_water,
                key: None,
                nested,
            },
        )
}

/// Contention: one zone, few locks, waits, nested acquires, no TTLs, live
/// sessions; time moves slowly.
fn contended() -> impl Strategy<Value = Scenario> {
    let action = prop_oneof![
        40 => contended_lock().prop_map(Action::Lock),
        8 => (Just(Who::TokenOwner), (0usize..3).prop_map(|n| LockSel::At(0, n)), (0usize..3).prop_map(TokenSel::Holder))
            .prop_map(|(who, lock, token)| Action::Release { who, lock, token, proof: ProofSel::None }),
        6 => prop_oneof![
            2 => (0usize..8).prop_map(CancelSel::Waiter),
            1 => (0usize..8).prop_map(CancelSel::Holder),
        ]
        .prop_map(Action::Cancel),
        3 => (0usize..16).prop_map(Action::RetryLock),
        10 => Just(Action::KeepaliveAll),
        2 => (0usize..3).prop_map(|n| Action::Break { lock: LockSel::At(0, n), expected: None }),
        1 => (0usize..4).prop_map(|client| Action::Close { client, wrong_identity: false }),
        2 => (0usize..4, 0usize..3).prop_map(|(client, n)| Action::Watch { client, lock: LockSel::At(0, n) }),
        3 => Just(Action::Tick),
        1 => Just(Action::Snapshot),
    ];
    let clock = prop_oneof![
        20 => prop::sample::select(vec![0u64, 0, 1, 2, 5]).prop_map(Clock::Advance),
        1 => (0u64..100).prop_map(Clock::NewTerm),
    ];
    (
        prop_oneof![3 => Just(Profile::Roomy), 1 => Just(Profile::Tight)],
        prop_oneof![1 => Just(2usize), 1 => Just(3usize)],
        prop::collection::vec(
            (clock, action).prop_map(|(clock, action)| Step { clock, action }),
            1..64,
        ),
    )
        .prop_map(|(profile, names, steps)| Scenario {
            profile,
            zones: 1,
            names,
            opened: 4,
            steps,
        })
}

pub fn scenario() -> impl Strategy<Value = Scenario> {
    prop_oneof![3 => general(), 1 => contended()]
}
