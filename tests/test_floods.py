# -*- test-case-name: tests.test_floods -*-
"""
Flood control on the real servers, at the queue: priorities first, sites
taking turns on a shared queue (by weight, per transport), and a version 1
SQL schema upgraded in place.
"""

import os

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from snq.item import Item
from snq.queues.db import DbQueue
from snq.queues.dialects import DIALECTS
from snq.routing import TransportFilter
from tests import sqlservers

ALL = TransportFilter()


class FloodTestsMixin:
    """The same behaviour asked of every backend."""

    timeout = 120

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.weights = {}
        return self.openQueue()

    def weight(self, site):
        return self.weights.get(site, 1)

    def items(self, n, site="a", transport="noop", **kw):
        return [Item(transport=transport, payload=i, site=site, created=0, **kw)
                for i in range(n)]

    @defer.inlineCallbacks
    def claimed(self, limit):
        """One claim of C{limit} → (site, payload) in the order given."""
        deliveries = yield self.queue.claim(limit, ALL)
        items = [Item.fromJSON(d.frame) for d in deliveries]
        return [(i.site, i.payload) for i in items]

    @defer.inlineCallbacks
    def test_oneSiteAloneInOrder(self):
        yield self.queue.enqueue(self.items(30))
        self.assertEqual((yield self.claimed(10)), [("a", i) for i in range(10)])

    @defer.inlineCallbacks
    def test_urgentItemBeforeTheBacklog(self):
        """
        An item of a higher priority comes first out of a backlog of lower
        ones, its own site's or others'.
        """
        yield self.queue.enqueue(self.items(300))
        yield self.queue.enqueue(self.items(300, site="b"))
        yield self.queue.enqueue([Item(transport="noop", payload="urgent",
                                       site="b", priority=5, created=0)])
        first = yield self.claimed(3)
        self.assertEqual(first[0], ("b", "urgent"))

    @defer.inlineCallbacks
    def test_sitesTakeTurns(self):
        """
        A site flooding the queue delays another's items by one claim: each
        claim serves every site with work.
        """
        yield self.queue.enqueue(self.items(500, site="flood"))
        yield self.queue.enqueue(self.items(3, site="quiet"))
        first = yield self.claimed(10)
        self.assertEqual(sorted(first)[7:], [("quiet", 0), ("quiet", 1),
                                             ("quiet", 2)])
        self.assertEqual(first[:2], [("flood", 0), ("quiet", 0)])
        rest = yield self.claimed(10)
        self.assertEqual(rest, [("flood", i) for i in range(7, 17)])

    @defer.inlineCallbacks
    def test_weights(self):
        """A site's weight is its share of a claim while others have work."""
        self.weights["big"] = 3
        for site in ("big", "one", "two"):
            yield self.queue.enqueue(self.items(100, site=site))
        for _ in range(3):
            taken = yield self.claimed(10)
            counts = {s: sum(1 for t, _ in taken if t == s)
                      for s in ("big", "one", "two")}
            self.assertEqual(counts, {"big": 6, "one": 2, "two": 2})

    @defer.inlineCallbacks
    def test_turnsPerTransport(self):
        """The turns go by transport and site: one site's transports too."""
        yield self.queue.enqueue(self.items(100, transport="noop"))
        yield self.queue.enqueue(self.items(2, transport="log"))
        deliveries = yield self.queue.claim(6, ALL)
        transports = [Item.fromJSON(d.frame).transport for d in deliveries]
        self.assertEqual(transports.count("log"), 2)

    @defer.inlineCallbacks
    def test_manySitesEachClaimServesOthers(self):
        """
        More sites with work than a claim holds: the next claim goes on
        where the last stopped, so every site is served in turn.
        """
        for n in range(30):
            yield self.queue.enqueue(self.items(5, site=f"s{n:02d}"))
        seen = set()
        for _ in range(3):
            seen.update(site for site, _ in (yield self.claimed(10)))
        self.assertEqual(len(seen), 30)


class DbFloodMixin(FloodTestsMixin):
    def openQueue(self):
        self.queue = DbQueue(self.server.url(), 60, clock=self.clock,
                             claimant="a", weight=self.weight)
        self.addCleanup(self.queue.close)
        return self.queue.open()

    @defer.inlineCallbacks
    def test_versionOneSchemaUpgradedInPlace(self):
        """
        A database made by snq with schema version 1, with items waiting,
        is brought to the newest version by the next worker to start, and
        its items are claimed as before.
        """
        yield self.queue.close()
        self.server.drop()
        self.server.create()
        dialect = DIALECTS[self.server.scheme]()
        conn = self.server.connect()
        try:
            cursor = conn.cursor()
            for statement in dialect.schema[0]:
                cursor.execute(statement)
            cursor.execute("CREATE TABLE snq_schema (version INTEGER NOT NULL)")
            cursor.execute("INSERT INTO snq_schema (version) VALUES (1)")
            conn.commit()
        finally:
            conn.close()
        old = [i.toJSON().decode() for i in self.items(3, site="old")]
        self.server.insertMany([(f, "noop", "old", 0, 0) for f in old])
        yield self.openQueue()
        self.assertEqual(self.server.sql("SELECT version FROM snq_schema"),
                         [(len(dialect.schema),)])
        self.assertIn("queue_item_site", self.server.indexes())
        yield self.queue.enqueue(self.items(2, site="new"))
        self.assertEqual(sorted((yield self.claimed(10))), [
            ("new", 0), ("new", 1), ("old", 0), ("old", 1), ("old", 2)])


class SqliteFloodTests(DbFloodMixin, TestCase):
    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.server = sqlservers.Sqlite(directory)
        self.addCleanup(self.server.drop)
        return super().setUp()


class PostgresFloodTests(DbFloodMixin, TestCase):
    def setUp(self):
        self.server = sqlservers.forTest(self, sqlservers.Postgres)
        return super().setUp()


class MariaDbFloodTests(DbFloodMixin, TestCase):
    def setUp(self):
        self.server = sqlservers.forTest(self, sqlservers.MariaDb)
        return super().setUp()
