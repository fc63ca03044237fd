"""
The queue systems the benchmarks run: snq on each of its backends and its
peers, each started as its operator would start it, fed as its producers
would feed it, and watched from outside.

A L{System} knows how to empty its queue, enqueue a backlog of one job of
L{bench.job}, send a probe, start and stop its processes, and which of them
are the master and the workers.  Progress is read from the jobs' own counts
(L{bench.job.handled}), the same way for every system, so no broker is
asked how far a drain got.

Servers used, all on 127.0.0.1: Redis (databases 11 for the job's
C{INCR}; 12 snq, under a key prefix of its own; 13 Dramatiq, 14 Celery, 10
Huey, each emptied before and after a run: databases no test suite or
other benchmark here uses), RabbitMQ (queues named C{snqbench-…}, deleted
afterwards).
"""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid

import redis

from bench import job
from bench.common import ROOT, TWISTD, tree
from bench.snq_jobs import HANDLERS

REDIS = "redis://127.0.0.1:6379"
JOB_REDIS = f"{REDIS}/11"
#: Names on the shared RabbitMQ that are this run's alone.
RUN = f"snqbench-{uuid.uuid4().hex[:8]}"

os.environ.setdefault("BENCH_QUEUE", f"{RUN}-dramatiq")


class System:
    """One queue system under test: its processes, its producer, its queue."""

    key = ""
    label = ""
    #: The key of the Dramatiq row this one's throughput is compared with.
    peer = "dramatiq-redis"
    #: The Redis database of the broker, if Redis is the broker.
    db = None

    def __init__(self, job="incr", workers=2):
        self.job = job
        self.workers = workers
        if workers != 2:
            self.label = f"{self.label}, {workers} worker{'s' if workers > 1 else ''}"
        self.dir = tempfile.mkdtemp(prefix=f"bench-{self.key}-")
        self.env = dict(
            os.environ, BENCH_DIR=self.dir, BENCH_JOB_REDIS=JOB_REDIS,
            PYTHONPATH=os.pathsep.join(filter(None, [
                ROOT, os.environ.get("PYTHONPATH")])))
        if self.db is not None:
            self.env["BENCH_REDIS_URL"] = f"{REDIS}/{self.db}"
            self.redis = redis.Redis.from_url(self.env["BENCH_REDIS_URL"])
        self.process = None
        self.log = None

    # What each system does its own way.

    def command(self) -> list[str]:
        raise NotImplementedError

    def clear(self):
        """Empty the queue (a run that failed half-way may have left items)."""
        self.redis.flushdb()

    def enqueue(self, n):
        """A backlog of C{n} items of this system's job."""
        raise NotImplementedError

    def probe(self):
        """One probe item, sent now."""
        raise NotImplementedError

    # The same for all.

    def reset(self):
        """Before a run: an empty queue, no counts, no probes."""
        self.clear()
        redis.Redis.from_url(JOB_REDIS).delete(job.INCR_KEY)
        for name in os.listdir(self.dir):
            if name.startswith(("count-", "waits")):
                os.unlink(os.path.join(self.dir, name))

    def start(self):
        self.log = open(os.path.join(self.dir, "processes.log"), "a")  # noqa: SIM115
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            self.command(), cwd=self.dir, env=self.env, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.log.close()

    def close(self):
        """After the last run: nothing left on the servers or on disk."""
        self.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def alive(self):
        return self.process is not None and self.process.poll() is None

    def master(self):
        return self.process.pid

    def workerPids(self):
        helpers = self.helperPids()
        return [p for p in tree(self.process.pid)[1:] if p not in helpers]

    def helperPids(self):
        """Processes of the tree that are neither master nor worker."""
        return []

    def handled(self):
        return job.handled(self.dir)

    def counts(self):
        return job.counts(self.dir)

    def waits(self):
        return job.waits(self.dir)

    def describeFailure(self):
        return f"{self.label}: see {self.dir}/processes.log"


