-- KEYS: processing, then one list per member.
-- ARGV: a score cutoff ("" = none), the key prefix, then (member, frame)
-- pairs.
-- Puts still-held members back at the front of their lines (see
-- lines.lua): a release (no cutoff) or the reaper (only what expired
-- before the cutoff, so a lease renewed meanwhile is left alone), and
-- rings the lists' doorbells (RING, see lines.lua).  The key index entry
-- (keys.lua) follows each item.
-- Returns how many moved.
local cutoff, prefix = tonumber(ARGV[1]), ARGV[2]
local moved, rung = 0, {}
for i = 3, #ARGV, 2 do
  local m = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], m)
  if score and (cutoff == nil or tonumber(score) < cutoff) then
    local list = KEYS[(i - 1) / 2 + 1]
    redis.call('ZREM', KEYS[1], m)
    putInLines(prefix, string.sub(list, #prefix + 3), {ARGV[i + 1]}, true)
    follow(prefix, ARGV[i + 1], 'r' .. m, 'q' .. list .. '\n' .. ARGV[i + 1])
    if not rung[list] then
      redis.call('RPUSH', list, RING)
      rung[list] = true
    end
    moved = moved + 1
  end
end
return moved
