# -*- test-case-name: tests.test_reload_integration -*-
"""
Reloading a real daemon under load: C{twistd -n snq} with its workers,
items enqueued all along by a feeder, the config file edited, then SIGHUP
or C{snqctl reload}.  Every test checks that every item was handled, none
twice (nothing is killed), and, where nothing had to restart, that the
workers' pids did not change.  SQLite for the pool's side; Redis and
RabbitMQ for lists and subscriptions that follow the config.
"""

import collections
import json
import os
import signal
import sqlite3
import threading
import time

from twisted.internet import defer, error, reactor, threads
from twisted.internet.task import LoopingCall, deferLater
from twisted.trial.unittest import TestCase

from snq.item import Item
from tests import rabbitmq
from tests.daemon import Daemon, daemonStatus, snqctl, socketPath, waitFor
from tests.test_redis import REDIS_URL, RedisFixture, waitUntil

#: The handler the daemons run, in a module of the test's own directory (the
#: daemon's working directory, so on its path): a test changes its code.
HANDLER = '''
import os

from twisted.internet.task import deferLater

from snq.handlers import QueueHandler

VERSION = {version}


class Record(QueueHandler):
    """Appends "ID PID SITE VERSION" to the site's record_file."""

    def handle(self, item):
        path = self.context.siteConfig(item.site)["record_file"]
        line = f"{{item.id}} {{os.getpid()}} {{item.site}} {{VERSION}}\\n".encode()
        pause = (item.payload or {{}}).get("sleep")
        if pause:
            return deferLater(self.context.clock, pause, write, path, line)
        write(path, line)
        return None


def write(path, line):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
'''

CONFIG = """
[daemon]
workers = {workers}
kill_time = 5
threshold = 0.5
min_restart_delay = 0.2
start_timeout = 20
control_socket = "{sock}"

[queue]
poll_interval = 0.2
lease = 10
concurrency = 10
breakout = {breakout}
{queue}

[monitor]
http = ""

[handlers]
rec = "reloadcode:Record"
{handlers}

[sites.default]
record_file = "{dir}/handled.txt"
{sites}
"""


