# -*- test-case-name: tests.test_snmp -*-
"""
The SNMP agent's logic without snmpd: the objects made from a real
tracker's summary, their order across the tables, the pass_persist
dialogue on a StringTransport, the one-second cache and the timeout on a
Clock, and the master asked over a socket nobody listens on.
"""

import json
import os

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from snq import config as snqconfig
from snq.monitor import master, snmp
from snq.monitor.tracker import Tracker
from snq.queues.interface import Depth, TransportDepth
from tests.daemon import socketPath
from tests.test_monitor import FakePool, FakeProcess, report, row

BASE = (1, 3, 6, 1, 4, 1, 8072, 9999, 9999, 767)


def name(text):
    return (len(text), *text.encode())


def makeStatus(depth=None):
    """What C{Status} answers (through JSON, as over AMP) for two workers."""
    clock = Clock()
    pool = FakePool()
    pool.rows = [row("generic.0", 11, rss=3 * 2**20, inflight=2, restarts=1),
                 row("generic.0", 12, state="starting", role="replacement"),
                 row("generic.1", None, state="waiting", restarts=4)]
    pool.rows[2]["uptime"] = None
    tracker = Tracker(pool, clock)
    tracker.workerReported(FakeProcess("generic.0"), report(
        [("handled", "webhook", "s", 7), ("error", "webhook", "s", 2),
         ("deadletter", "webhook", "s", 1), ("handled", "log", "s", 3)]))
    tracker.depth = depth
    status = {"pid": 4242, "uptime": 3725.25, "restarting": False,
              "workers": pool.status(), "monitor": tracker.summary(),
              "config": {"generation": 3, "loaded": 0, "source": None}}
    return json.loads(json.dumps(status))


class ValueTests(SynchronousTestCase):
    def test_types(self):
        self.assertEqual(snmp.counter64(2**64 + 5), ("counter64", "5"))
        self.assertEqual(snmp.gauge(2**40), ("gauge", str(2**32 - 1)),
                         "a gauge sticks at its maximum")
        self.assertEqual(snmp.gauge(-1), ("gauge", "0"))
        self.assertEqual(snmp.timeticks(12.345), ("timeticks", "1234"))
        self.assertEqual(snmp.timeticks(2**32 / 100 + 1), ("timeticks", "100"),
                         "wraps as sysUpTime does")
        self.assertEqual(snmp.integer(3), ("integer", "3"))
        self.assertEqual(snmp.string("a\nb\tc"), ("string", "a?b?c"),
                         "one line: a line break would end the answer")

    def test_oids(self):
        self.assertEqual(snmp.parseOid(".1.3.6.1"), (1, 3, 6, 1))
        self.assertEqual(snmp.parseOid("1.3.6.1\n"), (1, 3, 6, 1))
        for bad in ("", ".", "1..3", "1.x", "1.-3", "1.+3", "iso.3"):
            self.assertRaises(ValueError, snmp.parseOid, bad)
        self.assertEqual(snmp.formatOid((1, 3, 6)), ".1.3.6")

    def test_nameIndex(self):
        self.assertEqual(snmp.nameIndex("ab"), (2, 97, 98))
        self.assertEqual(snmp.nameIndex("é"), (2, 0xC3, 0xA9), "UTF-8 octets")
        self.assertIsNone(snmp.nameIndex(""))
        self.assertIsNone(snmp.nameIndex("x" * 65), "SIZE (1..64)")
        self.assertEqual(len(snmp.nameIndex("x" * 64)), 65)


