-- The only write path for events: publish a batch if the caller still owns the session.
-- KEYS: lease, spec, state, events, live
-- ARGV: lease_value, epoch, maxlen, history_ttl_ms, last_id, then per event:
--       event_type, data, upstream_id, envelope_head, envelope_tail
-- The live envelope is head .. seq .. tail: seq is only known here.
-- Returns the last seq written, or -1 when the caller is not the owner (nothing written).
local lease, spec, state, events, live = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local value, epoch, maxlen, ttl, last_id = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if redis.call('GET', lease) ~= value or redis.call('HGET', spec, 'epoch') ~= epoch then
  return -1
end
local seq = 0
for i = 6, #ARGV, 5 do
  seq = redis.call('HINCRBY', state, 'seq', 1)
  redis.call('XADD', events, 'MAXLEN', '~', maxlen, seq .. '-0',
    'seq', seq, 'epoch', epoch, 'event', ARGV[i], 'data', ARGV[i + 1], 'uid', ARGV[i + 2])
  redis.call('PUBLISH', live, ARGV[i + 3] .. seq .. ARGV[i + 4])
end
redis.call('HSET', state, 'last_id', last_id)
redis.call('PEXPIRE', events, ttl)
return seq
