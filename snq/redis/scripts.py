# -*- test-case-name: tests.test_redis -*-
"""
The Lua scripts of the Redis backend (C{snq/redis/lua/*.lua}, package
data): every step that must not be seen half done (claiming with a lease,
settling an item once, returning expired leases) runs inside Redis as one
script.  Each file's comment says its KEYS, ARGV and result.

Members of the processing sorted set are C{TOKEN \\n LIST \\n FRAME}: the
token makes two identical frames distinct, the list is where the item goes
back to.  Members of a delayed set are C{TOKEN \\n FRAME}; the set belongs
to one ready list.  Scores are UNIX seconds (a deadline, a due time), from
the worker's clock.  The scripts that move or remove items also keep the
unique transports' key index (C{lua/keys.lua}) with them.
"""

import hashlib
from dataclasses import dataclass, field
from importlib.resources import files


@dataclass(frozen=True)
class Script:
    source: str
    sha: str = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "sha",
                           hashlib.sha1(self.source.encode()).hexdigest())

    @classmethod
    def named(cls, name: str, *included: str) -> "Script":
        """C{lua/NAME.lua}, after the C{included} files' functions."""
        return cls("".join((files(__package__) / "lua" / f"{n}.lua").read_text()
                           for n in (*included, name)))


CLAIM = Script.named("claim", "lines", "keys")
RETURN = Script.named("return", "lines", "keys")
RETRY = Script.named("retry", "keys")
BURY = Script.named("bury", "keys")
ACK = Script.named("ack", "keys")
ENQUEUE = Script.named("enqueue")
#: The enqueue of keyed items of unique transports (L{snq.redis.keys}).
UNIQUE = Script.named("unique_enqueue", "lines", "keys", "unique")
RESURRECT = Script.named("resurrect")
PURGE = Script.named("purge")
DEPTH = Script.named("depth", "lines")
HELD = Script.named("held")
LIMITS = Script.named("limits")
CANCEL = Script.named("cancel", "keys")
#: The ledger's (L{snq.ledger.redis}).
LEASE = Script.named("lease")
RELEASE = Script.named("release")
ONCE_ENQUEUE = Script.named("once_enqueue", "lines", "keys", "unique")

ALL = (CLAIM, RETURN, RETRY, BURY, ACK, ENQUEUE, UNIQUE, RESURRECT, PURGE,
       DEPTH, HELD, LIMITS, CANCEL, LEASE, RELEASE, ONCE_ENQUEUE)
