# -*- test-case-name: tests.test_dispatcher -*-
import json
import os
import random
import threading
import time

from twisted.internet import defer
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from snq import config as snqconfig
from snq.backoff import backoff
from snq.dispatch import Dispatcher
from snq.handlers import Defer, HandlerRegistry, QueueHandler, Reject, Retry
from snq.handlers.builtin import FanoutHandler, NoopHandler
from snq.item import Item
from snq.journal import Journal
from snq.queues.interface import Delivery
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
        if what == "defer":
            raise Defer("its host is at its limit", 5)
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

    def test_deferredItemWaitsUncharged(self):
        """L{Defer}: back in its delay, attempts unchanged, no error counted."""
        h = Harness(self)
        h.put("script", "defer", attempts=2)
        h.runAll()
        [row] = h.queue.rows.values()
        self.assertEqual((row["attempts"], row["run_at"], row["error"]),
                         (2, 5, "deferred: its host is at its limit"))
        self.assertEqual((h.stats.total("deferred"), h.stats.total("error"),
                          h.stats.total("requeued")), (1, 0, 0))

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

    def test_waitingItemsStartByPriority(self):
        """
        An urgent item claimed into a full window starts before the waiting
        items of lower priority, after those of its own or higher.
        """
        class Ordered(QueueHandler):
            def handle(self, item):
                self.context.seen.append(item.payload)
                return Gated.handle(self, item)

        h = Harness(self, {"queue": {"concurrency": 1}}, {"ordered": Ordered})
        for name in ("first", "low1", "low2"):
            h.put("ordered", name)
        h.runAll()
        h.put("ordered", "urgent", priority=5)
        h.put("ordered", "urgent2", priority=5)
        h.put("ordered", "middle", priority=1)
        h.runAll()
        while len(h.seen) < 6:
            h.gates[len(h.seen) - 1].callback(None)
        self.assertEqual(h.seen, ["first", "urgent", "urgent2", "middle", "low1",
                                  "low2"])

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


class NothingEscapesTests(SynchronousTestCase):
    """Whatever a delivery holds, it is settled: no exception escapes."""

    def assertDead(self, h, reason, error):
        [dead] = h.queue.dead.values()
        self.assertEqual(dead.reason, reason)
        self.assertIn(error, dead.error)
        self.assertEqual(h.dispatcher.held, set())

    def test_unexpectedErrorWhileDecoding(self):
        h = Harness(self)

        def decode(delivery):
            raise RecursionError("maximum recursion depth exceeded")

        h.dispatcher._decode = decode
        h.queue.put(b"{}", transport="rec")
        [done] = h.runAll()
        self.successResultOf(done)
        self.assertDead(h, "baditem", "RecursionError while decoding or routing "
                                      "it: maximum recursion depth exceeded")
        self.assertEqual(len(self.flushLoggedErrors(RecursionError)), 1,
                         "one traceback")

    def test_hostileFramesEachADeadLetterTheRestRuns(self):
        h = Harness(self, {"queue": {"max_frame": "3k"}})
        frames = [
            b'{"transport": "rec", "payload": ' + b"[" * 1000 + b"]" * 1000 + b"}",
            b'{"transport": "rec", "payload": "\ud800"}',
            b'{"v": true, "transport": "rec", "payload": 1}',
            b'{"id": 0, "transport": "rec", "payload": 1}',
            b'{"transport": "rec", "payload": "' + b"x" * 4000 + b'"}',
            b"\xff\xfe{",
        ]
        for frame in frames:
            h.queue.put(frame, transport="rec")
        good = h.put("rec", 1)
        h.runAll()
        self.assertEqual(h.seen, [good])
        errors = [d.error for d in h.queue.dead.values()]
        self.assertEqual([d.reason for d in h.queue.dead.values()],
                         ["baditem"] * len(frames))
        for error, expected in zip(errors, [
                "nested deeper", "lone UTF-16 surrogate", "version True",
                "'id' must be a non-empty string", "frame is 4035 bytes, over "
                "[queue] max_frame (3072 bytes)", "not UTF-8"], strict=True):
            self.assertIn(expected, error)
        self.assertEqual(h.queue.rows, {})

    def test_whatTheBackendFoundWrong(self):
        h = Harness(self)
        rowId = h.queue.put(b"", transport="rec")
        delivery = Delivery(frame=b"", token=rowId, transport="rec",
                            problem="attempts column holds b'abc'")
        self.successResultOf(h.dispatcher.dispatch(delivery))
        self.assertDead(h, "baditem", "attempts column holds b'abc'")

    def test_errorsAreStoredAsEveryStoreTakesThem(self):
        h = Harness(self, {"handlers": {}}, handlers={"rej": Rejecting})
        h.put("rej", "bad SURROGATE and \x00 there")
        h.runAll()
        [dead] = h.queue.dead.values()
        self.assertEqual(dead.error, "bad \\ud800 and \\x00 there")
        dead.error.encode("utf-8")

    def test_deadLetterFileNamedSafely(self):
        directory = self.mktemp()
        h = Harness(self, {"queue": {"dead_letter_dir": directory}})
        h.queue.put(json.dumps({"id": "../../x y", "transport": "nosuch",
                                "payload": 1}).encode(), transport="nosuch")
        h.runAll()
        [name] = os.listdir(directory)
        self.assertTrue(name.endswith("-.._.._x_y.json"), name)

    def test_settleRefusedIsCountedAndLetGo(self):
        h = Harness(self)
        h.queue.ack = lambda delivery: defer.fail(ConnectionError("gone"))
        h.put("rec", 1)
        [done] = h.runAll()
        self.successResultOf(done)
        self.assertEqual(h.dispatcher.held, set(), "its lease is not renewed")
        self.assertEqual(h.stats.total("settle_failed"), 1)
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 1)


