# -*- test-case-name: tests.test_iomanagers -*-
"""
The IoManager plugin layer, with a third party's plugin: the example of
the manual, C{tests/plugins/example}, which C{scripts/test} installs into
the venv as a distribution of its own (C{snq-example-plugin}), so it is
found through its C{snq.iomanagers} entry points as any plugin would be.
"""

import argparse
import os
import subprocess
import sys
from importlib.metadata import entry_points
from urllib.parse import parse_qs

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from snq import config as snqconfig
from snq import tap
from snq.child import Worker, check
from snq.iomanagers import ENTRY_POINT_GROUP, PluginError, checkPlugins
from snq.iomaster import IoMaster
from snq.monitor.metrics import registry
from snq.monitor.statsd import StatsdSender
from snq.monitor.tracker import Tracker
from snq.monitor.udp import counterDatagram
from snq.pool import _slots
from snq.queues.memory import MemoryQueue
from snq.routing import dedicatedRoles, groupsOf
from tests.test_monitor import FakePool, FakeProcess
from tests.test_redis import RedisFixture, redisConfig

HEARTBEAT = {"iomanagers": {"heartbeat": {"interval": 5}}}


def parse(data, source="snq.toml"):
    return snqconfig.parse(data, source)


def toml(data) -> bytes:
    """The little TOML these tests need: tables of scalars."""
    lines = []

    def table(prefix, values):
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
        if prefix:
            lines.append(f"[{prefix}]")
        for key, value in scalars.items():
            text = str(value).lower() if isinstance(value, bool) else repr(value)
            lines.append(f"{key} = {text}".replace("'", '"'))
        for key, value in values.items():
            if isinstance(value, dict):
                table(f"{prefix}.{key}" if prefix else key, value)

    table("", data)
    return "\n".join(lines).encode()


class RecordingQueue(MemoryQueue):
    """Keeps every item enqueued, also after a worker took it."""

    def __init__(self, clock):
        super().__init__(clock)
        self.enqueued = []

    def enqueue(self, items, delay=0.0):
        self.enqueued += items
        return super().enqueue(items, delay)


class Built:
    """An IoMaster of C{role} on a Clock and a memory queue, started."""

    def __init__(self, testCase, data, role="first", wid="generic.0", **kw):
        self.clock = Clock()
        self.queue = RecordingQueue(self.clock)
        self.master = IoMaster(parse(data), workerId=wid, clock=self.clock,
                               queue=self.queue, role=role, **kw)
        self.master.startService()
        self.clock.advance(0)
        testCase.addCleanup(self.master.stopService)

    def items(self, transport):
        return [i for i in self.queue.enqueued if i.transport == transport]

    @property
    def plugins(self):
        return self.master.plugins.plugins


class EntryPointTests(SynchronousTestCase):
    def test_fixtureIsADistribution(self):
        """
        The example plugin is another distribution's entry point, not a
        path snq was given: found the way any third party's is.
        """
        [ep] = entry_points(group=ENTRY_POINT_GROUP, name="heartbeat")
        self.assertEqual((ep.value, ep.dist.name),
                         ("snq_example:Heartbeat", "snq-example-plugin"))
        import snq_example

        self.assertNotIn(os.path.abspath("tests"), snq_example.__file__)


class StartTests(SynchronousTestCase):
    def test_runsUnderTheIoMaster(self):
        """
        Started with the worker: it enqueues at once, then every interval,
        on the worker's queue, and counts.
        """
        built = Built(self, HEARTBEAT)
        [(plugin, service, _)] = built.plugins.values()
        self.assertIs(service.parent, built.master.plugins)
        self.assertEqual(plugin.settings.interval, 5.0)
        self.assertEqual([i.payload for i in built.items("heartbeat")],
                         [{"beat": 1, "worker": "generic.0"}])
        built.clock.advance(5)
        self.assertEqual(len(built.items("heartbeat")), 2)
        stats = built.master.stats
        self.assertEqual(stats.counts["heartbeat.beats", "heartbeat", ""], 2)
        self.assertEqual(stats.counts["enqueued", "heartbeat", "default"], 2)
        self.assertEqual(built.master.plugins.status(), {"heartbeat": [
            {"key": "heartbeat", "state": "ok", "detail": "2 beats, every 5 s"}]})

    def test_stopWaits(self):
        built = Built(self, HEARTBEAT)
        d = built.master.stopService()
        self.successResultOf(d)
        self.assertEqual(built.clock.getDelayedCalls(), [])

    def test_placement(self):
        """
        worker = "one" runs on the pool's first worker, "every" on every
        queue worker, "dedicated" on a worker of its own, which consumes no
        group; --inline runs all.
        """
        data = {"iomanagers": {
            "one": {"plugin": "snq_example:Heartbeat"},
            "every": {"plugin": "snq_example:Heartbeat", "worker": "every"},
            "own": {"plugin": "snq_example:Heartbeat", "worker": "dedicated"}}}
        config = parse(data)
        runs = {role: sorted(Built(self, data, role).plugins)
                for role in ("first", "queues", "own", "all")}
        self.assertEqual(runs, {"first": ["every", "one"], "queues": ["every"],
                                "own": ["own"], "all": ["every", "one", "own"]})
        self.assertEqual(groupsOf(config, "own"), [])
        self.assertEqual(dedicatedRoles(config), ["own"])
        self.assertEqual(_slots(config, 2), [
            (0, "generic.0", "first"), (1, "generic.1", "queues"),
            ("own", "generic.own", "own")])

    def test_dedicatedAlongsideXmpp(self):
        """One mechanism: the xmpp group's worker and a dedicated plugin's."""
        config = parse({"queue": {"groups": ["xmpp"]}, "iomanagers": {
            "beat": {"plugin": "snq_example:Heartbeat", "worker": "dedicated"}}})
        self.assertEqual(_slots(config, 3), [("xmpp", "generic.xmpp", "xmpp"),
                                             ("beat", "generic.beat", "beat")])

    def test_disabled(self):
        config = parse({"iomanagers": {"heartbeat": {"enabled": False}}})
        self.assertEqual(config.managers(), {})
        self.assertEqual(Built(self, {"iomanagers": {"heartbeat": {
            "enabled": False}}}).plugins, {})


