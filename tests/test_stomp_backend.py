# -*- test-case-name: tests.test_stomp_backend -*-
"""
The STOMP backend's logic on a L{Clock} and fake connections
(L{tests.stomp_fakes}): destinations, control messages, connections kept
up by ClientService, the queue's settling, the listening manager.  The
real broker is in L{tests.test_stomp_integration}.
"""

import time

from stompest.protocol import StompFrame, StompSpec, commands
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from snq import config as snqconfig
from snq.dispatch import Dispatcher
from snq.handlers import HandlerRegistry, QueueHandler, Reject
from snq.item import Item
from snq.queues import makeQueue
from snq.queues.stomp import NoBrokerError, StompManager, StompQueue
from snq.stomp.connection import BrokerConnection, Subscription
from snq.stomp.control import (
    ControlVerifier,
    Duplicate,
    controlHeaders,
    parseCommand,
    signature,
)
from snq.stomp.destinations import Destinations, onTheWire, retryBucket
from snq.stomp.protocol import StompClientProtocol
from tests.stomp_fakes import FakeBroker


def stompConfig(stomp=None, **queue):
    return snqconfig.parse({"queue": {"backend": "stomp", **queue},
                            "stomp": stomp or {}})


class OnTheWireTests(SynchronousTestCase):
    def test_slashesInNamesEscaped(self):
        self.assertEqual(onTheWire("/queue/snq/main", True), "/queue/snq%2Fmain")
        self.assertEqual(onTheWire("/queue/snq/main/webhook/site", True),
                         "/queue/snq%2Fmain%2Fwebhook%2Fsite")
        self.assertEqual(onTheWire("/topic/snq/control", True),
                         "/topic/snq%2Fcontrol")
        self.assertEqual(onTheWire("/amq/queue/snq/main", True),
                         "/amq/queue/snq%2Fmain")

    def test_exchangeKeepsItsSeparator(self):
        self.assertEqual(onTheWire("/exchange/amq.direct/snq/main", True),
                         "/exchange/amq.direct/snq%2Fmain")

    def test_alreadyEscapedAndUnescapedLeftAlone(self):
        self.assertEqual(onTheWire("/queue/snq%2Fmain", True), "/queue/snq%2Fmain")
        self.assertEqual(onTheWire("/queue/snq.main", True), "/queue/snq.main")

    def test_notEscapingKeepsTheContractName(self):
        self.assertEqual(onTheWire("/queue/snq/main", False), "/queue/snq/main")


class AckTests(SynchronousTestCase):
    """The protocol's ACK written directly equals stompest's frame."""

    def ackBytes(self, version, headers, receipt=False):
        clock = Clock()
        stomp = StompClientProtocol(clock)
        transport = StringTransport()
        stomp.makeConnection(transport)
        stomp.connect("g", "g", "/", versions=[version])
        stomp.dataReceived(bytes(StompFrame(
            "CONNECTED", {"version": version}, version=version)))
        stomp.subscribe("/queue/a", lambda f: None, {"ack": "client-individual"},
                        receipt=False)
        transport.clear()
        message = StompFrame("MESSAGE", {"destination": "/queue/a",
                                         "subscription": "sub-1",
                                         "message-id": "m-1", **headers},
                             b"x", version=version)
        clock.advance(5)
        stomp.ack(message, receipt=receipt)
        self.assertEqual(stomp._lastSent, 5, "counts as sent for heart-beats")
        return transport.value(), message

    def test_sameBytesAsStompest(self):
        for version, headers in (
                ("1.2", {"ack": "T_sub-1@@session-Ab_9@@42"}),
                ("1.2", {"ack": "needs:escaping\n"}),
                ("1.2", {"ack": "a1", "transaction": "tx"}),
                ("1.1", {"ack": "a1"}),
                ("1.0", {})):
            wire, message = self.ackBytes(version, headers)
            self.assertEqual(wire, bytes(commands.ack(message)), (version, headers))

    def test_receiptStillAsked(self):
        wire, _ = self.ackBytes("1.2", {"ack": "a1"}, receipt=True)
        self.assertIn(b"receipt:", wire)


