//! The WebSocket adapter end to end: JSON and protobuf clients in the same
//! rooms as TCP clients, bad input, close codes, a slow WebSocket reader.

use chatd::proto::{self, Body, Envelope};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_client_and_a_tcp_client_see_the_same_room() {
    let s = TestServer::start().await;
    let mut web = Ws::connect(&s.http).await;
    let w = web.hello(&s.token("ann")).await;
    assert_eq!(w["id"], "1");
    assert_eq!(w["welcome"]["user"], "ann");
    let joined = web.join("mixed").await;
    assert_eq!(joined["joined"]["online"], json!(["ann"]));
    let mut tcp = s.raw_member("bob", "mixed").await;

    web.send_json(json!({"id": "3", "publish": {"room": "mixed", "clientMsgId": "w1", "text": "from the web"}})).await;
    // The publisher's own echo is fanned out before the ack is queued
    // (bob's presence may come first).
    let mut frames = Vec::new();
    while frames.len() < 2 {
        let v = web.json().await;
        if v.get("message").is_some() || v.get("publishAck").is_some() {
            frames.push(v);
        }
    }
    assert_eq!(frames[0]["message"]["seq"], "1", "{}", frames[0]);
    let ack = frames.pop().unwrap();
    assert_eq!((ack["id"].as_str(), ack["publishAck"]["seq"].as_str()), (Some("3"), Some("1")), "{ack}");
    let m = tcp.next_message().await;
    assert_eq!((m.seq, m.sender.as_str(), m.text.as_str(), m.client_msg_id.as_str()), (1, "ann", "from the web", "w1"));
    assert_eq!(ack["publishAck"]["tsMs"], m.ts_ms.to_string());

    let tcp_ack = tcp.publish("mixed", "from tcp").await;
    // The web client gets bob's message with the seq bob's ack gave.
    let v = web.next_with("message").await;
    assert_eq!((v["message"]["seq"].as_str(), v["message"]["sender"].as_str()), (Some("2"), Some("bob")));
    assert_eq!(tcp_ack.seq, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_messages_are_protobuf_and_the_reply_format_follows_the_client() {
    let s = TestServer::start().await;
    let mut ws = Ws::connect(&s.http).await;
    let hello = proto::Hello { protocol_version: 1, token: s.token("ann"), device: "bin".into(), resume: vec![] };
    ws.send_binary(&Envelope::new(1, Body::Hello(hello))).await;
    match ws.recv().await {
        Received::Binary(Envelope { id: 1, body: Some(Body::Welcome(w)) }) => assert_eq!(w.user, "ann"),
        other => panic!("expected a binary welcome, got {other:?}"),
    }
    // Text now: the reply is JSON.
    ws.send_json(json!({"id": "2", "ping": {"nonce": "77"}})).await;
    assert_eq!(ws.json().await, json!({"id": "2", "pong": {"nonce": "77"}}));
    // Binary again: binary reply.
    ws.send_binary(&Envelope::new(3, Body::Ping(proto::Ping { nonce: 5 }))).await;
    assert!(matches!(
        ws.recv().await,
        Received::Binary(Envelope { id: 3, body: Some(Body::Pong(proto::Pong { nonce: 5 })) })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_and_unknown_messages_are_bad_requests_and_the_socket_stays_open() {
    let s = TestServer::start().await;
    let mut ws = s.ws_user("ann").await;
    ws.send_text("{not json").await;
    let e = ws.json().await;
    assert_eq!(e["error"]["code"], "ERROR_CODE_BAD_REQUEST", "{e}");
    ws.send_text(r#"{"id":"4","teleport":{"to":"mars"}}"#).await;
    let e = ws.json().await;
    assert_eq!((e["id"].as_str(), e["error"]["code"].as_str()), (Some("4"), Some("ERROR_CODE_BAD_REQUEST")), "{e}");
    ws.send_text(r#"{"id":"5"}"#).await;
    assert_eq!(ws.json().await["error"]["code"], "ERROR_CODE_BAD_REQUEST");
    // Still open and serving.
    assert_eq!(ws.call(6, json!({"ping": {"nonce": "1"}})).await["pong"]["nonce"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_before_hello_closes() {
    let s = TestServer::start().await;
    let mut ws = Ws::connect(&s.http).await;
    ws.send_text("hello?").await;
    assert_eq!(ws.json().await["error"]["code"], "ERROR_CODE_BAD_REQUEST");
    assert_eq!(ws.json().await["goAway"]["reason"], "CLOSE_REASON_PROTOCOL_ERROR");
    assert!(matches!(ws.recv().await, Received::Closed(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_message_closes_with_1009() {
    let s = TestServer::start().await;
    let mut ws = s.ws_user("ann").await;
    ws.send_text("x".repeat(70_000)).await;
    assert_eq!(ws.json().await["error"]["code"], "ERROR_CODE_TOO_LARGE");
    assert_eq!(ws.json().await["goAway"]["reason"], "CLOSE_REASON_PROTOCOL_ERROR");
    match ws.recv().await {
        Received::Closed(code) => assert_eq!(code, Some(1009)),
        other => panic!("expected close 1009, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_protocol_violation_closes_with_1002() {
    let s = TestServer::start().await;
    // A hand-made handshake, then an unmasked client frame (RFC 6455 §5.1
    // requires clients to mask).
    let mut tcp = tokio::net::TcpStream::connect(&s.http).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        s.http
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    tcp.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
    // Server frames are unmasked: opcode 0x8 (close), then the code.
    let mut frame = [0u8; 4];
    tokio::time::timeout(WAIT, tcp.read_exact(&mut frame)).await.unwrap().unwrap();
    assert_eq!(frame[0], 0x88, "a close frame");
    assert_eq!(u16::from_be_bytes([frame[2], frame[3]]), 1002);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_websocket_reader_does_not_stall_the_room() {
    let s = TestServer::start_with(|c| {
        c.outbound_max_frames = 16;
        c.outbound_max_bytes = 64 * 1024;
    })
    .await;
    let mut slow = Ws::connect_small(&s.http).await;
    slow.hello(&s.token("slow")).await;
    slow.join("r").await;
    let (fast, mut fast_ev) = s.client("fast").await;
    fast.join("r").await.unwrap();
    let (publisher, _) = s.client("pub").await;
    publisher.join("r").await.unwrap();

    const N: u64 = 1500;
    let payload = bytes::Bytes::from(vec![b'z'; 8192]);
    let batch = (0..N).map(|i| proto::Publish {
        room: "r".into(),
        client_msg_id: format!("{i}"),
        data: payload.clone(),
        ..Default::default()
    });
    publish_pipelined(&publisher, batch, 128).await;
    assert_eq!(collect_messages(&mut fast_ev, N as usize).await.last().unwrap().seq, N, "the fast reader got all");
    let room = s.server.as_ref().unwrap().hub().room("r").unwrap();
    assert!(room.slow_consumer_events() > 0, "the WebSocket reader fell behind and was fed from the log");
    for seq in 1..=N {
        assert_eq!(slow.next_with("message").await["message"]["seq"], seq.to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_login_is_off_by_default() {
    let s = TestServer::start().await;
    let (status, _) = http_post(&s.http, "/dev/token?user=ann").await;
    assert_eq!(status, 404);
    let s = TestServer::start_with(|c| c.dev_auth = true).await;
    let (status, token) = http_post(&s.http, "/dev/token?user=ann").await;
    assert_eq!(status, 200);
    let mut ws = Ws::connect(&s.http).await;
    assert_eq!(ws.hello(token.trim()).await["welcome"]["user"], "ann");
    assert_eq!(http_post(&s.http, "/dev/token?user=bad%20name").await.0, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_login_answers_only_requests_addressed_to_a_loopback_name() {
    // DNS rebinding: a foreign name resolved to 127.0.0.1 reaches the
    // loopback listener, but its Host (and a browser's Origin) give it away.
    let s = TestServer::start_with(|c| c.dev_auth = true).await;
    let port = s.http.rsplit_once(':').unwrap().1;
    let post = |headers: String| {
        let http = s.http.clone();
        async move { http_raw(&http, "POST", "/dev/token?user=ann", &headers).await }
    };
    for refused in [
        format!("Host: evil.example:{port}\r\n"),
        format!("Host: localhost.evil.example:{port}\r\n"),
        String::new(),
        format!("Host: 127.0.0.1:{port}\r\nOrigin: http://evil.example\r\n"),
        format!("Host: localhost:{port}\r\nOrigin: null\r\n"),
    ] {
        let (status, _, body) = post(refused.clone()).await;
        // No Host at all may be refused by HTTP/1.1 itself (400) first.
        let expected = if refused.is_empty() { [400, 403] } else { [403, 403] };
        assert!(expected.contains(&status), "{refused:?}: {status} {body}");
        assert!(!body.starts_with("ey"), "{refused:?}: no token: {body}");
    }
    for allowed in [
        format!("Host: 127.0.0.1:{port}\r\n"),
        format!("Host: localhost:{port}\r\nOrigin: http://localhost:{port}\r\n"),
        format!("Host: [::1]:{port}\r\nOrigin: http://127.0.0.1:{port}\r\n"),
    ] {
        let (status, _, body) = post(allowed.clone()).await;
        assert_eq!(status, 200, "{allowed:?}: {body}");
        assert_eq!(body.trim().split('.').count(), 3, "{allowed:?}: a JWT: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_client_is_served_with_a_content_security_policy() {
    let s = TestServer::start().await;
    for path in ["/", "/app.js", "/chatd-client.js", "/style.css"] {
        let (status, head, _) = http_raw(&s.http, "GET", path, &format!("Host: {}\r\n", s.http)).await;
        assert_eq!(status, 200, "{path}");
        let head = head.to_ascii_lowercase();
        for expected in [
            "content-security-policy: default-src 'self'; script-src 'self'",
            "frame-ancestors 'none'",
            "x-frame-options: deny",
            "x-content-type-options: nosniff",
        ] {
            assert!(head.contains(expected), "{path}: no {expected:?} in\n{head}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_login_is_refused_on_a_public_address() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = test_config(tmp.path());
    c.dev_auth = true;
    c.http = "0.0.0.0:0".parse().unwrap();
    let err = chatd::server::Server::start(&c).await.err().expect("refused");
    assert!(err.to_string().contains("loopback"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_client_is_served_at_the_root() {
    let s = TestServer::start().await;
    let (status, body) = http_get(&s.http, "/").await;
    assert_eq!(status, 200);
    assert!(body.contains("<html") || body.contains("<!doctype") || body.contains("<!DOCTYPE"), "{body}");
    for path in ["/app.js", "/chatd-client.js", "/style.css"] {
        let (status, body) = http_get(&s.http, path).await;
        assert_eq!(status, 200, "{path}");
        assert!(!body.trim().is_empty(), "{path} is not empty");
    }
}
