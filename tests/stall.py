"""
What the "nothing stalls" integration tests share (issue 12): one class per
backend on its real server, each with a place of the test's own (an SQLite
file, a database, a Redis key prefix, a RabbitMQ vhost), a raw producer
that can put any bytes there, the count of what is left, and a way to cut
the daemon's connections; a pool daemon on it; a handler that notes when
each item starts and ends, and can kill its worker.
"""

import collections
import json
import os
import signal
import sqlite3
import time
import uuid

from stompest.config import StompConfig
from stompest.sync import Stomp
from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater

from snq.handlers import Defer, QueueHandler
from snq.item import Item
from tests import rabbitmq, sqlservers
from tests.daemon import Daemon, daemonStatus, snqctl, socketPath, waitFor
from tests.recorder import record
from tests.test_redis import REDIS_URL, RedisFixture

CONFIG = """
[daemon]
id = "{id}"
workers = {workers}
kill_time = 5
threshold = 0.2
min_restart_delay = 0.1
max_restart_delay = 0.5
control_socket = "{sock}"

[queue]
backend = "{backend}"
lease = 60
poll_interval = 0.2
retry_delay = 0.1
retry_max_delay = 1
max_frame = "16k"
concurrency = {concurrency}
prefetch = {prefetch}
max_retries = {retries}

{backendConfig}

[monitor]
http = "{http}"

[handlers]
stamp = "tests.stall:Stamp"

[sites.default]
stamp_file = "{dir}/stamps.txt"
"""


class Stamp(QueueHandler):
    """
    Notes C{"ID PID ATTEMPTS start|end TIME"} lines as it starts and ends an
    item,
    after C{payload.sleep} seconds; with C{payload.die}, the worker exits at
    once (C{os._exit}) C{payload.die} seconds after the item started; with
    C{payload.defer}, it raises L{Defer} (0.2 s) until that many seconds
    after the item was created.
    """

    def handle(self, item):
        path = self.context.siteConfig(item.site)["stamp_file"]
        payload = item.payload if isinstance(item.payload, dict) else {}
        _note(path, item, "start")
        clock = self.context.clock
        if time.time() < item.created + payload.get("defer", 0):
            raise Defer("deferred by the test", 0.2)
        if "die" in payload:
            return deferLater(clock, payload["die"], os._exit, 1)
        if payload.get("sleep"):
            return deferLater(clock, payload["sleep"], _note, path, item, "end")
        _note(path, item, "end")
        return None


def _note(path, item, what):
    record(path, item, what, repr(time.time()))


def stamps(directory):
    """[(item id, pid, attempts, "start" or "end", time)] in written order."""
    path = os.path.join(directory, "stamps.txt")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [(i, int(p), int(a), w, float(t)) for i, p, a, w, t in
                (line.split() for line in f if line.endswith("\n"))]


def frame(**payload) -> bytes:
    return Item(transport="stamp", payload=payload).toJSON()


#: Frames that can never become an item, each on every backend.
MALFORMED = [
    b'{"transport": "stamp", "payload": ' + b"[" * 1000 + b"]" * 1000 + b"}",
    b'{"transport": "stamp", "payload": "\\ud800"}',
    b'{"v": true, "transport": "stamp", "payload": {}}',
    b'{"id": 0, "transport": "stamp", "payload": {}}',
    b'{"transport": "stamp", "payload": {}, "attempts": "many"}',
    b'{"transport": "stamp", "payload": {}, "created": "yesterday"}',
    b"not JSON at all",
    b'{"transport": "stamp", "payload": "' + b"x" * 40_000 + b'"}',
]
#: And where a backend can hold any bytes.
NOT_UTF8 = b'\xff\xfe{"transport": "stamp", "payload": {}}'


