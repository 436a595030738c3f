//! The scenarios. Every one sets its connections up first, then warms up and
//! measures for the configured time, while a progress line updates on
//! stderr; receivers verify per-room order throughout.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use chatd::codec::{decode_envelope, put_frame};
use chatd::proto::{self, Body, Envelope};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

use crate::Common;
use crate::conn::{self, Conn, Tokens};
use crate::report::BenchResult;
use crate::stats::{Recorder, Shared};
use crate::sys;

/// Grace after the window for in-flight messages and acks.
const GRACE: Duration = Duration::from_secs(3);

/// What every scenario needs.
pub struct Context {
    pub common: Common,
    pub tokens: Arc<Tokens>,
    /// Distinguishes this run's users and rooms from earlier runs.
    pub run: String,
}

impl Context {
    pub fn new(common: Common) -> anyhow::Result<Self> {
        let tokens = Arc::new(Tokens::from(&common)?);
        let run = format!(
            "{:x}",
            std::process::id() as u64
                ^ (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64 & 0xffffff)
        );
        Ok(Context { common, tokens, run })
    }

    fn user(&self, role: &str, i: usize) -> String {
        format!("{}-{}-{role}{i}", self.common.user_prefix, self.run)
    }

    fn room(&self, name: &str, i: usize) -> String {
        format!("{name}-{}-{i}", self.run)
    }

    fn timing(&self) -> (Duration, Duration) {
        (Duration::from_secs_f64(self.common.warmup), Duration::from_secs_f64(self.common.duration))
    }
}

/// What the server did during the measured window, when `--server-pid` is
/// given. Every scenario reports it (the issue asks for the server's CPU time
/// in all of them), so it is started and finished in one place.
struct ServerWatch {
    cpu: Option<tokio::task::JoinHandle<Option<f64>>>,
    load_start: Option<f64>,
    pid: Option<u32>,
}

impl ServerWatch {
    /// Reads the load average now and the server's CPU time at the two ends
    /// of the window, from a task of its own so the scenario need not wait.
    fn start(c: &Common, shared: &Shared) -> Self {
        let (from, until) = (shared.measure_from, shared.measure_until);
        let cpu = c.server_pid.map(|pid| {
            tokio::spawn(async move {
                tokio::time::sleep_until(from.into()).await;
                let before = sys::cpu_seconds(pid);
                tokio::time::sleep_until(until.into()).await;
                before.zip(sys::cpu_seconds(pid)).map(|(a, b)| b - a)
            })
        });
        ServerWatch { cpu, load_start: sys::loadavg(), pid: c.server_pid }
    }

    /// Fills in the result's CPU time, RSS (read now) and load averages.
    async fn finish(self, result: &mut BenchResult) {
        if let Some(cpu) = self.cpu {
            result.server_cpu_s = cpu.await.ok().flatten();
        }
        result.server_rss = self.pid.and_then(sys::rss_bytes);
        result.load = (self.load_start, sys::loadavg());
    }
}

/// Prints a progress line every second until the window ends.
fn progress(shared: Arc<Shared>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = (0u64, 0u64);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        while Instant::now() < shared.measure_until + GRACE {
            tick.tick().await;
            let now = Instant::now();
            let phase = if now < shared.measure_from {
                "warm-up"
            } else if now < shared.measure_until {
                "measuring"
            } else {
                "draining"
            };
            let d = shared.delivered.load(Ordering::Relaxed);
            let a = shared.acks.load(Ordering::Relaxed);
            eprint!(
                "\r{:>5.1}s {phase:<9} delivered {:>10}/s  acks {:>9}/s  errors {}        ",
                shared.start.elapsed().as_secs_f64(),
                d - last.0,
                a - last.1,
                shared.errors.load(Ordering::Relaxed)
            );
            last = (d, a);
        }
        eprintln!();
    })
}

