# -*- test-case-name: tests.test_cluster -*-
"""
The cluster's registry and pauses: the store's contract on the real
SQLite, PostgreSQL, MariaDB and Redis (and on SQLite named by [ledger] url
beside a STOMP broker); the master's heartbeats and cluster reloads, and a
worker's look at the pauses, on a Clock; a paused item put back uncharged.
"""

import dataclasses
import io
import os
import time

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from snq import config as snqconfig
from snq.cluster import RELOAD, ClusterMissing, Pauses, liveness, makeStore, pauseKey
from snq.cluster.pauses import PauseWatch, describe
from snq.cluster.registry import RegistryService, daemonName, digest
from snq.dispatch import Dispatcher
from snq.handlers import HandlerRegistry
from snq.item import Item
from snq.queues import makeQueue
from snq.queues.memory import MemoryQueue
from snq.routing import TransportFilter
from tests import sqlservers
from tests.test_redis import REDIS_URL, RedisFixture


class PausesTests(SynchronousTestCase):
    def test_fromSettings(self):
        pauses = Pauses.fromSettings({
            pauseKey("transport", "webhook"): {}, pauseKey("site", "ex"): {},
            "pause:nonsense:x": {}, "pause:site:": {}, RELOAD: {"nonce": "n"}})
        self.assertEqual(pauses, Pauses(frozenset({"webhook"}), frozenset({"ex"})))
        self.assertTrue(pauses.holds("webhook", "default"))
        self.assertTrue(pauses.holds("log", "ex"))
        self.assertFalse(pauses.holds("log", "default"))
        self.assertFalse(Pauses())
        self.assertEqual(describe(pauses), "transport webhook, site ex paused")
        self.assertEqual(describe(Pauses()), "nothing paused")

    def test_putBack(self):
        """A heartbeat at first, then as long as the pause lasted, capped."""
        pauses = Pauses.fromSettings({
            pauseKey("transport", "webhook"): {"since": 1000.0},
            pauseKey("site", "ex"): {"since": 1030.0},
            pauseKey("site", "old"): {}})
        self.assertEqual(pauses.putBack("webhook", "default", 1001, 5), 5)
        self.assertEqual(pauses.putBack("webhook", "default", 1020, 5), 20)
        self.assertEqual(pauses.putBack("webhook", "default", 2000, 5), 60)
        # Both paused: the later pause counts.
        self.assertEqual(pauses.putBack("webhook", "ex", 1040, 5), 10)
        # Paused without a time (by hand): a heartbeat.
        self.assertEqual(pauses.putBack("log", "old", 1040, 5), 5)
        self.assertEqual(Pauses.fromSettings({}), Pauses())

    def test_narrow(self):
        paused = Pauses(frozenset({"webhook"}))
        some = TransportFilter(include=frozenset({"webhook", "log"}))
        self.assertEqual(paused.narrow(some).include, {"log"})
        every = TransportFilter(exclude=frozenset({"xmppout"}), site="ex")
        narrowed = paused.narrow(every)
        self.assertEqual((narrowed.exclude, narrowed.site),
                         ({"xmppout", "webhook"}, "ex"))
        self.assertIs(Pauses().narrow(every), every)

    def test_liveness(self):
        self.assertEqual(liveness({"seen": 100}, 110, 20), "live")
        self.assertEqual(liveness({"seen": 100}, 121, 20), "stale")
        self.assertEqual(liveness({"seen": 100, "state": "stopped"}, 101, 20),
                         "stopped")

    def test_stompNeedsALedger(self):
        config = snqconfig.parse({"queue": {"backend": "stomp"}})
        with self.assertRaises(ClusterMissing):
            makeStore(config)

    def test_digest(self):
        """What a host may have of its own does not count; the rest does."""
        base = snqconfig.parse({"daemon": {"id": "a", "workers": 2}})
        own = snqconfig.parse({"daemon": {"id": "b", "workers": 5},
                               "monitor": {"http": "127.0.0.1:9999"}},
                              "/etc/snq/other.toml")
        other = snqconfig.parse({"daemon": {"id": "a"},
                                 "queue": {"max_retries": 9}})
        self.assertEqual(digest(base), digest(own))
        self.assertNotEqual(digest(base), digest(other))
        self.assertNotEqual(digest(base), digest(
            dataclasses.replace(base, code={"h": "fingerprint"})))

    def test_configChecked(self):
        with self.assertRaises(snqconfig.ConfigError) as e:
            snqconfig.parse({"cluster": {"heartbeat": 10, "stale": 15,
                                         "forget": 5}})
        self.assertIn("cluster.stale: expected at least twice", str(e.exception))
        self.assertIn("cluster.forget: expected at least", str(e.exception))


