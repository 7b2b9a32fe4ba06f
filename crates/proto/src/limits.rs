//! [`Limits`]: every size bound of the protocol and of the lock table, in one
//! place, with the defaults of SPEC section 8.
//!
//! The codecs enforce the wire-relevant ones (string lengths by field, bytes
//! and items per message, list entries per message) on both decode and
//! encode. The others (`keys_per_lock_max`, `waiters_per_lock_max`,
//! `requests_in_flight_max`, and `key_bytes_max` / `value_bytes_max` until
//! the key-value codes exist) live here so there is one table, and are
//! enforced by the engine and the server.

use serde::{Deserialize, Serialize};

use crate::codes;

/// Size bounds. Field names end in `_max` and carry their unit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Bytes of a zone name (`ZONE`).
    pub zone_name_bytes_max: usize,
    /// Bytes of a lock name (`NAME`, `START_AFTER`, `NEXT_CURSOR`).
    pub lock_name_bytes_max: usize,
    /// Bytes of a key of the zone's key-value space.
    pub key_bytes_max: usize,
    /// Bytes of a value of the zone's key-value space.
    pub value_bytes_max: usize,
    /// Keys named by one restrictive lock.
    pub keys_per_lock_max: usize,
    /// Waiters queued on one lock.
    pub waiters_per_lock_max: usize,
    /// Bytes of one message, from its first item to its action item.
    pub message_bytes_max: usize,
    /// Requests of one connection that await their final reply.
    pub requests_in_flight_max: usize,
    /// Items of one message, its action item included.
    pub items_per_message_max: usize,
    /// Entries of one message, all its lists together.
    pub list_entries_max: usize,
    /// Bytes of a certificate identity (`IDENTITY`).
    pub identity_bytes_max: usize,
    /// Bytes of a site label (`SITE`).
    pub site_bytes_max: usize,
    /// Bytes of a server address (`ADDRESS`).
    pub address_bytes_max: usize,
    /// Bytes of an error message (`MESSAGE`).
    pub error_text_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            zone_name_bytes_max: 63,
            lock_name_bytes_max: 255,
            key_bytes_max: 1024,
            value_bytes_max: 1024 * 1024,
            keys_per_lock_max: 1024,
            waiters_per_lock_max: 10_000,
            message_bytes_max: 4 * 1024 * 1024,
            requests_in_flight_max: 1024,
            items_per_message_max: 100_000,
            list_entries_max: 10_000,
            identity_bytes_max: 1024,
            site_bytes_max: 63,
            address_bytes_max: 255,
            error_text_bytes_max: 4096,
        }
    }
}

impl Limits {
    /// The maximum byte length of string field `code` (any width), or `None`
    /// if `code` is not a string field of the protocol.
    pub fn string_bytes_max(&self, code: u16) -> Option<usize> {
        use codes::{cluster, lock, reply};
        match crate::item::canonical(code) {
            lock::ZONE => Some(self.zone_name_bytes_max),
            lock::NAME | lock::START_AFTER | reply::NEXT_CURSOR => Some(self.lock_name_bytes_max),
            reply::IDENTITY => Some(self.identity_bytes_max),
            reply::MESSAGE => Some(self.error_text_bytes_max),
            cluster::SITE => Some(self.site_bytes_max),
            cluster::ADDRESS => Some(self.address_bytes_max),
            _ => None,
        }
    }

    /// Every limit as `(field name, value)`, in declaration order. PROTOCOL.md
    /// has the same table, checked by a test.
    pub fn table(&self) -> [(&'static str, usize); 14] {
        [
            ("zone_name_bytes_max", self.zone_name_bytes_max),
            ("lock_name_bytes_max", self.lock_name_bytes_max),
            ("key_bytes_max", self.key_bytes_max),
            ("value_bytes_max", self.value_bytes_max),
            ("keys_per_lock_max", self.keys_per_lock_max),
            ("waiters_per_lock_max", self.waiters_per_lock_max),
            ("message_bytes_max", self.message_bytes_max),
            ("requests_in_flight_max", self.requests_in_flight_max),
            ("items_per_message_max", self.items_per_message_max),
            ("list_entries_max", self.list_entries_max),
            ("identity_bytes_max", self.identity_bytes_max),
            ("site_bytes_max", self.site_bytes_max),
            ("address_bytes_max", self.address_bytes_max),
            ("error_text_bytes_max", self.error_text_bytes_max),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every string field of the code table has a limit, so no string is
    /// ever bounded only by the message size.
    #[test]
    fn every_string_field_has_a_limit() {
        let limits = Limits::default();
        for c in codes::ALL {
            assert_eq!(
                c.kind.is_string(),
                limits.string_bytes_max(c.value).is_some(),
                "{}",
                c.name
            );
        }
    }
}
