# -*- test-case-name: tests.test_dispatcher -*-
import json
import os
import random
import threading

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from snq import config as snqconfig
from snq.backoff import backoff
from snq.dispatch import Dispatcher
from snq.handlers import HandlerRegistry, QueueHandler, Reject, Retry
from snq.handlers.builtin import FanoutHandler, NoopHandler
from snq.item import Item
from snq.queues.manager import QueueManager
from snq.queues.memory import MemoryQueue
from snq.routing import TransportFilter


class Recording(QueueHandler):
    """Done at once; remembers what it saw."""

    seen: list

    def handle(self, item):
        self.context.seen.append(item)


class Gated(QueueHandler):
    """Finishes when the test fires the item's gate."""

    def handle(self, item):
        gate = defer.Deferred()
        self.context.gates.append(gate)
        return gate


class Scripted(QueueHandler):
    """Returns or raises what the payload says."""

    def handle(self, item):
        what = item.payload
        if what == "false":
            return False
        if what == "raise":
            raise ValueError("remote said no")
        if what == "reject":
            raise Reject("not a valid address")
        if what == "busy":
            raise Retry("remote busy")
        return True


class Coroutine(QueueHandler):
    async def handle(self, item):
        await defer.succeed(None)
        if item.payload == "fail":
            raise RuntimeError("async failure")


class Harness:
    def __init__(self, testCase, data=None, handlers=None):
        self.clock = Clock()
        self.config = snqconfig.parse(data or {})
        self.queue = MemoryQueue(self.clock)
        classes = {"rec": Recording, "gated": Gated, "script": Scripted,
                   "coro": Coroutine, "fanout": FanoutHandler,
                   "noop": NoopHandler}
        classes.update(handlers or {})
        self.dispatcher = Dispatcher(self.queue, HandlerRegistry(classes),
                                     self.config, clock=self.clock,
                                     rng=random.Random(1))
        self.dispatcher.context.seen = self.seen = []
        self.dispatcher.context.gates = self.gates = []
        self.stats = self.dispatcher.stats

    def put(self, transport, payload=None, **kw):
        item = Item(transport=transport, payload=payload, created=0, **kw)
        self.queue.enqueue([item])
        return item

    def runAll(self):
        """Claim and dispatch everything that is ready now."""
        deliveries = self.queue.claim(1000, TransportFilter()).result
        return [self.dispatcher.dispatch(d) for d in deliveries]


