"""
STOMP on RabbitMQ: how fast snq drains a backlog of no-op items with 1 and
2 worker processes (a real C{twistd -n snq}, at least once: each message
acknowledged after its handler), against, on the same broker in the same
run:

* the raw ceiling: stompest's sync client consuming the same backlog with
  C{ack: client-individual} and the same prefetch-count, doing nothing
  else;
* the peer: Dramatiq (C{--processes 2}, AMQP, its default 8 threads) with a
  no-op actor.

Every backlog is published first; a drain is timed from the first item
handled to the last (each handler stamps the time), so process start-up is
left out; so is it from the consumers' CPU time per item, which depends
less on what else the machine is doing.  Run from the repository root,
RabbitMQ on 127.0.0.1 (5672, 61613), C{pip install 'dramatiq[rabbitmq]'}:

    python -m bench.stomp [--items 20000]
"""

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid

from bench.common import Timer, rssBytes, table
from snq.handlers import QueueHandler
from snq.item import Item

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """
[daemon]
workers = {workers}

[queue]
backend = "stomp"
basename = "/queue/{name}/"

[handlers]
stamp = "bench.stomp:Stamp"

[sites.default]
stamp_dir = "{dir}"
"""

_stampFiles = {}


def stamp(directory):
    """Note the time in this process's file: one write, no buffering."""
    fd = _stampFiles.get(directory)
    if fd is None:
        path = os.path.join(directory, f"stamps-{os.getpid()}")
        fd = _stampFiles[directory] = os.open(
            path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, b"%.6f\n" % time.time())


class Stamp(QueueHandler):
    def handle(self, item):
        stamp(self.context.siteConfig(item.site)["stamp_dir"])


def stamps(directory):
    times = []
    for path in glob.glob(os.path.join(directory, "stamps-*")):
        with open(path) as f:
            times.extend(float(line) for line in f if line.strip())
    return times


