# -*- test-case-name: tests.test_service -*-
"""
The service plumbing: ordered start and stop that wait, the one
reconfiguration hook walked down a tree, signal handlers that put back
what was there.
"""

import os
import signal

from twisted.application.service import Service
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from snq.service import AsyncMultiService, PartlyApplied, SignalHandler


class Part(Service):
    def __init__(self, name, log, applied=(), failed=()):
        self.name = name
        self.log = log
        self.applied = list(applied)
        self.failed = list(failed)
        self.gate = defer.succeed(None)

    def startService(self):
        self.log.append(("start", self.name))
        super().startService()
        return self.gate

    def stopService(self):
        self.log.append(("stop", self.name))
        super().stopService()
        return self.gate

    def reconfigService(self, new):
        self.log.append(("reconfig", self.name, new))
        if self.failed:
            raise PartlyApplied(self.applied, self.failed)
        return self.gate.addCallback(lambda _: self.applied)


class AsyncMultiServiceTests(SynchronousTestCase):
    def test_startWaitsInOrderStopsInReverse(self):
        log = []
        tree = AsyncMultiService()
        a, b = Part("a", log), Part("b", log)
        a.gate = defer.Deferred()
        a.setServiceParent(tree)
        b.setServiceParent(tree)
        d = tree.startService()
        self.assertEqual(log, [("start", "a")], "b waits for a")
        a.gate.callback(None)
        self.successResultOf(d)
        self.successResultOf(tree.stopService())
        self.assertEqual(log[2:], [("stop", "b"), ("stop", "a")])

    def test_reconfigWalksTheTree(self):
        """Children in order, nested trees too; plain services are passed by."""
        log = []
        tree, inner = AsyncMultiService(), AsyncMultiService()
        Part("a", log, ["a changed"]).setServiceParent(tree)
        Service().setServiceParent(tree)
        inner.setServiceParent(tree)
        Part("b", log, ["b changed"]).setServiceParent(inner)
        self.assertEqual(self.successResultOf(tree.reconfigService("new")),
                         ["a changed", "b changed"])
        self.assertEqual(log, [("reconfig", "a", "new"), ("reconfig", "b", "new")])

    def test_aPartlyAppliedPartDoesNotStopTheOthers(self):
        log = []
        tree = AsyncMultiService()
        Part("a", log, ["a half"], ["a could not"]).setServiceParent(tree)
        Part("b", log, ["b changed"]).setServiceParent(tree)
        e = self.failureResultOf(tree.reconfigService("new"), PartlyApplied).value
        self.assertEqual((e.applied, e.failed),
                         (["a half", "b changed"], ["a could not"]))
        self.assertEqual(len(log), 2)

    def test_otherErrorsStopTheWalk(self):
        log = []
        tree = AsyncMultiService()
        broken = Part("a", log)
        broken.reconfigService = lambda new: 1 / 0
        broken.setServiceParent(tree)
        Part("b", log).setServiceParent(tree)
        self.failureResultOf(tree.reconfigService("new"), ZeroDivisionError)
        self.assertEqual(log, [])


class ThreadlessReactor:
    def callFromThread(self, f, *args):
        f(*args)


class SignalHandlerTests(SynchronousTestCase):
    def test_installedThenPutBack(self):
        calls = []
        before = signal.getsignal(signal.SIGUSR2)
        handler = SignalHandler(signal.SIGUSR2, lambda: calls.append(1),
                                ThreadlessReactor())
        handler.install()
        self.addCleanup(handler.uninstall)
        os.kill(os.getpid(), signal.SIGUSR2)
        self.assertEqual(calls, [1])
        handler.uninstall()
        self.assertEqual(signal.getsignal(signal.SIGUSR2), before)