class ReloadTestCase(TestCase):
    timeout = 120
    workers = 2

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.sock = socketPath(self)
        self.path = os.path.join(self.dir, "snq.toml")
        self.record = os.path.join(self.dir, "handled.txt")
        #: site → ids enqueued
        self.enqueued = collections.defaultdict(set)
        self.sites = ["default"]
        self.handlerCode(1)

    def handlerCode(self, version):
        with open(os.path.join(self.dir, "reloadcode.py"), "w") as f:
            f.write(HANDLER.format(version=version))

    def configure(self, workers=None, breakout=(), queue="", handlers="",
                  sites=()):
        """Write the config; C{sites} are the nicks besides default."""
        with open(self.path, "w") as f:
            f.write(CONFIG.format(
                workers=workers or self.workers, sock=self.sock, dir=self.dir,
                breakout=json.dumps(list(breakout)), queue=queue,
                handlers=handlers, sites="\n".join(f"[sites.{s}]" for s in sites)))

    @defer.inlineCallbacks
    def started(self, **config):
        self.configure(**config)
        self.daemon = Daemon(self, self.dir, "-c", self.path)
        workers = yield self.running(self.workers)
        return workers

    def status(self):
        return daemonStatus(self.sock)

    @defer.inlineCallbacks
    def running(self, n, timeout=30.0):
        """Wait until exactly C{n} workers run (and none stops); → them."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                workers = (yield self.status())["workers"]
            except error.ConnectError:
                workers = []
            if len(workers) == n and all(w["state"] == "running" for w in workers):
                return workers
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {n} running "
                                     f"workers: {workers}")
            yield deferLater(reactor, 0.05, lambda: None)

    def reload(self, *args, check=True):
        """C{snqctl reload} in a thread (the reactor goes on meanwhile)."""
        return threads.deferToThread(snqctl, "-c", self.path, "reload", *args,
                                     cwd=self.dir, check=check)

    def sighup(self):
        """SIGHUP to the master; → a Deferred once the reload was applied."""
        before = self.daemon.output().count("applied (")
        self.daemon.process.send_signal(signal.SIGHUP)
        return waitFor(lambda: self.daemon.output().count("applied (") > before,
                       timeout=30, what="the reload applied")

    def handled(self):
        """[(item id, pid, site, version)] in the order handled."""
        if not os.path.exists(self.record):
            return []
        with open(self.record) as f:
            return [tuple(line.split()) for line in f if line.strip()]

    def feed(self, enqueue, interval=0.05):
        """Call C{enqueue(site)} for each of C{self.sites}, all along."""

        def tick():
            return defer.gatherResults([enqueue(site) for site in list(self.sites)])

        feeder = LoopingCall(tick)
        feeder.start(interval)
        self.addCleanup(lambda: feeder.running and feeder.stop())
        return feeder

    @defer.inlineCallbacks
    def allHandledOnce(self, feeder, settled):
        """
        Stop feeding; once C{settled()} (maybe a Deferred) holds, every item
        was handled once.
        """
        feeder.stop()
        yield waitUntil(settled, timeout=60, what="every item settled")
        enqueued = set().union(*self.enqueued.values())
        yield waitFor(lambda: len({r[0] for r in self.handled()}) >= len(enqueued),
                      timeout=30, what="every item recorded")
        handled = [r[0] for r in self.handled()]
        self.assertEqual(set(handled), enqueued)
        twice = [i for i, n in collections.Counter(handled).items() if n > 1]
        self.assertEqual(twice, [], "no item handled twice")
        return len(handled)

    def assertSamePids(self, before, after):
        self.assertEqual(sorted(w["pid"] for w in after),
                         sorted(w["pid"] for w in before), "no worker restarted")
        self.assertEqual([w["restarts"] for w in after], [0] * len(after))


class SqliteTestCase(ReloadTestCase):
    """On the embedded SQLite queue."""

    def sql(self, statement, params=()):
        with sqlite3.connect(os.path.join(self.dir, "snq.sqlite"),
                             timeout=30) as conn:
            return conn.execute(statement, params).fetchall()

    def insert(self, site, n=4, payload=None):
        """As any producer would: rows in queue_item (from a thread)."""
        items = [Item(transport="rec", payload=payload or {"sleep": 0.01},
                      site=site) for _ in range(n)]

        def insert():
            with sqlite3.connect(os.path.join(self.dir, "snq.sqlite"),
                                 timeout=30) as conn:
                conn.executemany(
                    "INSERT INTO queue_item (frame, transport, site, created,"
                    " run_at) VALUES (?, ?, ?, ?, ?)",
                    [(i.toJSON().decode(), i.transport, i.site, i.created, 0)
                     for i in items])
            self.enqueued[site].update(i.id for i in items)

        return threads.deferToThread(insert)

    def empty(self):
        return self.sql("SELECT count(*) FROM queue_item") == [(0,)]

    def dead(self):
        return self.sql("SELECT site, reason, error FROM queue_dead")


class SqliteReloadTests(SqliteTestCase):
    """The pool's side."""

    @defer.inlineCallbacks
    def test_siteAndBreakoutAddedBySighup(self):
        before = yield self.started(sites=["a"])
        self.sites.append("a")
        feeder = self.feed(self.insert)
        yield self.insert("b", 1)
        # It waits for its site's settings, with backoff, instead of dying.
        yield waitFor(lambda: self.sql("SELECT attempts FROM queue_item WHERE"
                                       " site = 'b' AND attempts > 0"),
                      what="b's item retried")
        self.assertEqual(self.dead(), [])
        yield deferLater(reactor, 0.5, lambda: None)
        self.configure(sites=["a", "b"], breakout=["main/rec/b"])
        started = time.monotonic()
        yield self.sighup()
        took = time.monotonic() - started
        self.sites.append("b")
        yield deferLater(reactor, 1.0, lambda: None)
        total = yield self.allHandledOnce(feeder, self.empty)
        self.assertGreater(len(self.enqueued["b"]), 10)
        self.assertEqual(self.dead(), [], "b's first item too was handled")
        after = yield self.running(2)
        self.assertSamePids(before, after)
        self.assertEqual({w["report"]["config"]["generation"] for w in after}, {2})
        output = self.daemon.output()
        self.assertIn("reloading the config (SIGHUP)", output)
        self.assertIn("  sites.b added (applied in place)", output)
        self.assertIn("  queue.breakout: [] → ['main/rec/b'] (applied in place)",
                      output)
        print(f"\nSIGHUP → applied in {took:.2f} s; {total} items, none lost "
              "or twice, no worker restarted")

    @defer.inlineCallbacks
    def test_invalidEditChangesNothing(self):
        before = yield self.started()
        feeder = self.feed(self.insert)
        with open(self.path, "a") as f:
            f.write('\n[transports.rec]\nconcurrency = -1\ncolour = "red"\n')
        result = yield self.reload(check=False)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.splitlines(), [
            "snqctl: reload: invalid configuration, nothing changed:",
            f"{self.path}: transports.rec.colour: unknown key (known: "
            "concurrency, timeout, max_retries, priority, group, rate, unique, "
            "unique_running)",
            f"{self.path}: transports.rec.concurrency: expected a number from "
            "0 to 100000, got -1"])
        self.configure(handlers='nothere = "reloadcode:NoSuchClass"')
        result = yield self.reload(check=False)
        self.assertEqual(result.returncode, 1)
        self.assertIn("handlers.nothere: cannot load reloadcode:NoSuchClass",
                      result.stderr)
        self.assertIn("reload refused, the daemon runs on as it was",
                      self.daemon.output())
        yield self.allHandledOnce(feeder, self.empty)
        after = yield self.running(2)
        self.assertSamePids(before, after)
        status = yield self.status()
        self.assertEqual(status["config"]["generation"], 1)
        self.assertEqual({w["report"]["config"]["generation"] for w in after}, {1})

    @defer.inlineCallbacks
    def test_workersTwoThreeOne(self):
        before = yield self.started()
        feeder = self.feed(self.insert)
        yield deferLater(reactor, 0.5, lambda: None)
        self.configure(workers=3)
        result = yield self.reload()
        # Over only once every worker runs the new generation, the new too.
        status = yield self.status()
        self.assertEqual([(w["state"], w["generation"]) for w in status["workers"]
                          if w["role"] == "current"], [("running", 2)] * 3)
        self.assertRegex(result.stdout, r"generic\.2 \(pid \d+\): started on "
                                        r"config generation 2")
        three = yield self.running(3)
        self.assertLessEqual({w["pid"] for w in before}, {w["pid"] for w in three})
        yield deferLater(reactor, 1.0, lambda: None)
        self.configure(workers=1)
        result = yield self.reload()
        self.assertIn("generic.1: removed (it finishes its items first)",
                      result.stdout)
        self.assertIn("generic.2: removed (it finishes its items first)",
                      result.stdout)
        [one] = yield self.running(1)
        self.assertEqual(one["pid"], before[0]["pid"])
        yield deferLater(reactor, 0.5, lambda: None)
        total = yield self.allHandledOnce(feeder, self.empty)
        pids = collections.Counter(r[1] for r in self.handled())
        self.assertEqual(len(pids), 3, "three workers took part")
        print(f"\nworkers 2 → 3 → 1 under load: {total} items, none lost or "
              "twice")

    @defer.inlineCallbacks
    def test_handlerCodeChangeRollsNeverBelowCapacity(self):
        before = yield self.started()
        feeder = self.feed(self.insert)
        running = []

        @defer.inlineCallbacks
        def sample():
            workers = (yield self.status())["workers"]
            running.append(sum(w["state"] == "running" and w["role"] != "retiring"
                               for w in workers))

        sampler = LoopingCall(sample)
        sampler.start(0.05)
        self.addCleanup(lambda: sampler.running and sampler.stop())
        yield deferLater(reactor, 0.5, lambda: None)
        self.handlerCode(2)
        started = time.monotonic()
        result = yield self.reload()
        took = time.monotonic() - started
        sampler.stop()
        self.assertIn("code reloadcode: ", result.stdout)
        self.assertIn("(rolling restart)", result.stdout)
        self.assertIn("generic.0: restarted on the new config", result.stdout)
        self.assertIn("generic.1: restarted on the new config", result.stdout)
        self.assertGreaterEqual(min(running), 2, "capacity never dropped")
        self.assertGreater(len(running), 5)
        after = yield self.running(2)
        self.assertFalse({w["pid"] for w in before} & {w["pid"] for w in after})
        yield deferLater(reactor, 0.5, lambda: None)
        total = yield self.allHandledOnce(feeder, self.empty)
        versions = [r[3] for r in self.handled()]
        self.assertEqual(versions[-1], "2")
        self.assertEqual({r[3] for r in self.handled()
                          if r[1] in {str(w["pid"]) for w in after}}, {"2"})
        print(f"\nhandler code change → rolling restart in {took:.2f} s, at "
              f"least {min(running)} workers running throughout; {total} items, "
              "none lost or twice")