class ReloadTests(SynchronousTestCase):
    def reload(self, built, data):
        d = built.master.reconfigService(parse(data))
        return self.successResultOf(d)

    def test_inPlace(self):
        """A new interval: the same service takes it, nothing restarts."""
        built = Built(self, HEARTBEAT)
        [(_, service, _)] = built.plugins.values()
        applied = self.reload(built, {"iomanagers": {"heartbeat": {"interval": 20}}})
        self.assertIn("heartbeat every 20 s", applied)
        [(_, same, context)] = built.plugins.values()
        self.assertIs(same, service)
        self.assertEqual(context.settings.interval, 20.0)
        built.clock.advance(5)  # The beat planned before the reload.
        built.clock.advance(19)
        self.assertEqual(len(built.items("heartbeat")), 2)
        built.clock.advance(1)
        self.assertEqual(len(built.items("heartbeat")), 3)

    def test_removedAndAdded(self):
        built = Built(self, HEARTBEAT)
        [(_, service, _)] = built.plugins.values()
        self.assertEqual(self.reload(built, {}), ["iomanager heartbeat stopped"])
        self.assertFalse(service.running)
        self.assertEqual(built.master.dispatcher.context.iomanagers, {})
        self.assertIsNone(service._timer)
        self.assertIn("iomanager heartbeat started", self.reload(built, HEARTBEAT))
        [(_, new, _)] = built.plugins.values()
        self.assertTrue(new.running)
        self.assertIsNot(new, service)

    def test_brokenChangesNothing(self):
        """A reload with a bad setting fails before any plugin changed."""
        built = Built(self, HEARTBEAT)
        before = dict(built.plugins)
        failure = self.failureResultOf(built.master.plugins.reconfigService(
            parse({"iomanagers": {"heartbeat": {"interval": 0}, "x": {}}})))
        failure.trap(PluginError)
        self.assertEqual(built.plugins, before)


