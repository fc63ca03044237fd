-- KEYS: list and delayed set pairs, one pair per distinct list.
-- ARGV: due time ("" = now), then (pair index, frame or delayed member).
for i = 2, #ARGV, 2 do
  local k = tonumber(ARGV[i]) * 2 - 1
  if ARGV[1] == '' then
    redis.call('LPUSH', KEYS[k], ARGV[i + 1])
  else
    redis.call('ZADD', KEYS[k + 1], ARGV[1], ARGV[i + 1])
  end
end
return (#ARGV - 1) / 2
