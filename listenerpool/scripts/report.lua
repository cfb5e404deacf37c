-- Record a reader's state fields, only while it still holds the lease (a fenced reader must not
-- overwrite what the new owner reports).
-- KEYS: lease, state
-- ARGV: lease_value, then field, value pairs
-- Returns 1 written, 0 not the owner.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[2], 'since', now, unpack(ARGV, 2))
return 1
