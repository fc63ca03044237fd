"""
Floods (issue 15), on each backend's real server with a pool daemon of two
workers and an independent producer process (L{snq.client.Producer}):

* plain: site A's backlog of C{--items} no-op items, enqueued whole before
  the daemon starts, drains alone: items/s;
* flood: the same backlog while, at 10 items/s each, site B sends items of
  the same priority and site A sends high-priority ones (priority 9): the
  backlog's drain rate (and its ratio to the plain drain), and B's and the
  high-priority items' enqueue-to-start p50/p99 while the backlog drains
  (from its first C{WARM} items on), over C{--repeat} floods;
* rate: a transport limited to C{rate = "50/s"} over four workers: the
  rate measured (needs C{[transports.X] rate}; said so where the code has
  none);
* webhook: a dead remote host (accepts, never answers) behind a 10 s
  timeout while another host answers at once, items for both at 20/s
  each: how many connections the dead host holds at most, and the live
  host's enqueue-to-request p50/p99.

Each item notes when it started (the C{Mark} handler, buffered per
worker), so the figures come from the items themselves.

Run from the repository root: C{python -m bench.flood [--items N]
[--repeat N] [--backend NAME]... [--only flood,rate,webhook]}.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

from twisted.internet import defer, protocol, reactor, task, threads
from twisted.web import resource, server

from bench.common import percentile, save, table
from bench.recovery import Run
from snq.handlers import QueueHandler
from tests import stall
from tests.daemon import Daemon, environ, snqctl, waitFor

CONFIG = """
[daemon]
id = "{id}"
workers = {workers}
kill_time = 5
control_socket = "{sock}"

[queue]
backend = "{backend}"

{backendConfig}

[handlers]
mark = "bench.flood:Mark"
{transports}
[sites.default]
mark_file = "{marks}"
webhook_allow = ["127.0.0.1"]

