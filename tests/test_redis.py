# -*- test-case-name: tests.test_redis -*-
"""
The Redis backend, piece by piece: addresses and routing (no server), the
queue's storage on a real Redis with a L{Clock} for its time (leases, due
times; the commands run on the real reactor), the connection's recovery,
the doorbell and the listening manager on fakes.

Every test uses db 1 and a key prefix of its own, deleted afterwards, and
fails (never skips) when Redis is not running on 127.0.0.1:6379.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid

import txredisapi
from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from snq import config as snqconfig
from snq.dispatch import Dispatcher
from snq.handlers import HandlerRegistry, QueueHandler
from snq.item import Item
from snq.queues import makeQueue
from snq.queues.interface import Delivery, Depth
from snq.queues.redis import Lease, RedisManager, RedisQueue
from snq.redis.address import RedisAddress, masterQuery, primaryFromReply
from snq.redis.connection import RedisConnection
from snq.redis.doorbell import BLOCK, Doorbell

REDIS_URL = "redis://127.0.0.1:6379/1"
NO_REDIS = ("Redis must run on 127.0.0.1:6379 for this test (start it with "
            "`redis-server --daemonize yes --bind 127.0.0.1 --port 6379 "
            "--save '' --appendonly no`)")


def redisConfig(prefix, queue=None, redis=None, **sections):
    return snqconfig.parse({
        "queue": {"backend": "redis", **(queue or {})},
        "redis": {"url": REDIS_URL, "prefix": prefix, **(redis or {})},
        **sections})


def waitUntil(condition, timeout=20.0, what="condition"):
    """Poll C{condition} (may return a Deferred) on the real reactor."""
    deadline = time.monotonic() + timeout

    @defer.inlineCallbacks
    def loop():
        while not (yield defer.maybeDeferred(condition)):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s: {what}")
            yield deferLater(reactor, 0.02, lambda: None)

    return loop()


class RedisFixture:
    """
    For TestCases: a unique prefix, a plain connection (C{self.redis}) to
    look at keys, and cleanup of every key under the prefix.
    """

    @defer.inlineCallbacks
    def setUpRedis(self):
        self.prefix = f"snqtest-{uuid.uuid4().hex[:10]}:"
        self.redis = RedisConnection(RedisAddress.fromURL(REDIS_URL),
                                     "snqtest", 5.0)
        self.redis.start()
        try:
            yield self.redis.whenConnected()
        except Exception as e:
            yield self.redis.stop()
            self.fail(f"{NO_REDIS}: {e}")
        self.addCleanup(self.redis.stop)
        self.addCleanup(self.deleteKeys)

    @defer.inlineCallbacks
    def deleteKeys(self):
        cursor = b"0"
        while True:
            cursor, keys = yield self.redis.execute(
                "SCAN", cursor, "MATCH", self.prefix + "*", "COUNT", 1000)
            if keys:
                yield self.redis.execute("DEL", *keys)
            if cursor == b"0":
                return

    def key(self, name):
        return self.prefix + name

    def llen(self, name):
        return self.redis.execute("LLEN", self.key(name))

    def zcard(self, name):
        return self.redis.execute("ZCARD", self.key(name))


class AddressTests(SynchronousTestCase):
    def test_fullURL(self):
        a = RedisAddress.fromURL("rediss://snq:s%40cret@redis.example:6380/3")
        self.assertEqual(a, RedisAddress("redis.example", 6380, 3, "snq",
                                         "s@cret", True))
        self.assertEqual(a.describe(), "rediss://snq:***@redis.example:6380/3")

    def test_defaults(self):
        a = RedisAddress.fromURL("redis://localhost")
        self.assertEqual((a.port, a.db, a.username, a.password, a.tls),
                         (6379, 0, None, None, False))
        self.assertEqual(RedisAddress.fromURL("redis://:pw@h/2").describe(),
                         "redis://:***@h:6379/2")

    def test_badURL(self):
        for url in ("redis://h/x", "redis://h:port/0", "http://h/0"):
            self.assertRaises(ValueError, RedisAddress.fromURL, url)

    def test_sentinelURL(self):
        a = RedisAddress.fromURL(
            "redis+sentinel://:s%40cret@10.0.0.1:26380,s2,[::1]:5000/my%20master/2")
        self.assertEqual((a.sentinels, a.master, a.db, a.password),
                         ((("10.0.0.1", 26380), ("s2", 26379), ("::1", 5000)),
                          "my master", 2, "s@cret"))
        self.assertEqual(a.describe(), "redis+sentinel://:***@10.0.0.1:26380,"
                         "s2:26379,[::1]:5000/my%20master/2")
        self.assertEqual(RedisAddress.fromURL("redis+sentinel://s/m").db, 0)

    def test_primaryFromSentinelReply(self):
        """What a Sentinel names is a plain address with the URL's login."""
        a = RedisAddress.fromURL("redis+sentinel://u:pw@s:1/m/3")
        self.assertEqual(primaryFromReply(a, [b"10.1.1.1", b"6380"]),
                         RedisAddress("10.1.1.1", 6380, 3, "u", "pw"))
        self.assertIsNone(primaryFromReply(a, None))
        self.assertEqual(masterQuery(a),
                         ("SENTINEL", "get-master-addr-by-name", "m"))

    def test_badSentinelURL(self):
        for url in ("redis+sentinel://s:x/m", "redis+sentinel://s/",
                    "redis+sentinel://s/m/x", "redis+sentinel://s/m/1/2",
                    "redis+sentinel://s1,/m"):
            self.assertRaises(ValueError, RedisAddress.fromURL, url)