class RedisReloadTests(RedisFixture, ReloadTestCase):
    """Redis lists consumed follow the breakouts, without a restart."""

    workers = 1

    @defer.inlineCallbacks
    def setUp(self):
        ReloadTestCase.setUp(self)
        yield self.setUpRedis()

    def configure(self, **kw):
        kw["queue"] = (f'backend = "redis"\n[redis]\nurl = "{REDIS_URL}"\n'
                       f'prefix = "{self.prefix}"')
        super().configure(**kw)

    def push(self, spec, site, n=4):
        items = [Item(transport="rec", payload={"sleep": 0.01}, site=site)
                 for _ in range(n)]
        self.enqueued[spec].update(i.id for i in items)
        return self.redis.execute("LPUSH", self.key(f"q:{spec}"),
                                  *[i.toJSON() for i in items])

    @defer.inlineCallbacks
    def settled(self):
        lengths = yield defer.gatherResults(
            [self.llen("q:main"), self.llen("q:main/rec/b"), self.zcard("processing")])
        return lengths == [0, 0, 0]

    @defer.inlineCallbacks
    def test_breakoutListFollowsTheConfig(self):
        before = yield self.started(sites=["b"])
        self.sites = ["main"]
        feeder = self.feed(lambda spec: self.push(spec, "default"))
        self.configure(sites=["b"], breakout=["main/rec/b"])
        yield self.sighup()
        self.assertIn(f"consuming {self.prefix}q:main/rec/b", self.daemon.output())
        yield self.push("main/rec/b", "b", 20)
        yield waitFor(lambda: self.enqueued["main/rec/b"] <= {
            r[0] for r in self.handled()}, what="the breakout's items handled")
        self.enqueued["consumed main/rec/b"] = self.enqueued.pop("main/rec/b")

        self.configure(sites=["b"])
        result = yield self.reload()
        self.assertIn(f"no longer consuming {self.prefix}q:main/rec/b",
                      result.stdout)
        for _ in range(3):
            yield self.push("main/rec/b", "b", 5)
        left = self.enqueued.pop("main/rec/b") - {r[0] for r in self.handled()}
        yield deferLater(reactor, 1.0, lambda: None)
        self.assertEqual((yield self.llen("q:main/rec/b")), 15,
                         "no longer consumed")
        self.assertEqual(len(left), 15)
        yield self.redis.execute("DEL", self.key("q:main/rec/b"))
        yield self.allHandledOnce(feeder, self.settled)
        after = yield self.running(1)
        self.assertSamePids(before, after)


