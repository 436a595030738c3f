//! The server API for application backends (api/README.md), end to end: a
//! real HTTP client as the backend, real chat clients as the users on the
//! other side.

use std::collections::BTreeSet;
use std::time::Duration;

use chatd::proto::{self, Body, CloseReason, ErrorCode, MemberChange};
use serde_json::{Value, json};

use crate::common::*;

const KEY: &str = "a-backend-key-0123456789";

/// A call with the key that must answer 200; returns the JSON.
async fn ok(s: &TestServer, method: &str, path: &str, body: Value) -> Value {
    // `null`: no body (GET and DELETE take none).
    let body = if body.is_null() { String::new() } else { body.to_string() };
    let (status, _, v) = api_call(&s.http, Some(KEY), method, path, Some(&body)).await;
    assert_eq!(status, 200, "{method} {path} {body}: {v}");
    v
}

/// A call with the key that must fail with `status` and `code`.
async fn fails(s: &TestServer, method: &str, path: &str, body: &str, status: u16, code: ErrorCode) -> String {
    let (got, _, v) = api_call(&s.http, Some(KEY), method, path, Some(body)).await;
    assert_eq!(got, status, "{method} {path} {body}: {v}");
    assert_eq!(v["code"], code.as_str_name(), "{v}");
    v["message"].as_str().unwrap_or_default().to_string()
}

