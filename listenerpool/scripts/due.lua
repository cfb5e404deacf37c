-- The reconciler's view of one lease index bucket, by the clock of the server holding it.
-- KEYS: lease_index, intact marker (one bucket: one hash slot)
-- ARGV: limit
-- Returns {now_ms, first_score, marker, sid, score, sid, score, ...}: the earliest deadline in
-- the bucket ('' when it is empty), the bucket's marker ('' when missing: the bucket was lost
-- and needs a rebuild), then up to ``limit`` entries already due, earliest first. Scores are
-- returned as stored, for untrack.lua to compare.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local reply = {now, first[2] or '', redis.call('GET', KEYS[2]) or ''}
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, ARGV[1])
for i = 1, #due do
  reply[#reply + 1] = due[i]
end
return reply
