-- Drop lease index entries the reconciler found stale (the session is not desired, or failed),
-- each only if it still has the score the reconciler read: an entry written since (a new
-- claim wrote a later deadline first) stays, so a live lease never loses its entry.
-- KEYS: lease_index (one bucket: one hash slot)
-- ARGV: sid, score, sid, score, ...
-- Returns how many entries were removed.
local removed = 0
for i = 1, #ARGV, 2 do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return removed
