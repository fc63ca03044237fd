# -*- test-case-name: tests.test_hosts -*-
"""
Several hosts, shown: three daemons, each in a network namespace of its
own (L{tests.netns}), drain one queue on PostgreSQL, Redis and RabbitMQ
(STOMP), reached through the bridge; one host drops off the network
mid-drain (link down, its processes frozen, then killed) and the others
finish its items: nothing lost, no more duplicates than it held.  And
what must run once among daemons (a feed's poller, a schedule's ticks)
stays single across hosts and moves when its host is cut off.

C{SNQ_HOSTS_ITEMS} sets how many items (100,000 by default: 15 to 20 s a
backend on a quiet machine).  Needs root for the namespaces;
skipped, saying why, only where the kernel refuses them.
"""

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web import server

from snq import config as snqconfig
from snq.client import Producer
from tests import netns, rabbitmq, sqlservers
from tests.daemon import Daemon, snqctl, waitFor
from tests.recorder import recorded
from tests.test_feedpoll import Feed
from tests.test_redis import RedisFixture, waitUntil

ITEMS = int(os.environ.get("SNQ_HOSTS_ITEMS", "100000"))

COMMON = """
[daemon]
id = "{name}"
workers = {workers}
kill_time = 5

[queue]
backend = "{backend}"
lease = {lease}
prefetch = {prefetch}
concurrency = 50
{queue}

[monitor]
http = "127.0.0.1:0"

[handlers]
record = "tests.recorder:Stamp"

[sites.default]
record_file = "{record}"
"""


@dataclass
class Drain:
    """What L{Hosts.drain} saw."""

    hosts: int
    items: int
    #: Seconds from the daemons' start to every item handled.
    elapsed: float
    #: Item id → how many times it was handled.
    counts: Counter
    #: The ids the cut host had claimed when cut (SQL, Redis), and handled.
    held: set = field(default_factory=set)
    handledByCut: set = field(default_factory=set)
    #: Seconds after the cut at which the items it held started elsewhere
    #: (on STOMP: those it had run and were run again).
    elsewhere: list = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.items / self.elapsed

    @property
    def twice(self) -> set:
        return {i for i, n in self.counts.items() if n > 1}


