# -*- test-case-name: tests.test_cluster_stomp -*-
"""
The cluster's registry on a RabbitMQ broker alone (no [ledger] url): the
store's contract, expiry, forged messages ignored and a slot read by two
at once, on the real RabbitMQ; its frames, waits and failures on the fake
broker.
"""

from stompest.protocol import StompSpec
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from snq import config as snqconfig
from snq.cluster import ClusterMissing, makeStore, pauseKey
from snq.cluster.stomp import EMPTY_WAIT, NotRabbitMQ, StompStore, slotSignature
from tests import rabbitmq
from tests.stomp_fakes import FakeBroker
from tests.test_cluster import StoreMixin

SECRET = "cluster-secret"


def stompConfig(name, **stomp):
    return snqconfig.parse({"queue": {"backend": "stomp",
                                      "basename": f"/queue/{name}/"},
                            "stomp": stomp})


class SelectedTests(SynchronousTestCase):
    def test_closedWithoutSecret(self):
        """As the control channel: no secret, no registry on the broker."""
        with self.assertRaises(ClusterMissing) as e:
            makeStore(stompConfig("snq"))
        self.assertIn("[stomp] control_secret", str(e.exception))

    def test_selected(self):
        for stomp in ({"control_secret": SECRET},
                      {"control_allow_unsigned": True}):
            store = makeStore(stompConfig("snq", **stomp))
            self.assertIsInstance(store, StompStore)
            self.assertEqual(store.slot("a@h1"), "/queue/snq/cluster.daemon.a@h1")
        self.assertEqual(store.describe(),
                         "tcp://127.0.0.1:61613 (STOMP, queues "
                         "/queue/snq/cluster.*)")


class RabbitMQStoreMixin:
    timeout = 60
    stomp = {"control_secret": SECRET}

    def setUp(self):
        rabbitmq.requireRabbitMQ()
        self.name = rabbitmq.uniqueName()
        self.addCleanup(rabbitmq.deleteQueues, self.name)
        self.store = makeStore(stompConfig(self.name, **self.stomp),
                               clock=reactor)
        return self.store.open()

    def wire(self, slot):
        """C{slot} as a plain STOMP client names it."""
        return f"/queue/{self.name}%2Fcluster.{slot}"

    def forge(self, slot, value, signature=None):
        headers = {"x-max-length": "1"}
        if signature is not None:
            headers["snq-signature"] = signature
        rabbitmq.produce(self.wire(slot), [value.encode()], headers)


class RabbitMQStoreTests(RabbitMQStoreMixin, StoreMixin, TestCase):
    """The contract of L{StoreMixin}, and what is particular to a broker."""

    async def test_slots(self):
        """A slot per record, one message each however often written."""
        for seen in (1.0, 2.0, 3.0):
            await self.store.beat("a@h1", {"seen": seen}, 60)
        await self.store.put(pauseKey("site", "ex"), {})
        await self.store.put(pauseKey("site", "ex2"), {})
        self.assertEqual(rabbitmq.queueDepths(self.name), {
            f"{self.name}/cluster.daemon.a@h1": (1, 0),
            f"{self.name}/cluster.daemons": (1, 0),
            f"{self.name}/cluster.settings": (1, 0)})
        self.assertEqual(await self.store.daemons(), {"a@h1": {"seen": 3.0}})

    async def test_expires(self):
        """A record leaves after its ttl, and its name the index."""
        await self.store.beat("a@h1", {"seen": 1.0}, 0.2)
        await self.store.beat("b@h2", {"seen": 1.0}, 60)
        await deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(await self.store.daemons(), {"b@h2": {"seen": 1.0}})
        found = await self.store._session(
            lambda s: s.read([self.store.index]))
        self.assertEqual(found[self.store.index][0], {"names": ["b@h2"]})
        # Back at its next heartbeat.
        await self.store.beat("a@h1", {"seen": 2.0}, 60)
        self.assertEqual(sorted(await self.store.daemons()), ["a@h1", "b@h2"])

    async def test_concurrentBeats(self):
        """Daemons writing the index at once: whoever is left out is back
        after its next heartbeat."""
        names = [f"d{n}@h" for n in range(4)]
        for seen in (1.0, 2.0):
            await defer.gatherResults([self.store.beat(n, {"seen": seen}, 60)
                                       for n in names])
        for name in names:
            await self.store.beat(name, {"seen": 3.0}, 60)
        self.assertEqual(await self.store.daemons(),
                         {n: {"seen": 3.0} for n in names})

    async def test_concurrentReaders(self):
        """Readers at once each see every record, none waiting it out."""
        names = [f"d{n}@h" for n in range(4)]
        for name in names:
            await self.store.beat(name, {"seen": 1.0}, 60)
        for _ in range(3):
            started = reactor.seconds()
            views = await defer.gatherResults([self.store.daemons()
                                               for _ in range(3)])
            self.assertEqual([sorted(v) for v in views], [names] * 3)
            self.assertLess(reactor.seconds() - started, EMPTY_WAIT)

    async def test_forged(self):
        """Unsigned or wrongly signed: as if it were not there."""
        self.forge("settings", '{"pause:transport:record":{}}')
        self.assertEqual(await self.store.settings(), {})
        self.forge("settings", '{"pause:transport:record":{}}',
                   "0" * 64)
        self.assertEqual(await self.store.settings(), {})
        # Signed for another slot: refused too.
        body = b'{"names":["x@h"]}'
        self.forge("settings", body.decode(),
                   slotSignature(SECRET, self.store.index, body))
        self.assertEqual(await self.store.settings(), {})
        await self.store.put(pauseKey("site", "ex"), {"by": "me"})
        self.assertEqual(await self.store.settings(),
                         {"pause:site:ex": {"by": "me"}})

    async def test_heldByAnother(self):
        """A reader holding a slot delays another, who then gets it."""
        await self.store.put(pauseKey("site", "ex"), {})
        held = defer.Deferred()

        def hold(session):
            d = session.read([self.store.settingsSlot])
            return d.addCallback(lambda _: held)

        holding = self.store._session(hold)
        await deferLater(reactor, 0.2, lambda: None)
        other = self.store.settings()
        await deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(other.called)
        held.callback(None)
        await holding
        self.assertEqual(await other, {"pause:site:ex": {}})