/// Reads a subscriber's frames until `stop`, recording every message.
async fn subscribe(mut c: Conn, shared: Arc<Shared>, stop: Instant) {
    let mut rec = Recorder::default();
    loop {
        let frame = match tokio::time::timeout_at(stop.into(), c.reader.read_frame()).await {
            Ok(Ok(Some(f))) => f,
            _ => break,
        };
        let Ok(env) = decode_envelope(&frame) else { continue };
        match env.body {
            Some(Body::Message(m)) => rec.on_message(&shared, &m.room, m.seq, &m.data),
            Some(Body::Ping(p)) => {
                let mut buf = BytesMut::new();
                put_frame(&mut buf, &Envelope::new(0, Body::Pong(proto::Pong { nonce: p.nonce })));
                let _ = c.writer.write_all(&buf).await;
            }
            Some(Body::Error(_)) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
            }
            Some(Body::GoAway(_)) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
            _ => {}
        }
    }
    rec.finish(&shared);
}

/// What a publisher sends besides messages: `percent` of its requests are
/// changes to its own latest acknowledged message in the room, reactions
/// and edits in turn (proto/README.md §9).
#[derive(Clone, Copy, Default)]
pub struct ChangeMix {
    pub percent: u64,
}

/// Publishes round-robin over `rooms` until the window ends, with at most
/// `inflight` unacknowledged publishes (and `rate` per second if non-zero).
#[allow(clippy::too_many_arguments)]
async fn publish(
    c: Conn,
    id: u64,
    rooms: Vec<String>,
    rate: f64,
    inflight: usize,
    size: usize,
    mix: ChangeMix,
    shared: Arc<Shared>,
) {
    let Conn { mut reader, mut writer, .. } = c;
    let window = Arc::new(Semaphore::new(inflight));
    let sent: Arc<Mutex<VecDeque<Instant>>> = Arc::new(Mutex::new(VecDeque::new()));
    // The latest acknowledged message per room (what changes target), and
    // the requests that were changes.
    let targets: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let changes: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let stop_sending = shared.measure_until;
    let sender = {
        let (window, sent, shared) = (window.clone(), sent.clone(), shared.clone());
        let (targets, changes) = (targets.clone(), changes.clone());
        tokio::spawn(async move {
            let mut counter = 0u64;
            let mut buf = BytesMut::new();
            let interval = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
            let mut next_due = Instant::now();
            while Instant::now() < stop_sending {
                let Ok(first) = tokio::time::timeout_at(stop_sending.into(), window.acquire()).await else { break };
                let Ok(first) = first else { break };
                first.forget();
                let mut n = 1;
                if interval.is_none() {
                    while n < 64 && window.try_acquire().map(|p| p.forget()).is_ok() {
                        n += 1;
                    }
                }
                if let Some(iv) = interval {
                    next_due += iv;
                    tokio::time::sleep_until(next_due.into()).await;
                }
                buf.clear();
                let now = Instant::now();
                {
                    let mut s = sent.lock().expect("not poisoned");
                    for _ in 0..n {
                        let room = &rooms[(counter as usize) % rooms.len()];
                        let client_msg_id = format!("{id}-{counter}");
                        let data = shared.payload(size, id, counter);
                        let target = (counter % 100 < mix.percent)
                            .then(|| targets.lock().expect("not poisoned").get(room).copied())
                            .flatten();
                        let body = match target {
                            Some(seq) => {
                                changes.lock().expect("not poisoned").insert(counter);
                                if counter.is_multiple_of(2) {
                                    let key = format!("k{}", counter % 50);
                                    Body::React(proto::React { room: room.clone(), seq, key, add: true, client_msg_id })
                                } else {
                                    let (room, text) = (room.clone(), String::new());
                                    Body::Edit(proto::Edit { room, seq, client_msg_id, text, data })
                                }
                            }
                            None => Body::Publish(proto::Publish {
                                room: room.clone(),
                                client_msg_id,
                                data,
                                ..Default::default()
                            }),
                        };
                        put_frame(&mut buf, &Envelope::new(counter + 1_000, body));
                        s.push_back(now);
                        counter += 1;
                    }
                }
                if writer.write_all(&buf).await.is_err() {
                    break;
                }
            }
            writer
        })
    };
    let mut rec = Recorder::default();
    let stop = shared.measure_until + GRACE;
    loop {
        let frame = match tokio::time::timeout_at(stop.into(), reader.read_frame()).await {
            Ok(Ok(Some(f))) => f,
            _ => break,
        };
        let Ok(env) = decode_envelope(&frame) else { continue };
        match env.body {
            Some(Body::PublishAck(a)) => {
                let request = env.id.wrapping_sub(1_000);
                if mix.percent > 0 && !changes.lock().expect("not poisoned").remove(&request) {
                    targets.lock().expect("not poisoned").insert(a.room, a.seq);
                }
                let at = sent.lock().expect("not poisoned").pop_front();
                if let Some(at) = at {
                    rec.on_ack(&shared, at);
                }
                window.add_permits(1);
                if Instant::now() >= stop_sending && sent.lock().expect("not poisoned").is_empty() {
                    break;
                }
            }
            Some(Body::Error(_)) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                window.add_permits(1);
                sent.lock().expect("not poisoned").pop_front();
            }
            Some(Body::GoAway(_)) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
            _ => {}
        }
    }
    window.close();
    let _ = sender.await;
    rec.finish(&shared);
}

