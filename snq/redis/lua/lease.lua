-- The ledger's lease: KEYS[1] the name; ARGV: owner, ttl in milliseconds.
-- Taken when free, renewed when the owner holds it; 1 if held, else 0.
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
elseif holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
