-- The ledger's claims with their items, together: an item is pushed only
-- if its name was not claimed yet, and its name claimed only with it.
-- KEYS: the n ledger names, then enqueue.lua's keys (list and delayed set
-- pairs).  ARGV: n, ttl in milliseconds, then enqueue.lua's ARGV (a (pair
-- index, due time or "", frame or delayed member) per item, item i for
-- name i).
-- Returns the numbers (1-based) of the items pushed.
local n = tonumber(ARGV[1])
local new = {}
for i = 1, n do
  if redis.call('SET', KEYS[i], '', 'NX', 'PX', ARGV[2]) then
    local k = n + tonumber(ARGV[3 * i]) * 2 - 1
    local due, frame = ARGV[3 * i + 1], ARGV[3 * i + 2]
    if due == '' then
      redis.call('LPUSH', KEYS[k], frame)
    else
      redis.call('ZADD', KEYS[k + 1], due, frame)
    end
    new[#new + 1] = i
  end
end
return new
