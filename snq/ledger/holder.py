# -*- test-case-name: tests.test_lease_holder -*-
"""
A lease held for as long as a process runs: what lets one worker among
every daemon on a backend do something alone (the C{xmpp} group, which
logs in with the site's account) and another take it over when that
one's host goes, with no protocol of snq's own: the ledger's
L{snq.ledger.Ledger.lease} decides.

Whoever holds it renews it every third of its time.  The holder gives it
up on its own side before anyone else can have it: at the lease's end,
counted from when the renewal was asked (before the store wrote it),
less a margin for clocks that differ.  A renewal the store refuses, or
no answer by then (a host cut off from the backend), ends it here; the
others, asking as often, take it once it has lapsed in the store.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

#: Part of the lease kept as a margin: a holder that could not renew stops
#: this long before the store lets another take the lease.
MARGIN = 1 / 6


class LeaseHolder(Service):
    """
    Asks for lease C{name} as C{owner} every C{ttl}/3 seconds (C{ttl} read
    at each ask: C{ttlOf()}); calls C{gained()} when it holds it and
    C{lost(reason)} when it holds it no more (a Deferred from either is
    waited for before the next change).  On stop the lease is given back,
    so the next holder need not wait for it to lapse: a parent stops it
    after what it gates (add it before them), so C{lost} is not called.
    """

    log = Logger()

    def __init__(self, ledgers, name: str, owner: str, ttlOf, gained, lost,
                 clock):
        self.ledgers = ledgers
        self.name = name
        self.owner = owner
        self.ttlOf = ttlOf
        self.gained = gained
        self.lost = lost
        self.clock = clock
        self.holding = False
        #: When the lease ends here unless renewed (holding), else None.
        self.until: float | None = None
        self._asking = None
        self._tick = None
        self._deadline = None
        #: Gains and losses, one after the other.
        self._changing = defer.succeed(None)

    def startService(self):
        super().startService()
        self._ask()

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        for call in (self._tick, self._deadline):
            if call is not None and call.active():
                call.cancel()
        self._tick = self._deadline = None
        # An ask in flight may yet take or renew it: wait for it (it times
        # out), so the release comes after it.
        asking = self._asking
        held = self.holding or asking is not None
        self.holding, self.until = False, None
        if asking is not None:
            yield asking
        yield self._changing
        if held:
            try:
                ledger = yield self.ledgers.ledger()
                yield ledger.release(self.name, self.owner)
            except Exception:
                self.log.failure("giving back lease {name} failed; it lapses "
                                 "by itself", name=self.name)

    def _ask(self):
        self._tick = None
        if not self.running:
            return
        ttl = self.ttlOf()
        self._tick = self.clock.callLater(ttl / 3, self._ask)
        if self._asking is not None:
            return  # The store has not answered the last ask yet.
        asked = self.clock.seconds()
        self._asking = d = defer.maybeDeferred(self.ledgers.ledger)
        d.addCallback(lambda ledger: ledger.lease(self.name, self.owner, ttl))
        # An ask the store never answers (a cut link) must not stop the next.
        d.addTimeout(ttl, self.clock)
        d.addCallbacks(self._answered, self._failed,
                       callbackArgs=(asked + ttl * (1 - MARGIN),))

    def _answered(self, holds, until):
        self._asking = None
        if not self.running:
            return
        if not holds:
            if self.holding:
                self._change(False, "another worker holds it now")
            return
        if until <= self.clock.seconds():
            return  # Answered too late to count; the next ask decides.
        self.until = until
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = self.clock.callLater(
            until - self.clock.seconds(), self._expired)
        if not self.holding:
            self._change(True)

    def _failed(self, failure):
        self._asking = None
        # Held until its end here: the next ask may renew it.
        self.log.warn("asking for lease {name} failed: {error}", name=self.name,
                      error=f"{failure.type.__name__}: "
                            f"{failure.getErrorMessage()}")

    def _expired(self):
        self._deadline = None
        if self.holding:
            self._change(False, "it could not be renewed in time")

    def _change(self, holding: bool, reason: str = ""):
        self.holding = holding
        if holding:
            self.log.info("lease {name} taken by {owner}", name=self.name,
                          owner=self.owner)
            call = self.gained
        else:
            self.until = None
            if self._deadline is not None and self._deadline.active():
                self._deadline.cancel()
            self._deadline = None
            self.log.warn("lease {name} given up by {owner}: {reason}",
                          name=self.name, owner=self.owner, reason=reason)

            def call():
                return self.lost(reason)

        def run(_):
            return defer.maybeDeferred(call).addErrback(
                lambda f: self.log.failure("following lease {name} failed", f,
                                           name=self.name))

        self._changing = self._changing.addCallback(run)
