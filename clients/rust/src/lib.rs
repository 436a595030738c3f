//! `chat-client`: an async Rust client for chatd.
//!
//! ```no_run
//! # async fn demo() -> Result<(), chat_client::ClientError> {
//! use chat_client::{Client, ClientConfig, Event};
//! let (client, mut events) = Client::connect(ClientConfig::new("127.0.0.1:7400", "TOKEN")).await?;
//! client.join("general").await?;
//! let ack = client.publish("general", "hello").await?;
//! println!("stored as #{}", ack.seq);
//! while let Some(event) = events.recv().await {
//!     if let Event::Message(m) = event {
//!         println!("[{} #{}] {}: {}", m.room, m.seq, m.sender, m.text);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! The connection runs in a background task ([`conn`]). If it drops, the
//! task reconnects with backoff and resumes every room from the last seq it
//! delivered (`Hello.resume`); requests still waiting for a reply are sent
//! again (a publish keeps its `client_msg_id`, so the server acks a retry of
//! a stored message as a duplicate instead of storing it twice). Messages
//! reach the application exactly once and in seq order per room
//! ([`cursor`]). It does not reconnect after `GoAway{AUTH_FAILED}` or
//! `GoAway{AUTH_EXPIRED}`: the same token would be refused, so pending
//! requests fail with [`ClientError::Closed`] and the event stream ends; the
//! application connects again with a fresh token, resuming from the
//! cursors it kept. Framing and the protocol types are chatd's own
//! (`chatd::codec`, `chatd::proto`).
//!
//! Rooms have kinds, members roles, and admins invite, remove and ban
//! (proto/README.md §8): there is a method for each of those requests
//! ([`Client::create_room`], [`Client::invite`], [`Client::ban`], …), the
//! pushes arrive as [`Event::Invitation`], [`Event::RoomUpdate`],
//! [`Event::Left`] and [`Event::Added`], and the client keeps the user's
//! rooms and pending invitations current ([`Client::rooms`],
//! [`Client::invites`], [`membership`]). A room the user left or was removed
//! or banned from is no longer resumed.

pub mod changes;
pub mod conn;
pub mod cursor;
pub mod membership;
#[cfg(feature = "tls")]
pub mod tls;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chatd::proto::{self, Body};
use tokio::sync::{mpsc, oneshot};

pub use chatd::proto as wire;

/// How to reach and identify with the server.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `host:port` of the native (TCP) listener.
    pub addr: String,
    /// JWT for `Hello.token`.
    pub token: String,
    /// Device label.
    pub device: String,
    /// Initial cursors (rooms the application already has up to a seq).
    pub resume: Vec<proto::Cursor>,
    /// Other nodes of the same chatd cluster: when `addr` cannot be
    /// reached (or is busy), reconnecting tries them in turn, then `addr`
    /// again. Resume works on any node of a cluster.
    pub fallback_addrs: Vec<String>,
    /// Reconnect when the connection drops (default true).
    pub reconnect: bool,
    /// Longest wait between reconnect attempts.
    pub max_backoff: Duration,
    /// Largest frame accepted from the server.
    pub max_frame_bytes: usize,
    /// Capacity of the event channel; a full channel stops reading from the
    /// server (the server then holds messages in its log for us).
    pub event_buffer: usize,
    /// Connect over TLS (the server's `--tls` port).
    pub tls: Option<TlsOptions>,
}

/// How to check the server's certificate.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// Trust only the certificates in this PEM file (a private CA, or the
    /// server's `--dev-tls` certificate); `None`: the system's roots.
    pub ca: Option<std::path::PathBuf>,
    /// Name to verify the certificate against; `None`: the host part of
    /// `addr` (an IP address is verified as an IP).
    pub server_name: Option<String>,
}

impl ClientConfig {
    /// Defaults for `addr` and `token`.
    pub fn new(addr: impl Into<String>, token: impl Into<String>) -> Self {
        ClientConfig {
            addr: addr.into(),
            token: token.into(),
            device: "rust".into(),
            resume: Vec::new(),
            fallback_addrs: Vec::new(),
            reconnect: true,
            max_backoff: Duration::from_secs(5),
            max_frame_bytes: proto::DEFAULT_MAX_FRAME_BYTES,
            event_buffer: 65536,
            tls: None,
        }
    }
}

