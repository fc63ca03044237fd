# -*- test-case-name: tests.test_testing -*-
"""
L{snq.testing}: outcomes of every kind, blocking and coroutine handlers,
handlers that wait on the reactor, and the pytest fixtures.  The manual's
own examples are L{tests.examples}.
"""

import subprocess
import sys

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase

from snq.handlers import QueueHandler
from snq.testing import (
    FakeClock,
    RecordingQueue,
    StillRunning,
    runHandler,
    runHandlerAsync,
)
from tests.daemon import ROOT, environ


class Blocking(QueueHandler):
    transport = "blocking"
    blocking = True

    def handle(self, item):
        return item.payload == "ok"


class Coroutine(QueueHandler):
    transport = "coro"

    async def handle(self, item):
        await defer.succeed(None)
        self.context.enqueue("next", item.payload, site=item.site)


class Forever(QueueHandler):
    transport = "forever"

    def handle(self, item):
        return defer.Deferred()


class Stopping(QueueHandler):
    transport = "stopping"
    stopped = 0

    def handle(self, item):
        return True

    def stop(self):
        Stopping.stopped += 1


class OnTheReactor(QueueHandler):
    transport = "reactor"

    def handle(self, item):
        return task.deferLater(self.context.clock, 0.01, lambda: item.payload)


class RunHandlerTests(SynchronousTestCase):
    def test_blockingRunsInTheTestsThread(self):
        self.assertEqual(runHandler(Blocking, "ok").kind, "done")
        outcome = runHandler(Blocking, "no")
        self.assertEqual((outcome.kind, outcome.error),
                         ("retry", "handler returned False"))

    def test_coroutineAndASharedQueue(self):
        queue = RecordingQueue()
        for n in range(2):
            outcome = runHandler(Coroutine, n, site="ex", queue=queue)
            self.assertEqual(outcome.kind, "done")
        self.assertEqual([(i.transport, i.payload, i.site, i.run_at)
                          for i in queue.enqueued],
                         [("next", 0, "ex", None), ("next", 1, "ex", None)])

    def test_waitingForever(self):
        self.assertRaises(StillRunning, runHandler, Forever, None)

    def test_badSite(self):
        """An unknown site waits for a reload; dead once its retries ran out."""
        outcome = runHandler(Coroutine, 1, site="other",
                             config={"sites": {"ex": {}}})
        self.assertEqual((outcome.kind, outcome.error),
                         ("retry", "unknown site 'other' (not under [sites])"))
        outcome = runHandler(Coroutine, 1, site="other", attempts=10,
                             config={"sites": {"ex": {}}})
        self.assertEqual((outcome.kind, outcome.reason), ("dead", "badsite"))

    def test_transportWhenTheClassHasNone(self):
        class Anonymous(QueueHandler):
            def handle(self, item):
                return item.transport == "given"

        self.assertRaises(ValueError, runHandler, Anonymous, None)
        self.assertEqual(runHandler(Anonymous, None, transport="given").kind,
                         "done")

    def test_handlersAreStopped(self):
        before = Stopping.stopped
        runHandler(Stopping, None)
        self.assertEqual(Stopping.stopped, before + 1)

    def test_itemAsTheWorkerBuildsIt(self):
        outcome = runHandler(Stopping, {"a": 1}, site="ex", attempts=2, key="k",
                             config={"transports": {"stopping": {"priority": 4}}},
                             clock=FakeClock(100.0))
        item = outcome.item
        self.assertEqual((item.payload, item.site, item.attempts, item.key,
                          item.priority, item.created),
                         ({"a": 1}, "ex", 2, "k", 4, 100.0))


class RunHandlerAsyncTests(TestCase):
    @defer.inlineCallbacks
    def test_onTheReactor(self):
        outcome = yield runHandlerAsync(OnTheReactor, True, clock=reactor)
        self.assertEqual(outcome.kind, "done")
        self.assertRaises(TypeError, runHandler, OnTheReactor, True,
                          clock=reactor)


class PytestTests(SynchronousTestCase):
    def test_examplesUnderPytest(self):
        """The fixtures work in pytest (the manual's pytest example)."""
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "tests/examples/test_welcome_pytest.py"], cwd=ROOT, env=environ(),
            capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("3 passed", result.stdout)
