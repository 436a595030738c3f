//! Acknowledged means stored: across a clean restart, a SIGTERM under load,
//! and a SIGKILL under load (the `chatd` binary as a child process) — for
//! messages and for room administration (an answered removal, ban, creation
//! or invitation is never undone by a crash).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::BytesMut;
use chatd::codec::put_frame;
use chatd::proto::{self, Body, Envelope};
use tokio::io::AsyncWriteExt;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_messages_memberships_markers_and_idempotency() {
    restart_keeps_everything(chatd::config::DurabilityMode::Fsync).await;
}

/// `batch` and `none` write small group commits on a worker, not on the
/// blocking pool (store::commit): the same through a clean restart, which
/// syncs whatever the mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restart_keeps_everything_with_batch_and_none_durability() {
    restart_keeps_everything(chatd::config::DurabilityMode::Batch).await;
    restart_keeps_everything(chatd::config::DurabilityMode::None).await;
}

async fn restart_keeps_everything(durability: chatd::config::DurabilityMode) {
    let mode = |c: &mut chatd::config::Config| {
        c.durability = durability;
        c.batch_sync_ms = 3_600_000;
    };
    let tmp = tempfile::tempdir().unwrap();
    let s = TestServer::start_in(tmp.path(), mode).await;
    let (c, _) = s.client("ann").await;
    c.join("r").await.unwrap();
    c.join("dm:ann:bob").await.unwrap();
    let p =
        proto::Publish { room: "r".into(), client_msg_id: "k-last".into(), text: "last".into(), ..Default::default() };
    for i in 0..99 {
        c.publish("r", &format!("m{i}")).await.unwrap();
    }
    let last = c.publish_message(p.clone()).await.unwrap();
    assert_eq!(last.seq, 100);
    c.mark_read("r", 40).await.unwrap();
    c.close();
    s.stop().await;

    let s = TestServer::start_in(tmp.path(), mode).await;
    let (c, _) = s.client("ann").await;
    let mut rooms: Vec<_> = c.welcome().rooms.iter().map(|r| (r.room.as_str(), r.head_seq, r.read_seq)).collect();
    rooms.sort();
    assert_eq!(rooms, vec![("dm:ann:bob", 0, 0), ("r", 100, 40)]);
    let again = c.publish_message(p).await.unwrap();
    assert!(again.duplicate && again.seq == 100 && again.ts_ms == last.ts_ms);
    assert_eq!(c.publish("r", "next").await.unwrap().seq, 101, "the seq continues");
    let page =
        c.history(proto::History { room: "r".into(), forward: true, limit: 1000, ..Default::default() }).await.unwrap();
    assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=101).collect::<Vec<_>>(), "{durability}");
}

/// One publisher pipelining `n` messages round-robin into `rooms`, with keys
/// `user-counter`; returns the acks received before the connection died.
async fn publish_until_cut(
    addr: String,
    token: String,
    user: String,
    rooms: Vec<String>,
    n: u64,
    acked_so_far: Arc<AtomicUsize>,
) -> HashMap<String, (String, u64)> {
    let keys = (0..n).map(|i| (format!("{user}-{i}"), rooms[i as usize % rooms.len()].clone())).collect();
    publish_keys(addr, token, keys, acked_so_far, Default::default()).await
}

/// Waits until `counter` reaches `n` (or panics after a while).
async fn wait_for_acks(counter: &AtomicUsize, n: usize) {
    wait_for(&format!("{n} acks"), Polling::new(WAIT * 3, 5), async || match counter.load(Ordering::Relaxed) {
        acked if acked >= n => Ok(()),
        acked => Err(format!("only {acked} acks arrived")),
    })
    .await
}

/// What an audit of the stored log found.
#[derive(Debug, Default)]
pub struct Audit {
    /// Messages in the log.
    pub stored: usize,
    /// Acknowledged keys missing from the log.
    pub lost: Vec<String>,
    /// Keys stored more than once.
    pub duplicated: Vec<String>,
    /// Rooms whose seqs are not contiguous from 1.
    pub gaps: Vec<String>,
    /// (publisher, room) pairs whose messages are out of the publisher's order.
    pub reordered: Vec<String>,
    /// Acknowledged keys stored at another seq than their ack said.
    pub moved: Vec<String>,
}

