"""
The time from a worker's C{kill -9} to the items it was running running
again in another worker, per backend (the target is 2 s at most): a pool
daemon of three workers on each backend's real server (the integration
tests' servers, in a place of the run's own: an SQLite file, a database, a
Redis key prefix, a RabbitMQ vhost), ten slow items, the worker running
most of them killed; several times.

On the SQL backends and Redis the master gives the dead worker's claims
back as soon as it sees the death (L{snq.reaper}); on RabbitMQ the broker
does, and the items it was running come back once charged an attempt.

Run from the repository root: C{python -m bench.recovery [--kills N]
[--backend NAME]}.
"""

import argparse
import os
import shutil
import statistics
import tempfile

from twisted.internet import defer, task

from bench.common import save, table
from tests import stall
from tests.daemon import waitFor


class Run(stall.PoolDaemonMixin):
    """One daemon on one backend, cleaned up afterwards."""

    def __init__(self, backendClass):
        self.backendClass = backendClass
        self._cleanups = []
        self._temp = tempfile.mkdtemp(prefix="snq-bench-recovery-")
        self._count = 0

    def mktemp(self):
        self._count += 1
        return os.path.join(self._temp, str(self._count))

    def addCleanup(self, f, *args):
        self._cleanups.append((f, args))

    @defer.inlineCallbacks
    def cleanUp(self):
        while self._cleanups:
            f, args = self._cleanups.pop()
            yield defer.maybeDeferred(f, *args)
        shutil.rmtree(self._temp, ignore_errors=True)


@defer.inlineCallbacks
def measure(backendClass, kills):
    run = Run(backendClass)
    try:
        yield run.setUp()
        run.daemon(workers=3, concurrency=10, prefetch=10)
        yield run.running(3)
        times = []
        for _ in range(kills):
            took, ids, _ = yield run.recovery(items=10, sleep=2.0, running=10)
            times.append(took)
            yield waitFor(lambda ids=ids: run.ended(ids), timeout=60,
                                what="the items done")
            yield run.running(3)
    finally:
        yield run.cleanUp()
    return {"backend": backendClass.name, "kills": kills,
            "median s": statistics.median(times), "max s": max(times),
            "≤ 2 s": "yes" if max(times) <= 2.0 else "NO"}


def main(reactor):
    parser = argparse.ArgumentParser(prog="python -m bench.recovery")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--backend", action="append", choices=list(stall.BACKENDS),
                        help="only these (default: every backend)")
    args = parser.parse_args()

    @defer.inlineCallbacks
    def everyBackend():
        rows = []
        for name in args.backend or stall.BACKENDS:
            rows.append((yield measure(stall.BACKENDS[name], args.kills)))
        print("kill -9 of a worker → the items it was running running again")
        table(rows, ["backend", "kills", "median s", "max s", "≤ 2 s"])
        save("recovery", {"args": vars(args), "rows": rows})

    return everyBackend()


if __name__ == "__main__":
    task.react(main)
