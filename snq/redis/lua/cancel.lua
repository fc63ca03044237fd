-- KEYS: processing, then (list, delayed) pairs.
-- ARGV: key prefix, "id" or "key", its value, a part of the value that
-- every JSON encoder writes as is (frames without it are not decoded).
-- Removes the waiting items whose envelope has that id (or key): from the
-- lists, their lines (see lines.lua) and delayed sets; counts those held
-- by workers, which run to their end.  A removed item leaves the key
-- index (keys.lua).  Returns {removed, running}.
local prefix, field, value, needle = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local removed, running = 0, 0

local function matches(frame)
  if not string.find(frame, needle, 1, true) then return false end
  local ok, item = pcall(cjson.decode, frame)
  return ok and type(item) == 'table' and item[field] == value
end

-- The matching frames of LIST (a list or one of its lines), which the key
-- index names by ORIGIN, the list.
local function sweep(list, origin)
  for _, f in ipairs(redis.call('LRANGE', list, 0, -1)) do
    if matches(f) then
      removed = removed + redis.call('LREM', list, 0, f)
      follow(prefix, f, 'q' .. origin .. '\n' .. f, nil)
    end
  end
end

for k = 2, #KEYS, 2 do
  local list, delayed = KEYS[k], KEYS[k + 1]
  local spec = string.sub(list, #prefix + 3)
  local levels = prefix .. 'levels:' .. spec
  sweep(list, list)
  for _, p in ipairs(redis.call('ZRANGE', levels, 0, -1)) do
    local ring = prefix .. 'ring:' .. spec .. '/' .. p
    for _, pair in ipairs(redis.call('LRANGE', ring, 0, -1)) do
      local line = prefix .. 'line:' .. spec .. '/' .. p .. '/' .. pair
      sweep(line, list)
      if redis.call('EXISTS', line) == 0 then redis.call('LREM', ring, 0, pair) end
    end
    if redis.call('EXISTS', ring) == 0 then redis.call('ZREM', levels, p) end
  end
  for _, m in ipairs(redis.call('ZRANGE', delayed, 0, -1)) do
    local f = delayedFrame(m)
    if matches(f) then
      removed = removed + redis.call('ZREM', delayed, m)
      follow(prefix, f, 'd' .. delayed .. '\n' .. m, nil)
    end
  end
end
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if matches(heldFrame(m)) then running = running + 1 end
end
return {removed, running}
