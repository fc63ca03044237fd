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

from snq import config as snqconfig
from snq.item import Item
from snq.queues.db import ALONE, DbQueue
from snq.queues.dialects import DIALECTS
from snq.queues.redis import RedisQueue
from snq.routing import TransportFilter
from tests import sqlservers, stall
from tests.test_redis import RedisFixture, redisConfig, waitUntil

ALL = TransportFilter()


class FloodTestsMixin:
    """The same behaviour asked of every backend."""

    timeout = 120

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        return self.openQueue()

    def items(self, n, site="a", transport="noop", **kw):
        return [Item(transport=transport, payload=i, site=site, created=0, **kw)
                for i in range(n)]

    def urgent(self, site):
        """An item of priority 5, its payload C{"urgent"}."""
        return [Item(transport="noop", payload="urgent", site=site, priority=5,
                     created=0)]

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
        yield self.queue.enqueue(self.urgent("b"))
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
        rest = yield self.claimed(10)
        self.assertEqual(rest, [("flood", i) for i in range(7, 17)])

    @defer.inlineCallbacks
    def test_weights(self):
        """A site's weight is its share of a claim while others have work."""
        yield self.configure(sites={"big": {"weight": 3}})
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
    def test_transportRateLimit(self):
        """
        A transport's bucket holds one second's worth and refills at its
        rate; what is over it stays waiting, and other transports' items
        are claimed meanwhile.
        """
        yield self.configure(transports={"noop": {"rate": "10/s"}})
        yield self.queue.enqueue(self.items(100))
        self.assertEqual(len((yield self.claimed(50))), 10, "a full bucket")
        yield self.queue.enqueue(self.items(5, transport="log", site="b"))
        self.assertEqual((yield self.claimed(50)), [("b", i) for i in range(5)])
        self.clock.advance(0.55)
        self.assertEqual(len((yield self.claimed(50))), 5)
        self.clock.advance(60)
        self.assertEqual(len((yield self.claimed(50))), 10, "one second's worth")

    @defer.inlineCallbacks
    def test_siteRateLimits(self):
        """[sites.default] rate is each site's own limit, unless it has one."""
        yield self.configure(sites={"default": {"rate": "2/s"},
                                    "big": {"rate": "120/m"},
                                    "tiny": {"rate": "1/h"}})
        for site in ("big", "a", "b", "tiny"):
            yield self.queue.enqueue(self.items(10, site=site))
        taken = [site for site, _ in (yield self.claimed(50))]
        self.assertEqual(sorted(taken), ["a", "a", "b", "b", "big", "big",
                                         "tiny"])
        self.clock.advance(1)
        taken = [site for site, _ in (yield self.claimed(50))]
        self.assertEqual(sorted(taken), ["a", "a", "b", "b", "big", "big"])

    @defer.inlineCallbacks
    def test_cancel(self):
        """
        Cancelling removes waiting items (ready, in line, delayed), by id or
        by key; a claimed one is counted, and left to finish.
        """
        def item(payload, key=None, **kw):
            return Item(transport="noop", payload=payload, key=key, created=0,
                        **kw)

        running = item("running", key="k")
        keyed = [item(n, key="k", site=f"s{n}") for n in range(3)]
        later = item("later", key="k", run_at=self.clock.seconds() + 60)
        alone = item("alone", key='"odd\\key é')
        yield self.queue.enqueue([running])
        [held] = yield self.queue.claim(1, ALL)
        yield self.queue.enqueue([*keyed, later, alone])
        # One of them runs; on Redis the claim puts the others in line.
        yield self.queue.claim(1, ALL)
        found = yield self.queue.cancel(key="k")
        self.assertEqual((found.removed, found.running), (3, 2))
        found = yield self.queue.cancel(alone.id)
        self.assertEqual((found.removed, found.running), (1, 0))
        found = yield self.queue.cancel(running.id)
        self.assertEqual((found.removed, found.running), (0, 1))
        found = yield self.queue.cancel("nosuchid")
        self.assertEqual((found.removed, found.running), (0, 0))
        self.clock.advance(120)
        self.assertEqual((yield self.claimed(10)), [])
        yield self.queue.ack(held)

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
    def configure(self, **sections):
        """As a reload gives them: the worker's claims follow."""
        self.queue.reconfigService(snqconfig.parse(sections))

    def openQueue(self):
        self.queue = DbQueue(self.server.url(), 60, clock=self.clock,
                             claimant="a")
        self.addCleanup(self.queue.close)
        return self.queue.open()

    @defer.inlineCallbacks
    def test_turnsOnceTheQueueIsCrowded(self):
        """
        After a claim that took all there was, the next is a plain one (an
        idle worker's stays one statement); once a claim leaves items
        behind, the turns begin: another site waits one claim more.
        """
        self.assertEqual((yield self.claimed(10)), [])
        yield self.queue.enqueue(self.items(500, site="flood"))
        yield self.queue.enqueue(self.items(3, site="quiet"))
        self.assertEqual((yield self.claimed(10)), [("flood", i) for i in range(10)])
        self.assertEqual(len([s for s, _ in (yield self.claimed(10))
                              if s == "quiet"]), 3)

    @defer.inlineCallbacks
    def test_loneFloodLooksForOthersNowAndThen(self):
        """
        Claims that found a single site with work do not look for others
        again for ALONE seconds: another site's item waits that much more.
        """
        yield self.queue.enqueue(self.items(500, site="flood"))
        yield self.claimed(10)
        yield self.queue.enqueue(self.items(1, site="quiet"))
        self.assertNotIn("quiet", {s for s, _ in (yield self.claimed(10))})
        self.clock.advance(ALONE)
        self.assertIn(("quiet", 0), (yield self.claimed(10)))

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
        self.assertEqual(self.server.count("queue_bucket"), 0)
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


