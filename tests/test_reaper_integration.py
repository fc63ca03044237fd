# -*- test-case-name: tests.test_reaper_integration -*-
"""
A dead worker's items, on every backend's real server, with a real pool
daemon: after a C{kill -9} what it was running runs again within 2 s (the
master gives its claims back, or on RabbitMQ the broker does), charged one
attempt; what it held without starting goes back unchanged; an item that
kills every worker that runs it ends in the dead letters after
C{max_retries} deaths, alone.
"""

import json

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests import stall
from tests.daemon import waitFor
from tests.test_redis import waitUntil

#: Seconds from a worker's kill -9 to its running items running again.
BACK_WITHIN = 2.0


class DeadWorkerMixin(stall.PoolDaemonMixin):
    @defer.inlineCallbacks
    def test_deadWorkersItemsBackInSecondsAPoisonAlone(self):
        daemon = self.daemon(workers=3, concurrency=4, prefetch=8, retries=2)
        yield self.running(3)

        # Room elsewhere: what the killed worker ran runs again at once.
        took, ids, pid = yield self.recovery(sleep=1.0)
        self.assertLessEqual(took, BACK_WITHIN)
        yield waitFor(lambda: self.ended(ids), what="the first items done")

        # A full window: items held, not started, are not charged.
        frames = [stall.frame(sleep=0.3) for _ in range(24)]
        more = {json.loads(f)["id"] for f in frames}
        yield self.backend.put(frames)
        second, _, _ = yield self.killBusiest(more, running=8)
        yield waitFor(lambda: self.ended(more), what="the window's items done")
        self.assertCharged(ids | more, {pid, second})

        # A poison: the worker running it dies, three times; it alone is
        # dead-lettered, the others in its batch are not charged.
        poison = stall.frame(die=0.3)
        frames = [stall.frame() for _ in range(5)]
        yield self.backend.put([poison, *frames])
        yield waitFor(lambda: self.ended({json.loads(f)["id"] for f in frames}),
                      what="the poison's batch done")
        letters = yield self.waitForDeadLetters(1)
        [(reason, error)] = letters
        # (A broker's message says it as a retry would: "gave up after 3
        # attempts; last error: its worker died while running it".)
        self.assertEqual(reason, "retries")
        self.assertIn("3 attempts", error)
        starts = self.started()[json.loads(poison)["id"]]
        self.assertEqual([a for _, a, _ in starts], [0, 1, 2],
                         "each death charged once")
        self.assertEqual(len({p for p, _, _ in starts}), 3, "three workers died")
        self.assertTrue(daemon.alive())
        yield waitUntil(lambda: self.backend.remaining().addCallback(
            lambda n: n == 0), what="nothing left in the queue")
        print(f"\n{self.backend.name}: kill -9 → its running items running "
              f"again in {took:.2f} s")

    def assertCharged(self, ids, killed):
        """
        An item is charged an attempt for each killed worker that was
        running it, and for nothing else: those only held start with the
        attempts they had.
        """
        endedBy = {(i, p) for i, p, _, what, _ in stall.stamps(self.dir)
                   if what == "end"}
        for itemId, starts in self.started().items():
            if itemId not in ids:
                continue
            expected = 0
            for pid, attempts, _ in starts:
                self.assertEqual(attempts, expected, (itemId, starts))
                if pid in killed and (itemId, pid) not in endedBy:
                    expected += 1


class SqliteTests(DeadWorkerMixin, TestCase):
    backendClass = stall.SqliteBackend


class PostgresTests(DeadWorkerMixin, TestCase):
    backendClass = stall.PostgresBackend


class MariaDbTests(DeadWorkerMixin, TestCase):
    backendClass = stall.MariaDbBackend


class RedisTests(DeadWorkerMixin, TestCase):
    backendClass = stall.RedisBackend


class RabbitMqTests(DeadWorkerMixin, TestCase):
    backendClass = stall.StompBackend