def treeCpu(pid):
    """CPU seconds (user + system) of a process and its descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    total, parents = 0.0, {pid}
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    grown = True
    while grown:
        children = {p for p, (ppid, _) in stats.items()
                    if ppid in parents and p not in parents}
        grown = bool(children)
        parents |= children
    for p in parents:
        total += stats.get(p, (0, 0))[1] / ticks
    return total


def waitForStamps(directory, n, process, what, timeout=300):
    """
    The drain, first item to last, and the consumers' CPU per item between
    the 5% and the 100% mark (start-up left out).
    """
    deadline = time.monotonic() + timeout
    cpuAt5 = None
    while True:
        done = len(stamps(directory))
        if cpuAt5 is None and done >= n // 20:
            cpuAt5, doneAt5 = treeCpu(process.pid), done
        if done >= n:
            break
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what}: {done} of {n} items handled; see "
                             f"{directory}")
        time.sleep(0.05)
    cpu = (treeCpu(process.pid) - cpuAt5) / (n - doneAt5)
    times = stamps(directory)
    return {"items": n, "seconds": max(times) - min(times),
            "items/s": n / (max(times) - min(times)),
            "CPU us/item": cpu * 1e6, "twice": len(times) - n}


def publish(destination, n):
    """A backlog of n envelopes, sent as any STOMP producer would."""
    from tests.rabbitmq import producer

    client = producer()
    try:
        with Timer() as t:
            for i in range(n):
                body = Item(transport="stamp", payload={"n": i}).toJSON()
                client.send(destination, body,
                            {"persistent": "true",
                             "content-type": "application/json"},
                            receipt="last" if i == n - 1 else None)
            frame = client.receiveFrame()
        assert frame.command == "RECEIPT", frame
    finally:
        client.disconnect()
        client.close()
    return n / t.seconds


def rawCeiling(name, n, prefetch):
    from tests.rabbitmq import producer

    destination = f"/queue/{name}%2Fraw"
    published = publish(destination, n)
    client = producer()
    try:
        client.subscribe(destination, {"ack": "client-individual", "id": "raw",
                                       "prefetch-count": str(prefetch)})
        cpu = time.process_time()
        with Timer() as t:
            for _ in range(n):
                frame = client.receiveFrame()
                client.ack(frame)
        cpu = time.process_time() - cpu
    finally:
        client.disconnect()
        client.close()
    return published, {"items": n, "seconds": t.seconds, "items/s": n / t.seconds,
                       "CPU us/item": cpu / n * 1e6, "twice": 0}


def snq(name, n, workers):
    directory = tempfile.mkdtemp(prefix="snq-bench-")
    config = os.path.join(directory, "snq.toml")
    with open(config, "w") as f:
        f.write(CONFIG.format(workers=workers, name=f"{name}-{workers}",
                              dir=directory))
    publish(f"/queue/{name}-{workers}%2Fmain", n)
    with open(os.path.join(directory, "twistd.log"), "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "snq", "-c", config],
            cwd=directory, stdout=log, stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=ROOT))
        try:
            result = waitForStamps(directory, n, process,
                                   f"snq with {workers} workers")
            result["RSS MB"] = max(_workerRss(directory)) / 2**20
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    return result


def _workerRss(directory):
    status = subprocess.run(
        [sys.executable, "-m", "snq.scripts.snqctl", "status", "--json"],
        cwd=directory, capture_output=True, text=True, env=dict(
            os.environ, PYTHONPATH=ROOT))
    workers = json.loads(status.stdout)["workers"]
    return [rssBytes(w["pid"]) for w in workers if w.get("pid")]


def dramatiq(name, n, processes):
    directory = tempfile.mkdtemp(prefix="snq-bench-dramatiq-")
    env = dict(os.environ, PYTHONPATH=ROOT, SNQ_BENCH_QUEUE=f"{name}-dramatiq",
               SNQ_BENCH_DIR=directory)
    # The actor's queue is declared (and filled) by a publisher of its own.
    subprocess.run([sys.executable, "-c", (
        "import bench.stomp_dramatiq as m\n"
        f"for i in range({n}): m.noop.send(i)\n"
        "m.dramatiq.get_broker().close()")], env=env, check=True, cwd=ROOT)
    with open(os.path.join(directory, "dramatiq.log"), "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dramatiq", "bench.stomp_dramatiq",
             "--processes", str(processes)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            result = waitForStamps(directory, n, process,
                                   f"Dramatiq with {processes} processes")
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--items", type=int, default=20_000)
    args = parser.parse_args()
    from tests.rabbitmq import deleteQueues, requireRabbitMQ

    requireRabbitMQ()
    name = f"snqbench-{uuid.uuid4().hex[:8]}"
    n = args.items
    prefetch = 100  # snq's default: twice [queue] concurrency (50)
    try:
        published, raw = rawCeiling(name, n, prefetch)
        rows = [{"consumer": "stompest sync client (raw ceiling)", **raw},
                {"consumer": "snq, 1 worker", **snq(name, n, 1)},
                {"consumer": "snq, 2 workers", **snq(name, n, 2)},
                {"consumer": "Dramatiq, 2 processes (AMQP)",
                 **dramatiq(name, n, 2)}]
    finally:
        deleteQueues(name)
    print(f"\n{n:,} persistent no-op items on RabbitMQ, each acknowledged after "
          f"its handler (STOMP: client-individual, prefetch-count {prefetch}); "
          f"publishing ran at {published:,.0f} messages/s\n")
    table(rows, ["consumer", "items", "seconds", "items/s", "CPU us/item", "twice",
                 "RSS MB"])
    ceiling, one, two, peer = (r["items/s"] for r in rows)
    print(f"\nsnq 1 worker / raw ceiling: {one / ceiling:.0%} (target >= 50%)")
    print(f"snq 2 workers / Dramatiq 2 processes: {two / peer:.1f}x "
          "(target >= 2x)")


if __name__ == "__main__":
    main()
