# -*- test-case-name: tests.test_client_servers -*-
"""
L{snq.client.Producer} on every backend against the real servers, each
item handled by a running daemon: from a web application's process (no
Twisted imported, threads, a fork), after the server dropped its
connections, with the server down, and in the application's own
transaction on SQLite, PostgreSQL and MariaDB.
"""

import json
import os
import ssl
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
from snq.client.redis import _oneCommand
from snq.client.resp import ReplyError, RespConnection
from snq.client.stomp import BrokerError
from snq.client.wire import Wire
from snq.item import Item
from snq.redis import scripts
from snq.redis.address import RedisAddress
from snq.redis.keys import enqueueCall
from tests import rabbitmq, sqlservers, test_redis
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
    downError = ConnectionRefusedError
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
        """CLIENT KILL of the producer's idle connections, by their names."""
        names = {conn.name for conn in producer._backend.pool._idle}
        killed = 0
        for client in self.redis.client_list():
            if client["name"] in names:
                killed += self.redis.client_kill_filter(_id=client["id"])
        self.assertEqual(killed, len(names))
        self.assertGreater(killed, 0)

    def redisConfig(self, url, **settings):
        return snqconfig.parse({"queue": {"backend": "redis"}, "redis": {
            "url": url, "prefix": f"{self.name}:", **settings}})

    def test_routesAsTheDaemon(self):
        """A breakout's items go to its own list; others to their group's."""
        producer = self.producer()
        producer.enqueue("stamp", {})
        producer.enqueue("log", {}, run_at=4e9)
        self.assertEqual(self.redis.llen(f"{self.name}:q:main/stamp"), 1)
        self.assertEqual(self.redis.zcard(f"{self.name}:delayed:main"), 1)

    def test_bigItems(self):
        """Frames far beyond a socket buffer, single and batched, whole."""
        producer = self.producer()
        big = "é" * 1_500_000
        itemId = producer.enqueue("log", {"big": big})
        ids = producer.enqueue_many("log", [{"big": big}] * 3)
        frames = self.redis.lrange(f"{self.name}:q:main", 0, -1)
        self.assertEqual([Item.fromJSON(f).id for f in reversed(frames)],
                         [itemId, *ids])
        self.assertEqual({Item.fromJSON(f).payload["big"] for f in frames}, {big})

    def test_sameAsTheScript(self):
        """
        The producer's one command stores what the daemon's ENQUEUE script
        stores with the same KEYS and ARGV, ready or later.
        """
        now = time.time()
        items = [Item(transport="log", payload=n, created=now) for n in range(3)]
        later = [Item(transport="log", payload=n, created=now, run_at=now + 60)
                 for n in range(3)]
        conn = RespConnection(Wire("127.0.0.1", 6379, 5.0),
                              RedisAddress.fromURL(REDIS_URL), "test")
        self.addCleanup(conn.close)
        stored = {}
        for way in ("script", "command"):
            prefix = f"{self.name}:{way}:"
            for batch in (items, later):
                keys, args = enqueueCall(batch, lambda item: "main", prefix,
                                         now, 0.0, lambda item: item.id)
                if way == "script":
                    self.redis.eval(scripts.ENQUEUE.source, len(keys), *keys,
                                    *args)
                else:
                    conn.execute(_oneCommand(keys, args))
            stored[way] = (
                self.redis.lrange(f"{prefix}q:main", 0, -1),
                self.redis.zrange(f"{prefix}delayed:main", 0, -1,
                                  withscores=True))
        self.assertEqual(len(stored["script"][0]), 3)
        self.assertEqual(len(stored["script"][1]), 3)
        self.assertEqual(stored["command"], stored["script"])

    def test_aclUserAndDatabase(self):
        """
        AUTH as an ACL user allowed only what a producer does, on the
        database the URL names; a wrong password is refused, unshown.
        """
        user = f"{self.name}-producer"
        self.redis.acl_setuser(
            user, enabled=True, passwords=["+s3cret"], keys=[f"{self.name}:*"],
            commands=["+lpush", "+zadd", "+select", "+client|setname"])
        self.addCleanup(self.redis.acl_deluser, user)
        other = redis.Redis.from_url(REDIS_URL.rpartition("/")[0] + "/2")
        self.addCleanup(other.close)
        self.addCleanup(other.delete, f"{self.name}:q:main")
        producer = self.producer(self.redisConfig(
            f"redis://{user}:s3cret@127.0.0.1:6379/2"))
        [itemId] = producer.enqueue_many("log", [{"n": 1}])
        [frame] = other.lrange(f"{self.name}:q:main", 0, -1)
        self.assertEqual(Item.fromJSON(frame).id, itemId)
        self.assertEqual(self.redis.llen(f"{self.name}:q:main"), 0)

        wrong = self.producer(self.redisConfig(
            f"redis://{user}:wr0ng@127.0.0.1:6379/2"))
        e = self.assertRaises(EnqueueError, wrong.enqueue, "log", {})
        self.assertIsInstance(e.__cause__, ReplyError)
        self.assertIn("WRONGPASS", str(e))
        self.assertNotIn("wr0ng", str(e))
        self.assertIn(f"redis://{user}:***@127.0.0.1:6379/2", str(e))

    def test_forkedChildConnectsAnew(self):
        """
        A child forked after its parent enqueued uses a connection of its
        own (named for its pid), and closing its producer leaves the
        parent's working.
        """
        producer = self.producer()
        producer.enqueue("log", {"parent": 1})
        [parents] = producer._backend.pool._idle
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(read)
                producer.enqueue("log", {"child": 1})
                [mine] = producer._backend.pool._idle
                producer.close()
                os.write(write, mine.name.encode())
                status = 0
            finally:
                os._exit(status)
        os.close(write)
        with os.fdopen(read, "rb") as answer:
            childs = answer.read().decode()
        _, status = os.waitpid(pid, 0)
        self.assertEqual(status, 0)
        self.assertTrue(childs.endswith(f"-{pid}-" + childs.rpartition("-")[2]))
        self.assertNotEqual(childs, parents.name)
        producer.enqueue("log", {"parent": 2})
        self.assertEqual(producer._backend.pool._idle, [parents])
        self.assertEqual(self.redis.llen(f"{self.name}:q:main"), 3)


