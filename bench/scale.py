"""
Several hosts on one broker: items/s with daemons on 1, 2 and 3 hosts,
each in a network namespace of its own (L{tests.netns}), on PostgreSQL,
Redis and RabbitMQ (STOMP); then, with 3 hosts, one cut off mid-drain
(link down, frozen, killed): nothing lost, how many handled twice, and
the time from the cut to its items running on the other hosts.

On a machine of few cores the point is that throughput holds and nothing
is lost, not that it grows with the hosts: every "host" shares the same
CPUs.  Needs root (namespaces).  Run from the repository root:
C{python -m bench.scale [--items N] [--backend NAME]}.
"""

import argparse
import os
import shutil
import tempfile

from twisted.internet import defer, task

from bench.common import save, table
from tests import test_hosts

BACKENDS = {"postgresql": test_hosts.PostgresHosts, "redis": test_hosts.RedisHosts,
            "stomp": test_hosts.StompHosts}


class Run:
    """Stands in for the test case the harness expects; cleans up after."""

    def __init__(self):
        self._cleanups = []
        self._temp = tempfile.mkdtemp(prefix="snq-bench-scale-")
        self._count = 0

    def mktemp(self):
        self._count += 1
        return os.path.join(self._temp, str(self._count))

    def addCleanup(self, f, *args):
        self._cleanups.append((f, args))

    def fail(self, message):
        raise AssertionError(message)

    @defer.inlineCallbacks
    def cleanUp(self):
        while self._cleanups:
            f, args = self._cleanups.pop()
            yield defer.maybeDeferred(f, *args)
        shutil.rmtree(self._temp, ignore_errors=True)


@defer.inlineCallbacks
def measure(name, items, hosts, cut):
    run = type(f"{name}Run", (BACKENDS[name], Run), {})()
    try:
        yield defer.maybeDeferred(run.setUp)
        result = yield run.drain(items, hosts=hosts, cut=cut)
    finally:
        yield run.cleanUp()
    row = {"backend": name, "hosts": hosts, "items": items,
           "items/s": round(result.rate), "lost": 0,
           "twice": len(result.twice)}
    if cut:
        row["cut"] = "1 of 3"
        row["held"] = len(result.held) or "?"
        row["elsewhere after s"] = (round(result.elsewhere[0], 1)
                                    if result.elsewhere else "")
    return row


def main(reactor):
    parser = argparse.ArgumentParser(prog="python -m bench.scale")
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--backend", action="append", choices=list(BACKENDS),
                        help="only these (default: every backend)")
    args = parser.parse_args()

    @defer.inlineCallbacks
    def everything():
        rows = []
        for name in args.backend or BACKENDS:
            for hosts, cut in ((1, False), (2, False), (3, False), (3, True)):
                row = yield measure(name, args.items, hosts, cut)
                print(row)
                rows.append(row)
        print("\nitems/s with daemons on 1, 2 and 3 namespace hosts (one worker "
              "each); with a cut, the first start elsewhere of an item the cut "
              "host held (STOMP: of one it had run, run again)")
        table(rows, ["backend", "hosts", "items", "items/s", "lost", "twice", "cut",
                     "held", "elsewhere after s"])
        save("scale", {"args": vars(args), "rows": rows})

    return everything()


if __name__ == "__main__":
    task.react(main)
