-- The ledger's release: KEYS[1] the name; ARGV[1] its owner ("" for a
-- claim).  Deleted only if that owner holds it; 1 if deleted, else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