class RedisTLSTests(test_redis.RedisFixture, TestCase):
    """C{rediss://}: the TLS-only redis-server of L{test_redis.TLSTests}."""

    setUp = test_redis.TLSTests.setUp
    listening = test_redis.TLSTests.listening
    stopServer = test_redis.TLSTests.stopServer
    pem = test_redis.TLSTests.pem

    def config(self, **files):
        return snqconfig.parse({"queue": {"backend": "redis"}, "redis": {
            "url": f"rediss://127.0.0.1:{self.port}/0", "prefix": self.prefix,
            "timeout": 5, "cert_file": os.path.join(self.dir, "client.crt"),
            "key_file": os.path.join(self.dir, "client.key"), **files}})

    def test_rediss(self):
        """Trusting the private CA, with a client certificate."""
        producer = Producer(config=self.config(
            ca_file=os.path.join(self.dir, "ca.crt")))
        self.addCleanup(producer.close)
        itemId = producer.enqueue("log", "secret")
        producer.enqueue("log", "again")
        files = {f"ssl_{k}": os.path.join(self.dir, v) for k, v in [
            ("ca_certs", "ca.crt"), ("certfile", "client.crt"),
            ("keyfile", "client.key")]}
        client = redis.Redis("127.0.0.1", self.port, ssl=True, **files)
        self.addCleanup(client.close)
        frames = client.lrange(f"{self.prefix}q:main", 0, -1)
        self.assertEqual(Item.fromJSON(frames[-1]).id, itemId)
        self.assertEqual(len(frames), 2)

    def test_untrustedServerIsRefused(self):
        """Without the private CA, the system's CAs do not vouch for it."""
        producer = Producer(config=self.config())
        self.addCleanup(producer.close)
        e = self.assertRaises(EnqueueError, producer.enqueue, "log", "secret")
        self.assertIsInstance(e.__cause__, ssl.SSLCertVerificationError)
        self.assertIn("certificate verify failed", str(e))


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

    def test_refusedLogin(self):
        """The broker's ERROR frame, read by the producer's own parser."""
        producer = self.producer(snqconfig.parse({
            "queue": {"backend": "stomp"},
            "stomp": {"login": "guest", "passcode": "n0t-this"}}))
        e = self.assertRaises(EnqueueError, producer.enqueue, "stamp", {})
        self.assertIsInstance(e.__cause__, BrokerError)
        self.assertIn("the broker refused: ", str(e))
        self.assertIn("tcp://127.0.0.1:61613", str(e))
        self.assertNotIn("n0t-this", str(e))

    def dropConnections(self, producer):
        [conn] = producer._backend.pool._idle
        port = conn.wire.sock.getsockname()[1]
        killed = rabbitmq.rabbitmqctl("eval", f"""
            [exit(P, kill) || P <- rabbit_stomp:list(),
             rabbit_stomp_reader:info(P, [peer_port]) =:= [{{peer_port, {port}}}]].""")
        self.assertEqual(killed.strip(), "[true]")
