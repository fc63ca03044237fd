# -*- test-case-name: tests.test_dispatch -*-
"""
Counters a worker keeps, by name, transport and site, in StatusNet's
vocabulary so its monitors read them unchanged.
"""

import bisect
import collections
import os
import resource
import sys

COUNTERS = ("enqueued", "handled", "error", "requeued", "deadletter",
            "baditem", "badhandler", "badsite", "switch", "siteupdate",
            "xmpp_process", "claim_failed", "settle_failed", "deferred",
            "circuit_open")

#: Upper bounds (seconds) of the handle-time histogram; one more bucket
#: counts everything slower.  Prometheus' defaults, plus two for slow remotes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0)


def emptyBuckets() -> list[int]:
    return [0] * (len(DURATION_BUCKETS) + 1)


class Stats:
    def __init__(self):
        #: (counter, transport, site) → count
        self.counts: collections.Counter = collections.Counter()
        #: transport → [number of items, total seconds in handlers]
        self.timings: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
        #: transport → items per L{DURATION_BUCKETS} bucket (not cumulative),
        #: so the master can build a histogram without every single time.
        self.buckets: dict[str, list] = collections.defaultdict(emptyBuckets)

    def count(self, counter: str, transport: str = "", site: str = "",
              n: int = 1):
        self.counts[counter, transport, site] += n

    def timing(self, transport: str, seconds: float):
        entry = self.timings[transport]
        entry[0] += 1
        entry[1] += seconds
        self.buckets[transport][bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1

    def total(self, counter: str) -> int:
        return sum(n for (name, _, _), n in self.counts.items() if name == counter)

    def totals(self) -> dict[str, int]:
        return {name: self.total(name) for name in COUNTERS}


_PAGE = os.sysconf("SC_PAGE_SIZE")


def residentMemory() -> int:
    """This process's resident set size in bytes."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        # No /proc (macOS, BSD): the peak, the best these systems offer.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
