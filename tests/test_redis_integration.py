# -*- test-case-name: tests.test_redis_integration -*-
"""
The Redis backend end to end: real C{twistd -n snq --inline} workers (or an
IoMaster in this process), a real Redis, items put there by C{snqctl} or by
the real C{redis-cli}; workers killed with SIGKILL, their connections with
C{CLIENT KILL}.

Each test has its own key prefix on db 1, deleted afterwards; without a
Redis on 127.0.0.1:6379 the tests fail.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import txredisapi
from twisted.internet import defer, error, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from snq import config as snqconfig
from snq.handlers import HandlerRegistry, QueueHandler
from snq.iomaster import IoMaster
from snq.item import Item
from snq.queues.redis import RedisQueue
from tests.daemon import Daemon, freePort, snqctl, waitFor
from tests.recorder import recorded
from tests.test_redis import REDIS_URL, RedisFixture, waitUntil

CONFIG = """
[daemon]
workers = 1
kill_time = 5

[queue]
backend = "redis"
lease = {lease}
poll_interval = 30
breakout = ["main/fast"]

[redis]
url = "{url}"
prefix = "{prefix}"

[transports.bulky]
group = "bulk"

[handlers]
record = "tests.recorder:Record"

[sites.default]
record_file = "{dir}/handled.txt"
"""


class RedisDaemonTests(RedisFixture, TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def setUp(self):
        yield self.setUpRedis()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.record = os.path.join(self.dir, "handled.txt")
        self.writeConfig()

    def writeConfig(self, lease=60):
        self.config = os.path.join(self.dir, "snq.toml")
        with open(self.config, "w") as f:
            f.write(CONFIG.format(lease=lease, url=REDIS_URL, prefix=self.prefix,
                                  dir=self.dir))

    def daemon(self):
        return Daemon(self, self.dir, "-c", self.config, "--inline")

    def started(self, daemon):
        return waitFor(lambda: "consuming groups" in daemon.output(),
                       what="the daemon to start")

    def until(self, command, name, value, what):
        """Wait until C{command} on key C{name} answers C{value}."""
        return waitUntil(lambda: self.redis.execute(
            command, self.key(name), again=True).addCallback(lambda v: v == value),
            timeout=30, what=what)

    def handled(self):
        return [itemId for itemId, _, _ in recorded(self.record)]

    def enqueue(self, n, payload="{}", transport="record"):
        result = snqctl("-c", self.config, "enqueue", transport, "-",
                        cwd=self.dir, stdin=(payload + "\n") * n)
        self.assertEqual(result.stdout.strip(), f"enqueued {n} items on {transport}")

    @defer.inlineCallbacks
    def readyIds(self, spec="main"):
        """
        The list's items (not its rings), and those a claim put in line
        (lines.lua).
        """
        frames = yield self.redis.execute("LRANGE", self.key(f"q:{spec}"), 0, -1)
        for p in (yield self.redis.execute("ZRANGE", self.key(f"levels:{spec}"),
                                           0, -1)):
            p = p.decode() if isinstance(p, bytes) else p
            for pair in (yield self.redis.execute(
                    "LRANGE", self.key(f"ring:{spec}/{p}"), 0, -1)):
                pair = pair.decode() if isinstance(pair, bytes) else pair
                frames += yield self.redis.execute(
                    "LRANGE", self.key(f"line:{spec}/{p}/{pair}"), 0, -1)
        return {json.loads(f)["id"] for f in frames if f != b"\0"}

    @defer.inlineCallbacks
    def assertEmpty(self):
        """Nothing ready, held or waiting: every item settled."""
        for name in ("q:main", "q:main/fast", "levels:main", "levels:main/fast",
                     "processing", "delayed:main"):
            exists = yield self.redis.execute("EXISTS", self.key(name))
            self.assertEqual(exists, 0, f"{name} is not empty")

    def redisCli(self, *args):
        result = subprocess.run(
            [shutil.which("redis-cli") or "redis-cli", "-h", "127.0.0.1", "-p",
             "6379", "-n", "1", *args], capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout.strip()

    @defer.inlineCallbacks
    def test_tenThousandItems(self):
        self.enqueue(10_000)
        ids = yield self.readyIds()
        self.assertEqual(len(ids), 10_000)
        start = time.monotonic()
        self.daemon()
        yield waitFor(lambda: len(self.handled()) >= 10_000,
                      what="10,000 items handled")
        elapsed = time.monotonic() - start
        yield self.until("EXISTS", "processing", 0, "the last acks")
        handled = self.handled()
        self.assertEqual(set(handled), ids)
        self.assertEqual(len(handled), 10_000, "no item twice without a crash")
        yield self.assertEmpty()
        print(f"\n10,000 items drained in {elapsed:.1f} s, process start "
              f"included ({10_000 / elapsed:,.0f} items/s)")

    @defer.inlineCallbacks
    def test_redisCliPushWakesAnIdleWorker(self):
        """
        Listening, not polling: with poll_interval 30 and lease 60 (a claim
        every 20 s), an item pushed by plain redis-cli is handled at once.
        """
        daemon = self.daemon()
        yield self.started(daemon)
        yield deferLater(reactor, 1, lambda: None)
        envelope = json.dumps({"transport": "record", "payload": {"x": "é"},
                               "id": "from-redis-cli"})
        sent = time.monotonic()
        self.assertEqual(self.redisCli("LPUSH", self.key("q:main"), envelope), "1")
        yield waitFor(lambda: self.handled() == ["from-redis-cli"], timeout=10,
                      interval=0.01, what="the pushed item handled")
        self.assertLess(time.monotonic() - sent, 5)
        # A breakout list has a doorbell of its own.
        envelope = json.dumps({"transport": "fast", "payload": 1, "id": "b"})
        self.redisCli("LPUSH", self.key("q:main/fast"), envelope)
        yield self.until("ZCARD", "dead", 1,
                         "the breakout item (no handler: a dead letter)")
        self.assertIn("no handler for transport 'fast'",
                      snqctl("-c", self.config, "dead", "list",
                             cwd=self.dir).stdout)

    @defer.inlineCallbacks
    def test_killDashNineMidItem(self):
        """The killed worker's item comes back when its lease expires."""
        self.writeConfig(lease=1.5)
        first = self.daemon()
        yield self.started(first)
        self.enqueue(1, '{"sleep": 2}')
        yield self.until("ZCARD", "processing", 1, "the item claimed")
        first.kill(signal.SIGKILL)
        killed = time.monotonic()
        second = self.daemon()
        yield waitFor(lambda: self.handled(), timeout=30,
                      what="the item handled by the second worker")
        self.assertGreater(time.monotonic() - killed, 1.0,
                           "not before the lease expired")
        [(_, pid, attempts)] = recorded(self.record)
        self.assertEqual(int(pid), second.process.pid)
        self.assertEqual(attempts, "1", "dying with the item is an attempt")
        yield self.until("EXISTS", "processing", 0, "the ack")
        self.assertIn("returned 1 items whose lease expired", second.output())

    @defer.inlineCallbacks
    def test_twoWorkersNeverShareAnItem(self):
        workers = [self.daemon(), self.daemon()]
        for worker in workers:
            yield self.started(worker)
        producer = RedisQueue(snqconfig.load(self.config))
        yield producer.open()
        self.addCleanup(producer.close)
        items = [Item(transport="record", payload={"sleep": 0.01})
                 for _ in range(3_000)]
        yield producer.enqueue(items)
        ids = {item.id for item in items}
        yield waitFor(lambda: len(self.handled()) >= 3_000,
                      what="3,000 items handled")
        lines = recorded(self.record)
        self.assertEqual(sorted(i for i, _, _ in lines), sorted(ids),
                         "each item exactly once")
        pids = {int(pid) for _, pid, _ in lines}
        self.assertEqual(pids, {w.process.pid for w in workers},
                         "both workers took items")
        yield self.until("EXISTS", "processing", 0, "the last acks")

    @defer.inlineCallbacks
    def clientIds(self, pid):
        """Redis client ids of the connections of the worker with this pid."""
        text = yield self.redis.execute("CLIENT", "LIST", again=True)
        return [line.split()[0].split(b"=")[1] for line in text.splitlines()
                if b" name=snq:" in line and f"-{pid}-".encode() in line]

    @defer.inlineCallbacks
    def test_clientKillMidDrain(self):
        """
        Its connections killed again and again while it drains, a worker
        reconnects and handles every item once: acknowledgements go again
        on the new connection; a claim whose answer was lost comes back when
        its lease expires.
        """
        self.writeConfig(lease=2)
        self.enqueue(5_000, '{"sleep": 0.02}')
        ids = yield self.readyIds()
        daemon = self.daemon()
        yield waitFor(lambda: len(self.handled()) >= 200,
                      what="a drain under way")
        kills = 0
        while len(self.handled()) < 4_000 and kills < 8:
            for clientId in (yield self.clientIds(daemon.process.pid)):
                yield self.redis.execute("CLIENT", "KILL", "ID", clientId)
                kills += 1
            yield deferLater(reactor, 0.25, lambda: None)
        self.assertGreaterEqual(kills, 4, "connections were killed mid-drain")
        yield waitFor(lambda: set(self.handled()) >= ids, timeout=60,
                      what="every item handled")
        yield self.until("EXISTS", "processing", 0, "the last acks")
        handled = self.handled()
        twice = [line for line in recorded(self.record)
                 if handled.count(line[0]) > 1]
        self.assertEqual(twice, [], "none twice")
        self.assertTrue(daemon.alive())
        self.assertGreaterEqual(len((yield self.clientIds(daemon.process.pid))), 2,
                                "reconnected: commands and doorbell")
        yield self.assertEmpty()

    @defer.inlineCallbacks
    def test_sigtermFinishesInFlightAndGivesBackTheRest(self):
        self.enqueue(300, '{"sleep": 2.0}')
        ids = yield self.readyIds()
        daemon = self.daemon()
        yield self.until("ZCARD", "processing", 100, "a window (prefetch) claimed")
        daemon.process.send_signal(signal.SIGTERM)
        yield waitFor(lambda: daemon.process.poll() is not None, timeout=15,
                      what="the daemon to exit")
        self.assertIn("Server Shut Down.", daemon.output())
        handled = set(self.handled())
        self.assertEqual(len(handled), 50, "what was running (concurrency 50)")
        self.assertEqual((yield self.zcard("processing")), 0)
        self.assertEqual(handled | (yield self.readyIds()), ids)

    @defer.inlineCallbacks
    def test_malformedEntriesAreDeadLettered(self):
        daemon = self.daemon()
        yield self.started(daemon)
        bad = ["not json", "[1, 2]", '{"transport": "record"}',
               '{"transport": "nosuch", "payload": 1}', "42",
               '{"transport": "record", "payload": 1, "v": 2}']
        self.redisCli("LPUSH", self.key("q:main"), *bad)
        # Not UTF-8: redis-cli cannot type it, the protocol can.
        yield self.redis.execute("LPUSH", self.key("q:main"), b"\xff\xfe")
        yield self.until("ZCARD", "dead", 7, "7 dead letters")
        self.assertTrue(daemon.alive())
        self.enqueue(1)
        yield waitFor(lambda: len(self.handled()) == 1,
                      what="a good item after the bad ones")

        listing = snqctl("-c", self.config, "dead", "list", "--json",
                         cwd=self.dir).stdout
        dead = [json.loads(line) for line in listing.splitlines()]
        self.assertEqual(sorted(d["reason"] for d in dead),
                         ["badhandler"] + ["baditem"] * 6)
        errors = {d["error"] for d in dead}
        self.assertIn("envelope has no 'payload'", errors)
        self.assertTrue(any(e.startswith("frame is not UTF-8") for e in errors))
        shown = snqctl("-c", self.config, "dead", "show", "1",
                       cwd=self.dir).stdout
        self.assertIn("frame: not json", shown)
        self.assertIn("reason: baditem", shown)

        nosuch = next(d["id"] for d in dead if d["reason"] == "badhandler")
        self.assertEqual(snqctl("-c", self.config, "dead", "retry", str(nosuch),
                                cwd=self.dir).stdout.strip(),
                         "requeued 1 dead letters")
        yield self.until("ZCARD", "dead", 7, "the retried one dead again")
        self.assertEqual(snqctl("-c", self.config, "dead", "purge", "--all",
                                cwd=self.dir).stdout.strip(),
                         "purged 7 dead letters")
        self.assertEqual(snqctl("-c", self.config, "dead", "list",
                                cwd=self.dir).stdout.strip(), "no dead letters")

    @defer.inlineCallbacks
    def test_snqctlEnqueueRoutes(self):
        """Its group's list, a breakout's, "main" for a stranger; delays wait."""
        for transport in ("record", "bulky", "fast", "stranger"):
            snqctl("-c", self.config, "enqueue", transport, "{}", cwd=self.dir)
        snqctl("-c", self.config, "enqueue", "record", "{}", "--delay", "60",
               cwd=self.dir)
        lengths = {}
        for spec in ("main", "bulk", "main/fast"):
            lengths[spec] = yield self.redis.execute("LLEN", self.key(f"q:{spec}"))
        self.assertEqual(lengths, {"main": 2, "bulk": 1, "main/fast": 1})
        self.assertEqual((yield self.zcard("delayed:main")), 1)


