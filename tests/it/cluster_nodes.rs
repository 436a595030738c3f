//! Cluster mode end to end: three chatd nodes in this process over one real
//! `redis-server`, clients on different nodes in the same rooms. One order
//! per room for every member on every node, resume on another node with
//! every missed message once, membership seen across nodes, and a Redis
//! that goes away: `SERVER_BUSY` and a 503 `/readyz` meanwhile, no false
//! ack, recovery by itself.

use std::collections::BTreeMap;
use std::time::Duration;

use chatd::proto::{self, Body, ErrorCode};

use crate::common::redis::RedisServer;
use crate::common::{ChatServer, Polling, Raw, TestServer, http_get};

/// Three nodes over `redis`, sharing one data directory (which holds only
/// the token secret in cluster mode).
async fn nodes(redis: &RedisServer, dir: &std::path::Path) -> Vec<TestServer> {
    nodes_with(redis, dir, 3, |_| {}).await
}

/// `n` nodes over `redis` in `dir`, `tweak` adjusting each one's
/// configuration.
async fn nodes_with(
    redis: &RedisServer,
    dir: &std::path::Path,
    n: usize,
    tweak: impl Fn(&mut chatd::config::Config) + Clone + Send + 'static,
) -> Vec<TestServer> {
    let mut nodes = Vec::new();
    for _ in 0..n {
        let (url, tweak) = (redis.url(), tweak.clone());
        nodes.push(
            TestServer::start_in(dir, move |c| {
                c.cluster_redis = Some(url);
                tweak(c);
            })
            .await,
        );
    }
    nodes
}

fn publish(room: &str, text: String, cmid: String) -> proto::Publish {
    proto::Publish { room: room.into(), text, client_msg_id: cmid, ..Default::default() }
}

/// The error answering request `id` (pushes before it, such as a member
/// of another node joining, are skipped); panics on any other answer.
async fn refused(r: &mut Raw, id: u64, code: ErrorCode) -> String {
    loop {
        let env = r.recv().await;
        if env.id != id {
            continue;
        }
        match env.body {
            Some(Body::Error(e)) if e.code() == code => return e.message,
            other => panic!("request {id}: expected {code:?}, got {other:?}"),
        }
    }
}

