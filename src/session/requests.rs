//! One handler per request type (proto/README.md, §4 "Messages, one by one").

use std::sync::Arc;

use prost::Message as _;

use super::{Flow, Session, State, error_frame};
use crate::codec::encode_frame;
use crate::delivery::Frame;
use crate::hub::changes::ChangeRequest;
use crate::hub::publish::Author;
use crate::hub::rooms::{Actor, Origin};
use crate::hub::{Refusal, UserEntry};
use crate::pipeline::Publisher;
use crate::proto::{self, Body, ChangeKind, CloseReason, Envelope, ErrorCode, PROTOCOL_VERSION};
use crate::room::{Room, valid_room_name};
use crate::store::ReadMarker;
use crate::store::commit::Write;

/// Most bytes in a `client_msg_id`.
const MAX_CLIENT_MSG_ID: usize = 128;

type Reply = Result<Option<Body>, Refusal>;

impl Session {
    pub(super) async fn hello(&mut self, id: u64, h: proto::Hello) -> Flow {
        let mut departed = Vec::new();
        let flow = self.start(id, h, &mut departed);
        let State::Ready { user, .. } = &self.state else { return flow };
        let user = user.clone();
        for room in departed {
            let frame = match self.hub.departed(&user, &room).await {
                Ok(left) => encode_frame(&Envelope::push(Body::Left(left))),
                Err(Refusal { code, message }) => error_frame(0, code, format!("resume of {room}: {message}")),
            };
            let _ = self.handle.outbound.push(frame);
        }
        flow
    }

