-- Give a lease back if it is still ours, recording why.
-- KEYS: lease, spec, state (one session: one hash slot)
-- ARGV: lease_value, final_state ('stopped' | 'failed' | 'handoff'), reason
-- Returns 0 not ours, 1 released and due for a new reader at once (a desired session handed
-- off), 2 released and not to be restarted. Either way the caller then marks the session due
-- in the lease index, so a reconciler claims it (1) or drops its entry (2) without waiting
-- for the TTL.
local lease, spec, state = KEYS[1], KEYS[2], KEYS[3]
local value, final, reason = ARGV[1], ARGV[2], ARGV[3]
if redis.call('GET', lease) ~= value then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('DEL', lease)
redis.call('HSET', state, 'state', final, 'owner', '', 'last_error', reason, 'since', now)
if final ~= 'failed' and redis.call('HGET', spec, 'desired') == '1' then
  return 1
end
return 2
