-- KEYS: processing.  ARGV: a claimant's token prefix ("CLAIMANT/").
-- Returns the members that claimant holds (a dead worker's claims), packed
-- into one string as LENGTH:MEMBER, as the claim packs them.
local prefix, packed = ARGV[1], {}
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if string.sub(m, 1, #prefix) == prefix then
    packed[#packed + 1] = #m .. ':' .. m
  end
end
return table.concat(packed)
