# -*- test-case-name: tests.test_client -*-
"""
L{snq.client.Producer} without servers: URLs, the rows and envelopes it
writes (on SQLite), the arguments it refuses, the application's own
sqlite3 transaction, and its pool across threads and forks.  The servers
are L{tests.test_client_servers}'.
"""

import json
import os
import sqlite3
import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime, timedelta

from twisted.trial.unittest import SynchronousTestCase

from snq import config as snqconfig
from snq.client import EnqueueError, Producer, _newId, configFor
from snq.client.pool import Pool
from snq.item import BadItem, Item
from tests.daemon import environ, snqctl


class ConfigForTests(SynchronousTestCase):
    def test_sql(self):
        config = configFor("postgresql://u:p@db:5432/app")
        self.assertEqual((config.queue.backend, config.db.url.reveal()),
                         ("db", "postgresql://u:p@db:5432/app"))
        self.assertEqual(configFor("sqlite:////var/snq.sqlite").queue.backend,
                         "db")

    def test_redis(self):
        config = configFor("rediss://:pw@cache:6380/2")
        self.assertEqual((config.queue.backend, config.redis.url.reveal()),
                         ("redis", "rediss://:pw@cache:6380/2"))

    def test_stomp(self):
        stomp = configFor("stomp://app:s%40cret@mq.example:61614/prod").stomp
        self.assertEqual((stomp.servers, stomp.login, stomp.passcode.reveal(),
                          stomp.vhost),
                         (["tcp://mq.example:61614"], "app", "s@cret", "prod"))
        stomp = configFor("stomp+ssl://mq.example").stomp
        self.assertEqual((stomp.servers, stomp.login, stomp.vhost),
                         (["ssl://mq.example:61613"], "guest", "/"))

    def test_unknown(self):
        e = self.assertRaises(ValueError, configFor, "amqp://guest@mq/")
        self.assertIn("'amqp': not a URL snq knows", str(e))
        self.assertRaises(ValueError, configFor, "snq.sqlite")

    def test_passwordsNeverShown(self):
        producer = Producer("redis://:hunter2@127.0.0.1:1/0")
        self.addCleanup(producer.close)
        self.assertNotIn("hunter2", repr(producer))
        e = self.assertRaises(EnqueueError, producer.enqueue, "log", 1)
        self.assertNotIn("hunter2", str(e))

    def test_oneOfUrlOrConfig(self):
        self.assertRaises(TypeError, Producer)
        self.assertRaises(TypeError, Producer, "sqlite:///x",
                          config=snqconfig.Config())


class IdTests(SynchronousTestCase):
    def test_randomUUIDs(self):
        """A producer's ids are what an Item makes its own: uuid4().hex."""
        ids = {_newId() for _ in range(1000)}
        self.assertEqual(len(ids), 1000)
        for itemId in ids:
            made = uuid.UUID(itemId)
            self.assertEqual((made.hex, made.version, made.variant),
                             (itemId, 4, uuid.RFC_4122))
        self.assertEqual({len(i) for i in ids}, {len(Item("t", {}).id)})


class SqliteProducerTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "snq.sqlite")
        self.config = snqconfig.parse({
            "db": {"url": f"sqlite:///{self.path}"},
            "transports": {"mail": {"priority": 7}}})
        with open(os.path.join(self.dir, "snq.toml"), "w") as f:
            f.write(f'[db]\nurl = "sqlite:///{self.path}"\n')
        snqctl("-c", "snq.toml", "db", "init", cwd=self.dir)
        self.producer = Producer(config=self.config)
        self.addCleanup(self.producer.close)

    def rows(self):
        conn = sqlite3.connect(self.path)
        try:
            return conn.execute(
                "SELECT frame, transport, site, priority, created, run_at,"
                " attempts FROM queue_item ORDER BY id").fetchall()
        finally:
            conn.close()

    def test_rowAndEnvelope(self):
        itemId = self.producer.enqueue("mail", {"to": "a@example.org"},
                                       site="ex", key="signup-42")
        [(frame, transport, site, priority, created, runAt, attempts)] = self.rows()
        item = Item.fromJSON(frame)
        self.assertEqual((item.id, item.transport, item.site, item.payload,
                          item.priority, item.key, item.run_at),
                         (itemId, "mail", "ex", {"to": "a@example.org"}, 7,
                          "signup-42", None))
        self.assertEqual((transport, site, priority, attempts), ("mail", "ex", 7, 0))
        self.assertEqual(runAt, created, "due at once")
        self.assertNotIn("run_at", json.loads(frame),
                         "a frame every daemon takes, when not delayed")

    def test_priorityGiven(self):
        self.producer.enqueue("mail", 1, priority=-3)
        self.assertEqual(self.rows()[0][3], -3)

    def test_delayAndRunAt(self):
        self.producer.enqueue("log", 1, delay=30)
        self.producer.enqueue("log", 2, delay=timedelta(minutes=1))
        at = datetime(2040, 1, 2, 3, 4, 5, tzinfo=UTC)
        self.producer.enqueue("log", 3, run_at=at)
        self.producer.enqueue("log", 4, run_at=2e9)
        rows = self.rows()
        for (frame, _, _, _, created, runAt, _), wait in zip(rows[:2], (30, 60),
                                                             strict=True):
            self.assertAlmostEqual(runAt - created, wait, places=3)
            self.assertEqual(Item.fromJSON(frame).run_at, runAt)
        self.assertEqual(rows[2][5], at.timestamp())
        self.assertEqual(rows[3][5], 2e9)
        self.assertEqual(Item.fromJSON(rows[3][0]).run_at, 2e9)

    def test_enqueueMany(self):
        ids = self.producer.enqueue_many("log", [{"n": n} for n in range(3)],
                                         keys=["a", None, "c"])
        rows = self.rows()
        self.assertEqual([Item.fromJSON(r[0]).id for r in rows], ids)
        self.assertEqual([Item.fromJSON(r[0]).key for r in rows], ["a", None, "c"])
        self.assertEqual(self.producer.enqueue_many("log", []), [])

    def test_allOrNothing(self):
        """A payload JSON cannot carry fails the batch before anything is stored."""
        self.assertRaises(TypeError, self.producer.enqueue_many, "log",
                          [{"n": 1}, {"n": object()}])
        self.assertEqual(self.rows(), [])

    def test_refusedArguments(self):
        enqueue = self.producer.enqueue
        self.assertRaises(BadItem, enqueue, "a/b", 1)
        self.assertRaises(BadItem, enqueue, "log", 1, site="")
        self.assertRaises(TypeError, enqueue, "log", 1, delay=1, run_at=2)
        self.assertRaises(ValueError, enqueue, "log", 1, delay=-1)
        self.assertRaises(ValueError, enqueue, "log", 1, delay=float("nan"))
        self.assertRaises(ValueError, enqueue, "log", 1,
                          run_at=datetime(2040, 1, 1))
        self.assertRaises(ValueError, enqueue, "log", 1, run_at="tomorrow")
        self.assertRaises(ValueError, enqueue, "log", 1, key="")
        self.assertRaises(ValueError, enqueue, "log", 1, key="k" * 256)
        self.assertRaises(TypeError, enqueue, "log", 1, priority=True)
        self.assertRaises(ValueError, self.producer.enqueue_many, "log", [1, 2],
                          keys=["a"])
        self.assertEqual(self.rows(), [])

    def test_applicationTransaction(self):
        """sqlite3: in the application's transaction, committed or not."""
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        conn.execute("CREATE TABLE post (body TEXT)")
        conn.execute("INSERT INTO post VALUES ('hello')")
        self.producer.enqueue("log", {"post": 1}, connection=conn)
        conn.rollback()
        self.assertEqual(self.rows(), [])
        conn.execute("INSERT INTO post VALUES ('hello')")
        itemId = self.producer.enqueue("log", {"post": 1}, connection=conn)
        self.assertEqual(self.rows(), [], "not before the commit")
        conn.commit()
        self.assertEqual(Item.fromJSON(self.rows()[0][0]).id, itemId)

    def test_connectionOfAnotherKind(self):
        e = self.assertRaises(TypeError, self.producer.enqueue, "log", 1,
                              connection=object())
        self.assertIn("DB-API connection", str(e))
        redis = Producer("redis://127.0.0.1:1/0")
        self.addCleanup(redis.close)
        e = self.assertRaises(ValueError, redis.enqueue, "log", 1,
                              connection=sqlite3.connect(":memory:"))
        self.assertIn("needs the SQL backend", str(e))

    def test_noSchema(self):
        os.remove(self.path)
        producer = Producer(f"sqlite:///{self.path}")
        self.addCleanup(producer.close)
        e = self.assertRaises(EnqueueError, producer.enqueue, "log", 1)
        self.assertIn("no such table: queue_item (create the schema: snqctl "
                      "db init", str(e))

    def test_threads(self):
        """Threads share one producer; each uses a connection of its own."""
        ids, errors = [], []

        def work():
            try:
                for n in range(25):
                    ids.append(self.producer.enqueue("log", n))
            except Exception as e:
                errors.append(e)

        workers = [threading.Thread(target=work) for _ in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        self.assertEqual(errors, [])
        self.assertEqual(sorted(Item.fromJSON(r[0]).id for r in self.rows()),
                         sorted(ids))


class NoTwistedTests(SynchronousTestCase):
    def test_importAndUse(self):
        """
        Making a producer for every backend and enqueueing imports nothing
        of Twisted (the servers' own runs: L{tests.test_client_servers}),
        nor redis-py (snq speaks to Redis itself: L{snq.client.resp}).
        """
        path = os.path.abspath(self.mktemp())
        code = (
            "import sys\n"
            "from snq.client import Producer, EnqueueError\n"
            "for url in ['redis://127.0.0.1:1/0', 'stomp://127.0.0.1:1',\n"
            "            'postgresql://x@127.0.0.1:1/x', 'mysql://x@127.0.0.1:1/x']:\n"
            "    Producer(url).close()\n"
            f"p = Producer('sqlite:///{path}')\n"
            "try:\n"
            "    p.enqueue('xmppout', {})\n"
            "except EnqueueError:\n"
            "    pass\n"
            "print(sorted(m for m in sys.modules\n"
            "             if m.startswith(('twisted', 'redis'))))\n")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                text=True, env=environ(), timeout=60)
        self.assertEqual((result.returncode, result.stdout.strip()), (0, "[]"),
                         result.stderr)


