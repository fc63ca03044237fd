# -*- test-case-name: tests.test_cluster -*-
"""
A worker's look at the cluster's pauses (C{snqctl pause}): every
C{[cluster] heartbeat} it reads them from the store and hands them on
(L{snq.cluster.Pauses}), so that no worker of any daemon claims what is
paused.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from snq.cluster import ClusterMissing, Pauses, makeStore


class PauseWatch(Service):
    """
    Reads the pauses from the store on C{queue} (open, the worker's own)
    and calls C{apply(pauses)} when they change.  On the worker's own queue
    the first look is over before the service has started, so a worker that
    starts during a pause does not claim what is paused; a store that does
    not answer keeps the pauses as they were, and is asked again at the
    next look.
    """

    log = Logger()

    def __init__(self, config, queue, apply, clock):
        self.config = config
        self.queue = queue
        self.apply = apply
        self.clock = clock
        self.pauses = Pauses()
        self.store = None
        self._failing = False
        #: The look in progress, or the last one.
        self.looking: defer.Deferred = defer.succeed(None)
        self._loop = LoopingCall(self.look)
        self._loop.clock = clock
        self._looping = defer.succeed(None)

    @defer.inlineCallbacks
    def startService(self):
        super().startService()
        try:
            self.store = makeStore(self.config, self.queue, self.clock)
        except ClusterMissing:
            return
        first = self.look()
        if self.store.queue is self.queue:
            # On the worker's own queue the look is quick: wait for it. A
            # store of its own (a session on the STOMP broker, [ledger] url)
            # may take seconds, which a respawn must not: until it answers,
            # a paused item taken anyway goes back uncharged.
            yield first
        self._looping = self._loop.start(self.config.cluster.heartbeat,
                                         now=False)

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        yield self._looping
        yield self.looking
        if self.store is not None and self.store.opened:
            yield self.store.close()

    def reconfigService(self, config):
        old, self.config = self.config, config
        interval = config.cluster.heartbeat
        if interval != old.cluster.heartbeat and self._loop.running:
            self._loop.stop()
            self._looping = self._loop.start(interval, now=False)
        return []

    def look(self) -> defer.Deferred:
        self.looking = self._look()
        return self.looking

    @defer.inlineCallbacks
    def _look(self):
        try:
            yield self.store.ensureOpen()
            pauses = Pauses.fromSettings((yield self.store.settings()))
        except Exception as e:
            if not self._failing:
                self._failing = True
                self.log.warn("cannot read the cluster's pauses: {error}; "
                              "keeping {pauses}", error=f"{type(e).__name__}: "
                              f"{e}", pauses=describe(self.pauses))
            return
        self._failing = False
        if pauses != self.pauses:
            self.pauses = pauses
            self.log.info("cluster pauses: {pauses}", pauses=describe(pauses))
            self.apply(pauses)


def describe(pauses: Pauses) -> str:
    """The pauses in words, for logs."""
    parts = [f"transport {t}" for t in sorted(pauses.transports)]
    parts += [f"site {s}" for s in sorted(pauses.sites)]
    return ", ".join(parts) + " paused" if parts else "nothing paused"
