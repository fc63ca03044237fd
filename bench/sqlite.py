"""
SQLite, the embedded default: how fast one worker process drains a backlog,
how long an item waits from enqueue to its handler when the worker is idle,
and the worker's resident memory.

    python -m bench.sqlite [--items 20000] [--latency-items 300]
"""

import argparse
import os
import tempfile
import time

from twisted.internet import defer, task

from bench.common import Timer, percentile, privateBytes, rssBytes, table
from snq import config as snqconfig
from snq.handlers import HandlerRegistry, QueueHandler
from snq.iomaster import IoMaster
from snq.item import Item
from snq.queues.db import DbQueue


class Probe(QueueHandler):
    """A no-op handler that notes how long each item waited."""

    waits: list = []

    def handle(self, item):
        self.waits.append(time.time() - item.created)


@defer.inlineCallbacks
def main(reactor, args):
    directory = tempfile.mkdtemp(prefix="snq-bench-")
    url = f"sqlite:///{os.path.join(directory, 'bench.sqlite')}"
    config = snqconfig.parse({"db": {"url": url}})
    producer = DbQueue(url, 60, clock=reactor, claimant="producer")
    yield producer.open()

    for start in range(0, args.items, 5000):
        count = min(5000, args.items - start)
        yield producer.enqueue([Item(transport="probe", payload={"n": start + i})
                                for i in range(count)])

    master = IoMaster(config, clock=reactor,
                      registry=HandlerRegistry({"probe": Probe}))
    with Timer() as drain:
        yield master.startService()
        while len(Probe.waits) < args.items:
            yield task.deferLater(reactor, 0.01, lambda: None)
        while master.dispatcher.held:
            yield task.deferLater(reactor, 0.01, lambda: None)
    rss, private = rssBytes(), privateBytes()

    # Idle latency: one item at a time, the worker waiting for work.
    del Probe.waits[:]
    yield task.deferLater(reactor, 2, lambda: None)
    for _ in range(args.latency_items):
        yield producer.enqueue([Item(transport="probe", payload={})])
        yield task.deferLater(reactor, 0.02, lambda: None)
    while len(Probe.waits) < args.latency_items:
        yield task.deferLater(reactor, 0.01, lambda: None)
    waits = [w * 1000 for w in Probe.waits]

    yield master.stopService()
    yield producer.close()
    print(f"\nsnq on SQLite ({args.items:,} no-op items, 1 worker process, "
          f"poll_interval {config.queue.poll_interval} s)\n")
    table([{"measure": "drain rate", "value": args.items / drain.seconds,
            "unit": "items/s"},
           {"measure": "idle enqueue→start p50", "value": percentile(waits, 0.5),
            "unit": "ms"},
           {"measure": "idle enqueue→start p99", "value": percentile(waits, 0.99),
            "unit": "ms"},
           {"measure": "RSS after the drain", "value": rss / 2**20, "unit": "MiB"},
           {"measure": "of which private", "value": private / 2**20,
            "unit": "MiB"}],
          ["measure", "value", "unit"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--latency-items", type=int, default=300)
    task.react(main, [parser.parse_args()])
