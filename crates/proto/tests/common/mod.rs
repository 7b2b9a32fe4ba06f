//! Helpers shared by the integration tests: byte literals written as hex
//! with quoted ASCII, and the one place that runs a decoder over a buffer
//! (so a change of the codec API touches only this file).

#![allow(dead_code)]

use bytes::BytesMut;
use oclocks_proto::{
    CodecError, DecodeError, Limits, Request, RequestCodec, Response, ResponseCodec,
};
use tokio_util::codec::Decoder;

/// Bytes from hex digits, with whitespace ignored and `'text'` taken as
/// ASCII: `hex("8201 07 'default'")`.
pub fn hex(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut digits = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    out.push(c as u8);
                }
            }
            c if c.is_whitespace() || c == '|' => {}
            c => {
                digits.push(c);
                if digits.len() == 2 {
                    out.push(u8::from_str_radix(&digits, 16).expect("hex digit"));
                    digits.clear();
                }
            }
        }
    }
    assert!(digits.is_empty(), "odd number of hex digits");
    out
}

/// What feeding a stream to a decoder gave: the messages in order, then the
/// error that stopped it, if any.
#[derive(Debug, PartialEq)]
pub struct Outcome<M> {
    pub messages: Vec<M>,
    pub error: Option<DecodeError>,
    /// Bytes handed to the decoder when it stopped (all of them if no error).
    pub fed: usize,
}

fn unwrap_decode(e: CodecError) -> DecodeError {
    match e {
        CodecError::Decode(d) => d,
        other => panic!("not a decode error: {other}"),
    }
}

/// Feed `bytes` to a fresh decoder in chunks of the given sizes (cycled; the
/// whole input at once if empty), then signal end of stream.
pub fn feed<D, M>(mut codec: D, bytes: &[u8], chunks: &[usize]) -> Outcome<M>
where
    D: Decoder<Item = M, Error = CodecError>,
{
    let mut buf = BytesMut::new();
    let mut out = Outcome {
        messages: Vec::new(),
        error: None,
        fed: 0,
    };
    let mut rest = bytes;
    let mut i = 0;
    while !rest.is_empty() {
        let n = if chunks.is_empty() {
            rest.len()
        } else {
            chunks[i % chunks.len()].clamp(1, rest.len())
        };
        i += 1;
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        out.fed += n;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(m)) => out.messages.push(m),
                Ok(None) => break,
                Err(e) => {
                    out.error = Some(unwrap_decode(e));
                    return out;
                }
            }
        }
    }
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(m)) => out.messages.push(m),
            Ok(None) => break,
            Err(e) => {
                out.error = Some(unwrap_decode(e));
                break;
            }
        }
    }
    out
}

pub fn feed_requests(bytes: &[u8], chunks: &[usize], limits: &Limits) -> Outcome<Request> {
    feed(RequestCodec::new(limits.clone()), bytes, chunks)
}

pub fn feed_responses(bytes: &[u8], chunks: &[usize], limits: &Limits) -> Outcome<Response> {
    feed(ResponseCodec::new(limits.clone()), bytes, chunks)
}

/// The LOCK request of PROTOCOL.md's example: a shared static lock with a
/// TTL and a wait bound, signed by its owner key.
pub fn example_lock_request() -> oclocks_proto::Request {
    use oclocks_proto::{Kind, Lock, Mode, OwnerSig, Request, RequestBody};
    Request {
        id: 7,
        body: RequestBody::Lock(Lock {
            zone: "default".into(),
            name: "acct:4587".into(),
            mode: Mode::Shared,
            kind: Kind::Static,
            ttl_ms: 30_000,
            wait_ms: 5_000,
            lock_delay_ms: 0,
            owner_id: 0,
            nonce: 42,
            low_water: 40,
            owner_sig: Some(OwnerSig {
                public_key: [0x11; 32],
                signature: [0x22; 64],
                counter: 1,
            }),
        }),
    }
}

/// The ERROR LOCKED reply of PROTOCOL.md's example (one HOLDER entry).
pub fn example_locked_error() -> oclocks_proto::Response {
    use oclocks_proto::{ErrorCode, ErrorReply, Holder, Kind, Mode, Response, ResponseBody};
    Response {
        id: 8,
        body: ResponseBody::Error(ErrorReply {
            code: ErrorCode::Locked,
            message: "held".into(),
            holders: vec![Holder {
                identity: "svc-a".into(),
                token: 1001,
                mode: Mode::Exclusive,
                kind: Kind::Connection,
                held_ms: 1500,
                expires_in_ms: None,
            }],
            leader_id: None,
            servers: vec![],
        }),
    }
}
