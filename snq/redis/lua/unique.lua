-- Included by the scripts that enqueue (unique_enqueue.lua,
-- once_enqueue.lua), after lines.lua and keys.lua: storing items, keyed
-- ones of unique transports with their key index (keys.lua).
-- uniqueStore(BASE, FROM) reads KEYS from BASE + 1: processing, then list
-- and delayed set pairs (as enqueue.lua), then the indexes
-- (<prefix>keys:TRANSPORT) of the batch's unique transports; ARGV from
-- FROM: key prefix, the number of pairs, then per item (pair index, due
-- time or "" for now, frame or delayed member, index number or "" for an
-- item stored as always, key, mode: "drop" or "replace", "+running" added
-- when a running item counts).  It returns take(I), which stores item I
-- (1-based) and returns 1, or 0 if it was not taken.
-- A keyed item is dropped while the item its index entry names waits (or,
-- with "+running", is held); with "replace" it takes the waiting one's
-- place: in place when both are ready in the same list and line (or the
-- old one is still in the list), else the old one goes and the new one is
-- stored as a new one would be.  An entry naming an item no longer there
-- (removed by other means) counts for nothing.
local function uniqueStore(base, from)
  local prefix, npairs = ARGV[from], tonumber(ARGV[from + 1])
  local processing = KEYS[base + 1]

  -- Where the entry's item is: kind ("q" list, "l" line, "d" delayed, "r"
  -- held), its container and element, its position in a list and the
  -- spec of the list whose line holds it; nil if it is gone.
  local function locate(entry)
    local kind = string.sub(entry, 1, 1)
    if kind == 'r' then
      if redis.call('ZSCORE', processing, string.sub(entry, 2)) then
        return 'r'
      end
      return nil
    end
    local nl = string.find(entry, '\n', 2, true)
    if not nl then return nil end
    local container = string.sub(entry, 2, nl - 1)
    local element = string.sub(entry, nl + 1)
    if kind == 'd' then
      if redis.call('ZSCORE', container, element) then
        return 'd', container, element
      end
      return nil
    end
    -- From the newest end: a duplicate tends to follow its original soon.
    local at = redis.call('LPOS', container, element)
    if at then return 'q', container, element, at end
    local spec = string.sub(container, #prefix + 3)
    local line = lineOf(prefix, spec, element)
    at = redis.call('LPOS', line, element)
    if at then return 'l', line, element, at, spec end
    return nil
  end

  local function store(list, delayed, due, element)
    if due == '' then
      redis.call('LPUSH', list, element)
      return 'q' .. list .. '\n' .. element
    end
    redis.call('ZADD', delayed, due, element)
    return 'd' .. delayed .. '\n' .. element
  end

  -- The new item in the old one's place: KIND, CONTAINER, OLD, AT, SPEC
  -- as locate() found it.
  local function replace(kind, container, old, at, spec, list, delayed, due,
                         element)
    if due == '' and ((kind == 'q' and container == list) or
        (kind == 'l' and container ==
         lineOf(prefix, string.sub(list, #prefix + 3), element))) then
      redis.call('LSET', container, at, element)
      return 'q' .. list .. '\n' .. element
    end
    if kind == 'd' then
      redis.call('ZREM', container, old)
    elseif kind == 'q' then
      redis.call('LREM', container, 1, old)
    else
      leaveLine(prefix, spec, old)
    end
    return store(list, delayed, due, element)
  end

  return function(i)
    local a = from + 2 + (i - 1) * 6
    local p = tonumber(ARGV[a])
    local list, delayed = KEYS[base + 2 * p], KEYS[base + 2 * p + 1]
    local due, element, slot = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
    if slot == '' then
      store(list, delayed, due, element)
      return 1
    end
    local index = KEYS[base + 1 + 2 * npairs + tonumber(slot)]
    local key, mode = ARGV[a + 4], ARGV[a + 5]
    local entry = redis.call('HGET', index, key)
    local kind, container, old, at, spec
    if entry then kind, container, old, at, spec = locate(entry) end
    if (kind == 'r' and string.find(mode, '+running', 1, true)) or
        (kind and kind ~= 'r' and string.sub(mode, 1, 4) == 'drop') then
      return 0
    end
    if kind and kind ~= 'r' then
      entry = replace(kind, container, old, at, spec, list, delayed, due,
                      element)
    else
      entry = store(list, delayed, due, element)
    end
    redis.call('HSET', index, key, entry)
    return 1
  end
end
