//! Operations: metrics after a scripted session, admin endpoints and their
//! token, structured logs, the shutdown GoAway.
//!
//! Metrics are process-wide; nextest runs each test in its own process, and
//! the checks below compare against a scrape taken before the session.

use chatd::proto::{self, Body, CloseReason, ErrorCode};

use crate::common::*;

/// A raw client that counts the frames and bytes it receives.
struct Counted {
    raw: Raw,
    frames: u64,
    bytes: u64,
}

impl Counted {
    async fn user(s: &TestServer, user: &str) -> Counted {
        let mut c = Counted { raw: Raw::connect(&s.addr).await, frames: 0, bytes: 0 };
        let hello = proto::Hello { protocol_version: 1, token: s.token(user), device: "raw".into(), resume: vec![] };
        assert!(matches!(c.call(1, Body::Hello(hello)).await, Body::Welcome(_)));
        c
    }

    async fn recv(&mut self) -> proto::Envelope {
        let env = self.raw.recv().await;
        self.frames += 1;
        self.bytes += (chatd::codec::PREFIX_LEN + prost::Message::encoded_len(&env)) as u64;
        env
    }

    /// Sends a request and reads everything up to its reply.
    async fn call(&mut self, id: u64, body: Body) -> Body {
        self.raw.send(id, body).await;
        loop {
            let env = self.recv().await;
            if env.id == id {
                return env.body.expect("reply has a body");
            }
        }
    }
}

