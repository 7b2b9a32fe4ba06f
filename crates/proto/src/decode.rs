//! Items to typed messages: the [`Assembler`] that collects the parameter
//! items of the message being built, and the constructors that turn them into
//! a [`Request`] or a [`Response`] when the action item arrives.
//!
//! Rules (mini-redis's `parse.finish()`, made total): a field set twice is an
//! error; a required field missing is an error; a field or list entry the
//! action does not take is an error. So nothing a peer sends is ignored.
//!
//! This module sees whole items only; framing, limits on bytes and waiting for
//! more input are [`crate::codec`]'s.

use crate::codes::{self, cluster, common, entry, event, lock, reply, session};
use crate::error::DecodeError;
use crate::limits::Limits;
use crate::message::*;
use crate::types::{ErrorCode, Kind, LostReason, Mode, Role};

/// The parameter of a field, as the assembler keeps it. Integers of every
/// width are widened to u64 (the code fixes the width); strings are checked
/// UTF-8 when their item arrives.
#[derive(Clone, Debug)]
pub(crate) enum Value {
    Int(u64),
    U128(u128),
    B32([u8; 32]),
    B64([u8; 64]),
    Str(String),
}

/// The fields set so far for one message or one entry: at most one per code.
/// Small (a message has a few dozen distinct fields at most), so a vector
/// with linear search beats a map.
#[derive(Debug, Default)]
pub(crate) struct Fields {
    items: Vec<(u16, Value)>,
}

impl Fields {
    fn insert(&mut self, code: u16, wire_code: u16, v: Value) -> Result<(), DecodeError> {
        if self.items.iter().any(|(c, _)| *c == code) {
            return Err(DecodeError::DuplicateField {
                field: codes::name(code),
                code: wire_code,
            });
        }
        self.items.push((code, v));
        Ok(())
    }

    fn take(&mut self, code: u16) -> Option<Value> {
        let i = self.items.iter().position(|(c, _)| *c == code)?;
        Some(self.items.swap_remove(i).1)
    }

    pub(crate) fn get(&self, code: u16) -> Option<&Value> {
        self.items.iter().find(|(c, _)| *c == code).map(|(_, v)| v)
    }

    fn clear(&mut self) {
        self.items.clear();
    }
}

/// Takes typed fields out of a [`Fields`] for one action or entry, then
/// [`Take::finish`] rejects whatever is left.
struct Take<'a> {
    fields: &'a mut Fields,
    action: &'static str,
}

