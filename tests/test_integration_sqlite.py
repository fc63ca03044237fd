# -*- test-case-name: tests.test_integration_sqlite -*-
"""
The whole daemon on the embedded default: real C{twistd -n snq} processes,
a real SQLite file, items put there by C{snqctl} or by plain SQL.
"""

import json
import os
import signal
import sqlite3
import time

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.daemon import Daemon, handledIds, snqctl, waitFor

CONFIG = """
[daemon]
workers = 1
kill_time = 5

[queue]
lease = 3

[monitor]
http = ""

[handlers]
record = "tests.recorder:Record"

[sites.default]
record_file = "{dir}/handled.txt"
"""


class SqliteDaemonTests(TestCase):
    timeout = 180

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "snq.toml")
        with open(self.config, "w") as f:
            f.write(CONFIG.format(dir=self.dir))
        self.db = os.path.join(self.dir, "snq.sqlite")
        self.record = os.path.join(self.dir, "handled.txt")

    def daemon(self, *args):
        return Daemon(self, self.dir, "-c", self.config, *args)

    def sql(self, statement, params=()):
        with sqlite3.connect(self.db, timeout=30) as conn:
            return conn.execute(statement, params).fetchall()

    def enqueue(self, n, payload="{}"):
        """Enqueue before a daemon runs; → the ids, read back from the table."""
        result = snqctl("-c", self.config, "enqueue", "record", "-",
                        cwd=self.dir, stdin=(payload + "\n") * n)
        self.assertEqual(result.stdout.strip(), f"enqueued {n} items on record")
        return {json.loads(frame)["id"]
                for (frame,) in self.sql("SELECT frame FROM queue_item")}

    @defer.inlineCallbacks
    def test_tenThousandItems(self):
        ids = self.enqueue(10_000)
        self.assertEqual(len(ids), 10_000)
        start = time.monotonic()
        self.daemon()
        yield waitFor(lambda: len(handledIds(self.record)) >= 10_000,
                      what="10,000 items handled")
        yield waitFor(lambda: self.sql("SELECT count(*) FROM queue_item")
                      == [(0,)], what="an empty queue")
        elapsed = time.monotonic() - start
        handled = handledIds(self.record)
        self.assertEqual(set(handled), ids)
        self.assertEqual(len(handled), 10_000, "no item twice without a crash")
        print(f"\n10,000 items drained in {elapsed:.1f} s, process start "
              f"included ({10_000 / elapsed:,.0f} items/s)")

    @defer.inlineCallbacks
    def test_killDashNineLosesNothing(self):
        ids = self.enqueue(2_000, '{"sleep": 0.002}')
        first = self.daemon()
        yield waitFor(lambda: len(handledIds(self.record)) >= 300,
                      what="a drain under way")
        first.kill(signal.SIGKILL)
        before = len(set(handledIds(self.record)))
        self.assertLess(before, 2_000, "killed mid-drain, not after it")
        self.daemon()
        yield waitFor(lambda: set(handledIds(self.record)) >= ids, timeout=90,
                      what="every item handled after the restart")
        yield waitFor(lambda: self.sql("SELECT count(*) FROM queue_item")
                      == [(0,)], what="an empty queue")
        self.assertEqual(self.sql("SELECT count(*) FROM queue_dead"), [(0,)])

    @defer.inlineCallbacks
    def test_malformedRowsDeadLettered(self):
        snqctl("-c", self.config, "db", "init", cwd=self.dir)
        rows = [(f'{{"transport": "record", "payload": {i}', "record")
                for i in range(500)]
        rows += [(json.dumps({"transport": "record"}), "record")] * 250
        rows += [(json.dumps({"transport": "nosuch", "payload": 1}), "nosuch")] * 250
        with sqlite3.connect(self.db) as conn:
            conn.executemany("INSERT INTO queue_item (frame, transport, site, "
                             "created, run_at) VALUES (?, ?, 'default', 0, 0)",
                             rows)
        daemon = self.daemon()
        yield waitFor(lambda: self.sql("SELECT count(*) FROM queue_dead")
                      == [(1000,)], what="1,000 dead letters")
        reasons = dict(self.sql("SELECT reason, count(*) FROM queue_dead "
                                "GROUP BY reason"))
        self.assertEqual(reasons, {"baditem": 750, "badhandler": 250})
        errors = {e for (e,) in self.sql("SELECT DISTINCT error FROM queue_dead")}
        self.assertIn("envelope has no 'payload'", errors)
        self.assertIn("no handler for transport 'nosuch'", errors)
        self.assertTrue(any(e.startswith("frame is not JSON") for e in errors))
        self.assertTrue(daemon.alive())
        itemId = snqctl("-c", self.config, "enqueue", "record", "{}",
                        cwd=self.dir).stdout.strip()
        yield waitFor(lambda: handledIds(self.record) == [itemId],
                      what="a good item after the bad ones")
        listing = snqctl("-c", self.config, "dead", "list", "--limit", "3",
                         cwd=self.dir).stdout
        self.assertEqual(len(listing.splitlines()), 3)

    @defer.inlineCallbacks
    def test_sigtermFinishesInFlight(self):
        ids = self.enqueue(20, '{"sleep": 1.0}')
        daemon = self.daemon()
        yield waitFor(lambda: "consuming groups" in daemon.output(),
                      what="the daemon to start")
        yield waitFor(lambda: self.sql("SELECT count(*) FROM queue_item "
                                       "WHERE claimed_by IS NOT NULL")
                      != [(0,)], what="items claimed")
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        yield waitFor(lambda: daemon.process.poll() is not None,
                      timeout=10, what="the daemon to exit")
        self.assertLess(time.monotonic() - started, 5 + 2)
        # twistd ends a clean shutdown on SIGTERM by re-raising the signal.
        self.assertIn(daemon.process.returncode, (0, -signal.SIGTERM),
                      daemon.output())
        self.assertIn("Server Shut Down.", daemon.output())
        # What was running finished; the rest is back in the queue, unclaimed.
        handled = set(handledIds(self.record))
        remaining = {json.loads(f)["id"] for (f,) in self.sql(
            "SELECT frame FROM queue_item WHERE claimed_by IS NULL")}
        self.assertEqual(handled | remaining, ids)
        self.assertTrue(handled)

    def test_invalidConfigRefused(self):
        with open(self.config, "a") as f:
            f.write('\n[db]\nurl = "oracle://x"\n')
        daemon = self.daemon()
        self.assertEqual(daemon.process.wait(30), 1)
        output = daemon.output()
        self.assertIn(f"{self.config}: db.url: expected sqlite:///PATH", output)
        self.assertIn("not starting", output)

    def test_unloadableHandlerRefused(self):
        path = os.path.join(self.dir, "bad.toml")
        with open(path, "w") as f:
            f.write('[handlers]\nx = "no_such_module:Handler"\n')
        daemon = Daemon(self, self.dir, "-c", path)
        self.assertEqual(daemon.process.wait(30), 1)
        self.assertIn("handlers.x: cannot load no_such_module:Handler",
                      daemon.output())


class EmbeddedDefaultTests(TestCase):
    """The README's promise: no config, one command, items handled."""

    timeout = 60

    @defer.inlineCallbacks
    def test_logItemHandledWithinASecond(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        daemon = Daemon(self, directory)
        yield waitFor(lambda: "consuming groups main" in daemon.output(),
                      what="the daemon to start")
        # Idle long enough for the poller to be at its longest wait.
        yield deferLater(reactor, 3, lambda: None)
        sent = time.monotonic()
        itemId = snqctl("enqueue", "log", '{"hello": 1}', cwd=directory).stdout.strip()
        yield waitFor(lambda: f"log item {itemId} for default" in daemon.output(),
                      timeout=5, interval=0.01, what="the log line")
        self.assertLess(time.monotonic() - sent, 1.0)
        self.assertIn('{"hello": 1}', daemon.output())

