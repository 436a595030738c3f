//! Retention: a room's oldest messages removed by count and by age, by the
//! server's default or the room's own limits (the owner's to set); where
//! the log starts said in `HistoryPage` and `Synced`; resume from before
//! the start incomplete; seqs never reused; unread counts and read markers
//! right across a trim and a restart. (A trim cut short by a crash is the
//! sled store's unit test.)

use chatd::proto::{self, Body, ErrorCode};

use crate::common::{ChatServer, Raw, TestServer, expect_error, wait_until};

/// Publishes `n` messages as `r`'s user, the ones at `mention` mentioning
/// `who`; returns the last seq.
async fn publish(r: &mut Raw, room: &str, n: u64, mention: impl Fn(u64) -> Option<&'static str>) -> u64 {
    let mut last = 0;
    for i in 0..n {
        let p = proto::Publish {
            room: room.into(),
            text: format!("m{i}"),
            mentions: mention(i).map(|u| vec![u.to_string()]).unwrap_or_default(),
            ..Default::default()
        };
        last = r.publish_message(p).await.seq;
    }
    last
}

async fn page(r: &mut Raw, room: &str, after: u64, forward: bool) -> proto::HistoryPage {
    let h = proto::History {
        room: room.into(),
        after_seq: if forward { after } else { 0 },
        before_seq: if forward { 0 } else { after },
        limit: 1000,
        forward,
    };
    match r.request(Body::History(h)).await {
        Body::HistoryPage(p) => p,
        other => panic!("expected a history page, got {other:?}"),
    }
}

async fn first_seq(r: &mut Raw, room: &str) -> u64 {
    page(r, room, 0, true).await.first_seq
}

/// A server that keeps the newest 10 messages of every room, checked every 20 ms.
async fn keeping_ten() -> TestServer {
    TestServer::start_with(|c| {
        c.retention_max_messages = 10;
        c.retention_interval_ms = 20;
    })
    .await
}

