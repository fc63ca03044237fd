# -*- test-case-name: tests.test_sql_servers -*-
"""
The SQL backend on real PostgreSQL and MariaDB servers: real C{twistd -n
snq --inline} processes sharing a database of the test's own, items put
there by C{snqctl}, by plain SQL and by the servers' command-line clients.
"""

import json
import os
import time
import uuid

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from snq.item import Item
from snq.queues.db import DbQueue
from snq.queues.dialects import DIALECTS
from snq.routing import TransportFilter
from tests import sqlservers
from tests.daemon import Daemon, handledIds, snqctl, waitFor

CONFIG = """
[daemon]
kill_time = 5

[queue]
lease = 3
poll_interval = {poll}

[db]
url = "{url}"

[handlers]
record = "tests.recorder:Record"

[sites.default]
record_file = "{record}"
"""


def frame(**payload):
    return Item(transport="record", payload=payload).toJSON().decode()


class ServerTestsMixin:
    """The same behaviour asked of every server."""

    serverClass = None
    timeout = 120

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.server = sqlservers.forTest(self, self.serverClass)

    def config(self, poll=0.5, name="a"):
        """A config file whose handler records into C{handled-NAME.txt}."""
        path = os.path.join(self.dir, f"{name}.toml")
        record = os.path.join(self.dir, f"handled-{name}.txt")
        with open(path, "w") as f:
            f.write(CONFIG.format(poll=poll, url=self.server.url(), record=record))
        return path, record

    def daemon(self, config):
        return Daemon(self, self.dir, "--inline", "-c", config)

    @defer.inlineCallbacks
    def started(self, *daemons):
        for daemon in daemons:
            yield waitFor(lambda d=daemon: "consuming groups" in d.output(),
                          what="the daemon to start")

    def enqueue(self, config, n, payload="{}"):
        """C{n} items through snqctl → their ids."""
        result = snqctl("-c", config, "enqueue", "record", "-", cwd=self.dir,
                        stdin=(payload + "\n") * n)
        self.assertEqual(result.stdout.strip(), f"enqueued {n} items on record")
        return {json.loads(f)["id"] for (f,) in
                self.server.sql("SELECT frame FROM queue_item")}

    @defer.inlineCallbacks
    def drained(self):
        yield waitFor(lambda: self.server.count() == 0, what="an empty queue")
        self.assertEqual(self.server.count("queue_dead"), 0)

    @defer.inlineCallbacks
    def test_tenThousandItems(self):
        config, record = self.config()
        ids = self.enqueue(config, 10_000)
        self.assertEqual(len(ids), 10_000)
        start = time.monotonic()
        self.daemon(config)
        yield waitFor(lambda: len(handledIds(record)) >= 10_000,
                      what="10,000 items handled")
        yield self.drained()
        elapsed = time.monotonic() - start
        handled = handledIds(record)
        self.assertEqual(set(handled), ids)
        self.assertEqual(len(handled), 10_000, "no item twice without a crash")
        print(f"\n{self.server.name}: 10,000 items in {elapsed:.1f} s, process "
              f"start included ({10_000 / elapsed:,.0f} items/s)")

    @defer.inlineCallbacks
    def test_twoDaemonsNeverShareARow(self):
        configA, recordA = self.config(name="a")
        configB, recordB = self.config(name="b")
        a, b = self.daemon(configA), self.daemon(configB)
        yield self.started(a, b)
        frames = [frame(sleep=0.001) for _ in range(5_000)]
        ids = {json.loads(f)["id"] for f in frames}
        self.server.insertMany([(f, "record", "default", 0, 0) for f in frames])
        yield waitFor(lambda: len(handledIds(recordA)) + len(handledIds(recordB))
                      >= 5_000, what="5,000 items handled")
        yield self.drained()
        byA, byB = handledIds(recordA), handledIds(recordB)
        self.assertEqual(set(byA) | set(byB), ids)
        self.assertEqual(len(byA) + len(byB), 5_000, "a row handled twice")
        self.assertGreater(min(len(byA), len(byB)), 500,
                           f"one daemon did nearly all ({len(byA)}/{len(byB)})")

    @defer.inlineCallbacks
    def test_killDashNineLosesNothing(self):
        config, record = self.config()
        ids = self.enqueue(config, 2_000, '{"sleep": 0.002}')
        first = self.daemon(config)
        yield waitFor(lambda: len(handledIds(record)) >= 300,
                      what="a drain under way")
        first.crash()
        self.assertLess(len(set(handledIds(record))), 2_000,
                        "killed mid-drain, not after it")
        self.assertGreater(self.server.count(
            "queue_item WHERE claimed_by IS NOT NULL"), 0,
            "the killed daemon held claimed rows")
        self.daemon(config)
        yield waitFor(lambda: set(handledIds(record)) >= ids, timeout=90,
                      what="every item handled after the restart")
        yield self.drained()

    @defer.inlineCallbacks
    def test_killedSessionsReconnectAndLoseNothing(self):
        """The server ends every session of the daemon, twice, mid-drain."""
        config, record = self.config(poll=self.idlePoll)
        ids = self.enqueue(config, 3_000, '{"sleep": 0.005}')
        daemon = self.daemon(config)
        for seen in (500, 1500):
            yield waitFor(lambda s=seen: len(handledIds(record)) >= s,
                          what=f"{seen} items handled")
            self.assertGreater(self.server.killSessions(), 0)
        yield waitFor(lambda: set(handledIds(record)) >= ids, timeout=60,
                      what="every item handled after the kills")
        yield self.drained()
        self.assertTrue(daemon.alive())
        self.assertIn("trying again on a new connection", daemon.output())
        yield self.afterReconnect(daemon, record)

    def afterReconnect(self, daemon, record):
        """What else must work after the kills (PostgreSQL: LISTEN)."""

    @defer.inlineCallbacks
    def test_rowInsertedByCommandLineClient(self):
        """The README's INSERT, run by the server's own client, is handled."""
        config, record = self.config()
        snqctl("-c", config, "db", "init", cwd=self.dir)
        daemon = self.daemon(config)
        yield self.started(daemon)
        itemId = uuid.uuid4().hex
        envelope = json.dumps({"id": itemId, "transport": "record",
                               "payload": {"from": "cli", "quote": "it's"}})
        self.server.cli(self.server.producerSql(envelope, "record"))
        yield waitFor(lambda: handledIds(record) == [itemId], timeout=10,
                      what="the item inserted by the client")
        yield self.drained()

    def test_dbInitTwiceIsHarmless(self):
        config, _ = self.config()
        snqctl("-c", config, "db", "init", cwd=self.dir)
        self.server.insertMany([(frame(), "record", "default", 0, 0)])
        snqctl("-c", config, "db", "init", cwd=self.dir)
        self.assertEqual(self.server.count(), 1)
        self.assertEqual(self.server.sql("SELECT version FROM snq_schema"),
                         [(len(DIALECTS[self.server.scheme]().schema),)])

    def test_statusNetTableRefused(self):
        """StatusNet's own queue_item is in the way: say so, touch nothing."""
        self.server.sql("CREATE TABLE queue_item (id INTEGER PRIMARY KEY,"
                        " frame TEXT NOT NULL, transport VARCHAR(8) NOT NULL,"
                        " created TIMESTAMP NOT NULL, claimed TIMESTAMP NULL)")
        self.server.sql("INSERT INTO queue_item (id, frame, transport, created)"
                        " VALUES (1, 'x', 'jabber', CURRENT_TIMESTAMP)")
        config, _ = self.config()
        for _ in range(2):  # nothing was recorded as done
            result = snqctl("-c", config, "db", "init", cwd=self.dir, check=False)
            self.assertNotEqual(result.returncode, 0)
            self.assertIn("queue_item exists without snq's columns (attempts, "
                          "claimed_by", result.stderr)
        self.assertEqual(self.server.sql("SELECT id, frame FROM queue_item"),
                         [(1, "x")])

    @defer.inlineCallbacks
    def test_claimSkipsLockedRowsWithoutWaiting(self):
        """
        Rows another transaction has locked (another host's claim) are
        skipped, not waited for.
        """
        queue = DbQueue(self.server.url(), 60)
        self.addCleanup(queue.close)
        yield queue.open()
        self.server.insertMany([(frame(), "record", "default", 0, 0)] * 20)
        other = self.server.connect()
        self.addCleanup(other.close)
        cursor = other.cursor()
        cursor.execute("SELECT id FROM queue_item ORDER BY id LIMIT 10 FOR UPDATE")
        locked = [r[0] for r in cursor.fetchall()]
        started = time.monotonic()
        claimed = yield queue.claim(5, TransportFilter())
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertEqual([d.token for d in claimed],
                         [i + 10 for i in locked[:5]])
        other.rollback()

    test_claimSkipsLockedRowsWithoutWaiting.timeout = 20