class Snq(System):
    """A real C{twistd -n snq}; the backend's part of the config from L{section}."""

    peer = "dramatiq-redis"
    #: [daemon] fork_server: workers forked from a template, or spawned.
    forkServer = True

    def command(self):
        handlers = "\n".join(f'{k} = "{v}"' for k, v in HANDLERS.items())
        config = os.path.join(self.dir, "snq.toml")
        with open(config, "w") as f:
            f.write(f"[daemon]\nworkers = {self.workers}\n"
                    f"fork_server = {str(self.forkServer).lower()}\n\n"
                    f"[handlers]\n{handlers}\n\n{self.section()}")
        return [*TWISTD, "-n", "--pidfile=", "snq", "-c", config]

    def section(self) -> str:
        raise NotImplementedError

    def helperPids(self):
        """
        The fork server: the master's child that handles nothing (the
        workers it forks, its children, show its command line too).
        """
        master = self.process.pid
        try:
            with open(f"/proc/{master}/task/{master}/children") as f:
                children = [int(p) for p in f.read().split()]
        except FileNotFoundError:
            return []
        found = []
        for pid in children:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"snq.forkserver" in f.read():
                        found.append(pid)
            except FileNotFoundError:
                pass
        return found

    def running(self) -> int:
        """Workers that told the master they are running (C{snqctl status})."""
        result = subprocess.run(
            [sys.executable, "-m", "snq.scripts.snqctl", "status", "--json"],
            cwd=self.dir, env=self.env, capture_output=True, text=True)
        if result.returncode:
            return 0
        return sum(w["state"] == "running"
                   for w in json.loads(result.stdout)["workers"])

    def send(self, transport, frames):
        raise NotImplementedError

    def enqueue(self, n):
        from snq.item import Item

        transport = f"job_{self.job}"
        frame = Item(transport=transport, payload={}).toJSON()
        for start in range(0, n, 5000):
            self.send(transport, [frame] * min(5000, n - start))

    def probe(self):
        from snq.item import Item

        self.send("probe", [Item(transport="probe",
                                 payload={"sent": time.time()}).toJSON()])