class StompReloadTests(ReloadTestCase):
    """RabbitMQ subscriptions follow the breakouts, without a restart."""

    workers = 1

    def setUp(self):
        rabbitmq.requireRabbitMQ()
        super().setUp()
        self.name = rabbitmq.uniqueName()
        self.addCleanup(rabbitmq.deleteQueues, self.name)
        self.producer = rabbitmq.producer()
        self.addCleanup(self.producer.close)
        self.addCleanup(self.producer.disconnect)
        # The feeder's thread and the test's share the connection.
        self.sending = threading.Lock()

    def configure(self, **kw):
        kw["queue"] = (f'backend = "stomp"\nbasename = "/queue/{self.name}/"\n'
                       f'[stomp]\ncontrol_channel = "/topic/{self.name}/control"'
                       '\ncontrol_secret = "reload-test-secret"')
        super().configure(**kw)

    def send(self, spec, site, n=4):
        items = [Item(transport="rec", payload={"sleep": 0.01}, site=site)
                 for _ in range(n)]
        self.enqueued[spec].update(i.id for i in items)

        def send():
            with self.sending:
                for item in items:
                    self.producer.send(f"/queue/{self.name}%2F"
                                       + spec.replace("/", "%2F"), item.toJSON(),
                                       {"persistent": "true"})

        return threads.deferToThread(send)

    def depths(self):
        return rabbitmq.queueDepths(self.name)

    def consumers(self, queue):
        out = rabbitmq.rabbitmqctl("list_queues", "-q", "--no-table-headers",
                                   "name", "consumers")
        for line in out.splitlines():
            name, _, count = line.partition("\t")
            if name.strip() == f"{self.name}/{queue}":
                return int(count)
        return None

    @defer.inlineCallbacks
    def test_subscriptionsFollowTheConfig(self):
        before = yield self.started(sites=["b"])
        self.sites = ["main"]
        feeder = self.feed(lambda spec: self.send(spec, "default"))
        self.configure(sites=["b"], breakout=["main/rec/b"])
        # What StatusNet's sites did: tell every daemon on the control channel.
        control = yield threads.deferToThread(
            snqctl, "-c", self.path, "control", "update", "b", cwd=self.dir)
        self.assertIn("published update:b", control.stdout)
        yield waitFor(lambda: "applied (" in self.daemon.output(), timeout=30,
                      what="the reload the control channel asked for")
        self.assertIn("update:b from the control channel", self.daemon.output())
        yield self.send("main/rec/b", "b", 20)
        yield waitFor(lambda: self.enqueued["main/rec/b"] <= {
            r[0] for r in self.handled()}, what="the breakout's items handled")
        self.enqueued["consumed main/rec/b"] = self.enqueued.pop("main/rec/b")
        self.assertEqual(self.consumers("main/rec/b"), 1)

        self.configure(sites=["b"])
        result = yield self.reload()
        self.assertIn(f"unsubscribed from /queue/{self.name}/main/rec/b",
                      result.stdout)
        yield self.send("main/rec/b", "b", 15)
        self.enqueued.pop("main/rec/b")
        yield waitFor(lambda: self.depths().get(f"{self.name}/main/rec/b")
                      == (15, 0), timeout=30,
                      what="the breakout's items waiting, unconsumed")
        self.assertEqual(self.consumers("main/rec/b"), 0)
        yield self.allHandledOnce(
            feeder, lambda: self.depths().get(f"{self.name}/main") == (0, 0))
        after = yield self.running(1)
        self.assertSamePids(before, after)


class SiteDaemonTests(SqliteTestCase):
    """C{--site}: a daemon of one site on a queue shared with others."""

    @defer.inlineCallbacks
    def test_oneSiteOnly(self):
        self.configure(workers=1, sites=["a", "b"])
        daemon = Daemon(self, self.dir, "-c", self.path, "--site", "a")
        yield self.running(1)
        self.assertIn("1 workers, site a", daemon.output())
        self.assertIn("consuming groups main (site a only)", daemon.output())
        yield self.insert("b", 10)
        yield self.insert("a", 10)
        yield waitFor(lambda: len(self.handled()) >= 10, what="a's items")
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertEqual({r[0] for r in self.handled()}, self.enqueued["a"])
        self.assertEqual(self.sql("SELECT site, count(*), count(claimed_by) FROM "
                                  "queue_item GROUP BY site"), [("b", 10, 0)])
