//! Properties, checked on generated input (proptest):
//! * any envelope survives protobuf and JSON round trips, and a stream of
//!   frames decodes the same however it is split;
//! * authorization: over random sequences of joins, leaves, publishes,
//!   history reads, read markers and reconnects-with-resume by several users
//!   (direct rooms included), no user receives anything from a room they
//!   were never a member of, nothing twice, and every message published
//!   while they were a member; every refused request is refused with
//!   FORBIDDEN (or BAD_REQUEST for a malformed DM name).

use std::collections::{BTreeSet, HashMap, HashSet};

use bytes::BytesMut;
use chatd::codec::{FrameReader, decode_envelope, encode_envelope, put_frame};
use chatd::proto::{self, Body, Envelope, ErrorCode};
use proptest::prelude::*;

use crate::common::*;

fn text() -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..40).prop_map(|c| c.into_iter().collect())
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        (text(), text(), text(), proptest::collection::vec(any::<u8>(), 0..200)).prop_map(|(room, k, t, d)| {
            Body::Publish(proto::Publish {
                room,
                client_msg_id: k,
                text: t.clone(),
                data: d.into(),
                reply_to: t.len() as u64,
                mentions: vec![t],
            })
        }),
        (text(), any::<u64>(), text(), any::<u64>(), text(), proptest::collection::vec(any::<u8>(), 0..100)).prop_map(
            |(room, seq, sender, ts_ms, t, d)| Body::Message(proto::Message {
                room,
                seq,
                sender,
                ts_ms,
                client_msg_id: String::new(),
                text: t.clone(),
                data: d.into(),
                change: (seq % 2 == 0).then(|| proto::MessageChange {
                    target_seq: seq / 2,
                    kind: (seq % 5) as i32,
                    key: t.clone(),
                }),
                reactions: vec![proto::Reaction { key: t, count: ts_ms as u32, users: vec![], mine: seq % 3 == 0 }],
                ..Default::default()
            })
        ),
        (text(), any::<u64>(), any::<u64>(), any::<u32>(), any::<bool>()).prop_map(|(room, b, a, limit, forward)| {
            Body::History(proto::History { room, before_seq: b, after_seq: a, limit, forward })
        }),
        (text(), any::<u64>(), any::<u64>()).prop_map(|(room, head_seq, read_seq)| Body::Joined(proto::Joined {
            state: Some(proto::RoomState { room, head_seq, read_seq, info: None, unread: head_seq / 3, mentions: 1 }),
            online: vec!["a".into()]
        })),
        (any::<i32>(), text()).prop_map(|(code, message)| Body::Error(proto::Error { code, message })),
        any::<u64>().prop_map(|nonce| Body::Ping(proto::Ping { nonce })),
    ]
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (any::<u64>(), body()).prop_map(|(id, b)| Envelope::new(id, b))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn envelopes_round_trip_through_protobuf_and_json(env in envelope()) {
        prop_assert_eq!(&decode_envelope(&encode_envelope(&env)).unwrap(), &env);
        // Unknown enum numbers have no JSON name; the mapping needs known ones.
        if !matches!(&env.body, Some(Body::Error(e)) if ErrorCode::try_from(e.code).is_err()) {
            let json = serde_json::to_string(&env).unwrap();
            prop_assert_eq!(&serde_json::from_str::<Envelope>(&json).unwrap(), &env);
        }
    }

    #[test]
    fn a_frame_stream_decodes_the_same_however_it_is_split(envs in proptest::collection::vec(envelope(), 1..12), cuts in proptest::collection::vec(1usize..50, 1..40)) {
        let mut wire = BytesMut::new();
        for e in &envs {
            put_frame(&mut wire, e);
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let decoded = rt.block_on(async {
            let (mut tx, rx) = tokio::io::duplex(1 << 16);
            let wire = wire.freeze();
            let writer = tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let mut at = 0;
                for c in cuts.iter().cycle() {
                    if at >= wire.len() {
                        break;
                    }
                    let end = (at + c).min(wire.len());
                    tx.write_all(&wire[at..end]).await.unwrap();
                    at = end;
                }
            });
            let mut r = FrameReader::new(rx, 1 << 20);
            let mut out = Vec::new();
            while let Some(f) = r.read_frame().await.unwrap() {
                out.push(decode_envelope(&f).unwrap());
            }
            writer.await.unwrap();
            out
        });
        prop_assert_eq!(decoded, envs);
    }
}

