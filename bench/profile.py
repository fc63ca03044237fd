"""
Where a worker's CPU goes per item: C{py-spy} samples one snq worker
draining a backlog of no-op items, and the samples are summed by function
(own time: the function itself was running; total: it was on the stack).

    pip install -e '.[bench]'     # brings py-spy
    python -m bench.profile [--backend snq-redis] [--items 200000] [--seconds 10]

The worker runs alone (C{[daemon] workers = 1}) on a backlog larger than
it drains in C{--seconds}, so every sample is of steady work.
"""

import argparse
import collections
import os
import re
import subprocess
import sys
import time

from bench.common import save, table, treeCpu, waitUntil
from bench.systems import SNQ, SYSTEMS

FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^:]*)(?::(?P<line>\d+))?\)$")


def where(frame, line=False):
    """C{"function (path/to/module.py:12)"} → C{"module:function[:12]"}."""
    m = FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    for marker in ("site-packages/", "/snq/", "/bench/", "python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker in ("/snq/", "/bench/"):
                path = marker.strip("/") + "/" + path
            break
    where = f"{path.removesuffix('.py').replace('/', '.')}:{m['function']}"
    return f"{where}:{m['line']}" if line and m["line"] else where


def sample(system, seconds, rate):
    out = os.path.join(system.dir, "samples.txt")
    worker = system.workerPids()[0]
    subprocess.run(["py-spy", "record", "--pid", str(worker), "--duration",
                    str(seconds), "--rate", str(rate), "--format", "raw",
                    "--output", out, "--nonblocking"],
                   check=True, capture_output=True,
                   env=dict(os.environ, PATH=os.path.dirname(sys.executable)
                            + os.pathsep + os.environ["PATH"]))
    stacks = collections.Counter()
    with open(out) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            stacks[(*(where(fr) for fr in frames[:-1]),
                    where(frames[-1], line=True))] += int(count)
    return stacks


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="snq-redis", choices=SNQ)
    parser.add_argument("--job", choices=("noop", "incr"), default="noop")
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rate", type=int, default=250, help="samples a second")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    system = SYSTEMS[args.backend](job=args.job, workers=1)
    try:
        system.reset()
        system.enqueue(args.items)
        system.start()
        waitUntil(lambda: system.handled() > 1000, 60, "the worker to start")
        worker = system.workerPids()[0]
        before, cpuBefore = system.handled(), treeCpu(worker)[worker]
        started = time.monotonic()
        stacks = sample(system, args.seconds, args.rate)
        items = system.handled() - before
        speed = items / (time.monotonic() - started)
        cpuPerItem = (treeCpu(worker)[worker] - cpuBefore) / items * 1e6
    finally:
        system.stop()
        system.close()
    total = sum(stacks.values())
    own, inclusive = collections.Counter(), collections.Counter()
    for stack, n in stacks.items():
        own[stack[-1]] += n
        for function in set(stack[:-1]) | {stack[-1].rsplit(":", 1)[0]}:
            inclusive[function] += n
    # The shares are py-spy's; the CPU per item is the kernel's (utime +
    # stime of the worker over the same seconds), split by those shares.
    perItem = cpuPerItem / total

    def rows(counter):
        return [{"function": f, "share": f"{n / total:.1%}",
                 "us/item": n * perItem} for f, n in counter.most_common(args.top)]

    print(f"\n{system.label}, '{args.job}' items at {speed:,.0f} items/s "
          f"while sampled, {cpuPerItem:.1f} us of CPU per item (/proc); "
          f"{total:,} samples\n\nown time by line:\n")
    table(rows(own), ["function", "share", "us/item"])
    print("\nown time by function (all its lines):\n")
    byFunction = collections.Counter()
    for function, n in own.items():
        byFunction[function.rsplit(":", 1)[0] if function.count(":") > 1
                   else function] += n
    table(rows(byFunction), ["function", "share", "us/item"])
    print("\non the stack (snq's and the protocol libraries' functions):\n")
    table([r for r in rows(collections.Counter(
        {f: n for f, n in inclusive.items()
         if f.startswith(("snq.", "txredisapi", "stompest", "twisted.protocols",
                          "twisted.internet.defer", "twisted.enterprise"))}))],
        ["function", "share", "us/item"])
    save(f"profile-{args.backend}", {"args": vars(args), "items/s": speed,
                                     "CPU us/item": cpuPerItem,
                                     "samples": total,
                                     "own": dict(own.most_common(200)),
                                     "inclusive": dict(inclusive.most_common(200))})


if __name__ == "__main__":
    main()
