# -*- test-case-name: tests.test_ledger -*-
"""
An in-process ledger with the same contract as the real ones, for tests
(a plugin's own too); it is shared only within its process, so it is never
a configurable store.
"""

from twisted.internet import defer

from snq.ledger import Ledger, ledgerName


class MemoryLedger(Ledger):
    def __init__(self, clock):
        self.clock = clock
        #: name → (owner or value, expires)
        self.entries: dict[str, tuple[str, float]] = {}

    def _live(self, name):
        entry = self.entries.get(ledgerName(name))
        if entry is not None and entry[1] <= self.clock.seconds():
            del self.entries[ledgerName(name)]
            return None
        return entry

    def once(self, name, ttl):
        if self._live(name) is not None:
            return defer.succeed(False)
        self.entries[ledgerName(name)] = ("", self.clock.seconds() + ttl)
        return defer.succeed(True)

    def lease(self, name, owner, ttl):
        entry = self._live(name)
        if entry is not None and entry[0] != owner:
            return defer.succeed(False)
        self.entries[ledgerName(name)] = (owner, self.clock.seconds() + ttl)
        return defer.succeed(True)

    def release(self, name, owner):
        entry = self._live(name)
        if entry is not None and entry[0] == owner:
            del self.entries[ledgerName(name)]
        return defer.succeed(None)

    def get(self, name):
        entry = self._live(name)
        return defer.succeed(entry[0] if entry is not None else None)

    def put(self, name, value, ttl):
        self.entries[ledgerName(name)] = (value, self.clock.seconds() + ttl)
        return defer.succeed(None)
