//! Message changes as a client sees them (proto/README.md, §9): the
//! requests (`Client::edit`, `delete`, `react`, `reply`), a typed view of a
//! log entry ([`Entry::of`]), and applying a change entry to a local copy
//! of its target ([`apply`]), skipping what the copy already folds in.

use bytes::Bytes;
use chatd::proto::{self, Body, ChangeKind};

use crate::{Client, ClientError};

/// What a log entry is.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry<'a> {
    /// A message (possibly a reply, possibly mentioning users).
    Message(&'a proto::Message),
    /// `by` replaced the content of `target`.
    Edit { target: u64, by: &'a str, text: &'a str, data: &'a Bytes },
    /// `by` deleted `target`.
    Delete { target: u64, by: &'a str },
    /// `by` added (or took back) the reaction `key` on `target`.
    Reaction { target: u64, by: &'a str, key: &'a str, add: bool },
}

impl<'a> Entry<'a> {
    /// The typed view of `m`.
    pub fn of(m: &'a proto::Message) -> Entry<'a> {
        let Some(c) = &m.change else { return Entry::Message(m) };
        let (target, by) = (c.target_seq, m.sender.as_str());
        match c.kind() {
            ChangeKind::Edit => Entry::Edit { target, by, text: &m.text, data: &m.data },
            ChangeKind::Delete => Entry::Delete { target, by },
            ChangeKind::ReactionAdd => Entry::Reaction { target, by, key: &c.key, add: true },
            ChangeKind::ReactionRemove => Entry::Reaction { target, by, key: &c.key, add: false },
            // A kind this client does not know: shown as nothing.
            ChangeKind::Unspecified => Entry::Message(m),
        }
    }
}

/// Applies the change entry `change` to `target` (a local copy of the
/// message it changes), as user `me` sees it. Returns false when there is
/// nothing to apply: not a change of `target`, or already folded into it
/// (`change.seq <= target.folded_seq`).
pub fn apply(target: &mut proto::Message, change: &proto::Message, me: &str) -> bool {
    let Some(c) = &change.change else { return false };
    if c.target_seq != target.seq || change.seq <= target.folded_seq {
        return false;
    }
    target.folded_seq = change.seq;
    match c.kind() {
        ChangeKind::Edit if !target.deleted => {
            target.text = change.text.clone();
            target.data = change.data.clone();
            target.edited_ms = change.ts_ms;
        }
        ChangeKind::Delete => {
            target.deleted = true;
            target.text.clear();
            target.data = Bytes::new();
            target.reactions.clear();
        }
        ChangeKind::ReactionAdd if !target.deleted => {
            let r = match target.reactions.iter().position(|r| r.key == c.key) {
                Some(i) => &mut target.reactions[i],
                None => {
                    target.reactions.push(proto::Reaction { key: c.key.clone(), ..Default::default() });
                    target.reactions.last_mut().expect("pushed")
                }
            };
            r.count += 1;
            if r.users.len() < 20 {
                r.users.push(change.sender.clone());
            }
            r.mine |= change.sender == me;
        }
        ChangeKind::ReactionRemove => {
            if let Some(i) = target.reactions.iter().position(|r| r.key == c.key) {
                let r = &mut target.reactions[i];
                r.count = r.count.saturating_sub(1);
                r.users.retain(|u| *u != change.sender);
                if change.sender == me {
                    r.mine = false;
                }
                if r.count == 0 {
                    target.reactions.remove(i);
                }
            }
        }
        _ => {}
    }
    true
}

impl Client {
    async fn change(&self, body: Body) -> Result<proto::PublishAck, ClientError> {
        match self.request(body).await? {
            Body::PublishAck(a) => Ok(a),
            _ => Err(ClientError::Unexpected("a change expects publish_ack")),
        }
    }

    /// Replaces the text of this user's message `seq`.
    pub async fn edit(&self, room: &str, seq: u64, text: &str) -> Result<proto::PublishAck, ClientError> {
        let client_msg_id = self.next_client_msg_id();
        let e = proto::Edit { room: room.into(), seq, client_msg_id, text: text.into(), data: Bytes::new() };
        self.change(Body::Edit(e)).await
    }

    /// Deletes message `seq` (this user's own, or any as a room admin).
    pub async fn delete(&self, room: &str, seq: u64) -> Result<proto::PublishAck, ClientError> {
        let client_msg_id = self.next_client_msg_id();
        self.change(Body::Delete(proto::Delete { room: room.into(), seq, client_msg_id })).await
    }

    /// Adds (or with `add = false` takes back) this user's reaction `key`
    /// on message `seq`. When it is in force already the ack says
    /// `duplicate` and names `seq` itself.
    pub async fn react(&self, room: &str, seq: u64, key: &str, add: bool) -> Result<proto::PublishAck, ClientError> {
        let client_msg_id = self.next_client_msg_id();
        self.change(Body::React(proto::React { room: room.into(), seq, key: key.into(), add, client_msg_id })).await
    }

    /// Publishes `text` as a reply to message `seq`, mentioning `mentions`.
    pub async fn reply(
        &self,
        room: &str,
        seq: u64,
        text: &str,
        mentions: &[&str],
    ) -> Result<proto::PublishAck, ClientError> {
        self.publish_message(proto::Publish {
            room: room.into(),
            client_msg_id: self.next_client_msg_id(),
            text: text.into(),
            reply_to: seq,
            mentions: mentions.iter().map(|m| m.to_string()).collect(),
            ..Default::default()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(seq: u64, sender: &str, target: u64, kind: ChangeKind, key: &str) -> proto::Message {
        let change = Some(proto::MessageChange { target_seq: target, kind: kind as i32, key: key.into() });
        proto::Message { seq, sender: sender.into(), change, ..Default::default() }
    }

    #[test]
    fn changes_apply_once_and_in_order() {
        let mut m = proto::Message { seq: 1, sender: "ann".into(), text: "hi".into(), ..Default::default() };
        assert!(apply(&mut m, &change(2, "bob", 1, ChangeKind::ReactionAdd, "👍"), "ann"));
        assert!(!apply(&mut m, &change(2, "bob", 1, ChangeKind::ReactionAdd, "👍"), "ann"), "a replay");
        assert!(apply(&mut m, &change(3, "ann", 1, ChangeKind::ReactionAdd, "👍"), "ann"));
        assert_eq!((m.reactions[0].count, m.reactions[0].mine), (2, true));
        let mut edit = change(4, "ann", 1, ChangeKind::Edit, "");
        edit.text = "hello".into();
        assert!(apply(&mut m, &edit, "ann"));
        assert_eq!(m.text, "hello");
        assert!(!apply(&mut m, &change(5, "ann", 9, ChangeKind::Delete, ""), "ann"), "another target");
        assert!(apply(&mut m, &change(6, "ann", 1, ChangeKind::Delete, ""), "ann"));
        assert!(m.deleted && m.text.is_empty() && m.reactions.is_empty());
        assert_eq!(Entry::of(&edit), Entry::Edit { target: 1, by: "ann", text: "hello", data: &Bytes::new() });
    }
}
