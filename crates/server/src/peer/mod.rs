//! The peer protocol: how servers talk to each other.
//!
//! Peers use the same TLS 1.3 port as clients; the ALPN protocol
//! `oclocks-peer/1` selects this protocol, and only a certificate with the
//! server role (URI SAN `oclocks:role:server`) may speak it — a client
//! certificate is refused before a byte of it is read.
//!
//! Framing (ours, not gRPC): every frame is a big-endian `u32` length, then
//! that many bytes of a postcard-encoded [`Frame`] — a request id and a
//! [`PeerRequest`] one way, the same id and a [`PeerResponse`] the other.
//! Requests on one connection are multiplexed: each is handled in its own
//! task and answered when done, in any order. A frame longer than
//! [`PEER_FRAME_BYTES_MAX`] ends the connection.
//!
//! The first request of a connection is [`PeerRequest::Hello`]: the cluster
//! id, who is calling (node id and data-directory incarnation), and whom it
//! means to reach (node id and the incarnation the membership records). The
//! callee refuses, with a message that says what is wrong, a peer of another
//! cluster, a call meant for another node, and any incarnation that differs
//! from the membership's (a wiped data directory). Only then do Raft RPCs
//! (append entries, vote, snapshot chunks — snapshots stream in chunks of
//! `snapshot_chunk_bytes`), forwarded commands, read-index requests, joins
//! and removals flow.
//!
//! Must never: read a frame without a length bound, wait without a
//! deadline on the calling side, or let a request of one peer hold up the
//! others.

use oclocks_core::Op;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::raft::{Applied, Member, NodeId, TypeConfig};

mod net;
mod serve;

pub use net::{PeerCallError, PeerNet, PeerNetOptions};
pub use serve::{serve, PeerHandler};

/// Largest frame either side accepts (a batch of log entries or one
/// snapshot chunk, with room to spare).
pub const PEER_FRAME_BYTES_MAX: usize = 256 << 20;
/// Requests one peer connection may have in flight at the callee.
pub const PEER_IN_FLIGHT_MAX: usize = 1024;

/// One frame: a request or a response with its id.
#[derive(Debug, Serialize, Deserialize)]
pub struct Frame<T> {
    pub id: u64,
    pub body: T,
}

/// The handshake: who calls, whom it means to reach.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHello {
    /// The caller's cluster; `None` for a node that has not joined yet.
    pub cluster_id: Option<u128>,
    pub from: NodeId,
    pub from_incarnation: u64,
    /// The node the caller means to reach, if it knows.
    pub to: Option<NodeId>,
    /// The incarnation the membership records for `to`, if known.
    pub to_incarnation: Option<u64>,
}

/// The callee's answer to a good handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerWelcome {
    pub cluster_id: Option<u128>,
    pub node_id: NodeId,
    pub incarnation: u64,
}

/// A node asks to become a member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    pub node_id: NodeId,
    pub member: Member,
}

/// Why a forwarded request (command, read index, join, removal) failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ForwardError {
    /// The callee is not the leader (any more); the leader it knows of.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    /// The leader could not complete it (no quorum, shutting down, ...); a
    /// command may or may not have been committed.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Refused for good, with the reason (join of a wiped node, removal
    /// that would lose the quorum, ...).
    #[error("{0}")]
    Refused(String),
}

/// A request from a peer.
#[derive(Debug, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub enum PeerRequest {
    Hello(PeerHello),
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// Stamp and commit this operation (the callee must be the leader);
    /// answered once applied there, with the entry's index.
    Forward(Op),
    /// Confirm leadership with a quorum and return the index a
    /// linearizable read must wait for.
    ReadIndex,
    Join(JoinRequest),
    Remove(NodeId),
    Promote(NodeId),
}

/// A response to a peer.
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    Welcome(PeerWelcome),
    /// The handshake or request was refused; the connection closes.
    Refused(String),
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    Forwarded(Result<Applied, ForwardError>),
    ReadIndex(Result<u64, ForwardError>),
    /// Joined: the cluster id.
    Joined(Result<u128, ForwardError>),
    Removed(Result<(), ForwardError>),
    Promoted(Result<(), ForwardError>),
}

impl PeerResponse {
    /// The variant's name, for errors.
    pub fn kind(&self) -> &'static str {
        match self {
            PeerResponse::Welcome(_) => "Welcome",
            PeerResponse::Refused(_) => "Refused",
            PeerResponse::AppendEntries(_) => "AppendEntries",
            PeerResponse::Vote(_) => "Vote",
            PeerResponse::InstallSnapshot(_) => "InstallSnapshot",
            PeerResponse::Forwarded(_) => "Forwarded",
            PeerResponse::ReadIndex(_) => "ReadIndex",
            PeerResponse::Joined(_) => "Joined",
            PeerResponse::Removed(_) => "Removed",
            PeerResponse::Promoted(_) => "Promoted",
        }
    }
}

/// Encode a frame body.
pub fn encode<T: Serialize>(frame: &Frame<T>) -> Result<bytes::Bytes, postcard::Error> {
    postcard::to_stdvec(frame).map(bytes::Bytes::from)
}

/// Decode a frame body.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<Frame<T>, postcard::Error> {
    postcard::from_bytes(bytes)
}

/// The length-prefixed framing of the peer protocol.
pub fn codec() -> tokio_util::codec::LengthDelimitedCodec {
    tokio_util::codec::LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .max_frame_length(PEER_FRAME_BYTES_MAX)
        .new_codec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use oclocks_core::Reply;
    use openraft::{LeaderId, Vote};

    #[test]
    fn frames_round_trip() {
        let f = Frame {
            id: 7,
            body: PeerRequest::Hello(PeerHello {
                cluster_id: Some(u128::MAX),
                from: 2,
                from_incarnation: 9,
                to: Some(1),
                to_incarnation: None,
            }),
        };
        let b = encode(&f).unwrap();
        let back: Frame<PeerRequest> = decode(&b).unwrap();
        assert_eq!(back.id, 7);
        assert!(
            matches!(back.body, PeerRequest::Hello(h) if h.from == 2 && h.cluster_id == Some(u128::MAX))
        );

        let vote = VoteRequest::new(
            Vote::new(3, 2),
            Some(openraft::LogId::new(LeaderId::new(2, 1), 10)),
        );
        let b = encode(&Frame {
            id: 1,
            body: PeerRequest::Vote(vote.clone()),
        })
        .unwrap();
        let back: Frame<PeerRequest> = decode(&b).unwrap();
        assert!(matches!(back.body, PeerRequest::Vote(v) if v == vote));

        let r = PeerResponse::Forwarded(Ok(Applied {
            reply: Reply::Done,
            index: 5,
        }));
        let b = encode(&Frame { id: 2, body: r }).unwrap();
        let back: Frame<PeerResponse> = decode(&b).unwrap();
        assert!(matches!(back.body, PeerResponse::Forwarded(Ok(a)) if a.index == 5));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [&b""[..], &[0xff; 3][..], &[1, 200, 200, 200, 200, 200][..]] {
            assert!(decode::<PeerRequest>(bytes).is_err());
        }
    }
}
