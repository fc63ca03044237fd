-- KEYS: processing, dead, dead id counter.  ARGV: member, record (a JSON
-- object without its id), key prefix.  Returns the dead letter's id, 0 if
-- the item was no longer held (its lease expired and someone else has it).
-- A dead letter leaves the key index (keys.lua).
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  follow(ARGV[3], heldFrame(ARGV[1]), 'r' .. ARGV[1], nil)
  local id = redis.call('INCR', KEYS[3])
  redis.call('ZADD', KEYS[2], id, '{"id":' .. id .. ',' .. string.sub(ARGV[2], 2))
  return id
end
return 0
