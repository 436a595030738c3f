//! What the store keeps of a room beyond its log: its details, its members
//! with their roles, its bans, and the invitations to it
//! (ARCHITECTURE.md, "Rooms and roles").
//!
//! These are state, not log entries: a change takes no seq and replaces
//! the record it concerns. The values are small protobuf messages (prost
//! derives, not part of the wire protocol) so fields can be added later
//! without a format change.

use super::RoomId;

/// A room's kind and descriptive fields.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RoomDetails {
    /// `proto::RoomKind` as its number.
    #[prost(int32, tag = "1")]
    pub kind: i32,
    /// Title, at most 128 characters.
    #[prost(string, tag = "2")]
    pub title: String,
    /// Topic, at most 1,024 characters.
    #[prost(string, tag = "3")]
    pub topic: String,
    /// The user who created it.
    #[prost(string, tag = "4")]
    pub created_by: String,
    /// When (Unix ms).
    #[prost(uint64, tag = "5")]
    pub created_ms: u64,
    /// The room's own retention by age, ms (0: the server's default).
    #[prost(uint64, tag = "6")]
    pub retention_max_age_ms: u64,
    /// The room's own retention by count (0: the server's default).
    #[prost(uint64, tag = "7")]
    pub retention_max_messages: u64,
}

/// A user's standing in a room: a member with a role, or (`role = 0`) the
/// record of how the membership ended, kept so a resume cursor for the room
/// can be answered with the reason.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MemberRecord {
    /// `proto::Role` as its number; 0 once the membership ended.
    #[prost(int32, tag = "1")]
    pub role: i32,
    /// When the membership began (Unix ms): the longest-standing admin or
    /// member inherits ownership.
    #[prost(uint64, tag = "2")]
    pub since: u64,
    /// How it ended (`proto::MemberChange`), when `role = 0`.
    #[prost(int32, tag = "3")]
    pub reason: i32,
    /// Who ended it.
    #[prost(string, tag = "4")]
    pub by: String,
    /// When the role (or the end) was written (Unix ms): of two owners
    /// a crash left mid-hand-over, the later is the owner.
    #[prost(uint64, tag = "5")]
    pub role_ms: u64,
}

/// A ban: the user may not join until unbanned.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BanRecord {
    /// The admin who banned.
    #[prost(string, tag = "1")]
    pub by: String,
    /// The reason given.
    #[prost(string, tag = "2")]
    pub reason: String,
    /// When (Unix ms).
    #[prost(uint64, tag = "3")]
    pub ts_ms: u64,
}

/// A pending invitation.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InviteRecord {
    /// Who invited.
    #[prost(string, tag = "1")]
    pub by: String,
    /// When (Unix ms).
    #[prost(uint64, tag = "2")]
    pub ts_ms: u64,
}

/// One change to a room's state, written by the group commit with the
/// messages of the same batch (before them: a room's name is stored before
/// any of its messages).
#[derive(Clone, Debug)]
pub enum RoomWrite {
    /// The room's name (and so its name → id mapping) and details.
    Details {
        /// Room id.
        room: RoomId,
        /// Room name.
        name: String,
        /// Its details.
        details: RoomDetails,
    },
    /// A membership began, changed role, or ended (`record.role = 0`).
    Member {
        /// User id.
        user: String,
        /// Room id.
        room: RoomId,
        /// The new record.
        record: MemberRecord,
    },
    /// A ban placed (`Some`) or lifted (`None`).
    Ban {
        /// Room id.
        room: RoomId,
        /// User id.
        user: String,
        /// The ban.
        ban: Option<BanRecord>,
    },
    /// An invitation made (`Some`) or used, declined or withdrawn (`None`).
    Invite {
        /// User id of the invitee.
        user: String,
        /// Room id.
        room: RoomId,
        /// The invitation.
        invite: Option<InviteRecord>,
    },
    /// Why an invitation ended other than by a join (`reason`: declined,
    /// or withdrawn by a removal or a ban, by `by`): nothing a store keeps
    /// (the `Invite` write beside it removes the invitation); a cluster
    /// node shares it, so that the other nodes tell their sessions as one
    /// node would.
    InviteEnded {
        /// User id of the invitee.
        user: String,
        /// Room id.
        room: RoomId,
        /// A `MemberChange`: declined, removed or banned.
        reason: i32,
        /// Who ended it.
        by: String,
    },
}
