-- Several calls of one script in a single run: how a pipeline of calls goes to a single server
-- (listenerpool.scripts.call_many), one command to pack and one reply to parse instead of one
-- per call. The script's own text replaces the marker line below, as the body of ``call``:
-- its KEYS and ARGV are then those of one call.
-- KEYS: every call's keys, in order
-- ARGV: the number of calls n, then per call: its number of keys and of arguments, then every
--       call's arguments, in order
-- Returns each call's reply, in order; a call that raised an error replies with that error,
-- and the others are unaffected, as when each is sent on its own.
local function call(KEYS, ARGV)
--@body
end
local n = tonumber(ARGV[1])
local replies = {}
local k, a = 0, 1 + 2 * n
for i = 1, n do
  local nk, na = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local keys, args = {}, {}
  for j = 1, nk do
    keys[j] = KEYS[k + j]
  end
  for j = 1, na do
    args[j] = ARGV[a + j]
  end
  k, a = k + nk, a + na
  local ok, reply = pcall(call, keys, args)
  if not ok then
    reply = redis.error_reply(type(reply) == 'table' and reply.err or tostring(reply))
  elseif reply == nil then
    reply = false
  end
  replies[i] = reply
end
return replies