class QuorumStoreTests(RabbitMQStoreMixin, StoreMixin, TestCase):
    """The contract on quorum queues ([stomp] queue_type = "quorum")."""

    stomp = {"control_secret": SECRET, "queue_type": "quorum"}

    async def test_quorum(self):
        await self.store.beat("a@h1", {"seen": 1.0}, 60)
        types = rabbitmq.rabbitmqctl("list_queues", "-q", "--no-table-headers",
                                     "name", "type")
        self.assertEqual(sorted(line.split()[1] for line in types.splitlines()
                                if line.startswith(self.name)),
                         ["quorum", "quorum"])
        self.assertEqual(await self.store.daemons(), {"a@h1": {"seen": 1.0}})


class UnsignedStoreTests(RabbitMQStoreMixin, TestCase):
    """control_allow_unsigned: a registry anyone on the broker may write."""

    stomp = {"control_allow_unsigned": True}

    async def test_unsigned(self):
        self.forge("settings", '{"pause:transport:record":{"by":"anyone"}}')
        self.assertEqual(await self.store.settings(),
                         {"pause:transport:record": {"by": "anyone"}})
        self.assertTrue(await self.store.remove("pause:transport:record"))
        self.assertEqual(await self.store.settings(), {})


class SlotBroker(FakeBroker):
    """
    The fake broker with RabbitMQ's one-message queues as the store uses
    them: a SEND replaces what a queue holds, a subscriber (prefetch 1)
    gets it after SUBSCRIBE's receipt and holds it until it ACKs or its
    connection ends, which puts it back unless a newer one came meanwhile.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        #: destination → (headers, body) ready.
        self.ready = {}
        #: (connection, subscription id) → (destination, headers, body, ack).
        self.held = {}

    def pump(self):
        super().pump()
        while self._putBack() or self._deliver():
            super().pump()

    def _handle(self, conn, frame):
        headers = frame.headers
        if frame.command == StompSpec.SEND:
            self.ready[headers["destination"]] = headers, frame.body
        elif frame.command == StompSpec.ACK:
            self.held = {k: v for k, v in self.held.items()
                         if v[3] != headers["id"]}
        super()._handle(conn, frame)

    def _putBack(self):
        back = False
        for (conn, subId), (dest, headers, body, _) in list(self.held.items()):
            if not conn.open:
                del self.held[conn, subId]
                self.ready.setdefault(dest, (headers, body))
                back = True
        return back

    def _deliver(self):
        delivered = False
        for conn in self.connections:
            for subId, (dest, _) in conn.subscriptions.items():
                if (conn.open and dest in self.ready
                        and (conn, subId) not in self.held):
                    headers, body = self.ready.pop(dest)
                    ackId = conn.deliver(dest, body, {
                        k: v for k, v in headers.items()
                        if k not in ("destination", "receipt")})
                    self.held[conn, subId] = dest, headers, body, ackId
                    delivered = True
        return delivered


class FakeBrokerStoreTests(SynchronousTestCase):
    """The store's frames and waits, on the fake broker and a Clock."""

    def setUp(self):
        self.clock = Clock()
        self.broker = SlotBroker(clock=self.clock)
        self.store = self.makeStore([self.broker])

    def makeStore(self, brokers, **stomp):
        config = stompConfig("snq", control_secret=SECRET, servers=[
            f"tcp://broker{n}:61613" for n in range(len(brokers))], **stomp)
        return StompStore(config, self.clock,
                          endpoints=[b.endpoint() for b in brokers])

    def pumped(self, d, wait=0.0):
        """Pump the broker (and wait C{wait} s) until C{d} has its result."""
        self.broker.pump()
        if wait:
            self.clock.advance(wait)
            self.broker.pump()
        return d

    def sends(self):
        return [(f.headers["destination"], f.headers, f.body)
                for f in self.broker.sent(StompSpec.SEND)]

    def test_signedSlots(self):
        self.successResultOf(self.pumped(self.store.put("reload", {"nonce": "1"}),
                                      EMPTY_WAIT))
        self.successResultOf(self.pumped(
            self.store.beat("a@h1", {"seen": 1.0}, 60), EMPTY_WAIT))
        (settings, first, _), (record, second, body), (index, third, _) = \
            self.sends()
        self.assertEqual([settings, record, index], [
            "/queue/snq%2Fcluster.settings",
            "/queue/snq%2Fcluster.daemon.a@h1", "/queue/snq%2Fcluster.daemons"])
        for headers in (first, second, third):
            self.assertEqual((headers["x-max-length"], headers["persistent"]),
                             ("1", "true"))
        self.assertNotIn("expiration", first)
        self.assertNotIn("x-queue-type", first)
        self.assertEqual(second["expiration"], "60000")
        self.assertEqual(second["snq-signature"], slotSignature(
            SECRET, "/queue/snq/cluster.daemon.a@h1", body))
        for subscribe in self.broker.sent(StompSpec.SUBSCRIBE):
            self.assertEqual((subscribe.headers["ack"],
                              subscribe.headers["prefetch-count"],
                              subscribe.headers["x-max-length"]),
                             ("client-individual", "1", "1"))
        # Read back, each slot held and put back.
        self.assertEqual(self.successResultOf(self.pumped(self.store.daemons())),
                         {"a@h1": {"seen": 1.0}})
        self.assertEqual(self.successResultOf(self.pumped(self.store.settings())),
                         {"reload": {"nonce": "1"}})
        self.assertEqual(self.broker.held, {})
        self.assertEqual(len(self.broker.ready), 3)

    def test_emptyWaits(self):
        """An empty slot is known so only after EMPTY_WAIT."""
        d = self.pumped(self.store.settings())
        self.assertNoResult(d)
        self.clock.advance(EMPTY_WAIT - 0.1)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.broker.pump()
        self.assertEqual(self.successResultOf(d), {})
        self.assertFalse(any(c.open for c in self.broker.connections))

    def test_forged(self):
        self.broker.ready["/queue/snq%2Fcluster.settings"] = (
            {"x-max-length": "1"}, b'{"pause:site:ex":{}}')
        d = self.pumped(self.store.settings())
        self.assertEqual(self.successResultOf(d), {})
        # Ignored, and put back as it was.
        self.assertIn("/queue/snq%2Fcluster.settings", self.broker.ready)

    def test_notRabbitMQ(self):
        self.broker.server = "ActiveMQ/5.17.0"
        failure = self.failureResultOf(self.pumped(self.store.settings()),
                                       NotRabbitMQ)
        self.assertIn("set [ledger] url", str(failure.value))
        self.assertEqual(self.broker.sent(StompSpec.SUBSCRIBE), [])
        self.assertFalse(any(c.open for c in self.broker.connections))

    def test_nextServer(self):
        down = SlotBroker(clock=self.clock)
        down.refuse = True
        self.store = self.makeStore([down, self.broker])
        d = self.pumped(self.store.put("reload", {"nonce": "1"}), EMPTY_WAIT)
        self.successResultOf(d)
        self.assertEqual(len(self.sends()), 1)

    def test_deadline(self):
        """A broker that stops answering: the session is aborted in time."""
        self.broker.pump()
        self.broker.holdReceipts = True
        d = self.pumped(self.store.put("reload", {"nonce": "1"}), EMPTY_WAIT)
        self.assertNoResult(d)
        self.clock.advance(self.store.deadline)
        self.broker.pump()
        self.failureResultOf(d, ConnectionLost)
        self.assertNotIn("heart-beat", self.broker.sent(StompSpec.CONNECT)[0]
                         .headers)

    def test_lostWhileReading(self):
        d = self.pumped(self.store.settings())
        self.broker.last.lose()
        self.failureResultOf(d, ConnectionLost)
