-- Extend a lease if it is still ours at our epoch; report a cancel tombstone (backstop to the
-- pub/sub notice).
-- KEYS: lease, cancel, lease_deadlines, spec
-- ARGV: lease_value, ttl_ms, sid, epoch
-- Returns 1 renewed, 0 lost (gone, held by another, or fenced by a newer epoch), -1 cancelled,
-- -2 the session's spec is gone: Redis lost its data (the caller may re-assert, see reassert.lua).
local lease, cancel, deadlines, spec = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local value, ttl, sid, epoch = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
if redis.call('EXISTS', cancel) == 1 then
  return -1
end
local current = redis.call('HGET', spec, 'epoch')
if not current then
  return -2
end
if redis.call('GET', lease) ~= value or current ~= epoch then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('PEXPIRE', lease, ttl)
redis.call('ZADD', deadlines, now + ttl, sid)
return 1
