//! A node's subscription to the rooms it serves: one pub/sub connection,
//! one channel per room with local subscribers, and every room's entries
//! delivered in seq order, each once (ARCHITECTURE.md, "Cluster mode").
//!
//! Pub/sub is a fast path, not a guarantee: Redis drops a subscriber's
//! messages while it is disconnected, and a connection may be cut at any
//! time. So the feed keeps, per room, the last seq it delivered, and reads
//! whatever it is missing from the room's stream before it delivers
//! anything newer: on subscribing, after every reconnection, and whenever a
//! message's seq jumps. A seq at or below the last one delivered (the
//! stream and the channel both had it) is dropped.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use super::{CONNECT_TIMEOUT, LogEntry, RESPONSE_TIMEOUT, RedisLog, Target, room_key};

/// The longest wait between two attempts to reconnect.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Pushes handled before what they carried is delivered: consecutive
/// messages of a room go out as one run.
const DRAIN: usize = 256;

/// The name of a feed's connection in Redis's `CLIENT LIST`.
pub const FEED_CLIENT_NAME: &str = "chatd-feed";

/// A room's new entries, in seq order.
#[derive(Debug)]
pub struct Delivery {
    /// Room name.
    pub room: Arc<str>,
    /// Entries with increasing seqs, each after the previous delivery's.
    pub entries: Vec<LogEntry>,
    /// The room's epoch changed before these: Redis lost entries of it
    /// (some seqs below these may never be delivered).
    pub epoch_changed: bool,
    /// The room's state (members, roles, bans, invitations, details) may
    /// have changed since it was last read: a node changed it
    /// ([`STATE_NOTICE`]), or the room was just subscribed, or the
    /// connection was lost meanwhile. Read it again.
    pub state_changed: bool,
    /// Pushes another node sent the room's subscribers without storing
    /// them (`presence::publish_ephemeral`): each `node\nframe`.
    pub ephemeral: Vec<Bytes>,
    /// Retention trimmed the room's stream before these entries: read its
    /// trim record and drop what lies below its start (the entries that
    /// follow are above it; the seqs between the last delivery and them
    /// are gone).
    pub trimmed: bool,
}

/// The payload a node publishes on a room's channel after it changed the
/// room's state ([`RedisLog::write_state`]).
pub const STATE_NOTICE: &[u8] = b"state";

/// What the feed has seen, for `/readyz` and `/metrics`.
#[derive(Default, Debug)]
pub struct FeedState {
    /// Connected and subscribed.
    up: AtomicBool,
    /// Times the subscription connection was (re)established.
    pub connections: AtomicU64,
    /// Entries read from a stream because the channel did not bring them.
    pub filled: AtomicU64,
    /// Epoch changes seen (Redis lost a room's entries).
    pub epoch_changes: AtomicU64,
}

impl FeedState {
    /// Whether the subscription is connected now.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }
}

enum Command {
    Subscribe { room: Arc<str>, after: u64 },
    Unsubscribe(Arc<str>),
}

/// The handle: subscribe and unsubscribe rooms. Dropping every handle stops
/// the feed.
#[derive(Clone)]
pub struct Feed {
    commands: mpsc::UnboundedSender<Command>,
    /// What it has seen.
    pub state: Arc<FeedState>,
}

impl Feed {
    /// Starts the feed over `log`'s Redis; deliveries go to `out`.
    pub fn start(log: Arc<RedisLog>, out: mpsc::Sender<Delivery>) -> Feed {
        let (commands, rx) = mpsc::unbounded_channel();
        let state = Arc::new(FeedState::default());
        tokio::spawn(run(log, rx, out, state.clone()));
        Feed { commands, state }
    }

    /// Delivers `room`'s entries after `after` from now on (and what the
    /// stream holds after it already). A room already subscribed keeps its
    /// place.
    pub fn subscribe(&self, room: Arc<str>, after: u64) {
        let _ = self.commands.send(Command::Subscribe { room, after });
    }

    /// Stops delivering `room`.
    pub fn unsubscribe(&self, room: Arc<str>) {
        let _ = self.commands.send(Command::Unsubscribe(room));
    }
}

/// A room's place in the feed.
struct Place {
    /// The last seq delivered.
    last: u64,
    /// The room's epoch as last seen; `None` before the first.
    epoch: Option<String>,
}

