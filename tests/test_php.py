# -*- test-case-name: tests.test_php -*-
"""
The PHP producer (C{contrib/php/Snq.php}) with Debian's php-cli against
the real servers: each example the manual shows (C{contrib/php/examples})
runs as it is, and a running daemon handles every item it enqueued, the
delayed ones in their time and uncharged; an item enqueued in a transaction
rolled back never exists; a signed control message is obeyed.
"""

import json
import os
import shutil
import subprocess

import redis
from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests import rabbitmq, sqlservers
from tests.daemon import ROOT, Daemon, freePort, waitFor
from tests.recorder import recorded

EXAMPLES = os.path.join(ROOT, "contrib", "php", "examples")
NO_PHP = ("php (Debian's php-cli, with php-pgsql, php-mysql and php-sqlite3) "
          "must be installed for this test: run scripts/setup-services as root")
SECRET = "php-test-secret"

CONFIG = """
[daemon]
workers = 1
kill_time = 5

[queue]
backend = "{backend}"
poll_interval = 0.2
basename = "/queue/{name}/"
breakout = ["main/webhook"]

[db]
url = "{dbUrl}"

[redis]
url = "redis://127.0.0.1:6379/1"
prefix = "{name}:"

[stomp]
control_channel = "/topic/{name}/control"
control_secret = "{secret}"

[handlers]
# The examples enqueue webhooks: here they are only recorded.
webhook = "tests.recorder:Stamp"

[sites.default]
record_file = "{dir}/handled.txt"
"""


class PhpExamples:
    """Mixin: C{backend}, C{example}, C{environ()}, and C{dbUrl} for SQL."""

    timeout = 120
    backend = ""
    example = ""
    dbUrl = "sqlite:///unused.sqlite"

    def setUp(self):
        if shutil.which("php") is None:
            self.fail(NO_PHP)
        self.name = rabbitmq.uniqueName()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.setUpServer()
        self.config = os.path.join(self.dir, "snq.toml")
        with open(self.config, "w") as f:
            f.write(CONFIG.format(backend=self.backend, name=self.name,
                                  dbUrl=self.dbUrl, dir=self.dir, secret=SECRET))
        self.record = os.path.join(self.dir, "handled.txt")

    def setUpServer(self):
        pass

    def handled(self):
        return {itemId: (int(attempts), float(started))
                for itemId, _, attempts, started in recorded(self.record)}

    @defer.inlineCallbacks
    def test_example(self):
        daemon = Daemon(self, self.dir, "-c", self.config, "--inline")
        yield waitFor(lambda: "consuming groups" in daemon.output(),
                      what="the daemon to start")
        result = yield threads.deferToThread(
            subprocess.run, ["php", os.path.join(EXAMPLES, self.example)],
            capture_output=True, text=True, timeout=60,
            env=dict(os.environ, **self.environ()))
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        report = json.loads(result.stdout)
        yield waitFor(lambda: set(report["handled"]) <= self.handled().keys(),
                      timeout=30, what="the PHP producer's items handled")
        handled = self.handled()
        self.assertEqual(sorted(handled), sorted(report["handled"]))
        for itemId in report["delayed"]:
            attempts, started = handled[itemId]
            self.assertEqual(attempts, 0)
            self.assertGreaterEqual(started, report["notBefore"])
        yield defer.maybeDeferred(self.checkAfter, daemon, report)

    def checkAfter(self, daemon, report):
        pass


class SqlExamples(PhpExamples):
    backend = "db"
    example = "sql.php"

    def checkAfter(self, daemon, report):
        self.assertEqual(self.server.count(), 0, "the rolled back item exists")
        self.assertNotIn(report["undone"][0], self.handled())


class SqlitePhpTests(SqlExamples, TestCase):
    def setUpServer(self):
        self.server = sqlservers.Sqlite(self.dir)
        self.dbUrl = self.server.url()

    def environ(self):
        return {"DATABASE_DSN": f"sqlite:{self.server.path}"}


