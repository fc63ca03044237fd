# -*- test-case-name: tests.test_reload_worker -*-
"""
Reloading in a worker: L{IoMaster.reconfigService} and the parts it
reconfigures (dispatcher, queue manager, memory watch, XMPP accounts) on a
Clock with an in-memory queue; the worker process answering the master's
L{Reconfigure} over AMP; the SQL claim of a C{--site} worker.
"""

import dataclasses
import json

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase, TestCase

from snq import config as snqconfig
from snq.amp import EXIT_RECYCLE, Channel, ControlError, Reconfigure, RequestReload
from snq.child import Worker, check
from snq.handlers import HandlerError, QueueHandler
from snq.iomaster import IoMaster
from snq.item import Item
from snq.ledger.memory import MemoryLedger
from snq.queues.db import DbQueue
from snq.queues.memory import MemoryQueue
from snq.routing import TransportFilter
from tests.test_child import FakeReactor, Master, PipeTransport


class Held(QueueHandler):
    """Runs until the test fires its Deferred; remembers being stopped."""

    transport = "held"
    pending: list = []
    stopped: list = []

    def handle(self, item):
        d = defer.Deferred()
        self.pending.append((item, d))
        return d

    def stop(self):
        self.stopped.append(self)


class Quick(QueueHandler):
    transport = "quick"
    done: list = []

    def handle(self, item):
        self.done.append((type(self).__name__, item.site, item.payload))


class Quicker(Quick):
    pass


def parse(**sections):
    return snqconfig.parse(sections, "snq.toml")


