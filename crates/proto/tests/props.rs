//! Property tests: every valid request and response round-trips through
//! bytes; a stream decodes the same whole, in random chunks and byte by
//! byte; and no input, random or a mutated valid stream, makes the decoder
//! panic or disagree with itself across chunkings.

mod common;

use bytes::BytesMut;
use common::{feed_requests, feed_responses};
use oclocks_proto::*;
use proptest::collection::vec;
use proptest::option::of;
use proptest::prelude::*;

fn zone() -> impl Strategy<Value = String> {
    // At most 15 chars of at most 4 bytes: within the 63-byte zone limit.
    prop_oneof!["[a-z0-9._-]{1,20}", "\\PC{0,15}"]
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof!["[a-zA-Z0-9:/._-]{0,60}", "\\PC{0,40}"]
}

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,40}"
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![Just(Mode::Exclusive), Just(Mode::Shared)]
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::Connection), Just(Kind::Static)]
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![
        Just(Role::Follower),
        Just(Role::Candidate),
        Just(Role::Leader),
        Just(Role::Learner),
        Just(Role::QuorumOnly)
    ]
}

/// Durations and counters: small values, the `0 = none` default, the
/// extremes.
fn num() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), Just(u64::MAX), 0u64..100_000, any::<u64>()]
}

fn sig() -> impl Strategy<Value = Option<OwnerSig>> {
    of(
        (any::<[u8; 32]>(), vec(any::<u8>(), 64), num()).prop_map(|(public_key, s, counter)| {
            let mut signature = [0u8; 64];
            signature.copy_from_slice(&s);
            OwnerSig {
                public_key,
                signature,
                counter,
            }
        }),
    )
}

fn lock_ref() -> impl Strategy<Value = LockRef> {
    (zone(), name()).prop_map(|(zone, name)| LockRef { zone, name })
}

