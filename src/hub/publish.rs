//! Storing a message: what a session's `Publish` and the server API's post
//! share once the request is accepted — a commit-queue slot, the
//! idempotency check, the seq, the append — so both have the same
//! durability and the same answer to a retry (ARCHITECTURE.md, "Data
//! path").

use std::sync::Arc;

use prost::Message as _;
use tokio::sync::OwnedSemaphorePermit;

use super::{Hub, Refusal};
use crate::pipeline::{Completion, PublishDone, Publisher};
use crate::proto::{self, ErrorCode};
use crate::room::Room;
use crate::store::commit::{Pending, Write};
use crate::store::{Append, Entry};
use crate::time::now_ms;

/// Bytes of an envelope around a pushed `Message` (its tag and length).
const ENVELOPE_OVERHEAD: usize = 8;

/// Who publishes, and what their answer needs.
pub struct Author {
    /// The sender's user id ("" for the system).
    pub sender: Arc<str>,
    /// Who is answered.
    pub publisher: Publisher,
    /// A slot of a session's in-flight publishes, released with the ack.
    pub permit: Option<OwnedSemaphorePermit>,
    /// When the request was read, for the latency histograms.
    pub received: std::time::Instant,
}

/// The outcome of looking up an idempotency key.
enum IdemCheck {
    /// New: go ahead and append; the key is now in flight.
    Fresh(Publisher),
    /// The same key is being committed; the publisher is answered when it is.
    InFlight,
    /// Already stored: answer with this room, seq and timestamp.
    Stored(Arc<Room>, u64, u64, Publisher),
}

/// Most user ids one message may mention.
pub const MAX_MENTIONS: usize = 50;

/// What a new entry is, as the hub appends it.
pub(super) enum Kind {
    /// A message.
    Message,
    /// A change, validated against its target under the room's pending
    /// lock ([`super::changes`]).
    Change(super::changes::Change),
}

impl Hub {
    /// Appends `p` to `room` as `author.sender` and answers
    /// `author.publisher` once it is durable and offered to the room — or, for a
    /// `client_msg_id` already used, with the original's seq. `still_allowed`
    /// is asked again after the waits (a removal may have been answered
    /// meanwhile). `Err` only before anything was queued.
    pub async fn publish(
        &self,
        room: &Arc<Room>,
        p: proto::Publish,
        author: Author,
        still_allowed: impl Fn() -> bool,
    ) -> Result<(), Refusal> {
        if p.reply_to > room.head() {
            let msg = format!("reply_to {} is not a message of room {}", p.reply_to, room.name);
            return Err(Refusal::new(ErrorCode::BadRequest, msg));
        }
        let mentions = mentions(p.mentions)?;
        // The request names the room (a session's by the name it looked up).
        let name = if p.room == *room.name { p.room } else { room.name.to_string() };
        let message = proto::Message {
            room: name,
            sender: author.sender.to_string(),
            client_msg_id: p.client_msg_id,
            text: p.text,
            data: p.data,
            reply_to: p.reply_to,
            mentions,
            ..Default::default()
        };
        self.append(room, message, Kind::Message, author, still_allowed).await
    }

