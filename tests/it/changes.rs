//! Message changes (proto/README.md, §9): edits, deletes and reactions as
//! log entries — every rule and refusal, idempotency, live delivery,
//! history and resume folding the latest state with the entries still in
//! their places, erasure down to the files after `chatd compact`, and
//! unread counts that agree with a recount of the log after a random run
//! of publishes, deletes, mark-reads, restarts and kill -9s.

use std::collections::HashMap;

use chatd::proto::{self, Body, ChangeKind, ErrorCode};

use crate::common::{ChatServer, Process, Raw, TestServer, expect_error, token_for};

fn edit(room: &str, seq: u64, text: &str, cmid: &str) -> Body {
    Body::Edit(proto::Edit {
        room: room.into(),
        seq,
        client_msg_id: cmid.into(),
        text: text.into(),
        data: Default::default(),
    })
}

fn delete(room: &str, seq: u64, cmid: &str) -> Body {
    Body::Delete(proto::Delete { room: room.into(), seq, client_msg_id: cmid.into() })
}

fn react(room: &str, seq: u64, key: &str, add: bool) -> Body {
    Body::React(proto::React { room: room.into(), seq, key: key.into(), add, client_msg_id: String::new() })
}

async fn acked(r: &mut Raw, body: Body) -> proto::PublishAck {
    match r.request(body).await {
        Body::PublishAck(a) => a,
        other => panic!("expected publish_ack, got {other:?}"),
    }
}

async fn refused(r: &mut Raw, body: Body, code: ErrorCode) -> String {
    expect_error(&r.request(body).await, code)
}

/// The next live message whose `change` is set.
async fn next_change(r: &mut Raw) -> proto::Message {
    loop {
        let m = r.next_message().await;
        if m.change.is_some() {
            return m;
        }
    }
}

fn kind(m: &proto::Message) -> ChangeKind {
    m.change.as_ref().expect("a change entry").kind()
}

