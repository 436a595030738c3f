//! The connection task: owns the socket, matches replies to requests by
//! `id`, keeps room cursors, answers server pings, and reconnects.
//!
//! Reading and writing are separate (a writer task drains a queue of
//! encoded frames with one write per batch), so a client that pipelines
//! many requests keeps reading replies while its writes wait for the socket.

use std::collections::HashMap;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chatd::codec::{FrameReader, put_frame};
use chatd::proto::{self, Body, CloseReason, Envelope, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::cursor::{Action, Cursors, Held};
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
}

/// Runs the connection until the client is closed or refused for good.
pub(crate) async fn run(
    config: ClientConfig,
    mut conn: Conn,
    welcome: proto::Welcome,
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
                        match &other {
                            // A room already tracked keeps its cursor: a
                            // resume replay may still be under way for it.
                            Body::Joined(j) => {
                                if let Some(s) = j.state.as_ref().filter(|s| !self.cursors.knows(&s.room)) {
                                    self.cursors.track(&s.room, s.head_seq);
                                }
                            }
                            Body::Left(l) => self.cursors.forget(&l.room),
                            _ => {}
                        }
                        Ok(other)
                    }
                };
                let _ = p.reply.send(result);
            }
            return None;
        }
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
            // Added to a room by someone else (a direct conversation).
            Body::Joined(j) => {
                if let Some(s) = j.state.as_ref().filter(|s| !self.cursors.knows(&s.room)) {
                    self.cursors.track(&s.room, s.head_seq);
                }
                let _ = self.events.send(Event::Added(j)).await;
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
