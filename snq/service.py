# -*- test-case-name: tests.test_service -*-
"""
Service plumbing that Twisted's own MultiService leaves out: it neither
waits for its children's start Deferreds nor reports their stop failures,
and it has no reconfiguration.  snq's one reconfiguration hook is
buildbot's: a service that can follow a reloaded config in place has
C{reconfigService(new)}, which changes only what changed and returns (a
Deferred of) what it did, in words; an L{AsyncMultiService} walks it down
to its children.
"""

import signal

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


class SignalHandler:
    """
    While installed, C{signum} calls C{callback()} in the reactor's thread;
    uninstalling puts back the handler there was.
    """

    def __init__(self, signum, callback, reactor):
        self.signum = signum
        self.callback = callback
        self.reactor = reactor
        self._previous = None

    def install(self):
        self._previous = signal.signal(self.signum, self._handle)

    def uninstall(self):
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def _handle(self, signum, frame):
        self.reactor.callFromThread(self.callback)


class PartlyApplied(Exception):
    """
    A reconfiguration that went as far as it could: C{applied} is what
    changed, C{failed} what did not (a worker that could not follow, say),
    each in words.
    """

    def __init__(self, applied: list[str], failed: list[str]):
        super().__init__("; ".join(failed))
        self.applied = applied
        self.failed = failed


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

    def addService(self, service):
        """
        As MultiService's, but what the start of a child added while this
        runs returns (a Deferred, say) is returned, so that who adds it can
        wait for it: C{service.parent = self; yield self.addService(service)}.
        """
        running, self.running = self.running, False
        try:
            super().addService(service)
        finally:
            self.running = running
        if not running:
            return None
        service.privilegedStartService()
        return service.startService()

    @defer.inlineCallbacks
    def stopService(self):
        Service.stopService(self)
        for child in reversed(list(self)):
            if child.running:
                try:
                    yield child.stopService()
                except Exception:
                    self.log.failure("stopping {child} failed", child=child)

    @defer.inlineCallbacks
    def reconfigService(self, new):
        """
        Each child that can follow C{new} in place does, in order; → what
        they changed.  A child that only partly followed does not keep the
        others from trying: L{PartlyApplied} comes at the end, with all.
        """
        applied, failed = [], []
        for child in list(self):
            reconfigure = getattr(child, "reconfigService", None)
            if reconfigure is None:
                continue
            try:
                applied += (yield defer.maybeDeferred(reconfigure, new)) or []
            except PartlyApplied as e:
                applied += e.applied
                failed += e.failed
        if failed:
            raise PartlyApplied(applied, failed)
        return applied
