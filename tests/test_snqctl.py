# -*- test-case-name: tests.test_snqctl -*-
"""snqctl on a real SQLite file, without a daemon."""

import io
import json
import os
import sqlite3

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from snq.scripts import snqctl
from tests import daemon


class SnqctlTests(TestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.db = os.path.join(self.dir, "q.sqlite")
        self.config = os.path.join(self.dir, "snq.toml")
        with open(self.config, "w") as f:
            f.write(f'[db]\nurl = "sqlite:///{self.db}"\n'
                    '[transports.webhook]\npriority = 7\n')

    @defer.inlineCallbacks
    def ctl(self, *argv, stdin=""):
        args = snqctl.parser().parse_args(["-c", self.config, *argv])
        out = io.StringIO()
        yield snqctl.run(reactor, args, out=out, stdin=io.StringIO(stdin))
        return out.getvalue()

    def rows(self, sql):
        with sqlite3.connect(self.db) as conn:
            return conn.execute(sql).fetchall()

    @defer.inlineCallbacks
    def test_enqueue(self):
        out = yield self.ctl("enqueue", "webhook", '{"a": 1}', "--site", "ex",
                             "--delay", "60")
        [(frame, transport, site, priority, delay)] = self.rows(
            "SELECT frame, transport, site, priority, run_at - created "
            "FROM queue_item")
        envelope = json.loads(frame)
        self.assertEqual(out.strip(), envelope["id"])
        self.assertEqual((envelope["payload"], transport, site, priority),
                         ({"a": 1}, "webhook", "ex", 7))
        self.assertTrue(59 <= delay <= 61, delay)

    @defer.inlineCallbacks
    def test_enqueueRunAt(self):
        yield self.ctl("enqueue", "log", "1", "--run-at", "2031-01-01T08:00:00Z")
        yield self.ctl("enqueue", "log", "2", "--run-at", "1925020800.5")
        rows = self.rows("SELECT frame, run_at FROM queue_item ORDER BY id")
        self.assertEqual([(json.loads(f)["run_at"], r) for f, r in rows],
                         [(1925020800.0, 1925020800.0),
                          (1925020800.5, 1925020800.5)])
        for bad in ("2031-01-01T08:00:00", "soon"):
            self.assertRaises(SystemExit, snqctl.parser().parse_args,
                              ["enqueue", "log", "1", "--run-at", bad])
        self.assertRaises(SystemExit, snqctl.parser().parse_args,
                          ["enqueue", "log", "1", "--run-at", "1", "--delay", "1"])

    @defer.inlineCallbacks
    def test_enqueueFromStandardInput(self):
        lines = "".join(f'{{"n": {i}}}\n' for i in range(2500)) + "\n"
        out = yield self.ctl("enqueue", "log", "-", "--priority", "2", stdin=lines)
        self.assertEqual(out.strip(), "enqueued 2500 items on log")
        self.assertEqual(self.rows("SELECT count(*), min(priority) FROM queue_item"),
                         [(2500, 2)])

    @defer.inlineCallbacks
    def test_enqueueRefusesBadJson(self):
        e = yield self.assertFailure(
            self.ctl("enqueue", "log", "-", stdin='{"ok": 1}\n{nope\n'),
            snqctl.CommandError)
        self.assertIn("line 2 is not JSON", str(e))
        self.assertEqual(self.rows("SELECT count(*) FROM queue_item"), [(0,)],
                         "nothing stored from a bad batch")

    @defer.inlineCallbacks
    def test_cancel(self):
        """A waiting item goes; a running one is said to be running."""
        first = (yield self.ctl("enqueue", "log", "1")).strip()
        second = (yield self.ctl("enqueue", "log", "2")).strip()
        out = yield self.ctl("cancel", second)
        self.assertEqual(out, "cancelled 1 waiting item\n")
        self.assertEqual(len(self.rows("SELECT id FROM queue_item")), 1)
        with sqlite3.connect(self.db) as conn:
            conn.execute("UPDATE queue_item SET claimed_by = 'w', lease_until = 1e12")
        e = yield self.assertFailure(self.ctl("cancel", first), snqctl.CommandError)
        self.assertEqual(str(e), f"item {first}: 1 running, left to finish;"
                         " nothing waiting to cancel")
        e = yield self.assertFailure(self.ctl("cancel", "--key", "k"),
                                     snqctl.CommandError)
        self.assertEqual(str(e), "items with key 'k': not found (not waiting,"
                         " not running)")
        self.assertRaises(SystemExit, snqctl.parser().parse_args,
                          ["cancel", "x", "--key", "k"])

    @defer.inlineCallbacks
    def test_deadLetters(self):
        out = yield self.ctl("dead", "list")
        self.assertEqual(out.strip(), "no dead letters")
        yield self.ctl("db", "init")
        with sqlite3.connect(self.db) as conn:
            conn.executemany(
                "INSERT INTO queue_dead (item_id, frame, transport, site, reason,"
                " error, attempts, died) VALUES (?, ?, 'log', 'default', "
                "'rejected', 'HTTP 404', 3, 0)",
                [(str(i), json.dumps({"transport": "log", "payload": i,
                                      "attempts": 3}))
                 for i in range(3)])
        listing = yield self.ctl("dead", "list")
        self.assertEqual(len(listing.splitlines()), 3)
        self.assertIn("rejected", listing)
        self.assertIn("HTTP 404", listing)
        records = [json.loads(line) for line in
                   (yield self.ctl("dead", "list", "--json")).splitlines()]
        self.assertEqual([r["id"] for r in records], [3, 2, 1])
        shown = yield self.ctl("dead", "show", "2")
        self.assertIn('frame: {"transport": "log", "payload": 1', shown)
        self.assertIn("attempts: 3", shown)
        yield self.assertFailure(self.ctl("dead", "show", "99"),
                                 snqctl.CommandError)
        yield self.assertFailure(self.ctl("dead", "retry"), snqctl.CommandError)
        out = yield self.ctl("dead", "retry", "1", "2")
        self.assertEqual(out.strip(), "requeued 2 dead letters")
        self.assertEqual(self.rows("SELECT attempts FROM queue_item"), [(0,), (0,)])
        out = yield self.ctl("dead", "purge", "--all")
        self.assertEqual(out.strip(), "purged 1 dead letters")

    def test_exitStatuses(self):
        """Scripts and cron jobs see what happened in the exit status."""
        bad = os.path.join(self.dir, "bad.toml")
        with open(bad, "w") as f:
            f.write("[queue]\nbackend = 1\n")
        result = daemon.snqctl("-c", bad, "dead", "list", cwd=self.dir, check=False)
        self.assertEqual(result.returncode, 2)
        self.assertIn(f"{bad}: queue.backend: expected a string", result.stderr)
        result = daemon.snqctl("-c", self.config, "dead", "show", "5",
                               cwd=self.dir, check=False)
        self.assertEqual((result.returncode, result.stderr.strip()),
                         (1, "snqctl: no dead letter 5"))
        result = daemon.snqctl("-c", self.config, "enqueue", "log", "{}",
                               cwd=self.dir)
        self.assertEqual(result.returncode, 0)
        unreachable = os.path.join(self.dir, "unreachable.toml")
        with open(unreachable, "w") as f:
            f.write('[db]\nurl = "sqlite:////proc/snq-nowhere/q.sqlite"\n')
        result = daemon.snqctl("-c", unreachable, "dead", "list", cwd=self.dir,
                               check=False)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn("snqctl: cannot open the queue sqlite:////proc/snq-nowhere/"
                      "q.sqlite: ", result.stderr)