impl Place {
    /// Notes `epoch`; whether it differs from the one seen before.
    fn see_epoch(&mut self, room: &str, epoch: &str, state: &FeedState) -> bool {
        match &self.epoch {
            Some(known) if known != epoch => {
                tracing::error!(
                    room,
                    from = %known,
                    to = epoch,
                    last_delivered = self.last,
                    "the room's epoch changed: Redis lost entries of its log; resumes across the change are answered as incomplete"
                );
                state.epoch_changes.fetch_add(1, Ordering::Relaxed);
                self.epoch = Some(epoch.to_string());
                true
            }
            Some(_) => false,
            None => {
                self.epoch = Some(epoch.to_string());
                false
            }
        }
    }
}

/// The subscription connection.
enum Subscription {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Subscription {
    async fn connect(target: &Target, pushes: mpsc::UnboundedSender<PushInfo>) -> redis::RedisResult<Subscription> {
        match target {
            Target::Single(url) => {
                use redis::IntoConnectionInfo;
                let info = url.as_str().into_connection_info()?;
                let settings = info.redis_settings().clone().set_protocol(redis::ProtocolVersion::RESP3);
                let client = redis::Client::open(info.set_redis_settings(settings))?;
                let config = redis::AsyncConnectionConfig::new()
                    .set_push_sender(pushes)
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_connection_timeout(Some(CONNECT_TIMEOUT));
                let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;
                // Named, so that an operator's CLIENT LIST tells the feeds.
                redis::cmd("CLIENT").arg("SETNAME").arg(FEED_CLIENT_NAME).exec_async(&mut conn).await?;
                Ok(Subscription::Single(conn))
            }
            Target::Cluster(seeds) => {
                let client = redis::cluster::ClusterClient::builder(seeds.clone())
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(pushes)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .connection_timeout(CONNECT_TIMEOUT)
                    .build()?;
                Ok(Subscription::Cluster(client.get_async_connection().await?))
            }
        }
    }

    async fn subscribe(&mut self, room: &str) -> redis::RedisResult<()> {
        let channel = room_key(room, "ch");
        match self {
            Subscription::Single(c) => c.subscribe(channel).await,
            Subscription::Cluster(c) => c.ssubscribe(channel).await,
        }
    }

    async fn unsubscribe(&mut self, room: &str) -> redis::RedisResult<()> {
        let channel = room_key(room, "ch");
        match self {
            Subscription::Single(c) => c.unsubscribe(channel).await,
            Subscription::Cluster(c) => c.sunsubscribe(channel).await,
        }
    }
}

/// The room of a channel `chatd:{room}:ch`.
fn room_of(channel: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(channel).ok()?;
    s.strip_prefix("chatd:{")?.strip_suffix("}:ch")
}

/// A published entry: `<seq>:<epoch>\n<message>`.
fn parse_payload(payload: &[u8]) -> Option<(u64, &str, Bytes)> {
    let nl = payload.iter().position(|b| *b == b'\n')?;
    let head = std::str::from_utf8(&payload[..nl]).ok()?;
    let (seq, epoch) = head.split_once(':')?;
    Some((seq.parse().ok()?, epoch, Bytes::copy_from_slice(&payload[nl + 1..])))
}

/// What one push carried: `(channel, payload)` of a message.
fn message_of(push: &PushInfo) -> Option<(&[u8], &[u8])> {
    if !matches!(push.kind, PushKind::Message | PushKind::SMessage) {
        return None;
    }
    match push.data.as_slice() {
        [Value::BulkString(channel), Value::BulkString(payload)] => Some((channel, payload)),
        _ => None,
    }
}

/// Entries gathered from a drain of pushes, by room in first-seen order.
#[derive(Default)]
struct Gathered {
    rooms: Vec<Delivery>,
}

impl Gathered {
    fn push(&mut self, room: &Arc<str>, entries: Vec<LogEntry>, epoch_changed: bool, state_changed: bool) {
        self.push_after(room, entries, epoch_changed, state_changed, false)
    }

    /// As `push`, after the stream was `trimmed`.
    fn push_after(
        &mut self,
        room: &Arc<str>,
        entries: Vec<LogEntry>,
        epoch_changed: bool,
        state_changed: bool,
        trimmed: bool,
    ) {
        if entries.is_empty() && !epoch_changed && !state_changed && !trimmed {
            return;
        }
        match self.rooms.iter_mut().find(|d| d.room == *room) {
            // A state notice applies after the entries gathered before it,
            // a trim before the entries of its delivery.
            Some(d) if !epoch_changed && !trimmed && !d.state_changed => {
                d.entries.extend(entries);
                d.state_changed = state_changed;
            }
            _ => self.rooms.push(Delivery {
                room: room.clone(),
                entries,
                epoch_changed,
                state_changed,
                ephemeral: Vec::new(),
                trimmed,
            }),
        }
    }

