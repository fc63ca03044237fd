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

-- The start of an envelope as snq writes it (snq.item.Item.toJSON): its
-- names and priority read without decoding the whole frame, and without
-- doubt, since nothing nested comes before them.  Any other frame (names
-- with escapes, another producer's order) is decoded.
local SNQ_FRAME = '^{"v":1,"id":"[^"\\]*","site":"([^"\\/]+)","transport":"' ..
                  '([^"\\/]+)","priority":(%-?%d%d?%d?%d?%d?%d?%d?%d?%d?%d?%d?%d?%d?%d?%d?)[,}]'

-- A frame's priority and "TRANSPORT/SITE".
local function lane(frame)
  local site, transport, priority = string.match(frame, SNQ_FRAME)
  if site then
    return string.format('%d', tonumber(priority)), transport .. '/' .. site
  end
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

-- Put frames of list SPEC in their lines, in their order: at the back,
-- or (given back, or retries fallen due) at the front.  One push per line.
local function putInLines(prefix, spec, frames, front)
  local push = front and 'RPUSH' or 'LPUSH'
  local lines, order = {}, {}
  for _, frame in ipairs(frames) do
    if frame ~= RING then
      local line, priority, pair = lineOf(prefix, spec, frame)
      local entry = lines[line]
      if not entry then
        entry = {priority = priority, pair = pair}
        lines[line] = entry
        order[#order + 1] = line
      end
      entry[#entry + 1] = frame
    end
  end
  for _, line in ipairs(order) do
    local entry = lines[line]
    if redis.call(push, line, unpack(entry)) == #entry then
      redis.call(push, prefix .. 'ring:' .. spec .. '/' .. entry.priority,
                 entry.pair)
      redis.call('ZADD', prefix .. 'levels:' .. spec, entry.priority,
                 entry.priority)
    end
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
