//! The on-disk encodings of the Raft log store and of snapshot files.
//!
//! Owns: the byte layout of every value this layer persists. Each value
//! starts with a format version byte followed by a postcard body made of
//! *our own* mirror types (not openraft's serde derives), so an openraft
//! upgrade that renames or reorders its fields cannot silently change what
//! is on disk, and a later release can still read what this one wrote.
//! Snapshot files additionally end with a CRC-32 (log values are covered by
//! the WAL's CRC-32 per record).
//!
//! Must never: panic or `unwrap` on bytes read from disk or from a peer —
//! every decoding failure is a [`StoreError`].

use std::collections::{BTreeMap, BTreeSet};

use oclocks_core::Command;
use openraft::{EntryPayload, LeaderId, Membership, SnapshotMeta, StoredMembership};
use serde::{Deserialize, Serialize};

use super::error::StoreError;
use super::member::{Member, MemberRole};
use super::{Entry, LogId, NodeId, Proposal, Vote};

/// Version of the log store's layout (records and their meaning), recorded
/// as the WAL's user data. 1 was the redb store of earlier development
/// builds (`raft-log.redb`); 2 is the WAL in `raft-log/`.
pub(crate) const STORE_FORMAT_VERSION: u64 = 2;
/// Version byte of log entries, votes and log ids in the log store.
pub(crate) const VALUE_VERSION: u8 = 1;
/// Version byte of snapshot files (and of snapshot data sent to peers).
pub(crate) const SNAPSHOT_VERSION: u8 = 1;

// ----------------------------------------------------------------------
// Mirror types (format version 1). Never reorder fields or variants: add a
// new version instead.
// ----------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
struct LogIdV1 {
    term: u64,
    node_id: u64,
    index: u64,
}

impl LogIdV1 {
    fn from_log_id(id: &LogId) -> LogIdV1 {
        LogIdV1 {
            term: id.leader_id.term,
            node_id: id.leader_id.node_id,
            index: id.index,
        }
    }

    fn into_log_id(self) -> LogId {
        LogId::new(LeaderId::new(self.term, self.node_id), self.index)
    }
}

#[derive(Serialize, Deserialize)]
struct VoteV1 {
    term: u64,
    node_id: u64,
    committed: bool,
}

#[derive(Serialize, Deserialize)]
struct MemberV1 {
    addr: String,
    client_addr: String,
    site: String,
    incarnation: u64,
    /// [`MemberRole`] as a number; an unknown value reads as a learner
    /// (never gives a vote it was not given).
    role: u8,
}

#[derive(Serialize, Deserialize)]
struct MembershipV1 {
    /// Joint configuration: one voter set, or two during a change.
    configs: Vec<BTreeSet<NodeId>>,
    /// Every member (voters and learners).
    nodes: BTreeMap<NodeId, MemberV1>,
}

impl MembershipV1 {
    fn from_membership(m: &Membership<NodeId, Member>) -> MembershipV1 {
        MembershipV1 {
            configs: m.get_joint_config().clone(),
            nodes: m
                .nodes()
                .map(|(id, n)| {
                    let v = MemberV1 {
                        addr: n.addr.clone(),
                        client_addr: n.client_addr.clone(),
                        site: n.site.clone(),
                        incarnation: n.incarnation,
                        role: n.role.to_u8(),
                    };
                    (*id, v)
                })
                .collect(),
        }
    }

    fn into_membership(self) -> Membership<NodeId, Member> {
        let nodes: BTreeMap<NodeId, Member> = self
            .nodes
            .into_iter()
            .map(|(id, n)| {
                let m = Member {
                    addr: n.addr,
                    client_addr: n.client_addr,
                    site: n.site,
                    incarnation: n.incarnation,
                    role: MemberRole::from_u8(n.role).unwrap_or(MemberRole::Learner),
                };
                (id, m)
            })
            .collect();
        Membership::new(self.configs, nodes)
    }
}

/// Encoding side of a log entry: borrows the commands.
#[derive(Serialize)]
enum PayloadV1Ref<'a> {
    Blank,
    Normal(&'a [Command]),
    Membership(MembershipV1),
}

/// Decoding side of a log entry (same variant order as [`PayloadV1Ref`]).
#[derive(Deserialize)]
enum PayloadV1 {
    Blank,
    Normal(Vec<Command>),
    Membership(MembershipV1),
}

#[derive(Serialize)]
struct EntryV1Ref<'a> {
    log_id: LogIdV1,
    payload: PayloadV1Ref<'a>,
}

#[derive(Deserialize)]
struct EntryV1 {
    log_id: LogIdV1,
    payload: PayloadV1,
}

#[derive(Serialize, Deserialize)]
struct SnapshotHeaderV1 {
    snapshot_id: String,
    last_log_id: Option<LogIdV1>,
    membership_log_id: Option<LogIdV1>,
    membership: MembershipV1,
}

// ----------------------------------------------------------------------
// Helpers
// ----------------------------------------------------------------------

fn versioned<T: Serialize>(what: &str, version: u8, value: &T) -> Result<Vec<u8>, StoreError> {
    // postcard into a growable Vec fails only if a Serialize impl does
    // (which plain structs of integers, strings and maps do not); still a
    // typed error rather than a panic.
    postcard::to_extend(value, vec![version]).map_err(|source| StoreError::Encode {
        what: what.to_string(),
        source,
    })
}

fn split_version<'a>(what: &str, bytes: &'a [u8], supported: u8) -> Result<&'a [u8], StoreError> {
    let (&version, body) = bytes.split_first().ok_or_else(|| StoreError::Corrupt {
        what: what.to_string(),
        detail: "empty value".into(),
    })?;
    if version == 0 || version > supported {
        return Err(StoreError::UnsupportedVersion {
            what: what.to_string(),
            found: u64::from(version),
            supported: u64::from(supported),
        });
    }
    Ok(body)
}

