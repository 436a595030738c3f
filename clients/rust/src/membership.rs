//! What the client knows of the user's rooms (proto/README.md §8): each
//! room's `RoomInfo` with the user's role, and the pending invitations.
//!
//! It starts from `Welcome` (`rooms[].info`, `invites`) and is replaced by
//! each reconnect's `Welcome`; in between, the connection task applies what
//! the server sends (`Joined`, `Left`, `Invitation`, `RoomUpdate`, and the
//! `RoomInfo` replies) before it hands the event or reply on, so an
//! application that has seen one finds it reflected here.

use std::collections::BTreeMap;

use chatd::proto;

/// The user's rooms and pending invitations, by room name.
#[derive(Default, Debug, Clone)]
pub struct Membership {
    rooms: BTreeMap<String, proto::RoomInfo>,
    invites: BTreeMap<String, proto::Invitation>,
}

/// A room's details, or just its name when the server sent none.
fn info_or_name(room: &str, info: Option<&proto::RoomInfo>) -> proto::RoomInfo {
    info.cloned().unwrap_or_else(|| proto::RoomInfo { room: room.to_string(), ..Default::default() })
}

impl Membership {
    /// Starts over from a `Welcome`: its rooms and its invitations.
    pub fn on_welcome(&mut self, w: &proto::Welcome) {
        self.rooms = w.rooms.iter().map(|r| (r.room.clone(), info_or_name(&r.room, r.info.as_ref()))).collect();
        self.invites = w.invites.iter().map(|i| (i.room.clone(), i.clone())).collect();
    }

    /// The user is a member of a room (a `Join` reply, or added by someone
    /// else); an invitation to it is used up.
    pub fn on_joined(&mut self, j: &proto::Joined) {
        if let Some(s) = &j.state {
            self.rooms.insert(s.room.clone(), info_or_name(&s.room, s.info.as_ref()));
            self.invites.remove(&s.room);
        }
    }

    /// The user's membership of a room ended (left, removed, banned), or a
    /// resume named a room the user is not in; a removal also withdraws a
    /// pending invitation.
    pub fn on_left(&mut self, room: &str) {
        self.rooms.remove(room);
        self.invites.remove(room);
    }

    /// A new invitation (a second one to the same room replaces the first).
    pub fn on_invitation(&mut self, i: &proto::Invitation) {
        self.invites.insert(i.room.clone(), i.clone());
    }

    /// The user declined the invitation to `room`.
    pub fn on_declined(&mut self, room: &str) {
        self.invites.remove(room);
    }

    /// The room as the server showed it to the user (a request's reply or
    /// a `RoomUpdate`): updates a room the user is a member of, or an
    /// invitation's details. It never adds a room — only `Joined` does (the
    /// server pushes one for a room the user creates): a reply computed just
    /// before a removal can arrive after its `Left`.
    pub fn on_room_info(&mut self, info: &proto::RoomInfo) {
        if info.my_role() == proto::Role::Unspecified {
            self.rooms.remove(&info.room);
            if let Some(i) = self.invites.get_mut(&info.room) {
                i.info = Some(info.clone());
            }
        } else if let Some(known) = self.rooms.get_mut(&info.room) {
            *known = info.clone();
        }
    }

    /// A room the user is a member of.
    pub fn room(&self, room: &str) -> Option<&proto::RoomInfo> {
        self.rooms.get(room)
    }

    /// The rooms the user is a member of, in name order.
    pub fn rooms(&self) -> impl Iterator<Item = &proto::RoomInfo> {
        self.rooms.values()
    }

    /// The pending invitations, in room-name order.
    pub fn invites(&self) -> impl Iterator<Item = &proto::Invitation> {
        self.invites.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(room: &str, role: proto::Role) -> proto::RoomInfo {
        proto::RoomInfo { room: room.into(), my_role: role as i32, ..Default::default() }
    }

    fn invitation(room: &str, by: &str) -> proto::Invitation {
        proto::Invitation {
            room: room.into(),
            by: by.into(),
            ts_ms: 1,
            info: Some(info(room, proto::Role::Unspecified)),
        }
    }

    fn names(m: &Membership) -> (Vec<&str>, Vec<&str>) {
        (m.rooms().map(|r| r.room.as_str()).collect(), m.invites().map(|i| i.room.as_str()).collect())
    }

    fn joined(room: &str, role: proto::Role) -> proto::Joined {
        proto::Joined {
            state: Some(proto::RoomState { room: room.into(), info: Some(info(room, role)), ..Default::default() }),
            online: vec![],
        }
    }

    #[test]
    fn a_welcome_replaces_everything() {
        let mut m = Membership::default();
        m.on_invitation(&invitation("old", "ann"));
        m.on_joined(&joined("gone", proto::Role::Member));
        let w = proto::Welcome {
            rooms: vec![
                proto::RoomState { room: "b".into(), info: Some(info("b", proto::Role::Owner)), ..Default::default() },
                proto::RoomState { room: "a".into(), info: None, ..Default::default() },
            ],
            invites: vec![invitation("team", "ann")],
            ..Default::default()
        };
        m.on_welcome(&w);
        assert_eq!(names(&m), (vec!["a", "b"], vec!["team"]));
        assert_eq!(m.room("b").unwrap().my_role(), proto::Role::Owner);
        assert_eq!(m.room("a").unwrap().room, "a", "a room without details is still listed");
    }

    #[test]
    fn joining_uses_the_invitation_up_and_leaving_forgets_the_room() {
        let mut m = Membership::default();
        m.on_invitation(&invitation("team", "ann"));
        m.on_invitation(&invitation("other", "bob"));
        m.on_joined(&joined("team", proto::Role::Member));
        assert_eq!(names(&m), (vec!["team"], vec!["other"]));
        m.on_declined("other");
        assert_eq!(names(&m), (vec!["team"], vec![]));
        m.on_left("team");
        assert_eq!(names(&m), (vec![], vec![]));
    }

    #[test]
    fn a_removal_withdraws_an_invitation() {
        let mut m = Membership::default();
        m.on_invitation(&invitation("team", "ann"));
        m.on_left("team");
        assert_eq!(names(&m), (vec![], vec![]));
    }

    #[test]
    fn room_info_updates_a_members_room_and_never_adds_one_for_a_non_member() {
        let mut m = Membership::default();
        m.on_joined(&joined("team", proto::Role::Owner));
        let mut handed_on = info("team", proto::Role::Admin);
        handed_on.owner = "bob".into();
        m.on_room_info(&handed_on);
        assert_eq!(m.room("team").unwrap().my_role(), proto::Role::Admin);
        assert_eq!(m.room("team").unwrap().owner, "bob");

        // A public room read from outside, or one the user is invited to.
        m.on_invitation(&invitation("private", "ann"));
        m.on_room_info(&info("lobby", proto::Role::Unspecified));
        let mut retitled = info("private", proto::Role::Unspecified);
        retitled.title = "Renamed".into();
        m.on_room_info(&retitled);
        assert_eq!(names(&m), (vec!["team"], vec!["private"]));
        assert_eq!(m.invites().next().unwrap().info.as_ref().unwrap().title, "Renamed");

        // A reply with a role never adds a room (one computed before a
        // removal may come after its Left); the Joined push does.
        m.on_room_info(&info("new", proto::Role::Owner));
        assert_eq!(names(&m), (vec!["team"], vec!["private"]));
        m.on_joined(&joined("new", proto::Role::Owner));
        // No longer a member (as a reply shows it).
        m.on_room_info(&info("team", proto::Role::Unspecified));
        assert_eq!(names(&m), (vec!["new"], vec!["private"]));
    }
}
