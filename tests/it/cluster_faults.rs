//! Cluster mode under faults, with the `chatd` binary: three nodes over one
//! real `redis-server`, publishers and readers on all of them, every client
//! given the other nodes as fallbacks (`ClientConfig::fallback_addrs`).
//! Nodes are SIGKILLed, stopped and restarted, Redis is SIGKILLed and
//! restarted, all under load; afterwards every acknowledged message must
//! be in the log exactly once at its acknowledged seq, every room's seqs
//! contiguous, each publisher's order kept, and every reader must have
//! received every message of its rooms once, in order, whichever nodes it
//! went through.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_client::{Client, ClientConfig, ClientError};
use chatd::proto::{self, ErrorCode};

use crate::battery::{Acked, audit};
use crate::common::redis::RedisServer;
use crate::common::{Polling, Process, token_for};

const ROOMS: [&str; 3] = ["north", "south", "west"];

/// Three nodes at fixed addresses (a restarted node comes back where its
/// clients look for it).
struct Nodes {
    procs: Vec<Option<Process>>,
    tcp: Vec<String>,
    http: Vec<String>,
    dir: tempfile::TempDir,
    redis_url: String,
}

fn free_addr() -> String {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()
}

impl Nodes {
    fn start(redis: &RedisServer) -> Nodes {
        let mut n = Nodes {
            procs: Vec::new(),
            tcp: (0..3).map(|_| free_addr()).collect(),
            http: (0..3).map(|_| free_addr()).collect(),
            dir: tempfile::tempdir().unwrap(),
            redis_url: redis.url(),
        };
        for i in 0..3 {
            let p = n.spawn(i);
            n.procs.push(Some(p));
        }
        n
    }

    fn spawn(&self, i: usize) -> Process {
        Process::start_at(self.dir.path(), &self.tcp[i], &self.http[i], &["--cluster", &self.redis_url])
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.procs[i].take() {
            p.kill9();
        }
    }

    fn stop(&mut self, i: usize) {
        if let Some(mut p) = self.procs[i].take() {
            assert!(p.terminate().success(), "node {i} stops cleanly");
        }
    }

    fn restart(&mut self, i: usize) {
        self.procs[i] = Some(self.spawn(i));
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A client of `user` on node `first`, with the others as fallbacks.
    async fn client(&self, user: &str, first: usize) -> (Client, chat_client::Events) {
        let mut c = ClientConfig::new(self.tcp[first].clone(), token_for(self.dir(), user));
        c.fallback_addrs = (1..3).map(|k| self.tcp[(first + k) % 3].clone()).collect();
        c.max_backoff = Duration::from_millis(200);
        Client::connect(c).await.expect("a node answers")
    }
}

/// What the readers received, per reader and room: (seq, key) in order.
type Received = Arc<Mutex<HashMap<(String, String), Vec<(u64, String)>>>>;

/// Publishers (one per node) and readers (one per node) until `stop`.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Acked>>,
    received: Received,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    async fn start(nodes: &Nodes) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Acked::new()));
        let received: Received = Default::default();
        let mut tasks = Vec::new();
        for i in 0..3 {
            let reader = format!("reader{i}");
            for room in ROOMS {
                let mut r = crate::common::Raw::connect_as(&nodes.tcp[i], &token_for(nodes.dir(), &reader)).await;
                r.join(room).await;
            }
            let addrs: Vec<String> = (0..3).map(|k| nodes.tcp[(i + k) % 3].clone()).collect();
            let token = token_for(nodes.dir(), &reader);
            tasks.push(tokio::spawn(raw_reader(reader, token, addrs, received.clone(), stop.clone())));
        }
        for i in 0..3 {
            let user = format!("pub{i}");
            let (client, mut events) = nodes.client(&user, i).await;
            tokio::spawn(async move { while events.recv().await.is_some() {} });
            for room in ROOMS {
                join(&client, room).await;
            }
            let (stop, acked) = (stop.clone(), acked.clone());
            tasks.push(tokio::spawn(async move {
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("{user}-{k}");
                    let room = ROOMS[k as usize % ROOMS.len()];
                    let seq = publish(&client, room, &key).await;
                    acked.lock().unwrap().insert(key, (room.to_string(), seq));
                    k += 1;
                }
            }));
        }
        Load { stop, acked, received, tasks }
    }

    /// Stops the publishers (each finishes the key it is on) and returns
    /// what was acknowledged.
    async fn finish(&mut self) -> Acked {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks.drain(3..) {
            t.await.unwrap();
        }
        // The readers go on until every message reached them.
        self.acked.lock().unwrap().clone()
    }
}

