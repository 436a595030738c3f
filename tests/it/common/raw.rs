//! A frame-level connection to the native protocol, with one helper per
//! step that tests take again and again. The helpers number their own
//! requests (see [`Raw::request`]); a test that cares about an id picks it
//! with [`Raw::call`] or [`Raw::send`].

use bytes::BytesMut;
use chatd::codec::{FrameReader, decode_envelope, put_frame};
use chatd::proto::{self, Body, CloseReason, Envelope, ErrorCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::WAIT;

/// The first request id the helpers use: far above any id a test picks.
const FIRST_HELPER_ID: u64 = 1_000_000_000;

/// A frame-level connection.
pub struct Raw {
    pub reader: FrameReader<OwnedReadHalf>,
    pub writer: OwnedWriteHalf,
    next_id: u64,
}

// Connecting and saying Hello.
impl Raw {
    /// A connection to `addr` (no Hello sent yet).
    pub async fn connect(addr: &str) -> Raw {
        Self::over(TcpStream::connect(addr).await.unwrap())
    }

    /// A connection to `addr`, or `None` if nothing accepts it (a server
    /// that may have been killed).
    pub async fn try_connect(addr: &str) -> Option<Raw> {
        Some(Self::over(TcpStream::connect(addr).await.ok()?))
    }

    /// A connection with a small receive buffer, so a reader that pauses
    /// makes the server's writes block early.
    pub async fn connect_small(addr: &str) -> Raw {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        Self::over(sock.connect(addr.parse().unwrap()).await.unwrap())
    }

    /// A connection to `addr` that has said Hello with `token`.
    pub async fn connect_as(addr: &str, token: &str) -> Raw {
        let mut r = Self::connect(addr).await;
        r.hello(token, vec![]).await;
        r
    }

    fn over(s: TcpStream) -> Raw {
        s.set_nodelay(true).unwrap();
        let (r, w) = s.into_split();
        Raw { reader: FrameReader::new(r, 1 << 20), writer: w, next_id: FIRST_HELPER_ID }
    }

    /// Sends Hello (request id 1) with `token` and `resume` cursors, without
    /// reading the answer: for a Hello the server is expected to refuse.
    pub async fn send_hello(&mut self, token: &str, resume: Vec<proto::Cursor>) {
        let h = proto::Hello { protocol_version: 1, token: token.into(), device: "raw".into(), resume };
        self.send(1, Body::Hello(h)).await;
    }

    /// Says Hello and returns the Welcome; panics on anything else.
    pub async fn hello(&mut self, token: &str, resume: Vec<proto::Cursor>) -> proto::Welcome {
        self.send_hello(token, resume).await;
        match self.recv().await.body {
            Some(Body::Welcome(w)) => w,
            other => panic!("expected welcome, got {other:?}"),
        }
    }
}

// Frames in and out.
impl Raw {
    /// Sends one envelope. A peer that already closed shows up on the next
    /// read (every caller checks what comes back).
    pub async fn send(&mut self, id: u64, body: Body) {
        let mut buf = BytesMut::new();
        put_frame(&mut buf, &Envelope::new(id, body));
        let _ = self.writer.write_all(&buf).await;
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        // The server may already have closed on us; that is its right.
        let _ = self.writer.write_all(bytes).await;
    }

    /// The next envelope; panics after `WAIT`.
    pub async fn recv(&mut self) -> Envelope {
        self.try_recv().await.expect("connection closed while a frame was expected")
    }

    /// The next envelope, or None at end of stream.
    pub async fn try_recv(&mut self) -> Option<Envelope> {
        let f = tokio::time::timeout(WAIT, self.reader.read_frame()).await.expect("frame in time").ok()??;
        Some(decode_envelope(&f).expect("server frames decode"))
    }

    /// Whether the server closes the connection (EOF or reset) within `WAIT`.
    pub async fn closed(&mut self) -> bool {
        loop {
            match tokio::time::timeout(WAIT, self.reader.read_frame()).await {
                Err(_) => return false,
                Ok(Ok(Some(_))) => continue,
                Ok(_) => return true,
            }
        }
    }

    /// Sends a request and returns the reply with the same id, skipping pushes.
    pub async fn call(&mut self, id: u64, body: Body) -> Body {
        self.send(id, body).await;
        loop {
            let env = self.recv().await;
            if env.id == id {
                return env.body.expect("reply has a body");
            }
        }
    }

    /// [`Raw::call`] with the next id of the helpers' own.
    pub async fn request(&mut self, body: Body) -> Body {
        let id = self.take_id();
        self.call(id, body).await
    }

    fn take_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

// Rooms: join, publish, history.
impl Raw {
    /// Joins `room`; panics unless the server answers `Joined`.
    pub async fn join(&mut self, room: &str) -> proto::Joined {
        match self.request(Body::Join(proto::Join { room: room.into() })).await {
            Body::Joined(j) => j,
            other => panic!("joining {room}: expected joined, got {other:?}"),
        }
    }

    /// Publishes `text` to `room` (no idempotency key); panics unless acked.
    pub async fn publish(&mut self, room: &str, text: &str) -> proto::PublishAck {
        self.publish_message(proto::Publish { room: room.into(), text: text.into(), ..Default::default() }).await
    }

    /// Publishes `p` as given; panics unless acked.
    pub async fn publish_message(&mut self, p: proto::Publish) -> proto::PublishAck {
        match self.request(Body::Publish(p)).await {
            Body::PublishAck(a) => a,
            other => panic!("expected publish_ack, got {other:?}"),
        }
    }

    /// Publishes a batch pipelined, every request written in one burst
    /// before any ack is awaited, and returns the acks in the order they
    /// arrived, skipping pushes; panics on any other reply to the batch.
    pub async fn publish_all(&mut self, batch: impl IntoIterator<Item = proto::Publish>) -> Vec<proto::PublishAck> {
        let mut wire = BytesMut::new();
        let first = self.next_id + 1;
        for p in batch {
            let id = self.take_id();
            put_frame(&mut wire, &Envelope::new(id, Body::Publish(p)));
        }
        let ids = first..=self.next_id;
        let n = ids.clone().count();
        let (reader, writer) = (&mut self.reader, &mut self.writer);
        // Written beside the reading, so a long batch cannot block on acks
        // that nobody reads.
        let write = async {
            let _ = writer.write_all(&wire).await;
        };
        let read = async {
            let mut acks = Vec::with_capacity(n);
            while acks.len() < n {
                let f = tokio::time::timeout(WAIT, reader.read_frame()).await.expect("ack in time");
                let f = f.ok().flatten().expect("connection closed while acks were expected");
                let env = decode_envelope(&f).expect("server frames decode");
                match env.body {
                    Some(Body::PublishAck(a)) if ids.contains(&env.id) => acks.push(a),
                    other if ids.contains(&env.id) => panic!("expected publish_ack, got {other:?}"),
                    _ => {}
                }
            }
            acks
        };
        tokio::join!(write, read).1
    }

    /// Every message of `room`, oldest first, read forward page by page.
    pub async fn history_all(&mut self, room: &str) -> Vec<proto::Message> {
        self.history_after(room, 0).await
    }

    /// Every message of `room` after seq `after`, oldest first.
    pub async fn history_after(&mut self, room: &str, after: u64) -> Vec<proto::Message> {
        page_through(async |after_seq| {
            let after_seq = after_seq.max(after);
            let req = proto::History { room: room.into(), after_seq, forward: true, limit: 1000, before_seq: 0 };
            match self.request(Body::History(req)).await {
                Body::HistoryPage(p) => p,
                other => panic!("reading the history of {room}: {other:?}"),
            }
        })
        .await
    }

    /// Sends a Ping and waits for its Pong (skipping pushes): the connection
    /// is still served.
    pub async fn ping(&mut self) {
        let nonce = self.next_id + 1;
        match self.request(Body::Ping(proto::Ping { nonce })).await {
            Body::Pong(p) if p.nonce == nonce => {}
            other => panic!("expected pong {nonce}, got {other:?}"),
        }
    }

    /// Sends a Ping and asserts that the very next frame is its Pong:
    /// nothing else was queued for this connection.
    pub async fn assert_nothing_queued(&mut self) {
        let id = self.take_id();
        self.send(id, Body::Ping(proto::Ping { nonce: id })).await;
        let env = self.recv().await;
        assert!(env.id == id && matches!(env.body, Some(Body::Pong(_))), "expected only the pong, got {env:?}");
    }
}

// Pushes, errors and GoAway.
impl Raw {
    /// The next server push that `pick` takes, skipping other frames.
    pub async fn next_push<T>(&mut self, mut pick: impl FnMut(Body) -> Option<T>) -> T {
        loop {
            if let Some(t) = self.recv().await.body.and_then(&mut pick) {
                return t;
            }
        }
    }

    /// The next `Message` push, skipping other frames.
    pub async fn next_message(&mut self) -> proto::Message {
        self.next_push(|b| if let Body::Message(m) = b { Some(m) } else { None }).await
    }

    /// The next `Presence` push, skipping other frames.
    pub async fn next_presence(&mut self) -> proto::Presence {
        self.next_push(|b| if let Body::Presence(p) = b { Some(p) } else { None }).await
    }

    /// The next `Typing` push, skipping other frames.
    pub async fn next_typing(&mut self) -> proto::Typing {
        self.next_push(|b| if let Body::Typing(t) = b { Some(t) } else { None }).await
    }

    /// Asserts that the next frame is an `Error` with `code`; returns its
    /// message.
    pub async fn expect_error(&mut self, code: ErrorCode) -> String {
        expect_error(self.recv().await.body.as_ref().expect("a frame with a body"), code)
    }

    /// Asserts that the next frame is an `Error` with `code` answering
    /// request `id`; returns its message.
    pub async fn expect_error_reply(&mut self, id: u64, code: ErrorCode) -> String {
        let env = self.recv().await;
        assert_eq!(env.id, id, "the error answers request {id}: {env:?}");
        expect_error(env.body.as_ref().expect("a frame with a body"), code)
    }

    /// Asserts that the next frame is a `GoAway`, and returns it.
    pub async fn next_go_away(&mut self) -> proto::GoAway {
        match self.recv().await.body {
            Some(Body::GoAway(g)) => g,
            other => panic!("expected go_away, got {other:?}"),
        }
    }

    /// Asserts that the next frame is a `GoAway`; returns its reason.
    pub async fn expect_go_away(&mut self) -> CloseReason {
        self.next_go_away().await.reason()
    }

    /// The reason of the `GoAway` among the frames still to come, skipping
    /// any before it; panics if the connection ends without one.
    pub async fn skip_to_go_away(&mut self) -> CloseReason {
        while let Some(env) = self.try_recv().await {
            if let Some(Body::GoAway(g)) = env.body {
                return g.reason();
            }
        }
        panic!("the connection closed without a GoAway");
    }
}

/// Asserts that `body` is an `Error` with `code`, returning its message.
pub fn expect_error(body: &Body, code: ErrorCode) -> String {
    match body {
        Body::Error(e) if e.code() == code => e.message.clone(),
        other => panic!("expected error {code:?}, got {other:?}"),
    }
}

/// Every message of a room, oldest first: reads forward with `page(after)`
/// from the start until a page says there is no more.
pub async fn page_through(mut page: impl AsyncFnMut(u64) -> proto::HistoryPage) -> Vec<proto::Message> {
    let mut all: Vec<proto::Message> = Vec::new();
    loop {
        let after = all.last().map_or(0, |m| m.seq);
        let p = page(after).await;
        assert!(!p.has_more || !p.messages.is_empty(), "a page with more to come holds a message: {p:?}");
        all.extend(p.messages);
        if !p.has_more {
            return all;
        }
    }
}
