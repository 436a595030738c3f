//! Who is online across the cluster's nodes, and what passes between them
//! without being stored (presence and typing pushes).
//!
//! Each node writes, per user with sessions on it, how many it has and
//! until when that holds (`chatd:presence:{user}`, node → `devices:until`),
//! keeps its own liveness in `chatd:nodes` (node → until, a sorted set) and
//! the users it wrote in `chatd:node:{node}:users`, and renews them all
//! every third of the TTL. A user's device count is the sum over the
//! entries still valid. A node that stops renewing (it crashed) is reaped
//! by whichever node first removes it from `chatd:nodes`: its entries go,
//! and the users left with no device anywhere are reported, so that their
//! rooms hear they went offline within about one TTL.

use std::sync::Arc;

use redis::RedisError;

use super::{RedisLog, room_key};

/// Every node's liveness: node → until (Unix ms).
const NODES: &str = "chatd:nodes";

/// The node ids and device counts of `user`'s sessions.
fn presence_key(user: &str) -> String {
    format!("chatd:presence:{{{user}}}")
}

/// The users a node has written presence for.
fn users_key(node: &str) -> String {
    format!("chatd:node:{{{node}}}:users")
}

/// The payload prefix of an ephemeral push on a room's channel:
/// `eph:<node>\n<frame>`.
pub const EPHEMERAL_PREFIX: &[u8] = b"eph:";

/// Splits an ephemeral payload (after [`EPHEMERAL_PREFIX`]) into the node
/// that sent it and the frame.
pub fn parse_ephemeral(rest: &[u8]) -> Option<(&str, &[u8])> {
    let nl = rest.iter().position(|b| *b == b'\n')?;
    Some((std::str::from_utf8(&rest[..nl]).ok()?, &rest[nl + 1..]))
}

/// What [`RedisLog::set_devices`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceChange {
    /// The node's own count before (0 if it had none, or it had run out).
    pub before: u32,
    /// The user's devices on the other nodes.
    pub others: u32,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The devices of the entries of a presence hash still valid at `now`.
fn live_devices(entries: &std::collections::HashMap<String, String>, now: u64) -> u32 {
    entries
        .values()
        .filter_map(|v| v.split_once(':'))
        .filter_map(|(d, until)| Some((d.parse::<u32>().ok()?, until.parse::<u64>().ok()?)))
        .filter(|(_, until)| *until > now)
        .map(|(d, _)| d)
        .sum()
}

