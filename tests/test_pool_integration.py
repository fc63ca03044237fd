# -*- test-case-name: tests.test_pool_integration -*-
"""
The pool with real processes: a real C{twistd -n snq} master, its worker
children, a real SQLite file, and the control socket.
"""

import json
import os
import re
import signal
import sqlite3
import time

from twisted.internet import defer, error, reactor, threads
from twisted.internet.task import LoopingCall, deferLater
from twisted.trial.unittest import TestCase

from snq.item import Item
from tests.daemon import Daemon, daemonStatus, handledIds, snqctl, socketPath, waitFor
from tests.recorder import recorded

CONFIG = """
[daemon]
workers = 2
kill_time = 5
threshold = 1
min_restart_delay = 0.2
control_socket = "{sock}"

[queue]
lease = 3
poll_interval = 0.2
{queue}

[handlers]
record = "tests.recorder:Record"
leak = "tests.recorder:Leak"
stamp = "tests.recorder:Record"

[sites.default]
record_file = "{dir}/handled.txt"

[sites.stamped]
record_file = "{dir}/stamped.txt"
"""


def alive(pid):
    """Running, not a zombie nobody has reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class PoolTestCase(TestCase):
    timeout = 120

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.sock = socketPath(self)
        self.db = os.path.join(self.dir, "snq.sqlite")
        self.record = os.path.join(self.dir, "handled.txt")
        self.stamped = os.path.join(self.dir, "stamped.txt")

    def daemon(self, queue="", *args):
        path = os.path.join(self.dir, "snq.toml")
        with open(path, "w") as f:
            f.write(CONFIG.format(dir=self.dir, sock=self.sock, queue=queue))
        return Daemon(self, self.dir, "-c", path, *args)

    def sql(self, statement, params=()):
        with sqlite3.connect(self.db, timeout=30) as conn:
            return conn.execute(statement, params).fetchall()

    def enqueue(self, transport, n, payload=None, site="default"):
        """Insert as any producer would; the daemon has made the table."""
        items = [Item(transport=transport, payload=payload or {}, site=site)
                 for _ in range(n)]
        with sqlite3.connect(self.db, timeout=30) as conn:
            conn.executemany(
                "INSERT INTO queue_item (frame, transport, site, created, run_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [(i.toJSON().decode(), transport, site, i.created, 0)
                 for i in items])
        return {i.id for i in items}

    def status(self):
        return daemonStatus(self.sock)

    @defer.inlineCallbacks
    def waitForWorkers(self, condition, timeout=30.0, what="workers"):
        """Poll the master's status until C{condition(workers)}; → workers."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                workers = (yield self.status())["workers"]
                if condition(workers):
                    return workers
            except error.ConnectError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for "
                                     f"{what}")
            yield deferLater(reactor, 0.05, lambda: None)

    def allRunning(self, n=2):
        return self.waitForWorkers(
            lambda ws: len(ws) == n and all(w["state"] == "running" for w in ws),
            what=f"{n} workers running")

    def queueEmpty(self, timeout=60):
        return waitFor(lambda: self.sql("SELECT count(*) FROM queue_item") == [(0,)],
                       timeout=timeout, what="an empty queue")


