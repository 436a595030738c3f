//! Limits (ARCHITECTURE.md, "Limits"): each one refuses with its documented error, keeps
//! the connection where it should, counts in the metrics, and leaves other
//! users alone.

use chatd::proto::{self, Body, CloseReason, ErrorCode};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_rate_limit_refuses_without_disconnecting_and_only_that_user() {
    let s = TestServer::start_with(|c| {
        c.publish_rate = 60;
        c.publish_burst = 5;
    })
    .await;
    let mut ann = s.raw_member("ann", "r").await;
    let mut bob = s.raw_member("bob", "r").await;
    let publish =
        |i: u64| Body::Publish(proto::Publish { room: "r".into(), text: format!("{i}"), ..Default::default() });
    let mut limited = 0;
    for i in 0..8 {
        match ann.call(10 + i, publish(i)).await {
            Body::PublishAck(_) => {}
            Body::Error(e) if e.code() == ErrorCode::RateLimited => limited += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(limited, 3, "a burst of 5, then refusals");
    // Still connected, and bob has his own bucket.
    ann.ping().await;
    assert!(matches!(bob.call(31, publish(99)).await, Body::PublishAck(_)));
    let metrics = scrape_metrics(&s.http).await;
    assert_eq!(metric(&metrics, "chatd_rate_limited_total{kind=\"publish\"}"), 3.0, "{metrics:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_sessions_for_one_user_are_refused() {
    let s = TestServer::start_with(|c| c.max_sessions_per_user = 2).await;
    let (_a, _) = s.raw_user("ann").await;
    let (_b, _) = s.raw_user("ann").await;
    let mut third = s.raw().await;
    third.send_hello(&s.token("ann"), vec![]).await;
    third.expect_error(ErrorCode::ServerBusy).await;
    assert_eq!(third.expect_go_away().await, CloseReason::Capacity);
    assert!(third.closed().await);
    // Another user is fine.
    s.raw_user("bob").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_rooms_for_one_user_are_refused() {
    let s = TestServer::start_with(|c| c.max_rooms_per_user = 2).await;
    let (mut ann, _) = s.raw_user("ann").await;
    ann.join("a").await;
    ann.join("b").await;
    let msg = expect_error(&ann.call(9, Body::Join(proto::Join { room: "c".into() })).await, ErrorCode::Forbidden);
    assert!(msg.contains("2 rooms"), "{msg}");
    // Rejoining a room one is in is not a new membership.
    ann.join("a").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_get_goaway_capacity() {
    let s = TestServer::start_with(|c| c.max_connections = 3).await;
    // Three connections, each registered for sure (its Welcome came back),
    // before the fourth arrives.
    let (_a, _) = s.raw_user("a").await;
    let (_b, _) = s.raw_user("b").await;
    let (_c, _) = s.raw_user("c").await;
    let mut over = s.raw().await;
    let g = over.next_go_away().await;
    assert_eq!(g.reason(), CloseReason::Capacity);
    assert!(g.retry_after_ms > 0);
    assert!(over.closed().await);
    // Over WebSocket too.
    // (It has not spoken yet, so the GoAway comes in protobuf, the default.)
    let mut ws = Ws::connect(&s.http).await;
    match ws.recv().await {
        Received::Binary(env) => {
            assert!(matches!(env.body, Some(Body::GoAway(g)) if g.reason() == CloseReason::Capacity))
        }
        other => panic!("expected GoAway{{CAPACITY}}, got {other:?}"),
    }
    // Once one leaves, a new connection is served again.
    drop(_c);
    Polling::new(WAIT, 20)
        .until("a slot to free up", async || {
            let mut r = s.raw().await;
            r.send_hello(&s.token("d"), vec![]).await;
            matches!(r.recv().await.body, Some(Body::Welcome(_)))
        })
        .await;
    let metrics = scrape_metrics(&s.http).await;
    assert!(metric(&metrics, "chatd_closes_total{reason=\"CAPACITY\"}") > 0.0, "capacity refusals are counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stays_behind_past_the_bound_gets_goaway_slow_consumer() {
    let s = TestServer::start_with(|c| {
        c.outbound_max_frames = 8;
        c.outbound_max_bytes = 16 * 1024;
        c.slow_consumer_timeout_ms = 500;
    })
    .await;
    let mut slow = Raw::connect_small(&s.addr).await;
    slow.hello(&s.token("slow"), vec![]).await;
    slow.join("r").await;
    let (publisher, _) = s.client("pub").await;
    publisher.join("r").await.unwrap();
    let payload = bytes::Bytes::from(vec![b'z'; 8192]);
    // Keep the room busy while the slow reader reads nothing, until the
    // server has let it go (however long filling the socket buffers takes
    // on a busy machine; bounded).
    let mut i = 0u64;
    wait_for("the slow reader to be let go", Polling::new(WAIT * 3, 0), async || {
        let p = proto::Publish {
            room: "r".into(),
            client_msg_id: format!("{i}"),
            data: payload.clone(),
            ..Default::default()
        };
        publisher.publish_message(p).await.unwrap();
        i += 1;
        let let_go = i.is_multiple_of(50)
            && metric(&scrape_metrics(&s.http).await, "chatd_slow_consumer_disconnects_total") == 1.0;
        if let_go { Ok(()) } else { Err(format!("{i} messages")) }
    })
    .await;
    // The publisher never waited on the slow reader; the slow reader was let go.
    let mut saw_goaway = false;
    while let Some(env) = slow.try_recv().await {
        if let Some(Body::GoAway(g)) = env.body {
            assert_eq!(g.reason(), CloseReason::SlowConsumer);
            saw_goaway = true;
        }
    }
    let disconnects = metric(&scrape_metrics(&s.http).await, "chatd_slow_consumer_disconnects_total");
    assert!(
        saw_goaway || disconnects == 1.0,
        "closed as a slow consumer (GoAway, or the write deadline when its socket was full)"
    );
    assert!(disconnects > 0.0, "slow consumer disconnects: {disconnects}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_task_stays_in_tokio_s_1_kib_task_cell() {
    // Idle memory per connection (ARCHITECTURE.md, "Threading"): tokio allocates a task as one
    // 128-byte-aligned cell, 112 bytes of header, trailer and wrappers
    // around the future (-Zprint-type-sizes). At most 912 bytes of future
    // keep it at 1,024 bytes; the next cell, and allocator size class, is
    // 1,280. The connection's task is this future for its whole life.
    let s = TestServer::start().await;
    let hub = s.server.as_ref().unwrap().hub().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (sock, _) = listener.accept().await.unwrap();
    let task = chatd::net::tcp::serve(hub, sock, "test".into(), Default::default());
    let size = std::mem::size_of_val(&task);
    assert!(size <= 912, "a TCP connection's future is {size} bytes: its task no longer fits a 1 KiB cell");
}

/// A connection served straight from `hub` (not through its listener), as
/// TCP with the socket shared for the fan-out's writes or (`shared` false)
/// with a writer of its own only; returns the client's end and the session.
async fn serve_one(
    hub: &std::sync::Arc<chatd::hub::Hub>,
    shared: bool,
) -> (tokio::net::TcpStream, std::sync::Arc<chatd::delivery::Subscriber>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (sock, _) = listener.accept().await.unwrap();
    let before: Vec<u64> = hub.connections().iter().map(|h| h.id).collect();
    if shared {
        tokio::spawn(chatd::net::tcp::serve(hub.clone(), sock, "test".into(), Default::default()));
    } else {
        let (r, w) = sock.into_split();
        tokio::spawn(chatd::net::stream::serve(hub.clone(), r, w, "tcp", "test".into(), Default::default(), None));
    }
    loop {
        if let Some(h) = hub.connections().into_iter().find(|h| !before.contains(&h.id)) {
            return (client, h);
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_lets_go_of_a_shared_run_once_it_is_written() {
    // Idle memory per connection (ARCHITECTURE.md, "Threading"): a connection whose queue held
    // one range of a room's run writes it from the shared buffer; once
    // written, the idle connection must not keep the run alive.
    let s = TestServer::start().await;
    let hub = s.server.as_ref().unwrap().hub().clone();
    let (mut client, handle) = serve_one(&hub, false).await;
    let run = chatd::delivery::Run::new(bytes::Bytes::from_static(b"onetwothree"), &[3, 6, 11]);
    assert_eq!(handle.outbound.offer_run(&run, 1, true).taken, 2);
    let mut got = [0u8; 8];
    tokio::io::AsyncReadExt::read_exact(&mut client, &mut got).await.unwrap();
    assert_eq!(&got, b"twothree", "the range, written from the run");
    // Were it kept until the connection's next write, it would go only when
    // the handshake timeout closes the connection.
    wait_until("the writer to let go of the run", async || std::sync::Arc::strong_count(&run) == 1).await;
    assert!(!handle.outbound.is_closing(), "the run outlived the write: it went only with the connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tcp_connection_takes_live_frames_straight_from_the_fan_out() {
    // Fan-out speed with many small rooms (S3 in benches/README.md): once its writer has written what it had, a TCP
    // connection's live frames go to its socket from the fan-out, with no
    // wake-up of its task.
    let s = TestServer::start().await;
    let hub = s.server.as_ref().unwrap().hub().clone();
    let (mut client, handle) = serve_one(&hub, true).await;
    handle.outbound.push(bytes::Bytes::from_static(b"reply")).unwrap();
    let mut expected = b"reply".to_vec();
    let mut got = vec![0u8; expected.len()];
    tokio::io::AsyncReadExt::read_exact(&mut client, &mut got).await.unwrap();
    // The writer marks itself idle just after its write returns; until then
    // an offer is queued (and written by the writer, in order).
    let run = chatd::delivery::Run::new(bytes::Bytes::from_static(b"live"), &[4]);
    Polling::new(WAIT, 1)
        .until("the idle writer to let the fan-out write", async || {
            let offered = handle.outbound.offer_run(&run, 0, true);
            assert_eq!(offered.taken, 1);
            expected.extend_from_slice(b"live");
            offered.written == 1
        })
        .await;
    let mut got = vec![0u8; expected.len() - 5];
    tokio::io::AsyncReadExt::read_exact(&mut client, &mut got).await.unwrap();
    assert_eq!(got, expected[5..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_tcp_connection_releases_its_socket_while_its_session_is_still_held() {
    // The session's queue holds the socket for the fan-out; a room may hold
    // the session after its connection ends, and must not keep the socket
    // open with it.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::start().await;
    let hub = s.server.as_ref().unwrap().hub().clone();
    let (mut client, _held) = serve_one(&hub, true).await;
    // An oversize frame: the server answers with an error and closes.
    client.write_all(&[0xff; 4]).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, client.read_to_end(&mut rest)).await.expect("the server closes").unwrap();
    // A socket closed for good answers data with a reset; a half-closed one
    // (still open in the queue) takes it.
    Polling::new(WAIT, 5)
        .until("the server's socket to close (a write to fail)", async || client.write_all(b"x").await.is_err())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_with_small_buffers_that_pause_get_every_message_whole_and_in_order() {
    // The fan-out writes small rooms' frames to idle sockets itself, and a
    // full socket takes part of a frame with the rest queued for the
    // connection's writer; catch-up from the log takes over past the queue's
    // bound. Several publishers at once (batches of many messages) and
    // frames of many sizes into 4 KiB receive buffers make partial writes
    // common, on two threads racing the writers; readers 1-2 pause now and
    // then, and reader 3 reads nothing until everything is published, so it
    // must catch up from the log. Every reader must get every message,
    // whole, in seq order.
    const PUBLISHERS: usize = 4;
    const EACH: usize = 300;
    let s = TestServer::start_with(|c| {
        c.outbound_max_frames = 64;
        c.outbound_max_bytes = 64 * 1024;
    })
    .await;
    let mut readers = Vec::new();
    for i in 0..4 {
        let mut r = Raw::connect_small(&s.addr).await;
        r.hello(&s.token(&format!("reader{i}")), vec![]).await;
        r.join("r").await;
        readers.push(r);
    }
    // The payload of publisher p's k-th message: its size and bytes follow
    // from its client_msg_id, so a torn or misplaced frame is caught.
    fn payload(p: usize, k: usize) -> Vec<u8> {
        let len = (p * 7919 + k * 104_729) % 16_000 + 1;
        (0..len).map(|i| (i + p * 31 + k) as u8).collect()
    }
    let mut publishing = Vec::new();
    for p in 0..PUBLISHERS {
        let (client, events) = s.client(&format!("pub{p}")).await;
        client.join("r").await.unwrap();
        publishing.push(tokio::spawn(async move {
            let _events = events;
            let batch = (0..EACH).map(|k| proto::Publish {
                room: "r".into(),
                client_msg_id: format!("{p}-{k}"),
                data: payload(p, k).into(),
                ..Default::default()
            });
            // All of them at once.
            publish_pipelined(&client, batch, EACH).await;
        }));
    }
    let total = (PUBLISHERS * EACH) as u64;
    let read = |i: usize, mut r: Raw| {
        tokio::spawn(async move {
            let mut next = 1;
            while next <= total {
                // Readers 1 and 2 stop reading now and then, each at its own pace.
                if (1..3).contains(&i) && next % (20 * i as u64) == 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
                }
                let m = r.next_message().await;
                assert_eq!(m.seq, next, "reader {i}: seqs in order, none missing or repeated");
                let (p, k) = m.client_msg_id.split_once('-').expect("the publisher's id");
                let (p, k): (usize, usize) = (p.parse().unwrap(), k.parse().unwrap());
                assert!(m.data[..] == payload(p, k)[..], "reader {i}: message {next} arrived whole");
                next += 1;
            }
        })
    };
    // Reader 3 reads nothing until every message is published: ~9.4 MB,
    // more than its queue (64 KiB) and its socket (the kernel caps a send
    // buffer at tcp_wmem's maximum, 4 MiB by default) hold.
    let last = readers.pop().unwrap();
    let mut reading: Vec<_> = readers.into_iter().enumerate().map(|(i, r)| read(i, r)).collect();
    for p in publishing {
        tokio::time::timeout(WAIT * 3, p).await.expect("every publish acked").unwrap();
    }
    let hub = s.server.as_ref().unwrap().hub();
    let behind = hub.connections().into_iter().find(|c| c.user() == "reader3").expect("reader 3's session");
    assert!(behind.is_lagging(), "reader 3 fell past its queue: it catches up from the log");
    reading.push(read(3, last));
    for r in reading {
        tokio::time::timeout(WAIT * 3, r).await.expect("every reader got every message").unwrap();
    }
}
