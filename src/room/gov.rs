//! Who belongs to a room and what each may do: its kind, details, members
//! with their roles, bans and pending invitations, and the rules over them
//! (ARCHITECTURE.md, "Rooms and roles").
//!
//! Pure state and decisions: nothing here waits, stores or sends. The hub's
//! room administration (`hub::rooms`) asks these rules, commits the change,
//! then applies it here with the `apply_*` methods and tells the sessions.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::proto::{self, Role, RoomKind};
use crate::store::{BanRecord, InviteRecord, RoomDetails};

/// Most characters in a room title.
pub const MAX_TITLE_CHARS: usize = 128;
/// Most characters in a room topic.
pub const MAX_TOPIC_CHARS: usize = 1024;

/// One member's standing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Membership {
    /// Its role (never `Unspecified`).
    pub role: Role,
    /// When the membership began (Unix ms); with the user id, the order of
    /// succession.
    pub since: u64,
}

/// Members by user id: a `Vec` sorted by id. Most rooms have a handful of
/// members, and a `BTreeMap`'s first node is ~380 bytes per room where this
/// is 32 (benches/README.md, "Idle memory per connection"); a join into a
/// room of 100,000 moves ~3 MB, rare next to messages.
#[derive(Debug, Default)]
pub struct Members(Vec<(Arc<str>, Membership)>);

impl Members {
    fn find(&self, user: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(u, _)| (**u).cmp(user))
    }

    /// `user`'s membership.
    pub fn get(&self, user: &str) -> Option<&Membership> {
        self.find(user).ok().map(|i| &self.0[i].1)
    }

    /// Whether `user` is a member.
    pub fn contains_key(&self, user: &str) -> bool {
        self.find(user).is_ok()
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Members in user-id order.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Membership)> {
        self.0.iter().map(|(u, m)| (u, m))
    }

    /// Members with ids after `user`, in order.
    pub fn after(&self, user: &str) -> impl Iterator<Item = (&Arc<str>, &Membership)> {
        let from = match self.find(user) {
            Ok(i) => i + 1,
            Err(i) => i,
        };
        self.0[from..].iter().map(|(u, m)| (u, m))
    }

    fn get_mut(&mut self, user: &str) -> Option<&mut Membership> {
        self.find(user).ok().map(|i| &mut self.0[i].1)
    }

    fn insert(&mut self, user: Arc<str>, m: Membership) {
        match self.find(&user) {
            Ok(i) => self.0[i].1 = m,
            Err(i) => {
                if self.0.capacity() == 0 {
                    self.0.reserve_exact(1);
                }
                self.0.insert(i, (user, m));
            }
        }
    }

    fn remove(&mut self, user: &str) -> Option<Membership> {
        self.find(user).ok().map(|i| self.0.remove(i).1)
    }
}

/// What most rooms never have: a title, a topic, bans, invitations. Boxed
/// apart so a room without them carries one pointer.
#[derive(Debug, Default)]
struct Extra {
    title: String,
    topic: String,
    /// The room's own retention: (max age ms, max messages); 0: the default.
    retention: (u64, u64),
    bans: BTreeMap<Arc<str>, BanRecord>,
    invites: BTreeMap<Arc<str>, InviteRecord>,
}

static NO_BANS: BTreeMap<Arc<str>, BanRecord> = BTreeMap::new();
static NO_INVITES: BTreeMap<Arc<str>, InviteRecord> = BTreeMap::new();

/// A room's governance state.
#[derive(Debug)]
pub struct Governance {
    /// Public, private or direct.
    pub kind: RoomKind,
    /// Creator's user id.
    pub created_by: Arc<str>,
    /// Creation time (Unix ms).
    pub created_ms: u64,
    /// Members by user id.
    pub members: Members,
    /// The member whose role is `Owner`, if any.
    owner: Option<Arc<str>>,
    /// The latest `since` of any member.
    last_since: u64,
    extra: Option<Box<Extra>>,
}

/// What a request would do, for the permission check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Invite someone.
    Invite,
    /// Make someone a member directly (the server API).
    Add,
    /// End someone's membership or withdraw their invitation.
    Remove,
    /// Ban someone.
    Ban,
    /// Lift a ban.
    Unban,
    /// Change someone's role.
    SetRole,
    /// Change title or topic.
    Update,
}

impl Action {
    /// The name used in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Action::Invite => "invite",
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Ban => "ban",
            Action::Unban => "unban",
            Action::SetRole => "set_role",
            Action::Update => "update",
        }
    }
}

