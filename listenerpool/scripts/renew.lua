-- Extend a lease if it is still ours at our epoch; report a cancel tombstone (backstop to the
-- pub/sub notice).
-- KEYS: lease, cancel, lease_deadlines, spec
-- ARGV: lease_value, ttl_ms, sid, epoch
-- Returns 1 renewed, 0 lost (gone, held by another, or fenced by a newer epoch), -1 cancelled.
local lease, cancel, deadlines, spec = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local value, ttl, sid, epoch = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
if redis.call('EXISTS', cancel) == 1 then
  return -1
end
if redis.call('GET', lease) ~= value or redis.call('HGET', spec, 'epoch') ~= epoch then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('PEXPIRE', lease, ttl)
redis.call('ZADD', deadlines, now + ttl, sid)
return 1