impl Audit {
    pub fn clean(&self) -> bool {
        self.lost.is_empty()
            && self.duplicated.is_empty()
            && self.gaps.is_empty()
            && self.reordered.is_empty()
            && self.moved.is_empty()
    }
}

/// Reads every room's whole log and checks it against the acks: every acked
/// key present exactly once at its acked seq, seqs contiguous from 1, each
/// publisher's messages (keys `user-counter`) in its own order.
pub async fn audit(addr: &str, token: &str, rooms: &[String], acked: &HashMap<String, (String, u64)>) -> Audit {
    let mut r = Raw::connect_as(addr, token).await;
    let mut a = Audit::default();
    let mut seen: HashMap<String, (String, u64)> = HashMap::new();
    for room in rooms {
        r.join(room).await;
        let mut after = 0;
        let mut last_counter: HashMap<String, u64> = HashMap::new();
        for m in &r.history_all(room).await {
            if m.seq != after + 1 {
                a.gaps.push(format!("{room}: #{} after #{after}", m.seq));
            }
            after = m.seq;
            a.stored += 1;
            if seen.insert(m.client_msg_id.clone(), (room.clone(), m.seq)).is_some() {
                a.duplicated.push(m.client_msg_id.clone());
            }
            let key = m.client_msg_id.rsplit_once('-').and_then(|(u, c)| Some((u.to_string(), c.parse::<u64>().ok()?)));
            if let Some((user, counter)) = key
                && let Some(prev) = last_counter.insert(user.clone(), counter)
                && prev >= counter
            {
                a.reordered.push(format!("{user} in {room}: {prev} before {counter}"));
            }
        }
    }
    for (key, at) in acked {
        match seen.get(key) {
            None => a.lost.push(key.clone()),
            Some(found) if found != at => a.moved.push(format!("{key}: acked {at:?}, stored {found:?}")),
            Some(_) => {}
        }
    }
    a
}