impl Governance {
    /// A room with these details and no members yet.
    pub fn new(details: &RoomDetails) -> Self {
        let mut g = Governance {
            kind: RoomKind::try_from(details.kind).unwrap_or(RoomKind::Public),
            created_by: details.created_by.as_str().into(),
            created_ms: details.created_ms,
            members: Members::default(),
            owner: None,
            last_since: 0,
            extra: None,
        };
        g.set_texts(details.title.clone(), details.topic.clone());
        g.set_retention(details.retention_max_age_ms, details.retention_max_messages);
        g
    }

    /// The room's own retention: (max age ms, max messages); 0: the
    /// server's default.
    pub fn retention(&self) -> (u64, u64) {
        self.extra.as_ref().map_or((0, 0), |e| e.retention)
    }

    /// Sets the room's own retention.
    pub fn set_retention(&mut self, max_age_ms: u64, max_messages: u64) {
        if (max_age_ms, max_messages) != self.retention() {
            self.extra().retention = (max_age_ms, max_messages);
        }
    }

    fn extra(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Default::default)
    }

    /// The title.
    pub fn title(&self) -> &str {
        self.extra.as_ref().map_or("", |e| &e.title)
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        self.extra.as_ref().map_or("", |e| &e.topic)
    }

    /// Sets title and topic.
    pub fn set_texts(&mut self, title: String, topic: String) {
        if title.is_empty() && topic.is_empty() && self.extra.is_none() {
            return;
        }
        let e = self.extra();
        e.title = title;
        e.topic = topic;
    }

    /// Banned users.
    pub fn bans(&self) -> &BTreeMap<Arc<str>, BanRecord> {
        self.extra.as_ref().map_or(&NO_BANS, |e| &e.bans)
    }

    /// Banned users, to change.
    pub fn bans_mut(&mut self) -> &mut BTreeMap<Arc<str>, BanRecord> {
        &mut self.extra().bans
    }

    /// Pending invitations by invitee.
    pub fn invites(&self) -> &BTreeMap<Arc<str>, InviteRecord> {
        self.extra.as_ref().map_or(&NO_INVITES, |e| &e.invites)
    }

    /// Pending invitations, to change.
    pub fn invites_mut(&mut self) -> &mut BTreeMap<Arc<str>, InviteRecord> {
        &mut self.extra().invites
    }

    /// The `since` of a membership beginning at `now_ms`: later than every
    /// other, so joins within one millisecond keep their order.
    pub fn next_since(&self, now_ms: u64) -> u64 {
        now_ms.max(self.last_since + 1)
    }

    /// The details as stored.
    pub fn details(&self) -> RoomDetails {
        RoomDetails {
            kind: self.kind as i32,
            title: self.title().to_string(),
            topic: self.topic().to_string(),
            created_by: self.created_by.to_string(),
            created_ms: self.created_ms,
            retention_max_age_ms: self.retention().0,
            retention_max_messages: self.retention().1,
        }
    }

    /// `user`'s role (`Unspecified`: not a member).
    pub fn role_of(&self, user: &str) -> Role {
        self.members.get(user).map_or(Role::Unspecified, |m| m.role)
    }

    /// The owner, if the room has one.
    pub fn owner(&self) -> Option<&Arc<str>> {
        self.owner.as_ref()
    }

    /// Whether `user` is banned.
    pub fn is_banned(&self, user: &str) -> bool {
        self.bans().contains_key(user)
    }

    /// The room as `viewer` sees it.
    pub fn info(&self, name: &str, viewer: &str) -> proto::RoomInfo {
        self.info_as(name, self.role_of(viewer))
    }

    /// The room as a user with `role` sees it.
    pub fn info_as(&self, name: &str, role: Role) -> proto::RoomInfo {
        proto::RoomInfo {
            room: name.to_string(),
            kind: self.kind as i32,
            title: self.title().to_string(),
            topic: self.topic().to_string(),
            created_by: self.created_by.to_string(),
            created_ms: self.created_ms,
            member_count: self.members.len() as u32,
            my_role: role as i32,
            owner: self.owner.as_deref().unwrap_or_default().to_string(),
            retention_max_age_ms: self.retention().0,
            retention_max_messages: self.retention().1,
        }
    }

    /// Whether `user` may read the room's details and members: a member, an
    /// invitee (details only, see [`Governance::may_list_members`]), or
    /// anyone not banned from a public room.
    pub fn may_view(&self, user: &str) -> bool {
        self.members.contains_key(user) || self.invites().contains_key(user) || self.may_list_members(user)
    }

    /// Whether `user` may list the members.
    pub fn may_list_members(&self, user: &str) -> bool {
        self.members.contains_key(user) || (self.kind == RoomKind::Public && !self.is_banned(user))
    }

    /// Whether `user` may join now, and if not, why.
    pub fn may_join(&self, user: &str) -> Result<(), &'static str> {
        if self.is_banned(user) {
            return Err("you are banned from this room");
        }
        match self.kind {
            RoomKind::Private if !self.invites().contains_key(user) => {
                Err("this room is private: joining needs an invitation")
            }
            // Direct rooms are checked by name (`access_of`) before this.
            _ => Ok(()),
        }
    }

    /// Whether `actor` may do `action` to `target` (for `SetRole`, giving
    /// them `new_role`).
    pub fn check(&self, actor: &str, action: Action, target: &str, new_role: Role) -> Result<(), String> {
        let mine = self.role_of(actor);
        if mine == Role::Unspecified {
            return Err("you are not a member of this room".into());
        }
        if self.kind == RoomKind::Direct {
            return Err("a direct conversation has no roles and no moderation".into());
        }
        let theirs = self.role_of(target);
        let needs = |role: Role| -> Result<(), String> {
            if mine >= role {
                Ok(())
            } else {
                Err(format!("{} needs the {} role; you are {}", action.name(), role_name(role), role_name(mine)))
            }
        };
        match action {
            Action::Invite if self.kind == RoomKind::Public => needs(Role::Member),
            Action::Invite | Action::Add | Action::Unban | Action::Update => needs(Role::Admin),
            Action::Remove | Action::Ban => {
                needs(Role::Admin)?;
                if actor == target {
                    return Err(format!("you cannot {} yourself; leave the room instead", action.name()));
                }
                if theirs >= mine {
                    return Err(format!(
                        "{target} is {}; you can {} only members below your role",
                        role_name(theirs),
                        action.name()
                    ));
                }
                Ok(())
            }
            Action::SetRole => {
                needs(Role::Owner)?;
                if actor == target {
                    return Err("the owner's role changes only by handing ownership to another member".into());
                }
                if new_role == Role::Unspecified {
                    return Err("role must be MEMBER, ADMIN or OWNER".into());
                }
                Ok(())
            }
        }
    }

    /// The longest-standing admin, else member, other than `except`: who
    /// inherits ownership.
    pub fn successor(&self, except: &str) -> Option<Arc<str>> {
        let oldest = |role: Role| {
            self.members
                .iter()
                .filter(|(u, m)| m.role == role && &***u != except)
                .min_by_key(|(u, m)| (m.since, Arc::clone(u)))
                .map(|(u, _)| u.clone())
        };
        oldest(Role::Admin).or_else(|| oldest(Role::Member))
    }

    /// Records `user` as a member with `role` since `since`.
    pub fn apply_member(&mut self, user: &Arc<str>, role: Role, since: u64) {
        if let Some(old) = self.members.get(user)
            && old.role == Role::Owner
            && role != Role::Owner
        {
            self.owner = None;
        }
        if role == Role::Owner {
            if let Some(previous) = self.owner.take()
                && previous != *user
                && let Some(m) = self.members.get_mut(&previous)
            {
                // One owner: a second one can come only from a store a
                // crash cut in the middle of a hand-over.
                m.role = Role::Admin;
            }
            self.owner = Some(user.clone());
        }
        if let Some(e) = &mut self.extra {
            e.invites.remove(user);
        }
        self.last_since = self.last_since.max(since);
        self.members.insert(user.clone(), Membership { role, since });
    }

    /// Ends `user`'s membership; returns whether they were a member.
    pub fn apply_departure(&mut self, user: &str) -> bool {
        if self.owner.as_deref() == Some(user) {
            self.owner = None;
        }
        self.members.remove(user).is_some()
    }
}

