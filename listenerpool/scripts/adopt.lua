-- A worker takes a dequeued listen job: the lease must still be the unassigned one the job names.
-- KEYS: spec, lease, cancel, state (one session: one hash slot)
-- ARGV: token, epoch, worker_id, ttl_ms
-- Returns {1, url, headers_json, last_id, seq, rev} or {0, reason} (rev: the spec's revision,
-- which the reader then renews against, see renew.lua). The lease index is not touched (it
-- is in another slot): the claim left an entry due when the unadopted lease lapses, and the
-- worker moves it to this lease's deadline right after (Worker._track_adopted), then its
-- renewals move it on (a cancelled session's entry is dropped by the reconciler when due).
local spec, lease, cancel, state = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local token, epoch, worker, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

if redis.call('GET', lease) ~= '-:' .. token then
  return {0, 'stale'}
end
local s = redis.call('HMGET', spec, 'url', 'headers', 'desired', 'epoch', 'rev')
if redis.call('EXISTS', cancel) == 1 or s[3] ~= '1' then
  redis.call('DEL', lease)
  redis.call('HSET', state, 'state', 'stopped', 'owner', '', 'since', now)
  return {0, 'cancelled'}
end
if s[4] ~= epoch then
  return {0, 'stale'}
end
redis.call('SET', lease, worker .. ':' .. token, 'PX', ttl)
redis.call('HSET', state, 'state', 'connecting', 'owner', worker, 'epoch', epoch, 'since', now)
local st = redis.call('HMGET', state, 'last_id', 'seq')
return {1, s[1], s[2], st[1] or '', st[2] or '0', s[5] or '0'}
