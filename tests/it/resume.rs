//! Offline delivery and resume: replay from a cursor, `Synced`, the replay
//! bound, reconnects during continuous publishing, and slow consumers
//! catching up from the log — never a gap, never a duplicate.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chat_client::Event;
use chatd::proto::{self, Body};

use crate::common::*;

async fn publish_n(s: &TestServer, user: &str, room: &str, n: usize) {
    let (c, _) = s.client(user).await;
    c.join(room).await.unwrap();
    for i in 0..n {
        c.publish(room, &format!("{user} {i}")).await.unwrap();
    }
}

/// `n` entries into `room` by `user`: messages, and every fifth a change
/// to one of them — a reaction, an edit, a delete in turn.
async fn publish_with_changes(s: &TestServer, user: &str, room: &str, n: usize) {
    let (c, _) = s.client(user).await;
    c.join(room).await.unwrap();
    let mut mine: Vec<u64> = Vec::new();
    for i in 0..n {
        let ack = match (i % 15, mine.len()) {
            (4, 1..) => c.react(room, mine[i % mine.len()], &format!("k{i}"), true).await,
            (9, 1..) => c.edit(room, mine[i % mine.len()], &format!("edited {i}")).await,
            (14, 1..) => c.delete(room, mine.swap_remove(i % mine.len())).await,
            _ => {
                let ack = c.publish(room, &format!("{user} {i}")).await;
                if let Ok(a) = &ack {
                    mine.push(a.seq);
                }
                ack
            }
        };
        ack.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_replays_what_was_missed_then_synced_then_live() {
    let s = TestServer::start().await;
    publish_n(&s, "bob", "r", 5).await;
    let ann = s.raw_member("ann", "r").await;
    drop(ann);
    publish_n(&s, "bob", "r", 10).await;

    let mut ann = s.raw().await;
    let w = ann.hello(&s.token("ann"), vec![proto::Cursor { room: "r".into(), after_seq: 5 }]).await;
    assert_eq!(w.rooms[0].head_seq, 15);
    for seq in 6..=15 {
        assert_eq!(ann.next_message().await.seq, seq);
    }
    match ann.recv().await.body {
        Some(Body::Synced(sy)) => {
            assert_eq!(sy, proto::Synced { room: "r".into(), head_seq: 15, complete: true, first_seq: 1 })
        }
        other => panic!("expected synced, got {other:?}"),
    }
    publish_n(&s, "bob", "r", 1).await;
    assert_eq!(ann.next_message().await.seq, 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_at_the_head_gets_synced_at_once() {
    let s = TestServer::start().await;
    publish_n(&s, "ann", "r", 3).await;
    let mut ann = s.raw().await;
    ann.hello(&s.token("ann"), vec![proto::Cursor { room: "r".into(), after_seq: 3 }]).await;
    assert!(matches!(ann.recv().await.body, Some(Body::Synced(proto::Synced { head_seq: 3, complete: true, .. }))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_beyond_the_replay_bound_is_incomplete_and_the_client_pages_it_in() {
    let s = TestServer::start_with(|c| c.replay_limit = 10).await;
    publish_n(&s, "bob", "r", 1).await;
    let (ann, _) = s.client("ann").await;
    ann.join("r").await.unwrap();
    drop(ann);
    publish_n(&s, "bob", "r", 49).await;

    // Raw: the server sends only the newest 10 and says so.
    let mut raw = s.raw().await;
    raw.hello(&s.token("ann"), vec![proto::Cursor { room: "r".into(), after_seq: 0 }]).await;
    for seq in 41..=50 {
        assert_eq!(raw.next_message().await.seq, seq);
    }
    assert!(matches!(raw.recv().await.body, Some(Body::Synced(proto::Synced { head_seq: 50, complete: false, .. }))));

    // The client library fills the gap with History: the application sees
    // 1..=50 exactly once, in order, then Synced.
    let (_c, mut ev) =
        s.client_with("ann", |c| c.resume = vec![proto::Cursor { room: "r".into(), after_seq: 0 }]).await;
    let mut seqs = Vec::new();
    loop {
        let e = next_event(&mut ev, "message or synced", |e| {
            matches!(e, Event::Message(_) | Event::Synced(_)).then_some(e)
        });
        match e.await {
            Event::Message(m) => seqs.push(m.seq),
            Event::Synced(sy) => {
                assert!(!sy.complete);
                break;
            }
            _ => unreachable!(),
        }
    }
    assert_eq!(seqs, (1..=50).collect::<Vec<_>>());
}

/// A raw subscriber that drops its connection every few messages and comes
/// back with its cursor, while a publisher keeps publishing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_during_continuous_publishing_loses_and_repeats_nothing() {
    const TOTAL: u64 = 600;
    let s = Arc::new(TestServer::start().await);
    let mut sub = s.raw_member("sub", "feed").await;
    let done = Arc::new(AtomicBool::new(false));
    let publisher = {
        let s = s.clone();
        let done = done.clone();
        tokio::spawn(async move {
            // Edits, deletes and reactions are entries like messages.
            publish_with_changes(&s, "pub", "feed", TOTAL as usize).await;
            done.store(true, Ordering::Release);
        })
    };
    let mut got: Vec<u64> = Vec::new();
    let mut changes = 0;
    let mut reconnects = 0;
    while got.last().copied().unwrap_or(0) < TOTAL {
        // Read a handful, then drop the connection mid-stream.
        for _ in 0..7 {
            match sub.recv().await.body {
                Some(Body::Message(m)) => {
                    changes += usize::from(m.change.is_some());
                    got.push(m.seq)
                }
                Some(_) => {}
                None => {}
            }
            if got.last().copied() == Some(TOTAL) {
                break;
            }
        }
        if got.last().copied() == Some(TOTAL) {
            break;
        }
        let cursor = got.last().copied().unwrap_or(0);
        sub = s.raw().await;
        sub.hello(&s.token("sub"), vec![proto::Cursor { room: "feed".into(), after_seq: cursor }]).await;
        reconnects += 1;
    }
    publisher.await.unwrap();
    assert!(done.load(Ordering::Acquire));
    assert!(reconnects > 10, "the test reconnected {reconnects} times");
    assert_eq!(got, (1..=TOTAL).collect::<Vec<_>>(), "no gap and no duplicate across {reconnects} reconnects");
    assert_eq!(changes, 120, "every change entry once");
}

/// The client library across a server restart: it reconnects by itself,
/// resumes, and re-sends the publish that was waiting for its ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_survives_a_server_restart_without_gap_or_duplicate() {
    let tmp = tempfile::tempdir().unwrap();
    let s = TestServer::start_in(tmp.path(), |_| {}).await;
    let tcp = s.addr.clone();
    let (reader, mut ev) = s.client("reader").await;
    reader.join("r").await.unwrap();
    let (writer, _) = s.client("writer").await;
    writer.join("r").await.unwrap();
    for i in 0..10 {
        writer.publish("r", &format!("before {i}")).await.unwrap();
    }
    assert_eq!(collect_messages(&mut ev, 10).await.last().unwrap().seq, 10);
    s.stop().await;

    // Published while the reader is away (through a client of its own).
    let s = TestServer::start_in(tmp.path(), |c| c.tcp = tcp.parse().unwrap()).await;
    publish_n(&s, "other", "r", 5).await;
    // The first client's publish waits out the reconnect and is acked once.
    let ack = tokio::time::timeout(WAIT * 2, writer.publish("r", "after restart")).await.unwrap().unwrap();
    assert_eq!(ack.seq, 16);
    let msgs = collect_messages(&mut ev, 6).await;
    assert_eq!(msgs.iter().map(|m| m.seq).collect::<Vec<_>>(), (11..=16).collect::<Vec<_>>());
    assert_eq!(msgs[5].text, "after restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_reading_catches_up_from_the_log_without_blocking_anyone() {
    let s = TestServer::start_with(|c| {
        c.outbound_max_frames = 32;
        c.outbound_max_bytes = 32 * 1024;
    })
    .await;
    // The slow reader joins, then reads nothing for a while.
    let mut slow = s.raw_member("slow", "r").await;
    // Ten normal readers beside it.
    let mut normal = Vec::new();
    for i in 0..10 {
        let (c, ev) = s.client(&format!("normal{i}")).await;
        c.join("r").await.unwrap();
        normal.push((c, ev));
    }

    // Enough data to fill the kernel's socket buffers and the slow queue.
    const N: u64 = 3000;
    let (publisher, _) = s.client("pub").await;
    publisher.join("r").await.unwrap();
    let payload = bytes::Bytes::from(vec![b'x'; 4096]);
    let batch = (0..N).map(|i| proto::Publish {
        room: "r".into(),
        client_msg_id: format!("k{i}"),
        data: payload.clone(),
        ..Default::default()
    });
    publish_pipelined(&publisher, batch, 256).await;
    // The normal readers got everything, in order, while the slow one read
    // nothing: the room never waited for it.
    for (_, ev) in normal.iter_mut() {
        let msgs = collect_messages(ev, N as usize).await;
        assert!(msgs.iter().enumerate().all(|(i, m)| m.seq == i as u64 + 1));
    }
    let room = s.server.as_ref().unwrap().hub().room("r").unwrap();
    assert!(room.slow_consumer_events() > 0, "the slow reader's queue overflowed and it fell back to the log");

    // Now the slow reader reads: every message, once, in order.
    for seq in 1..=N {
        let m = slow.next_message().await;
        assert_eq!(m.seq, seq);
        assert_eq!(m.data.len(), 4096);
    }
    slow.ping().await;
}

/// Many overflow → catch-up → live transitions: a tiny queue, a reader that
/// reads in bursts with pauses, two rooms published to concurrently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bursty_reader_gets_everything_across_many_overflows() {
    let s = Arc::new(
        TestServer::start_with(|c| {
            c.outbound_max_frames = 4;
            c.outbound_max_bytes = 16 * 1024;
        })
        .await,
    );
    let mut r = Raw::connect_small(&s.addr).await;
    r.hello(&s.token("bursty"), vec![]).await;
    r.join("a").await;
    r.join("b").await;
    const N: usize = 400;
    let mut publishers = Vec::new();
    for room in ["a", "b"] {
        let s = s.clone();
        publishers.push(tokio::spawn(async move {
            let (c, _) = s.client(&format!("pub-{room}")).await;
            c.join(room).await.unwrap();
            // 2 x 400 x 8 KiB: more than the server's socket send buffer
            // (4 MiB at most here) and the reader's 4 KiB receive buffer.
            let payload = bytes::Bytes::from(vec![b'y'; 8192]);
            // Pipelined, 64 in flight, so the room outruns the reader.
            let batch = (0..N).map(|i| proto::Publish {
                room: room.into(),
                client_msg_id: format!("{i}"),
                data: payload.clone(),
                ..Default::default()
            });
            publish_pipelined(&c, batch, 64).await;
        }));
    }
    // Beside them in room a, a message and 100 reactions to it: change
    // entries reach a slow reader like messages.
    const CHANGES: usize = 100;
    {
        let s = s.clone();
        publishers.push(tokio::spawn(async move {
            let (c, _) = s.client("fan").await;
            c.join("a").await.unwrap();
            let seq = c.publish("a", "react to me").await.unwrap().seq;
            for i in 0..CHANGES {
                c.react("a", seq, &format!("k{}", i % 50), i < 50).await.unwrap();
            }
        }));
    }
    let total = 2 * N + 1 + CHANGES;
    let mut last = std::collections::HashMap::from([("a".to_string(), 0u64), ("b".to_string(), 0u64)]);
    let (mut received, mut changes) = (0, 0);
    while received < total {
        for _ in 0..25 {
            let m = r.next_message().await;
            let prev = last.insert(m.room.clone(), m.seq).unwrap();
            assert_eq!(m.seq, prev + 1, "room {} in order, no gap, no duplicate", m.room);
            received += 1;
            changes += usize::from(m.change.is_some());
            if received == total {
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(changes, CHANGES);
    for p in publishers {
        p.await.unwrap();
    }
    let events: u64 =
        ["a", "b"].iter().map(|n| s.server.as_ref().unwrap().hub().room(n).unwrap().slow_consumer_events()).sum();
    assert!(events > 0, "the reader overflowed its queue");
}
