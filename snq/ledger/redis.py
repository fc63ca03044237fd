# -*- test-case-name: tests.test_ledger -*-
"""
The ledger in Redis: a key per name, C{<prefix>ledger:NAME}, holding its
owner (a lease's), "" (a claim) or a value, and expiring by itself.
"""

from twisted.internet import defer

from snq.ledger import Ledger, ledgerName
from snq.redis import scripts
from snq.service import defaultReactor


def _ms(seconds: float) -> str:
    return str(max(1, int(seconds * 1000)))


class RedisLedger(Ledger):
    """
    On C{queue}'s Redis (a L{snq.queues.redis.RedisQueue}).  C{shared}: it
    is the worker's own queue, already open, and L{enqueueOnce} claims and
    pushes in one script; otherwise this ledger opens its own connection.
    """

    def __init__(self, queue, shared: bool, clock=None):
        self.queue = queue
        self.shared = shared
        self.clock = defaultReactor(clock)

    def key(self, name: str) -> str:
        return f"{self.queue.prefix}ledger:{ledgerName(name)}"

    def open(self):
        return defer.succeed(None) if self.shared else self.queue.open()

    def close(self):
        return defer.succeed(None) if self.shared else self.queue.close()

    def _execute(self, *args, again=False):
        return self.queue.connection.execute(*args, again=again)

    def once(self, name, ttl):
        d = self._execute("SET", self.key(name), "", "NX", "PX", _ms(ttl))
        return d.addCallback(lambda answer: answer is not None)

    def lease(self, name, owner, ttl):
        d = self.queue.eval(scripts.LEASE, [self.key(name)], [owner, _ms(ttl)],
                            again=True)
        return d.addCallback(lambda held: int(held) == 1)

    def release(self, name, owner):
        return self.queue.eval(scripts.RELEASE, [self.key(name)], [owner],
                               again=True)

    def get(self, name):
        d = self._execute("GET", self.key(name), again=True)
        return d.addCallback(lambda v: v.decode("utf-8") if v is not None else None)

    def put(self, name, value, ttl):
        return self._execute("SET", self.key(name), value, "PX", _ms(ttl),
                             again=True)

    def enqueueOnce(self, entries, ttl, queue, delay=0.0):
        if not self.shared or queue is not self.queue or not entries:
            return super().enqueueOnce(entries, ttl, queue, delay)
        items = [item for _, item in entries]
        keys, args = queue.enqueueArguments(items, delay)
        d = queue.eval(scripts.ONCE_ENQUEUE,
                       [self.key(name) for name, _ in entries] + keys,
                       [len(entries), _ms(ttl), *args])
        return d.addCallback(lambda new: [items[int(i) - 1] for i in new])
