-- Enqueue, keyed items of unique transports with their key index
-- (unique.lua, whose KEYS and ARGV these are).
-- Returns 1 or 0 per item: whether it was taken.
local take = uniqueStore(0, 1)
local taken = {}
for i = 1, (#ARGV - 2) / 6 do taken[i] = take(i) end
return taken
