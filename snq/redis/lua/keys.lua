-- Included by the scripts that move or remove items (claim.lua, ack.lua,
-- retry.lua, return.lua, bury.lua, cancel.lua, unique.lua).  The key
-- index of unique transports: the hash <prefix>keys:TRANSPORT maps an
-- item's key to where that item is, which each move updates in the same
-- script:
--   "q" LIST "\n" FRAME       ready: in the list LIST, or in its line
--                             (lines.lua; sorting it there changes nothing)
--   "d" DELAYED "\n" MEMBER   waiting for its time in the delayed set
--   "r" MEMBER                held by a worker: its processing member
-- Only unique.lua makes entries; a move updates an entry only while it
-- still names the item moved (compare and set), so an item that was never
-- looked up (a plain LPUSH, a transport without unique) is never indexed.

-- The transport and key of a frame that has a key.
local function keyed(frame)
  if not string.find(frame, '"key"', 1, true) then return nil end
  local ok, item = pcall(cjson.decode, frame)
  if ok and type(item) == 'table' and type(item.key) == 'string' and
      type(item.transport) == 'string' then
    return item.transport, item.key
  end
end

-- The index entry of FRAME's key moves from OLD to NEW (nil: removed), if
-- it is still OLD.
local function follow(prefix, frame, old, new)
  local transport, key = keyed(frame)
  if not transport then return end
  local index = prefix .. 'keys:' .. transport
  if redis.call('HGET', index, key) == old then
    if new then
      redis.call('HSET', index, key, new)
    else
      redis.call('HDEL', index, key)
    end
  end
end

-- A processing member's frame (TOKEN \n LIST \n FRAME).
local function heldFrame(member)
  local token = string.find(member, '\n', 1, true)
  local origin = token and string.find(member, '\n', token + 1, true)
  return origin and string.sub(member, origin + 1) or ''
end

-- A delayed member's frame (TOKEN \n FRAME).
local function delayedFrame(member)
  local token = string.find(member, '\n', 1, true)
  return token and string.sub(member, token + 1) or ''
end
