//! Golden byte vectors: the exact bytes of one item of each of the 13
//! parameter kinds, of a full LOCK request and its OK reply, and of an ERROR
//! LOCKED naming its holder. A change here breaks every deployed peer, so
//! these bytes are written out by hand, not computed.

mod common;

use bytes::BytesMut;
use common::hex;
use oclocks_proto::item::{canonical, string_code};
use oclocks_proto::*;

/// Encoding `item` gives `bytes`, decoding `bytes` gives `item` and its
/// length, and every strict prefix of `bytes` decodes to "need more".
fn check_item(item: Item, bytes: &[u8]) {
    let mut buf = BytesMut::new();
    item.encode(&mut buf);
    assert_eq!(&buf[..], bytes, "encode {item:?}");
    assert_eq!(item.encoded_len(), bytes.len());
    assert_eq!(
        Item::decode(bytes, 1 << 20),
        Ok(Some((item.clone(), bytes.len()))),
        "decode {bytes:02x?}"
    );
    for cut in 0..bytes.len() {
        assert_eq!(
            Item::decode(&bytes[..cut], 1 << 20),
            Ok(None),
            "prefix {cut}"
        );
    }
    // Trailing bytes are not part of the item.
    let mut longer = bytes.to_vec();
    longer.extend_from_slice(&[0x70, 0x00]);
    assert_eq!(
        Item::decode(&longer, 1 << 20),
        Ok(Some((item, bytes.len())))
    );
}

/// One golden vector per parameter kind, in code order.
#[test]
fn thirteen_parameter_kinds() {
    let key: [u8; 32] = std::array::from_fn(|i| i as u8);
    let sig: [u8; 64] = std::array::from_fn(|i| 0x80 | i as u8);
    let cases: Vec<(ParamKind, Item, Vec<u8>)> = vec![
        (
            ParamKind::U8,
            Item {
                code: 0x0201,
                param: Param::U8(1),
            },
            hex("0201 01"),
        ),
        (
            ParamKind::U16,
            Item {
                code: 0x1101,
                param: Param::U16(0x0102),
            },
            hex("1101 0102"),
        ),
        (
            ParamKind::U32,
            Item {
                code: 0x2201,
                param: Param::U32(0x0102_0304),
            },
            hex("2201 01020304"),
        ),
        (
            ParamKind::U64,
            Item {
                code: 0x3001,
                param: Param::U64(0x0102_0304_0506_0708),
            },
            hex("3001 0102030405060708"),
        ),
        (
            ParamKind::U128,
            Item {
                code: 0x4101,
                param: Param::U128(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10),
            },
            hex("4101 0102030405060708090a0b0c0d0e0f10"),
        ),
        (
            ParamKind::B32,
            Item {
                code: 0x5201,
                param: Param::B32(key),
            },
            hex("5201 000102030405060708090a0b0c0d0e0f 101112131415161718191a1b1c1d1e1f"),
        ),
        (
            ParamKind::B64,
            Item {
                code: 0x6201,
                param: Param::B64(sig),
            },
            hex(
                "6201 808182838485868788898a8b8c8d8e8f 909192939495969798999a9b9c9d9e9f
                      a0a1a2a3a4a5a6a7a8a9aaabacadaeaf b0b1b2b3b4b5b6b7b8b9babbbcbdbebf",
            ),
        ),
        (
            ParamKind::Action,
            Item {
                code: 0x7201,
                param: Param::None,
            },
            hex("7201"),
        ),
        (
            ParamKind::Str1,
            Item {
                code: 0x8201,
                param: Param::Str(b"zone".to_vec()),
            },
            hex("8201 04 'zone'"),
        ),
        (
            ParamKind::Str2,
            Item {
                code: 0x9201,
                param: Param::Str(b"zone".to_vec()),
            },
            hex("9201 0004 'zone'"),
        ),
        (
            ParamKind::Str4,
            Item {
                code: 0xa201,
                param: Param::Str(b"zone".to_vec()),
            },
            hex("a201 00000004 'zone'"),
        ),
        (
            ParamKind::Str8,
            Item {
                code: 0xb201,
                param: Param::Str(b"zone".to_vec()),
            },
            hex("b201 0000000000000004 'zone'"),
        ),
        (
            ParamKind::Entry,
            Item {
                code: 0xc001,
                param: Param::None,
            },
            hex("c001"),
        ),
    ];
    assert_eq!(cases.len(), 13);
    for (i, (kind, item, bytes)) in cases.into_iter().enumerate() {
        assert_eq!(kind, ParamKind::ALL[i]);
        assert_eq!(item.kind(), kind);
        check_item(item, &bytes);
    }
    // The empty string, and the top of the none-kinds range.
    check_item(
        Item {
            code: 0x8202,
            param: Param::Str(Vec::new()),
        },
        &hex("8202 00"),
    );
    check_item(
        Item {
            code: 0xffff,
            param: Param::None,
        },
        &hex("ffff"),
    );
}