class StoreMixin:
    """The store's contract, on the queue's own store."""

    timeout = 60

    def config(self) -> dict:
        raise NotImplementedError

    @defer.inlineCallbacks
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.snq = snqconfig.parse(self.config())
        self.queue = makeQueue(self.snq, self.clock)
        yield self.queue.open()
        self.addCleanup(self.queue.close)
        self.store = makeStore(self.snq, self.queue, self.clock)
        yield self.store.open()
        self.addCleanup(self.store.close)

    async def test_daemons(self):
        await self.store.beat("a@h1", {"name": "a@h1", "seen": 1000.0}, 60)
        await self.store.beat("b@h2", {"name": "b@h2", "seen": 990.0}, 60)
        await self.store.beat("a@h1", {"name": "a@h1", "seen": 1005.0}, 60)
        daemons = await self.store.daemons()
        self.assertEqual(daemons, {"a@h1": {"name": "a@h1", "seen": 1005.0},
                                   "b@h2": {"name": "b@h2", "seen": 990.0}})
        # Settings and records stay apart.
        self.assertEqual(await self.store.settings(), {})

    async def test_settings(self):
        await self.store.put(pauseKey("transport", "webhook"), {"by": "me"})
        await self.store.put(RELOAD, {"nonce": "1"})
        await self.store.put(RELOAD, {"nonce": "2"})
        await self.store.beat("a@h1", {"seen": 1000.0}, 60)
        self.assertEqual(await self.store.settings(), {
            "pause:transport:webhook": {"by": "me"}, "reload": {"nonce": "2"}})
        self.assertTrue(await self.store.remove("pause:transport:webhook"))
        self.assertFalse(await self.store.remove("pause:transport:webhook"))
        self.assertEqual(list(await self.store.settings()), ["reload"])


class SqlStoreMixin(StoreMixin):
    async def test_forget(self):
        await self.store.beat("old", {"seen": 900.0}, 60)
        await self.store.beat("new", {"seen": 1000.0}, 60)
        await self.store.put(RELOAD, {"nonce": "1"})
        self.assertEqual(await self.store.forget(950.0), 1)
        self.assertEqual(list(await self.store.daemons()), ["new"])
        self.assertEqual(list(await self.store.settings()), ["reload"])


class SqliteStoreTests(SqlStoreMixin, TestCase):
    def config(self):
        return {"db": {"url": f"sqlite:///{os.path.abspath(self.mktemp())}"}}


class PostgresStoreTests(SqlStoreMixin, TestCase):
    def config(self):
        server = sqlservers.forTest(self, sqlservers.Postgres)
        return {"db": {"url": server.url()}}


class MariaDbStoreTests(SqlStoreMixin, TestCase):
    def config(self):
        server = sqlservers.forTest(self, sqlservers.MariaDb)
        return {"db": {"url": server.url()}}


class RedisStoreTests(StoreMixin, RedisFixture, TestCase):
    def setUp(self):
        d = self.setUpRedis()
        return d.addCallback(lambda _: StoreMixin.setUp(self))

    def config(self):
        return {"queue": {"backend": "redis"},
                "redis": {"url": REDIS_URL, "prefix": self.prefix}}

    async def test_expires(self):
        """A record expires by itself; its name leaves the set when found so."""
        await self.store.beat("a@h1", {"seen": 1000.0}, 0.05)
        ttl = await self.redis.execute("PTTL", self.key("cluster:daemon:a@h1"))
        self.assertTrue(0 < int(ttl) <= 50)
        await self.redis.execute("DEL", self.key("cluster:daemon:a@h1"))
        self.assertEqual(await self.store.daemons(), {})
        self.assertEqual(await self.redis.execute(
            "SCARD", self.key("cluster:daemons")), 0)


class LedgerUrlStoreTests(TestCase):
    """Beside a STOMP broker, the store is [ledger] url's, opened by it."""

    async def test_onLedgerUrl(self):
        path = os.path.abspath(self.mktemp())
        config = snqconfig.parse({"queue": {"backend": "stomp"},
                                  "ledger": {"url": f"sqlite:///{path}"}})
        store = makeStore(config)
        self.assertTrue(store.owns)
        await store.open()
        try:
            await store.put(pauseKey("site", "ex"), {})
            self.assertEqual(list(await store.settings()), ["pause:site:ex"])
        finally:
            await store.close()


class FakeReloader:
    def __init__(self):
        self.asked = []

    def reload(self, reason):
        d = defer.Deferred()
        self.asked.append((reason, d))
        return d


