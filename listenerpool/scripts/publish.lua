-- The only write path for events: publish a batch if the caller still owns the session.
-- KEYS: lease, spec, state, events, live (one session: one hash slot; live is a sharded channel)
-- ARGV: lease_value, epoch, maxlen, history_ttl_ms, last_id, expected_seq, then per event:
--       event_type, data, upstream_id, envelope_head, envelope_tail
-- The live envelope is head .. seq .. tail: seq is only known here. ``expected_seq`` is the seq
-- the caller believes is the last one: a batch applied once already (a reply lost to a
-- connection error, then the call re-sent) does not match and is not applied twice.
-- Returns the last seq written, -1 when the caller is not the owner, -2 when the session's spec
-- is gone (Redis lost its data; the owner may re-assert, see reassert.lua), -3 when the last seq
-- is not ``expected_seq`` (the caller must read its position again). Nothing is written unless
-- a seq is returned.
local lease, spec, state, events, live = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local value, epoch, maxlen, ttl, last_id = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local expected = tonumber(ARGV[6])
local current = redis.call('HGET', spec, 'epoch')
if not current then
  return -2
end
if redis.call('GET', lease) ~= value or current ~= epoch then
  return -1
end
if (tonumber(redis.call('HGET', state, 'seq')) or 0) ~= expected then
  return -3
end
local seq = 0
for i = 7, #ARGV, 5 do
  seq = redis.call('HINCRBY', state, 'seq', 1)
  redis.call('XADD', events, 'MAXLEN', '~', maxlen, seq .. '-0',
    'seq', seq, 'epoch', epoch, 'event', ARGV[i], 'data', ARGV[i + 1], 'uid', ARGV[i + 2])
  redis.call('SPUBLISH', live, ARGV[i + 3] .. seq .. ARGV[i + 4])
end
redis.call('HSET', state, 'last_id', last_id)
redis.call('PEXPIRE', events, ttl)
return seq
