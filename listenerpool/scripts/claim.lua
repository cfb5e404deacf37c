-- Claim a session's lease, either for a new desire (PUT) or for the reconciler.
-- KEYS: spec, lease, cancel, state (one session: one hash slot)
-- ARGV: mode ('put' | 'reconcile'), token, ttl_ms, url, headers_json
-- Returns {outcome, epoch, due_ms}; the caller enqueues a listen job only for 'created' and
-- 'claimed'. due_ms is how long until the session may need the reconciler (the lease's or the
-- tombstone's remaining time); the caller writes it to the lease index (see index.py).
-- A PUT whose url or headers differ from the stored ones bumps the spec's revision (``rev``):
-- the holder's renewals report the change (renew.lua), so its reader reconnects with the new
-- spec within a renewal interval even when the 'reconnect' notice is lost.
local spec, lease, cancel, state = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local mode, token, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function take_lease()
  if not redis.call('SET', lease, '-:' .. token, 'NX', 'PX', ttl) then
    return nil
  end
  local epoch = redis.call('HINCRBY', spec, 'epoch', 1)
  redis.call('HSET', state, 'state', 'pending', 'owner', '', 'epoch', epoch, 'since', now)
  return epoch
end

if mode == 'put' then
  local url, headers = ARGV[4], ARGV[5]
  local old = redis.call('HMGET', spec, 'url', 'headers', 'desired', 'epoch')
  local existed = old[1] ~= false
  local same_spec = old[1] == url and old[2] == headers
  local was_desired = old[3] == '1'
  redis.call('HSET', spec, 'url', url, 'headers', headers, 'desired', '1', 'updated', now)
  if not same_spec then
    redis.call('HINCRBY', spec, 'rev', 1)
  end
  redis.call('HSETNX', spec, 'created', now)
  local had_tombstone = redis.call('DEL', cancel) == 1
  local pttl = redis.call('PTTL', lease)
  if pttl > 0 then
    local epoch = tonumber(old[4]) or 0
    if had_tombstone or not was_desired then
      -- The previous reader still holds the lease. A new epoch fences it (its publishes and
      -- renewals now fail even if it missed the cancel); the reconciler claims once it goes.
      epoch = redis.call('HINCRBY', spec, 'epoch', 1)
      return {'pending', epoch, pttl}
    end
    if same_spec then
      return {'unchanged', epoch, pttl}
    end
    return {'updated', epoch, pttl}
  end
  local epoch = take_lease()
  if not epoch then
    return {'pending', tonumber(old[4]) or 0, redis.call('PTTL', lease)}
  end
  if existed then
    return {'claimed', epoch, ttl}
  end
  return {'created', epoch, ttl}
end

-- mode == 'reconcile'
local desired = redis.call('HGET', spec, 'desired')
if desired ~= '1' or redis.call('HGET', state, 'state') == 'failed' then
  -- Not wanted, or failed for good (a PUT restarts it): nothing for the reconciler to do.
  return {'gone', 0, 0}
end
local tomb = redis.call('PTTL', cancel)
if tomb > 0 then
  return {'cancelled', 0, tomb}
end
local pttl = redis.call('PTTL', lease)
if pttl > 0 then
  return {'held', tonumber(redis.call('HGET', spec, 'epoch')) or 0, pttl}
end
local epoch = take_lease()
if not epoch then
  return {'held', 0, redis.call('PTTL', lease)}
end
return {'claimed', epoch, ttl}
