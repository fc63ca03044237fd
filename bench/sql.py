"""
The SQL backend on SQLite, MariaDB and PostgreSQL: drain rate with 1 and 2
worker processes (real C{twistd -n snq --inline} daemons on one database),
enqueue → start latency of items arriving at idle workers, and how long
one claim takes in front of a million-row backlog.

Run from the repository root: C{python -m bench.sql [--items N]}.  Uses
the servers of the integration tests (see L{tests.sqlservers}), each run on
a database of its own, dropped afterwards.
"""

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

from bench.common import percentile, table
from snq.handlers import QueueHandler
from snq.item import Item
from snq.queues import dialects
from tests import sqlservers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]

CONFIG = """
[db]
url = "{url}"

[handlers]
latency = "bench.sql:Latency"

[sites.default]
latency_file = "{latency}"
"""


class Latency(QueueHandler):
    """Records how long after its creation the item started."""

    transport = "latency"

    def handle(self, item):
        path = self.context.siteConfig(item.site)["latency_file"]
        with open(path, "a") as f:
            f.write(f"{time.time() - item.created}\n")


def frame(transport, created=0.0):
    return Item(transport=transport, payload={}, created=created).toJSON().decode()


@contextmanager
def daemons(server, count, directory):
    """C{count} idle daemons on C{server}'s database."""
    config = os.path.join(directory, "snq.toml")
    latency = os.path.join(directory, "latency.txt")
    with open(config, "w") as f:
        f.write(CONFIG.format(url=server.url(), latency=latency))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    processes = []
    try:
        for n in range(count):
            log = os.path.join(directory, f"twistd-{n}.log")
            with open(log, "w") as output:
                processes.append((subprocess.Popen(
                    [*TWISTD, "-n", "--pidfile=", "snq", "--inline", "-c", config],
                    cwd=directory, env=env, stdout=output,
                    stderr=subprocess.STDOUT), log))
        for process, log in processes:
            deadline = time.monotonic() + 60
            while "consuming groups" not in _read(log):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"daemon did not start:\n{_read(log)}")
                time.sleep(0.05)
        yield latency
    finally:
        for process, _ in processes:
            process.send_signal(signal.SIGTERM)
        for process, _ in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def drain(server, items):
    """Insert C{items} noop rows at once → items/s from first claim to empty."""
    server.insertMany([(frame("noop"), "noop", "default", 0, 0)] * items)
    conn = server.connect()
    cursor = conn.cursor()
    started = None
    try:
        while True:
            cursor.execute("SELECT count(*), count(claimed_by) FROM queue_item")
            left, claimed = cursor.fetchone()
            conn.commit()
            now = time.monotonic()
            if started is None and (claimed or left < items):
                started = now
            if left == 0:
                break
            time.sleep(0.02)
        cursor.execute("SELECT count(*) FROM queue_dead")
        dead = cursor.fetchone()[0]
        if dead:
            raise SystemExit(f"{dead} items were dead-lettered, not handled")
        return items / (now - started)
    finally:
        conn.close()


def latencies(server, path, samples):
    """Items inserted one by one at idle workers → seconds to their start."""
    p = server.placeholder
    conn = server.connect()
    cursor = conn.cursor()
    try:
        for _ in range(samples):
            # Idle a while, at random, so the pollers are anywhere in
            # their sleep when the item comes.
            time.sleep(random.uniform(0.1, 0.4))
            now = time.time()
            cursor.execute(
                "INSERT INTO queue_item (frame, transport, site, created, run_at)"
                f" VALUES ({p}, {p}, {p}, {p}, {p})",
                (frame("latency", now), "latency", "default", now, now))
            conn.commit()
    finally:
        conn.close()
    deadline = time.monotonic() + 30
    while _lines(path) < samples and time.monotonic() < deadline:
        time.sleep(0.05)
    with open(path) as f:
        return [float(line) for line in f]


def _read(path):
    with open(path) as f:
        return f.read()


def _lines(path):
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for _ in f)


