# -*- test-case-name: tests.test_ledger -*-
"""
The ledger's contract on every store: in memory on a Clock, and on the
real SQLite, PostgreSQL, MariaDB and Redis (its expiries on a Clock too,
except Redis, which expires keys by its own time).
"""

import dataclasses
import os
import sqlite3

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from snq import config as snqconfig
from snq.item import Item
from snq.ledger import LedgerMissing, LedgerService, ledgerName, makeLedger
from snq.ledger.memory import MemoryLedger
from snq.ledger.redis import RedisLedger
from snq.ledger.sql import SqlLedger
from snq.queues import makeQueue
from tests import sqlservers
from tests.test_redis import REDIS_URL, RedisFixture


def item(n):
    return Item(transport="log", payload={"n": n})


class ContractMixin:
    """What every ledger does; C{self.ledger}, C{self.clock} from setUp."""

    #: Redis expires by its own clock: those tests sleep a little instead.
    expiresOnClock = True

    @defer.inlineCallbacks
    def expire(self, seconds):
        if self.expiresOnClock:
            self.clock.advance(seconds)
        else:
            from twisted.internet import reactor
            from twisted.internet.task import deferLater

            yield deferLater(reactor, seconds, lambda: None)

    async def test_once(self):
        ledger = self.ledger
        self.assertTrue(await ledger.once("tick:1", 0.2))
        self.assertFalse(await ledger.once("tick:1", 0.2))
        self.assertTrue(await ledger.once("tick:2", 0.2))
        await self.expire(0.3)
        self.assertTrue(await ledger.once("tick:1", 0.2))

    async def test_lease(self):
        ledger = self.ledger
        self.assertTrue(await ledger.lease("feed", "a", 0.2))
        self.assertFalse(await ledger.lease("feed", "b", 0.2))
        self.assertTrue(await ledger.lease("feed", "a", 0.2), "renewed")
        await ledger.release("feed", "b")
        self.assertFalse(await ledger.lease("feed", "b", 0.2), "not b's to free")
        await ledger.release("feed", "a")
        self.assertTrue(await ledger.lease("feed", "b", 0.2))
        await self.expire(0.3)
        self.assertTrue(await ledger.lease("feed", "a", 0.2), "lapsed")

    async def test_values(self):
        ledger = self.ledger
        self.assertIsNone(await ledger.get("last"))
        await ledger.put("last", "12.5", 0.2)
        await ledger.put("last", "13.5", 0.2)
        self.assertEqual(await ledger.get("last"), "13.5")
        await self.expire(0.3)
        self.assertIsNone(await ledger.get("last"))

    async def test_longNames(self):
        name = "feedentry:blog/news:https://example.org/" + "x" * 300
        self.assertTrue(await self.ledger.once(name, 10))
        self.assertFalse(await self.ledger.once(name, 10))
        self.assertTrue(await self.ledger.once(name[:200] + "y" * 140, 10))
        self.assertLessEqual(len(ledgerName(name)), 150)


class MemoryLedgerTests(ContractMixin, TestCase):
    def setUp(self):
        self.clock = Clock()
        self.ledger = MemoryLedger(self.clock)


class EnqueueOnceMixin(ContractMixin):
    """A ledger on the queue's own store: claims and items together."""

    timeout = 60

    def config(self) -> dict:
        raise NotImplementedError

    @defer.inlineCallbacks
    def setUp(self):
        yield defer.maybeDeferred(super().setUp)
        self.clock = Clock()
        self.clock.advance(1000)
        self.snq = snqconfig.parse(self.config())
        self.queue = makeQueue(self.snq, self.clock)
        yield self.queue.open()
        self.addCleanup(self.queue.close)
        self.ledger = makeLedger(self.snq, self.queue, self.clock)
        yield self.ledger.open()
        self.addCleanup(self.ledger.close)

    async def test_enqueueOnce(self):
        ledger, queue = self.ledger, self.queue
        self.assertTrue(ledger.shared)
        new = await ledger.enqueueOnce([("e:1", item(1)), ("e:2", item(2))], 60,
                                       queue)
        self.assertEqual([i.payload for i in new], [{"n": 1}, {"n": 2}])
        new = await ledger.enqueueOnce([("e:2", item(2)), ("e:3", item(3))], 60,
                                       queue)
        self.assertEqual([i.payload for i in new], [{"n": 3}])
        self.assertEqual((await queue.depth()).ready, 3)

    async def test_enqueueOnceDelayed(self):
        await self.ledger.enqueueOnce([("d:1", item(1))], 60, self.queue, delay=30)
        depth = await self.queue.depth()
        self.assertEqual((depth.ready, depth.delayed), (0, 1))