class Xmpp(QueueHandler):
    group = "xmpp"


class RoutingTests(SynchronousTestCase):
    """Which list an item goes to and which lists a worker takes from."""

    def queue(self, **queueConfig):
        config = redisConfig("r:", queueConfig,
                             transports={"slow": {"group": "bulk"}})
        queue = RedisQueue(config, clock=Clock(), claimant="c")
        queue.routing._registry = HandlerRegistry({"jabber": Xmpp})
        return queue

    def test_groups(self):
        q = self.queue()
        route = {t: q.route(Item(transport=t, payload=None))
                 for t in ("webhook", "jabber", "slow", "unknown")}
        self.assertEqual(route, {"webhook": "main", "jabber": "xmpp",
                                 "slow": "bulk", "unknown": "main"})
        self.assertEqual(q.listKey(route["jabber"]), "r:q:xmpp")

    def test_breakouts(self):
        q = self.queue(breakout=["main/webhook", "main/webhook/big",
                                 "xmpp/jabber"])
        self.assertEqual(
            [q.route(Item(transport=t, payload=None, site=s)) for t, s in
             [("webhook", "big"), ("webhook", "small"), ("jabber", "big"),
              ("log", "big")]],
            ["main/webhook/big", "main/webhook", "xmpp/jabber", "main"])

    def test_consumedLists(self):
        """Active groups and their breakouts only."""
        q = self.queue(groups=["main", "bulk"],
                       breakout=["main/webhook", "xmpp/jabber", "bulk/slow/a"])
        self.assertEqual(q.consumed, ["main", "bulk", "bulk/slow/a",
                                      "main/webhook"])

    def test_makeQueue(self):
        q = makeQueue(redisConfig("r:"), Clock(), claimant="w/1\n")
        self.assertIsInstance(q, RedisQueue)
        self.assertEqual(q.claimant, "w_1_")
        self.assertIs(q.managerClass, RedisManager)


