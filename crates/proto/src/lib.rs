//! The OpenCluster-Locks wire protocol: items, codes, typed messages, the
//! streaming codecs, and the limits they enforce.
//!
//! Brief overview, bottom up:
//!
//! - [`item`]: one item = a big-endian u16 code whose top nibble fixes the
//!   parameter that follows ([`ParamKind`], 13 kinds), then the parameter
//!   ([`Param`]). [`Item`] encodes and decodes one.
//! - [`codes`]: every code the protocol defines, as constants grouped by
//!   purpose (`codes::lock::ZONE`, `codes::reply::OK`, ...), and
//!   [`codes::ALL`], the table PROTOCOL.md is checked against.
//! - [`message`]: [`Request`] and [`Response`], typed. Parameter items set
//!   fields of the message being built; an action item ends it.
//! - [`RequestCodec`] (server side) and [`ResponseCodec`] (client side):
//!   `tokio_util::codec` decoders and encoders over a byte stream,
//!   incremental, bounded by [`Limits`], failing with [`DecodeError`].
//! - [`types`]: small value types shared with the engine ([`Mode`], [`Kind`],
//!   [`ErrorCode`], [`LostReason`], [`Role`], [`signed_message`]).
//!
//! Architecture invariant: this crate does no I/O beyond the codec traits,
//! has no runtime, no clock and no cryptography. It defines bytes; the server
//! and the client decide what to do with them.

pub mod codes;
pub mod item;
pub mod limits;
pub mod message;
pub mod types;

mod codec;
mod decode;
mod encode;
mod error;

pub use codec::{RequestCodec, ResponseCodec};
pub use error::{CodecError, DecodeError, EncodeError};
pub use item::{Item, ItemHeader, Param, ParamKind};
pub use limits::Limits;
pub use message::*;
pub use types::{signed_message, ErrorCode, Kind, LostReason, Mode, Role, SigOp, SIG_DOMAIN};