    /// `Hello`'s answer, but for the resume cursors of rooms the user no
    /// longer belongs to, which are left in `departed` (their `Left` reads
    /// the store).
    fn start(&mut self, id: u64, h: proto::Hello, departed: &mut Vec<String>) -> Flow {
        if h.protocol_version != PROTOCOL_VERSION {
            let msg = format!(
                "protocol_version {} is not supported; this server speaks {PROTOCOL_VERSION}",
                h.protocol_version
            );
            self.hub.metrics.error(ErrorCode::UnsupportedVersion);
            let _ = self.handle.outbound.push(error_frame(id, ErrorCode::UnsupportedVersion, msg));
            self.handle.outbound.close_with(None);
            self.state = State::Closed;
            return Flow::Close;
        }
        let claims = match self.hub.auth.verify(&h.token, crate::auth::unix_now()) {
            Ok(c) => c,
            Err(e) => {
                static FAILED: crate::logs::Throttle = crate::logs::Throttle::new(1000);
                if let Some(suppressed) = FAILED.allow() {
                    tracing::info!(error = %e, suppressed, "authentication failed");
                }
                return self.refuse(id, ErrorCode::Unauthenticated, CloseReason::AuthFailed, e.to_string());
            }
        };
        let user: Arc<str> = claims.sub.into();
        self.handle.set_identity(user.clone(), &h.device);
        tracing::Span::current().record("user", &*user);
        let entry = self.hub.user(&user);
        let limits = &self.hub.limits;

        // Registration, the room snapshot and the subscriptions happen under
        // the user's lock, so a concurrent join or leave by another session
        // of this user is seen either entirely or not at all.
        let mut st = entry.lock();
        // Under the user's lock, where a sign-out closes the sessions: a
        // session either sees the revocation here or is closed by it.
        if self.hub.is_revoked(&user, claims.iat) {
            drop(st);
            let msg = "this token was revoked (signed out everywhere); sign in again".to_string();
            return self.refuse(id, ErrorCode::Unauthenticated, CloseReason::AuthFailed, msg);
        }
        if st.sessions.len() >= limits.max_sessions_per_user {
            drop(st);
            let msg = format!("user already has {} sessions open", limits.max_sessions_per_user);
            return self.refuse(id, ErrorCode::ServerBusy, CloseReason::Capacity, msg);
        }
        st.sessions.push(self.handle.clone());
        let mut rooms: Vec<proto::RoomState> = Vec::with_capacity(st.rooms.len());
        let mut subscribe = Vec::with_capacity(st.rooms.len());
        for room in st.rooms.values() {
            let head = room.head();
            let read = st.read.get(&room.id).copied().unwrap_or_default();
            let (unread, mentions) = self.hub.unread(room, &user, &read, head);
            rooms.push(proto::RoomState {
                room: room.name.to_string(),
                head_seq: head,
                read_seq: read.seq,
                info: Some(room.gov().info(&room.name, &user)),
                unread,
                mentions,
            });
            subscribe.push((room.clone(), head));
        }
        rooms.sort_by(|a, b| a.room.cmp(&b.room));
        let mut invites: Vec<proto::Invitation> = st
            .invited
            .values()
            .filter_map(|room| {
                let g = room.gov();
                g.invites().get(&*user).map(|i| proto::Invitation {
                    room: room.name.to_string(),
                    by: i.by.clone(),
                    ts_ms: i.ts_ms,
                    info: Some(g.info_as(&room.name, proto::Role::Unspecified)),
                })
            })
            .collect();
        invites.sort_by(|a, b| a.room.cmp(&b.room));
        let mut welcome = proto::Welcome {
            user: user.to_string(),
            session_id: format!("s{}", self.handle.id),
            protocol_version: PROTOCOL_VERSION,
            rooms,
            // A client pinging at this interval must never look idle.
            heartbeat_ms: limits.heartbeat.min(limits.idle_timeout / 2).as_millis() as u32,
            max_frame_bytes: limits.max_frame_bytes as u32,
            server: self.hub.server_name.clone(),
            invites,
        };
        // Welcome must fit the frame size it announces: invitations that do
        // not fit follow it as pushes, then topics, then whole room details
        // are left out (GetRoom has them).
        let budget = limits.max_frame_bytes.saturating_sub(512);
        let mut spilled = Vec::new();
        if welcome.encoded_len() > budget {
            spilled = std::mem::take(&mut welcome.invites);
        }
        if welcome.encoded_len() > budget {
            welcome.rooms.iter_mut().filter_map(|r| r.info.as_mut()).for_each(|i| i.topic.clear());
        }
        if welcome.encoded_len() > budget {
            welcome.rooms.iter_mut().for_each(|r| r.info = None);
        }
        let _ = self.handle.outbound.push(encode_frame(&Envelope::new(id, Body::Welcome(welcome))));
        for invitation in spilled {
            let _ = self.handle.outbound.push(encode_frame(&Envelope::push(Body::Invitation(invitation))));
        }

        let mut problems = Vec::new();
        for c in &h.resume {
            match subscribe.iter_mut().find(|(r, _)| *r.name == *c.room) {
                Some((room, from)) => {
                    // Resumed rooms replay from the cursor and end with Synced;
                    // the replay is bounded (proto/README.md, §6 "Guarantees").
                    let head = room.head();
                    let after = c.after_seq.min(head);
                    let start = after.max(head.saturating_sub(limits.replay_limit));
                    let complete = start == after && self.hub.cluster().is_none_or(|c| c.complete_after(room, after));
                    room.subscribe_from(&self.handle, start, Some(complete));
                    *from = u64::MAX;
                }
                None if !valid_room_name(&c.room) => {
                    problems.push((ErrorCode::BadRequest, format!("resume: invalid room name {:?}", c.room)))
                }
                // Answered below with how the membership ended (a store
                // read, not under the user's lock).
                None => departed.push(c.room.clone()),
            }
        }
        for (room, from) in subscribe {
            if from != u64::MAX {
                room.subscribe_from(&self.handle, from, None);
            }
        }
        // The user's first connection online: tell the rooms.
        if st.sessions.len() == 1 {
            self.hub.session_presence(st.rooms.values().cloned().collect(), &user, 1, Some(self.handle.id));
        }
        drop(st);
        for (code, msg) in problems {
            let _ = self.handle.outbound.push(error_frame(0, code, msg));
        }
        tracing::info!(session = self.handle.id, user = %user, transport = self.transport, device = %h.device, "session started");
        self.hub.metrics.sessions.increment(1.0);
        self.state = State::Ready { user, entry, token_exp: claims.exp };
        Flow::Continue
    }

