# -*- test-case-name: tests.test_child -*-
"""
The IoMaster: one worker's service tree.  It opens the queue, runs the
managers that feed handlers from it, and on stop lets them finish before
the queue is closed.  In a worker process a L{MemoryWatch} recycles it
before a leak grows.  A reloaded config is applied in place
(L{IoMaster.reconfigService}).
"""


import os
import socket
import uuid

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from snq.cluster.pauses import PauseWatch
from snq.dispatch import Dispatcher
from snq.handlers import HandlerRegistry
from snq.iomanagers import IoManagers
from snq.ledger import LedgerService, checkLedger
from snq.ledger.holder import LeaseHolder
from snq.queues import makeQueue
from snq.queues.manager import QueueManager
from snq.routing import TransportFilter, groupsOf
from snq.service import AsyncMultiService, defaultReactor
from snq.stats import Stats, residentMemory
from snq.xmpp.accounts import XmppAccounts


def xmppLeased(config, role: str) -> bool:
    """
    Does a worker of C{role} consume the "xmpp" group only while it holds
    the group's lease (C{[cluster] xmpp_lease}, where there is a ledger)?
    """
    return ("xmpp" in groupsOf(config, role) and config.cluster.xmpp_lease > 0
            and not checkLedger(config))


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


class MemoryLimitError(Exception):
    """The worker is over its soft limit before it has done anything."""


class MemoryWatch(Service):
    """
    Recycles a worker before a leak hurts: once its resident memory is over
    the soft limit (checked after every item and once a second) or it has
    done C{maxItems} items, it calls C{recycle(reason)} once, and the worker
    stops claiming, finishes what it holds and exits to be replaced.

    A worker already over the limit at start refuses to start
    (L{MemoryLimitError}): replacing it would only loop.
    """

    log = Logger()

    def __init__(self, softLimit: int | None, maxItems: int, recycle, clock,
                 measure=residentMemory, interval: float = 1.0):
        self.softLimit = softLimit
        self.maxItems = maxItems
        self.recycle = recycle
        self.measure = measure
        self.interval = interval
        #: Items settled (done, retried or dead-lettered) by this worker.
        self.items = 0
        self.recycling = False
        self._timer = LoopingCall(self.check)
        self._timer.clock = clock

    def startService(self):
        rss = self.measure()
        if self.softLimit and rss > self.softLimit:
            raise MemoryLimitError(
                f"resident memory {_mb(rss)} at start is already over the soft "
                f"limit {_mb(self.softLimit)}; raise [queue] memory_limit or "
                f"softlimit")
        super().startService()
        if self.softLimit:
            self._timer.start(self.interval, now=False)

    def stopService(self):
        super().stopService()
        if self._timer.running:
            self._timer.stop()

    def reconfigService(self, config) -> list[str]:
        """New limits, checked from now on; → what changed, in words."""
        softLimit, maxItems = config.queue.softLimitBytes(), config.queue.max_items
        applied = []
        if softLimit != self.softLimit:
            limit = _mb(softLimit) if softLimit else "none"
            applied.append(f"soft memory limit {limit}")
        if maxItems != self.maxItems:
            applied.append(f"max_items {maxItems}")
        self.softLimit, self.maxItems = softLimit, maxItems
        if self.running and bool(softLimit) != self._timer.running:
            if softLimit:
                self._timer.start(self.interval, now=False)
            else:
                self._timer.stop()
        if self.maxItems and self.items >= self.maxItems:
            self._recycle(f"{self.items} items done (max_items {self.maxItems})")
        else:
            self.check()
        return applied

    def itemSettled(self):
        self.items += 1
        if self.maxItems and self.items >= self.maxItems:
            self._recycle(f"{self.items} items done (max_items {self.maxItems})")
        else:
            self.check()

    def check(self):
        if not self.softLimit or self.recycling:
            return
        rss = self.measure()
        if rss > self.softLimit:
            self._recycle(f"resident memory {_mb(rss)} is over the soft limit "
                          f"{_mb(self.softLimit)}")

    def _recycle(self, reason: str):
        if not self.recycling:
            self.recycling = True
            self.recycle(reason)


