//! Items, the unit of the wire format, at the lowest level: a big-endian u16
//! code whose top nibble fixes the parameter that follows ([`ParamKind`]),
//! then that parameter ([`Param`]).
//!
//! This module knows nothing about which codes exist or what they mean (that
//! is [`crate::codes`]), nor about messages (that is the codecs, [`crate::RequestCodec`]): it
//! frames and unframes single items. [`ItemHeader::peek`] is the one place
//! that reads an item's header; the message decoder uses it too, so both
//! layers agree on the framing byte for byte.

use bytes::{BufMut, BytesMut};

use crate::error::DecodeError;

/// The parameter an item carries, fixed by the top nibble of its code.
///
/// There are 13 kinds: seven fixed-width integers or byte arrays, two kinds
/// with no parameter ([`ParamKind::Action`] for `0x7xxx`, [`ParamKind::Entry`]
/// for `0xc000..=0xffff`) and four string kinds that differ only in the width
/// of their big-endian length prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamKind {
    /// `0x0xxx`: a 1-byte unsigned integer.
    U8,
    /// `0x1xxx`: a 2-byte big-endian unsigned integer.
    U16,
    /// `0x2xxx`: a 4-byte big-endian unsigned integer.
    U32,
    /// `0x3xxx`: an 8-byte big-endian unsigned integer.
    U64,
    /// `0x4xxx`: a 16-byte big-endian unsigned integer (ids).
    U128,
    /// `0x5xxx`: 32 raw bytes (Ed25519 public keys, hashes).
    B32,
    /// `0x6xxx`: 64 raw bytes (Ed25519 signatures).
    B64,
    /// `0x7xxx`: no parameter. Used for action items, which end a message.
    Action,
    /// `0x8xxx`: a string with a 1-byte length prefix.
    Str1,
    /// `0x9xxx`: a string with a 2-byte big-endian length prefix.
    Str2,
    /// `0xaxxx`: a string with a 4-byte big-endian length prefix.
    Str4,
    /// `0xbxxx`: a string with an 8-byte big-endian length prefix.
    Str8,
    /// `0xc000..=0xffff`: no parameter. Used for entry items, which open one
    /// entry of a list inside a message.
    Entry,
}

impl ParamKind {
    /// All 13 kinds, in code order.
    pub const ALL: [ParamKind; 13] = [
        ParamKind::U8,
        ParamKind::U16,
        ParamKind::U32,
        ParamKind::U64,
        ParamKind::U128,
        ParamKind::B32,
        ParamKind::B64,
        ParamKind::Action,
        ParamKind::Str1,
        ParamKind::Str2,
        ParamKind::Str4,
        ParamKind::Str8,
        ParamKind::Entry,
    ];

    /// The kind of parameter that follows `code`.
    pub const fn of(code: u16) -> ParamKind {
        match code >> 12 {
            0x0 => ParamKind::U8,
            0x1 => ParamKind::U16,
            0x2 => ParamKind::U32,
            0x3 => ParamKind::U64,
            0x4 => ParamKind::U128,
            0x5 => ParamKind::B32,
            0x6 => ParamKind::B64,
            0x7 => ParamKind::Action,
            0x8 => ParamKind::Str1,
            0x9 => ParamKind::Str2,
            0xa => ParamKind::Str4,
            0xb => ParamKind::Str8,
            _ => ParamKind::Entry,
        }
    }

    /// The byte length of the parameter, for the fixed-width kinds (0 for
    /// the two kinds without a parameter); `None` for strings.
    pub const fn fixed_len(self) -> Option<usize> {
        match self {
            ParamKind::U8 => Some(1),
            ParamKind::U16 => Some(2),
            ParamKind::U32 => Some(4),
            ParamKind::U64 => Some(8),
            ParamKind::U128 => Some(16),
            ParamKind::B32 => Some(32),
            ParamKind::B64 => Some(64),
            ParamKind::Action | ParamKind::Entry => Some(0),
            ParamKind::Str1 | ParamKind::Str2 | ParamKind::Str4 | ParamKind::Str8 => None,
        }
    }

    /// The width of the length prefix, for the string kinds.
    pub const fn length_width(self) -> Option<usize> {
        match self {
            ParamKind::Str1 => Some(1),
            ParamKind::Str2 => Some(2),
            ParamKind::Str4 => Some(4),
            ParamKind::Str8 => Some(8),
            _ => None,
        }
    }

    /// Whether this is one of the four string kinds.
    pub const fn is_string(self) -> bool {
        self.length_width().is_some()
    }

