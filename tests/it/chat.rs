//! Room semantics through the client library and pipelined raw publishers.

use std::collections::HashMap;

use chat_client::Event;
use chatd::proto::{self, Body};

use crate::common::*;

/// Joins `room` as `user` and publishes `n` messages in one burst
/// (pipelined), keys `user-i`; returns the `n` acks.
async fn pipelined_publisher(s: &TestServer, user: &str, room: &str, n: u64) -> Vec<proto::PublishAck> {
    let mut r = s.raw_member(user, room).await;
    let acks = r
        .publish_all((0..n).map(|i| proto::Publish {
            room: room.into(),
            client_msg_id: format!("{user}-{i}"),
            text: format!("{user} {i}"),
            ..Default::default()
        }))
        .await;
    for (i, a) in acks.iter().enumerate() {
        assert_eq!(a.client_msg_id, format!("{user}-{i}"), "acks come in request order for one room");
    }
    acks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishes_from_several_clients_get_contiguous_seqs_in_order() {
    let s = TestServer::start().await;
    let (_watcher, mut events) = s.client("watcher").await;
    _watcher.join("busy").await.unwrap();
    const PER: u64 = 150;
    let users = ["p0", "p1", "p2", "p3"];
    let mut tasks = Vec::new();
    let s = std::sync::Arc::new(s);
    for u in users {
        let s = s.clone();
        tasks.push(tokio::spawn(async move { pipelined_publisher(&s, u, "busy", PER).await }));
    }
    let mut all_acks = Vec::new();
    for t in tasks {
        let acks = t.await.unwrap();
        // One publisher's seqs increase in the order it sent them.
        assert!(acks.windows(2).all(|w| w[0].seq < w[1].seq));
        assert!(acks.iter().all(|a| !a.duplicate && a.ts_ms > 0));
        all_acks.extend(acks);
    }
    let mut seqs: Vec<u64> = all_acks.iter().map(|a| a.seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=PER * 4).collect::<Vec<_>>(), "seqs are contiguous from 1, none reused");

    let msgs = collect_messages(&mut events, (PER * 4) as usize).await;
    assert_eq!(msgs.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=PER * 4).collect::<Vec<_>>());
    // Each publisher's messages arrive in the order it sent them.
    let mut last: HashMap<String, i64> = HashMap::new();
    for m in &msgs {
        let n: i64 = m.text.rsplit(' ').next().unwrap().parse().unwrap();
        let prev = last.insert(m.sender.clone(), n).unwrap_or(-1);
        assert_eq!(n, prev + 1, "publisher {} order", m.sender);
    }
    // Acks and messages agree on seq and timestamp.
    let by_seq: HashMap<u64, &proto::PublishAck> = all_acks.iter().map(|a| (a.seq, a)).collect();
    for m in &msgs {
        let a = by_seq[&m.seq];
        assert_eq!((a.ts_ms, &a.client_msg_id), (m.ts_ms, &m.client_msg_id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_and_every_device_receives_every_message() {
    let s = TestServer::start().await;
    let (ann_phone, mut ann_phone_ev) = s.client_with("ann", |c| c.device = "phone".into()).await;
    ann_phone.join("team").await.unwrap();
    // A second device of a member is subscribed from its Welcome.
    let (_ann_laptop, mut ann_laptop_ev) = s.client_with("ann", |c| c.device = "laptop".into()).await;
    let (bob, mut bob_ev) = s.client("bob").await;
    bob.join("team").await.unwrap();
    let (_bob2, mut bob2_ev) = s.client("bob").await;

    for i in 0..20 {
        let c = if i % 2 == 0 { &ann_phone } else { &bob };
        c.publish("team", &format!("m{i}")).await.unwrap();
    }
    for (who, ev) in [
        ("ann phone", &mut ann_phone_ev),
        ("ann laptop", &mut ann_laptop_ev),
        ("bob", &mut bob_ev),
        ("bob 2", &mut bob2_ev),
    ] {
        let msgs = collect_messages(ev, 20).await;
        let texts: Vec<String> = msgs.iter().map(|m| m.text.clone()).collect();
        assert_eq!(texts, (0..20).map(|i| format!("m{i}")).collect::<Vec<_>>(), "{who}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_client_msg_id_is_stored_once() {
    let s = TestServer::start().await;
    let (c, mut ev) = s.client("ann").await;
    c.join("r").await.unwrap();
    let p = proto::Publish { room: "r".into(), client_msg_id: "k1".into(), text: "once".into(), ..Default::default() };
    let first = c.publish_message(p.clone()).await.unwrap();
    let again = c.publish_message(p.clone()).await.unwrap();
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!((again.seq, again.ts_ms, again.room.as_str()), (first.seq, first.ts_ms, "r"));
    // From another device of the same user: still the same message.
    let (c2, _) = s.client("ann").await;
    assert_eq!(c2.publish_message(p.clone()).await.unwrap().seq, first.seq);
    // Another user may use the same key for their own message.
    let (bob, _) = s.client("bob").await;
    bob.join("r").await.unwrap();
    let theirs = bob.publish_message(p).await.unwrap();
    assert!(!theirs.duplicate && theirs.seq == first.seq + 1);
    let page = c.history(proto::History { room: "r".into(), ..Default::default() }).await.unwrap();
    assert_eq!(page.messages.len(), 2);
    assert_eq!(next_message(&mut ev).await.seq, 1);
    assert_eq!(next_message(&mut ev).await.seq, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_racing_its_original_gets_the_same_seq() {
    let s = TestServer::start().await;
    let mut r = s.raw_member("ann", "r").await;
    let same =
        proto::Publish { room: "r".into(), client_msg_id: "same".into(), text: "x".into(), ..Default::default() };
    let acks = r.publish_all([same.clone(), same.clone(), same]).await;
    assert!(acks.iter().all(|a| a.seq == 1));
    assert_eq!(acks.iter().filter(|a| !a.duplicate).count(), 1);
    let page = r.call(20, Body::History(proto::History { room: "r".into(), ..Default::default() })).await;
    assert!(matches!(page, Body::HistoryPage(ref p) if p.messages.len() == 1 && p.head_seq == 1), "{page:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_both_ways() {
    let s = TestServer::start().await;
    pipelined_publisher(&s, "ann", "log", 250).await;
    let (c, _) = s.client("ann").await;
    let page = |before_seq, after_seq, limit, forward| {
        let c = c.clone();
        async move { c.history(proto::History { room: "log".into(), before_seq, after_seq, limit, forward }).await.unwrap() }
    };
    let seqs = |p: &proto::HistoryPage| p.messages.iter().map(|m| m.seq).collect::<Vec<_>>();

    let p = page(0, 0, 0, false).await;
    assert_eq!((seqs(&p), p.has_more, p.head_seq), ((151..=250).collect(), true, 250));
    let p = page(151, 0, 100, false).await;
    assert_eq!((seqs(&p), p.has_more), ((51..=150).collect(), true));
    let p = page(51, 0, 100, false).await;
    assert_eq!((seqs(&p), p.has_more), ((1..=50).collect(), false));
    let p = page(1, 0, 100, false).await;
    assert_eq!((seqs(&p), p.has_more), (vec![], false));

    let p = page(0, 0, 100, true).await;
    assert_eq!((seqs(&p), p.has_more), ((1..=100).collect(), true));
    let p = page(0, 200, 100, true).await;
    assert_eq!((seqs(&p), p.has_more), ((201..=250).collect(), false));
    let p = page(0, 250, 100, true).await;
    assert_eq!((seqs(&p), p.has_more), (vec![], false));
    // Bounds are exclusive; a window in the middle.
    let p = page(0, 10, 5, true).await;
    assert_eq!(seqs(&p), vec![11, 12, 13, 14, 15]);
    // limit above 1000 is capped; the whole log fits.
    let p = page(0, 0, 50_000, true).await;
    assert_eq!((p.messages.len(), p.has_more), (250, false));
    assert!(p.messages.iter().all(|m| m.room == "log" && m.sender == "ann" && m.ts_ms > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_markers_clamp_never_go_back_and_reach_the_other_sessions() {
    let s = TestServer::start().await;
    let (ann, _) = s.client("ann").await;
    ann.join("r").await.unwrap();
    for i in 0..5 {
        ann.publish("r", &format!("{i}")).await.unwrap();
    }
    let (_ann2, mut ann2_ev) = s.client("ann").await;
    let (bob, mut bob_ev) = s.client("bob").await;
    bob.join("r").await.unwrap();

    assert_eq!(ann.mark_read("r", 3).await.unwrap().seq, 3);
    assert_eq!(ann.mark_read("r", 2).await.unwrap().seq, 3, "never backwards");
    assert_eq!(ann.mark_read("r", 99).await.unwrap().seq, 5, "clamped to the head");
    // The other sessions saw the marker move (3, then 5), not the no-op.
    for ev in [&mut ann2_ev, &mut bob_ev] {
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let r =
                next_event(ev, "read receipt", |e| if let Event::ReadReceipt(r) = e { Some(r) } else { None }).await;
            assert_eq!((r.user.as_str(), r.room.as_str()), ("ann", "r"));
            seen.push(r.seq);
        }
        assert_eq!(seen, vec![3, 5]);
    }
    let (again, _) = s.client("ann").await;
    let rooms: Vec<_> = again.welcome().rooms.iter().map(|r| (r.room.as_str(), r.head_seq, r.read_seq)).collect();
    assert_eq!(rooms, vec![("r", 5, 5)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_twice_just_answers_joined_with_online_members() {
    let s = TestServer::start().await;
    let (ann, _) = s.client("ann").await;
    let (bob, _) = s.client("bob").await;
    let j = ann.join("r").await.unwrap();
    assert_eq!(j.online, vec!["ann".to_string()]);
    let j = bob.join("r").await.unwrap();
    assert_eq!(j.online, vec!["ann".to_string(), "bob".to_string()]);
    ann.publish("r", "x").await.unwrap();
    let j = ann.join("r").await.unwrap();
    let state = j.state.unwrap();
    assert_eq!((state.room.as_str(), state.head_seq, state.read_seq), ("r", 1, 0));
    assert_eq!(state.info.unwrap().my_role, proto::Role::Owner as i32, "the first to join owns it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_page_fits_in_one_frame_and_pages_on() {
    let s = TestServer::start().await;
    let (c, _) = s.client("ann").await;
    c.join("big").await.unwrap();
    for i in 0..20 {
        let p = proto::Publish {
            room: "big".into(),
            client_msg_id: format!("b{i}"),
            data: vec![b'x'; 20_000].into(),
            ..Default::default()
        };
        c.publish_message(p).await.unwrap();
    }
    // 20 messages of 20 kB do not fit in one 64 kB frame: pages of 3.
    let p = c
        .history(proto::History { room: "big".into(), forward: true, limit: 100, ..Default::default() })
        .await
        .unwrap();
    assert_eq!((p.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), p.has_more), (vec![1, 2, 3], true));
    let p = c.history(proto::History { room: "big".into(), limit: 100, ..Default::default() }).await.unwrap();
    assert_eq!(
        (p.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), p.has_more),
        (vec![18, 19, 20], true),
        "the newest, nearest the cursor"
    );
    // Paging on reaches everything.
    assert_eq!(client_history_all(&c, "big").await.len(), 20);
}
