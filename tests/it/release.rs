//! Every way a session ends releases it exactly once: the sessions gauge,
//! the room's online sessions in `/admin`, the offline `Presence` to the
//! room, and the user's place under `max_sessions_per_user` (a session that
//! is never released locks its user out once the limit is reached).
//!
//! One test per way: the client closing, a transport failure on TCP, TLS
//! and WebSocket, a truncated frame, a protocol error, each server `GoAway`
//! (idle timeout, token expiry, slow consumer, shutdown), then a property
//! test over random sequences of opens and close paths on both transports.

use std::time::Duration;

use chat_client::{Event, Events};
use chatd::proto::{self, Body, CloseReason, ErrorCode};
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;

use crate::common::*;

const ADMIN: &str = "release-admin-token";
const ROOM: &str = "r";

/// A server with an admin token and one session per user, so a session
/// that is not released shows as a refused reconnect.
async fn server(tweak: impl FnOnce(&mut chatd::config::Config)) -> TestServer {
    TestServer::start_with(|c| {
        c.admin_token = Some(ADMIN.into());
        c.max_sessions_per_user = 1;
        tweak(c);
    })
    .await
}

/// A member of the room that watches presence; `chat-client` answers the
/// server's pings, so it outlives every idle timeout in these tests.
async fn watcher(s: &TestServer) -> (chat_client::Client, Events) {
    let (w, ev) = s.client("watcher").await;
    w.join(ROOM).await.unwrap();
    (w, ev)
}

/// `user`'s next presence change in the room, skipping everything else.
async fn next_presence(events: &mut Events, user: &str) -> bool {
    next_event(events, "presence", |e| match e {
        Event::Presence(p) if p.user == user && p.room == ROOM => Some(p.online),
        _ => None,
    })
    .await
}

/// The room's online sessions as `/admin/rooms/{room}` reports them.
async fn admin_online(s: &TestServer) -> u64 {
    let (status, v) = admin_get(&s.http, &format!("/admin/rooms/{ROOM}"), Some(ADMIN)).await;
    assert_eq!(status, 200, "{v}");
    v["online_sessions"].as_u64().expect("online_sessions")
}

/// Polls until the gauge and the admin view agree on `sessions` open
/// (bounded; the release runs on the connection's task).
async fn await_sessions(s: &TestServer, sessions: usize) {
    let what = format!("{sessions} sessions");
    wait_for(&what, Polling::new(WAIT, 20), async || {
        let (gauge, online) = if s.tls.is_some() {
            // With TLS the HTTP listener speaks HTTPS: read the state that
            // /metrics and /admin render straight from the hub.
            let hub = s.server.as_ref().unwrap().hub();
            let room = hub.rooms().into_iter().find(|r| &*r.name == ROOM).expect("the room");
            (hub.online_counts().1 as f64, room.subscriber_count() as u64)
        } else {
            (metric(&scrape_metrics(&s.http).await, "chatd_sessions"), admin_online(s).await)
        };
        if gauge == sessions as f64 && online == sessions as u64 {
            Ok(())
        } else {
            Err(format!("chatd_sessions {gauge}, /admin online_sessions {online}"))
        }
    })
    .await
}

/// Everything a released session must leave behind: the watcher told that
/// `user` went offline, one session left (the watcher's), and `user` free to
/// connect again although only one session per user is allowed.
async fn assert_released(s: &TestServer, watcher: &mut Events, user: &str) {
    assert!(!next_presence(watcher, user).await, "{user} went offline");
    await_sessions(s, 1).await;
    assert_can_reconnect(s, watcher, user).await;
}

/// `user`, with no session open, connects again (one session per user is
/// allowed), comes online, leaves, and goes offline.
async fn assert_can_reconnect(s: &TestServer, watcher: &mut Events, user: &str) {
    let (mut again, w) = s.raw_user(user).await;
    assert_eq!(w.user, user, "{user} may connect again");
    assert!(w.rooms.iter().any(|r| r.room == ROOM));
    assert!(next_presence(watcher, user).await, "{user} is back online");
    drop(again.writer.shutdown().await);
    assert!(!next_presence(watcher, user).await);
    await_sessions(s, 1).await;
}

/// Sets up the watcher and `user` on TCP, and waits for both to count.
async fn watched_tcp_member(s: &TestServer, user: &str) -> (chat_client::Client, Events, Raw) {
    let (w, mut ev) = watcher(s).await;
    let r = s.raw_member(user, ROOM).await;
    assert!(next_presence(&mut ev, user).await);
    await_sessions(s, 2).await;
    (w, ev, r)
}

