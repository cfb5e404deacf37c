-- Extend a lease if it is still ours at our epoch; report a cancel tombstone (backstop to the
-- pub/sub 'cancel' notice) and a changed spec (backstop to the 'reconnect' notice).
-- KEYS: lease, cancel, spec (one session: one hash slot)
-- ARGV: lease_value, ttl_ms, epoch, spec_rev (the spec revision the reader runs with)
-- Returns 1 renewed, 2 renewed but the spec changed since spec_rev (the reader must reconnect
-- with the stored spec), 0 lost (gone, held by another, or fenced by a newer epoch),
-- -1 cancelled, -2 the session's spec is gone: Redis lost its data (the caller may re-assert,
-- see reassert.lua).
-- The caller moves the session's lease index entry to the new deadline afterwards.
local lease, cancel, spec = KEYS[1], KEYS[2], KEYS[3]
local value, ttl, epoch, rev = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
if redis.call('EXISTS', cancel) == 1 then
  return -1
end
local s = redis.call('HMGET', spec, 'epoch', 'rev')
if not s[1] then
  return -2
end
if redis.call('GET', lease) ~= value or s[1] ~= epoch then
  return 0
end
redis.call('PEXPIRE', lease, ttl)
if (tonumber(s[2]) or 0) ~= rev then
  return 2
end
return 1
