# -*- test-case-name: tests.test_defer_backends -*-
"""
An item its handler defers (L{snq.handlers.Defer}: its remote host at its
limit or its circuit open) comes back after the delay without an attempt
charged, on every backend's real server with a real pool daemon.
"""

import json

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests import stall
from tests.daemon import waitFor


class DeferMixin(stall.PoolDaemonMixin):
    @defer.inlineCallbacks
    def test_deferredUncharged(self):
        self.daemon(workers=2, retries=1)
        yield self.running(2)
        frames = [stall.frame(defer=1.0) for _ in range(3)]
        ids = {json.loads(f)["id"] for f in frames}
        yield self.backend.put(frames)
        yield waitFor(lambda: self.ended(ids), what="the deferred items done")
        starts = self.started()
        for itemId in ids:
            self.assertGreater(len(starts[itemId]), 1, "deferred at least once")
            self.assertEqual({a for _, a, _ in starts[itemId]}, {0})
        self.assertEqual((yield self.deadLetters()), [])

    def ended(self, ids):
        return {i for i, _, _, what, _ in stall.stamps(self.dir)
                if what == "end"} >= ids


class SqliteDeferTests(DeferMixin, TestCase):
    backendClass = stall.SqliteBackend


class PostgresDeferTests(DeferMixin, TestCase):
    backendClass = stall.PostgresBackend


class MariaDbDeferTests(DeferMixin, TestCase):
    backendClass = stall.MariaDbBackend


class RedisDeferTests(DeferMixin, TestCase):
    backendClass = stall.RedisBackend


class RabbitMqDeferTests(DeferMixin, TestCase):
    backendClass = stall.StompBackend
