# -*- test-case-name: tests.test_dispatcher -*-
"""
Counters a worker keeps, by name, transport and site, in StatusNet's
vocabulary so its monitors read them unchanged.
"""

import collections

COUNTERS = ("enqueued", "handled", "error", "requeued", "deadletter",
            "baditem", "badhandler")


class Stats:
    def __init__(self):
        #: (counter, transport, site) → count
        self.counts: collections.Counter = collections.Counter()
        #: transport → [number of items, total seconds in handlers]
        self.timings: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])

    def count(self, counter: str, transport: str = "", site: str = "",
              n: int = 1):
        self.counts[counter, transport, site] += n

    def timing(self, transport: str, seconds: float):
        entry = self.timings[transport]
        entry[0] += 1
        entry[1] += seconds

    def total(self, counter: str) -> int:
        return sum(n for (name, _, _), n in self.counts.items() if name == counter)

    def totals(self) -> dict[str, int]:
        return {name: self.total(name) for name in COUNTERS}
