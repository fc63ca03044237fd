# -*- test-case-name: tests.test_monitor -*-
"""
The master's monitoring, as one service under the daemon.
"""

from twisted.internet import defer

from snq.monitor.statsd import StatsdSender
from snq.monitor.tracker import QueueWatch, Tracker
from snq.monitor.udp import StatusNetMonitor
from snq.queues import location, makeQueue
from snq.service import AsyncMultiService, defaultReactor


class MonitorService(AsyncMultiService):
    """
    A L{Tracker} on the pool's reports, a L{QueueWatch} on a queue of its
    own, and what C{[monitor]} asks for: StatusNet's UDP monitor, statsd,
    the HTTP side.  Senders start first and stop last, so nothing the
    tracker passes on is lost to a sender that is not there.
    """

    def __init__(self, config, pool, queue=None, reactor=None):
        super().__init__()
        reactor = defaultReactor(reactor)
        self.config = config
        self.reactor = reactor
        self.senders = self._senders(config.monitor)
        for sender in self.senders:
            sender.setServiceParent(self)
        self.queue = queue if queue is not None else self._queue(config)
        self.tracker = Tracker(pool, reactor, self.senders, self.queue.describe())
        self.tracker.setServiceParent(self)
        pool.observers.append(self.tracker)
        self.watch = self._watch(config)
        #: The daemon's L{snq.cluster.registry.RegistryService}, for the
        #: dashboard's cluster view (set by whoever makes both).
        self.registry = None
        self.http = self._http(config)

    def _queue(self, config):
        return makeQueue(config, self.reactor,
                         claimant=f"{config.daemon.id}.monitor")

    def _senders(self, monitor) -> list:
        senders = []
        if monitor.udp:
            senders.append(StatusNetMonitor.fromConfig(monitor.udp, self.reactor))
        if monitor.statsd:
            senders.append(StatsdSender.fromConfig(monitor, self.reactor))
        return senders

    def _watch(self, config) -> QueueWatch:
        watch = QueueWatch(self.queue, self.tracker, config.monitor.depth_interval,
                           self.reactor)
        watch.setServiceParent(self)
        return watch

    def _http(self, config):
        """The HTTP side, or None; Twisted's web and Prometheus' client are
        imported only for it."""
        monitor = config.monitor
        if not monitor.http:
            return None
        from snq.monitor.actions import Actions
        from snq.monitor.metrics import registry
        from snq.monitor.web import HttpService, makeSite

        token = monitor.token.reveal()
        site = makeSite(self.tracker, registry(self.tracker, config.queue.backend,
                                               self.senders), token,
                        monitor.hostNames(),
                        Actions(config, token, monitor.hostNames(), self.reactor),
                        self._cluster)
        http = HttpService(monitor.http, site, self.reactor)
        http.setServiceParent(self)
        return http

    def _cluster(self):
        return self.registry.view() if self.registry is not None else None

    @defer.inlineCallbacks
    def reconfigService(self, config):
        """
        Follow a reloaded config: targets that changed are replaced, the
        totals stay (in the tracker); the queue watched follows the
        daemon's.  → what changed, in words.
        """
        old, self.config = self.config, config
        before, after = old.monitor, config.monitor
        applied = []
        if (before.udp, before.statsd, before.statsd_prefix) != (
                after.udp, after.statsd, after.statsd_prefix):
            for sender in self.senders:
                yield sender.disownServiceParent()
            senders = self._senders(after)
            for n, sender in enumerate(senders):
                sender.setServiceParent(self)
                # First among the services, as at start: they stop last.
                self.services.remove(sender)
                self.services.insert(n, sender)
            self.senders[:] = senders
            self.tracker.sinks = list(senders)
            applied.append("monitor: sending to " + (", ".join(
                f"{type(s).__name__} {s.host}:{s.port}" for s in senders)
                or "neither a UDP monitor nor statsd"))
        moved = location(old) != location(config)
        if moved or before.depth_interval != after.depth_interval:
            yield self.watch.disownServiceParent()
            if moved:
                self.queue = self._queue(config)
                self.tracker.describe = self.queue.describe()
            self.watch = self._watch(config)
            applied.append(f"monitor: watching {self.queue.describe()} every "
                           f"{after.depth_interval:g} s")
        else:
            self.queue.reconfigService(config)
        if moved or (before.http, before.token, before.hosts) != (
                after.http, after.token, after.hosts):
            if self.http is not None:
                yield self.http.disownServiceParent()
            self.http = self._http(config)
            applied.append(f"monitor: HTTP on {after.http}" if after.http
                           else "monitor: HTTP off")
        return applied
