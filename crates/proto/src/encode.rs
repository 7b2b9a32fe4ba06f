//! Typed messages to items: the [`Writer`] that appends items and checks the
//! limits as it goes, and the item layout of every [`Request`] and
//! [`Response`].
//!
//! Layout, as every encoder here writes it: REQUEST_ID first, then the
//! message's own fields, then its list entries (each an entry item followed by
//! that entry's fields), then the action. Fields that hold their default are
//! left out. Strings use the narrowest length width that fits. Decoders
//! accept the fields in any order, as long as a message's own fields come
//! before its first entry item.

use bytes::{BufMut, BytesMut};

use crate::codes::{cluster, common, entry, event, lock, reply, session};
use crate::error::EncodeError;
use crate::item::string_code;
use crate::limits::Limits;
use crate::message::*;
use crate::types::{Kind, Mode};

/// Appends the items of one message to a buffer, enforcing the limits.
pub(crate) struct Writer<'a> {
    dst: &'a mut BytesMut,
    limits: &'a Limits,
    start: usize,
    items: usize,
    entries: usize,
}

impl<'a> Writer<'a> {
    fn new(dst: &'a mut BytesMut, limits: &'a Limits) -> Writer<'a> {
        let start = dst.len();
        Writer {
            dst,
            limits,
            start,
            items: 0,
            entries: 0,
        }
    }

    fn code(&mut self, code: u16) {
        self.items += 1;
        self.dst.put_u16(code);
    }

    fn u8(&mut self, code: u16, v: u8) {
        self.code(code);
        self.dst.put_u8(v);
    }

    fn u16(&mut self, code: u16, v: u16) {
        self.code(code);
        self.dst.put_u16(v);
    }

    fn u32(&mut self, code: u16, v: u32) {
        self.code(code);
        self.dst.put_u32(v);
    }

    fn u64(&mut self, code: u16, v: u64) {
        self.code(code);
        self.dst.put_u64(v);
    }

    fn u128(&mut self, code: u16, v: u128) {
        self.code(code);
        self.dst.put_u128(v);
    }

    fn bytes(&mut self, code: u16, v: &[u8]) {
        self.code(code);
        self.dst.put_slice(v);
    }

    /// A u32 field whose default is 0.
    fn u32_nz(&mut self, code: u16, v: u32) {
        if v != 0 {
            self.u32(code, v);
        }
    }

    /// A u64 field whose default is 0.
    fn u64_nz(&mut self, code: u16, v: u64) {
        if v != 0 {
            self.u64(code, v);
        }
    }

    fn opt_u64(&mut self, code: u16, v: Option<u64>) {
        if let Some(v) = v {
            self.u64(code, v);
        }
    }

    /// A flag whose default is false.
    fn flag(&mut self, code: u16, v: bool) {
        if v {
            self.u8(code, 1);
        }
    }

    fn mode(&mut self, v: Mode) {
        if v != Mode::Exclusive {
            self.u8(lock::MODE, v.to_u8());
        }
    }

    fn kind(&mut self, v: Kind) {
        if v != Kind::Connection {
            self.u8(lock::KIND, v.to_u8());
        }
    }

    fn str(&mut self, code: u16, s: &str) -> Result<(), EncodeError> {
        // Every string code has a limit (a test checks); an unknown one would
        // be a bug in this file, so it gets no slack either.
        let limit = self.limits.string_bytes_max(code).unwrap_or(0);
        if s.len() > limit {
            return Err(EncodeError::StringTooLong {
                field: crate::codes::name(code),
                limit,
                actual: s.len(),
            });
        }
        let code = string_code(code, s.len() as u64);
        self.code(code);
        match code >> 12 {
            0x8 => self.dst.put_u8(s.len() as u8),
            0x9 => self.dst.put_u16(s.len() as u16),
            0xa => self.dst.put_u32(s.len() as u32),
            _ => self.dst.put_u64(s.len() as u64),
        }
        self.dst.put_slice(s.as_bytes());
        Ok(())
    }

    fn opt_str(&mut self, code: u16, s: Option<&str>) -> Result<(), EncodeError> {
        match s {
            Some(s) => self.str(code, s),
            None => Ok(()),
        }
    }

    fn entry(&mut self, code: u16) -> Result<(), EncodeError> {
        self.entries += 1;
        if self.entries > self.limits.list_entries_max {
            return Err(EncodeError::TooManyEntries {
                limit: self.limits.list_entries_max,
                actual: self.entries,
            });
        }
        self.code(code);
        Ok(())
    }

    fn sig(&mut self, sig: &Option<OwnerSig>) {
        if let Some(s) = sig {
            self.bytes(lock::OWNER_KEY, &s.public_key);
            self.bytes(lock::SIGNATURE, &s.signature);
            self.u64(lock::SIG_COUNTER, s.counter);
        }
    }

    /// Write the action item and check the message's totals.
    fn finish(mut self, action: u16) -> Result<(), EncodeError> {
        self.code(action);
        if self.items > self.limits.items_per_message_max {
            return Err(EncodeError::TooManyItems {
                limit: self.limits.items_per_message_max,
                actual: self.items,
            });
        }
        let len = self.dst.len() - self.start;
        if len > self.limits.message_bytes_max {
            return Err(EncodeError::MessageTooLarge {
                limit: self.limits.message_bytes_max,
                actual: len,
            });
        }
        Ok(())
    }

    fn holders(&mut self, holders: &[Holder]) -> Result<(), EncodeError> {
        for h in holders {
            self.entry(entry::HOLDER)?;
            self.str(reply::IDENTITY, &h.identity)?;
            self.u64(lock::TOKEN, h.token);
            self.mode(h.mode);
            self.kind(h.kind);
            self.u64(reply::HELD_MS, h.held_ms);
            self.opt_u64(reply::EXPIRES_IN_MS, h.expires_in_ms);
        }
        Ok(())
    }

    fn servers(&mut self, servers: &[ServerInfo]) -> Result<(), EncodeError> {
        for s in servers {
            self.entry(entry::SERVER)?;
            self.u64(cluster::NODE_ID, s.node_id);
            self.str(cluster::ADDRESS, &s.address)?;
            self.str(cluster::SITE, &s.site)?;
            self.flag(cluster::SERVING, s.serving);
            if let Some(r) = s.role {
                self.u8(cluster::ROLE, r.to_u8());
            }
            self.opt_u64(cluster::CONFIG_VERSION, s.config_version);
            self.opt_u64(cluster::LAG, s.lag);
        }
        Ok(())
    }
}