/// The next `n` messages of `room` pushed to `r`.
async fn messages(r: &mut Raw, room: &str, n: usize) -> Vec<proto::Message> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let m = r.next_message().await;
        if m.room == room {
            got.push(m);
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_on_three_nodes_give_every_member_one_order() {
    let Some(redis) = RedisServer::for_test("publishers_on_three_nodes_give_every_member_one_order", &[]) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let nodes = nodes(&redis, tmp.path()).await;
    // A reader and a publisher on each node, all in one room that the
    // first join creates.
    let mut readers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        readers.push(node.raw_member(&format!("reader{i}"), "general").await);
    }
    let mut publishers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        publishers.push(node.raw_member(&format!("pub{i}"), "general").await);
    }
    const EACH: usize = 40;
    let sends = publishers.iter_mut().enumerate().map(|(i, p)| async move {
        let batch = (0..EACH).map(|k| publish("general", format!("{i}-{k}"), format!("c{i}-{k}")));
        p.publish_all(batch).await
    });
    let acks: Vec<Vec<proto::PublishAck>> = futures_util::future::join_all(sends).await;
    let mut acked: Vec<u64> = acks.iter().flatten().map(|a| a.seq).collect();
    acked.sort_unstable();
    assert_eq!(acked, (1..=3 * EACH as u64).collect::<Vec<_>>(), "every publish acked with its own seq, gapless");
    assert!(acks.iter().flatten().all(|a| !a.duplicate));

    let mut seen = Vec::new();
    for r in &mut readers {
        let got = messages(r, "general", 3 * EACH).await;
        let order: Vec<(u64, String)> = got.iter().map(|m| (m.seq, m.text.clone())).collect();
        seen.push(order);
    }
    assert_eq!(seen[0].iter().map(|(s, _)| *s).collect::<Vec<_>>(), (1..=3 * EACH as u64).collect::<Vec<_>>());
    assert_eq!(seen[0], seen[1], "nodes 0 and 1 deliver the same order");
    assert_eq!(seen[0], seen[2], "nodes 0 and 2 deliver the same order");
    // Each publisher's messages in the order it sent them.
    for i in 0..3 {
        let mine: Vec<&str> =
            seen[0].iter().filter(|(_, t)| t.starts_with(&format!("{i}-"))).map(|(_, t)| t.as_str()).collect();
        let sent: Vec<String> = (0..EACH).map(|k| format!("{i}-{k}")).collect();
        assert_eq!(mine, sent.iter().map(String::as_str).collect::<Vec<_>>());
    }
    // History on every node is the same log.
    for node in &nodes {
        let mut r = node.raw_member("auditor", "general").await;
        let history: Vec<(u64, String)> = r.history_all("general").await.into_iter().map(|m| (m.seq, m.text)).collect();
        assert_eq!(history, seen[0]);
    }
    // A retry on another node is a duplicate with the original's seq.
    let original = acks[0].iter().find(|a| a.client_msg_id == "c0-0").expect("c0-0 acknowledged");
    let mut other = nodes[2].raw_member("pub0", "general").await;
    let retry = other.publish_message(publish("general", "0-0".into(), "c0-0".into())).await;
    assert!(retry.duplicate, "{retry:?}");
    assert_eq!((retry.seq, retry.ts_ms), (original.seq, original.ts_ms));
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_node_with_every_missed_message_once() {
    let Some(redis) = RedisServer::for_test("a_client_resumes_on_another_node_with_every_missed_message_once", &[])
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let nodes = nodes(&redis, tmp.path()).await;
    let mut ann = nodes[0].raw_member("ann", "lobby").await;
    let mut bob = nodes[1].raw_member("bob", "lobby").await;
    for k in 0..5 {
        bob.publish("lobby", &format!("before {k}")).await;
    }
    let got = messages(&mut ann, "lobby", 5).await;
    let cursor = got.last().unwrap().seq;
    drop(ann);
    // While ann is away, bob sends more through node 1; ann comes back on
    // node 2, which has never served the room.
    let mut acks = Vec::new();
    for k in 0..20 {
        acks.push(bob.publish("lobby", &format!("missed {k}")).await.seq);
    }
    let mut ann = nodes[2].raw().await;
    let resume = vec![proto::Cursor { room: "lobby".into(), after_seq: cursor }];
    let welcome = ann.hello(&nodes[2].token("ann"), resume).await;
    let lobby = welcome.rooms.iter().find(|r| r.room == "lobby").expect("node 2 knows ann is in lobby");
    assert_eq!(lobby.head_seq, 25, "node 2 has the room's head from the shared log");
    let mut replayed = Vec::new();
    let synced = loop {
        match ann.recv().await.body {
            Some(Body::Message(m)) => replayed.push(m.seq),
            Some(Body::Synced(s)) => break s,
            _ => {}
        }
    };
    assert_eq!(replayed, acks, "every missed message once, in order");
    assert!(synced.complete, "{synced:?}");
    // Live from here, from either node.
    let live = bob.publish("lobby", "live").await;
    assert_eq!(ann.next_message().await.seq, live.seq);
    let mine = ann.publish("lobby", "back").await;
    assert_eq!(bob.next_message().await.seq, mine.seq);
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_reach_the_other_nodes() {
    let Some(redis) = RedisServer::for_test("membership_changes_reach_the_other_nodes", &[]) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let nodes = nodes(&redis, tmp.path()).await;
    let (mut owner, _) = nodes[0].raw_user("olga").await;
    let create = proto::CreateRoom { room: "team".into(), kind: proto::RoomKind::Private as i32, ..Default::default() };
    assert!(matches!(owner.request(Body::CreateRoom(create)).await, Body::RoomInfo(_)));
    // Not a member, on another node: refused there too.
    let (mut eve, _) = nodes[1].raw_user("eve").await;
    eve.send(1, Body::Join(proto::Join { room: "team".into() })).await;
    refused(&mut eve, 1, ErrorCode::Forbidden).await;
    let p = publish("team", "hi".into(), String::new());
    eve.send(2, Body::Publish(p)).await;
    refused(&mut eve, 2, ErrorCode::Forbidden).await;
    // Invited on node 0, the invitee on node 2 is told and can join there.
    let (mut ivan, _) = nodes[2].raw_user("ivan").await;
    let invite = proto::Invite { room: "team".into(), user: "ivan".into() };
    assert!(matches!(owner.request(Body::Invite(invite)).await, Body::RoomInfo(_)));
    let invitation = ivan
        .next_push(|b| match b {
            Body::Invitation(i) => Some(i),
            _ => None,
        })
        .await;
    assert_eq!(invitation.room, "team");
    ivan.join("team").await;
    let hi = ivan.publish("team", "hello from node 2").await;
    let m = owner.next_message().await;
    assert_eq!((m.seq, m.sender.as_str()), (hi.seq, "ivan"));
    // Removed on node 0: node 2's session is told, and its publishes refused.
    let remove = proto::RemoveMember { room: "team".into(), user: "ivan".into(), reason: "done".into() };
    assert!(matches!(owner.request(Body::RemoveMember(remove)).await, Body::RoomInfo(_)));
    let left = ivan
        .next_push(|b| match b {
            Body::Left(l) => Some(l),
            _ => None,
        })
        .await;
    assert_eq!((left.room.as_str(), left.by.as_str()), ("team", "olga"));
    ivan.send(9, Body::Publish(publish("team", "still here?".into(), String::new()))).await;
    refused(&mut ivan, 9, ErrorCode::Forbidden).await;
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_down_publishes_are_refused_and_ready_is_503_then_it_recovers() {
    let Some(mut redis) = RedisServer::for_test("while_redis_is_down_publishes_are_refused", &[]) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let url = redis.url();
    let node = TestServer::start_in(tmp.path(), move |c| c.cluster_redis = Some(url)).await;
    let mut ann = node.raw_member("ann", "r").await;
    let mut acked = BTreeMap::new();
    for k in 0..10 {
        let a = ann.publish("r", &format!("m{k}")).await;
        acked.insert(a.seq, format!("m{k}"));
    }
    assert_eq!(http_get(&node.http, "/readyz").await.0, 200);
    redis.kill();
    Polling::new(Duration::from_secs(10), 20)
        .until("readyz says 503", async || http_get(&node.http, "/readyz").await.0 == 503)
        .await;
    ann.send(77, Body::Publish(publish("r", "lost?".into(), "k-down".into()))).await;
    let why = refused(&mut ann, 77, ErrorCode::ServerBusy).await;
    assert!(why.contains("Redis"), "{why}");
    redis.restart();
    Polling::new(Duration::from_secs(20), 20)
        .until("readyz says 200", async || http_get(&node.http, "/readyz").await.0 == 200)
        .await;
    // The refused publish, retried with its key, is stored once.
    let retry = ann.publish_message(publish("r", "lost?".into(), "k-down".into())).await;
    acked.insert(retry.seq, "lost?".into());
    let history: BTreeMap<u64, String> = ann.history_all("r").await.into_iter().map(|m| (m.seq, m.text)).collect();
    assert_eq!(history, acked, "every acknowledged message, nothing else");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_redis_refuses_publishes_then_catches_up_by_itself() {
    let Some(redis) = RedisServer::for_test("a_node_cut_off_from_redis_refuses_publishes", &[]) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let proxy = crate::common::proxy::Proxy::start(format!("127.0.0.1:{}", redis.port)).await;
    let through = proxy.url();
    let cut_off = TestServer::start_in(tmp.path(), move |c| c.cluster_redis = Some(through)).await;
    let direct = redis.url();
    let other = TestServer::start_in(tmp.path(), move |c| c.cluster_redis = Some(direct)).await;
    let mut ann = cut_off.raw_member("ann", "r").await;
    let mut bob = other.raw_member("bob", "r").await;
    for k in 0..3 {
        bob.publish("r", &format!("before {k}")).await;
    }
    assert_eq!(messages(&mut ann, "r", 3).await.last().unwrap().seq, 3);

    proxy.cut();
    Polling::new(Duration::from_secs(10), 20)
        .until("the cut-off node's readyz says 503", async || http_get(&cut_off.http, "/readyz").await.0 == 503)
        .await;
    ann.send(5, Body::Publish(publish("r", "from the cut-off node".into(), "k1".into()))).await;
    let why = refused(&mut ann, 5, ErrorCode::ServerBusy).await;
    assert!(why.contains("Redis"), "{why}");
    // The rest of the cluster goes on.
    assert_eq!(http_get(&other.http, "/readyz").await.0, 200);
    let mut sent = Vec::new();
    for k in 0..20 {
        sent.push(bob.publish("r", &format!("during {k}")).await.seq);
    }

    proxy.restore();
    Polling::new(Duration::from_secs(20), 20)
        .until("the node's readyz says 200 again", async || http_get(&cut_off.http, "/readyz").await.0 == 200)
        .await;
    // What was published meanwhile reaches the node's session once, in
    // order, filled from the stream; then its publishes go through.
    let got: Vec<u64> = messages(&mut ann, "r", 20).await.iter().map(|m| m.seq).collect();
    assert_eq!(got, sent);
    let retry = ann.publish_message(publish("r", "from the cut-off node".into(), "k1".into())).await;
    assert!(!retry.duplicate, "the refused publish was not stored: {retry:?}");
    assert_eq!(bob.next_message().await.seq, retry.seq);
    cut_off.stop().await;
    other.stop().await;
}

/// The next `Presence` push about `user`.
async fn presence_of(r: &mut Raw, user: &str) -> proto::Presence {
    r.next_push(|b| match b {
        Body::Presence(p) if p.user == user => Some(p),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_counts_devices_over_nodes_and_typing_crosses_them() {
    let Some(redis) = RedisServer::for_test("presence_counts_devices_over_nodes", &[]) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let nodes = nodes(&redis, tmp.path()).await;
    let mut ann = nodes[0].raw_member("ann", "p").await;
    let mut bob = nodes[1].raw_member("bob", "p").await;
    let p = presence_of(&mut ann, "bob").await;
    assert!(p.online, "{p:?}");
    // A second device on another node is not news, as on one node; the
    // devices are counted over both nodes.
    let (bob2, _) = nodes[2].raw_user("bob").await;
    // Typing on one node reaches the other.
    let typing = |active| Body::Typing(proto::Typing { room: "p".into(), user: String::new(), active });
    let next_typing_or_presence = async |r: &mut Raw| {
        r.next_push(|b| match b {
            b @ (Body::Typing(_) | Body::Presence(_)) => Some(b),
            _ => None,
        })
        .await
    };
    bob.send(0, typing(true)).await;
    match next_typing_or_presence(&mut ann).await {
        Body::Typing(t) => assert_eq!((t.user.as_str(), t.active), ("bob", true)),
        other => panic!("the second device was news: {other:?}"),
    }
    // One device goes: bob is still online on node 1, so nothing is said.
    drop(bob2);
    crate::common::wait_until("bob's device on node 2 to be gone from Redis", async || {
        redis.cli(&["HLEN", "chatd:presence:{bob}"]).as_deref() == Some("1")
    })
    .await;
    bob.send(0, typing(false)).await;
    match next_typing_or_presence(&mut ann).await {
        Body::Typing(t) => assert_eq!((t.user.as_str(), t.active), ("bob", false)),
        other => panic!("bob was said to go while still online on node 1: {other:?}"),
    }
    // The last one goes: offline.
    drop(bob);
    let p = presence_of(&mut ann, "bob").await;
    assert!(!p.online, "the first presence after both left is offline: {p:?}");
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_nodes_users_go_offline_within_the_presence_ttl() {
    let Some(redis) = RedisServer::for_test("a_crashed_nodes_users_go_offline", &[]) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let url = redis.url();
    let ttl = "600";
    let observer = TestServer::start_in(tmp.path(), move |c| {
        c.cluster_redis = Some(url);
        c.cluster_presence_ttl_ms = 600;
    })
    .await;
    let mut ann = observer.raw_member("ann", "c").await;
    let mut doomed =
        crate::common::Process::start(tmp.path(), &["--cluster", &redis.url(), "--cluster-presence-ttl-ms", ttl]);
    let _bob = doomed.raw_member("bob", "c").await;
    assert!(presence_of(&mut ann, "bob").await.online);
    doomed.kill9();
    // Within the bounded wait of `presence_of`, many times the TTL.
    let p = presence_of(&mut ann, "bob").await;
    assert!(!p.online, "{p:?}");
    observer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_waits_for_another_nodes_change_of_the_room_and_decides_on_it() {
    let Some(redis) = RedisServer::for_test("a_change_waits_for_another_nodes_change", &[]) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let nodes = nodes(&redis, tmp.path()).await;
    let _ann = nodes[0].raw_member("ann", "held").await;
    let _cat = nodes[1].raw_member("cat", "held").await;
    // Another node is in the middle of a change of the room: it holds the
    // room's lock, and has banned bob by the time it lets go.
    assert_eq!(redis.cli(&["SET", "chatd:{held}:lock", "another-node", "PX", "20000"]).as_deref(), Some("OK"));
    let (mut bob, _) = nodes[1].raw_user("bob").await;
    bob.send(1, Body::Join(proto::Join { room: "held".into() })).await;
    // (Time for the join to read the room before the ban: without the
    // lock it would be decided on that read, and succeed.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A BanRecord with every field at its default encodes as no bytes.
    assert_eq!(redis.cli(&["HSET", "chatd:{held}:bans", "bob", ""]).as_deref(), Some("1"));
    assert_eq!(redis.cli(&["DEL", "chatd:{held}:lock"]).as_deref(), Some("1"));
    let why = refused(&mut bob, 1, ErrorCode::Forbidden).await;
    assert!(why.contains("banned"), "{why}");
    for n in nodes {
        n.stop().await;
    }
}

/// Who `ListMembers` says is online in `room`, asked through `r`.
async fn online_members(r: &mut Raw, room: &str) -> Vec<String> {
    let list = Body::ListMembers(proto::ListMembers { room: room.into(), after_user: String::new(), limit: 0 });
    let Body::MemberPage(page) = r.request(list).await else { panic!("ListMembers was not answered with a page") };
    page.members.into_iter().filter(|m| m.online).map(|m| m.user).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_online_lists_name_members_online_on_any_node() {
    let Some(redis) = RedisServer::for_test("the_online_lists_name_members_online", &[]) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let nodes = nodes(&redis, tmp.path()).await;
    let mut ann = nodes[0].raw_member("ann", "o").await;
    let (mut bob, _) = nodes[1].raw_user("bob").await;
    let joined = bob.join("o").await;
    assert_eq!(joined.online, ["ann", "bob"], "ann is online on node 0");
    // Node 2 has never served the room: it learns who is online in it
    // when it first does.
    let (mut cat, _) = nodes[2].raw_user("cat").await;
    let joined = cat.join("o").await;
    assert_eq!(joined.online, ["ann", "bob", "cat"], "a node that starts serving the room");
    // Changes reach the other nodes a moment after they are answered.
    assert!(presence_of(&mut bob, "cat").await.online);
    assert_eq!(online_members(&mut bob, "o").await, ["ann", "bob", "cat"]);
    // Someone online on node 2 who joins later: node 1 hears it.
    let (mut dan, _) = nodes[2].raw_user("dan").await;
    dan.join("o").await;
    assert!(presence_of(&mut bob, "dan").await.online);
    assert_eq!(online_members(&mut bob, "o").await, ["ann", "bob", "cat", "dan"]);
    // Ann goes offline on node 0: node 1 and node 2 hear it.
    drop(ann);
    assert!(!presence_of(&mut bob, "ann").await.online);
    assert_eq!(online_members(&mut bob, "o").await, ["bob", "cat", "dan"]);
    assert!(!presence_of(&mut cat, "ann").await.online);
    assert_eq!(online_members(&mut cat, "o").await, ["bob", "cat", "dan"]);
    // Back on node 2: node 1 lists her again.
    ann = nodes[2].raw_user("ann").await.0;
    assert!(presence_of(&mut bob, "ann").await.online);
    assert_eq!(online_members(&mut bob, "o").await, ["ann", "bob", "cat", "dan"]);
    drop(ann);
    for n in nodes {
        n.stop().await;
    }
}

/// The directory as `r` sees it: (room, title, member count) of each.
async fn directory(r: &mut Raw) -> Vec<(String, String, u32)> {
    let list = Body::ListRooms(proto::ListRooms { query: String::new(), after_room: String::new(), limit: 0 });
    let Body::RoomList(l) = r.request(list).await else { panic!("ListRooms was not answered with a list") };
    l.rooms.into_iter().map(|i| (i.room, i.title, i.member_count)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_of_a_node_follows_rooms_it_does_not_serve() {
    let Some(redis) = RedisServer::for_test("the_directory_of_a_node_follows_rooms", &[]) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let nodes = nodes(&redis, tmp.path()).await;
    let (mut ann, _) = nodes[0].raw_user("ann").await;
    let create = proto::CreateRoom { room: "pub".into(), title: "Pub".into(), ..Default::default() };
    assert!(matches!(ann.request(Body::CreateRoom(create)).await, Body::RoomInfo(_)));
    // Cat, on node 2, is in none of its rooms: node 2 does not serve it.
    let (mut cat, _) = nodes[2].raw_user("cat").await;
    let seen = async |cat: &mut Raw, want: Vec<(String, String, u32)>| {
        crate::common::wait_for("node 2's directory to follow the room", crate::common::Polling::DEFAULT, async || {
            let d = directory(cat).await;
            if d == want { Ok(()) } else { Err(format!("{d:?}")) }
        })
        .await
    };
    seen(&mut cat, vec![("pub".into(), "Pub".into(), 1)]).await;
    // A member joins on node 1, the title changes on node 0.
    let mut bob = nodes[1].raw_member("bob", "pub").await;
    let update = proto::UpdateRoom { room: "pub".into(), title: Some("The pub".into()), ..Default::default() };
    assert!(matches!(ann.request(Body::UpdateRoom(update)).await, Body::RoomInfo(_)));
    seen(&mut cat, vec![("pub".into(), "The pub".into(), 2)]).await;
    // Banned: the room is no longer listed for cat.
    let ban = proto::Ban { room: "pub".into(), user: "cat".into(), reason: "spam".into() };
    assert!(matches!(ann.request(Body::Ban(ban)).await, Body::RoomInfo(_)));
    seen(&mut cat, vec![]).await;
    bob.ping().await;
    for n in nodes {
        n.stop().await;
    }
}

/// The server API's key of [`api_nodes`].
const KEY: &str = "a-backend-key-0123456789";

/// [`nodes`] with the server API on, its key [`KEY`].
async fn api_nodes(redis: &RedisServer, dir: &std::path::Path) -> Vec<TestServer> {
    nodes_with(redis, dir, 3, |c| c.api_key = Some(KEY.into())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_api_of_a_node_that_never_served_a_room_reads_it_as_it_is() {
    let Some(redis) = RedisServer::for_test("the_server_api_of_a_node_that_never_served", &[]) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let nodes = api_nodes(&redis, tmp.path()).await;
    let mut ann = nodes[0].raw_member("ann", "h").await;
    for i in 0..3 {
        ann.publish("h", &format!("m{i}")).await;
    }
    let get = async |path: &str| {
        let (status, _, v) = crate::common::api_call(&nodes[2].http, Some(KEY), "GET", path, None).await;
        assert_eq!(status, 200, "{path}: {v}");
        v
    };
    let page = get("/api/v1/rooms/h/messages?forward=true").await;
    let texts: Vec<&str> = page["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["m0", "m1", "m2"], "{page}");
    let room = get("/api/v1/rooms/h").await;
    assert_eq!(room["memberCount"], 1, "{room}");
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_out_everywhere_closes_the_sessions_on_every_node() {
    use chatd::proto::CloseReason;
    let Some(redis) = RedisServer::for_test("signing_out_everywhere_closes_the_sessions", &[]) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let nodes = api_nodes(&redis, tmp.path()).await;
    let old = crate::common::mint_token(tmp.path(), "bob", Duration::from_secs(3600), chatd::auth::unix_now() - 10);
    let mut one = Raw::connect_as(&nodes[1].addr, &old).await;
    let mut two = Raw::connect_as(&nodes[2].addr, &old).await;
    let mut other = nodes[2].raw_user("ann").await.0;
    // The count answered is read from the nodes' presence entries.
    let entries = async |n: &str| {
        crate::common::wait_until("bob's presence entries in Redis", async || {
            redis.cli(&["HLEN", "chatd:presence:{bob}"]).as_deref() == Some(n)
        })
        .await
    };
    entries("2").await;
    // Without revoke, through node 0: the sessions on nodes 1 and 2 close.
    let call = async |body: &str| {
        let (status, _, v) =
            crate::common::api_call(&nodes[0].http, Some(KEY), "POST", "/api/v1/users/bob/disconnect", Some(body))
                .await;
        assert_eq!(status, 200, "{v}");
        v
    };
    let out = call("{}").await;
    assert_eq!(out["sessions"], 2, "counted over the nodes: {out}");
    assert_eq!(one.skip_to_go_away().await, CloseReason::Unspecified);
    assert_eq!(two.skip_to_go_away().await, CloseReason::Unspecified);
    // The token still works; with revoke it is refused on every node.
    let mut one = Raw::connect_as(&nodes[1].addr, &old).await;
    entries("1").await;
    let out = call(r#"{"revoke": true}"#).await;
    assert_eq!((out["sessions"].clone(), out["revoked"].clone()), (1.into(), true.into()), "{out}");
    assert_eq!(one.skip_to_go_away().await, CloseReason::AuthExpired);
    assert!(one.closed().await);
    for n in &nodes {
        let mut again = n.raw().await;
        again.send_hello(&old, vec![]).await;
        again.expect_error(ErrorCode::Unauthenticated).await;
    }
    // Nobody else was touched.
    other.ping().await;
    for n in nodes {
        n.stop().await;
    }
}

/// `room`'s history through `r`: (first_seq, the seqs held).
async fn held(r: &mut Raw, room: &str) -> (u64, Vec<u64>) {
    let req = proto::History { room: room.into(), after_seq: 0, forward: true, limit: 1000, before_seq: 0 };
    match r.request(Body::History(req)).await {
        Body::HistoryPage(p) => (p.first_seq, p.messages.iter().map(|m| m.seq).collect()),
        other => panic!("reading the history of {room}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_trims_the_shared_log_and_every_node_starts_where_it_does() {
    let Some(redis) = RedisServer::for_test("retention_trims_the_shared_log", &[]) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let nodes = nodes_with(&redis, tmp.path(), 3, |c| {
        c.retention_max_messages = 5;
        c.retention_interval_ms = 50;
    })
    .await;
    let mut ann = nodes[0].raw_member("ann", "t").await;
    let mut bob = nodes[1].raw_member("bob", "t").await;
    // Dan is a member who never read anything; node 2 never serves the
    // room until he comes back there.
    drop(nodes[0].raw_member("dan", "t").await);
    let acks = ann.publish_all((1..=20).map(|i| publish("t", format!("m{i}"), format!("k{i}")))).await;
    assert_eq!(acks.last().unwrap().seq, 20);
    // Bob, live on node 1 throughout, got every message once.
    let live: Vec<u64> = messages(&mut bob, "t", 20).await.iter().map(|m| m.seq).collect();
    assert_eq!(live, (1..=20).collect::<Vec<_>>());
    crate::common::wait_until("the room's stream to keep its newest 5 entries", async || {
        redis.cli(&["XLEN", "chatd:{t}:log"]).as_deref() == Some("5")
    })
    .await;
    // Every node serving the room starts where Redis does.
    for r in [&mut ann, &mut bob] {
        crate::common::wait_for("the node to follow the trim", Polling::DEFAULT, async || {
            let h = held(r, "t").await;
            if h == (16, (16..=20).collect()) { Ok(()) } else { Err(format!("{h:?}")) }
        })
        .await;
    }
    // Node 2 starts the room from the trimmed stream: unread counts only
    // what can be read, and a resume from before the start says it is not
    // complete.
    let mut dan = Raw::connect(&nodes[2].addr).await;
    let w = dan.hello(&nodes[2].token("dan"), vec![proto::Cursor { room: "t".into(), after_seq: 3 }]).await;
    let state = w.rooms.iter().find(|r| r.room == "t").expect("dan is a member");
    assert_eq!((state.head_seq, state.unread), (20, 5), "{state:?}");
    let replayed: Vec<u64> = messages(&mut dan, "t", 5).await.iter().map(|m| m.seq).collect();
    assert_eq!(replayed, (16..=20).collect::<Vec<_>>());
    let synced = dan.next_push(|b| if let Body::Synced(s) = b { Some(s) } else { None }).await;
    assert_eq!((synced.complete, synced.first_seq, synced.head_seq), (false, 16, 20), "{synced:?}");
    assert_eq!(held(&mut dan, "t").await, (16, (16..=20).collect()));
    // Seqs go on after the trim.
    assert_eq!(ann.publish("t", "after").await.seq, 21);
    assert_eq!(messages(&mut dan, "t", 1).await[0].seq, 21);
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_to_a_message_are_checked_against_the_shared_log() {
    let Some(redis) = RedisServer::for_test("changes_to_a_message_are_checked", &[]) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let nodes = nodes(&redis, tmp.path()).await;
    let mut ann = nodes[0].raw_member("ann", "c").await;
    let mut bob = nodes[1].raw_member("bob", "c").await;
    let mut cat = nodes[2].raw_member("cat", "c").await;
    let react = |seq, add, id: &str| {
        Body::React(proto::React { room: "c".into(), seq, key: "+1".into(), add, client_msg_id: id.into() })
    };
    // A message published on node 0 is reacted to on node 2 at once.
    let seq = ann.publish("c", "hello").await.seq;
    assert!(matches!(cat.request(react(seq, true, "c1")).await, Body::PublishAck(a) if !a.duplicate));
    // Bob adds the same reaction twice before the first is back from
    // Redis: one entry, the second is answered as in force.
    bob.send(1, react(seq, true, "b1")).await;
    bob.send(2, react(seq, true, "b2")).await;
    let mut acks = Vec::new();
    while acks.len() < 2 {
        if let Some(Body::PublishAck(a)) = bob.recv().await.body {
            acks.push(a);
        }
    }
    assert_eq!(acks.iter().filter(|a| !a.duplicate).count(), 1, "{acks:?}");
    let reactions = |m: &proto::Message| m.reactions.iter().map(|r| (r.key.clone(), r.count)).collect::<Vec<_>>();
    for r in [&mut ann, &mut bob, &mut cat] {
        crate::common::wait_for("every node to fold both reactions once", Polling::DEFAULT, async || {
            let h = r.history_all("c").await;
            let first = h.iter().find(|m| m.seq == seq).map(reactions);
            if first == Some(vec![("+1".into(), 2)]) { Ok(()) } else { Err(format!("{first:?}")) }
        })
        .await;
    }
    // Deleted on node 0: a change decided on node 1 after it is refused,
    // by node 1's replica or by Redis, whichever knows first.
    let delete = Body::Delete(proto::Delete { room: "c".into(), seq, client_msg_id: "d1".into() });
    assert!(matches!(ann.request(delete).await, Body::PublishAck(_)));
    let refused = refused_or_acked(&mut bob, react(seq, false, "b3")).await;
    assert_eq!(refused, Some(ErrorCode::NotFound));
    for n in nodes {
        n.stop().await;
    }
}

/// The error code answering `body`, or `None` for an ack.
async fn refused_or_acked(r: &mut Raw, body: Body) -> Option<ErrorCode> {
    match r.request(body).await {
        Body::PublishAck(_) => None,
        Body::Error(e) => Some(e.code()),
        other => panic!("neither an ack nor an error: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_no_session_uses_is_dropped_from_memory_and_read_again_when_used() {
    use crate::common::{metric, scrape_metrics};
    let Some(redis) = RedisServer::for_test("a_room_no_session_uses_is_dropped", &[]) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let nodes = nodes_with(&redis, tmp.path(), 2, |c| c.cluster_replica_idle_ms = 200).await;
    let mut ann = nodes[0].raw_member("ann", "v").await;
    let mut bob = nodes[1].raw_member("bob", "v").await;
    for i in 0..5 {
        ann.publish("v", &format!("m{i}")).await;
    }
    let edit = Body::Edit(proto::Edit { room: "v".into(), seq: 2, text: "m1 edited".into(), ..Default::default() });
    assert!(matches!(ann.request(edit).await, Body::PublishAck(_)));
    let react = proto::React { room: "v".into(), seq: 3, key: "+1".into(), add: true, ..Default::default() };
    assert!(matches!(bob.request(Body::React(react)).await, Body::PublishAck(_)));
    // Bob leaves node 1 with no session in the room: it is evicted there.
    drop(bob);
    crate::common::wait_until("node 1 to stop serving the room", async || {
        metric(&scrape_metrics(&nodes[1].http).await, "chatd_cluster_rooms_evicted_total") >= 1.0
    })
    .await;
    assert_eq!(metric(&scrape_metrics(&nodes[1].http).await, "chatd_cluster_rooms_served"), 0.0);
    for i in 5..10 {
        ann.publish("v", &format!("m{i}")).await;
    }
    // Back on node 1: the missed messages once, in order, then live; the
    // history there as on node 0, changes folded in.
    let mut bob = Raw::connect(&nodes[1].addr).await;
    bob.hello(&nodes[1].token("bob"), vec![proto::Cursor { room: "v".into(), after_seq: 4 }]).await;
    let missed: Vec<u64> = messages(&mut bob, "v", 8).await.iter().map(|m| m.seq).collect();
    assert_eq!(missed, (5..=12).collect::<Vec<_>>());
    let synced = bob.next_push(|b| if let Body::Synced(s) = b { Some(s) } else { None }).await;
    assert!(synced.complete, "{synced:?}");
    let folded = |h: Vec<proto::Message>| {
        h.into_iter().map(|m| (m.seq, m.text, m.reactions.len(), m.edited_ms > 0)).collect::<Vec<_>>()
    };
    let here = folded(bob.history_all("v").await);
    assert_eq!(here, folded(ann.history_all("v").await));
    assert_eq!(here.len(), 12, "{here:?}");
    assert_eq!(ann.publish("v", "live").await.seq, 13);
    assert_eq!(messages(&mut bob, "v", 1).await[0].text, "live");
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_forgets_the_changes_kept_for_trimmed_messages() {
    let Some(redis) = RedisServer::for_test("retention_forgets_the_changes", &[]) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let node = nodes_with(&redis, tmp.path(), 1, |c| {
        c.retention_max_messages = 3;
        c.retention_interval_ms = 50;
    })
    .await
    .remove(0);
    let mut ann = node.raw_member("ann", "x").await;
    // Published one by one: each pass keeps the newest 3.
    for i in 1..=5 {
        ann.publish("x", &format!("m{i}")).await;
    }
    let delete = Body::Delete(proto::Delete { room: "x".into(), seq: 4, client_msg_id: "d".into() });
    assert!(matches!(ann.request(delete).await, Body::PublishAck(_)));
    let react = proto::React { room: "x".into(), seq: 5, key: "+1".into(), add: true, client_msg_id: "r".into() };
    assert!(matches!(ann.request(Body::React(react)).await, Body::PublishAck(_)));
    // Entries 5..=7 are kept: the delete of 4 is forgotten, the reaction
    // on 5 stays (removing it must still be checked).
    crate::common::wait_until("the stream to start at 5 and the delete of 4 to be forgotten", async || {
        redis.cli(&["XLEN", "chatd:{x}:log"]).as_deref() == Some("3")
            && redis.cli(&["HLEN", "chatd:{x}:changes"]).as_deref() == Some("1")
    })
    .await;
    assert!(redis.cli(&["HKEYS", "chatd:{x}:changes"]).unwrap().starts_with("r:5"));
    node.stop().await;
}
