"""
The jobs every system under test runs, the same functions for snq's handlers
and the peers' tasks, and how the benchmark sees their progress.

* C{noop}: nothing but the count below;
* C{incr}: one synchronous Redis C{INCR} through redis-py (the small job of
  issue 19), then the count;
* C{probe(sent)}: notes how long the item waited before it started.

Each process (and thread: Dramatiq runs 8 per process) counts the items it
handled in a file of its own, C{count-PID-THREAD} under C{$BENCH_DIR}, an
8-byte integer written through C{mmap}: no system call per item, and the
benchmark reads progress and the first item of a new process from outside
without asking any broker.  The run's settings come from the environment,
which snq's workers and the peers' processes inherit:

* C{BENCH_DIR}: where the counts and the probes' waits go;
* C{BENCH_JOB_REDIS}: the Redis that C{incr} increments C{bench:incr} in.

Nothing here imports snq or a peer, so each system's processes carry only
their own modules (snq's handlers are in L{bench.snq_jobs}).
"""

import glob
import mmap
import os
import struct
import threading
import time

INCR_KEY = "bench:incr"

_local = threading.local()
_clients = {}


def _forked():
    # A forked child counts (and connects) on its own: no system call per
    # item to find out whether this is still the same process.
    _local.__dict__.clear()
    _clients.clear()


os.register_at_fork(after_in_child=_forked)


def _counter():
    counter = getattr(_local, "map", None)
    if counter is None:
        path = os.path.join(os.environ["BENCH_DIR"],
                            f"count-{os.getpid()}-{threading.get_ident()}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, 8)
            counter = _local.map = mmap.mmap(fd, 8)
        finally:
            os.close(fd)
    return counter


def count():
    counter = _counter()
    struct.pack_into("q", counter, 0, struct.unpack_from("q", counter)[0] + 1)


def noop():
    count()


def incr():
    client = _clients.get("redis")
    if client is None:
        import redis

        client = _clients["redis"] = redis.Redis.from_url(
            os.environ["BENCH_JOB_REDIS"])
    client.incr(INCR_KEY)
    count()


def probe(sent):
    started = time.time()
    fd = os.open(os.path.join(os.environ["BENCH_DIR"], "waits"),
                 os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"%.6f\n" % (started - sent))
    finally:
        os.close(fd)


JOBS = {"noop": noop, "incr": incr}


def counts(directory):
    """C{{pid: items handled}} of every process that handled one."""
    result = {}
    for path in glob.glob(os.path.join(directory, "count-*")):
        with open(path, "rb") as f:
            data = f.read(8)
        if len(data) == 8:
            pid = int(os.path.basename(path).split("-")[1])
            result[pid] = result.get(pid, 0) + struct.unpack("q", data)[0]
    return result


def handled(directory):
    return sum(counts(directory).values())


def waits(directory):
    """The probes' waits so far, in seconds."""
    try:
        with open(os.path.join(directory, "waits")) as f:
            return [float(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []

