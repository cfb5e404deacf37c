-- Give a lease back if it is still ours, recording why.
-- KEYS: lease, spec, state, lease_deadlines
-- ARGV: lease_value, sid, final_state ('stopped' | 'failed' | 'handoff'), reason
-- A still-desired session that is handed off (not failed) is marked due at once so any
-- reconciler claims it without waiting for the TTL. Returns 1 released, 0 not ours.
local lease, spec, state, deadlines = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local value, sid, final, reason = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('GET', lease) ~= value then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('DEL', lease)
if final ~= 'failed' and redis.call('HGET', spec, 'desired') == '1' then
  redis.call('ZADD', deadlines, 0, sid)
else
  redis.call('ZREM', deadlines, sid)
end
redis.call('HSET', state, 'state', final, 'owner', '', 'last_error', reason, 'since', now)
return 1
