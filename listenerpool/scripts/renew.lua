-- Extend a lease if it is still ours at our epoch; report a cancel tombstone (backstop to the
-- pub/sub notice).
-- KEYS: lease, cancel, spec (one session: one hash slot)
-- ARGV: lease_value, ttl_ms, epoch
-- Returns 1 renewed, 0 lost (gone, held by another, or fenced by a newer epoch), -1 cancelled,
-- -2 the session's spec is gone: Redis lost its data (the caller may re-assert, see reassert.lua).
-- The caller moves the session's lease index entry to the new deadline afterwards.
local lease, cancel, spec = KEYS[1], KEYS[2], KEYS[3]
local value, ttl, epoch = ARGV[1], tonumber(ARGV[2]), ARGV[3]
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
redis.call('PEXPIRE', lease, ttl)
return 1
