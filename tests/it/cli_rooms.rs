//! The `chat` CLI's room commands (proto/README.md §8) against a real
//! server: creating public and private rooms, inviting, accepting and
//! declining, kicking, banning and unbanning, roles, the member list and
//! the directory paged through to their ends, the topic, and refusals
//! (the server's code on stderr, a non-zero exit). Alongside, what
//! `chat-client` makes of the pushes a removed or banned user gets, live
//! and at resume.

use std::process::{Command, Output, Stdio};

use chat_client::{ClientConfig, Event};
use chatd::proto::{self, MemberChange};

use crate::common::*;

/// Runs `chat --server ADDR ARGS` as `user` (its token in `CHAT_TOKEN`).
async fn chat(s: &TestServer, user: &str, args: &[&str]) -> Output {
    let bin = workspace_bin("chat-client", "chat");
    let mut cmd = Command::new(bin);
    cmd.arg("--server").arg(&s.addr).args(args).env("CHAT_TOKEN", s.token(user)).env_remove("CHAT_SERVER");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap()
}

/// The output of a command that must succeed, as lines.
async fn ok(s: &TestServer, user: &str, args: &[&str]) -> Vec<String> {
    let o = chat(s, user, args).await;
    assert_success(&o, &format!("{user}: chat {}", args.join(" ")));
    String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect()
}

/// A command the server must refuse with `code` (`"FORBIDDEN"`): a
/// non-zero exit, the code on stderr, nothing on stdout.
async fn refused(s: &TestServer, user: &str, args: &[&str], code: &str) -> String {
    let o = chat(s, user, args).await;
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr).into_owned());
    assert!(!o.status.success(), "{user}: chat {} should fail; it printed {out}", args.join(" "));
    assert!(err.contains(code), "{user}: chat {}: expected {code} on stderr, got {err}", args.join(" "));
    assert!(out.is_empty(), "{out}");
    err
}

/// The first line of `lines` that starts with `prefix`, if any.
fn line_of<'a>(lines: &'a [String], prefix: &str) -> Option<&'a str> {
    lines.iter().map(String::as_str).find(|l| l.starts_with(prefix))
}

