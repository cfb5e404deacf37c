-- Stop wanting a session: mark it undesired and leave a tombstone that readers and claims obey.
-- KEYS: spec, cancel, lease, state, lease_deadlines, sessions
-- ARGV: sid, tombstone_ttl_ms
-- Returns 0 for an unknown session, 1 when a reader may still run (it will stop), 2 when none does.
local spec, cancel, lease, state, deadlines, sessions = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local sid, tomb = ARGV[1], tonumber(ARGV[2])
if redis.call('EXISTS', spec) == 0 then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', spec, 'desired', '0', 'updated', now)
redis.call('ZADD', sessions, now, sid)
redis.call('SET', cancel, '1', 'PX', tomb)
redis.call('ZREM', deadlines, sid)
local holder = redis.call('GET', lease)
if holder and string.sub(holder, 1, 2) == '-:' then
  -- Claimed but not adopted: no reader runs, and the listen job will find no lease.
  redis.call('DEL', lease)
  holder = false
end
if holder then
  redis.call('HSET', state, 'state', 'stopping', 'since', now)
  return 1
end
redis.call('HSET', state, 'state', 'stopped', 'owner', '', 'since', now)
return 2
