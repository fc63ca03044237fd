"""
Start-up of snq per backend: from a cold C{twistd -n snq} to the first item
handled (and to every worker handling items), and from a worker's
C{kill -9} to its replacement handling items.

Items are fed at a steady trickle (20 every 10 ms) all along.  Boot: the
daemon started cold, C{--boots} times.  Respawn: C{--kills} times, a
worker older than the pool's young-death threshold (1 s) is killed; the
time is from the kill to the first item the new worker handled (the
master hears of the death at once, through SIGCHLD, so this is also
"after the death is noticed").

    python -m bench.startup [--backends snq-redis,snq-stomp,snq-sqlite]
                            [--boots 5] [--kills 5] [--job noop|incr]
"""

import argparse
import os
import signal
import statistics
import sys
import threading
import time
from contextlib import contextmanager

from bench.common import percentile, save, table, waitUntil
from bench.systems import SNQ, SYSTEMS

#: Longer than [daemon] threshold (1 s): the replacement starts at once.
OLDER_THAN_THRESHOLD = 1.5


@contextmanager
def trickle(system):
    """Items arriving all the time (20 every 10 ms), as on a live site."""
    stop = threading.Event()

    def feed():
        while not stop.is_set():
            system.enqueue(20)
            time.sleep(0.01)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        yield
    finally:
        stop.set()
        feeder.join()


def everyWorkerHandling(system):
    return waitUntil(lambda: len(system.counts()) >= system.workers, 60,
                     f"every {system.label} worker to handle an item")


def boot(system):
    """Seconds from the start to the first item, and to all workers handling."""
    system.reset()
    with trickle(system):
        system.start()
        try:
            first = waitUntil(lambda: system.handled() > 0, 60,
                              f"{system.label} to start")
            everyone = everyWorkerHandling(system)
        finally:
            system.stop()
    return first - system.started, everyone - system.started


def respawns(system, kills):
    """Seconds from each kill -9 of a worker to its replacement's first item."""
    times = []
    system.reset()
    with trickle(system):
        system.start()
        try:
            everyWorkerHandling(system)
            for _ in range(kills):
                time.sleep(OLDER_THAN_THRESHOLD)
                known = set(system.counts())
                victim = next(p for p in system.workerPids() if p in known)
                killed = time.monotonic()
                os.kill(victim, signal.SIGKILL)
                replaced = waitUntil(
                    lambda known=known: any(p not in known and n > 0
                                            for p, n in system.counts().items()),
                    30, f"a {system.label} worker to replace {victim}")
                times.append(replaced - killed)
        finally:
            system.stop()
    return times


def summary(values):
    return {"median s": statistics.median(values), "p90 s": percentile(values, 0.9),
            "min s": min(values), "max s": max(values)}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=",".join(SNQ))
    parser.add_argument("--boots", type=int, default=5)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--job", choices=("noop", "incr"), default="noop")
    args = parser.parse_args(argv)
    rows, results = [], {}
    for key in args.backends.split(","):
        system = SYSTEMS[key](job=args.job, workers=args.workers)
        try:
            print(f"{system.label}: {args.boots} cold boots ...", file=sys.stderr)
            boots = [boot(system) for _ in range(args.boots)]
            print(f"{system.label}: {args.kills} kills ...", file=sys.stderr)
            kills = respawns(system, args.kills)
        finally:
            system.close()
        results[key] = {"boot to first item s": [b[0] for b in boots],
                        "boot to every worker handling s": [b[1] for b in boots],
                        "kill -9 to replacement handling s": kills}
        for what, values in results[key].items():
            rows.append({"system": system.label, "measure": what, "n": len(values),
                         **summary(values)})
    print(f"\nsnq with {args.workers} workers, '{args.job}' items\n")
    table(rows, ["system", "measure", "n", "median s", "p90 s", "min s", "max s"])
    print("\ntargets (issue 19): twistd snq to the first item <= 0.4 s; "
          "a respawned worker handling items <= 0.3 s after the death")
    save("startup", {"args": vars(args), "systems": results})


if __name__ == "__main__":
    main()
