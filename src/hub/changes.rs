//! Changes to messages — edits, deletes, reactions (proto/README.md, §9):
//! each is an entry of the room's log, appended like a message
//! ([`Hub::append`]) once its target's state allows it (ARCHITECTURE.md,
//! "Message changes").
//!
//! The decision and the seq are taken together under the room's pending
//! lock ([`crate::room::pending`]): the target's state is the store's,
//! plus whatever changes are still on their way through the group commit.
//! So two concurrent deletes of one message make one entry, and a reaction
//! added twice at once is counted once.

use std::collections::HashMap;
use std::sync::Arc;

use super::publish::{Author, Kind};
use super::{Hub, Refusal};
use crate::proto::{self, ChangeKind, ErrorCode, Role};
use crate::room::Room;
use crate::room::pending::PendingTarget;
use crate::store::{Entry, Target};

/// Most bytes in a reaction key.
pub const MAX_REACTION_KEY: usize = 64;

/// A change as requested.
pub struct Change {
    /// The changed message's seq.
    pub target: u64,
    /// What kind of change.
    pub kind: ChangeKind,
    /// The reaction key.
    pub key: String,
}

impl Change {
    /// The log entry it makes, by `user`.
    pub fn entry(&self, user: &Arc<str>) -> Entry {
        Entry::Change { user: user.clone(), target: self.target, kind: self.kind, key: self.key.clone() }
    }
}

/// What a change does.
pub enum Decision {
    /// It makes an entry; a `Delete` carries what it deletes.
    Apply {
        /// The deleted message, for a `Delete`.
        erased: Option<Target>,
    },
    /// It is in force already (a reaction added twice, or removed when not
    /// there): answered with the current state, no entry.
    Unchanged,
}

/// The request of an edit, delete or reaction, as both transports have it.
pub struct ChangeRequest {
    /// Its room.
    pub room: Arc<Room>,
    /// The changed message.
    pub seq: u64,
    /// What kind of change.
    pub kind: ChangeKind,
    /// The reaction key.
    pub key: String,
    /// The new content of an edit.
    pub text: String,
    /// The new data of an edit.
    pub data: bytes::Bytes,
    /// Idempotency key.
    pub client_msg_id: String,
}

impl Hub {
    /// Appends the change `req` by `author.sender` to its room, answering
    /// `author.publisher` like a publish.
    pub async fn change(
        &self,
        req: ChangeRequest,
        author: Author,
        still_allowed: impl Fn() -> bool,
    ) -> Result<(), Refusal> {
        let ChangeRequest { room, seq, kind, key, text, data, client_msg_id } = req;
        let reaction = matches!(kind, ChangeKind::ReactionAdd | ChangeKind::ReactionRemove);
        if reaction && (key.is_empty() || key.len() > MAX_REACTION_KEY || key.chars().any(char::is_control)) {
            let msg = format!("a reaction key is 1 to {MAX_REACTION_KEY} bytes, without control characters");
            return Err(Refusal::new(ErrorCode::BadRequest, msg));
        }
        let message = proto::Message {
            room: room.name.to_string(),
            sender: author.sender.to_string(),
            client_msg_id,
            text,
            data,
            change: Some(proto::MessageChange { target_seq: seq, kind: kind as i32, key: key.clone() }),
            ..Default::default()
        };
        let change = Change { target: seq, kind, key };
        self.append(&room, message, Kind::Change(change), author, still_allowed).await
    }

    /// Decides `change` by `user` against its target's state — the
    /// store's, or the one the changes on their way will leave — and
    /// returns that state too.
    pub(super) fn decide(
        &self,
        room: &Room,
        targets: &HashMap<u64, PendingTarget>,
        user: &Arc<str>,
        change: &Change,
    ) -> Result<(Decision, Target), Refusal> {
        let seq = change.target;
        let missing = || Refusal::new(ErrorCode::NotFound, format!("room {} has no message {seq}", room.name));
        if seq == 0 || seq > room.head() {
            return Err(missing());
        }
        let state = match targets.get(&seq) {
            Some(t) => t.state.clone(),
            None => self.store.target(room.id, seq)?.ok_or_else(missing)?,
        };
        if state.is_change {
            return Err(Refusal::new(ErrorCode::BadRequest, format!("{seq} is a change entry, not a message")));
        }
        if state.deleted {
            return Err(Refusal::new(ErrorCode::NotFound, format!("message {seq} was deleted")));
        }
        let own = *state.sender == **user;
        let decision = match change.kind {
            ChangeKind::Edit if !own => {
                return Err(Refusal::new(ErrorCode::Forbidden, "only its sender may edit a message"));
            }
            ChangeKind::Edit => Decision::Apply { erased: None },
            ChangeKind::Delete => {
                let role = room.gov().role_of(user);
                if !own && !matches!(role, Role::Admin | Role::Owner) {
                    let msg = "only its sender or a room admin may delete a message";
                    return Err(Refusal::new(ErrorCode::Forbidden, msg));
                }
                Decision::Apply { erased: Some(state.clone()) }
            }
            ChangeKind::ReactionAdd | ChangeKind::ReactionRemove => {
                let add = change.kind == ChangeKind::ReactionAdd;
                let pair = (change.key.clone(), user.clone());
                let reacted = match targets.get(&seq).and_then(|t| t.reacted.get(&pair)) {
                    Some(r) => *r,
                    None => self.store.has_reaction(room.id, seq, &change.key, user)?,
                };
                if reacted == add {
                    return Ok((Decision::Unchanged, state));
                }
                let max = self.limits.max_reaction_keys;
                if add && !state.keys.iter().any(|(k, _)| *k == change.key) && state.keys.len() >= max {
                    let msg = format!("message {seq} has {max} different reactions, the most it may have");
                    return Err(Refusal::new(ErrorCode::Conflict, msg));
                }
                Decision::Apply { erased: None }
            }
            ChangeKind::Unspecified => return Err(Refusal::new(ErrorCode::BadRequest, "a change needs a kind")),
        };
        Ok((decision, state))
    }
}

/// Notes the change `seq` among those on their way, as the state its
/// target will have once it is committed.
pub(super) fn note(
    targets: &mut HashMap<u64, PendingTarget>,
    change: &Change,
    user: &Arc<str>,
    seq: u64,
    state: Target,
) {
    let t =
        targets.entry(change.target).or_insert_with(|| PendingTarget { state, reacted: HashMap::new(), last_seq: 0 });
    t.last_seq = seq;
    match change.kind {
        ChangeKind::Delete => {
            t.state.deleted = true;
            t.state.keys.clear();
            t.reacted.clear();
        }
        ChangeKind::ReactionAdd | ChangeKind::ReactionRemove => {
            let add = change.kind == ChangeKind::ReactionAdd;
            t.reacted.insert((change.key.clone(), user.clone()), add);
            let keys = &mut t.state.keys;
            match keys.iter().position(|(k, _)| *k == change.key) {
                Some(i) if add => keys[i].1 += 1,
                Some(i) => {
                    keys[i].1 = keys[i].1.saturating_sub(1);
                    if keys[i].1 == 0 {
                        keys.remove(i);
                    }
                }
                None if add => keys.push((change.key.clone(), 1)),
                None => {}
            }
        }
        _ => {}
    }
}
