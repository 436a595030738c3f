//! The connection task: owns the socket, matches replies to requests by
//! `id`, keeps room cursors and what it knows of the user's rooms
//! ([`crate::membership`]), answers server pings, and reconnects.
//!
//! Reading and writing are separate (a writer task drains a queue of
//! encoded frames with one write per batch), so a client that pipelines
//! many requests keeps reading replies while its writes wait for the socket.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chatd::codec::{FrameReader, put_frame};
use chatd::proto::{self, Body, CloseReason, Envelope, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::cursor::{Action, Cursors, Held};
use crate::membership::Membership;
use crate::{ClientConfig, ClientError, Command, Event};

/// Longest wait for `Welcome`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// One live connection: frames in, a writer task out.
pub struct Conn {
    frames: FrameReader<Reader>,
    out: mpsc::UnboundedSender<Bytes>,
}

/// Opens the byte stream: TCP, and TLS over it when configured.
async fn dial(config: &ClientConfig) -> Result<(Reader, Writer), ClientError> {
    let stream = TcpStream::connect(&config.addr)
        .await
        .map_err(|e| ClientError::Connection(format!("connect {}: {e}", config.addr)))?;
    let _ = stream.set_nodelay(true);
    match &config.tls {
        #[cfg(feature = "tls")]
        Some(opts) => {
            let tls = crate::tls::connect(stream, &config.addr, opts).await?;
            let (r, w) = tokio::io::split(tls);
            Ok((Box::new(r), Box::new(w)))
        }
        #[cfg(not(feature = "tls"))]
        Some(_) => Err(ClientError::Connection("this build of chat-client has no TLS (feature `tls`)".into())),
        None => {
            let (r, w) = stream.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
    }
}

impl Conn {
    /// Connects and completes the handshake, resuming `resume`.
    pub async fn open(config: &ClientConfig, resume: &[proto::Cursor]) -> Result<(Conn, proto::Welcome), ClientError> {
        let (r, w) = dial(config).await?;
        let (out, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(w, rx));
        let mut conn = Conn { frames: FrameReader::new(r, config.max_frame_bytes), out };
        let hello = proto::Hello {
            protocol_version: PROTOCOL_VERSION,
            token: config.token.clone(),
            device: config.device.clone(),
            resume: resume.to_vec(),
        };
        conn.send(&Envelope::new(1, Body::Hello(hello)));
        let reply = tokio::time::timeout(HELLO_TIMEOUT, conn.frames.read_frame())
            .await
            .map_err(|_| ClientError::Connection("no welcome within 10 s".into()))?;
        if matches!(reply, Err(chatd::codec::FrameError::TooLarge { .. }))
            && conn.frames.buffered().starts_with(b"HTTP/")
        {
            return Err(ClientError::Connection(format!(
                "{} answered in HTTP: that is chatd's HTTP port (WebSocket, web client, metrics); \
                 the native protocol is on the TCP port, 7400 by default (--server HOST:7400)",
                config.addr
            )));
        }
        let env = decode(reply)?;
        match env.body {
            Some(Body::Welcome(w)) => Ok((conn, w)),
            // Busy (a cluster node that cannot reach Redis, a full server):
            // worth another try, here or on another node.
            Some(Body::Error(e)) if e.code() == proto::ErrorCode::ServerBusy => {
                Err(ClientError::Connection(format!("{} is busy: {}", config.addr, e.message)))
            }
            Some(Body::Error(e)) => Err(ClientError::Closed(format!("{:?}: {}", e.code(), e.message))),
            _ => Err(ClientError::Connection("expected welcome".into())),
        }
    }

    fn send(&self, env: &Envelope) {
        let mut buf = BytesMut::new();
        put_frame(&mut buf, env);
        let _ = self.out.send(buf.freeze());
    }
}

fn decode(r: Result<Option<BytesMut>, chatd::codec::FrameError>) -> Result<Envelope, ClientError> {
    match r {
        Ok(Some(f)) => chatd::codec::decode_envelope(&f)
            .map_err(|e| ClientError::Connection(format!("bad frame from server: {e}"))),
        Ok(None) => Err(ClientError::Connection("server closed the connection".into())),
        Err(e) => Err(ClientError::Connection(e.to_string())),
    }
}

async fn write_loop(mut w: Writer, mut rx: mpsc::UnboundedReceiver<Bytes>) {
    let mut buf = BytesMut::new();
    while let Some(first) = rx.recv().await {
        buf.extend_from_slice(&first);
        while let Ok(more) = rx.try_recv() {
            buf.extend_from_slice(&more);
        }
        if w.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
    }
    let _ = w.shutdown().await;
}

struct PendingRequest {
    body: Body,
    reply: oneshot::Sender<Result<Body, ClientError>>,
}

/// What ended a connection.
enum End {
    /// The application closed the client.
    Closed,
    /// Lost; reconnect (after at least `wait`).
    Lost(String, Duration),
    /// The server refused us for good.
    Fatal(String),
}

struct State {
    config: ClientConfig,
    cursors: Cursors,
    pending: HashMap<u64, PendingRequest>,
    /// History requests the client itself sent to fill gaps, by id.
    gap_fetches: HashMap<u64, String>,
    next_id: u64,
    events: mpsc::Sender<Event>,
    /// Shared with the [`crate::Client`]s.
    membership: Arc<Mutex<Membership>>,
}

/// Runs the connection until the client is closed or refused for good.
pub(crate) async fn run(
    config: ClientConfig,
    mut conn: Conn,
    welcome: proto::Welcome,
    membership: Arc<Mutex<Membership>>,
    mut cmds: mpsc::UnboundedReceiver<Command>,
    events: mpsc::Sender<Event>,
) {
    let mut st = State {
        config,
        cursors: Cursors::default(),
        pending: HashMap::new(),
        gap_fetches: HashMap::new(),
        next_id: 2,
        events,
        membership,
    };
    for c in &st.config.resume {
        st.cursors.track(&c.room, c.after_seq);
    }
    st.on_welcome(&welcome);
    let _ = st.events.send(Event::Connected(welcome)).await;
    loop {
        let end = st.serve(&mut conn, &mut cmds).await;
        let (reason, mut wait) = match end {
            End::Closed => break,
            End::Fatal(why) => {
                st.fail_all(|| ClientError::Closed(why.clone()));
                break;
            }
            End::Lost(why, wait) => (why, wait),
        };
        if !st.config.reconnect {
            st.fail_all(|| ClientError::Connection(reason.clone()));
            break;
        }
        let _ = st.events.send(Event::Disconnected(reason)).await;
        st.cursors.reset_gaps();
        st.gap_fetches.clear();
        let mut backoff = Duration::from_millis(100);
        conn = loop {
            tokio::time::sleep(wait).await;
            match Conn::open(&st.config, &st.cursors.resume()).await {
                Ok((c, w)) => {
                    st.on_welcome(&w);
                    let _ = st.events.send(Event::Connected(w)).await;
                    break c;
                }
                Err(ClientError::Closed(why)) => {
                    st.fail_all(|| ClientError::Closed(why.clone()));
                    return;
                }
                Err(_) => {
                    st.config.next_addr();
                    wait = backoff + Duration::from_millis(crate::random_u64() % 100);
                    backoff = (backoff * 2).min(st.config.max_backoff);
                }
            }
            // The application may close the client while we are away.
            if let Ok(Command::Close) = cmds.try_recv() {
                st.fail_all(|| ClientError::Connection("client closed".into()));
                return;
            }
        };
        // Requests that got no reply are sent again (same ids, same keys).
        let mut ids: Vec<u64> = st.pending.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let body = st.pending[&id].body.clone();
            conn.send(&Envelope::new(id, body));
        }
    }
}

impl State {
    fn on_welcome(&mut self, w: &proto::Welcome) {
        for r in &w.rooms {
            if !self.cursors.knows(&r.room) {
                // A room joined elsewhere: live from its head.
                self.cursors.track(&r.room, r.head_seq);
            }
        }
        let member: std::collections::HashSet<&str> = w.rooms.iter().map(|r| r.room.as_str()).collect();
        for c in self.cursors.resume() {
            if !member.contains(c.room.as_str()) {
                self.cursors.forget(&c.room);
            }
        }
        crate::lock(&self.membership).on_welcome(w);
    }

    /// Applies what a reply (to `request`) or a push says about the user's
    /// rooms to the cursors and the membership, before anyone sees it.
    fn note(&mut self, body: &Body, request: Option<&Body>) {
        match body {
            // A room already tracked keeps its cursor: a resume replay may
            // still be under way for it.
            Body::Joined(j) => {
                if let Some(s) = j.state.as_ref().filter(|s| !self.cursors.knows(&s.room)) {
                    self.cursors.track(&s.room, s.head_seq);
                }
                crate::lock(&self.membership).on_joined(j);
            }
            // Left, removed, banned, or not a member at resume: nothing of
            // the room follows, and it must not be resumed again.
            Body::Left(l) => {
                self.cursors.forget(&l.room);
                crate::lock(&self.membership).on_left(&l.room);
            }
            Body::Invitation(i) => crate::lock(&self.membership).on_invitation(i),
            Body::RoomUpdate(u) => {
                if let Some(info) = &u.info {
                    crate::lock(&self.membership).on_room_info(info);
                }
            }
            Body::RoomInfo(info) => {
                let mut m = crate::lock(&self.membership);
                if let Some(Body::DeclineInvite(d)) = request {
                    m.on_declined(&d.room);
                }
                m.on_room_info(info);
            }
            _ => {}
        }
    }

    fn fail_all(&mut self, err: impl Fn() -> ClientError) {
        for (_, p) in self.pending.drain() {
            let _ = p.reply.send(Err(err()));
        }
    }

    async fn serve(&mut self, conn: &mut Conn, cmds: &mut mpsc::UnboundedReceiver<Command>) -> End {
        loop {
            tokio::select! {
                frame = conn.frames.read_frame() => {
                    let env = match decode(frame) {
                        Ok(env) => env,
                        Err(e) => return End::Lost(e.to_string(), Duration::ZERO),
                    };
                    if let Some(end) = self.on_frame(conn, env).await {
                        return end;
                    }
                }
                cmd = cmds.recv() => match cmd {
                    None | Some(Command::Close) => {
                        self.fail_all(|| ClientError::Connection("client closed".into()));
                        return End::Closed;
                    }
                    Some(Command::Send(body)) => conn.send(&Envelope::new(0, body)),
                    Some(Command::Request { body, reply }) => {
                        let id = self.next_id;
                        self.next_id += 1;
                        conn.send(&Envelope::new(id, body.clone()));
                        self.pending.insert(id, PendingRequest { body, reply });
                    }
                },
            }
        }
    }

    async fn emit(&self, held: Vec<Held>) {
        for h in held {
            let ev = match h {
                Held::Message(m) => Event::Message(m),
                Held::Synced(s) => Event::Synced(s),
            };
            let _ = self.events.send(ev).await;
        }
    }

    fn fetch_gap(&mut self, conn: &Conn, room: &str, after: u64) {
        let id = self.next_id;
        self.next_id += 1;
        let h = proto::History { room: room.into(), after_seq: after, forward: true, limit: 1000, before_seq: 0 };
        conn.send(&Envelope::new(id, Body::History(h)));
        self.gap_fetches.insert(id, room.to_string());
    }

    async fn on_frame(&mut self, conn: &mut Conn, env: Envelope) -> Option<End> {
        let body = env.body?;
        if env.id != 0 {
            if let Some(room) = self.gap_fetches.remove(&env.id) {
                let mut out = Vec::new();
                let action = match body {
                    Body::HistoryPage(page) => self.cursors.on_gap_page(&room, page, &mut out),
                    _ => Action::None,
                };
                self.emit(out).await;
                if let Action::FetchAfter(after) = action {
                    self.fetch_gap(conn, &room, after);
                }
                return None;
            }
            if let Some(p) = self.pending.remove(&env.id) {
                let result = match body {
                    Body::Error(e) => Err(ClientError::Server { code: e.code(), message: e.message }),
                    other => {
                        self.note(&other, Some(&p.body));
                        Ok(other)
                    }
                };
                let _ = p.reply.send(result);
            }
            return None;
        }
        self.note(&body, None);
        match body {
            Body::Message(m) => {
                let mut out = Vec::new();
                let room = m.room.clone();
                let action = self.cursors.on_message(m, &mut out);
                self.emit(out).await;
                if let Action::FetchAfter(after) = action {
                    self.fetch_gap(conn, &room, after);
                }
            }
            Body::Synced(s) => {
                let mut out = Vec::new();
                self.cursors.on_synced(s, &mut out);
                self.emit(out).await;
            }
            // A member other than by a Join sent here (another session, a
            // created room, an admin, a direct conversation).
            Body::Joined(j) => {
                let _ = self.events.send(Event::Added(j)).await;
            }
            Body::Left(l) => {
                let _ = self.events.send(Event::Left(l)).await;
            }
            Body::Invitation(i) => {
                let _ = self.events.send(Event::Invitation(i)).await;
            }
            Body::RoomUpdate(u) => {
                let _ = self.events.send(Event::RoomUpdate(u)).await;
            }
            Body::Ping(p) => conn.send(&Envelope::new(0, Body::Pong(proto::Pong { nonce: p.nonce }))),
            Body::ReadReceipt(r) => {
                let _ = self.events.send(Event::ReadReceipt(r)).await;
            }
            Body::Presence(p) => {
                let _ = self.events.send(Event::Presence(p)).await;
            }
            Body::Typing(t) => {
                let _ = self.events.send(Event::Typing(t)).await;
            }
            Body::Error(e) => {
                let _ = self.events.send(Event::ServerError(e)).await;
            }
            Body::GoAway(g) => {
                let reason = g.reason();
                let why = format!("{:?}: {}", reason, g.message);
                let wait = Duration::from_millis(u64::from(g.retry_after_ms));
                let _ = self.events.send(Event::GoAway(g)).await;
                return Some(match reason {
                    // The same token would be refused (an expired one from
                    // the second of its `exp`): retrying is a loop, not a
                    // reconnect. The application connects again with a new
                    // token.
                    CloseReason::AuthFailed | CloseReason::AuthExpired => End::Fatal(why),
                    _ => End::Lost(why, wait),
                });
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    //! The connection task against a scripted server on a local socket:
    //! what it does with the room pushes and the room requests' replies.

    use chatd::codec::{FrameReader, decode_envelope, encode_frame};
    use chatd::proto::{self, Body, Envelope, ErrorCode, MemberChange, Role};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;
    use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

    use crate::{Client, ClientConfig, ClientError, Event, Events};

    const WAIT: std::time::Duration = std::time::Duration::from_secs(10);

    /// One connection accepted by the scripted server.
    struct Peer {
        frames: FrameReader<OwnedReadHalf>,
        w: OwnedWriteHalf,
    }

    impl Peer {
        async fn accept(l: &TcpListener) -> Peer {
            let (s, _) = tokio::time::timeout(WAIT, l.accept()).await.expect("a connection").unwrap();
            let (r, w) = s.into_split();
            Peer { frames: FrameReader::new(r, proto::DEFAULT_MAX_FRAME_BYTES), w }
        }

        async fn recv(&mut self) -> Envelope {
            let frame = tokio::time::timeout(WAIT, self.frames.read_frame()).await.expect("a frame").unwrap();
            decode_envelope(&frame.expect("not closed")).unwrap()
        }

        async fn send(&mut self, id: u64, body: Body) {
            self.w.write_all(&encode_frame(&Envelope::new(id, body))).await.unwrap();
        }

        /// Reads the `Hello`, answers `welcome`, returns the resume cursors.
        async fn handshake(&mut self, welcome: proto::Welcome) -> Vec<proto::Cursor> {
            let Some(Body::Hello(h)) = self.recv().await.body else { panic!("expected hello") };
            self.send(1, Body::Welcome(welcome)).await;
            h.resume
        }

        /// Reads one request; returns its id and body.
        async fn request(&mut self) -> (u64, Body) {
            let env = self.recv().await;
            (env.id, env.body.expect("a body"))
        }
    }

    fn info(room: &str, role: Role) -> proto::RoomInfo {
        proto::RoomInfo { room: room.into(), my_role: role as i32, member_count: 1, ..Default::default() }
    }

    fn state(room: &str, head_seq: u64, role: Role) -> proto::RoomState {
        proto::RoomState {
            room: room.into(),
            head_seq,
            read_seq: 0,
            info: Some(info(room, role)),
            ..Default::default()
        }
    }

    fn welcome(rooms: Vec<proto::RoomState>, invites: Vec<proto::Invitation>) -> proto::Welcome {
        proto::Welcome {
            user: "me".into(),
            session_id: "s".into(),
            protocol_version: 1,
            rooms,
            invites,
            ..Default::default()
        }
    }

    fn left(room: &str, reason: MemberChange, by: &str) -> Body {
        Body::Left(proto::Left { room: room.into(), reason: reason as i32, by: by.into() })
    }

    /// A client of a scripted server: the client, its events, the server's
    /// listener and the accepted connection (handshake done with `w`).
    async fn connect(w: proto::Welcome, resume: Vec<proto::Cursor>) -> (Client, Events, TcpListener, Peer) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut config = ClientConfig::new(l.local_addr().unwrap().to_string(), "token");
        config.resume = resume;
        config.max_backoff = std::time::Duration::from_millis(50);
        let (connected, mut peer) = tokio::join!(Client::connect(config), async {
            let mut peer = Peer::accept(&l).await;
            peer.handshake(w).await;
            peer
        });
        let (client, events) = connected.unwrap();
        let mut events = events;
        assert!(matches!(next(&mut events).await, Event::Connected(_)));
        // A round trip, so that the handshake is behind us on both sides.
        let (pong, ()) = tokio::join!(client.ping(), async {
            let (id, body) = peer.request().await;
            let Body::Ping(p) = body else { panic!("expected ping") };
            peer.send(id, Body::Pong(proto::Pong { nonce: p.nonce })).await;
        });
        pong.unwrap();
        (client, events, l, peer)
    }

    async fn next(events: &mut Events) -> Event {
        tokio::time::timeout(WAIT, events.recv()).await.expect("an event").expect("not closed")
    }

    fn rooms(c: &Client) -> Vec<String> {
        c.rooms().into_iter().map(|r| r.room).collect()
    }

    fn cursor(room: &str, after_seq: u64) -> proto::Cursor {
        proto::Cursor { room: room.into(), after_seq }
    }

    #[tokio::test]
    async fn a_room_left_removed_or_banned_is_not_resumed_again() {
        let w = welcome(
            vec![
                state("a", 3, Role::Member),
                state("b", 5, Role::Admin),
                state("c", 1, Role::Member),
                state("d", 0, Role::Owner),
            ],
            vec![],
        );
        // `old` is a room the application had a cursor of but is no longer in.
        let (client, mut events, l, mut peer) = connect(w, vec![cursor("old", 7), cursor("d", 0)]).await;
        peer.send(0, left("old", MemberChange::Banned, "ann")).await;
        peer.send(0, left("a", MemberChange::Removed, "ann")).await;
        peer.send(0, left("b", MemberChange::Banned, "bob")).await;
        peer.send(0, left("c", MemberChange::Left, "me")).await;
        for (room, reason, by) in [
            ("old", MemberChange::Banned, "ann"),
            ("a", MemberChange::Removed, "ann"),
            ("b", MemberChange::Banned, "bob"),
            ("c", MemberChange::Left, "me"),
        ] {
            let Event::Left(l) = next(&mut events).await else { panic!("expected left") };
            assert_eq!((l.room.as_str(), l.reason(), l.by.as_str()), (room, reason, by));
        }
        assert_eq!(rooms(&client), vec!["d"]);

        // The connection drops: the client resumes only the room it is in.
        drop(peer);
        assert!(matches!(next(&mut events).await, Event::Disconnected(_)));
        let mut peer = Peer::accept(&l).await;
        let resume = peer.handshake(welcome(vec![state("d", 0, Role::Owner)], vec![])).await;
        assert_eq!(resume, vec![cursor("d", 0)]);
    }

    #[tokio::test]
    async fn room_pushes_arrive_as_events_and_keep_rooms_and_invitations_current() {
        let invited = proto::Invitation {
            room: "p".into(),
            by: "ann".into(),
            ts_ms: 1,
            info: Some(info("p", Role::Unspecified)),
        };
        let (client, mut events, l, mut peer) =
            connect(welcome(vec![state("team", 4, Role::Member)], vec![invited.clone()]), vec![]).await;
        assert_eq!(client.invites(), vec![invited]);
        assert_eq!(client.room_info("team").unwrap().my_role(), Role::Member);

        let second = proto::Invitation {
            room: "q".into(),
            by: "bob".into(),
            ts_ms: 2,
            info: Some(info("q", Role::Unspecified)),
        };
        peer.send(0, Body::Invitation(second.clone())).await;
        let Event::Invitation(i) = next(&mut events).await else { panic!("expected invitation") };
        assert_eq!(i, second);
        assert_eq!(client.invites().iter().map(|i| i.room.as_str()).collect::<Vec<_>>(), vec!["p", "q"]);

        let mut promoted = info("team", Role::Admin);
        promoted.title = "The team".into();
        let update = proto::RoomUpdate {
            info: Some(promoted.clone()),
            by: "ann".into(),
            user: "me".into(),
            change: MemberChange::RoleChanged as i32,
            role: Role::Admin as i32,
        };
        peer.send(0, Body::RoomUpdate(update.clone())).await;
        let Event::RoomUpdate(u) = next(&mut events).await else { panic!("expected room update") };
        assert_eq!(u, update);
        assert_eq!(client.room_info("team"), Some(promoted));

        // Added to a room elsewhere: a cursor from its head, and a room.
        let added = proto::Joined { state: Some(state("dm:ann:me", 2, Role::Member)), online: vec!["ann".into()] };
        peer.send(0, Body::Joined(added.clone())).await;
        let Event::Added(j) = next(&mut events).await else { panic!("expected joined") };
        assert_eq!(j, added);
        assert_eq!(rooms(&client), vec!["dm:ann:me", "team"]);

        // Declining and joining use the invitations up.
        let (declined, ()) = tokio::join!(client.decline_invite("p"), async {
            let (id, body) = peer.request().await;
            assert_eq!(body, Body::DeclineInvite(proto::DeclineInvite { room: "p".into() }));
            peer.send(id, Body::RoomInfo(info("p", Role::Unspecified))).await;
        });
        assert_eq!(declined.unwrap().room, "p");
        let (joined, ()) = tokio::join!(client.join("q"), async {
            let (id, body) = peer.request().await;
            assert_eq!(body, Body::Join(proto::Join { room: "q".into() }));
            peer.send(id, Body::Joined(proto::Joined { state: Some(state("q", 0, Role::Member)), online: vec![] }))
                .await;
        });
        joined.unwrap();
        assert!(client.invites().is_empty());
        assert_eq!(rooms(&client), vec!["dm:ann:me", "q", "team"]);

        // The resume after a drop covers the room joined by the push.
        drop(peer);
        assert!(matches!(next(&mut events).await, Event::Disconnected(_)));
        let mut peer = Peer::accept(&l).await;
        let resume = peer.handshake(welcome(vec![state("team", 4, Role::Admin)], vec![])).await;
        assert_eq!(resume, vec![cursor("dm:ann:me", 2), cursor("q", 0), cursor("team", 4)]);
        let Event::Connected(_) = next(&mut events).await else { panic!("expected connected") };
        assert_eq!(rooms(&client), vec!["team"], "the new welcome replaces what was known");
    }

    #[tokio::test]
    async fn each_room_request_sends_its_body_and_returns_the_typed_reply_or_the_error() {
        let (client, _events, _l, mut peer) = connect(welcome(vec![], vec![]), vec![]).await;
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            // Until the client closes the connection.
            while let Some(frame) = tokio::time::timeout(WAIT, peer.frames.read_frame()).await.unwrap().unwrap() {
                let env = decode_envelope(&frame).unwrap();
                let body = env.body.expect("a body");
                let reply = match &body {
                    Body::CreateRoom(c) => {
                        // As the server does: the creator's sessions get
                        // Joined, then the reply.
                        let joined = proto::Joined { state: Some(state(&c.room, 0, Role::Owner)), online: vec![] };
                        peer.send(0, Body::Joined(joined)).await;
                        Body::RoomInfo(info(&c.room, Role::Owner))
                    }
                    Body::Ban(b) if b.user == "owner" => {
                        Body::Error(proto::Error::new(ErrorCode::Forbidden, "nobody may ban the owner"))
                    }
                    Body::ListMembers(l) => Body::MemberPage(proto::MemberPage {
                        room: l.room.clone(),
                        members: vec![proto::Member { user: "me".into(), role: Role::Owner as i32, online: true }],
                        has_more: false,
                    }),
                    Body::ListRooms(_) => Body::RoomList(proto::RoomList {
                        rooms: vec![info("lobby", Role::Unspecified)],
                        has_more: true,
                    }),
                    _ => Body::RoomInfo(info("r", Role::Admin)),
                };
                seen.push(body);
                peer.send(env.id, reply).await;
            }
            seen
        });

        let create = proto::CreateRoom {
            room: "r".into(),
            kind: proto::RoomKind::Private as i32,
            title: "T".into(),
            topic: "t".into(),
            invite: vec!["bob".into()],
        };
        assert_eq!(client.create_room(create.clone()).await.unwrap().my_role(), Role::Owner);
        assert_eq!(client.room_info("r").unwrap().my_role(), Role::Owner, "the creator is a member");
        let update = proto::UpdateRoom { room: "r".into(), topic: Some(String::new()), ..Default::default() };
        client.update_room(update.clone()).await.unwrap();
        client.get_room("r").await.unwrap();
        client.invite("r", "bob").await.unwrap();
        client.decline_invite("r").await.unwrap();
        client.remove_member("r", "bob", "off topic").await.unwrap();
        client.ban("r", "bob", "spam").await.unwrap();
        client.unban("r", "bob", "").await.unwrap();
        client.set_role("r", "bob", Role::Admin).await.unwrap();
        let page = client.list_members(proto::ListMembers { room: "r".into(), after_user: "a".into(), limit: 5 }).await;
        assert_eq!(page.unwrap().members[0].user, "me");
        let list =
            client.list_rooms(proto::ListRooms { query: "lo".into(), after_room: String::new(), limit: 0 }).await;
        assert!(list.unwrap().has_more);
        let err = client.ban("r", "owner", "").await.unwrap_err();
        assert!(matches!(&err, ClientError::Server { code: ErrorCode::Forbidden, .. }), "{err:?}");
        assert_eq!(err.to_string(), "server refused: FORBIDDEN: nobody may ban the owner");
        client.close();

        let seen = server.await.unwrap();
        let expected = vec![
            Body::CreateRoom(create),
            Body::UpdateRoom(update),
            Body::GetRoom(proto::GetRoom { room: "r".into() }),
            Body::Invite(proto::Invite { room: "r".into(), user: "bob".into() }),
            Body::DeclineInvite(proto::DeclineInvite { room: "r".into() }),
            Body::RemoveMember(proto::RemoveMember {
                room: "r".into(),
                user: "bob".into(),
                reason: "off topic".into(),
            }),
            Body::Ban(proto::Ban { room: "r".into(), user: "bob".into(), reason: "spam".into() }),
            Body::Unban(proto::Unban { room: "r".into(), user: "bob".into(), reason: String::new() }),
            Body::SetRole(proto::SetRole { room: "r".into(), user: "bob".into(), role: Role::Admin as i32 }),
            Body::ListMembers(proto::ListMembers { room: "r".into(), after_user: "a".into(), limit: 5 }),
            Body::ListRooms(proto::ListRooms { query: "lo".into(), after_room: String::new(), limit: 0 }),
            Body::Ban(proto::Ban { room: "r".into(), user: "owner".into(), reason: String::new() }),
        ];
        assert_eq!(seen, expected);
    }
}
