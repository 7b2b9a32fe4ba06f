//! Every limit the codecs enforce, at its edge: exactly at the limit is
//! accepted, one over is a typed error, on decode and on encode. Decoding
//! fails as soon as the offending header is in, and without allocating for
//! the claimed size: this binary counts its allocations to prove it.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::BytesMut;
use common::{feed_requests, feed_responses, hex};
use oclocks_proto::*;
use tokio_util::codec::Decoder;

/// Counts the bytes allocated by the current thread, so a test can assert
/// that a decode call allocated (almost) nothing.
struct Counting;

thread_local! {
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.with(|a| a.set(a.get() + layout.size()));
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.with(|a| a.set(a.get() + new_size));
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bytes this thread allocates while running `f`.
fn allocated_by<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOCATED.with(Cell::get);
    let out = f();
    (out, ALLOCATED.with(Cell::get) - before)
}

/// Limits that let anything through, for encoding over-limit test input.
fn loose() -> Limits {
    Limits {
        zone_name_bytes_max: usize::MAX,
        lock_name_bytes_max: usize::MAX,
        message_bytes_max: usize::MAX,
        items_per_message_max: usize::MAX,
        list_entries_max: usize::MAX,
        identity_bytes_max: usize::MAX,
        site_bytes_max: usize::MAX,
        address_bytes_max: usize::MAX,
        error_text_bytes_max: usize::MAX,
        ..Limits::default()
    }
}

/// A request or a response, so one table can hold both.
#[derive(Clone, Debug, PartialEq)]
enum Msg {
    Req(Request),
    Resp(Response),
}

impl Msg {
    fn encode(&self, limits: &Limits) -> Result<Vec<u8>, EncodeError> {
        let mut buf = BytesMut::new();
        match self {
            Msg::Req(r) => r.encode(&mut buf, limits)?,
            Msg::Resp(r) => r.encode(&mut buf, limits)?,
        }
        Ok(buf.to_vec())
    }

    /// Decode fed one byte at a time: the error and how many bytes were in
    /// when it came.
    fn decode_bytewise(&self, bytes: &[u8], limits: &Limits) -> (Result<Msg, DecodeError>, usize) {
        match self {
            Msg::Req(_) => {
                let out = feed_requests(bytes, &[1], limits);
                match out.error {
                    Some(e) => (Err(e), out.fed),
                    None => (Ok(Msg::Req(out.messages[0].clone())), out.fed),
                }
            }
            Msg::Resp(_) => {
                let out = feed_responses(bytes, &[1], limits);
                match out.error {
                    Some(e) => (Err(e), out.fed),
                    None => (Ok(Msg::Resp(out.messages[0].clone())), out.fed),
                }
            }
        }
    }
}

/// The byte offset just past the length prefix of the first item of string
/// field `code` whose length is `len`.
fn end_of_prefix(bytes: &[u8], code: u16, len: usize) -> usize {
    let mut at = 0;
    while let Some((item, n)) = Item::decode(&bytes[at..], usize::MAX).unwrap() {
        if item::canonical(item.code) == code
            && n - 2 - item.kind().length_width().unwrap_or(0) == len
        {
            return at + 2 + item.kind().length_width().unwrap();
        }
        at += n;
    }
    panic!("no {code:#06x} of {len} bytes")
}

fn holder(identity: String) -> Holder {
    Holder {
        identity,
        token: 1,
        mode: Mode::Exclusive,
        kind: Kind::Connection,
        held_ms: 0,
        expires_in_ms: None,
    }
}

fn server(address: String, site: String) -> ServerInfo {
    ServerInfo {
        node_id: 1,
        address,
        site,
        serving: true,
        role: None,
        config_version: None,
        lag: None,
    }
}

fn status_ok(site: String, servers: Vec<ServerInfo>) -> Msg {
    Msg::Resp(Response {
        id: 1,
        body: ResponseBody::StatusOk(StatusOk {
            node_id: 1,
            site,
            role: Role::Leader,
            term: 1,
            leader_id: Some(1),
            config_version: 1,
            applied_index: 1,
            servers,
        }),
    })
}

