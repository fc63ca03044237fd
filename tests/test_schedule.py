# -*- test-case-name: tests.test_schedule -*-
"""
C{[schedule.NAME]}: ticks, catching up after downtime and reloads on a
Clock with an in-memory ledger; exactly once per tick with two daemons on
one real backend (SQLite, Redis, PostgreSQL), their time on a shared
Clock; and a real daemon whose schedules a SIGHUP changes.
"""

import collections
import datetime
import json
import os
import signal
import sqlite3
import time
import zoneinfo

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from snq import config as snqconfig
from snq.handlers import QueueHandler
from snq.iomanagers.schedule import Scheduler, Ticks, lastKey
from snq.item import Item
from snq.ledger.memory import MemoryLedger
from snq.queues import makeQueue
from snq.queues.memory import MemoryQueue
from tests import sqlservers
from tests.daemon import Daemon, daemonStatus, snqctl, socketPath, waitFor
from tests.plugin_helpers import managerContext
from tests.test_redis import REDIS_URL, RedisFixture, waitUntil

#: 2030-01-01 00:00:00 UTC, a round start for the Clock.
START = 1893456000.0


def schedules(**tables):
    return snqconfig.parse({"schedule": tables, "sites": {"a": {}, "b": {}}})


class TicksTests(SynchronousTestCase):
    def ticks(self, **table):
        return Ticks(snqconfig.ScheduleConfig(**table))

    def test_every(self):
        """Multiples of the interval since the epoch: every daemon agrees."""
        t = self.ticks(every="30s")
        self.assertEqual((t.after(START), t.after(START + 1), t.atOrBefore(START + 29)),
                         (START + 30, START + 30, START))
        self.assertEqual(t.between(START, START + 95, 2), ([START + 60, START + 90], 1))

    def test_cronInItsTimeZone(self):
        t = self.ticks(cron="0 9 * * *", timezone="Europe/Berlin")
        berlin = zoneinfo.ZoneInfo("Europe/Berlin")
        nine = datetime.datetime(2030, 1, 1, 9, tzinfo=berlin).timestamp()
        self.assertEqual(t.after(START), nine)
        self.assertEqual(t.atOrBefore(nine), nine)
        self.assertEqual(t.atOrBefore(nine - 1), nine - 86400)
        ticks, skipped = t.between(nine - 5 * 86400, nine, 3)
        self.assertEqual((ticks, skipped), ([nine - 2 * 86400, nine - 86400, nine], 2))

    def test_invalid(self):
        e = self.assertRaises(snqconfig.ConfigError, snqconfig.parse, {"schedule": {
            "both": {"every": 1, "cron": "* * * * *", "transport": "log"},
            "bad": {"cron": "61 * * * *", "transport": "log", "timezone": "Mars"},
            "none": {"payload": {"x": 1}, "catchup": "some"}}}, "s.toml")
        self.assertEqual(sorted(e.problems), sorted([
            's.toml: schedule.both: expected one of every = "30s" or cron = '
            '"*/5 * * * *"',
            "s.toml: schedule.bad.cron: expected a cron expression, got "
            "'61 * * * *': Bad minute",
            's.toml: schedule.bad.timezone: expected a time zone like "UTC" or '
            '"Europe/Berlin", got \'Mars\'',
            "s.toml: schedule.none.catchup: expected none | last | all, got 'some'",
            's.toml: schedule.none: expected one of every = "30s" or cron = '
            '"*/5 * * * *"',
            "s.toml: schedule.none.transport: expected the transport of its items"]))


