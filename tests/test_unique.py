# -*- test-case-name: tests.test_unique -*-
"""
Unique items (C{[transports.NAME] unique}) on the real SQL servers and
Redis: a keyed item dropped or replacing the one waiting, a running one
counted when configured, two producers racing for one key, the worker's
enqueue and the producer's answers; on SQL a version 4 schema upgraded in
place, on Redis the key index following an item through every move; and
the config refusing unique items where the backend cannot keep them.
"""

import io
import json
import os
import threading
import time

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from snq import config as snqconfig
from snq.client import Producer
from snq.client.resp import RespConnection, command
from snq.client.wire import Wire
from snq.handlers.context import HandlerContext
from snq.item import Item
from snq.ledger import makeLedger
from snq.queues.db import DbQueue
from snq.queues.dialects import DIALECTS
from snq.queues.interface import Cancelled
from snq.queues.redis import RedisQueue
from snq.redis.address import RedisAddress
from snq.routing import TransportFilter
from snq.scripts import snqctl
from snq.stats import Stats
from tests import sqlservers
from tests.test_redis import REDIS_URL, RedisFixture

ALL = TransportFilter()


class UniqueMixin:
    """The contract on any backend that keeps items unique: its classes
    give C{backend()} (the config's sections), C{openQueue()} (the
    worker's queue, as C{self.queue}) and C{waiting()}."""

    timeout = 120

    def setUp(self):
        return self.openQueue()

    def configure(self, **transports):
        """[transports] as given: "drop", "replace", or either and "running"
        (running items count too)."""
        table = {}
        for name, mode in transports.items():
            unique, _, running = mode.partition(" ")
            table[name] = {"unique": unique, "unique_running": bool(running)}
        self.config = snqconfig.parse({**self.backend(), "transports": table})
        self.queue.reconfigService(self.config)

    def producer(self):
        producer = Producer(config=self.config)
        self.addCleanup(producer.close)
        return producer

    @defer.inlineCallbacks
    def claimed(self):
        deliveries = yield self.queue.claim(100, ALL)
        return deliveries, [Item.fromJSON(d.frame) for d in deliveries]

    def test_drop(self):
        """A second item with the key of one waiting is not stored: the
        producer gets None instead of an id."""
        self.configure(u="drop")
        producer = self.producer()
        first = producer.enqueue("u", 1, key="k")
        self.assertIsNotNone(first)
        self.assertIsNone(producer.enqueue("u", 2, key="k"))
        self.assertIsNotNone(producer.enqueue("u", 3, key="other"))
        self.assertEqual(self.waiting(), [(1, "k"), (3, "other")])

    @defer.inlineCallbacks
    def test_replace(self):
        """A second item takes the waiting one's place: its payload, id,
        priority and due time, in the same row."""
        self.configure(u="replace")
        producer = self.producer()
        producer.enqueue("u", 1, key="k", delay=3600)
        second = producer.enqueue("u", 2, key="k", priority=5)
        self.assertIsNotNone(second)
        self.assertEqual(self.waiting(), [(2, "k")])
        _, [item] = yield self.claimed()
        self.assertEqual((item.id, item.payload, item.priority), (second, 2, 5))

    def test_withoutUniqueKeysAreOnlyCarried(self):
        """A transport without unique takes every item, keyed or not; a
        unique one every item without a key."""
        self.configure(u="drop")
        producer = self.producer()
        ids = [producer.enqueue("plain", n, key="k") for n in range(2)]
        ids += [producer.enqueue("u", n) for n in range(2)]
        self.assertNotIn(None, ids)
        self.assertEqual(len(self.waiting()), 4)

    def test_oneBatch(self):
        """In one enqueue_many the first item with a key is taken."""
        self.configure(u="drop")
        ids = self.producer().enqueue_many("u", [1, 2, 3], keys=["k", "k", None])
        self.assertEqual([i is None for i in ids], [False, True, False])
        self.assertEqual(self.waiting(), [(1, "k"), (3, None)])

    @defer.inlineCallbacks
    def test_runningCountsWhenConfigured(self):
        """
        A running item does not count by default: a new one waits behind
        it.  With unique_running it does, until acknowledged, and is never
        replaced.
        """
        self.configure(u="drop")
        producer = self.producer()
        producer.enqueue("u", 1, key="k")
        [first], _ = yield self.claimed()
        self.assertIsNotNone(producer.enqueue("u", 2, key="k"))
        self.assertEqual(self.waiting(), [(2, "k")])
        [second], _ = yield self.claimed()
        for mode in ("drop running", "replace running"):
            self.configure(u=mode)
            producer = self.producer()
            self.assertIsNone(producer.enqueue("u", 3, key="k"))
        self.assertEqual(self.waiting(), [])
        yield defer.gatherResults([self.queue.ack(first), self.queue.ack(second)])
        self.assertIsNotNone(producer.enqueue("u", 4, key="k"))
        self.assertEqual(self.waiting(), [(4, "k")])

    @defer.inlineCallbacks
    def test_workerEnqueue(self):
        """The daemon's own enqueue (a handler's, snqctl's) answers whether
        each item was taken."""
        self.configure(u="drop")
        items = [Item(transport="u", payload=n, key="k") for n in range(2)]
        self.assertEqual((yield self.queue.enqueue(items)), [True, False])
        self.assertEqual(self.waiting(), [(0, "k")])

    @defer.inlineCallbacks
    def test_ledgerEnqueueOnce(self):
        """The ledger's enqueue with its claims (an IoManager's, in the
        queue's own store) keeps keyed items unique too; their names are
        claimed all the same."""
        self.configure(u="drop")
        ledger = makeLedger(self.config, self.queue)
        yield ledger.open()
        self.addCleanup(ledger.close)
        entries = [(f"n{n}", Item(transport="u", payload=n, key="k"))
                   for n in range(2)]
        new = yield ledger.enqueueOnce(entries, 60, self.queue)
        self.assertEqual([item.payload for item in new], [0, 1])
        self.assertEqual(self.waiting(), [(0, "k")])
        self.assertEqual((yield ledger.enqueueOnce(entries, 60, self.queue)), [])

    @defer.inlineCallbacks
    def test_handlerEnqueue(self):
        """What a handler's enqueueItems stored is counted as enqueued,
        what was dropped is not (it fires with None, which a handler may
        return)."""
        self.configure(u="drop")
        stats = Stats()
        context = HandlerContext(self.config, self.queue, stats, reactor)
        items = [Item(transport="u", payload=n, key="k") for n in range(3)]
        self.assertIsNone((yield context.enqueueItems(items)))
        self.assertEqual(self.waiting(), [(0, "k")])
        self.assertEqual(stats.counts[("enqueued", "u", "default")], 1)

    @defer.inlineCallbacks
    def test_concurrentEnqueues(self):
        """Two producers enqueueing one key at once: exactly one is taken,
        round after round."""
        self.configure(u="drop")
        producers = [self.producer(), self.producer()]
        rounds = 15
        barrier = threading.Barrier(2, timeout=60)

        def race(producer):
            taken = []
            for n in range(rounds):
                barrier.wait()
                taken.append(producer.enqueue("u", n, key=f"k{n}") is not None)
            return taken

        results = yield defer.gatherResults(
            [threads.deferToThread(race, p) for p in producers])
        self.assertEqual([a + b for a, b in zip(*results, strict=True)],
                         [1] * rounds)
        self.assertEqual(len(self.waiting()), rounds)

    @defer.inlineCallbacks
    def test_concurrentReplaces(self):
        """Two producers replacing one key at once: one item waits, the
        last one taken."""
        self.configure(u="replace")
        producers = [self.producer(), self.producer()]

        def replace(producer, start):
            return [producer.enqueue("u", n, key="k")
                    for n in range(start, start + 20)]

        yield defer.gatherResults(
            [threads.deferToThread(replace, p, 100 * n)
             for n, p in enumerate(producers)])
        self.assertIn(self.waiting(), ([(19, "k")], [(119, "k")]))