class DestinationsTests(SynchronousTestCase):
    def test_defaults(self):
        d = Destinations(stompConfig())
        self.assertEqual(d.consumed(["main"]), ["/queue/snq/main"])
        self.assertEqual(d.route("webhook", "default"), "/queue/snq/main")
        self.assertEqual(d.dead, "/queue/snq/dead")
        self.assertEqual(d.control, "/topic/snq/control")

    def test_handlersGroupAndConfiguredGroup(self):
        config = snqconfig.parse({
            "queue": {"backend": "stomp"},
            "transports": {"slow": {"group": "bulk"}}})
        d = Destinations(config)
        self.assertEqual(d.route("xmppout", "default"), "/queue/snq/xmpp")
        self.assertEqual(d.route("slow", "default"), "/queue/snq/bulk")

    def test_breakouts(self):
        d = Destinations(stompConfig(breakout=["main/webhook",
                                               "main/fanout/big", "xmpp/xmppout"]))
        self.assertEqual(d.route("webhook", "a"), "/queue/snq/main/webhook")
        self.assertEqual(d.route("fanout", "big"), "/queue/snq/main/fanout/big")
        self.assertEqual(d.route("fanout", "small"), "/queue/snq/main")
        self.assertEqual(d.consumed(["main"]), [
            "/queue/snq/main", "/queue/snq/main/fanout/big",
            "/queue/snq/main/webhook"])
        self.assertEqual(d.consumed(["xmpp"]),
                         ["/queue/snq/xmpp", "/queue/snq/xmpp/xmppout"])

    def test_basenameMustBeAQueue(self):
        e = self.assertRaises(ValueError, Destinations,
                              stompConfig(basename="/topic/snq/"))
        self.assertIn("/queue/", str(e))

    def test_retryBuckets(self):
        self.assertEqual(retryBucket(1.0), 1024)
        self.assertEqual(retryBucket(0.5), 512)
        self.assertEqual(retryBucket(0), 1)
        self.assertEqual(retryBucket(10**9), 2**32 - 1)
        for delay in (0.3, 0.77, 1.5, 9.9, 60, 123.4, 3600):
            self.assertLess(abs(retryBucket(delay) / (delay * 1000) - 1), 0.091)
        distinct = {retryBucket(0.5 + n / 100) for n in range(51)}
        self.assertEqual(len(distinct), 5, "0.5 to 1 s: five queues")

    def test_earlyBucketsAreNeverLate(self):
        """For a run_at: at most 16% early (and sent round again), never late."""
        self.assertEqual(retryBucket(1.0, early=True), 861)
        self.assertEqual(retryBucket(0.512, early=True), 512)
        for delay in (0.0004, 0.3, 0.77, 1.5, 9.9, 60, 123.4, 3600, 86400):
            ms = retryBucket(delay, early=True)
            self.assertLessEqual(ms, max(delay * 1000, 1))
            self.assertGreater(ms, delay * 1000 * 0.84)

    def test_delayedOnRabbitMQ(self):
        d = Destinations(stompConfig())
        destination, headers = d.delayed("/queue/snq/main", 1.0, rabbitmq=True)
        self.assertEqual(destination, "/queue/snq/main.retry-1024ms")
        self.assertEqual(headers, {
            "x-message-ttl": "1024", "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "snq/main"})

    def test_delayedElsewhere(self):
        d = Destinations(stompConfig())
        self.assertEqual(d.delayed("/queue/snq/main", 1.0, rabbitmq=False),
                         ("/queue/snq/main", {"AMQ_SCHEDULED_DELAY": "1024"}))


class ControlTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_800_000_000)

    def check(self, secret, command, headers):
        return ControlVerifier(secret, 60, self.clock).check(
            command.encode(), headers)

    def test_commands(self):
        self.assertEqual(parseCommand("shutdown\n"), ("shutdown", None))
        self.assertEqual(parseCommand("restart"), ("restart", None))
        self.assertEqual(parseCommand("update:example"), ("update", "example"))
        for bad in ("update", "reboot", "shutdown:now", ""):
            self.assertRaises(ValueError, parseCommand, bad)

    def test_noSecretTakesUnsigned(self):
        self.assertEqual(self.check("", "restart", {}), ("restart", None))

    def test_signed(self):
        headers = controlHeaders("update:a", self.clock.seconds(), "s3cret")
        self.assertEqual(self.check("s3cret", "update:a", headers),
                         ("update", "a"))

    def test_unsignedForgedStaleRefused(self):
        now = self.clock.seconds()
        good = controlHeaders("shutdown", now, "s3cret")
        cases = {
            "not signed": {},
            "signature is wrong": controlHeaders("shutdown", now, "guess"),
            "signature is wrong ": {**good, "snq-nonce": "other"},
            "outside the 60 s window": controlHeaders("shutdown", now - 61,
                                                      "s3cret"),
        }
        for why, headers in cases.items():
            e = self.assertRaises(ValueError, self.check, "s3cret", "shutdown",
                                  headers)
            self.assertIn(why.strip(), str(e))
        e = self.assertRaises(ValueError, self.check, "s3cret", "restart", good)
        self.assertIn("signature is wrong", str(e), "signed for another command")

    def test_replayRefused(self):
        verifier = ControlVerifier("s3cret", 60, self.clock)
        headers = controlHeaders("shutdown", self.clock.seconds(), "s3cret")
        verifier.check(b"shutdown", headers)
        self.assertRaises(Duplicate, verifier.check, b"shutdown", headers)

    def test_noncesForgotten(self):
        verifier = ControlVerifier("", 60, self.clock)
        verifier.check(b"restart", {"snq-nonce": "n1"})
        self.clock.advance(121)
        verifier.check(b"restart", {"snq-nonce": "n2"})
        self.assertEqual(list(verifier._seen), ["n2"])

    def test_nonFiniteTimestampRefused(self):
        """A signed C{nan} or C{inf} is no time at all: never in the window."""
        for timestamp in ("nan", "NaN", "inf", "-inf", "1e999", "soon"):
            nonce = "n-" + timestamp
            headers = {"snq-timestamp": timestamp, "snq-nonce": nonce,
                       "snq-signature": signature("s3cret", "shutdown",
                                                  timestamp, nonce)}
            e = self.assertRaises(ValueError, self.check, "s3cret", "shutdown",
                                  headers)
            self.assertIn("not a finite number", str(e))

    def test_malformedSignatureRefused(self):
        """Whatever the signature header holds, it is refused as malformed."""
        good = controlHeaders("shutdown", self.clock.seconds(), "s3cret")
        for bad in ("é" * 64, "\u0000" * 64, "zz" * 32, good["snq-signature"][:-1],
                    good["snq-signature"] + "0", ""):
            e = self.assertRaises(ValueError, self.check, "s3cret", "shutdown",
                                  {**good, "snq-signature": bad})
            self.assertIn("signature is malformed", str(e))
        for bad in ("é", "x" * 129, "", "a b"):
            e = self.assertRaises(ValueError, self.check, "s3cret", "shutdown",
                                  {**good, "snq-nonce": bad})
            self.assertIn("nonce is malformed", str(e))

    def test_nonceCacheBounded(self):
        """A flood of nonces: the cache stays at its bound, oldest out first."""
        verifier = ControlVerifier("", 60, self.clock, maxNonces=100)
        for n in range(1000):
            verifier.check(b"restart", {"snq-nonce": f"n{n}"})
        self.assertEqual(list(verifier._seen), [f"n{n}" for n in range(900, 1000)])

    def test_floodCostFlat(self):
        """
        Checking a message costs the same after 50,000 nonces as after none:
        expiry looks at the oldest only, and the cache is bounded.
        """
        def costOf(verifier, prefix, n=2000):
            start = time.perf_counter()
            for i in range(n):
                verifier.check(b"restart", {"snq-nonce": f"{prefix}{i}"})
            return (time.perf_counter() - start) / n

        fresh = ControlVerifier("", 60, self.clock)
        baseline = min(costOf(fresh, f"warm{k}-") for k in range(3))
        flooded = ControlVerifier("", 60, self.clock)
        for i in range(50_000):
            flooded.check(b"restart", {"snq-nonce": f"flood{i}"})
        self.clock.advance(1)
        after = min(costOf(flooded, f"after{k}-") for k in range(3))
        self.assertLessEqual(len(flooded._seen), flooded.maxNonces)
        self.assertLess(after, 3 * baseline + 20e-6,
                        f"{after * 1e6:.1f} µs a message after the flood, "
                        f"{baseline * 1e6:.1f} µs before")
        # And what was flooded expires at once, however much there is.
        self.clock.advance(121)
        start = time.perf_counter()
        flooded.check(b"restart", {"snq-nonce": "late"})
        self.assertLess(time.perf_counter() - start, 0.5)
        self.assertEqual(list(flooded._seen), ["late"])


class ConnectionTestCase(SynchronousTestCase):
    """A BrokerConnection (or a queue of them) on a fake broker and a Clock."""

    def setUp(self):
        self.clock = Clock()
        self.broker = FakeBroker(clock=self.clock)

    def connection(self, stomp=None, broker=None, url="tcp://a:61613"):
        config = stompConfig(stomp).stomp
        return BrokerConnection(url, config, self.clock,
                                endpoint=(broker or self.broker).endpoint())

    def stop(self, *connections):
        self.broker.holdReceipts = False
        stopped = defer.gatherResults([c.stop() for c in connections])
        self.broker.pump()
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class BrokerConnectionTests(ConnectionTestCase):
    def test_handshake(self):
        c = self.connection({"login": "u", "passcode": "p", "vhost": "v",
                             "heartbeat": 2})
        got = []
        c.subscribe(Subscription("/queue/snq/main", lambda s, f: got.append(f),
                                 {"ack": "client-individual"}))
        ready = c.whenReady()
        c.start()
        self.assertNoResult(ready)
        self.broker.pump()
        stomp = self.successResultOf(ready)
        self.assertIs(c.stomp, stomp)
        [connect] = self.broker.sent(StompSpec.CONNECT) or self.broker.sent(
            StompSpec.STOMP)
        self.assertEqual(
            (connect.headers["login"], connect.headers["passcode"],
             connect.headers["host"], connect.headers["heart-beat"]),
            ("u", "p", "v", "2000,2000"))
        [subscribe] = self.broker.sent(StompSpec.SUBSCRIBE)
        self.assertEqual(subscribe.headers["destination"], "/queue/snq%2Fmain")
        self.assertIn("receipt", subscribe.headers)
        self.broker.last.deliver("/queue/snq%2Fmain", b"hello")
        self.assertEqual([f.body for f in got], [b"hello"])
        self.stop(c)

    def test_notReadyUntilSubscribed(self):
        c = self.connection()
        c.subscribe(Subscription("/queue/snq/main", lambda s, f: None, {}))
        self.broker.holdReceipts = True
        c.start()
        self.broker.pump()
        self.assertIsNone(c.stomp, "SUBSCRIBE not confirmed yet")
        self.broker.releaseReceipts()
        self.assertIsNotNone(c.stomp)
        self.stop(c)

    def test_subscriptionsRestoredAfterReconnect(self):
        c = self.connection()
        c.start()
        self.broker.pump()
        c.subscribe(Subscription("/queue/snq/main", lambda s, f: None, {}))
        c.subscribe(Subscription("/topic/snq/control", lambda s, f: None, {}))
        self.broker.pump()
        self.assertEqual(len(self.broker.last.subscriptions), 2)
        first = self.broker.last
        with capturedLogs() as events:
            first.lose()
        self.assertIsNone(c.stomp)
        self.assertTrue(any("lost STOMP server" in e["log_format"]
                            for e in events))
        self.clock.advance(31)
        self.broker.pump()
        self.assertIsNot(self.broker.last, first)
        self.assertEqual(
            sorted(d for d, _ in self.broker.last.subscriptions.values()),
            ["/queue/snq%2Fmain", "/topic/snq%2Fcontrol"])
        self.assertIsNotNone(c.stomp)
        self.stop(c)

    def test_refusedLoginIsAFailedAttemptWithoutTraceback(self):
        """
        An ERROR instead of CONNECTED closes the connection during the
        handshake; ClientService must only hear of a failed attempt (no
        automat NoTransition), and try again later.
        """
        self.broker.connectError = "Access refused"
        c = self.connection()
        c.start()
        first = c.firstAttempt()
        with capturedLogs() as events:
            self.broker.pump()
        self.assertIn("Access refused", str(self.successResultOf(first)))
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertFalse([e for e in events if e.get("log_failure")
                          and "NoTransition" in str(e["log_failure"])])
        self.assertEqual(len(self.broker.connections), 1)
        self.broker.connectError = None
        self.clock.advance(31)
        self.broker.pump()
        self.assertEqual(len(self.broker.connections), 2)
        self.assertIsNotNone(c.stomp)
        self.stop(c)

    def test_handshakeTimeout(self):
        self.broker.answer = False
        c = self.connection({"connect_timeout": 3})
        c.start()
        first = c.firstAttempt()
        self.broker.pump()
        self.clock.advance(3)
        self.broker.pump()
        self.assertIsInstance(self.successResultOf(first), Exception)
        self.assertTrue(self.broker.connections[0].transport.disconnecting)
        self.broker.answer = True
        self.clock.advance(31)
        self.broker.pump()
        self.assertIsNotNone(c.stomp)
        self.stop(c)

    def test_stopSaysDisconnectAndWaitsForTheReceipt(self):
        c = self.connection()
        c.start()
        self.broker.pump()
        self.broker.holdReceipts = True
        stopped = c.stop()
        self.broker.pump()
        self.assertEqual(len(self.broker.sent(StompSpec.DISCONNECT)), 1)
        self.assertNoResult(stopped)
        self.assertFalse(self.broker.last.transport.disconnecting)
        self.broker.releaseReceipts()
        self.broker.pump()
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopWhileConnecting(self):
        self.broker.answer = False
        c = self.connection()
        c.start()
        self.broker.pump()
        self.stop(c)
        self.assertTrue(self.broker.last.transport.disconnecting)

    def test_escapingFollowsTheBroker(self):
        for server, setting, wire in (
                ("RabbitMQ/3.10.8", "auto", "/queue/snq%2Fmain"),
                ("ActiveMQ/5.17.2", "auto", "/queue/snq/main"),
                ("RabbitMQ/3.10.8", "never", "/queue/snq/main"),
                ("ActiveMQ/5.17.2", "always", "/queue/snq%2Fmain")):
            broker = FakeBroker(server, self.clock)
            c = self.connection({"escape_slashes": setting}, broker)
            c.subscribe(Subscription("/queue/snq/main", lambda s, f: None, {}))
            c.start()
            broker.pump()
            [subscribe] = broker.sent(StompSpec.SUBSCRIBE)
            self.assertEqual(subscribe.headers["destination"], wire,
                             (server, setting))
            stopped = c.stop()
            broker.pump()
            self.successResultOf(stopped)


class Recorder(QueueHandler):
    transport = "rec"
    done: list = []

    def handle(self, item):
        if item.payload == "fail":
            raise ValueError("boom")
        if item.payload == "reject":
            raise Reject("never")
        if item.payload == "wait":
            d = defer.Deferred()
            self.done.append(d)
            return d
        self.done.append(item.payload)
        return None


class FakeWorker(MultiService):
    """What a StompManager needs of its IoMaster."""

    def __init__(self, groups=("main",)):
        super().__init__()
        self.groups = list(groups)
        self.recycle = self.shutdown = self.reload = None


class QueueTestCase(ConnectionTestCase):
    """A StompQueue on two fake servers, opened."""

    def setUp(self):
        super().setUp()
        self.other = FakeBroker(clock=self.clock)
        self.config = self.configure()
        self.queue = StompQueue(self.config, self.clock, connections=[
            self.connection(broker=self.broker, url="tcp://a:61613"),
            self.connection(broker=self.other, url="tcp://b:61613")])
        opened = self.queue.open()
        self.pump()
        self.successResultOf(opened)

    def configure(self, **extra):
        return snqconfig.parse({"queue": {"backend": "stomp", "concurrency": 3,
                                          "retry_delay": 1.0},
                                "stomp": {"servers": ["tcp://a:61613",
                                                      "tcp://b:61613"]},
                                **extra})

    def pump(self):
        for _ in range(3):
            self.broker.pump()
            self.other.pump()

    def settled(self, d):
        """Pump until C{d} has a result, and return it."""
        self.pump()
        return self.successResultOf(d)

    def closeQueue(self):
        self.broker.holdReceipts = self.other.holdReceipts = False
        closed = self.queue.close()
        self.pump()
        self.successResultOf(closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def consume(self, destination="/queue/snq/main"):
        got = []
        self.queue.consume([destination], got.append)
        self.pump()
        return got

    def acks(self, broker=None):
        return [f.headers["id"] for f in (broker or self.broker).sent(StompSpec.ACK)]

    def nacks(self, broker=None):
        return [f.headers["id"]
                for f in (broker or self.broker).sent(StompSpec.NACK)]


class StompQueueTests(QueueTestCase):
    def test_makeQueue(self):
        queue = makeQueue(stompConfig(), self.clock)
        self.assertIsInstance(queue, StompQueue)
        self.assertEqual(queue.prefetch, 100, "twice the default concurrency")
        self.assertEqual(StompQueue(stompConfig({"prefetch": 7}),
                                    self.clock).prefetch, 7)
        urgent = StompQueue(stompConfig({"max_priority": 10}), self.clock)
        self.assertEqual(urgent.prefetch, 20, "a short window for priorities")
        self.assertEqual(StompQueue(stompConfig({"max_priority": 10, "prefetch": 50}),
                                    self.clock).prefetch, 50)
        self.assertIn("tcp://127.0.0.1:61613", queue.describe())
        self.assertNotIn("guest", queue.describe().replace("login guest", ""))
        self.closeQueue()

    def test_consumeFromEveryServer(self):
        got = self.consume()
        for broker in (self.broker, self.other):
            [subscribe] = broker.sent(StompSpec.SUBSCRIBE)
            self.assertEqual(subscribe.headers["ack"], "client-individual")
            self.assertEqual(subscribe.headers["prefetch-count"], "6")
        self.broker.last.deliver("/queue/snq%2Fmain", b"one")
        self.other.last.deliver("/queue/snq%2Fmain", b"two")
        self.assertEqual([d.frame for d in got], [b"one", b"two"])
        self.assertEqual([d.token.origin for d in got], ["/queue/snq/main"] * 2)
        self.closeQueue()

    def test_ackOnTheConnectionItCameFrom(self):
        got = self.consume()
        ackId = self.other.last.deliver("/queue/snq%2Fmain", b"x")
        self.successResultOf(self.queue.ack(got[0]))
        self.pump()
        self.assertEqual(self.acks(self.other), [ackId])
        self.assertEqual(self.acks(), [])
        self.closeQueue()

    def test_ackAfterTheConnectionWentIsDropped(self):
        got = self.consume()
        self.broker.last.deliver("/queue/snq%2Fmain", b"x")
        self.broker.last.lose()
        self.clock.advance(31)
        self.pump()
        self.settled(self.queue.ack(got[0]))
        self.assertEqual(self.acks(), [], "the broker has taken it back")
        self.closeQueue()

    def test_ackWhileSubscriptionsAreRestored(self):
        """
        After a reconnect, messages for the first subscription restored
        may come (and be done) before the last is confirmed: they are
        acknowledged on the connection they came on all the same.
        """
        got = self.consume()
        self.queue.listenControl(lambda body, headers: None)
        self.pump()
        self.broker.last.lose()
        self.broker.holdReceipts = True
        self.clock.advance(31)
        self.pump()
        conn = self.broker.last
        self.assertEqual(len(conn.subscriptions), 1, "the control topic waits")
        self.assertIsNone(self.queue.connections[0].stomp, "not ready yet")
        ackId = conn.deliver("/queue/snq%2Fmain", b"x")
        self.settled(self.queue.ack(got[-1]))
        self.assertEqual(self.acks(), [ackId])
        self.closeQueue()

    def test_enqueueRoutesPersistentWithReceipts(self):
        self.broker.holdReceipts = True
        items = [Item(transport="webhook", payload=1),
                 Item(transport="xmppout", payload=2)]
        d = self.queue.enqueue(items)
        self.pump()
        self.assertNoResult(d)
        self.broker.releaseReceipts()
        self.successResultOf(d)
        sends = self.broker.sent(StompSpec.SEND)
        self.assertEqual([f.headers["destination"] for f in sends],
                         ["/queue/snq%2Fmain", "/queue/snq%2Fxmpp"])
        for frame in sends:
            self.assertEqual(frame.headers["persistent"], "true")
            self.assertEqual(frame.headers["content-type"], "application/json")
        self.assertEqual([Item.fromJSON(f.body).id for f in sends],
                         [i.id for i in items])
        self.assertEqual(self.other.sent(StompSpec.SEND), [], "one server sends")
        self.closeQueue()

    def test_delayedEnqueueWaitsInATtlQueue(self):
        self.settled(self.queue.enqueue([Item(transport="t", payload=0)], delay=60))
        [send] = self.broker.sent(StompSpec.SEND)
        self.assertEqual(send.headers["destination"],
                         "/queue/snq%2Fmain.retry-55109ms")
        self.assertEqual(send.headers["x-message-ttl"], "55109")
        self.assertEqual(send.headers["x-dead-letter-routing-key"], "snq/main")
        self.closeQueue()

    def test_failoverToTheNextServer(self):
        self.broker.last.lose()
        self.broker.refuse = True
        self.settled(self.queue.enqueue([Item(transport="t", payload=0)]))
        self.assertEqual(len(self.other.sent(StompSpec.SEND)), 1)
        self.closeQueue()

    def test_unconfirmedSendGoesAgainElsewhere(self):
        self.broker.holdReceipts = True
        d = self.queue.enqueue([Item(transport="t", payload=0)])
        self.pump()
        self.broker.refuse = True
        with capturedLogs() as events:
            self.broker.last.lose()
        self.pump()
        self.successResultOf(d)
        self.assertEqual(len(self.broker.sent(StompSpec.SEND)), 1)
        self.assertEqual(len(self.other.sent(StompSpec.SEND)), 1)
        self.assertTrue(any("sending them again" in e["log_format"]
                            for e in events))
        self.closeQueue()

    def test_noServerAtAll(self):
        self.broker.last.lose()
        self.other.last.lose()
        self.broker.refuse = self.other.refuse = True
        d = self.queue.enqueue([Item(transport="t", payload=0)])
        self.clock.advance(10)
        self.failureResultOf(d, NoBrokerError)
        self.closeQueue()

    def test_openFailsWhenNoServerAnswers(self):
        self.closeQueue()
        self.broker.refuse = self.other.refuse = True
        queue = StompQueue(self.config, self.clock, connections=[
            self.connection(broker=self.broker), self.connection(broker=self.other)])
        opened = queue.open()
        self.pump()
        failure = self.failureResultOf(opened, NoBrokerError)
        self.assertIn("refused by the test", str(failure.value))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_openWithOneServerDown(self):
        self.closeQueue()
        self.broker.refuse = True
        queue = StompQueue(self.config, self.clock, connections=[
            self.connection(broker=self.broker), self.connection(broker=self.other)])
        with capturedLogs() as events:
            opened = queue.open()
            self.pump()
        self.successResultOf(opened)
        self.assertTrue(any("not reachable" in e["log_format"] for e in events))
        closed = queue.close()
        self.pump()
        self.successResultOf(closed)

    def test_retryWaitsThenAcks(self):
        got = self.consume()
        ackId = self.broker.last.deliver("/queue/snq%2Fmain", b"{}")
        self.broker.holdReceipts = True
        item = Item(transport="t", payload=0, attempts=2)
        d = self.queue.retry(got[0], item, 5.0, "boom")
        self.pump()
        self.assertEqual(self.acks(), [], "not before the retry is safe")
        self.broker.releaseReceipts()
        self.pump()
        self.successResultOf(d)
        [send] = self.broker.sent(StompSpec.SEND)
        self.assertEqual(send.headers["destination"],
                         "/queue/snq%2Fmain.retry-4871ms")
        self.assertEqual(Item.fromJSON(send.body).attempts, 2)
        self.assertEqual(self.acks(), [ackId])
        self.closeQueue()

    def test_earlyItemWaitsForItsRunAt(self):
        """An item that came before its run_at goes to a bucket never late."""
        got = self.consume()
        self.broker.last.deliver("/queue/snq%2Fmain", b"{}")
        item = Item(transport="t", payload=0, run_at=self.clock.seconds() + 1.0)
        self.settled(self.queue.retry(got[0], item, 1.0, "not due yet"))
        [send] = self.broker.sent(StompSpec.SEND)
        self.assertEqual(send.headers["destination"],
                         "/queue/snq%2Fmain.retry-861ms")
        self.closeQueue()

    def test_enqueueWithRunAt(self):
        run_at = self.clock.seconds() + 60
        self.settled(self.queue.enqueue([Item(transport="t", payload=0,
                                              run_at=run_at)]))
        [send] = self.broker.sent(StompSpec.SEND)
        self.assertEqual(send.headers["destination"],
                         "/queue/snq%2Fmain.retry-55109ms")
        self.assertEqual(Item.fromJSON(send.body).run_at, run_at)
        self.closeQueue()

    def test_retryGoesBackToItsBreakout(self):
        got = self.consume("/queue/snq/main/webhook")
        self.broker.last.deliver("/queue/snq%2Fmain%2Fwebhook", b"{}")
        self.settled(self.queue.retry(
            got[0], Item(transport="webhook", payload=0), 1.0, "boom"))
        [send] = self.broker.sent(StompSpec.SEND)
        self.assertEqual(send.headers["x-dead-letter-routing-key"],
                         "snq/main/webhook")
        self.closeQueue()

    def test_deadLetterWithReasons(self):
        got = self.consume()
        frame = Item(transport="t", payload=0, site="s").toJSON()
        ackId = self.broker.last.deliver("/queue/snq%2Fmain", frame,
                                         {"content-type": "application/json"})
        self.broker.last.deliver("/queue/snq%2Fmain", b"\xff junk")
        self.clock.advance(1000)
        self.settled(self.queue.deadLetter(got[0], "retries", "gave up: x" * 500,
                                           11))
        self.settled(self.queue.deadLetter(got[1], "baditem", "not UTF-8", 0))
        good, bad = self.broker.sent(StompSpec.SEND)
        self.assertEqual(good.headers["destination"], "/queue/snq%2Fdead")
        self.assertEqual(good.body, frame)
        headers = good.headers
        self.assertEqual((headers["snq-reason"], headers["snq-attempts"],
                          headers["snq-transport"], headers["snq-site"],
                          headers["snq-origin"], headers["snq-died"]),
                         ("retries", "11", "t", "s", "/queue/snq/main", "1000.0"))
        self.assertEqual(len(headers["snq-error"]), 1000)
        self.assertEqual(headers["snq-item-id"], Item.fromJSON(frame).id)
        self.assertEqual(bad.body, b"\xff junk")
        self.assertNotIn("snq-item-id", bad.headers)
        self.assertGreater(int(bad.headers["snq-dead-id"]),
                           int(headers["snq-dead-id"]))
        self.assertEqual(self.acks()[0], ackId)
        self.assertEqual(len(self.acks()), 2)
        self.closeQueue()

    def test_refusedSendIsNotRepeated(self):
        got = self.consume()
        self.broker.last.deliver("/queue/snq%2Fmain", b"{}")
        d = self.queue.deadLetter(got[0], "baditem", "x", 0)
        conn = self.broker.last
        conn.transport.clear()
        conn.reply(StompSpec.ERROR, {"message": "precondition_failed"})
        self.pump()
        self.failureResultOf(d)
        self.assertEqual(self.acks(), [])
        self.flushLoggedErrors()
        self.closeQueue()

    def test_controlPublishedSigned(self):
        self.closeQueue()
        self.config = self.configure(stomp={"control_secret": "k",
                                            "servers": ["tcp://a:1"]})
        queue = StompQueue(self.config, self.clock,
                           connections=[self.connection(broker=self.broker)])
        opened = queue.open()
        self.pump()
        self.successResultOf(opened)
        self.settled(queue.publishControl("update:x"))
        [send] = self.broker.sent(StompSpec.SEND)
        self.assertEqual(send.headers["destination"], "/topic/snq%2Fcontrol")
        self.assertEqual(send.body, b"update:x")
        verifier = ControlVerifier("k", 60, self.clock)
        self.assertEqual(verifier.check(send.body, send.headers), ("update", "x"))
        closed = queue.close()
        self.pump()
        self.successResultOf(closed)


class QuorumQueueTests(QueueTestCase):
    """
    With [stomp] queue_type = "quorum" every SUBSCRIBE and SEND to one of
    snq's queues declares it so (RabbitMQ refuses one that says otherwise);
    the control topic is no queue.
    """

    QUORUM = {"x-queue-type": "quorum"}

    def configure(self, **extra):
        config = super().configure(**extra)
        return snqconfig.parse({
            "queue": {"backend": "stomp", "concurrency": 3, "retry_delay": 1.0},
            "stomp": {"servers": list(config.stomp.servers),
                      "queue_type": "quorum"}})

    def assertQuorum(self, frame):
        self.assertEqual(frame.headers.get("x-queue-type"), "quorum",
                         (frame.command, frame.headers))
        self.assertNotIn("x-max-priority", frame.headers)

    def test_destinations(self):
        d = Destinations(self.config)
        self.assertEqual(d.queueType, self.QUORUM)
        self.assertEqual(d.arguments, self.QUORUM)
        self.assertEqual(d.itemHeaders(5, False), self.QUORUM)
        self.assertEqual(d.itemHeaders(5, True), {}, "the delay queue's own")
        _, headers = d.delayed("/queue/snq/main", 1.0, rabbitmq=True)
        self.assertEqual(headers["x-queue-type"], "quorum")
        self.assertEqual(d.delayed("/queue/snq/main", 1.0, rabbitmq=False)[1],
                         {"AMQ_SCHEDULED_DELAY": "1024"})
        classic = Destinations(stompConfig())
        self.assertEqual((classic.queueType, classic.arguments,
                          classic.itemHeaders(5, False)), ({}, {}, {}),
                         "classic queues are declared as before the option")
        self.closeQueue()

    def test_subscribeEnqueueRetryAndDeadLetterDeclareQuorum(self):
        got = self.consume()
        self.queue.listenControl(lambda body, headers: None)
        self.pump()
        subscribe, control = self.broker.sent(StompSpec.SUBSCRIBE)
        self.assertQuorum(subscribe)
        self.assertNotIn("x-queue-type", control.headers)
        self.settled(self.queue.enqueue([Item(transport="webhook", payload=1)]))
        self.settled(self.queue.enqueue([Item(transport="webhook", payload=2)],
                                        delay=5))
        self.broker.last.deliver("/queue/snq%2Fmain", Item(
            transport="t", payload=0).toJSON())
        self.broker.last.deliver("/queue/snq%2Fmain", b"junk")
        self.settled(self.queue.retry(got[0], Item(transport="t", payload=0),
                                      1.0, "boom"))
        self.settled(self.queue.deadLetter(got[1], "baditem", "junk", 0))
        sends = self.broker.sent(StompSpec.SEND)
        self.assertEqual([s.headers["destination"] for s in sends], [
            "/queue/snq%2Fmain", "/queue/snq%2Fmain.retry-4871ms",
            "/queue/snq%2Fmain.retry-1024ms", "/queue/snq%2Fdead"])
        for send in sends:
            self.assertQuorum(send)
        self.closeQueue()


class ManagerTestCase(QueueTestCase):
    """A StompManager started under a fake worker, on the two servers."""

    def setUp(self):
        super().setUp()
        Recorder.done = []
        self.dispatcher = Dispatcher(self.queue, HandlerRegistry({"rec": Recorder}),
                                     self.config, clock=self.clock)
        self.worker = FakeWorker()
        self.manager = StompManager(self.queue, self.dispatcher, self.config,
                                    None, self.clock)
        self.manager.setServiceParent(self.worker)
        self.worker.startService()
        self.pump()

    def tearDown(self):
        stopped = self.worker.stopService()
        self.pump()
        self.successResultOf(stopped)
        self.closeQueue()

    def send(self, payload, broker=None, destination="/queue/snq%2Fmain"):
        body = Item(transport="rec", payload=payload).toJSON()
        ackId = (broker or self.broker).last.deliver(destination, body)
        self.pump()
        return ackId

    def control(self, body, headers=None):
        self.broker.last.deliver("/topic/snq%2Fcontrol", body, headers)


class StompManagerTests(ManagerTestCase):
    def test_subscribesToItsGroupsNotControl(self):
        """Without control_secret, the control channel is not listened to."""
        for broker in (self.broker, self.other):
            self.assertEqual(sorted(d for d, _ in broker.last.subscriptions.values()),
                             ["/queue/snq%2Fmain"])

    def test_handledThenAcked(self):
        first = self.send("a")
        second = self.send("b", self.other)
        self.assertEqual(Recorder.done, ["a", "b"])
        self.assertEqual(self.acks(), [first])
        self.assertEqual(self.acks(self.other), [second])
        self.assertEqual(self.dispatcher.stats.total("handled"), 2)

    def test_notAckedWhileRunning(self):
        self.send("wait")
        self.assertEqual(self.acks(), [])
        Recorder.done[0].callback(None)
        self.pump()
        self.assertEqual(len(self.acks()), 1)

    def test_failureRetriedThroughTheTtlQueue(self):
        ackId = self.send("fail")
        self.flushLoggedErrors(ValueError)
        [send] = self.broker.sent(StompSpec.SEND)
        self.assertTrue(send.headers["destination"].startswith(
            "/queue/snq%2Fmain.retry-"))
        self.assertEqual(Item.fromJSON(send.body).attempts, 1)
        self.assertEqual(self.acks(), [ackId])

    def test_rejectAndBadFramesDeadLettered(self):
        self.send("reject")
        self.broker.last.deliver("/queue/snq%2Fmain", b"not json")
        self.pump()
        reasons = [f.headers["snq-reason"] for f in self.broker.sent(StompSpec.SEND)]
        self.assertEqual(reasons, ["rejected", "baditem"])
        self.assertEqual(len(self.acks()), 2)

    def test_stopGivesBackWhatWaitsAndIgnoresWhatComes(self):
        """
        Three run at once (concurrency 3).  On stop the two waiting are
        NACKed (another worker may take them now), one arriving later is
        neither run nor acknowledged (the broker takes it back when we
        disconnect), and the three running finish and are acknowledged.
        """
        ids = [self.send("wait") for _ in range(5)]
        running = list(Recorder.done)
        self.assertEqual(len(running), 3)
        stopped = self.worker.stopService()
        self.pump()
        self.assertEqual(self.nacks(), ids[3:])
        self.send("late")
        self.assertEqual(self.dispatcher.running, 3)
        for d in running:
            d.callback(None)
        self.pump()
        self.successResultOf(stopped)
        self.assertEqual(self.acks(), ids[:3])
        self.assertEqual(self.nacks(), ids[3:])
        self.assertEqual(len(Recorder.done), 3, "nothing else started")
        self.worker.startService = lambda: None  # tearDown stops it again

    def test_lostConnectionDropsWhatWaits(self):
        """
        The broker takes back what was on a connection that went: what
        waits is not run (it will come again); what came on the other server
        is NACKed; what runs finishes, its ACK going nowhere.
        """
        ids = [self.send("wait") for _ in range(4)]
        other = self.send("b", self.other)
        self.assertEqual(len(Recorder.done), 3)
        self.broker.last.lose()
        self.pump()
        self.assertEqual(self.nacks(self.other), [other])
        self.assertEqual(self.nacks(), [])
        self.assertEqual(len(self.dispatcher.held), 3)
        for d in Recorder.done:
            d.callback(None)
        self.pump()
        self.assertEqual(self.dispatcher.held, set())
        self.assertEqual(self.acks(), [])
        self.assertNotIn(ids[3], self.acks() + self.nacks())


class UnsignedControlTests(ManagerTestCase):
    """StatusNet's unsigned control channel, for an operator who opts in."""

    def configure(self, **extra):
        return super().configure(stomp={"control_allow_unsigned": True,
                                        "servers": ["tcp://a:1", "tcp://b:1"]})

    def test_subscribesToItsGroupsAndControl(self):
        for broker in (self.broker, self.other):
            self.assertEqual(sorted(d for d, _ in broker.last.subscriptions.values()),
                             ["/queue/snq%2Fmain", "/topic/snq%2Fcontrol"])

    def test_controlShutdownAndRestart(self):
        calls = []
        self.worker.shutdown = lambda reason: calls.append(("shutdown", reason))
        self.worker.recycle = lambda reason: calls.append(("recycle", reason))
        self.control(b"restart")
        self.control(b"shutdown")
        self.assertEqual(calls, [
            ("recycle", "restart from the control channel"),
            ("shutdown", "shutdown from the control channel")])

    def test_controlInlineOnlyWarns(self):
        with capturedLogs() as events:
            self.control(b"restart")
        self.assertTrue(any("--inline" in e["log_format"]
                            and e["log_level"] == LogLevel.warn for e in events))

    def test_controlUpdateCounted(self):
        self.control(b"update:example")
        self.assertEqual(
            self.dispatcher.stats.counts[("siteupdate", "", "example")], 1)

    def test_copiesFromTwoServersObeyedOnce(self):
        calls = []
        self.worker.recycle = calls.append
        headers = controlHeaders("restart", self.clock.seconds())
        self.control(b"restart", headers)
        self.other.last.deliver("/topic/snq%2Fcontrol", b"restart", headers)
        self.assertEqual(len(calls), 1)
        self.assertEqual(self.dispatcher.stats.total("controlrejected"), 0)


class SignedControlTests(ManagerTestCase):
    def configure(self, **extra):
        return super().configure(stomp={"control_secret": "s3cret",
                                        "servers": ["tcp://a:1", "tcp://b:1"]})

    def control(self, body, headers=None):
        if headers is None:
            headers = controlHeaders(body.decode(), self.clock.seconds(), "s3cret")
        super().control(body, headers)

    def test_forgedOrUnsignedIgnoredLoggedCounted(self):
        calls = []
        self.worker.shutdown = calls.append
        with capturedLogs() as events:
            super().control(b"shutdown", {})
            super().control(b"shutdown", controlHeaders(
                "shutdown", self.clock.seconds(), "guess"))
        self.assertEqual(calls, [])
        self.assertEqual(self.dispatcher.stats.total("controlrejected"), 2)
        self.assertEqual(
            [e["why"].args[0].split(",")[0] for e in events
             if "refused" in e["log_format"]],
            ["it is not signed", "its signature is wrong"])

    def test_copiesFromTwoServersObeyedOnce(self):
        calls = []
        self.worker.recycle = calls.append
        headers = controlHeaders("restart", self.clock.seconds(), "s3cret")
        self.control(b"restart", headers)
        self.other.last.deliver("/topic/snq%2Fcontrol", b"restart", headers)
        self.assertEqual(len(calls), 1)


