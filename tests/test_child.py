# -*- test-case-name: tests.test_child -*-
"""
The worker side: the memory watch that recycles a worker, and a worker
process's life (reports, exit status, graceful stop) on a Clock, with an
in-memory queue and the AMP channel on a StringTransport.
"""

import io
import os

from twisted.internet import defer
from twisted.internet.protocol import connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogLevel
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase

from snq import config as snqconfig
from snq.amp import EXIT_RECYCLE, Channel, Report
from snq.child import Worker, lineObserver
from snq.handlers import HandlerRegistry, QueueHandler
from snq.handlers.builtin import NoopHandler
from snq.iomaster import IoMaster, MemoryLimitError, MemoryWatch, residentMemory
from snq.item import Item
from snq.queues.memory import MemoryQueue

MB = 2**20


class Meter:
    """A resident memory the test sets."""

    def __init__(self, rss=10 * MB):
        self.rss = rss

    def __call__(self):
        return self.rss


class MemoryWatchTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.meter = Meter()
        self.reasons = []

    def watch(self, softLimit=100 * MB, maxItems=0):
        watch = MemoryWatch(softLimit, maxItems, self.reasons.append, self.clock,
                            measure=self.meter)
        watch.startService()
        self.addCleanup(watch.stopService)
        return watch

    def test_residentMemoryIsThisProcesss(self):
        with open(f"/proc/{os.getpid()}/status") as f:
            vmrss = next(int(line.split()[1]) * 1024 for line in f
                         if line.startswith("VmRSS:"))
        # trial's assertAlmostEqual takes places, not delta: bound it by hand.
        self.assertLessEqual(abs(residentMemory() - vmrss), 8 * MB)

    def test_overTheLimitAtStartRefusesToStart(self):
        self.meter.rss = 120 * MB
        watch = MemoryWatch(100 * MB, 0, self.reasons.append, self.clock,
                            measure=self.meter)
        e = self.assertRaises(MemoryLimitError, watch.startService)
        self.assertIn("resident memory 120.0 MB at start is already over the "
                      "soft limit 100.0 MB; raise [queue] memory_limit or "
                      "softlimit", str(e))
        self.assertFalse(watch.running)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_checkedAfterEveryItem(self):
        watch = self.watch()
        watch.itemSettled()
        self.assertEqual(self.reasons, [])
        self.meter.rss = 101 * MB
        watch.itemSettled()
        self.assertEqual(self.reasons, ["resident memory 101.0 MB is over the "
                                        "soft limit 100.0 MB"])
        watch.itemSettled()
        self.clock.advance(5)
        self.assertEqual(len(self.reasons), 1, "asked once")
        self.assertEqual(watch.items, 3)

    def test_checkedOnATimer(self):
        self.watch()
        self.meter.rss = 101 * MB
        self.clock.advance(0.9)
        self.assertEqual(self.reasons, [])
        self.clock.advance(0.1)
        self.assertEqual(len(self.reasons), 1)

    def test_maxItems(self):
        watch = self.watch(softLimit=None, maxItems=3)
        watch.itemSettled()
        watch.itemSettled()
        self.assertEqual(self.reasons, [])
        watch.itemSettled()
        self.assertEqual(self.reasons, ["3 items done (max_items 3)"])

    def test_noLimitNoTimer(self):
        watch = self.watch(softLimit=None)
        self.meter.rss = 10_000 * MB
        watch.itemSettled()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.reasons, [])

    def test_softLimitFromConfig(self):
        config = snqconfig.parse({"queue": {"memory_limit": "200m",
                                            "softlimit": "50%"}})
        master = IoMaster(config, clock=self.clock, queue=MemoryQueue(self.clock),
                          registry=HandlerRegistry({}), recycle=self.reasons.append)
        self.assertEqual(master.watch.softLimit, 100 * MB)
        self.assertIs(next(iter(master)), master.watch, "started before the manager")

    def test_inlineHasNoWatch(self):
        master = IoMaster(snqconfig.Config(), clock=self.clock,
                          queue=MemoryQueue(self.clock), registry=HandlerRegistry({}))
        self.assertIsNone(master.watch)


class FakeReactor(Clock):
    def __init__(self):
        super().__init__()
        self.stops = 0

    def stop(self):
        self.stops += 1

    def callFromThread(self, f, *args):
        f(*args)


class Master(Channel):
    """The master's end of the channel: keeps the reports."""

    def __init__(self):
        super().__init__()
        self.reports = []

    @Report.responder
    def report(self, report):
        self.reports.append(report)
        return {}


