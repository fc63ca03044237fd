-- KEYS: dead, then one list per member.  ARGV: (member, frame) pairs.
-- Moves dead letters back to the end of their lists, as new work.
local moved = 0
for i = 1, #ARGV, 2 do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('LPUSH', KEYS[(i + 1) / 2 + 1], ARGV[i + 1])
    moved = moved + 1
  end
end
return moved