class ObjectsTests(SynchronousTestCase):
    def test_daemonQueueWorkersTransports(self):
        depth = Depth.byTransport({
            "webhook": TransportDepth(ready=4, delayed=1, held=2, oldest=9.7),
            "later": TransportDepth(ready=0, delayed=5, held=0, oldest=None)},
            dead=6)
        found = snmp.objects(snmp.UP, makeStatus(depth))
        g0, g1 = name("generic.0"), name("generic.1")
        webhook, log, later = name("webhook"), name("log"), name("later")
        self.assertEqual(found, {
            (1, 1, 1, 0): ("integer", "1"),
            (1, 1, 2, 0): ("timeticks", "372525"),
            (1, 1, 3, 0): ("integer", "4242"),
            (1, 1, 4, 0): ("gauge", "3"),
            (1, 1, 5, 0): ("gauge", "2"),
            (1, 1, 6, 0): ("gauge", "1"),
            (1, 2, 1, 0): ("gauge", "4"),
            (1, 2, 2, 0): ("gauge", "6"),
            (1, 2, 3, 0): ("gauge", "2"),
            (1, 2, 4, 0): ("gauge", "6"),
            (1, 2, 5, 0): ("gauge", "9"),
            # generic.0 runs; the replacement being started is left out.
            (1, 3, 1, 2, *g0): ("integer", "11"),
            (1, 3, 1, 3, *g0): ("string", "running"),
            (1, 3, 1, 4, *g0): ("timeticks", "500"),
            (1, 3, 1, 5, *g0): ("counter64", "10"),
            (1, 3, 1, 6, *g0): ("counter64", "2"),
            (1, 3, 1, 7, *g0): ("gauge", "3072"),
            (1, 3, 1, 8, *g0): ("counter64", "1"),
            (1, 3, 1, 9, *g0): ("gauge", "2"),
            # generic.1 has no process: no memory to tell.
            (1, 3, 1, 2, *g1): ("integer", "0"),
            (1, 3, 1, 3, *g1): ("string", "waiting"),
            (1, 3, 1, 4, *g1): ("timeticks", "0"),
            (1, 3, 1, 5, *g1): ("counter64", "0"),
            (1, 3, 1, 6, *g1): ("counter64", "0"),
            (1, 3, 1, 8, *g1): ("counter64", "4"),
            (1, 3, 1, 9, *g1): ("gauge", "0"),
            (1, 4, 1, 2, *webhook): ("counter64", "7"),
            (1, 4, 1, 3, *webhook): ("counter64", "2"),
            (1, 4, 1, 4, *webhook): ("counter64", "1"),
            (1, 4, 1, 5, *webhook): ("gauge", "7"),
            (1, 4, 1, 6, *webhook): ("gauge", "9"),
            # Counted, nothing waiting.
            (1, 4, 1, 2, *log): ("counter64", "3"),
            (1, 4, 1, 3, *log): ("counter64", "0"),
            (1, 4, 1, 4, *log): ("counter64", "0"),
            (1, 4, 1, 5, *log): ("gauge", "0"),
            (1, 4, 1, 6, *log): ("gauge", "0"),
            # Waiting, never counted.
            (1, 4, 1, 2, *later): ("counter64", "0"),
            (1, 4, 1, 3, *later): ("counter64", "0"),
            (1, 4, 1, 4, *later): ("counter64", "0"),
            (1, 4, 1, 5, *later): ("gauge", "5"),
            (1, 4, 1, 6, *later): ("gauge", "0"),
        })

    def test_backendThatCannotCount(self):
        """No depth: no queue objects, no waiting columns (Redis, STOMP)."""
        found = snmp.objects(snmp.UP, makeStatus(depth=None))
        self.assertFalse([oid for oid in found if oid[:2] == (1, 2)])
        webhook = [oid[3] for oid in found if oid[:3] == (1, 4, 1)
                   and oid[4:] == name("webhook")]
        self.assertEqual(webhook, [2, 3, 4])

    def test_depthNotByTransport(self):
        """Redis counts the whole queue, not each transport."""
        depth = Depth(ready=1, delayed=0, held=0, dead=0, oldest=2.0)
        found = snmp.objects(snmp.UP, makeStatus(depth))
        self.assertEqual(found[(1, 2, 1, 0)], ("gauge", "1"))
        self.assertNotIn((1, 4, 1, 5, *name("webhook")), found)

    def test_notUp(self):
        for health in (snmp.DOWN, snmp.UNKNOWN):
            self.assertEqual(snmp.objects(health, None), {
                (1, 1, 1, 0): ("integer", str(health)),
                (1, 1, 2, 0): ("timeticks", "0"),
                (1, 1, 6, 0): ("gauge", "0")})


