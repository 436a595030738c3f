//! Cluster mode's shared log: every room's entries in a Redis stream,
//! appended by one atomic script and fanned out over Redis pub/sub
//! (ARCHITECTURE.md, "Cluster mode").
//!
//! [`RedisLog`] holds the node's command connection: it appends
//! ([`RedisLog::append`]: idempotency check, membership check, next seq,
//! `XADD` with the seq as the entry's ID, `PUBLISH` — one script, so two
//! nodes appending to one room at once get two consecutive seqs, never the
//! same one), reads ranges of a log back (`XRANGE` by seq: history, resume,
//! catch-up and gap fill) and keeps the members whose role the script
//! checks. [`feed::Feed`] is the node's subscription side: each room with
//! local subscribers once, delivered in seq order with every gap filled from
//! the stream.
//!
//! Every key of a room carries the hash tag `{room}`, so one room lives in
//! one slot of a Redis Cluster and its script touches one shard; there the
//! channel is a shard channel (`SPUBLISH`/`SSUBSCRIBE`).

pub mod feed;
pub mod presence;
pub mod retention;
pub mod state;

use std::time::Duration;

use bytes::Bytes;
use redis::aio::ConnectionLike;
use redis::{Cmd, RedisError, RedisFuture, Value};

/// How long a command may wait for Redis's answer before the node treats
/// Redis as unavailable (the publish is then answered `SERVER_BUSY`; its
/// retry with the same `client_msg_id` learns whether it was stored).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Entries one `XRANGE` returns at most; a longer range takes more calls.
const RANGE_STEP: usize = 1000;

/// Where the cluster's Redis is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// One Redis (with or without replicas): `redis://HOST:PORT`.
    Single(String),
    /// A Redis Cluster, by seed nodes: `redis+cluster://H1:P1,H2:P2` or a
    /// comma-separated list of `redis://` URLs.
    Cluster(Vec<String>),
}

impl Target {
    /// Parses the `--cluster` argument.
    pub fn parse(s: &str) -> Result<Target, String> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix("redis+cluster://") {
            let seeds: Vec<String> =
                rest.split(',').map(str::trim).filter(|h| !h.is_empty()).map(|h| format!("redis://{h}")).collect();
            if seeds.is_empty() {
                return Err(format!("{s:?}: redis+cluster:// needs at least one HOST:PORT"));
            }
            return Ok(Target::Cluster(seeds));
        }
        let urls: Vec<&str> = s.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
        if urls.is_empty() {
            return Err("the cluster's Redis is empty; give redis://HOST:PORT".into());
        }
        for u in &urls {
            if !u.starts_with("redis://") {
                return Err(format!("{u:?} is not a redis:// URL"));
            }
            redis::Client::open(*u).map_err(|e| format!("{u:?}: {e}"))?;
        }
        Ok(match urls.as_slice() {
            [one] => Target::Single(one.to_string()),
            many => Target::Cluster(many.iter().map(|u| u.to_string()).collect()),
        })
    }

    /// Whether this is a Redis Cluster (sharded pub/sub).
    pub fn is_cluster(&self) -> bool {
        matches!(self, Target::Cluster(_))
    }

    /// Every address given, for the logs and the durability check.
    pub fn urls(&self) -> Vec<String> {
        match self {
            Target::Single(u) => vec![u.clone()],
            Target::Cluster(us) => us.clone(),
        }
    }
}

/// Whether chatd insists on a Redis that makes every write durable before
/// it answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// `appendonly yes` and `appendfsync always`, checked at start: an ack
    /// follows an fsync'ed append, as on one node.
    Strict,
    /// Whatever Redis is configured to do (`--cluster-durability relaxed`);
    /// an ack may then be lost with Redis.
    Relaxed,
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Durability::Strict => "strict",
            Durability::Relaxed => "relaxed",
        })
    }
}

/// How the log is run.
#[derive(Clone, Debug)]
pub struct Options {
    /// What Redis must promise.
    pub durability: Durability,
    /// Replicas that must have an append (`WAIT`) before it is acked; 0 for
    /// none.
    pub replicas: u32,
    /// How long `WAIT` waits for them.
    pub replica_timeout: Duration,
    /// How long an idempotency key is remembered.
    pub idempotency_window: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            durability: Durability::Strict,
            replicas: 0,
            replica_timeout: Duration::from_secs(1),
            idempotency_window: Duration::from_secs(24 * 3600),
        }
    }
}