/// Encoders pick the narrowest length width; all four widths name one field.
#[test]
fn string_width_is_the_narrowest_that_fits() {
    assert_eq!(string_code(0x8201, 0), 0x8201);
    assert_eq!(string_code(0x8201, 255), 0x8201);
    assert_eq!(string_code(0x8201, 256), 0x9201);
    assert_eq!(string_code(0xb201, 65_535), 0x9201);
    assert_eq!(string_code(0x8201, 65_536), 0xa201);
    assert_eq!(string_code(0x8201, u64::from(u32::MAX)), 0xa201);
    assert_eq!(string_code(0x8201, u64::from(u32::MAX) + 1), 0xb201);
    for c in [0x8201, 0x9201, 0xa201, 0xb201] {
        assert_eq!(canonical(c), 0x8201);
    }
    assert_eq!(canonical(0x3201), 0x3201);

    // A 300-byte error message goes out with a 2-byte length.
    let resp = Response {
        id: 1,
        body: ResponseBody::Error(ErrorReply {
            code: ErrorCode::Invalid,
            message: "x".repeat(300),
            holders: vec![],
            leader_id: None,
            servers: vec![],
        }),
    };
    let mut buf = BytesMut::new();
    resp.encode(&mut buf, &Limits::default()).unwrap();
    assert_eq!(&buf[14..18], &hex("9601 012c")[..]);
}

/// The LOCK request of PROTOCOL.md's example: a shared static lock with a
/// TTL and a wait bound, signed by its owner key.
fn lock_request() -> (Request, Vec<u8>) {
    let req = common::example_lock_request();
    let bytes = [
        hex("3001 0000000000000007"),           // REQUEST_ID 7
        hex("8201 07 'default'"),               // ZONE
        hex("8202 09 'acct:4587'"),             // NAME
        hex("0201 01"),                         // MODE shared
        hex("0202 01"),                         // KIND static
        hex("3201 0000000000007530"),           // TTL_MS 30000
        hex("3202 0000000000001388"),           // WAIT_MS 5000
        hex("3205 000000000000002a"),           // NONCE 42
        hex("3206 0000000000000028"),           // LOW_WATER 40
        [hex("5201"), vec![0x11; 32]].concat(), // OWNER_KEY
        [hex("6201"), vec![0x22; 64]].concat(), // SIGNATURE
        hex("3208 0000000000000001"),           // SIG_COUNTER 1
        hex("7201"),                            // LOCK
    ]
    .concat();
    (req, bytes)
}

#[test]
fn lock_request_golden() {
    let (req, bytes) = lock_request();
    let mut buf = BytesMut::new();
    req.encode(&mut buf, &Limits::default()).unwrap();
    assert_eq!(&buf[..], &bytes[..]);
    assert_eq!(bytes.len(), 190);
    assert_eq!(Request::decode(&bytes, &Limits::default()), Ok(req));
}

/// The OK reply to that LOCK: the fencing token and the TTL left.
#[test]
fn lock_reply_golden() {
    let resp = Response {
        id: 7,
        body: ResponseBody::Ok(OkReply {
            token: Some(1001),
            expires_in_ms: Some(30_000),
            ..OkReply::default()
        }),
    };
    let bytes = [
        hex("3001 0000000000000007"), // REQUEST_ID 7
        hex("3207 00000000000003e9"), // TOKEN 1001
        hex("3602 0000000000007530"), // EXPIRES_IN_MS 30000
        hex("7601"),                  // OK
    ]
    .concat();
    let mut buf = BytesMut::new();
    resp.encode(&mut buf, &Limits::default()).unwrap();
    assert_eq!(&buf[..], &bytes[..]);
    assert_eq!(Response::decode(&bytes, &Limits::default()), Ok(resp));
}

/// A try-lock that failed: ERROR LOCKED with one HOLDER entry.
#[test]
fn locked_error_golden() {
    let resp = common::example_locked_error();
    let bytes = [
        hex("3001 0000000000000008"), // REQUEST_ID 8
        hex("1601 0001"),             // ERROR_CODE LOCKED
        hex("8601 04 'held'"),        // MESSAGE
        hex("c001"),                  // HOLDER entry
        hex("8602 05 'svc-a'"),       //   IDENTITY
        hex("3207 00000000000003e9"), //   TOKEN 1001
        hex("3601 00000000000005dc"), //   HELD_MS 1500
        hex("7602"),                  // ERROR
    ]
    .concat();
    let mut buf = BytesMut::new();
    resp.encode(&mut buf, &Limits::default()).unwrap();
    assert_eq!(&buf[..], &bytes[..]);
    assert_eq!(Response::decode(&bytes, &Limits::default()), Ok(resp));
}

/// Decoders take the fields in any order (message fields before the first
/// entry) and any string width; this LOCK is the golden one reordered, with
/// the zone in an 8-byte-length string.
#[test]
fn decoder_accepts_any_field_order_and_width() {
    let (req, _) = lock_request();
    let bytes = [
        [hex("6201"), vec![0x22; 64]].concat(),
        hex("3208 0000000000000001"),
        [hex("5201"), vec![0x11; 32]].concat(),
        hex("3206 0000000000000028"),
        hex("3205 000000000000002a"),
        hex("3202 0000000000001388"),
        hex("3201 0000000000007530"),
        hex("0202 01"),
        hex("0201 01"),
        hex("a202 00000009 'acct:4587'"),
        hex("b201 0000000000000007 'default'"),
        hex("3001 0000000000000007"),
        hex("7201"),
    ]
    .concat();
    assert_eq!(Request::decode(&bytes, &Limits::default()), Ok(req));
}
