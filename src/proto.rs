//! The wire types of `chat.v1`, generated from `proto/chat/v1/chat.proto` by
//! `build.rs`, plus small conveniences that every side of the wire uses.

#![allow(clippy::all, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/chat.v1.rs"));
// The canonical proto3 JSON mapping (serde), for the WebSocket adapter.
#[cfg(feature = "server")]
include!(concat!(env!("OUT_DIR"), "/chat.v1.serde.rs"));

/// The protocol version this build speaks (`Hello.protocol_version`).
pub const PROTOCOL_VERSION: u32 = 1;

/// Default maximum frame size in bytes (proto/README.md, §1 "Framing").
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024;

pub use envelope::Body;

impl Envelope {
    /// An envelope with `id` and `body`.
    pub fn new(id: u64, body: Body) -> Self {
        Envelope { id, body: Some(body) }
    }

    /// A server push (`id = 0`).
    pub fn push(body: Body) -> Self {
        Envelope { id: 0, body: Some(body) }
    }
}

impl Body {
    /// The oneof member's name as it appears in the schema, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Body::Hello(_) => "hello",
            Body::Welcome(_) => "welcome",
            Body::Join(_) => "join",
            Body::Joined(_) => "joined",
            Body::Leave(_) => "leave",
            Body::Left(_) => "left",
            Body::Publish(_) => "publish",
            Body::PublishAck(_) => "publish_ack",
            Body::Message(_) => "message",
            Body::History(_) => "history",
            Body::HistoryPage(_) => "history_page",
            Body::Synced(_) => "synced",
            Body::Typing(_) => "typing",
            Body::MarkRead(_) => "mark_read",
            Body::ReadReceipt(_) => "read_receipt",
            Body::Presence(_) => "presence",
            Body::Ping(_) => "ping",
            Body::Pong(_) => "pong",
            Body::Error(_) => "error",
            Body::GoAway(_) => "go_away",
            Body::CreateRoom(_) => "create_room",
            Body::UpdateRoom(_) => "update_room",
            Body::GetRoom(_) => "get_room",
            Body::RoomInfo(_) => "room_info",
            Body::Invite(_) => "invite",
            Body::DeclineInvite(_) => "decline_invite",
            Body::RemoveMember(_) => "remove_member",
            Body::Ban(_) => "ban",
            Body::Unban(_) => "unban",
            Body::SetRole(_) => "set_role",
            Body::ListMembers(_) => "list_members",
            Body::MemberPage(_) => "member_page",
            Body::ListRooms(_) => "list_rooms",
            Body::RoomList(_) => "room_list",
            Body::Invitation(_) => "invitation",
            Body::RoomUpdate(_) => "room_update",
            Body::Edit(_) => "edit",
            Body::Delete(_) => "delete",
            Body::React(_) => "react",
        }
    }
}

impl Error {
    /// An `Error` body with `code` and a human-readable `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error { code: code as i32, message: message.into() }
    }
}

impl GoAway {
    /// A `GoAway` body with `reason` and a human-readable `message`.
    pub fn new(reason: CloseReason, message: impl Into<String>) -> Self {
        GoAway { reason: reason as i32, message: message.into(), retry_after_ms: 0 }
    }
}