impl RedisLog {
    /// Sets `node`'s device count of `user` (0 removes it) for `ttl_ms`;
    /// returns what `node` had before and the user's devices on the other
    /// nodes. One script, so that of two nodes where the user's first
    /// sessions start at once, exactly one sees none elsewhere (and says
    /// they came online).
    pub async fn set_devices(
        &self,
        node: &str,
        user: &str,
        devices: u32,
        ttl_ms: u64,
    ) -> Result<DeviceChange, RedisError> {
        /// KEYS: the user's presence hash. ARGV: node, devices, now, until.
        const SET: &str = r"
local before, others = 0, 0
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local d, u = string.match(entries[i + 1], '^(%d+):(%d+)$')
  if d and tonumber(u) > tonumber(ARGV[3]) then
    if entries[i] == ARGV[1] then before = tonumber(d) else others = others + tonumber(d) end
  end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. ARGV[4])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return {before, others}";
        let now = now_ms();
        let (before, others): (u32, u32) = redis::Script::new(SET)
            .key(presence_key(user))
            .arg(node)
            .arg(devices)
            .arg(now)
            .arg(now + ttl_ms)
            .invoke_async(&mut self.connection())
            .await?;
        let mut conn = self.connection();
        let users = redis::cmd(if devices > 0 { "SADD" } else { "SREM" }).arg(users_key(node)).arg(user).to_owned();
        users.exec_async(&mut conn).await?;
        Ok(DeviceChange { before, others })
    }

    /// `user`'s devices on the nodes other than `node`.
    pub async fn devices_elsewhere(&self, node: &str, user: &str) -> Result<u32, RedisError> {
        let mut all: std::collections::HashMap<String, String> =
            redis::cmd("HGETALL").arg(presence_key(user)).query_async(&mut self.connection()).await?;
        all.remove(node);
        Ok(live_devices(&all, now_ms()))
    }

    /// The devices of each of `users` over every node (in their order).
    /// The keys lie in different slots of a Redis Cluster, so each is its
    /// own command; they go together over the multiplexed connection.
    pub async fn devices_of(&self, users: &[Arc<str>]) -> Result<Vec<u32>, RedisError> {
        let now = now_ms();
        let mut out = Vec::with_capacity(users.len());
        for chunk in users.chunks(256) {
            let reads = chunk.iter().map(|u| {
                let mut conn = self.connection();
                async move {
                    let all: std::collections::HashMap<String, String> =
                        redis::cmd("HGETALL").arg(presence_key(u)).query_async(&mut conn).await?;
                    Ok::<_, RedisError>(live_devices(&all, now))
                }
            });
            for n in futures_util::future::join_all(reads).await {
                out.push(n?);
            }
        }
        Ok(out)
    }

    /// Renews `node`'s liveness and its entries for `users` (user, devices)
    /// for another `ttl_ms`; true when `node` was not alive in Redis (it
    /// starts, or was reaped while it could not renew), whose entries are
    /// then gone and must be written anew.
    pub async fn renew_presence(&self, node: &str, users: &[(String, u32)], ttl_ms: u64) -> Result<bool, RedisError> {
        let mut conn = self.connection();
        let until = now_ms() + ttl_ms;
        let added: u32 = redis::cmd("ZADD").arg(NODES).arg(until).arg(node).query_async(&mut conn).await?;
        // Only the entries still there: one removed meanwhile (the user's
        // last session here ended) must not come back.
        const RENEW: &str =
            "if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end";
        let renew = redis::Script::new(RENEW);
        for (user, devices) in users {
            renew
                .key(presence_key(user))
                .arg(node)
                .arg(format!("{devices}:{until}"))
                .invoke_async::<()>(&mut conn)
                .await?;
        }
        Ok(added == 1)
    }

    /// Removes the nodes whose liveness ran out, with their entries;
    /// returns the users who are then online nowhere.
    pub async fn reap_nodes(&self) -> Result<Vec<String>, RedisError> {
        let mut conn = self.connection();
        let now = now_ms();
        let dead: Vec<String> =
            redis::cmd("ZRANGEBYSCORE").arg(NODES).arg("-inf").arg(now).query_async(&mut conn).await?;
        let mut offline = Vec::new();
        for node in dead {
            // Whoever removes it reaps it: one node does, the others skip.
            let removed: u32 = redis::cmd("ZREM").arg(NODES).arg(&node).query_async(&mut conn).await?;
            if removed == 0 {
                continue;
            }
            let users: Vec<String> = redis::cmd("SMEMBERS").arg(users_key(&node)).query_async(&mut conn).await?;
            for user in users {
                redis::cmd("HDEL").arg(presence_key(&user)).arg(&node).exec_async(&mut conn).await?;
                let all: std::collections::HashMap<String, String> =
                    redis::cmd("HGETALL").arg(presence_key(&user)).query_async(&mut conn).await?;
                if live_devices(&all, now) == 0 {
                    offline.push(user);
                }
            }
            redis::cmd("DEL").arg(users_key(&node)).exec_async(&mut conn).await?;
            tracing::warn!(
                node,
                users = offline.len(),
                "a cluster node stopped renewing its presence: its sessions are offline"
            );
        }
        Ok(offline)
    }

    /// Publishes `frame` (a `Presence` or `Typing` push) from `node` to
    /// the other nodes serving `room`.
    pub async fn publish_ephemeral(&self, room: &str, node: &str, frame: &[u8]) -> Result<(), RedisError> {
        let mut payload = Vec::with_capacity(EPHEMERAL_PREFIX.len() + node.len() + 1 + frame.len());
        payload.extend_from_slice(EPHEMERAL_PREFIX);
        payload.extend_from_slice(node.as_bytes());
        payload.push(b'\n');
        payload.extend_from_slice(frame);
        let publish = if self.target().is_cluster() { "SPUBLISH" } else { "PUBLISH" };
        redis::cmd(publish).arg(room_key(room, "ch")).arg(payload).exec_async(&mut self.connection()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_counts_add_up_over_live_entries() {
        let entries: std::collections::HashMap<String, String> =
            [("a", "2:200"), ("b", "1:300"), ("c", "5:50"), ("d", "junk")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        assert_eq!(live_devices(&entries, 100), 3, "c has run out, d is not an entry");
        assert_eq!(live_devices(&entries, 250), 1);
        assert_eq!(parse_ephemeral(b"n1\nframe\nbytes"), Some(("n1", &b"frame\nbytes"[..])));
        assert_eq!(parse_ephemeral(b"no newline"), None);
    }
}
