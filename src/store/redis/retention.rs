//! Retention in cluster mode: where a room's stream now starts, decided in
//! Redis so that every node agrees (ARCHITECTURE.md, "Cluster mode").
//!
//! A room's trim record — the first seq kept and the unread counters
//! through the entry before it, as on one node (`store::retention`) — is
//! kept in `chatd:{room}:trim`, its start in the room's meta hash. One
//! node at a time trims (`chatd:retention`, a lease for one pass): it
//! advances the record over the stream's oldest entries and then, in one
//! script, writes the record, cuts the stream below its start (`XTRIM
//! MINID`) and publishes `trim` on the room's channel — only if the start
//! is still the one it read, so two passes can never cut twice. The nodes
//! serving the room read the record and drop their replica's entries below
//! it; a node that attaches the room later starts its replica from it. What
//! the append script keeps of the trimmed messages' changes goes too.

use prost::Message as _;
use redis::RedisError;

use super::{RedisLog, room_key};
use crate::store::TrimRecord;

/// The payload published on a room's channel after its stream was trimmed.
pub const TRIM_NOTICE: &[u8] = b"trim";

/// The lease of the node trimming the rooms.
const LEASE: &str = "chatd:retention";

impl RedisLog {
    /// `room`'s trim record (the default one while it was never trimmed).
    pub async fn trim_record(&self, room: &str) -> Result<TrimRecord, RedisError> {
        let raw: Option<Vec<u8>> =
            redis::cmd("GET").arg(room_key(room, "trim")).query_async(&mut self.connection()).await?;
        match raw {
            None => Ok(TrimRecord::default()),
            Some(v) => TrimRecord::decode(&v[..]).map_err(|e| {
                RedisError::from((redis::ErrorKind::Parse, "malformed trim record", format!("{room}: {e}")))
            }),
        }
    }

    /// Makes `record` `room`'s trim record and cuts its stream below the
    /// record's start, telling the nodes serving it — if the room's start
    /// is still `from`. False when another trim got there first.
    pub async fn trim_to(&self, room: &str, from: u64, record: &TrimRecord) -> Result<bool, RedisError> {
        /// KEYS: meta, trim record, stream. ARGV: the start expected, the
        /// new start, the record, the channel, PUBLISH or SPUBLISH.
        const TRIM: &str = r"
local start = tonumber(redis.call('HGET', KEYS[1], 'start') or '1')
if start ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[1], 'start', ARGV[2])
redis.call('XTRIM', KEYS[3], 'MINID', ARGV[2] .. '-0')
redis.call(ARGV[5], ARGV[4], 'trim')
return 1";
        let publish = if self.target().is_cluster() { "SPUBLISH" } else { "PUBLISH" };
        let done: i64 = redis::Script::new(TRIM)
            .key(room_key(room, "meta"))
            .key(room_key(room, "trim"))
            .key(room_key(room, "log"))
            .arg(from)
            .arg(record.start())
            .arg(record.encode_to_vec())
            .arg(room_key(room, "ch"))
            .arg(publish)
            .invoke_async(&mut self.connection())
            .await?;
        Ok(done == 1)
    }

    /// Forgets what the append script keeps of changes to `room`'s
    /// messages below `start` (`:changes`: deletes and reactions), once
    /// retention removed them: no change to them can be made any more.
    /// Returns how many records went.
    pub async fn forget_changes_below(&self, room: &str, start: u64) -> Result<usize, RedisError> {
        let key = room_key(room, "changes");
        let mut conn = self.connection();
        let mut cursor = "0".to_string();
        let mut forgotten = 0;
        loop {
            let (next, pairs): (String, Vec<String>) =
                redis::cmd("HSCAN").arg(&key).arg(&cursor).arg("COUNT").arg(1000).query_async(&mut conn).await?;
            // Fields are `d:<seq>` and `r:<seq>\n<user>\n<key>`.
            let below: Vec<&String> = pairs
                .iter()
                .step_by(2)
                .filter(|f| {
                    let seq = f.get(2..).and_then(|rest| rest.split('\n').next()).and_then(|s| s.parse::<u64>().ok());
                    seq.is_some_and(|seq| seq < start)
                })
                .collect();
            if !below.is_empty() {
                forgotten += below.len();
                redis::cmd("HDEL").arg(&key).arg(below).exec_async(&mut conn).await?;
            }
            if next == "0" {
                return Ok(forgotten);
            }
            cursor = next;
        }
    }

    /// The first seq `room`'s stream holds (1 while it was never trimmed).
    pub async fn log_start(&self, room: &str) -> Result<u64, RedisError> {
        let start: Option<u64> =
            redis::cmd("HGET").arg(room_key(room, "meta")).arg("start").query_async(&mut self.connection()).await?;
        Ok(start.unwrap_or(1).max(1))
    }

    /// Takes (or keeps) the lease of the retention passes for `ttl_ms` as
    /// `node`; false while another node holds it.
    pub async fn lead_retention(&self, node: &str, ttl_ms: u64) -> Result<bool, RedisError> {
        const LEAD: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1";
        let led: i64 =
            redis::Script::new(LEAD).key(LEASE).arg(node).arg(ttl_ms).invoke_async(&mut self.connection()).await?;
        Ok(led == 1)
    }
}