/// A reader at the frame level, so that the server's deliveries are
/// checked as sent (a client library would hide a duplicate or fill a
/// gap): it resumes its rooms from the last seq it got, on the next node
/// whenever its connection drops or a node refuses it, until `stop` and a
/// quiet second.
async fn raw_reader(reader: String, token: String, addrs: Vec<String>, got: Received, stop: Arc<AtomicBool>) {
    use chatd::codec::{FrameReader, decode_envelope, encode_frame};
    use chatd::proto::{Body, Envelope};
    use tokio::io::AsyncWriteExt;
    let mut cursors: HashMap<String, u64> = ROOMS.iter().map(|r| (r.to_string(), 0)).collect();
    let mut next = 0;
    loop {
        if next > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let addr = &addrs[next % addrs.len()];
        next += 1;
        let Ok(stream) = tokio::net::TcpStream::connect(addr).await else { continue };
        let (r, mut w) = stream.into_split();
        let mut frames = FrameReader::new(r, 1 << 20);
        let resume =
            cursors.iter().map(|(room, after)| proto::Cursor { room: room.clone(), after_seq: *after }).collect();
        let hello = proto::Hello {
            protocol_version: proto::PROTOCOL_VERSION,
            token: token.clone(),
            device: "audit".into(),
            resume,
        };
        if w.write_all(&encode_frame(&Envelope::new(1, Body::Hello(hello)))).await.is_err() {
            continue;
        }
        loop {
            let frame = match tokio::time::timeout(Duration::from_secs(1), frames.read_frame()).await {
                Ok(Ok(Some(f))) => f,
                Ok(_) => break,
                Err(_) if stop.load(Ordering::Relaxed) => return,
                Err(_) => continue,
            };
            match decode_envelope(&frame).expect("server frames decode").body {
                Some(Body::Message(m)) => {
                    cursors.insert(m.room.clone(), m.seq);
                    got.lock().unwrap().entry((reader.clone(), m.room)).or_default().push((m.seq, m.client_msg_id));
                }
                // Refused (a node that cannot reach Redis): the next one.
                Some(Body::Error(_)) | Some(Body::GoAway(_)) => break,
                _ => {}
            }
        }
    }
}

async fn join(client: &Client, room: &str) {
    Polling::new(Duration::from_secs(20), 50)
        .until(&format!("joining {room}"), async || client.join(room).await.is_ok())
        .await;
}

/// Publishes `key` to `room` until it is acknowledged: while Redis is away
/// the node answers `SERVER_BUSY`, and the same key is tried again.
async fn publish(client: &Client, room: &str, key: &str) -> u64 {
    let p = proto::Publish { room: room.into(), text: key.into(), client_msg_id: key.into(), ..Default::default() };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match client.publish_message(p.clone()).await {
            Ok(ack) => return ack.seq,
            Err(ClientError::Server { code: ErrorCode::ServerBusy, .. }) | Err(ClientError::Connection(_)) => {
                assert!(std::time::Instant::now() < deadline, "{key} not acknowledged within a minute");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("publishing {key}: {e}"),
        }
    }
}

/// The log audit, and every reader's deliveries checked against the log.
async fn check(nodes: &Nodes, load: &mut Load) {
    let acked = load.finish().await;
    assert!(acked.len() > 100, "only {} messages acknowledged", acked.len());
    let rooms: Vec<String> = ROOMS.iter().map(|r| r.to_string()).collect();
    let a = audit(&nodes.tcp[0], &token_for(nodes.dir(), "auditor"), &rooms, &acked).await;
    assert!(a.clean(), "{a:?}");
    assert_eq!(a.stored, acked.len(), "nothing stored that was not acknowledged in the end");
    let mut heads = HashMap::new();
    for (room, seq) in acked.values() {
        let h = heads.entry(room.clone()).or_insert(0);
        *h = (*h).max(*seq);
    }
    let complete = || {
        let got = load.received.lock().unwrap();
        (0..3).all(|i| {
            ROOMS.iter().all(|room| {
                got.get(&(format!("reader{i}"), room.to_string())).map_or(0, |v| v.len()) as u64 >= heads[*room]
            })
        })
    };
    Polling::new(Duration::from_secs(30), 50).until("every reader has every message", async || complete()).await;
    let got = load.received.lock().unwrap();
    let by_seq: HashMap<(String, u64), String> =
        acked.iter().map(|(key, (room, seq))| ((room.clone(), *seq), key.clone())).collect();
    for ((reader, room), seen) in got.iter() {
        let seqs: Vec<u64> = seen.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (1..=heads[room]).collect::<Vec<_>>(), "{reader} in {room}: every message once, in order");
        for (seq, key) in seen {
            assert_eq!(by_seq.get(&(room.clone(), *seq)), Some(key), "{reader} got {room} #{seq} as {key}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_kills_of_nodes_and_redis_under_load_lose_and_duplicate_nothing() {
    let Some(mut redis) = RedisServer::for_test("ten_kills_of_nodes_and_redis_under_load", &[]) else { return };
    let mut nodes = Nodes::start(&redis);
    let mut load = Load::start(&nodes).await;
    // Seven nodes killed (each one at least twice) and Redis three times.
    let victims = [Some(0), Some(1), None, Some(2), Some(0), None, Some(1), Some(2), None, Some(0)];
    for victim in victims {
        tokio::time::sleep(Duration::from_millis(300)).await;
        match victim {
            Some(i) => {
                nodes.kill(i);
                tokio::time::sleep(Duration::from_millis(100)).await;
                nodes.restart(i);
            }
            None => {
                redis.kill();
                tokio::time::sleep(Duration::from_millis(300)).await;
                redis.restart();
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    check(&nodes, &mut load).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_node_under_load_loses_nothing() {
    let Some(redis) = RedisServer::for_test("a_rolling_restart_of_every_node_under_load", &[]) else { return };
    let mut nodes = Nodes::start(&redis);
    let mut load = Load::start(&nodes).await;
    for i in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        nodes.stop(i);
        nodes.restart(i);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    check(&nodes, &mut load).await;
}