impl<'a> Take<'a> {
    fn new(fields: &'a mut Fields, action: u16) -> Take<'a> {
        Take {
            fields,
            action: codes::name(action),
        }
    }

    fn missing(&self, code: u16) -> DecodeError {
        DecodeError::MissingField {
            field: codes::name(code),
            action: self.action,
        }
    }

    fn opt_int(&mut self, code: u16) -> Option<u64> {
        match self.fields.take(code) {
            Some(Value::Int(v)) => Some(v),
            _ => None,
        }
    }

    fn opt_u64(&mut self, code: u16) -> Option<u64> {
        debug_assert_eq!(code >> 12, 0x3);
        self.opt_int(code)
    }

    fn u64(&mut self, code: u16) -> Result<u64, DecodeError> {
        self.opt_u64(code).ok_or_else(|| self.missing(code))
    }

    /// A u64 whose default is 0.
    fn u64_or0(&mut self, code: u16) -> u64 {
        self.opt_u64(code).unwrap_or(0)
    }

    fn opt_u32(&mut self, code: u16) -> Option<u32> {
        debug_assert_eq!(code >> 12, 0x2);
        self.opt_int(code).and_then(|v| u32::try_from(v).ok())
    }

    fn u32(&mut self, code: u16) -> Result<u32, DecodeError> {
        self.opt_u32(code).ok_or_else(|| self.missing(code))
    }

    fn u16(&mut self, code: u16) -> Result<u16, DecodeError> {
        debug_assert_eq!(code >> 12, 0x1);
        self.opt_int(code)
            .and_then(|v| u16::try_from(v).ok())
            .ok_or_else(|| self.missing(code))
    }

    fn opt_u8(&mut self, code: u16) -> Option<u8> {
        debug_assert_eq!(code >> 12, 0x0);
        self.opt_int(code).and_then(|v| u8::try_from(v).ok())
    }

    fn u128(&mut self, code: u16) -> Result<u128, DecodeError> {
        match self.fields.take(code) {
            Some(Value::U128(v)) => Ok(v),
            _ => Err(self.missing(code)),
        }
    }

    fn opt_str(&mut self, code: u16) -> Option<String> {
        match self.fields.take(code) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    fn str(&mut self, code: u16) -> Result<String, DecodeError> {
        self.opt_str(code).ok_or_else(|| self.missing(code))
    }

    /// A u8 enumeration: `from` maps the wire value; absent → `None`.
    fn opt_enum<T>(
        &mut self,
        code: u16,
        from: fn(u8) -> Option<T>,
    ) -> Result<Option<T>, DecodeError> {
        match self.opt_u8(code) {
            None => Ok(None),
            Some(v) => from(v).map(Some).ok_or(DecodeError::InvalidValue {
                field: codes::name(code),
                value: u64::from(v),
            }),
        }
    }

    fn mode(&mut self) -> Result<Mode, DecodeError> {
        Ok(self
            .opt_enum(lock::MODE, Mode::from_u8)?
            .unwrap_or(Mode::Exclusive))
    }

    fn kind(&mut self) -> Result<Kind, DecodeError> {
        Ok(self
            .opt_enum(lock::KIND, Kind::from_u8)?
            .unwrap_or(Kind::Connection))
    }

    fn opt_flag(&mut self, code: u16) -> Result<Option<bool>, DecodeError> {
        self.opt_enum(code, |v| match v {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        })
    }

    /// A flag whose default is false.
    fn flag(&mut self, code: u16) -> Result<bool, DecodeError> {
        Ok(self.opt_flag(code)?.unwrap_or(false))
    }

    /// The owner key, signature and counter: all three or none.
    fn sig(&mut self) -> Result<Option<OwnerSig>, DecodeError> {
        let key = match self.fields.take(lock::OWNER_KEY) {
            Some(Value::B32(k)) => Some(k),
            _ => None,
        };
        let sig = match self.fields.take(lock::SIGNATURE) {
            Some(Value::B64(s)) => Some(s),
            _ => None,
        };
        let counter = self.opt_u64(lock::SIG_COUNTER);
        match (key, sig, counter) {
            (None, None, None) => Ok(None),
            (Some(public_key), Some(signature), Some(counter)) => Ok(Some(OwnerSig {
                public_key,
                signature,
                counter,
            })),
            (None, _, _) => Err(self.missing(lock::OWNER_KEY)),
            (_, None, _) => Err(self.missing(lock::SIGNATURE)),
            (_, _, None) => Err(self.missing(lock::SIG_COUNTER)),
        }
    }

    fn lock_ref(&mut self) -> Result<LockRef, DecodeError> {
        Ok(LockRef {
            zone: self.str(lock::ZONE)?,
            name: self.str(lock::NAME)?,
        })
    }

    /// Everything taken: anything left is a field the action does not take.
    fn finish(self) -> Result<(), DecodeError> {
        let left = self.fields.items.first().map(|(c, _)| *c);
        self.fields.clear();
        match left {
            None => Ok(()),
            Some(code) => Err(DecodeError::FieldNotAllowed {
                field: codes::name(code),
                action: self.action,
            }),
        }
    }
}

/// The list entries of the message being built, by type.
#[derive(Debug, Default)]
pub(crate) struct Lists {
    holders: Vec<Holder>,
    held: Vec<HeldLock>,
    waits: Vec<PendingWait>,
    servers: Vec<ServerInfo>,
    locks: Vec<LockInfo>,
}

impl Lists {
    /// Entries the action did not take are entries it does not allow.
    fn finish(&mut self, action: u16) -> Result<(), DecodeError> {
        let left = [
            (self.holders.is_empty(), entry::HOLDER),
            (self.held.is_empty(), entry::HELD_LOCK),
            (self.waits.is_empty(), entry::WAIT),
            (self.servers.is_empty(), entry::SERVER),
            (self.locks.is_empty(), entry::LOCK_INFO),
        ]
        .into_iter()
        .find(|(empty, _)| !empty);
        *self = Lists::default();
        match left {
            None => Ok(()),
            Some((_, code)) => Err(DecodeError::FieldNotAllowed {
                field: codes::name(code),
                action: codes::name(action),
            }),
        }
    }

    /// Build the entry `code` from its fields and append it.
    fn push(&mut self, code: u16, fields: &mut Fields) -> Result<(), DecodeError> {
        let mut t = Take::new(fields, code);
        match code {
            entry::HOLDER => {
                let h = Holder {
                    identity: t.str(reply::IDENTITY)?,
                    token: t.u64(lock::TOKEN)?,
                    mode: t.mode()?,
                    kind: t.kind()?,
                    held_ms: t.u64(reply::HELD_MS)?,
                    expires_in_ms: t.opt_u64(reply::EXPIRES_IN_MS),
                };
                t.finish()?;
                self.holders.push(h);
            }
            entry::HELD_LOCK => {
                let h = HeldLock {
                    zone: t.str(lock::ZONE)?,
                    name: t.str(lock::NAME)?,
                    token: t.u64(lock::TOKEN)?,
                    mode: t.mode()?,
                    kind: t.kind()?,
                };
                t.finish()?;
                self.held.push(h);
            }
            entry::WAIT => {
                let w = PendingWait {
                    zone: t.str(lock::ZONE)?,
                    name: t.str(lock::NAME)?,
                    nonce: t.u64(lock::NONCE)?,
                };
                t.finish()?;
                self.waits.push(w);
            }
            entry::SERVER => {
                let s = ServerInfo {
                    node_id: t.u64(cluster::NODE_ID)?,
                    address: t.str(cluster::ADDRESS)?,
                    site: t.str(cluster::SITE)?,
                    serving: t.flag(cluster::SERVING)?,
                    role: t.opt_enum(cluster::ROLE, Role::from_u8)?,
                    config_version: t.opt_u64(cluster::CONFIG_VERSION),
                    lag: t.opt_u64(cluster::LAG),
                };
                t.finish()?;
                self.servers.push(s);
            }
            entry::LOCK_INFO => {
                let l = LockInfo {
                    name: t.str(lock::NAME)?,
                    mode: t.mode()?,
                    holders: t.opt_u32(reply::HOLDER_COUNT).unwrap_or(0),
                    waiters: t.opt_u32(reply::WAITERS).unwrap_or(0),
                };
                t.finish()?;
                self.locks.push(l);
            }
            // The assembler only opens entries whose code is in the table,
            // and every entry code of the table is handled above.
            _ => {
                return Err(DecodeError::UnknownCode { code });
            }
        }
        Ok(())
    }
}

/// A message the codecs can build from items.
pub(crate) trait Decode: Sized {
    /// Build the message ended by `action` from the message's own fields and
    /// its list entries. Leaves both empty, also on error.
    fn build(action: u16, fields: &mut Fields, lists: &mut Lists) -> Result<Self, DecodeError>;
}

/// Collects the items of one message. Knows nothing of bytes.
#[derive(Debug, Default)]
pub(crate) struct Assembler {
    /// The message's own fields.
    fields: Fields,
    /// The open entry, if any, and its fields.
    entry: Option<u16>,
    entry_fields: Fields,
    /// Closed entries.
    lists: Lists,
    /// Entries opened in this message.
    entries: usize,
    /// Items and bytes of this message so far.
    pub(crate) items: usize,
    pub(crate) bytes: u64,
}

impl Assembler {
    /// Whether a message has been started and not finished.
    pub(crate) fn in_message(&self) -> bool {
        self.items > 0
    }

    /// The REQUEST_ID of the message being built, if it has been read.
    pub(crate) fn request_id(&self) -> Option<u64> {
        match self.fields.get(common::REQUEST_ID) {
            Some(Value::Int(id)) => Some(*id),
            _ => None,
        }
    }

    /// A parameter item. `code` is canonical, `wire_code` as received.
    pub(crate) fn field(&mut self, code: u16, wire_code: u16, v: Value) -> Result<(), DecodeError> {
        if self.entry.is_some() {
            self.entry_fields.insert(code, wire_code, v)
        } else {
            self.fields.insert(code, wire_code, v)
        }
    }

    /// An entry item: close the open entry and open a new one.
    pub(crate) fn entry(&mut self, code: u16, limits: &Limits) -> Result<(), DecodeError> {
        if self.entries >= limits.list_entries_max {
            return Err(DecodeError::TooManyEntries {
                limit: limits.list_entries_max,
            });
        }
        self.entries += 1;
        self.close_entry()?;
        self.entry = Some(code);
        Ok(())
    }

    fn close_entry(&mut self) -> Result<(), DecodeError> {
        match self.entry.take() {
            Some(code) => self.lists.push(code, &mut self.entry_fields),
            None => Ok(()),
        }
    }

    /// An action item: build the message and start afresh.
    pub(crate) fn action<M: Decode>(&mut self, code: u16) -> Result<M, DecodeError> {
        self.close_entry()?;
        let msg = M::build(code, &mut self.fields, &mut self.lists);
        self.entries = 0;
        self.items = 0;
        self.bytes = 0;
        msg
    }
}

impl Decode for Request {
    fn build(action: u16, fields: &mut Fields, lists: &mut Lists) -> Result<Request, DecodeError> {
        let result = build_request(action, fields);
        fields.clear();
        let lists_done = lists.finish(action);
        let request = result?;
        lists_done?;
        Ok(request)
    }
}

fn build_request(action: u16, fields: &mut Fields) -> Result<Request, DecodeError> {
    let mut t = Take::new(fields, action);
    let body = match action {
        session::HELLO => RequestBody::Hello(Hello {
            protocol_version: t.u16(session::PROTOCOL_VERSION)?,
            client_id: t.u128(session::CLIENT_ID)?,
            session_timeout_ms: t.opt_u64(session::SESSION_TIMEOUT_MS),
        }),
        session::KEEPALIVE => RequestBody::Keepalive,
        session::CLOSE => RequestBody::Close,
        lock::LOCK => RequestBody::Lock(Lock {
            zone: t.str(lock::ZONE)?,
            name: t.str(lock::NAME)?,
            mode: t.mode()?,
            kind: t.kind()?,
            ttl_ms: t.u64_or0(lock::TTL_MS),
            wait_ms: t.u64_or0(lock::WAIT_MS),
            lock_delay_ms: t.u64_or0(lock::LOCK_DELAY_MS),
            owner_id: t.u64_or0(lock::OWNER_ID),
            nonce: t.u64(lock::NONCE)?,
            low_water: t.u64_or0(lock::LOW_WATER),
            owner_sig: t.sig()?,
        }),
        lock::CANCEL => RequestBody::Cancel {
            nonce: t.u64(lock::NONCE)?,
        },
        lock::RELEASE => RequestBody::Release(Release {
            zone: t.str(lock::ZONE)?,
            name: t.str(lock::NAME)?,
            token: t.u64(lock::TOKEN)?,
            owner_sig: t.sig()?,
        }),
        lock::REFRESH => RequestBody::Refresh(Refresh {
            zone: t.str(lock::ZONE)?,
            name: t.str(lock::NAME)?,
            token: t.u64(lock::TOKEN)?,
            ttl_ms: t.u64_or0(lock::TTL_MS),
            owner_sig: t.sig()?,
        }),
        lock::QUERY => RequestBody::Query(t.lock_ref()?),
        lock::CHECK_TOKEN => RequestBody::CheckToken(CheckToken {
            zone: t.str(lock::ZONE)?,
            name: t.str(lock::NAME)?,
            token: t.u64(lock::TOKEN)?,
        }),
        lock::BREAK => RequestBody::Break(Break {
            zone: t.str(lock::ZONE)?,
            name: t.str(lock::NAME)?,
            token: t.opt_u64(lock::TOKEN),
        }),
        lock::LIST => RequestBody::List(List {
            zone: t.str(lock::ZONE)?,
            start_after: t.opt_str(lock::START_AFTER),
            page_size: t.opt_u32(lock::PAGE_SIZE).unwrap_or(0),
        }),
        lock::WATCH => RequestBody::Watch(t.lock_ref()?),
        lock::UNWATCH => RequestBody::Unwatch(t.lock_ref()?),
        cluster::STATUS => RequestBody::Status,
        cluster::REMOVE_SERVER => RequestBody::RemoveServer {
            node_id: t.u64(cluster::NODE_ID)?,
        },
        cluster::PROMOTE_SERVER => RequestBody::PromoteServer {
            node_id: t.u64(cluster::NODE_ID)?,
        },
        _ => {
            return Err(DecodeError::UnexpectedAction {
                action: codes::name(action),
                code: action,
            });
        }
    };
    let id = t.u64(common::REQUEST_ID)?;
    t.finish()?;
    if id == 0 {
        return Err(DecodeError::ZeroRequestId {
            action: codes::name(action),
        });
    }
    Ok(Request { id, body })
}

impl Decode for Response {
    fn build(action: u16, fields: &mut Fields, lists: &mut Lists) -> Result<Response, DecodeError> {
        let result = build_response(action, fields, lists);
        fields.clear();
        let lists_done = lists.finish(action);
        let response = result?;
        lists_done?;
        Ok(response)
    }
}

fn build_response(
    action: u16,
    fields: &mut Fields,
    lists: &mut Lists,
) -> Result<Response, DecodeError> {
    let mut t = Take::new(fields, action);
    let body = match action {
        reply::HELLO_OK => ResponseBody::HelloOk(HelloOk {
            protocol_version: t.u16(session::PROTOCOL_VERSION)?,
            cluster_id: t.u128(session::CLUSTER_ID)?,
            resumed: t.flag(session::SESSION_RESUMED)?,
            session_timeout_ms: t.u64(session::SESSION_TIMEOUT_MS)?,
            node_id: t.u64(cluster::NODE_ID)?,
            site: t.str(cluster::SITE)?,
            config_version: t.u64(cluster::CONFIG_VERSION)?,
            held: std::mem::take(&mut lists.held),
            waits: std::mem::take(&mut lists.waits),
            servers: std::mem::take(&mut lists.servers),
        }),
        reply::OK => ResponseBody::Ok(OkReply {
            token: t.opt_u64(lock::TOKEN),
            expires_in_ms: t.opt_u64(reply::EXPIRES_IN_MS),
            already_released: t.flag(reply::ALREADY_RELEASED)?,
            token_current: t.opt_flag(reply::TOKEN_CURRENT)?,
            waiters: t.opt_u32(reply::WAITERS),
            next_cursor: t.opt_str(reply::NEXT_CURSOR),
            holders: std::mem::take(&mut lists.holders),
            locks: std::mem::take(&mut lists.locks),
        }),
        reply::ERROR => {
            let raw = t.u16(reply::ERROR_CODE)?;
            let code = ErrorCode::from_u16(raw).ok_or(DecodeError::InvalidValue {
                field: codes::name(reply::ERROR_CODE),
                value: u64::from(raw),
            })?;
            ResponseBody::Error(ErrorReply {
                code,
                message: t.opt_str(reply::MESSAGE).unwrap_or_default(),
                leader_id: t.opt_u64(cluster::LEADER_ID),
                holders: std::mem::take(&mut lists.holders),
                servers: std::mem::take(&mut lists.servers),
            })
        }
        reply::QUEUED => ResponseBody::Queued {
            position: t.u32(reply::QUEUE_POSITION)?,
        },
        reply::STATUS_OK => ResponseBody::StatusOk(StatusOk {
            node_id: t.u64(cluster::NODE_ID)?,
            site: t.str(cluster::SITE)?,
            role: t
                .opt_enum(cluster::ROLE, Role::from_u8)?
                .ok_or_else(|| t.missing(cluster::ROLE))?,
            term: t.u64(cluster::TERM)?,
            leader_id: t.opt_u64(cluster::LEADER_ID),
            config_version: t.u64(cluster::CONFIG_VERSION)?,
            applied_index: t.u64(cluster::APPLIED_INDEX)?,
            servers: std::mem::take(&mut lists.servers),
        }),
        event::LOST => ResponseBody::Lost(Lost {
            zone: t.str(lock::ZONE)?,
            name: t.str(lock::NAME)?,
            token: t.u64(lock::TOKEN)?,
            reason: t
                .opt_enum(event::LOST_REASON, LostReason::from_u8)?
                .ok_or_else(|| t.missing(event::LOST_REASON))?,
        }),
        event::WATCH_EVENT => ResponseBody::WatchEvent(WatchEvent {
            zone: t.str(lock::ZONE)?,
            name: t.str(lock::NAME)?,
            holders: std::mem::take(&mut lists.holders),
        }),
        _ => {
            return Err(DecodeError::UnexpectedAction {
                action: codes::name(action),
                code: action,
            })
        }
    };
    let id = t.u64(common::REQUEST_ID)?;
    t.finish()?;
    Ok(Response { id, body })
}