    pub(super) async fn request(&mut self, id: u64, body: Body) -> Flow {
        let State::Ready { user, entry, .. } = &self.state else {
            return Flow::Close;
        };
        let (user, entry) = (user.clone(), entry.clone());
        let name = body.name();
        let room_name = match &body {
            Body::Join(b) => Some(b.room.clone()),
            Body::Leave(b) => Some(b.room.clone()),
            Body::Publish(b) => Some(b.room.clone()),
            Body::History(b) => Some(b.room.clone()),
            Body::MarkRead(b) => Some(b.room.clone()),
            Body::Typing(b) => Some(b.room.clone()),
            Body::Edit(b) => Some(b.room.clone()),
            Body::Delete(b) => Some(b.room.clone()),
            Body::React(b) => Some(b.room.clone()),
            _ => None,
        };
        let hub = &*self.hub;
        // Held through the request: the room is not evicted meanwhile.
        let _pinned = match &room_name {
            Some(name) => match hub.cluster_use(name, Some(&entry)).await {
                Ok(pinned) => pinned,
                Err(Refusal { code, message }) => return self.reject(id, code, message),
            },
            None => None,
        };
        let actor = &Actor::User(user.clone());
        let info = |r: Result<proto::RoomInfo, Refusal>| r.map(|i| Some(Body::RoomInfo(i)));
        let reply = match body {
            Body::Join(j) => {
                let origin = Origin { session: &self.handle, request: id };
                hub.join(&user, &entry, &j.room, Some(origin)).await.map(|()| None)
            }
            Body::Leave(l) => {
                hub.leave(&user, &entry, &l.room, Some(self.handle.id)).await.map(|l| Some(Body::Left(l)))
            }
            Body::CreateRoom(c) => info(hub.create_room(actor, c, None).await),
            Body::UpdateRoom(u) => info(hub.update_room(actor, u).await),
            Body::GetRoom(g) => info(hub.get_room(actor, &g.room)),
            Body::Invite(i) => info(hub.invite(actor, &i.room, &i.user).await),
            Body::DeclineInvite(d) => info(hub.decline(&user, &entry, &d.room).await),
            Body::RemoveMember(r) => info(hub.remove(actor, &r.room, &r.user, &r.reason, false).await),
            Body::Ban(b) => info(hub.remove(actor, &b.room, &b.user, &b.reason, true).await),
            Body::Unban(u) => info(hub.unban(actor, &u.room, &u.user, &u.reason).await),
            Body::SetRole(r) => info(hub.set_role(actor, &r.room, &r.user, r.role).await),
            Body::ListMembers(l) => hub.list_members(actor, &l).map(|p| Some(Body::MemberPage(p))),
            Body::ListRooms(l) => hub.list_rooms(&user, &l).map(|p| Some(Body::RoomList(p))),
            Body::Publish(p) => self.publish(id, &user, &entry, p).await,
            Body::Edit(e) => {
                let (room, seq, cmid) = (e.room, e.seq, e.client_msg_id);
                self.change(id, &user, &entry, &room, seq, ChangeKind::Edit, String::new(), (e.text, e.data), cmid)
                    .await
            }
            Body::Delete(d) => {
                let (room, seq, cmid) = (d.room, d.seq, d.client_msg_id);
                self.change(id, &user, &entry, &room, seq, ChangeKind::Delete, String::new(), Default::default(), cmid)
                    .await
            }
            Body::React(r) => {
                let kind = if r.add { ChangeKind::ReactionAdd } else { ChangeKind::ReactionRemove };
                let (room, seq, cmid) = (r.room, r.seq, r.client_msg_id);
                self.change(id, &user, &entry, &room, seq, kind, r.key, Default::default(), cmid).await
            }
            Body::History(h) => self.history(id, &user, &entry, h),
            Body::MarkRead(m) => self.mark_read(&user, &entry, m).await,
            Body::Typing(t) => self.typing(&user, &entry, t),
            Body::Ping(p) => Ok(Some(Body::Pong(proto::Pong { nonce: p.nonce }))),
            Body::Pong(_) => Ok(None),
            Body::Hello(_) => Err(Refusal::new(ErrorCode::BadRequest, "hello was already accepted")),
            other => Err(Refusal::new(ErrorCode::BadRequest, format!("{} is not a request", other.name()))),
        };
        match reply {
            Ok(Some(body)) => {
                let _ = self.handle.outbound.push(encode_frame(&Envelope::new(id, body)));
                Flow::Continue
            }
            Ok(None) => Flow::Continue,
            Err(Refusal { code, message }) => {
                if let Some(room) = room_name.as_deref().and_then(|n| self.hub.room(n)) {
                    room.stats.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                tracing::debug!(session = self.handle.id, user = %user, request = id, kind = name, ?code, %message, "request refused");
                self.reject(id, code, message)
            }
        }
    }

    /// Checks a room name and that `entry`'s user is a member.
    fn member_room(&self, entry: &UserEntry, name: &str) -> Result<Arc<Room>, Refusal> {
        if !valid_room_name(name) {
            return Err(Refusal::new(ErrorCode::BadRequest, format!("invalid room name {name:?}")));
        }
        self.hub
            .room(name)
            .filter(|r| entry.lock().rooms.contains_key(&r.id))
            .ok_or_else(|| Refusal::new(ErrorCode::Forbidden, format!("not a member of room {name}")))
    }

    async fn publish(&self, id: u64, user: &Arc<str>, entry: &Arc<UserEntry>, p: proto::Publish) -> Reply {
        let received = std::time::Instant::now();
        let room = self.member_room(entry, &p.room)?;
        let author = self.author(id, entry, &p.client_msg_id, user, received).await?;
        let still_member = || entry.lock().rooms.contains_key(&room.id);
        self.hub.publish(&room, p, author, still_member).await?;
        Ok(None)
    }

    /// An `Edit`, `Delete` or `React`: appended like a publish, under the
    /// same limits.
    #[allow(clippy::too_many_arguments)]
    async fn change(
        &self,
        id: u64,
        user: &Arc<str>,
        entry: &Arc<UserEntry>,
        room: &str,
        seq: u64,
        kind: ChangeKind,
        key: String,
        (text, data): (String, bytes::Bytes),
        client_msg_id: String,
    ) -> Reply {
        let received = std::time::Instant::now();
        let room = self.member_room(entry, room)?;
        let author = self.author(id, entry, &client_msg_id, user, received).await?;
        let still_member = || entry.lock().rooms.contains_key(&room.id);
        let req = ChangeRequest { room: room.clone(), seq, kind, key, text, data, client_msg_id };
        self.hub.change(req, author, still_member).await?;
        Ok(None)
    }

    /// The checks every new log entry of a session passes — its key, the
    /// store, the rate limit — and the slot of its in-flight entries.
    async fn author(
        &self,
        id: u64,
        entry: &Arc<UserEntry>,
        client_msg_id: &str,
        user: &Arc<str>,
        received: std::time::Instant,
    ) -> Result<Author, Refusal> {
        if client_msg_id.len() > MAX_CLIENT_MSG_ID {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                format!("client_msg_id is longer than {MAX_CLIENT_MSG_ID} bytes"),
            ));
        }
        if self.hub.pipeline.commits.has_failed() {
            return Err(Refusal::new(ErrorCode::ServerBusy, "storage is unavailable; the message was not stored"));
        }
        if !self.hub.take_publish_token(entry) {
            self.hub.metrics.rate_limited("publish");
            let rate = self.hub.limits.publish_rate_per_min;
            return Err(Refusal::new(
                ErrorCode::RateLimited,
                format!("publish rate limit ({rate} per minute) exceeded"),
            ));
        }
        // A slot of the session's in-flight publishes (the hub takes a
        // commit-queue slot) before the idempotency key goes in flight.
        let inflight = self
            .handle
            .inflight
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Refusal::new(ErrorCode::ServerBusy, "closing"))?;
        Ok(Author {
            sender: user.clone(),
            publisher: Publisher::Session(self.handle.clone(), id),
            permit: Some(inflight),
            received,
        })
    }

    fn history(&self, id: u64, user: &str, entry: &UserEntry, h: proto::History) -> Reply {
        let room = self.member_room(entry, &h.room)?;
        let page = self.hub.history_page(&room, &h, user)?;
        // Queued under the user's lock, where a removal takes the room and
        // queues `Left`: a removal while the page was read refuses it, and
        // no page follows a `Left`.
        let st = entry.lock();
        if !st.rooms.contains_key(&room.id) {
            return Err(Refusal::new(ErrorCode::Forbidden, format!("not a member of room {}", room.name)));
        }
        let _ = self.handle.outbound.push(encode_frame(&Envelope::new(id, Body::HistoryPage(page))));
        Ok(None)
    }

    async fn mark_read(&self, user: &Arc<str>, entry: &Arc<UserEntry>, m: proto::MarkRead) -> Reply {
        let room = self.member_room(entry, &m.room)?;
        let seq = m.seq.min(room.head());
        let current = entry.lock().read.get(&room.id).map_or(0, |p| p.seq);
        if seq <= current {
            return Ok(Some(Body::ReadReceipt(proto::ReadReceipt {
                room: m.room,
                user: user.to_string(),
                seq: current,
            })));
        }
        let pos = self.hub.read_pos(&room, user, seq)?;
        self.hub.commit(Write::ReadMarker(ReadMarker { user: user.to_string(), room: room.id, pos })).await?;
        let moved = {
            let mut st = entry.lock();
            let marker = st.read.get_or_insert(room.id, Default::default());
            let moved = seq > marker.seq;
            if moved {
                *marker = pos;
            }
            moved.then_some(marker.seq)
        };
        let receipt =
            proto::ReadReceipt { room: m.room, user: user.to_string(), seq: moved.unwrap_or(current).max(seq) };
        if moved.is_some() {
            let frame = encode_frame(&Envelope::push(Body::ReadReceipt(receipt.clone())));
            room.broadcast_ephemeral(&Frame::shared(frame.clone()), Some(self.handle.id));
            if let Some(c) = self.hub.cluster() {
                c.share_ephemeral(&room, frame);
            }
        }
        Ok(Some(Body::ReadReceipt(receipt)))
    }

    fn typing(&mut self, user: &Arc<str>, entry: &UserEntry, t: proto::Typing) -> Reply {
        let room = self.member_room(entry, &t.room)?;
        // Clients refresh the indicator every few seconds; a flood is refused.
        if !self.take_typing_token() {
            self.hub.metrics.rate_limited("typing");
            return Err(Refusal::new(ErrorCode::RateLimited, "typing updates are limited to 4 per second"));
        }
        self.hub.typing(&room, user, t.active, Some(self.handle.id));
        Ok(None)
    }
}
