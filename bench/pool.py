"""
The worker pool on SQLite: drain rate with 1 and 2 workers, memory per
worker, and the time from C{kill -9} of a worker to its replacement
handling items.  Run from the repository root: C{python -m bench.pool}.

Each run is a real C{twistd -n snq} in a temporary directory, fed by plain
INSERTs as any producer would.
"""

import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from bench.common import percentile, privateBytes, rssBytes, table
from snq.handlers import QueueHandler
from snq.item import Item

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRAIN_ITEMS = 30_000
KILLS = 5

CONFIG = """
[daemon]
workers = {workers}
threshold = 0.5

[queue]
poll_interval = 0.1

[handlers]
stamp = "bench.pool:Stamp"

[sites.default]
stamp_file = "{dir}/stamped.txt"
"""


class Stamp(QueueHandler):
    """Appends C{"PID TIME"}: who handled an item, and when."""

    def handle(self, item):
        path = self.context.siteConfig(item.site)["stamp_file"]
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{os.getpid()} {time.time()}\n".encode())
        finally:
            os.close(fd)


class Daemon:
    def __init__(self, workers):
        self.dir = tempfile.mkdtemp(prefix="snq-bench-")
        self.db = os.path.join(self.dir, "snq.sqlite")
        config = os.path.join(self.dir, "snq.toml")
        with open(config, "w") as f:
            f.write(CONFIG.format(workers=workers, dir=self.dir))
        env = dict(os.environ, PYTHONPATH=ROOT)
        # Closed in __exit__, once the daemon is gone.
        self.log = open(os.path.join(self.dir, "twistd.log"), "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "snq", "-c", config],
            cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.workers = workers

    def __enter__(self):
        deadline = time.monotonic() + 30
        while len(self.running()) < self.workers:
            if time.monotonic() > deadline:
                raise SystemExit(f"workers did not start; see {self.dir}")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc):
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)
        self.log.close()
        shutil.rmtree(self.dir)

    def status(self):
        result = subprocess.run(
            [sys.executable, "-m", "snq.scripts.snqctl", "status", "--json"],
            cwd=self.dir, capture_output=True, text=True)
        return json.loads(result.stdout)["workers"] if result.returncode == 0 else []

    def running(self):
        return [w for w in self.status() if w["state"] == "running"]

    def enqueue(self, transport, n):
        now = time.time()
        rows = [(Item(transport=transport, payload={}, created=now).toJSON().decode(),
                 transport, now) for _ in range(n)]
        with sqlite3.connect(self.db, timeout=30) as conn:
            conn.executemany("INSERT INTO queue_item (frame, transport, site,"
                             " created, run_at) VALUES (?, ?, 'default', ?, 0)",
                             rows)

    def waiting(self):
        with sqlite3.connect(self.db, timeout=30) as conn:
            return conn.execute("SELECT count(*) FROM queue_item").fetchone()[0]

    def stamps(self):
        path = os.path.join(self.dir, "stamped.txt")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [(int(pid), float(t)) for pid, t in
                    (line.split() for line in f if line.strip())]


def drain(workers):
    with Daemon(workers) as daemon:
        daemon.enqueue("noop", DRAIN_ITEMS)
        start = time.perf_counter()
        while daemon.waiting():
            time.sleep(0.01)
        seconds = time.perf_counter() - start
        pids = [w["pid"] for w in daemon.running()]
        rss = max(rssBytes(pid) for pid in pids)
        private = max(privateBytes(pid) for pid in pids)
    return {"workers": workers, "items": DRAIN_ITEMS, "seconds": seconds,
            "items/s": DRAIN_ITEMS / seconds, "RSS MB": rss / 2**20,
            "private MB": private / 2**20}


def recovery():
    """Seconds from kill -9 of a worker to its replacement's first item."""
    times = []
    with Daemon(2) as daemon:
        stop = threading.Event()

        def feed():
            while not stop.is_set():
                daemon.enqueue("stamp", 20)
                time.sleep(0.01)

        feeder = threading.Thread(target=feed)
        feeder.start()
        try:
            for _ in range(KILLS):
                time.sleep(1.0)  # older than the threshold: respawned at once
                victim = daemon.running()[0]["pid"]
                known = {pid for pid, _ in daemon.stamps()}
                killed = time.time()
                os.kill(victim, signal.SIGKILL)
                while True:
                    first = [t for pid, t in daemon.stamps()
                             if pid not in known and t >= killed]
                    if first:
                        times.append(min(first) - killed)
                        break
                    time.sleep(0.005)
                while len(daemon.running()) < 2:
                    time.sleep(0.05)
        finally:
            stop.set()
            feeder.join()
    return times


def main():
    rows = [drain(1), drain(2)]
    table(rows, ["workers", "items", "seconds", "items/s", "RSS MB", "private MB"])
    print()
    times = recovery()
    table([{"kills": len(times), "median s": statistics.median(times),
            "p90 s": percentile(times, 0.9), "max s": max(times)}],
          ["kills", "median s", "p90 s", "max s"])
    print("\ntargets: RSS per worker <= 40 MB; kill -9 to replacement handling "
          "items <= 1 s")


if __name__ == "__main__":
    main()
