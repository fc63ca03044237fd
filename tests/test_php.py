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

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests import rabbitmq, sqlservers
from tests.daemon import ROOT, freePort, waitFor
from tests.stampdaemon import REDIS_URL, OnServer, deleteRedisKeys

EXAMPLES = os.path.join(ROOT, "contrib", "php", "examples")
NO_PHP = ("php (Debian's php-cli, with php-pgsql, php-mysql and php-sqlite3) "
          "must be installed for this test: run scripts/setup-services as root")
SECRET = "php-test-secret"

class PhpExamples(OnServer):
    """Mixin: C{backend}, C{example}, C{environ()}; see L{OnServer}."""

    example = ""
    # The examples enqueue webhooks: here they are only stamped.
    transport = "webhook"
    breakouts = ("main/webhook",)
    secret = SECRET

    def setUp(self):
        if shutil.which("php") is None:
            self.fail(NO_PHP)
        super().setUp()

    @defer.inlineCallbacks
    def test_example(self):
        daemon = yield self.stamps.start()
        result = yield threads.deferToThread(
            subprocess.run, ["php", os.path.join(EXAMPLES, self.example)],
            capture_output=True, text=True, timeout=60,
            env=dict(os.environ, **self.environ()))
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        report = json.loads(result.stdout)
        yield self.stamps.waitHandled(report["handled"], timeout=30)
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
        self.addCleanup(deleteRedisKeys, f"{self.name}:")

    def environ(self):
        return {"REDIS_URL": REDIS_URL,
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


class PhpStompPriorityTests(TestCase):
    """
    With [stomp] max_priority or queue_type, PHP declares (and
    prioritises) as snq does.
    """

    php = PhpErrorTests.php

    def test_priorityQueue(self):
        rabbitmq.requireRabbitMQ()
        name = rabbitmq.uniqueName()
        self.addCleanup(rabbitmq.deleteQueues, name)
        out = self.php(
            f"$p = new Snq\\Producer(['queue' => ['backend' => 'stomp', "
            f"'basename' => '/queue/{name}/'], 'stomp' => ['max_priority' => 5]]);"
            " $p->enqueue('log', 'low'); $p->enqueue('log', 'high', "
            "['priority' => 9]); echo 'sent';")
        self.assertEqual(out, "sent")
        client = rabbitmq.producer()
        try:
            client.subscribe(f"/queue/{name}%2Fmain",
                             {"ack": "auto", "id": "1", "x-max-priority": "5"})
            frames = [client.receiveFrame() for _ in range(2)]
        finally:
            client.close()
        self.assertEqual([(json.loads(f.body)["payload"], f.headers["priority"])
                          for f in frames], [("high", "5"), ("low", "0")])

    def test_quorumQueue(self):
        """
        With [stomp] queue_type = "quorum", PHP's SENDs declare the queue
        and the delay queue as the daemon does (RabbitMQ would refuse them
        otherwise, once the daemon declared them).
        """
        rabbitmq.requireRabbitMQ()
        name = rabbitmq.uniqueName()
        self.addCleanup(rabbitmq.deleteQueues, name)
        out = self.php(
            f"$p = new Snq\\Producer(['queue' => ['backend' => 'stomp', "
            f"'basename' => '/queue/{name}/'], 'stomp' => ['queue_type' => "
            "'quorum']]); $p->enqueue('log', 'now'); $p->enqueue('log', "
            "'later', ['delay' => 0.2]); echo 'sent';")
        self.assertEqual(out, "sent")
        kinds = sorted(
            (queue.partition(".retry")[0], kind) for queue, _, kind in (
                line.partition("\t") for line in rabbitmq.rabbitmqctl(
                    "list_queues", "-q", "--no-table-headers", "name", "type"
                ).splitlines())
            if queue.startswith(name))
        self.assertEqual(kinds, [(f"{name}/main", "quorum")] * 2,
                         "the queue and its delay queue")
        client = rabbitmq.producer()
        try:
            client.subscribe(f"/queue/{name}%2Fmain", {
                "ack": "auto", "id": "1", "x-queue-type": "quorum"})
            frames = [client.receiveFrame() for _ in range(2)]
        finally:
            client.close()
        self.assertEqual(sorted(json.loads(f.body)["payload"] for f in frames),
                         ["later", "now"])
