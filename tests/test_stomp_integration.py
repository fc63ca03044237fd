# -*- test-case-name: tests.test_stomp_integration -*-
"""
The STOMP backend on the real RabbitMQ (127.0.0.1:61613), in this process:
destination names as RabbitMQ takes them, retries through TTL queues, dead
letters listed without losing any, failover in the server list, control
messages.  Each test has queues of its own (C{snqtest-…}), removed after.
"""

import json
import os
import time

from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from snq import config as snqconfig
from snq.client import Producer
from snq.item import Item
from snq.queues.stomp import NoBrokerError, StompQueue
from snq.stomp.control import ControlVerifier, controlHeaders, signature
from snq.stomp.destinations import onTheWire, retryBucket
from tests import rabbitmq
from tests.daemon import freePort, snqctl


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


class PriorityTests(RabbitTestCase):
    @defer.inlineCallbacks
    def test_urgentItemsFirst(self):
        """
        The first SEND declares the queue with x-max-priority; the broker
        then delivers by the items' priorities, whether a worker or a
        Producer sent them, given or the transport's default; a retry keeps
        its priority through the delay queue.
        """
        config = snqconfig.parse({
            "queue": {"backend": "stomp", "basename": f"/queue/{self.name}/"},
            "stomp": {"max_priority": 10},
            "transports": {"urgent": {"priority": 3}}})
        queue = yield self.openQueue(config)
        yield queue.enqueue([Item(transport="t", payload=n) for n in range(3)])
        producer = Producer(config=config)
        self.addCleanup(producer.close)
        yield threads.deferToThread(producer.enqueue, "t", "producer's",
                                    priority=7)
        yield threads.deferToThread(producer.enqueue, "urgent", "default")
        yield threads.deferToThread(producer.enqueue, "t", "too high",
                                    priority=99)
        yield queue.enqueue([Item(transport="t", payload="worker's", priority=5)])
        deliveries = yield self.received(queue, f"/queue/{self.name}/main", 7)
        self.assertEqual([Item.fromJSON(d.frame).payload for d in deliveries],
                         ["too high", "producer's", "worker's", "default", 0, 1, 2])
        self.assertEqual([d.token.frame.headers["priority"] for d in deliveries],
                         ["10", "7", "5", "3", "0", "0", "0"])
        _, producers, workers, *rest = deliveries
        for delivery in [producers, *rest]:
            yield queue.ack(delivery)
        yield queue.retry(workers, Item.fromJSON(workers.frame).retried(), 0.1,
                          "boom")
        again = (yield self.collector.wait(8))[-1]
        self.assertEqual((Item.fromJSON(again.frame).attempts,
                          again.token.frame.headers["priority"]), (1, "5"))
        yield queue.ack(again)

    @defer.inlineCallbacks
    def test_everySendMustDeclareTheSame(self):
        """
        Why the manual says every producer must send x-max-priority: a SEND
        without it to a priority queue is refused (RabbitMQ declares the
        queue again on each connection's first SEND).  If this ever passes,
        RabbitMQ changed, and the manual can say so.
        """
        queue = yield self.openQueue(self.configure({"max_priority": 10}))
        yield queue.enqueue([Item(transport="t", payload=1)])
        failure = yield self.assertFailure(threads.deferToThread(
            rabbitmq.produce, f"/queue/{self.name}%2Fmain",
            [Item(transport="t", payload=2).toJSON()]), AssertionError)
        self.assertIn("inequivalent arg 'x-max-priority'", str(failure))
        yield threads.deferToThread(
            rabbitmq.produce, f"/queue/{self.name}%2Fmain",
            [Item(transport="t", payload=3).toJSON()], {"x-max-priority": "10"})

    @defer.inlineCallbacks
    def test_plainQueuesByDefault(self):
        """
        Without max_priority snq declares plain queues, as it did before: a
        queue any producer's first SEND made is consumed as it is.
        """
        yield threads.deferToThread(rabbitmq.produce, f"/queue/{self.name}%2Fmain",
                                    [Item(transport="t", payload=1).toJSON()])
        queue = yield self.openQueue()
        yield queue.enqueue([Item(transport="t", payload=2, priority=5)])
        deliveries = yield self.received(queue, f"/queue/{self.name}/main", 2)
        self.assertEqual([Item.fromJSON(d.frame).payload for d in deliveries],
                         [1, 2])
        self.assertNotIn("priority", deliveries[1].token.frame.headers)