#[tokio::test]
async fn the_rules_of_changes_and_every_refusal() {
    let s = TestServer::start_with(|c| c.max_reaction_keys = 2).await;
    // The first to join an unknown room owns it.
    let mut own = s.raw_member("own", "r").await;
    let mut ann = s.raw_member("ann", "r").await;
    let mut bob = s.raw_member("bob", "r").await;
    let m1 = ann.publish("r", "helo").await.seq;
    let m2 = bob.publish("r", "bob's").await.seq;

    // Only the sender edits.
    refused(&mut bob, edit("r", m1, "hijacked", "x"), ErrorCode::Forbidden).await;
    let e = acked(&mut ann, edit("r", m1, "hello", "e1")).await;
    assert!(e.seq > m2 && !e.duplicate);
    let got = next_change(&mut bob).await;
    assert_eq!(
        (got.seq, got.sender.as_str(), got.text.as_str(), kind(&got)),
        (e.seq, "ann", "hello", ChangeKind::Edit)
    );
    assert_eq!(got.change.unwrap().target_seq, m1);
    // A retry of the same key is the same entry.
    let again = acked(&mut ann, edit("r", m1, "hello", "e1")).await;
    assert_eq!((again.seq, again.duplicate), (e.seq, true));

    // Any member reacts, once per key: twice is the current state, no entry.
    let r1 = acked(&mut bob, react("r", m1, "👍", true)).await;
    assert!(!r1.duplicate);
    let twice = acked(&mut bob, react("r", m1, "👍", true)).await;
    assert_eq!((twice.seq, twice.duplicate), (m1, true));
    let absent = acked(&mut bob, react("r", m1, "🎉", false)).await;
    assert_eq!((absent.seq, absent.duplicate), (m1, true));
    acked(&mut ann, react("r", m1, "🎉", true)).await;
    let msg = refused(&mut ann, react("r", m1, "❤️", true), ErrorCode::Conflict).await;
    assert!(msg.contains("2 different reactions"), "{msg}");
    acked(&mut ann, react("r", m1, "👍", true)).await;
    let long = "x".repeat(65);
    refused(&mut ann, react("r", m1, &long, true), ErrorCode::BadRequest).await;
    refused(&mut ann, react("r", m1, "", true), ErrorCode::BadRequest).await;
    refused(&mut ann, react("r", m1, "a\nb", true), ErrorCode::BadRequest).await;

    // Not a message: a change entry, a seq past the head, seq 0.
    refused(&mut ann, react("r", e.seq, "👍", true), ErrorCode::BadRequest).await;
    refused(&mut ann, edit("r", 999, "x", ""), ErrorCode::NotFound).await;
    refused(&mut ann, delete("r", 0, ""), ErrorCode::NotFound).await;

    // The sender or an admin deletes; a member does not.
    refused(&mut bob, delete("r", m1, ""), ErrorCode::Forbidden).await;
    let d = acked(&mut own, delete("r", m1, "d1")).await;
    let got = next_change(&mut bob).await;
    while next_change(&mut ann).await.seq != d.seq {}
    assert_eq!((got.seq, got.sender.as_str(), kind(&got)), (d.seq, "own", ChangeKind::Delete));
    // A retry of the delete is answered with it; any other change is refused.
    let again = acked(&mut own, delete("r", m1, "d1")).await;
    assert_eq!((again.seq, again.duplicate), (d.seq, true));
    refused(&mut ann, delete("r", m1, ""), ErrorCode::NotFound).await;
    refused(&mut ann, edit("r", m1, "back", ""), ErrorCode::NotFound).await;
    refused(&mut bob, react("r", m1, "👍", false), ErrorCode::NotFound).await;
    // Its own sender deletes too.
    acked(&mut bob, delete("r", m2, "")).await;

    // Replies and mentions.
    let reply = proto::Publish {
        room: "r".into(),
        text: "re".into(),
        reply_to: m2,
        mentions: vec!["ann".into(), "ann".into(), "own".into()],
        ..Default::default()
    };
    let ack = bob.publish_message(reply).await;
    let got = loop {
        let m = ann.next_message().await;
        if m.seq == ack.seq {
            break m;
        }
    };
    assert_eq!((got.reply_to, got.mentions), (m2, vec!["ann".to_string(), "own".to_string()]), "deduplicated");
    let past_head = proto::Publish { room: "r".into(), reply_to: 10_000, ..Default::default() };
    refused(&mut bob, Body::Publish(past_head), ErrorCode::BadRequest).await;
    let crowd =
        proto::Publish { room: "r".into(), mentions: (0..51).map(|i| format!("u{i}")).collect(), ..Default::default() };
    refused(&mut bob, Body::Publish(crowd), ErrorCode::BadRequest).await;
    let bad = proto::Publish { room: "r".into(), mentions: vec!["no spaces".into()], ..Default::default() };
    refused(&mut bob, Body::Publish(bad), ErrorCode::BadRequest).await;

    // Non-members change nothing; the log has every entry once, gapless.
    let (mut eve, _) = s.raw_user("eve").await;
    refused(&mut eve, react("r", m2, "👍", true), ErrorCode::Forbidden).await;
    let log = ann.history_all("r").await;
    assert_eq!(log.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=log.len() as u64).collect::<Vec<_>>());
}