class ServerRestartTests(TestCase):
    """A Redis of the test's own, killed and started again under a worker."""

    timeout = 60

    def startServer(self):
        self.server = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port",
             str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return waitUntil(self.answers, 10, what="the redis-server")

    def answers(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), 0.2).close()
            return True
        except OSError:
            return False

    def killServer(self):
        if self.server.poll() is None:
            self.server.send_signal(signal.SIGKILL)
            self.server.wait(10)

    @defer.inlineCallbacks
    def test_workerCarriesOnAfterARestart(self):
        handled = []

        class Note(QueueHandler):
            def handle(self, item):
                handled.append(item.payload)

        self.port = freePort()
        yield self.startServer()
        self.addCleanup(self.killServer)
        config = snqconfig.parse({
            "queue": {"backend": "redis", "poll_interval": 30},
            "redis": {"url": f"redis://127.0.0.1:{self.port}/3"}})
        master = IoMaster(config, registry=HandlerRegistry({"note": Note}))
        yield master.startService()
        self.addCleanup(master.stopService)
        producer = RedisQueue(config)
        yield producer.open()
        self.addCleanup(producer.close)
        yield producer.enqueue([Item(transport="note", payload=1)])
        yield waitUntil(lambda: handled == [1], what="the first item")

        self.killServer()
        yield deferLater(reactor, 1, lambda: None)
        yield self.startServer()
        yield producer.enqueue([Item(transport="note", payload=2)])
        yield waitUntil(lambda: handled == [1, 2], timeout=20,
                        what="an item pushed after the restart")
        # Claims that found Redis gone were logged, as they should be.
        self.flushLoggedErrors(error.ConnectError, txredisapi.ConnectionError)


