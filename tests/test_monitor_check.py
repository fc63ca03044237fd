# -*- test-case-name: tests.test_monitor_check -*-
"""
C{snqctl check}, the Nagios plugin: each exit status under its condition,
against a real SQLite queue and a real control socket (a ControlService on
a made-up pool, in this process).
"""

import io
import os
import shutil
import subprocess
import sys
import tempfile

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from snq import config as snqconfig
from snq.control import ControlService
from snq.item import Item
from snq.monitor.check import Range
from snq.queues.db import DbQueue
from snq.routing import TransportFilter
from snq.scripts import snqctl
from tests.daemon import environ


class FakePool:
    restarting = False
    generation = 1
    loaded = 0.0
    config = snqconfig.Config()

    def __init__(self, states, reports=None):
        self.states = states
        self.reports = reports or {}

    def status(self):
        return [{"id": f"generic.{n}", "role": "current", "state": state,
                 "restarts": 0, "last_exit": None,
                 "report": self.reports.get(n, {})}
                for n, state in enumerate(self.states)]


class CheckTests(TestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.db = os.path.join(self.dir, "snq.sqlite")
        # Short: a UNIX socket's path is limited to about 100 bytes.
        short = tempfile.mkdtemp(prefix="snqcheck")
        self.addCleanup(shutil.rmtree, short)
        self.socket = os.path.join(short, "snq.sock")
        self.config = self.writeConfig(f'[db]\nurl = "sqlite:///{self.db}"\n')

    def writeConfig(self, text, name="snq.toml"):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(f'[daemon]\ncontrol_socket = "{self.socket}"\n' + text)
        return path

    def daemon(self, *states, reports=None):
        control = ControlService(FakePool(states, reports), self.socket, reactor)
        control.startService()
        self.addCleanup(control.stopService)

    @defer.inlineCallbacks
    def fill(self, ready=0, dead=0):
        queue = DbQueue(f"sqlite:///{self.db}", 60.0)
        yield queue.open()
        yield queue.enqueue([Item(transport="t", payload=n)
                             for n in range(ready + dead)])
        if dead:
            for delivery in (yield queue.claim(dead, TransportFilter())):
                yield queue.deadLetter(delivery, "rejected", "no", 1)
        yield queue.close()

    @defer.inlineCallbacks
    def check(self, *argv, config=None):
        """→ (exit status, the line printed)."""
        args = snqctl.parser().parse_args(["-c", config or self.config, "check",
                                           *argv])
        out = io.StringIO()
        try:
            yield snqctl.run(reactor, args, out)
        except SystemExit as e:
            lines = out.getvalue().splitlines()
            self.assertEqual(len(lines), 1, "one line, as Nagios reads it")
            return e.code, lines[0]
        self.fail("check must exit with its status")

    @defer.inlineCallbacks
    def test_ok(self):
        self.daemon("running", "running")
        yield self.fill(ready=3)
        code, line = yield self.check("--min-workers", "2", "--backlog-warn", "10")
        self.assertEqual(code, 0)
        text, perfdata = line.split(" | ")
        self.assertTrue(text.startswith("SNQ OK - backlog 3 (3 ready, 0 held); "
                                        "oldest "), text)
        self.assertTrue(text.endswith(" s; 0 dead; 2/2 workers running"), text)
        fields = dict(p.split("=", 1) for p in perfdata.split())
        self.assertEqual(fields["backlog"], "3;10;;0;")
        self.assertEqual(fields["dead"], "0;;;0;")
        self.assertEqual(fields["workers"], "2;;2:;0;2")
        self.assertTrue(fields["age"].split(";")[0].endswith("s"))

    @defer.inlineCallbacks
    def test_criticalWhileTheQueueCannotBeClaimed(self):
        """A wedged queue: the depth answers, but a worker cannot claim."""
        trouble = {"since": reactor.seconds() - 12, "failures": 20,
                   "error": "OperationalError: database disk image is\nmalformed"}
        self.daemon("running", "running", reports={1: {"claims": trouble}})
        yield self.fill(ready=3)
        code, line = yield self.check()
        self.assertEqual(code, 2)
        text, perfdata = line.split(" | ")
        self.assertTrue(text.startswith(
            "SNQ CRITICAL - generic.1 cannot claim for 12 s, 20 failures in a "
            "row: OperationalError: database disk image is malformed "
            "(CRITICAL); backlog 3 "), text)
        self.assertIn("claim_failing=1;;1;0;", perfdata.split())
        code, line = yield self.check("--claim-crit", "30")
        self.assertEqual(code, 0, "failing for less than --claim-crit")
        self.assertIn("claim_failing=0;;1;0;", line.split(" | ")[1].split())

    @defer.inlineCallbacks
    def test_warning(self):
        self.daemon("running")
        yield self.fill(ready=3)
        code, line = yield self.check("--backlog-warn", "2", "--backlog-crit", "5")
        self.assertEqual(code, 1)
        self.assertTrue(line.startswith("SNQ WARNING - backlog 3 (3 ready, 0 held) "
                                        "(WARNING, range 2); "), line)

    @defer.inlineCallbacks
    def test_criticalDeadLetters(self):
        self.daemon("running")
        yield self.fill(ready=1, dead=2)
        code, line = yield self.check("--dead-warn", "0", "--dead-crit", "1",
                                      "--backlog-crit", "5")
        self.assertEqual(code, 2)
        self.assertTrue(line.startswith("SNQ CRITICAL - 2 dead (CRITICAL"), line)

    @defer.inlineCallbacks
    def test_criticalTooFewWorkers(self):
        self.daemon("running", "waiting", "starting")
        code, line = yield self.check("--min-workers", "2")
        self.assertEqual(code, 2)
        self.assertIn("1/3 workers running (CRITICAL, range 2:)", line)

    @defer.inlineCallbacks
    def test_criticalNoDaemon(self):
        code, line = yield self.check()
        self.assertEqual(code, 2)
        self.assertIn(f"no snq daemon answers on {self.socket}", line)
        code, line = yield self.check("--min-workers", "0")
        self.assertEqual(code, 0, "not asked")

    @defer.inlineCallbacks
    def test_unknownConfig(self):
        code, line = yield self.check(config=self.writeConfig(
            "[queue]\nbackend = 1\n", "bad.toml"))
        self.assertEqual(code, 3)
        self.assertTrue(line.startswith("SNQ UNKNOWN - invalid configuration: "),
                        line)

    @defer.inlineCallbacks
    def test_unknownQueue(self):
        config = self.writeConfig(
            '[db]\nurl = "postgresql://postgres@127.0.0.1:1/none"\n', "pg.toml")
        code, line = yield self.check("--min-workers", "0", config=config)
        self.assertEqual(code, 3)
        self.assertIn("SNQ UNKNOWN - cannot ask the queue postgresql://", line)

    @defer.inlineCallbacks
    def test_unknownTimeout(self):
        """A daemon that does not answer within --timeout."""
        port = reactor.listenUNIX(self.socket, Factory.forProtocol(Protocol))
        self.addCleanup(port.stopListening)
        code, line = yield self.check("--timeout", "0.5")
        self.assertEqual(code, 3)
        self.assertEqual(line, "SNQ UNKNOWN - no answer within 0.5 s")


class UsageTests(SynchronousTestCase):
    def snqctl(self, *argv):
        return subprocess.run([sys.executable, "-m", "snq.scripts.snqctl", *argv],
                              capture_output=True, text=True, env=environ(),
                              timeout=60)

    def test_usageErrorsAreUnknown(self):
        for argv in (["check", "--backlog-warn", "lots"], ["check", "--bogus"]):
            result = self.snqctl(*argv)
            self.assertEqual(result.returncode, 3, argv)
            self.assertTrue(result.stdout.startswith("SNQ UNKNOWN - snqctl check: "),
                            result.stdout)
        self.assertEqual(self.snqctl("enqueue", "--bogus").returncode, 2,
                         "other commands keep argparse's status")


class RangeTests(SynchronousTestCase):
    def test_nagiosRanges(self):
        cases = {"10": ([-1, 11], [0, 10]), "10:": ([9], [10, 1e9]),
                 "~:10": ([11], [-1e9, 10]), "10:20": ([9, 21], [10, 20]),
                 "@10:20": ([10, 20], [9, 21])}
        for text, (alert, quiet) in cases.items():
            r = Range.parse(text)
            self.assertEqual([r.alerts(v) for v in alert], [True] * len(alert), text)
            self.assertEqual([r.alerts(v) for v in quiet], [False] * len(quiet), text)

    def test_invalid(self):
        for text in ("", "x", "20:10", "1:2:3", "@"):
            self.assertRaises(ValueError, Range.parse, text)