class PostgresPhpTests(SqlExamples, TestCase):
    def setUpServer(self):
        self.server = sqlservers.forTest(self, sqlservers.Postgres)
        self.dbUrl = self.server.url()

    def environ(self):
        return {"DATABASE_DSN": "pgsql:host=127.0.0.1;port=5432;dbname="
                                + self.server.database,
                "DATABASE_USER": "postgres"}


class MariaDbPhpTests(SqlExamples, TestCase):
    def setUpServer(self):
        self.server = sqlservers.forTest(self, sqlservers.MariaDb)
        self.dbUrl = self.server.url()

    def environ(self):
        return {"DATABASE_DSN": "mysql:host=127.0.0.1;port=3306;charset=utf8mb4;"
                                "dbname=" + self.server.database,
                "DATABASE_USER": "root"}


class RedisPhpTests(PhpExamples, TestCase):
    backend = "redis"
    example = "redis.php"

    def setUpServer(self):
        self.addCleanup(self.deleteKeys)

    def deleteKeys(self):
        client = redis.Redis.from_url("redis://127.0.0.1:6379/1")
        keys = list(client.scan_iter(f"{self.name}:*"))
        if keys:
            client.delete(*keys)
        client.close()

    def environ(self):
        return {"REDIS_URL": "redis://127.0.0.1:6379/1",
                "SNQ_PREFIX": f"{self.name}:"}


class StompPhpTests(PhpExamples, TestCase):
    backend = "stomp"
    example = "stomp.php"

    def setUpServer(self):
        rabbitmq.requireRabbitMQ()
        self.addCleanup(rabbitmq.deleteQueues, self.name)

    def environ(self):
        return {"SNQ_BASENAME": f"/queue/{self.name}/",
                "SNQ_CONTROL": f"/topic/{self.name}/control",
                "SNQ_CONTROL_SECRET": SECRET}

    def checkAfter(self, daemon, report):
        """The signed update:default was verified and obeyed."""
        return waitFor(lambda: "reloading the config (update:default from the "
                       "control channel)" in daemon.output(), timeout=10,
                       what="the control message obeyed")


class PhpErrorTests(TestCase):
    """What a PHP application gets when the backend is down, or refuses."""

    def php(self, code):
        if shutil.which("php") is None:
            self.fail(NO_PHP)
        script = (f"require '{ROOT}/contrib/php/Snq.php';\n"
                  f"try {{ {code} }} catch (Snq\\EnqueueError $e) {{\n"
                  "    echo get_class($e), ': ', $e->getMessage(), ' / ',\n"
                  "         get_class($e->getPrevious()), \"\\n\";\n}\n")
        result = subprocess.run(["php", "-r", script], capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def test_down(self):
        for backend, section in [
                ("redis", f"'redis' => ['url' => 'redis://127.0.0.1:{freePort()}/0']"),
                ("stomp", f"'stomp' => ['servers' => ['tcp://127.0.0.1:{freePort()}']]")]:
            out = self.php(f"(new Snq\\Producer(['queue' => ['backend' => '{backend}'],"
                           f" {section}]))->enqueue('log', 1);")
            self.assertIn(f"Snq\\EnqueueError: cannot enqueue on {backend}: ", out)
            self.assertIn("Connection refused", out)

    def test_noSchema(self):
        out = self.php("(new Snq\\Producer([], new PDO('sqlite::memory:')))"
                       "->enqueue('log', 1);")
        self.assertIn("no such table: queue_item / PDOException", out)

    def test_badArguments(self):
        out = self.php("try { (new Snq\\Producer())->enqueue('a/b', 1); }"
                       " catch (InvalidArgumentException $e) {"
                       " echo $e->getMessage(); }")
        self.assertEqual(out, "transport must be a non-empty name without '/' "
                              "or spaces")
