-- KEYS: processing.  ARGV: key prefix, then members.
-- Settles the members: each leaves processing, and the key index
-- (keys.lua).  Returns how many were still held.
local prefix, n = ARGV[1], 0
for i = 2, #ARGV do
  n = n + redis.call('ZREM', KEYS[1], ARGV[i])
  follow(prefix, heldFrame(ARGV[i]), 'r' .. ARGV[i], nil)
end
return n
