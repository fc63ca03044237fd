# -*- test-case-name: tests.test_cluster_integration -*-
"""
Two real daemons (distinct ids and pids) sharing a backend, seen and
driven through the cluster's registry: C{snqctl status --cluster}, C{check
--cluster}, C{reload --cluster}, C{pause} and C{resume}, on SQLite,
PostgreSQL, Redis and RabbitMQ (STOMP, with the registry in C{[ledger]
url}, or in RabbitMQ's queues without it).
"""

import json
import os
import signal
import socket
import time

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from snq import config as snqconfig
from snq.cluster import liveness, withStore
from tests import rabbitmq, sqlservers
from tests.daemon import Daemon, snqctl, socketPath, waitFor
from tests.recorder import recorded
from tests.test_redis import REDIS_URL, RedisFixture

CONFIG = """
[daemon]
id = "{id}"
workers = 1
kill_time = 5
threshold = 0.1
control_socket = "{socket}"

[queue]
retry_delay = {retryDelay}
{queue}

[monitor]
http = ""

[cluster]
heartbeat = 0.5
stale = 3

[handlers]
record = "tests.recorder:Record"

[sites.default]
record_file = "{dir}/handled.txt"

[sites.ex]
record_file = "{dir}/handled.txt"
{sections}
"""


class ClusterMixin:
    timeout = 240

    def backend(self) -> tuple[str, str]:
        """→ the [queue] lines and the other sections of this backend."""
        raise NotImplementedError

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.queue, self.sections = self.backend()
        self.record = os.path.join(self.dir, "handled.txt")
        self.sockets = {}

    def configure(self, name, retryDelay=0.2):
        """Daemon C{name}'s config file (its own id and socket); → its path."""
        path = os.path.join(self.dir, f"{name}.toml")
        sock = self.sockets.setdefault(name, socketPath(self))
        with open(path, "w") as f:
            f.write(CONFIG.format(id=name, socket=sock, dir=self.dir,
                                  retryDelay=retryDelay, queue=self.queue,
                                  sections=self.sections))
        return path

    @defer.inlineCallbacks
    def start(self, *names):
        daemons = {name: Daemon(self, self.dir, "-c", self.configure(name))
                   for name in names}
        for name, daemon in daemons.items():
            yield waitFor(lambda d=daemon: "is ready" in d.output(),
                          what=f"daemon {name} ready")
        yield self.waitForDaemons({n: "live" for n in names})
        return daemons

    def snqctl(self, *args, check=True):
        return snqctl("-c", os.path.join(self.dir, "a.toml"), *args,
                      cwd=self.dir, check=check)

    def status(self) -> dict:
        """What C{snqctl status --cluster --json} shows, by daemon id."""
        status = json.loads(self.snqctl("status", "--cluster", "--json").stdout)
        return {r["name"].split("@")[0]: r for r in status["daemons"]}

    @defer.inlineCallbacks
    def registry(self) -> dict:
        """The records, read here (quicker than snqctl), by daemon id."""
        config = snqconfig.load(os.path.join(self.dir, "a.toml"))
        records = yield withStore(config, reactor, lambda s: s.daemons())
        now = time.time()
        return {name.split("@")[0]: dict(
                    r, liveness=liveness(r, now, config.cluster.stale))
                for name, r in records.items()}

    @defer.inlineCallbacks
    def waitFor(self, condition, what, timeout=60):
        """Until C{condition(records by daemon id)} holds."""
        deadline = time.monotonic() + timeout
        while not condition((yield self.registry())):
            if time.monotonic() > deadline:
                self.fail(f"timed out after {timeout} s waiting for {what}")
            yield deferLater(reactor, 0.25, lambda: None)

    def waitForDaemons(self, expected: dict, timeout=60):
        """Until each daemon named in C{expected} shows that liveness."""
        return self.waitFor(lambda daemons: all(
            daemons.get(n, {}).get("liveness") == state
            for n, state in expected.items()), f"daemons {expected}", timeout)

    def check(self, *args):
        result = self.snqctl("check", "--cluster", *args, check=False)
        return result.returncode, result.stdout

    @defer.inlineCallbacks
    def test_cluster(self):
        """One pair of daemons for it all: starting them is the slow part."""
        daemons = yield self.start("a", "b")
        yield self.pauseAndResume(daemons)
        yield self.viewCheckReload(daemons)

    @defer.inlineCallbacks
    def viewCheckReload(self, daemons):
        host = socket.gethostname()
        # The counts in the records are those of each daemon's last heartbeat.
        yield self.waitFor(lambda records: sum(
            w["handled"] for n in "ab" for w in records.get(n, {}).get("workers", [])
        ) == 40, "the 40 items handled in the records")
        status = self.status()
        self.assertEqual({status[n]["pid"] for n in "ab"},
                         {daemons[n].process.pid for n in "ab"})
        self.assertEqual([w["state"] for n in "ab" for w in status[n]["workers"]],
                         ["running", "running"])
        self.assertEqual(sum(w["handled"] for n in "ab"
                             for w in status[n]["workers"]), 40)
        text = self.snqctl("status", "--cluster").stdout
        self.assertIn("2 daemons live, 0 gone", text)
        self.assertIn("  a.0 ", text)
        self.assertEqual(self.check("--min-daemons", "2")[0], 0)

        # Both files changed; one command reloads both daemons.
        self.configure("a", retryDelay=0.3)
        self.configure("b", retryDelay=0.3)
        result = self.snqctl("reload", "--cluster")
        for name in (f"a@{host}:", f"b@{host}:"):
            self.assertIn(name, result.stdout)
        self.assertEqual(result.stdout.count("config generation 2 from"), 2)
        self.assertEqual(result.stdout.count("queue.retry_delay: 0.2 → 0.3"), 2)
        status = self.status()
        self.assertEqual([status[n]["generation"] for n in "ab"], [2, 2])

        # One host's config differs: a WARNING.
        self.configure("b", retryDelay=0.4)
        snqctl("-c", os.path.join(self.dir, "b.toml"), "reload", cwd=self.dir)
        yield self.waitFor(lambda daemons: daemons["b"]["generation"] == 3,
                           "b on its generation 3")
        code, line = self.check("--min-daemons", "2")
        self.assertEqual(code, 1, line)
        self.assertIn("configs differ", line)

        # A daemon killed: gone once its heartbeat is stale.
        daemons["b"].kill(signal.SIGKILL)
        yield self.waitForDaemons({"a": "live", "b": "stale"})
        self.assertIn("gone (stale)", self.snqctl("status", "--cluster").stdout)
        code, line = self.check("--min-daemons", "1")
        self.assertEqual(code, 1, line)
        self.assertIn(f"b@{host} silent for", line)
        self.assertEqual(self.check("--min-daemons", "2")[0], 2)
        # A reload asked now is answered by the live one alone.
        result = self.snqctl("reload", "--cluster")
        self.assertIn("reload asked of 1 daemons", result.stdout)

        # One stopped cleanly says so at once.
        daemons["a"].kill(signal.SIGTERM)
        yield self.waitForDaemons({"a": "stopped"}, timeout=30)

    def handled(self):
        return recorded(self.record)

    def enqueue(self, n, site="default"):
        snqctl("-c", os.path.join(self.dir, "a.toml"), "enqueue", "record", "-",
               "--site", site, cwd=self.dir, stdin="{}\n" * n)

    def seenPause(self, daemons, what, count):
        """Until every daemon's worker has logged C{what} C{count} times."""
        return waitFor(lambda: all(
            d.output().count(f"cluster pauses: {what}") >= count
            for d in daemons.values()), timeout=30, what=f"'{what}' seen")

    @defer.inlineCallbacks
    def pauseAndResume(self, daemons):
        self.snqctl("pause", "record")
        yield self.seenPause(daemons, "transport record paused", 1)
        self.enqueue(20)
        # Several heartbeats, each a look at the pauses: nothing runs.
        yield deferLater(reactor, 3, lambda: None)
        self.assertEqual(self.handled(), [])
        self.assertIn("paused: transport record",
                      self.snqctl("status", "--cluster").stdout)
        self.snqctl("resume", "record")
        yield waitFor(lambda: len(self.handled()) == 20, what="20 items handled")
        yield self.seenPause(daemons, "nothing paused", 1)

        self.snqctl("pause", "--site", "ex")
        yield self.seenPause(daemons, "site ex paused", 1)
        self.enqueue(10, site="ex")
        self.enqueue(10)
        yield waitFor(lambda: len(self.handled()) == 30,
                      what="the other site's 10 items handled")
        yield deferLater(reactor, 2, lambda: None)
        self.assertEqual(len(self.handled()), 30)
        self.snqctl("resume", "--site", "ex")
        yield waitFor(lambda: len(self.handled()) == 40, what="40 items handled")
        handled = self.handled()
        self.assertEqual(len({itemId for itemId, *_ in handled}), 40)
        # Put back while paused, never charged.
        self.assertEqual({attempts for _, _, attempts in handled}, {"0"})
        workers = {str(w["pid"]) for r in self.status().values()
                   for w in r["workers"]}
        self.assertLessEqual({pid for _, pid, _ in handled}, workers)