    /// The path every new entry of a log takes: the frame-size check, a
    /// commit-queue slot, the idempotency check, the seq, the append.
    pub(super) async fn append(
        &self,
        room: &Arc<Room>,
        mut message: proto::Message,
        kind: Kind,
        author: Author,
        still_allowed: impl Fn() -> bool,
    ) -> Result<(), Refusal> {
        let Author { sender, publisher, permit, received } = author;
        let sender = &sender;
        // The message as delivered must fit the frame size clients were
        // promised (the request's frame did not hold the room's name when
        // it came through the server API, nor the sender, seq and time).
        message.seq = u64::MAX;
        message.ts_ms = u64::MAX;
        let max = self.limits.max_frame_bytes;
        if message.encoded_len() + ENVELOPE_OVERHEAD > max {
            return Err(Refusal::new(ErrorCode::TooLarge, format!("the message would exceed max_frame_bytes ({max})")));
        }
        // The system's keys are its own per room: one window per room, and
        // a key reused in another room is a new message there.
        let key_owner: Arc<str> = match crate::store::idempotency_owner(sender, &room.name) {
            std::borrow::Cow::Borrowed(_) => sender.clone(),
            std::borrow::Cow::Owned(owner) => owner.into(),
        };
        let commits = &self.pipeline.commits;
        // The commit-queue slot is taken before the idempotency key goes
        // in flight, so nothing below can wait. A cluster node appends in
        // Redis instead (`cluster`).
        let slot = match &self.cluster {
            Some(c) => Err(c.clone()),
            None => Ok(commits
                .reserve()
                .await
                .ok_or_else(|| Refusal::new(ErrorCode::ServerBusy, "server is shutting down"))?),
        };
        if !still_allowed() {
            return Err(Refusal::new(ErrorCode::Forbidden, format!("not a member of room {}", room.name)));
        }
        let client_msg_id = message.client_msg_id.clone();
        let publisher = if client_msg_id.is_empty() {
            publisher
        } else {
            match self.check_idempotent(&key_owner, &client_msg_id, publisher)? {
                IdemCheck::Fresh(publisher) => publisher,
                IdemCheck::InFlight => return Ok(()),
                IdemCheck::Stored(room, seq, ts_ms, publisher) => {
                    self.metrics.duplicates.increment(1);
                    let ack =
                        proto::PublishAck { room: room.name.to_string(), seq, ts_ms, client_msg_id, duplicate: true };
                    publisher.ack(ack);
                    return Ok(());
                }
            }
        };
        let slot = match slot {
            Ok(slot) => slot,
            Err(c) => {
                let author = Author { sender: sender.clone(), publisher, permit, received };
                return self.append_in_cluster(&c, room, message, kind, &key_owner, author).await;
            }
        };
        let ts_ms = now_ms();
        let epoch = commits.epoch();
        let submit = |seq: u64, message: &mut proto::Message, entry, erased, publisher| {
            message.seq = seq;
            message.ts_ms = ts_ms;
            let encoded = bytes::Bytes::from(message.encode_to_vec());
            slot.send(Pending {
                write: Write::Append(Append {
                    room: room.id,
                    seq,
                    message: encoded.clone(),
                    sender: key_owner.to_string(),
                    client_msg_id: client_msg_id.clone(),
                    ts_ms,
                    entry: Clone::clone(&entry),
                }),
                completion: Completion::Publish(Box::new(PublishDone {
                    room: room.clone(),
                    seq,
                    ts_ms,
                    message: encoded,
                    publisher: Some(publisher),
                    claims: None,
                    client_msg_id: client_msg_id.clone(),
                    sender: key_owner.clone(),
                    permit,
                    received,
                    entry,
                    erased,
                })),
                epoch,
            });
        };
        match kind {
            Kind::Message => {
                let entry = Entry::Message { user: sender.clone(), mentions: message.mentions.clone() };
                room.assign_seq(epoch, |seq| submit(seq, &mut message, entry, None, publisher));
                Ok(())
            }
            Kind::Change(change) => {
                let mut pending = room.pending();
                let targets = pending.targets(epoch);
                match self.decide(room, targets, sender, &change) {
                    Ok((super::changes::Decision::Apply { erased }, state)) => {
                        let entry = change.entry(sender);
                        room.assign_seq(epoch, |seq| {
                            super::changes::note(targets, &change, sender, seq, state);
                            let erased = erased.map(|t| Box::new((Arc::from(t.sender), t.mentions)));
                            submit(seq, &mut message, entry, erased, publisher)
                        });
                        Ok(())
                    }
                    Ok((super::changes::Decision::Unchanged, _)) => {
                        drop(pending);
                        self.unchanged(room, change.target, &key_owner, &client_msg_id, publisher);
                        Ok(())
                    }
                    Err(refusal) => {
                        drop(pending);
                        for w in self.release_key(&key_owner, &client_msg_id) {
                            w.fail(refusal.message.clone());
                        }
                        Err(refusal)
                    }
                }
            }
        }
    }