/// Each string field at its default limit and one byte over.
#[test]
fn string_fields_at_the_edge() {
    type Make = fn(String) -> Msg;
    fn lock_ref(zone: String, name: String) -> Msg {
        Msg::Req(Request {
            id: 1,
            body: RequestBody::Query(LockRef { zone, name }),
        })
    }
    let cases: Vec<(&str, u16, usize, Make)> = vec![
        ("ZONE", codes::lock::ZONE, 63, |s| lock_ref(s, "n".into())),
        ("NAME", codes::lock::NAME, 255, |s| lock_ref("z".into(), s)),
        ("START_AFTER", codes::lock::START_AFTER, 255, |s| {
            Msg::Req(Request {
                id: 1,
                body: RequestBody::List(List {
                    zone: "z".into(),
                    start_after: Some(s),
                    page_size: 10,
                }),
            })
        }),
        ("NEXT_CURSOR", codes::reply::NEXT_CURSOR, 255, |s| {
            Msg::Resp(Response {
                id: 1,
                body: ResponseBody::Ok(OkReply {
                    next_cursor: Some(s),
                    ..OkReply::default()
                }),
            })
        }),
        ("IDENTITY", codes::reply::IDENTITY, 1024, |s| {
            Msg::Resp(Response {
                id: 1,
                body: ResponseBody::Ok(OkReply {
                    holders: vec![holder(s)],
                    ..OkReply::default()
                }),
            })
        }),
        ("MESSAGE", codes::reply::MESSAGE, 4096, |s| {
            Msg::Resp(Response {
                id: 1,
                body: ResponseBody::Error(ErrorReply {
                    code: ErrorCode::Internal,
                    message: s,
                    holders: vec![],
                    leader_id: None,
                    servers: vec![],
                }),
            })
        }),
        ("SITE", codes::cluster::SITE, 63, |s| status_ok(s, vec![])),
        ("ADDRESS", codes::cluster::ADDRESS, 255, |s| {
            status_ok("s".into(), vec![server(s, "s".into())])
        }),
    ];
    let limits = Limits::default();
    for (field, code, limit, make) in cases {
        assert_eq!(limits.string_bytes_max(code), Some(limit), "{field}");

        // At the limit: encodes, decodes whole and byte by byte.
        let msg = make("é".repeat(limit / 2) + &"x".repeat(limit % 2));
        let bytes = msg
            .encode(&limits)
            .unwrap_or_else(|e| panic!("{field}: {e}"));
        assert_eq!(
            msg.decode_bytewise(&bytes, &limits).0,
            Ok(msg.clone()),
            "{field}"
        );

        // One over: the encoder refuses and writes nothing ...
        let msg = make("x".repeat(limit + 1));
        assert_eq!(
            msg.encode(&limits),
            Err(EncodeError::StringTooLong {
                field,
                limit,
                actual: limit + 1
            }),
            "{field}"
        );
        // ... and the decoder fails the moment the length prefix is in.
        let bytes = msg.encode(&loose()).unwrap();
        let (result, fed) = msg.decode_bytewise(&bytes, &limits);
        let wire_code = if limit + 1 > 255 { 0x1000 + code } else { code };
        assert_eq!(
            result,
            Err(DecodeError::StringTooLong {
                code: wire_code,
                field,
                limit,
                actual: limit as u64 + 1
            }),
            "{field}"
        );
        assert_eq!(fed, end_of_prefix(&bytes, code, limit + 1), "{field}");
    }
}

