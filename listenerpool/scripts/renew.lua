-- Extend a lease if it is still ours; report a cancel tombstone (backstop to the pub/sub notice).
-- KEYS: lease, cancel, lease_deadlines
-- ARGV: lease_value, ttl_ms, sid
-- Returns 1 renewed, 0 lost (gone or held by another), -1 cancelled.
local lease, cancel, deadlines = KEYS[1], KEYS[2], KEYS[3]
local value, ttl, sid = ARGV[1], tonumber(ARGV[2]), ARGV[3]
if redis.call('EXISTS', cancel) == 1 then
  return -1
end
if redis.call('GET', lease) ~= value then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('PEXPIRE', lease, ttl)
redis.call('ZADD', deadlines, now + ttl, sid)
return 1