class InProcessTests(RedisFixture, TestCase):
    """An IoMaster in this process, for what needs no process boundary."""

    timeout = 120

    setUp = RedisFixture.setUpRedis

    @defer.inlineCallbacks
    def test_retriedItemRunsAgainWhenDue(self):
        """A failing item waits in the delayed set, then runs again: the
        idle worker wakes for it by timer, not by polling."""
        attempts = []

        class FailOnce(QueueHandler):
            def handle(self, item):
                attempts.append((item.attempts, time.monotonic()))
                return item.attempts > 0

        config = snqconfig.parse({
            "queue": {"backend": "redis", "retry_delay": 0.5,
                      "poll_interval": 30},
            "redis": {"url": REDIS_URL, "prefix": self.prefix}})
        master = IoMaster(config, registry=HandlerRegistry({"flaky": FailOnce}))
        yield master.startService()
        self.addCleanup(master.stopService)
        yield master.queue.enqueue([Item(transport="flaky", payload=None)])
        yield waitFor(lambda: len(attempts) == 2, timeout=10,
                      what="the retry")
        (first, t0), (second, t1) = attempts
        self.assertEqual((first, second), (0, 1))
        self.assertTrue(0.25 <= t1 - t0 < 2, t1 - t0)
        yield waitFor(lambda: master.stats.total("handled") == 1,
                      what="the retry acknowledged")