class RedisFloodTests(RedisFixture, FloodTestsMixin, TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        yield self.setUpRedis()
        yield super().setUp()

    def openQueue(self, **sections):
        self.queue = RedisQueue(redisConfig(self.prefix, **sections),
                                clock=self.clock, claimant="a")
        self.addCleanup(self.queue.close)
        return self.queue.open()

    def configure(self, **sections):
        """As a reload gives them: every worker's claims follow."""
        self.queue.reconfigService(redisConfig(self.prefix, **sections))
        return waitUntil(lambda: self.redis.execute("HLEN", self.key("limits")),
                         what="the limits to be written")

    @defer.inlineCallbacks
    def test_linesExistOnlyWhileTheyHoldItems(self):
        """
        A site costs keys only while it has items waiting: once its items
        are claimed, nothing of it is left but what is being processed.
        """
        for n in range(20):
            yield self.queue.enqueue(self.items(2, site=f"s{n}", priority=n % 3))
        yield self.queue.claim(10)
        self.assertGreater(len((yield self.keys())), 3)
        while (yield self.queue.claim(10)):
            pass
        self.assertEqual((yield self.keys()), [self.key("processing")])

    @defer.inlineCallbacks
    def test_newestInLineBehindABacklog(self):
        """
        Items pushed behind a backlog longer than a claim sorts are in line
        at the next claim, not once the backlog is sorted.
        """
        for _ in range(5):
            yield self.queue.enqueue(self.items(1000))
        yield self.queue.enqueue(self.items(1, site="b"))
        yield self.queue.enqueue(self.urgent("a"))
        first = yield self.claimed(4)
        self.assertEqual(first[0], ("a", "urgent"))
        self.assertIn(("b", 0), first)

    @defer.inlineCallbacks
    def test_framesOfAnyShapeInTheirLines(self):
        """
        snq's frames are read off their start; any other order or spelling
        is decoded, and a priority inside the payload is not the item's.
        """
        yield self.queue.enqueue([
            Item(transport="noop", payload="p-3", priority=-3, created=0),
            Item(transport="noop", payload="p5", priority=5, created=0),
            Item(transport="noop", payload="p6", site="été", priority=6,
                 created=0)])
        for frame in (b'{"payload":{"priority":99},"transport":"noop",'
                      b'"site":"a","priority":7,"v":1,"id":"r7"}',
                      b'{"v":1,"id":"r2","site":"\\u0061","transport":"noop",'
                      b'"priority":2,"payload":"p2"}'):
            yield self.redis.execute("LPUSH", self.key("q:main"), frame)
        first = yield self.queue.claim(1)
        self.assertEqual(Item.fromJSON(first[0].frame).priority, 7)
        lines = [k for k in (yield self.keys()) if ":line:" in k]
        self.assertEqual(lines, [self.key(f"line:main/{p}/noop/{site}") for
                                 p, site in (("-3", "default"), ("2", "a"),
                                             ("5", "default"), ("6", "été"))])
        claimed = yield self.queue.claim(10)
        self.assertEqual([Item.fromJSON(d.frame).priority for d in claimed],
                         [6, 5, 2, -3])

    @defer.inlineCallbacks
    def keys(self):
        keys = yield self.redis.execute("KEYS", self.prefix + "*")
        return sorted(k.decode() if isinstance(k, bytes) else k for k in keys)

    @defer.inlineCallbacks
    def test_rateLimitedWorkerWakesWhenATokenIsDue(self):
        """
        A claim that found only rate-limited items says when the next one
        may go: the worker sleeps until then instead of polling.
        """
        yield self.configure(transports={"noop": {"rate": "4/s"}})
        yield self.queue.enqueue(self.items(10))
        self.assertEqual(len((yield self.claimed(10))), 4)
        self.assertEqual((yield self.claimed(10)), [])
        self.assertAlmostEqual(self.queue.nextDue - self.clock.seconds(), 0.25,
                               places=3)

    @defer.inlineCallbacks
    def test_badFrameClaimedAsIs(self):
        """A frame that is no envelope is claimed (to be dead-lettered)."""
        for frame in (b"not json", b'{"transport": "a/b"}', b"[1]"):
            yield self.redis.execute("LPUSH", self.key("q:main"), frame)
        yield self.queue.enqueue(self.items(1))
        claimed = yield self.queue.claim(10)
        self.assertEqual(sorted(d.frame for d in claimed)[:3],
                         [b'[1]', b'not json', b'{"transport": "a/b"}'])
        self.assertEqual(len(claimed), 4)


class RateDaemonMixin(stall.PoolDaemonMixin):
    """A rate limit held by a real daemon's workers together."""

    @defer.inlineCallbacks
    def test_fourWorkersHoldTheRate(self):
        """
        Four workers on a transport limited to 50/s start 50 ± 5 items a
        second between them, after the first second's worth.
        """
        self.daemon(workers=4, more='\n[transports.stamp]\nrate = "50/s"\n')
        yield self.running(4)
        yield self.backend.put([stall.frame() for _ in range(800)])
        yield waitUntil(lambda: len(self.starts()) >= 50 + 50 * 8, timeout=60,
                        what="eight seconds of items")
        first = min(self.starts())
        window = [t for t in self.starts() if first + 2 <= t < first + 8]
        rate = len(window) / 6
        print(f"\n{self.backend.name}: {rate:.1f} items/s over 6 s")
        self.assertTrue(45 <= rate <= 55, rate)
        self.assertEqual({a for _, _, a, _, _ in stall.stamps(self.dir)}, {0},
                         "no attempt charged")

    def starts(self):
        return [t for _, _, _, what, t in stall.stamps(self.dir)
                if what == "start"]


class SqliteRateTests(RateDaemonMixin, TestCase):
    backendClass = stall.SqliteBackend


class PostgresRateTests(RateDaemonMixin, TestCase):
    backendClass = stall.PostgresBackend


class RedisRateTests(RateDaemonMixin, TestCase):
    backendClass = stall.RedisBackend
