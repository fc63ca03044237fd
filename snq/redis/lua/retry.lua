-- KEYS: processing, delayed.  ARGV: member, due time, delayed member, key
-- prefix.  The key index entry (keys.lua) follows the item.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
  follow(ARGV[4], delayedFrame(ARGV[3]), 'r' .. ARGV[1],
         'd' .. KEYS[2] .. '\n' .. ARGV[3])
  return 1
end
return 0
