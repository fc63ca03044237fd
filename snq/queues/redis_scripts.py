# -*- test-case-name: tests.test_redis -*-
"""
The Lua scripts of the Redis backend: every step that must not be seen half
done (claiming with a lease, settling an item once, returning expired
leases) runs inside Redis as one script.

Members of the processing sorted set are C{TOKEN \\n LIST \\n FRAME}: the
token makes two identical frames distinct, the list is where the item goes
back to.  Members of a delayed set are C{TOKEN \\n FRAME}; the set belongs
to one ready list.  Scores are UNIX seconds (a deadline, a due time), from
the worker's clock.
"""

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Script:
    source: str
    sha: str = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "sha",
                           hashlib.sha1(self.source.encode()).hexdigest())


#: KEYS: processing, then (list, delayed) pairs.
#: ARGV: now, deadline, limit, token prefix.
#: First moves due retries back onto their lists, then pops up to C{limit}
#: frames (in batches) into processing.  Returns the earliest due time still
#: waiting ("" if none) and the claimed members packed into one string, each
#: as C{LENGTH:MEMBER}: txredisapi's pure-Python parser reads each element
#: of an array in a reactor turn of its own, one string in one go.
CLAIM = Script("""
local now, deadline, limit = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local packed, claimed, nextDue = {}, 0, nil
for k = 2, #KEYS, 2 do
  local list, delayed = KEYS[k], KEYS[k + 1]
  local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, 1000)
  if #due > 0 then
    for i = #due, 1, -1 do
      local m = due[i]
      redis.call('RPUSH', list, string.sub(m, string.find(m, '\\n', 1, true) + 1))
    end
    redis.call('ZREM', delayed, unpack(due))
  end
  if limit > claimed then
    local frames = redis.call('RPOP', list, limit - claimed)
    if frames then
      for _, f in ipairs(frames) do
        claimed = claimed + 1
        local m = ARGV[4] .. claimed .. '\\n' .. list .. '\\n' .. f
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
""")


#: KEYS: processing, then one list per member.
#: ARGV: a score cutoff ("" = none), then (member, frame) pairs.
#: Puts still-held members back at the consuming end of their lists: a
#: release (no cutoff) or the reaper (only what expired before the cutoff,
#: so a lease renewed meanwhile is left alone).  Returns how many moved.
RETURN = Script("""
local cutoff = tonumber(ARGV[1])
local moved = 0
for i = 2, #ARGV, 2 do
  local m = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], m)
  if score and (cutoff == nil or tonumber(score) < cutoff) then
    redis.call('ZREM', KEYS[1], m)
    redis.call('RPUSH', KEYS[i / 2 + 1], ARGV[i + 1])
    moved = moved + 1
  end
end
return moved
""")

#: KEYS: processing, delayed.  ARGV: member, due time, delayed member.
RETRY = Script("""
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
  return 1
end
return 0
""")

#: KEYS: processing, dead, dead id counter.  ARGV: member, record (a JSON
#: object without its id).  Returns the dead letter's id, 0 if the item was
#: no longer held (its lease expired and someone else has it).
BURY = Script("""
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  local id = redis.call('INCR', KEYS[3])
  redis.call('ZADD', KEYS[2], id, '{"id":' .. id .. ',' .. string.sub(ARGV[2], 2))
  return id
end
return 0
""")

#: KEYS: list and delayed set pairs, one pair per distinct list.
#: ARGV: due time ("" = now), then (pair index, frame or delayed member).
ENQUEUE = Script("""
for i = 2, #ARGV, 2 do
  local k = tonumber(ARGV[i]) * 2 - 1
  if ARGV[1] == '' then
    redis.call('LPUSH', KEYS[k], ARGV[i + 1])
  else
    redis.call('ZADD', KEYS[k + 1], ARGV[1], ARGV[i + 1])
  end
end
return (#ARGV - 1) / 2
""")

#: KEYS: dead, then one list per member.  ARGV: (member, frame) pairs.
#: Moves dead letters back to the end of their lists, as new work.
RESURRECT = Script("""
local moved = 0
for i = 1, #ARGV, 2 do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('LPUSH', KEYS[(i + 1) / 2 + 1], ARGV[i + 1])
    moved = moved + 1
  end
end
return moved
""")

#: KEYS: dead.  ARGV: ids, or nothing for all.  Returns how many went.
PURGE = Script("""
if #ARGV == 0 then
  local n = redis.call('ZCARD', KEYS[1])
  redis.call('DEL', KEYS[1])
  return n
end
local n = 0
for _, id in ipairs(ARGV) do
  n = n + redis.call('ZREMRANGEBYSCORE', KEYS[1], id, id)
end
return n
""")

#: KEYS: processing, dead, then (list, delayed) pairs.  ARGV: now.
#: Returns ready (in lists, or delayed and due), delayed, held, dead, the
#: earliest due time of a due delayed item ("" if none), then each
#: non-empty list's oldest frame (for its age).
DEPTH = Script("""
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
""")

ALL = (CLAIM, RETURN, RETRY, BURY, ENQUEUE, RESURRECT, PURGE, DEPTH)