class FakeTracker:
    def summary(self):
        return {"workers": [{"id": "w.0", "pid": 7, "state": "running",
                             "handled": 3, "errors": 1, "activity": "idle"}],
                "totals": {"handled": 3, "error": 1}, "transports": {},
                "sites": {"default": {"handled": 3}}}


class RegistryServiceTests(TestCase):
    """The master's heartbeats, on a Clock and a real SQLite store."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        path = os.path.abspath(self.mktemp())
        self.config = snqconfig.parseText(
            b'[db]\nurl = "sqlite:///' + path.encode() + b'"\n'
            b'[cluster]\nheartbeat = 2\nstale = 6\n', "snq.toml")
        self.queue = makeQueue(self.config, self.clock)
        yield self.queue.open()
        self.addCleanup(self.queue.close)
        self.store = makeStore(self.config, self.queue, self.clock)
        self.reloader = FakeReloader()
        self.service = RegistryService(self.config, FakeTracker(), self.reloader,
                                       self.clock, store=self.store)

    async def advance(self, seconds):
        """The Clock on, and the heartbeat that started meanwhile over."""
        self.clock.advance(seconds)
        await self.service.beating

    async def test_heartbeats(self):
        self.service.startService()
        await self.service.beating
        name = daemonName(self.config)
        record = (await self.store.daemons())[name]
        self.assertEqual((record["pid"], record["seen"], record["state"],
                          record["generation"], record["digest"]),
                         (os.getpid(), 1000.0, "running", 1,
                          digest(self.config)))
        self.assertEqual(record["workers"], [{
            "id": "w.0", "role": None, "pid": 7, "state": "running",
            "uptime": None, "handled": 3, "errors": 1, "inflight": None,
            "rss": None, "claims_failing": None, "claim_error": None}])
        await self.store.put(pauseKey("site", "ex"), {})
        await self.advance(2)
        self.assertEqual((await self.store.daemons())[name]["seen"], 1002.0)
        # What the dashboard shows: the cluster as this heartbeat read it.
        shown = self.service.view()
        self.assertEqual(([r["name"] for r in shown["daemons"]],
                          shown["daemons"][0]["liveness"], shown["paused"]),
                         ([name], "live", {"transports": [], "sites": ["ex"]}))
        await self.service.stopService()
        record = (await self.store.daemons())[name]
        self.assertEqual((record["state"], liveness(record, 1003, 6)),
                         ("stopped", "stopped"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def test_reload(self):
        """A reload asked before the start is not this daemon's; a later one is."""
        await self.store.put(RELOAD, {"nonce": "old"})
        self.service.startService()
        await self.service.beating
        await self.advance(2)
        self.assertEqual(self.reloader.asked, [])
        await self.store.put(RELOAD, {"nonce": "new"})
        await self.advance(2)
        self.assertEqual([r for r, _ in self.reloader.asked],
                         ["snqctl reload --cluster"])
        name = daemonName(self.config)
        self.assertEqual((await self.store.daemons())[name]["reload"],
                         {"nonce": "new", "running": True})
        result = {"generation": 2, "source": "snq.toml", "changes": [],
                  "applied": [], "failed": []}
        self.reloader.asked[0][1].callback(result)
        # Written at once, not a heartbeat later.
        self.assertEqual((await self.store.daemons())[name]["reload"],
                         {"nonce": "new", "result": result})
        await self.advance(2)
        self.assertEqual(len(self.reloader.asked), 1)
        await self.service.stopService()

    async def test_reconfigured(self):
        """A reloaded heartbeat applies at once; the generation follows."""
        self.service.startService()
        await self.service.beating
        new = dataclasses.replace(
            self.config, generation=2,
            cluster=dataclasses.replace(self.config.cluster, heartbeat=4.0))
        self.assertEqual(self.service.reconfigService(new),
                         ["cluster: heartbeat every 4 s"])
        await self.advance(2)
        name = daemonName(self.config)
        self.assertEqual((await self.store.daemons())[name]["seen"], 1000.0)
        await self.advance(2)
        record = (await self.store.daemons())[name]
        self.assertEqual((record["seen"], record["generation"]), (1004.0, 2))
        self.assertEqual(self.service.reconfigService(new), [])
        await self.service.stopService()

    async def test_downAtStart(self):
        """The daemon starts anyway; it registers once the store answers."""
        await self.queue.close()
        self.service.startService()
        await self.service.beating
        self.assertIsNone(self.service.view())
        await self.queue.open()
        await self.advance(2)
        self.assertEqual(list(await self.store.daemons()),
                         [daemonName(self.config)])
        await self.service.stopService()

    async def test_storeDown(self):
        """A failing heartbeat is said once, and the next ones go on."""
        self.service.startService()
        await self.service.beating
        await self.queue.close()
        await self.advance(2)
        await self.advance(2)
        await self.queue.open()
        await self.advance(2)
        self.assertEqual(
            (await self.store.daemons())[daemonName(self.config)]["seen"], 1006.0)
        await self.service.stopService()
        self.flushLoggedErrors()