fn decode_body<'a, T: Deserialize<'a>>(what: &str, body: &'a [u8]) -> Result<T, StoreError> {
    let (value, rest) = postcard::take_from_bytes(body).map_err(|source| StoreError::Decode {
        what: what.to_string(),
        source,
    })?;
    if !rest.is_empty() {
        return Err(StoreError::Corrupt {
            what: what.to_string(),
            detail: format!("{} trailing bytes", rest.len()),
        });
    }
    Ok(value)
}

// ----------------------------------------------------------------------
// Log store values
// ----------------------------------------------------------------------

pub(crate) fn encode_entry(entry: &Entry) -> Result<Vec<u8>, StoreError> {
    let payload = match &entry.payload {
        EntryPayload::Blank => PayloadV1Ref::Blank,
        EntryPayload::Normal(p) => PayloadV1Ref::Normal(&p.commands),
        EntryPayload::Membership(m) => PayloadV1Ref::Membership(MembershipV1::from_membership(m)),
    };
    versioned(
        "log entry",
        VALUE_VERSION,
        &EntryV1Ref {
            log_id: LogIdV1::from_log_id(&entry.log_id),
            payload,
        },
    )
}

/// Decode the entry stored under key `index`; its log id must name `index`.
pub(crate) fn decode_entry(index: u64, bytes: &[u8]) -> Result<Entry, StoreError> {
    let what = || format!("log entry {index}");
    let body = split_version(&what(), bytes, VALUE_VERSION)?;
    let e: EntryV1 = decode_body(&what(), body)?;
    let log_id = e.log_id.into_log_id();
    if log_id.index != index {
        return Err(StoreError::Corrupt {
            what: what(),
            detail: format!(
                "stored under index {index} but names index {}",
                log_id.index
            ),
        });
    }
    let payload = match e.payload {
        PayloadV1::Blank => EntryPayload::Blank,
        PayloadV1::Normal(commands) => EntryPayload::Normal(Proposal { commands }),
        PayloadV1::Membership(m) => EntryPayload::Membership(m.into_membership()),
    };
    Ok(Entry { log_id, payload })
}

pub(crate) fn encode_vote(vote: &Vote) -> Result<Vec<u8>, StoreError> {
    versioned(
        "vote",
        VALUE_VERSION,
        &VoteV1 {
            term: vote.leader_id.term,
            node_id: vote.leader_id.node_id,
            committed: vote.committed,
        },
    )
}

pub(crate) fn decode_vote(bytes: &[u8]) -> Result<Vote, StoreError> {
    let body = split_version("vote", bytes, VALUE_VERSION)?;
    let v: VoteV1 = decode_body("vote", body)?;
    Ok(Vote {
        leader_id: LeaderId::new(v.term, v.node_id),
        committed: v.committed,
    })
}

// ----------------------------------------------------------------------
// Snapshot files
// ----------------------------------------------------------------------

/// Snapshot bytes: `[version] [postcard header] [engine snapshot] [crc32 LE]`.
/// The same bytes are the file on disk and the data sent to a follower.
pub(crate) fn encode_snapshot(
    meta: &SnapshotMeta<NodeId, Member>,
    engine: &[u8],
) -> Result<Vec<u8>, StoreError> {
    let header = SnapshotHeaderV1 {
        snapshot_id: meta.snapshot_id.clone(),
        last_log_id: meta.last_log_id.as_ref().map(LogIdV1::from_log_id),
        membership_log_id: meta
            .last_membership
            .log_id()
            .as_ref()
            .map(LogIdV1::from_log_id),
        membership: MembershipV1::from_membership(meta.last_membership.membership()),
    };
    let mut out = versioned("snapshot", SNAPSHOT_VERSION, &header)?;
    out.reserve(engine.len() + 4);
    out.extend_from_slice(engine);
    let crc = crc32(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Decode snapshot bytes into their metadata and the engine's snapshot
/// bytes (borrowed from `bytes`).
pub(crate) fn decode_snapshot(
    bytes: &[u8],
) -> Result<(SnapshotMeta<NodeId, Member>, &[u8]), StoreError> {
    let what = "snapshot";
    if bytes.len() < 5 {
        return Err(StoreError::Corrupt {
            what: what.into(),
            detail: format!("only {} bytes", bytes.len()),
        });
    }
    let (content, crc_bytes) = bytes.split_at(bytes.len() - 4);
    let mut crc = [0u8; 4];
    crc.copy_from_slice(crc_bytes);
    // The version byte is checked first, so a newer format is reported as
    // such and not as a checksum mismatch.
    let body = split_version(what, content, SNAPSHOT_VERSION)?;
    if crc32(content) != u32::from_le_bytes(crc) {
        return Err(StoreError::Corrupt {
            what: what.into(),
            detail: "checksum mismatch".into(),
        });
    }
    let (h, engine): (SnapshotHeaderV1, &[u8]) =
        postcard::take_from_bytes(body).map_err(|source| StoreError::Decode {
            what: what.into(),
            source,
        })?;
    let meta = SnapshotMeta {
        last_log_id: h.last_log_id.map(LogIdV1::into_log_id),
        last_membership: StoredMembership::new(
            h.membership_log_id.map(LogIdV1::into_log_id),
            h.membership.into_membership(),
        ),
        snapshot_id: h.snapshot_id,
    };
    Ok((meta, engine))
}

/// CRC-32 (IEEE 802.3, reflected), table-driven.
pub(crate) fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_known_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }
}
