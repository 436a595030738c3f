-- Appends one entry to a room's log in one atomic step (ARCHITECTURE.md,
-- "Cluster mode"): the idempotency check, the membership check, the next
-- seq, XADD with the seq as the entry's ID, the idempotency record, and
-- the publish of the entry on the room's channel.
--
-- KEYS[1] the room's meta hash (head, epoch), KEYS[2] its log stream,
-- KEYS[3] the idempotency key of this sender and client_msg_id,
-- KEYS[4] the room's members hash (user -> role; "0" or absent: not one),
-- KEYS[5] the room's changes hash ("d:<seq>": deleted; "r:<seq>\n<user>
-- \n<key>": reacted).
-- ARGV[1] the encoded Message without seq and ts_ms, ARGV[2] the member
-- whose role is checked ("" for the system: no check), ARGV[3] "1" when
-- the publish carries a client_msg_id, ARGV[4] the idempotency window in
-- seconds, ARGV[5] the room's channel, ARGV[6] PUBLISH or SPUBLISH,
-- ARGV[7] the highest seq the calling node has seen in this room,
-- ARGV[8] a fresh epoch, used when the room's meta is missing or behind,
-- ARGV[9] for a change to a message "edit", "del", "add" or "rm" (a
-- reaction), else "", ARGV[10] its target seq, ARGV[11] a reaction's
-- field in the changes hash.
--
-- Returns {1, seq, ts_ms, epoch} for a new entry, {0, seq, ts_ms, epoch}
-- for a key already used, {2, target, 0, epoch} for a reaction already as
-- asked (nothing appended), or an error reply "FORBIDDEN ..." or
-- "NOTFOUND ..." (the target was deleted).

local function varint(n)
  local out = {}
  while n >= 128 do
    out[#out + 1] = string.char(n % 128 + 128)
    n = math.floor(n / 128)
  end
  out[#out + 1] = string.char(n)
  return table.concat(out)
end

if ARGV[3] == '1' then
  local prior = redis.call('GET', KEYS[3])
  if prior then
    local seq, ts = string.match(prior, '^(%d+):(%d+)$')
    return {0, tonumber(seq), tonumber(ts), redis.call('HGET', KEYS[1], 'epoch') or ''}
  end
end

if ARGV[2] ~= '' then
  local role = redis.call('HGET', KEYS[4], ARGV[2])
  if not role or role == '0' then
    return redis.error_reply('FORBIDDEN ' .. ARGV[2] .. ' is not a member')
  end
end

-- A change is decided by the node against its replica, which may lag the
-- log by a moment: what another node changed meanwhile is checked here.
if ARGV[9] ~= '' then
  if redis.call('HEXISTS', KEYS[5], 'd:' .. ARGV[10]) == 1 then
    return redis.error_reply('NOTFOUND message ' .. ARGV[10] .. ' was deleted')
  end
  local unchanged = false
  if ARGV[9] == 'del' then
    redis.call('HSET', KEYS[5], 'd:' .. ARGV[10], '1')
  elseif ARGV[9] == 'add' then
    unchanged = redis.call('HSETNX', KEYS[5], ARGV[11], '1') == 0
  elseif ARGV[9] == 'rm' then
    unchanged = redis.call('HDEL', KEYS[5], ARGV[11]) == 0
  end
  if unchanged then
    return {2, tonumber(ARGV[10]), 0, redis.call('HGET', KEYS[1], 'epoch') or ''}
  end
end

local meta = redis.call('HMGET', KEYS[1], 'head', 'epoch')
local head = tonumber(meta[1]) or 0
local epoch = meta[2]
local seen = tonumber(ARGV[7])
-- A meta that is gone, or behind what a node has seen, means this Redis
-- lost entries (a failover to a replica that lacked them, an emptied
-- instance): seqs go on after the highest one known, and a new epoch
-- tells every node and resume that the log has a hole.
if not epoch or head < seen then
  epoch = ARGV[8]
  if head < seen then
    head = seen
  end
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end

local seq = head + 1
local now = redis.call('TIME')
local ts = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
-- Message.seq is field 2 and Message.ts_ms field 4, both varints: appended
-- to the encoding, they are part of the message as every parser reads it.
local message = ARGV[1] .. '\16' .. varint(seq) .. '\32' .. varint(ts)
redis.call('XADD', KEYS[2], seq .. '-0', 'm', message)
redis.call('HSET', KEYS[1], 'head', seq)
if ARGV[3] == '1' then
  redis.call('SET', KEYS[3], seq .. ':' .. ts, 'EX', ARGV[4])
end
redis.call(ARGV[6], ARGV[5], seq .. ':' .. epoch .. '\n' .. message)
return {1, seq, ts, epoch}