class IoMaster(AsyncMultiService):
    """
    C{recycle}, when given (in a worker process), is called with a reason
    when the worker should be replaced; without it (C{--inline}) nothing
    watches memory or counts items.

    C{role} says which groups it consumes and which IoManager plugins it
    runs (L{snq.routing.ROLES}): the pool runs one worker of its own for
    the "xmpp" group, which alone holds the XMPP connections, and one for
    each dedicated plugin.  C{site}, when given (C{twistd snq --site NICK}),
    restricts it to that site's items.

    C{recycle} and C{shutdown} (called with a reason: stop for good) are
    also what its managers call when asked from outside (the STOMP control
    channel), as is C{reload} (asks the master to reload the config file);
    None where nothing can carry them out.

    In a worker of the pool, C{claimant} names its leases, C{journal}
    records what runs and C{deaths} asks the master about redelivered
    messages (L{snq.reaper}).
    """

    log = Logger()

    def __init__(self, config, workerId="inline", clock=None, queue=None,
                 registry=None, recycle=None, role="all", shutdown=None,
                 site=None, reload=None, claimant=None, journal=None,
                 deaths=None):
        super().__init__()
        clock = defaultReactor(clock)
        self.config = config
        self.workerId = workerId
        self.clock = clock
        self.stats = Stats()
        self.role = role
        self.site = site
        self.recycle = recycle
        self.shutdown = shutdown
        self.reload = reload
        self.queue = (queue if queue is not None
                      else makeQueue(config, clock, claimant=claimant))
        self.dispatcher = Dispatcher(
            self.queue, registry or HandlerRegistry.load(config.handlers),
            config, self.stats, clock, journal=journal, deaths=deaths)
        self.watch = None
        if recycle is not None:
            self.watch = MemoryWatch(config.queue.softLimitBytes(),
                                     config.queue.max_items, recycle, clock)
            self.watch.setServiceParent(self)
            self.dispatcher.settledHooks.append(self.watch.itemSettled)
        # The ledger is opened when a plugin first asks, and closed last.
        self.ledger = LedgerService(config, self.queue, clock)
        self.ledger.setServiceParent(self)
        # The "xmpp" group, single among all daemons: connected and
        # consumed only while this worker holds its lease, which is given
        # back after the connections are closed.
        self.xmppLease = None
        if xmppLeased(config, role):
            self.xmppLease = LeaseHolder(
                self.ledger, "xmpp" + (f":{site}" if site else ""),
                f"{socket.gethostname()}/{os.getpid()}/{workerId}/"
                f"{uuid.uuid4().hex[:8]}",
                lambda: self.config.cluster.xmpp_lease,
                lambda: self._xmppHeld(True), lambda _: self._xmppHeld(False),
                clock)
            self.xmppLease.setServiceParent(self)
        elif "xmpp" in groupsOf(config, role) and config.cluster.xmpp_lease > 0:
            self.log.warn("the xmpp group is not leased: {why}; run it on one "
                          "host only", why=" ".join(checkLedger(config)))
        # The XMPP connections and the plugins start before the queue
        # manager and so stop after it: items in flight can still finish.
        self.xmpp = XmppAccounts(self.dispatcher.context, role, clock,
                                 active=self.xmppLease is None)
        self.xmpp.setServiceParent(self)
        self.plugins = IoManagers(config, self.dispatcher.context, self.ledger,
                                  role, workerId, site)
        self.plugins.setServiceParent(self)
        # Started before the queue manager: it claims nothing paused.
        self.pauses = PauseWatch(config, self.queue, self._paused, clock)
        self.pauses.setServiceParent(self)
        managerClass = self.queue.managerClass or QueueManager
        self.manager = managerClass(self.queue, self.dispatcher, config,
                                    self.transports(config), clock,
                                    transportsFor=self.transports)
        self.manager.setServiceParent(self)

    def _paused(self, pauses):
        self.dispatcher.pauses = pauses
        self.manager.wake()

    def _waiting(self) -> tuple:
        """The groups not consumed now: "xmpp" while another holds its lease."""
        if self.xmppLease is not None and not self.xmppLease.holding:
            return ("xmpp",)
        return ()

    @property
    def groups(self) -> list[str]:
        """The groups this worker consumes now (brokers subscribe by them)."""
        return [g for g in groupsOf(self.config, self.role)
                if g not in self._waiting()]

    def transports(self, config) -> TransportFilter:
        """What this worker claims under C{config} (not the groups waiting)."""
        return TransportFilter.forWorker(config, self.dispatcher.registry,
                                         self.role, self.site,
                                         without=self._waiting())

    def _xmppHeld(self, holding: bool) -> defer.Deferred:
        """
        Connect, then consume the "xmpp" group (C{holding}); or stop both
        at once: the connections must be closed before the lease lapses,
        whatever items in flight still wait for.
        """
        self.log.info("worker {wid} {what} the xmpp group", wid=self.workerId,
                      what="takes" if holding else "leaves")
        connected = self.xmpp.activate(holding)
        if holding:
            return connected.addCallback(
                lambda _: self.manager.reconfigService(self.config))
        return defer.gatherResults(
            [connected, self.manager.reconfigService(self.config)])

    def status(self) -> dict[str, list[dict]]:
        """Status rows of the plugins, and of the xmpp group's lease."""
        rows = self.plugins.status()
        lease = self.xmppLease
        if lease is not None:
            detail = ("held by this worker" if lease.holding else
                      "waiting: another worker holds it")
            rows["xmpp"] = [{"key": "lease", "state": "ok", "detail": detail}]
        return rows

    @defer.inlineCallbacks
    def reconfigService(self, config):
        """
        Apply a reloaded C{config} in place, in the manner of buildbot's
        C{reconfigService}: each part compares old and new and changes only
        what changed.  → what changed here, in words.  The handlers are
        loaded first, so one that does not load changes nothing; a failure
        after that leaves the worker half configured, and its process asks
        to be replaced (L{snq.child}).
        """
        applied = self.dispatcher.reconfigService(config)
        self.config = config
        self.queue.reconfigService(config)
        applied += yield super().reconfigService(config)
        return applied

    @defer.inlineCallbacks
    def startService(self):
        self.log.info("worker {wid} opening {backend} queue",
                      wid=self.workerId, backend=self.config.queue.backend)
        yield self.queue.open()
        yield super().startService()
        self.log.info("worker {wid} consuming groups {groups}{site}; handlers: "
                      "{handlers}{plugins}", wid=self.workerId,
                      groups=", ".join(self.groups) or "none",
                      site=f" (site {self.site} only)" if self.site else "",
                      handlers=", ".join(sorted(self.dispatcher.handlers)),
                      plugins="; iomanagers: " + ", ".join(self.plugins.plugins)
                      if self.plugins.plugins else "")

    @defer.inlineCallbacks
    def stopService(self):
        yield super().stopService()
        yield self.queue.close()
        self.log.info("worker {wid} stopped: {totals}", wid=self.workerId,
                      totals=self.stats.totals())