class Hosts:
    """
    Three hosts on one backend; a backend's class says how to reach it.
    For test cases, and for C{bench.scale} (which stands in for one).
    """

    #: Worker processes per host, and the window of each.
    workers = 1
    prefetch = 100
    #: Seconds of a claim's lease (SQL, Redis).
    lease = 6
    queueSection = ""
    #: Does L{heldBy} know what a host holds (not on STOMP)?
    knowsHeld = True

    def setUp(self):
        reason = netns.unavailable()
        if reason:
            raise SkipTest(reason)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.net = netns.Network(3)
        self.addCleanup(self.net.close)
        self.net.make()
        return self.setUpBackend()

    def setUpBackend(self):
        raise NotImplementedError

    def section(self, where: str) -> str:
        """The backend's config for a daemon on a host ("hosts") or here."""
        raise NotImplementedError

    def heldBy(self, host) -> set:
        """Ids of the items C{host}'s workers hold claimed (or a Deferred)."""
        raise NotImplementedError

    def drained(self):
        """Is nothing ready or held (or a Deferred of it)?"""
        raise NotImplementedError

    def forward(self, port: int) -> str:
        """C{127.0.0.1:port} as the hosts reach it."""
        return f"{self.net.gateway}:{self.net.forward(port)}"

    def writeConfig(self, name, section, record):
        path = os.path.join(self.dir, f"{name}.toml")
        with open(path, "w") as f:
            f.write(COMMON.format(
                name=name, workers=self.workers, backend=self.backend,
                lease=self.lease, prefetch=self.prefetch, queue=self.queueSection,
                record=record) + section)
        return path

    def record(self, host) -> str:
        return os.path.join(self.dir, f"handled-h{host.index}.txt")

    def startHost(self, host):
        """A daemon on C{host}, in a directory of its own (control socket)."""
        config = self.writeConfig(f"h{host.index}", self.section("hosts"),
                                  self.record(host))
        cwd = os.path.join(self.dir, f"h{host.index}")
        os.makedirs(cwd)
        return Daemon(self, cwd, "-c", config, wrap=lambda c: host.command(*c))

    def producer(self) -> Producer:
        config = self.writeConfig("producer", self.section("here"),
                                  os.path.join(self.dir, "unused.txt"))
        producer = Producer(config=snqconfig.load(config))
        self.addCleanup(producer.close)
        return producer

    def handled(self) -> dict:
        """host index → [(item id, pid, attempts, started)]."""
        return {h.index: recorded(self.record(h)) for h in self.net.hosts}

    def handledIds(self) -> Counter:
        return Counter(line[0] for lines in self.handled().values()
                       for line in lines)

    @defer.inlineCallbacks
    def drain(self, items, hosts=3, cut=False):
        """
        C{items} enqueued, then drained by daemons on the first C{hosts}
        hosts; with C{cut}, the first host is cut off once a third is
        handled (link down, frozen, killed a second later).  → L{Drain}.
        """
        producer = self.producer()
        ids = set()
        for start in range(0, items, 10_000):
            ids.update(producer.enqueue_many(
                "record", [{}] * min(10_000, items - start)))
        began = time.monotonic()
        daemons = [self.startHost(h) for h in self.net.hosts[:hosts]]
        result = Drain(hosts, items, 0.0, Counter())
        if cut:
            victim = self.net.hosts[0]
            yield waitFor(lambda: sum(self.handledIds().values()) >= items // 3,
                          timeout=300, what="a third of the items handled")
            # Cut while it holds claims, not between a batch's acks and the
            # next claim: frozen, it changes nothing while they are read.
            for _ in range(100):
                victim.freeze()
                # What it wrote just before (a batch's acks) may still be on
                # its way through the forwarder: let it land first.
                yield deferLater(reactor, 0.3, lambda: None)
                result.held = yield defer.maybeDeferred(self.heldBy, victim)
                if result.held or not self.knowsHeld:
                    break
                victim.thaw()
                yield deferLater(reactor, 0.05, lambda: None)
            cutAt = time.time()
            victim.cutOff()
            yield deferLater(reactor, 1.0, lambda: None)
            victim.kill()
            result.handledByCut = {line[0] for line in self.handled()[victim.index]}
        yield waitFor(lambda: ids <= set(self.handledIds()), timeout=600,
                      what="every item handled")
        result.elapsed = time.monotonic() - began
        yield waitUntil(self.drained, timeout=120, what="nothing left in the queue")
        result.counts = self.handledIds()
        if set(result.counts) != ids:
            raise AssertionError("an item nobody enqueued was handled")
        if cut:
            # Where the broker does not say what it held, what it had run
            # and runs again elsewhere shows when its window came back.
            mine = result.held if self.knowsHeld else result.handledByCut
            result.elsewhere = sorted(
                float(line[3]) - cutAt for index, lines in self.handled().items()
                if index != victim.index for line in lines
                if line[0] in mine and float(line[3]) > cutAt)
        for d in daemons[1 if cut else 0:]:
            if not d.alive():
                raise AssertionError(f"a daemon died: {d.output()[-2000:]}")
        return result


class HostsTestsMixin(Hosts):
    timeout = 600

    @defer.inlineCallbacks
    def test_hostCutMidDrain(self):
        result = yield self.drain(ITEMS, cut=True)
        self.assertTrue(result.handledByCut, "the cut host never worked")
        if self.knowsHeld:
            self.assertTrue(result.held, "the cut host held nothing")
            self.assertTrue(result.elsewhere, "its items never ran elsewhere")
        twice = result.twice
        self.assertLessEqual(twice, result.handledByCut | result.held,
                             "a duplicate the cut host had not held")
        self.assertLessEqual(len(twice), self.workers * self.prefetch,
                             "more duplicates than the cut host held")
        elsewhere = result.elsewhere
        held = len(result.held) if self.knowsHeld else "?"
        taken = (f"of the items it held ({held}), {len(elsewhere)} ran elsewhere "
                 f"{elsewhere[0]:.1f} to {elsewhere[-1]:.1f} s after the cut"
                 if elsewhere else "none of its items ran elsewhere")
        print(f"\n{self.backend}: {ITEMS:,} items on 3 hosts in "
              f"{result.elapsed:.1f} s ({result.rate:,.0f} items/s), one cut "
              f"after a third; {len(twice)} handled twice; {taken}")