class QuorumTests(RabbitTestCase):
    """
    [stomp] queue_type = "quorum" on the real broker (one node is enough
    for a quorum queue; the cluster is L{tests.test_failover_rabbitmq}).
    """

    def kinds(self):
        """Queue name → type, for this test's queues."""
        out = rabbitmq.rabbitmqctl("list_queues", "-q", "--no-table-headers",
                                   "name", "type")
        return dict(line.split("\t") for line in out.splitlines()
                    if line.startswith(self.name))

    @defer.inlineCallbacks
    def test_everyQueueDeclaredQuorum(self):
        """
        Enqueued by a worker and a Producer, a retry through its delay queue,
        a dead letter listed and retried: every queue on the way is a quorum
        queue, and a SEND without the header is refused (why every producer
        must send it).
        """
        config = self.configure({"queue_type": "quorum"})
        queue = yield self.openQueue(config)
        yield queue.enqueue([Item(transport="t", payload="worker's")])
        producer = Producer(config=config)
        self.addCleanup(producer.close)
        yield threads.deferToThread(producer.enqueue, "t", "producer's")
        deliveries = yield self.received(queue, f"/queue/{self.name}/main", 2)
        self.assertEqual(sorted(Item.fromJSON(d.frame).payload for d in deliveries),
                         ["producer's", "worker's"])
        first, second = deliveries
        yield queue.retry(first, Item.fromJSON(first.frame).retried(), 0.1, "boom")
        again = (yield self.collector.wait(3))[-1]
        self.assertEqual(Item.fromJSON(again.frame).attempts, 1)
        yield queue.ack(again)
        yield queue.deadLetter(second, "rejected", "no", 0)
        [letter] = yield queue.deadList()
        self.assertEqual(letter.frame, second.frame)
        self.assertEqual((yield queue.deadRetry([letter.id])), 1)
        back = (yield self.collector.wait(4))[-1]
        yield queue.ack(back)
        kinds = self.kinds()
        self.assertEqual(len(kinds), 3, kinds)
        self.assertEqual(set(kinds.values()), {"quorum"}, kinds)
        failure = yield self.assertFailure(threads.deferToThread(
            rabbitmq.produce, f"/queue/{self.name}%2Fmain",
            [Item(transport="t", payload=2).toJSON()]), AssertionError)
        self.assertIn("inequivalent arg 'x-queue-type'", str(failure))


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