class PostgresTests(ServerTestsMixin, TestCase):
    serverClass = sqlservers.Postgres
    #: Long, so that only NOTIFY can explain a prompt start.
    idlePoll = 10

    @defer.inlineCallbacks
    def promptStarts(self, record, count):
        """Insert C{count} items while idle → seconds until each started."""
        latencies = []
        conn = self.server.connect()
        self.addCleanup(conn.close)
        for _ in range(count):
            # Long enough for the poller to sleep 1 s or more.
            yield deferLater(reactor, 1.2, lambda: None)
            envelope = frame()
            itemId = json.loads(envelope)["id"]
            sent = time.monotonic()
            conn.execute("INSERT INTO queue_item (frame, transport, site, created,"
                         " run_at) VALUES (%s, 'record', 'default', 0, 0)",
                         (envelope,))
            conn.commit()
            yield waitFor(lambda i=itemId: i in handledIds(record), timeout=15,
                          interval=0.002, what="the item to start")
            latencies.append(time.monotonic() - sent)
        return latencies

    @defer.inlineCallbacks
    def test_idleWorkerStartsWithin50ms(self):
        config, record = self.config(poll=10)
        daemon = self.daemon(config)
        yield waitFor(lambda: "listening on snq_queue_item" in daemon.output(),
                      what="the daemon to LISTEN")
        yield self.promptStarts(record, 1)  # the handler's file gets opened
        latencies = yield self.promptStarts(record, 5)
        print(f"\nenqueue → start: {', '.join(f'{x * 1000:.1f}' for x in latencies)}"
              " ms")
        self.assertLess(max(latencies), 0.050, latencies)

    @defer.inlineCallbacks
    def test_onlyRedoableTransactionsSkipTheDiskWait(self):
        """
        Claims commit without waiting for the disk (lost, the claimed items
        run again, as items in flight would); an enqueue and an
        acknowledgement wait (a lost acknowledgement would run again an
        item already done, beyond those in flight).
        """
        queue = DbQueue(self.server.url(), 60)
        self.addCleanup(queue.close)
        yield queue.open()
        seen = {}

        def noting(name, method):
            def run(txn, *args, **kw):
                txn.execute("SHOW synchronous_commit")
                seen[name] = txn.fetchone()[0]
                return method(txn, *args, **kw)
            return run

        queue.dialect.claim = noting("claim", queue.dialect.claim)
        queue._deleteIds = noting("ack", queue._deleteIds)
        queue.insertItems = noting("enqueue", queue.insertItems)
        yield queue.enqueue([Item(transport="record", payload={})])
        claimed = yield queue.claim(5, TransportFilter())
        yield queue.ack(claimed[0])
        self.assertEqual(seen, {"enqueue": "on", "claim": "off", "ack": "on"})
        self.assertEqual(self.server.count(), 0)

    @defer.inlineCallbacks
    def afterReconnect(self, daemon, record):
        """The LISTEN connection was killed too: it is back."""
        latencies = yield self.promptStarts(record, 3)
        self.assertLess(max(latencies), 0.5, latencies)
        self.assertIn("LISTEN connection lost", daemon.output())


class MariaDbTests(ServerTestsMixin, TestCase):
    serverClass = sqlservers.MariaDb
    idlePoll = 0.5


class DescribeTests(SynchronousTestCase):
    """What logs and snqctl print of a URL: never the password."""

    def test_passwordInUserinfo(self):
        queue = DbQueue("mysql://snq:s3cr%40t@db.example.org:3306/snq", 60)
        self.assertEqual(queue.describe(), "mysql://snq:***@db.example.org:3306/snq")

    def test_passwordInQuery(self):
        queue = DbQueue("postgresql://snq@db/snq?sslmode=require&password=s3cret",
                        60)
        self.assertEqual(queue.describe(),
                         "postgresql://snq@db/snq?sslmode=require&password=***")

    def test_noPassword(self):
        url = "postgresql://snq@db/snq?sslmode=require"
        self.assertEqual(DbQueue(url, 60).describe(), url)