#: A million rows made on the server itself.
INSERT = "INSERT INTO queue_item (frame, transport, site, created, run_at) "
FILL = {
    "postgresql": INSERT + "SELECT '{{}}', {transport}, 'default', 0, {run_at}"
                           " FROM generate_series(1, 1000000) n",
    "mysql": INSERT + "SELECT '{{}}', {transport}, 'default', 0, {run_at}"
                      " FROM (SELECT seq AS n FROM seq_1_to_1000000) s",
    "sqlite": "WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s"
              " WHERE n < 1000000) " + INSERT
              + "SELECT '{{}}', {transport}, 'default', 0, {run_at} FROM s",
}
EMPTY = {"postgresql": "TRUNCATE queue_item", "mysql": "TRUNCATE queue_item",
         "sqlite": "DELETE FROM queue_item"}
ANALYZE = {"postgresql": "ANALYZE queue_item", "mysql": "ANALYZE TABLE queue_item",
           "sqlite": "ANALYZE"}
#: name → (transport expression, run_at, claim filter)
SCENARIOS = {
    "ready backlog": ("'noop'", "0", ""),
    "group's worker": ("CASE WHEN n % 10000 = 0 THEN 'xmppout' ELSE 'noop' END",
                       "0", " AND transport IN ({p})"),
    "all delayed": ("'noop'", "9e9", ""),
}


def millionRowClaims(server, label):
    """Milliseconds for one claim of 100 (median of 5, rolled back)."""
    dialect = dialects.DIALECTS[server.scheme]()
    row = {"server": label}
    conn = server.connect()
    try:
        cursor = conn.cursor()
        for name, (transport, runAt, where) in SCENARIOS.items():
            cursor.execute(EMPTY[server.scheme])
            conn.commit()
            started = time.monotonic()
            cursor.execute(FILL[server.scheme].format(transport=transport,
                                                      run_at=runAt))
            conn.commit()
            cursor.execute(ANALYZE[server.scheme])
            if cursor.description:
                cursor.fetchall()
            conn.commit()
            row[f"{name} fill s"] = time.monotonic() - started
            params = ["xmppout"] if where else []
            times = []
            for _ in range(5):
                dialect.begin(cursor)
                started = time.monotonic()
                dialect.claim(cursor, "bench", 9e9, 100, 100,
                              where.format(p=dialect.placeholder), params)
                times.append((time.monotonic() - started) * 1000)
                conn.rollback()
            row[f"{name} ms"] = percentile(times, 0.5)
    finally:
        conn.close()
    return row


def servers(directory, which):
    made = {"sqlite": lambda: sqlservers.Sqlite(directory, "snq_bench"),
            "mysql": lambda: sqlservers.MariaDb("snq_bench"),
            "postgresql": lambda: sqlservers.Postgres("snq_bench")}
    for key in which:
        yield made[key]()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.sql", description=__doc__)
    p.add_argument("--items", type=int, default=20_000, help="items per drain")
    p.add_argument("--samples", type=int, default=100,
                   help="latency samples per run")
    p.add_argument("--servers", default="sqlite,mysql,postgresql")
    p.add_argument("--no-million", action="store_true",
                   help="skip the million-row claim timings (about a minute)")
    args = p.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="snq-bench-sql-")
    rows, million = [], []
    try:
        for server in servers(directory, args.servers.split(",")):
            label = server.name.split()[0]
            for workers in (1, 2):
                server.create()
                run = os.path.join(directory, f"{label}-{workers}")
                os.makedirs(run)
                try:
                    with daemons(server, workers, run) as latencyFile:
                        rate = drain(server, args.items)
                        waits = latencies(server, latencyFile, args.samples)
                    rows.append({
                        "server": label, "workers": workers,
                        "items/s": rate,
                        "latency p50 ms": percentile(waits, 0.5) * 1000,
                        "latency p99 ms": percentile(waits, 0.99) * 1000,
                    })
                    print(rows[-1], flush=True)
                    if workers == 2 and not args.no_million:
                        million.append(millionRowClaims(server, label))
                        print(million[-1], flush=True)
                finally:
                    server.drop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"\n{args.items:,} items drained by 1 or 2 worker processes (noop "
          f"handler, default config: prefetch 100, concurrency 50, poll_interval "
          f"0.5 s); latency over {args.samples} items sent to idle workers\n")
    table(rows, ["server", "workers", "items/s", "latency p50 ms",
                 "latency p99 ms"])
    if million:
        print("\nOne claim of 100 rows (ms, median of 5) in front of a million "
              "rows: all ready; 100 of a group's transport among them; all "
              "delayed (nothing ready)\n")
        table(million, ["server", "ready backlog ms", "group's worker ms",
                        "all delayed ms", "ready backlog fill s"])


if __name__ == "__main__":
    main()