class RedisHosts(Hosts, RedisFixture):
    backend = "redis"

    @defer.inlineCallbacks
    def setUpBackend(self):
        yield self.setUpRedis()
        self.viaBridge = self.forward(6379)

    def section(self, where):
        address = "127.0.0.1:6379" if where == "here" else self.viaBridge
        return f'[redis]\nurl = "redis://{address}/1"\nprefix = "{self.prefix}"\n'

    @defer.inlineCallbacks
    def heldBy(self, host):
        """Ids of the items the host's workers hold claimed."""
        members = yield self.redis.execute("ZRANGE", self.key("processing"), 0, -1)
        held = set()
        for member in members:
            # CLAIMANT/SEQ…\nLIST\nFRAME, the claimant HOSTNAME-WORKER-RANDOM.
            token, _, frame = member.split(b"\n", 2)
            if f"-h{host.index}.".encode() in token:
                held.add(json.loads(frame)["id"])
        return held

    @defer.inlineCallbacks
    def drained(self):
        left = 0
        # Items given back wait in lines (levels:main says whether any do).
        for name in ("q:main", "levels:main", "processing"):
            left += (yield self.redis.execute("EXISTS", self.key(name)))
        return left == 0


class PostgresHosts(Hosts):
    backend = "db"

    def setUpBackend(self):
        self.server = sqlservers.forTest(self, sqlservers.Postgres)
        # A host frozen inside a claim's transaction would keep its rows
        # locked (skipped by the others) until its session ended: the
        # server ends such a session (recommended in the manual).
        self.server.sql(f'ALTER DATABASE "{self.server.database}" SET '
                        "idle_in_transaction_session_timeout = '5s'")
        self.viaBridge = self.forward(5432)
        config = self.writeConfig("init", self.section("here"),
                                  os.path.join(self.dir, "unused.txt"))
        snqctl("-c", config, "db", "init", cwd=self.dir)

    def section(self, where):
        address = "127.0.0.1:5432" if where == "here" else self.viaBridge
        return (f'[db]\nurl = "postgresql://postgres@{address}/'
                f'{self.server.database}?connect_timeout=5"\n')

    def heldBy(self, host):
        return {json.loads(frame)["id"] for (frame,) in self.server.sql(
            "SELECT frame FROM queue_item WHERE claimed_by LIKE %s",
            (f"%-h{host.index}.%",))}

    def drained(self):
        return self.server.count() == 0


class StompHosts(Hosts):
    backend = "stomp"

    def setUpBackend(self):
        rabbitmq.requireRabbitMQ()
        self.name = rabbitmq.uniqueName()
        self.addCleanup(rabbitmq.deleteQueues, self.name)
        self.viaBridge = self.forward(61613)
        self.queueSection = f'basename = "/queue/{self.name}/"'

    def section(self, where):
        address = "127.0.0.1:61613" if where == "here" else self.viaBridge
        # Heart-beats end to end (through socat): RabbitMQ drops the cut
        # host's connection after two silent periods and gives its
        # unacknowledged messages to the others.
        return (f'[stomp]\nservers = ["tcp://{address}"]\nheartbeat = 2\n'
                f'prefetch = {self.prefetch}\n'
                f'control_channel = "/topic/{self.name}/control"\n')

    #: The broker does not say which consumer holds what; a duplicate must
    #: then be one the cut host had handled.
    knowsHeld = False

    def heldBy(self, host):
        return set()

    def drained(self):
        depths = rabbitmq.queueDepths(self.name)
        return all(depth == (0, 0) for depth in depths.values())


class RedisHostsTests(HostsTestsMixin, RedisHosts, TestCase):
    pass


class PostgresHostsTests(HostsTestsMixin, PostgresHosts, TestCase):
    pass


class StompHostsTests(HostsTestsMixin, StompHosts, TestCase):
    pass


ONCE = """
[daemon]
id = "{name}"
workers = 1
kill_time = 5

[queue]
backend = "redis"
lease = 6

[redis]
url = "redis://{redis}/1"
prefix = "{prefix}"

[monitor]
http = "127.0.0.1:0"

[iomanagers.feedpoll]
host_interval = 0.1

[schedule.tick]
every = "1s"
transport = "tick"

[handlers]
tick = "tests.recorder:Created"
feedentry = "tests.recorder:Record"

[sites.default]
record_file = "{record}"

[sites.default.feeds.news]
url = "{feed}"
interval = 1
"""


