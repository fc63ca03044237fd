# -*- test-case-name: tests.test_unique -*-
"""
Unique items (C{[transports.NAME] unique}) on the real SQL servers: a
keyed item dropped or replacing the one waiting, a running one counted
when configured, two producers racing for one key, the worker's enqueue
and the producer's answers, a version 4 schema upgraded in place, and the
config refusing unique items where the backend cannot keep them.
"""

import io
import json
import os
import threading

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from snq import config as snqconfig
from snq.client import Producer
from snq.handlers.context import HandlerContext
from snq.item import Item
from snq.queues.db import DbQueue
from snq.queues.dialects import DIALECTS
from snq.routing import TransportFilter
from snq.scripts import snqctl
from snq.stats import Stats
from tests import sqlservers

ALL = TransportFilter()


class UniqueMixin:
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
        self.config = snqconfig.parse({"db": {"url": self.server.url()},
                                       "transports": table})
        self.queue.reconfigService(self.config)

    def openQueue(self):
        # On the wall clock: the producer's items are due by it.
        self.queue = DbQueue(self.server.url(), 60, claimant="a")
        self.addCleanup(self.queue.close)
        return self.queue.open()

    def producer(self):
        producer = Producer(config=self.config)
        self.addCleanup(producer.close)
        return producer

    def waiting(self):
        """(payload, key) of the rows not claimed, oldest first."""
        rows = self.server.sql("SELECT frame FROM queue_item WHERE claimed_by"
                               " IS NULL ORDER BY id")
        items = [json.loads(frame) for (frame,) in rows]
        return [(i["payload"], i.get("key")) for i in items]

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


class SqliteUniqueTests(UniqueMixin, TestCase):
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

        @defer.inlineCallbacks
        def ctl(*argv):
            out = io.StringIO()
            args = snqctl.parser().parse_args(["-c", path, *argv])
            yield snqctl.run(reactor, args, out=out, stdin=io.StringIO(""))
            return out.getvalue().strip()

        first = yield ctl("enqueue", "u", "1", "--key", "k")
        self.assertEqual(self.server.sql("SELECT item_key FROM queue_item"),
                         [("k",)])
        self.assertEqual(len(first), 32)
        self.assertEqual((yield ctl("enqueue", "u", "2", "--key", "k")),
                         "not enqueued: an item with key 'k' is already on u")


class PostgresUniqueTests(UniqueMixin, TestCase):
    def setUp(self):
        self.server = sqlservers.forTest(self, sqlservers.Postgres)
        return super().setUp()


class MariaDbUniqueTests(UniqueMixin, TestCase):
    def setUp(self):
        self.server = sqlservers.forTest(self, sqlservers.MariaDb)
        return super().setUp()


class ConfigTests(TestCase):
    def parse(self, backend, **transport):
        return snqconfig.parse({"queue": {"backend": backend},
                                "transports": {"u": transport}}, source="t")

    def test_accepted(self):
        config = self.parse("db", unique="replace", unique_running=True)
        self.assertEqual((config.transport("u").unique,
                          config.transport("u").unique_running), ("replace", True))
        self.assertEqual(config.transport("other").unique, "")

    def test_refused(self):
        for backend, why in (("stomp", "RabbitMQ has no keyed deduplication"),
                             ("redis", "does not keep items unique yet")):
            e = self.assertRaises(snqconfig.ConfigError, self.parse, backend,
                                  unique="drop")
            [problem] = e.problems
            self.assertIn("t: transports.u.unique: not available with backend = "
                          f"'{backend}'", problem)
            self.assertIn(why, problem)
        e = self.assertRaises(snqconfig.ConfigError, self.parse, "db",
                              unique="yes")
        self.assertIn('"drop" | "replace"', e.problems[0])
