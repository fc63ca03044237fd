# -*- test-case-name: tests.test_webhook_hosts -*-
"""
Remote-host isolation for webhooks (issue 15): the per-host limit and
circuit breaker on a Clock; the dispatcher putting deferred items back
uncharged; a dead host (connections that never answer) holding at most its
slots while another host's items flow, on a MemoryReactorClock and once for
real with a 10 s timeout; the circuits' counter in /metrics.
"""

import json
import random
import time

from twisted.internet import defer, protocol, reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server

from snq import config as snqconfig
from snq.dispatch import Dispatcher
from snq.handlers import Defer, HandlerRegistry
from snq.handlers.hosts import RemoteHosts
from snq.handlers.targets import TargetPolicy
from snq.handlers.webhook import WebhookHandler, hostOf
from snq.item import Item
from snq.queues.memory import MemoryQueue
from snq.routing import TransportFilter
from snq.stats import Stats
from tests.test_webhook import Resolver

ITEM = Item(transport="webhook", payload={}, site="ex")


class RemoteHostsTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.stats = Stats()
        self.hosts = RemoteHosts(self.clock, self.stats, random.Random(1))
        self.policy = TargetPolicy.fromSite({
            "webhook_host_concurrency": 2, "webhook_circuit_failures": 3,
            "webhook_circuit_cooldown": 30})

    def enter(self, host="h:80"):
        return self.hosts.enter(host, self.policy, ITEM)

    def leave(self, probe, ok, host="h:80"):
        self.hosts.leave(host, self.policy, ITEM, probe, ok)

    def test_concurrencyPerHost(self):
        self.assertEqual([self.enter(), self.enter()], [False, False])
        deferred = self.assertRaises(Defer, self.enter)
        self.assertIn("2 requests running", str(deferred))
        self.assertTrue(0.5 <= deferred.delay <= 1.5, deferred.delay)
        self.assertFalse(self.enter("other:80"), "another host has its own")
        self.leave(False, True)
        self.enter()
        self.assertEqual(self.hosts.running("h:80"), 2)

    def test_circuitOpensAfterFailuresInARow(self):
        for _ in range(2):
            self.leave(self.enter(), False)
        self.leave(self.enter(), True)
        for _ in range(2):
            self.leave(self.enter(), False)
        self.assertFalse(self.hosts.isOpen("h:80"), "a success reset the count")
        self.leave(self.enter(), False)
        self.assertTrue(self.hosts.isOpen("h:80"))
        self.assertEqual(self.stats.total("circuit_open"), 1)
        self.clock.advance(10)
        deferred = self.assertRaises(Defer, self.enter)
        self.assertIn("circuit open after 3 failures", str(deferred))
        self.assertTrue(20 <= deferred.delay <= 21, deferred.delay)

    def test_halfOpenProbe(self):
        for _ in range(3):
            self.leave(self.enter(), False)
        self.clock.advance(30)
        self.assertTrue(self.enter(), "the first after the cool-down probes")
        self.assertIn("a probe is running", str(self.assertRaises(Defer, self.enter)))
        self.leave(True, False)
        self.assertEqual(self.stats.total("circuit_open"), 2, "open again")
        self.assertRaises(Defer, self.enter)
        self.clock.advance(30)
        self.leave(self.enter(), True)
        self.assertFalse(self.hosts.isOpen("h:80"))
        self.assertEqual([self.enter(), self.enter()], [False, False])

    def test_hostOf(self):
        self.assertEqual([hostOf(u) for u in (
            "http://Example.org./x", "https://example.org/", "http://[::1]:81/",
            "http://u:p@example.org:8080/")],
            ["example.org:80", "example.org:443", "::1:81", "example.org:8080"])

    def test_settingsChecked(self):
        e = self.assertRaises(snqconfig.ConfigError, snqconfig.parse, {"sites": {
            "a": {"webhook_host_concurrency": 0, "webhook_circuit_failures": "5",
                  "webhook_circuit_cooldown": -1}}})
        self.assertEqual(sorted(e.problems), [
            "<config>: sites.a.webhook_circuit_cooldown: expected seconds from "
            "0.001 to 86400",
            "<config>: sites.a.webhook_circuit_failures: expected an integer "
            "from 1 to 10000",
            "<config>: sites.a.webhook_host_concurrency: expected an integer "
            "from 1 to 10000"])


SITES = {"default": {"webhook_allow": ["192.0.2.0/24", "127.0.0.1"],
                     "webhook_host_concurrency": 2,
                     "webhook_circuit_failures": 4,
                     "webhook_circuit_cooldown": 60}}
