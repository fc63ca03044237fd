# -*- test-case-name: tests.test_monitor -*-
"""
The master's monitoring, as one service under the daemon.
"""

from snq.monitor.metrics import registry
from snq.monitor.statsd import StatsdSender
from snq.monitor.tracker import QueueWatch, Tracker
from snq.monitor.udp import StatusNetMonitor
from snq.monitor.web import HttpService, makeSite
from snq.queues import makeQueue
from snq.service import AsyncMultiService


class MonitorService(AsyncMultiService):
    """
    A L{Tracker} on the pool's reports, a L{QueueWatch} on a queue of its
    own, and what C{[monitor]} asks for: StatusNet's UDP monitor, statsd,
    the HTTP side.  Senders start first and stop last, so nothing the
    tracker passes on is lost to a sender that is not there.
    """

    def __init__(self, config, pool, queue=None, reactor=None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        monitor = config.monitor
        if queue is None:
            queue = makeQueue(config, reactor, claimant=f"{config.daemon.id}.monitor")
        self.senders = []
        if monitor.udp:
            self.senders.append(StatusNetMonitor.fromConfig(monitor.udp, reactor))
        if monitor.statsd:
            self.senders.append(StatsdSender.fromConfig(monitor, reactor))
        for sender in self.senders:
            sender.setServiceParent(self)
        self.tracker = Tracker(pool, reactor, self.senders, queue.describe())
        self.tracker.setServiceParent(self)
        pool.observers.append(self.tracker)
        QueueWatch(queue, self.tracker, monitor.depth_interval,
                   reactor).setServiceParent(self)
        self.http = None
        if monitor.http:
            site = makeSite(self.tracker, registry(self.tracker, config.queue.backend,
                                                   self.senders), monitor.token)
            self.http = HttpService(monitor.http, site, reactor)
            self.http.setServiceParent(self)