class DispatcherTests(SynchronousTestCase):
    def test_doneIsAcknowledged(self):
        h = Harness(self)
        item = h.put("rec", {"x": 1}, site="ex")
        [done] = h.runAll()
        self.successResultOf(done)
        self.assertEqual(h.seen, [item])
        self.assertEqual(h.queue.rows, {})
        self.assertEqual(h.stats.counts["handled", "rec", "ex"], 1)

    def test_falseIsRetriedLaterWithBackoff(self):
        h = Harness(self, {"queue": {"retry_delay": 10}})
        h.put("script", "false")
        h.runAll()
        [row] = h.queue.rows.values()
        self.assertEqual(row["attempts"], 1)
        self.assertEqual(row["error"], "handler returned False")
        self.assertTrue(5 <= row["run_at"] <= 10, row["run_at"])
        self.assertEqual(h.runAll(), [], "a waiting retry is not claimable")
        h.clock.advance(10)
        h.runAll()
        [row] = h.queue.rows.values()
        self.assertEqual(row["attempts"], 2)
        self.assertTrue(10 + 10 <= row["run_at"] <= 10 + 20, row["run_at"])
        self.assertEqual(json.loads(row["frame"])["attempts"], 2)
        self.assertEqual((h.stats.total("error"), h.stats.total("requeued")), (2, 2))

    def test_exceptionIsRetriedAndLogged(self):
        h = Harness(self)
        h.put("script", "raise")
        h.runAll()
        [row] = h.queue.rows.values()
        self.assertEqual(row["error"], "ValueError: remote said no")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_expectedFailureRetriedWithoutTraceback(self):
        h = Harness(self)
        events = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        h.put("script", "busy")
        h.runAll()
        [row] = h.queue.rows.values()
        self.assertEqual((row["attempts"], row["error"]), (1, "Retry: remote busy"))
        self.assertEqual(self.flushLoggedErrors(), [])
        [event] = [e for e in events if e.get("error") == "Retry: remote busy"]
        self.assertNotIn("log_failure", event)

    def test_rejectDeadLettersAtOnce(self):
        h = Harness(self)
        h.put("script", "reject")
        h.runAll()
        [dead] = h.queue.dead.values()
        self.assertEqual((dead.reason, dead.error, dead.attempts),
                         ("rejected", "not a valid address", 0))
        self.assertEqual(h.queue.rows, {})

    def test_retriesExhausted(self):
        h = Harness(self, {"transports": {"script": {"max_retries": 2}}})
        h.put("script", "false")
        for _ in range(3):
            h.runAll()
            h.clock.advance(3600)
        [dead] = h.queue.dead.values()
        self.assertEqual((dead.reason, dead.attempts), ("retries", 3))
        self.assertEqual(dead.error, "gave up after 3 attempts; last error: "
                                     "handler returned False")
        self.assertEqual(h.queue.rows, {})

    def test_badFrameDeadLetteredAndNextItemRuns(self):
        h = Harness(self)
        h.queue.put(b'{"transport": "rec"', transport="rec")
        good = h.put("rec", 1)
        h.runAll()
        [dead] = h.queue.dead.values()
        self.assertEqual(dead.reason, "baditem")
        self.assertIn("not JSON", dead.error)
        self.assertEqual(h.seen, [good])
        self.assertEqual((h.stats.total("baditem"), h.stats.total("deadletter")),
                         (1, 1))

    def test_unknownTransportIsBadhandler(self):
        h = Harness(self)
        h.put("nosuch", 1)
        h.runAll()
        [dead] = h.queue.dead.values()
        self.assertEqual((dead.reason, dead.error),
                         ("badhandler", "no handler for transport 'nosuch'"))
        self.assertEqual(h.stats.total("badhandler"), 1)

    def test_earlyItemWaitsWithoutAnAttempt(self):
        """
        An item that arrives before its run_at (pushed straight onto a
        ready list, or let out early by a broker) waits again, uncharged.
        """
        h = Harness(self)
        item = Item(transport="rec", payload=1, created=0, run_at=50.0)
        h.queue.put(item.toJSON(), "rec")
        h.runAll()
        [row] = h.queue.rows.values()
        self.assertEqual((row["attempts"], row["run_at"], row["error"]),
                         (0, 50.0, "not due yet"))
        self.assertEqual(h.seen, [])
        self.assertEqual(h.stats.total("error"), 0)
        h.clock.advance(49.9)
        self.assertEqual(h.runAll(), [])
        h.clock.advance(0.1)
        h.runAll()
        self.assertEqual(h.seen, [item])
        self.assertEqual(h.queue.rows, {})

    def test_handlersEnqueueForLater(self):
        h = Harness(self)
        h.dispatcher.context.enqueue("rec", 1, run_at=100.0)
        h.dispatcher.context.enqueue("rec", 2, delay=30)
        first, second = h.queue.rows.values()
        self.assertEqual((first["run_at"], Item.fromJSON(first["frame"]).run_at),
                         (100.0, 100.0))
        self.assertEqual((second["run_at"], Item.fromJSON(second["frame"]).run_at),
                         (30.0, None))

    def test_leaseExpiredTooOften(self):
        """An item whose workers keep dying ends as a dead letter."""
        h = Harness(self, {"queue": {"max_retries": 1}})
        h.put("rec", 1)
        for _ in range(2):
            h.queue.claim(10, TransportFilter())
            h.clock.advance(61)
            h.queue.tend([])
        h.runAll()
        [dead] = h.queue.dead.values()
        self.assertEqual((dead.reason, dead.attempts), ("retries", 2))
        self.assertEqual(h.seen, [])

    def test_transportConcurrency(self):
        """A slow transport gets its own slots; others pass it by."""
        h = Harness(self, {"transports": {"gated": {"concurrency": 2}}})
        for _ in range(4):
            h.put("gated")
        fast = h.put("rec")
        h.runAll()
        self.assertEqual(len(h.gates), 2)
        self.assertEqual(h.seen, [fast])
        h.gates[0].callback(None)
        self.assertEqual(len(h.gates), 3)
        for gate in h.gates[1:]:
            gate.callback(None)
        h.gates[3].callback(None)
        self.assertEqual(h.queue.rows, {})
        self.assertEqual(h.dispatcher.held, set())

    def test_globalConcurrency(self):
        h = Harness(self, {"queue": {"concurrency": 3}})
        for _ in range(5):
            h.put("gated")
        h.runAll()
        self.assertEqual((len(h.gates), h.dispatcher.running), (3, 3))
        h.gates[1].callback(None)
        self.assertEqual(len(h.gates), 4)

    def test_timeout(self):
        h = Harness(self, {"transports": {"gated": {"timeout": 5}}})
        h.put("gated")
        h.runAll()
        h.clock.advance(5)
        [row] = h.queue.rows.values()
        self.assertEqual((row["attempts"], row["error"]), (1, "timed out after 5 s"))
        self.assertEqual(h.dispatcher.running, 0)

    def test_coroutineHandler(self):
        h = Harness(self)
        h.put("coro", "ok")
        h.put("coro", "fail")
        h.runAll()
        [row] = h.queue.rows.values()
        self.assertEqual(row["error"], "RuntimeError: async failure")
        self.assertEqual(h.stats.total("handled"), 1)
        self.flushLoggedErrors(RuntimeError)

    def test_fanout(self):
        h = Harness(self)
        h.put("fanout", {"transports": ["rec", "noop"], "payload": {"n": 1}},
              site="ex")
        h.runAll()
        h.runAll()
        self.assertEqual([(i.transport, i.payload, i.site) for i in h.seen],
                         [("rec", {"n": 1}, "ex")])
        self.assertEqual(h.stats.counts["enqueued", "noop", "ex"], 1)
        self.assertEqual(h.stats.total("handled"), 3)
        self.assertEqual(h.queue.rows, {})

    def test_fanoutRejectsBadPayload(self):
        h = Harness(self)
        h.put("fanout", {"transports": "rec", "payload": 1})
        h.runAll()
        [dead] = h.queue.dead.values()
        self.assertEqual(dead.reason, "rejected")

    def test_deadLetterDir(self):
        directory = self.mktemp()
        h = Harness(self, {"queue": {"dead_letter_dir": directory}})
        item = h.put("script", "reject")
        h.runAll()
        [name] = os.listdir(directory)
        self.assertTrue(name.endswith(f"-{item.id}.json"))
        with open(os.path.join(directory, name)) as f:
            record = json.load(f)
        self.assertEqual((record["reason"], record["error"]),
                         ("rejected", "not a valid address"))
        self.assertEqual(Item.fromJSON(record["frame"]), item)

    def test_backoffBounds(self):
        rng = random.Random(7)
        for attempts, low, high in ((1, 0.5, 1), (2, 1, 2), (5, 8, 16),
                                    (30, 50, 100)):
            for _ in range(50):
                delay = backoff(attempts, 1, 100, rng)
                self.assertTrue(low <= delay <= high, (attempts, delay))


