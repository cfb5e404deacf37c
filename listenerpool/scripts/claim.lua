-- Claim a session's lease, either for a new desire (PUT) or for the reconciler.
-- KEYS: spec, lease, cancel, state, lease_deadlines, sessions
-- ARGV: mode ('put' | 'reconcile'), sid, token, ttl_ms, url, headers_json
-- Returns {outcome, epoch}; the caller enqueues a listen job only for 'created' and 'claimed'.
local spec, lease, cancel, state, deadlines, sessions = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local mode, sid, token, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function take_lease()
  if not redis.call('SET', lease, '-:' .. token, 'NX', 'PX', ttl) then
    return nil
  end
  local epoch = redis.call('HINCRBY', spec, 'epoch', 1)
  redis.call('ZADD', deadlines, now + ttl, sid)
  redis.call('HSET', state, 'state', 'pending', 'owner', '', 'epoch', epoch, 'since', now)
  return epoch
end

if mode == 'put' then
  local url, headers = ARGV[5], ARGV[6]
  local old = redis.call('HMGET', spec, 'url', 'headers', 'desired', 'epoch')
  local existed = old[1] ~= false
  local same_spec = old[1] == url and old[2] == headers
  local was_desired = old[3] == '1'
  redis.call('HSET', spec, 'url', url, 'headers', headers, 'desired', '1', 'updated', now)
  redis.call('HSETNX', spec, 'created', now)
  redis.call('ZADD', sessions, now, sid)
  local had_tombstone = redis.call('DEL', cancel) == 1
  local pttl = redis.call('PTTL', lease)
  if pttl > 0 then
    local epoch = tonumber(old[4]) or 0
    if had_tombstone or not was_desired then
      -- The previous reader still holds the lease. A new epoch fences it (its publishes and
      -- renewals now fail even if it missed the cancel); the reconciler claims once it goes.
      epoch = redis.call('HINCRBY', spec, 'epoch', 1)
      redis.call('ZADD', deadlines, now + pttl, sid)
      return {'pending', epoch}
    end
    if same_spec then
      return {'unchanged', epoch}
    end
    return {'updated', epoch}
  end
  local epoch = take_lease()
  if not epoch then
    return {'pending', tonumber(old[4]) or 0}
  end
  if existed then
    return {'claimed', epoch}
  end
  return {'created', epoch}
end

-- mode == 'reconcile'
local desired = redis.call('HGET', spec, 'desired')
if desired ~= '1' then
  redis.call('ZREM', deadlines, sid)
  return {'gone', 0}
end
local tomb = redis.call('PTTL', cancel)
if tomb > 0 then
  redis.call('ZADD', deadlines, now + tomb, sid)
  return {'cancelled', 0}
end
local pttl = redis.call('PTTL', lease)
if pttl > 0 then
  redis.call('ZADD', deadlines, now + pttl, sid)
  return {'held', tonumber(redis.call('HGET', spec, 'epoch')) or 0}
end
local epoch = take_lease()
if not epoch then
  return {'held', 0}
end
return {'claimed', epoch}
