//! The crash battery, run by `durability` (SIGKILL) and `powerloss`
//! (SIGKILL, then every write not yet synced dropped): three publishers
//! pipeline messages into four rooms — one key in ten an edit, a delete or
//! a reaction of a message acknowledged earlier — while a moderator removes,
//! bans and creates private rooms with invitations and a reader moves its
//! read markers. chatd is killed at seeded-random moments and restarted;
//! the publishers then retry what was not acknowledged (same keys) before
//! going on.
//!
//! After every restart, before the load goes on, the battery checks what
//! the cut may not have taken: every message acknowledged before it present
//! exactly once at its acked seq with the seqs contiguous, the heads never
//! behind what an earlier check saw, the publishers' and the reader's
//! memberships, the reader's markers (never past the head), acknowledged
//! keys answered as duplicates with their seq, and every answered room
//! change in force. At the end the whole log is audited again, with each
//! publisher's order and the folded edits, deletes and reactions.
//!
//! A durability mode that may lose the last moments before a cut (`batch`)
//! says how long ([`Battery::may_lose`]): an acknowledgement that old or
//! newer may be missing, and then only as a suffix of its room (what stays
//! is a prefix of what was acked); its key is retried and stored anew.
//! Anything missing beyond that is a [`Report::violations`] entry, and the
//! battery stops at the first cut that has one, so a test can also assert
//! that a mode *does* lose acknowledged messages (the negative control).

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use chatd::codec::{decode_envelope, put_frame};
use chatd::proto::{self, Body, Envelope};
use tokio::io::AsyncWriteExt;

use crate::common::*;

/// Where an acknowledged key is stored: its room and seq.
pub type Acked = HashMap<String, (String, u64)>;

/// An acknowledgement as the publisher received it.
#[derive(Clone, Debug)]
pub struct Ack {
    pub room: String,
    pub seq: u64,
    /// When the ack arrived (a power cut may take what was acked shortly
    /// before it, in `batch` mode).
    pub at: Instant,
}

