# -*- test-case-name: tests.test_iomaster -*-
"""
The IoMaster: one worker's service tree.  It opens the queue, runs the
managers that feed handlers from it, and on stop lets them finish before
the queue is closed.
"""

from twisted.internet import defer
from twisted.logger import Logger

from snq.handlers import HandlerRegistry
from snq.queues import makeQueue
from snq.queues.base import Dispatcher, QueueManager, TransportFilter
from snq.service import AsyncMultiService
from snq.stats import Stats


class IoMaster(AsyncMultiService):
    log = Logger()

    def __init__(self, config, workerId="inline", clock=None, queue=None,
                 registry=None):
        super().__init__()
        if clock is None:
            from twisted.internet import reactor as clock
        self.config = config
        self.workerId = workerId
        self.clock = clock
        self.stats = Stats()
        self.queue = queue if queue is not None else makeQueue(config, clock)
        self.registry = registry or HandlerRegistry.load(config.handlers)
        self.dispatcher = Dispatcher(self.queue, self.registry, config,
                                     self.stats, clock)
        groupOf = {name: self.registry.groupOf(name, config.transport(name).group)
                   for name in {*self.registry.classes, *config.transports}}
        managerClass = self.queue.managerClass or QueueManager
        self.manager = managerClass(
            self.queue, self.dispatcher, config,
            TransportFilter.forGroups(config.queue.groups, groupOf), clock)
        self.manager.setServiceParent(self)

    @defer.inlineCallbacks
    def startService(self):
        self.log.info("worker {wid} opening {backend} queue",
                      wid=self.workerId, backend=self.config.queue.backend)
        yield self.queue.open()
        yield super().startService()
        self.log.info("worker {wid} consuming groups {groups}; handlers: "
                      "{handlers}", wid=self.workerId,
                      groups=", ".join(self.config.queue.groups),
                      handlers=", ".join(sorted(self.dispatcher.handlers)))

    @defer.inlineCallbacks
    def stopService(self):
        yield super().stopService()
        yield self.queue.close()
        self.log.info("worker {wid} stopped: {totals}", wid=self.workerId,
                      totals=self.stats.totals())
