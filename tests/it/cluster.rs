//! Cluster mode's shared log against a real `redis-server` on loopback:
//! seqs assigned atomically by the append script whatever the number of
//! nodes appending, idempotent retries across nodes, the membership check,
//! the refusal of a Redis that would lose what it acknowledged, and feeds
//! that deliver every entry once, in order, through lost subscriptions, a
//! killed Redis and an emptied one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chatd::proto::Message;
use chatd::store::redis::feed::{Delivery, Feed};
use chatd::store::redis::{
    AppendError, Durability, NewEntry, OpenError, Options, RedisLog, Target, fresh_epoch, room_key,
};
use prost::Message as _;
use tokio::sync::mpsc;

use crate::common::WAIT;
use crate::common::redis::{RedisCluster, RedisServer};

async fn open(redis: &RedisServer) -> Arc<RedisLog> {
    Arc::new(RedisLog::open(&Target::Single(redis.url()), Options::default()).await.expect("the log opens"))
}

/// A message as a node encodes it before the script adds seq and time.
fn body(room: &str, sender: &str, text: &str) -> Vec<u8> {
    Message { room: room.into(), sender: sender.into(), text: text.into(), ..Default::default() }.encode_to_vec()
}

async fn append(
    log: &RedisLog,
    room: &str,
    text: &str,
    key: &str,
) -> Result<chatd::store::redis::Appended, AppendError> {
    let message = body(room, "ann", text);
    let e = NewEntry { room, message: &message, owner: "ann", client_msg_id: key, member: "", seen: 0, change: None };
    log.append(&e, &fresh_epoch()).await
}

/// A feed's entries by room: (seq, encoded message) in delivery order.
type Seen = HashMap<String, Vec<(u64, Vec<u8>)>>;

/// Takes a feed's deliveries as they come (a feed waits for its consumer,
/// as the fan-out takes them at once in the server) and hands them to
/// [`collect`] through a fresh channel.
fn drain(mut rx: mpsc::Receiver<Delivery>) -> mpsc::Receiver<Delivery> {
    let (tx, out) = mpsc::channel(1 << 20);
    tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            if tx.send(d).await.is_err() {
                return;
            }
        }
    });
    out
}