class SchedulerTests(SynchronousTestCase):
    """One scheduler (or one after another) on a Clock and a memory ledger."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)
        self.queue = MemoryQueue(self.clock)
        self.ledger = MemoryLedger(self.clock)

    def start(self, config):
        context = managerContext(self, config, self.queue, self.clock, "schedule",
                                 ledger=self.ledger)
        scheduler = Scheduler(context)
        self.successResultOf(scheduler.startService())
        self.addCleanup(lambda: scheduler.running and scheduler.stopService())
        return scheduler

    def items(self):
        return [Item.fromJSON(r["frame"]) for r in self.queue.rows.values()]

    def ticksFired(self, name="beat"):
        return sorted(int(i.created) - int(START) for i in self.items()
                      if i.payload.get("s") == name)

    def test_firesEachTick(self):
        self.start(schedules(beat={"every": 1, "transport": "log",
                                   "payload": {"s": "beat"}}))
        for _ in range(3):
            self.clock.advance(1)
        self.assertEqual(self.ticksFired(), [1, 2, 3])
        self.assertEqual(self.ledger.entries[lastKey("beat")][0], repr(START + 3))

    def test_everySite(self):
        self.start(schedules(beat={"every": 5, "transport": "log", "sites": "all",
                                   "payload": {"s": "beat"}, "priority": 3}))
        self.clock.advance(5)
        self.assertEqual(sorted((i.site, i.priority) for i in self.items()),
                         [("a", 3), ("b", 3)])

    def test_jitterDelaysTheItem(self):
        self.start(schedules(beat={"every": 10, "transport": "log", "jitter": 4}))
        self.clock.advance(10)
        [row] = self.queue.rows.values()
        self.assertTrue(START + 10 <= row["run_at"] <= START + 14, row["run_at"])

    def downtime(self, **policy):
        """Three ticks, 10 s down, then a new scheduler with C{policy}."""
        table = {"every": 1, "transport": "log", "payload": {"s": "beat"}, **policy}
        first = self.start(schedules(beat=table))
        for _ in range(3):
            self.clock.advance(1)
        self.successResultOf(first.stopService())
        self.clock.advance(10)
        return self.start(schedules(beat=table))

    def test_catchupNone(self):
        self.downtime()
        self.assertEqual(self.ticksFired(), [1, 2, 3])
        self.clock.advance(1)
        self.assertEqual(self.ticksFired(), [1, 2, 3, 14])

    def test_catchupLast(self):
        self.downtime(catchup="last")
        self.assertEqual(self.ticksFired(), [1, 2, 3, 13])

    def test_catchupAll(self):
        self.downtime(catchup="all")
        self.assertEqual(self.ticksFired(), list(range(1, 14)))

    def test_catchupAllIsBounded(self):
        scheduler = self.downtime(catchup="all", catchup_limit=4)
        self.assertEqual(len(self.items()), 3 + 4)
        self.assertEqual(scheduler.context.handlers.stats.counts[
            "schedule.skipped", "beat", ""], 6)

    def test_reloadAddsChangesRemoves(self):
        scheduler = self.start(schedules(beat={"every": 1, "transport": "log",
                                               "payload": {"s": "beat"}}))
        self.clock.advance(1)
        applied = self.successResultOf(scheduler.reconfigService(schedules(
            beat={"every": 2, "transport": "log", "payload": {"s": "beat"}},
            other={"every": 1, "transport": "log", "payload": {"s": "other"}})))
        self.assertEqual(applied, ["schedule beat (re)started",
                                   "schedule other (re)started"])
        for _ in range(4):
            self.clock.advance(1)
        self.assertEqual((self.ticksFired(), self.ticksFired("other")),
                         ([1, 2, 4], [2, 3, 4, 5]))
        applied = self.successResultOf(scheduler.reconfigService(schedules(
            other={"every": 1, "transport": "log", "payload": {"s": "other"}})))
        self.assertEqual(applied, ["schedule beat removed"])
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(self.ticksFired(), [1, 2, 4])
        self.assertEqual(self.ticksFired("other"), [2, 3, 4, 5, 6, 7])
        self.successResultOf(scheduler.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_ledgerDownRetriesTheTick(self):
        class Down(MemoryLedger):
            down = True

            def get(self, name):
                if self.down:
                    return defer.fail(ConnectionError("ledger down"))
                return super().get(name)

        self.ledger = Down(self.clock)
        scheduler = self.start(schedules(beat={"every": 60, "transport": "log",
                                               "payload": {"s": "beat"}}))
        self.clock.advance(60)
        [row] = scheduler.status()
        self.assertEqual(row["state"], "failing")
        self.assertIn("ConnectionError: ledger down", row["detail"])
        self.flushLoggedErrors(ConnectionError)
        self.ledger.down = False
        self.clock.advance(30)
        self.assertEqual(scheduler.status()[0]["state"], "ok")
        self.assertEqual(self.ticksFired(), [60])


class TwoDaemonsMixin:
    """
    Two daemons' schedulers on one real backend, their time on one Clock:
    a schedule every second fires exactly once per tick for 20 ticks.
    """

    timeout = 120
    TICKS = 20

    def backend(self) -> dict:
        raise NotImplementedError

    @defer.inlineCallbacks
    def daemon(self, config, wid):
        queue = makeQueue(config, self.clock)
        yield queue.open()
        self.addCleanup(queue.close)
        context = managerContext(self, config, queue, self.clock, "schedule",
                                 wid=wid)
        scheduler = Scheduler(context)
        yield scheduler.startService()
        self.addCleanup(scheduler.stopService)
        return scheduler

    def idle(self, schedulers):
        return all(r._firing is None for s in schedulers for r in s.runners.values())

    async def test_exactlyOncePerTick(self):
        self.clock = Clock()
        self.clock.advance(START)
        config = snqconfig.parse({**self.backend(), "schedule": {"beat": {
            "every": 1, "transport": "log", "payload": {"n": 1}}}})
        schedulers = [await self.daemon(config, f"host{n}.0") for n in (1, 2)]
        for _ in range(self.TICKS):
            self.clock.advance(1)
            await waitUntil(lambda: self.idle(schedulers), what="both fired")
        created = await defer.maybeDeferred(self.created)
        self.assertEqual(collections.Counter(created),
                         {START + n: 1 for n in range(1, self.TICKS + 1)})
        fired = [s.context.handlers.stats.counts["schedule.fired", "beat", "default"]
                 for s in schedulers]
        self.assertEqual(sum(fired), self.TICKS)
        self.assertTrue(all(fired), f"both daemons took part: {fired}")


class SqliteTwoDaemonsTests(TwoDaemonsMixin, TestCase):
    def backend(self):
        self.path = os.path.abspath(self.mktemp())
        return {"db": {"url": f"sqlite:///{self.path}"}}

    def created(self):
        with sqlite3.connect(self.path) as conn:
            return [json.loads(f)["created"] for (f,) in
                    conn.execute("SELECT frame FROM queue_item")]


class PostgresTwoDaemonsTests(TwoDaemonsMixin, TestCase):
    def backend(self):
        self.server = sqlservers.Postgres("snq_sched")
        self.server.create()
        self.addCleanup(self.server.drop)
        return {"db": {"url": self.server.url()}}

    def created(self):
        return [json.loads(f)["created"] for (f,) in
                self.server.sql("SELECT frame FROM queue_item")]


class RedisTwoDaemonsTests(TwoDaemonsMixin, RedisFixture, TestCase):
    def setUp(self):
        return self.setUpRedis()

    def backend(self):
        return {"queue": {"backend": "redis"},
                "redis": {"url": REDIS_URL, "prefix": self.prefix}}

    @defer.inlineCallbacks
    def created(self):
        frames = yield self.redis.execute("LRANGE", self.key("q:main"), 0, -1)
        return [json.loads(f)["created"] for f in frames]


class DaemonTests(TestCase):
    """A real daemon: schedules follow SIGHUP; snqctl schedule list."""

    timeout = 90

    def configure(self, schedules):
        with open(self.path, "w") as f:
            f.write(f"""
