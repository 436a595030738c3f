//! Rooms that apps govern: kinds, roles, invitations, removals and bans
//! (proto/README.md §8) — the rules, every refusal (and that it changes
//! nothing), removal cutting off every session on every transport including
//! one fed from the log, persistence across a restart, and the audit trail.

use chatd::proto::{self, Body, ErrorCode, MemberChange, Role, RoomKind};

use crate::common::{ChatServer, Raw, TestServer, admin_get, expect_error, metric, scrape_metrics};

/// Sends `body` and expects a `RoomInfo` reply.
async fn info(r: &mut Raw, body: Body) -> proto::RoomInfo {
    match r.request(body).await {
        Body::RoomInfo(i) => i,
        other => panic!("expected room_info, got {other:?}"),
    }
}

/// Sends `body` and expects an `Error{code}`.
async fn refused(r: &mut Raw, body: Body, code: ErrorCode) -> String {
    expect_error(&r.request(body).await, code)
}

fn create(room: &str, kind: RoomKind, invite: &[&str]) -> Body {
    Body::CreateRoom(proto::CreateRoom {
        room: room.into(),
        kind: kind as i32,
        title: format!("The {room}"),
        topic: String::new(),
        invite: invite.iter().map(|u| u.to_string()).collect(),
    })
}

fn get(room: &str) -> Body {
    Body::GetRoom(proto::GetRoom { room: room.into() })
}

fn invite(room: &str, user: &str) -> Body {
    Body::Invite(proto::Invite { room: room.into(), user: user.into() })
}

fn remove(room: &str, user: &str) -> Body {
    Body::RemoveMember(proto::RemoveMember { room: room.into(), user: user.into(), reason: "off-topic".into() })
}

fn ban(room: &str, user: &str) -> Body {
    Body::Ban(proto::Ban { room: room.into(), user: user.into(), reason: "spam".into() })
}

fn unban(room: &str, user: &str) -> Body {
    Body::Unban(proto::Unban { room: room.into(), user: user.into(), reason: String::new() })
}

fn set_role(room: &str, user: &str, role: Role) -> Body {
    Body::SetRole(proto::SetRole { room: room.into(), user: user.into(), role: role as i32 })
}

fn join(room: &str) -> Body {
    Body::Join(proto::Join { room: room.into() })
}

fn members(room: &str) -> Body {
    Body::ListMembers(proto::ListMembers { room: room.into(), after_user: String::new(), limit: 0 })
}

/// The next `Left` push, skipping other frames.
async fn next_left(r: &mut Raw) -> proto::Left {
    r.next_push(|b| if let Body::Left(l) = b { Some(l) } else { None }).await
}

