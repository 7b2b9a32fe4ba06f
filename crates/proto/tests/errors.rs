//! Malformed input gives the right typed error, and the decoder then refuses
//! to go on. One table of (input, expected error); `check` is the single
//! place that runs the decoders, fed whole and byte by byte.

mod common;

use bytes::BytesMut;
use common::{feed_requests, feed_responses, hex};
use oclocks_proto::*;
use tokio_util::codec::Decoder;

const ID: &str = "3001 0000000000000005 ";

/// Decoding `input` as requests (server side) fails with `want`, fed whole
/// and fed byte by byte, after yielding no message.
fn check_request(input: &str, want: DecodeError) {
    let bytes = hex(input);
    for chunks in [&[][..], &[1]] {
        let out = feed_requests(&bytes, chunks, &Limits::default());
        assert_eq!(out.messages, vec![], "{input}");
        assert_eq!(
            out.error.as_ref(),
            Some(&want),
            "{input} in chunks {chunks:?}"
        );
    }
    assert_eq!(want.error_code(), ErrorCode::Protocol);
}

/// The same for responses (client side).
fn check_response(input: &str, want: DecodeError) {
    let bytes = hex(input);
    for chunks in [&[][..], &[1]] {
        let out = feed_responses(&bytes, chunks, &Limits::default());
        assert_eq!(out.messages, vec![], "{input}");
        assert_eq!(
            out.error.as_ref(),
            Some(&want),
            "{input} in chunks {chunks:?}"
        );
    }
}

#[test]
fn unknown_codes() {
    // An action, a parameter and a string code nobody defined. The string is
    // refused from its code alone, before its length is read.
    check_request(
        &(ID.to_owned() + "7fff"),
        DecodeError::UnknownCode { code: 0x7fff },
    );
    check_request(
        &(ID.to_owned() + "0fff 00"),
        DecodeError::UnknownCode { code: 0x0fff },
    );
    check_request("9fff", DecodeError::UnknownCode { code: 0x9fff });
    check_request("d001", DecodeError::UnknownCode { code: 0xd001 });
    // A known code of another group is known: it is refused by the action.
    check_response(
        &(ID.to_owned() + "7201"),
        DecodeError::UnexpectedAction {
            action: "LOCK",
            code: 0x7201,
        },
    );
    check_request(
        &(ID.to_owned() + "7601"),
        DecodeError::UnexpectedAction {
            action: "OK",
            code: 0x7601,
        },
    );
}

#[test]
fn duplicate_fields() {
    check_request(
        &(ID.to_owned() + ID + "7102"),
        DecodeError::DuplicateField {
            field: "REQUEST_ID",
            code: 0x3001,
        },
    );
    // The same field in two widths is still the same field.
    check_request(
        &(ID.to_owned() + "8201 01 'z' 9201 0001 'y' 8202 01 'n' 7205"),
        DecodeError::DuplicateField {
            field: "ZONE",
            code: 0x9201,
        },
    );
    // Within one entry too; but each entry has its own fields.
    check_response(
        &(ID.to_owned() + "c004 3501 0000000000000001 3501 0000000000000002"),
        DecodeError::DuplicateField {
            field: "NODE_ID",
            code: 0x3501,
        },
    );
}

#[test]
fn missing_fields() {
    check_request(
        "7102",
        DecodeError::MissingField {
            field: "REQUEST_ID",
            action: "KEEPALIVE",
        },
    );
    check_request(
        &(ID.to_owned() + "8201 01 'z' 8202 01 'n' 7201"),
        DecodeError::MissingField {
            field: "NONCE",
            action: "LOCK",
        },
    );
    // Signature parts come all together or not at all.
    check_request(
        &(ID.to_owned()
            + "8201 01 'z' 8202 01 'n' 3205 0000000000000001 5201"
            + &"00".repeat(32)
            + "7201"),
        DecodeError::MissingField {
            field: "SIGNATURE",
            action: "LOCK",
        },
    );
    check_response(
        "7601",
        DecodeError::MissingField {
            field: "REQUEST_ID",
            action: "OK",
        },
    );
    // An entry's required field.
    check_response(
        &(ID.to_owned() + "c001 8602 01 'a' 3601 0000000000000001 7601"),
        DecodeError::MissingField {
            field: "TOKEN",
            action: "HOLDER",
        },
    );
}

#[test]
fn fields_the_action_does_not_take() {
    check_request(
        &(ID.to_owned() + "8201 01 'z' 7102"),
        DecodeError::FieldNotAllowed {
            field: "ZONE",
            action: "KEEPALIVE",
        },
    );
    // A list entry in a request that takes none.
    check_request(
        &(ID.to_owned() + "c003 8201 01 'z' 8202 01 'n' 3205 0000000000000001 7102"),
        DecodeError::FieldNotAllowed {
            field: "WAIT",
            action: "KEEPALIVE",
        },
    );
    // A field the entry does not take (a message field after the entries).
    check_response(
        &(ID.to_owned() + "c001 8602 01 'a' 3207 0000000000000001 3601 0000000000000001 3503 0000000000000001 7601"),
        DecodeError::FieldNotAllowed {
            field: "TERM",
            action: "HOLDER",
        },
    );
    // An entry the action does not take.
    check_response(
        &(ID.to_owned() + "c003 8201 01 'z' 8202 01 'n' 3205 0000000000000001 7601"),
        DecodeError::FieldNotAllowed {
            field: "WAIT",
            action: "OK",
        },
    );
}