[sites.a]
[sites.b]
"""

#: Probes per second, of each kind, while the backlog drains.
PROBE_RATE = 10
#: Items of the backlog handled before the probes start: a daemon's first
#: second (workers starting, connections opening) is no flood's doing.
WARM = 1000
#: The high-priority probes' priority (the backlog's is 0).
HIGH = 9


class Mark(QueueHandler):
    """
    Notes C{KIND CREATED STARTED} for each item (its payload's C{k}), in a
    file per worker process, written out a tenth of a second later at most.
    """

    transport = "mark"
    _out = None

    def handle(self, item):
        if Mark._out is None:
            path = self.context.siteConfig(item.site)["mark_file"]
            Mark._out = open(f"{path}.{os.getpid()}", "a")  # noqa: SIM115
            task.LoopingCall(Mark._out.flush).start(0.1, now=False)
        Mark._out.write(f"{item.payload['k']} {item.created!r} {time.time()!r}\n")


def marks(directory):
    """[(kind, created, started)] from every worker's file."""
    found = []
    for name in os.listdir(directory):
        if name.startswith("marks.txt."):
            with open(os.path.join(directory, name)) as f:
                found += [(k, float(c), float(s)) for k, c, s in
                          (line.split() for line in f if line.endswith("\n"))]
    return found


# -- the producer process --------------------------------------------------


def produce(args):
    """C{python -m bench.flood --produce CONFIG}: the independent producer."""
    from snq.client import Producer

    producer = Producer.from_config(args.produce)
    stop = threading.Event()

    def probes():
        while not stop.is_set():
            producer.enqueue("mark", {"k": "b"}, site="b")
            producer.enqueue("mark", {"k": "h"}, site="a", priority=HIGH)
            stop.wait(1 / PROBE_RATE)

    def hooks(rate):
        dead, live = args.hosts.split(",")
        while not stop.is_set():
            for port in (dead, live):
                producer.enqueue("webhook", {
                    "url": f"http://127.0.0.1:{port}/",
                    "body": {"t": time.time()}})
            stop.wait(1 / rate)

    for start in range(0, args.items, 1000):
        producer.enqueue_many("mark", [{"k": "a"}] * min(1000, args.items - start),
                              site="a")
    print("enqueued", flush=True)
    side = None
    if args.probes:
        side = threading.Thread(target=probes, daemon=True)
    elif args.hosts:
        side = threading.Thread(target=hooks, args=(20,), daemon=True)
    if side is not None:
        sys.stdin.readline()  # Once the workers drain.
        side.start()
        sys.stdin.read()  # Until the bench closes it.
        stop.set()
        side.join()
    producer.close()


# -- one scenario on one backend --------------------------------------------


class Scenario(Run):
    """A daemon on one backend, with the bench's config."""

    #: [stomp] prefetch, if not the default.
    stompPrefetch = 0
    #: [stomp] max_priority (0: plain queues).
    stompMaxPriority = HIGH

    def fail(self, message):
        raise SystemExit(message)

    @defer.inlineCallbacks
    def start(self, workers=2, transports=""):
        self.configure(workers, transports)
        self.daemon = Daemon(self, self.dir, "-c", self.configPath)
        yield self.running(workers, timeout=120)

    def configure(self, workers=2, transports=""):
        """Write the config (and the schema an SQL producer needs)."""
        self.marks = os.path.join(self.dir, "marks.txt")
        backend = {"SQLite": "db", "PostgreSQL": "db", "MariaDB": "db",
                   "Redis": "redis", "RabbitMQ": "stomp"}[self.backend.name]
        self.configPath = os.path.join(self.dir, "snq.toml")
        backendConfig = self.backend.config()
        if backend == "stomp" and self.stompMaxPriority and _knows(
                {"stomp": {"max_priority": self.stompMaxPriority}}):
            backendConfig += f"\nmax_priority = {self.stompMaxPriority}"
        if backend == "stomp" and self.stompPrefetch:
            backendConfig += f"\nprefetch = {self.stompPrefetch}"
        with open(self.configPath, "w") as f:
            f.write(CONFIG.format(
                id=self.daemonId, workers=workers, sock=self.sock,
                backend=backend, backendConfig=backendConfig,
                transports=transports, marks=self.marks))
        if backend == "db":
            snqctl("-c", self.configPath, "db", "init", cwd=self.dir)

    def producer(self, items, *more):
        """The producer process; its stdin closed ends its side traffic."""
        return subprocess.Popen(
            [sys.executable, "-m", "bench.flood", "--produce", self.configPath,
             "--items", str(items), *more], cwd=stall.__file__.rsplit(
                "/tests/", 1)[0], env=environ(), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)

    @defer.inlineCallbacks
    def backlog(self, items, *more):
        """
        Enqueue C{items}, then start the daemon on them, and once it drains
        the producer's side traffic (C{more}); → the marks once all ran.
        The backlog is whole before a worker claims: a producer slower than
        the workers would otherwise measure itself, and leave no backlog to
        pass.
        """
        process = self.producer(items, *more)

        def count():
            return sum(1 for k, _, _ in marks(self.dir) if k == "a")

        try:
            line = yield threads.deferToThread(process.stdout.readline)
            if line != "enqueued\n":
                self.fail(f"the producer failed: {line!r}")
            self.daemon = Daemon(self, self.dir, "-c", self.configPath)
            if more:
                yield waitFor(lambda: count() >= WARM, timeout=120,
                              interval=0.01, what="the drain to start")
                process.stdin.write("go\n")
                process.stdin.flush()
            yield waitFor(lambda: count() >= items, timeout=items / 50 + 120,
                          interval=0.5, what=f"{items} items handled")
        finally:
            process.stdin.close()
            yield threads.deferToThread(process.wait, 60)
        return marks(self.dir)


def _knows(data) -> bool:
    """Whether this code's config takes C{data}."""
    from snq import config

    try:
        config.parse(data)
    except config.ConfigError:
        return False
    return True


def drainRate(found):
    started = sorted(s for k, _, s in found if k == "a")
    return (len(started) - 1) / (started[-1] - started[0])


def latencies(found, kind):
    """ms from enqueue to start of C{kind}'s items enqueued during the drain."""
    started = [s for k, _, s in found if k == "a"]
    first, last = min(started), max(started)
    return [(s - c) * 1000 for k, c, s in found
            if k == kind and first <= c <= last]


@defer.inlineCallbacks
def scenario(backendClass, body):
    run = Scenario(backendClass)
    try:
        yield run.setUp()
        return (yield body(run))
    finally:
        yield run.cleanUp()


@defer.inlineCallbacks
def plainAndFlood(run, items, repeat):
    """
    The plain drain once, then the flood C{repeat} times: its drain rate
    is the median run's, the probes' latencies are pooled (a p99 needs a
    few hundred of them, and one fast drain holds few).
    """
    run.configure()
    plain = drainRate((yield run.backlog(items)))
    rates, b, h = [], [], []
    for _ in range(repeat):
        # Workers keep their files open: new ones start afresh.
        run.daemon.kill(signal.SIGTERM)
        for name in os.listdir(run.dir):
            if name.startswith("marks.txt."):
                os.remove(os.path.join(run.dir, name))
        found = yield run.backlog(items, "--probes")
        rates.append(drainRate(found))
        b += latencies(found, "b")
        h += latencies(found, "h")
    flood = sorted(rates)[len(rates) // 2]
    return {"backend": run.backend.name, "items": items, "plain /s": plain,
            "flood /s": flood, "flood/plain": f"{flood / plain:.0%}",
            "B n": len(b), "B p50 ms": percentile(b, 0.5),
            "B p99 ms": percentile(b, 0.99), "high n": len(h),
            "high p50 ms": percentile(h, 0.5), "high p99 ms": percentile(h, 0.99)}


@defer.inlineCallbacks
def rateLimited(run, items=500):
    transports = '[transports.mark]\nrate = "50/s"\n'
    if not _knows({"transports": {"mark": {"rate": "50/s"}}}):
        return {"backend": run.backend.name, "measured /s": "no rate limits"}
    run.configure(workers=4, transports=transports)
    found = yield run.backlog(items)
    # A bucket starts full: its first second's worth goes at once.  The
    # middle 80% of the items show the steady rate.
    started = sorted(s for k, _, s in found if k == "a")
    low, high = len(started) // 10, len(started) * 9 // 10
    return {"backend": run.backend.name, "items": items,
            "overall /s": drainRate(found),
            "measured /s": (high - low) / (started[high] - started[low])}


class _Dead(protocol.Protocol):
    """Accepts, reads, never answers; counts the connections it holds."""

    def connectionMade(self):
        self.factory.open += 1
        self.factory.most = max(self.factory.most, self.factory.open)
        self.factory.total += 1

    def connectionLost(self, reason):
        self.factory.open -= 1


class _Live(resource.Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.latencies = []

    def render_POST(self, request):
        sent = json.loads(request.content.read())["t"]
        self.latencies.append((time.time() - sent) * 1000)
        return b"ok"


@defer.inlineCallbacks
def deadHost(run, seconds=40.0):
    dead = protocol.ServerFactory.forProtocol(_Dead)
    dead.open = dead.most = dead.total = 0
    live = _Live()
    ports = [reactor.listenTCP(0, dead, interface="127.0.0.1"),
             reactor.listenTCP(0, server.Site(live), interface="127.0.0.1")]
    for port in ports:
        run.addCleanup(port.stopListening)
    hosts = ",".join(str(p.getHost().port) for p in ports)
    yield run.start(transports="[transports.webhook]\ntimeout = 10\n")
    process = run.producer(0, "--hosts", hosts)
    process.stdin.write("go\n")
    process.stdin.flush()
    yield task.deferLater(reactor, seconds, lambda: None)
    process.stdin.close()
    yield threads.deferToThread(process.wait, 60)
    ran = live.latencies[len(live.latencies) // 4:]  # Past the first rounds.
    return {"backend": run.backend.name, "seconds": seconds,
            "dead host: most connections": dead.most,
            "dead host: connections": dead.total, "live n": len(live.latencies),
            "live p50 ms": percentile(ran, 0.5), "live p99 ms": percentile(ran, 0.99)}


def main(reactor):
    parser = argparse.ArgumentParser(prog="python -m bench.flood")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--backend", action="append",
                        choices=["SQLite", "PostgreSQL", "Redis", "RabbitMQ"],
                        help="only these (default: all four)")
    parser.add_argument("--only", default="flood,rate,webhook",
                        help="which scenarios (flood includes the plain drain)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="floods per backend, their probes pooled")
    parser.add_argument("--label", default="", help="kept with the results")
    parser.add_argument("--stomp-prefetch", type=int, default=0,
                        help="[stomp] prefetch (default: snq's)")
    parser.add_argument("--stomp-max-priority", type=int, default=HIGH,
                        help="[stomp] max_priority (0: plain queues)")
    args = parser.parse_args()
    Scenario.stompPrefetch = args.stomp_prefetch
    Scenario.stompMaxPriority = args.stomp_max_priority
    backends = args.backend or ["SQLite", "PostgreSQL", "Redis", "RabbitMQ"]
    only = args.only.split(",")

    @defer.inlineCallbacks
    def everything():
        results = {"args": vars(args)}
        if "flood" in only:
            rows = []
            for name in backends:
                rows.append((yield scenario(stall.BACKENDS[name], lambda run: (
                    plainAndFlood(run, args.items, args.repeat)))))
                print(json.dumps(rows[-1]), flush=True)
            results["flood"] = rows
        if "rate" in only:
            rows = []
            for name in [b for b in backends if b != "RabbitMQ"]:
                rows.append((yield scenario(stall.BACKENDS[name], rateLimited)))
                print(json.dumps(rows[-1]), flush=True)
            results["rate"] = rows
        if "webhook" in only:
            results["webhook"] = [(yield scenario(stall.BACKENDS[backends[0]],
                                                  deadHost))]
        print(f"\n{args.label}")
        if "flood" in results:
            print(f"\nsite A's backlog of {args.items:,} items, its flood "
                  f"{args.repeat} times; B and high-priority probes at "
                  f"{PROBE_RATE}/s each\n")
            table(results["flood"], ["backend", "plain /s", "flood /s",
                                     "flood/plain", "B n", "B p50 ms", "B p99 ms",
                                     "high n", "high p50 ms", "high p99 ms"])
        if results.get("rate"):
            print("\nrate = \"50/s\", 4 workers\n")
            table(results["rate"], ["backend", "items", "overall /s",
                                    "measured /s"])
        if "webhook" in results:
            print("\na dead webhook host (10 s timeout) beside a live one\n")
            table(results["webhook"], list(results["webhook"][0]))
        save("flood", results)

    return everything()


if __name__ == "__main__":
    if "--produce" in sys.argv:
        parser = argparse.ArgumentParser()
        parser.add_argument("--produce")
        parser.add_argument("--items", type=int, default=0)
        parser.add_argument("--probes", action="store_true")
        parser.add_argument("--hosts", default="")
        produce(parser.parse_args())
    else:
        task.react(main)
