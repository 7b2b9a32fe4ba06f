//! The streaming codecs: [`RequestCodec`] for servers (decodes requests,
//! encodes responses) and [`ResponseCodec`] for clients (the reverse), as
//! `tokio_util::codec` [`Decoder`]/[`Encoder`] implementations.
//!
//! Decoding is incremental: input may arrive one byte at a time, and each
//! complete item is taken out of the buffer as soon as it is there, so the
//! buffer holds at most one partial item. Before waiting for the rest of an
//! item, the decoder checks everything its header tells: the code is known,
//! a string's length prefix is within the field's limit, and the message,
//! with this item, stays within the bytes and items limits. So a prefix that
//! claims 8 GiB fails as soon as its 10 header bytes are in, and the codec
//! never reserves buffer space for bytes not yet received.
//!
//! No resynchronisation: after any error the decoder answers every further
//! call with [`DecodeError::Failed`], and the connection is to be closed
//! (after sending one ERROR, see PROTOCOL.md).

use std::marker::PhantomData;

use bytes::{Buf, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::codes;
use crate::decode::{Assembler, Decode, Value};
use crate::encode::encode_message;
use crate::error::{CodecError, DecodeError};
use crate::item::{array, be_u128, be_u64, canonical, ItemHeader, ParamKind};
use crate::limits::Limits;
use crate::message::{Request, Response};

/// The incremental decoder of one direction of a stream: items in, typed
/// messages (`M` = [`Request`] or [`Response`]) out.
#[derive(Debug)]
pub(crate) struct MessageDecoder<M> {
    limits: Limits,
    asm: Assembler,
    failed: bool,
    _message: PhantomData<fn() -> M>,
}

impl<M> MessageDecoder<M> {
    /// A decoder enforcing `limits`.
    pub fn new(limits: Limits) -> MessageDecoder<M> {
        MessageDecoder {
            limits,
            asm: Assembler::default(),
            failed: false,
            _message: PhantomData,
        }
    }

    /// The limits this decoder enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The REQUEST_ID of the message being decoded, if its item has been
    /// read.
    pub fn partial_request_id(&self) -> Option<u64> {
        self.asm.request_id()
    }

    /// Whether a message has been started (some of its items read) and not
    /// finished.
    pub fn in_message(&self) -> bool {
        self.asm.in_message()
    }

    /// Whether an error has been reported: the stream cannot be resumed.
    pub fn has_failed(&self) -> bool {
        self.failed
    }
}

impl<M: Decode> MessageDecoder<M> {
    /// Take complete items out of `src` until a message is complete
    /// (`Ok(Some)`), the input runs out (`Ok(None)`: call again with more),
    /// or the input is invalid (`Err`: close the stream).
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<M>, DecodeError> {
        if self.failed {
            return Err(DecodeError::Failed);
        }
        let result = self.decode_items(src);
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    /// Like [`MessageDecoder::decode`], at the end of the stream: input left
    /// over, or a message begun and not finished, is [`DecodeError::Truncated`].
    pub fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<M>, DecodeError> {
        match self.decode(src)? {
            Some(msg) => Ok(Some(msg)),
            None if src.is_empty() && !self.asm.in_message() => Ok(None),
            None => {
                self.failed = true;
                Err(DecodeError::Truncated {
                    buffered: src.len(),
                })
            }
        }
    }

    fn decode_items(&mut self, src: &mut BytesMut) -> Result<Option<M>, DecodeError> {
        loop {
            // Everything the header tells is checked before waiting for the
            // rest: an unknown code as soon as its two bytes are in, limits
            // as soon as the length prefix is.
            let Some(&[hi, lo]) = src.get(..2) else {
                return Ok(None);
            };
            let code = u16::from_be_bytes([hi, lo]);
            let info = codes::lookup(code).ok_or(DecodeError::UnknownCode { code })?;
            let Some(h) = ItemHeader::peek(src) else {
                return Ok(None);
            };
            if h.kind.is_string() {
                let limit = self.limits.string_bytes_max(h.code).unwrap_or(0);
                if h.param_len > limit as u64 {
                    return Err(DecodeError::StringTooLong {
                        code: h.code,
                        field: info.name,
                        limit,
                        actual: h.param_len,
                    });
                }
            }
            let bytes = self.asm.bytes.saturating_add(h.total_len());
            if bytes > self.limits.message_bytes_max as u64 {
                return Err(DecodeError::MessageTooLarge {
                    limit: self.limits.message_bytes_max,
                    actual: bytes,
                });
            }
            if self.asm.items >= self.limits.items_per_message_max {
                return Err(DecodeError::TooManyItems {
                    limit: self.limits.items_per_message_max,
                });
            }
            let Some(param) = h.param(src) else {
                return Ok(None);
            };
            let code = canonical(h.code);
            let value = match h.kind {
                ParamKind::Action => {
                    let msg = self.asm.action::<M>(code);
                    src.advance(h.header_len);
                    return msg.map(Some);
                }
                ParamKind::Entry => {
                    self.asm.entry(code, &self.limits)?;
                    None
                }
                ParamKind::U8 | ParamKind::U16 | ParamKind::U32 | ParamKind::U64 => {
                    Some(Value::Int(be_u64(param)))
                }
                ParamKind::U128 => Some(Value::U128(be_u128(param))),
                ParamKind::B32 => Some(Value::B32(array(param))),
                ParamKind::B64 => Some(Value::B64(array(param))),
                ParamKind::Str1 | ParamKind::Str2 | ParamKind::Str4 | ParamKind::Str8 => {
                    let s = std::str::from_utf8(param)
                        .map_err(|_| DecodeError::InvalidUtf8 { field: info.name })?;
                    Some(Value::Str(s.to_owned()))
                }
            };
            if let Some(value) = value {
                self.asm.field(code, h.code, value)?;
            }
            self.asm.items += 1;
            self.asm.bytes = bytes;
            src.advance(h.header_len + param.len());
        }
    }
}

/// Decode exactly one message from `src`.
pub(crate) fn decode_one<M: Decode>(src: &[u8], limits: &Limits) -> Result<M, DecodeError> {
    let mut buf = BytesMut::from(src);
    let mut dec = MessageDecoder::<M>::new(limits.clone());
    match dec.decode(&mut buf)? {
        Some(msg) if buf.is_empty() => Ok(msg),
        Some(_) => Err(DecodeError::TrailingBytes { count: buf.len() }),
        None => Err(DecodeError::Truncated {
            buffered: buf.len(),
        }),
    }
}

/// The server side of a connection: decodes [`Request`]s, encodes
/// [`Response`]s.
#[derive(Debug)]
pub struct RequestCodec {
    decoder: MessageDecoder<Request>,
}

/// The client side of a connection: decodes [`Response`]s, encodes
/// [`Request`]s.
#[derive(Debug)]
pub struct ResponseCodec {
    decoder: MessageDecoder<Response>,
}

macro_rules! codec {
    ($codec:ident, $incoming:ty, $outgoing:ty) => {
        impl $codec {
            /// A codec enforcing `limits` in both directions.
            pub fn new(limits: Limits) -> $codec {
                $codec {
                    decoder: MessageDecoder::new(limits),
                }
            }

            /// The limits this codec enforces.
            pub fn limits(&self) -> &Limits {
                self.decoder.limits()
            }

            /// The REQUEST_ID of the message being decoded, if its item has
            /// been read. After a decode error, this is the id the ERROR
            /// reply should carry (0 if `None`); encoders send REQUEST_ID
            /// first, so it is usually known.
            pub fn partial_request_id(&self) -> Option<u64> {
                self.decoder.partial_request_id()
            }

            /// Whether some items of a message have been read and its action
            /// has not.
            pub fn in_message(&self) -> bool {
                self.decoder.in_message()
            }

            /// Whether a decode error has been reported. The stream cannot
            /// be resumed: every further decode fails.
            pub fn has_failed(&self) -> bool {
                self.decoder.has_failed()
            }
        }

        impl Default for $codec {
            fn default() -> $codec {
                $codec::new(Limits::default())
            }
        }

        impl Decoder for $codec {
            type Item = $incoming;
            type Error = CodecError;

            fn decode(&mut self, src: &mut BytesMut) -> Result<Option<$incoming>, CodecError> {
                Ok(self.decoder.decode(src)?)
            }

            fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<$incoming>, CodecError> {
                Ok(self.decoder.decode_eof(src)?)
            }
        }

        impl Encoder<$outgoing> for $codec {
            type Error = CodecError;

            fn encode(&mut self, msg: $outgoing, dst: &mut BytesMut) -> Result<(), CodecError> {
                Ok(encode_message(&msg, dst, &self.decoder.limits)?)
            }
        }

        impl Encoder<&$outgoing> for $codec {
            type Error = CodecError;

            fn encode(&mut self, msg: &$outgoing, dst: &mut BytesMut) -> Result<(), CodecError> {
                Ok(encode_message(msg, dst, &self.decoder.limits)?)
            }
        }
    };
}

codec!(RequestCodec, Request, Response);
codec!(ResponseCodec, Response, Request);