/// Why the log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Redis did not answer or refused.
    #[error("cluster Redis {url}: {error}")]
    Unreachable {
        /// Which address.
        url: String,
        /// What failed.
        error: RedisError,
    },
    /// Redis would acknowledge writes it has not made durable.
    #[error(
        "cluster Redis {url} has appendonly {appendonly:?} and appendfsync {appendfsync:?}: an acknowledged message could be lost with it; configure appendonly yes and appendfsync always, or start with --cluster-durability relaxed to accept that"
    )]
    NotDurable {
        /// Which address.
        url: String,
        /// Its `appendonly`.
        appendonly: String,
        /// Its `appendfsync`.
        appendfsync: String,
    },
}

/// Why an append was not made.
#[derive(Clone, Debug, thiserror::Error)]
pub enum AppendError {
    /// The sender is not a member of the room (as Redis holds it).
    #[error("{0}")]
    Forbidden(String),
    /// A change's target was deleted (another node's delete came first).
    #[error("{0}")]
    NotFound(String),
    /// Redis did not answer, or failed: the entry may or may not be in the
    /// log; a retry with the same key says which.
    #[error("cluster Redis unavailable: {0}")]
    Unavailable(String),
    /// Appended, but fewer replicas than configured have it.
    #[error("stored but only {got} of {wanted} replicas confirmed it in time")]
    NotReplicated {
        /// Replicas required.
        wanted: u32,
        /// Replicas that confirmed.
        got: u32,
    },
}

/// An entry read back from a room's log or its channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    /// Its seq (the stream entry's ID is `<seq>-0`).
    pub seq: u64,
    /// The encoded `Message`, with its seq and timestamp.
    pub message: Bytes,
}

/// What an append got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The entry's seq (the original's for a key already used).
    pub seq: u64,
    /// Its timestamp (Redis's clock, Unix ms).
    pub ts_ms: u64,
    /// The key was used before: nothing new was appended.
    pub duplicate: bool,
    /// A reaction was already as asked (its `seq` is the target's):
    /// nothing was appended.
    pub unchanged: bool,
    /// The room's epoch: it changes only when Redis lost entries.
    pub epoch: String,
}

/// One new entry.
#[derive(Clone, Debug)]
pub struct NewEntry<'a> {
    /// Room name.
    pub room: &'a str,
    /// The encoded `Message`, without seq and timestamp.
    pub message: &'a [u8],
    /// The idempotency key's owner (`store::idempotency_owner`).
    pub owner: &'a str,
    /// The client's key; empty for none.
    pub client_msg_id: &'a str,
    /// The member whose role is checked; empty for the system.
    pub member: &'a str,
    /// The highest seq this node has seen in the room.
    pub seen: u64,
    /// For a change to a message, what the script checks of it.
    pub change: Option<&'a ChangeCheck>,
}

/// What the append script checks of a change to a message: the target is
/// not deleted, and a reaction is not already as asked — decided in Redis,
/// as nodes decide on replicas that may lag the log by a moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeCheck {
    op: &'static str,
    target: u64,
    field: String,
}

impl ChangeCheck {
    /// The check of a change of `kind` by `user` to message `target`
    /// (`key`: a reaction's).
    pub fn of(kind: crate::proto::ChangeKind, target: u64, user: &str, key: &str) -> ChangeCheck {
        use crate::proto::ChangeKind;
        let op = match kind {
            ChangeKind::Delete => "del",
            ChangeKind::ReactionAdd => "add",
            ChangeKind::ReactionRemove => "rm",
            ChangeKind::Edit | ChangeKind::Unspecified => "edit",
        };
        // Neither user ids nor reaction keys hold control characters.
        ChangeCheck { op, target, field: format!("r:{target}\n{user}\n{key}") }
    }
}