/// The next `Left` event a client gets.
async fn next_left(events: &mut chat_client::Events) -> proto::Left {
    next_event(events, "left", |e| if let Event::Left(l) = e { Some(l) } else { None }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_rooms_private_room_invite_accept_and_decline() {
    let s = TestServer::start().await;
    let out = ok(
        &s,
        "ann",
        &["create", "team", "--private", "--title", "Core team", "--topic", "Release 2.0", "--invite", "bob"],
    )
    .await;
    assert_eq!(
        out,
        vec![
            r#"created team (private, 1 member, owner ann, title "Core team", topic "Release 2.0")"#,
            "invited bob to team",
        ]
    );
    refused(&s, "ann", &["create", "team"], "ALREADY_EXISTS").await;

    // bob sees the invitation in his Welcome, and accepting it joins.
    let invites = ok(&s, "bob", &["invites"]).await;
    assert_eq!(invites.len(), 1, "{invites:?}");
    assert!(invites[0].starts_with("team\tinvited by ann\tprivate, 1 member, owner ann"), "{invites:?}");
    assert!(invites[0].contains(r#"title "Core team""#), "{invites:?}");
    // Nobody else may join a private room.
    refused(&s, "carol", &["accept", "team"], "FORBIDDEN").await;
    let out = ok(&s, "bob", &["accept", "team"]).await;
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(out[0].starts_with("joined team (private, 2 members, owner ann"), "{out:?}");
    let o = chat(&s, "bob", &["invites"]).await;
    assert_success(&o, "bob: chat invites");
    assert!(o.stdout.is_empty(), "the invitation was used up: {}", String::from_utf8_lossy(&o.stdout));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no pending invitations"));
    // A member may not invite to a private room.
    refused(&s, "bob", &["invite", "team", "dave"], "FORBIDDEN").await;

    // carol is invited, declines, and has nothing left to decline or use.
    assert_eq!(ok(&s, "ann", &["invite", "team", "carol"]).await, vec!["invited carol to team"]);
    let invites = ok(&s, "carol", &["invites"]).await;
    assert!(line_of(&invites, "team\tinvited by ann\t").is_some(), "{invites:?}");
    assert_eq!(ok(&s, "carol", &["decline", "team"]).await, vec!["declined the invitation to team"]);
    assert!(ok(&s, "carol", &["invites"]).await.is_empty());
    refused(&s, "carol", &["decline", "team"], "NOT_FOUND").await;
    refused(&s, "carol", &["accept", "team"], "FORBIDDEN").await;

    let members = ok(&s, "ann", &["members", "team"]).await;
    let users: Vec<&str> = members.iter().map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(users, vec!["ann", "bob"], "{members:?}");
    assert!(members[0].starts_with("ann\towner\t") && members[1].starts_with("bob\tmember\t"), "{members:?}");
    // Outsiders may not list a private room's members.
    refused(&s, "carol", &["members", "team"], "FORBIDDEN").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_rooms_kick_ban_unban_and_roles() {
    let s = TestServer::start().await;
    ok(&s, "ann", &["create", "lobby"]).await;
    for user in ["bob", "carol"] {
        let out = ok(&s, user, &["accept", "lobby"]).await;
        assert!(out[0].starts_with("joined lobby (public"), "{out:?}");
    }
    // carol stays online through the library, to see what she is told.
    let (carol, mut carol_events) = s.client("carol").await;
    assert!(carol.room_info("lobby").is_some(), "lobby is among carol's rooms at Welcome");

    // A member may not kick; an admin may kick a member but not the owner.
    refused(&s, "bob", &["kick", "lobby", "carol"], "FORBIDDEN").await;
    assert_eq!(ok(&s, "ann", &["role", "lobby", "bob", "admin"]).await, vec!["bob is now admin in lobby"]);
    refused(&s, "bob", &["kick", "lobby", "ann"], "FORBIDDEN").await;
    refused(&s, "bob", &["role", "lobby", "carol", "admin"], "FORBIDDEN").await;
    assert_eq!(
        ok(&s, "bob", &["kick", "lobby", "carol", "--reason", "off topic"]).await,
        vec!["removed carol from lobby"]
    );
    let left = next_left(&mut carol_events).await;
    assert_eq!((left.room.as_str(), left.reason(), left.by.as_str()), ("lobby", MemberChange::Removed, "bob"));
    assert!(carol.room_info("lobby").is_none(), "no longer among carol's rooms");

    // A removed user may come back to a public room; a banned one may not.
    ok(&s, "carol", &["accept", "lobby"]).await;
    assert_eq!(ok(&s, "ann", &["ban", "lobby", "carol", "--reason", "spam"]).await, vec!["banned carol from lobby"]);
    let left = next_left(&mut carol_events).await;
    assert_eq!((left.room.as_str(), left.reason(), left.by.as_str()), ("lobby", MemberChange::Banned, "ann"));
    refused(&s, "carol", &["accept", "lobby"], "FORBIDDEN").await;
    refused(&s, "ann", &["invite", "lobby", "carol"], "CONFLICT").await;
    let directory = ok(&s, "carol", &["directory"]).await;
    assert!(line_of(&directory, "lobby\t").is_none(), "hidden from the banned: {directory:?}");

    // Resuming the room after the ban is answered with why, not a replay,
    // and the client does not resume it again.
    carol.close();
    let mut config = ClientConfig::new(s.addr.clone(), s.token("carol"));
    config.resume = vec![proto::Cursor { room: "lobby".into(), after_seq: 0 }];
    let (again, mut again_events) = chat_client::Client::connect(config).await.unwrap();
    let left = next_left(&mut again_events).await;
    assert_eq!((left.room.as_str(), left.reason(), left.by.as_str()), ("lobby", MemberChange::Banned, "ann"));
    assert!(again.rooms().is_empty(), "{:?}", again.rooms());
    again.close();

    let members = ok(&s, "ann", &["members", "lobby"]).await;
    assert!(line_of(&members, "carol\t").is_none(), "{members:?}");
    assert_eq!(ok(&s, "ann", &["unban", "lobby", "carol"]).await, vec!["unbanned carol in lobby"]);
    ok(&s, "carol", &["accept", "lobby"]).await;

    // The owner hands ownership on and becomes an admin.
    assert_eq!(
        ok(&s, "ann", &["role", "lobby", "bob", "owner"]).await,
        vec!["bob is now owner of lobby; you are admin"]
    );
    refused(&s, "ann", &["role", "lobby", "carol", "admin"], "FORBIDDEN").await;
    let members = ok(&s, "carol", &["members", "lobby"]).await;
    assert_eq!(members.len(), 3, "{members:?}");
    assert!(members[0].starts_with("ann\tadmin\t"), "{members:?}");
    assert_eq!(members[1], "bob\towner\toffline");
    assert_eq!(members[2], "carol\tmember\tonline", "carol's own session is online while she lists");
    // Roles other than the three, and a missing role, are the CLI's errors.
    let o = chat(&s, "bob", &["role", "lobby", "carol", "king"]).await;
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("member, admin, owner"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Not a member of the room: NOT_FOUND.
    refused(&s, "bob", &["role", "lobby", "dave", "admin"], "NOT_FOUND").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_rooms_topic_members_and_directory_page_through_everything() {
    let s = TestServer::start().await;
    let (ann, _ann_events) = s.client("ann").await;
    // More rooms than a directory page (50) and more members than a member
    // page (100), so that both commands must page.
    for i in 0..55 {
        let create = proto::CreateRoom { room: format!("room-{i:02}"), ..Default::default() };
        ann.create_room(create).await.unwrap();
    }
    let private = proto::CreateRoom {
        room: "hidden".into(),
        kind: proto::RoomKind::Private as i32,
        title: "Rust insiders".into(),
        ..Default::default()
    };
    ann.create_room(private).await.unwrap();
    let corner = proto::CreateRoom { room: "corner".into(), title: "The Rust corner".into(), ..Default::default() };
    ann.create_room(corner).await.unwrap();
    let mut users: Vec<String> = (0..105).map(|i| format!("u{i:03}")).collect();
    for user in &users {
        let (c, _ev) = s.client(user).await;
        c.join("room-00").await.unwrap();
        c.close();
    }

    let directory = ok(&s, "bob", &["directory"]).await;
    let names: Vec<&str> = directory.iter().map(|l| l.split('\t').next().unwrap()).collect();
    let mut expected: Vec<String> = (0..55).map(|i| format!("room-{i:02}")).collect();
    expected.insert(0, "corner".into());
    assert_eq!(names, expected, "every public room once, in name order, no private one");
    assert_eq!(directory[1], "room-00\tpublic, 106 members, owner ann");

    // The query matches names and titles, whatever the case.
    let found = ok(&s, "bob", &["directory", "RUST"]).await;
    assert_eq!(found, vec!["corner\tpublic, 1 member, owner ann, title \"The Rust corner\""]);
    assert_eq!(ok(&s, "bob", &["directory", "room-5"]).await.len(), 5);
    let o = chat(&s, "bob", &["directory", "nothing-like-this"]).await;
    assert_success(&o, "bob: chat directory nothing-like-this");
    assert!(o.stdout.is_empty() && String::from_utf8_lossy(&o.stderr).contains("no public rooms match"));

    // The topic: set by the owner (only the topic changes), refused to a
    // member, cleared.
    assert_eq!(ok(&s, "ann", &["topic", "corner", "Borrowing"]).await, vec!["topic of corner: Borrowing"]);
    assert_eq!(
        ok(&s, "bob", &["directory", "corner"]).await,
        vec!["corner\tpublic, 1 member, owner ann, title \"The Rust corner\", topic \"Borrowing\""]
    );
    ok(&s, "bob", &["accept", "corner"]).await;
    refused(&s, "bob", &["topic", "corner", "mine now"], "FORBIDDEN").await;
    assert_eq!(ok(&s, "ann", &["topic", "corner", ""]).await, vec!["cleared the topic of corner"]);
    let info = ann.get_room("corner").await.unwrap();
    assert_eq!((info.title.as_str(), info.topic.as_str()), ("The Rust corner", ""));

    let members = ok(&s, "u050", &["members", "room-00"]).await;
    let listed: Vec<&str> = members.iter().map(|l| l.split('\t').next().unwrap()).collect();
    users.insert(0, "ann".into());
    assert_eq!(listed, users, "every member once, in user-id order");
    assert!(members[0].starts_with("ann\towner\t") && members[1] == "u000\tmember\toffline", "{members:?}");

    refused(&s, "bob", &["members", "no-such-room"], "NOT_FOUND").await;
}

/// The next `RoomUpdate` of `change` a client gets, skipping other events.
async fn next_update(events: &mut chat_client::Events, change: MemberChange) -> proto::RoomUpdate {
    next_event(events, change.as_str_name(), |e| match e {
        Event::RoomUpdate(u) if u.change() == change => Some(u),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_rooms_changes_reach_the_library_as_events() {
    let s = TestServer::start().await;
    let (ann, mut ann_events) = s.client("ann").await;
    let (bob, mut bob_events) = s.client("bob").await;

    // An invitation made from the CLI reaches the invitee at once.
    ok(&s, "ann", &["create", "team", "--private", "--title", "Core team", "--invite", "bob"]).await;
    let i =
        next_event(&mut bob_events, "invitation", |e| if let Event::Invitation(i) = e { Some(i) } else { None }).await;
    let info = i.info.clone().unwrap_or_default();
    assert_eq!(
        (i.room.as_str(), i.by.as_str(), info.kind(), info.title.as_str()),
        ("team", "ann", proto::RoomKind::Private, "Core team")
    );
    assert_eq!(bob.invites(), vec![i]);
    assert_eq!(ann.room_info("team").map(|r| r.my_role()), Some(proto::Role::Owner), "from the RoomInfo reply");
    let u = next_update(&mut ann_events, MemberChange::Invited).await;
    assert_eq!((u.user.as_str(), u.by.as_str()), ("bob", "ann"));

    // Each change is pushed to the members, the one who made it included.
    ok(&s, "bob", &["accept", "team"]).await;
    let u = next_update(&mut ann_events, MemberChange::Joined).await;
    assert_eq!((u.user.as_str(), u.role(), u.by.as_str()), ("bob", proto::Role::Member, "bob"));
    assert_eq!(u.info.map(|i| i.member_count), Some(2));
    ok(&s, "ann", &["role", "team", "bob", "admin"]).await;
    for events in [&mut ann_events, &mut bob_events] {
        let u = next_update(events, MemberChange::RoleChanged).await;
        assert_eq!((u.user.as_str(), u.role(), u.by.as_str()), ("bob", proto::Role::Admin, "ann"));
    }
    assert_eq!(bob.room_info("team").map(|r| r.my_role()), Some(proto::Role::Admin), "bob's role as bob sees it");
    assert!(bob.invites().is_empty(), "the invitation was used up");

    ok(&s, "bob", &["topic", "team", "Release 2.1"]).await;
    let u = next_update(&mut ann_events, MemberChange::Unspecified).await;
    assert_eq!((u.user.as_str(), u.by.as_str()), ("", "bob"));
    assert_eq!(u.info.map(|i| (i.title, i.topic)), Some(("Core team".into(), "Release 2.1".into())));
    assert_eq!(ann.room_info("team").map(|r| r.topic), Some("Release 2.1".into()));

    // A new session finds the room's details and the user's role in its
    // Welcome; leaving there tells the other sessions why.
    let (bob2, _bob2_events) = s.client("bob").await;
    let info = bob2.welcome().rooms[0].info.clone().unwrap_or_default();
    assert_eq!((info.room.as_str(), info.my_role(), info.topic.as_str()), ("team", proto::Role::Admin, "Release 2.1"));
    bob2.leave("team").await.unwrap();
    let left = next_left(&mut bob_events).await;
    assert_eq!((left.room.as_str(), left.reason(), left.by.as_str()), ("team", MemberChange::Left, "bob"));
    assert!(bob.rooms().is_empty());
}

/// The message-change commands (proto/README.md §9): edit, react, reply
/// with a mention, delete — each printed by `history` in its latest state
/// with the change entries as sentences, and the unread and mention counts
/// in `rooms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_react_reply_and_delete_from_the_command_line() {
    let s = TestServer::start().await;
    assert_eq!(ok(&s, "ann", &["send", "talk", "helo wrold"]).await, vec!["sent talk #1"]);
    ok(&s, "bob", &["send", "talk", "bob here"]).await;
    assert_eq!(ok(&s, "ann", &["edit", "talk", "1", "hello world"]).await, vec!["edited talk #1 (entry #3)"]);
    refused(&s, "bob", &["edit", "talk", "1", "mine now"], "FORBIDDEN").await;
    assert_eq!(ok(&s, "bob", &["react", "talk", "1", "👍"]).await, vec!["reacted talk #1 (entry #4)"]);
    assert_eq!(ok(&s, "bob", &["react", "talk", "1", "👍"]).await, vec!["reacted talk #1: already so"]);
    let reply = ok(&s, "bob", &["reply", "talk", "1", "@ann nice", "--mention", "ann"]).await;
    assert_eq!(reply, vec!["sent talk #5 (reply to #1)"]);
    assert_eq!(ok(&s, "bob", &["delete", "talk", "2"]).await, vec!["deleted talk #2 (entry #6)"]);
    refused(&s, "ann", &["react", "talk", "2", "👍"], "NOT_FOUND").await;
    refused(&s, "ann", &["delete", "talk", "9"], "NOT_FOUND").await;
    let history = ok(&s, "ann", &["history", "talk"]).await;
    assert_eq!(
        history,
        vec![
            "[talk #1] ann: hello world (edited)  [👍 1]",
            "[talk #2] bob: (deleted)",
            "[talk #3] ann edited #1: hello world",
            "[talk #4] bob reacted 👍 to #1",
            "[talk #5] bob: ↪ #1 @ann nice",
            "[talk #6] bob deleted #2",
        ]
    );
    // ann read up to her own message; bob's reply (mentioning her) is
    // unread, his deleted message and the change entries are not.
    let rooms = ok(&s, "ann", &["rooms"]).await;
    assert_eq!(rooms, vec!["talk\thead 6\tread 1\tunread 1\tmentions 1"]);
}
