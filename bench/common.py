"""
What every benchmark shares: percentiles, a process tree's memory and CPU
from /proc, waiting, a result table and the JSON file it is kept in.

Benchmarks are not tests: they measure on this machine and print figures,
they assert nothing.  Run one with C{python -m bench.NAME}.
"""

import datetime
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
#: C{twistd} of this Python (the venv's console script may not be on PATH).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def percentile(values, fraction):
    """The value below which C{fraction} of C{values} lie (nearest rank)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


def rssBytes(pid=None):
    """Resident set size of a process (default: this one), from /proc."""
    with open(f"/proc/{pid or os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rollup(pid):
    with open(f"/proc/{pid or os.getpid()}/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: int(v.split()[0]) * 1024 for k, v in fields.items()
            if v.strip().endswith("kB")}


def privateBytes(pid=None):
    """Memory only this process holds: its RSS less pages shared with others."""
    fields = _rollup(pid)
    return fields["Private_Clean"] + fields["Private_Dirty"]


def pssBytes(pid=None):
    """
    Proportional set size: each page divided among the processes sharing it,
    so the PSS of a process tree adds up to what the tree really costs.
    """
    return _rollup(pid)["Pss"]


def _stats():
    """C{{pid: (ppid, CPU clock ticks)}} of every process, from /proc."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return stats


def tree(pid):
    """C{pid} and its descendants, parents first."""
    return list(treeCpu(pid))


def treeCpu(pid):
    """
    C{{pid: CPU seconds (user + system)}} of C{pid} and its descendants,
    parents first.
    """
    stats = _stats()
    children = {}
    for p, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(p)
    ticks = os.sysconf("SC_CLK_TCK")
    result, todo = {}, [pid]
    while todo:
        p = todo.pop(0)
        if p in stats:
            result[p] = stats[p][1] / ticks
            todo += sorted(children.get(p, []))
    return result


def waitUntil(condition, timeout, what, interval=0.001):
    """Poll C{condition} until true; the monotonic time it became so."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic()


def machine():
    """Where and when figures were taken: they mean nothing without it."""
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release(), "load average": load}


def save(name, data):
    """Write C{data} with L{machine} to bench/results/NAME-TIME.json."""
    os.makedirs(RESULTS, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(RESULTS, f"{name}-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"machine": machine(), **data}, f, indent=2)
    print(f"\nwritten to {os.path.relpath(path)}")
    return path


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def table(rows, columns):
    """Print dicts as an aligned text table, columns in the given order."""
    cells = [[str(c) for c in columns]]
    texts = [[True] * len(columns)]
    for row in rows:
        cells.append([_fmt(row.get(c, "")) for c in columns])
        texts.append([isinstance(row.get(c, ""), str)
                      and not row.get(c, "")[:1].isdigit() for c in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for n, (r, text) in enumerate(zip(cells, texts, strict=True)):
        line = (v.ljust(w) if t else v.rjust(w)
                for v, w, t in zip(r, widths, text, strict=True))
        print("  ".join(line))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value):
    if isinstance(value, float):
        return f"{value:,.1f}" if value >= 100 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