class ControlChannelTests(RabbitTestCase):
    """
    Workers (StompManagers under a fake IoMaster) on the real broker, and a
    plain STOMP client publishing on their control topic as anyone with
    the broker's guest login could.  The workers' verifiers run on a Clock,
    so the window is crossed without waiting.
    """

    timeout = 120

    @defer.inlineCallbacks
    def worker(self, stomp=None):
        from snq.dispatch import Dispatcher
        from snq.handlers import HandlerRegistry
        from snq.queues.stomp import StompManager
        from tests.test_stomp_backend import FakeWorker

        config = self.configure(stomp)
        queue = yield self.openQueue(config)
        dispatcher = Dispatcher(queue, HandlerRegistry({}), config, clock=reactor)
        parent = FakeWorker()
        parent.heard = []
        parent.recycle = lambda reason: parent.heard.append("restart")
        parent.shutdown = lambda reason: parent.heard.append("shutdown")
        parent.reload = lambda reason: parent.heard.append(reason.split()[0])
        self.clock = Clock()
        self.clock.advance(time.time())
        manager = StompManager(queue, dispatcher, config, None, self.clock)
        manager.setServiceParent(parent)
        parent.startService()
        self.addCleanup(parent.stopService)
        parent.manager = manager
        parent.rejected = lambda: dispatcher.stats.total("controlrejected")
        return parent

    def topic(self):
        return onTheWire(self.config.stomp.control_channel, True)

    def publish(self, messages):
        """Each C{(body, headers)} in order, from one plain STOMP client."""
        def send():
            client = rabbitmq.producer()
            try:
                for n, (body, headers) in enumerate(messages, 1):
                    client.send(self.topic(), body.encode(), headers,
                                receipt="end" if n == len(messages) else None)
                client.receiveFrame()
            finally:
                client.disconnect()
                client.close()

        return threads.deferToThread(send)

    @defer.inlineCallbacks
    def heard(self, worker, word, secret=""):
        """
        Publish C{update:WORD} until C{worker} hears it: it is subscribed,
        and has had all that was published before.  The probes are then
        forgotten (one sent before it was subscribed may come late).
        """
        deadline = time.monotonic() + 20
        while f"update:{word}" not in worker.heard:
            if time.monotonic() > deadline:
                raise AssertionError(f"update:{word} never heard; heard "
                                     f"{len(worker.heard)}: {worker.heard[-5:]}")
            yield self.publish([(f"update:{word}", controlHeaders(
                f"update:{word}", self.clock.seconds(), secret))])
            yield deferLater(reactor, 0.1, lambda: None)
        worker.heard[:] = [w for w in worker.heard if w != f"update:{word}"]

    @defer.inlineCallbacks
    def test_closedWithoutSecretOpenOnlyWhenOptedIn(self):
        """
        Without control_secret a worker does not listen at all; one whose
        operator opted in to unsigned control hears the same shutdown.
        """
        closed = yield self.worker()
        opened = yield self.worker({"control_allow_unsigned": True})
        yield self.heard(opened, "ready")
        yield self.publish([("shutdown", controlHeaders("shutdown", time.time()))])
        yield waitUntil(lambda: "shutdown" in opened.heard)
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(closed.heard, [])
        self.assertEqual(closed.rejected(), 0, "not even received")
        self.assertEqual(
            [s.destination for c in closed.manager.queue.connections
             for s in c.subscriptions], [f"/queue/{self.name}/main"])

    @defer.inlineCallbacks
    def test_snqctlControl(self):
        """snqctl publishes only where workers listen: signed, or opted in."""
        path = os.path.abspath(self.mktemp())
        results = {}
        for name, extra in (("closed", ""), ("unsigned",
                                             "control_allow_unsigned = true\n"),
                            ("signed", 'control_secret = "K3Y"\n')):
            with open(path, "w") as f:
                f.write(f'[queue]\nbackend = "stomp"\nbasename = "/queue/{self.name}/"'
                        f'\n[stomp]\ncontrol_channel = "/topic/{self.name}/control"'
                        f"\n{extra}")
            results[name] = yield threads.deferToThread(
                snqctl, "-c", path, "control", "restart", cwd=".", check=False)
        closed = results["closed"]
        self.assertEqual(closed.returncode, 1)
        self.assertIn("is closed: workers do not listen to it without [stomp] "
                      "control_secret", closed.stderr)
        self.assertEqual(results["unsigned"].stdout.strip(),
                         f"published restart on /topic/{self.name}/control "
                         "(unsigned)")
        self.assertEqual(results["signed"].stdout.strip(),
                         f"published restart on /topic/{self.name}/control "
                         "(signed)")

    @defer.inlineCallbacks
    def test_signedOnly(self):
        """
        With a secret: a signed message is obeyed once; its replay, a NaN
        timestamp, malformed or wrong signatures and unsigned messages are
        refused and counted, without a traceback; after the window even a
        replay with a fresh nonce is refused.
        """
        worker = yield self.worker({"control_secret": "K3Y", "control_window": 30})
        yield self.heard(worker, "ready", "K3Y")
        now = self.clock.seconds()
        good = controlHeaders("restart", now, "K3Y")
        nan = {**controlHeaders("restart", now, "K3Y"), "snq-timestamp": "nan"}
        nan["snq-signature"] = signature("K3Y", "restart", "nan", nan["snq-nonce"])
        malformed = [{**controlHeaders("shutdown", now, "K3Y"), "snq-signature": bad}
                     for bad in ("é" * 64, "sha256=" + "0" * 57, "", "x" * 5000)]
        wrong = controlHeaders("shutdown", now, "guess")
        yield self.publish([("restart", good), ("restart", good), ("restart", nan),
                            *[("shutdown", h) for h in malformed],
                            ("shutdown", wrong), ("shutdown", {})])
        yield self.heard(worker, "first", "K3Y")
        self.assertEqual(worker.heard, ["restart"])
        self.assertEqual(worker.rejected(), 1 + 4 + 2, "all but the copy counted")
        self.assertEqual(self.flushLoggedErrors(), [], "no traceback")
        # Two windows later, a recorded message with its nonce forgotten.
        self.clock.advance(61)
        yield self.publish([("restart", good)])
        yield self.heard(worker, "second", "K3Y")
        self.assertEqual(worker.heard, ["restart"])
        self.assertEqual(worker.rejected(), 8)

    @defer.inlineCallbacks
    def test_floodOfNoncesCostsFlat(self):
        """
        20,000 control messages with distinct nonces (unsigned control, opted
        in): the nonce cache stays bounded, and the last messages cost no
        more to check than the first.
        """
        worker = yield self.worker({"control_allow_unsigned": True})
        yield self.heard(worker, "ready")
        verifier = worker.manager.verifier
        verifier.maxNonces = 5000
        costs = []
        check = verifier.check

        def timed(body, headers):
            start = time.perf_counter()
            try:
                return check(body, headers)
            finally:
                costs.append(time.perf_counter() - start)

        verifier.check = timed
        now = self.clock.seconds()
        n = 20_000
        yield self.publish([("restart", controlHeaders("restart", now))
                            for _ in range(n)])
        yield self.heard(worker, "flooded")
        self.assertEqual(worker.heard.count("restart"), n)
        self.assertLessEqual(len(verifier._seen), 5000)
        first = sorted(costs[:2000])[1000]
        last = sorted(costs[-2000:])[1000]
        self.assertLess(last, 3 * first + 20e-6,
                        f"median {last * 1e6:.1f} µs a message at the end, "
                        f"{first * 1e6:.1f} µs at the start")


@defer.inlineCallbacks
def waitUntil(condition, timeout=20):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        yield deferLater(reactor, 0.05, lambda: None)