class SqlUniqueMixin(UniqueMixin):
    def backend(self):
        return {"db": {"url": self.server.url()}}

    def openQueue(self):
        # On the wall clock: the producer's items are due by it.
        self.queue = DbQueue(self.server.url(), 60, claimant="a")
        self.addCleanup(self.queue.close)
        return self.queue.open()

    def waiting(self):
        """(payload, key) of the rows not claimed, oldest first."""
        rows = self.server.sql("SELECT frame FROM queue_item WHERE claimed_by"
                               " IS NULL ORDER BY id")
        items = [json.loads(frame) for (frame,) in rows]
        return [(i["payload"], i.get("key")) for i in items]

    def test_applicationTransactionRefused(self):
        """connection= cannot check for another item: a keyed item of a
        unique transport is refused there, others go as before."""
        self.configure(u="drop")
        conn = self.server.connect()
        self.addCleanup(conn.close)
        producer = self.producer()
        self.assertRaises(ValueError, producer.enqueue, "u", 1, key="k",
                          connection=conn)
        self.assertIsNotNone(producer.enqueue("u", 1, connection=conn))

    @defer.inlineCallbacks
    def test_versionFourSchemaUpgradedInPlace(self):
        """A database at schema version 4 with a keyed item waiting gets
        the key column; the old item (no item_key) does not count."""
        yield self.queue.close()
        self.server.drop()
        self.server.create()
        dialect = DIALECTS[self.server.scheme]()
        conn = self.server.connect()
        try:
            cursor = conn.cursor()
            for step in dialect.schema[:4]:
                for statement in step:
                    if callable(statement):
                        statement(cursor)
                    else:
                        cursor.execute(statement)
            cursor.execute("CREATE TABLE snq_schema (version INTEGER NOT NULL)")
            cursor.execute("INSERT INTO snq_schema (version) VALUES (4)")
            conn.commit()
        finally:
            conn.close()
        old = Item(transport="u", payload=0, key="k", created=0).toJSON().decode()
        self.server.insertMany([(old, "u", "default", 0, 0)])
        yield self.openQueue()
        self.assertEqual(self.server.sql("SELECT version FROM snq_schema"),
                         [(5,)])
        self.assertIn("queue_item_key", self.server.indexes())
        self.configure(u="drop")
        producer = self.producer()
        self.assertIsNotNone(producer.enqueue("u", 1, key="k"))
        self.assertIsNone(producer.enqueue("u", 2, key="k"))
        self.assertEqual(self.waiting(), [(0, "k"), (1, "k")])