class SnqRedis(Snq):
    key = "snq-redis"
    label = "snq, Redis"
    db = 12

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        # Keys of this system alone: another benchmark may share the database.
        self.prefix = f"{RUN}-{uuid.uuid4().hex[:4]}:"

    def clear(self):
        keys = list(self.redis.scan_iter(match=f"{self.prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            self.redis.delete(*keys[start:start + 1000])

    def section(self):
        return (f'[queue]\nbackend = "redis"\n\n'
                f'[redis]\nurl = "{self.env["BENCH_REDIS_URL"]}"\n'
                f'prefix = "{self.prefix}"\n')

    def send(self, transport, frames):
        self.redis.lpush(f"{self.prefix}q:main", *frames)


class SnqStomp(Snq):
    key = "snq-stomp"
    label = "snq, STOMP (RabbitMQ)"
    peer = "dramatiq-rabbitmq"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.name = f"{RUN}-snq"
        self.client = None

    def section(self):
        # A control channel of its own: no other test's "stop" reaches it.
        return (f'[queue]\nbackend = "stomp"\nbasename = "/queue/{self.name}/"\n\n'
                f'[stomp]\ncontrol_channel = "/topic/{self.name}.control"\n')

    def clear(self):
        from tests.rabbitmq import deleteQueues

        try:
            deleteQueues(self.name)
        except AssertionError as e:
            # The broker is restarting under another test suite; the next
            # clear (or the broker's own restart) empties the queue.
            print(f"{self.label}: queues not deleted: {e}", file=sys.stderr)

    def send(self, transport, frames):
        from stompest.error import StompConnectionError

        try:
            self._send(frames)
        except StompConnectionError:
            # Other test suites on the shared broker close every connection
            # now and then: connect again and send the batch again (at
            # least once, like any producer).
            self.client = None
            self._send(frames)

    def _send(self, frames):
        from tests.rabbitmq import producer

        if self.client is None:
            self.client = producer()
        headers = {"persistent": "true", "content-type": "application/json"}
        receipt = uuid.uuid4().hex
        for i, frame in enumerate(frames):
            self.client.send(f"/queue/{self.name}%2Fmain", frame, headers,
                             receipt=receipt if i == len(frames) - 1 else None)
        received = self.client.receiveFrame()
        assert received.command == "RECEIPT", received

    def close(self):
        from stompest.error import StompConnectionError

        if self.client is not None:
            try:
                self.client.disconnect()
                self.client.close()
            except StompConnectionError:
                pass  # the broker closed it first
            self.client = None
        super().close()


SCHEMA = """
import sys
from twisted.internet import defer, task
from snq.queues.db import DbQueue

async def main(reactor):
    queue = DbQueue("sqlite:///" + sys.argv[1], 60, clock=reactor)
    await queue.open()
    await queue.close()

task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
"""


class SnqSqlite(Snq):
    key = "snq-sqlite"
    label = "snq, SQLite"

    @property
    def dbPath(self):
        return os.path.join(self.dir, "snq.sqlite")

    def section(self):
        return f'[db]\nurl = "sqlite:///{self.dbPath}"\n'

    def clear(self):
        """A new database file, its schema made by snq itself."""
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.dbPath + suffix):
                os.unlink(self.dbPath + suffix)
        subprocess.run([sys.executable, "-c", SCHEMA, self.dbPath],
                       env=self.env, check=True, cwd=ROOT)

    def send(self, transport, frames):
        now = time.time()
        with sqlite3.connect(self.dbPath, timeout=30) as conn:
            conn.executemany(
                "INSERT INTO queue_item (frame, transport, site, created, run_at)"
                " VALUES (?, ?, 'default', ?, 0)",
                [(f.decode(), transport, now) for f in frames])


class Peer(System):
    """A peer whose tasks live in C{bench.<module>}, imported here to send."""

    module = ""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        import importlib

        # Each module reads its broker's URL once, when first imported.
        if self.db is not None:
            os.environ["BENCH_REDIS_URL"] = self.env["BENCH_REDIS_URL"]
        self.tasks = importlib.import_module(f"bench.{self.module}")

    def enqueue(self, n):
        task = getattr(self.tasks, self.job)
        for _ in range(n):
            self.send(task)

    def probe(self):
        self.send(self.tasks.probe, time.time())


class DramatiqRedis(Peer):
    key = "dramatiq-redis"
    label = "Dramatiq, Redis, 2 proc x 8 threads"
    module = "redis_dramatiq"
    db = 13
    threads = 8

    def command(self):
        return [sys.executable, "-m", "dramatiq", f"bench.{self.module}",
                "--processes", str(self.workers), "--threads", str(self.threads)]

    def send(self, task, *args):
        task.send(*args)


class DramatiqRabbitmq(DramatiqRedis):
    key = "dramatiq-rabbitmq"
    label = "Dramatiq, RabbitMQ, 2 proc x 1 thread"
    peer = key
    module = "rabbitmq_dramatiq"
    db = None
    threads = 1

    def clear(self):
        from tests.rabbitmq import deleteQueues

        deleteQueues(os.environ["BENCH_QUEUE"])
        # Dramatiq declares a queue once per connection: after the delete,
        # the sender must declare it again.
        self.tasks.broker.queues_pending.add(os.environ["BENCH_QUEUE"])


class Huey(Peer):
    key = "huey"
    label = "Huey, Redis, 2 processes"
    module = "redis_huey"
    db = 10

    def command(self):
        return [sys.executable, "-m", "huey.bin.huey_consumer",
                f"bench.{self.module}.huey", "-k", "process",
                "-w", str(self.workers)]

    def send(self, task, *args):
        task(*args)


class Celery(Peer):
    key = "celery"
    label = "Celery, Redis, prefork 2, fair, acks_late"
    module = "redis_celery"
    db = 14

    def command(self):
        return [sys.executable, "-m", "celery", "-A", f"bench.{self.module}",
                "worker", "-P", "prefork", "-c", str(self.workers), "-O", "fair",
                "--loglevel=WARNING", "--without-gossip", "--without-mingle",
                "--without-heartbeat"]

    def enqueue(self, n):
        task = getattr(self.tasks, self.job)
        with self.tasks.app.producer_or_acquire() as producer:
            for _ in range(n):
                task.apply_async(producer=producer)

    def send(self, task, *args):
        task.apply_async(args)


class SnqRedisSpawned(SnqRedis):
    """As before the fork server: every worker a fresh interpreter."""

    key = "snq-redis-spawn"
    label = "snq, Redis, spawned workers"
    forkServer = False


class SnqSqliteSpawned(SnqSqlite):
    key = "snq-sqlite-spawn"
    label = "snq, SQLite, spawned workers"
    forkServer = False


SYSTEMS = {cls.key: cls for cls in (SnqRedis, SnqStomp, SnqSqlite, DramatiqRedis,
                                    DramatiqRabbitmq, Huey, Celery, SnqRedisSpawned,
                                    SnqSqliteSpawned)}
#: snq's backends, as the daemon runs by default (the benchmarks' default).
SNQ = [k for k, cls in SYSTEMS.items() if issubclass(cls, Snq) and cls.forkServer]