/// A string whose length prefix claims 8 GiB fails as soon as its 10 header
/// bytes are buffered: no wait for the bytes, no allocation, the buffer's
/// capacity unchanged.
#[test]
fn eight_gib_string_claim_fails_at_once() {
    let mut codec = RequestCodec::default();
    let mut buf = BytesMut::with_capacity(64);
    buf.extend_from_slice(&hex("3001 0000000000000001  b201 0000000200000000"));
    let (result, allocated) = allocated_by(|| codec.decode(&mut buf));
    match result {
        Err(CodecError::Decode(e)) => {
            assert_eq!(
                e,
                DecodeError::StringTooLong {
                    code: 0xb201,
                    field: "ZONE",
                    limit: 63,
                    actual: 8 << 30
                }
            );
            assert_eq!(e.error_code(), ErrorCode::Limit);
        }
        other => panic!("{other:?}"),
    }
    // The one allocation is the small vector of fields already read (the
    // REQUEST_ID); nothing is sized by the claim.
    assert!(allocated < 1024, "the decoder allocated {allocated} bytes");
    assert!(buf.capacity() <= 64, "the buffer grew");
    assert_eq!(codec.partial_request_id(), Some(1));
    assert!(codec.has_failed());

    // With the zone limit lifted, the message limit catches the same claim.
    let limits = Limits {
        zone_name_bytes_max: usize::MAX,
        ..Limits::default()
    };
    let mut codec = RequestCodec::new(limits);
    let mut buf = BytesMut::with_capacity(64);
    buf.extend_from_slice(&hex("b201 0000000200000000"));
    let (result, allocated) = allocated_by(|| codec.decode(&mut buf));
    assert!(
        matches!(
            result,
            Err(CodecError::Decode(DecodeError::MessageTooLarge {
                limit: 4194304,
                actual: 8589934602
            }))
        ),
        "{result:?}"
    );
    assert_eq!(allocated, 0);
    assert!(buf.capacity() <= 64, "the buffer grew");

    // The low-level item decoder takes a limit too.
    let claim = hex("b201 0000000200000000");
    assert!(matches!(
        Item::decode(&claim, 1 << 20),
        Err(DecodeError::StringTooLong {
            actual: 8589934592,
            ..
        })
    ));
    // u64::MAX does not overflow anything.
    let claim = hex("b201 ffffffffffffffff");
    assert!(matches!(Item::decode(&claim, usize::MAX), Ok(None)));
}

/// An OK reply of exactly `size` bytes, made of HOLDER entries with
/// identities of 256..=1024 bytes (2-byte length, 26 + len bytes each).
fn ok_of_size(size: usize) -> Response {
    let mut rest = size - 12; // REQUEST_ID (10) + OK (2)
    let mut holders = Vec::new();
    while rest > 0 {
        let entry = if rest >= 1050 + 282 || rest == 1050 {
            1050
        } else if rest > 1050 {
            rest - 282
        } else {
            rest
        };
        assert!((282..=1050).contains(&entry), "cannot fill {rest}");
        holders.push(holder("i".repeat(entry - 26)));
        rest -= entry;
    }
    Response {
        id: 1,
        body: ResponseBody::Ok(OkReply {
            holders,
            ..OkReply::default()
        }),
    }
}

/// A message of exactly `message_bytes_max` (4 MiB) passes; one byte more
/// fails on encode, and on decode as soon as the crossing item's header is in.
#[test]
fn message_bytes_at_the_edge() {
    let limits = Limits::default();
    let max = limits.message_bytes_max;
    let at = ok_of_size(max);
    let mut buf = BytesMut::new();
    at.encode(&mut buf, &limits).unwrap();
    assert_eq!(buf.len(), max);
    let out = feed_responses(&buf, &[], &limits);
    assert_eq!(out.error, None);
    assert_eq!(out.messages, vec![at]);

    let over = ok_of_size(max + 1);
    let mut buf = BytesMut::new();
    assert_eq!(
        over.encode(&mut buf, &limits),
        Err(EncodeError::MessageTooLarge {
            limit: max,
            actual: max + 1
        })
    );
    assert!(buf.is_empty(), "a failed encode leaves nothing behind");
    over.encode(&mut buf, &loose()).unwrap();
    let out = feed_responses(&buf, &[7], &limits);
    assert_eq!(
        out.error,
        Some(DecodeError::MessageTooLarge {
            limit: max,
            actual: max as u64 + 1
        })
    );
    // The crossing item is the final OK action (2 bytes): reported when its
    // code is in, i.e. with at most one chunk more than the message minus 2.
    assert!(out.fed <= max + 1 - 2 + 7, "fed {}", out.fed);
}