/// `fanout` (one room) and `rooms` (many): `members` subscriber connections
/// per room, publishers spread over the rooms.
pub async fn fanout(
    ctx: &Context,
    rooms: usize,
    members: usize,
    publishers: usize,
    rate: f64,
    inflight: usize,
    scenario: &str,
) -> anyhow::Result<BenchResult> {
    let c = &ctx.common;
    let names: Vec<String> = (0..rooms).map(|r| ctx.room(scenario, r)).collect();
    eprintln!("connecting {} subscribers and {publishers} publishers...", rooms * members);
    let subs = conn::open_many(c, rooms * members, |i| {
        let (c, tokens, user, room) =
            (c.clone(), ctx.tokens.clone(), ctx.user("s", i), names[i / members.max(1)].clone());
        async move {
            let mut conn = conn::open(&c, &tokens, i, &user, vec![]).await?;
            conn.join(&room).await?;
            Ok(conn)
        }
    })
    .await?;
    let base = rooms * members;
    let pubs = conn::open_many(c, publishers, |p| {
        let (c, tokens, user) = (c.clone(), ctx.tokens.clone(), ctx.user("p", p));
        let mine: Vec<String> = names
            .iter()
            .enumerate()
            .filter(|(r, _)| rooms < publishers || r % publishers == p)
            .map(|(_, n)| n.clone())
            .collect();
        async move {
            let mut conn = conn::open(&c, &tokens, base + p, &user, vec![]).await?;
            for r in &mine {
                conn.join(r).await?;
            }
            Ok(conn)
        }
    })
    .await?;
    let params = json!({"rooms": rooms, "members": members, "subscribers": rooms * members, "publishers": publishers,
        "rate": rate, "inflight": inflight, "size": c.size, "tls": c.tls});
    run_pubsub(ctx, scenario, params, subs, pubs, names, rate, inflight, ChangeMix::default()).await
}

/// `durable`: publishers only, acks counted.
pub async fn durable(
    ctx: &Context,
    publishers: usize,
    inflight: usize,
    rooms: usize,
    mix: ChangeMix,
) -> anyhow::Result<BenchResult> {
    let c = &ctx.common;
    let names: Vec<String> = (0..rooms.max(1)).map(|r| ctx.room("durable", r)).collect();
    let pubs = conn::open_many(c, publishers, |p| {
        let (c, tokens, user, names) = (c.clone(), ctx.tokens.clone(), ctx.user("p", p), names.clone());
        async move {
            let mut conn = conn::open(&c, &tokens, p, &user, vec![]).await?;
            for r in &names {
                conn.join(r).await?;
            }
            Ok(conn)
        }
    })
    .await?;
    let params = json!({"publishers": publishers, "inflight": inflight, "rooms": rooms, "size": c.size, "tls": c.tls,
        "changes_percent": mix.percent});
    run_pubsub(ctx, "durable", params, Vec::new(), pubs, names, 0.0, inflight, mix).await
}

