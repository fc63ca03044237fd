-- KEYS: processing, dead, then (list, delayed) pairs.  ARGV: now, key prefix.
-- Returns ready (in lists and their lines, or delayed and due), delayed,
-- held, dead, the earliest due time of a due delayed item ("" if none),
-- then the oldest frame of each non-empty list and line (for its age).
-- Lines: see claim.lua.
local now, prefix = tonumber(ARGV[1]), ARGV[2]
local ready, delayed, due, tails = 0, 0, nil, {}
local function count(list, ringing)
  local n = redis.call('LLEN', list)
  -- Rings (lines.lua) are not items; they sit at a list's consuming end.
  local rings = 0
  if ringing and n > 0 then
    rings = #redis.call('LPOS', list, RING, 'RANK', -1, 'COUNT', 0,
                        'MAXLEN', 1000)
  end
  ready = ready + n - rings
  if n > rings then
    tails[#tails + 1] = redis.call('LINDEX', list, -1 - rings)
  end
end
for k = 3, #KEYS, 2 do
  count(KEYS[k], true)
  local spec = string.sub(KEYS[k], #prefix + 3)
  for _, p in ipairs(redis.call('ZRANGE', prefix .. 'levels:' .. spec, 0, -1)) do
    local ring = prefix .. 'ring:' .. spec .. '/' .. p
    for _, pair in ipairs(redis.call('LRANGE', ring, 0, -1)) do
      count(prefix .. 'line:' .. spec .. '/' .. p .. '/' .. pair)
    end
  end
  local waiting = redis.call('ZCARD', KEYS[k + 1])
  local overdue = redis.call('ZCOUNT', KEYS[k + 1], '-inf', now)
  ready = ready + overdue
  delayed = delayed + waiting - overdue
  local first = redis.call('ZRANGE', KEYS[k + 1], 0, 0, 'WITHSCORES')
  if overdue > 0 and (due == nil or tonumber(first[2]) < due) then
    due = tonumber(first[2])
  end
end
local result = {ready, delayed, redis.call('ZCARD', KEYS[1]),
                redis.call('ZCARD', KEYS[2]),
                due and string.format('%.6f', due) or ''}
for _, tail in ipairs(tails) do result[#result + 1] = tail end
return result
