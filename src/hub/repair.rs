//! Making a recovered snapshot's room records consistent before the hub is
//! built from them, and storing what was repaired.
//!
//! A room change writes its records one by one (`store::sled` says why a
//! batch is not atomic), in an order chosen so that a crash in between
//! leaves something that can be resolved here rather than something lost:
//! a new owner before the old one steps down (two owners: the later role
//! wins), a ban before the banned member's departure (a banned member: the
//! ban wins), a membership before the invitation it used (a member still
//! invited: the invitation goes). Only changes that were never answered
//! can be cut like this; what is repaired is written back, so the next
//! start and every later change see one resolution.

use std::collections::{HashMap, HashSet};

use crate::proto::{MemberChange, Role};
use crate::store::{MemberRecord, RoomId, RoomWrite, Snapshot};

/// Resolves what a crash mid-change left in `snapshot`, in place; returns
/// the records that say so, for the store.
pub fn repair(snapshot: &mut Snapshot) -> Vec<RoomWrite> {
    let mut writes = Vec::new();

    // A banned member: the membership ends, as the ban's change meant.
    let banned: HashMap<(RoomId, &str), &str> =
        snapshot.bans.iter().map(|(room, user, ban)| ((*room, user.as_str()), ban.by.as_str())).collect();
    let mut ended = Vec::new();
    snapshot.memberships.retain(|(user, room, _)| match banned.get(&(*room, user.as_str())) {
        Some(by) => {
            ended.push((user.clone(), *room, by.to_string()));
            false
        }
        None => true,
    });
    for (user, room, by) in ended {
        let record = MemberRecord { reason: MemberChange::Banned as i32, by, ..Default::default() };
        writes.push(RoomWrite::Member { user, room, record });
    }

    // Two owners: the one whose role was written last keeps it.
    let mut owners: HashMap<RoomId, Vec<usize>> = HashMap::new();
    for (i, (_, room, m)) in snapshot.memberships.iter().enumerate() {
        if m.role == Role::Owner as i32 {
            owners.entry(*room).or_default().push(i);
        }
    }
    for (_, mut idx) in owners.into_iter().filter(|(_, v)| v.len() > 1) {
        let key = |i: &usize| {
            let (user, _, m) = &snapshot.memberships[*i];
            (m.role_ms, user.clone())
        };
        idx.sort_by_key(key);
        idx.pop();
        for i in idx {
            let (user, room, m) = &mut snapshot.memberships[i];
            m.role = Role::Admin as i32;
            writes.push(RoomWrite::Member { user: user.clone(), room: *room, record: m.clone() });
        }
    }

    // A member still invited: the invitation was used.
    let members: HashSet<(&str, RoomId)> = snapshot.memberships.iter().map(|(u, r, _)| (u.as_str(), *r)).collect();
    let mut used = Vec::new();
    snapshot.invites.retain(|(user, room, _)| {
        let member = members.contains(&(user.as_str(), *room));
        if member {
            used.push((user.clone(), *room));
        }
        !member
    });
    writes.extend(used.into_iter().map(|(user, room)| RoomWrite::Invite { user, room, invite: None }));
    writes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{BanRecord, InviteRecord};

    fn member(user: &str, room: RoomId, role: Role, role_ms: u64) -> (String, RoomId, MemberRecord) {
        (user.into(), room, MemberRecord { role: role as i32, since: 1, role_ms, ..Default::default() })
    }

    #[test]
    fn a_crash_mid_change_is_resolved_and_the_resolution_written() {
        let mut snap = Snapshot {
            memberships: vec![
                // A hand-over cut short: bob's role is the newer.
                member("ann", 1, Role::Owner, 10),
                member("bob", 1, Role::Owner, 20),
                member("cat", 1, Role::Member, 5),
                // A ban whose departure was not written.
                member("eve", 1, Role::Member, 5),
                // A join whose used invitation was not removed.
                member("dan", 2, Role::Owner, 5),
            ],
            bans: vec![(1, "eve".into(), BanRecord { by: "bob".into(), ..Default::default() })],
            invites: vec![("dan".into(), 2, InviteRecord::default()), ("zed".into(), 2, InviteRecord::default())],
            ..Default::default()
        };
        let writes = repair(&mut snap);
        let roles: Vec<_> = snap.memberships.iter().map(|(u, r, m)| (u.as_str(), *r, m.role)).collect();
        let (owner, admin, member) = (Role::Owner as i32, Role::Admin as i32, Role::Member as i32);
        assert_eq!(roles, [("ann", 1, admin), ("bob", 1, owner), ("cat", 1, member), ("dan", 2, owner)]);
        assert_eq!(snap.invites.len(), 1, "zed's invitation stays");
        let described: Vec<String> = writes
            .iter()
            .map(|w| match w {
                RoomWrite::Member { user, record, .. } => format!("{user}:{}:{}", record.role, record.reason),
                RoomWrite::Invite { user, invite: None, .. } => format!("{user}:uninvited"),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(described, ["eve:0:5", "ann:2:0", "dan:uninvited"]);
        assert!(repair(&mut snap).is_empty(), "repaired once");
    }
}