class RefusedTests(SynchronousTestCase):
    def problems(self, tables):
        return checkPlugins(parse({"iomanagers": tables}))

    def test_importError(self):
        [problem] = self.problems({"broken": {}})
        self.assertEqual(problem, (
            "iomanagers.broken: cannot load snq_example.broken:Broken: "
            "ModuleNotFoundError: No module named 'snq_example_missing_dependency'"))

    def test_badSettings(self):
        self.assertEqual(self.problems({"heartbeat": {"interval": -1, "colour": 1}}), [
            "iomanagers.heartbeat.colour: unknown key (known: interval, transport)",
            "iomanagers.heartbeat.interval: expected seconds above 0, got -1"])

    def test_pluginsOwnCheck(self):
        self.assertEqual(self.problems({"heartbeat": {"transport": "ping"}}), [
            "iomanagers.heartbeat: transport 'ping' has no handler in [handlers]"])

    def test_notAPlugin(self):
        self.assertEqual(self.problems({"x": {"plugin": "snq.item:Item"}, "y": {}}), [
            "iomanagers.x: snq.item:Item is not a subclass of IoManager",
            "iomanagers.y: no plugin of that name (no 'y' entry point in "
            "snq.iomanagers, no plugin = \"package.module:Class\" in the table)"])

    def test_reservedName(self):
        e = self.assertRaises(snqconfig.ConfigError, parse,
                              {"iomanagers": {"xmpp": {}}})
        self.assertIn("iomanagers.xmpp: expected a name", str(e))

    def test_noLedgerOnStomp(self):
        [problem] = checkPlugins(parse({"queue": {"backend": "stomp"},
                                        "schedule": {"s": {"every": 1,
                                                           "transport": "log"}}}))
        self.assertIn("iomanagers.schedule: [queue] backend = 'stomp' keeps "
                      "nothing but messages", problem)
        self.assertIn("set [ledger] url", problem)
        self.assertEqual(checkPlugins(parse({
            "queue": {"backend": "stomp"}, "ledger": {"url": "redis://x:1/0"},
            "schedule": {"s": {"every": 1, "transport": "log"}}})), [])

    def test_atStart(self):
        """twistd snq refuses to start, naming the plugin and why."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(toml({"iomanagers": {"broken": {}}}))
        options = tap.Options()
        options.parseOptions(["--config", path])
        e = self.assertRaises(SystemExit, tap.makeService, options)
        # Checked in a fresh interpreter, which names the file too.
        self.assertIn(f"snq: {path}: iomanagers.broken: cannot load", str(e))

    def test_atReload(self):
        """
        The reload check, in a fresh interpreter as the master runs it,
        finds the third party's plugin through its entry point too.
        """
        text = toml({"iomanagers": {"broken": {}, "heartbeat": {"interval": 0}}})
        self.assertEqual(check(text, "snq.toml"), [
            "snq.toml: iomanagers.broken: cannot load snq_example.broken:Broken: "
            "ModuleNotFoundError: No module named 'snq_example_missing_dependency'",
            "snq.toml: iomanagers.heartbeat.interval: expected seconds above 0, "
            "got 0"])
        result = subprocess.run(
            [sys.executable, "-m", "snq.child", "--check", "--config", "snq.toml"],
            input=text, capture_output=True, timeout=60)
        self.assertEqual(result.returncode, 1)
        self.assertIn(b"iomanagers.broken: cannot load", result.stdout)


class CountersTests(SynchronousTestCase):
    """A plugin's counters and status reach every monitor."""

    def setUp(self):
        built = Built(self, HEARTBEAT, recycle=lambda reason: None)
        built.clock.advance(5)
        worker = Worker(built.master.config, "generic.0", built.clock)
        worker.iomaster, worker.state = built.master, "running"
        self.report = worker.snapshot()
        self.pool = FakePool()
        self.pool.rows = [{"id": "generic.0", "role": "current", "pid": 7,
                           "state": "running", "restarts": 0, "last_exit": None,
                           "uptime": 1.0, "report": self.report}]
        self.tracker = Tracker(self.pool, Clock(), [])
        self.tracker.workerReported(FakeProcess("generic.0"), self.report)

    def test_statusJson(self):
        status = self.tracker.status()
        self.assertEqual(status["iomanagers"]["heartbeat"], {
            "events": {"heartbeat": {"beats": 2}},
            "status": [{"key": "heartbeat", "state": "ok",
                        "detail": "2 beats, every 5 s", "worker": "generic.0"}]})
        self.assertNotIn("", status["transports"])

    def test_metrics(self):
        from prometheus_client import generate_latest

        families = {f.name: f for f in text_string_to_metric_families(
            generate_latest(registry(self.tracker, "db")).decode())}
        [sample] = [s for s in families["snq_iomanager_events"].samples
                    if s.name.endswith("_total")]
        self.assertEqual((sample.labels, sample.value), (
            {"iomanager": "heartbeat", "event": "beats", "key": "heartbeat",
             "site": "",
             "worker": "generic.0"}, 2.0))
        [ok] = families["snq_iomanager_ok"].samples
        self.assertEqual(ok.value, 1.0)

    def test_statsdAndUdp(self):
        sender = StatsdSender("127.0.0.1", 1)
        sender.counted("feedpoll.errors", "blog/news", "blog", "generic.0", 2)
        self.assertEqual(dict(sender._counts), {
            "snq.iomanager.feedpoll.errors": 2,
            "snq.iomanager.feedpoll.errors.key.blog_news": 2,
            "snq.iomanager.feedpoll.errors.site.blog": 2})
        datagram = parse_qs(counterDatagram("feedpoll.errors", "blog/news",
                                            "blog", "generic.0").decode())
        self.assertEqual(datagram["owners[]"], ["feedpoll:blog/news", "site:blog",
                                                "thread:generic.0"])

    def test_dashboard(self):
        """The page draws an IoManagers table from /status.json."""
        from importlib import resources

        static = resources.files("snq.monitor") / "static"
        self.assertIn('id="iomanagers"', (static / "index.html").read_text())
        self.assertIn("status.iomanagers", (static / "dashboard.js").read_text())


class OptionsTests(SynchronousTestCase):
    def test_childRole(self):
        """A dedicated plugin's name is a role; nonsense is not."""
        from snq.child import _role

        self.assertEqual(_role("feedpoll"), "feedpoll")
        self.assertRaises(argparse.ArgumentTypeError, _role, "no such/role")


class DedicatedOnRedisTests(RedisFixture, TestCase):
    """A dedicated plugin's worker consumes no list, even on Redis."""

    def setUp(self):
        return self.setUpRedis()

    async def test_consumesNothing(self):
        config = redisConfig(self.prefix, iomanagers={"beat": {
            "plugin": "snq_example:Heartbeat", "worker": "dedicated"}})
        consumed = {}
        for role in ("beat", "first"):
            master = IoMaster(config, workerId=f"t.{role}", role=role)
            await master.startService()
            consumed[role] = master.queue.consumed
            await master.stopService()
        self.assertEqual(consumed, {"beat": [], "first": ["main"]})
