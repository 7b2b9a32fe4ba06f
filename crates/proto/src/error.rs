//! The errors of decoding and encoding, and of the codecs that do both over
//! a byte stream.
//!
//! Every decode error is final for its stream: items have no sync marker, so
//! after a bad item there is no telling where the next one starts. The
//! receiver sends one ERROR (see [`DecodeError::error_code`]) and closes the
//! connection.

use crate::types::ErrorCode;

/// Why bytes from a peer are not a valid message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The protocol defines no item with this code.
    #[error("unknown item code {code:#06x}")]
    UnknownCode {
        /// The code as received.
        code: u16,
    },
    /// A string's length prefix is over the field's limit. Reported as soon
    /// as the prefix is read, before any of the string's bytes are awaited.
    #[error("{field} ({code:#06x}) claims {actual} bytes, limit {limit}")]
    StringTooLong {
        /// The code as received.
        code: u16,
        /// The field's name.
        field: &'static str,
        /// The limit in bytes.
        limit: usize,
        /// The length the prefix claims.
        actual: u64,
    },
    /// The message would be longer than `message_bytes_max`. Reported as
    /// soon as the item that crosses the limit has its header read.
    #[error("message of at least {actual} bytes is over the limit of {limit}")]
    MessageTooLarge {
        /// The limit in bytes.
        limit: usize,
        /// Bytes of the message up to the end of the item that crosses it.
        actual: u64,
    },
    /// The message has more than `items_per_message_max` items.
    #[error("message has more than {limit} items")]
    TooManyItems {
        /// The limit.
        limit: usize,
    },
    /// The message has more than `list_entries_max` entries.
    #[error("message has more than {limit} list entries")]
    TooManyEntries {
        /// The limit.
        limit: usize,
    },
    /// A field was set twice in one message (or one entry).
    #[error("{field} ({code:#06x}) is set twice")]
    DuplicateField {
        /// The field's name.
        field: &'static str,
        /// The code as received.
        code: u16,
    },
    /// A required field is missing.
    #[error("{action} needs {field}")]
    MissingField {
        /// The field's name.
        field: &'static str,
        /// The action or entry that needs it.
        action: &'static str,
    },
    /// A field (or a list entry) was set that the action or entry does not
    /// take.
    #[error("{action} does not take {field}")]
    FieldNotAllowed {
        /// The field's or entry's name.
        field: &'static str,
        /// The action or entry.
        action: &'static str,
    },
    /// An action that this side does not accept (a reply sent to a server,
    /// a request sent to a client).
    #[error("unexpected action {action} ({code:#06x})")]
    UnexpectedAction {
        /// The action's name.
        action: &'static str,
        /// Its code.
        code: u16,
    },
    /// A string field is not UTF-8.
    #[error("{field} is not UTF-8")]
    InvalidUtf8 {
        /// The field's name.
        field: &'static str,
    },
    /// An enumerated field or flag has a value the protocol does not define.
    #[error("{field} has no value {value}")]
    InvalidValue {
        /// The field's name.
        field: &'static str,
        /// The value received.
        value: u64,
    },
    /// A request carries request id 0, which is reserved for unsolicited
    /// messages.
    #[error("{action} carries request id 0")]
    ZeroRequestId {
        /// The action.
        action: &'static str,
    },
    /// The stream ended inside a message.
    #[error("stream ended inside a message ({buffered} bytes of a partial item buffered)")]
    Truncated {
        /// Bytes of an incomplete item left in the buffer.
        buffered: usize,
    },
    /// Bytes follow the single message that was expected.
    #[error("{count} bytes follow the message")]
    TrailingBytes {
        /// How many.
        count: usize,
    },
    /// The decoder already reported an error; the stream cannot be resumed.
    #[error("the decoder failed earlier; the stream cannot be resumed")]
    Failed,
}

impl DecodeError {
    /// The code of the ERROR to send the peer before closing: `LIMIT` for a
    /// size limit, `PROTOCOL` for anything else.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            DecodeError::StringTooLong { .. }
            | DecodeError::MessageTooLarge { .. }
            | DecodeError::TooManyItems { .. }
            | DecodeError::TooManyEntries { .. } => ErrorCode::Limit,
            _ => ErrorCode::Protocol,
        }
    }
}

/// Why a message cannot be encoded. Nothing of it has been written.
///
/// The encoder checks the same limits as the decoder, so a message that
/// encodes is one a peer with the same limits accepts.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A string is longer than its field's limit.
    #[error("{field} is {actual} bytes, limit {limit}")]
    StringTooLong {
        /// The field's name.
        field: &'static str,
        /// The limit in bytes.
        limit: usize,
        /// The string's length.
        actual: usize,
    },
    /// The message would be longer than `message_bytes_max`.
    #[error("message of {actual} bytes is over the limit of {limit}")]
    MessageTooLarge {
        /// The limit in bytes.
        limit: usize,
        /// The encoded length.
        actual: usize,
    },
    /// The message would have more than `items_per_message_max` items.
    #[error("message of {actual} items is over the limit of {limit}")]
    TooManyItems {
        /// The limit.
        limit: usize,
        /// The message's item count.
        actual: usize,
    },
    /// The message would have more than `list_entries_max` entries.
    #[error("message of {actual} list entries is over the limit of {limit}")]
    TooManyEntries {
        /// The limit.
        limit: usize,
        /// The message's entry count.
        actual: usize,
    },
    /// A request with id 0, which is reserved for unsolicited messages.
    #[error("request id 0 is reserved")]
    ZeroRequestId,
}

/// The error of [`crate::RequestCodec`] and [`crate::ResponseCodec`].
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The peer sent bytes that are not a valid message. Close the stream.
    #[error("decode: {0}")]
    Decode(#[from] DecodeError),
    /// A message could not be encoded; nothing was written.
    #[error("encode: {0}")]
    Encode(#[from] EncodeError),
    /// The transport failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}
