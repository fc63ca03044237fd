# -*- test-case-name: tests.test_failover_redis -*-
"""
Redis Sentinel end to end: a primary, a replica and three Sentinels on
loopback ports of the test's own (L{tests.sentinel}); a real daemon and
the producer on the C{redis+sentinel://} URL; the primary killed mid-drain,
the replica promoted, and every item handled on the new primary; the
Sentinels asked in turn, and only a primary taken.
"""

import os
import time
from collections import Counter

import txredisapi
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from snq import config as snqconfig
from snq.client import EnqueueError, Producer
from snq.redis.address import RedisAddress
from snq.redis.connection import RedisConnection, SentinelEndpoint
from tests.daemon import Daemon, freePort, waitFor
from tests.recorder import recorded
from tests.sentinel import SentinelSet

CONFIG = """
[daemon]
workers = 2
kill_time = 5

[queue]
backend = "redis"
lease = 30
concurrency = 20

[redis]
url = "{url}"
prefix = "snqtest:"
timeout = 3

[monitor]
http = "127.0.0.1:0"

[handlers]
record = "tests.recorder:Record"

[sites.default]
record_file = "{dir}/handled.txt"
"""

ITEMS = 3000


class SentinelFailoverTests(TestCase):
    timeout = 240

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.servers = SentinelSet(self.dir)
        self.addCleanup(self.servers.stop)
        self.servers.start()
        self.record = os.path.join(self.dir, "handled.txt")
        self.config = os.path.join(self.dir, "snq.toml")
        with open(self.config, "w") as f:
            f.write(CONFIG.format(url=self.servers.url, dir=self.dir))

    def handled(self):
        return [itemId for itemId, _, _ in recorded(self.record)]

    def held(self):
        """What is ready or claimed on the current primary."""
        c = self.servers.client(self.servers.currentPrimary())
        try:
            return c.llen("snqtest:q:main") + c.zcard("snqtest:processing")
        finally:
            c.close()

    @defer.inlineCallbacks
    def test_primaryKilledMidDrain(self):
        producer = Producer(config=snqconfig.load(self.config))
        self.addCleanup(producer.close)
        ids = set(producer.enqueue_many("record", [{"sleep": 0.02}] * ITEMS))
        self.assertEqual(len(ids), ITEMS)
        # Replication is asynchronous: a write the replica never got would
        # be lost with the primary, whatever snq does.
        self.assertTrue(self.servers.synced())
        old = self.servers.primary
        daemon = Daemon(self, self.dir, "-c", self.config)
        yield waitFor(lambda: len(self.handled()) >= ITEMS // 4, timeout=90,
                      what="a quarter of the items handled")
        self.servers.kill(old)
        killed = time.monotonic()
        yield waitFor(lambda: self.servers.currentPrimary() == self.servers.replica,
                      timeout=60, what="the replica promoted")
        promoted = time.monotonic() - killed
        found = (f"name redis://127.0.0.1:{self.servers.replica}/1 the primary")
        yield waitFor(lambda: found in daemon.output(), timeout=60,
                      what="the daemon on the new primary")
        back = time.monotonic() - killed
        # The producer follows too, once the Sentinels see the new primary up
        # (until then it raises EnqueueError).
        after = set()

        def enqueued():
            try:
                after.add(producer.enqueue("record", {}))
            except EnqueueError:
                return False
            return True

        yield waitFor(enqueued, timeout=30, interval=0.5,
                      what="the producer to find the new primary")
        yield waitFor(lambda: ids | after <= set(self.handled()), timeout=120,
                      what="every item handled after the failover")
        yield waitFor(lambda: self.held() == 0, timeout=60,
                      what="nothing ready or claimed on the new primary")
        twice = sum(n - 1 for n in Counter(self.handled()).values())
        # Claims and acks the replica had not received yet when the primary
        # died come back: at most a window's worth per worker.
        self.assertLessEqual(twice, 2 * 100, "more duplicates than in flight")
        print(f"\n{ITEMS} items, the primary killed after a quarter: all "
              f"handled, {twice} twice; replica promoted {promoted:.1f} s after "
              f"the kill, the daemon on it after {back:.1f} s")

    @defer.inlineCallbacks
    def test_sentinelsAskedInTurnAndOnlyAPrimaryTaken(self):
        """
        A Sentinel that does not answer is passed over; a server that is
        not a primary (a Sentinel naming one a moment too long) is refused
        at the handshake, and the next attempt asks again.
        """
        dead = freePort()
        url = self.servers.url.replace("redis+sentinel://",
                                       f"redis+sentinel://127.0.0.1:{dead},")
        connection = RedisConnection(RedisAddress.fromURL(url), "snqtest", 3.0)
        connection.start()
        self.addCleanup(connection.stop)
        role = yield connection.execute("ROLE")
        self.assertEqual(role[0], b"master")
        self.assertEqual(connection.current.transport.getPeer().port,
                         self.servers.primary)

        replica = RedisAddress.fromURL(self.servers.url).primaryAt(
            "127.0.0.1", self.servers.replica)
        self.patch(SentinelEndpoint, "findPrimary",
                   lambda endpoint: defer.succeed(replica))
        refused = RedisConnection(RedisAddress.fromURL(self.servers.url),
                                  "snqtest", 3.0)
        refused.start()
        self.addCleanup(refused.stop)
        failure = yield self.assertFailure(refused.whenConnected(),
                                           txredisapi.ConnectionError)
        self.assertIn(f"127.0.0.1:{self.servers.replica} is a slave, not the "
                      "primary", str(failure))