impl ClientConfig {
    /// Moves on to the next address: the first fallback becomes `addr`,
    /// and `addr` goes to the end of the fallbacks.
    pub fn next_addr(&mut self) {
        if !self.fallback_addrs.is_empty() {
            let next = self.fallback_addrs.remove(0);
            let previous = std::mem::replace(&mut self.addr, next);
            self.fallback_addrs.push(previous);
        }
    }
}

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered the request with an `Error`.
    #[error("server refused: {}: {message}", error_code_name(*code))]
    Server {
        /// The error code.
        code: proto::ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// Could not connect or lost the connection without reconnecting.
    #[error("connection: {0}")]
    Connection(String),
    /// The server closed the session for good (bad or expired token,
    /// unsupported version).
    #[error("closed by server: {0}")]
    Closed(String),
    /// The reply was not the kind the request expects.
    #[error("unexpected reply: {0}")]
    Unexpected(&'static str),
}

impl ClientError {
    /// The server's error code, if this is a server refusal.
    pub fn code(&self) -> Option<proto::ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// An error code as the protocol names it, without the enum's prefix:
/// `FORBIDDEN`, `NOT_FOUND`, …
pub fn error_code_name(code: proto::ErrorCode) -> &'static str {
    let name = code.as_str_name();
    name.strip_prefix("ERROR_CODE_").unwrap_or(name)
}

/// Something the server pushed, in order.
#[derive(Debug, Clone)]
pub enum Event {
    /// A room message, exactly once and in seq order per room. An edit,
    /// delete or reaction is a message of its own with `change` set:
    /// [`changes::Entry::of`] says which, and [`changes::apply`] applies it
    /// to a copy of its target.
    Message(proto::Message),
    /// A resume replay of a room is complete.
    Synced(proto::Synced),
    /// A read marker moved.
    ReadReceipt(proto::ReadReceipt),
    /// A member came online or went offline.
    Presence(proto::Presence),
    /// A member is typing (or stopped).
    Typing(proto::Typing),
    /// An error not tied to a request (e.g. a refused resume cursor).
    ServerError(proto::Error),
    /// (Re)connected: the server's `Welcome`.
    Connected(proto::Welcome),
    /// The connection dropped; the client is reconnecting.
    Disconnected(String),
    /// The server said `GoAway`.
    GoAway(proto::GoAway),
    /// This user became a member of a room other than by a `Join` sent
    /// here: joined or created it on another session (the server also
    /// pushes this to the creating session), was added by an admin or the
    /// server API, or the other user started a direct conversation. The
    /// `Joined` push; the room is tracked from its head.
    Added(proto::Joined),
    /// This user was invited to a room; it is in [`Client::invites`] until
    /// joined or declined.
    Invitation(proto::Invitation),
    /// A room of this user changed: a member joined, left, was invited,
    /// removed, banned, unbanned or got a new role (`user`, `change`,
    /// `role`), or the title or topic changed (`change` unspecified, `user`
    /// empty). `info.my_role` is this user's role.
    RoomUpdate(proto::RoomUpdate),
    /// This user's membership of a room ended: left on another session
    /// (`LEFT`), removed (`REMOVED`) or banned (`BANNED`) by `by`, or a
    /// resume cursor named a room the user is not in. The room's cursor is
    /// dropped (it is not resumed again) and nothing of the room follows.
    Left(proto::Left),
}

/// A request for the connection task.
pub(crate) enum Command {
    Request { body: Body, reply: oneshot::Sender<Result<Body, ClientError>> },
    Send(Body),
    Close,
}

/// Events from the server.
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl Events {
    /// The next event; `None` once the client is closed for good.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// An event if one is ready.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }
}

/// A connected client. Cheap to clone; every clone shares the connection.
#[derive(Clone)]
pub struct Client {
    cmd: mpsc::UnboundedSender<Command>,
    welcome: proto::Welcome,
    membership: Arc<Mutex<membership::Membership>>,
    msg_prefix: String,
    msg_counter: std::sync::Arc<AtomicU64>,
}

impl Client {
    /// Connects, says `Hello`, and waits for `Welcome`.
    /// With `fallback_addrs`, each address is tried once, in order, until
    /// one answers.
    pub async fn connect(mut config: ClientConfig) -> Result<(Client, Events), ClientError> {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::channel(config.event_buffer.max(1));
        let mut left = config.fallback_addrs.len();
        let (conn, welcome) = loop {
            match conn::Conn::open(&config, &config.resume).await {
                Ok(opened) => break opened,
                Err(ClientError::Connection(_)) if left > 0 => {
                    left -= 1;
                    config.next_addr();
                }
                Err(e) => return Err(e),
            }
        };
        let msg_prefix = format!("{}-{:016x}", welcome.session_id, random_u64());
        let mut known = membership::Membership::default();
        known.on_welcome(&welcome);
        let membership = Arc::new(Mutex::new(known));
        tokio::spawn(conn::run(config, conn, welcome.clone(), membership.clone(), cmd_rx, ev_tx));
        let client = Client { cmd: cmd_tx, welcome, membership, msg_prefix, msg_counter: Default::default() };
        Ok((client, Events { rx: ev_rx }))
    }

    /// The `Welcome` of the first connection: user, rooms with unread counts
    /// and details, pending invitations. [`Client::rooms`] and
    /// [`Client::invites`] are the same kept current.
    pub fn welcome(&self) -> &proto::Welcome {
        &self.welcome
    }

    fn membership(&self) -> MutexGuard<'_, membership::Membership> {
        lock(&self.membership)
    }

    /// The rooms the user is a member of, in name order, each with its
    /// details and the user's role as last heard from the server.
    pub fn rooms(&self) -> Vec<proto::RoomInfo> {
        self.membership().rooms().cloned().collect()
    }

    /// A room the user is a member of, as last heard from the server.
    pub fn room_info(&self, room: &str) -> Option<proto::RoomInfo> {
        self.membership().room(room).cloned()
    }

    /// The user's pending invitations, in room-name order.
    pub fn invites(&self) -> Vec<proto::Invitation> {
        self.membership().invites().cloned().collect()
    }

    /// Sends a request and waits for its reply (across reconnects).
    pub async fn request(&self, body: Body) -> Result<Body, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Command::Request { body, reply: tx })
            .map_err(|_| ClientError::Connection("client is closed".into()))?;
        rx.await.map_err(|_| ClientError::Connection("client is closed".into()))?
    }

    /// Joins a room (idempotent).
    pub async fn join(&self, room: &str) -> Result<proto::Joined, ClientError> {
        match self.request(Body::Join(proto::Join { room: room.into() })).await? {
            Body::Joined(j) => Ok(j),
            _ => Err(ClientError::Unexpected("join expects joined")),
        }
    }

    /// Leaves a room.
    pub async fn leave(&self, room: &str) -> Result<(), ClientError> {
        match self.request(Body::Leave(proto::Leave { room: room.into() })).await? {
            Body::Left(_) => Ok(()),
            _ => Err(ClientError::Unexpected("leave expects left")),
        }
    }

    /// A fresh idempotency key, unique to this client.
    pub fn next_client_msg_id(&self) -> String {
        format!("{}-{}", self.msg_prefix, self.msg_counter.fetch_add(1, Ordering::Relaxed))
    }

    /// Publishes text; returns the ack (sent once the message is durable).
    pub async fn publish(&self, room: &str, text: &str) -> Result<proto::PublishAck, ClientError> {
        self.publish_message(proto::Publish {
            room: room.into(),
            client_msg_id: self.next_client_msg_id(),
            text: text.into(),
            ..Default::default()
        })
        .await
    }

    /// Publishes a message as given (set `client_msg_id` to make retries safe).
    pub async fn publish_message(&self, p: proto::Publish) -> Result<proto::PublishAck, ClientError> {
        match self.request(Body::Publish(p)).await? {
            Body::PublishAck(a) => Ok(a),
            _ => Err(ClientError::Unexpected("publish expects publish_ack")),
        }
    }

    /// A page of history.
    pub async fn history(&self, h: proto::History) -> Result<proto::HistoryPage, ClientError> {
        match self.request(Body::History(h)).await? {
            Body::HistoryPage(p) => Ok(p),
            _ => Err(ClientError::Unexpected("history expects history_page")),
        }
    }

    /// Moves the read marker; returns the resulting receipt.
    pub async fn mark_read(&self, room: &str, seq: u64) -> Result<proto::ReadReceipt, ClientError> {
        match self.request(Body::MarkRead(proto::MarkRead { room: room.into(), seq })).await? {
            Body::ReadReceipt(r) => Ok(r),
            _ => Err(ClientError::Unexpected("mark_read expects read_receipt")),
        }
    }

    /// Says whether the user is typing in a room (fire-and-forget).
    pub fn typing(&self, room: &str, active: bool) {
        let _ = self.cmd.send(Command::Send(Body::Typing(proto::Typing {
            room: room.into(),
            user: String::new(),
            active,
        })));
    }

    /// Sends a request answered by a `RoomInfo` (proto/README.md §8).
    async fn room_request(&self, body: Body, what: &'static str) -> Result<proto::RoomInfo, ClientError> {
        match self.request(body).await? {
            Body::RoomInfo(info) => Ok(info),
            _ => Err(ClientError::Unexpected(what)),
        }
    }

    /// Creates a room with this user as its owner, inviting `invite`.
    pub async fn create_room(&self, c: proto::CreateRoom) -> Result<proto::RoomInfo, ClientError> {
        self.room_request(Body::CreateRoom(c), "create_room expects room_info").await
    }

    /// Changes a room's title and topic (admins and the owner): a field
    /// left `None` is unchanged, `Some("")` clears it.
    pub async fn update_room(&self, u: proto::UpdateRoom) -> Result<proto::RoomInfo, ClientError> {
        self.room_request(Body::UpdateRoom(u), "update_room expects room_info").await
    }

    /// A room's details as this user may see them.
    pub async fn get_room(&self, room: &str) -> Result<proto::RoomInfo, ClientError> {
        self.room_request(Body::GetRoom(proto::GetRoom { room: room.into() }), "get_room expects room_info").await
    }

    /// Invites `user` to `room`.
    pub async fn invite(&self, room: &str, user: &str) -> Result<proto::RoomInfo, ClientError> {
        let body = Body::Invite(proto::Invite { room: room.into(), user: user.into() });
        self.room_request(body, "invite expects room_info").await
    }

    /// Declines this user's pending invitation to `room`.
    pub async fn decline_invite(&self, room: &str) -> Result<proto::RoomInfo, ClientError> {
        let body = Body::DeclineInvite(proto::DeclineInvite { room: room.into() });
        self.room_request(body, "decline_invite expects room_info").await
    }

    /// Ends `user`'s membership of `room`, or withdraws their invitation.
    pub async fn remove_member(&self, room: &str, user: &str, reason: &str) -> Result<proto::RoomInfo, ClientError> {
        let body =
            Body::RemoveMember(proto::RemoveMember { room: room.into(), user: user.into(), reason: reason.into() });
        self.room_request(body, "remove_member expects room_info").await
    }

    /// Removes `user` from `room` (if a member) and keeps them out until
    /// [`Client::unban`].
    pub async fn ban(&self, room: &str, user: &str, reason: &str) -> Result<proto::RoomInfo, ClientError> {
        let body = Body::Ban(proto::Ban { room: room.into(), user: user.into(), reason: reason.into() });
        self.room_request(body, "ban expects room_info").await
    }

    /// Lifts `user`'s ban from `room`.
    pub async fn unban(&self, room: &str, user: &str, reason: &str) -> Result<proto::RoomInfo, ClientError> {
        let body = Body::Unban(proto::Unban { room: room.into(), user: user.into(), reason: reason.into() });
        self.room_request(body, "unban expects room_info").await
    }

    /// Sets a member's role (owner only); `Role::Owner` hands ownership on.
    pub async fn set_role(&self, room: &str, user: &str, role: proto::Role) -> Result<proto::RoomInfo, ClientError> {
        let body = Body::SetRole(proto::SetRole { room: room.into(), user: user.into(), role: role as i32 });
        self.room_request(body, "set_role expects room_info").await
    }

    /// A page of a room's members, in user-id order after `after_user`.
    pub async fn list_members(&self, l: proto::ListMembers) -> Result<proto::MemberPage, ClientError> {
        match self.request(Body::ListMembers(l)).await? {
            Body::MemberPage(p) => Ok(p),
            _ => Err(ClientError::Unexpected("list_members expects member_page")),
        }
    }

    /// A page of the directory of public rooms, in name order after
    /// `after_room`.
    pub async fn list_rooms(&self, l: proto::ListRooms) -> Result<proto::RoomList, ClientError> {
        match self.request(Body::ListRooms(l)).await? {
            Body::RoomList(r) => Ok(r),
            _ => Err(ClientError::Unexpected("list_rooms expects room_list")),
        }
    }

    /// Round trip to the server.
    pub async fn ping(&self) -> Result<(), ClientError> {
        match self.request(Body::Ping(proto::Ping { nonce: random_u64() })).await? {
            Body::Pong(_) => Ok(()),
            _ => Err(ClientError::Unexpected("ping expects pong")),
        }
    }

    /// Closes the connection; pending requests fail.
    pub fn close(&self) {
        let _ = self.cmd.send(Command::Close);
    }
}

/// Locks shared state; a panic elsewhere while it was held leaves it as
/// consistent as any single update does, so poisoning is ignored.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// 64 bits from the standard library's per-process random hasher keys, so
/// idempotency keys differ between runs without a random-number crate.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}
