//! Conversions from the engine's replies and refusals to wire responses.
//! One place, so every request handler answers the same way.

use oclocks_core::{HolderInfo, Refusal};
use oclocks_proto::{ErrorCode, ErrorReply, Holder, OkReply, Response, ResponseBody};

pub fn holder_to_wire(h: &HolderInfo) -> Holder {
    Holder {
        identity: h.identity.to_string(),
        token: h.token,
        mode: h.mode,
        kind: h.kind,
        held_ms: h.held_ms,
        expires_in_ms: h.expires_in_ms,
    }
}

/// An ERROR reply for a refusal; LOCKED and TIMEOUT name the holder.
pub fn refusal(id: u64, r: &Refusal) -> Response {
    let holders = match r {
        Refusal::Locked { holder: Some(h) } | Refusal::Timeout { holder: Some(h) } => {
            vec![holder_to_wire(h)]
        }
        _ => Vec::new(),
    };
    Response {
        id,
        body: ResponseBody::Error(ErrorReply {
            code: r.code(),
            message: r.to_string(),
            holders,
            leader_id: None,
            servers: Vec::new(),
        }),
    }
}

/// An ERROR reply with a code and message.
pub fn error(id: u64, code: ErrorCode, message: impl Into<String>) -> Response {
    Response {
        id,
        body: ResponseBody::Error(ErrorReply {
            code,
            message: message.into(),
            holders: Vec::new(),
            leader_id: None,
            servers: Vec::new(),
        }),
    }
}

/// An OK reply.
pub fn ok(id: u64, reply: OkReply) -> Response {
    Response {
        id,
        body: ResponseBody::Ok(reply),
    }
}

/// An empty OK reply.
pub fn done(id: u64) -> Response {
    ok(id, OkReply::default())
}
