//! Backup and restore with the `chatd` binary: a backup taken by a running
//! server under publish load holds every message acknowledged before it
//! was asked for, at its seq, with its idempotency key, and the rooms'
//! memberships; a store with no server running is backed up from the store
//! itself; the backup socket refuses what it does not understand.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use chatd::proto::{self, Body};

use crate::common::*;

/// Acks by key: (room, seq).
type Acks = HashMap<String, (String, u64)>;

/// Runs `chatd` with `args`.
fn chatd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chatd")).args(args).output().expect("chatd runs")
}

fn backup(data: &Path, file: &Path) -> Output {
    chatd(&["backup", "--data", data.to_str().unwrap(), "--out", file.to_str().unwrap()])
}

fn restore(file: &Path, data: &Path) -> Output {
    chatd(&["restore", "--in", file.to_str().unwrap(), "--data", data.to_str().unwrap()])
}

/// Publishes batches of 50 pipelined messages with keys `user-counter`,
/// round-robin into `rooms`, until `stop`; each batch's acks go into
/// `acks` once all have come.
async fn publish_until_stopped(
    addr: String,
    token: String,
    user: String,
    rooms: Vec<String>,
    acks: Arc<Mutex<Acks>>,
    count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    let mut r = Raw::connect_as(&addr, &token).await;
    for room in &rooms {
        r.join(room).await;
    }
    let mut next = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let batch: Vec<proto::Publish> = (next..next + 50)
            .map(|i| proto::Publish {
                room: rooms[i % rooms.len()].clone(),
                client_msg_id: format!("{user}-{i}"),
                text: format!("{user}-{i}"),
                ..Default::default()
            })
            .collect();
        next += batch.len();
        let got = r.publish_all(batch).await;
        count.fetch_add(got.len(), Ordering::Relaxed);
        let mut acks = acks.lock().unwrap();
        for a in got {
            assert!(!a.duplicate, "{a:?}");
            acks.insert(a.client_msg_id, (a.room, a.seq));
        }
    }
}

/// Checks the restored server's logs of `rooms` against the acks: seqs
/// contiguous from 1, every message one that was acknowledged at that seq
/// (the backup is a prefix of what was stored), and every key in `before`
/// present. Returns the number of messages.
async fn audit_restored(addr: &str, token: &str, rooms: &[String], all: &Acks, before: &Acks) -> usize {
    let mut r = Raw::connect_as(addr, token).await;
    let mut found: Acks = HashMap::new();
    for room in rooms {
        r.join(room).await;
        for (i, m) in r.history_all(room).await.into_iter().enumerate() {
            assert_eq!(m.seq, i as u64 + 1, "{room}: seqs contiguous from 1");
            let at = (room.clone(), m.seq);
            assert_eq!(all.get(&m.client_msg_id), Some(&at), "{room} #{}: a message acked there", m.seq);
            assert!(found.insert(m.client_msg_id, at).is_none(), "stored once");
        }
    }
    for (key, at) in before {
        assert_eq!(found.get(key), Some(at), "{key}, acked before the backup began, is in it");
    }
    found.len()
}

