//! Fuzz target over the stream decoders. The first input byte picks a chunk
//! size; the rest is fed to the server's and the client's codec, whole and in
//! chunks. Checked: no panic; the same messages and the same error whatever
//! the chunking; and every message decoded re-encodes (within the same
//! limits) and decodes back to itself.
//!
//! Not covered here: the typed encoder on arbitrary structs (the property
//! tests in crates/proto/tests/props.rs do that).

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use oclocks_proto::{CodecError, Limits, Request, RequestCodec, Response, ResponseCodec};
use tokio_util::codec::Decoder;

/// Messages decoded, then the error that stopped the decoder (as text).
fn feed<D, M>(mut codec: D, data: &[u8], chunk: usize) -> (Vec<M>, Option<String>)
where
    D: Decoder<Item = M, Error = CodecError>,
{
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(e) => return (out, Some(e.to_string())),
            }
        }
    }
    match codec.decode_eof(&mut buf) {
        Ok(Some(m)) => out.push(m),
        Ok(None) => {}
        Err(e) => return (out, Some(e.to_string())),
    }
    (out, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 16) + 1;
    // Small limits as well as the defaults, so the limit paths are reached
    // by short inputs.
    let small = Limits {
        zone_name_bytes_max: 8,
        lock_name_bytes_max: 16,
        message_bytes_max: 256,
        items_per_message_max: 24,
        list_entries_max: 4,
        identity_bytes_max: 16,
        site_bytes_max: 8,
        address_bytes_max: 16,
        error_text_bytes_max: 32,
        ..Limits::default()
    };
    let limits = if first & 0x80 == 0 { Limits::default() } else { small };

    let whole = feed(RequestCodec::new(limits.clone()), rest, usize::MAX);
    let parts = feed(RequestCodec::new(limits.clone()), rest, chunk);
    assert_eq!(whole, parts, "requests: chunking changed the result");
    for req in &whole.0 {
        let mut buf = BytesMut::new();
        req.encode(&mut buf, &limits).expect("a decoded request re-encodes");
        assert_eq!(Request::decode(&buf, &limits).as_ref(), Ok(req));
    }

    let whole = feed(ResponseCodec::new(limits.clone()), rest, usize::MAX);
    let parts = feed(ResponseCodec::new(limits.clone()), rest, chunk);
    assert_eq!(whole, parts, "responses: chunking changed the result");
    for resp in &whole.0 {
        let mut buf = BytesMut::new();
        resp.encode(&mut buf, &limits).expect("a decoded response re-encodes");
        assert_eq!(Response::decode(&buf, &limits).as_ref(), Ok(resp));
    }
});