    /// [`Hub::append`] on a cluster node: a change is decided against the
    /// room's replica here, then the entry is appended in Redis, which
    /// gives it its seq (`cluster`).
    async fn append_in_cluster(
        &self,
        c: &Arc<super::cluster::Cluster>,
        room: &Arc<Room>,
        mut message: proto::Message,
        kind: Kind,
        key_owner: &Arc<str>,
        author: Author,
    ) -> Result<(), Refusal> {
        let client_msg_id = message.client_msg_id.clone();
        let mut check = None;
        if let Kind::Change(change) = kind {
            // A target published through another node a moment ago may
            // not be here yet.
            if change.target > room.head() {
                c.catch_up_to(room, change.target).await?;
            }
            let decision = {
                let mut pending = room.pending();
                let targets = pending.targets(self.pipeline.commits.epoch());
                self.decide(room, targets, &author.sender, &change).map(|(d, _)| d)
            };
            match decision {
                Ok(super::changes::Decision::Apply { .. }) => {
                    let key = &change.key;
                    check = Some(crate::store::redis::ChangeCheck::of(change.kind, change.target, &author.sender, key));
                }
                Ok(super::changes::Decision::Unchanged) => {
                    self.unchanged(room, change.target, key_owner, &client_msg_id, author.publisher);
                    return Ok(());
                }
                Err(refusal) => {
                    for w in self.release_key(key_owner, &client_msg_id) {
                        w.fail(refusal.message.clone());
                    }
                    return Err(refusal);
                }
            }
        }
        // The script adds both.
        message.seq = 0;
        message.ts_ms = 0;
        self.append_clustered(c, room, &message, key_owner, check, author)
    }

    /// Answers a change that is in force already (no entry): acked as a
    /// duplicate with its target's seq, and so are the retries that waited.
    fn unchanged(&self, room: &Room, target: u64, key_owner: &Arc<str>, client_msg_id: &str, publisher: Publisher) {
        let ack = proto::PublishAck {
            room: room.name.to_string(),
            seq: target,
            ts_ms: 0,
            client_msg_id: client_msg_id.to_string(),
            duplicate: true,
        };
        for w in self.release_key(key_owner, client_msg_id) {
            w.ack(ack.clone());
        }
        publisher.ack(ack);
    }

    /// Ends the flight of a key whose request stored nothing; returns the
    /// retries that waited for it.
    fn release_key(&self, owner: &Arc<str>, client_msg_id: &str) -> Vec<Publisher> {
        if client_msg_id.is_empty() {
            return Vec::new();
        }
        self.pipeline.in_flight.settle(owner, client_msg_id)
    }

    /// Checks an idempotency key before a publish. `Fresh` puts the key in
    /// flight: the caller must then append (the fan-out settles the key).
    fn check_idempotent(
        &self,
        sender: &Arc<str>,
        client_msg_id: &str,
        publisher: Publisher,
    ) -> Result<IdemCheck, crate::store::StoreError> {
        let key = (sender.clone(), client_msg_id.to_string());
        // The lookup runs under the in-flight lock: a key leaves the map only
        // after its message is stored, so it is always in one or the other.
        let mut map = self.pipeline.in_flight.lock();
        if let Some(waiters) = map.get_mut(&key) {
            waiters.push(publisher);
            return Ok(IdemCheck::InFlight);
        }
        if let Some(rec) = self.store.lookup_idempotent(sender, client_msg_id)?
            && let Some(room) = self.room_by_id(rec.room)
            && rec.seq <= room.head()
        {
            return Ok(IdemCheck::Stored(room, rec.seq, rec.ts_ms, publisher));
        }
        map.insert(key, Vec::new());
        Ok(IdemCheck::Fresh(publisher))
    }
}

/// Checks and deduplicates a message's mentions.
fn mentions(mut users: Vec<String>) -> Result<Vec<String>, Refusal> {
    if users.len() > MAX_MENTIONS {
        return Err(Refusal::new(ErrorCode::BadRequest, format!("at most {MAX_MENTIONS} mentions")));
    }
    if let Some(bad) = users.iter().find(|u| !crate::auth::valid_user_id(u)) {
        return Err(Refusal::new(ErrorCode::BadRequest, format!("mention {bad:?} is not a user id")));
    }
    let mut seen = std::collections::HashSet::new();
    users.retain(|u| seen.insert(u.clone()));
    Ok(users)
}