class PolledFeed(Feed):
    """The test feed, noting which host polled it and when."""

    def __init__(self):
        super().__init__()
        self.polls: list[tuple[float, str]] = []

    def render_GET(self, request):
        self.polls.append((time.monotonic(), request.getClientAddress().host))
        return super().render_GET(request)


class RunOnceAcrossHostsTests(RedisFixture, TestCase):
    """
    What must happen once among daemons stays single across hosts: a feed
    has one poller (a lease in the ledger), and a schedule's tick is fired
    once (a claim in the ledger).  When the host that polls is cut off,
    another takes the feed over once the lease lapses (the poll interval
    plus feedpoll's 30 s margin), and the ticks go on, none twice.
    """

    timeout = 300

    @defer.inlineCallbacks
    def setUp(self):
        reason = netns.unavailable()
        if reason:
            raise SkipTest(reason)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.net = netns.Network(3)
        self.addCleanup(self.net.close)
        self.net.make()
        yield self.setUpRedis()
        self.feed = PolledFeed()
        site = server.Site(self.feed)
        site.noisy = False
        port = reactor.listenTCP(0, site, interface=self.net.gateway)
        self.addCleanup(port.stopListening)
        self.feedURL = f"http://{self.net.gateway}:{port.getHost().port}/news.xml"
        self.redisAt = self.net.gateway + ":" + str(self.net.forward(6379))

    def startHost(self, host):
        cwd = os.path.join(self.dir, f"h{host.index}")
        os.makedirs(cwd)
        config = os.path.join(cwd, "snq.toml")
        with open(config, "w") as f:
            f.write(ONCE.format(name=f"h{host.index}", redis=self.redisAt,
                                prefix=self.prefix, feed=self.feedURL,
                                record=os.path.join(self.dir, "handled.txt")))
        return Daemon(self, cwd, "-c", config, wrap=lambda c: host.command(*c))

    def pollers(self, since=0.0) -> set[str]:
        return {who for at, who in self.feed.polls if at >= since}

    def handled(self, fields: int) -> list[tuple]:
        """Ticks' lines (4 fields: with when made) or feed entries' (3)."""
        return [line for line in recorded(os.path.join(self.dir, "handled.txt"))
                if len(line) == fields]

    def ticks(self) -> dict:
        """tick → the ids of the items made for it."""
        made = {}
        for itemId, _, _, created in self.handled(4):
            made.setdefault(round(float(created)), set()).add(itemId)
        return made

    @defer.inlineCallbacks
    def test_feedPollerAndScheduleTakeOver(self):
        for host in self.net.hosts:
            self.startHost(host)
        yield waitFor(lambda: len(self.feed.polls) >= 5, timeout=120,
                      what="five polls of the feed")
        [holder] = self.pollers()
        victim = next(h for h in self.net.hosts if h.address == holder)
        cut = time.monotonic()
        victim.cutOff()
        yield deferLater(reactor, 1.0, lambda: None)
        victim.kill()
        yield waitFor(lambda: self.pollers(since=cut), timeout=90,
                      what="another host polling the feed")
        takeover = min(at for at, _ in self.feed.polls if at >= cut) - cut
        # Lease: the 1 s interval + the 30 s margin, and one interval more
        # before the next host looks.
        self.assertLess(takeover, 1 + 30 + 1 + 5)
        resumed = time.monotonic()
        yield waitFor(lambda: len(self.pollers(since=resumed)) >= 1 and
                      time.monotonic() > resumed + 5, what="five more seconds")
        [newHolder] = self.pollers(since=cut)
        self.assertNotEqual(newHolder, holder)
        # Every tick from the first to a lease ago is there, with one item.
        ticks = self.ticks()
        first, last = min(ticks), max(ticks)
        self.assertGreater(last - first, 30)
        missing = [t for t in range(first, last - 10) if t not in ticks]
        self.assertEqual(missing, [], "ticks nobody fired")
        self.assertEqual({t: ids for t, ids in ticks.items() if len(ids) > 1}, {},
                         "a tick fired twice")
        entries = [itemId for itemId, *_ in self.handled(3)]
        self.assertEqual(len(entries), 2, "the feed's two entries, once each")
        print(f"\nthe feed's poller cut off; {newHolder} polled it "
              f"{takeover:.1f} s later; {len(ticks)} ticks, each fired once")