fn request_body() -> impl Strategy<Value = RequestBody> {
    prop_oneof![
        (any::<u16>(), any::<u128>(), of(num())).prop_map(|(protocol_version, client_id, t)| {
            RequestBody::Hello(Hello {
                protocol_version,
                client_id,
                session_timeout_ms: t,
            })
        }),
        Just(RequestBody::Keepalive),
        Just(RequestBody::Close),
        (
            (zone(), name(), mode(), kind()),
            (num(), num(), num(), num(), num(), num()),
            sig()
        )
            .prop_map(
                |(
                    (zone, name, mode, kind),
                    (ttl_ms, wait_ms, lock_delay_ms, owner_id, nonce, low_water),
                    owner_sig,
                )| {
                    RequestBody::Lock(Lock {
                        zone,
                        name,
                        mode,
                        kind,
                        ttl_ms,
                        wait_ms,
                        lock_delay_ms,
                        owner_id,
                        nonce,
                        low_water,
                        owner_sig,
                    })
                }
            ),
        num().prop_map(|nonce| RequestBody::Cancel { nonce }),
        num().prop_map(|node_id| RequestBody::RemoveServer { node_id }),
        num().prop_map(|node_id| RequestBody::PromoteServer { node_id }),
        (zone(), name(), num(), sig()).prop_map(|(zone, name, token, owner_sig)| {
            RequestBody::Release(Release {
                zone,
                name,
                token,
                owner_sig,
            })
        }),
        (zone(), name(), num(), num(), sig()).prop_map(|(zone, name, token, ttl_ms, owner_sig)| {
            RequestBody::Refresh(Refresh {
                zone,
                name,
                token,
                ttl_ms,
                owner_sig,
            })
        }),
        lock_ref().prop_map(RequestBody::Query),
        (zone(), name(), num()).prop_map(|(zone, name, token)| {
            RequestBody::CheckToken(CheckToken { zone, name, token })
        }),
        (zone(), name(), of(num()))
            .prop_map(|(zone, name, token)| { RequestBody::Break(Break { zone, name, token }) }),
        (zone(), of(name()), any::<u32>()).prop_map(|(zone, start_after, page_size)| {
            RequestBody::List(List {
                zone,
                start_after,
                page_size,
            })
        }),
        lock_ref().prop_map(RequestBody::Watch),
        lock_ref().prop_map(RequestBody::Unwatch),
        Just(RequestBody::Status),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    (1..=u64::MAX, request_body()).prop_map(|(id, body)| Request { id, body })
}

fn holder() -> impl Strategy<Value = Holder> {
    (text(), num(), mode(), kind(), num(), of(num())).prop_map(
        |(identity, token, mode, kind, held_ms, expires_in_ms)| Holder {
            identity,
            token,
            mode,
            kind,
            held_ms,
            expires_in_ms,
        },
    )
}

fn server() -> impl Strategy<Value = ServerInfo> {
    (
        num(),
        text(),
        zone(),
        any::<bool>(),
        of(role()),
        of(num()),
        of(num()),
    )
        .prop_map(
            |(node_id, address, site, serving, role, config_version, lag)| ServerInfo {
                node_id,
                address,
                site,
                serving,
                role,
                config_version,
                lag,
            },
        )
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    proptest::sample::select(ErrorCode::ALL)
}

fn lost_reason() -> impl Strategy<Value = LostReason> {
    prop_oneof![
        Just(LostReason::SessionExpired),
        Just(LostReason::TtlExpired),
        Just(LostReason::Broken)
    ]
}

fn response_body() -> impl Strategy<Value = ResponseBody> {
    prop_oneof![
        (
            (
                any::<u16>(),
                any::<u128>(),
                any::<bool>(),
                num(),
                num(),
                zone(),
                num()
            ),
            vec(
                (zone(), name(), num(), mode(), kind()).prop_map(
                    |(zone, name, token, mode, kind)| {
                        HeldLock {
                            zone,
                            name,
                            token,
                            mode,
                            kind,
                        }
                    }
                ),
                0..4
            ),
            vec(
                (zone(), name(), num()).prop_map(|(zone, name, nonce)| PendingWait {
                    zone,
                    name,
                    nonce
                }),
                0..4
            ),
            vec(server(), 0..4)
        )
            .prop_map(
                |(
                    (
                        protocol_version,
                        cluster_id,
                        resumed,
                        session_timeout_ms,
                        node_id,
                        site,
                        config_version,
                    ),
                    held,
                    waits,
                    servers,
                )| {
                    ResponseBody::HelloOk(HelloOk {
                        protocol_version,
                        cluster_id,
                        resumed,
                        session_timeout_ms,
                        node_id,
                        site,
                        config_version,
                        held,
                        waits,
                        servers,
                    })
                }
            ),
        (
            (of(num()), of(num()), any::<bool>(), of(any::<bool>())),
            vec(holder(), 0..4),
            of(any::<u32>()),
            vec(
                (name(), mode(), any::<u32>(), any::<u32>()).prop_map(
                    |(name, mode, holders, waiters)| {
                        LockInfo {
                            name,
                            mode,
                            holders,
                            waiters,
                        }
                    }
                ),
                0..4
            ),
            of(name())
        )
            .prop_map(
                |(
                    (token, expires_in_ms, already_released, token_current),
                    holders,
                    waiters,
                    locks,
                    next_cursor,
                )| {
                    ResponseBody::Ok(OkReply {
                        token,
                        expires_in_ms,
                        already_released,
                        token_current,
                        holders,
                        waiters,
                        locks,
                        next_cursor,
                    })
                }
            ),
        (
            error_code(),
            text(),
            vec(holder(), 0..3),
            of(num()),
            vec(server(), 0..3)
        )
            .prop_map(|(code, message, holders, leader_id, servers)| {
                ResponseBody::Error(ErrorReply {
                    code,
                    message,
                    holders,
                    leader_id,
                    servers,
                })
            }),
        any::<u32>().prop_map(|position| ResponseBody::Queued { position }),
        (
            (num(), zone(), role(), num(), of(num()), num(), num()),
            vec(server(), 0..4)
        )
            .prop_map(
                |(
                    (node_id, site, role, term, leader_id, config_version, applied_index),
                    servers,
                )| {
                    ResponseBody::StatusOk(StatusOk {
                        node_id,
                        site,
                        role,
                        term,
                        leader_id,
                        config_version,
                        applied_index,
                        servers,
                    })
                }
            ),
        (zone(), name(), num(), lost_reason()).prop_map(|(zone, name, token, reason)| {
            ResponseBody::Lost(Lost {
                zone,
                name,
                token,
                reason,
            })
        }),
        (zone(), name(), vec(holder(), 0..4)).prop_map(|(zone, name, holders)| {
            ResponseBody::WatchEvent(WatchEvent {
                zone,
                name,
                holders,
            })
        }),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    (num(), response_body()).prop_map(|(id, body)| Response { id, body })
}

fn encode_requests(reqs: &[Request]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    for r in reqs {
        r.encode(&mut buf, &Limits::default())
            .expect("valid request encodes");
    }
    buf.to_vec()
}

fn encode_responses(resps: &[Response]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    for r in resps {
        r.encode(&mut buf, &Limits::default())
            .expect("valid response encodes");
    }
    buf.to_vec()
}

/// Feed `bytes` whole, in `chunks` and byte by byte, as requests and as
/// responses: the three runs agree on messages and error, and none panics.
fn decode_all_ways(bytes: &[u8], chunks: &[usize]) {
    let limits = Limits::default();
    let whole = feed_requests(bytes, &[], &limits);
    for c in [chunks, &[1]] {
        let part = feed_requests(bytes, c, &limits);
        assert_eq!(part.messages, whole.messages);
        assert_eq!(part.error, whole.error);
    }
    let whole = feed_responses(bytes, &[], &limits);
    for c in [chunks, &[1]] {
        let part = feed_responses(bytes, c, &limits);
        assert_eq!(part.messages, whole.messages);
        assert_eq!(part.error, whole.error);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// A request decodes to itself, and decoding is the inverse of encoding.
    #[test]
    fn request_round_trips(req in request()) {
        let bytes = encode_requests(std::slice::from_ref(&req));
        prop_assert_eq!(Request::decode(&bytes, &Limits::default()), Ok(req));
    }

    /// A response decodes to itself.
    #[test]
    fn response_round_trips(resp in response()) {
        let bytes = encode_responses(std::slice::from_ref(&resp));
        prop_assert_eq!(Response::decode(&bytes, &Limits::default()), Ok(resp));
    }

    /// A pipelined stream of requests decodes to the same list whole, in
    /// random chunks and byte by byte.
    #[test]
    fn request_stream_any_chunking(reqs in vec(request(), 1..6), chunks in vec(1usize..40, 1..6)) {
        let bytes = encode_requests(&reqs);
        let limits = Limits::default();
        for c in [&[][..], &chunks, &[1]] {
            let out = feed_requests(&bytes, c, &limits);
            prop_assert_eq!(out.error, None);
            prop_assert_eq!(&out.messages, &reqs);
        }
    }

    /// The same for responses.
    #[test]
    fn response_stream_any_chunking(resps in vec(response(), 1..6), chunks in vec(1usize..40, 1..6)) {
        let bytes = encode_responses(&resps);
        let limits = Limits::default();
        for c in [&[][..], &chunks, &[1]] {
            let out = feed_responses(&bytes, c, &limits);
            prop_assert_eq!(out.error, None);
            prop_assert_eq!(&out.messages, &resps);
        }
    }

    /// Random bytes never panic the decoders, and decode the same whatever
    /// the chunking.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..400), chunks in vec(1usize..16, 1..4)) {
        decode_all_ways(&bytes, &chunks);
    }

    /// Valid streams with a few bytes overwritten, cut short or extended:
    /// closer to the input an attacker would try than random bytes.
    #[test]
    fn mutated_streams_never_panic(
        reqs in vec(request(), 1..4),
        resps in vec(response(), 1..4),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        chunks in vec(1usize..16, 1..4),
    ) {
        for mut bytes in [encode_requests(&reqs), encode_responses(&resps)] {
            for (at, b) in &edits {
                let i = at.index(bytes.len());
                bytes[i] = *b;
            }
            decode_all_ways(&bytes, &chunks);
            let cut = cut.index(bytes.len() + 1);
            decode_all_ways(&bytes[..cut], &chunks);
        }
    }

    /// Low-level items of every kind round-trip through `Item`.
    #[test]
    fn items_round_trip(code in any::<u16>(), n in any::<u128>(), s in vec(any::<u8>(), 0..300)) {
        let kind = ParamKind::of(code);
        let param = match kind {
            ParamKind::U8 => Param::U8(n as u8),
            ParamKind::U16 => Param::U16(n as u16),
            ParamKind::U32 => Param::U32(n as u32),
            ParamKind::U64 => Param::U64(n as u64),
            ParamKind::U128 => Param::U128(n),
            ParamKind::B32 => Param::B32([n as u8; 32]),
            ParamKind::B64 => Param::B64([n as u8; 64]),
            ParamKind::Action | ParamKind::Entry => Param::None,
            ParamKind::Str1 => Param::Str(s[..s.len().min(255)].to_vec()),
            _ => Param::Str(s),
        };
        let item = Item { code, param };
        let mut buf = BytesMut::new();
        item.encode(&mut buf);
        prop_assert_eq!(buf.len(), item.encoded_len());
        prop_assert_eq!(Item::decode(&buf, 1024), Ok(Some((item, buf.len()))));
    }
}