/// The audit, asserted clean; returns the number of stored messages.
async fn check_log(addr: &str, token: &str, rooms: &[String], acked: &HashMap<String, (String, u64)>) -> usize {
    let a = audit(addr, token, rooms, acked).await;
    assert!(a.clean(), "the log does not match the acks: {a:?}");
    a.stored
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_message() {
    let tmp = tempfile::tempdir().unwrap();
    let rooms: Vec<String> = (0..3).map(|i| format!("room{i}")).collect();
    let mut server = Process::start(tmp.path(), &[]);
    let addr = server.addr.clone();
    let counter = Arc::new(AtomicUsize::new(0));
    const PER_PUBLISHER: u64 = 200_000;
    let mut tasks = Vec::new();
    for p in 0..3 {
        let user = format!("p{p}");
        let token = token_for(tmp.path(), &user);
        tasks.push(tokio::spawn(publish_until_cut(
            addr.clone(),
            token,
            user,
            rooms.clone(),
            PER_PUBLISHER,
            counter.clone(),
        )));
    }
    // Let acks flow, then kill -9 in the middle of the stream.
    wait_for_acks(&counter, 3000).await;
    server.kill9();
    let mut acked = HashMap::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert!(acked.len() >= 3000, "acks before the kill");
    assert!((acked.len() as u64) < 3 * PER_PUBLISHER, "the kill happened mid-stream");

    let server = Process::start(tmp.path(), &[]);
    let stored = check_log(&server.addr, &token_for(tmp.path(), "checker"), &rooms, &acked).await;
    assert!(stored >= acked.len());
    // Retrying every key after the crash stores nothing twice.
    let (mut retry, _) = server.raw_user("p0").await;
    for i in 0..200u64 {
        let room = &rooms[i as usize % rooms.len()];
        let p = proto::Publish {
            room: room.clone(),
            client_msg_id: format!("p0-{i}"),
            text: format!("{i}"),
            ..Default::default()
        };
        let a = retry.publish_message(p).await;
        if let Some((r, seq)) = acked.get(&format!("p0-{i}")) {
            assert!(a.duplicate && &a.room == r && a.seq == *seq, "retry of an acked key: {a:?}");
        }
    }
    check_log(&server.addr, &token_for(tmp.path(), "checker"), &rooms, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_acks_and_exits_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let rooms = vec!["a".to_string(), "b".to_string()];
    let mut server = Process::start(tmp.path(), &[]);
    let counter = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for p in 0..2 {
        let user = format!("t{p}");
        let token = token_for(tmp.path(), &user);
        tasks.push(tokio::spawn(publish_until_cut(
            server.addr.clone(),
            token,
            user,
            rooms.clone(),
            200_000,
            counter.clone(),
        )));
    }
    wait_for_acks(&counter, 2000).await;
    let status = tokio::task::spawn_blocking(move || server.terminate()).await.unwrap();
    assert!(status.success(), "chatd exits 0 after SIGTERM: {status:?}");
    let mut acked = HashMap::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert!(!acked.is_empty());
    let server = Process::start(tmp.path(), &[]);
    check_log(&server.addr, &token_for(tmp.path(), "checker"), &rooms, &acked).await;
}

/// Connects, says Hello and joins `rooms`; `None` if the server went away.
async fn setup(addr: &str, token: &str, rooms: &[&String]) -> Option<Raw> {
    let mut r = Raw::try_connect(addr).await?;
    r.send_hello(token, vec![]).await;
    if !matches!(r.try_recv().await?.body, Some(Body::Welcome(_))) {
        return None;
    }
    for (i, room) in rooms.iter().enumerate() {
        let id = 2 + i as u64;
        r.send(id, Body::Join(proto::Join { room: room.to_string() })).await;
        loop {
            let env = r.try_recv().await?;
            if env.id == id {
                break;
            }
        }
    }
    Some(r)
}

/// Publishes `keys` (user-counter keys, each with its room) pipelined, in
/// order; returns the acks received before the connection ended or all came.
/// A change the crash battery makes instead of a publish: of what kind,
/// to which seq of the key's room.
#[derive(Clone, Copy, Debug)]
enum ChangeOf {
    React(u64),
    Edit(u64),
    Delete(u64),
}

impl ChangeOf {
    fn body(self, room: &str, key: &str) -> Body {
        let (room, client_msg_id) = (room.to_string(), key.to_string());
        match self {
            ChangeOf::React(seq) => {
                Body::React(proto::React { room, seq, key: format!("r-{key}"), add: true, client_msg_id })
            }
            ChangeOf::Edit(seq) => Body::Edit(proto::Edit {
                room,
                seq,
                client_msg_id,
                text: format!("edit-{key}"),
                data: Default::default(),
            }),
            ChangeOf::Delete(seq) => Body::Delete(proto::Delete { room, seq, client_msg_id }),
        }
    }
}

/// Pipelines a publish (or, for the keys in `changes`, that change) per
/// key and returns the acks received before the connection ended.
async fn publish_keys(
    addr: String,
    token: String,
    keys: Vec<(String, String)>,
    counter: Arc<AtomicUsize>,
    changes: Arc<HashMap<String, ChangeOf>>,
) -> HashMap<String, (String, u64)> {
    if keys.is_empty() {
        return HashMap::new();
    }
    let mut rooms: Vec<&String> = keys.iter().map(|(_, room)| room).collect();
    rooms.sort();
    rooms.dedup();
    // The server may be killed at any moment, this publisher's own
    // handshake included: then it simply got no acks.
    let Some(mut r) = setup(&addr, &token, &rooms).await else { return HashMap::new() };
    let mut wire = BytesMut::new();
    for (i, (key, room)) in keys.iter().enumerate() {
        let body = match changes.get(key) {
            Some(c) => c.body(room, key),
            None => Body::Publish(proto::Publish {
                room: room.clone(),
                client_msg_id: key.clone(),
                text: key.clone(),
                ..Default::default()
            }),
        };
        put_frame(&mut wire, &Envelope::new(1000 + i as u64, body));
    }
    let mut w = r.writer;
    tokio::spawn(async move {
        let _ = w.write_all(&wire).await;
        std::future::pending::<()>().await;
    });
    let mut acks = HashMap::new();
    loop {
        let Ok(Ok(Some(f))) = tokio::time::timeout(WAIT, r.reader.read_frame()).await else { break };
        match chatd::codec::decode_envelope(&f) {
            Ok(Envelope { body: Some(Body::PublishAck(a)), .. }) => {
                acks.insert(a.client_msg_id.clone(), (a.room, a.seq));
                counter.fetch_add(1, Ordering::Relaxed);
                if acks.len() == keys.len() {
                    break;
                }
            }
            // Nothing is refused here: every request is valid when sent.
            Ok(Envelope { id, body: Some(Body::Error(e)) }) => {
                let key = keys.get((id as usize).wrapping_sub(1000)).map(|(k, _)| k.as_str());
                let change = key.and_then(|k| changes.get(k));
                panic!("{key:?} ({change:?}) refused: {e:?}");
            }
            _ => {}
        }
    }
    acks
}

/// Room administration pipelined beside the crash battery's publishes:
/// `requests` in order; returns the indexes answered with `RoomInfo`
/// before the connection ended. Any error reply fails the test.
async fn moderate(addr: String, token: String, requests: Vec<Body>) -> HashSet<usize> {
    let mut answered = HashSet::new();
    let Some(mut r) = setup(&addr, &token, &[]).await else { return answered };
    let mut wire = BytesMut::new();
    for (i, body) in requests.iter().enumerate() {
        put_frame(&mut wire, &Envelope::new(1000 + i as u64, body.clone()));
    }
    let mut w = r.writer;
    tokio::spawn(async move {
        let _ = w.write_all(&wire).await;
        std::future::pending::<()>().await;
    });
    loop {
        let Ok(Ok(Some(f))) = tokio::time::timeout(WAIT, r.reader.read_frame()).await else { break };
        let Ok(env) = chatd::codec::decode_envelope(&f) else { continue };
        match env.body {
            Some(Body::RoomInfo(_)) if env.id >= 1000 => {
                answered.insert(env.id as usize - 1000);
                if answered.len() == requests.len() {
                    break;
                }
            }
            Some(Body::Error(e)) => panic!("room administration refused under the crash battery: {e:?}"),
            _ => {}
        }
    }
    answered
}

/// Rooms of one battery round for the moderator: `victim` is a member of
/// each `mod-<round>-<k>` (set up before the load); under the load each gets
/// a removal (even k) or a ban (odd k), and a private room `new-<round>-<k>`
/// is created inviting `guest`.
fn moderation_round(round: usize, rooms: usize) -> (Vec<String>, Vec<Body>) {
    let names: Vec<String> = (0..rooms).map(|k| format!("mod-{round}-{k}")).collect();
    let mut requests = Vec::new();
    for (k, room) in names.iter().enumerate() {
        let (room, user, reason) = (room.clone(), "victim".to_string(), "battery".to_string());
        requests.push(if k % 2 == 0 {
            Body::RemoveMember(proto::RemoveMember { room, user, reason })
        } else {
            Body::Ban(proto::Ban { room, user, reason })
        });
        requests.push(Body::CreateRoom(proto::CreateRoom {
            room: format!("new-{round}-{k}"),
            kind: proto::RoomKind::Private as i32,
            invite: vec!["guest".into()],
            ..Default::default()
        }));
    }
    (names, requests)
}

/// Checks that every answered request of `moderation_round` is in force.
async fn audit_moderation(addr: &str, dir: &std::path::Path, answered: &[(usize, usize, Body)]) -> usize {
    let mut victim = Raw::connect(addr).await;
    let vw = victim.hello(&token_for(dir, "victim"), vec![]).await;
    let in_rooms: HashSet<&str> = vw.rooms.iter().map(|r| r.room.as_str()).collect();
    let (_, gw) = {
        let mut g = Raw::connect(addr).await;
        let w = g.hello(&token_for(dir, "guest"), vec![]).await;
        (g, w)
    };
    let invited: HashSet<&str> = gw.invites.iter().map(|i| i.room.as_str()).collect();
    let mut m = Raw::connect(addr).await;
    let mw = m.hello(&token_for(dir, "mod"), vec![]).await;
    let owned: HashMap<&str, &proto::RoomInfo> =
        mw.rooms.iter().map(|r| (r.room.as_str(), r.info.as_ref().expect("info"))).collect();
    for (_, _, body) in answered {
        match body {
            Body::RemoveMember(r) => assert!(!in_rooms.contains(r.room.as_str()), "removal from {} undone", r.room),
            Body::Ban(b) => {
                assert!(!in_rooms.contains(b.room.as_str()), "ban from {} undone", b.room);
                let j = victim.request(Body::Join(proto::Join { room: b.room.clone() })).await;
                expect_error(&j, proto::ErrorCode::Forbidden);
            }
            Body::CreateRoom(c) => {
                let info = owned.get(c.room.as_str()).unwrap_or_else(|| panic!("created room {} lost", c.room));
                assert_eq!((info.kind, info.my_role), (proto::RoomKind::Private as i32, proto::Role::Owner as i32));
                assert!(invited.contains(c.room.as_str()), "invitation to {} lost", c.room);
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(!answered.is_empty(), "the moderator was answered at least once");
    answered.len()
}

/// The crash battery: ten SIGKILLs at seeded-random moments of a multi-room,
/// multi-publisher load; after each restart the publishers first retry what
/// was not acknowledged (same keys), then go on. At the end every room is
/// audited: every acknowledged message present exactly once at its acked
/// seq, seqs contiguous from 1, each publisher's order kept. Beside the
/// publishers a moderator removes and bans a member of its rooms and
/// creates private rooms with invitations; every answered action must be in
/// force at the end (a removed user stays removed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_crashes_at_random_moments_lose_no_acknowledged_message() {
    const CRASHES: usize = 10;
    const PER_ROUND: u64 = 4000;
    let tmp = tempfile::tempdir().unwrap();
    let rooms: Vec<String> = (0..4).map(|i| format!("crash{i}")).collect();
    let users = ["c0", "c1", "c2"];
    let mut next: HashMap<&str, u64> = users.iter().map(|u| (*u, 0)).collect();
    let mut pending: HashMap<&str, Vec<(String, String)>> = users.iter().map(|u| (*u, Vec::new())).collect();
    let mut acked: HashMap<String, (String, u64)> = HashMap::new();
    let mut seed: u64 = 0x5eed_c0ff_ee00_0001;
    let mut kills = Vec::new();
    let mut moderation: Vec<(usize, usize, Body)> = Vec::new();
    const MOD_ROOMS: usize = 40;
    // Three keys in thirty are changes to messages acknowledged in earlier
    // rounds: each user reacts to the next one's messages, edits its own
    // and deletes its own — from three separate pools of targets (by the
    // counter of the message's key), so no change races another's retry
    // (a reaction to a message being deleted would be refused).
    let mut changes: HashMap<String, ChangeOf> = HashMap::new();
    let mut targets: HashMap<(&str, u64), Vec<(String, u64)>> = HashMap::new();
    let next_user = |u: &str| match u {
        "c0" => "c1",
        "c1" => "c2",
        _ => "c0",
    };
    for round in 0..=CRASHES {
        let server = Process::start(tmp.path(), &[]);
        let counter = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        let last_round = round == CRASHES;
        let moderator = if last_round {
            None
        } else {
            // The victim joins the moderator's rooms before the load.
            let (names, requests) = moderation_round(round, MOD_ROOMS);
            let mut m = Raw::connect_as(&server.addr, &token_for(tmp.path(), "mod")).await;
            let mut v = Raw::connect_as(&server.addr, &token_for(tmp.path(), "victim")).await;
            for room in &names {
                m.join(room).await;
                v.join(room).await;
            }
            let token = token_for(tmp.path(), "mod");
            Some((requests.clone(), tokio::spawn(moderate(server.addr.clone(), token, requests))))
        };
        for u in users {
            // Retries first, in their original order, then new keys.
            let mut keys = std::mem::take(pending.get_mut(u).unwrap());
            let n = if last_round { 0 } else { PER_ROUND };
            for _ in 0..n {
                let c = next[u];
                next.insert(u, c + 1);
                let key = format!("{u}-{c}");
                let change = match c % 10 {
                    // Once each: a message takes at most `max_reaction_keys`.
                    3 => targets
                        .get_mut(&(next_user(u), 0))
                        .and_then(|t| t.pop())
                        .map(|(room, seq)| (room, ChangeOf::React(seq))),
                    6 => targets.get_mut(&(u, 1)).and_then(|t| t.pop()).map(|(room, seq)| (room, ChangeOf::Edit(seq))),
                    9 => {
                        targets.get_mut(&(u, 2)).and_then(|t| t.pop()).map(|(room, seq)| (room, ChangeOf::Delete(seq)))
                    }
                    _ => None,
                };
                match change {
                    Some((room, change)) => {
                        changes.insert(key.clone(), change);
                        keys.push((key, room));
                    }
                    None => keys.push((key, rooms[(c as usize) % rooms.len()].clone())),
                }
            }
            pending.insert(u, keys.clone());
            let token = token_for(tmp.path(), u);
            let changes = Arc::new(changes.clone());
            tasks.push((u, tokio::spawn(publish_keys(server.addr.clone(), token, keys, counter.clone(), changes))));
        }
        let mut server = server;
        if !last_round {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let at = 200 + (seed % 2500) as usize;
            wait_for_acks(&counter, at).await;
            server.kill9();
            kills.push(at);
        }
        if let Some((requests, task)) = moderator {
            let answered = task.await.unwrap();
            moderation.extend(
                requests.into_iter().enumerate().filter(|(i, _)| answered.contains(i)).map(|(i, b)| (round, i, b)),
            );
        }
        for (u, t) in tasks {
            let got = t.await.unwrap();
            pending.get_mut(u).unwrap().retain(|(k, _)| !got.contains_key(k));
            for (k, v) in got {
                if !changes.contains_key(&k)
                    && let Some(counter) = k.rsplit_once('-').and_then(|(_, c)| c.parse::<u64>().ok())
                {
                    targets.entry((u, counter % 3)).or_default().push(v.clone());
                }
                if let Some(prev) = acked.insert(k.clone(), v.clone()) {
                    assert_eq!(prev, v, "{k} acked twice with different seqs");
                }
            }
        }
        if last_round {
            assert!(pending.values().all(|p| p.is_empty()), "every retry was acked in the end");
            let a = audit(&server.addr, &token_for(tmp.path(), "auditor"), &rooms, &acked).await;
            let moderated = audit_moderation(&server.addr, tmp.path(), &moderation).await;
            let changed = audit_changes(&server.addr, tmp.path(), &rooms, &acked, &changes).await;
            eprintln!(
                "crash battery: {} crashes (after {kills:?} acks), {} acknowledged, {} stored, {} lost, {} duplicated; \
                 {changed} acknowledged edits, deletes and reactions all in force; \
                 {moderated} answered room changes all in force",
                kills.len(),
                acked.len(),
                a.stored,
                a.lost.len(),
                a.duplicated.len()
            );
            assert!(a.clean(), "{a:?}");
            assert_eq!(a.stored, acked.len(), "everything stored was acknowledged once retried");
        }
    }
}

/// Every acknowledged change of the crash battery is in force in the folded
/// history: the reaction on its target, the edit's text (or a later one's),
/// the target deleted. Returns how many were checked.
async fn audit_changes(
    addr: &str,
    dir: &std::path::Path,
    rooms: &[String],
    acked: &HashMap<String, (String, u64)>,
    changes: &HashMap<String, ChangeOf>,
) -> usize {
    let mut r = Raw::connect_as(addr, &token_for(dir, "auditor")).await;
    let mut logs: HashMap<String, Vec<proto::Message>> = HashMap::new();
    for room in rooms {
        logs.insert(room.clone(), r.history_all(room).await);
    }
    let mut checked = [0usize; 3];
    for (key, (room, seq)) in acked {
        let Some(change) = changes.get(key) else { continue };
        let log = &logs[room];
        let entry = &log[*seq as usize - 1];
        assert_eq!(entry.client_msg_id, *key, "the change entry is at its acked seq");
        match *change {
            ChangeOf::React(t) => {
                let target = &log[t as usize - 1];
                let want = format!("r-{key}");
                assert!(target.reactions.iter().any(|r| r.key == want && r.count == 1), "{want} on #{t} of {room}");
                checked[0] += 1;
            }
            ChangeOf::Edit(t) => {
                let target = &log[t as usize - 1];
                assert!(target.deleted || target.text.starts_with("edit-"), "the edit of #{t} in {room}: {target:?}");
                let last = log.iter().rfind(|m| m.change.as_ref().is_some_and(|c| c.target_seq == t));
                if !target.deleted && last.is_some_and(|m| m.change.as_ref().unwrap().kind() == proto::ChangeKind::Edit)
                {
                    assert_eq!(target.text, last.unwrap().text, "#{t} of {room} shows its latest edit");
                }
                checked[1] += 1;
            }
            ChangeOf::Delete(t) => {
                let target = &log[t as usize - 1];
                assert!(target.deleted && target.text.is_empty(), "#{t} of {room} deleted: {target:?}");
                checked[2] += 1;
            }
        }
    }
    assert!(checked.iter().all(|n| *n > 0), "reactions, edits and deletes were all acknowledged: {checked:?}");
    checked.iter().sum()
}

/// A store that acknowledges every 25th append without keeping it: the
/// fault the crash battery exists to catch.
struct LossyStore {
    inner: chatd::store::memory::MemoryStore,
    appends: std::sync::atomic::AtomicU64,
}

impl chatd::store::Store for LossyStore {
    fn load(&self) -> Result<chatd::store::Snapshot, chatd::store::StoreError> {
        self.inner.load()
    }
    fn departure(&self, user: &str, room: u64) -> Result<Option<chatd::store::MemberRecord>, chatd::store::StoreError> {
        self.inner.departure(user, room)
    }
    fn write(&self, batch: &chatd::store::Batch) -> Result<(), chatd::store::StoreError> {
        let mut kept = chatd::store::Batch {
            rooms: batch.rooms.clone(),
            read_markers: batch.read_markers.clone(),
            ..Default::default()
        };
        for a in &batch.appends {
            if self.appends.fetch_add(1, Ordering::Relaxed) % 25 != 24 {
                kept.appends.push(a.clone());
            }
        }
        self.inner.write(&kept)
    }
    fn sync(&self) -> Result<(), chatd::store::StoreError> {
        self.inner.sync()
    }
    fn truncate(&self, room: u64, from: u64) -> Result<usize, chatd::store::StoreError> {
        self.inner.truncate(room, from)
    }
    fn read_folded(
        &self,
        room: u64,
        from: u64,
        to: u64,
        viewer: &str,
    ) -> Result<Vec<chatd::store::fold::Folded>, chatd::store::StoreError> {
        self.inner.read_folded(room, from, to, viewer)
    }
    fn target(&self, room: u64, seq: u64) -> Result<Option<chatd::store::Target>, chatd::store::StoreError> {
        self.inner.target(room, seq)
    }
    fn has_reaction(&self, room: u64, seq: u64, key: &str, user: &str) -> Result<bool, chatd::store::StoreError> {
        self.inner.has_reaction(room, seq, key, user)
    }
    fn lookup_idempotent(
        &self,
        s: &str,
        k: &str,
    ) -> Result<Option<chatd::store::IdempotencyRecord>, chatd::store::StoreError> {
        self.inner.lookup_idempotent(s, k)
    }
    fn expire_idempotency(&self, before: u64) -> Result<usize, chatd::store::StoreError> {
        self.inner.expire_idempotency(before)
    }
    fn trim(&self, room: u64, trim: &chatd::store::Trim) -> Result<chatd::store::TrimRecord, chatd::store::StoreError> {
        self.inner.trim(room, trim)
    }
    fn size_on_disk(&self) -> u64 {
        0
    }
}

/// The negative control: the same audit finds the loss when a store
/// acknowledges messages it did not keep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_catches_a_store_that_loses_acknowledged_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(LossyStore { inner: Default::default(), appends: Default::default() });
    let secret = chatd::auth::load_or_create_secret(tmp.path()).unwrap();
    let server = chatd::server::Server::start_with_store(
        &test_config(tmp.path()),
        store,
        chatd::auth::Auth::new(secret.as_bytes()),
    )
    .await
    .unwrap();
    let addr = server.tcp_addr.to_string();
    let rooms = vec!["lossy".to_string()];
    let keys: Vec<(String, String)> = (0..200).map(|i| (format!("u-{i}"), "lossy".to_string())).collect();
    let acked =
        publish_keys(addr.clone(), token_for(tmp.path(), "u"), keys, Arc::new(AtomicUsize::new(0)), Default::default())
            .await;
    assert_eq!(acked.len(), 200, "the faulty store acks everything");
    let a = audit(&addr, &token_for(tmp.path(), "auditor"), &rooms, &acked).await;
    assert!(!a.clean(), "the audit must fail on a store that drops acked messages");
    assert_eq!(a.lost.len(), 8, "every 25th of 200 was dropped: {a:?}");
    server.shutdown().await;
}
