# -*- test-case-name: tests.test_iomanager -*-
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from snq.iomanager import PollingManager
from snq.service import AsyncMultiService


class ScriptedPoller(PollingManager):
    """Answers each poll from a script; records when it was called."""

    def __init__(self, answers, clock):
        super().__init__(pollInterval=5, clock=clock)
        self.answers = list(answers)
        self.calls = []
        self.pending = None

    def poll(self):
        self.calls.append(self.clock.seconds())
        if not self.answers:
            return None
        answer = self.answers.pop(0)
        if answer == "wait":
            self.pending = defer.Deferred()
            return self.pending
        if answer == "boom":
            raise RuntimeError("database is down")
        return answer


class PollingManagerTests(SynchronousTestCase):
    def test_statusNetBackoff(self):
        """Hit → at once; misses → wait 1, 2, 4, then the interval (5)."""
        clock = Clock()
        p = ScriptedPoller([True, True, False, False, False, False, False,
                            True, False], clock)
        p.startService()
        clock.pump([0] * 3 + [1] * 30)
        # The last poll (at 18) finds the script empty and pauses.
        self.assertEqual(p.calls, [0, 0, 0, 1, 3, 7, 12, 17, 17, 18])

    def test_errorBacksOff(self):
        """An outage: backoff, one traceback, then one line per failure."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock = Clock()
        p = ScriptedPoller(["boom", "boom", "boom", True, False], clock)
        p.startService()
        clock.pump([0] + [1] * 8)
        self.assertEqual(p.calls, [0, 1, 3, 7, 7, 8])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual([e["n"] for e in events if "n" in e], [2, 3, 3])
        self.assertEqual(events[-1]["log_format"],
                         "{manager} polls again after {n} failures")

    def test_pausedUntilWoken(self):
        """None means "no capacity": no timer until wake()."""
        clock = Clock()
        p = ScriptedPoller([None, True, False], clock)
        p.startService()
        clock.advance(0)
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(100)
        p.wake()
        clock.advance(0)
        self.assertEqual(p.calls, [0, 100, 100])

    def test_neverOverlapsAndStopWaits(self):
        clock = Clock()
        p = ScriptedPoller(["wait"], clock)
        p.startService()
        clock.advance(0)
        p.wake()
        clock.advance(10)
        self.assertEqual(len(p.calls), 1)
        stopped = p.stopService()
        self.assertNoResult(stopped)
        p.pending.callback(True)
        self.successResultOf(stopped)
        self.assertEqual(clock.getDelayedCalls(), [])


class Recorder(Service):
    def __init__(self, name, log, gate=None):
        self.name, self.log, self.gate = name, log, gate

    def startService(self):
        super().startService()
        self.log.append(("start", self.name))
        return self.gate

    def stopService(self):
        super().stopService()
        self.log.append(("stop", self.name))
        return self.gate


class AsyncMultiServiceTests(SynchronousTestCase):
    def test_startsInOrderWaitingForEach(self):
        log, gate = [], defer.Deferred()
        parent = AsyncMultiService()
        Recorder("a", log, gate).setServiceParent(parent)
        Recorder("b", log).setServiceParent(parent)
        started = parent.startService()
        self.assertEqual(log, [("start", "a")])
        gate.callback(None)
        self.successResultOf(started)
        self.assertEqual(log, [("start", "a"), ("start", "b")])

    def test_stopsInReverseWaitingForEach(self):
        log, gate = [], defer.Deferred()
        parent = AsyncMultiService()
        Recorder("a", log).setServiceParent(parent)
        Recorder("b", log, gate).setServiceParent(parent)
        parent.startService()
        del log[:]
        stopped = parent.stopService()
        self.assertEqual(log, [("stop", "b")])
        self.assertNoResult(stopped)
        gate.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(log, [("stop", "b"), ("stop", "a")])