class SqliteUniqueTests(SqlUniqueMixin, TestCase):
    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.server = sqlservers.Sqlite(directory)
        self.addCleanup(self.server.drop)
        return super().setUp()

    @defer.inlineCallbacks
    def test_snqctl(self):
        """snqctl enqueue --key prints the id, or that it was not taken."""
        path = os.path.join(os.path.dirname(self.server.path), "snq.toml")
        with open(path, "w") as f:
            f.write(f'[db]\nurl = "{self.server.url()}"\n'
                    '[transports.u]\nunique = "drop"\n')
        first, second = yield snqctlTwice(path)
        self.assertEqual(self.server.sql("SELECT item_key FROM queue_item"),
                         [("k",)])
        self.assertEqual(len(first), 32)
        self.assertEqual(second,
                         "not enqueued: an item with key 'k' is already on u")


@defer.inlineCallbacks
def snqctlTwice(path):
    """What C{snqctl enqueue u N --key k} prints, N = 1 then 2, with the
    config at C{path}."""
    printed = []
    for payload in ("1", "2"):
        out = io.StringIO()
        args = snqctl.parser().parse_args(["-c", path, "enqueue", "u", payload,
                                           "--key", "k"])
        yield snqctl.run(reactor, args, out=out, stdin=io.StringIO(""))
        printed.append(out.getvalue().strip())
    return printed


class PostgresUniqueTests(SqlUniqueMixin, TestCase):
    def setUp(self):
        self.server = sqlservers.forTest(self, sqlservers.Postgres)
        return super().setUp()