class RedisQueueTests(RedisFixture, TestCase):
    """Storage on a real Redis; time from a Clock."""

    @defer.inlineCallbacks
    def setUp(self):
        yield self.setUpRedis()
        self.clock = Clock()
        self.clock.advance(1000)

    @defer.inlineCallbacks
    def open(self, claimant="a", **queueConfig):
        queue = RedisQueue(redisConfig(self.prefix, {"lease": 60, **queueConfig}),
                           clock=self.clock, claimant=claimant)
        yield queue.open()
        self.addCleanup(queue.close)
        return queue

    def items(self, n, transport="log", created=0, **kw):
        return [Item(transport=transport, payload=i, created=created, **kw)
                for i in range(n)]

    @staticmethod
    def payloads(deliveries):
        return [Item.fromJSON(d.frame).payload for d in deliveries]

    @defer.inlineCallbacks
    def test_roundTrip(self):
        a = yield self.open()
        items = self.items(3)
        yield a.enqueue(items)
        self.assertEqual((yield self.llen("q:main")), 3)
        claimed = yield a.claim(10)
        self.assertEqual([Item.fromJSON(d.frame) for d in claimed], items,
                         "first in, first out, frames intact")
        self.assertEqual((yield self.llen("q:main")), 0)
        self.assertEqual((yield self.zcard("processing")), 3)
        score = yield self.redis.execute("ZSCORE", self.key("processing"),
                                         claimed[0].token.member)
        self.assertEqual(float(score), 1060.0, "deadline = now + lease")
        for d in claimed:
            yield a.ack(d)
        self.assertEqual((yield self.zcard("processing")), 0)

    @defer.inlineCallbacks
    def test_acknowledgementsAreGrouped(self):
        """The first goes at once; those made meanwhile go together next."""
        a = yield self.open()
        yield a.enqueue(self.items(50))
        claimed = yield a.claim(50)
        sent = []
        execute = a.connection.execute

        def spy(*args, **kw):
            sent.append(args[0])
            return execute(*args, **kw)

        a.connection.execute = spy
        yield defer.gatherResults([a.ack(d) for d in claimed])
        self.assertEqual(sent, ["ZREM", "ZREM"])
        self.assertEqual((yield self.zcard("processing")), 0)

    @defer.inlineCallbacks
    def test_claimInBatchesAndExclusively(self):
        a = yield self.open("a")
        b = yield self.open("b")
        yield a.enqueue(self.items(250))
        first, second = yield defer.gatherResults([a.claim(100), b.claim(200)])
        self.assertEqual((len(first), len(second)), (100, 150))
        self.assertEqual(sorted(self.payloads(first) + self.payloads(second)),
                         list(range(250)))
        self.assertEqual((yield a.claim(10)), [])

    @defer.inlineCallbacks
    def test_identicalFramesAreDistinct(self):
        """Two producers pushing the same bytes get two items."""
        a = yield self.open()
        frame = b'{"transport":"log","payload":1,"id":"same"}'
        yield self.redis.execute("LPUSH", self.key("q:main"), frame, frame)
        claimed = yield a.claim(10)
        self.assertEqual([d.frame for d in claimed], [frame, frame])
        yield a.ack(claimed[0])
        self.assertEqual((yield self.zcard("processing")), 1)

    @defer.inlineCallbacks
    def test_framesComeBackAsBytes(self):
        """No decoding, no number conversion: bad frames reach the dispatcher
        as they are, to be dead-lettered with the right reason."""
        a = yield self.open()
        frames = [b"\xff\xfe not utf-8", b"123", b"1.5", b"", b"[1, 2]"]
        yield self.redis.execute("LPUSH", self.key("q:main"), *frames)
        claimed = yield a.claim(10)
        self.assertEqual([d.frame for d in claimed], frames)

    @defer.inlineCallbacks
    def test_redisCliLPush(self):
        """An outside producer with nothing but the real redis-cli."""
        a = yield self.open()
        envelope = json.dumps({"transport": "log", "payload": {"a": [1, "é"]},
                               "site": "ex"})
        result = subprocess.run(
            [shutil.which("redis-cli") or "redis-cli", "-h", "127.0.0.1", "-p",
             "6379", "-n", "1", "LPUSH", self.key("q:main"), envelope],
            capture_output=True, text=True, timeout=30)
        self.assertEqual((result.returncode, result.stdout.strip()), (0, "1"),
                         result.stderr)
        [delivery] = yield a.claim(10)
        item = Item.fromJSON(delivery.frame)
        self.assertEqual((item.transport, item.site, item.payload),
                         ("log", "ex", {"a": [1, "é"]}))

    @defer.inlineCallbacks
    def test_breakoutListsAreConsumedFairly(self):
        a = yield self.open(breakout=["main/hook"])
        yield a.enqueue(self.items(20, "log") + self.items(20, "hook"))
        self.assertEqual((yield self.llen("q:main/hook")), 20)
        transports = set()
        for _ in range(2):
            claimed = yield a.claim(5)
            transports |= {Item.fromJSON(d.frame).transport for d in claimed}
        self.assertEqual(transports, {"log", "hook"},
                         "claims start at a different list each time")

    @defer.inlineCallbacks
    def test_expiredLeaseReturnsWithOneMoreAttempt(self):
        a = yield self.open("a")
        b = yield self.open("b")
        yield a.enqueue(self.items(2))
        held = yield a.claim(10)
        self.clock.advance(59)
        yield b.tend([])
        self.assertEqual((yield self.zcard("processing")), 2, "not yet expired")
        self.clock.advance(2)
        yield b.tend([])
        self.assertEqual((yield b.depth()).ready, 2, "back in line")
        retaken = yield b.claim(10)
        self.assertEqual([Item.fromJSON(d.frame).attempts for d in retaken],
                         [1, 1], "dying with the item counts as an attempt")
        self.assertEqual(sorted(self.payloads(retaken)), [0, 1])
        # The dead worker's late acknowledgement changes nothing.
        yield a.ack(held[0])
        yield a.retry(held[1], Item.fromJSON(held[1].frame).retried(), 5, "x")
        self.assertEqual((yield self.zcard("processing")), 2)
        self.assertEqual((yield self.zcard("delayed:main")), 0)

    @defer.inlineCallbacks
    def test_renewedLeaseIsNotReaped(self):
        a = yield self.open("a")
        b = yield self.open("b")
        yield a.enqueue(self.items(2))
        held = yield a.claim(10)
        self.clock.advance(40)
        yield a.tend(held[:1])
        self.clock.advance(40)
        yield b.tend([])
        self.assertEqual(self.payloads((yield b.claim(10))), [1],
                         "only the lease that was not renewed expired")
        yield a.ack(held[0])
        self.assertEqual((yield self.zcard("processing")), 1)

    @defer.inlineCallbacks
    def test_reapersRacing(self):
        """Several workers reaping at once return each item once."""
        queues = []
        for name in "abcd":
            queues.append((yield self.open(name)))
        yield queues[0].enqueue(self.items(300))
        yield queues[0].claim(300)
        self.clock.advance(61)
        counts = yield defer.gatherResults([q.reap(self.clock.seconds())
                                            for q in queues])
        self.assertEqual(sum(counts), 300)
        self.assertEqual((yield queues[0].depth()).ready, 300)
        self.assertEqual((yield self.zcard("processing")), 0)

    @defer.inlineCallbacks
    def test_retryWaitsInDelayedSet(self):
        a = yield self.open()
        yield a.enqueue(self.items(1))
        [d] = yield a.claim(10)
        retried = Item.fromJSON(d.frame).retried()
        yield a.retry(d, retried, 30, "remote said no")
        self.assertEqual(a.nextDue, 1030)
        self.assertEqual((yield self.zcard("processing")), 0)
        self.clock.advance(29.9)
        self.assertEqual((yield a.claim(10)), [])
        self.assertEqual(a.nextDue, 1030, "the claim reports the next due time")
        self.clock.advance(0.1)
        [again] = yield a.claim(10)
        self.assertEqual(Item.fromJSON(again.frame), retried)
        self.assertIsNone(a.nextDue)
        self.assertEqual((yield self.zcard("delayed:main")), 0)

    @defer.inlineCallbacks
    def test_delayedEnqueue(self):
        a = yield self.open()
        yield a.enqueue(self.items(2), delay=10)
        self.assertEqual((yield a.claim(10)), [])
        self.clock.advance(10)
        self.assertEqual(self.payloads((yield a.claim(10))), [0, 1])

    @defer.inlineCallbacks
    def test_eachItemAtItsRunAt(self):
        """In one batch: now, at its own run_at, or after the batch's delay."""
        a = yield self.open()
        now = self.clock.seconds()
        items = [Item(transport="t", payload=0),
                 Item(transport="t", payload=1, run_at=now + 20),
                 Item(transport="t", payload=2, run_at=now - 5)]
        yield a.enqueue(items)
        self.assertEqual(self.payloads((yield a.claim(10))), [0, 2])
        self.assertEqual(a.nextDue, now + 20)
        self.clock.advance(20)
        self.assertEqual(self.payloads((yield a.claim(10))), [1])

    @defer.inlineCallbacks
    def test_releaseGivesBackUnchangedInOrder(self):
        a = yield self.open("a")
        b = yield self.open("b")
        yield a.enqueue(self.items(5))
        held = yield a.claim(3)
        yield a.release(held)
        again = yield b.claim(10)
        self.assertEqual(self.payloads(again), [0, 1, 2, 3, 4])
        self.assertEqual([d.frame for d in again[:3]], [d.frame for d in held])

    @defer.inlineCallbacks
    def test_deadLetters(self):
        a = yield self.open()
        yield a.enqueue(self.items(1, "hook", site="ex"))
        yield self.redis.execute("LPUSH", self.key("q:main"), b"\xffbad")
        good, bad = yield a.claim(10)
        self.clock.advance(5)
        yield a.deadLetter(good, "rejected", "410 Gone", 3)
        yield a.deadLetter(bad, "baditem", "frame is not UTF-8", 0)
        self.assertEqual((yield self.zcard("processing")), 0)
        newest, oldest = yield a.deadList()
        self.assertEqual(
            (oldest.id, oldest.item_id, oldest.transport, oldest.site,
             oldest.reason, oldest.error, oldest.attempts, oldest.died),
            (1, Item.fromJSON(good.frame).id, "hook", "ex", "rejected",
             "410 Gone", 3, 1005))
        self.assertEqual(oldest.frame, good.frame)
        self.assertEqual((newest.id, newest.item_id, newest.reason),
                         (2, None, "baditem"))
        self.assertEqual(newest.frame, b"\xffbad", "kept byte for byte")
        self.assertEqual((yield a.deadShow(1)), oldest)
        self.assertIsNone((yield a.deadShow(99)))
        self.assertEqual([d.id for d in (yield a.deadList(1))], [2])

        self.assertEqual((yield a.deadRetry([1])), 1)
        [back] = yield a.claim(10)
        item = Item.fromJSON(back.frame)
        self.assertEqual((item.id, item.attempts), (oldest.item_id, 0))
        self.assertEqual((yield a.deadRetry([1])), 0, "already gone")
        self.assertEqual((yield a.deadPurge(None)), 1)
        self.assertEqual((yield a.deadList()), [])

    @defer.inlineCallbacks
    def test_deadWorkersClaimsBackChargingOnlyTheRunning(self):
        a = yield self.open("host-w.0-1a2b3c4d")
        b = yield self.open("host-w.1-5e6f7a8b")
        yield a.enqueue(self.items(4))
        mine = yield a.claim(3)
        [theirs] = yield b.claim(10)
        returned = yield b.returnClaims(
            "host-w.0-1a2b3c4d", {a.journalKey(mine[0]), b"unknown/1.1"})
        self.assertEqual(returned, (3, 1))
        self.assertEqual((yield self.zcard("processing")), 1, "b's alone")
        again = yield b.claim(10)
        self.assertEqual([(i.payload, i.attempts) for i in
                          (Item.fromJSON(d.frame) for d in again)],
                         [(0, 1), (1, 0), (2, 0)],
                         "in their order; the running one charged")
        self.assertEqual(Item.fromJSON(theirs.frame).payload, 3)
        self.assertEqual((yield b.returnClaims("nobody", set())), (0, 0))

    @defer.inlineCallbacks
    def test_deadRetryAllAndPurgeSome(self):
        a = yield self.open()
        yield a.enqueue(self.items(4))
        for n, d in enumerate((yield a.claim(10))):
            yield a.deadLetter(d, "retries", f"e{n}", 11)
        self.assertEqual((yield a.deadPurge([2, 3, 42])), 2)
        self.assertEqual((yield a.deadRetry()), 2)
        self.assertEqual(self.payloads((yield a.claim(10))), [0, 3])
        self.assertEqual((yield self.zcard("dead")), 0)

    @defer.inlineCallbacks
    def test_lostLeaseIsNotDeadLettered(self):
        a = yield self.open("a")
        yield a.enqueue(self.items(1))
        [d] = yield a.claim(1)
        self.clock.advance(61)
        yield a.reap(self.clock.seconds())
        yield a.deadLetter(d, "rejected", "late", 0)
        self.assertEqual((yield a.deadList()), [])
        self.assertEqual((yield a.depth()).ready, 1)

    @defer.inlineCallbacks
    def test_depth(self):
        a = yield self.open(breakout=["main/hook"])
        yield a.enqueue(self.items(3, created=990) + self.items(1, "hook"))
        yield a.enqueue(self.items(2), delay=30)
        _held, first = yield a.claim(2)
        yield a.deadLetter(first, "rejected", "no", 0)
        depth = yield a.depth()
        self.assertEqual(depth, Depth(ready=2, delayed=2, held=1, dead=1,
                                      oldest=10.0))
        self.clock.advance(40)
        depth = yield a.depth()
        self.assertEqual((depth.ready, depth.delayed, depth.oldest), (4, 0, 50))
        yield a.claim(10)
        self.assertEqual((yield a.depth()).oldest, None)

    @defer.inlineCallbacks
    def test_scriptsSurviveScriptFlush(self):
        a = yield self.open()
        yield self.redis.execute("SCRIPT", "FLUSH")
        yield a.enqueue(self.items(1))
        self.assertEqual(len((yield a.claim(1))), 1)

    @defer.inlineCallbacks
    def test_openFailsClearlyWithoutServer(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        queue = RedisQueue(snqconfig.parse({"redis": {
            "url": f"redis://127.0.0.1:{port}/0", "timeout": 2}}))
        e = yield self.assertFailure(queue.open(), txredisapi.ConnectionError)
        self.assertIn(f"127.0.0.1:{port}", str(e))
        self.assertIsNone(queue.connection)


class ConnectionTests(RedisFixture, TestCase):
    """Recovery: killed connections, refused handshakes."""

    setUp = RedisFixture.setUpRedis

    def clientIds(self, name):
        d = self.redis.execute("CLIENT", "LIST")
        return d.addCallback(lambda text: [
            line.split()[0].split(b"=")[1] for line in text.splitlines()
            if f" name={name} ".encode() in line])

    @defer.inlineCallbacks
    def killClients(self, name):
        ids = yield self.clientIds(name)
        for clientId in ids:
            yield self.redis.execute("CLIENT", "KILL", "ID", clientId)
        return len(ids)

    def connection(self, url=REDIS_URL, name=None):
        c = RedisConnection(RedisAddress.fromURL(url),
                            name or f"{self.prefix}conn", 5.0)
        c.start()
        self.addCleanup(c.stop)
        return c

    @defer.inlineCallbacks
    def test_clientKillReconnects(self):
        c = self.connection()
        yield c.execute("SET", self.key("k"), "1")
        self.assertEqual((yield self.killClients(c.name)), 1)
        # Idempotent commands go again on the next connection.
        self.assertEqual((yield c.execute("GET", self.key("k"), again=True)), b"1")
        self.assertEqual(len((yield self.clientIds(c.name))), 1)

    @defer.inlineCallbacks
    def test_pendingCommandFailsWithConnectionError(self):
        """What was in flight when the connection died errs (a claim is
        never sent twice); the next command reconnects."""
        c = self.connection()
        yield c.whenConnected()
        blocked = c.blocking(30, "BLPOP", self.key("nothing"), 30)
        yield waitUntil(lambda: self.clientIds(c.name).addCallback(bool))
        yield deferLater(reactor, 0.1, lambda: None)
        yield self.killClients(c.name)
        yield self.assertFailure(blocked, txredisapi.ConnectionError)
        self.assertEqual((yield c.execute("PING")), "PONG")

    @defer.inlineCallbacks
    def test_stopWhileTheHandshakeWaits(self):
        """A server that accepts and never answers: stopping still stops."""
        from twisted.internet.protocol import Factory, Protocol

        accepted = []

        class Silent(Protocol):
            def connectionMade(self):
                accepted.append(self)

        port = reactor.listenTCP(0, Factory.forProtocol(Silent),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        c = RedisConnection(RedisAddress("127.0.0.1", port.getHost().port),
                            "silent", 5.0)
        c.start()
        waiting = c.whenConnected()
        yield waitUntil(lambda: accepted, what="the connection")
        yield c.stop()
        yield self.assertFailure(waiting, txredisapi.ConnectionError)
        yield waitUntil(lambda: not accepted[0].transport.connected,
                        what="the connection closed")

    @defer.inlineCallbacks
    def test_refusedHandshakeIsRetriedUntilItWorks(self):
        """
        txredisapi stops reconnecting for good when SELECT fails; snq keeps
        trying with backoff: here a user may not SELECT until an operator
        fixes its ACL.
        """
        user = f"snqtest-{uuid.uuid4().hex[:8]}"
        yield self.redis.execute("ACL", "SETUSER", user, "on", ">pw", "~*",
                                 "&*", "+@all", "-select")
        self.addCleanup(self.redis.execute, "ACL", "DELUSER", user)
        c = self.connection(f"redis://{user}:pw@127.0.0.1:6379/1")
        e = yield self.assertFailure(c.whenConnected(), txredisapi.ConnectionError)
        self.assertIn("NOPERM", str(e))
        ready = c.whenConnected(failAfterFailures=None)
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertNoResult(ready)
        yield self.redis.execute("ACL", "SETUSER", user, "+select")
        protocol = yield ready
        self.assertIs(protocol, c.current)
        yield c.execute("SET", self.key("acl"), "1")
        self.assertEqual((yield self.redis.execute("GET", self.key("acl"))), b"1",
                         "the connection is on db 1")

    @defer.inlineCallbacks
    def test_wrongPasswordFailsOpen(self):
        queue = RedisQueue(redisConfig(self.prefix, redis={
            "url": "redis://nobody:wrong@127.0.0.1:6379/1"}))
        e = yield self.assertFailure(queue.open(), txredisapi.ConnectionError)
        self.assertIn("WRONGPASS", str(e))
        self.assertIn("nobody:***@", str(e))
        self.assertNotIn("wrong@", str(e))


class TLSTests(RedisFixture, TestCase):
    """C{rediss://} against a redis-server of the test's own, TLS only."""

    @defer.inlineCallbacks
    def setUp(self):
        yield self.setUpRedis()
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        ca = self.pem("ca", "-x509", "-subj", "/CN=snq test CA")
        self.pem("server", "-subj", "/CN=127.0.0.1", ca=ca,
                 ext="subjectAltName=IP:127.0.0.1")
        self.pem("client", "-subj", "/CN=snq client", ca=ca)
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        path = lambda name: os.path.join(self.dir, name)  # noqa: E731
        self.server = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", "0",
             "--tls-port", str(self.port), "--bind", "127.0.0.1",
             "--tls-cert-file", path("server.crt"),
             "--tls-key-file", path("server.key"),
             "--tls-ca-cert-file", path("ca.crt"), "--tls-auth-clients", "yes",
             "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(self.stopServer)
        yield waitUntil(self.listening, 10, "the TLS redis-server")

    def listening(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), 0.2).close()
            return True
        except OSError:
            return False

    def stopServer(self):
        self.server.send_signal(signal.SIGKILL)
        self.server.wait(10)

    def pem(self, name, *subject, ca=None, ext=None):
        """A key and a certificate, self-signed or signed by C{ca}."""
        key, crt = (os.path.join(self.dir, f"{name}.{x}") for x in ("key", "crt"))

        def openssl(*args):
            subprocess.run(["openssl", *args], check=True, capture_output=True,
                           timeout=60)

        if ca is None:
            openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", crt, "-days", "2", *subject)
        else:
            csr = os.path.join(self.dir, f"{name}.csr")
            openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", csr, *subject)
            extra = []
            if ext:
                extfile = os.path.join(self.dir, f"{name}.ext")
                with open(extfile, "w") as f:
                    f.write(ext + "\n")
                extra = ["-extfile", extfile]
            openssl("x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0],
                    "-CAcreateserial", "-out", crt, "-days", "2", *extra)
        return key, crt

    @defer.inlineCallbacks
    def test_rediss(self):
        d = lambda name: os.path.join(self.dir, name)  # noqa: E731
        config = snqconfig.parse({"queue": {"backend": "redis"}, "redis": {
            "url": f"rediss://127.0.0.1:{self.port}/0", "prefix": self.prefix,
            "ca_file": d("ca.crt"), "cert_file": d("client.crt"),
            "key_file": d("client.key")}})
        queue = RedisQueue(config)
        yield queue.open()
        self.addCleanup(queue.close)
        yield queue.enqueue([Item(transport="log", payload="secret")])
        [delivery] = yield queue.claim(1)
        self.assertEqual(Item.fromJSON(delivery.frame).payload, "secret")
        yield queue.ack(delivery)

    @defer.inlineCallbacks
    def test_untrustedServerIsRefused(self):
        """Without the private CA, the system's CAs do not vouch for it."""
        d = lambda name: os.path.join(self.dir, name)  # noqa: E731
        queue = RedisQueue(snqconfig.parse({"redis": {
            "url": f"rediss://127.0.0.1:{self.port}/0", "timeout": 5,
            "cert_file": d("client.crt"), "key_file": d("client.key")}}))
        e = yield self.assertFailure(queue.open(), txredisapi.ConnectionError)
        self.assertIn("certificate verify failed", str(e))
        self.assertIsNone(queue.connection)


class FakeConnection:
    """Blocking commands answered by the test."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.waits = []
        self.running = None

    def start(self):
        self.running = True

    def stop(self):
        self.running = False
        return defer.succeed(None)

    def blocking(self, seconds, *args):
        d = defer.Deferred()
        self.waits.append((args, d))
        return d


class DoorbellTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.connection = FakeConnection(self.clock)
        self.rings = []
        self.bell = Doorbell(self.connection, "snq:q:main",
                             lambda: self.rings.append(self.clock.seconds()))
        self.bell.start()

    def answer(self, result):
        args, d = self.connection.waits[-1]
        self.assertEqual(args, ("BLMOVE", "snq:q:main", "snq:q:main", "RIGHT",
                                "RIGHT", BLOCK))
        if isinstance(result, Exception):
            d.errback(result)
        else:
            d.callback(result)

    def test_ringsOnceWhenSomethingCame(self):
        self.bell.arm()
        self.bell.arm()
        self.assertEqual(len(self.connection.waits), 1, "armed once")
        self.answer(None)
        self.assertEqual((self.rings, len(self.connection.waits)), ([], 2),
                         "a wait that timed out is renewed")
        self.answer(b"frame")
        self.assertEqual((self.rings, self.bell.armed), ([0], False))
        self.assertEqual(len(self.connection.waits), 2, "not rearmed by itself")

    def test_lostConnectionRings(self):
        """The manager then claims, and arms it again: a reconnect later."""
        self.bell.arm()
        self.answer(txredisapi.ConnectionError("Lost connection"))
        self.assertEqual((self.rings, self.bell.armed), ([0], False))

    def test_otherErrorsRingLater(self):
        self.bell.arm()
        self.answer(txredisapi.ResponseError("WRONGTYPE not a list"))
        self.assertEqual(self.rings, [])
        self.clock.advance(BLOCK)
        self.assertEqual(self.rings, [BLOCK])
        self.assertEqual(len(self.flushLoggedErrors(txredisapi.ResponseError)), 1)

    def test_stopCancelsALaterRing(self):
        self.bell.arm()
        self.answer(txredisapi.ResponseError("WRONGTYPE not a list"))
        self.flushLoggedErrors(txredisapi.ResponseError)
        self.successResultOf(self.bell.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stoppedNeverRings(self):
        self.bell.arm()
        self.successResultOf(self.bell.stop())
        self.assertFalse(self.connection.running)
        self.answer(txredisapi.ConnectionError("Lost connection"))
        self.bell.arm()
        self.assertEqual((self.rings, len(self.connection.waits)), ([], 1))


class FakeListener:
    def __init__(self, ring):
        self.ring = ring
        self.armed = 0
        self.listening = True

    def stopListening(self):
        self.listening = False
        return defer.succeed(None)

    def arm(self):
        self.armed += 1


class ScriptedQueue:
    """Claims from C{ready}; reports C{due} as the next due time."""

    def __init__(self, clock):
        self.clock = clock
        self.ready = []
        self.nextDue = None
        self.claims = []
        self.listener = None
        self.acked = []

    def listen(self, wake):
        self.listener = FakeListener(wake)
        return self.listener

    def claim(self, limit, transports=None):
        self.claims.append(self.clock.seconds())
        if self.nextDue is not None and self.nextDue <= self.clock.seconds():
            self.nextDue = None  # what fell due is claimable now
        taken, self.ready = self.ready[:limit], self.ready[limit:]
        return defer.succeed(taken)

    def push(self, *payloads):
        self.ready += [Delivery(Item(transport="t", payload=p).toJSON())
                       for p in payloads]

    def ack(self, delivery):
        self.acked.append(Item.fromJSON(delivery.frame).payload)
        return defer.succeed(None)

    def release(self, deliveries):
        return defer.succeed(None)

    def tend(self, deliveries):
        return defer.succeed(None)


class Gated(QueueHandler):
    def handle(self, item):
        if item.payload == "gate":
            d = defer.Deferred()
            self.context.gates.append(d)
            return d
        return True


class RedisManagerTests(SynchronousTestCase):
    """The listening manager on a Clock: claims, sleeps, wakes."""

    def setUp(self):
        self.clock = Clock()
        self.queue = ScriptedQueue(self.clock)
        self.config = snqconfig.parse({"queue": {"prefetch": 4, "lease": 30}})
        dispatcher = Dispatcher(self.queue, HandlerRegistry({"t": Gated}),
                                self.config, clock=self.clock)
        dispatcher.context.gates = self.gates = []
        self.manager = RedisManager(self.queue, dispatcher, self.config, None,
                                    self.clock)

    def start(self):
        self.manager.startService()
        self.clock.advance(0)

    def armed(self):
        return self.queue.listener.armed

    def test_idleWorkerWaitsForTheDoorbellNotATimer(self):
        self.start()
        self.assertEqual(self.queue.claims, [0])
        self.assertEqual(self.armed(), 1)
        self.assertTrue(self.manager.idle)
        self.clock.advance(9)
        self.assertEqual(self.queue.claims, [0], "no polling while idle")
        self.queue.push("a", "b")
        self.queue.listener.ring()
        self.clock.advance(0)
        self.assertEqual(self.queue.claims, [0, 9, 9])
        self.assertEqual(self.queue.acked, ["a", "b"])
        self.assertEqual(self.armed(), 2, "armed again once drained")

    def test_wakesWhenARetryFallsDue(self):
        self.queue.nextDue = 7.5
        self.start()
        self.clock.advance(7.25)
        self.assertEqual(self.queue.claims, [0])
        self.queue.nextDue = None
        self.clock.advance(0.25)
        self.assertEqual(self.queue.claims, [0, 7.5])

    def test_earlierRetryMovesTheTimer(self):
        self.queue.nextDue = 100
        self.queue.push("x")
        self.start()
        # Handling "x" ended in a retry due sooner.
        self.queue.nextDue = 20
        self.manager._settled()
        self.clock.advance(20)
        self.assertIn(20, self.queue.claims)

    def test_fullWindowClaimsAgainAtHalf(self):
        self.queue.push(*["gate"] * 6)
        self.start()
        self.assertEqual(len(self.gates), 4)
        claims = len(self.queue.claims)
        self.gates.pop(0).callback(True)
        self.clock.advance(0)
        self.assertEqual(len(self.queue.claims), claims, "3 held > 4 // 2")
        self.gates.pop(0).callback(True)
        self.clock.advance(0)
        self.assertEqual(len(self.gates), 4)
        self.assertEqual(self.armed(), 0, "never idle: no doorbell")

    def test_tendWakes(self):
        """Every lease/3 a claim runs anyway: retries whose worker died."""
        self.start()
        self.clock.advance(10)
        self.assertEqual(self.queue.claims, [0, 10])

    def test_stopStopsDoorbellsAndTimers(self):
        self.queue.nextDue = 50
        self.start()
        self.successResultOf(self.manager.stopService())
        self.assertFalse(self.queue.listener.listening)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.queue.listener.ring()
        self.clock.advance(100)
        self.assertEqual(self.queue.claims, [0])


class LeaseTests(SynchronousTestCase):
    def test_member(self):
        lease = Lease(b"w-1/4.2\nsnq:q:main/hook\n{\n}")
        self.assertEqual((lease.token, lease.origin, lease.frame, str(lease)),
                         ("w-1/4.2", "snq:q:main/hook", b"{\n}", "w-1/4.2"))