    /// The short name used in PROTOCOL.md (`u8`, `b32`, `action`, `str1`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            ParamKind::U8 => "u8",
            ParamKind::U16 => "u16",
            ParamKind::U32 => "u32",
            ParamKind::U64 => "u64",
            ParamKind::U128 => "u128",
            ParamKind::B32 => "b32",
            ParamKind::B64 => "b64",
            ParamKind::Action => "action",
            ParamKind::Str1 => "str1",
            ParamKind::Str2 => "str2",
            ParamKind::Str4 => "str4",
            ParamKind::Str8 => "str8",
            ParamKind::Entry => "entry",
        }
    }
}

/// The code of the same string field with its length width replaced by the
/// 1-byte width (`0x9201` → `0x8201`). Codes of other kinds are unchanged.
///
/// A string field has one name and four codes; the code table lists the
/// `0x8xxx` one.
pub const fn canonical(code: u16) -> u16 {
    if ParamKind::of(code).is_string() {
        (code & 0x0fff) | 0x8000
    } else {
        code
    }
}

/// The code of string field `code` with the narrowest length width that
/// holds `len` bytes. This is what encoders send.
pub const fn string_code(code: u16, len: u64) -> u16 {
    let low = code & 0x0fff;
    if len <= 0xff {
        0x8000 | low
    } else if len <= 0xffff {
        0x9000 | low
    } else if len <= 0xffff_ffff {
        0xa000 | low
    } else {
        0xb000 | low
    }
}

/// The parameter of one item.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Param {
    /// For [`ParamKind::U8`].
    U8(u8),
    /// For [`ParamKind::U16`].
    U16(u16),
    /// For [`ParamKind::U32`].
    U32(u32),
    /// For [`ParamKind::U64`].
    U64(u64),
    /// For [`ParamKind::U128`].
    U128(u128),
    /// For [`ParamKind::B32`].
    B32([u8; 32]),
    /// For [`ParamKind::B64`].
    B64([u8; 64]),
    /// For [`ParamKind::Action`] and [`ParamKind::Entry`].
    None,
    /// For the four string kinds. Raw bytes: whether a field must be UTF-8
    /// is a matter of the message layer.
    Str(Vec<u8>),
}

impl Param {
    /// Whether this parameter can follow a code of kind `kind`. A string
    /// must also fit the width of the length prefix.
    pub fn fits(&self, kind: ParamKind) -> bool {
        match (self, kind) {
            (Param::U8(_), ParamKind::U8)
            | (Param::U16(_), ParamKind::U16)
            | (Param::U32(_), ParamKind::U32)
            | (Param::U64(_), ParamKind::U64)
            | (Param::U128(_), ParamKind::U128)
            | (Param::B32(_), ParamKind::B32)
            | (Param::B64(_), ParamKind::B64)
            | (Param::None, ParamKind::Action | ParamKind::Entry) => true,
            (Param::Str(s), k) => match k.length_width() {
                Some(8) => true,
                Some(w) => (s.len() as u64) < (1u64 << (8 * w)),
                _ => false,
            },
            _ => false,
        }
    }
}

/// One item: a code and its parameter.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Item {
    /// The code, whose top nibble fixes the kind of `param`.
    pub code: u16,
    /// The parameter.
    pub param: Param,
}

impl Item {
    /// The kind of parameter the code calls for.
    pub fn kind(&self) -> ParamKind {
        ParamKind::of(self.code)
    }

