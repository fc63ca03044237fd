# -*- test-case-name: tests.test_chaos -*-
"""
Chaos, per backend, on its real server: a pool daemon of three workers fed
a few thousand items mixed with malformed frames (and, on SQLite, rows no
producer should write), while a random running worker is killed with
SIGKILL every second for 20 s (while another one runs) and the daemon's
connections to the server are cut twice (SQLite has no connection to
cut).  Every good item is handled, none is
lost, every malformed one is a C{baditem} dead letter, the daemon lives,
and all is done within 5 s of the last kill.
"""

import json
import os
import random
import signal
import time

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests import stall
from tests.test_redis import waitUntil

GOOD = 2_000
#: Half-second ticks: a wave of items on each of the first 40 (20 s), a
#: kill on every other one until there were 20 (20 s, unless no other
#: worker ran yet: the dead one's items need somewhere to go), cuts at 7 s
#: and 14 s.
WAVES = 40
KILLS = 20
CUTS = (14, 28)
DONE_WITHIN = 5.0


class ChaosMixin(stall.PoolDaemonMixin):
    timeout = 240

    @defer.inlineCallbacks
    def test_chaos(self):
        daemon = self.daemon(workers=3, concurrency=10, prefetch=20)
        yield self.running(3)
        rng = random.Random(12)
        good = [stall.frame(sleep=0.005) for _ in range(GOOD)]
        ids = {json.loads(f)["id"] for f in good}
        malformed = self.backend.malformed()
        bad = (yield self.backend.putOdd())
        start = time.monotonic()
        kills, cuts = 0, 0
        lastKill = None
        tick = 0
        while kills < KILLS or tick < WAVES:
            if tick < WAVES:
                wave = good[tick::WAVES]
                wave.insert(rng.randrange(len(wave) + 1),
                            malformed[tick % len(malformed)])
                bad += 1
                yield self.backend.put(wave)
            if tick in CUTS:
                cut = self.backend.cut()
                if cut is not None:
                    yield cut
                    cuts += 1
            if tick % 2 and kills < KILLS and (yield self.killOne(rng)):
                lastKill = time.time()
                kills += 1
            tick += 1
            yield deferLater(reactor, max(0.0, start + tick * 0.5
                                          - time.monotonic()), lambda: None)

        def handled():
            return {i for i, _, _, what, _ in stall.stamps(self.dir)
                    if what == "end"}

        yield waitUntil(lambda: handled() >= ids, timeout=60,
                        what="every good item handled")
        done = max(min(t for i, _, _, what, t in stall.stamps(self.dir)
                       if what == "end" and i == itemId) for itemId in ids)
        letters = yield self.waitForDeadLetters(bad)
        yield waitUntil(lambda: self.backend.remaining().addCallback(
            lambda n: n == 0), timeout=30, what="nothing left in the queue")
        self.assertTrue(daemon.alive())
        self.assertEqual({reason for reason, _ in letters}, {"baditem"})
        self.assertTrue(all(error for _, error in letters))
        if self.backend.name == "RabbitMQ":
            # A dead letter is sent, then its message acknowledged: a kill
            # between the two makes it twice (at least once, as items).
            self.assertGreaterEqual(len(letters), bad)
        else:
            self.assertEqual(len(letters), bad)
        self.assertEqual(kills, KILLS)
        charged = {i for i, _, attempts, what, _ in stall.stamps(self.dir)
                   if what == "start" and attempts > 0}
        self.assertLessEqual(done - lastKill, DONE_WITHIN,
                             "all done within 5 s of the last kill")
        print(f"\n{self.backend.name}: {GOOD} items, {bad} malformed, {kills} "
              f"kills ({len(charged)} items running at one ran again), {cuts} "
              f"cuts: done {max(done - lastKill, 0):.2f} s after the last kill")

    @defer.inlineCallbacks
    def killOne(self, rng):
        """kill -9 a running worker, if another runs too → whether it did."""
        workers = yield self.workers()
        if len(workers) < 2:
            return False
        try:
            os.kill(rng.choice(workers)[1], signal.SIGKILL)
        except ProcessLookupError:
            return False  # Killed a moment ago: the master has not seen it yet.
        return True


class SqliteChaosTests(ChaosMixin, TestCase):
    backendClass = stall.SqliteBackend


class PostgresChaosTests(ChaosMixin, TestCase):
    backendClass = stall.PostgresBackend


class MariaDbChaosTests(ChaosMixin, TestCase):
    backendClass = stall.MariaDbBackend


class RedisChaosTests(ChaosMixin, TestCase):
    backendClass = stall.RedisBackend


class RabbitMqChaosTests(ChaosMixin, TestCase):
    backendClass = stall.StompBackend