class PipeTransport(StringTransport):
    """Like the pipe to the master: closing it ends the connection."""

    def __init__(self, protocol):
        super().__init__()
        self.protocol = protocol

    def loseConnection(self):
        super().loseConnection()
        self.protocol.connectionLost(connectionDone)


class Fail(QueueHandler):
    transport = "fail"

    def handle(self, item):
        raise ValueError("no")


class Slow(QueueHandler):
    """Finishes when the test fires its Deferred."""

    transport = "slow"
    pending: list = []

    def handle(self, item):
        d = defer.Deferred()
        self.pending.append(d)
        return d


class Child(SynchronousTestCase):
    def setUp(self):
        self.reactor = FakeReactor()
        self.queue = MemoryQueue(self.reactor)
        self.registry = HandlerRegistry({"noop": NoopHandler, "fail": Fail,
                                         "slow": Slow})
        Slow.pending = []

    def worker(self, **queue):
        config = snqconfig.parse({"queue": {"max_retries": 0, **queue}})

        def iomaster(config, **kw):
            return IoMaster(config, queue=self.queue, registry=self.registry, **kw)

        worker = Worker(config, "generic.3", self.reactor, iomaster)
        self.transport = PipeTransport(worker.channel)
        worker.channel.makeConnection(self.transport)
        return worker

    def reports(self):
        master = Master()
        master.makeConnection(StringTransport())
        master.dataReceived(self.transport.value())
        return master.reports

    def put(self, n, transport="noop"):
        for _ in range(n):
            self.queue.enqueue([Item(transport=transport, payload={})])

    def stop(self, worker):
        """What the reactor does on stop: the before-shutdown trigger."""
        d = worker.stop()
        self.reactor.advance(0)
        self.successResultOf(d)