/// Live messages to an idle TCP subscriber are written from the fan-out,
/// not by the connection's writer: they must be counted all the same, for
/// the connection and in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frame_sent_is_counted_however_it_was_written() {
    let s = TestServer::start_with(|c| c.admin_token = Some(ADMIN.into())).await;
    let before = scrape_metrics(&s.http).await;
    let mut bob = Counted::user(&s, "bob").await;
    bob.call(2, Body::Join(proto::Join { room: "w".into() })).await;
    let mut ann = Counted::user(&s, "ann").await;
    ann.call(2, Body::Join(proto::Join { room: "w".into() })).await;
    for i in 0..20u64 {
        let p = proto::Publish {
            room: "w".into(),
            client_msg_id: format!("k{i}"),
            text: "x".repeat(i as usize),
            ..Default::default()
        };
        assert!(matches!(ann.call(10 + i, Body::Publish(p)).await, Body::PublishAck(_)));
    }
    let mut seen = 0;
    while seen < 20 {
        if let Some(Body::Message(_)) = bob.recv().await.body {
            seen += 1;
        }
    }
    // Whatever was sent before these replies has been read.
    for c in [&mut ann, &mut bob] {
        assert!(matches!(c.call(50, Body::Ping(proto::Ping::default())).await, Body::Pong(_)));
    }
    // A frame is counted once its write returns, which can be just after
    // the client read it (the Pong): wait, bounded, for the counts to agree.
    wait_for("the frames and bytes counted to agree with those received", Polling::DEFAULT, async || {
        let (status, v) = admin_get(&s.http, "/admin/connections", Some(ADMIN)).await;
        assert_eq!(status, 200);
        let after = scrape_metrics(&s.http).await;
        let delta = |k: &str| metric(&after, k) - metric(&before, k);
        let (got, want): (Vec<_>, Vec<_>) = [("ann", &ann), ("bob", &bob)]
            .into_iter()
            .map(|(user, c)| {
                let conn = v["connections"].as_array().unwrap().iter().find(|c| c["user"] == user).unwrap();
                ((conn["frames_out"].as_u64(), conn["bytes_out"].as_u64()), (Some(c.frames), Some(c.bytes)))
            })
            .unzip();
        let frames = (delta("chatd_frames_sent_total{transport=\"tcp\"}"), (ann.frames + bob.frames) as f64);
        let bytes = (delta("chatd_bytes_sent_total{transport=\"tcp\"}"), (ann.bytes + bob.bytes) as f64);
        if got == want && frames.0 == frames.1 && bytes.0 == bytes.1 {
            Ok(())
        } else {
            Err(format!(
                "ann, bob (frames, bytes) out: admin {got:?}, received {want:?}; \
                 in the metrics: frames {} for {}, bytes {} for {}",
                frames.0, frames.1, bytes.0, bytes.1
            ))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_scripted_session() {
    let s = TestServer::start().await;
    let before = scrape_metrics(&s.http).await;
    let mut ann = s.raw_member("ann", "m").await;
    let mut bob = s.raw_member("bob", "m").await;
    for i in 0..5 {
        let p =
            proto::Publish { room: "m".into(), client_msg_id: format!("k{i}"), text: "x".into(), ..Default::default() };
        ann.publish_message(p).await;
    }
    let dup = proto::Publish { room: "m".into(), client_msg_id: "k0".into(), ..Default::default() };
    assert!(ann.publish_message(dup).await.duplicate);
    expect_error(
        &bob.call(21, Body::History(proto::History { room: "elsewhere".into(), ..Default::default() })).await,
        ErrorCode::Forbidden,
    );
    assert!(matches!(
        bob.call(22, Body::History(proto::History { room: "m".into(), ..Default::default() })).await,
        Body::HistoryPage(_)
    ));
    let after = scrape_metrics(&s.http).await;
    let delta = |k: &str| metric(&after, k) - metric(&before, k);

    assert_eq!(delta("chatd_messages_published_total"), 5.0);
    assert_eq!(delta("chatd_publish_duplicates_total"), 1.0);
    assert_eq!(delta("chatd_messages_delivered_total"), 10.0, "5 messages x 2 sessions");
    assert_eq!(delta("chatd_errors_total{code=\"FORBIDDEN\"}"), 1.0);
    assert_eq!(metric(&after, "chatd_connections{transport=\"tcp\"}"), 2.0);
    assert_eq!(metric(&after, "chatd_sessions"), 2.0);
    assert_eq!(metric(&after, "chatd_users_online"), 2.0);
    assert_eq!(metric(&after, "chatd_rooms_active"), 1.0);
    assert!(delta("chatd_frames_received_total{transport=\"tcp\"}") >= 11.0);
    assert!(delta("chatd_bytes_sent_total{transport=\"tcp\"}") > 0.0);
    assert_eq!(delta("chatd_publish_ack_seconds_count"), 5.0);
    assert_eq!(delta("chatd_publish_delivery_seconds_count"), 5.0);
    assert_eq!(delta("chatd_history_read_seconds_count"), 1.0);
    assert!(delta("chatd_commit_batch_size_count") >= 1.0, "group commits were measured");
    assert!(delta("chatd_commit_sync_seconds_count") >= 1.0, "fsyncs were timed");
    assert!(metric(&after, "chatd_publish_ack_seconds_bucket{le=\"+Inf\"}") >= 5.0, "a real histogram");
    assert_eq!(metric(&after, "chatd_storage_healthy"), 1.0);
    assert!(metric(&after, "chatd_storage_bytes") > 0.0);
    assert_eq!(metric(&after, "chatd_durability_info{mode=\"fsync\"}"), 1.0);

    drop(ann);
    drop(bob);
    wait_until("the connections gauge to return to 0", async || {
        metric(&scrape_metrics(&s.http).await, "chatd_connections{transport=\"tcp\"}") == 0.0
    })
    .await;
    let end = scrape_metrics(&s.http).await;
    assert_eq!(metric(&end, "chatd_sessions"), 0.0);
    assert_eq!(metric(&end, "chatd_users_online"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_is_exported() {
    let s = TestServer::start().await;
    // Make the lazily-created series exist.
    let (c, _) = s.client("ann").await;
    c.join("r").await.unwrap();
    c.publish("r", "x").await.unwrap();
    let (_, body) = http_get(&s.http, "/metrics").await;
    for name in chatd::metrics::ALL {
        let lazily_labelled = [
            chatd::metrics::ERRORS,
            chatd::metrics::CLOSES,
            chatd::metrics::RATE_LIMITED,
            chatd::metrics::MODERATION,
            chatd::metrics::API_CALLS,
        ];
        if lazily_labelled.contains(name) || chatd::metrics::CLUSTER_ONLY.contains(name) {
            continue;
        }
        assert!(body.contains(name), "{name} is missing from /metrics");
    }
}

const ADMIN: &str = "an-admin-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_need_the_admin_token() {
    let off = TestServer::start().await;
    assert_eq!(admin_get(&off.http, "/admin/rooms", Some(ADMIN)).await.0, 404, "off without a configured token");

    let s = TestServer::start_with(|c| c.admin_token = Some(ADMIN.into())).await;
    let user_jwt = s.token("ann");
    for path in ["/admin/rooms", "/admin/rooms/r", "/admin/connections"] {
        assert_eq!(admin_get(&s.http, path, None).await.0, 401, "{path} without a token");
        assert_eq!(admin_get(&s.http, path, Some("wrong-token-wrong-token")).await.0, 401, "{path} with a wrong token");
        assert_eq!(admin_get(&s.http, path, Some(&user_jwt)).await.0, 401, "{path} with a user's token");
    }
    let (c, _) = s.client("ann").await;
    c.join("busy").await.unwrap();
    c.join("quiet").await.unwrap();
    for i in 0..3 {
        c.publish("busy", &format!("{i}")).await.unwrap();
    }
    let (status, v) = admin_get(&s.http, "/admin/rooms?top=1", Some(ADMIN)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["total"], 2);
    let top = &v["rooms"][0];
    assert_eq!(
        (top["room"].as_str(), top["head_seq"].as_u64(), top["members"].as_u64()),
        (Some("busy"), Some(3), Some(1))
    );
    assert!(top["messages_per_sec"].as_f64().unwrap() > 0.0);
    assert!(top["p99_publish_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(top["online_sessions"], 1);
    let (status, v) = admin_get(&s.http, "/admin/rooms/busy", Some(ADMIN)).await;
    assert_eq!((status, v["online_users"].clone()), (200, serde_json::json!(["ann"])));
    assert_eq!(admin_get(&s.http, "/admin/rooms/nope", Some(ADMIN)).await.0, 404);
    let (status, v) = admin_get(&s.http, "/admin/connections", Some(ADMIN)).await;
    assert_eq!(status, 200);
    let conn = &v["connections"][0];
    assert_eq!(
        (conn["user"].as_str(), conn["transport"].as_str(), conn["device"].as_str()),
        (Some("ann"), Some("tcp"), Some("rust"))
    );
    assert!(conn["frames_in"].as_u64().unwrap() >= 6 && conn["bytes_out"].as_u64().unwrap() > 0, "{conn}");
    assert!(conn["remote"].as_str().unwrap().starts_with("127.0.0.1:"));
    // The TLS reload is an admin request too: refused without the token,
    // and a conflict on a server without TLS.
    assert_eq!(admin_post(&s.http, "/admin/tls/reload", Some("wrong-token-wrong-token")).await.0, 401);
    let (status, v) = admin_post(&s.http, "/admin/tls/reload", Some(ADMIN)).await;
    assert_eq!((status, v["error"].as_str()), (409, Some("TLS is not configured")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_connection_fields() {
    let data = tempfile::tempdir().unwrap();
    let server = Process::start_with_env(data.path(), &["--log-format", "json"], &[("RUST_LOG", "info")]);
    let mut r = server.raw().await;
    r.send_hello("not-a-token", vec![]).await;
    assert!(r.closed().await);
    let (mut ok, _) = server.raw_user("ann").await;
    ok.ping().await;
    let (failed, started) = server.wait_for_logs("authentication failed and session started", |lines| {
        let parsed: Vec<serde_json::Value> = lines.iter().filter_map(|l| serde_json::from_str(l).ok()).collect();
        assert_eq!(parsed.len(), lines.len(), "every log line is JSON: {lines:?}");
        let find = |msg: &str| parsed.iter().find(|v| v["fields"]["message"] == msg).cloned();
        find("authentication failed").zip(find("session started"))
    });
    assert_eq!(failed["span"]["transport"], "tcp", "{failed}");
    assert!(failed["span"]["id"].is_number() && failed["span"]["peer"].as_str().unwrap().starts_with("127.0.0.1"));
    assert!(failed["fields"]["error"].as_str().unwrap().contains("malformed"));
    assert_eq!(started["span"]["user"], "ann", "{started}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_room_administration_is_one_structured_log_line() {
    let data = tempfile::tempdir().unwrap();
    let server = Process::start_with_env(data.path(), &["--log-format", "json"], &[("RUST_LOG", "info")]);
    let (mut ann, _) = server.raw_user("ann").await;
    ann.join("r").await;
    let ban = Body::Ban(proto::Ban { room: "r".into(), user: "eve".into(), reason: "spam links".into() });
    assert!(matches!(ann.request(ban).await, Body::RoomInfo(_)));
    let line = server.wait_for_logs("the ban's log line", |lines| {
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["fields"]["message"] == "room administration")
    });
    let f = &line["fields"];
    assert_eq!(
        (&f["actor"], &f["action"], &f["target"], &f["room"], &f["reason"]),
        (&"ann".into(), &"ban".into(), &"eve".into(), &"r".into(), &"spam links".into()),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_says_goaway_shutdown_with_a_retry_hint() {
    let data = tempfile::tempdir().unwrap();
    let mut server = Process::start(data.path(), &[]);
    let (mut r, _) = server.raw_user("ann").await;
    server.signal("TERM");
    let g = r.next_go_away().await;
    assert_eq!(g.reason(), CloseReason::Shutdown);
    assert_eq!(g.retry_after_ms, 1000);
    assert!(r.closed().await);
    assert!(server.child.wait().unwrap().success());
    // An idle connection's request loop holds no waiter on the shutdown
    // signal; the server wakes it. Had it not, the reader would have held
    // the shutdown until its deadline.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let lines = server.log_lines();
    assert!(!lines.iter().any(|l| l.contains("did not stop in time")), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_the_reader_of_a_connection_whose_writer_is_blocked() {
    // The request loop holds no waiter on the shutdown signal; shutdown wakes
    // it directly. A wake-up through the writer would be lost while the
    // writer waits on a full socket (here for up to two minutes).
    let data = tempfile::tempdir().unwrap();
    let mut server = Process::start(
        data.path(),
        &[
            "--outbound-max-frames",
            "8",
            "--outbound-max-bytes",
            "16384",
            "--slow-consumer-timeout-ms",
            "120000",
            "--shutdown-timeout-ms",
            "3000",
        ],
    );
    let mut slow = Raw::connect_small(&server.addr).await;
    slow.hello(&server.token("slow"), vec![]).await;
    slow.join("r").await;
    let mut publisher = server.raw_member("pub", "r").await;
    // 12 MiB: more than the slow reader's socket buffers hold (Linux grows a
    // loopback send buffer to tcp_wmem's 4 MiB at most), so its writer ends
    // up waiting on a full socket.
    let payload = bytes::Bytes::from(vec![b'z'; 8192]);
    for i in 0..1536u64 {
        let p = proto::Publish {
            room: "r".into(),
            client_msg_id: format!("{i}"),
            data: payload.clone(),
            ..Default::default()
        };
        publisher.publish_message(p).await;
    }
    assert!(server.terminate().success());
    std::thread::sleep(std::time::Duration::from_millis(100));
    let lines = server.log_lines();
    assert!(!lines.iter().any(|l| l.contains("readers did not stop in time")), "{lines:?}");
    drop(slow);
}
