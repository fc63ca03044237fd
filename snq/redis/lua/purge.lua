-- KEYS: dead.  ARGV: ids, or nothing for all.  Returns how many went.
if #ARGV == 0 then
  local n = redis.call('ZCARD', KEYS[1])
  redis.call('DEL', KEYS[1])
  return n
end
local n = 0
for _, id in ipairs(ARGV) do
  n = n + redis.call('ZREMRANGEBYSCORE', KEYS[1], id, id)
end
return n