/// Closes a TCP socket with a reset (SO_LINGER 0): the server's next read
/// fails, rather than seeing an orderly end.
fn reset(stream: &tokio::net::TcpStream) {
    socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO)).unwrap();
}

/// Resets a raw connection: no FIN first (dropping the write half would
/// send one).
fn reset_raw(r: Raw) {
    reset(r.writer.as_ref());
    r.writer.forget();
    drop(r.reader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_closes_its_connection_is_released() {
    let s = server(|_| {}).await;
    let (_w, mut ev, mut r) = watched_tcp_member(&s, "ann").await;
    r.writer.shutdown().await.unwrap();
    assert_released(&s, &mut ev, "ann").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_tcp_connection_is_released() {
    let s = server(|_| {}).await;
    let (_w, mut ev, r) = watched_tcp_member(&s, "ann").await;
    reset_raw(r);
    assert_released(&s, &mut ev, "ann").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_ends_inside_a_frame_is_released() {
    let s = server(|_| {}).await;
    let (_w, mut ev, mut r) = watched_tcp_member(&s, "ann").await;
    // A length prefix of 100 bytes, 3 of them sent, then the end.
    r.send_bytes(&[0, 0, 0, 100, 1, 2, 3]).await;
    r.writer.shutdown().await.unwrap();
    assert_released(&s, &mut ev, "ann").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_error_goaway_releases_the_session() {
    let s = server(|_| {}).await;
    let (_w, mut ev, mut r) = watched_tcp_member(&s, "ann").await;
    // A prefix over max_frame_bytes: Error{TOO_LARGE}, GoAway{PROTOCOL_ERROR}.
    r.send_bytes(&u32::MAX.to_be_bytes()).await;
    assert_eq!(r.skip_to_go_away().await, CloseReason::ProtocolError);
    assert_released(&s, &mut ev, "ann").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_timeout_goaway_releases_the_session() {
    let s = server(|c| c.idle_timeout_ms = 600).await;
    let (_w, mut ev, mut r) = watched_tcp_member(&s, "idler").await;
    // The raw connection never answers the server's ping.
    assert_eq!(r.skip_to_go_away().await, CloseReason::IdleTimeout);
    assert_released(&s, &mut ev, "idler").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expiry_goaway_releases_the_session_and_the_token_is_refused_from_then_on() {
    let s = server(|_| {}).await;
    let (_w, mut ev) = watcher(&s).await;
    let token = s.token_valid_for("expirer", Duration::from_secs(2));
    let mut r = Raw::connect_as(&s.addr, &token).await;
    r.join(ROOM).await;
    assert!(next_presence(&mut ev, "expirer").await);
    assert_eq!(r.skip_to_go_away().await, CloseReason::AuthExpired);
    assert!(!next_presence(&mut ev, "expirer").await);
    await_sessions(&s, 1).await;
    // The token the server has just expired opens no new session.
    let mut retry = s.raw().await;
    retry.send_hello(&token, vec![]).await;
    retry.expect_error(ErrorCode::Unauthenticated).await;
    assert_eq!(retry.skip_to_go_away().await, CloseReason::AuthFailed);
    await_sessions(&s, 1).await;
    // A fresh token does.
    assert_can_reconnect(&s, &mut ev, "expirer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_goaway_releases_the_session_while_the_peer_keeps_its_socket_open() {
    let s = server(|c| {
        c.slow_consumer_timeout_ms = 300;
        c.outbound_max_bytes = 64 * 1024;
        c.outbound_max_frames = 64;
    })
    .await;
    let (w, mut ev) = watcher(&s).await;
    let mut slow = Raw::connect_small(&s.addr).await;
    slow.hello(&s.token("slow"), vec![]).await;
    slow.join(ROOM).await;
    assert!(next_presence(&mut ev, "slow").await);
    // The slow member reads nothing and keeps its socket open: only the
    // server can end this session.
    let text = "x".repeat(4000);
    let mut online = true;
    Polling::new(WAIT * 3, 0)
        .until("the slow member to be let go", async || {
            for _ in 0..16 {
                w.publish(ROOM, &text).await.unwrap();
            }
            while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(1), ev.recv()).await {
                if let Event::Presence(p) = e
                    && p.user == "slow"
                {
                    online = p.online;
                }
            }
            !online
        })
        .await;
    await_sessions(&s, 1).await;
    let (again, _) = s.raw_user("slow").await;
    drop(again);
    drop(slow);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_goaway_releases_every_session() {
    let mut s = server(|_| {}).await;
    let (_w, mut ev, mut r) = watched_tcp_member(&s, "ann").await;
    let mut ws = s.ws_user("bob").await;
    ws.join(ROOM).await;
    assert!(next_presence(&mut ev, "bob").await);
    await_sessions(&s, 3).await;
    let server = s.server.take().unwrap();
    let hub = server.hub().clone();
    server.shutdown().await;
    assert_eq!(r.skip_to_go_away().await, CloseReason::Shutdown);
    assert_eq!(hub.online_counts(), (0, 0), "users and sessions online after shutdown");
    for room in hub.rooms() {
        assert_eq!(room.subscriber_count(), 0, "{} keeps subscribers", room.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_tls_connection_is_released() {
    let s = server(|c| {
        c.dev_tls = true;
        c.tls = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let (_w, mut ev) = watcher(&s).await;
    let all = [&rustls::version::TLS13, &rustls::version::TLS12];
    let mut tls = crate::tls::tls_connect(s.tls.as_ref().unwrap(), &s.dir.join("tls/dev-cert.pem"), &all, b"chatd/1")
        .await
        .unwrap();
    let mut buf = bytes::BytesMut::new();
    let hello = proto::Hello { protocol_version: 1, token: s.token("ann"), device: "tls".into(), resume: vec![] };
    chatd::codec::put_frame(&mut buf, &proto::Envelope::new(1, Body::Hello(hello)));
    chatd::codec::put_frame(&mut buf, &proto::Envelope::new(2, Body::Join(proto::Join { room: ROOM.into() })));
    tls.write_all(&buf).await.unwrap();
    tls.flush().await.unwrap();
    assert!(next_presence(&mut ev, "ann").await);
    await_sessions(&s, 2).await;
    // No close_notify, no FIN: a reset under the TLS session.
    let (tcp, _) = tls.into_inner();
    reset(&tcp);
    drop(tcp);
    assert_released(&s, &mut ev, "ann").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_sessions_are_released_on_a_close_and_on_a_reset() {
    let s = server(|_| {}).await;
    let (_w, mut ev) = watcher(&s).await;
    for how in ["close", "reset"] {
        let mut ws = s.ws_user("ann").await;
        ws.join(ROOM).await;
        assert!(next_presence(&mut ev, "ann").await, "{how}");
        await_sessions(&s, 2).await;
        match how {
            "close" => ws.ws.close(None).await.unwrap(),
            _ => match ws.ws.get_ref() {
                tokio_tungstenite::MaybeTlsStream::Plain(tcp) => reset(tcp),
                _ => unreachable!("plain ws"),
            },
        }
        drop(ws);
        assert_released(&s, &mut ev, "ann").await;
    }
}

/// One step of the property test.
#[derive(Debug, Clone)]
enum Step {
    /// `user` opens a session on TCP (`ws` false) or WebSocket and joins.
    Open { user: usize, ws: bool },
    /// The `nth` open session (modulo their number) ends by `path`.
    Close { nth: usize, path: Path },
}

/// How a session ends in the property test (the ways that take no waiting
/// for a deadline; those have their own tests above).
#[derive(Debug, Clone, Copy)]
enum Path {
    /// The client closes: FIN on TCP, a close frame on WebSocket.
    Close,
    /// The socket is reset.
    Reset,
    /// TCP: the connection ends inside a frame. WebSocket: a message over
    /// the limit (close 1009).
    Broken,
    /// TCP: an oversize length prefix, answered with a GoAway. WebSocket:
    /// text that is not JSON, answered with an error, then a close frame.
    ProtocolError,
}

enum Conn {
    Tcp(Raw),
    Ws(Box<Ws>),
}

const USERS: [&str; 3] = ["u0", "u1", "u2"];
const MAX_SESSIONS: usize = 2;

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let path = prop_oneof![Just(Path::Close), Just(Path::Reset), Just(Path::Broken), Just(Path::ProtocolError)];
    let step = prop_oneof![
        (0..USERS.len(), any::<bool>()).prop_map(|(user, ws)| Step::Open { user, ws }),
        (0..8usize, path).prop_map(|(nth, path)| Step::Close { nth, path }),
    ];
    proptest::collection::vec(step, 1..14)
}

async fn end(conn: Conn, path: Path, max_frame: usize) {
    use futures_util::SinkExt as _;
    use tokio_tungstenite::tungstenite::Message;
    match (conn, path) {
        (Conn::Tcp(mut r), Path::Close) => r.writer.shutdown().await.unwrap(),
        (Conn::Tcp(r), Path::Reset) => reset_raw(r),
        (Conn::Tcp(mut r), Path::Broken) => {
            r.send_bytes(&[0, 0, 1, 0, 9]).await;
            r.writer.shutdown().await.unwrap();
        }
        (Conn::Tcp(mut r), Path::ProtocolError) => {
            r.send_bytes(&u32::MAX.to_be_bytes()).await;
            assert_eq!(r.skip_to_go_away().await, CloseReason::ProtocolError);
        }
        (Conn::Ws(mut ws), Path::Close) => ws.ws.close(None).await.unwrap(),
        (Conn::Ws(ws), Path::Reset) => match ws.ws.get_ref() {
            tokio_tungstenite::MaybeTlsStream::Plain(tcp) => reset(tcp),
            _ => unreachable!("plain ws"),
        },
        (Conn::Ws(mut ws), Path::Broken) => {
            let _ = ws.ws.send(Message::Binary(vec![0u8; max_frame + 1].into())).await;
            loop {
                match ws.recv().await {
                    Received::Closed(_) | Received::Failed => break,
                    _ => continue,
                }
            }
        }
        (Conn::Ws(mut ws), Path::ProtocolError) => {
            ws.send_text("{ not json").await;
            // Presence of the other users may come first.
            ws.next_with("error").await;
            ws.ws.close(None).await.unwrap();
        }
    }
}

/// Runs `steps` against a fresh server, checking after each step that the
/// gauge and `/admin` count exactly the sessions the model holds open, that
/// an open beyond the per-user limit is refused and nothing else is, and at
/// the end that the watcher saw each user go online with their first
/// connection and offline with their last, in order, and nothing more.
async fn run_steps(steps: Vec<Step>) {
    let max_frame = 4096;
    let s = TestServer::start_with(|c| {
        c.admin_token = Some(ADMIN.into());
        c.max_sessions_per_user = MAX_SESSIONS;
        c.max_frame_bytes = max_frame;
    })
    .await;
    let (w, mut ev) = watcher(&s).await;
    // Every user a member first, so each open says presence only.
    for u in USERS {
        let r = s.raw_member(u, ROOM).await;
        drop(r);
        assert!(next_presence(&mut ev, u).await);
        assert!(!next_presence(&mut ev, u).await);
    }
    await_sessions(&s, 1).await;
    let mut open: Vec<(usize, Conn)> = Vec::new();
    let mut expected: Vec<(usize, bool)> = Vec::new();
    for step in steps {
        match step {
            Step::Open { user, ws } => {
                let count = open.iter().filter(|(u, _)| *u == user).count();
                let token = s.token(USERS[user]);
                if count == MAX_SESSIONS {
                    let mut r = s.raw().await;
                    r.send_hello(&token, vec![]).await;
                    r.expect_error(ErrorCode::ServerBusy).await;
                    assert_eq!(r.skip_to_go_away().await, CloseReason::Capacity);
                    continue;
                }
                let conn = if ws {
                    let mut c = Ws::connect(&s.http).await;
                    c.hello(&token).await;
                    Conn::Ws(Box::new(c))
                } else {
                    Conn::Tcp(Raw::connect_as(&s.addr, &token).await)
                };
                if count == 0 {
                    expected.push((user, true));
                }
                open.push((user, conn));
            }
            Step::Close { nth, path } => {
                if open.is_empty() {
                    continue;
                }
                let (user, conn) = open.remove(nth % open.len());
                end(conn, path, max_frame).await;
                if !open.iter().any(|(u, _)| *u == user) {
                    expected.push((user, false));
                }
            }
        }
        await_sessions(&s, open.len() + 1).await;
    }
    // A marker after the last step: every presence push was queued to the
    // watcher before the gauge that was awaited above changed.
    let marker = w.publish(ROOM, "end of steps").await.unwrap();
    let mut seen = Vec::new();
    loop {
        match next_event(&mut ev, "the marker", |e| matches!(e, Event::Presence(_) | Event::Message(_)).then_some(e))
            .await
        {
            Event::Presence(p) => {
                let user = USERS.iter().position(|u| *u == p.user).expect("a test user");
                seen.push((user, p.online));
            }
            Event::Message(m) if m.seq == marker.seq => break,
            _ => continue,
        }
    }
    assert_eq!(seen, expected, "presence seen by the watcher");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_close_paths_release_every_session_exactly_once(steps in steps()) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run_steps(steps));
    }
}