[daemon]
workers = 1
control_socket = "{self.sock}"

[queue]
poll_interval = 0.1

[monitor]
http = ""

[handlers]
rec = "tests.test_schedule:Record"

[sites.default]
record_file = "{self.record}"
""" + "".join(f"""
[schedule.{name}]
every = 1
transport = "rec"
payload = {{name = "{name}"}}
""" for name in schedules))

    def fired(self):
        if not os.path.exists(self.record):
            return collections.Counter()
        with open(self.record) as f:
            return collections.Counter(line.split()[0] for line in f)

    async def test_reloadAddsAndRemoves(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "snq.toml")
        self.record = os.path.join(self.dir, "fired.txt")
        self.sock = socketPath(self)
        self.configure(["one"])
        daemon = Daemon(self, self.dir, "-c", self.path)
        await waitFor(lambda: self.fired()["one"] >= 2, timeout=30,
                      what="schedule one firing")
        before = sorted(w["pid"] for w in (await daemonStatus(self.sock))["workers"])

        self.configure(["two"])
        daemon.process.send_signal(signal.SIGHUP)
        await waitFor(lambda: self.fired()["two"] >= 2, timeout=20,
                      what="schedule two firing after the reload")
        ones = self.fired()["one"]
        time.sleep(2.5)
        self.assertEqual(self.fired()["one"], ones, "schedule one was removed")
        after = sorted(w["pid"] for w in (await daemonStatus(self.sock))["workers"])
        self.assertEqual(after, before, "no worker restarted")
        self.assertIn("schedule two (re)started", daemon.output())

        listing = snqctl("-c", self.path, "schedule", "list", cwd=self.dir).stdout
        [header, row] = listing.splitlines()
        self.assertEqual(header.split()[:4], ["schedule", "when", "transport", "site"])
        self.assertEqual(row.split()[:5], ["two", "every", "1", "rec", "default"])
        self.assertNotIn("never", row)


class Record(QueueHandler):
    """Appends the schedule's name and the item's creation time."""

    def handle(self, item):
        path = self.context.siteConfig(item.site)["record_file"]
        with open(path, "a") as f:
            f.write(f"{item.payload['name']} {item.created}\n")
