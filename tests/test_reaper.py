# -*- test-case-name: tests.test_reaper -*-
"""
The master's L{Reaper} on fakes: a pool of fake processes with real
journals, a queue that records what it was asked, a Clock.
"""

from types import SimpleNamespace

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from snq import config as snqconfig
from snq.journal import Journal
from snq.reaper import Reaper


class FakeQueue:
    def __init__(self, leased=True):
        self.leased = leased
        self.returned = []
        self.reaped = 0
        self.opened = 0
        self.refusals = 0

    def describe(self):
        return "fake"

    def open(self):
        self.opened += 1
        return defer.succeed(None)

    def close(self):
        return defer.succeed(None)

    def reconfigService(self, config):
        pass

    def reapExpired(self):
        self.reaped += 1
        return defer.succeed(0)

    def returnClaims(self, claimant, started):
        if self.refusals:
            self.refusals -= 1
            return defer.fail(ConnectionError("database gone"))
        self.returned.append((claimant, started))
        return defer.succeed((5, len(started)))


class FakePool:
    def __init__(self):
        self.observers = []
        self.reaper = None
        self.live = []

    def processes(self):
        return list(self.live)


class ReaperTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.pool = FakePool()
        self.config = snqconfig.parse({"queue": {"lease": 30},
                                       "daemon": {"kill_time": 5}})

    def reaper(self, leased=True):
        self.queue = FakeQueue(leased)
        reaper = Reaper(self.config, self.pool, self.queue, self.clock)
        reaper.startService()
        self.addCleanup(reaper.stopService)
        return reaper

    def process(self, wid, running=()):
        """A worker process whose journal says C{running} runs."""
        journal = Journal.create(4)
        self.addCleanup(journal.close)
        worker = Journal.attach(journal.fd)
        self.addCleanup(worker.close)
        slots = {key: worker.start(key) for key in running}
        process = SimpleNamespace(worker=SimpleNamespace(wid=wid), pid=100,
                                  claimant=f"host-{wid}-abcd", journal=journal,
                                  ended=False, slots=slots, writer=worker)
        self.pool.live.append(process)
        return process

    def die(self, reaper, process):
        process.ended = True
        reaper.workerEnded(process)
        self.pool.live.remove(process)


class LeaseTests(ReaperTestCase):
    def test_wiredIntoThePool(self):
        reaper = self.reaper()
        self.assertIs(self.pool.reaper, reaper)
        self.assertIn(reaper, self.pool.observers)

    def test_deadWorkersClaimsGoBackAtOnce(self):
        reaper = self.reaper()
        process = self.process("w.0", [b"17", b"18"])
        with capturedLogs() as events:
            self.die(reaper, process)
        self.assertEqual(self.queue.returned, [("host-w.0-abcd", {b"17", b"18"})])
        self.assertIn("worker w.0 (pid 100) held 5 items: back in the queue; "
                      "the 2 it was running charged an attempt",
                      [e["log_format"].format(**e) for e in events])

    def test_triedAgainUntilTheStoreAnswers(self):
        reaper = self.reaper()
        self.queue.refusals = 3
        with capturedLogs():
            self.die(reaper, self.process("w.0"))
            self.clock.pump([1] * 3)
        self.assertEqual(self.queue.returned, [("host-w.0-abcd", set())])

    def test_givesUpWhenTheLeasesWouldHaveExpiredAnyway(self):
        reaper = self.reaper()
        self.queue.refusals = 1000
        with capturedLogs():
            self.die(reaper, self.process("w.0"))
            self.clock.pump([1] * 31)
        self.assertEqual(self.queue.returned, [])
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 1)
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), 40.0,
                         "only the expired-lease reaper is left")

    def test_expiredLeasesReturnedFromTheStart(self):
        self.reaper()
        self.assertEqual(self.queue.reaped, 1)
        self.clock.advance(10)
        self.assertEqual(self.queue.reaped, 2)

    def test_followsAReload(self):
        reaper = self.reaper()
        old = self.queue
        config = snqconfig.parse({"queue": {"lease": 60}})
        self.assertEqual(self.successResultOf(reaper.reconfigService(config)), [])
        self.assertIs(reaper.queue, old)
        self.clock.advance(20)
        self.assertEqual(old.reaped, 2, "every lease/3 of the new lease")
        moved = snqconfig.parse({"queue": {"lease": 60, "backend": "redis"}})
        new = FakeQueue()
        reaper._queue = lambda config: new
        self.assertEqual(self.successResultOf(reaper.reconfigService(moved)),
                         ["reaper: returning claims on fake"])
        self.assertIs(reaper.queue, new)
        self.clock.advance(20)
        self.assertEqual((old.reaped, new.reaped), (2, 1))

    def test_stopWaitsForWhatIsBeingGivenBack(self):
        reaper = self.reaper()
        self.queue.refusals = 1
        with capturedLogs():
            self.die(reaper, self.process("w.0"))
            stopped = reaper.stopService()
            self.assertNoResult(stopped)
            self.clock.advance(1)
        self.successResultOf(stopped)


class BrokerTests(ReaperTestCase):
    """STOMP: the broker takes back; the master counts deaths."""

    def test_deathsCountedAndCarriedAway(self):
        reaper = self.reaper(leased=False)
        self.assertEqual(self.queue.reaped, 0, "nothing expires on a broker")
        for n in range(2):
            with capturedLogs():
                self.die(reaper, self.process(f"w.{n}", [b"poison"]))
        asker = self.process("w.2")
        self.assertEqual(self.successResultOf(reaper.deathsOf(b"poison", asker)), 2)
        self.assertEqual(self.successResultOf(reaper.deathsOf(b"poison", asker)), 0,
                         "the message carries the count from now on")
        self.assertEqual(self.queue.returned, [])

    def test_waitsWhileItRunsElsewhere(self):
        """A connection cut: the first worker still runs it."""
        reaper = self.reaper(leased=False)
        first = self.process("w.0", [b"item"])
        d = reaper.deathsOf(b"item", self.process("w.1"))
        self.clock.advance(1)
        self.assertNoResult(d)
        first.writer.finish(first.slots[b"item"])
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(d), 0, "it did not die")

    def test_deathSeenLate(self):
        """The redelivery can come before the master sees the death."""
        reaper = self.reaper(leased=False)
        dying = self.process("w.0", [b"item"])
        d = reaper.deathsOf(b"item", self.process("w.1"))
        self.assertNoResult(d)
        with capturedLogs():
            self.die(reaper, dying)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(d), 1)

    def test_waitsAtMostKillTime(self):
        reaper = self.reaper(leased=False)
        self.process("w.0", [b"item"])
        d = reaper.deathsOf(b"item", self.process("w.1"))
        self.clock.pump([0.1] * 49)
        self.assertNoResult(d)
        self.clock.pump([0.1] * 2)
        self.assertEqual(self.successResultOf(d), 0)