/// Collects a feed's deliveries per room until `want` entries of each room
/// of `rooms` arrived; asserts each room's seqs are 1..=want in order.
async fn collect(rx: &mut mpsc::Receiver<Delivery>, rooms: &[&str], want: u64) -> Seen {
    let mut got: Seen = HashMap::new();
    let done = |got: &Seen| rooms.iter().all(|r| got.get(*r).map_or(0, |v| v.len() as u64) >= want);
    while !done(&got) {
        let d = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("a feed stalled: {:?}", got.iter().map(|(r, v)| (r, v.len())).collect::<Vec<_>>())
            })
            .expect("the feed runs");
        assert!(!d.epoch_changed, "no entry was lost, yet the feed saw an epoch change");
        let entries = got.entry(d.room.to_string()).or_default();
        for e in d.entries {
            entries.push((e.seq, e.message.to_vec()));
        }
    }
    for r in rooms {
        let seqs: Vec<u64> = got[*r].iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (1..=want).collect::<Vec<_>>(), "room {r}: every entry once, in order");
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_appending_to_the_same_rooms_get_one_order_seen_alike_by_every_feed() {
    let Some(redis) = RedisServer::for_test("the cluster log test", &[]) else { return };
    let nodes = [open(&redis).await, open(&redis).await, open(&redis).await];
    let rooms = ["r1", "r2"];
    let mut feeds = Vec::new();
    for node in &nodes {
        let (tx, rx) = mpsc::channel(64);
        let feed = Feed::start(node.clone(), tx);
        let rx = drain(rx);
        for r in rooms {
            feed.subscribe(r.into(), 0);
        }
        feeds.push((feed, rx));
    }
    const PER_TASK: u64 = 150;
    let mut tasks = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for t in 0..2 {
            let node = node.clone();
            tasks.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..PER_TASK {
                    let room = rooms[(i % 2) as usize];
                    let text = format!("n{n}-t{t}-{i}");
                    let a = append(&node, room, &text, &text).await.expect("appended");
                    assert!(!a.duplicate);
                    acked.push((room, a.seq, text));
                }
                acked
            }));
        }
    }
    let mut acked: HashMap<(&str, u64), String> = HashMap::new();
    for t in tasks {
        for (room, seq, text) in t.await.unwrap() {
            assert!(acked.insert((room, seq), text).is_none(), "seq {seq} of {room} handed out twice");
        }
    }
    let per_room = 3 * 2 * PER_TASK / 2;
    assert_eq!(acked.len() as u64, 2 * per_room);
    let mut first: Option<Seen> = None;
    for (_, rx) in &mut feeds {
        let got = collect(rx, &rooms, per_room).await;
        for (room, entries) in &got {
            for (seq, bytes) in entries {
                let m = Message::decode(&bytes[..]).expect("a Message");
                assert_eq!((m.seq, m.room.as_str()), (*seq, room.as_str()), "the script wrote the seq into it");
                assert!(m.ts_ms > 1_600_000_000_000, "and the time: {}", m.ts_ms);
                assert_eq!(acked[&(room.as_str(), *seq)], m.text, "the acked message is at its seq");
            }
        }
        match &first {
            None => first = Some(got),
            Some(f) => assert_eq!(f, &got, "every node saw the same entries in the same order"),
        }
    }
    // History reads the same log back.
    let back = nodes[1].range("r1", 10, 20).await.unwrap();
    assert_eq!(back.iter().map(|e| e.seq).collect::<Vec<_>>(), (10..=20).collect::<Vec<_>>());
    assert_eq!(
        back.iter().map(|e| e.message.to_vec()).collect::<Vec<_>>(),
        first.unwrap()["r1"][9..20].iter().map(|(_, m)| m.clone()).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_key_is_answered_with_the_original_on_any_node_and_members_are_checked() {
    let Some(redis) = RedisServer::for_test("the cluster log test", &[]) else { return };
    let (a, b) = (open(&redis).await, open(&redis).await);
    let first = append(&a, "r", "hello", "k1").await.unwrap();
    let retry = append(&b, "r", "hello again", "k1").await.unwrap();
    assert!(!first.duplicate && retry.duplicate);
    assert_eq!((retry.seq, retry.ts_ms, &retry.epoch), (first.seq, first.ts_ms, &first.epoch));
    assert_eq!(a.range("r", 1, 10).await.unwrap().len(), 1, "stored once");
    let other = append(&b, "r", "x", "k2").await.unwrap();
    assert_eq!(other.seq, 2);
    assert_eq!(append(&b, "r2", "x", "k1").await.unwrap().seq, 1, "keys are per room");

    let message = body("r", "bob", "hi");
    let as_bob = NewEntry {
        room: "r",
        message: &message,
        owner: "bob",
        client_msg_id: "",
        member: "bob",
        seen: 0,
        change: None,
    };
    match a.append(&as_bob, &fresh_epoch()).await {
        Err(AppendError::Forbidden(why)) => assert!(why.contains("bob"), "{why}"),
        other => panic!("a non-member's append: {other:?}"),
    }
    a.set_role("r", "bob", 1).await.unwrap();
    assert_eq!(b.append(&as_bob, &fresh_epoch()).await.unwrap().seq, 3);
    a.set_role("r", "bob", 0).await.unwrap();
    assert!(matches!(b.append(&as_bob, &fresh_epoch()).await, Err(AppendError::Forbidden(_))));
    assert_eq!(a.head("r").await.unwrap().0, 3, "refused appends take no seq");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_would_lose_acknowledged_writes_is_refused_unless_relaxed() {
    let Some(redis) = RedisServer::for_test("the cluster log test", &["--appendfsync", "everysec"]) else { return };
    let target = Target::Single(redis.url());
    match RedisLog::open(&target, Options::default()).await {
        Err(e @ OpenError::NotDurable { .. }) => {
            let text = e.to_string();
            assert!(text.contains("appendfsync \"everysec\"") && text.contains("relaxed"), "{text}");
        }
        Err(e) => panic!("refused for the wrong reason: {e}"),
        Ok(_) => panic!("a Redis with appendfsync everysec was accepted"),
    }
    let relaxed = Options { durability: Durability::Relaxed, ..Options::default() };
    let log = RedisLog::open(&target, relaxed).await.expect("accepted when relaxed");
    assert_eq!(append(&log, "r", "x", "").await.unwrap().seq, 1);
    let none = Target::Single("redis://127.0.0.1:1".into());
    assert!(matches!(RedisLog::open(&none, Options::default()).await, Err(OpenError::Unreachable { .. })));
}

/// Kills the feeds' subscription connections (by their client name);
/// returns how many.
fn kill_feeds(redis: &RedisServer) -> usize {
    let list = redis.cli(&["CLIENT", "LIST"]).unwrap_or_default();
    let name = format!("name={}", chatd::store::redis::feed::FEED_CLIENT_NAME);
    let ids: Vec<&str> = list
        .lines()
        .filter(|l| l.split(' ').any(|f| f == name))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .collect();
    ids.iter().filter(|id| redis.cli(&["CLIENT", "KILL", "ID", id]).as_deref() == Some("1")).count()
}

/// Appends a publisher makes at least, whatever the machine's speed: the
/// checks that count on a load do not depend on how fast it goes.
const MIN_APPENDS: usize = 60;

/// Appends to `room` until `stop` (and at least [`MIN_APPENDS`]), returning
/// every acked (seq, text).
fn publisher(
    log: Arc<RedisLog>,
    room: &'static str,
    stop: Arc<tokio::sync::Notify>,
) -> tokio::task::JoinHandle<Vec<(u64, String)>> {
    tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut i = 0u64;
        let stopped = stop.notified();
        tokio::pin!(stopped);
        let mut stop_asked = false;
        loop {
            // Checked between appends, never by cancelling one: an append
            // cut off after Redis took it would be in the log unacked.
            stop_asked = stop_asked || futures_util::FutureExt::now_or_never(stopped.as_mut()).is_some();
            if stop_asked && acked.len() >= MIN_APPENDS {
                return acked;
            }
            let text = format!("m{i}");
            match append(&log, room, &text, &text).await {
                Ok(a) => acked.push((a.seq, text)),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            }
            i += 1;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_whose_subscription_is_killed_under_load_fills_the_gap_from_the_stream() {
    let Some(redis) = RedisServer::for_test("the cluster log test", &[]) else { return };
    let (writer, reader) = (open(&redis).await, open(&redis).await);
    let (tx, rx) = mpsc::channel(64);
    let feed = Feed::start(reader, tx);
    let mut rx = drain(rx);
    feed.subscribe("busy".into(), 0);
    let stop = Arc::new(tokio::sync::Notify::new());
    let publishing = publisher(writer.clone(), "busy", stop.clone());
    let connections = || feed.state.connections.load(std::sync::atomic::Ordering::Relaxed);
    for kill in 1..=5 {
        // Each kill lands on a subscribed feed with appends going on.
        let deadline = std::time::Instant::now() + WAIT;
        while connections() < kill {
            assert!(std::time::Instant::now() < deadline, "the feed did not reconnect after kill {}", kill - 1);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(kill_feeds(&redis), 1, "kill {kill} found the feed's connection");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.notify_one();
    let acked = publishing.await.unwrap();
    assert!(acked.len() >= MIN_APPENDS, "{} appends", acked.len());
    let got = collect(&mut rx, &["busy"], acked.len() as u64).await;
    for ((seq, text), (got_seq, bytes)) in acked.iter().zip(&got["busy"]) {
        assert_eq!(seq, got_seq);
        assert_eq!(&Message::decode(&bytes[..]).unwrap().text, text);
    }
    assert!(connections() >= 6, "it reconnected after every kill");
    assert!(feed.state.filled.load(std::sync::atomic::Ordering::Relaxed) > 0, "and filled gaps from the stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redis_keeps_every_acknowledged_entry_and_the_feed_comes_back_by_itself() {
    let Some(mut redis) = RedisServer::for_test("the cluster log test", &[]) else { return };
    let (writer, reader) = (open(&redis).await, open(&redis).await);
    let (tx, rx) = mpsc::channel(64);
    let feed = Feed::start(reader.clone(), tx);
    let mut rx = drain(rx);
    feed.subscribe("r".into(), 0);
    let stop = Arc::new(tokio::sync::Notify::new());
    let publishing = publisher(writer.clone(), "r", stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let head_before = reader.head("r").await.unwrap().0;
    redis.kill();
    // Appends fail while it is down (never a false ack).
    assert!(matches!(append(&writer, "r", "down", "").await, Err(AppendError::Unavailable(_))));
    tokio::time::sleep(Duration::from_millis(200)).await;
    redis.restart();
    let deadline = std::time::Instant::now() + WAIT;
    while reader.head("r").await.map_or(0, |(h, _)| h) < head_before + 20 {
        assert!(std::time::Instant::now() < deadline, "appends did not resume after the restart");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.notify_one();
    let acked = publishing.await.unwrap();
    let stored = reader.range("r", 1, u64::MAX).await.unwrap();
    let by_seq: HashMap<u64, String> =
        stored.iter().map(|e| (e.seq, Message::decode(&e.message[..]).unwrap().text)).collect();
    for (seq, text) in &acked {
        assert_eq!(by_seq.get(seq), Some(text), "acknowledged entry {seq} survived the kill");
    }
    let seqs: Vec<u64> = stored.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "no seq skipped or reused");
    assert!(acked.iter().any(|(s, _)| *s > head_before), "acknowledged appends after the restart");
    let head = seqs.len() as u64;
    collect(&mut rx, &["r"], head).await;
    assert!(feed.state.is_up());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_redis_never_reuses_a_seq_and_the_feed_says_the_epoch_changed() {
    let Some(redis) = RedisServer::for_test("the cluster log test", &[]) else { return };
    let log = open(&redis).await;
    let (tx, mut rx) = mpsc::channel(64);
    let feed = Feed::start(log.clone(), tx);
    feed.subscribe("r".into(), 0);
    for i in 0..5 {
        append(&log, "r", &format!("m{i}"), "").await.unwrap();
    }
    let before = collect(&mut rx, &["r"], 5).await;
    assert_eq!(before["r"].len(), 5);
    let epoch = log.head("r").await.unwrap().1.unwrap();
    assert_eq!(redis.cli(&["FLUSHALL"]).as_deref(), Some("OK"));
    // A node that has seen seq 5 appends: seqs go on after it.
    let message = body("r", "ann", "after");
    let e =
        NewEntry { room: "r", message: &message, owner: "ann", client_msg_id: "", member: "", seen: 5, change: None };
    let a = log.append(&e, &fresh_epoch()).await.unwrap();
    assert_eq!(a.seq, 6, "seqs 1..=5 are never handed out again");
    assert_ne!(a.epoch, epoch, "a new epoch");
    let d = tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert!(d.epoch_changed, "the feed reports the change");
    assert_eq!(d.entries.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![6]);
    assert_eq!(feed.state.epoch_changes.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_each_room_lives_on_one_shard_and_feeds_use_sharded_pub_sub() {
    if !RedisServer::available("the Redis Cluster test") {
        return;
    }
    let cluster = RedisCluster::start();
    let target = Target::parse(&cluster.url()).unwrap();
    assert!(target.is_cluster());
    // One room on each master.
    let mut rooms: Vec<&'static str> = Vec::new();
    let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p"];
    for master in 0..3 {
        let name = names
            .iter()
            .find(|r| cluster.owner_of(&room_key(r, "log")) == master)
            .unwrap_or_else(|| panic!("no room on master {master}"));
        for part in ["meta", "members", "idem:ann:k", "ch"] {
            assert_eq!(cluster.owner_of(&room_key(name, part)), master, "{part} of {name} shares its slot");
        }
        rooms.push(name);
    }
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(Arc::new(RedisLog::open(&target, Options::default()).await.expect("the log opens")));
    }
    let mut feeds = Vec::new();
    for node in &nodes {
        let (tx, rx) = mpsc::channel(64);
        let feed = Feed::start(node.clone(), tx);
        for r in &rooms {
            feed.subscribe((*r).into(), 0);
        }
        feeds.push((feed, drain(rx)));
    }
    const PER_NODE: u64 = 90;
    let mut tasks = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let (node, rooms) = (node.clone(), rooms.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_NODE {
                let text = format!("n{n}-{i}");
                append(&node, rooms[(i % 3) as usize], &text, &text).await.expect("appended");
            }
        }));
    }
    // Cut every feed's shard connections mid-run: the cluster client
    // reconnects and resubscribes, and the feeds fill what they missed.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut cut = 0;
    for master in &cluster.nodes {
        let list = master.cli(&["CLIENT", "LIST"]).unwrap_or_default();
        for id in list
            .lines()
            .filter(|l| !l.contains(" ssub=0 "))
            .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        {
            cut += usize::from(master.cli(&["CLIENT", "KILL", "ID", id]).as_deref() == Some("1"));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(cut >= 3, "{cut} shard subscriptions cut");
    let retry = append(&nodes[2], rooms[0], "n0-0", "n0-0").await.unwrap();
    assert!(retry.duplicate, "a retry on another node, through the cluster, is a duplicate");
    let mut first: Option<Seen> = None;
    for (_, rx) in &mut feeds {
        let got = collect(rx, &rooms, PER_NODE).await;
        match &first {
            None => first = Some(got),
            Some(f) => assert_eq!(f, &got, "every node saw the same entries in the same order"),
        }
    }
    state_round_trip(&nodes[0], &nodes[1]).await;
    // Sharded channels: each master served its own room's subscriptions.
    for (master, room) in rooms.iter().enumerate() {
        let channels = cluster.nodes[master].cli(&["PUBSUB", "SHARDCHANNELS"]).unwrap_or_default();
        assert!(channels.contains(&room_key(room, "ch")), "master {master} has {room}'s shard channel: {channels}");
    }
}

/// Writes rooms' state on one node and reads it back on another: details,
/// members with roles and a departure, a ban placed and one lifted, an
/// invitation made and one withdrawn, a read marker, a revocation; the
/// append script sees the roles written.
async fn state_round_trip(a: &RedisLog, b: &RedisLog) {
    use chatd::store::redis::state::StateWrite;
    use chatd::store::{BanRecord, InviteRecord, MemberRecord, ReadPos, RoomDetails};
    let details =
        RoomDetails { kind: 2, title: "Ops".into(), created_by: "ann".into(), created_ms: 5, ..Default::default() };
    let owner = MemberRecord { role: 3, since: 5, ..Default::default() };
    let member = MemberRecord { role: 1, since: 6, ..Default::default() };
    let removed = MemberRecord { role: 0, reason: 4, by: "ann".into(), ..Default::default() };
    let ban = BanRecord { by: "ann".into(), reason: "spam".into(), ts_ms: 7 };
    let invite = InviteRecord { by: "ann".into(), ts_ms: 8 };
    let pos = ReadPos { seq: 3, messages: 3, sent: 1, mentioned: 0 };
    let other = RoomDetails { kind: 1, ..Default::default() };
    a.write_state(&[
        StateWrite::Details { room: "ops", details: &details },
        StateWrite::Details { room: "lobby", details: &other },
        StateWrite::Member { room: "ops", user: "ann", record: &owner },
        StateWrite::Member { room: "ops", user: "bob", record: &member },
        StateWrite::Member { room: "ops", user: "cat", record: &member },
        StateWrite::Ban { room: "ops", user: "eve", ban: Some(&ban) },
        StateWrite::Ban { room: "ops", user: "mal", ban: Some(&ban) },
        StateWrite::Invite { room: "ops", user: "dan", invite: Some(&invite) },
        StateWrite::Invite { room: "lobby", user: "dan", invite: Some(&invite) },
        StateWrite::ReadMarker { room: "ops", user: "bob", pos },
        StateWrite::Revocation { user: "eve", secs: 100 },
    ])
    .await
    .unwrap();
    a.write_state(&[
        StateWrite::Member { room: "ops", user: "cat", record: &removed },
        StateWrite::Ban { room: "ops", user: "mal", ban: None },
        StateWrite::Invite { room: "lobby", user: "dan", invite: None },
    ])
    .await
    .unwrap();
    let message = body("ops", "bob", "hi");
    let as_user = |user| NewEntry {
        room: "ops",
        message: &message,
        owner: user,
        client_msg_id: "",
        member: user,
        seen: 0,
        change: None,
    };
    assert_eq!(b.append(&as_user("bob"), &fresh_epoch()).await.unwrap().seq, 1, "a member appends");
    assert!(
        matches!(b.append(&as_user("cat"), &fresh_epoch()).await, Err(AppendError::Forbidden(_))),
        "a removed one may not"
    );

    let state = b.load_state().await.unwrap();
    let mut names: Vec<&String> = state.rooms.keys().collect();
    names.sort();
    assert_eq!(names, ["lobby", "ops"]);
    let ops = &state.rooms["ops"];
    assert_eq!((&ops.details, ops.head), (&details, 1));
    assert_eq!(ops.records, vec![("ann".into(), owner), ("bob".into(), member), ("cat".into(), removed)]);
    assert_eq!(ops.bans, vec![("eve".into(), ban)]);
    assert_eq!(ops.invites, vec![("dan".into(), invite)]);
    assert_eq!(ops.reads, vec![("bob".into(), pos)]);
    assert!(state.rooms["lobby"].invites.is_empty());
    assert_eq!(state.revocations, vec![("eve".into(), 100)]);
    assert_eq!(b.invitations_of("dan").await.unwrap(), ["ops"]);
    assert_eq!(b.room_state("nowhere").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_state_written_on_one_node_is_read_back_on_another() {
    let Some(redis) = RedisServer::for_test("the cluster state test", &[]) else { return };
    state_round_trip(&*open(&redis).await, &*open(&redis).await).await;
}