/// A role's name for messages.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Unspecified => "not a member",
        Role::Member => "member",
        Role::Admin => "admin",
        Role::Owner => "owner",
    }
}

/// Checks a title and topic's lengths (in characters).
pub fn check_texts(title: Option<&str>, topic: Option<&str>) -> Result<(), String> {
    if let Some(t) = title
        && t.chars().count() > MAX_TITLE_CHARS
    {
        return Err(format!("title is longer than {MAX_TITLE_CHARS} characters"));
    }
    if let Some(t) = topic
        && t.chars().count() > MAX_TOPIC_CHARS
    {
        return Err(format!("topic is longer than {MAX_TOPIC_CHARS} characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(kind: RoomKind) -> Governance {
        let mut g = Governance::new(&RoomDetails { kind: kind as i32, ..Default::default() });
        for (i, (u, r)) in [
            ("olga", Role::Owner),
            ("adam", Role::Admin),
            ("abby", Role::Admin),
            ("mia", Role::Member),
            ("max", Role::Member),
        ]
        .into_iter()
        .enumerate()
        {
            g.apply_member(&u.into(), r, 10 + i as u64);
        }
        g
    }

    #[test]
    fn roles_bound_what_each_member_may_do() {
        let g = room(RoomKind::Private);
        assert!(
            g.check("mia", Action::Invite, "zed", Role::Unspecified).is_err(),
            "members invite only to public rooms"
        );
        assert!(room(RoomKind::Public).check("mia", Action::Invite, "zed", Role::Unspecified).is_ok());
        assert!(g.check("adam", Action::Invite, "zed", Role::Unspecified).is_ok());
        assert!(g.check("adam", Action::Remove, "mia", Role::Unspecified).is_ok());
        assert!(g.check("adam", Action::Ban, "abby", Role::Unspecified).is_err(), "an equal");
        assert!(g.check("adam", Action::Ban, "olga", Role::Unspecified).is_err(), "the owner");
        assert!(g.check("olga", Action::Remove, "adam", Role::Unspecified).is_ok());
        assert!(g.check("olga", Action::Remove, "olga", Role::Unspecified).is_err(), "oneself");
        assert!(g.check("mia", Action::Remove, "max", Role::Unspecified).is_err());
        assert!(g.check("adam", Action::Ban, "zed", Role::Unspecified).is_ok(), "a non-member may be banned");
        assert!(g.check("adam", Action::SetRole, "mia", Role::Admin).is_err(), "only the owner sets roles");
        assert!(g.check("olga", Action::SetRole, "mia", Role::Admin).is_ok());
        assert!(g.check("olga", Action::SetRole, "olga", Role::Member).is_err());
        assert!(g.check("olga", Action::SetRole, "mia", Role::Unspecified).is_err());
        assert!(g.check("zed", Action::Invite, "mia", Role::Unspecified).is_err(), "a non-member");
        assert!(g.check("mia", Action::Update, "", Role::Unspecified).is_err());
        assert!(g.check("abby", Action::Update, "", Role::Unspecified).is_ok());
        let mut dm = Governance::new(&RoomDetails { kind: RoomKind::Direct as i32, ..Default::default() });
        dm.apply_member(&"ann".into(), Role::Member, 1);
        assert!(dm.check("ann", Action::Invite, "bob", Role::Unspecified).is_err());
    }

    #[test]
    fn ownership_passes_to_the_longest_standing_admin_else_member() {
        let mut g = room(RoomKind::Public);
        assert_eq!(g.owner().map(|o| &**o), Some("olga"));
        assert_eq!(g.successor("olga").as_deref(), Some("adam"));
        g.apply_departure("adam");
        g.apply_departure("abby");
        assert_eq!(g.successor("olga").as_deref(), Some("mia"));
        g.apply_member(&"mia".into(), Role::Owner, 13);
        assert_eq!(g.role_of("olga"), Role::Admin, "one owner at a time");
        assert_eq!(g.owner().map(|o| &**o), Some("mia"));
        g.apply_departure("mia");
        assert_eq!(g.owner(), None);
    }

    #[test]
    fn who_may_see_and_join() {
        let mut g = room(RoomKind::Private);
        assert!(!g.may_view("zed") && g.may_join("zed").is_err());
        g.invites_mut().insert("zed".into(), InviteRecord::default());
        assert!(g.may_view("zed") && !g.may_list_members("zed") && g.may_join("zed").is_ok());
        g.apply_member(&"zed".into(), Role::Member, 99);
        assert!(g.invites().is_empty(), "joining uses the invitation up");
        let mut p = room(RoomKind::Public);
        assert!(p.may_view("zed") && p.may_list_members("zed") && p.may_join("zed").is_ok());
        p.bans_mut().insert("zed".into(), BanRecord::default());
        assert!(!p.may_view("zed") && p.may_join("zed").is_err());
    }

    #[test]
    fn titles_and_topics_are_bounded_in_characters() {
        assert!(check_texts(Some(&"é".repeat(128)), Some(&"ü".repeat(1024))).is_ok());
        assert!(check_texts(Some(&"x".repeat(129)), None).is_err());
        assert!(check_texts(None, Some(&"x".repeat(1025))).is_err());
    }
}
