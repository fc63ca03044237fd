-- KEYS: processing, limits, buckets, then (list, delayed) pairs.
-- ARGV: now, deadline, limit, token prefix, key prefix.
-- For each list: puts its due retries at the front of their lines and up
-- to SORT of its oldest frames and NEWEST of its newest at the back of
-- theirs (lines: see lines.lua), then claims from the lines into
-- processing: the highest priority first, and
-- within a priority the lines take turns, each as many items as its site's
-- weight times the claim's share per line, and no more than the rate
-- limits of its transport and site allow.
-- An item's key index entry (keys.lua) follows it from the delayed set to
-- its list and from its line to processing.
-- Returns the earliest due time still waiting ("" if none) and the claimed
-- members packed into one string, each as LENGTH:MEMBER: txredisapi's
-- pure-Python parser reads each element of an array in a reactor turn of
-- its own, one string in one go.
local SORT, NEWEST = 1000, 100
local now, deadline, limit = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local prefix = ARGV[5]
local packed, claimed, nextDue = {}, 0, nil

-- The limits hash (written by the workers from their config): "w:SITE"
-- a site's weight, "w:" every other site's (1 if neither); "t:TRANSPORT"
-- and "s:SITE" rate limits in items per second, "s:" every other site's.
-- The buckets hash: "TOKENS STAMP" by the same names.  A bucket holds at
-- most one second's worth (at least one item) and starts full.
local settings, tokens, drawn = {}, {}, {}
local function setting(field)
  if settings[field] == nil then
    settings[field] = tonumber(redis.call('HGET', KEYS[2], field)) or false
  end
  return settings[field]
end

local function weight(pair)
  local site = string.match(pair, '/(.*)$')
  return setting('w:' .. site) or setting('w:') or 1
end

-- How many of n a line may have now: what its buckets hold.
local function allowed(pair, n)
  local transport, site = string.match(pair, '^(.-)/(.*)$')
  local buckets = {}
  for _, bucket in ipairs({'t:' .. transport, 's:' .. site}) do
    local rate = setting(bucket)
    if not rate and string.sub(bucket, 1, 2) == 's:' then rate = setting('s:') end
    if rate then
      if tokens[bucket] == nil then
        local capacity = math.max(rate, 1)
        local held = redis.call('HGET', KEYS[3], bucket)
        tokens[bucket] = capacity
        if held then
          local left, stamp = string.match(held, '^(%S+) (%S+)$')
          tokens[bucket] = math.min(capacity, tonumber(left) +
                                    math.max(now - tonumber(stamp), 0) * rate)
        end
      end
      local t = tokens[bucket]
      n = math.min(n, math.floor(t))
      if t < 1 then
        -- Due again when the bucket holds a token.
        local at = now + (1 - t) / rate
        if nextDue == nil or at < nextDue then nextDue = at end
      end
      buckets[#buckets + 1] = bucket
    end
  end
  return n, buckets
end

for k = 4, #KEYS, 2 do
  local list, delayed = KEYS[k], KEYS[k + 1]
  local spec = string.sub(list, #prefix + 3)
  local levels = prefix .. 'levels:' .. spec
  local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, 1000)
  if #due > 0 then
    local frames = {}
    for i = #due, 1, -1 do
      local m = due[i]
      local f = delayedFrame(m)
      frames[#frames + 1] = f
      follow(prefix, f, 'd' .. delayed .. '\n' .. m, 'q' .. list .. '\n' .. f)
    end
    putInLines(prefix, spec, frames, true)
    redis.call('ZREM', delayed, unpack(due))
  end
  putInLines(prefix, spec, redis.call('RPOP', list, SORT) or {}, false)
  -- Behind a backlog still to sort, the newest frames go in line too: an
  -- urgent item or another site's pushed behind 100,000 waits for this
  -- claim, not for the backlog's sorting.  They may pass older frames of
  -- their own line still in the backlog.
  if redis.call('LLEN', list) > 0 then
    local newest, oldestFirst = redis.call('LPOP', list, NEWEST) or {}, {}
    for i = #newest, 1, -1 do oldestFirst[#oldestFirst + 1] = newest[i] end
    putInLines(prefix, spec, oldestFirst, false)
  end
  for _, top in ipairs(redis.call('ZREVRANGE', levels, 0, -1)) do
    if claimed >= limit then break end
    local ring = prefix .. 'ring:' .. spec .. '/' .. top
    local progress = true
    while progress and claimed < limit do
      progress = false
      local turns = redis.call('LLEN', ring)
      -- A line alone takes what is left; lines that all fit in what is
      -- left share it by weight; more lines than that take their weight.
      local share = limit - claimed
      if turns > 1 then
        local total = turns
        if turns <= share then
          total = 0
          for _, pair in ipairs(redis.call('LRANGE', ring, 0, -1)) do
            total = total + weight(pair)
          end
        end
        share = math.max(1, math.floor(share / total))
      end
      for _ = 1, turns do
        if claimed >= limit then break end
        local pair = redis.call('LINDEX', ring, -1)
        local line = prefix .. 'line:' .. spec .. '/' .. top .. '/' .. pair
        local n = limit - claimed
        if turns > 1 then n = math.min(n, weight(pair) * share) end
        local buckets
        n, buckets = allowed(pair, n)
        if n > 0 then
          local frames = redis.call('RPOP', line, n) or {}
          for _, f in ipairs(frames) do
            claimed = claimed + 1
            local m = ARGV[4] .. claimed .. '\n' .. list .. '\n' .. f
            redis.call('ZADD', KEYS[1], deadline, m)
            follow(prefix, f, 'q' .. list .. '\n' .. f, 'r' .. m)
            packed[#packed + 1] = #m .. ':' .. m
          end
          for _, bucket in ipairs(buckets) do
            tokens[bucket] = tokens[bucket] - #frames
            drawn[bucket] = true
          end
          progress = progress or #frames > 0
        end
        if redis.call('EXISTS', line) == 0 then
          redis.call('RPOP', ring)
        else
          redis.call('LMOVE', ring, ring, 'RIGHT', 'LEFT')
        end
      end
    end
    if redis.call('EXISTS', ring) == 0 then redis.call('ZREM', levels, top) end
  end
  local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
  if first[2] then
    local score = tonumber(first[2])
    if nextDue == nil or score < nextDue then nextDue = score end
  end
end
for bucket in pairs(drawn) do
  redis.call('HSET', KEYS[3], bucket,
             string.format('%.6f %.6f', tokens[bucket], now))
end
return {nextDue and string.format('%.6f', nextDue) or '', table.concat(packed)}