class MariaDbUniqueTests(SqlUniqueMixin, TestCase):
    def setUp(self):
        self.server = sqlservers.forTest(self, sqlservers.MariaDb)
        return super().setUp()


class RedisUniqueTests(RedisFixture, UniqueMixin, TestCase):
    """
    On Redis; and the key index (C{<prefix>keys:<transport>}) following an
    item through every move of the Lua scripts: what a move forgot would
    drop a new item for ever, or let a second one wait.
    """

    @defer.inlineCallbacks
    def setUp(self):
        yield self.setUpRedis()
        self.sync = RespConnection(Wire("127.0.0.1", 6379, 5.0),
                                   RedisAddress.fromURL(REDIS_URL), "snqtest")
        self.addCleanup(self.sync.close)
        yield super().setUp()

    def backend(self):
        return {"queue": {"backend": "redis", "lease": 60},
                "redis": {"url": REDIS_URL, "prefix": self.prefix}}

    def openQueue(self):
        # On the wall clock: the producer's items are due by it.
        self.queue = RedisQueue(snqconfig.parse(self.backend()), claimant="a")
        self.addCleanup(self.queue.close)
        # A reload's write of the rate limits is answered before the close.
        self.addCleanup(lambda: self.queue.connection.execute("PING"))
        return self.queue.open()

    def do(self, *args):
        return self.sync.execute(command(*args))

    def waiting(self):
        """(payload, key) of the items in the list, its lines and its
        delayed set, oldest first."""
        frames = [f for f in reversed(self.do("LRANGE", self.key("q:main"), 0, -1))
                  if f != b"\0"]
        for line in sorted(self.do("KEYS", self.key("line:main/*"))):
            frames += reversed(self.do("LRANGE", line, 0, -1))
        frames += [m.split(b"\n", 1)[1] for m in
                   self.do("ZRANGE", self.key("delayed:main"), 0, -1)]
        items = sorted((json.loads(f) for f in frames), key=lambda i: i["created"])
        return [(i["payload"], i.get("key")) for i in items]

    def entry(self, key="k"):
        """Where the index of transport u has the item with C{key}: "q"
        ready, "d" delayed, "r" held, None not indexed."""
        entry = self.do("HGET", self.key("keys:u"), key)
        return None if entry is None else entry[:1].decode()

    def held(self, delivery):
        self.assertEqual(self.do("HGET", self.key("keys:u"), "k"),
                         b"r" + delivery.token.member)

    @defer.inlineCallbacks
    def test_snqctl(self):
        """snqctl enqueue --key prints the id, or that it was not taken."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(f'[queue]\nbackend = "redis"\n'
                    f'[redis]\nurl = "{REDIS_URL}"\nprefix = "{self.prefix}"\n'
                    '[transports.u]\nunique = "drop"\n')
        first, second = yield snqctlTwice(path)
        self.assertEqual(len(first), 32)
        self.assertEqual(second,
                         "not enqueued: an item with key 'k' is already on u")
        self.assertEqual(self.entry(), "q")

    @defer.inlineCallbacks
    def test_throughLines(self):
        """
        Sorted into its line by a claim, an item is still found: a new one
        is dropped against it, or replaces it there, or, with another
        priority, takes it out of its line, which goes with its priority
        when emptied.  Claimed, it is held; acknowledged, not indexed.
        """
        self.configure(u="drop")
        producer = self.producer()
        producer.enqueue("u", 1, key="k")
        self.assertEqual((yield self.queue.claim(0)), [])
        self.assertEqual(self.do("LLEN", self.key("q:main")), 0, "in its line")
        self.assertIsNone(producer.enqueue("u", 2, key="k"))
        self.configure(u="replace")
        producer = self.producer()
        self.assertIsNotNone(producer.enqueue("u", 3, key="k"))
        [frame] = self.do("LRANGE", self.key("line:main/0/u/default"), 0, -1)
        self.assertEqual(json.loads(frame)["payload"], 3, "replaced in its line")
        newest = producer.enqueue("u", 4, key="k", priority=5)
        self.assertEqual(self.waiting(), [(4, "k")])
        self.assertEqual(self.do("ZRANGE", self.key("levels:main"), 0, -1), [],
                         "the emptied line is gone")
        [d], [item] = yield self.claimed()
        self.assertEqual((item.id, item.payload, item.priority), (newest, 4, 5))
        self.held(d)
        yield self.queue.ack(d)
        self.assertIsNone(self.entry())
        self.assertEqual(self.do("EXISTS", self.key("keys:u")), 0)

    @defer.inlineCallbacks
    def test_throughRetry(self):
        """A retry waits in the delayed set, indexed there (and replaced
        there); fallen due, it is claimed and held again."""
        self.configure(u="drop")
        producer = self.producer()
        producer.enqueue("u", 1, key="k")
        [d], [item] = yield self.claimed()
        yield self.queue.retry(d, item.retried(), 3600, "later")
        self.assertEqual(self.entry(), "d")
        self.assertIsNone(producer.enqueue("u", 2, key="k"))
        self.configure(u="replace")
        self.assertIsNotNone(self.producer().enqueue("u", 3, key="k", delay=1800))
        self.assertEqual(self.waiting(), [(3, "k")])
        self.assertEqual(self.do("ZCARD", self.key("delayed:main")), 1)
        self.assertEqual(self.entry(), "d")
        self.assertIsNotNone(self.producer().enqueue("u", 4, key="k"))
        self.assertEqual(self.waiting(), [(4, "k")])
        self.assertEqual(self.do("ZCARD", self.key("delayed:main")), 0)
        [d], [item] = yield self.claimed()
        yield self.queue.retry(d, item.retried(), 0, "at once")
        [again], [item] = yield self.claimed()
        self.assertEqual((item.payload, item.attempts), (4, 1))
        self.held(again)

    @defer.inlineCallbacks
    def test_throughRelease(self):
        """Given back unstarted, an item waits indexed again."""
        self.configure(u="drop")
        producer = self.producer()
        producer.enqueue("u", 1, key="k")
        [d], _ = yield self.claimed()
        self.held(d)
        yield self.queue.release([d])
        self.assertEqual(self.entry(), "q")
        self.assertIsNone(producer.enqueue("u", 2, key="k"))
        [d], _ = yield self.claimed()
        self.held(d)

    @defer.inlineCallbacks
    def test_throughReaper(self):
        """A dead worker's items (an expired lease, or its claims returned
        by its master) wait indexed again, one attempt more."""
        self.configure(u="drop running")
        producer = self.producer()
        producer.enqueue("u", 1, key="k")
        [d], _ = yield self.claimed()
        self.assertIsNone(producer.enqueue("u", 2, key="k"), "running counts")
        self.assertEqual((yield self.queue.reap(time.time() + 61)), 1)
        self.assertEqual(self.entry(), "q")
        self.assertIsNone(producer.enqueue("u", 3, key="k"))
        [d], [item] = yield self.claimed()
        self.assertEqual((item.payload, item.attempts), (1, 1))
        self.held(d)
        self.assertEqual((yield self.queue.returnClaims("a", {b"nothing"})),
                         (1, 0))
        self.assertEqual(self.entry(), "q")
        self.assertEqual(self.waiting(), [(1, "k")])

    @defer.inlineCallbacks
    def test_buryAndResurrect(self):
        """A dead letter is not indexed, nor is it when put back (as on
        SQL): it comes back beside what waits."""
        self.configure(u="drop running")
        producer = self.producer()
        producer.enqueue("u", 1, key="k")
        [d], _ = yield self.claimed()
        yield self.queue.deadLetter(d, "rejected", "no", 0)
        self.assertIsNone(self.entry())
        self.assertIsNotNone(producer.enqueue("u", 2, key="k"))
        self.assertEqual((yield self.queue.deadRetry()), 1)
        self.assertEqual(self.waiting(), [(1, "k"), (2, "k")])
        self.assertEqual(self.entry(), "q")

    @defer.inlineCallbacks
    def test_cancel(self):
        """A cancelled item leaves the index, from the list, a line or the
        delayed set; what is cancelled by id too."""
        self.configure(u="drop")
        producer = self.producer()
        producer.enqueue("u", 1, key="line")
        yield self.queue.claim(0)
        producer.enqueue("u", 2, key="delayed", delay=3600)
        third = producer.enqueue("u", 3, key="list")
        for key in ("line", "delayed"):
            self.assertEqual((yield self.queue.cancel(key=key)), Cancelled(1, 0))
        self.assertEqual((yield self.queue.cancel(third)), Cancelled(1, 0))
        self.assertEqual(self.do("EXISTS", self.key("keys:u")), 0)
        for key in ("line", "delayed", "list"):
            self.assertIsNotNone(producer.enqueue("u", 4, key=key))

    @defer.inlineCallbacks
    def test_producerSendsAMissingScript(self):
        """After a SCRIPT FLUSH, a producer's keyed enqueue sends the
        script itself (as the worker's queue does)."""
        self.configure(u="drop")
        # The reload's write of the rate limits done before the flush.
        yield self.queue.connection.execute("PING")
        producer = self.producer()
        self.assertIsNotNone(producer.enqueue("u", 1, key="k"))
        self.do("SCRIPT", "FLUSH")
        self.assertIsNone(producer.enqueue("u", 2, key="k"))
        self.assertIsNotNone(producer.enqueue("u", 3, key="j"))

    def test_notLookedUp(self):
        """A keyed frame pushed with a plain LPUSH is not in the index, nor
        counts an entry whose item went by other means (a DEL)."""
        self.configure(u="drop")
        frame = Item(transport="u", payload=0, key="k").toJSON()
        self.do("LPUSH", self.key("q:main"), frame)
        producer = self.producer()
        self.assertIsNotNone(producer.enqueue("u", 1, key="k"))
        self.assertEqual(self.waiting(), [(0, "k"), (1, "k")])
        self.do("DEL", self.key("q:main"))
        self.assertIsNotNone(producer.enqueue("u", 2, key="k"))
        self.assertEqual(self.waiting(), [(2, "k")])

    @defer.inlineCallbacks
    def test_breakoutAndPlainItemsInOneBatch(self):
        """The worker's enqueue: a batch of keyed, plain and delayed items
        to a breakout list and a group list at once."""
        self.config = snqconfig.parse({
            **self.backend(), "queue": {"backend": "redis",
                                        "breakout": ["main/u"]},
            "transports": {"u": {"unique": "drop"}}})
        self.queue.reconfigService(self.config)
        items = [Item(transport="u", payload=0, key="k"),
                 Item(transport="log", payload=1, key="k"),
                 Item(transport="u", payload=2, key="k", run_at=time.time() + 60),
                 Item(transport="u", payload=3)]
        self.assertEqual((yield self.queue.enqueue(items)),
                         [True, True, False, True])
        self.assertEqual(self.do("LLEN", self.key("q:main/u")), 2)
        self.assertEqual(self.do("LLEN", self.key("q:main")), 1)


class ConfigTests(TestCase):
    def parse(self, backend, **transport):
        return snqconfig.parse({"queue": {"backend": backend},
                                "transports": {"u": transport}}, source="t")

    def test_accepted(self):
        for backend in ("db", "redis"):
            config = self.parse(backend, unique="replace", unique_running=True)
            self.assertEqual((config.transport("u").unique,
                              config.transport("u").unique_running),
                             ("replace", True))
            self.assertEqual(config.transport("other").unique, "")

    def test_refused(self):
        e = self.assertRaises(snqconfig.ConfigError, self.parse, "stomp",
                              unique="drop")
        [problem] = e.problems
        self.assertIn("t: transports.u.unique: not available with backend = "
                      "'stomp'", problem)
        self.assertIn("RabbitMQ has no keyed deduplication", problem)
        self.assertIn('only with backend = "db" or "redis"', problem)
        e = self.assertRaises(snqconfig.ConfigError, self.parse, "db",
                              unique="yes")
        self.assertIn('"drop" | "replace"', e.problems[0])