class PauseWatchTests(TestCase):
    timeout = 30

    async def test_follows(self):
        clock = Clock()
        path = os.path.abspath(self.mktemp())
        config = snqconfig.parse({"db": {"url": f"sqlite:///{path}"},
                                  "cluster": {"heartbeat": 1.0, "stale": 3.0}})
        queue = makeQueue(config, clock)
        await queue.open()
        self.addCleanup(queue.close)
        store = makeStore(config, queue, clock)
        await store.put(pauseKey("transport", "log"), {})
        seen = []
        watch = PauseWatch(config, queue, seen.append, clock)
        # The first look is over when the start is.
        await watch.startService()
        self.assertEqual(seen, [Pauses(frozenset({"log"}))])
        clock.advance(1)
        await watch.looking
        self.assertEqual(len(seen), 1)
        await store.remove(pauseKey("transport", "log"))
        await store.put(pauseKey("site", "ex"), {})
        clock.advance(1)
        await watch.looking
        self.assertEqual(seen[-1], Pauses(sites=frozenset({"ex"})))
        await watch.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])


class HeldBackTests(SynchronousTestCase):
    """A paused item that was taken goes back uncharged, a heartbeat later."""

    def test_putBack(self):
        clock = Clock()
        clock.advance(1000)
        config = snqconfig.parse({
                                  "cluster": {"heartbeat": 4.0}})
        queue = MemoryQueue(clock)
        dispatcher = Dispatcher(queue, HandlerRegistry.load(config.handlers),
                                config, clock=clock)
        dispatcher.pauses = Pauses(sites=frozenset({"ex"}))
        item = Item(transport="log", payload={}, site="ex", attempts=2)
        queue.put(item.toJSON(), "log", "ex", attempts=2)
        [delivery] = self.successResultOf(queue.claim(10, TransportFilter()))
        self.successResultOf(dispatcher.dispatch(delivery))
        [row] = queue.rows.values()
        self.assertEqual((row["attempts"], row["run_at"], row["error"]),
                         (2, 1004.0, "paused"))
        self.assertEqual(dispatcher.stats.totals().get("handled", 0), 0)


class ClusterCheckTests(TestCase):
    """C{snqctl check --cluster}'s judgement, on records written by hand."""

    timeout = 30

    async def setUp(self):
        self.path = os.path.abspath(self.mktemp())
        with open(self.path + ".toml", "w") as f:
            f.write(f'[db]\nurl = "sqlite:///{self.path}"\n'
                    '[cluster]\nheartbeat = 1\nstale = 10\n')
        self.config = snqconfig.load(self.path + ".toml")
        self.queue = makeQueue(self.config, reactor)
        await self.queue.open()
        self.addCleanup(self.queue.close)
        self.store = makeStore(self.config, self.queue, reactor)

    async def daemon(self, name, age=0.0, digest="d1", state="running",
                     failing=0.0):
        await self.store.beat(name, {
            "name": name, "seen": time.time() - age, "state": state,
            "digest": digest, "generation": 1,
            "workers": [{"id": f"{name}.0", "role": "current",
                         "state": "running", "claims_failing": failing,
                         "claim_error": "boom"}]}, 60)

    async def check(self, *args):
        from snq.monitor import check
        from snq.scripts.snqctl import parser

        out = io.StringIO()
        code = await check.run(parser().parse_args(
            ["-c", self.path + ".toml", "check", "--cluster", *args]),
            reactor, out)
        return code, out.getvalue()

    async def test_ok(self):
        await self.daemon("a@h1")
        await self.daemon("b@h2", age=5)
        await self.daemon("c@h3", age=100, state="stopped")
        code, line = await self.check("--min-daemons", "2")
        self.assertEqual(code, 0, line)
        self.assertIn("2 daemons live", line)
        self.assertIn("daemons=2;;2:;0;3", line)
        self.assertIn("2/2 workers running", line)

    async def test_tooFew(self):
        await self.daemon("a@h1")
        code, line = await self.check("--min-daemons", "2")
        self.assertEqual(code, 2, line)
        self.assertIn("1 daemons live (CRITICAL, range 2:)", line)

    async def test_staleAndDiffering(self):
        await self.daemon("a@h1")
        await self.daemon("b@h2", digest="d2")
        await self.daemon("c@h3", age=30)
        code, line = await self.check()
        self.assertEqual(code, 1, line)
        self.assertIn("c@h3 silent for 30 s (WARNING)", line)
        self.assertIn("configs differ: d1 on a@h1 (generation 1); d2 on b@h2 "
                      "(generation 1) (WARNING)", line)
        self.assertIn("stale=1;1;;0;", line)

    async def test_claimsFailing(self):
        await self.daemon("a@h1", failing=12)
        code, line = await self.check()
        self.assertEqual(code, 2, line)
        self.assertIn("a@h1.0 cannot claim for 12 s: boom (CRITICAL)", line)

    async def test_noRegistry(self):
        with open(self.path + ".toml", "w") as f:
            f.write('[queue]\nbackend = "stomp"\n')
        code, line = await self.check()
        self.assertEqual(code, 3, line)
        self.assertIn("set [ledger] url", line)