    /// An ephemeral push for `room`, delivered with what was gathered.
    fn push_ephemeral(&mut self, room: &Arc<str>, push: Bytes) {
        match self.rooms.iter_mut().find(|d| d.room == *room) {
            Some(d) => d.ephemeral.push(push),
            None => self.rooms.push(Delivery {
                room: room.clone(),
                entries: Vec::new(),
                epoch_changed: false,
                state_changed: false,
                ephemeral: vec![push],
                trimmed: false,
            }),
        }
    }

    async fn send(&mut self, out: &mpsc::Sender<Delivery>) -> bool {
        for d in self.rooms.drain(..) {
            if out.send(d).await.is_err() {
                return false;
            }
        }
        true
    }
}

struct Feeder {
    log: Arc<RedisLog>,
    places: HashMap<Arc<str>, Place>,
    state: Arc<FeedState>,
}

impl Feeder {
    /// Reads what `room`'s stream holds after its place (up to `to`) and
    /// gathers it; with `check_epoch`, compares the room's epoch first.
    async fn fill(
        &mut self,
        room: &Arc<str>,
        to: u64,
        check_epoch: bool,
        out: &mut Gathered,
    ) -> redis::RedisResult<()> {
        let Some(last) = self.places.get(room).map(|p| p.last) else { return Ok(()) };
        let mut changed = false;
        if check_epoch {
            let (head, epoch) = self.log.head(room).await?;
            let place = self.places.get_mut(room).expect("checked above");
            if let Some(epoch) = epoch {
                changed = place.see_epoch(room, &epoch, &self.state);
            }
            if head < place.last && !changed {
                tracing::error!(
                    room = &**room,
                    head,
                    last_delivered = place.last,
                    "the room's head in Redis is below what this node delivered: Redis lost entries of its log"
                );
                self.state.epoch_changes.fetch_add(1, Ordering::Relaxed);
                changed = true;
            }
        }
        // Retention may have cut the stream past this place (while the
        // room was not served here, or the connection was down).
        let mut trimmed = false;
        if last < to {
            let start = self.log.log_start(room).await?;
            let place = self.places.get_mut(room).expect("checked above");
            if place.last + 1 < start {
                place.last = start - 1;
                trimmed = true;
            }
        }
        let last = self.places.get(room).expect("checked above").last;
        let entries = if last < to { self.log.range(room, last + 1, to).await? } else { Vec::new() };
        if let Some(e) = entries.last() {
            self.places.get_mut(room).expect("checked above").last = e.seq;
        }
        self.state.filled.fetch_add(entries.len() as u64, Ordering::Relaxed);
        // Checked on subscription and reconnection, when state notices may
        // have been missed.
        out.push_after(room, entries, changed, check_epoch, trimmed);
        Ok(())
    }