class Backend:
    """A backend on its real server, in a place of the test's own."""

    name = ""
    #: Whether frames may be any bytes (else they must be text).
    anyBytes = False

    def setUp(self, testCase) -> defer.Deferred:
        return defer.succeed(None)

    def config(self) -> str:
        raise NotImplementedError

    def put(self, frames: list[bytes]) -> defer.Deferred:
        """As a producer would, raw."""
        raise NotImplementedError

    def putOdd(self) -> defer.Deferred:
        """What else this backend can hold that is no item; → how many."""
        return defer.succeed(0)

    def remaining(self) -> defer.Deferred:
        """Items not yet settled (waiting, held, waiting for a retry)."""
        raise NotImplementedError

    def cut(self) -> defer.Deferred:
        """Cut the daemon's connections to the server; None: it has none."""
        return None

    def malformed(self) -> list[bytes]:
        return MALFORMED + ([NOT_UTF8] if self.anyBytes else [])


class SqlBackend(Backend):
    def sql(self, statement, params=()):
        return threads.deferToThread(self.server.sql, statement, params)

    def put(self, frames):
        rows = [(f if isinstance(f, str) else f.decode("utf-8"), "stamp",
                 "default", 0, 0) for f in frames]
        return threads.deferToThread(self.server.insertMany, rows)

    def remaining(self):
        return threads.deferToThread(self.server.count)

    def config(self):
        return f'[db]\nurl = "{self.server.url()}"'


class SqliteBackend(SqlBackend):
    name = "SQLite"
    anyBytes = True

    def setUp(self, testCase):
        self.server = sqlservers.Sqlite(os.path.abspath(testCase.mktemp()))
        os.makedirs(os.path.dirname(self.server.path), exist_ok=True)
        return defer.succeed(None)

    def put(self, frames):
        # Text when it is UTF-8, else the bytes as they are (a BLOB).
        rows = []
        for f in frames:
            try:
                rows.append((f.decode("utf-8"), "stamp", "default", 0, 0))
            except UnicodeDecodeError:
                rows.append((f, "stamp", "default", 0, 0))
        return threads.deferToThread(self.server.insertMany, rows)

    def putOdd(self):
        good = frame().decode()

        def insert():
            with sqlite3.connect(self.server.path, timeout=30) as conn:
                conn.execute("INSERT INTO queue_item (frame, transport, site,"
                             " created, run_at) VALUES (CAST(X'7B22FF' AS"
                             " TEXT), 'stamp', 'default', 0, 0)")
                conn.execute("INSERT INTO queue_item (frame, transport, site,"
                             " created, run_at, attempts) VALUES (?, 'stamp',"
                             " 'default', 0, 0, 'abc')", (good,))
                conn.execute("INSERT INTO queue_item (frame, transport, site,"
                             " created, run_at) VALUES (?, 'stamp', 'default',"
                             " 0, 'soon')", (good,))
            return 3

        return threads.deferToThread(insert)


class ServerBackend(SqlBackend):
    serverClass = None

    def setUp(self, testCase):
        self.server = sqlservers.forTest(testCase, self.serverClass)
        return defer.succeed(None)

    def cut(self):
        return threads.deferToThread(self.server.killSessions)


class PostgresBackend(ServerBackend):
    name = "PostgreSQL"
    serverClass = sqlservers.Postgres


class MariaDbBackend(ServerBackend):
    name = "MariaDB"
    serverClass = sqlservers.MariaDb


class RedisBackend(RedisFixture, Backend):
    """Redis, under a key prefix of the test's own (see L{RedisFixture})."""

    name = "Redis"
    anyBytes = True

    def setUp(self, testCase):
        self.addCleanup, self.fail = testCase.addCleanup, testCase.fail
        self.daemonId = testCase.daemonId
        return self.setUpRedis()

    def config(self):
        return f'[redis]\nurl = "{REDIS_URL}"\nprefix = "{self.prefix}"'

    def put(self, frames):
        return self.redis.execute("LPUSH", self.prefix + "q:main", *frames)

    @defer.inlineCallbacks
    def remaining(self):
        p = self.prefix
        counts = yield defer.gatherResults([
            self.redis.execute("LLEN", p + "q:main"),
            self.redis.execute("ZCARD", p + "processing"),
            self.redis.execute("ZCARD", p + "delayed:main")])
        # Items in line: a line exists only while it holds some.
        lines = yield self.redis.execute("KEYS", p + "line:*")
        return sum(counts) + len(lines)

    @defer.inlineCallbacks
    def cut(self):
        """CLIENT KILL every connection of this daemon (named after its id)."""
        clients = yield self.redis.execute("CLIENT", "LIST")
        if isinstance(clients, bytes):
            clients = clients.decode()
        ids = []
        for line in clients.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if self.daemonId in fields.get("name", ""):
                ids.append(fields["id"])
        for clientId in ids:
            yield self.redis.execute("CLIENT", "KILL", "ID", clientId)
        return len(ids)


