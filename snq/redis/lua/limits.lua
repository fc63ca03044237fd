-- KEYS: limits.  ARGV: (field, value) pairs (see claim.lua).
-- Replaces the sites' weights and the rate limits the claims read.
redis.call('DEL', KEYS[1])
if #ARGV > 0 then redis.call('HSET', KEYS[1], unpack(ARGV)) end
return #ARGV / 2