class Rejecting(QueueHandler):
    """Rejects with its payload as the reason, SURROGATE made a lone one."""

    def handle(self, item):
        raise Reject(item.payload.replace("SURROGATE", "\ud800"))


class JournalTests(SynchronousTestCase):
    """What the master reads after a worker's death."""

    def harness(self, data=None, deaths=None):
        h = Harness(self, data)
        master = Journal.create(2)
        self.addCleanup(master.close)
        h.dispatcher.journal = Journal.attach(master.fd)
        h.dispatcher.deaths = deaths
        return h, master

    def test_onlyRunningItemsAreMarked(self):
        h, master = self.harness({"queue": {"concurrency": 1}})
        h.put("gated")
        h.put("gated")
        h.runAll()
        [first, second] = sorted(h.queue.rows)
        self.assertEqual(master.running(), {b"%d" % first}, "not the waiting one")
        h.gates[0].callback(None)
        self.assertEqual(master.running(), {b"%d" % second})
        h.gates[1].callback(None)
        self.assertEqual(master.running(), set())

    def test_redeliveredChargedPerDeath(self):
        asked = []

        def deaths(key):
            asked.append(key)
            return defer.succeed({b"1": 2}.get(key, 0))

        h, _ = self.harness({"queue": {"retry_delay": 10}}, deaths)
        killer, innocent = h.put("rec", "killer"), h.put("rec", "innocent")
        deliveries = h.queue.claim(10, TransportFilter()).result
        for delivery in deliveries:
            delivery.redelivered = True
            h.dispatcher.dispatch(delivery)
        self.assertEqual(asked, [b"1", b"2"])
        self.assertEqual(h.seen, [innocent], "held, not started: not charged")
        [row] = h.queue.rows.values()
        self.assertEqual((row["attempts"], row["error"]),
                         (2, "its worker died while running it (2 times)"))
        self.assertEqual(json.loads(row["frame"])["id"], killer.id)
        self.assertGreater(row["run_at"], h.clock.seconds(), "after a backoff")

    def test_redeliveredKillerEndsInTheDeadLetters(self):
        h, _ = self.harness({"queue": {"max_retries": 2}},
                            lambda key: defer.succeed(1))
        h.put("rec", "killer", attempts=2)
        [delivery] = h.queue.claim(10, TransportFilter()).result
        delivery.redelivered = True
        h.dispatcher.dispatch(delivery)
        [dead] = h.queue.dead.values()
        self.assertEqual((dead.reason, dead.attempts), ("retries", 3))
        self.assertEqual(h.seen, [])


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

    def test_failingClaimsAreVisible(self):
        h, m = self.manager({"queue": {"poll_interval": 1}})
        claim = h.queue.claim
        h.queue.claim = lambda limit, transports: defer.fail(
            RuntimeError("no such table: queue_item"))
        m.startService()
        h.clock.pump([0, 1, 1])
        self.assertEqual(m.claimTrouble, {
            "since": 0, "failures": 3,
            "error": "RuntimeError: no such table: queue_item"})
        self.assertEqual(h.stats.total("claim_failed"), 3)
        self.flushLoggedErrors(RuntimeError)
        h.queue.claim = claim
        h.clock.advance(1)
        self.assertIsNone(m.claimTrouble)
        m.stopService()

    def test_expiredLeasesReturnedAsItStarts(self):
        """Not only after lease/3: workers may not live that long."""
        h, m = self.manager({"queue": {"lease": 30}})
        h.put("gated")
        h.queue.claim(10, TransportFilter())
        h.clock.advance(61)
        m.startService()
        self.assertEqual([r["attempts"] for r in h.queue.rows.values()], [1])
        h.clock.advance(0)
        self.assertEqual(len(h.gates), 1)
        h.gates[0].callback(None)
        m.stopService()

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

    def dispatcher(self, data=None, handlers=None):
        from twisted.internet import reactor

        config = snqconfig.parse(data or {})
        queue = MemoryQueue(reactor)
        dispatcher = Dispatcher(queue, HandlerRegistry(handlers or {}), config,
                                clock=reactor)
        self.addCleanup(dispatcher.stopHandlers)
        return queue, dispatcher

    @defer.inlineCallbacks
    def test_runsInAThread(self):
        queue, dispatcher = self.dispatcher(handlers={"b": Blocking})
        dispatcher.context.threads = []
        queue.enqueue([Item(transport="b", payload=1)])
        [delivery] = queue.claim(1, TransportFilter()).result
        yield dispatcher.dispatch(delivery)
        self.assertEqual(len(dispatcher.context.threads), 1)
        self.assertIsNot(dispatcher.context.threads[0], threading.current_thread())
        self.assertEqual(queue.rows, {})

    @defer.inlineCallbacks
    def test_timedOutCallKeepsItsSlotAndNeverRunsTwice(self):
        """
        The thread cannot be stopped: the item is settled (as timed out)
        only once it returns, and its slot stays taken until then.
        """
        from twisted.internet import reactor

        queue, dispatcher = self.dispatcher(
            {"transports": {"slow": {"timeout": 0.2}},
             "queue": {"retry_delay": 0.05, "max_retries": 1}},
            {"slow": Sleeping})
        Sleeping.log = []
        queue.enqueue([Item(transport="slow", payload=0.6)])
        done = []
        for _ in range(2):
            [delivery] = queue.claim(1, TransportFilter()).result
            d = dispatcher.dispatch(delivery)
            yield deferLater(reactor, 0.4, lambda: None)
            self.assertEqual(dispatcher.running, 1, "past its timeout, it runs")
            self.assertEqual(dispatcher.threadStats()["busy"], 1)
            self.assertEqual(queue.claim(1, TransportFilter()).result, [],
                             "not settled (so not claimable) while it runs")
            yield d
            done.append(reactor.seconds())
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(dispatcher.running, 0)
        [dead] = queue.dead.values()
        self.assertEqual((dead.reason, dead.attempts), ("retries", 2))
        self.assertIn("timed out after 0.2 s", dead.error)
        starts = [t for what, t in Sleeping.log if what == "start"]
        ends = [t for what, t in Sleeping.log if what == "end"]
        self.assertEqual(len(starts), 2)
        self.assertGreaterEqual(starts[1], ends[0], "never two at once")
        self.assertGreaterEqual(done[0], ends[0], "settled after it returned")

    @defer.inlineCallbacks
    def test_busyHandlerThreadsDoNotStarveNameResolution(self):
        from twisted.internet import reactor

        queue, dispatcher = self.dispatcher({"queue": {"threads": 3}},
                                            {"slow": Sleeping})
        Sleeping.log = []
        queue.enqueue([Item(transport="slow", payload=0.3) for _ in range(9)])
        running = [dispatcher.dispatch(d)
                   for d in queue.claim(100, TransportFilter()).result]
        yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(dispatcher.threadStats(),
                         {"max": 3, "busy": 3, "queued": 6})
        # The reactor's pool (which resolves names) is not the handlers'.
        for _ in range(reactor.getThreadPool().max):
            reactor.callInThread(lambda: None)
        started = reactor.seconds()
        yield reactor.resolve("localhost")
        self.assertLess(reactor.seconds() - started, 0.5)
        yield defer.gatherResults(running)
        self.assertEqual(dispatcher.threadStats(),
                         {"max": 3, "busy": 0, "queued": 0})

    @defer.inlineCallbacks
    def test_timeoutStartsWhenItsThreadDoes(self):
        """A call waiting for a thread has not used any of its time."""
        queue, dispatcher = self.dispatcher(
            {"queue": {"threads": 1}, "transports": {"slow": {"timeout": 0.5}}},
            {"slow": Sleeping})
        Sleeping.log = []
        queue.enqueue([Item(transport="slow", payload=0.3) for _ in range(3)])
        yield defer.gatherResults([dispatcher.dispatch(d) for d in
                                   queue.claim(10, TransportFilter()).result])
        self.assertEqual(queue.dead, {})
        self.assertEqual(queue.rows, {}, "none timed out while it waited")


class Sleeping(QueueHandler):
    """Sleeps C{payload} seconds in its thread; logs its start and end."""

    blocking = True
    log: list = []

    def handle(self, item):
        from twisted.internet import reactor

        self.log.append(("start", reactor.seconds()))
        time.sleep(item.payload)
        self.log.append(("end", reactor.seconds()))