fn seqs(p: &proto::HistoryPage) -> Vec<u64> {
    p.messages.iter().map(|m| m.seq).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_limit_trims_the_oldest_and_history_and_resume_start_after_them() {
    let s = keeping_ten().await;
    let mut ann = s.raw_member("ann", "r").await;
    let mut bob = s.raw_member("bob", "r").await;
    let head = publish(&mut ann, "r", 30, |_| None).await;
    assert_eq!(head, 30);
    wait_until("the log starts at 21", async || first_seq(&mut bob, "r").await == 21).await;

    let forward = page(&mut bob, "r", 0, true).await;
    assert_eq!((seqs(&forward), forward.head_seq, forward.has_more), ((21..=30).collect(), 30, false));
    let backward = page(&mut bob, "r", 0, false).await;
    assert_eq!((seqs(&backward), backward.has_more, backward.first_seq), ((21..=30).collect(), false, 21));
    let below = page(&mut bob, "r", 21, false).await;
    assert_eq!((seqs(&below), below.has_more), (vec![], false), "nothing before the start");

    // A cursor from before the start gets what remains and is told.
    let mut cat = s.raw().await;
    cat.hello(&s.token("bob"), vec![proto::Cursor { room: "r".into(), after_seq: 5 }]).await;
    for seq in 21..=30 {
        assert_eq!(cat.next_message().await.seq, seq);
    }
    match cat.recv().await.body {
        Some(Body::Synced(sy)) => {
            assert_eq!((sy.head_seq, sy.complete, sy.first_seq), (30, false, 21))
        }
        other => panic!("expected synced, got {other:?}"),
    }
    // One within what remains is complete.
    let mut dan = s.raw().await;
    dan.hello(&s.token("bob"), vec![proto::Cursor { room: "r".into(), after_seq: 25 }]).await;
    for seq in 26..=30 {
        assert_eq!(dan.next_message().await.seq, seq);
    }
    match dan.recv().await.body {
        Some(Body::Synced(sy)) => assert_eq!((sy.complete, sy.first_seq), (true, 21)),
        other => panic!("expected synced, got {other:?}"),
    }
    // Changes to a removed message find nothing.
    let react = proto::React { room: "r".into(), seq: 3, key: "+1".into(), add: true, client_msg_id: String::new() };
    expect_error(&bob.request(Body::React(react)).await, ErrorCode::NotFound);

    // Seqs go on, and the limit keeps holding.
    assert_eq!(publish(&mut ann, "r", 5, |_| None).await, 35);
    wait_until("the log starts at 26", async || first_seq(&mut bob, "r").await == 26).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_age_limit_removes_old_messages_and_seqs_are_never_reused_after_all_are_gone() {
    let s = TestServer::start_with(|c| {
        c.retention_max_age = "1s".into();
        c.retention_interval_ms = 20;
    })
    .await;
    let mut ann = s.raw_member("ann", "r").await;
    publish(&mut ann, "r", 5, |_| None).await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    publish(&mut ann, "r", 3, |_| None).await;
    wait_until("the five old ones are gone", async || first_seq(&mut ann, "r").await == 6).await;
    assert_eq!(seqs(&page(&mut ann, "r", 0, true).await), vec![6, 7, 8]);
    // Then the rest age out too: the log is empty, its head stays.
    wait_until("every message is gone", async || first_seq(&mut ann, "r").await == 9).await;
    let p = page(&mut ann, "r", 0, true).await;
    assert_eq!((p.messages.len(), p.head_seq, p.has_more), (0, 8, false));

    let dir = s.dir.clone();
    let tmp = s.stop().await;
    let s = TestServer::start_in(&dir, |c| c.retention_max_age = "1s".into()).await;
    let mut ann = s.raw_member("ann", "r").await;
    assert_eq!(first_seq(&mut ann, "r").await, 9, "the start is kept across a restart");
    assert_eq!(ann.publish("r", "after").await.seq, 9, "seqs are never reused");
    drop(tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_sets_its_own_retention_by_its_owner_only() {
    let s = TestServer::start_with(|c| c.retention_interval_ms = 20).await;
    let mut own = s.raw_member("own", "kept-short").await;
    let mut ann = s.raw_member("ann", "kept-short").await;
    let mut other = s.raw_member("own", "kept-all").await;
    publish(&mut own, "kept-short", 8, |_| None).await;
    publish(&mut other, "kept-all", 8, |_| None).await;

    let update = |n| {
        Body::UpdateRoom(proto::UpdateRoom {
            room: "kept-short".into(),
            retention_max_messages: Some(n),
            ..Default::default()
        })
    };
    expect_error(&ann.request(update(3)).await, ErrorCode::Forbidden);
    match own.request(update(3)).await {
        Body::RoomInfo(info) => assert_eq!((info.retention_max_messages, info.retention_max_age_ms), (3, 0)),
        other => panic!("expected room info, got {other:?}"),
    }
    wait_until("kept-short keeps 3", async || first_seq(&mut ann, "kept-short").await == 6).await;
    assert_eq!(seqs(&page(&mut ann, "kept-short", 0, true).await), vec![6, 7, 8]);
    assert_eq!(first_seq(&mut other, "kept-all").await, 1, "the default keeps everything");

    // The setting is stored with the room.
    let dir = s.dir.clone();
    let tmp = s.stop().await;
    let s = TestServer::start_in(&dir, |c| c.retention_interval_ms = 20).await;
    let mut own = s.raw_member("own", "kept-short").await;
    publish(&mut own, "kept-short", 3, |_| None).await;
    wait_until("still 3 after a restart", async || first_seq(&mut own, "kept-short").await == 9).await;
    drop(tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_counts_and_read_markers_count_only_what_remains() {
    let s = keeping_ten().await;
    let mut ann = s.raw_member("ann", "r").await;
    let mut bob = s.raw_member("bob", "r").await;
    s.raw_member("cat", "r").await;
    publish(&mut ann, "r", 3, |_| None).await;
    match bob.request(Body::MarkRead(proto::MarkRead { room: "r".into(), seq: 2 })).await {
        Body::ReadReceipt(r) => assert_eq!(r.seq, 2),
        other => panic!("expected a read receipt, got {other:?}"),
    }
    // 27 more by ann, every third mentioning bob; bob posts one of his own.
    publish(&mut ann, "r", 26, |i| (i % 3 == 0).then_some("bob")).await;
    publish(&mut bob, "r", 1, |_| None).await;
    wait_until("the log starts at 21", async || first_seq(&mut bob, "r").await == 21).await;

    // What remains: 21..=30, 9 by ann (mentions of bob at 22, 25, 28) and bob's own.
    let state = |w: &proto::Welcome| {
        let r = w.rooms.iter().find(|r| r.room == "r").unwrap();
        (r.unread, r.mentions, r.read_seq)
    };
    let (_, w) = s.raw_user("bob").await;
    assert_eq!(state(&w), (9, 3, 2), "bob's marker is below the start: only what remains counts");
    let (_, w) = s.raw_user("cat").await;
    assert_eq!(state(&w), (10, 0, 0), "no marker: everything that remains");

    // A marker set below the start lands on it.
    match bob.request(Body::MarkRead(proto::MarkRead { room: "r".into(), seq: 5 })).await {
        Body::ReadReceipt(r) => assert_eq!(r.seq, 20),
        other => panic!("expected a read receipt, got {other:?}"),
    }
    match bob.request(Body::MarkRead(proto::MarkRead { room: "r".into(), seq: 25 })).await {
        Body::ReadReceipt(r) => assert_eq!(r.seq, 25),
        other => panic!("expected a read receipt, got {other:?}"),
    }
    let (_, w) = s.raw_user("bob").await;
    assert_eq!(state(&w), (4, 1, 25));

    // And across a restart.
    let dir = s.dir.clone();
    let tmp = s.stop().await;
    let s = TestServer::start_in(&dir, |c| c.retention_max_messages = 10).await;
    let (_, w) = s.raw_user("bob").await;
    assert_eq!(state(&w), (4, 1, 25));
    let (_, w) = s.raw_user("cat").await;
    assert_eq!(state(&w), (10, 0, 0));
    drop(tmp);
}