#[test]
fn invalid_values() {
    check_request(
        &(ID.to_owned() + "8201 02 ff fe 8202 01 'n' 7205"),
        DecodeError::InvalidUtf8 { field: "ZONE" },
    );
    check_request(
        &(ID.to_owned() + "8201 01 'z' 8202 01 'n' 0201 02 3205 0000000000000001 7201"),
        DecodeError::InvalidValue {
            field: "MODE",
            value: 2,
        },
    );
    check_request(
        &(ID.to_owned() + "8201 01 'z' 8202 01 'n' 0202 07 3205 0000000000000001 7201"),
        DecodeError::InvalidValue {
            field: "KIND",
            value: 7,
        },
    );
    check_response(
        &(ID.to_owned() + "0601 02 7601"),
        DecodeError::InvalidValue {
            field: "ALREADY_RELEASED",
            value: 2,
        },
    );
    check_response(
        &(ID.to_owned() + "1601 03e7 7602"),
        DecodeError::InvalidValue {
            field: "ERROR_CODE",
            value: 999,
        },
    );
    check_response(
        &(ID.to_owned() + "8201 01 'z' 8202 01 'n' 3207 0000000000000001 0701 04 7701"),
        DecodeError::InvalidValue {
            field: "LOST_REASON",
            value: 4,
        },
    );
    check_response(
        &(ID.to_owned() + "8201 01 'z' 8202 01 'n' 3207 0000000000000001 0701 00 7701"),
        DecodeError::InvalidValue {
            field: "LOST_REASON",
            value: 0,
        },
    );
    check_request(
        "3001 0000000000000000 7102",
        DecodeError::ZeroRequestId {
            action: "KEEPALIVE",
        },
    );
}

/// A stream that ends inside a message is an error, not a silent stop; a
/// stream that ends between messages is a clean end.
#[test]
fn truncated_streams() {
    check_request(
        &(ID.to_owned() + "8201 05 'ab"),
        DecodeError::Truncated { buffered: 5 },
    );
    check_request(ID, DecodeError::Truncated { buffered: 0 });
    check_request("30", DecodeError::Truncated { buffered: 1 });
    let out = feed_requests(&hex(&(ID.to_owned() + "7102")), &[1], &Limits::default());
    assert_eq!(out.error, None);
    assert_eq!(out.messages.len(), 1);
    let out = feed_requests(&[], &[], &Limits::default());
    assert_eq!(out.error, None);

    let keepalive = hex(&(ID.to_owned() + "7102"));
    assert_eq!(
        Request::decode(&[keepalive.clone(), hex("00")].concat(), &Limits::default()),
        Err(DecodeError::TrailingBytes { count: 1 })
    );
    assert_eq!(
        Request::decode(&keepalive[..5], &Limits::default()),
        Err(DecodeError::Truncated { buffered: 5 })
    );
}

/// After an error the decoder stays failed: a stream cannot be resumed
/// (there is no telling where the next item starts).
#[test]
fn no_resync_after_an_error() {
    let mut codec = RequestCodec::default();
    let mut buf = BytesMut::from(&hex(&(ID.to_owned() + "7fff" + ID + "7102"))[..]);
    assert!(codec.decode(&mut buf).is_err());
    assert!(codec.has_failed());
    assert_eq!(codec.partial_request_id(), Some(5));
    for _ in 0..2 {
        match codec.decode(&mut buf) {
            Err(CodecError::Decode(DecodeError::Failed)) => {}
            other => panic!("{other:?}"),
        }
    }
}

/// Several pipelined requests in one buffer come out one per call, in
/// order; ids need not be ordered.
#[test]
fn pipelined_messages() {
    let bytes = hex("3001 0000000000000009 7102
         3001 0000000000000003 8201 01 'z' 8202 01 'n' 7205
         3001 0000000000000004 7501");
    let mut codec = RequestCodec::default();
    let mut buf = BytesMut::from(&bytes[..]);
    let mut ids = Vec::new();
    while let Some(r) = codec.decode(&mut buf).unwrap() {
        ids.push((r.id, r.action()));
        assert!(!codec.in_message());
    }
    assert_eq!(ids, vec![(9, "KEEPALIVE"), (3, "QUERY"), (4, "STATUS")]);
    assert!(buf.is_empty());
}

/// Encoding a request with the reserved id 0 is refused.
#[test]
fn request_id_zero_is_not_encoded() {
    let r = Request {
        id: 0,
        body: RequestBody::Keepalive,
    };
    assert_eq!(
        r.encode(&mut BytesMut::new(), &Limits::default()),
        Err(EncodeError::ZeroRequestId)
    );
}