class ClusterCommandTests(TestCase):
    """snqctl's cluster commands on records written by hand, no daemon."""

    timeout = 30

    async def setUp(self):
        path = os.path.abspath(self.mktemp())
        self.toml = path + ".toml"
        with open(self.toml, "w") as f:
            f.write(f'[db]\nurl = "sqlite:///{path}"\n'
                    '[cluster]\nheartbeat = 1\nstale = 10\n')
        config = snqconfig.load(self.toml)
        self.queue = makeQueue(config, reactor)
        await self.queue.open()
        self.addCleanup(self.queue.close)
        self.store = makeStore(config, self.queue, reactor)

    async def snqctl(self, *argv):
        from snq.scripts import snqctl

        out = io.StringIO()
        await snqctl.run(reactor, snqctl.parser().parse_args(
            ["-c", self.toml, *argv]), out=out)
        return out.getvalue()

    async def test_status(self):
        now = time.time()
        await self.store.beat("a@h1", {
            "name": "a@h1", "pid": 11, "seen": now, "started": now - 65,
            "generation": 2, "digest": "d1",
            "workers": [{"id": "a.0", "pid": 12, "state": "running",
                         "uptime": 64, "handled": 7, "errors": 1}]}, 60)
        await self.store.beat("b@h2", {"name": "b@h2", "pid": 21,
                                       "seen": now - 30, "state": "running"}, 60)
        await self.snqctl("pause", "--site", "ex")
        lines = (await self.snqctl("status", "--cluster")).splitlines()
        self.assertIn("1 daemons live, 1 gone", lines[0])
        self.assertEqual(lines[1], "paused: site ex")
        self.assertEqual(lines[2].split(), ["daemon", "pid", "state", "heartbeat",
                                            "uptime", "handled", "errors",
                                            "config"])
        self.assertEqual(lines[3].split()[:3] + lines[3].split()[-4:],
                         ["a@h1", "11", "live", "7", "1", "2", "d1"])
        self.assertEqual(lines[4].split(), ["a.0", "12", "running", "0:01:04",
                                            "7", "1"])
        self.assertEqual(lines[5].split()[:4], ["b@h2", "21", "gone", "(stale)"])

    async def test_pauseResume(self):
        from snq.scripts.snqctl import CommandError

        out = await self.snqctl("pause", "webhook")
        self.assertEqual(out, "transport webhook paused on every daemon of the "
                              "cluster (within 1 s)\n")
        setting = (await self.store.settings())["pause:transport:webhook"]
        self.assertEqual(sorted(setting), ["by", "since"])
        self.assertEqual(await self.snqctl("resume", "webhook"),
                         "transport webhook resumed\n")
        with self.assertRaises(CommandError) as e:
            await self.snqctl("resume", "webhook")
        self.assertIn("was not paused", str(e.exception))

    async def test_reloadUnanswered(self):
        """A daemon that does not answer in time, or none live at all: status 1."""
        from snq.scripts.snqctl import CommandError

        with self.assertRaises(CommandError) as e:
            await self.snqctl("reload", "--cluster")
        self.assertIn("no daemon is live", str(e.exception))
        await self.store.beat("a@h1", {"name": "a@h1", "seen": time.time()}, 60)
        with self.assertRaises(CommandError) as e:
            await self.snqctl("reload", "--cluster", "--wait", "0.3")
        self.assertIn("not done on a@h1", str(e.exception))
        self.assertIn("reload", await self.store.settings())