/// A command connection to one Redis or to a Redis Cluster. Both reconnect
/// by themselves: a command on a broken connection fails at once and the
/// next one goes over a new connection.
#[derive(Clone)]
pub enum Connection {
    /// One Redis.
    Single(redis::aio::ConnectionManager),
    /// A Redis Cluster.
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(cmd, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// A room's Redis key `chatd:{room}:part`: the braces make the room's name
/// the hash tag (room names never contain braces).
pub fn room_key(room: &str, part: &str) -> String {
    format!("chatd:{{{room}}}:{part}")
}

/// The idempotency key of `owner`'s `client_msg_id` in `room`. User ids
/// contain no ':', so the owner ends at the first ':' after `idem:` (the
/// system's owner, `:room`, starts with one: no user's key looks like it).
fn idempotency_key(room: &str, owner: &str, client_msg_id: &str) -> String {
    room_key(room, &format!("idem:{owner}:{client_msg_id}"))
}

/// The append script (ARCHITECTURE.md, "Cluster mode").
const APPEND_SCRIPT: &str = include_str!("append.lua");

/// The shared log.
pub struct RedisLog {
    target: Target,
    conn: Connection,
    append: redis::Script,
    options: Options,
}

impl RedisLog {
    /// Connects to `target` and checks that it keeps what it acknowledges
    /// (unless `options.durability` is relaxed).
    pub async fn open(target: &Target, options: Options) -> Result<RedisLog, OpenError> {
        let unreachable = |url: &str| {
            let url = url.to_string();
            move |error| OpenError::Unreachable { url, error }
        };
        let conn = match target {
            Target::Single(url) => {
                let client = redis::Client::open(url.as_str()).map_err(unreachable(url))?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(500));
                Connection::Single(
                    redis::aio::ConnectionManager::new_with_config(client, config).await.map_err(unreachable(url))?,
                )
            }
            Target::Cluster(seeds) => {
                let client = redis::cluster::ClusterClient::builder(seeds.clone())
                    .response_timeout(RESPONSE_TIMEOUT)
                    .connection_timeout(CONNECT_TIMEOUT)
                    .build()
                    .map_err(unreachable(&seeds[0]))?;
                Connection::Cluster(client.get_async_connection().await.map_err(unreachable(&seeds[0]))?)
            }
        };
        for url in target.urls() {
            check_durability(&url, options.durability).await?;
        }
        Ok(RedisLog { target: target.clone(), conn, append: redis::Script::new(APPEND_SCRIPT), options })
    }

    /// Where it is.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// How it is run.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// A clone of the command connection (clones share one connection).
    pub fn connection(&self) -> Connection {
        self.conn.clone()
    }

    /// Appends `e` to its room's log and publishes it on the room's channel,
    /// atomically; with replicas configured, answers once `WAIT` has them.
    pub async fn append(&self, e: &NewEntry<'_>, epoch: &str) -> Result<Appended, AppendError> {
        let mut all = self.append_all(std::slice::from_ref(e), epoch).await;
        all.pop().unwrap_or_else(|| Err(AppendError::Unavailable("no answer".into())))
    }

    /// [`RedisLog::append`] of every entry of `entries`, in one pipeline
    /// (one round trip, one fsync of Redis's log for all of them), run in
    /// order; answers each in order. On a Redis Cluster, whose pipelines
    /// must stay in one slot, each room's entries are a pipeline of their
    /// own, sent together.
    pub async fn append_all(&self, entries: &[NewEntry<'_>], epoch: &str) -> Vec<Result<Appended, AppendError>> {
        let mut groups: Vec<Vec<usize>> = Vec::new();
        if self.target.is_cluster() {
            let mut by_room: Vec<(&str, Vec<usize>)> = Vec::new();
            for (i, e) in entries.iter().enumerate() {
                match by_room.iter_mut().find(|(r, _)| *r == e.room) {
                    Some((_, g)) => g.push(i),
                    None => by_room.push((e.room, vec![i])),
                }
            }
            groups.extend(by_room.into_iter().map(|(_, g)| g));
        } else if !entries.is_empty() {
            groups.push((0..entries.len()).collect());
        }
        let runs = groups.iter().map(|g| {
            let group: Vec<&NewEntry<'_>> = g.iter().map(|i| &entries[*i]).collect();
            async move { self.append_group(&group, epoch).await }
        });
        let answers = futures_util::future::join_all(runs).await;
        let mut out: Vec<Option<Result<Appended, AppendError>>> = (0..entries.len()).map(|_| None).collect();
        for (g, answer) in groups.iter().zip(answers) {
            for (i, a) in g.iter().zip(answer) {
                out[*i] = Some(a);
            }
        }
        out.into_iter().map(|a| a.unwrap_or_else(|| Err(AppendError::Unavailable("no answer".into())))).collect()
    }

    /// One pipeline of appends to one slot (or one Redis), then `WAIT`.
    async fn append_group(&self, group: &[&NewEntry<'_>], epoch: &str) -> Vec<Result<Appended, AppendError>> {
        let mut conn = self.conn.clone();
        let mut answers = self.run_scripts(&mut conn, group, epoch).await;
        // A Redis that restarted has lost its script cache: NOSCRIPT, and
        // nothing of the pipeline ran. Loaded, the pipeline runs again.
        if answers.iter().any(|a| matches!(a, Err(e) if e.code() == Some("NOSCRIPT"))) {
            let load = redis::cmd("SCRIPT").arg("LOAD").arg(APPEND_SCRIPT).query_async::<String>(&mut conn).await;
            if let Err(e) = load {
                let failed = AppendError::Unavailable(e.to_string());
                return group.iter().map(|_| Err(failed.clone())).collect();
            }
            answers = self.run_scripts(&mut conn, group, epoch).await;
        }
        let mut out: Vec<Result<Appended, AppendError>> = answers
            .into_iter()
            .map(|a| match a {
                Ok((answer, seq, ts_ms, epoch)) => {
                    Ok(Appended { seq, ts_ms, duplicate: answer == 0, unchanged: answer == 2, epoch })
                }
                Err(err) if err.code() == Some("FORBIDDEN") => {
                    Err(AppendError::Forbidden(err.detail().unwrap_or("not a member").to_string()))
                }
                Err(err) if err.code() == Some("NOTFOUND") => {
                    Err(AppendError::NotFound(err.detail().unwrap_or("the message was deleted").to_string()))
                }
                Err(err) => Err(AppendError::Unavailable(err.to_string())),
            })
            .collect();
        if self.options.replicas > 0 && out.iter().any(Result::is_ok) {
            // WAIT covers every write this connection sent before it,
            // these appends' among them.
            let timeout = self.options.replica_timeout.as_millis() as u64;
            let wanted = self.options.replicas;
            let got: Result<u32, _> = redis::cmd("WAIT").arg(wanted).arg(timeout).query_async(&mut conn).await;
            let failed = match got {
                Ok(got) if got >= wanted => None,
                Ok(got) => Some(AppendError::NotReplicated { wanted, got }),
                Err(e) => Some(AppendError::Unavailable(e.to_string())),
            };
            if let Some(failed) = failed {
                for a in out.iter_mut().filter(|a| a.is_ok()) {
                    *a = Err(failed.clone());
                }
            }
        }
        out
    }

    /// The append script for each of `group`, pipelined; each answer as
    /// Redis gave it (a whole failure answers every one with it).
    async fn run_scripts(
        &self,
        conn: &mut Connection,
        group: &[&NewEntry<'_>],
        epoch: &str,
    ) -> Vec<redis::RedisResult<(u8, u64, u64, String)>> {
        let publish = if self.target.is_cluster() { "SPUBLISH" } else { "PUBLISH" };
        let window = self.options.idempotency_window.as_secs().max(1);
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for e in group {
            pipe.cmd("EVALSHA")
                .arg(self.append.get_hash())
                .arg(5)
                .arg(room_key(e.room, "meta"))
                .arg(room_key(e.room, "log"))
                .arg(idempotency_key(e.room, e.owner, e.client_msg_id))
                .arg(room_key(e.room, "members"))
                .arg(room_key(e.room, "changes"))
                .arg(e.message)
                .arg(e.member)
                .arg(if e.client_msg_id.is_empty() { "0" } else { "1" })
                .arg(window)
                .arg(room_key(e.room, "ch"))
                .arg(publish)
                .arg(e.seen)
                .arg(epoch)
                .arg(e.change.map_or("", |c| c.op))
                .arg(e.change.map_or(0, |c| c.target))
                .arg(e.change.map_or("", |c| c.field.as_str()));
        }
        match pipe.query_async::<Vec<redis::RedisResult<(u8, u64, u64, String)>>>(conn).await {
            Ok(answers) if answers.len() == group.len() => answers,
            Ok(answers) => {
                let e = RedisError::from((
                    redis::ErrorKind::Parse,
                    "a pipeline of appends got the wrong number of answers",
                    format!("{} for {}", answers.len(), group.len()),
                ));
                group.iter().map(|_| Err(e.clone())).collect()
            }
            Err(e) => group.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    /// The entries of `room` with `from <= seq <= to`, ascending. Entries
    /// that are not there (trimmed, or lost with Redis) are simply absent.
    pub async fn range(&self, room: &str, from: u64, to: u64) -> Result<Vec<LogEntry>, RedisError> {
        match self.try_range(room, from, to).await {
            // The first command after Redis came back fails on the old
            // connection and reconnects; a read is safe to ask again.
            Err(e) if e.is_unrecoverable_error() => self.try_range(room, from, to).await,
            r => r,
        }
    }

    async fn try_range(&self, room: &str, from: u64, to: u64) -> Result<Vec<LogEntry>, RedisError> {
        let mut out = Vec::new();
        let mut conn = self.conn.clone();
        let key = room_key(room, "log");
        let mut next = from.max(1);
        while next <= to {
            let rows: Vec<StreamRow> = redis::cmd("XRANGE")
                .arg(&key)
                .arg(format!("{next}-0"))
                .arg(format!("{to}-0"))
                .arg("COUNT")
                .arg(RANGE_STEP)
                .query_async(&mut conn)
                .await?;
            let n = rows.len();
            for (id, fields) in rows {
                let seq = parse_id(&id).ok_or_else(|| corrupt(format!("{key}: entry ID {id:?}")))?;
                let message = fields
                    .into_iter()
                    .find(|(f, _)| f == "m")
                    .map(|(_, v)| Bytes::from(v))
                    .ok_or_else(|| corrupt(format!("{key}: entry {id} has no message")))?;
                next = seq + 1;
                out.push(LogEntry { seq, message });
            }
            if n < RANGE_STEP {
                break;
            }
        }
        Ok(out)
    }

    /// The room's head (0 for a room with no entries) and epoch.
    pub async fn head(&self, room: &str) -> Result<(u64, Option<String>), RedisError> {
        let cmd = redis::cmd("HMGET").arg(room_key(room, "meta")).arg("head").arg("epoch").clone();
        let (head, epoch): (Option<u64>, Option<String>) = match cmd.query_async(&mut self.conn.clone()).await {
            Err(e) if e.is_unrecoverable_error() => cmd.query_async(&mut self.conn.clone()).await?,
            r => r?,
        };
        Ok((head.unwrap_or(0), epoch))
    }

    /// Sets `user`'s role in `room` as the append script checks it (0: not
    /// a member).
    pub async fn set_role(&self, room: &str, user: &str, role: i32) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        let key = room_key(room, "members");
        if role == 0 {
            redis::cmd("HDEL").arg(key).arg(user).query_async(&mut conn).await
        } else {
            redis::cmd("HSET").arg(key).arg(user).arg(role).query_async(&mut conn).await
        }
    }
}

/// A fresh epoch: 16 hex digits from the clock and the process, distinct
/// across nodes and restarts.
pub fn fresh_epoch() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// An `XRANGE` row: the entry's ID and its field-value pairs.
type StreamRow = (String, Vec<(String, Vec<u8>)>);

/// `<seq>-0` → seq.
fn parse_id(id: &str) -> Option<u64> {
    id.strip_suffix("-0")?.parse().ok()
}

fn corrupt(what: String) -> RedisError {
    RedisError::from((redis::ErrorKind::Parse, "malformed chatd log entry", what))
}

/// Refuses a Redis that would acknowledge an append it has not fsync'ed,
/// unless `durability` is relaxed (then only says so).
async fn check_durability(url: &str, durability: Durability) -> Result<(), OpenError> {
    let unreachable = |error| OpenError::Unreachable { url: url.to_string(), error };
    let client = redis::Client::open(url).map_err(unreachable)?;
    let mut conn = client.get_multiplexed_async_connection().await.map_err(unreachable)?;
    let get = |name: &'static str| redis::cmd("CONFIG").arg("GET").arg(name).clone();
    let (_, appendonly): (String, String) = get("appendonly").query_async(&mut conn).await.map_err(unreachable)?;
    let (_, appendfsync): (String, String) = get("appendfsync").query_async(&mut conn).await.map_err(unreachable)?;
    if appendonly == "yes" && appendfsync == "always" {
        return Ok(());
    }
    match durability {
        Durability::Strict => Err(OpenError::NotDurable { url: url.to_string(), appendonly, appendfsync }),
        Durability::Relaxed => {
            tracing::warn!(
                redis = url,
                appendonly,
                appendfsync,
                "--cluster-durability relaxed: this Redis acknowledges appends before they are on disk; acknowledged messages may be lost with it"
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(Target::parse("redis://127.0.0.1:6379"), Ok(Target::Single("redis://127.0.0.1:6379".into())));
        assert_eq!(
            Target::parse("redis+cluster://a:1, b:2"),
            Ok(Target::Cluster(vec!["redis://a:1".into(), "redis://b:2".into()]))
        );
        assert_eq!(
            Target::parse("redis://a:1,redis://b:2"),
            Ok(Target::Cluster(vec!["redis://a:1".into(), "redis://b:2".into()]))
        );
        assert!(Target::parse("").is_err());
        assert!(Target::parse("http://a:1").is_err());
        assert!(Target::parse("redis+cluster://").is_err());
    }

    #[test]
    fn keys_share_the_rooms_slot() {
        assert_eq!(room_key("general", "log"), "chatd:{general}:log");
        assert_eq!(idempotency_key("r", "ann", "k:1"), "chatd:{r}:idem:ann:k:1");
        assert_eq!(idempotency_key("r", ":r", "k"), "chatd:{r}:idem::r:k");
        assert_eq!(parse_id("42-0"), Some(42));
        assert_eq!(parse_id("42-1"), None);
        assert_ne!(fresh_epoch(), fresh_epoch());
    }
}