#[tokio::test]
async fn history_and_resume_fold_the_latest_state_and_keep_the_entries_in_place() {
    let s = TestServer::start().await;
    let mut ann = s.raw_member("ann", "f").await;
    let mut bob = s.raw_member("bob", "f").await;
    let m1 = ann.publish("f", "first draft").await.seq;
    let m2 = ann.publish("f", "doomed SECRET-TEXT").await.seq;
    let e1 = acked(&mut ann, edit("f", m1, "second draft", "")).await.seq;
    let e2 = acked(&mut ann, edit("f", m2, "still SECRET-EDIT", "")).await.seq;
    acked(&mut ann, edit("f", m1, "final", "")).await;
    acked(&mut bob, react("f", m1, "👍", true)).await;
    acked(&mut ann, react("f", m1, "👍", true)).await;
    acked(&mut bob, react("f", m1, "🎉", true)).await;
    acked(&mut bob, react("f", m1, "🎉", false)).await;
    let last = acked(&mut ann, delete("f", m2, "")).await.seq;

    let check = |log: &[proto::Message], viewer: &str| {
        assert_eq!(log.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=last).collect::<Vec<_>>(), "gapless");
        let first = &log[0];
        assert_eq!(first.text, "final", "the latest edit");
        assert!(first.edited_ms > 0 && !first.deleted);
        assert_eq!(first.folded_seq, last - 1, "the last change folded into it");
        assert_eq!(first.reactions.len(), 1, "a reaction taken back is gone: {:?}", first.reactions);
        let r = &first.reactions[0];
        assert_eq!((r.key.as_str(), r.count, r.users.clone()), ("👍", 2, vec!["bob".to_string(), "ann".to_string()]));
        assert!(r.mine, "{viewer} reacted");
        let second = &log[1];
        assert!(second.deleted && second.text.is_empty() && second.edited_ms == 0);
        assert_eq!(log[e1 as usize - 1].text, "second draft", "an edit entry keeps its content");
        assert!(log[e2 as usize - 1].text.is_empty(), "the edit of a deleted message is erased too");
        assert!(log.iter().all(|m| !m.text.contains("SECRET")));
        assert_eq!(log.iter().filter(|m| m.change.is_some()).count() as u64, last - 2);
    };
    check(&ann.history_all("f").await, "ann");
    check(&bob.history_all("f").await, "bob");
    // A page backwards folds the same way.
    let page =
        match bob.request(Body::History(proto::History { room: "f".into(), limit: 3, ..Default::default() })).await {
            Body::HistoryPage(p) => p,
            other => panic!("{other:?}"),
        };
    assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![last - 2, last - 1, last]);

    // Resume from the start replays the same, then Synced, then live.
    let mut back = Raw::connect(&s.addr).await;
    let cursor = proto::Cursor { room: "f".into(), after_seq: 0 };
    back.hello(&token_for(&s.dir, "bob"), vec![cursor]).await;
    let mut replayed = Vec::new();
    loop {
        match back.recv().await.body {
            Some(Body::Message(m)) => replayed.push(m),
            Some(Body::Synced(s)) => {
                assert!(s.complete);
                break;
            }
            _ => {}
        }
    }
    check(&replayed, "bob");
    // After a restart, from the store alone.
    let dir = s.stop().await.unwrap();
    let s = TestServer::start_in(dir.path(), |_| {}).await;
    let (mut ann, _) = s.raw_user("ann").await;
    check(&ann.history_all("f").await, "ann");
    drop(dir);
}

/// Every file under `dir` that holds `needle`.
fn files_holding(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    for entry in walk(dir) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        if bytes.windows(needle.len()).any(|w| w == needle) {
            found.push(entry.display().to_string());
        }
    }
    found
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

#[tokio::test]
async fn a_deleted_message_is_gone_from_the_files_after_compaction() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Process::start(tmp.path(), &[]);
    let mut ann = Raw::connect_as(&server.addr, &token_for(tmp.path(), "ann")).await;
    ann.join("vault").await;
    let marker = "MARKER-7f3a9c-original";
    let edit_marker = "MARKER-7f3a9c-edited";
    let kept = "KEPT-5d21-visible";
    let m = ann.publish("vault", marker).await.seq;
    ann.publish("vault", kept).await;
    acked(&mut ann, edit("vault", m, edit_marker, "")).await;
    acked(&mut ann, delete("vault", m, "")).await;
    let mut server = server;
    server.terminate();
    // The negative control: sled keeps what was overwritten until its
    // space is reclaimed, so the scan does find it before compaction.
    assert!(!files_holding(tmp.path(), marker.as_bytes()).is_empty(), "the scan finds bytes left behind");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chatd"))
        .args(["compact", "--data"])
        .arg(tmp.path())
        .output()
        .unwrap();
    crate::common::assert_success(&out, "chatd compact");
    assert!(String::from_utf8_lossy(&out.stdout).contains("bytes before"), "{out:?}");
    for needle in [marker, edit_marker] {
        assert_eq!(files_holding(tmp.path(), needle.as_bytes()), Vec::<String>::new(), "{needle} left on disk");
    }
    assert!(!files_holding(tmp.path(), kept.as_bytes()).is_empty(), "the live message is still stored");

    // The compacted store serves as before.
    let server = Process::start(tmp.path(), &[]);
    let mut ann = Raw::connect_as(&server.addr, &token_for(tmp.path(), "ann")).await;
    let log = ann.history_all("vault").await;
    assert_eq!(log.len(), 4);
    assert!(log[0].deleted && log[1].text == kept && log[2].text.is_empty());
    // A running server's store is refused.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chatd"))
        .args(["compact", "--data"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("in use"), "{out:?}");
}