const USERS: [&str; 4] = ["a", "b", "c", "d"];
const ROOMS: [&str; 5] = ["r1", "r2", "dm:a:b", "dm:c:d", "dm:b:a"];

#[derive(Clone, Debug)]
enum Op {
    Join(usize, usize),
    Leave(usize, usize),
    Publish(usize, usize),
    History(usize, usize),
    MarkRead(usize, usize),
    Reconnect(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let u = 0..USERS.len();
    let r = 0..ROOMS.len();
    prop_oneof![
        3 => (u.clone(), r.clone()).prop_map(|(u, r)| Op::Join(u, r)),
        1 => (u.clone(), r.clone()).prop_map(|(u, r)| Op::Leave(u, r)),
        4 => (u.clone(), r.clone()).prop_map(|(u, r)| Op::Publish(u, r)),
        1 => (u.clone(), r.clone()).prop_map(|(u, r)| Op::History(u, r)),
        1 => (u.clone(), r.clone()).prop_map(|(u, r)| Op::MarkRead(u, r)),
        1 => u.prop_map(Op::Reconnect),
    ]
}

/// Who may be in a room, by the rules (None: the name is malformed).
fn allowed(user: &str, room: &str) -> Option<bool> {
    match room {
        "dm:a:b" => Some(user == "a" || user == "b"),
        "dm:c:d" => Some(user == "c" || user == "d"),
        "dm:b:a" => None,
        _ => Some(true),
    }
}

async fn run_ops(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let s = TestServer::start().await;
    let mut conns: Vec<Raw> = Vec::new();
    for u in USERS {
        conns.push(s.raw_user(u).await.0);
    }
    let mut members: HashMap<&str, HashSet<&str>> = USERS.iter().map(|u| (*u, HashSet::new())).collect();
    let mut ever: HashMap<&str, HashSet<&str>> = USERS.iter().map(|u| (*u, HashSet::new())).collect();
    let mut expected: HashMap<&str, BTreeSet<(String, u64)>> = USERS.iter().map(|u| (*u, BTreeSet::new())).collect();
    let mut received: HashMap<&str, Vec<(String, u64)>> = USERS.iter().map(|u| (*u, Vec::new())).collect();
    let mut cursor: HashMap<(&str, &str), u64> = HashMap::new();
    let mut id = 100;
    // A request whose reply we wait for, recording the messages pushed
    // before it (the publisher's own echo comes before its ack).
    async fn call(conn: &mut Raw, id: u64, body: Body, got: &mut Vec<(String, u64)>) -> Body {
        conn.send(id, body).await;
        loop {
            let env = conn.recv().await;
            match env.body {
                Some(Body::Message(m)) => got.push((m.room, m.seq)),
                Some(b) if env.id == id => return b,
                _ => {}
            }
        }
    }
    // Collect every Message push until a Ping round trip (all earlier
    // pushes are ahead of the Pong).
    async fn settle(conn: &mut Raw, id: u64, got: &mut Vec<(String, u64)>) {
        conn.send(id, Body::Ping(proto::Ping { nonce: id })).await;
        loop {
            let env = conn.recv().await;
            match env.body {
                Some(Body::Message(m)) => got.push((m.room, m.seq)),
                Some(Body::Pong(_)) if env.id == id => return,
                _ => {}
            }
        }
    }
    for op in ops {
        id += 1;
        match op {
            Op::Join(u, r) => {
                let (user, room) = (USERS[u], ROOMS[r]);
                let reply = call(
                    &mut conns[u],
                    id,
                    Body::Join(proto::Join { room: room.into() }),
                    received.get_mut(user).unwrap(),
                )
                .await;
                match allowed(user, room) {
                    None => {
                        expect_error(&reply, ErrorCode::BadRequest);
                    }
                    Some(false) => {
                        expect_error(&reply, ErrorCode::Forbidden);
                    }
                    Some(true) => {
                        prop_assert!(matches!(reply, Body::Joined(_)), "{reply:?}");
                        let newly = members.get_mut(user).unwrap().insert(room);
                        ever.get_mut(user).unwrap().insert(room);
                        // Starting a DM (joining it anew) makes the other
                        // participant a member; a repeated join, or one of a
                        // room the other has left, pulls no one back in.
                        if let Some(rest) = room.strip_prefix("dm:").filter(|_| newly) {
                            for peer in rest.split(':') {
                                let peer = *USERS.iter().find(|x| **x == peer).unwrap();
                                members.get_mut(peer).unwrap().insert(room);
                                ever.get_mut(peer).unwrap().insert(room);
                            }
                        }
                    }
                }
            }
            Op::Leave(u, r) => {
                let (user, room) = (USERS[u], ROOMS[r]);
                let reply = call(
                    &mut conns[u],
                    id,
                    Body::Leave(proto::Leave { room: room.into() }),
                    received.get_mut(user).unwrap(),
                )
                .await;
                prop_assert!(matches!(reply, Body::Left(_)), "{reply:?}");
                members.get_mut(user).unwrap().remove(room);
            }
            Op::Publish(u, r) => {
                let (user, room) = (USERS[u], ROOMS[r]);
                let p = proto::Publish {
                    room: room.into(),
                    client_msg_id: format!("k{id}"),
                    text: "x".into(),
                    ..Default::default()
                };
                let reply = call(&mut conns[u], id, Body::Publish(p), received.get_mut(user).unwrap()).await;
                if members[user].contains(room) {
                    let Body::PublishAck(a) = reply else { return Err(TestCaseError::fail(format!("{reply:?}"))) };
                    for v in USERS {
                        if members[v].contains(room) {
                            expected.get_mut(v).unwrap().insert((room.to_string(), a.seq));
                        }
                    }
                } else {
                    expect_error(&reply, ErrorCode::Forbidden);
                }
            }
            Op::History(u, r) => {
                let (user, room) = (USERS[u], ROOMS[r]);
                let reply = call(
                    &mut conns[u],
                    id,
                    Body::History(proto::History { room: room.into(), ..Default::default() }),
                    received.get_mut(user).unwrap(),
                )
                .await;
                if members[user].contains(room) {
                    prop_assert!(matches!(reply, Body::HistoryPage(_)), "{reply:?}");
                } else {
                    expect_error(&reply, ErrorCode::Forbidden);
                }
            }
            Op::MarkRead(u, r) => {
                let (user, room) = (USERS[u], ROOMS[r]);
                let reply = call(
                    &mut conns[u],
                    id,
                    Body::MarkRead(proto::MarkRead { room: room.into(), seq: 1 }),
                    received.get_mut(user).unwrap(),
                )
                .await;
                if members[user].contains(room) {
                    prop_assert!(matches!(reply, Body::ReadReceipt(_)), "{reply:?}");
                } else {
                    expect_error(&reply, ErrorCode::Forbidden);
                }
            }
            Op::Reconnect(u) => {
                let user = USERS[u];
                settle(&mut conns[u], id, received.get_mut(user).unwrap()).await;
                for (room, seq) in received[user].iter() {
                    let c = cursor.entry((user, ROOMS.iter().find(|r| **r == room).unwrap())).or_insert(0);
                    *c = (*c).max(*seq);
                }
                // Resume every room, member or not: the server must replay
                // only rooms the user is in, and refuse the others.
                let resume: Vec<proto::Cursor> = ROOMS
                    .iter()
                    .filter(|r| allowed(user, r).is_some())
                    .map(|r| proto::Cursor {
                        room: r.to_string(),
                        after_seq: cursor.get(&(user, *r)).copied().unwrap_or(0),
                    })
                    .collect();
                let mut fresh = s.raw().await;
                fresh.hello(&s.token(user), resume).await;
                conns[u] = fresh;
            }
        }
    }
    for (i, u) in USERS.iter().enumerate() {
        // Pushes from another cluster node may still be on their way after
        // the ping is answered: a missing message is waited for, boundedly.
        let deadline = tokio::time::Instant::now() + crate::common::WAIT;
        loop {
            id += 1;
            settle(&mut conns[i], id, received.get_mut(u).unwrap()).await;
            let got: BTreeSet<(String, u64)> = received[u].iter().cloned().collect();
            if expected[u].is_subset(&got) || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let got = &received[u];
        let unique: BTreeSet<(String, u64)> = got.iter().cloned().collect();
        prop_assert_eq!(unique.len(), got.len(), "{} received a message twice: {:?}", u, got);
        // Nothing from a room the user was never in (a member may see a
        // room's earlier messages through a resume replay: history is
        // readable by members)...
        for (room, seq) in &unique {
            prop_assert!(
                ever[u].contains(room.as_str()),
                "{} received {}#{} without ever being a member",
                u,
                room,
                seq
            );
        }
        // ...and nothing missing that was published while they were in it.
        let missing: Vec<_> = expected[u].difference(&unique).collect();
        prop_assert!(missing.is_empty(), "{} missed {:?}", u, missing);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn nobody_receives_a_room_they_are_not_in(ops in proptest::collection::vec(op(), 5..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run_ops(ops))?;
    }
}