class StompBackend(Backend):
    """RabbitMQ, in a vhost of the test's own (dropped with its queues)."""

    name = "RabbitMQ"
    anyBytes = True

    def setUp(self, testCase):
        rabbitmq.requireRabbitMQ()
        self.vhost = rabbitmq.uniqueName()

        def make():
            rabbitmq.rabbitmqctl("add_vhost", self.vhost)
            rabbitmq.rabbitmqctl("set_permissions", "-p", self.vhost, "guest",
                                 ".*", ".*", ".*")

        testCase.addCleanup(rabbitmq.rabbitmqctl, "delete_vhost", self.vhost)
        return threads.deferToThread(make)

    def config(self):
        return f'[stomp]\nvhost = "{self.vhost}"\nheartbeat = 2'

    def put(self, frames):
        """
        Each frame with a receipt; what a cut leaves unconfirmed is sent
        again on a new connection (the cut may still be closing
        connections when this one opens).
        """
        def sendAll():
            unconfirmed = dict(enumerate(frames))
            for _ in range(5):
                try:
                    send(unconfirmed)
                except Exception:
                    time.sleep(0.2)
                if not unconfirmed:
                    return
            raise AssertionError(f"{len(unconfirmed)} frames never confirmed")

        def send(unconfirmed):
            client = Stomp(StompConfig(rabbitmq.STOMP_URL, login="guest",
                                       passcode="guest", version="1.2"))
            client.connect(host=self.vhost, connectTimeout=5, connectedTimeout=5)
            try:
                for n, body in unconfirmed.items():
                    client.send("/queue/snq%2Fmain", body, {"persistent": "true"},
                                receipt=str(n))
                while unconfirmed:
                    frame = client.receiveFrame()
                    assert frame.command == "RECEIPT", (frame.command, frame.body)
                    del unconfirmed[int(frame.headers["receipt-id"])]
            finally:
                client.close()

        return threads.deferToThread(sendAll)

    def remaining(self):
        def count():
            out = rabbitmq.rabbitmqctl("list_queues", "-p", self.vhost, "-q",
                                       "--no-table-headers", "name", "messages")
            return sum(int(messages) for name, messages in
                       (line.split() for line in out.splitlines() if line.strip())
                       if name != "snq/dead")

        return threads.deferToThread(count)

    def cut(self):
        return threads.deferToThread(
            rabbitmq.rabbitmqctl, "close_all_connections", "-p", self.vhost,
            "a test cuts the connections")


BACKENDS = {cls.name: cls for cls in (SqliteBackend, PostgresBackend,
                                      MariaDbBackend, RedisBackend, StompBackend)}