#[allow(clippy::too_many_arguments)]
async fn run_pubsub(
    ctx: &Context,
    scenario: &str,
    params: serde_json::Value,
    subs: Vec<Conn>,
    pubs: Vec<Conn>,
    names: Vec<String>,
    rate: f64,
    inflight: usize,
    mix: ChangeMix,
) -> anyhow::Result<BenchResult> {
    let c = &ctx.common;
    let (warmup, duration) = ctx.timing();
    let shared = Arc::new(Shared::new(warmup, duration));
    let server = ServerWatch::start(c, &shared);
    let prog = progress(shared.clone());
    let publishers = pubs.len();
    let mut tasks = Vec::new();
    for s in subs {
        tasks.push(tokio::spawn(subscribe(s, shared.clone(), shared.measure_until + GRACE)));
    }
    for (p, conn) in pubs.into_iter().enumerate() {
        let mine: Vec<String> = names
            .iter()
            .enumerate()
            .filter(|(r, _)| names.len() < publishers || r % publishers == p)
            .map(|(_, n)| n.clone())
            .collect();
        tasks.push(tokio::spawn(publish(conn, p as u64, mine, rate, inflight, c.size, mix, shared.clone())));
    }
    for t in tasks {
        t.await?;
    }
    let _ = prog.await;
    let mut result = BenchResult::collect(scenario, params, &shared, duration);
    server.finish(&mut result).await;
    Ok(result)
}

/// `connections`: opens and holds idle authenticated connections.
pub async fn connections(ctx: &Context, count: usize) -> anyhow::Result<BenchResult> {
    let c = &ctx.common;
    let (warmup, duration) = ctx.timing();
    let rss_before = c.server_pid.and_then(sys::rss_bytes);
    let started = Instant::now();
    let conns = conn::open_many(c, count, |i| {
        let (c, tokens, user) = (c.clone(), ctx.tokens.clone(), ctx.user("idle", i));
        async move { conn::open(&c, &tokens, i, &user, vec![]).await }
    })
    .await?;
    let connect_s = started.elapsed().as_secs_f64();
    eprintln!("{count} connections open in {connect_s:.1}s; holding...");
    let rss_open = c.server_pid.and_then(sys::rss_bytes);
    let shared = Arc::new(Shared::new(warmup, duration));
    let server = ServerWatch::start(c, &shared);
    let prog = progress(shared.clone());
    let mut tasks = Vec::new();
    for conn in conns {
        tasks.push(tokio::spawn(subscribe(conn, shared.clone(), shared.measure_until)));
    }
    for t in tasks {
        t.await?;
    }
    let _ = prog.await;
    let rss_settled = c.server_pid.and_then(sys::rss_bytes);
    let per_conn = |after: Option<u64>| rss_before.zip(after).map(|(b, a)| (a.saturating_sub(b)) as f64 / count as f64);
    let params = json!({"connections": count, "connect_rate": c.connect_rate, "tls": c.tls});
    let mut result = BenchResult::collect("connections", params, &shared, duration);
    result.extra.insert("connect_seconds".into(), json!(connect_s));
    result.extra.insert("server_rss_before".into(), json!(rss_before));
    result.extra.insert("server_rss_open".into(), json!(rss_open));
    result.extra.insert("server_rss_settled".into(), json!(rss_settled));
    result.extra.insert("rss_per_connection_bytes".into(), json!(per_conn(rss_open)));
    result.extra.insert("rss_per_connection_settled_bytes".into(), json!(per_conn(rss_settled)));
    server.finish(&mut result).await;
    Ok(result)
}

