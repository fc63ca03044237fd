# -*- test-case-name: tests.test_iomanager -*-
"""
Service plumbing that Twisted's own MultiService leaves out: it neither
waits for its children's start Deferreds nor reports their stop failures.
"""

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger


def defaultReactor(reactor=None):
    """
    C{reactor}, else the global one: services take their reactor (or clock)
    as a parameter so tests can drive time, and import the global reactor
    only when none is given.
    """
    if reactor is None:
        from twisted.internet import reactor
    return reactor


class AsyncMultiService(MultiService):
    """
    Starts children in order, each after the previous one's start finished,
    and stops them in reverse order, each stop awaited, so that a queue is
    closed only after the managers using it have let go.
    """

    log = Logger()

    @defer.inlineCallbacks
    def startService(self):
        Service.startService(self)
        for child in list(self):
            if not child.running:
                yield child.startService()

    @defer.inlineCallbacks
    def stopService(self):
        Service.stopService(self)
        for child in reversed(list(self)):
            if child.running:
                try:
                    yield child.stopService()
                except Exception:
                    self.log.failure("stopping {child} failed", child=child)
