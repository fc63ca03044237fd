# -*- test-case-name: tests.test_reaper -*-
"""
The master's part in getting a dead worker's items back, in seconds rather
than when their leases run out, without charging the innocent.

The pool gives each worker process its claimant name and a journal of the
items it is running (L{snq.journal}).  When one ends, however it ended,
the L{Reaper} reads the journal and:

* on a backend with leases (SQL, Redis), gives back at once everything
  that claimant held: the items it was running with one attempt more (one
  that kills every worker ends in the dead letters after C{max_retries}
  deaths), the others unchanged (they were only waiting in its window);

* on a broker (STOMP), which takes back a lost connection's messages by
  itself and delivers them again under new ids, counts a death for each
  message that was running.  A worker that receives a message marked
  redelivered asks (L{snq.amp.Deaths}) how many workers it killed, and
  charges it that many attempts.  A message still running in another
  worker's journal is not answered for until that worker has finished it
  or died: a connection cut does not make one item run twice at once.

It also returns expired leases every C{lease/3} seconds, as workers do: a
master outlives workers that die faster than that.  Leases stay the safety
net for a whole host that dies.
"""

import collections

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from snq.journal import fit
from snq.queues import location, makeQueue
from snq.service import defaultReactor

#: Messages whose deaths are remembered (the oldest are forgotten first).
DEATHS_KEPT = 10_000
#: Seconds between two looks at the journals while a message runs elsewhere.
LOOK_AGAIN = 0.1


class Reaper(Service):
    """
    Observes the pool (L{snq.pool.WorkerPool.observers}) and answers its
    workers' L{snq.amp.Deaths}.  C{queue} is its own (the master's);
    made from C{config} unless given.
    """

    log = Logger()

    def __init__(self, config, pool, queue=None, reactor=None):
        self.reactor = defaultReactor(reactor)
        self.config = config
        self.pool = pool
        self.queue = queue if queue is not None else self._queue(config)
        self.opened = False
        #: Journal key → deaths of workers on this host that were running it.
        self.deaths: collections.OrderedDict = collections.OrderedDict()
        self._returning: set[defer.Deferred] = set()
        self._failing = False
        self._reaper = LoopingCall(self.reapExpired)
        self._reaper.clock = self.reactor
        #: Fires once the reaper has stopped and its last round is over.
        self._reaping = defer.succeed(None)
        pool.observers.append(self)
        pool.reaper = self

    def _queue(self, config):
        return makeQueue(config, self.reactor,
                         claimant=f"{config.daemon.id}.reaper")

    def startService(self):
        super().startService()
        if self.queue.leased:
            self._reaping = self._reaper.start(self.config.queue.lease / 3,
                                               now=True)

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self._reaper.running:
            self._reaper.stop()
        # The pool stops first: what its last deaths left is given back.
        yield defer.DeferredList([self._reaping, *self._returning])
        yield self._close()

    def _close(self):
        if not self.opened:
            return defer.succeed(None)
        self.opened = False
        return self.queue.close()

    @defer.inlineCallbacks
    def _open(self):
        if not self.opened:
            yield self.queue.open()
            self.opened = True

    @defer.inlineCallbacks
    def reconfigService(self, config):
        """The queue follows the daemon's; the lease sets the pace."""
        old, self.config = self.config, config
        if self._reaper.running:
            self._reaper.stop()
        yield self._reaping
        applied = []
        if location(old) != location(config):
            yield self._close()
            self.queue = self._queue(config)
            applied.append(f"reaper: returning claims on {self.queue.describe()}")
        else:
            self.queue.reconfigService(config)
        if self.running and self.queue.leased:
            self._reaping = self._reaper.start(config.queue.lease / 3, now=False)
        return applied

    # -- the pool's observer ------------------------------------------------

    def workerReported(self, process, report):
        pass

    def workerEnded(self, process):
        """Before the pool closes the process's journal: read it."""
        journal = process.journal
        if journal is None or not self.running:
            return
        started = journal.running()
        if self.queue.leased:
            d = self._returnClaims(process, started)
            self._returning.add(d)
            d.addBoth(lambda _: self._returning.discard(d))
            return
        for key in started:
            self.deaths[key] = self.deaths.pop(key, 0) + 1
            while len(self.deaths) > DEATHS_KEPT:
                self.deaths.popitem(last=False)
        if started:
            self.log.info("worker {wid} (pid {pid}) died running {n} items: "
                          "each is charged an attempt when the broker brings "
                          "it again", wid=process.worker.wid, pid=process.pid,
                          n=len(started))

    @defer.inlineCallbacks
    def _returnClaims(self, process, started):
        """Until it works, or the leases would have expired anyway."""
        wid, pid = process.worker.wid, process.pid
        deadline = self.reactor.seconds() + self.config.queue.lease
        while True:
            try:
                yield self._open()
                returned, charged = yield self.queue.returnClaims(
                    process.claimant, started)
            except Exception:
                if self.reactor.seconds() >= deadline or not self.running:
                    self.log.failure("cannot give back what worker {wid} (pid "
                                     "{pid}) held; its leases will expire",
                                     wid=wid, pid=pid)
                    return
                self.log.warn("cannot give back what worker {wid} (pid {pid}) "
                              "held yet; trying again", wid=wid, pid=pid)
                yield deferLater(self.reactor, 1.0, lambda: None)
                continue
            if returned:
                self.log.info("worker {wid} (pid {pid}) held {n} items: back "
                              "in the queue; {running}", wid=wid, pid=pid,
                              n=returned, running=f"the {charged} it was "
                              "running charged an attempt" if charged
                              else "it was running none")
            return

    @defer.inlineCallbacks
    def reapExpired(self):
        try:
            yield self._open()
            yield self.queue.reapExpired()
        except Exception:
            if not self._failing:
                self.log.failure("cannot return expired leases on {queue}; "
                                 "trying again every {t:g} s",
                                 queue=self.queue.describe(),
                                 t=self.config.queue.lease / 3)
            self._failing = True
        else:
            if self._failing:
                self.log.info("expired leases are returned again")
            self._failing = False

    # -- a worker's question ------------------------------------------------

    @defer.inlineCallbacks
    def deathsOf(self, key: bytes, asker) -> int:
        """
        How many of this host's workers died running the message C{key}
        (L{snq.amp.Deaths}); the count is forgotten, the message carries it
        from now on.  While another live process runs it (its connection
        was cut, and the broker gave it to C{asker}), or one that died has
        not been seen to end yet, wait for that, at most C{kill_time}.
        """
        key = fit(key)
        deadline = self.reactor.seconds() + self.config.daemon.kill_time
        while self._elsewhere(key, asker) and self.reactor.seconds() < deadline:
            yield deferLater(self.reactor, LOOK_AGAIN, lambda: None)
        return self.deaths.pop(key, 0)

    def _elsewhere(self, key: bytes, asker) -> bool:
        return any(key in process.journal.running()
                   for process in self.pool.processes()
                   if process is not asker and not process.ended
                   and process.journal is not None)