class SqliteLedgerTests(EnqueueOnceMixin, TestCase):
    def config(self):
        return {"db": {"url": f"sqlite:///{os.path.abspath(self.mktemp())}"}}

    async def test_purge(self):
        await self.ledger.once("a", 1)
        await self.ledger.once("b", 100)
        self.clock.advance(2)
        self.assertEqual(await self.ledger.purge(), 1)

    async def test_rolledBackTogether(self):
        """An item that cannot be stored leaves its name unclaimed."""
        broken = dataclasses.replace(item(1), transport=None)
        with self.assertRaises(sqlite3.IntegrityError):
            await self.ledger.enqueueOnce([("r:1", broken)], 60, self.queue)
        self.assertTrue(await self.ledger.once("r:1", 60))


class PostgresLedgerTests(EnqueueOnceMixin, TestCase):
    def config(self):
        server = sqlservers.Postgres("snq_ledger")
        server.create()
        self.addCleanup(server.drop)
        return {"db": {"url": server.url()}}


class MariaDbLedgerTests(EnqueueOnceMixin, TestCase):
    def config(self):
        server = sqlservers.MariaDb("snq_ledger")
        server.create()
        self.addCleanup(server.drop)
        return {"db": {"url": server.url()}}


class RedisLedgerTests(EnqueueOnceMixin, RedisFixture, TestCase):
    expiresOnClock = False

    def setUp(self):
        d = self.setUpRedis()
        return d.addCallback(lambda _: EnqueueOnceMixin.setUp(self))

    def config(self):
        return {"queue": {"backend": "redis"},
                "redis": {"url": REDIS_URL, "prefix": self.prefix}}

    async def test_keys(self):
        await self.ledger.once("tick:1", 60)
        ttl = await self.redis.execute("PTTL", self.key("ledger:tick:1"))
        self.assertTrue(0 < int(ttl) <= 60000)


class ApartTests(TestCase):
    """A ledger apart from the queue: its own store, claims then items."""

    async def test_sqlLedgerForRedisQueue(self):
        path = os.path.abspath(self.mktemp())
        config = snqconfig.parse({"queue": {"backend": "stomp"},
                                  "ledger": {"url": f"sqlite:///{path}"}})
        clock = Clock()
        ledger = makeLedger(config, None, clock)
        self.assertIsInstance(ledger, SqlLedger)
        self.assertFalse(ledger.shared)
        await ledger.open()
        self.addCleanup(ledger.close)

        class Refusing:
            def enqueue(self, items, delay=0.0):
                return defer.fail(ConnectionError("broker down"))

        with self.assertRaises(ConnectionError):
            await ledger.enqueueOnce([("x:1", item(1))], 60, Refusing())
        self.assertTrue(await ledger.once("x:1", 60), "the claim was given back")

    def test_choice(self):
        redis = snqconfig.parse({"queue": {"backend": "stomp"},
                                 "ledger": {"url": REDIS_URL}})
        self.assertIsInstance(makeLedger(redis, None, Clock()), RedisLedger)
        stomp = snqconfig.parse({"queue": {"backend": "stomp"}})
        e = self.assertRaises(LedgerMissing, makeLedger, stomp, None, Clock())
        self.assertIn("set [ledger] url", str(e))


class ServiceTests(SynchronousTestCase):
    def test_openedOnceWhenFirstAsked(self):
        clock = Clock()
        opened = []

        class Counting(MemoryLedger):
            def open(self):
                opened.append(1)
                return defer.succeed(None)

        service = LedgerService(snqconfig.Config(), None, clock)
        import snq.ledger

        self.patch(snq.ledger, "makeLedger", lambda c, q, k: Counting(k))
        service.startService()
        first, second = service.ledger(), service.ledger()
        self.assertIs(self.successResultOf(first), self.successResultOf(second))
        self.assertEqual(opened, [1])
        self.successResultOf(service.stopService())
        self.assertEqual(clock.getDelayedCalls(), [])