class WorkerTests(Child):
    def test_reportsStartingRunningAndEverySecond(self):
        worker = self.worker()
        worker.start()
        self.reactor.advance(0)
        states = [r["state"] for r in self.reports()]
        self.assertEqual(states, ["starting", "running"])
        self.reactor.advance(1)
        self.assertEqual(len(self.reports()), 3)
        self.stop(worker)
        self.assertEqual(self.reports()[-1]["state"], "stopping")
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_snapshot(self):
        self.put(3)
        self.put(1, "fail")
        worker = self.worker()
        worker.start()
        self.reactor.advance(1)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        report = self.reports()[-1]
        self.assertEqual(report["pid"], os.getpid())
        self.assertEqual((report["handled"], report["errors"], report["items"]),
                         (3, 1, 4))
        self.assertEqual((report["inflight"], report["held"]), (0, 0))
        self.assertGreater(report["rss"], 10 * MB)
        self.assertIn(["handled", "noop", "default", 3], report["counts"])
        self.assertIn(["error", "fail", "default", 1], report["counts"])
        self.assertEqual(report["timings"]["noop"][0], 3)
        self.assertEqual(sum(report["buckets"]["noop"]), 3)
        self.stop(worker)

    def test_claimantJournalAndDeathsReachTheIoMaster(self):
        """What the master gave the process, for after its death."""
        made = []
        journal = object()
        worker = Worker(snqconfig.parse({}), "generic.3", self.reactor,
                        lambda config, **kw: made.append(kw),
                        claimant="host-generic.3-1a2b3c4d", journal=journal)
        worker._build()
        [kw] = made
        self.assertEqual((kw["claimant"], kw["journal"], kw["deaths"]),
                         ("host-generic.3-1a2b3c4d", journal, worker.deaths))
        made.clear()
        Worker(snqconfig.parse({}), "inline", self.reactor,
               lambda config, **kw: made.append(kw))._build()
        self.assertIsNone(made[0]["deaths"], "no journal: no deaths counted")

    def test_deathsAreAskedOfTheMaster(self):
        worker = self.worker()
        d = worker.deaths(b"5f2a")
        [box] = [b for b in amp.parseString(self.transport.value())
                 if b.get(b"_command") == b"Deaths"]
        self.assertEqual(box[b"key"], b"5f2a")
        worker.channel.dataReceived(amp.AmpBox(
            {b"_answer": box[b"_ask"], b"deaths": b"2"}).serialize())
        self.assertEqual(self.successResultOf(d), 2)

    def test_activity(self):
        """StatusNet's thread states, for the UDP monitor."""
        worker = self.worker()
        self.assertEqual(worker.snapshot()["activity"], ["init", ""])
        worker.start()
        self.reactor.advance(0)
        self.assertEqual(worker.snapshot()["activity"], ["idle", ""],
                         "a poll found nothing")
        self.put(1, "slow")
        self.put(1)
        worker.iomaster.manager.wake()
        self.assertEqual(worker.snapshot()["activity"], ["poll", ""],
                         "about to poll")
        self.reactor.advance(0)
        self.assertEqual(worker.snapshot()["activity"], ["queue", "slow"])
        Slow.pending.pop().callback(None)
        self.assertEqual(worker.snapshot()["activity"], ["idle", ""])
        worker.exit(0, "test")
        self.assertEqual(worker.snapshot()["activity"], ["shutdown", ""])
        self.stop(worker)

    def test_lastReportHasTheFinalCounts(self):
        """Items that finish while the worker stops are counted too."""
        self.put(2, "slow")
        worker = self.worker()
        worker.start()
        self.reactor.advance(0)
        stopped = worker.stop()
        self.assertEqual(self.reports()[-1]["handled"], 0)
        while Slow.pending:
            Slow.pending.pop().callback(None)
        self.reactor.advance(0)
        self.successResultOf(stopped)
        last = self.reports()[-1]
        self.assertEqual((last["state"], last["handled"]), ("stopping", 2))
        self.assertTrue(self.transport.disconnecting, "closed after writing it")

    def test_lastReportDoesNotWaitForever(self):
        worker = self.worker()
        worker.channel.makeConnection(StringTransport())  # never closes
        worker.start()
        stopped = worker.stop()
        self.reactor.advance(4)
        self.assertNoResult(stopped)
        self.reactor.advance(1)
        self.successResultOf(stopped)

    def test_recycleExits101AfterFinishing(self):
        self.put(10)
        worker = self.worker(max_items=4, prefetch=6, concurrency=1)
        worker.start()
        self.reactor.advance(0)
        self.assertEqual(self.reactor.stops, 1)
        self.assertEqual(worker.exitCode, EXIT_RECYCLE)
        self.assertEqual(worker.state, "stopping")
        self.stop(worker)
        self.assertFalse(worker.iomaster.running)
        self.assertFalse(self.queue.opened, "queue closed")
        # Nothing lost: what it held but had not started is back, unclaimed.
        self.assertEqual(worker.iomaster.stats.total("handled") + len(self.queue.rows),
                         10)
        self.assertTrue(all(r["lease_until"] is None
                            for r in self.queue.rows.values()))

    def test_cannotStartExits1(self):
        self.queue.open = lambda: defer.fail(OSError("database is locked"))
        worker = self.worker()
        worker.start()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual((worker.exitCode, self.reactor.stops), (1, 1))
        self.stop(worker)

    def test_overTheSoftLimitAtStartExits1(self):
        worker = self.worker(softlimit=1024)
        worker.start()
        self.assertEqual(len(self.flushLoggedErrors(MemoryLimitError)), 1)
        self.assertEqual(worker.exitCode, 1)
        self.stop(worker)

    def test_masterGoneStopsGracefully(self):
        worker = self.worker()
        worker.start()
        worker.channel.connectionLost(connectionDone)
        self.assertEqual((worker.exitCode, self.reactor.stops), (0, 1))
        self.stop(worker)

    def test_stopOnlyOnceHoweverAsked(self):
        worker = self.worker()
        worker.start()
        worker.signalled(15, None)
        worker.signalled(2, None)
        worker.exit(EXIT_RECYCLE, "max_items")
        worker.channel.connectionLost(connectionDone)
        self.assertEqual((worker.exitCode, self.reactor.stops), (0, 1))
        self.stop(worker)

    def test_stopWaitsForAStartInProgress(self):
        opening = defer.Deferred()
        self.queue.open = lambda: opening
        worker = self.worker()
        worker.start()
        stopped = worker.stop()
        self.assertNoResult(stopped)
        opening.callback(None)
        self.reactor.advance(0)
        self.successResultOf(stopped)
        self.assertFalse(worker.iomaster.running)


class LineObserverTests(SynchronousTestCase):
    def test_levelBeforeEveryLine(self):
        stream = io.StringIO()
        log = Logger(observer=lineObserver(stream))
        log.warn("two\nlines {x}", x=1)
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            log.failure("oops")
        lines = stream.getvalue().splitlines()
        self.assertEqual(lines[:3], ["warn two", "warn lines 1", "critical oops"])
        self.assertTrue(all(line.startswith("critical ") for line in lines[2:]))
        self.assertIn("critical builtins.ZeroDivisionError: division by zero",
                      lines)

    def test_brokenPipeIsIgnored(self):
        class Broken:
            def write(self, data):
                raise BrokenPipeError()

        lineObserver(Broken())({"log_level": LogLevel.info, "log_format": "x"})
