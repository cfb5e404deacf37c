-- Stop wanting a session: mark it undesired and leave a tombstone that readers and claims obey.
-- KEYS: spec, cancel, lease, state (one session: one hash slot)
-- ARGV: tombstone_ttl_ms
-- Returns 0 for an unknown session, 1 when a reader may still run (it will stop), 2 when none does.
-- The session's lease index entry stays: the reconciler drops it when it comes due.
local spec, cancel, lease, state = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local tomb = tonumber(ARGV[1])
if redis.call('EXISTS', spec) == 0 then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', spec, 'desired', '0', 'updated', now)
redis.call('SET', cancel, '1', 'PX', tomb)
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
