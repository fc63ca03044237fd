# -*- test-case-name: tests.test_stomp_integration -*-
"""
The STOMP backend on the real RabbitMQ (127.0.0.1:61613), in this process:
destination names as RabbitMQ takes them, retries through TTL queues, dead
letters listed without losing any, failover in the server list, control
messages.  Each test has queues of its own (C{snqtest-…}), removed after.
"""

import json
import time

from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from snq import config as snqconfig
from snq.item import Item
from snq.queues.stomp import NoBrokerError, StompQueue
from snq.stomp.control import ControlVerifier
from snq.stomp.destinations import retryBucket
from tests import rabbitmq
from tests.daemon import freePort


class RabbitTestCase(TestCase):
    timeout = 60

    def setUp(self):
        rabbitmq.requireRabbitMQ()
        self.name = rabbitmq.uniqueName()
        self.addCleanup(rabbitmq.deleteQueues, self.name)
        self.config = self.configure()

    def configure(self, stomp=None):
        return snqconfig.parse({
            "queue": {"backend": "stomp", "basename": f"/queue/{self.name}/"},
            "stomp": {"control_channel": f"/topic/{self.name}/control",
                      **(stomp or {})}})

    @defer.inlineCallbacks
    def openQueue(self, config=None):
        queue = StompQueue(config or self.config)
        yield queue.open()
        self.addCleanup(queue.close)
        return queue

    def received(self, queue, destination, n):
        """Subscribe; fires with the first C{n} deliveries (see L{Collector})."""
        collector = Collector()
        queue.consume([destination], collector)
        self.collector = collector
        return collector.wait(n)


class Collector:
    """A subscription's deliveries, and Deferreds for the n-th."""

    def __init__(self):
        self.got = []
        self._waiting = []

    def __call__(self, delivery):
        self.got.append(delivery)
        self._fire()

    def wait(self, n, timeout=20):
        d = defer.Deferred()
        self._waiting.append((n, d))
        self._fire()
        return d.addTimeout(timeout, reactor)

    def _fire(self):
        for entry in [e for e in self._waiting if len(self.got) >= e[0]]:
            self._waiting.remove(entry)
            entry[1].callback(self.got[:entry[0]])


class DestinationTests(RabbitTestCase):
    @defer.inlineCallbacks
    def test_plainContractNameRefusedByRabbitMQ(self):
        """
        Why snq escapes: RabbitMQ 3.10 refuses a "/" inside a queue name.
        (If this ever passes, RabbitMQ changed and the manual can say so.)
        """
        def sendPlain():
            client = rabbitmq.producer()
            try:
                client.send(f"/queue/{self.name}/main", b"{}", receipt="r")
                return client.receiveFrame()
            finally:
                client.close()

        frame = yield threads.deferToThread(sendPlain)
        self.assertEqual(frame.command, "ERROR")
        self.assertIn(b"not a valid queue destination", frame.body)

    @defer.inlineCallbacks
    def test_producerWritingPercent2FReachesSnq(self):
        queue = yield self.openQueue()
        full = self.received(queue, f"/queue/{self.name}/main", 1)
        envelope = Item(transport="log", payload={"hello": 1}).toJSON()
        yield threads.deferToThread(rabbitmq.produce,
                                    f"/queue/{self.name}%2Fmain", [envelope],
                                    {"content-type": "application/json"})
        [delivery] = yield full
        self.assertEqual(delivery.frame, envelope)
        yield queue.ack(delivery)
        self.assertIn(f"{self.name}/main", rabbitmq.queueDepths(self.name))

    @defer.inlineCallbacks
    def test_snqEnqueueReachesTheGroupQueueAndBreakout(self):
        config = snqconfig.parse({"queue": {
            "backend": "stomp", "basename": f"/queue/{self.name}/",
            "breakout": ["main/webhook/big"]}})
        queue = yield self.openQueue(config)
        yield queue.enqueue([Item(transport="webhook", payload=1, site="big"),
                             Item(transport="webhook", payload=2),
                             Item(transport="xmppout", payload=3)])
        yield self.waitFor(lambda: rabbitmq.queueDepths(self.name) == {
            f"{self.name}/main/webhook/big": (1, 0),
            f"{self.name}/main": (1, 0), f"{self.name}/xmpp": (1, 0)})

    @defer.inlineCallbacks
    def waitFor(self, condition, timeout=10):
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"not so after {timeout} s: "
                                     f"{rabbitmq.queueDepths(self.name)}")
            yield deferLater(reactor, 0.1, lambda: None)


class RetryTests(RabbitTestCase):
    @defer.inlineCallbacks
    def test_retryComesBackToItsQueueAfterTheDelay(self):
        queue = yield self.openQueue()
        main = f"/queue/{self.name}/main"
        yield queue.enqueue([Item(transport="t", payload="x")])
        got = []
        first, second = defer.Deferred(), defer.Deferred()
        queue.consume([main], lambda d: (got.append((time.monotonic(), d)),
                                         (second if first.called else first)
                                         .callback(None)))
        yield first
        _, delivery = got[0]
        item = Item.fromJSON(delivery.frame).retried()
        yield queue.retry(delivery, item, 0.4, "boom")
        sent = time.monotonic()
        yield second.addTimeout(10, reactor)
        arrived, again = got[1]
        self.assertGreaterEqual(arrived - sent, 0.3)
        self.assertEqual(Item.fromJSON(again.frame).attempts, 1)
        yield queue.ack(again)
        depths = rabbitmq.queueDepths(self.name)
        self.assertEqual(depths[f"{self.name}/main.retry-{retryBucket(0.4)}ms"],
                         (0, 0))

    @defer.inlineCallbacks
    def test_delayedEnqueue(self):
        queue = yield self.openQueue()
        start = time.monotonic()
        full = self.received(queue, f"/queue/{self.name}/main", 1)
        yield queue.enqueue([Item(transport="t", payload="later")], delay=0.5)
        yield full
        self.assertGreaterEqual(time.monotonic() - start, 0.45)