OK = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class DeadHostOnAClockTests(SynchronousTestCase):
    """
    The real handler on a MemoryReactorClock: connections to the dead host
    are left pending for ever (it never answers), the live host's are
    answered by the test; the dispatcher's 10 s timeout on the same clock.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        config = snqconfig.parse({
            "sites": SITES, "queue": {"concurrency": 10, "retry_delay": 60},
            "transports": {"webhook": {"timeout": 10}}})
        self.queue = MemoryQueue(self.reactor)
        memory = self.reactor

        class Handler(WebhookHandler):
            def __init__(self, context):
                super().__init__(context, reactor=memory, resolver=Resolver({
                    a: [a] for a in ("192.0.2.1", "192.0.2.2")}))

        self.dispatcher = Dispatcher(self.queue, HandlerRegistry({"webhook": Handler}),
                                     config, clock=self.reactor,
                                     rng=random.Random(1))
        self.answered = 0

    def put(self, host, n):
        self.queue.enqueue([Item(transport="webhook", site="default",
                                 payload={"url": f"http://{host}/", "body": i})
                            for i in range(n)])

    def dispatchAll(self):
        for delivery in self.queue.claim(1000, TransportFilter()).result:
            self.dispatcher.dispatch(delivery)
        self.answerLive()

    def answerLive(self):
        """Connect and answer 200 to every pending connection to the live host."""
        for entry in list(self.reactor.tcpClients):
            if entry[:2] == ("192.0.2.2", 80):
                self.reactor.tcpClients.remove(entry)
                proto = entry[2].buildProtocol(None)
                proto.makeConnection(StringTransport())
                proto.dataReceived(OK)
                proto.connectionLost(Failure(ConnectionDone()))
                self.answered += 1

    def deadConnections(self):
        return [c for c in self.reactor.tcpClients if c[0] == "192.0.2.1"]

    def rows(self, host):
        return [r for r in self.queue.rows.values()
                if json.loads(r["frame"])["payload"]["url"] == f"http://{host}/"]

    def test_deadHostHoldsOnlyItsSlots(self):
        self.put("192.0.2.1", 20)
        self.put("192.0.2.2", 5)
        self.dispatchAll()
        self.assertEqual(len(self.deadConnections()), 2, "its two slots")
        self.assertEqual(self.answered, 2, "the live host's two slots at once")
        self.assertEqual(self.dispatcher.running, 2, "the dead host's only")
        # The rest were put back, uncharged, for about a second.
        waiting = [r for r in self.rows("192.0.2.1") if r["lease_until"] is None]
        self.assertEqual(len(waiting), 18)
        self.assertEqual({r["attempts"] for r in waiting}, {0})
        self.assertTrue(all(r["error"].startswith("deferred: 192.0.2.1:80: 2 "
                                                  "requests running")
                            for r in waiting))
        self.assertEqual(self.dispatcher.stats.total("deferred"), 21)
        # The live host's items keep flowing while the dead one hangs.
        for _ in range(3):
            self.reactor.advance(1.6)
            self.dispatchAll()
        self.assertEqual(self.answered, 5)
        self.assertEqual(self.rows("192.0.2.2"), [])
        self.assertEqual(len(self.deadConnections()), 2)
        # Timeouts: charged; after four failures in a row the circuit opens.
        self.reactor.advance(10)
        self.dispatchAll()
        self.reactor.advance(10)
        self.dispatchAll()
        charged = [r for r in self.rows("192.0.2.1") if r["attempts"]]
        self.assertEqual(len(charged), 4)
        self.assertEqual(self.dispatcher.stats.total("circuit_open"), 1)
        # Open: nothing is tried; all wait for the cool-down, uncharged.
        self.reactor.advance(1.6)
        self.dispatchAll()
        self.assertEqual(len(self.deadConnections()), 4, "no new attempt")
        self.assertEqual(self.dispatcher.running, 0)
        self.assertEqual(sorted(r["attempts"] for r in self.rows("192.0.2.1")),
                         [0] * 16 + [1] * 4)
        self.flushLoggedErrors()


class DeadServer(protocol.Protocol):
    """Accepts, reads, never answers; counts the connections it holds."""

    def connectionMade(self):
        self.factory.open += 1
        self.factory.most = max(self.factory.most, self.factory.open)

    def connectionLost(self, reason):
        self.factory.open -= 1


class Live(resource.Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def render_POST(self, request):
        self.seen.append(time.monotonic())
        return b"ok"


class DeadHostForRealTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_deadHostWithATenSecondTimeout(self):
        """
        Real servers on 127.0.0.1: a dead one with 10 s of timeout holds two
        slots of ten, and the live one's items are all done meanwhile.
        """
        dead = protocol.ServerFactory.forProtocol(DeadServer)
        dead.open = dead.most = 0
        live = Live()
        ports = [reactor.listenTCP(0, dead, interface="127.0.0.1"),
                 reactor.listenTCP(0, server.Site(live), interface="127.0.0.1")]
        for port in ports:
            self.addCleanup(port.stopListening)
        deadPort, livePort = (p.getHost().port for p in ports)
        config = snqconfig.parse({
            "sites": SITES, "queue": {"concurrency": 10, "retry_delay": 60},
            "transports": {"webhook": {"timeout": 10}}})
        queue = MemoryQueue(reactor)
        dispatcher = Dispatcher(queue, HandlerRegistry({"webhook": WebhookHandler}),
                                config, clock=reactor)
        self.addCleanup(dispatcher.stopHandlers)
        queue.enqueue([Item(transport="webhook", payload={
            "url": f"http://127.0.0.1:{port}/", "body": n})
            for n in range(20) for port in (deadPort, livePort)])
        started = time.monotonic()
        done = [dispatcher.dispatch(d) for d in
                (yield queue.claim(100, TransportFilter()))]
        while len(live.seen) < 20 and time.monotonic() - started < 9:
            yield deferLater(reactor, 0.2, lambda: None)
            due = yield queue.claim(100, TransportFilter())
            done += [dispatcher.dispatch(d) for d in due]
            self.assertTrue(all(json.loads(d.frame)["attempts"] == 0 for d in due))
        self.assertEqual(len(live.seen), 20, "every live item, before the "
                         "dead host's first timeout")
        self.assertLess(live.seen[-1] - started, 9)
        self.assertEqual((dead.most, dead.open), (2, 2))
        yield defer.gatherResults(done)
        charged = [r for r in queue.rows.values() if r["attempts"]]
        self.assertEqual(len(charged), 2, "only the two that ran timed out")
        self.flushLoggedErrors()