/// A message the codecs can write.
pub(crate) trait Encode {
    /// Write the message's items, its action last.
    fn write(&self, w: Writer<'_>) -> Result<(), EncodeError>;
}

/// Append `msg` to `dst`; on error truncate `dst` back to where it was.
pub(crate) fn encode_message<M: Encode>(
    msg: &M,
    dst: &mut BytesMut,
    limits: &Limits,
) -> Result<(), EncodeError> {
    let start = dst.len();
    dst.reserve(128);
    let result = msg.write(Writer::new(dst, limits));
    if result.is_err() {
        dst.truncate(start);
    }
    result
}

/// The action code of a request body.
pub(crate) fn request_action(body: &RequestBody) -> u16 {
    match body {
        RequestBody::Hello(_) => session::HELLO,
        RequestBody::Keepalive => session::KEEPALIVE,
        RequestBody::Close => session::CLOSE,
        RequestBody::Lock(_) => lock::LOCK,
        RequestBody::Cancel { .. } => lock::CANCEL,
        RequestBody::Release(_) => lock::RELEASE,
        RequestBody::Refresh(_) => lock::REFRESH,
        RequestBody::Query(_) => lock::QUERY,
        RequestBody::CheckToken(_) => lock::CHECK_TOKEN,
        RequestBody::Break(_) => lock::BREAK,
        RequestBody::List(_) => lock::LIST,
        RequestBody::Watch(_) => lock::WATCH,
        RequestBody::Unwatch(_) => lock::UNWATCH,
        RequestBody::Status => cluster::STATUS,
        RequestBody::RemoveServer { .. } => cluster::REMOVE_SERVER,
        RequestBody::PromoteServer { .. } => cluster::PROMOTE_SERVER,
    }
}

/// The action code of a response body.
pub(crate) fn response_action(body: &ResponseBody) -> u16 {
    match body {
        ResponseBody::HelloOk(_) => reply::HELLO_OK,
        ResponseBody::Ok(_) => reply::OK,
        ResponseBody::Error(_) => reply::ERROR,
        ResponseBody::Queued { .. } => reply::QUEUED,
        ResponseBody::StatusOk(_) => reply::STATUS_OK,
        ResponseBody::Lost(_) => event::LOST,
        ResponseBody::WatchEvent(_) => event::WATCH_EVENT,
    }
}

impl Encode for Request {
    fn write(&self, mut w: Writer<'_>) -> Result<(), EncodeError> {
        if self.id == 0 {
            return Err(EncodeError::ZeroRequestId);
        }
        w.u64(common::REQUEST_ID, self.id);
        match &self.body {
            RequestBody::Hello(h) => {
                w.u16(session::PROTOCOL_VERSION, h.protocol_version);
                w.u128(session::CLIENT_ID, h.client_id);
                w.opt_u64(session::SESSION_TIMEOUT_MS, h.session_timeout_ms);
            }
            RequestBody::Keepalive | RequestBody::Close | RequestBody::Status => {}
            RequestBody::Lock(l) => {
                w.str(lock::ZONE, &l.zone)?;
                w.str(lock::NAME, &l.name)?;
                w.mode(l.mode);
                w.kind(l.kind);
                w.u64_nz(lock::TTL_MS, l.ttl_ms);
                w.u64_nz(lock::WAIT_MS, l.wait_ms);
                w.u64_nz(lock::LOCK_DELAY_MS, l.lock_delay_ms);
                w.u64_nz(lock::OWNER_ID, l.owner_id);
                w.u64(lock::NONCE, l.nonce);
                w.u64_nz(lock::LOW_WATER, l.low_water);
                w.sig(&l.owner_sig);
            }
            RequestBody::Cancel { nonce } => w.u64(lock::NONCE, *nonce),
            RequestBody::RemoveServer { node_id } | RequestBody::PromoteServer { node_id } => {
                w.u64(cluster::NODE_ID, *node_id)
            }
            RequestBody::Release(r) => {
                w.str(lock::ZONE, &r.zone)?;
                w.str(lock::NAME, &r.name)?;
                w.u64(lock::TOKEN, r.token);
                w.sig(&r.owner_sig);
            }
            RequestBody::Refresh(r) => {
                w.str(lock::ZONE, &r.zone)?;
                w.str(lock::NAME, &r.name)?;
                w.u64(lock::TOKEN, r.token);
                w.u64_nz(lock::TTL_MS, r.ttl_ms);
                w.sig(&r.owner_sig);
            }
            RequestBody::Query(r) | RequestBody::Watch(r) | RequestBody::Unwatch(r) => {
                w.str(lock::ZONE, &r.zone)?;
                w.str(lock::NAME, &r.name)?;
            }
            RequestBody::CheckToken(c) => {
                w.str(lock::ZONE, &c.zone)?;
                w.str(lock::NAME, &c.name)?;
                w.u64(lock::TOKEN, c.token);
            }
            RequestBody::Break(b) => {
                w.str(lock::ZONE, &b.zone)?;
                w.str(lock::NAME, &b.name)?;
                w.opt_u64(lock::TOKEN, b.token);
            }
            RequestBody::List(l) => {
                w.str(lock::ZONE, &l.zone)?;
                w.opt_str(lock::START_AFTER, l.start_after.as_deref())?;
                w.u32_nz(lock::PAGE_SIZE, l.page_size);
            }
        }
        w.finish(request_action(&self.body))
    }
}

impl Encode for Response {
    fn write(&self, mut w: Writer<'_>) -> Result<(), EncodeError> {
        w.u64(common::REQUEST_ID, self.id);
        match &self.body {
            ResponseBody::HelloOk(h) => {
                w.u16(session::PROTOCOL_VERSION, h.protocol_version);
                w.u128(session::CLUSTER_ID, h.cluster_id);
                w.flag(session::SESSION_RESUMED, h.resumed);
                w.u64(session::SESSION_TIMEOUT_MS, h.session_timeout_ms);
                w.u64(cluster::NODE_ID, h.node_id);
                w.str(cluster::SITE, &h.site)?;
                w.u64(cluster::CONFIG_VERSION, h.config_version);
                for l in &h.held {
                    w.entry(entry::HELD_LOCK)?;
                    w.str(lock::ZONE, &l.zone)?;
                    w.str(lock::NAME, &l.name)?;
                    w.u64(lock::TOKEN, l.token);
                    w.mode(l.mode);
                    w.kind(l.kind);
                }
                for p in &h.waits {
                    w.entry(entry::WAIT)?;
                    w.str(lock::ZONE, &p.zone)?;
                    w.str(lock::NAME, &p.name)?;
                    w.u64(lock::NONCE, p.nonce);
                }
                w.servers(&h.servers)?;
            }
            ResponseBody::Ok(ok) => {
                w.opt_u64(lock::TOKEN, ok.token);
                w.opt_u64(reply::EXPIRES_IN_MS, ok.expires_in_ms);
                w.flag(reply::ALREADY_RELEASED, ok.already_released);
                if let Some(current) = ok.token_current {
                    w.u8(reply::TOKEN_CURRENT, u8::from(current));
                }
                if let Some(n) = ok.waiters {
                    w.u32(reply::WAITERS, n);
                }
                w.opt_str(reply::NEXT_CURSOR, ok.next_cursor.as_deref())?;
                w.holders(&ok.holders)?;
                for l in &ok.locks {
                    w.entry(entry::LOCK_INFO)?;
                    w.str(lock::NAME, &l.name)?;
                    w.mode(l.mode);
                    w.u32_nz(reply::HOLDER_COUNT, l.holders);
                    w.u32_nz(reply::WAITERS, l.waiters);
                }
            }
            ResponseBody::Error(e) => {
                w.u16(reply::ERROR_CODE, e.code.to_u16());
                if !e.message.is_empty() {
                    w.str(reply::MESSAGE, &e.message)?;
                }
                w.opt_u64(cluster::LEADER_ID, e.leader_id);
                w.holders(&e.holders)?;
                w.servers(&e.servers)?;
            }
            ResponseBody::Queued { position } => w.u32(reply::QUEUE_POSITION, *position),
            ResponseBody::StatusOk(s) => {
                w.u64(cluster::NODE_ID, s.node_id);
                w.str(cluster::SITE, &s.site)?;
                w.u8(cluster::ROLE, s.role.to_u8());
                w.u64(cluster::TERM, s.term);
                w.opt_u64(cluster::LEADER_ID, s.leader_id);
                w.u64(cluster::CONFIG_VERSION, s.config_version);
                w.u64(cluster::APPLIED_INDEX, s.applied_index);
                w.servers(&s.servers)?;
            }
            ResponseBody::Lost(l) => {
                w.str(lock::ZONE, &l.zone)?;
                w.str(lock::NAME, &l.name)?;
                w.u64(lock::TOKEN, l.token);
                w.u8(event::LOST_REASON, l.reason.to_u8());
            }
            ResponseBody::WatchEvent(e) => {
                w.str(lock::ZONE, &e.zone)?;
                w.str(lock::NAME, &e.name)?;
                w.holders(&e.holders)?;
            }
        }
        w.finish(response_action(&self.body))
    }
}