/// `resume`: every client leaves and comes back with its cursor, together,
/// while a publisher keeps publishing; measures how long catching up takes.
pub async fn resume(ctx: &Context, clients: usize, rate: f64, away: Duration) -> anyhow::Result<BenchResult> {
    let c = &ctx.common;
    let (warmup, duration) = ctx.timing();
    let room = ctx.room("resume", 0);
    let users: Vec<String> = (0..clients).map(|i| ctx.user("r", i)).collect();
    let mut conns = conn::open_many(c, clients, |i| {
        let (c, tokens, user, room) = (c.clone(), ctx.tokens.clone(), users[i].clone(), room.clone());
        async move {
            let mut conn = conn::open(&c, &tokens, i, &user, vec![]).await?;
            conn.join(&room).await?;
            Ok(conn)
        }
    })
    .await?;
    let mut publisher = conn::open(c, &ctx.tokens, clients, &ctx.user("p", 0), vec![]).await?;
    publisher.join(&room).await?;
    let shared = Arc::new(Shared::new(warmup, duration));
    let server = ServerWatch::start(c, &shared);
    let prog = progress(shared.clone());
    let pub_task = tokio::spawn(publish(
        publisher,
        0,
        vec![room.clone()],
        rate,
        1024,
        c.size,
        ChangeMix::default(),
        shared.clone(),
    ));

    let mut recorders: Vec<Recorder> = (0..clients).map(|_| Recorder::default()).collect();
    let mut catch_up = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000, 3)?;
    let mut rounds = 0;
    let mut worst_round_ms = 0.0f64;
    while Instant::now() + away + Duration::from_secs(1) < shared.measure_until {
        // Read live for a second, then everyone leaves at once.
        let live_until = Instant::now() + Duration::from_secs(1);
        let mut readers = Vec::new();
        for (mut conn, mut rec) in conns.drain(..).zip(recorders.drain(..)) {
            let shared = shared.clone();
            readers.push(tokio::spawn(async move {
                while let Ok(Ok(Some(f))) = tokio::time::timeout_at(live_until.into(), conn.reader.read_frame()).await {
                    if let Ok(Envelope { body: Some(Body::Message(m)), .. }) = decode_envelope(&f) {
                        rec.on_message(&shared, &m.room, m.seq, &m.data);
                    }
                }
                rec
            }));
        }
        for r in readers {
            recorders.push(r.await?);
        }
        tokio::time::sleep(away).await;
        // Everyone comes back together with their cursors.
        let round_start = Instant::now();
        let mut back = Vec::new();
        for (i, rec) in recorders.drain(..).enumerate() {
            let (c, tokens, user, room, shared) =
                (c.clone(), ctx.tokens.clone(), users[i].clone(), room.clone(), shared.clone());
            back.push(tokio::spawn(async move {
                let mut rec = rec;
                let after = rec.last(&room).unwrap_or(0);
                let cursor = proto::Cursor { room: room.clone(), after_seq: after };
                let started = Instant::now();
                let mut conn = conn::open(&c, &tokens, i, &user, vec![cursor]).await?;
                loop {
                    let f = tokio::time::timeout(Duration::from_secs(60), conn.reader.read_frame())
                        .await
                        .map_err(|_| anyhow::anyhow!("{user}: no Synced within 60 s"))??
                        .ok_or_else(|| anyhow::anyhow!("{user}: closed during replay"))?;
                    match decode_envelope(&f)?.body {
                        Some(Body::Message(m)) => rec.on_message(&shared, &m.room, m.seq, &m.data),
                        Some(Body::Synced(s)) => {
                            anyhow::ensure!(s.complete, "{user}: replay bound exceeded (away too long for the rate)");
                            break;
                        }
                        _ => {}
                    }
                }
                Ok::<_, anyhow::Error>((conn, rec, started.elapsed()))
            }));
        }
        for b in back {
            let (conn, rec, took) = b.await??;
            let _ = catch_up.record(took.as_millis().max(1) as u64);
            conns.push(conn);
            recorders.push(rec);
        }
        worst_round_ms = worst_round_ms.max(round_start.elapsed().as_secs_f64() * 1000.0);
        rounds += 1;
    }
    for rec in recorders {
        rec.finish(&shared);
    }
    pub_task.await?;
    let _ = prog.await;
    let params = json!({"clients": clients, "rate": rate, "away_s": away.as_secs_f64(), "tls": c.tls});
    let mut result = BenchResult::collect("resume", params, &shared, duration);
    result.extra.insert("rounds".into(), json!(rounds));
    result.extra.insert(
        "catch_up_ms".into(),
        json!({"p50": catch_up.value_at_quantile(0.5), "p99": catch_up.value_at_quantile(0.99), "max": catch_up.max(),
               "all_clients_round_max": worst_round_ms}),
    );
    server.finish(&mut result).await;
    Ok(result)
}

