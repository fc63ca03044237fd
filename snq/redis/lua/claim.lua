-- KEYS: processing, then (list, delayed) pairs.
-- ARGV: now, deadline, limit, token prefix.
-- First moves due retries back onto their lists, then pops up to limit
-- frames (in batches) into processing.  Returns the earliest due time still
-- waiting ("" if none) and the claimed members packed into one string, each
-- as LENGTH:MEMBER: txredisapi's pure-Python parser reads each element
-- of an array in a reactor turn of its own, one string in one go.
local now, deadline, limit = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local packed, claimed, nextDue = {}, 0, nil
for k = 2, #KEYS, 2 do
  local list, delayed = KEYS[k], KEYS[k + 1]
  local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, 1000)
  if #due > 0 then
    for i = #due, 1, -1 do
      local m = due[i]
      redis.call('RPUSH', list, string.sub(m, string.find(m, '\n', 1, true) + 1))
    end
    redis.call('ZREM', delayed, unpack(due))
  end
  if limit > claimed then
    local frames = redis.call('RPOP', list, limit - claimed)
    if frames then
      for _, f in ipairs(frames) do
        claimed = claimed + 1
        local m = ARGV[4] .. claimed .. '\n' .. list .. '\n' .. f
        redis.call('ZADD', KEYS[1], deadline, m)
        packed[#packed + 1] = #m .. ':' .. m
      end
    end
  end
  local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
  if first[2] then
    local score = tonumber(first[2])
    if nextDue == nil or score < nextDue then nextDue = score end
  end
end
return {nextDue and string.format('%.6f', nextDue) or '', table.concat(packed)}
