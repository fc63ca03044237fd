# -*- test-case-name: tests.test_dispatch -*-
"""
The L{QueueManager}: the IoManager that keeps a dispatcher fed from a
backend, and on stop gives back what has not started.
"""

from twisted.internet import defer
from twisted.internet.task import LoopingCall

from snq.dispatch import Dispatcher, printable
from snq.iomanager import PollingManager
from snq.queues.interface import Queue
from snq.routing import TransportFilter, describeFilter


class QueueManager(PollingManager):
    """
    Keeps a dispatcher fed from a polling backend: claims while fewer than
    C{prefetch} items are held, renews held leases, and on stop gives back
    what has not started and waits (at most C{kill_time}) for what has.
    """

    def __init__(self, queue: Queue, dispatcher: Dispatcher, config,
                 transports: TransportFilter, clock=None, transportsFor=None):
        super().__init__(config.queue.poll_interval, clock)
        self.queue = queue
        self.dispatcher = dispatcher
        self.config = config
        self.transports = transports
        #: What to claim under a reloaded config (the worker's role and
        #: site decide); None: C{transports} for ever.
        self.transportsFor = transportsFor
        dispatcher.onSettled = self._settled
        self._paused = False
        self._tender = LoopingCall(self._tend)
        self._tender.clock = self.clock
        #: Fires once the tender has stopped and its last round is over.
        self._tending = defer.succeed(None)
        self._listening = None
        self._missed = False
        self._trouble: dict | None = None

    @property
    def claimTrouble(self) -> dict | None:
        """
        While claims fail: C{since} when, how many C{failures} in a row, the
        last C{error} (for the worker's report, and so C{snqctl check});
        else None.
        """
        return self._trouble

    def startService(self):
        super().startService()
        # Polling stays on: the fallback, and the way to delayed items.
        self._listening = self.queue.listen(self._notified)
        # At once: expired leases go back now, not lease/3 from now, even
        # when workers die faster than that.
        self._tending = self._tender.start(self.config.queue.lease / 3, now=True)

    @defer.inlineCallbacks
    def stopService(self):
        yield super().stopService()
        if self._listening is not None:
            yield self._listening.stopListening()
            self._listening = None
        yield self.dispatcher.releaseWaiting()
        yield self._waitForInFlight()
        if self._tender.running:
            self._tender.stop()
        # A round in progress ends before the queue is closed.
        yield self._tending
        yield self.dispatcher.stopHandlers()

    def _waitForInFlight(self, which=None):
        """
        The held deliveries (or those C{which} picks, see
        L{Dispatcher.drain}) settled, or C{kill_time} passed.
        """
        drained = self.dispatcher.drain(which)
        if drained.called:
            return drained
        killTime = self.config.daemon.kill_time

        def timedOut(failure):
            failure.trap(defer.TimeoutError, defer.CancelledError)
            n = len([d for d in self.dispatcher.held if which is None or which(d)])
            self.log.warn("{n} items still running after {t} s; their leases "
                          "will expire and others will retry them",
                          n=n, t=killTime)

        drained.addTimeout(killTime, self.clock)
        drained.addErrback(timedOut)
        return drained

    def poll(self):
        free = self.config.queue.prefetch - len(self.dispatcher.held)
        if free <= 0:
            self._paused = True
            return None
        # Paused transports are left out where the backend filters claims.
        d = self.queue.claim(free, self.dispatcher.pauses.narrow(self.transports))
        d.addCallbacks(self._claimed, self._claimFailure)
        return d

    def _claimed(self, deliveries):
        self._trouble = None
        for delivery in deliveries:
            self.dispatcher.dispatch(delivery)
        return bool(deliveries)

    def _claimFailure(self, failure):
        self.dispatcher.stats.count("claim_failed")
        trouble = self._trouble or {"since": self.clock.seconds(),
                                    "failures": 0}
        trouble["failures"] += 1
        trouble["error"] = printable(
            f"{failure.type.__name__}: {failure.getErrorMessage()}")
        self._trouble = trouble
        return failure

    def _notified(self):
        """
        The backend says items may have arrived.  A poll in progress may
        have looked before they did: then poll once more as soon as it ends,
        instead of sleeping for up to C{poll_interval}.
        """
        if self._paused:
            # Waiting for room, not for items: a settled item will wake it,
            # and claiming into a nearly full window means tiny batches.
            return
        self._missed = self._polling is not None
        self.wake()

    def _polled(self, found):
        missed, self._missed = self._missed, False
        super()._polled(True if missed and found is False else found)

    def _settled(self):
        # Claim again once half the window is free: one query per item
        # settled would cost more than the items.
        lowWater = self.config.queue.prefetch // 2
        if self._paused and len(self.dispatcher.held) <= lowWater:
            self._paused = False
            self.wake()

    def reconfigService(self, config):
        """
        Follow a reloaded config: the window and retries are read at use,
        the poll interval and lease renewal reset here, and what to claim
        follows (L{transportsFor}).  → what changed, in words.
        """
        old = self.transports
        if self.transportsFor is not None:
            self.transports = self.transportsFor(config)
        self.config = config
        self.pollInterval = config.queue.poll_interval
        interval = config.queue.lease / 3
        if self._tender.running and self._tender.interval != interval:
            self._tender.stop()
            self._tending = self._tender.start(interval, now=False)
        d = defer.maybeDeferred(self.follow, old)
        return d.addCallback(lambda applied: (self.wake(), applied)[1])

    def follow(self, old: TransportFilter):
        """
        Consume what C{self.transports} says from now on, instead of what
        C{old} said; → what changed, in words (or a Deferred of it).  A
        polling backend just claims differently; brokers change their
        subscriptions.
        """
        if old == self.transports:
            return []
        return [f"claiming {describeFilter(self.transports)}"]

    def _tend(self):
        d = self.queue.tend(list(self.dispatcher.held))
        d.addErrback(lambda f: self.log.failure("queue housekeeping failed", f))
        return d
