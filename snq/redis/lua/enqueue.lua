-- KEYS: list and delayed set pairs, one pair per distinct list.
-- ARGV: (pair index, due time or "" for now, frame or delayed member) triples.
for i = 1, #ARGV, 3 do
  local k = tonumber(ARGV[i]) * 2 - 1
  if ARGV[i + 1] == '' then
    redis.call('LPUSH', KEYS[k], ARGV[i + 2])
  else
    redis.call('ZADD', KEYS[k + 1], ARGV[i + 1], ARGV[i + 2])
  end
end
return #ARGV / 3