/// The next `RoomUpdate` push with `change`, skipping other frames.
async fn next_update(r: &mut Raw, change: MemberChange) -> proto::RoomUpdate {
    r.next_push(|b| match b {
        Body::RoomUpdate(u) if u.change == change as i32 => Some(u),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_room_admits_only_the_invited() {
    let s = TestServer::start().await;
    let (mut ann, _) = s.raw_user("ann").await;
    let (mut bob, _) = s.raw_user("bob").await;
    let (mut eve, _) = s.raw_user("eve").await;
    let i = info(&mut ann, create("core", RoomKind::Private, &["bob"])).await;
    assert_eq!((i.kind, i.my_role, i.member_count), (RoomKind::Private as i32, Role::Owner as i32, 1));
    assert_eq!((i.owner.as_str(), i.created_by.as_str(), i.title.as_str()), ("ann", "ann", "The core"));
    ann.publish("core", "secret plans").await;

    let inv = bob.next_push(|b| if let Body::Invitation(i) = b { Some(i) } else { None }).await;
    assert_eq!((inv.room.as_str(), inv.by.as_str()), ("core", "ann"));
    assert_eq!(inv.info.unwrap().my_role, Role::Unspecified as i32);
    // The invitation waits in Welcome until used.
    let (_, w) = s.raw_user("bob").await;
    assert_eq!(w.invites.iter().map(|i| i.room.as_str()).collect::<Vec<_>>(), ["core"]);

    // Nothing of the room reaches eve.
    refused(&mut eve, join("core"), ErrorCode::Forbidden).await;
    refused(&mut eve, get("core"), ErrorCode::Forbidden).await;
    refused(&mut eve, members("core"), ErrorCode::Forbidden).await;
    let h = Body::History(proto::History { room: "core".into(), ..Default::default() });
    refused(&mut eve, h, ErrorCode::Forbidden).await;
    let dir = eve.request(Body::ListRooms(proto::ListRooms::default())).await;
    assert!(matches!(dir, Body::RoomList(ref l) if l.rooms.is_empty()), "{dir:?}");

    // Bob accepts by joining: the invitation is used up.
    let j = bob.join("core").await;
    let state = j.state.unwrap();
    assert_eq!((state.head_seq, state.info.unwrap().my_role), (1, Role::Member as i32));
    let u = next_update(&mut ann, MemberChange::Joined).await;
    assert_eq!((u.user.as_str(), u.by.as_str(), u.info.unwrap().member_count), ("bob", "bob", 2));
    let (_, w) = s.raw_user("bob").await;
    assert!(w.invites.is_empty());
    assert_eq!(w.rooms[0].info.as_ref().unwrap().kind, RoomKind::Private as i32);
    bob.publish("core", "hi").await;
    assert_eq!(ann.next_message().await.text, "hi");
    // Declining what one is not invited to is NOT_FOUND.
    refused(&mut eve, Body::DeclineInvite(proto::DeclineInvite { room: "core".into() }), ErrorCode::NotFound).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_invitation_is_gone_and_the_room_is_told() {
    let s = TestServer::start().await;
    let (mut ann, _) = s.raw_user("ann").await;
    let (mut bob, _) = s.raw_user("bob").await;
    info(&mut ann, create("core", RoomKind::Private, &[])).await;
    // Another session of ann's watches the room's updates (the acting
    // session gets them too, before its reply).
    let (mut watch, _) = s.raw_user("ann").await;
    let i = info(&mut ann, invite("core", "bob")).await;
    assert_eq!(i.member_count, 1);
    let u = next_update(&mut watch, MemberChange::Invited).await;
    assert_eq!((u.user.as_str(), u.by.as_str()), ("bob", "ann"));
    // A second invitation changes nothing: bob gets no second push.
    info(&mut ann, invite("core", "bob")).await;
    let seen = bob.next_push(|b| if let Body::Invitation(i) = b { Some(i) } else { None }).await;
    assert_eq!(seen.room, "core");
    let d = info(&mut bob, Body::DeclineInvite(proto::DeclineInvite { room: "core".into() })).await;
    assert_eq!(d.my_role, Role::Unspecified as i32);
    bob.assert_nothing_queued().await;
    next_update(&mut watch, MemberChange::Declined).await;
    refused(&mut bob, join("core"), ErrorCode::Forbidden).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_bound_what_members_may_do_and_refusals_change_nothing() {
    let s = TestServer::start_with(|c| c.max_pending_invites_per_user = 2).await;
    let (mut ann, _) = s.raw_user("ann").await;
    let (mut adam, _) = s.raw_user("adam").await;
    let (mut abby, _) = s.raw_user("abby").await;
    let (mut mia, _) = s.raw_user("mia").await;
    info(&mut ann, create("team", RoomKind::Private, &["adam", "abby", "mia"])).await;
    for r in [&mut adam, &mut abby, &mut mia] {
        r.join("team").await;
    }
    info(&mut ann, set_role("team", "adam", Role::Admin)).await;
    info(&mut ann, set_role("team", "abby", Role::Admin)).await;

    // Bad input: BAD_REQUEST.
    refused(&mut ann, create("has space", RoomKind::Public, &[]), ErrorCode::BadRequest).await;
    refused(&mut ann, create("dm:ann:bob", RoomKind::Public, &[]), ErrorCode::BadRequest).await;
    refused(&mut ann, create("x", RoomKind::Direct, &[]), ErrorCode::BadRequest).await;
    refused(&mut ann, create("x", RoomKind::Public, &["not a user"]), ErrorCode::BadRequest).await;
    let long_title =
        Body::CreateRoom(proto::CreateRoom { room: "x".into(), title: "t".repeat(129), ..Default::default() });
    refused(&mut ann, long_title, ErrorCode::BadRequest).await;
    let long_topic = Body::UpdateRoom(proto::UpdateRoom {
        room: "team".into(),
        topic: Some("t".repeat(1025)),
        ..Default::default()
    });
    refused(&mut ann, long_topic, ErrorCode::BadRequest).await;
    refused(&mut ann, set_role("team", "mia", Role::Unspecified), ErrorCode::BadRequest).await;
    refused(&mut ann, invite("bad name!", "mia"), ErrorCode::BadRequest).await;
    // Unknown rooms and targets: NOT_FOUND.
    refused(&mut ann, get("nowhere"), ErrorCode::NotFound).await;
    refused(&mut ann, invite("nowhere", "mia"), ErrorCode::NotFound).await;
    refused(&mut ann, set_role("team", "zed", Role::Admin), ErrorCode::NotFound).await;
    // Existing names: ALREADY_EXISTS.
    refused(&mut mia, create("team", RoomKind::Public, &[]), ErrorCode::AlreadyExists).await;
    // Beyond one's role: FORBIDDEN.
    refused(&mut mia, invite("team", "zed"), ErrorCode::Forbidden).await;
    refused(&mut mia, remove("team", "adam"), ErrorCode::Forbidden).await;
    refused(&mut mia, set_role("team", "mia", Role::Admin), ErrorCode::Forbidden).await;
    let topic =
        Body::UpdateRoom(proto::UpdateRoom { room: "team".into(), topic: Some("mine".into()), ..Default::default() });
    refused(&mut mia, topic, ErrorCode::Forbidden).await;
    refused(&mut adam, remove("team", "abby"), ErrorCode::Forbidden).await;
    refused(&mut adam, ban("team", "ann"), ErrorCode::Forbidden).await;
    refused(&mut adam, remove("team", "adam"), ErrorCode::Forbidden).await;
    refused(&mut adam, set_role("team", "mia", Role::Admin), ErrorCode::Forbidden).await;
    refused(&mut ann, set_role("team", "ann", Role::Member), ErrorCode::Forbidden).await;
    // A member invited again: the current state, no second invitation.
    let i = info(&mut adam, invite("team", "mia")).await;
    assert_eq!(i.member_count, 4);
    mia.assert_nothing_queued().await;
    // Banned users are not invited.
    info(&mut adam, ban("team", "eve")).await;
    refused(&mut adam, invite("team", "eve"), ErrorCode::Conflict).await;
    // The invitation bound (2 here).
    info(&mut adam, invite("team", "zed")).await;
    info(&mut mia, create("other", RoomKind::Public, &["zed"])).await;
    let why = refused(&mut adam, create("third", RoomKind::Public, &["zed"]), ErrorCode::Conflict).await;
    assert!(why.contains("pending invitations"), "{why}");
    refused(&mut ann, get("third"), ErrorCode::NotFound).await;

    // Nothing changed.
    let i = info(&mut ann, get("team")).await;
    assert_eq!((i.member_count, i.owner.as_str(), i.topic.as_str()), (4, "ann", ""));
    let page = match ann.request(members("team")).await {
        Body::MemberPage(p) => p,
        other => panic!("{other:?}"),
    };
    let roles: Vec<_> = page.members.iter().map(|m| (m.user.as_str(), m.role, m.online)).collect();
    let (owner, admin, member) = (Role::Owner as i32, Role::Admin as i32, Role::Member as i32);
    assert_eq!(roles, [("abby", admin, true), ("adam", admin, true), ("ann", owner, true), ("mia", member, true)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_changes_share_the_per_user_rate_limit() {
    let s = TestServer::start_with(|c| {
        c.publish_rate = 1;
        c.publish_burst = 3;
    })
    .await;
    let (mut ann, _) = s.raw_user("ann").await;
    info(&mut ann, create("r", RoomKind::Public, &[])).await;
    info(&mut ann, invite("r", "bob")).await;
    info(&mut ann, invite("r", "cat")).await;
    let why = refused(&mut ann, invite("r", "dan"), ErrorCode::RateLimited).await;
    assert!(why.contains("room changes"), "{why}");
    let i = info(&mut ann, get("r")).await;
    assert_eq!(i.member_count, 1, "reads are not limited");
    let (_, w) = s.raw_user("dan").await;
    assert!(w.invites.is_empty(), "the refused invitation was not made");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_create_a_join_of_an_unknown_room_is_not_found() {
    let s = TestServer::start_with(|c| c.auto_create_rooms = false).await;
    let (mut ann, _) = s.raw_user("ann").await;
    refused(&mut ann, join("lobby"), ErrorCode::NotFound).await;
    info(&mut ann, create("lobby", RoomKind::Public, &[])).await;
    let (mut bob, _) = s.raw_user("bob").await;
    let j = bob.join("lobby").await;
    assert_eq!(j.state.unwrap().info.unwrap().my_role, Role::Member as i32);
    // Direct rooms are still made by joining them.
    ann.join("dm:ann:bob").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_cuts_off_every_session_on_every_transport_at_once() {
    let s = TestServer::start_with(|c| {
        c.outbound_max_frames = 8;
        c.slow_consumer_timeout_ms = 60_000;
    })
    .await;
    let (mut ann, _) = s.raw_user("ann").await;
    info(&mut ann, create("r", RoomKind::Public, &[])).await;
    let mut tcp = s.raw_member("bob", "r").await;
    let mut ws = s.ws_user("bob").await;
    // A third session of bob's that does not read: it falls behind and is
    // fed from the log.
    let mut slow = Raw::connect_small(&s.addr).await;
    slow.hello(&s.token("bob"), vec![]).await;
    // Enough to fill the kernel's socket buffers and the session's queue.
    let filler = bytes::Bytes::from(vec![b'x'; 4096]);
    let mut head = 0;
    for _ in 0..6 {
        let batch = (0..500).map(|_| proto::Publish { room: "r".into(), data: filler.clone(), ..Default::default() });
        head = ann.publish_all(batch).await.iter().map(|a| a.seq).max().unwrap();
    }
    let lagging = scrape_metrics(&s.http).await;
    assert!(metric(&lagging, "chatd_slow_consumer_events_total") >= 1.0, "the third session fell behind");
    let i = info(&mut ann, remove("r", "bob")).await;
    assert_eq!(i.member_count, 1);
    // After the removal nothing of the room goes to any of bob's sessions.
    for n in 0..20 {
        ann.publish("r", &format!("after {n}")).await;
    }
    ann.send(0, Body::Typing(proto::Typing { room: "r".into(), user: String::new(), active: true })).await;
    let want = proto::Left { room: "r".into(), reason: MemberChange::Removed as i32, by: "ann".into() };
    assert_eq!(next_left(&mut tcp).await, want);
    tcp.assert_nothing_queued().await;
    let left = ws.next_with("left").await;
    assert_eq!(left["left"]["reason"], "MEMBER_CHANGE_REMOVED");
    assert_eq!(left["left"]["by"], "ann");
    let pong = ws.call(77, serde_json::json!({"ping": {"nonce": "7"}})).await;
    assert!(pong.get("pong").is_some(), "nothing between Left and the pong: {pong}");
    // The slow session now reads: messages up to the removal at most, then
    // Left, then nothing more.
    let mut last_seq = 0;
    loop {
        let env = slow.recv().await;
        match env.body {
            Some(Body::Message(m)) => {
                assert!(m.seq <= head, "fed past the removal: seq {} > {head}", m.seq);
                assert!(m.seq > last_seq);
                last_seq = m.seq;
            }
            Some(Body::Left(l)) => {
                assert_eq!(l, want);
                break;
            }
            Some(Body::Typing(_)) => panic!("typing after the removal"),
            _ => {}
        }
    }
    slow.assert_nothing_queued().await;
    // And nothing by any other path.
    let h = Body::History(proto::History { room: "r".into(), ..Default::default() });
    refused(&mut tcp, h, ErrorCode::Forbidden).await;
    let p = Body::Publish(proto::Publish { room: "r".into(), text: "still here?".into(), ..Default::default() });
    refused(&mut tcp, p, ErrorCode::Forbidden).await;
    // A resume cursor says why, instead of replaying.
    let mut again = s.raw().await;
    let w = again.hello(&s.token("bob"), vec![proto::Cursor { room: "r".into(), after_seq: 1 }]).await;
    assert!(w.rooms.is_empty());
    assert_eq!(next_left(&mut again).await, want);
    again.assert_nothing_queued().await;
    // A public room may be joined again after a removal.
    tcp.join("r").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_keeps_a_user_out_until_unbanned() {
    let s = TestServer::start().await;
    let (mut ann, _) = s.raw_user("ann").await;
    info(&mut ann, create("r", RoomKind::Public, &[])).await;
    let mut watch = s.raw_member("cat", "r").await;
    let mut eve = s.raw_member("eve", "r").await;
    info(&mut ann, ban("r", "eve")).await;
    let l = next_left(&mut eve).await;
    assert_eq!((l.reason, l.by.as_str()), (MemberChange::Banned as i32, "ann"));
    let u = next_update(&mut watch, MemberChange::Banned).await;
    assert_eq!(u.user, "eve");
    refused(&mut eve, join("r"), ErrorCode::Forbidden).await;
    refused(&mut eve, get("r"), ErrorCode::Forbidden).await;
    let dir = eve.request(Body::ListRooms(proto::ListRooms::default())).await;
    assert!(matches!(dir, Body::RoomList(ref l) if l.rooms.is_empty()), "hidden from the banned: {dir:?}");
    // Banning again changes nothing; unbanning lets eve back in.
    info(&mut ann, ban("r", "eve")).await;
    info(&mut ann, unban("r", "eve")).await;
    next_update(&mut watch, MemberChange::Unbanned).await;
    eve.join("r").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_of_a_private_room_needs_a_new_invitation() {
    let s = TestServer::start().await;
    let (mut ann, _) = s.raw_user("ann").await;
    let (mut bob, _) = s.raw_user("bob").await;
    info(&mut ann, create("p", RoomKind::Private, &["bob"])).await;
    bob.join("p").await;
    info(&mut ann, remove("p", "bob")).await;
    next_left(&mut bob).await;
    refused(&mut bob, join("p"), ErrorCode::Forbidden).await;
    info(&mut ann, invite("p", "bob")).await;
    // Withdrawing an invitation with RemoveMember tells the invitee.
    info(&mut ann, remove("p", "bob")).await;
    let l = next_left(&mut bob).await;
    assert_eq!(l.reason, MemberChange::Removed as i32);
    refused(&mut bob, join("p"), ErrorCode::Forbidden).await;
    info(&mut ann, invite("p", "bob")).await;
    bob.join("p").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ownership_is_handed_on_and_inherited() {
    let s = TestServer::start().await;
    let (mut ann, _) = s.raw_user("ann").await;
    let mut bob = s.raw_member("bob", "r").await;
    assert_eq!(bob.request(get("r")).await, Body::RoomInfo(info(&mut bob, get("r")).await));
    let mut cat = s.raw_member("cat", "r").await;
    ann.join("r").await;
    // bob joined first: bob owns it. Hand it to cat.
    let i = info(&mut bob, set_role("r", "cat", Role::Owner)).await;
    assert_eq!((i.owner.as_str(), i.my_role), ("cat", Role::Admin as i32));
    let u = next_update(&mut ann, MemberChange::RoleChanged).await;
    assert_eq!((u.user.as_str(), u.role), ("cat", Role::Owner as i32));
    // cat leaves: the longest-standing admin (bob) inherits.
    let l = match cat.request(Body::Leave(proto::Leave { room: "r".into() })).await {
        Body::Left(l) => l,
        other => panic!("{other:?}"),
    };
    assert_eq!((l.reason, l.by.as_str()), (MemberChange::Left as i32, "cat"));
    let i = info(&mut ann, get("r")).await;
    assert_eq!((i.owner.as_str(), i.member_count), ("bob", 2));
    bob.request(Body::Leave(proto::Leave { room: "r".into() })).await;
    // No admin left: the longest-standing member (ann).
    let i = info(&mut ann, get("r")).await;
    assert_eq!((i.owner.as_str(), i.my_role), ("ann", Role::Owner as i32));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_lists_public_rooms_by_name_or_title_in_pages() {
    let s = TestServer::start().await;
    let (mut ann, _) = s.raw_user("ann").await;
    for i in 0..5 {
        info(&mut ann, create(&format!("rust-{i}"), RoomKind::Public, &[])).await;
    }
    info(&mut ann, create("hidden", RoomKind::Private, &[])).await;
    let title = Body::CreateRoom(proto::CreateRoom {
        room: "lobby".into(),
        title: "All things RUST".into(),
        ..Default::default()
    });
    info(&mut ann, title).await;
    ann.join("dm:ann:bob").await;
    let (mut bob, _) = s.raw_user("bob").await;
    let mut names = Vec::new();
    let mut after = String::new();
    loop {
        let l = Body::ListRooms(proto::ListRooms { query: "rust".into(), after_room: after.clone(), limit: 2 });
        let Body::RoomList(page) = bob.request(l).await else { panic!("room_list expected") };
        names.extend(page.rooms.iter().map(|r| r.room.clone()));
        if !page.has_more {
            break;
        }
        after = page.rooms.last().unwrap().room.clone();
    }
    assert_eq!(names, ["lobby", "rust-0", "rust-1", "rust-2", "rust-3", "rust-4"]);
    let Body::RoomList(all) = bob.request(Body::ListRooms(proto::ListRooms::default())).await else { panic!() };
    assert_eq!(all.rooms.len(), 6, "no private or direct room: {:?}", all.rooms);
    // Members of a public room are listed to anyone, in pages.
    for u in ["cat", "dan", "eve"] {
        s.raw_member(u, "rust-0").await;
    }
    let page = Body::ListMembers(proto::ListMembers { room: "rust-0".into(), after_user: "ann".into(), limit: 2 });
    let Body::MemberPage(p) = bob.request(page).await else { panic!() };
    assert_eq!(p.members.iter().map(|m| m.user.as_str()).collect::<Vec<_>>(), ["cat", "dan"]);
    assert!(p.has_more);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_roles_bans_and_invitations_survive_a_restart() {
    let s = TestServer::start().await;
    let (mut ann, _) = s.raw_user("ann").await;
    let create = Body::CreateRoom(proto::CreateRoom {
        room: "p".into(),
        kind: RoomKind::Private as i32,
        title: "Title".into(),
        topic: "Topic".into(),
        invite: vec!["bob".into(), "cat".into()],
    });
    info(&mut ann, create).await;
    let cat = s.raw_member("cat", "p").await;
    info(&mut ann, set_role("p", "cat", Role::Admin)).await;
    info(&mut ann, ban("p", "eve")).await;
    let mut dan = s.raw_member("dan", "pub").await;
    let mut zed = s.raw_member("zed", "pub").await;
    info(&mut dan, remove("pub", "zed")).await;
    next_left(&mut zed).await;
    drop((cat.writer, dan.writer));
    let dir = s.stop().await.unwrap();

    let s = TestServer::start_in(dir.path(), |_| {}).await;
    let (_, w) = s.raw_user("ann").await;
    let i = w.rooms[0].info.clone().unwrap();
    assert_eq!(
        (i.kind, i.title.as_str(), i.topic.as_str(), i.member_count, i.my_role),
        (RoomKind::Private as i32, "Title", "Topic", 2, Role::Owner as i32)
    );
    let (_, w) = s.raw_user("cat").await;
    assert_eq!(w.rooms[0].info.as_ref().unwrap().my_role, Role::Admin as i32);
    let (mut bob, w) = s.raw_user("bob").await;
    assert_eq!(w.invites.iter().map(|i| (i.room.as_str(), i.by.as_str())).collect::<Vec<_>>(), [("p", "ann")]);
    bob.join("p").await;
    let (mut eve, _) = s.raw_user("eve").await;
    refused(&mut eve, join("p"), ErrorCode::Forbidden).await;
    let (mut zed, w) = s.raw_user("zed").await;
    assert!(w.rooms.is_empty(), "a removed user stays removed");
    let mut again = s.raw().await;
    again.hello(&s.token("zed"), vec![proto::Cursor { room: "pub".into(), after_seq: 0 }]).await;
    let l = next_left(&mut again).await;
    assert_eq!((l.reason, l.by.as_str()), (MemberChange::Removed as i32, "dan"));
    zed.join("pub").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moderation_is_counted_and_shown_to_the_operator() {
    const ADMIN: &str = "an-admin-token-0123456789";
    let s = TestServer::start_with(|c| c.admin_token = Some(ADMIN.into())).await;
    let (mut ann, _) = s.raw_user("ann").await;
    info(&mut ann, create("r", RoomKind::Private, &["bob"])).await;
    info(&mut ann, ban("r", "eve")).await;
    info(&mut ann, ban("r", "mal")).await;
    let m = scrape_metrics(&s.http).await;
    assert_eq!(metric(&m, "chatd_moderation_total{action=\"ban\"}"), 2.0);
    assert_eq!(metric(&m, "chatd_moderation_total{action=\"create\"}"), 1.0);
    let (status, v) = admin_get(&s.http, "/admin/rooms/r", Some(ADMIN)).await;
    assert_eq!(status, 200, "{v}");
    let room = &v;
    assert_eq!(room["kind"], "private", "{v}");
    assert_eq!(room["owner"], "ann");
    assert_eq!(room["members"], 1);
    assert_eq!(room["banned"], 2);
    assert_eq!(room["pending_invites"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_written_before_roles_opens_with_public_rooms_and_their_oldest_posters_as_owners() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-format-2.tgz");
    let status = std::process::Command::new("tar").arg("xzf").arg(&fixture).arg("-C").arg(tmp.path()).status().unwrap();
    assert!(status.success(), "tar extracts {}", fixture.display());
    let s = TestServer::start_in(&tmp.path().join("data"), |_| {}).await;
    let (mut ann, w) = s.raw_user("ann").await;
    let rooms: Vec<_> = w
        .rooms
        .iter()
        .map(|r| {
            let i = r.info.as_ref().unwrap();
            (r.room.as_str(), r.head_seq, i.kind, i.owner.as_str(), i.my_role, i.member_count)
        })
        .collect();
    let (public, direct) = (RoomKind::Public as i32, RoomKind::Direct as i32);
    let (owner, member) = (Role::Owner as i32, Role::Member as i32);
    assert_eq!(rooms, [("dm:ann:cat", 1, direct, "", member, 2), ("general", 3, public, "bob", member, 3)]);
    let (_, w) = s.raw_user("cat").await;
    let quiet = w.rooms.iter().find(|r| r.room == "quiet").unwrap().info.clone().unwrap();
    assert_eq!((quiet.kind, quiet.my_role), (public, owner));
    // The log is as it was, and the owner's powers work.
    let texts: Vec<_> = ann.history_all("general").await.into_iter().map(|m| m.text).collect();
    assert_eq!(texts, ["bob was first", "ann second", "cat third"]);
    let mut bob = s.raw_member("bob", "general").await;
    info(&mut bob, set_role("general", "ann", Role::Admin)).await;
    info(&mut ann, ban("general", "cat")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_and_welcome_fit_the_frame_size_however_long_topics_and_lists_get() {
    const MAX: usize = 8192;
    let s = TestServer::start_with(|c| c.max_frame_bytes = MAX).await;
    let (mut ann, _) = s.raw_user("ann").await;
    // Twenty rooms with 1,024-character topics of 3-byte characters (3 KiB
    // each), bob invited to all of them.
    let topic = "€".repeat(1024);
    for i in 0..20 {
        let c = proto::CreateRoom {
            room: format!("long-{i:02}"),
            topic: topic.clone(),
            invite: vec!["bob".into()],
            ..Default::default()
        };
        info(&mut ann, Body::CreateRoom(c)).await;
    }
    // The directory pages by size as well as by count.
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let l = proto::ListRooms { query: String::new(), after_room: after.clone(), limit: 0 };
        let Body::RoomList(page) = ann.request(Body::ListRooms(l)).await else { panic!("room_list") };
        assert!(prost::Message::encoded_len(&page) <= MAX, "a page fits a frame");
        assert!(!page.rooms.is_empty());
        seen.extend(page.rooms.iter().map(|r| r.room.clone()));
        if !page.has_more {
            break;
        }
        after = page.rooms.last().unwrap().room.clone();
    }
    assert_eq!(seen.len(), 20, "every room, over several pages");
    // Bob's Welcome fits; the invitations that did not fit follow as pushes.
    let mut bob = s.raw().await;
    let w = bob.hello(&s.token("bob"), vec![]).await;
    assert!(prost::Message::encoded_len(&w) <= MAX);
    let mut invited: Vec<String> = w.invites.iter().map(|i| i.room.clone()).collect();
    while invited.len() < 20 {
        let i = bob.next_push(|b| if let Body::Invitation(i) = b { Some(i) } else { None }).await;
        invited.push(i.room);
    }
    invited.sort();
    assert_eq!(invited, (0..20).map(|i| format!("long-{i:02}")).collect::<Vec<_>>());
    // And so does the Welcome of a member of all of them: topics go first.
    for i in 0..20 {
        bob.join(&format!("long-{i:02}")).await;
    }
    let (_, w) = s.raw_user("bob").await;
    assert_eq!(w.rooms.len(), 20);
    assert!(prost::Message::encoded_len(&w) <= MAX);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_room_takes_a_bounded_list_of_invitations() {
    let s = TestServer::start().await;
    let (mut ann, _) = s.raw_user("ann").await;
    let many: Vec<String> = (0..101).map(|i| format!("u{i}")).collect();
    let c = proto::CreateRoom { room: "big".into(), invite: many, ..Default::default() };
    refused(&mut ann, Body::CreateRoom(c), ErrorCode::BadRequest).await;
    refused(&mut ann, get("big"), ErrorCode::NotFound).await;
    let hundred: Vec<String> = (0..100).map(|i| format!("u{}", i % 50)).collect();
    let c = proto::CreateRoom { room: "big".into(), invite: hundred, ..Default::default() };
    info(&mut ann, Body::CreateRoom(c)).await;
    let (_, w) = s.raw_user("u7").await;
    assert_eq!(w.invites.len(), 1, "duplicates in the list are one invitation");
}
