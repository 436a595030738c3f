//! Presence and typing: ephemeral, relayed to the room, never stored.

use chatd::proto::{self, Body, ErrorCode};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_follows_the_first_and_last_session() {
    let s = TestServer::start().await;
    let mut ann = s.raw_member("ann", "r").await;
    let (mut bob, _) = s.raw_user("bob").await;
    let j = bob.join("r").await;
    assert_eq!(j.online, vec!["ann".to_string(), "bob".to_string()]);
    // Ann hears that bob, a new member, is online.
    assert_eq!(
        ann.next_presence().await,
        proto::Presence { room: "r".into(), user: "bob".into(), online: true, devices: 1 }
    );

    drop(ann);
    assert_eq!(
        bob.next_presence().await,
        proto::Presence { room: "r".into(), user: "ann".into(), online: false, devices: 0 }
    );
    let (ann1, _) = s.raw_user("ann").await;
    assert_eq!(
        bob.next_presence().await,
        proto::Presence { room: "r".into(), user: "ann".into(), online: true, devices: 1 }
    );
    // A second device is not news; the last one leaving is.
    let (ann2, _) = s.raw_user("ann").await;
    drop(ann1);
    drop(ann2);
    let p = bob.next_presence().await;
    assert_eq!((p.user.as_str(), p.online, p.devices), ("ann", false, 0));
    // Nothing else was queued for bob in between: the next frame is the pong.
    bob.assert_nothing_queued().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_is_relayed_to_others_and_expires_without_a_refresh() {
    let s = TestServer::start().await;
    let mut ann = s.raw_member("ann", "r").await;
    let mut bob = s.raw_member("bob", "r").await;
    // Timed from before the send: the server cannot have received it
    // earlier, so the expiry can never come sooner than the TTL after this.
    let sent = std::time::Instant::now();
    ann.send(0, Body::Typing(proto::Typing { room: "r".into(), user: "someone-else".into(), active: true })).await;
    let t = bob.next_typing().await;
    assert_eq!(t, proto::Typing { room: "r".into(), user: "ann".into(), active: true }, "the server sets the user");
    let t = bob.next_typing().await;
    assert!(!t.active && t.user == "ann");
    let waited = sent.elapsed();
    assert!(waited >= chatd::hub::TYPING_TTL, "expired after the 6 s TTL, not before ({waited:?})");
    // Not echoed to the typist's own connection: its next frame is the pong.
    ann.send(9, Body::Ping(proto::Ping { nonce: 9 })).await;
    let env = ann.recv().await;
    assert!(
        matches!(env.body, Some(Body::Presence(_) | Body::RoomUpdate(_) | Body::Pong(_))),
        "bob's arrival, or the pong: {env:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_stops_when_the_typist_sends_inactive_or_leaves() {
    let s = TestServer::start().await;
    let mut ann = s.raw_member("ann", "r").await;
    let mut bob = s.raw_member("bob", "r").await;
    ann.send(0, Body::Typing(proto::Typing { room: "r".into(), active: true, ..Default::default() })).await;
    assert!(bob.next_typing().await.active);
    ann.send(0, Body::Typing(proto::Typing { room: "r".into(), active: false, ..Default::default() })).await;
    assert!(!bob.next_typing().await.active);
    ann.send(0, Body::Typing(proto::Typing { room: "r".into(), active: true, ..Default::default() })).await;
    assert!(bob.next_typing().await.active);
    drop(ann);
    let t = bob.next_typing().await;
    assert!(!t.active && t.user == "ann", "a typist who goes offline stops typing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_floods_are_rate_limited_and_non_members_refused() {
    let s = TestServer::start().await;
    let mut ann = s.raw_member("ann", "r").await;
    let (mut eve, _) = s.raw_user("eve").await;
    let b = eve.call(3, Body::Typing(proto::Typing { room: "r".into(), active: true, ..Default::default() })).await;
    expect_error(&b, ErrorCode::Forbidden);
    let mut limited = 0;
    for i in 0..40u64 {
        ann.send(100 + i, Body::Typing(proto::Typing { room: "r".into(), active: i % 2 == 0, ..Default::default() }))
            .await;
    }
    ann.send(999, Body::Ping(proto::Ping { nonce: 1 })).await;
    loop {
        let env = ann.recv().await;
        match env.body {
            Some(Body::Error(e)) if e.code() == ErrorCode::RateLimited => limited += 1,
            Some(Body::Pong(_)) => break,
            _ => {}
        }
    }
    assert!(limited >= 20, "most of a 40-message burst is refused ({limited})");
}
