# -*- test-case-name: tests.test_claims_integration -*-
"""
A queue that cannot be claimed is seen, on a real daemon: on SQLite, a
trigger makes every claim fail (as a broken schema, a full disk or revoked
rights would); the failures are counted in C{/metrics} and
C{/status.json}, and C{snqctl check} is CRITICAL until the queue is
claimable again, when the waiting items run.
"""

import json
import sqlite3

import treq
from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests import stall
from tests.daemon import freePort, snqctl, waitFor
from tests.test_redis import waitUntil


class WedgedQueueTests(stall.PoolDaemonMixin, TestCase):
    backendClass = stall.SqliteBackend

    def sql(self, statement):
        with sqlite3.connect(self.backend.server.path, timeout=30) as conn:
            conn.execute(statement)

    def check(self):
        result = snqctl("-c", self.configPath, "check", "--claim-crit", "1",
                        cwd=self.dir, check=False)
        return result.returncode, result.stdout.strip()

    @defer.inlineCallbacks
    def get(self, path):
        response = yield treq.get(f"{self.http}{path}", persistent=False)
        return (yield response.text())

    @defer.inlineCallbacks
    def test_failingClaimsAreSeenUntilFixed(self):
        port = freePort()
        self.http = f"http://127.0.0.1:{port}"
        daemon = self.daemon(workers=1, http=f"127.0.0.1:{port}")
        yield self.running(1)
        yield threads.deferToThread(
            self.sql, "CREATE TRIGGER wedge BEFORE UPDATE ON queue_item BEGIN"
                      " SELECT RAISE(ABORT, 'wedged by the test'); END")
        frames = [stall.frame() for _ in range(3)]
        yield self.backend.put(frames)

        def critical():
            code, line = self.check()
            return code == 2 and "cannot claim" in line

        yield waitUntil(lambda: threads.deferToThread(critical), timeout=30,
                        what="snqctl check CRITICAL")
        _, line = yield threads.deferToThread(self.check)
        self.assertIn(f"{self.daemonId}.0 cannot claim for", line)
        self.assertIn("IntegrityError: wedged by the test", line)
        metrics = yield self.get("/metrics")
        [failed] = [line for line in metrics.splitlines()
                    if line.startswith("snq_claim_failed_total{")]
        self.assertGreater(float(failed.split()[-1]), 1)
        self.assertRegex(metrics, r'snq_worker_claim_failing_seconds\{worker='
                                  rf'"{self.daemonId}\.0"\}} [1-9]')
        status = json.loads((yield self.get("/status.json")))
        [worker] = status["workers"]
        self.assertIn("wedged by the test", worker["claim_error"])
        self.assertGreater(status["totals"]["claim_failed"], 1)

        yield threads.deferToThread(self.sql, "DROP TRIGGER wedge")
        ids = {json.loads(f)["id"] for f in frames}
        yield waitFor(lambda: self.ended(ids), what="the items handled")
        # (The worker reports once a second.)
        yield waitUntil(lambda: threads.deferToThread(
            lambda: self.check()[0] == 0), timeout=10, what="snqctl check OK")
        _, line = yield threads.deferToThread(self.check)
        self.assertIn("claim_failing=0;", line)
        self.assertTrue(daemon.alive())
