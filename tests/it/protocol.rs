//! Frame-level behaviour: the handshake, bad input of every kind, and
//! authorisation. Each case checks the documented error on the wire and that
//! the server keeps serving others.

use chatd::proto::{self, Body, CloseReason, ErrorCode};

use crate::common::*;

/// A canary that must still chat after each abuse.
async fn canary_still_works(s: &TestServer) {
    let mut r = s.raw_member("canary", "canary").await;
    r.publish("canary", "alive").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_lists_rooms_with_head_and_read_marker() {
    let s = TestServer::start().await;
    let (mut r, w) = s.raw_user("ann").await;
    assert_eq!((w.user.as_str(), w.protocol_version, w.max_frame_bytes), ("ann", 1, 65536));
    assert!(w.rooms.is_empty());
    assert!(w.heartbeat_ms > 0 && !w.session_id.is_empty() && w.server.starts_with("chatd/"));
    r.join("general").await;
    for i in 0..3 {
        r.publish("general", &format!("m{i}")).await;
    }
    let receipt = r.call(20, Body::MarkRead(proto::MarkRead { room: "general".into(), seq: 1 })).await;
    assert!(matches!(receipt, Body::ReadReceipt(ref rr) if rr.seq == 1 && rr.user == "ann"), "{receipt:?}");
    let (_r2, w2) = s.raw_user("ann").await;
    let rooms: Vec<_> = w2.rooms.iter().map(|r| (r.room.as_str(), r.head_seq, r.read_seq)).collect();
    assert_eq!(rooms, vec![("general", 3, 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_before_hello_are_refused_and_closed() {
    let s = TestServer::start().await;
    let mut r = s.raw().await;
    r.send(5, Body::Join(proto::Join { room: "x".into() })).await;
    r.expect_error_reply(5, ErrorCode::Unauthenticated).await;
    assert_eq!(r.expect_go_away().await, CloseReason::AuthFailed);
    assert!(r.closed().await);
    canary_still_works(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_and_expired_tokens_are_refused() {
    let s = TestServer::start().await;
    let expired = mint_token(&s.dir, "ann", std::time::Duration::from_secs(1), chatd::auth::unix_now() - 3600);
    let wrong_key =
        chatd::auth::Auth::new(&[7u8; 32]).mint("ann", std::time::Duration::from_secs(60), chatd::auth::unix_now());
    for (token, why) in [("garbage", "malformed"), (expired.as_str(), "expired"), (wrong_key.as_str(), "signature")] {
        let mut r = s.raw().await;
        r.send_hello(token, vec![]).await;
        let msg = r.expect_error_reply(1, ErrorCode::Unauthenticated).await;
        assert!(msg.contains(why), "{msg:?} should say {why}");
        assert_eq!(r.expect_go_away().await, CloseReason::AuthFailed);
        assert!(r.closed().await);
    }
    canary_still_works(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_protocol_version_is_refused() {
    let s = TestServer::start().await;
    let mut r = s.raw().await;
    r.send(1, Body::Hello(proto::Hello { protocol_version: 2, token: s.token("ann"), ..Default::default() })).await;
    r.expect_error(ErrorCode::UnsupportedVersion).await;
    assert!(r.closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_frames_get_bad_request_and_the_connection_stays_open() {
    let s = TestServer::start().await;
    let (mut r, _) = s.raw_user("ann").await;
    // Garbage that is not an Envelope, but whose id field can be read.
    let mut frame = vec![0x08, 0x2a, 0xff, 0xff, 0xff];
    let mut wire = (frame.len() as u32).to_be_bytes().to_vec();
    wire.append(&mut frame);
    r.send_bytes(&wire).await;
    // The request id is echoed where it could be read.
    r.expect_error_reply(42, ErrorCode::BadRequest).await;
    // An envelope with no body.
    r.send_bytes(&[0, 0, 0, 2, 0x08, 0x07]).await;
    r.expect_error_reply(7, ErrorCode::BadRequest).await;
    // A server-to-client message sent as a request.
    let b = r.call(8, Body::Welcome(proto::Welcome::default())).await;
    expect_error(&b, ErrorCode::BadRequest);
    // A second hello.
    let b = r.call(9, Body::Hello(proto::Hello::default())).await;
    expect_error(&b, ErrorCode::BadRequest);
    // Still serving this connection.
    r.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_length_prefix_closes_the_connection_without_reading_the_body() {
    let s = TestServer::start().await;
    let (mut r, _) = s.raw_user("ann").await;
    r.send_bytes(&u32::MAX.to_be_bytes()).await;
    r.expect_error(ErrorCode::TooLarge).await;
    assert_eq!(r.expect_go_away().await, CloseReason::ProtocolError);
    assert!(r.closed().await);
    // Before Hello too.
    let mut r = s.raw().await;
    r.send_bytes(&(65537u32).to_be_bytes()).await;
    r.expect_error(ErrorCode::TooLarge).await;
    canary_still_works(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_garbage_never_hurts_the_server() {
    // A short handshake timeout closes connections whose garbage announced
    // a frame longer than what was sent.
    let s = TestServer::start_with(|c| c.handshake_timeout_ms = 500).await;
    // Deterministic pseudo-random bytes.
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for round in 0..20 {
        let mut r = s.raw().await;
        let mut junk = Vec::new();
        for _ in 0..(64 + round * 50) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            junk.push(x as u8);
        }
        r.send_bytes(&junk).await;
        // Whatever it was, the server answers with an error or closes.
        assert!(r.closed().await);
    }
    canary_still_works(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_room_names_are_bad_requests() {
    let s = TestServer::start().await;
    let (mut r, _) = s.raw_user("ann").await;
    for (i, name) in ["", "has space", "slash/room", &"x".repeat(129)].into_iter().enumerate() {
        let b = r.call(2 + i as u64, Body::Join(proto::Join { room: name.into() })).await;
        expect_error(&b, ErrorCode::BadRequest);
    }
    let b = r.call(10, Body::Publish(proto::Publish { room: "bad room".into(), ..Default::default() })).await;
    expect_error(&b, ErrorCode::BadRequest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_members_cannot_read_publish_or_mark_read() {
    let s = TestServer::start().await;
    let mut ann = s.raw_member("ann", "private").await;
    ann.publish("private", "secret").await;
    let (mut eve, _) = s.raw_user("eve").await;
    let b = eve
        .call(2, Body::Publish(proto::Publish { room: "private".into(), text: "x".into(), ..Default::default() }))
        .await;
    expect_error(&b, ErrorCode::Forbidden);
    let b = eve.call(3, Body::History(proto::History { room: "private".into(), ..Default::default() })).await;
    expect_error(&b, ErrorCode::Forbidden);
    let b = eve.call(4, Body::MarkRead(proto::MarkRead { room: "private".into(), seq: 1 })).await;
    expect_error(&b, ErrorCode::Forbidden);
    // A resume cursor for a room one is not in gets Left (never a member:
    // no reason), and replays nothing.
    let mut eve2 = s.raw().await;
    let w = eve2.hello(&s.token("eve"), vec![proto::Cursor { room: "private".into(), after_seq: 0 }]).await;
    assert!(w.rooms.is_empty());
    let env = eve2.recv().await;
    assert_eq!(env.body, Some(Body::Left(proto::Left { room: "private".into(), reason: 0, by: String::new() })));
    eve2.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_rooms_admit_only_their_two_users() {
    let s = TestServer::start().await;
    let (mut ann, _) = s.raw_user("ann").await;
    let (mut bob, _) = s.raw_user("bob").await;
    let (mut eve, _) = s.raw_user("eve").await;
    ann.join("dm:ann:bob").await;
    bob.join("dm:ann:bob").await;
    expect_error(&eve.call(2, Body::Join(proto::Join { room: "dm:ann:bob".into() })).await, ErrorCode::Forbidden);
    expect_error(&ann.call(3, Body::Join(proto::Join { room: "dm:bob:ann".into() })).await, ErrorCode::BadRequest);
    expect_error(
        &eve.call(3, Body::History(proto::History { room: "dm:ann:bob".into(), ..Default::default() })).await,
        ErrorCode::Forbidden,
    );
    ann.publish("dm:ann:bob", "hi bob").await;
    let m = bob.next_message().await;
    assert_eq!((m.room.as_str(), m.sender.as_str(), m.text.as_str()), ("dm:ann:bob", "ann", "hi bob"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_stops_delivery_and_membership() {
    let s = TestServer::start().await;
    let mut ann = s.raw_member("ann", "r").await;
    let mut bob = s.raw_member("bob", "r").await;
    assert!(matches!(bob.call(3, Body::Leave(proto::Leave { room: "r".into() })).await, Body::Left(_)));
    ann.publish("r", "after").await;
    expect_error(
        &bob.call(4, Body::Publish(proto::Publish { room: "r".into(), text: "x".into(), ..Default::default() })).await,
        ErrorCode::Forbidden,
    );
    // Bob's connection received no message after leaving: the next frame is
    // the reply to a ping.
    bob.assert_nothing_queued().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_hello_within_the_handshake_timeout_closes() {
    let s = TestServer::start_with(|c| c.handshake_timeout_ms = 300).await;
    let mut r = s.raw().await;
    r.expect_error(ErrorCode::Unauthenticated).await;
    assert_eq!(r.expect_go_away().await, CloseReason::AuthFailed);
    assert!(r.closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_pinged_then_closed() {
    let s = TestServer::start_with(|c| c.idle_timeout_ms = 400).await;
    let (mut r, _) = s.raw_user("ann").await;
    assert!(matches!(r.recv().await.body, Some(Body::Ping(_))));
    assert_eq!(r.expect_go_away().await, CloseReason::IdleTimeout);
    assert!(r.closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_answering_pings_stays_connected() {
    let s = TestServer::start_with(|c| c.idle_timeout_ms = 400).await;
    let (mut r, _) = s.raw_user("ann").await;
    for _ in 0..4 {
        match r.recv().await.body {
            Some(Body::Ping(p)) => r.send(0, Body::Pong(proto::Pong { nonce: p.nonce })).await,
            other => panic!("expected ping, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_are_served_over_http() {
    let s = TestServer::start().await;
    assert_eq!(http_get(&s.http, "/healthz").await, (200, "ok\n".to_string()));
    let (status, body) = http_get(&s.http, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(http_get(&s.http, "/nope").await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_a_direct_conversation_reaches_the_other_user() {
    let s = TestServer::start().await;
    let (mut bob, w) = s.raw_user("bob").await;
    assert!(w.rooms.is_empty());
    let mut ann = s.raw_member("ann", "dm:ann:bob").await;
    // Bob is now a member: his session is told, then gets the messages.
    let env = bob.recv().await;
    match env.body {
        Some(Body::Joined(j)) => {
            assert_eq!(env.id, 0, "a push");
            assert_eq!(j.state.unwrap().room, "dm:ann:bob");
        }
        other => panic!("expected a Joined push, got {other:?}"),
    }
    ann.publish("dm:ann:bob", "psst").await;
    assert_eq!(bob.next_message().await.text, "psst");
    // And the conversation is in his rooms from now on.
    let (_, w) = s.raw_user("bob").await;
    assert_eq!(w.rooms.iter().map(|r| r.room.as_str()).collect::<Vec<_>>(), vec!["dm:ann:bob"]);
    // Nobody else was added.
    let (_, w) = s.raw_user("eve").await;
    assert!(w.rooms.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_user_of_a_started_dm_can_publish_at_once() {
    let s = TestServer::start().await;
    let (mut a, _) = s.raw_user("a").await;
    let (mut b, _) = s.raw_user("b").await;
    a.join("dm:a:b").await;
    b.publish("dm:a:b", "hi").await;
}

/// Every JSON example in the protocol document is an envelope the server
/// reads: the document cannot drift from the schema unnoticed.
#[test]
fn every_json_example_in_the_protocol_document_decodes() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proto/README.md")).unwrap();
    let mut in_json = false;
    let mut checked = 0;
    for line in doc.lines() {
        match line.trim() {
            "```json" => in_json = true,
            "```" => in_json = false,
            l if in_json && l.starts_with('{') => {
                let env: Result<chatd::proto::Envelope, _> = serde_json::from_str(l);
                assert!(env.is_ok_and(|e| e.body.is_some()), "proto/README.md example does not decode: {l}");
                checked += 1;
            }
            _ => {}
        }
    }
    assert!(checked > 20, "only {checked} examples found");
}