class PoolTests(PoolTestCase):
    @defer.inlineCallbacks
    def test_killDashNineOfAWorker(self):
        self.daemon()
        first, second = yield self.allRunning()
        # Feed stamped items all along, from a thread: a write waiting for
        # SQLite's lock must not hold up this reactor, which keeps the time.
        feeder = LoopingCall(threads.deferToThread, self.enqueue, "stamp", 5,
                             {"sleep": 0.02}, "stamped")
        feeder.start(0.05)
        self.addCleanup(lambda: feeder.running and feeder.stop())
        yield deferLater(reactor, 1.5, lambda: None)  # lived past the threshold
        os.kill(first["pid"], signal.SIGKILL)
        killed = time.monotonic()
        pids = {first["pid"], second["pid"]}

        def newcomer():
            return {r[1] for r in recorded(self.stamped)} - {str(p) for p in pids}

        yield waitFor(newcomer, timeout=10, interval=0.01,
                      what="a replacement handling items")
        took = time.monotonic() - killed
        self.assertLess(took, 2.0)
        handledBefore = len([1 for r in recorded(self.stamped)
                             if r[1] == str(second["pid"])])
        yield deferLater(reactor, 0.5, lambda: None)
        workers = yield self.waitForWorkers(lambda ws: True)
        self.assertEqual(workers[1]["pid"], second["pid"],
                         "the other worker was never stopped")
        self.assertEqual(workers[1]["restarts"], 0)
        self.assertGreater(len([1 for r in recorded(self.stamped)
                                if r[1] == str(second["pid"])]), handledBefore,
                           "and it kept working")
        self.assertEqual((workers[0]["restarts"], workers[0]["last_exit"]),
                         (1, "killed by signal 9"))
        self.assertEqual({str(workers[0]["pid"])}, newcomer())
        print(f"\nkill -9 of a worker → replacement handling items in {took:.2f} s")

    @defer.inlineCallbacks
    def test_leakingWorkerRecycledWithoutLoss(self):
        daemon = self.daemon('softlimit = "100m"\nprefetch = 10\nconcurrency = 2')
        yield self.allRunning()
        ids = set()
        for _ in range(4):
            self.enqueue("leak", 25, {"kb": 2048})
            ids |= self.enqueue("record", 50)
        yield self.queueEmpty()
        self.assertEqual(set(handledIds(self.record)), ids)
        self.assertEqual(self.sql("SELECT count(*) FROM queue_dead"), [(0,)])
        recycled = re.findall(r"over the soft limit 100\.0 MB", daemon.output())
        self.assertTrue(recycled, daemon.output())
        self.assertIn("recycled itself (exit status 101)", daemon.output())
        # Whoever was over the limit has been replaced by a fresh worker.
        workers = yield self.waitForWorkers(
            lambda ws: all(w["state"] == "running"
                           and w["report"]["rss"] < 100 * 2**20 for w in ws),
            what="fresh workers under the soft limit")
        self.assertIn("exit status 101", [w["last_exit"] for w in workers])

    @defer.inlineCallbacks
    def test_sigtermDuringADrain(self):
        first = self.daemon()
        workers = yield self.allRunning()
        ids = self.enqueue("record", 20_000)
        yield waitFor(lambda: len(handledIds(self.record)) >= 2_000,
                      what="a drain under way")
        first.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        yield waitFor(lambda: not first.alive(), timeout=30, interval=0.01,
                      what="the master to exit")
        took = time.monotonic() - started
        self.assertLess(took, 5, "within kill_time")
        self.assertIn("Server Shut Down.", first.output())
        self.assertFalse([w["pid"] for w in workers if alive(w["pid"])])
        self.assertLess(len(set(handledIds(self.record))), 20_000,
                        "stopped mid-drain")
        self.daemon()
        yield self.queueEmpty()
        self.assertLessEqual(ids, set(handledIds(self.record)))
        self.assertEqual(self.sql("SELECT count(*) FROM queue_dead"), [(0,)])
        print(f"\nSIGTERM mid-drain: master gone in {took:.2f} s")

    @defer.inlineCallbacks
    def test_killDashNineOfTheMaster(self):
        master = self.daemon()
        workers = yield self.allRunning()
        self.enqueue("record", 100, {"sleep": 0.1})
        yield waitFor(lambda: handledIds(self.record), what="work under way")
        master.kill(signal.SIGKILL)
        killed = time.monotonic()
        pids = [w["pid"] for w in workers]
        yield waitFor(lambda: not any(alive(pid) for pid in pids), timeout=5,
                      interval=0.02, what="every worker to exit by itself")
        print(f"\nkill -9 of the master: workers gone in "
              f"{time.monotonic() - killed:.2f} s")

    @defer.inlineCallbacks
    def test_secondMasterRefused(self):
        self.daemon()
        before = yield self.allRunning()
        second = self.daemon()
        self.assertEqual(second.process.wait(30), 1)
        self.assertIn("is another snq daemon running with the same [daemon] "
                      "control_socket?", second.output())
        self.assertNotIn("started as pid", second.output())
        after = yield self.allRunning()
        self.assertEqual([w["pid"] for w in after], [w["pid"] for w in before])

    @defer.inlineCallbacks
    def test_workerDyingAtStartBacksOff(self):
        path = os.path.join(self.dir, "snq.toml")
        with open(path, "w") as f:
            f.write(f'[daemon]\nworkers = 1\nthreshold = 5\nmin_restart_delay = 0.1\n'
                    f'max_restart_delay = 0.8\ncontrol_socket = "{self.sock}"\n'
                    f'[db]\nurl = "sqlite:////proc/nonexistent/snq.sqlite"\n')
        daemon = Daemon(self, self.dir, "-c", path)
        pattern = (r"worker generic\.0 \(pid \d+\) exited with exit status 1 "
                   r"after [\d.]+ s, under the 5 s threshold: restarting in "
                   r"([\d.]+) s")
        yield waitFor(lambda: len(re.findall(pattern, daemon.output())) >= 5,
                      timeout=30, what="five deaths at start")
        output = daemon.output()
        self.assertEqual(re.findall(pattern, output)[:5],
                         ["0.1", "0.2", "0.4", "0.8", "0.8"])
        self.assertRegex(output, r"\[generic\.0:\d+#critical\] worker generic\.0 "
                                 r"cannot start")
        self.assertIn("No such file or directory: '/proc/nonexistent'", output)
        self.assertTrue(daemon.alive(), "the master carries on")


class EmbeddedDefaultPoolTests(TestCase):
    """The issue's "done when", through snqctl, in the daemon's directory."""

    timeout = 60

    @defer.inlineCallbacks
    def test_twoWorkersStatusRestartStop(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        daemon = Daemon(self, directory, "--workers", "2")

        def status():
            result = snqctl("status", "--json", cwd=directory, check=False)
            return json.loads(result.stdout) if result.returncode == 0 else None

        def running():
            s = status()
            return s and [w["pid"] for w in s["workers"]
                          if w["state"] == "running"]

        yield waitFor(lambda: len(running() or []) == 2, what="two workers")
        before = running()
        table = snqctl("status", cwd=directory).stdout.splitlines()
        self.assertEqual([line.split()[0] for line in table[2:]],
                         ["worker", "generic.0", "generic.1"])
        restarted = snqctl("restart", cwd=directory).stdout.splitlines()
        self.assertEqual([line.split(":")[0] for line in restarted],
                         ["generic.0", "generic.1"])
        after = running()
        self.assertEqual(len(after), 2)
        self.assertFalse(set(before) & set(after))
        stopped = snqctl("stop", cwd=directory)
        self.assertIn("snq stopped", stopped.stdout)
        yield waitFor(lambda: not daemon.alive(), timeout=10, what="the master exit")
        self.assertFalse(any(alive(pid) for pid in before + after))