class SqliteClusterTests(ClusterMixin, TestCase):
    def backend(self):
        return f'[db]\nurl = "sqlite:///{self.dir}/snq.sqlite"', ""


class PostgresClusterTests(ClusterMixin, TestCase):
    def backend(self):
        server = sqlservers.forTest(self, sqlservers.Postgres)
        return "", f'[db]\nurl = "{server.url()}"'


class RedisClusterTests(ClusterMixin, RedisFixture, TestCase):
    def setUp(self):
        return self.setUpRedis().addCallback(lambda _: ClusterMixin.setUp(self))

    def backend(self):
        return ('backend = "redis"',
                f'[redis]\nurl = "{REDIS_URL}"\nprefix = "{self.prefix}"')


class StompClusterTests(ClusterMixin, TestCase):
    """The registry in [ledger] url: a broker keeps none."""

    def backend(self):
        rabbitmq.requireRabbitMQ()
        name = rabbitmq.uniqueName()
        self.addCleanup(rabbitmq.deleteQueues, name)
        return (f'backend = "stomp"\nbasename = "/queue/{name}/"',
                f'[stomp]\ncontrol_channel = "/topic/{name}/control"\n'
                f'[ledger]\nurl = "sqlite:///{self.dir}/ledger.sqlite"')


class StompOnlyClusterTests(ClusterMixin, TestCase):
    """No [ledger] url: the registry in RabbitMQ's own queues, signed."""

    def backend(self):
        rabbitmq.requireRabbitMQ()
        name = rabbitmq.uniqueName()
        self.addCleanup(rabbitmq.deleteQueues, name)
        return (f'backend = "stomp"\nbasename = "/queue/{name}/"',
                f'[stomp]\ncontrol_channel = "/topic/{name}/control"\n'
                'control_secret = "cluster-test-secret"')