/// Sends `requests` on `conn` with at most `window` unanswered, and waits
/// for every answer; returns how many were errors.
async fn pipeline_all(conn: &mut Conn, requests: Vec<Body>, window: usize) -> anyhow::Result<u64> {
    let total = requests.len();
    let (mut sent, mut answered, mut errors) = (0, 0, 0u64);
    let mut requests = requests.into_iter();
    let mut buf = BytesMut::new();
    while answered < total {
        buf.clear();
        while sent < total && sent - answered < window {
            let body = requests.next().expect("counted");
            put_frame(&mut buf, &Envelope::new(1_000_000 + sent as u64, body));
            sent += 1;
        }
        if !buf.is_empty() {
            conn.writer.write_all(&buf).await?;
        }
        let frame = tokio::time::timeout(Duration::from_secs(30), conn.reader.read_frame())
            .await
            .map_err(|_| anyhow::anyhow!("no answer in 30 s while filling the room"))??
            .ok_or_else(|| anyhow::anyhow!("the server closed the connection while filling the room"))?;
        match decode_envelope(&frame)?.body {
            Some(Body::PublishAck(_)) => answered += 1,
            Some(Body::Error(_)) => {
                answered += 1;
                errors += 1;
            }
            _ => {}
        }
    }
    Ok(errors)
}

