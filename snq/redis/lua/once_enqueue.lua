-- The ledger's claims with their items, together: an item is enqueued only
-- if its name was not claimed yet, and its name claimed only with it.
-- KEYS: the n ledger names, then unique.lua's keys.  ARGV: n, ttl in
-- milliseconds, then unique.lua's ARGV (item i for name i).  A keyed item
-- of a unique transport is enqueued as unique.lua says, its name claimed
-- all the same (as on SQL).
-- Returns the numbers (1-based) of the items whose names were claimed.
local n = tonumber(ARGV[1])
local take = uniqueStore(n, 3)
local new = {}
for i = 1, n do
  if redis.call('SET', KEYS[i], '', 'NX', 'PX', ARGV[2]) then
    take(i)
    new[#new + 1] = i
  end
end
return new