def toml(config: dict) -> str:
    """Just enough TOML for these tests' configs."""
    lines = []
    for section, table in config.items():
        for key, value in table.items():
            if isinstance(value, dict):
                lines.append(f"[{section}.{key}]")
                lines += [f"{k} = {json.dumps(v)}" for k, v in value.items()]
            else:
                lines.insert(0, f"{section}.{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


class WorkerTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.queue = MemoryQueue(self.clock)
        Held.pending, Held.stopped, Quick.done = [], [], []

    def start(self, config, recycle=None, **kw):
        self.master = IoMaster(config, clock=self.clock, queue=self.queue,
                               recycle=recycle, **kw)
        self.successResultOf(self.master.startService())
        self.addCleanup(self.stop)
        return self.master

    def stop(self):
        for _, d in Held.pending:
            if not d.called:
                d.callback(None)
        self.successResultOf(self.master.stopService())

    def reconfigure(self, config):
        return self.successResultOf(self.master.reconfigService(config))

    def put(self, transport, payload=None, site="default"):
        self.queue.enqueue([Item(transport=transport, payload=payload, site=site)])
        self.master.manager.wake()
        self.clock.advance(0)

    def dead(self):
        return [(d.reason, d.error) for d in self.queue.dead.values()]


HANDLERS = {"held": f"{__name__}:Held", "quick": f"{__name__}:Quick"}


class DispatcherTests(WorkerTestCase):
    def test_handlerAddedReplacedRemoved(self):
        self.start(parse(handlers={"held": HANDLERS["held"]}))
        self.put("quick", 1)
        self.assertEqual(self.dead(), [("badhandler",
                                        "no handler for transport 'quick'")])
        self.put("held", 1)
        [(_, running)] = Held.pending
        oldHeld = self.master.dispatcher.handlers["held"]

        applied = self.reconfigure(parse(handlers=HANDLERS))
        self.assertEqual(applied, ["handler quick added"])
        self.assertIs(self.master.dispatcher.handlers["held"], oldHeld, "kept")
        self.put("quick", 2)
        self.assertEqual(Quick.done, [("Quick", "default", 2)])

        applied = self.reconfigure(parse(handlers={
            "quick": f"{__name__}:Quicker"}))
        self.assertEqual(applied, ["handler held removed",
                                   "handler quick replaced"])
        self.assertEqual(Held.stopped, [], "not while its item runs")
        running.callback(None)
        self.assertEqual(Held.stopped, [oldHeld])
        self.assertEqual(self.master.stats.total("handled"), 2)
        self.put("quick", 3)
        self.put("held", 4)
        self.assertEqual(Quick.done[-1], ("Quicker", "default", 3))
        self.assertEqual(self.dead()[-1], ("badhandler",
                                           "no handler for transport 'held'"))

    def test_unknownSiteWaitsUntilConfigured(self):
        """The usual case while a reload adding a site spreads."""
        self.start(parse(handlers=HANDLERS, sites={"a": {}}))
        self.put("quick", 1, site="b")
        self.assertEqual(self.dead(), [])
        [row] = self.queue.rows.values()
        self.assertEqual((row["attempts"], row["error"]),
                         (1, "unknown site 'b' (not under [sites])"))
        self.assertEqual(self.master.stats.total("error"), 0,
                         "no handler failed")
        self.reconfigure(parse(handlers=HANDLERS, sites={"a": {}, "b": {"x": 1}}))
        self.put("quick", 2, site="b")
        self.clock.advance(1)
        self.assertEqual(sorted(Quick.done), [("Quick", "b", 1), ("Quick", "b", 2)])
        self.assertEqual(self.master.dispatcher.context.siteConfig("b"), {"x": 1})

    def test_unknownSiteDeadLetteredWhenItsRetriesRunOut(self):
        self.start(parse(handlers=HANDLERS, sites={"a": {}},
                         queue={"max_retries": 2}))
        self.put("quick", 1, site="b")
        self.clock.pump([3600] * 3)
        self.assertEqual(self.dead(), [("badsite", "gave up after 3 attempts; "
                                        "last error: unknown site 'b' (not "
                                        "under [sites])")])
        self.assertEqual(self.master.stats.counts["badsite", "quick", "b"], 1)
        self.assertEqual(self.master.stats.total("deadletter"), 1)

    def test_defaultSiteAloneAcceptsEverySite(self):
        self.start(parse(handlers=HANDLERS, sites={"default": {"x": 1}}))
        self.put("quick", 1, site="anything")
        self.assertEqual(Quick.done, [("Quick", "anything", 1)])

    def test_higherConcurrencyStartsWhatWaits(self):
        self.start(parse(handlers=HANDLERS, queue={"concurrency": 1}))
        for n in range(3):
            self.put("held", n)
        self.assertEqual(len(Held.pending), 1)
        applied = self.reconfigure(parse(handlers=HANDLERS,
                                         queue={"concurrency": 3}))
        self.assertEqual(applied, [])
        self.assertEqual(len(Held.pending), 3)

    def test_perTransportLimitAndRetries(self):
        config = parse(handlers=HANDLERS, transports={"held": {"concurrency": 1}})
        self.start(config)
        self.put("held", 1)
        self.put("held", 2)
        self.assertEqual(len(Held.pending), 1)
        self.reconfigure(parse(handlers=HANDLERS, transports={
            "held": {"concurrency": 2, "max_retries": 0}}))
        self.assertEqual(len(Held.pending), 2)
        Held.pending[0][1].errback(ValueError("no"))
        self.flushLoggedErrors(ValueError)
        self.assertEqual([reason for reason, _ in self.dead()], ["retries"])


class ManagerTests(WorkerTestCase):
    def test_groupChangeClaimsDifferently(self):
        config = parse(handlers=HANDLERS, transports={"held": {"group": "slow"}})
        self.start(config)
        self.put("held", 1)
        self.assertEqual(Held.pending, [], "its group is not consumed")
        applied = self.reconfigure(parse(handlers=HANDLERS, queue={
            "groups": ["main", "slow"]}, transports={"held": {"group": "slow"}}))
        self.assertEqual(applied,
                         ["claiming all transports but xmppconfirm, xmppout"])
        self.clock.advance(0)
        self.assertEqual(len(Held.pending), 1)

    def test_siteWorker(self):
        self.start(parse(handlers=HANDLERS, sites={"a": {}, "b": {}}), site="a")
        self.put("quick", 1, site="b")
        self.put("quick", 2, site="a")
        self.assertEqual(Quick.done, [("Quick", "a", 2)])
        self.assertEqual(self.master.manager.transports.site, "a")

    def test_pollIntervalAndLease(self):
        self.start(parse(handlers=HANDLERS))
        self.reconfigure(parse(handlers=HANDLERS, queue={"poll_interval": 7.0,
                                                         "lease": 30.0}))
        self.assertEqual(self.master.manager.pollInterval, 7.0)
        self.assertEqual(self.master.manager._tender.interval, 10.0)


class MemoryWatchTests(WorkerTestCase):
    def test_limitsFollow(self):
        reasons = []
        self.start(parse(handlers=HANDLERS), recycle=reasons.append)
        for n in range(3):
            self.put("quick", n)
        applied = self.reconfigure(parse(handlers=HANDLERS, queue={
            "max_items": 3, "memory_limit": "1g", "softlimit": "50%"}))
        self.assertEqual(applied, ["soft memory limit 512.0 MB", "max_items 3"])
        self.assertEqual(reasons, ["3 items done (max_items 3)"])
        self.assertTrue(self.master.watch._timer.running)


class XmppTests(SynchronousTestCase):
    def account(self, **extra):
        return {"jid": "bot@example.org", "password": "p", "host": "127.0.0.1",
                "tls": "off", **extra}

    def test_changedAccountReconnectsOthersStay(self):
        reactor = MemoryReactorClock()
        config = parse(xmpp=self.account(), sites={
            "b": {"xmpp": self.account(jid="bot@b.example")}})
        master = IoMaster(config, clock=reactor, queue=MemoryQueue(reactor),
                          role="xmpp")
        master.ledger._ledger = MemoryLedger(reactor)
        self.successResultOf(master.startService())
        managers = dict(master.dispatcher.context.xmppManagers)
        self.assertEqual(len(reactor.tcpClients), 2)
        new = parse(xmpp=self.account(), sites={
            "b": {"xmpp": self.account(jid="bot@b.example", password="new")},
            "c": {"xmpp": self.account(jid="bot@c.example")}})
        d = master.reconfigService(new)
        reactor.advance(0)
        applied = self.successResultOf(d)
        self.assertEqual(applied, ["xmpp b: bot@b.example disconnected",
                                   "xmpp b: bot@b.example connecting",
                                   "xmpp c: bot@c.example connecting"])
        now = master.dispatcher.context.xmppManagers
        self.assertIs(now["default"], managers["default"], "stays connected")
        self.assertIsNot(now["b"], managers["b"])
        self.assertFalse(managers["b"].running)
        self.assertEqual(now["b"].settings.password.reveal(), "new")
        self.assertEqual(len(reactor.tcpClients), 4)
        d = master.reconfigService(parse())
        reactor.advance(0)
        self.assertEqual(self.successResultOf(d)[:3], [
            "xmpp b: bot@b.example disconnected",
            "xmpp c: bot@c.example disconnected",
            "xmpp default: bot@example.org disconnected"])
        self.assertEqual(master.dispatcher.context.xmppManagers, {})
        stopped = master.stopService()
        reactor.advance(30)
        self.successResultOf(stopped)


class SiteClaimTests(TestCase):
    """C{--site} on SQL: the claim filters on the site column."""

    @defer.inlineCallbacks
    def test_claimFiltersBySite(self):
        path = self.mktemp()
        queue = DbQueue(f"sqlite:///{path}", lease=30)
        yield queue.open()
        self.addCleanup(queue.close)
        yield queue.enqueue([Item(transport=t, payload=None, site=s)
                             for t, s in [("a", "x"), ("b", "y"), ("a", "y"),
                                          ("c", "y")]])
        claimed = yield queue.claim(10, TransportFilter(exclude=frozenset({"c"}),
                                                        site="y"))
        self.assertEqual([(d.transport, d.site) for d in claimed],
                         [("b", "y"), ("a", "y")])
        claimed = yield queue.claim(10, TransportFilter(include=frozenset({"a"}),
                                                        site="x"))
        self.assertEqual([(d.transport, d.site) for d in claimed], [("a", "x")])


class WorkerTests(SynchronousTestCase):
    """The worker's end of L{Reconfigure}, over AMP on a StringTransport."""

    def setUp(self):
        self.reactor = FakeReactor()
        self.queue = MemoryQueue(self.reactor)
        Quick.done = []
        self.config = parse(handlers=HANDLERS)

        def iomaster(config, **kw):
            return IoMaster(config, queue=self.queue, **kw)

        self.worker = Worker(dataclasses.replace(self.config, loaded=5.0),
                             "generic.0", self.reactor, iomaster)
        self.transport = PipeTransport(self.worker.channel)
        self.worker.channel.makeConnection(self.transport)
        self.master = Master()
        self.master.makeConnection(StringTransport())

    def send(self, text, generation=2):
        """The master's request; → its Deferred answer."""
        d = self.master.callRemote(Reconfigure, config={
            "text": text, "source": "/etc/snq.toml", "generation": generation,
            "loaded": 9.0})
        # Before the answer comes: AMP drops the connection over an error
        # nobody was waiting for.
        answer = defer.Deferred()
        d.addBoth(answer.callback)
        self.worker.channel.dataReceived(self.master.transport.value())
        self.master.transport.clear()
        self.master.dataReceived(self.transport.value())
        self.transport.clear()
        return answer

    def test_appliedInPlaceAndReported(self):
        self.worker.start()
        self.reactor.advance(0)
        text = toml({"handlers": HANDLERS, "sites": {"a": {"k": 1}}})
        answer = self.successResultOf(self.send(text))
        self.assertEqual(answer["applied"], [])
        self.assertEqual(self.worker.config.sites, {"a": {"k": 1}})
        self.assertEqual(self.worker.snapshot()["config"],
                         {"generation": 2, "loaded": 9.0})
        self.assertEqual(self.reactor.stops, 0)
        self.worker.exit(0, "test")
        self.successResultOf(self.worker.stop())

    def test_aWorkerStillStartingAppliesItOnceStarted(self):
        opened = defer.Deferred()
        self.queue.open = lambda: opened
        self.worker.start()
        d = self.send(toml({"handlers": {"quick": HANDLERS["quick"]}}))
        self.assertNoResult(d)
        opened.callback(None)
        self.master.dataReceived(self.transport.value())
        self.assertEqual(self.successResultOf(d)["applied"],
                         ["handler held removed"])
        self.worker.exit(0, "test")
        self.successResultOf(self.worker.stop())

    def test_failureExitsToBeReplaced(self):
        self.worker.start()
        self.reactor.advance(0)
        d = self.send(toml({"handlers": {"x": "nowhere_at_all:X"}}))
        e = self.failureResultOf(d, ControlError).value
        self.assertEqual(len(self.flushLoggedErrors(HandlerError)), 1)
        self.assertIn("cannot load nowhere_at_all:X", str(e))
        self.assertIn("its replacement starts on the new config", str(e))
        self.assertEqual((self.worker.exitCode, self.reactor.stops),
                         (EXIT_RECYCLE, 1))
        self.assertEqual(self.worker.config.generation, 1)
        self.successResultOf(self.worker.stop())

    def test_requestReload(self):
        received = []

        class Master(Channel):
            @RequestReload.responder
            def requestReload(self, reason):
                received.append(reason)
                return {}

        master = Master()
        master.makeConnection(StringTransport())
        self.worker.requestReload("update:a from the control channel")
        master.dataReceived(self.transport.value())
        self.assertEqual(received, ["update:a from the control channel"])


class CheckTests(SynchronousTestCase):
    """What C{python -m snq.child --check} reports to a reloading master."""

    def test_good(self):
        self.assertEqual(check(toml({"handlers": HANDLERS}).encode(), "f.toml"), [])

    def test_problems(self):
        text = toml({"handlers": {"x": "nowhere_at_all:X"},
                     "queue": {"backend": "stomp", "basename": "/topic/x/"}})
        problems = check(text.encode(), "f.toml")
        self.assertEqual(len(problems), 2)
        self.assertIn("f.toml: handlers.x: cannot load nowhere_at_all:X", problems[0])
        self.assertIn("f.toml: [queue] backend stomp: [queue] basename '/topic/x/'",
                      problems[1])
        self.assertEqual(check(b"x = [", "f.toml")[0][:22], "f.toml: not valid TOML")


class ReconfigureArgumentTests(SynchronousTestCase):
    def test_bigConfigsGoOverAMP(self):
        """A thousand sites is more than one AMP value (64 KiB)."""
        text = toml({"sites": {f"site{n}": {"webhook_url": "https://example."
                                            f"org/{n}/hook"} for n in range(1500)}})
        self.assertGreater(len(text), 65536)
        box = Reconfigure.makeArguments({"config": {"text": text}}, None)
        wire = amp.AmpBox(box).serialize()
        back = Reconfigure.parseArguments(amp.parseString(wire)[0], None)
        self.assertEqual(back["config"]["text"], text)