class PoolTests(SynchronousTestCase):
    def setUp(self):
        self.made, self.closed = [], []
        self.pool = Pool(self.connect, self.closed.append)

    def connect(self):
        self.made.append(object())
        return self.made[-1]

    def test_reusedAfterUse(self):
        first = self.pool.use(lambda conn: conn)
        self.assertIs(self.pool.use(lambda conn: conn), first)
        self.assertEqual(len(self.made), 1)

    def test_failedConnectionsAreClosed(self):
        def fail(conn):
            raise RuntimeError("in use")

        self.assertRaises(RuntimeError, self.pool.use, fail)
        self.assertEqual(self.closed, self.made)
        self.pool.use(lambda conn: conn)
        self.assertEqual(len(self.made), 2)

    def test_droppedWhileIdle(self):
        """
        A kept connection that fails with a retryable error is closed and
        the work done again on a new one; a new one's failure is raised.
        """
        kept = self.pool.use(lambda conn: conn)
        used = []

        def work(conn):
            used.append(conn)
            if len(used) < 3:
                raise ConnectionError("dropped")
            return "done"

        self.assertRaises(ConnectionError, self.pool.use, work, OSError)
        self.assertEqual(used[0], kept)
        self.assertEqual(self.closed, used, "the new one failed too: raised")
        self.assertEqual(self.pool.use(work, OSError), "done")

    def test_notRetryable(self):
        """Only the errors named are retried, on a kept connection too."""
        self.pool.use(lambda conn: conn)

        def fail(conn):
            raise ValueError("refused")

        self.assertRaises(ValueError, self.pool.use, fail, OSError)
        self.assertEqual(len(self.made), 1)

    def test_forkedChildStartsAfresh(self):
        """
        A child never uses, nor closes, what its parent opened: closing
        could say goodbye on the parent's behalf.
        """
        parents = self.pool.use(lambda conn: conn)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                conn = self.pool.use(lambda conn: conn)
                self.pool.close()
                ok = conn is not parents and self.closed == [conn]
                os.write(write, b"ok" if ok else b"no")
            finally:
                os._exit(0)
        os.close(write)
        answer = os.read(read, 2)
        os.close(read)
        os.waitpid(pid, 0)
        self.assertEqual(answer, b"ok")
        self.assertIs(self.pool.use(lambda conn: conn), parents)