class ViewTests(SynchronousTestCase):
    def setUp(self):
        depth = Depth.byTransport(
            {"webhook": TransportDepth(ready=1, delayed=0, held=0, oldest=1.0)},
            dead=0)
        self.view = snmp.View(BASE, snmp.objects(snmp.UP, makeStatus(depth)))

    def walk(self, start):
        oids = []
        found = self.view.next(start)
        while found is not None:
            oids.append(found[0][len(BASE):])
            found = self.view.next(found[0])
        return oids

    def test_walkOrder(self):
        """Column by column, rows by index: shorter names first."""
        oids = self.walk(BASE)
        self.assertEqual(oids, sorted(oids))
        self.assertEqual(oids[:6], [(1, 1, n, 0) for n in range(1, 7)])
        self.assertEqual(oids[6:11], [(1, 2, n, 0) for n in range(1, 6)])
        g0, g1 = name("generic.0"), name("generic.1")
        self.assertEqual(oids[11:14], [(1, 3, 1, 2, *g0), (1, 3, 1, 2, *g1),
                                       (1, 3, 1, 3, *g0)])
        log, webhook = name("log"), name("webhook")
        transports = [oid for oid in oids if oid[:3] == (1, 4, 1)]
        self.assertEqual(transports[:3], [(1, 4, 1, 2, *log),
                                          (1, 4, 1, 2, *webhook),
                                          (1, 4, 1, 3, *log)])
        self.assertEqual(oids[-1], (1, 4, 1, 6, *webhook))

    def test_nextAcrossTables(self):
        """From an OID that is not there: the next that is."""
        def after(*suffix):
            found = self.view.next((*BASE, *suffix))
            return found and found[0][len(BASE):]

        self.assertEqual(after(), (1, 1, 1, 0))
        self.assertEqual(after(0), (1, 1, 1, 0))
        self.assertEqual(after(1, 1, 6, 0), (1, 2, 1, 0))
        self.assertEqual(after(1, 2, 5, 0), (1, 3, 1, 2, *name("generic.0")))
        self.assertEqual(after(1, 3), (1, 3, 1, 2, *name("generic.0")))
        self.assertEqual(after(1, 3, 1, 9, *name("generic.1")),
                         (1, 4, 1, 2, *name("log")))
        self.assertEqual(after(1, 3, 1, 9, 200), (1, 4, 1, 2, *name("log")))
        self.assertIsNone(after(1, 4, 1, 6, *name("webhook")))
        self.assertIsNone(after(2))
        self.assertEqual(self.view.next((1, 3))[0], (*BASE, 1, 1, 1, 0),
                         "before the base: the first object")

    def test_get(self):
        self.assertEqual(self.view.get((*BASE, 1, 1, 3, 0)),
                         ((*BASE, 1, 1, 3, 0), ("integer", "4242")))
        self.assertIsNone(self.view.get((*BASE, 1, 1, 3)))
        self.assertIsNone(self.view.get((*BASE, 1, 1, 7, 0)))


class FakeMaster:
    """The L{snmp.Agent}'s C{ask}: answers as told, counts the questions."""

    def __init__(self):
        self.asked = 0
        self.answer = None
        self.pending = []

    def ask(self):
        self.asked += 1
        if isinstance(self.answer, Exception):
            return defer.fail(self.answer)
        if self.answer is None:
            d = defer.Deferred(lambda d: self.pending.remove(d))
            self.pending.append(d)
            return d
        return defer.succeed(self.answer)


class PassPersistTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.master = FakeMaster()
        self.master.answer = makeStatus()
        self.agent = snmp.Agent(self.master.ask, BASE, self.clock, timeout=2.0)
        self.protocol = snmp.PassPersist(self.agent)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def say(self, *lines):
        self.transport.clear()
        for line in lines:
            self.protocol.dataReceived(line.encode() + b"\n")
        return self.transport.value().decode().splitlines()

    def test_ping(self):
        self.assertEqual(self.say("PING"), ["PONG"])

    def test_get(self):
        oid = snmp.formatOid((*BASE, 1, 1, 3, 0))
        self.assertEqual(self.say("get", oid), [oid, "integer", "4242"])
        self.assertEqual(self.say("get", snmp.formatOid((*BASE, 1, 1, 3))),
                         ["NONE"])
        self.assertEqual(self.say("get", ".1.3.6.1.2.1.1.3.0"), ["NONE"])
        self.assertEqual(self.say("get", "not an oid"), ["NONE"])

    def test_getnext(self):
        self.assertEqual(self.say("getnext", snmp.formatOid(BASE)), [
            snmp.formatOid((*BASE, 1, 1, 1, 0)), "integer", "1"])
        last = max(snmp.View(BASE, snmp.objects(snmp.UP, makeStatus())).order)
        self.assertEqual(self.say("getnext", snmp.formatOid(last)), ["NONE"])

    def test_types(self):
        """Counter64 totals, Gauge32 current values, strings, time ticks."""
        g0 = name("generic.0")
        answers = {column: self.say("get", snmp.formatOid(
            (*BASE, 1, 3, 1, column, *g0)))[1:] for column in (3, 4, 5, 7)}
        self.assertEqual(answers, {3: ["string", "running"],
                                   4: ["timeticks", "500"],
                                   5: ["counter64", "10"],
                                   7: ["gauge", "3072"]})

    def test_setIsRefused(self):
        oid = snmp.formatOid((*BASE, 1, 1, 1, 0))
        self.assertEqual(self.say("set", oid, "integer 2"), ["not-writable"])
        self.assertEqual(self.say("PING"), ["PONG"], "the value was read")

    def test_unknownCommand(self):
        self.assertEqual(self.say("walk"), ["NONE"])
        self.assertEqual(self.say("PING"), ["PONG"], "still in step")

    def test_cachedForASecond(self):
        oid = snmp.formatOid((*BASE, 1, 1, 3, 0))
        self.say("get", oid)
        self.say("getnext", oid)
        self.assertEqual(self.master.asked, 1)
        self.master.answer = dict(self.master.answer, pid=4343)
        self.clock.advance(0.9)
        self.assertEqual(self.say("get", oid)[2], "4242")
        self.clock.advance(0.1)
        self.assertEqual(self.say("get", oid)[2], "4343")
        self.assertEqual(self.master.asked, 2)

    def test_downAndBack(self):
        status = snmp.formatOid((*BASE, 1, 1, 1, 0))
        uptime = snmp.formatOid((*BASE, 1, 1, 2, 0))
        self.master.answer = master.NotRunning("no snq daemon answers on x")
        self.assertEqual(self.say("get", status), [status, "integer", "2"])
        self.assertEqual(self.say("get", uptime), [uptime, "timeticks", "0"])
        self.assertEqual(self.say("get", snmp.formatOid((*BASE, 1, 1, 3, 0))),
                         ["NONE"])
        self.master.answer = makeStatus()
        self.clock.advance(1)
        self.assertEqual(self.say("get", status), [status, "integer", "1"])
        self.master.answer = master.Unreachable("permission denied")
        self.clock.advance(1)
        self.assertEqual(self.say("get", status), [status, "integer", "3"])

    def test_noAnswerInTime(self):
        """A master that does not answer: unknown after the timeout."""
        self.master.answer = None
        status = snmp.formatOid((*BASE, 1, 1, 1, 0))
        self.assertEqual(self.say("get", status, "PING"), [])
        self.clock.advance(2)
        self.assertEqual(self.transport.value().decode().splitlines(),
                         [status, "integer", "3", "PONG"],
                         "answered in order")
        self.assertEqual(self.master.pending, [], "the question was cancelled")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_endsAfterAnswering(self):
        """An empty line (or the end of input) ends it, once all is answered."""
        self.master.answer = None
        self.say("get", snmp.formatOid((*BASE, 1, 1, 1, 0)), "")
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(self.transport.disconnecting)
        self.protocol.connectionLost(None)
        self.successResultOf(self.protocol.done)

    def test_aFailureStillAnswers(self):
        """snmpd waits for an answer, whatever happens."""
        self.master.answer = {"garbage": True}
        self.assertEqual(self.say("get", snmp.formatOid((*BASE, 1, 1, 1, 0))),
                         ["NONE"])
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)


class ConfigTests(SynchronousTestCase):
    def test_default(self):
        self.assertEqual(snqconfig.Config().monitor.snmp_base_oid,
                         snmp.formatOid(BASE))

    def test_invalid(self):
        e = self.assertRaises(snqconfig.ConfigError, snqconfig.parse, {
            "monitor": {"snmp_base_oid": "NET-SNMP-MIB::netSnmpPlaypen"}},
            "snq.toml")
        self.assertEqual(e.problems, [
            'snq.toml: monitor.snmp_base_oid: expected a numeric OID such as '
            '".1.3.6.1.4.1.8072.9999.9999.767", got '
            "'NET-SNMP-MIB::netSnmpPlaypen'"])


class AskMasterTests(TestCase):
    def test_noSocket(self):
        path = socketPath(self)
        d = master.askStatus(path, reactor)
        return self.assertFailure(d, master.NotRunning)

    @defer.inlineCallbacks
    def test_staleSocket(self):
        """A socket file a dead master left: refused, so down too."""
        import socket

        path = socketPath(self)
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.close()
        self.assertTrue(os.path.exists(path))
        e = yield self.assertFailure(master.askStatus(path, reactor),
                                     master.NotRunning)
        self.assertIn("no snq daemon answers on", str(e))
