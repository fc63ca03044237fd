# -*- test-case-name: tests.test_client_servers -*-
"""
L{snq.client.Producer} on every backend against the real servers, each
item handled by a running daemon: from a web application's process (no
Twisted imported, threads, a fork), after the server dropped its
connections, with the server down, and in the application's own
transaction on SQLite, PostgreSQL and MariaDB.
"""

import json
import subprocess
import sys
import time

import psycopg
import pymysql
import redis
import sqlalchemy
from sqlalchemy.orm import Session
from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from snq import config as snqconfig
from snq.client import EnqueueError, Producer
from snq.client.stomp import BrokerError
from snq.item import Item
from tests import rabbitmq, sqlservers
from tests.daemon import environ, freePort, snqctl
from tests.stampdaemon import REDIS_URL, OnServer, deleteRedisKeys


class ProducerOnServer(OnServer):
    """Mixin for a TestCase per backend: see L{OnServer}."""

    breakouts = ("main/stamp",)

    def setUp(self):
        super().setUp()
        self.configPath = self.stamps.config
        self.config = snqconfig.load(self.configPath)

    def createStore(self):
        """What the daemon makes as it starts (SQL's schema)."""

    def producer(self, config=None):
        producer = Producer(config=config or self.config)
        self.addCleanup(producer.close)
        return producer

    def daemon(self):
        return self.stamps.start()

    def waitHandled(self, ids):
        return self.stamps.waitHandled(ids)

    @defer.inlineCallbacks
    def test_webApplicationProcess(self):
        """
        In a process of its own, a producer enqueues single, batched,
        delayed, threaded and forked items without importing Twisted; the
        daemon handles each once, the delayed one not before its time and
        without an attempt charged.

        So does a frame with a later run_at that a producer of any language
        put straight on the ready queue.
        """
        yield self.daemon()
        early = Item(transport="stamp", payload={}, run_at=time.time() + 1.5)
        yield threads.deferToThread(self.pushRaw, early.toJSON())
        result = yield threads.deferToThread(
            subprocess.run,
            [sys.executable, "-m", "tests.client_script", self.configPath,
             "stamp"], capture_output=True, text=True, env=environ(),
            cwd=self.dir, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        report = json.loads(result.stdout)
        self.assertFalse(report["twisted"], "snq.client imported Twisted")
        self.assertEqual(report["childStatus"], 0)
        ids = [i for kind in report["ids"].values() for i in kind]
        self.assertEqual(len(ids), 1 + 50 + 1 + 80 + 2)
        yield self.waitHandled([*ids, early.id])
        self.assertEqual(sorted(self.stamps.handledIds()), sorted([*ids, early.id]),
                         "each handled once")
        [delayed] = report["ids"]["delayed"]
        for itemId, notBefore in [(delayed, report["notBefore"]),
                                  (early.id, early.run_at)]:
            attempts, started = self.handled()[itemId]
            self.assertEqual(attempts, 0)
            self.assertGreaterEqual(started, notBefore)

    def test_serverDown(self):
        """A backend that does not answer: EnqueueError, the cause attached."""
        producer = self.producer(self.downConfig())
        e = self.assertRaises(EnqueueError, producer.enqueue, "stamp", {})
        self.assertIsInstance(e.__cause__, self.downError)
        self.assertIn(self.downWhere, str(e))


class ReconnectTests:
    """Mixin: C{dropConnections()} ends the producer's connections server-side."""

    def test_reconnectsAfterTheServerDroppedIt(self):
        """Stored (committed, confirmed) on a new connection."""
        self.createStore()
        producer = self.producer()
        producer.enqueue("stamp", {"n": 1})
        self.dropConnections(producer)
        producer.enqueue("stamp", {"n": 2})


class TransactionalTests:
    """
    Mixin for SQL servers: C{self.server} (L{tests.sqlservers}) and
    C{sqlalchemyUrl}.
    """

    def count(self):
        return self.server.count()

    @defer.inlineCallbacks
    def test_applicationTransaction(self):
        """
        Rolled back, the item never existed; committed, the daemon handles
        it: on the application's DB-API connection, an SQLAlchemy
        Connection and an SQLAlchemy Session.
        """
        yield self.daemon()
        producer = self.producer()
        conn = self.server.connect()
        self.addCleanup(conn.close)
        engine = sqlalchemy.create_engine(self.sqlalchemyUrl())
        self.addCleanup(engine.dispose)

        producer.enqueue("stamp", {"undone": 1}, connection=conn)
        conn.rollback()
        with engine.connect() as sa:
            producer.enqueue_many("stamp", [{"undone": 2}, {"undone": 3}],
                                  connection=sa)
            sa.rollback()
        with Session(engine) as session:
            producer.enqueue("stamp", {"undone": 4}, connection=session)
            session.rollback()
        self.assertEqual(self.server.count(), 0)

        ids = [producer.enqueue("stamp", {"done": 1}, connection=conn)]
        self.assertEqual(self.server.count(), 0, "visible before the commit")
        conn.commit()
        with engine.begin() as sa:
            ids += producer.enqueue_many("stamp", [{"done": 2}, {"done": 3}],
                                         connection=sa)
        with Session(engine) as session, session.begin():
            ids.append(producer.enqueue("stamp", {"done": 4}, connection=session))
        yield self.waitHandled(ids)


class SqlServer:
    def createStore(self):
        snqctl("-c", self.configPath, "db", "init", cwd=self.dir)

    def pushRaw(self, frame):
        now = time.time()
        self.server.insertMany([(frame.decode(), "stamp", "default", now, now)])


class SqliteTests(SqlServer, ProducerOnServer, TransactionalTests, TestCase):
    backend = "db"
    downError = OSError
    downWhere = "sqlite:////proc/"

    def setUpServer(self):
        self.server = sqlservers.Sqlite(self.dir)
        self.dbUrl = self.server.url()

    def sqlalchemyUrl(self):
        return self.server.url()

    def downConfig(self):
        return snqconfig.parse({"db": {"url": "sqlite:////proc/no/such/dir/x"}})


class PostgresTests(SqlServer, ProducerOnServer, ReconnectTests,
                    TransactionalTests, TestCase):
    backend = "db"
    downError = psycopg.OperationalError
    downWhere = "postgresql://postgres:***@127.0.0.1"

    def setUpServer(self):
        self.server = sqlservers.forTest(self, sqlservers.Postgres)
        self.dbUrl = self.server.url()

    def sqlalchemyUrl(self):
        return self.server.url().replace("postgresql://", "postgresql+psycopg://")

    def downConfig(self):
        return snqconfig.parse({"db": {
            "url": f"postgresql://postgres:secret@127.0.0.1:{freePort()}/x"}})

    def dropConnections(self, producer):
        self.assertGreater(self.server.killSessions(), 0)


class MariaDbTests(SqlServer, ProducerOnServer, ReconnectTests,
                   TransactionalTests, TestCase):
    backend = "db"
    downError = pymysql.OperationalError
    downWhere = "mysql://root:***@127.0.0.1"

    def setUpServer(self):
        self.server = sqlservers.forTest(self, sqlservers.MariaDb)
        self.dbUrl = self.server.url()

    def sqlalchemyUrl(self):
        return self.server.url().replace("mysql://", "mysql+pymysql://")

    def downConfig(self):
        return snqconfig.parse({"db": {
            "url": f"mysql://root:secret@127.0.0.1:{freePort()}/x"}})

    def dropConnections(self, producer):
        self.assertGreater(self.server.killSessions(), 0)


class RedisTests(ProducerOnServer, ReconnectTests, TestCase):
    backend = "redis"
    downError = redis.ConnectionError
    downWhere = "redis://:***@127.0.0.1"

    def setUpServer(self):
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.addCleanup(self.redis.close)
        self.addCleanup(deleteRedisKeys, f"{self.name}:")

    def pushRaw(self, frame):
        self.redis.lpush(f"{self.name}:q:main/stamp", frame)

    def downConfig(self):
        return snqconfig.parse({"queue": {"backend": "redis"}, "redis": {
            "url": f"redis://:secret@127.0.0.1:{freePort()}/0", "timeout": 2}})

    def dropConnections(self, producer):
        name = producer._backend.client.client_getname()
        killed = 0
        for client in self.redis.client_list():
            if client["name"] == name:
                killed += self.redis.client_kill_filter(_id=client["id"])
        self.assertGreater(killed, 0)

    def test_routesAsTheDaemon(self):
        """A breakout's items go to its own list; others to their group's."""
        producer = self.producer()
        producer.enqueue("stamp", {})
        producer.enqueue("log", {}, run_at=4e9)
        self.assertEqual(self.redis.llen(f"{self.name}:q:main/stamp"), 1)
        self.assertEqual(self.redis.zcard(f"{self.name}:delayed:main"), 1)


class StompTests(ProducerOnServer, ReconnectTests, TestCase):
    backend = "stomp"
    downError = BrokerError
    downWhere = "tcp://127.0.0.1:"

    def setUpServer(self):
        rabbitmq.requireRabbitMQ()
        self.addCleanup(rabbitmq.deleteQueues, self.name)

    def pushRaw(self, frame):
        rabbitmq.produce(f"/queue/{self.name}%2Fmain%2Fstamp", [frame])

    def downConfig(self):
        return snqconfig.parse({"queue": {"backend": "stomp"}, "stomp": {
            "servers": [f"tcp://127.0.0.1:{freePort()}",
                        f"tcp://127.0.0.1:{freePort()}"],
            "connect_timeout": 2}})

    def dropConnections(self, producer):
        [conn] = producer._backend.pool._idle
        port = conn.sock.getsockname()[1]
        killed = rabbitmq.rabbitmqctl("eval", f"""
            [exit(P, kill) || P <- rabbit_stomp:list(),
             rabbit_stomp_reader:info(P, [peer_port]) =:= [{{peer_port, {port}}}]].""")
        self.assertEqual(killed.strip(), "[true]")