/// A deterministic xorshift generator.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// (unread, mentions) of `user` recounted from the log (the full history
/// as `user` reads it) with the read marker at `read`.
fn recount(log: &[proto::Message], user: &str, read: u64) -> (u64, u64) {
    let after = log.iter().filter(|m| m.seq > read && m.change.is_none() && !m.deleted && m.sender != user);
    let unread = after.clone().count() as u64;
    let mentions = after.filter(|m| m.mentions.iter().any(|u| u == user)).count() as u64;
    (unread, mentions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_counts_agree_with_a_recount_after_publishes_deletes_reads_and_crashes() {
    const USERS: [&str; 3] = ["ua", "ub", "uc"];
    const ROOMS: [&str; 2] = ["count-1", "count-2"];
    const ROUNDS: usize = 6;
    const STEPS: usize = 60;
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x00c0_ffee_1234_5679);
    // Messages each user may delete: (room, seq).
    let mut own: HashMap<&str, Vec<(&str, u64)>> = HashMap::new();
    let (mut checked, mut nonzero) = (0, [0; 2]);
    for round in 0..ROUNDS {
        let mut server = Process::start(tmp.path(), &[]);
        let mut conns = Vec::new();
        for u in USERS {
            let mut r = Raw::connect_as(&server.addr, &token_for(tmp.path(), u)).await;
            if round == 0 {
                for room in ROOMS {
                    r.join(room).await;
                }
            }
            conns.push(r);
        }
        for _ in 0..STEPS {
            let i = rng.below(USERS.len() as u64) as usize;
            let user = USERS[i];
            let room = ROOMS[rng.below(ROOMS.len() as u64) as usize];
            let r = &mut conns[i];
            match rng.below(10) {
                0..=4 => {
                    let mentions = USERS.iter().filter(|_| rng.below(3) == 0).map(|u| u.to_string()).collect();
                    let p = proto::Publish { room: room.into(), text: "m".into(), mentions, ..Default::default() };
                    let seq = r.publish_message(p).await.seq;
                    own.entry(user).or_default().push((room, seq));
                }
                5 => {
                    let mine = own.entry(user).or_default();
                    if !mine.is_empty() {
                        let (room, seq) = mine.swap_remove(rng.below(mine.len() as u64) as usize);
                        acked(r, delete(room, seq, "")).await;
                    }
                }
                6 => {
                    let head = r.history_all(room).await.len() as u64;
                    let target = if head > 0 { 1 + rng.below(head) } else { 0 };
                    if target > 0 {
                        let _ = r.request(react(room, target, "👍", true)).await;
                    }
                }
                _ => {
                    let head = r.history_all(room).await.len() as u64;
                    let seq = rng.below(head + 1);
                    let _ = r.request(Body::MarkRead(proto::MarkRead { room: room.into(), seq })).await;
                }
            }
        }
        // Every other round ends with a kill -9, the others with a restart.
        if round % 2 == 0 {
            server.kill9();
        } else {
            server.terminate();
        }
        drop(conns);
        let server = Process::start(tmp.path(), &[]);
        for u in USERS {
            let mut r = Raw::connect(&server.addr).await;
            let welcome = r.hello(&token_for(tmp.path(), u), vec![]).await;
            for state in &welcome.rooms {
                let log = r.history_all(&state.room).await;
                assert_eq!(log.len() as u64, state.head_seq);
                let want = recount(&log, u, state.read_seq);
                assert_eq!(
                    (state.unread, state.mentions),
                    want,
                    "round {round}: {u} in {} (read {} of {})",
                    state.room,
                    state.read_seq,
                    state.head_seq
                );
                checked += 1;
                nonzero[0] += usize::from(want.0 > 0);
                nonzero[1] += usize::from(want.1 > 0);
            }
        }
        drop(server);
    }
    assert_eq!(checked, ROUNDS * USERS.len() * ROOMS.len());
    assert!(
        nonzero[0] > checked / 2 && nonzero[1] > checked / 4,
        "a run that tests something: {nonzero:?} of {checked}"
    );
}