    /// The number of bytes [`Item::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        let kind = self.kind();
        match (&self.param, kind.length_width()) {
            (Param::Str(s), Some(w)) => 2 + w + s.len(),
            _ => 2 + kind.fixed_len().unwrap_or(0),
        }
    }

    /// Append the item's bytes to `dst`.
    ///
    /// # Panics
    ///
    /// If the parameter does not fit the code's kind (see [`Param::fits`]):
    /// building such an item is a programmer error, never a wire condition.
    pub fn encode(&self, dst: &mut BytesMut) {
        let kind = self.kind();
        assert!(
            self.param.fits(kind),
            "item {:#06x}: parameter {:?} does not fit kind {}",
            self.code,
            self.param,
            kind.name()
        );
        dst.reserve(self.encoded_len());
        dst.put_u16(self.code);
        match &self.param {
            Param::U8(v) => dst.put_u8(*v),
            Param::U16(v) => dst.put_u16(*v),
            Param::U32(v) => dst.put_u32(*v),
            Param::U64(v) => dst.put_u64(*v),
            Param::U128(v) => dst.put_u128(*v),
            Param::B32(v) => dst.put_slice(v),
            Param::B64(v) => dst.put_slice(v),
            Param::None => {}
            Param::Str(s) => {
                put_len(dst, kind, s.len() as u64);
                dst.put_slice(s);
            }
        }
    }

    /// Decode one item from the start of `src`, without any notion of which
    /// codes exist. Returns the item and the number of bytes it took, or
    /// `Ok(None)` if `src` holds only part of it.
    ///
    /// A string whose length prefix exceeds `string_bytes_max` is an error as
    /// soon as the prefix is readable, before waiting for its bytes.
    pub fn decode(
        src: &[u8],
        string_bytes_max: usize,
    ) -> Result<Option<(Item, usize)>, DecodeError> {
        let Some(h) = ItemHeader::peek(src) else {
            return Ok(None);
        };
        if h.kind.is_string() && h.param_len > string_bytes_max as u64 {
            return Err(DecodeError::StringTooLong {
                code: h.code,
                field: "string",
                limit: string_bytes_max,
                actual: h.param_len,
            });
        }
        let Some(body) = h.param(src) else {
            return Ok(None);
        };
        let param = match h.kind {
            ParamKind::U8 => Param::U8(be_u64(body) as u8),
            ParamKind::U16 => Param::U16(be_u64(body) as u16),
            ParamKind::U32 => Param::U32(be_u64(body) as u32),
            ParamKind::U64 => Param::U64(be_u64(body)),
            ParamKind::U128 => Param::U128(be_u128(body)),
            ParamKind::B32 => Param::B32(array(body)),
            ParamKind::B64 => Param::B64(array(body)),
            ParamKind::Action | ParamKind::Entry => Param::None,
            ParamKind::Str1 | ParamKind::Str2 | ParamKind::Str4 | ParamKind::Str8 => {
                Param::Str(body.to_vec())
            }
        };
        let total = h.header_len + body.len();
        Ok(Some((
            Item {
                code: h.code,
                param,
            },
            total,
        )))
    }
}

/// What the first bytes of an item say about it, read without consuming
/// anything and without looking at the parameter itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ItemHeader {
    /// The item's code, as sent (string codes keep their width).
    pub code: u16,
    /// The kind the code's top nibble fixes.
    pub kind: ParamKind,
    /// Bytes before the parameter: 2 for the code, plus the length prefix
    /// of a string.
    pub header_len: usize,
    /// Bytes of the parameter: fixed by the kind, or the string's length
    /// prefix (which may claim anything up to `u64::MAX`).
    pub param_len: u64,
}

impl ItemHeader {
    /// Read the header at the start of `src`, or `None` if `src` is too short
    /// to hold it (at most 10 bytes are needed).
    pub fn peek(src: &[u8]) -> Option<ItemHeader> {
        let code = u16::from_be_bytes([*src.first()?, *src.get(1)?]);
        let kind = ParamKind::of(code);
        match (kind.fixed_len(), kind.length_width()) {
            (Some(n), _) => Some(ItemHeader {
                code,
                kind,
                header_len: 2,
                param_len: n as u64,
            }),
            (None, Some(w)) => {
                let prefix = src.get(2..2 + w)?;
                Some(ItemHeader {
                    code,
                    kind,
                    header_len: 2 + w,
                    param_len: be_u64(prefix),
                })
            }
            // Every kind has either a fixed length or a length prefix.
            (None, None) => None,
        }
    }

    /// Total bytes of the item. Saturates instead of overflowing, so a
    /// string claiming `u64::MAX` bytes compares as too long, never as short.
    pub fn total_len(&self) -> u64 {
        (self.header_len as u64).saturating_add(self.param_len)
    }

    /// The parameter bytes of the item at the start of `src`, or `None` if
    /// `src` does not hold all of them yet.
    pub fn param<'a>(&self, src: &'a [u8]) -> Option<&'a [u8]> {
        let end = usize::try_from(self.total_len()).ok()?;
        src.get(self.header_len..end)
    }
}

fn put_len(dst: &mut BytesMut, kind: ParamKind, len: u64) {
    match kind {
        ParamKind::Str1 => dst.put_u8(len as u8),
        ParamKind::Str2 => dst.put_u16(len as u16),
        ParamKind::Str4 => dst.put_u32(len as u32),
        _ => dst.put_u64(len),
    }
}

/// A big-endian unsigned integer of up to 8 bytes.
pub(crate) fn be_u64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}

/// A big-endian unsigned integer of up to 16 bytes.
pub(crate) fn be_u128(bytes: &[u8]) -> u128 {
    bytes
        .iter()
        .fold(0u128, |acc, &b| (acc << 8) | u128::from(b))
}

/// The first `N` bytes of `bytes`, zero-padded if it is shorter (the callers
/// pass exactly `N` bytes: the header fixes the length).
pub(crate) fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    for (o, b) in out.iter_mut().zip(bytes) {
        *o = *b;
    }
    out
}
