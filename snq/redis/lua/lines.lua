-- Included at the top of the scripts that put frames in line or take
-- them out (claim.lua, return.lua, unique.lua).  A list's items wait in
-- lines, one per priority, transport and site, which exist only while they
-- hold items (an idle site costs nothing).  The lines of the list <prefix>q:SPEC:
--   <prefix>levels:SPEC             the priorities with items (sorted set)
--   <prefix>ring:SPEC/P             "TRANSPORT/SITE" of priority P's lines,
--                                   the next to take its turn at the right
--   <prefix>line:SPEC/P/TRANSPORT/SITE  the frames, the next at the right
-- A frame that is no envelope waits in line "0//", to be claimed and
-- dead-lettered like any other.  RING on a list (a single NUL byte, which
-- no envelope is) only wakes the workers waiting on it (return.lua); a
-- claim drops it.
local RING = '\0'

local function lineName(value)
  if type(value) == 'string' and value ~= '' and
      not string.find(value, '/', 1, true) then
    return value
  end
end

-- A frame's priority and "TRANSPORT/SITE".
local function lane(frame)
  local ok, item = pcall(cjson.decode, frame)
  if not ok or type(item) ~= 'table' then return '0', '/' end
  local priority = item.priority
  if type(priority) ~= 'number' or priority ~= math.floor(priority) or
      math.abs(priority) > 1e15 then
    priority = 0
  end
  local transport = lineName(item.transport)
  local site = lineName(item.site or 'default')
  if not transport or not site then return '0', '/' end
  return string.format('%d', priority), transport .. '/' .. site
end

-- The line of a frame of list SPEC, its priority and "TRANSPORT/SITE".
local function lineOf(prefix, spec, frame)
  local priority, pair = lane(frame)
  return prefix .. 'line:' .. spec .. '/' .. priority .. '/' .. pair,
         priority, pair
end

-- Put a frame of list SPEC in its line: at the back, or (given back, or a
-- retry fallen due) at the front.
local function putInLine(prefix, spec, frame, front)
  local line, priority, pair = lineOf(prefix, spec, frame)
  local push = front and 'RPUSH' or 'LPUSH'
  if redis.call(push, line, frame) == 1 then
    redis.call(push, prefix .. 'ring:' .. spec .. '/' .. priority, pair)
    redis.call('ZADD', prefix .. 'levels:' .. spec, priority, priority)
  end
end

-- Take the newest copy of a frame out of its line of list SPEC (a
-- replaced item); the line leaves its ring, and the ring its levels, when
-- emptied.  Returns how many went (0 or 1).
local function leaveLine(prefix, spec, frame)
  local line, priority, pair = lineOf(prefix, spec, frame)
  local n = redis.call('LREM', line, 1, frame)
  if n > 0 and redis.call('EXISTS', line) == 0 then
    local ring = prefix .. 'ring:' .. spec .. '/' .. priority
    redis.call('LREM', ring, 0, pair)
    if redis.call('EXISTS', ring) == 0 then
      redis.call('ZREM', prefix .. 'levels:' .. spec, priority)
    end
  end
  return n
end