/// `history`: a room of `messages` messages with `reactions` reactions on
/// each (by up to 50 users, over as many keys as that takes), then
/// `readers` connections paging through it (`limit` per page, `inflight`
/// pages outstanding each, at seeded-random places). Reports pages/s and
/// page latency, and checks that every page holds what was asked and
/// that the reactions are folded into the messages.
pub async fn history(
    ctx: &Context,
    messages: usize,
    reactions: usize,
    readers: usize,
    inflight: usize,
    limit: u32,
) -> anyhow::Result<BenchResult> {
    let c = &ctx.common;
    let room = ctx.room("history", 0);
    let mut filler = conn::open(c, &ctx.tokens, 0, &ctx.user("w", 0), vec![]).await?;
    let head = filler.join(&room).await? as usize;
    let fill_started = Instant::now();
    if head < messages {
        let publishes = (head..messages)
            .map(|i| {
                let text = format!("message {i} of the history scenario");
                Body::Publish(proto::Publish { room: room.clone(), text, ..Default::default() })
            })
            .collect();
        let errors = pipeline_all(&mut filler, publishes, 256).await?;
        anyhow::ensure!(errors == 0, "{errors} publishes refused while filling the room");
        let users = reactions.clamp(1, 50);
        let keys = reactions.div_ceil(users);
        eprintln!("filled {messages} messages; adding {reactions} reactions to each ({users} users x {keys} keys)...");
        let mut reactors = Vec::new();
        for u in 0..users.min(reactions) {
            let (c, tokens, user, room) = (c.clone(), ctx.tokens.clone(), ctx.user("x", u), room.clone());
            let mine = (0..keys).filter(|k| k * users + u < reactions).collect::<Vec<_>>();
            reactors.push(tokio::spawn(async move {
                let mut conn = conn::open(&c, &tokens, 1 + u, &user, vec![]).await?;
                conn.join(&room).await?;
                let requests = (1 + head as u64..=messages as u64)
                    .flat_map(|seq| {
                        let room = room.clone();
                        mine.iter().map(move |k| {
                            let key = format!("r{k}");
                            Body::React(proto::React {
                                room: room.clone(),
                                seq,
                                key,
                                add: true,
                                client_msg_id: String::new(),
                            })
                        })
                    })
                    .collect();
                pipeline_all(&mut conn, requests, 256).await
            }));
        }
        for r in reactors {
            let errors = r.await??;
            anyhow::ensure!(errors == 0, "{errors} reactions refused while filling the room");
        }
    }
    let fill_s = fill_started.elapsed().as_secs_f64();
    eprintln!("room {room} ready in {fill_s:.1}s; {readers} readers paging...");
    let conns = conn::open_many(c, readers, |i| {
        let (c, tokens, user, room) = (c.clone(), ctx.tokens.clone(), ctx.user("h", i), room.clone());
        async move {
            let mut conn = conn::open(&c, &tokens, 100 + i, &user, vec![]).await?;
            conn.join(&room).await?;
            Ok(conn)
        }
    })
    .await?;
    let (warmup, duration) = ctx.timing();
    let shared = Arc::new(Shared::new(warmup, duration));
    let server = ServerWatch::start(c, &shared);
    let prog = progress(shared.clone());
    let mut tasks = Vec::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let (shared, room) = (shared.clone(), room.clone());
        tasks.push(tokio::spawn(read_pages(conn, i as u64, room, messages as u64, limit, inflight, reactions, shared)));
    }
    for t in tasks {
        t.await?;
    }
    let _ = prog.await;
    let params = json!({"messages": messages, "reactions": reactions, "readers": readers, "inflight": inflight,
        "limit": limit, "tls": c.tls});
    let mut result = BenchResult::collect("history", params, &shared, duration);
    result.extra.insert("pages_per_sec".into(), json!(result.acks as f64 / duration.as_secs_f64()));
    result.extra.insert("fill_s".into(), json!(fill_s));
    server.finish(&mut result).await;
    Ok(result)
}

/// One reader of the `history` scenario: pages ending at seeded-random
/// seqs, `inflight` at a time; a page counts as an ack.
#[allow(clippy::too_many_arguments)]
async fn read_pages(
    c: Conn,
    id: u64,
    room: String,
    head: u64,
    limit: u32,
    inflight: usize,
    reactions: usize,
    shared: Arc<Shared>,
) {
    let Conn { mut reader, mut writer, .. } = c;
    let mut rec = Recorder::default();
    let mut sent: HashMap<u64, Instant> = HashMap::new();
    let mut next = 0u64;
    let mut seed = 0x9e37_79b9_7f4a_7c15 ^ id;
    let stop = shared.measure_until;
    let mut buf = BytesMut::new();
    loop {
        if Instant::now() < stop {
            buf.clear();
            while sent.len() < inflight {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let before_seq = 2 + seed % head.max(1);
                let h = proto::History { room: room.clone(), before_seq, limit, ..Default::default() };
                put_frame(&mut buf, &Envelope::new(next + 1, Body::History(h)));
                sent.insert(next + 1, Instant::now());
                next += 1;
            }
            if writer.write_all(&buf).await.is_err() {
                break;
            }
        } else if sent.is_empty() {
            break;
        }
        let frame = match tokio::time::timeout_at((stop + GRACE).into(), reader.read_frame()).await {
            Ok(Ok(Some(f))) => f,
            _ => break,
        };
        let Ok(env) = decode_envelope(&frame) else { continue };
        let Some(at) = sent.remove(&env.id) else { continue };
        match env.body {
            Some(Body::HistoryPage(p)) => {
                // Reactions are folded into every message of the page.
                let folded =
                    p.messages.iter().all(|m| m.reactions.iter().map(|r| r.count as usize).sum::<usize>() == reactions);
                if p.messages.is_empty() || !folded {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                }
                rec.on_ack(&shared, at);
            }
            _ => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    rec.finish(&shared);
}
