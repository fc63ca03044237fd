-- KEYS: processing, then one list per member.
-- ARGV: a score cutoff ("" = none), then (member, frame) pairs.
-- Puts still-held members back at the consuming end of their lists: a
-- release (no cutoff) or the reaper (only what expired before the cutoff,
-- so a lease renewed meanwhile is left alone).  Returns how many moved.
local cutoff = tonumber(ARGV[1])
local moved = 0
for i = 2, #ARGV, 2 do
  local m = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], m)
  if score and (cutoff == nil or tonumber(score) < cutoff) then
    redis.call('ZREM', KEYS[1], m)
    redis.call('RPUSH', KEYS[i / 2 + 1], ARGV[i + 1])
    moved = moved + 1
  end
end
return moved