/// The places of `acks`, without the times.
pub fn places(acks: HashMap<String, Ack>) -> Acked {
    acks.into_iter().map(|(k, a)| (k, (a.room, a.seq))).collect()
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
pub async fn audit(addr: &str, token: &str, rooms: &[String], acked: &Acked) -> Audit {
    let mut r = Raw::connect_as(addr, token).await;
    let mut a = Audit::default();
    let mut seen: Acked = HashMap::new();
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
            if let Some((user, counter)) = key_parts(&m.client_msg_id)
                && let Some(prev) = last_counter.insert(user.to_string(), counter)
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

/// A `user-counter` key's parts.
fn key_parts(key: &str) -> Option<(&str, u64)> {
    let (user, counter) = key.rsplit_once('-')?;
    Some((user, counter.parse().ok()?))
}

/// Waits until `counter` reaches `n` (or panics after a while).
pub async fn wait_for_acks(counter: &AtomicUsize, n: usize) {
    wait_for(&format!("{n} acks"), Polling::new(WAIT * 3, 5), async || match counter.load(Ordering::Relaxed) {
        acked if acked >= n => Ok(()),
        acked => Err(format!("only {acked} acks arrived")),
    })
    .await
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

/// A change the crash battery makes instead of a publish: of what kind,
/// to which seq of the key's room.
#[derive(Clone, Copy, Debug)]
pub enum ChangeOf {
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

/// The request a key stands for: its change, or a publish of the key as
/// its text.
fn request_of(key: &str, room: &str, changes: &HashMap<String, ChangeOf>) -> Body {
    match changes.get(key) {
        Some(c) => c.body(room, key),
        None => Body::Publish(proto::Publish {
            room: room.to_string(),
            client_msg_id: key.to_string(),
            text: key.to_string(),
            ..Default::default()
        }),
    }
}

/// Pipelines a publish (or, for the keys in `changes`, that change) per
/// key, in order, and returns the acks received before the connection
/// ended or all came.
pub async fn publish_keys(
    addr: String,
    token: String,
    keys: Vec<(String, String)>,
    counter: Arc<AtomicUsize>,
    changes: Arc<HashMap<String, ChangeOf>>,
) -> HashMap<String, Ack> {
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
        put_frame(&mut wire, &Envelope::new(1000 + i as u64, request_of(key, room, &changes)));
    }
    let mut w = r.writer;
    tokio::spawn(async move {
        let _ = w.write_all(&wire).await;
        std::future::pending::<()>().await;
    });
    let mut acks = HashMap::new();
    loop {
        let Ok(Ok(Some(f))) = tokio::time::timeout(WAIT, r.reader.read_frame()).await else { break };
        match decode_envelope(&f) {
            Ok(Envelope { body: Some(Body::PublishAck(a)), .. }) => {
                acks.insert(a.client_msg_id.clone(), Ack { room: a.room, seq: a.seq, at: Instant::now() });
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
/// before the connection ended, with when. Any error reply fails the test.
async fn moderate(
    addr: String,
    token: String,
    requests: Vec<Body>,
    first: Arc<std::sync::OnceLock<Instant>>,
) -> HashMap<usize, Instant> {
    let mut answered = HashMap::new();
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
        let Ok(env) = decode_envelope(&f) else { continue };
        match env.body {
            Some(Body::RoomInfo(_)) if env.id >= 1000 => {
                let now = Instant::now();
                let _ = first.set(now);
                answered.insert(env.id as usize - 1000, now);
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

/// Checks that every answered request of `moderation_round` is in force;
/// returns how many were checked.
async fn audit_moderation(addr: &str, dir: &Path, answered: &[Body]) -> usize {
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
    for body in answered {
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
    answered.len()
}

/// Moves the reader's marker in each of `rooms` to the head, one room
/// after another, until `stop` is set or the server goes away; returns
/// the receipts (room, seq, when).
async fn mark_reads(
    addr: String,
    token: String,
    rooms: Vec<String>,
    stop: Arc<AtomicBool>,
) -> Vec<(String, u64, Instant)> {
    let mut receipts = Vec::new();
    let Some(mut r) = setup(&addr, &token, &[]).await else { return receipts };
    let mut id = 1000;
    while !stop.load(Ordering::Relaxed) {
        for room in &rooms {
            id += 1;
            // Beyond the head: the server sets the marker at the head.
            r.send(id, Body::MarkRead(proto::MarkRead { room: room.clone(), seq: u64::MAX })).await;
            loop {
                let Ok(Ok(Some(f))) = tokio::time::timeout(WAIT, r.reader.read_frame()).await else { return receipts };
                let Ok(env) = decode_envelope(&f) else { continue };
                match env.body {
                    Some(Body::ReadReceipt(rr)) if env.id == id => {
                        receipts.push((room.clone(), rr.seq, Instant::now()));
                        break;
                    }
                    Some(Body::Error(e)) => panic!("mark read refused under the crash battery: {e:?}"),
                    _ => {}
                }
            }
        }
        // Paces the reader: a marker only moves when the head has.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    receipts
}

/// Every acknowledged change of the crash battery is in force in the folded
/// history: the reaction on its target, the edit's text (or a later one's),
/// the target deleted. Returns how many were checked.
async fn audit_changes(
    addr: &str,
    dir: &Path,
    rooms: &[String],
    acked: &Acked,
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

/// The publishers, the reader and the moderator of the battery.
const PUBLISHERS: [&str; 3] = ["c0", "c1", "c2"];
const READER: &str = "reader";

/// Whose messages a publisher reacts to.
fn next_user(u: &str) -> &'static str {
    match u {
        "c0" => "c1",
        "c1" => "c2",
        _ => "c0",
    }
}

/// A crash battery: how chatd runs, how often it is cut, what a cut may
/// take.
pub struct Battery<'a> {
    /// The data directory.
    pub dir: &'a Path,
    /// Extra `chatd serve` flags (the durability mode).
    pub flags: &'a [&'a str],
    /// How many times chatd is killed.
    pub cuts: usize,
    /// Keys each publisher has queued in a round: its retries first, then
    /// new keys up to this many.
    pub per_round: usize,
    /// How many acks of a round come before its kill: seeded-random in
    /// this range, below `3 * per_round`.
    pub kill_after: Range<usize>,
    pub seed: u64,
    /// Rooms the moderator acts on in each round (two requests each).
    pub moderated_rooms: usize,
    /// How long before a cut an acknowledged write may be lost (zero:
    /// none may be).
    pub may_lose: Duration,
    /// Runs after each kill, before the restart (the power cut).
    pub after_kill: &'a dyn Fn(),
}

/// What a battery saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Acks of its round before each kill.
    pub kills: Vec<usize>,
    /// Acknowledged keys (messages and changes) in the end.
    pub acked: usize,
    /// Messages in the log in the end.
    pub stored: usize,
    /// Acknowledged keys missing after each cut that `may_lose` allowed.
    pub lost: Vec<usize>,
    /// The oldest of those acknowledgements, measured back from its cut.
    pub oldest_lost: Duration,
    /// Acknowledged keys retried after a restart and answered as
    /// duplicates at their seq.
    pub retried: usize,
    /// Acknowledged edits, deletes and reactions found in force.
    pub changed: usize,
    /// Answered room changes found in force.
    pub moderated: usize,
    /// Read markers checked after the cuts.
    pub markers: usize,
    /// Acknowledged things missing beyond `may_lose`, or a restart that
    /// failed; the battery stops at the first cut that has any.
    pub violations: Vec<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} cuts (after {:?} acks), {} acknowledged, {} stored, {} acknowledged lost within the allowed \
             window (per cut {:?}, oldest {} ms before its cut), {} acknowledged keys retried as duplicates, \
             {} edits, deletes and reactions and {} room changes in force, {} read markers kept; violations: {:?}",
            self.kills.len(),
            self.kills,
            self.acked,
            self.stored,
            self.lost.iter().sum::<usize>(),
            self.lost,
            self.oldest_lost.as_millis(),
            self.retried,
            self.changed,
            self.moderated,
            self.markers,
            self.violations
        )
    }
}

/// What a round left to check at the next start.
struct Round {
    /// When chatd was killed; `None` for the last round, which ends with
    /// everything answered.
    killed: Option<Instant>,
    acks: Vec<(&'static str, HashMap<String, Ack>)>,
    moderation: Vec<(Body, Instant)>,
    receipts: Vec<(String, u64, Instant)>,
}

/// The battery's state between rounds: what was acknowledged and checked.
struct State {
    rooms: Vec<String>,
    next: HashMap<&'static str, u64>,
    /// Each publisher's keys not yet acknowledged (or lost), with rooms.
    pending: HashMap<&'static str, Vec<(String, String)>>,
    /// Acknowledged keys found at their place after a restart.
    acked: Acked,
    /// Every key found in the log, where (each room read up to `heads`).
    seen: Acked,
    /// How far each room's log has been checked.
    heads: HashMap<String, u64>,
    changes: HashMap<String, ChangeOf>,
    /// Messages to change, by (publisher, counter % 3), from three pools so
    /// no change races another's retry (a reaction to a message being
    /// deleted would be refused).
    targets: HashMap<(&'static str, u64), Vec<(String, u64)>>,
    /// Answered room changes found in force.
    moderation: Vec<Body>,
    /// The least each room's read marker may be.
    markers: HashMap<String, u64>,
    /// When the publishers and the reader last joined the rooms.
    joined: Instant,
    report: Report,
}

impl Battery<'_> {
    /// Runs the battery; panics on a broken promise that a check asserts
    /// directly, and reports the rest (see [`Report::violations`]).
    pub async fn run(&self) -> Report {
        assert!(self.kill_after.end < 3 * self.per_round, "every kill comes before the round's keys run out");
        let rooms: Vec<String> = (0..4).map(|i| format!("crash{i}")).collect();
        let mut st = State {
            heads: rooms.iter().map(|r| (r.clone(), 0)).collect(),
            markers: rooms.iter().map(|r| (r.clone(), 0)).collect(),
            rooms,
            next: PUBLISHERS.iter().map(|u| (*u, 0)).collect(),
            pending: PUBLISHERS.iter().map(|u| (*u, Vec::new())).collect(),
            acked: HashMap::new(),
            seen: HashMap::new(),
            changes: HashMap::new(),
            targets: HashMap::new(),
            moderation: Vec::new(),
            joined: Instant::now(),
            report: Report::default(),
        };
        let mut seed = self.seed;
        let mut last: Option<Round> = None;
        for round in 0..=self.cuts {
            let server = match Process::try_start(self.dir, self.flags) {
                Ok(s) => s,
                Err(e) => {
                    st.report.violations.push(format!("chatd did not start after cut {round}: {e}"));
                    return st.report;
                }
            };
            let mut rejoin = round == 0;
            if let Some(done) = last.take() {
                rejoin = self.check(&server, &mut st, done).await;
                if !st.report.violations.is_empty() {
                    return st.report;
                }
            }
            if rejoin {
                for u in PUBLISHERS.iter().chain(&[READER]) {
                    let mut r = Raw::connect_as(&server.addr, &token_for(self.dir, u)).await;
                    for room in &st.rooms {
                        r.join(room).await;
                    }
                }
                st.joined = Instant::now();
            }
            let last_round = round == self.cuts;
            let mut server = server;
            let kill_at = (!last_round).then(|| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                self.kill_after.start + (seed as usize) % self.kill_after.len()
            });
            let done = self.load(&mut server, &mut st, round, kill_at).await;
            if last_round {
                self.check(&server, &mut st, done).await;
                if st.report.violations.is_empty() {
                    self.final_audit(&server, &mut st).await;
                }
                return st.report;
            }
            drop(server);
            (self.after_kill)();
            last = Some(done);
        }
        unreachable!("the last round returns")
    }

    /// One round of load: the moderator, the reader and the publishers
    /// against `server`; with `kill`, chatd is killed once that many acks
    /// have come, else every key is answered.
    async fn load(&self, server: &mut Process, st: &mut State, round: usize, kill: Option<usize>) -> Round {
        let addr = server.addr.clone();
        let counter = Arc::new(AtomicUsize::new(0));
        let moderator = if kill.is_none() {
            None
        } else {
            // The victim joins the moderator's rooms before the load.
            let (names, requests) = moderation_round(round, self.moderated_rooms);
            let mut m = Raw::connect_as(&addr, &token_for(self.dir, "mod")).await;
            let mut v = Raw::connect_as(&addr, &token_for(self.dir, "victim")).await;
            for room in &names {
                m.join(room).await;
                v.join(room).await;
            }
            let token = token_for(self.dir, "mod");
            let first = Arc::new(std::sync::OnceLock::new());
            let task = tokio::spawn(moderate(addr.clone(), token, requests.clone(), first.clone()));
            Some((requests, task, first))
        };
        let stop_reading = Arc::new(AtomicBool::new(false));
        let reader =
            tokio::spawn(mark_reads(addr.clone(), token_for(self.dir, READER), st.rooms.clone(), stop_reading.clone()));
        let mut tasks = Vec::new();
        for u in PUBLISHERS {
            // Retries first, in their original order, then new keys.
            let mut keys = std::mem::take(st.pending.get_mut(u).unwrap());
            keys.sort_by_key(|(k, _)| key_parts(k).map(|(_, c)| c));
            let n = if kill.is_none() { 0 } else { self.per_round.saturating_sub(keys.len()) };
            for _ in 0..n {
                let c = st.next[u];
                st.next.insert(u, c + 1);
                let key = format!("{u}-{c}");
                let change = match c % 10 {
                    // Once each: a message takes at most `max_reaction_keys`.
                    3 => st
                        .targets
                        .get_mut(&(next_user(u), 0))
                        .and_then(|t| t.pop())
                        .map(|(room, seq)| (room, ChangeOf::React(seq))),
                    6 => {
                        st.targets.get_mut(&(u, 1)).and_then(|t| t.pop()).map(|(room, seq)| (room, ChangeOf::Edit(seq)))
                    }
                    9 => st
                        .targets
                        .get_mut(&(u, 2))
                        .and_then(|t| t.pop())
                        .map(|(room, seq)| (room, ChangeOf::Delete(seq))),
                    _ => None,
                };
                match change {
                    Some((room, change)) => {
                        st.changes.insert(key.clone(), change);
                        keys.push((key, room));
                    }
                    None => keys.push((key, st.rooms[(c as usize) % st.rooms.len()].clone())),
                }
            }
            st.pending.insert(u, keys.clone());
            let token = token_for(self.dir, u);
            let changes = Arc::new(st.changes.clone());
            tasks.push((u, tokio::spawn(publish_keys(addr.clone(), token, keys, counter.clone(), changes))));
        }
        let mut killed = None;
        if let Some(at) = kill {
            st.report.kills.push(at);
            wait_for_acks(&counter, at).await;
            // A room change answered within `may_lose` of the cut may be
            // lost and is not checked: on a fast machine every answer can
            // be that recent, so the cut waits until the first is older.
            if let Some((_, _, first)) = &moderator {
                wait_until("a room change answered longer than may_lose before the cut", async || {
                    first.get().is_some_and(|at| at.elapsed() > self.may_lose)
                })
                .await;
            }
            killed = Some(Instant::now());
            server.kill9();
        }
        let mut moderation = Vec::new();
        if let Some((requests, task, _)) = moderator {
            let answered = task.await.unwrap();
            moderation.extend(requests.into_iter().enumerate().filter_map(|(i, b)| Some((b, *answered.get(&i)?))));
        }
        let mut acks = Vec::new();
        for (u, t) in tasks {
            let got = t.await.unwrap();
            st.pending.get_mut(u).unwrap().retain(|(k, _)| !got.contains_key(k));
            acks.push((u, got));
        }
        stop_reading.store(true, Ordering::Relaxed);
        let receipts = reader.await.unwrap();
        Round { killed, acks, moderation, receipts }
    }

    /// After a restart (or at the end of the last round): checks what the
    /// previous round had acknowledged against what the server kept, and
    /// takes what it kept as acknowledged. Says whether some membership was
    /// lost (within `may_lose`), so the rooms must be joined again.
    async fn check(&self, server: &Process, st: &mut State, done: Round) -> bool {
        // An acknowledgement at or after this may be missing.
        let lossy_from = done.killed.filter(|_| !self.may_lose.is_zero()).map(|k| k - self.may_lose);
        let may_miss = |at: Instant| lossy_from.is_some_and(|from| at >= from);
        let cut = st.report.kills.len();
        let addr = &server.addr;
        let v = &mut st.report.violations;

        // The reader's Welcome: the heads, the markers, its memberships.
        let mut reader = Raw::connect(addr).await;
        let rw = reader.hello(&token_for(self.dir, READER), vec![]).await;
        let states: HashMap<&str, &proto::RoomState> = rw.rooms.iter().map(|r| (r.room.as_str(), r)).collect();

        // The log from where the last check ended.
        let mut auditor = Raw::connect_as(addr, &token_for(self.dir, "auditor")).await;
        let mut heads = HashMap::new();
        for room in &st.rooms {
            auditor.join(room).await;
            let from = st.heads[room];
            let tail = auditor.history_after(room, from).await;
            let mut after = from;
            for m in &tail {
                if m.seq != after + 1 {
                    v.push(format!("cut {cut}: {room} has #{} after #{after}", m.seq));
                }
                after = m.seq;
                if let Some(was) = st.seen.insert(m.client_msg_id.clone(), (room.clone(), m.seq)) {
                    v.push(format!("cut {cut}: {} stored twice, at {was:?} and #{} of {room}", m.client_msg_id, m.seq));
                }
            }
            if let Some(state) = states.get(room.as_str())
                && state.head_seq != after
            {
                v.push(format!("cut {cut}: {room}'s head is {} where its log ends at #{after}", state.head_seq));
            }
            heads.insert(room.clone(), after);
        }

        // Every acknowledged key at its place, or lost within the window.
        let mut lost = 0;
        let mut missing: Vec<(Duration, String)> = Vec::new();
        for (u, acks) in done.acks {
            let mut kept = Vec::new();
            for (key, ack) in acks {
                let place = (ack.room.clone(), ack.seq);
                match st.seen.get(&key) {
                    Some(found) if *found == place => kept.push((key, ack)),
                    Some(found) => v.push(format!("cut {cut}: {key} acked at {place:?}, stored at {found:?}")),
                    None if may_miss(ack.at) && ack.seq > heads[&ack.room] => {
                        lost += 1;
                        let age =
                            done.killed.expect("a lossy round ends with a kill").saturating_duration_since(ack.at);
                        st.report.oldest_lost = st.report.oldest_lost.max(age);
                        st.pending.get_mut(u).unwrap().push((key, ack.room));
                    }
                    None if may_miss(ack.at) => v.push(format!(
                        "cut {cut}: {key} lost at #{} of {}, below the kept head #{}: a hole, not a suffix",
                        ack.seq, ack.room, heads[&ack.room]
                    )),
                    None => {
                        let age = done.killed.map_or(Duration::ZERO, |k| k.saturating_duration_since(ack.at));
                        missing.push((age, format!("{key} at #{} of {}", ack.seq, ack.room)));
                    }
                }
            }
            kept.sort_by_key(|(k, _)| key_parts(k).map(|(_, c)| c));
            for (key, ack) in kept {
                if !st.changes.contains_key(&key)
                    && let Some((_, counter)) = key_parts(&key)
                {
                    st.targets.entry((u, counter % 3)).or_default().push((ack.room.clone(), ack.seq));
                }
                if let Some(prev) = st.acked.insert(key.clone(), (ack.room.clone(), ack.seq)) {
                    assert_eq!(prev, (ack.room, ack.seq), "{key} acked twice with different seqs");
                }
            }
        }
        if !missing.is_empty() {
            missing.sort();
            let oldest = missing.last().map(|(age, _)| age.as_millis()).unwrap_or_default();
            let some: Vec<&str> = missing.iter().rev().take(5).map(|(_, k)| k.as_str()).collect();
            v.push(format!(
                "cut {cut}: {} acknowledged keys are lost, acknowledged up to {oldest} ms before the cut (oldest first: {})",
                missing.len(),
                some.join(", ")
            ));
        }
        if done.killed.is_some() {
            st.report.lost.push(lost);
        }
        if !v.is_empty() {
            return false;
        }
        for (room, head) in heads {
            st.heads.insert(room, head);
        }

        // Memberships made before the window stay.
        let mut rejoin = false;
        for u in PUBLISHERS.iter().chain(&[READER]) {
            let mut r = Raw::connect(addr).await;
            let w = r.hello(&token_for(self.dir, u), vec![]).await;
            let member: HashSet<&str> = w.rooms.iter().map(|r| r.room.as_str()).collect();
            for room in &st.rooms {
                if !member.contains(room.as_str()) {
                    if may_miss(st.joined) {
                        rejoin = true;
                    } else {
                        v.push(format!("cut {cut}: {u}'s membership of {room} is lost"));
                    }
                }
            }
        }

        // Read markers: at least the last one acknowledged before the
        // window, never past the head.
        for (room, seq, at) in &done.receipts {
            if !may_miss(*at) {
                let floor = st.markers.get_mut(room).unwrap();
                *floor = (*floor).max(*seq);
            }
        }
        for room in &st.rooms {
            let Some(state) = states.get(room.as_str()) else { continue };
            let floor = st.markers[room];
            if state.read_seq < floor {
                v.push(format!(
                    "cut {cut}: the reader's marker in {room} is #{}, acknowledged at #{floor}",
                    state.read_seq
                ));
            }
            if state.read_seq > state.head_seq {
                v.push(format!(
                    "cut {cut}: the reader's marker in {room} is #{} past the head #{}",
                    state.read_seq, state.head_seq
                ));
            }
            st.markers.insert(room.clone(), state.read_seq.max(floor));
            st.report.markers += 1;
        }

        // Acknowledged keys are still known: the publishers' latest and a
        // few older ones, retried, answer as duplicates at their seq.
        for u in PUBLISHERS {
            let mut mine: Vec<(u64, &String, &(String, u64))> = st
                .acked
                .iter()
                .filter_map(|(k, place)| Some((key_parts(k).filter(|(user, _)| *user == u)?.1, k, place)))
                .collect();
            mine.sort_by_key(|(c, _, _)| *c);
            let older = mine.len().saturating_sub(8);
            let picks = (0..4).map(|i| (i * 7919 + cut * 104_729) % older.max(1)).filter(|_| older > 0);
            let sample: Vec<_> = picks.map(|i| mine[i]).chain(mine[older..].iter().copied()).collect();
            let mut r = Raw::connect_as(addr, &token_for(self.dir, u)).await;
            for (_, key, (room, seq)) in sample {
                match r.request(request_of(key, room, &st.changes)).await {
                    Body::PublishAck(a) if a.duplicate && a.room == *room && a.seq == *seq => st.report.retried += 1,
                    other => v.push(format!("cut {cut}: a retry of {key} (acked at #{seq} of {room}) got {other:?}")),
                }
            }
        }

        // Answered room changes before the window are in force.
        st.moderation.extend(done.moderation.into_iter().filter(|(_, at)| !may_miss(*at)).map(|(b, _)| b));
        if v.is_empty() {
            st.report.moderated = audit_moderation(addr, self.dir, &st.moderation).await;
        }
        rejoin
    }

    /// The end: the whole log against every acknowledgement, each
    /// publisher's order, the changes folded in.
    async fn final_audit(&self, server: &Process, st: &mut State) {
        assert!(st.pending.values().all(|p| p.is_empty()), "every retry was acked in the end");
        let a = audit(&server.addr, &token_for(self.dir, "auditor"), &st.rooms, &st.acked).await;
        st.report.acked = st.acked.len();
        st.report.stored = a.stored;
        if !a.clean() {
            st.report.violations.push(format!("the final audit: {a:?}"));
            return;
        }
        assert_eq!(a.stored, st.acked.len(), "everything stored was acknowledged once retried");
        st.report.changed = audit_changes(&server.addr, self.dir, &st.rooms, &st.acked, &st.changes).await;
        assert!(st.report.moderated > 0, "the moderator was answered at least once");
    }
}