async fn with_api() -> TestServer {
    TestServer::start_with(|c| c.api_key = Some(KEY.into())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_off_without_a_key_and_refuses_a_wrong_one() {
    let off = TestServer::start().await;
    let (status, _, v) = api_call(&off.http, Some(KEY), "GET", "/api/v1/rooms/general", None).await;
    assert_eq!((status, &v["code"]), (404, &json!("ERROR_CODE_NOT_FOUND")), "{v}");
    let s = with_api().await;
    for key in [None, Some("wrong-key-0123456789012"), Some("a-backend-key-012345678")] {
        let (status, _, v) = api_call(&s.http, key, "GET", "/api/v1/rooms/general", None).await;
        assert_eq!((status, &v["code"]), (401, &json!("ERROR_CODE_UNAUTHENTICATED")), "{key:?}: {v}");
    }
    let (status, _, v) = api_call(&s.http, Some(KEY), "GET", "/api/v1/nothing", None).await;
    assert_eq!(status, 404, "{v}");
    let (status, _, _) = api_call(&s.http, Some(KEY), "GET", "/api/v2/rooms", None).await;
    assert_eq!(status, 404);
    let m = scrape_metrics(&s.http).await;
    assert!(
        metric(&m, "chatd_api_calls_total{endpoint=\"/api/v1/rooms/{room}\",method=\"GET\",status=\"401\"}") >= 3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_creates_a_private_room_adds_people_and_posts_notices() {
    let s = with_api().await;
    let (mut ann, _) = s.raw_user("ann").await;
    let (mut bob, _) = s.raw_user("bob").await;
    let (mut carol, _) = s.raw_user("carol").await;
    let room = ok(
        &s,
        "POST",
        "/api/v1/rooms",
        json!({"room": "order-42", "kind": "ROOM_KIND_PRIVATE", "title": "Order 42", "owner": "ann", "invite": ["carol"]}),
    )
    .await;
    assert_eq!((room["owner"].as_str(), room["memberCount"].as_u64()), (Some("ann"), Some(1)), "{room}");
    let j = ann.next_push(|b| if let Body::Joined(j) = b { Some(j) } else { None }).await;
    assert_eq!(j.state.unwrap().info.unwrap().my_role, proto::Role::Owner as i32);
    let inv = carol.next_push(|b| if let Body::Invitation(i) = b { Some(i) } else { None }).await;
    assert_eq!((inv.room.as_str(), inv.by.as_str()), ("order-42", ""), "invited by the system");

    // Added directly, as an admin: bob's open session is in at once.
    ok(&s, "PUT", "/api/v1/rooms/order-42/members/bob", json!({"role": "ROLE_ADMIN"})).await;
    let j = bob.next_push(|b| if let Body::Joined(j) = b { Some(j) } else { None }).await;
    assert_eq!(j.state.unwrap().info.unwrap().my_role, proto::Role::Admin as i32);
    let u = ann
        .next_push(|b| match b {
            Body::RoomUpdate(u) if u.user == "bob" => Some(u),
            _ => None,
        })
        .await;
    assert_eq!((u.change, u.by.as_str()), (MemberChange::Joined as i32, ""));

    // A system notice: sender "", idempotent by clientMsgId, durable.
    let post = json!({"clientMsgId": "shipped-42", "text": "your order has shipped"});
    let ack = ok(&s, "POST", "/api/v1/rooms/order-42/messages", post.clone()).await;
    assert_eq!((ack["seq"].as_str(), ack.get("duplicate")), (Some("1"), None), "{ack}");
    let m = bob.next_message().await;
    assert_eq!((m.sender.as_str(), m.text.as_str(), m.seq), ("", "your order has shipped", 1));
    let again = ok(&s, "POST", "/api/v1/rooms/order-42/messages", post).await;
    assert_eq!((again["seq"].as_str(), again["duplicate"].as_bool()), (Some("1"), Some(true)));
    // Acting as a user: with that user's rights; a reply that mentions.
    let reply = json!({"text": "on behalf of ann", "actAs": "ann", "replyTo": "1", "mentions": ["bob"]});
    ok(&s, "POST", "/api/v1/rooms/order-42/messages", reply).await;
    let m = bob.next_message().await;
    assert_eq!((m.sender.as_str(), m.reply_to, m.mentions), ("ann", 1, vec!["bob".to_string()]));
    let past = r#"{"text": "x", "replyTo": 99}"#;
    fails(&s, "POST", "/api/v1/rooms/order-42/messages", past, 400, ErrorCode::BadRequest).await;
    let not_member = r#"{"text": "hi", "actAs": "dave"}"#;
    fails(&s, "POST", "/api/v1/rooms/order-42/messages", not_member, 403, ErrorCode::Forbidden).await;
    fails(&s, "GET", "/api/v1/rooms/order-42?actAs=dave", "", 403, ErrorCode::Forbidden).await;
    let beyond = r#"{"role": "ROLE_OWNER", "actAs": "bob"}"#;
    fails(&s, "PUT", "/api/v1/rooms/order-42/members/carol", beyond, 403, ErrorCode::Forbidden).await;

    // Reading: details, members, history.
    let info = ok(&s, "PATCH", "/api/v1/rooms/order-42", json!({"topic": "Delivery on Friday"})).await;
    assert_eq!(info["topic"], "Delivery on Friday");
    // Retention is the owner's (the system's) to set, not an admin's.
    let keep = json!({"retentionMaxMessages": "1000", "retentionMaxAgeMs": "86400000"});
    let info = ok(&s, "PATCH", "/api/v1/rooms/order-42", keep).await;
    assert_eq!(
        (info["retentionMaxMessages"].as_str(), info["retentionMaxAgeMs"].as_str()),
        (Some("1000"), Some("86400000"))
    );
    let as_admin = r#"{"retentionMaxMessages": 5, "actAs": "bob"}"#;
    fails(&s, "PATCH", "/api/v1/rooms/order-42", as_admin, 403, ErrorCode::Forbidden).await;
    let members = ok(&s, "GET", "/api/v1/rooms/order-42/members", json!(null)).await;
    let names: Vec<&str> = members["members"].as_array().unwrap().iter().map(|m| m["user"].as_str().unwrap()).collect();
    assert_eq!(names, ["ann", "bob"]);
    let page = ok(&s, "GET", "/api/v1/rooms/order-42/messages?forward=true&limit=10", json!(null)).await;
    let texts: Vec<&str> = page["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["your order has shipped", "on behalf of ann"]);

    // An offline member gets the notice on resume.
    drop(carol);
    let (_, w) = s.raw_user("carol").await;
    assert_eq!(w.invites.len(), 1);
    let mut carol = s.raw_member("carol", "order-42").await;
    let mut dan = s.raw().await;
    ok(&s, "PUT", "/api/v1/rooms/order-42/members/dan", json!({})).await;
    dan.hello(&s.token("dan"), vec![proto::Cursor { room: "order-42".into(), after_seq: 0 }]).await;
    assert_eq!(dan.next_message().await.text, "your order has shipped");

    // Removal and bans through the API.
    ok(&s, "DELETE", "/api/v1/rooms/order-42/members/carol?reason=closed", json!(null)).await;
    let l = carol.next_push(|b| if let Body::Left(l) = b { Some(l) } else { None }).await;
    assert_eq!((l.reason, l.by.as_str()), (MemberChange::Removed as i32, ""));
    ok(&s, "PUT", "/api/v1/rooms/order-42/bans/carol", json!({"reason": "fraud"})).await;
    expect_error(&carol.request(Body::Join(proto::Join { room: "order-42".into() })).await, ErrorCode::Forbidden);
    ok(&s, "DELETE", "/api/v1/rooms/order-42/bans/carol", json!(null)).await;
    // The system may remove even the owner: ownership passes on.
    let info = ok(&s, "DELETE", "/api/v1/rooms/order-42/members/ann", json!(null)).await;
    assert_eq!(info["owner"], "bob", "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let s = TestServer::start_with(|c| {
        c.api_key = Some(KEY.into());
        c.max_frame_bytes = 4096;
    })
    .await;
    ok(&s, "POST", "/api/v1/rooms", json!({"room": "r"})).await;
    let cases: [(&str, &str, &str, u16, ErrorCode); 12] = [
        ("POST", "/api/v1/rooms", "{not json", 400, ErrorCode::BadRequest),
        ("POST", "/api/v1/rooms", r#"{"room": "x", "colour": "red"}"#, 400, ErrorCode::BadRequest),
        ("POST", "/api/v1/rooms", r#"{"room": 7}"#, 400, ErrorCode::BadRequest),
        ("POST", "/api/v1/rooms", r#"{"room": "x", "kind": "ROOM_KIND_SQUARE"}"#, 400, ErrorCode::BadRequest),
        ("POST", "/api/v1/rooms", r#"{"room": "r"}"#, 409, ErrorCode::AlreadyExists),
        ("GET", "/api/v1/rooms/nowhere", "", 404, ErrorCode::NotFound),
        ("GET", "/api/v1/rooms/bad%20name", "", 400, ErrorCode::BadRequest),
        ("GET", "/api/v1/rooms/r?actAs=not%20a%20user", "", 400, ErrorCode::BadRequest),
        ("GET", "/api/v1/rooms/r?colour=red", "", 400, ErrorCode::BadRequest),
        ("PUT", "/api/v1/rooms/r/members/not%20a%20user", "{}", 400, ErrorCode::BadRequest),
        ("POST", "/api/v1/rooms/nowhere/messages", r#"{"text": "x"}"#, 404, ErrorCode::NotFound),
        ("POST", "/api/v1/tokens", r#"{"user": "ann", "ttl": "forever"}"#, 400, ErrorCode::BadRequest),
    ];
    for (method, path, body, status, code) in cases {
        fails(&s, method, path, body, status, code).await;
    }
    let big = json!({"text": "x".repeat(5000)}).to_string();
    fails(&s, "POST", "/api/v1/rooms/r/messages", &big, 413, ErrorCode::TooLarge).await;
    // A body within the cap whose message, with its room, sender, seq and
    // time, would not fit the frame size clients were promised.
    let near = json!({"text": "x".repeat(4079)}).to_string();
    assert!(near.len() <= 4096);
    fails(&s, "POST", "/api/v1/rooms/r/messages", &near, 413, ErrorCode::TooLarge).await;
    // Parameters where the endpoint does not read them (it would run as the
    // system) are refused.
    let as_ann = r#"{"text": "x"}"#;
    fails(&s, "POST", "/api/v1/rooms/r/messages?actAs=ann", as_ann, 400, ErrorCode::BadRequest).await;
    fails(&s, "DELETE", "/api/v1/rooms/r/members/bob", r#"{"actAs": "ann"}"#, 400, ErrorCode::BadRequest).await;
    // Nothing changed: the room is as created, with no messages.
    let page = ok(&s, "GET", "/api/v1/rooms/r/messages", json!(null)).await;
    assert_eq!(page["headSeq"].as_str().unwrap_or("0"), "0", "{page}");
    let (_, w) = s.raw_user("ann").await;
    assert!(w.rooms.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_is_rate_limited_with_a_retry_after() {
    let s = TestServer::start_with(|c| {
        c.api_key = Some(KEY.into());
        c.api_rate_per_sec = 3;
    })
    .await;
    let mut limited = None;
    for _ in 0..10 {
        let (status, head, v) = api_call(&s.http, Some(KEY), "GET", "/api/v1/rooms/r", None).await;
        if status == 429 {
            limited = Some((head, v));
            break;
        }
    }
    let (head, v) = limited.expect("a 429 within ten calls at 3 per second");
    assert_eq!(v["code"], "ERROR_CODE_RATE_LIMITED");
    assert!(head.to_ascii_lowercase().contains("retry-after: 1"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_out_everywhere_closes_every_session_and_refuses_older_tokens_across_a_restart() {
    let s = with_api().await;
    let now = chatd::auth::unix_now();
    let old = mint_token(&s.dir, "bob", Duration::from_secs(3600), now - 10);
    let mut tcp = Raw::connect_as(&s.addr, &old).await;
    let mut ws = Ws::connect(&s.http).await;
    ws.hello(&old).await;
    let out = ok(&s, "POST", "/api/v1/users/bob/disconnect", json!({"revoke": true})).await;
    assert_eq!(out["sessions"], 2, "{out}");
    assert_eq!(tcp.skip_to_go_away().await, CloseReason::AuthExpired);
    assert!(tcp.closed().await);
    let g = ws.next_with("goAway").await;
    assert_eq!(g["goAway"]["reason"], "CLOSE_REASON_AUTH_EXPIRED");
    // The old token is refused; one minted through the API works.
    let mut again = s.raw().await;
    again.send_hello(&old, vec![]).await;
    again.expect_error(ErrorCode::Unauthenticated).await;
    assert_eq!(again.expect_go_away().await, CloseReason::AuthFailed);
    let minted = ok(&s, "POST", "/api/v1/tokens", json!({"user": "bob", "ttl": "1h"})).await;
    let fresh = minted["token"].as_str().unwrap().to_string();
    Raw::connect_as(&s.addr, &fresh).await.ping().await;
    // Without revoke: the sessions close, the token still works.
    let out = ok(&s, "POST", "/api/v1/users/bob/disconnect", json!({})).await;
    assert_eq!(out["revoked"], false);
    // Across a restart.
    let dir = s.stop().await.unwrap();
    let s = TestServer::start_in(dir.path(), |c| c.api_key = Some(KEY.into())).await;
    let mut again = s.raw().await;
    again.send_hello(&old, vec![]).await;
    again.expect_error(ErrorCode::Unauthenticated).await;
    Raw::connect_as(&s.addr, &fresh).await.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_description_matches_the_routes_that_exist() {
    let spec: Value = serde_json::from_str(
        &std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("api/openapi.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(spec["openapi"].as_str().map(|v| v.starts_with("3.")), Some(true));
    let described: BTreeSet<(String, String)> = spec["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            let path = path.strip_prefix("/api/v1").unwrap_or(path).to_string();
            let methods = ops.as_object().unwrap().keys().filter(|k| *k != "parameters");
            methods.map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let routed: BTreeSet<(String, String)> =
        chatd::http::api::ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(described, routed, "api/openapi.json and the routes");
    // Every route answers as an endpoint (not "no such endpoint", not 405).
    let s = with_api().await;
    for (method, path) in chatd::http::api::ROUTES {
        let path = format!("/api/v1{}", path.replace("{room}", "r").replace("{user}", "u"));
        let (status, _, v) = api_call(&s.http, Some(KEY), method, &path, Some("{}")).await;
        assert_ne!(status, 405, "{method} {path}");
        let message = v["message"].as_str().unwrap_or_default();
        assert!(!message.contains("no such endpoint"), "{method} {path}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_one_log_line_with_the_key_the_acting_user_and_the_outcome() {
    let data = tempfile::tempdir().unwrap();
    let server = Process::start_with_env(
        data.path(),
        &["--log-format", "json", "--api-key", KEY, "--api-key-name", "shop-backend"],
        &[("RUST_LOG", "info")],
    );
    let (mut ann, _) = server.raw_user("ann").await;
    ann.join("lobby").await;
    let body = r#"{"text": "hello", "actAs": "ann"}"#;
    let (status, _, v) = api_call(&server.http, Some(KEY), "POST", "/api/v1/rooms/lobby/messages", Some(body)).await;
    assert_eq!(status, 200, "{v}");
    let line = server.wait_for_logs("the call's log line", |lines| {
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["fields"]["message"] == "server API call")
    });
    let f = &line["fields"];
    assert_eq!(
        (&f["key"], &f["act_as"], &f["status"], &f["endpoint"]),
        (&json!("shop-backend"), &json!("ann"), &json!(200), &json!("/api/v1/rooms/{room}/messages")),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systems_rooms_keys_and_tokens() {
    let s = with_api().await;
    // A room the system makes without an owner: joiners are members, an
    // owner is added; a role is changed by adding again.
    ok(&s, "POST", "/api/v1/rooms", json!({"room": "support"})).await;
    ok(&s, "POST", "/api/v1/rooms", json!({"room": "sales"})).await;
    // Their sessions stay open while their roles change.
    let _eve = s.raw_member("eve", "support").await;
    let (_ann, _) = s.raw_user("ann").await;
    let info = ok(&s, "PUT", "/api/v1/rooms/support/members/ann", json!({"role": "ROLE_OWNER"})).await;
    assert_eq!(info["owner"], "ann", "{info}");
    ok(&s, "PUT", "/api/v1/rooms/support/members/eve", json!({"role": "ROLE_ADMIN"})).await;
    let page = ok(&s, "GET", "/api/v1/rooms/support/members", json!(null)).await;
    let roles: Vec<(&str, &str)> = page["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["user"].as_str().unwrap(), m["role"].as_str().unwrap()))
        .collect();
    assert_eq!(roles, [("ann", "ROLE_OWNER"), ("eve", "ROLE_ADMIN")]);
    // The system's clientMsgIds are per room.
    ok(&s, "PUT", "/api/v1/rooms/sales/members/eve", json!({})).await;
    let a = ok(&s, "POST", "/api/v1/rooms/support/messages", json!({"clientMsgId": "n1", "text": "a"})).await;
    let b = ok(&s, "POST", "/api/v1/rooms/sales/messages", json!({"clientMsgId": "n1", "text": "b"})).await;
    assert_eq!((a["room"].as_str(), b["room"].as_str(), b.get("duplicate")), (Some("support"), Some("sales"), None));
    let again = ok(&s, "POST", "/api/v1/rooms/sales/messages", json!({"clientMsgId": "n1", "text": "b"})).await;
    assert_eq!(again["duplicate"], true);
    // A ttl written as a number in a string is seconds.
    let minted = ok(&s, "POST", "/api/v1/tokens", json!({"user": "eve", "ttl": "3600"})).await;
    let expires: u64 = minted["expiresAt"].as_str().unwrap().parse().unwrap();
    let now = chatd::auth::unix_now();
    assert!((now + 3590..=now + 3610).contains(&expires), "{minted}");
    fails(&s, "POST", "/api/v1/tokens", r#"{"user": "eve", "ttl": "213503982334602d"}"#, 400, ErrorCode::BadRequest)
        .await;
}
