-- Write sessions' entries in one index bucket; both of its sets carry the bucket's hash tag.
-- KEYS: lease_index, sessions_index (one bucket: one hash slot)
-- ARGV: listing ('touch' sets the update time, 'ensure' adds missing entries only, '' leaves
--       the listing alone), then per session: sid, due_ms ('' leaves its lease deadline alone)
-- A lease deadline is now + due_ms by this server's clock: the scores of a bucket all come
-- from one clock and only grow, so untrack.lua (compare-and-remove) sees any write made after
-- the reconciler read an entry as a change.
-- Returns how many sessions were written.
local leases, sessions = KEYS[1], KEYS[2]
local listing = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV, 2 do
  local sid, due = ARGV[i], ARGV[i + 1]
  if due ~= '' then
    redis.call('ZADD', leases, now + tonumber(due), sid)
  end
  if listing == 'touch' then
    redis.call('ZADD', sessions, now, sid)
  elseif listing == 'ensure' then
    redis.call('ZADD', sessions, 'NX', now, sid)
  end
end
return (#ARGV - 1) / 2