class DeadLetterTests(RabbitTestCase):
    @defer.inlineCallbacks
    def deadLetters(self, queue, frames):
        main = f"/queue/{self.name}/main"
        yield threads.deferToThread(rabbitmq.produce, f"/queue/{self.name}%2Fmain",
                                    frames)
        deliveries = yield self.received(queue, main, len(frames))
        for n, delivery in enumerate(deliveries):
            yield queue.deadLetter(delivery, "baditem" if n % 2 else "rejected",
                                   f"reason {n}", n)
        return deliveries

    @defer.inlineCallbacks
    def test_listShowRetryPurge(self):
        queue = yield self.openQueue()
        good = Item(transport="t", payload="p", attempts=4).toJSON()
        yield self.deadLetters(queue, [good, b"not json", b"{}"])
        letters = yield queue.deadList()
        self.assertEqual([dl.error for dl in letters],
                         ["reason 2", "reason 1", "reason 0"], "newest first")
        again = yield queue.deadList(limit=2)
        self.assertEqual([dl.id for dl in again], [dl.id for dl in letters[:2]],
                         "listing took nothing away")
        oldest = letters[-1]
        self.assertEqual((oldest.reason, oldest.transport, oldest.site,
                          oldest.attempts, oldest.frame),
                         ("rejected", "t", "default", 0, good))
        shown = yield queue.deadShow(letters[1].id)
        self.assertEqual(shown.frame, b"not json")
        self.assertIsNone((yield queue.deadShow(12345)))

        retried = yield queue.deadRetry([oldest.id])
        self.assertEqual(retried, 1)
        *_, back = yield self.collector.wait(4)
        item = Item.fromJSON(back.frame)
        self.assertEqual((item.payload, item.attempts), ("p", 0))
        yield queue.ack(back)
        left = yield queue.deadList()
        self.assertEqual([dl.id for dl in left], [dl.id for dl in letters[:2]])
        purged = yield queue.deadPurge()
        self.assertEqual(purged, 2)
        self.assertEqual((yield queue.deadList()), [])
        depths = rabbitmq.queueDepths(self.name)
        self.assertEqual(depths[f"{self.name}/dead"], (0, 0), "no marker left")

    @defer.inlineCallbacks
    def test_snqctlDeadCommands(self):
        """C{snqctl dead …} on the STOMP backend, as an operator runs it."""
        from tests.daemon import snqctl

        queue = yield self.openQueue()
        yield self.deadLetters(queue, [b"\xff\xfe", b"[]"])
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f'[queue]\nbackend = "stomp"\nbasename = "/queue/{self.name}/"\n')
        listed = yield threads.deferToThread(snqctl, "-c", path, "dead", "list",
                                             "--json", cwd=".")
        records = [json.loads(line) for line in listed.stdout.splitlines()]
        self.assertEqual([r["error"] for r in records], ["reason 1", "reason 0"])
        purged = yield threads.deferToThread(snqctl, "-c", path, "dead", "purge",
                                             str(records[0]["id"]), cwd=".")
        self.assertEqual(purged.stdout.strip(), "purged 1 dead letters")
        left = yield queue.deadList()
        self.assertEqual([dl.id for dl in left], [records[1]["id"]])


class ServerListTests(RabbitTestCase):
    @defer.inlineCallbacks
    def test_aDeadServerInTheListIsPassedOver(self):
        config = self.configure({"servers": [
            f"tcp://127.0.0.1:{freePort()}", rabbitmq.STOMP_URL]})
        queue = yield self.openQueue(config)
        full = self.received(queue, f"/queue/{self.name}/main", 1)
        yield queue.enqueue([Item(transport="t", payload=1)])
        yield full

    @defer.inlineCallbacks
    def test_noServerAnswers(self):
        config = self.configure({"servers": [f"tcp://127.0.0.1:{freePort()}"]})
        with self.assertRaises(NoBrokerError):
            yield StompQueue(config).open()

    @defer.inlineCallbacks
    def test_wrongPasswordFailsOpen(self):
        config = self.configure({"passcode": "wrong"})
        try:
            yield StompQueue(config).open()
        except NoBrokerError as e:
            self.assertIn("refused", str(e).lower())
        else:
            self.fail("opened with a wrong password")


class ControlTests(RabbitTestCase):
    @defer.inlineCallbacks
    def test_signedControlRoundTrip(self):
        config = self.configure({"control_secret": "k3y"})
        queue = yield self.openQueue(config)
        got = defer.Deferred()
        yield queue.listenControl(
            lambda body, headers: got.callback((body, headers)))
        yield queue.publishControl("update:example")
        body, headers = yield got.addTimeout(10, reactor)
        verifier = ControlVerifier("k3y", 60, reactor)
        self.assertEqual(verifier.check(body, headers), ("update", "example"))
