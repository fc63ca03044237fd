"""
Redis: snq against Dramatiq and Celery, on the same Redis, each in a
database of its own, each with a no-op job and its at-least-once settings.

For each: a backlog of no-op items pushed while no worker runs, then the
workers started and the drain timed from the first acknowledgement to the
last (so start-up is left out); then, the workers idle, one probe at a time
for the time from enqueue to the job's start; then the resident memory of
the worker processes.

    pip install -e .[bench]      # dramatiq[redis], celery[redis]
    python -m bench.redis [--items 20000] [--latency-items 300]

Uses databases 12 (snq), 13 (Dramatiq) and 14 (Celery) of the Redis on
127.0.0.1:6379, and empties them before and after.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

import redis

from bench.common import percentile, rssBytes, table
from snq.handlers import QueueHandler
from snq.item import Item

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REDIS = "redis://127.0.0.1:6379"

SNQ_CONFIG = """
[daemon]
workers = {workers}

[queue]
backend = "redis"

[redis]
url = "{url}"

[handlers]
probe = "bench.redis:Probe"

[sites.default]
probe_file = "{probeFile}"
"""


class Probe(QueueHandler):
    """snq's probe: notes how long the item waited before it started."""

    def handle(self, item):
        started = time.time()
        with open(self.context.siteConfig(item.site)["probe_file"], "a") as f:
            f.write(f"{started - item.payload['sent']}\n")


class System:
    """One queue system under test: its workers, its producer, its queue."""

    name = ""
    db = 0

    def __init__(self, workers):
        self.workers = workers
        self.url = f"{REDIS}/{self.db}"
        self.redis = redis.Redis.from_url(self.url)
        self.dir = tempfile.mkdtemp(prefix=f"bench-{self.name}-")
        self.probeFile = os.path.join(self.dir, "probes.txt")
        self.env = dict(os.environ, PYTHONPATH=ROOT, BENCH_REDIS_URL=self.url,
                        BENCH_PROBE_FILE=self.probeFile)
        self.process = None

    def command(self):
        raise NotImplementedError

    def preload(self, n):
        raise NotImplementedError

    def pending(self) -> int:
        """Items not yet acknowledged."""
        raise NotImplementedError

    def probe(self):
        raise NotImplementedError

    def start(self):
        self.log = open(os.path.join(self.dir, "workers.log"), "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            self.command(), cwd=self.dir, env=self.env, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.log.close()

    def probes(self) -> list[float]:
        if not os.path.exists(self.probeFile):
            return []
        with open(self.probeFile) as f:
            return [float(line) for line in f if line.strip()]

    def memory(self):
        """(largest worker RSS, RSS of the whole process tree), bytes."""
        pids = tree(self.process.pid)
        workers = pids[1:] or pids
        return (max(rssBytes(p) for p in workers),
                sum(rssBytes(p) for p in pids))


class Snq(System):
    name = "snq"
    db = 12

    def command(self):
        config = os.path.join(self.dir, "snq.toml")
        with open(config, "w") as f:
            f.write(SNQ_CONFIG.format(workers=self.workers, url=self.url,
                                      probeFile=self.probeFile))
        return [sys.executable, "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "snq", "-c", config]

    def push(self, items):
        pipe = self.redis.pipeline(transaction=False)
        for start in range(0, len(items), 1000):
            pipe.lpush("snq:q:main", *[i.toJSON() for i in items[start:start + 1000]])
        pipe.execute()

    def preload(self, n):
        self.push([Item(transport="noop", payload={}) for _ in range(n)])

    def pending(self):
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen("snq:q:main")
        pipe.zcard("snq:processing")
        return sum(pipe.execute())

    def probe(self):
        self.push([Item(transport="probe", payload={"sent": time.time()})])


class Dramatiq(System):
    name = "dramatiq"
    db = 13

    def __init__(self, workers):
        super().__init__(workers)
        os.environ["BENCH_REDIS_URL"] = self.url
        from bench import redis_dramatiq

        self.actors = redis_dramatiq

    def command(self):
        return [sys.executable, "-m", "dramatiq", "bench.redis_dramatiq",
                "--processes", str(self.workers)]

    def preload(self, n):
        for _ in range(n):
            self.actors.noop.send()

    def pending(self):
        return self.redis.hlen("dramatiq:default.msgs")

    def probe(self):
        self.actors.probe.send(time.time())


class Celery(System):
    name = "celery"
    db = 14

    def __init__(self, workers):
        super().__init__(workers)
        os.environ["BENCH_REDIS_URL"] = self.url
        from bench import redis_celery

        self.tasks = redis_celery

    def command(self):
        return [sys.executable, "-m", "celery", "-A", "bench.redis_celery",
                "worker", "-P", "prefork", "-c", str(self.workers),
                "--loglevel=WARNING", "--without-gossip", "--without-mingle",
                "--without-heartbeat"]

    def preload(self, n):
        with self.tasks.app.producer_or_acquire() as producer:
            for _ in range(n):
                self.tasks.noop.apply_async(producer=producer)

    def pending(self):
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen("celery")
        pipe.hlen("unacked")
        return sum(pipe.execute())

    def probe(self):
        self.tasks.probe.apply_async((time.time(),))


def tree(pid):
    """C{pid} and its descendants, parents first."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    result, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        result.append(p)
        todo += sorted(children.get(p, []))
    return result


def waitUntil(condition, timeout, what, interval=0.001):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic()


def run(system, items, latencyItems):
    system.redis.flushdb()
    system.preload(items)
    assert system.pending() == items, (system.name, system.pending())
    system.start()
    try:
        first = waitUntil(lambda: system.pending() < items, 120,
                          f"{system.name} to start")
        last = waitUntil(lambda: system.pending() == 0, 600,
                         f"{system.name} to drain")
        time.sleep(1)
        for n in range(1, latencyItems + 1):
            system.probe()
            waitUntil(lambda n=n: len(system.probes()) >= n, 30,
                      f"{system.name} probe {n}")
            time.sleep(0.01)
        waits = system.probes()
        worker, everything = system.memory()
    finally:
        system.stop()
        system.redis.flushdb()
    return {"system": system.name, "workers": system.workers,
            "items/s": items / (last - first),
            "p50 ms": percentile(waits, 0.5) * 1000,
            "p99 ms": percentile(waits, 0.99) * 1000,
            "worker RSS MB": worker / 2**20, "all RSS MB": everything / 2**20}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--latency-items", type=int, default=300)
    args = p.parse_args(argv)
    rows = []
    for system in (Snq(1), Snq(2), Dramatiq(2), Celery(2)):
        print(f"{system.name} with {system.workers} workers ...", file=sys.stderr)
        rows.append(run(system, args.items, args.latency_items))
    fastest = max(r["items/s"] for r in rows if r["system"] != "snq")
    for row in rows:
        row["x fastest peer"] = f"{row['items/s'] / fastest:.2f}"
    print(f"\n{args.items:,} no-op items drained; {args.latency_items} probes "
          f"one at a time on idle workers; {os.cpu_count()} CPUs\n")
    table(rows, ["system", "workers", "items/s", "x fastest peer", "p50 ms",
                 "p99 ms", "worker RSS MB", "all RSS MB"])


if __name__ == "__main__":
    main()
