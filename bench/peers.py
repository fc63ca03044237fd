"""
snq against its peers in one run, every system doing the same job: issue
19's table.

Systems: snq on Redis, STOMP (RabbitMQ) and SQLite (2 workers each);
Dramatiq on Redis (2 processes x 8 threads) and on RabbitMQ (2 x 1); Huey
on Redis (2 processes); Celery on Redis (prefork 2, fair, acks_late).  Each
run of a system: a backlog of C{--items} jobs enqueued while nothing runs;
the system started cold (boot = start to the first item handled); the
drain timed from the first item to the last; the workers' CPU (utime +
stime from /proc, 10% of the items to the last, so start-up is left out)
per item; RSS of the master and the largest worker and the PSS of the
whole process tree right after the drain; then C{--probes} probes one at a
time on idle workers for the time from enqueue to start.  Every system
runs once per round, C{--rounds} rounds; the table shows medians.

    pip install -e '.[bench]'
    python -m bench.peers [--job incr|noop] [--items 20000] [--rounds 3]
                          [--probes 200] [--systems snq-redis,dramatiq-redis]

Uses the Redis and RabbitMQ on 127.0.0.1 (see L{bench.systems}).
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import types

from bench.common import (
    RESULTS,
    percentile,
    pssBytes,
    rssBytes,
    save,
    table,
    tree,
    treeCpu,
    waitUntil,
)
from bench.systems import SNQ, SYSTEMS

MB = 2**20


def measure(system, items, probes):
    """One cold start, drain and idle spell of C{system}: a dict of figures."""
    system.reset()
    system.enqueue(items)
    system.start()
    try:
        alive = system.alive
        first = waitUntil(lambda: system.handled() > 0 or not alive(), 120,
                          f"{system.label} to start")
        if not alive():
            raise SystemExit(f"{system.describeFailure()}")
        cpuFrom = None
        while (done := system.handled()) < items:
            if cpuFrom is None and done >= items // 10:
                cpuFrom = treeCpu(system.master()), done
            if not alive() or time.monotonic() - first > 600:
                raise SystemExit(f"{done} of {items} handled; "
                                 f"{system.describeFailure()}")
            time.sleep(0.002)
        last = time.monotonic()
        cpuTo = treeCpu(system.master())
        master = system.master()
        workers = system.workerPids()
        memory = {"RSS master MB": rssBytes(master) / MB,
                  "RSS worker MB": max(rssBytes(p) for p in workers) / MB,
                  "PSS tree MB": sum(pssBytes(p) for p in tree(master)) / MB}
        (before, doneFrom), after = cpuFrom, cpuTo
        counted = items - doneFrom
        cpu = {"worker CPU ms/item": sum(
                   after[p] - before.get(p, 0) for p in workers) / counted * 1000,
               "tree CPU ms/item": sum(
                   after[p] - before.get(p, 0) for p in after) / counted * 1000}
        waits = idleLatency(system, probes)
    finally:
        system.stop()
    return {"items/s": items / (last - first), "boot s": first - system.started,
            **memory, **cpu,
            "idle p50 ms": percentile(waits, 0.5) * 1000 if waits else None,
            "idle p99 ms": percentile(waits, 0.99) * 1000 if waits else None,
            "handled": system.handled()}


def idleLatency(system, probes):
    """Enqueue → start of C{probes} items, one at a time, workers idle."""
    time.sleep(1)
    for n in range(1, probes + 1):
        system.probe()
        waitUntil(lambda n=n: len(system.waits()) >= n, 30,
                  f"{system.label} probe {n}")
        time.sleep(0.01)
    return system.waits()


COLUMNS = ["items/s", "boot s", "RSS master MB", "RSS worker MB", "PSS tree MB",
           "worker CPU ms/item", "tree CPU ms/item", "idle p50 ms", "idle p99 ms"]


def keepLog(system):
    """A failed run's log, copied where it outlives the run's directory."""
    source = os.path.join(system.dir, "processes.log")
    if not os.path.exists(source):
        return None
    os.makedirs(RESULTS, exist_ok=True)
    target = os.path.join(RESULTS, f"failed-{system.key}-{time.strftime('%H%M%S')}.log")
    shutil.copyfile(source, target)
    return target


def medians(runs):
    row = {"runs": sum("error" not in r for r in runs)}
    for column in COLUMNS:
        values = [r[column] for r in runs if r.get(column) is not None]
        row[column] = statistics.median(values) if values else None
    return row


def show(rows, systems):
    """The table, each figure with its ratio to the Dramatiq row it is compared with."""
    byKey = {s.key: r for s, r in zip(systems, rows, strict=True)
             if s.key not in SNQ}
    printed = []
    for system, row in zip(systems, rows, strict=True):
        peer = byKey.get(system.peer)
        line = {"system": system.label, "runs": row["runs"]}
        for column in COLUMNS:
            value = row[column]
            if value is None:
                line[column] = ""
                continue
            text = f"{value:,.0f}" if value >= 100 else f"{value:.2f}"
            if peer and peer is not row and peer.get(column):
                text += f" ({value / peer[column]:.2f}x)"
            line[column] = text
        printed.append(line)
    table(printed, ["system", "runs", *COLUMNS])


def systemsFrom(spec, job, workers):
    """C{"snq-redis:1,celery"} → systems; C{:N} sets that one's workers."""
    for entry in spec.split(","):
        key, _, count = entry.partition(":")
        yield SYSTEMS[key](job=job, workers=int(count) if count else workers)


def main(argv=None, **defaults):
    """Run, print and save; the median rows, by system.  C{defaults}: of the options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", choices=("incr", "noop"), default="incr")
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma-separated, of: " + ", ".join(SYSTEMS)
                        + "; KEY:N runs N workers")
    parser.add_argument("--show", metavar="JSON",
                        help="print the table of an earlier run's results file")
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.show:
        with open(args.show) as f:
            saved = json.load(f)
        print(f"{saved['machine']}\n")
        show([s["median"] for s in saved["systems"]],
             [types.SimpleNamespace(key=s["key"], label=s["label"],
                                    peer=SYSTEMS[s["key"]].peer)
              for s in saved["systems"]])
        return None
    systems = list(systemsFrom(args.systems, args.job, args.workers))
    runs = [[] for _ in systems]
    try:
        for n in range(args.rounds):
            for system, results in zip(systems, runs, strict=True):
                print(f"round {n + 1}: {system.label} ...", file=sys.stderr)
                try:
                    results.append(measure(system, args.items, args.probes))
                except (Exception, SystemExit) as e:
                    # A broker that another test suite restarted fails this
                    # run, not the table: the other runs still count.
                    results.append({"error": f"{type(e).__name__}: {e}",
                                    "log": keepLog(system)})
                    print(f"  failed: {results[-1]['error']}", file=sys.stderr)
    finally:
        for system in systems:
            system.close()
    rows = [medians(r) for r in runs]
    print(f"\n{args.items:,} '{args.job}' items drained, median of {args.rounds}; "
          f"{args.probes} probes one at a time on idle workers; (x) = ratio to "
          "Dramatiq on the same broker (Redis for SQLite, Huey, Celery)\n")
    show(rows, systems)
    save(f"peers-{args.job}", {"args": vars(args), "systems": [
        {"key": s.key, "label": s.label, "workers": s.workers, "median": row,
         "runs": r} for s, row, r in zip(systems, rows, runs, strict=True)]})
    return list(zip(systems, rows, strict=True))


if __name__ == "__main__":
    main()
