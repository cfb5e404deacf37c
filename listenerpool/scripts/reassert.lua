-- After Redis lost its data (restart without persistence, failover to an empty replica), the
-- worker still running a session's reader writes the session back: spec, lease and state, at an
-- epoch above the one it held, with seq continuing where it left off (the caller then writes
-- the session's index entries, which live in other hash slots).
-- The worker's recent events go back into the history stream, so that clients a little behind
-- at the moment of the loss still find them.
-- KEYS: spec, lease, state, events (one session: one hash slot)
-- ARGV: lease_value, held_epoch, ttl_ms, url, headers_json, seq, last_id, worker_id, phase,
--       maxlen, history_ttl_ms, spec_rev, then per recent event (oldest first): seq, epoch,
--       type, data, uid
-- Returns {1, epoch} when the caller holds the session at `epoch` afterwards (re-asserted now,
-- or earlier by the same holder, or nothing was lost), {0, reason} when it must stop.
local spec, lease, state, events = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local value, held, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local url, headers, seq, last_id = ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7]
local worker, phase, maxlen, history_ttl = ARGV[8], ARGV[9], ARGV[10], tonumber(ARGV[11])
local rev = ARGV[12]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local holder = redis.call('GET', lease)
local s = redis.call('HMGET', spec, 'epoch', 'restored_by')
if s[1] then
  local epoch = tonumber(s[1])
  if holder ~= value then
    return {0, 'held'}
  end
  if epoch == held or (epoch == held + 1 and s[2] == value .. '@' .. epoch) then
    if redis.call('HEXISTS', state, 'seq') == 0 then
      -- Only the state was lost: put the position back.
      redis.call('HSET', state, 'state', phase, 'owner', worker, 'epoch', epoch, 'seq', seq,
        'last_id', last_id, 'since', now)
    end
    return {1, epoch}
  end
  return {0, 'fenced'}
end
if holder and holder ~= value then
  return {0, 'held'}
end
local epoch = held + 1
redis.call('SET', lease, value, 'PX', ttl)
redis.call('HSET', spec, 'url', url, 'headers', headers, 'desired', '1', 'epoch', epoch,
  'rev', rev, 'created', now, 'updated', now, 'restored', now, 'restored_by', value .. '@' .. epoch)
local known = tonumber(redis.call('HGET', state, 'seq')) or 0
if known > seq then
  seq = known
  last_id = redis.call('HGET', state, 'last_id') or last_id
end
redis.call('HSET', state, 'state', phase, 'owner', worker, 'epoch', epoch, 'seq', seq,
  'last_id', last_id, 'since', now)
local top = 0
local last = redis.call('XREVRANGE', events, '+', '-', 'COUNT', 1)
if last[1] then
  top = tonumber(string.match(last[1][1], '^(%d+)'))
end
for i = 13, #ARGV, 5 do
  local n = tonumber(ARGV[i])
  if n > top and n <= seq then
    redis.call('XADD', events, 'MAXLEN', '~', maxlen, n .. '-0', 'seq', n, 'epoch', ARGV[i + 1],
      'event', ARGV[i + 2], 'data', ARGV[i + 3], 'uid', ARGV[i + 4])
    top = n
  end
end
if top > 0 then
  redis.call('PEXPIRE', events, history_ttl)
end
return {1, epoch}
