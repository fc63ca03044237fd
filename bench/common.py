"""
What every benchmark shares: percentiles, resident memory, a result table.

Benchmarks are not tests: they measure on this machine and print figures,
they assert nothing.  Run one with C{python -m bench.NAME}.
"""

import os
import time


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


def privateBytes(pid=None):
    """Memory only this process holds: its RSS less pages shared with others."""
    with open(f"/proc/{pid or os.getpid()}/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return sum(int(fields[k].split()[0]) * 1024
               for k in ("Private_Clean", "Private_Dirty"))


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def table(rows, columns):
    """Print dicts as an aligned text table, columns in the given order."""
    cells = [[str(c) for c in columns]]
    for row in rows:
        cells.append([_fmt(row.get(c, "")) for c in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for n, r in enumerate(cells):
        line = (v.rjust(w) if n else v.ljust(w)
                for v, w in zip(r, widths, strict=True))
        print("  ".join(line))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value):
    if isinstance(value, float):
        return f"{value:,.1f}" if value >= 100 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
