"""
Memory of snq per backend: the PSS (and RSS) of the master and of each
worker at idle, after warm-up and after C{--items} items, and the growth
from warm-up to the end.

The daemon starts on an empty queue, and once every worker reports that
it is running, idles for C{--idle} seconds; then
C{--items} jobs are fed in chunks (at most C{--backlog} waiting, so the
broker's own memory stays small) and the processes' memory is read every
tenth of the way; warm-up is the first tenth.  PSS (from
/proc/PID/smaps_rollup) divides shared pages among the processes sharing
them, so master + workers is what the tree really costs.  A worker that
was replaced during the run (recycled, or died) is reported.

    python -m bench.memory [--items 1000000] [--backends snq-redis,...]
                           [--job incr|noop]

Run the full million once; use C{--items 50000} while developing.
"""

import argparse
import sys
import time

from bench.common import privateBytes, pssBytes, rssBytes, save, table, waitUntil
from bench.systems import SNQ, SYSTEMS

MB = 2**20


def snapshot(system):
    """C{{"master"|"worker N": (pid, PSS, RSS, private)}} now, in bytes."""
    pids = {"master": system.master()}
    for n, pid in enumerate(sorted(system.workerPids()), 1):
        pids[f"worker {n}"] = pid
    for pid in system.helperPids():
        pids["fork server"] = pid
    return {name: (pid, pssBytes(pid), rssBytes(pid), privateBytes(pid))
            for name, pid in pids.items()}


def run(system, items, idle, backlog):
    system.reset()
    system.start()
    samples = []
    try:
        waitUntil(lambda: system.running() >= system.workers, 60,
                  f"{system.label} workers", interval=0.2)
        time.sleep(idle)
        samples.append((0, snapshot(system)))
        sent, step = 0, max(1, items // 10)
        nextSample = step
        while True:
            done = system.handled()
            if done >= nextSample:
                samples.append((done, snapshot(system)))
                nextSample += step
            if done >= items:
                break
            if sent - done < backlog // 2 and sent < items:
                chunk = min(backlog - (sent - done), items - sent)
                system.enqueue(chunk)
                sent += chunk
            if not system.alive():
                raise SystemExit(system.describeFailure())
            time.sleep(0.05)
        time.sleep(idle)
        samples.append((items, snapshot(system)))
    finally:
        system.stop()
    return samples


def rows(system, samples):
    """Per process: idle, warm-up, end (after the last idle spell), growth."""
    idle, warm, end = samples[0][1], samples[1][1], samples[-1][1]
    result = []
    for name in idle:
        pids = {s[1][name][0] for s in samples if name in s[1]}
        row = {"system": system.label, "process": name,
               "idle PSS MB": idle[name][1] / MB, "idle RSS MB": idle[name][2] / MB}
        if name in warm and name in end:
            row.update({"warm PSS MB": warm[name][1] / MB,
                        "end PSS MB": end[name][1] / MB,
                        "end RSS MB": end[name][2] / MB,
                        "growth MB": (end[name][1] - warm[name][1]) / MB,
                        # Private pages move only with this process, PSS
                        # also with whatever else shares its libraries.
                        "private growth MB": (end[name][3] - warm[name][3]) / MB})
        if len(pids) > 1:
            row["note"] = f"replaced ({len(pids)} pids)"
        result.append(row)
    total = {"system": system.label, "process": "tree"}
    for key, snap in (("idle PSS MB", idle), ("warm PSS MB", warm),
                      ("end PSS MB", end)):
        total[key] = sum(v[1] for v in snap.values()) / MB
    total["growth MB"] = total["end PSS MB"] - total["warm PSS MB"]
    return [*result, total]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--backends", default=",".join(SNQ))
    parser.add_argument("--job", choices=("incr", "noop"), default="incr")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--idle", type=float, default=5.0,
                        help="seconds idle before the first and last reading")
    parser.add_argument("--backlog", type=int, default=50_000)
    args = parser.parse_args(argv)
    printed, results = [], {}
    for key in args.backends.split(","):
        system = SYSTEMS[key](job=args.job, workers=args.workers)
        print(f"{system.label}: {args.items:,} items ...", file=sys.stderr)
        started = time.monotonic()
        try:
            samples = run(system, args.items, args.idle, args.backlog)
        except (Exception, SystemExit) as e:
            # One backend's trouble (a broker restarted by another test
            # suite) leaves the others' figures standing.
            print(f"{system.label}: {type(e).__name__}: {e}", file=sys.stderr)
            results[key] = {"error": f"{type(e).__name__}: {e}"}
            continue
        finally:
            system.close()
        printed += rows(system, samples)
        results[key] = {"seconds": time.monotonic() - started, "samples": [
            {"handled": done, "processes": {
                name: {"pid": pid, "pss": pss, "rss": rss, "private": private}
                for name, (pid, pss, rss, private) in snap.items()}}
            for done, snap in samples]}
    print(f"\nsnq with {args.workers} workers, {args.items:,} '{args.job}' items; "
          "warm = after the first tenth, end = after all and "
          f"{args.idle:g} s idle; growth = end - warm\n")
    table(printed, ["system", "process", "idle PSS MB", "idle RSS MB", "warm PSS MB",
                    "end PSS MB", "end RSS MB", "growth MB", "private growth MB",
                    "note"])
    print("\ntargets (issue 19): worker RSS <= 32 MB, PSS <= 22 MB; master RSS "
          "<= 35 MB; tree <= 60 MB PSS; growth after warm-up <= 1 MB")
    save("memory", {"args": vars(args), "systems": results})


if __name__ == "__main__":
    main()
