-- KEYS: processing, dead, then (list, delayed) pairs.  ARGV: now.
-- Returns ready (in lists, or delayed and due), delayed, held, dead, the
-- earliest due time of a due delayed item ("" if none), then each
-- non-empty list's oldest frame (for its age).
local now = tonumber(ARGV[1])
local ready, delayed, due, tails = 0, 0, nil, {}
for k = 3, #KEYS, 2 do
  local n = redis.call('LLEN', KEYS[k])
  ready = ready + n
  if n > 0 then tails[#tails + 1] = redis.call('LINDEX', KEYS[k], -1) end
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
