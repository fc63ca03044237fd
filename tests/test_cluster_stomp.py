# -*- test-case-name: tests.test_cluster_stomp -*-
"""
The cluster's registry on a RabbitMQ broker alone (no [ledger] url): the
store's contract, expiry, forged messages ignored and a slot read by two
at once, on the real RabbitMQ.
"""

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from snq import config as snqconfig
from snq.cluster import ClusterMissing, makeStore, pauseKey
from snq.cluster.stomp import StompStore, slotSignature
from tests import rabbitmq
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


class UnsignedStoreTests(RabbitMQStoreMixin, TestCase):
    """control_allow_unsigned: a registry anyone on the broker may write."""

    stomp = {"control_allow_unsigned": True}

    async def test_unsigned(self):
        self.forge("settings", '{"pause:transport:record":{"by":"anyone"}}')
        self.assertEqual(await self.store.settings(),
                         {"pause:transport:record": {"by": "anyone"}})
        self.assertTrue(await self.store.remove("pause:transport:record"))
        self.assertEqual(await self.store.settings(), {})