class QueueManagerTests(SynchronousTestCase):
    def manager(self, data=None):
        h = Harness(self, data)
        m = QueueManager(h.queue, h.dispatcher, h.config, TransportFilter(),
                         h.clock)
        return h, m

    def test_claimsUpToPrefetch(self):
        h, m = self.manager({"queue": {"prefetch": 4, "concurrency": 2}})
        for _ in range(10):
            h.put("gated")
        m.startService()
        h.clock.advance(0)
        self.assertEqual((len(h.dispatcher.held), len(h.gates)), (4, 2))
        # Half the window free again → it claims again.
        h.gates[0].callback(None)
        h.gates[1].callback(None)
        h.clock.advance(0)
        self.assertEqual(len(h.dispatcher.held), 4)

    def test_leasesRenewedWhileHeld(self):
        h, m = self.manager({"queue": {"lease": 30}})
        h.put("gated")
        m.startService()
        h.clock.advance(0)
        h.clock.pump([10] * 12)
        [row] = h.queue.rows.values()
        self.assertGreater(row["lease_until"], h.clock.seconds())
        self.assertEqual(row["attempts"], 0)

    def test_stopReleasesWaitingAndWaitsForRunning(self):
        h, m = self.manager({"queue": {"concurrency": 1}})
        for _ in range(3):
            h.put("gated")
        m.startService()
        h.clock.advance(0)
        stopped = m.stopService()
        self.assertNoResult(stopped)
        released = [r for r in h.queue.rows.values() if r["lease_until"] is None]
        self.assertEqual(len(released), 2)
        h.gates[0].callback(None)
        self.successResultOf(stopped)
        self.assertEqual(len(h.queue.rows), 2)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_stopGivesUpAfterKillTime(self):
        h, m = self.manager({"daemon": {"kill_time": 5}})
        h.put("gated")
        m.startService()
        h.clock.advance(0)
        stopped = m.stopService()
        h.clock.advance(4.9)
        self.assertNoResult(stopped)
        h.clock.advance(0.1)
        self.successResultOf(stopped)
        [row] = h.queue.rows.values()
        self.assertIsNotNone(row["lease_until"], "left leased, to expire")


class Blocking(QueueHandler):
    blocking = True

    def handle(self, item):
        self.context.threads.append(threading.current_thread())


class BlockingHandlerTests(TestCase):
    """Runs on the real reactor: threads cannot be driven by a Clock."""

    @defer.inlineCallbacks
    def test_runsInAThread(self):
        from twisted.internet import reactor

        config = snqconfig.parse({})
        queue = MemoryQueue(reactor)
        dispatcher = Dispatcher(queue, HandlerRegistry({"b": Blocking}), config,
                                clock=reactor)
        dispatcher.context.threads = []
        queue.enqueue([Item(transport="b", payload=1)])
        [delivery] = queue.claim(1, TransportFilter()).result
        yield dispatcher.dispatch(delivery)
        self.assertEqual(len(dispatcher.context.threads), 1)
        self.assertIsNot(dispatcher.context.threads[0], threading.current_thread())
        self.assertEqual(queue.rows, {})