class PoolDaemonMixin:
    """For TestCases: C{self.backend} set up, and a pool daemon on it."""

    backendClass = None
    timeout = 180

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.sock = socketPath(self)
        self.daemonId = f"stall{uuid.uuid4().hex[:6]}"
        self.backend = self.backendClass()
        return self.backend.setUp(self)

    def daemon(self, workers=2, concurrency=10, prefetch=20, retries=10,
               http="", more=""):
        """A pool daemon; C{more} is added to its config file."""
        path = os.path.join(self.dir, "snq.toml")
        backend = {"SQLite": "db", "PostgreSQL": "db", "MariaDB": "db",
                   "Redis": "redis", "RabbitMQ": "stomp"}[self.backend.name]
        with open(path, "w") as f:
            f.write(CONFIG.format(
                id=self.daemonId, workers=workers, sock=self.sock,
                backend=backend, concurrency=concurrency, prefetch=prefetch,
                retries=retries, backendConfig=self.backend.config(),
                dir=self.dir, http=http) + more)
        self.configPath = path
        return Daemon(self, self.dir, "-c", path)

    @defer.inlineCallbacks
    def workers(self):
        """The current workers that run: [(id, pid)]."""
        try:
            status = yield daemonStatus(self.sock)
        except Exception:
            return []
        return [(w["id"], w["pid"]) for w in status["workers"]
                if w["role"] == "current" and w["state"] == "running"]

    @defer.inlineCallbacks
    def running(self, n, timeout=60):
        """Wait until C{n} workers run; → them."""
        deadline = time.monotonic() + timeout
        while len(workers := (yield self.workers())) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{n} workers never ran")
            yield deferLater(reactor, 0.1, lambda: None)
        return workers

    @defer.inlineCallbacks
    def waitForDeadLetters(self, n, timeout=30):
        """Poll the dead letters until there are C{n} (or time is up); → them."""
        deadline = time.monotonic() + timeout
        while True:
            letters = yield self.deadLetters()
            if len(letters) >= n or time.monotonic() > deadline:
                return letters
            yield deferLater(reactor, 0.5, lambda: None)

    def deadLetters(self):
        """[(reason, error)] through snqctl, whatever the backend."""

        def read():
            result = snqctl("-c", self.configPath, "dead", "list", "--json",
                            "--limit", "10000", cwd=self.dir)
            return [(d["reason"], d["error"]) for d in
                    map(json.loads, result.stdout.splitlines())]

        return threads.deferToThread(read)

    def started(self):
        """item id → [(pid, attempts, time)] of its starts."""
        starts = collections.defaultdict(list)
        for itemId, pid, attempts, what, when in stamps(self.dir):
            if what == "start":
                starts[itemId].append((pid, attempts, when))
        return starts

    def runningIn(self, pid, ids):
        """The items of C{ids} that C{pid} started and has not ended."""
        ended = {(i, p) for i, p, _, what, _ in stamps(self.dir)
                 if what == "end"}
        return {i for i, starts in self.started().items() if i in ids
                for p, _, _ in starts if p == pid and (i, pid) not in ended}

    def ended(self, ids):
        return {i for i, _, _, what, _ in stamps(self.dir)
                if what == "end"} >= ids

    @defer.inlineCallbacks
    def killBusiest(self, ids, running):
        """kill -9 the worker running most of C{ids} → (pid, its items, when)."""
        yield waitFor(lambda: len({i for i in self.started() if i in ids})
                      >= running, what=f"{running} items running")
        workers = yield self.workers()
        pid = max((pid for _, pid in workers),
                  key=lambda pid: len(self.runningIn(pid, ids)))
        victims = self.runningIn(pid, ids)
        os.kill(pid, signal.SIGKILL)
        return pid, victims, time.time()

    @defer.inlineCallbacks
    def recovery(self, items=6, sleep=2.0, running=4):
        """
        Put C{items} slow items; once C{running} run, kill -9 the worker
        running most → (seconds until each of its items started again in
        another process, their ids, the killed pid).
        """
        frames = [frame(sleep=sleep) for _ in range(items)]
        ids = {json.loads(f)["id"] for f in frames}
        yield self.backend.put(frames)
        pid, victims, killed = yield self.killBusiest(ids, running)

        def again():
            starts = self.started()
            later = [min(t for p, _, t in starts[i] if p != pid)
                     for i in victims if any(p != pid for p, _, _ in starts[i])]
            return max(later) - killed if len(later) == len(victims) else None

        yield waitFor(lambda: again() is not None, timeout=30,
                      what="the killed worker's items running again")
        return again(), ids, pid