/// Retries of acknowledged keys answer `duplicate` with the original seq.
async fn retries_are_duplicates(addr: &str, dir: &Path, acks: &Acks, users: &[&str]) {
    for user in users {
        let mut r = Raw::connect_as(addr, &token_for(dir, user)).await;
        let mut mine: Vec<_> = acks.iter().filter(|(k, _)| k.starts_with(&format!("{user}-"))).collect();
        mine.sort();
        assert!(!mine.is_empty());
        for (key, (room, seq)) in mine.into_iter().step_by(7).take(60) {
            let p = proto::Publish {
                room: room.clone(),
                client_msg_id: key.clone(),
                text: "again".into(),
                ..Default::default()
            };
            let a = r.publish_message(p).await;
            assert!(a.duplicate && a.seq == *seq && &a.room == room, "retry of {key}: {a:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_every_message_acked_before_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Process::start_with_env(&data, &[], &[("RUST_LOG", "warn,chatd::net::backup=info")]);
    let rooms: Vec<String> = (0..4).map(|i| format!("room{i}")).collect();
    let users = ["p0", "p1", "p2"];

    // Memberships beside the log: an owner who banned someone from a
    // public room, a private room with an invitation.
    let mut own = Raw::connect_as(&server.addr, &token_for(&data, "own")).await;
    own.join("room0").await;
    let ban = proto::Ban { room: "room0".into(), user: "mallory".into(), reason: "spam".into() };
    assert!(matches!(own.request(Body::Ban(ban)).await, Body::RoomInfo(_)));
    let team = proto::CreateRoom {
        room: "team".into(),
        kind: proto::RoomKind::Private as i32,
        invite: vec!["guest".into()],
        ..Default::default()
    };
    assert!(matches!(own.request(Body::CreateRoom(team)).await, Body::RoomInfo(_)));

    let acks = Arc::new(Mutex::new(Acks::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let publishers: Vec<_> = users
        .iter()
        .map(|u| {
            let token = token_for(&data, u);
            let args = (server.addr.clone(), token, u.to_string(), rooms.clone());
            tokio::spawn(publish_until_stopped(
                args.0,
                args.1,
                args.2,
                args.3,
                acks.clone(),
                count.clone(),
                stop.clone(),
            ))
        })
        .collect();
    wait_for("4000 acks", Polling::new(WAIT * 2, 5), async || match count.load(Ordering::Relaxed) {
        n if n >= 4000 => Ok(()),
        n => Err(format!("{n} acks")),
    })
    .await;

    // Everything noted here was acknowledged before the backup was asked for.
    let before = acks.lock().unwrap().clone();
    let acks_at_start = count.load(Ordering::Relaxed);
    let file = tmp.path().join("backup.chatd");
    let (data2, file2) = (data.clone(), file.clone());
    let out = tokio::task::spawn_blocking(move || backup(&data2, &file2)).await.unwrap();
    let acks_at_end = count.load(Ordering::Relaxed);
    assert_success(&out, "chatd backup");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("made by the running server"), "{said}");
    assert!(acks_at_end > acks_at_start, "publishes went on during the backup ({acks_at_start} acks before it)");
    let finished = server.wait_for_logs("the backup's log line", |lines| {
        lines.iter().find(|l| l.contains("backup finished") && l.contains("stall_us")).cloned()
    });

    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        p.await.unwrap();
    }
    let all = acks.lock().unwrap().clone();
    let mut server = server;
    assert!(tokio::task::spawn_blocking(move || server.terminate()).await.unwrap().success());
    assert!(!data.join("chatd.sock").exists(), "the socket is removed at shutdown");

    let restored = tmp.path().join("restored");
    assert_success(&restore(&file, &restored), "chatd restore");
    // Tokens stay valid with the old secret beside the restored store.
    std::fs::copy(data.join("secret"), restored.join("secret")).unwrap();
    let server = Process::start(&restored, &[]);
    let auditor = token_for(&restored, "auditor");
    let n = audit_restored(&server.addr, &auditor, &rooms, &all, &before).await;
    eprintln!(
        "backup under load: {} acks before it, {n} messages in it, {} acks in all, {} during it; the server: {finished}",
        before.len(),
        all.len(),
        acks_at_end - acks_at_start
    );
    retries_are_duplicates(&server.addr, &restored, &before, &users).await;

    // The memberships: the owner's roles, the ban, the invitation, the
    // publishers' rooms.
    let mut o = Raw::connect(&server.addr).await;
    let w = o.hello(&token_for(&restored, "own"), vec![]).await;
    let roles: HashMap<&str, i32> =
        w.rooms.iter().map(|r| (r.room.as_str(), r.info.as_ref().map_or(0, |i| i.my_role))).collect();
    let owner = proto::Role::Owner as i32;
    assert_eq!((roles.get("room0"), roles.get("team")), (Some(&owner), Some(&owner)), "{roles:?}");
    let mut g = Raw::connect(&server.addr).await;
    let gw = g.hello(&token_for(&restored, "guest"), vec![]).await;
    assert_eq!(gw.invites.iter().map(|i| i.room.as_str()).collect::<Vec<_>>(), vec!["team"]);
    let mut m = Raw::connect_as(&server.addr, &token_for(&restored, "mallory")).await;
    expect_error(&m.request(Body::Join(proto::Join { room: "room0".into() })).await, proto::ErrorCode::Forbidden);
    for user in users {
        let mut p = Raw::connect(&server.addr).await;
        let w = p.hello(&token_for(&restored, user), vec![]).await;
        let mut theirs: Vec<&str> = w.rooms.iter().map(|r| r.room.as_str()).collect();
        theirs.sort();
        assert_eq!(theirs, rooms.iter().map(String::as_str).collect::<Vec<_>>(), "{user}'s rooms");
    }
    // The log goes on from the restored head.
    let head = w.rooms.iter().find(|r| r.room == "room0").unwrap().head_seq;
    assert_eq!(own_publish(&server.addr, &restored).await, head + 1);
}

async fn own_publish(addr: &str, dir: &Path) -> u64 {
    let mut r = Raw::connect_as(addr, &token_for(dir, "own")).await;
    r.publish("room0", "after the restore").await.seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_server_running_the_backup_is_made_from_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let rooms = vec!["a".to_string(), "b".to_string()];
    let mut server = Process::start(&data, &[]);
    let mut r = Raw::connect_as(&server.addr, &token_for(&data, "ann")).await;
    for room in &rooms {
        r.join(room).await;
    }
    let batch = (0..300).map(|i| proto::Publish {
        room: rooms[i % 2].clone(),
        client_msg_id: format!("ann-{i}"),
        text: format!("{i}"),
        ..Default::default()
    });
    let acks: Acks = r.publish_all(batch).await.into_iter().map(|a| (a.client_msg_id, (a.room, a.seq))).collect();
    assert_eq!(acks.len(), 300);

    // The socket: the owner's alone, and a request it does not know is
    // answered with an error and the connection closed.
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    let sock = data.join("chatd.sock");
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
    let answer = tokio::task::spawn_blocking({
        let sock = sock.clone();
        move || {
            let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
            s.write_all(b"restore everything\n").unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).unwrap();
            answer
        }
    })
    .await
    .unwrap();
    assert!(answer.starts_with("error: unknown request") && answer.ends_with('\n'), "{answer:?}");
    server.wait_for_logs("the refusal", |lines| lines.iter().find(|l| l.contains("malformed request")).cloned());

    // A crash leaves the socket behind, with nobody listening.
    server.kill9();
    assert!(sock.exists());
    let file = tmp.path().join("offline.chatd");
    let out = backup(&data, &file);
    assert_success(&out, "chatd backup with no server");
    assert!(String::from_utf8_lossy(&out.stdout).contains("no server running"));

    let restored = tmp.path().join("restored");
    assert_success(&restore(&file, &restored), "chatd restore");
    let again = restore(&file, &restored);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("already holds a store"));
    let cut = tmp.path().join("cut.chatd");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 3]).unwrap();
    let refused = restore(&cut, &tmp.path().join("elsewhere"));
    assert!(
        !refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("not a usable chatd backup")
    );
    assert!(!tmp.path().join("elsewhere").join("store").exists());

    let restored_server = Process::start(&restored, &[]);
    let auditor = token_for(&restored, "auditor");
    assert_eq!(audit_restored(&restored_server.addr, &auditor, &rooms, &acks, &acks).await, 300);
    retries_are_duplicates(&restored_server.addr, &restored, &acks, &["ann"]).await;
    drop(restored_server);

    // Started again, the server replaces the stale socket and answers on it.
    let server = Process::start(&data, &[]);
    let online = tmp.path().join("online.chatd");
    let out = tokio::task::spawn_blocking(move || backup(&data, &online)).await.unwrap();
    assert_success(&out, "chatd backup");
    assert!(String::from_utf8_lossy(&out.stdout).contains("made by the running server"));
    let metrics = scrape_metrics(&server.http).await;
    assert_eq!(metric(&metrics, "chatd_backups_total{outcome=\"ok\"}"), 1.0);
}