/// A string that would push the message over its limit is refused from its
/// header alone, even when the field's own limit allows it.
#[test]
fn message_limit_checked_before_string_bytes_arrive() {
    let limits = Limits {
        error_text_bytes_max: 8 << 20,
        ..Limits::default()
    };
    let mut codec = ResponseCodec::new(limits);
    let mut buf = BytesMut::with_capacity(64);
    // REQUEST_ID, ERROR_CODE, then MESSAGE claiming 5 MiB.
    buf.extend_from_slice(&hex("3001 0000000000000001 1601 000c a601 00500000"));
    let (result, allocated) = allocated_by(|| codec.decode(&mut buf));
    assert!(
        matches!(
            result,
            Err(CodecError::Decode(DecodeError::MessageTooLarge {
                limit: 4194304,
                actual: 5242900
            }))
        ),
        "{result:?}"
    );
    assert!(allocated < 1024, "the decoder allocated {allocated} bytes");
    assert!(buf.capacity() <= 64, "the buffer grew");
    assert_eq!(buf.len(), 6, "only the offending header is left");
}

/// Items per message: exactly at the limit passes, one more fails.
#[test]
fn items_per_message_at_the_edge() {
    // BREAK with a token: REQUEST_ID, ZONE, NAME, TOKEN, BREAK = 5 items.
    let msg = Request {
        id: 1,
        body: RequestBody::Break(Break {
            zone: "z".into(),
            name: "n".into(),
            token: Some(9),
        }),
    };
    let at = Limits {
        items_per_message_max: 5,
        ..Limits::default()
    };
    let under = Limits {
        items_per_message_max: 4,
        ..Limits::default()
    };
    let mut buf = BytesMut::new();
    msg.encode(&mut buf, &at).unwrap();
    assert_eq!(Request::decode(&buf, &at), Ok(msg.clone()));
    assert_eq!(
        Request::decode(&buf, &under),
        Err(DecodeError::TooManyItems { limit: 4 })
    );
    assert_eq!(
        msg.encode(&mut BytesMut::new(), &under),
        Err(EncodeError::TooManyItems {
            limit: 4,
            actual: 5
        })
    );
}

/// List entries per message, at the default limit of 10,000.
#[test]
fn list_entries_at_the_edge() {
    let limits = Limits::default();
    let page = |n: usize| Response {
        id: 1,
        body: ResponseBody::Ok(OkReply {
            locks: (0..n)
                .map(|i| LockInfo {
                    name: format!("l{i}"),
                    mode: Mode::Exclusive,
                    holders: 1,
                    waiters: 0,
                })
                .collect(),
            ..OkReply::default()
        }),
    };
    let at = page(limits.list_entries_max);
    let mut buf = BytesMut::new();
    at.encode(&mut buf, &limits).unwrap();
    assert_eq!(Response::decode(&buf, &limits), Ok(at));

    let over = page(limits.list_entries_max + 1);
    assert_eq!(
        over.encode(&mut BytesMut::new(), &limits),
        Err(EncodeError::TooManyEntries {
            limit: 10_000,
            actual: 10_001
        })
    );
    let mut buf = BytesMut::new();
    over.encode(&mut buf, &loose()).unwrap();
    assert_eq!(
        Response::decode(&buf, &limits),
        Err(DecodeError::TooManyEntries { limit: 10_000 })
    );
}

/// The defaults are SPEC section 8's.
#[test]
fn defaults_are_the_spec() {
    let l = Limits::default();
    assert_eq!(l.zone_name_bytes_max, 63);
    assert_eq!(l.lock_name_bytes_max, 255);
    assert_eq!(l.key_bytes_max, 1024);
    assert_eq!(l.value_bytes_max, 1 << 20);
    assert_eq!(l.keys_per_lock_max, 1024);
    assert_eq!(l.waiters_per_lock_max, 10_000);
    assert_eq!(l.message_bytes_max, 4 << 20);
    assert_eq!(l.requests_in_flight_max, 1024);
}