    /// Handles one published entry of `room`.
    async fn published(&mut self, room: &str, payload: &[u8], out: &mut Gathered) -> redis::RedisResult<()> {
        let Some((room, _)) = self.places.get_key_value(room) else { return Ok(()) };
        let room = room.clone();
        if payload == STATE_NOTICE {
            out.push(&room, Vec::new(), false, true);
            return Ok(());
        }
        if payload == super::retention::TRIM_NOTICE {
            out.push_after(&room, Vec::new(), false, false, true);
            return Ok(());
        }
        if *room == *super::state::REGISTRY_CHANNEL {
            // The name of a room whose state changed.
            out.push_ephemeral(&room, Bytes::copy_from_slice(payload));
            return Ok(());
        }
        if let Some(rest) = payload.strip_prefix(super::presence::EPHEMERAL_PREFIX) {
            out.push_ephemeral(&room, Bytes::copy_from_slice(rest));
            return Ok(());
        }
        let Some((seq, epoch, message)) = parse_payload(payload) else {
            tracing::warn!(room = &*room, "a malformed entry on the room's channel; the stream is read instead");
            return self.fill(&room, u64::MAX, true, out).await;
        };
        let place = self.places.get_mut(&room).expect("looked up above");
        let changed = place.see_epoch(&room, epoch, &self.state);
        if seq <= place.last {
            return Ok(());
        }
        let mut changed = changed;
        if seq > place.last + 1 {
            self.fill(&room, seq - 1, false, out).await?;
        }
        let place = self.places.get_mut(&room).expect("looked up above");
        if place.last + 1 < seq {
            tracing::error!(
                room = &*room,
                from = place.last + 1,
                to = seq - 1,
                "entries the room's channel skipped are not in its stream either: Redis lost them"
            );
            self.state.epoch_changes.fetch_add(1, Ordering::Relaxed);
            changed = true;
        }
        if seq > place.last {
            place.last = seq;
            out.push(&room, vec![LogEntry { seq, message }], changed, false);
        }
        Ok(())
    }
}

async fn run(
    log: Arc<RedisLog>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    out: mpsc::Sender<Delivery>,
    state: Arc<FeedState>,
) {
    let mut feeder = Feeder { log, places: HashMap::new(), state };
    let mut backoff = Duration::from_millis(20);
    loop {
        let (tx, mut pushes) = mpsc::unbounded_channel();
        let mut gathered = Gathered::default();
        let connected = async {
            let mut sub = Subscription::connect(feeder.log.target(), tx).await?;
            let rooms: Vec<Arc<str>> = feeder.places.keys().cloned().collect();
            for room in &rooms {
                sub.subscribe(room).await?;
            }
            // Subscribed first, then read: an entry appended in between is
            // in both, and the second copy is dropped by its seq.
            for room in &rooms {
                feeder.fill(room, u64::MAX, true, &mut gathered).await?;
            }
            redis::RedisResult::Ok(sub)
        }
        .await;
        let mut sub = match connected {
            Ok(sub) => sub,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cluster feed: cannot subscribe");
                // Commands keep arriving while Redis is away: rooms
                // subscribed meanwhile are subscribed on reconnection.
                let sleep = tokio::time::sleep(backoff);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        c = commands.recv() => match c {
                            Some(c) => apply_offline(&mut feeder, c),
                            None => return,
                        },
                    }
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = Duration::from_millis(20);
        feeder.state.connections.fetch_add(1, Ordering::Relaxed);
        feeder.state.up.store(true, Ordering::Release);
        if !gathered.send(&out).await {
            return;
        }
        let error = loop {
            tokio::select! {
                c = commands.recv() => {
                    let Some(c) = c else { return };
                    let result = match c {
                        Command::Subscribe { room, after } => {
                            if feeder.places.contains_key(&room) {
                                Ok(())
                            } else {
                                feeder.places.insert(room.clone(), Place { last: after, epoch: None });
                                match sub.subscribe(&room).await {
                                    Ok(()) => feeder.fill(&room, u64::MAX, true, &mut gathered).await,
                                    Err(e) => Err(e),
                                }
                            }
                        }
                        Command::Unsubscribe(room) => {
                            feeder.places.remove(&room);
                            sub.unsubscribe(&room).await
                        }
                    };
                    if let Err(e) = result {
                        break e.to_string();
                    }
                }
                push = pushes.recv() => {
                    let Some(push) = push else { break "the subscription connection closed".to_string() };
                    let mut next = Some(push);
                    let mut handled = 0;
                    let mut failed = None;
                    while let Some(push) = next.take() {
                        if push.kind == PushKind::Disconnection {
                            failed = Some("the subscription connection was lost".to_string());
                            break;
                        }
                        if let Some((channel, payload)) = message_of(&push)
                            && let Some(room) = room_of(channel)
                            && let Err(e) = feeder.published(room, payload, &mut gathered).await
                        {
                            failed = Some(e.to_string());
                            break;
                        }
                        handled += 1;
                        if handled < DRAIN {
                            next = pushes.try_recv().ok();
                        }
                    }
                    if !gathered.send(&out).await {
                        return;
                    }
                    if let Some(e) = failed {
                        break e;
                    }
                }
            }
        };
        feeder.state.up.store(false, Ordering::Release);
        tracing::warn!(
            error,
            "cluster feed: subscription lost; reconnecting and filling every room's gap from its stream"
        );
    }
}

/// A command while disconnected: only the places change.
fn apply_offline(feeder: &mut Feeder, c: Command) {
    match c {
        Command::Subscribe { room, after } => {
            feeder.places.entry(room).or_insert(Place { last: after, epoch: None });
        }
        Command::Unsubscribe(room) => {
            feeder.places.remove(&room);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_and_payloads() {
        assert_eq!(room_of(b"chatd:{general}:ch"), Some("general"));
        assert_eq!(room_of(b"chatd:{a:b}:ch"), Some("a:b"));
        assert_eq!(room_of(b"other"), None);
        let (seq, epoch, m) = parse_payload(b"17:abc\nxy\nz").unwrap();
        assert_eq!((seq, epoch, &m[..]), (17, "abc", &b"xy\nz"[..]));
        assert!(parse_payload(b"17abc\nx").is_none());
        assert!(parse_payload(b"x:abc\nx").is_none());
        assert!(parse_payload(b"17:abc").is_none());
    }
}
