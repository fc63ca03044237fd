# -*- test-case-name: tests.test_control -*-
"""
The control socket: a real UNIX socket in a temporary directory, a fake
pool behind it, and snqctl's status/stop/restart talking to it.
"""

import argparse
import datetime
import io
import json
import os
import signal
import socket
import stat

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase, TestCase

from snq import config as snqconfig
from snq.amp import JSON, ControlError, Report, Restart, Status, Stop
from snq.control import ControlService, connect
from snq.scripts import snqctl
from tests.daemon import socketPath, waitFor


class JSONArgumentTests(SynchronousTestCase):
    def roundTrip(self, value):
        box = Report.makeArguments({"report": value}, None)
        wire = amp.AmpBox(box).serialize()
        return box, Report.parseArguments(amp.parseString(wire)[0], None)["report"]

    def test_small(self):
        box, back = self.roundTrip({"state": "running", "rss": 1})
        self.assertEqual(list(box), [b"report"])
        self.assertEqual(back, {"state": "running", "rss": 1})

    def test_overOneAMPValue(self):
        value = {"counts": [["handled", "t", "s" * 50, n] for n in range(3000)]}
        box, back = self.roundTrip(value)
        self.assertEqual(sorted(box)[:3], [b"report", b"report.1", b"report.2"])
        self.assertTrue(all(len(v) <= JSON.CHUNK for v in box.values()))
        self.assertEqual(back, value)


class FakePool:
    def __init__(self):
        self.restarting = False
        self.restarts = []
        self.config = snqconfig.Config(source="/etc/snq.toml", generation=2,
                                       loaded=1764340000.0)

    def status(self):
        return [
            {"id": "generic.0", "role": "current", "pid": 4242, "state": "running",
             "started": 0, "uptime": 3725.2, "restarts": 2, "last_exit": None,
             "report": {"handled": 1234, "errors": 5, "rss": 31 * 2**20,
                        "config": {"generation": 1, "loaded": 1764339000.0}}},
            {"id": "generic.1", "role": "current", "state": "waiting",
             "respawn_in": 4.0, "restarts": 7, "last_exit": "exit status 1"},
        ]

    def restart(self):
        d = defer.Deferred()
        self.restarts.append(d)
        return d


class ControlTestCase(TestCase):
    def setUp(self):
        self.path = socketPath(self)
        self.pool = FakePool()
        self.stops = []
        self.service = ControlService(self.pool, self.path, reactor,
                                      stopDaemon=lambda: self.stops.append(1))
        self.service.startService()
        self.addCleanup(self.stopService)

    def stopService(self):
        if self.service.running:
            return self.service.stopService()

    @defer.inlineCallbacks
    def client(self):
        client = yield connect(self.path, reactor)
        self.addCleanup(lambda: client.transport and client.transport.loseConnection())
        return client


class ControlServiceTests(ControlTestCase):
    def test_socketOnlyForTheDaemonsUser(self):
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    @defer.inlineCallbacks
    def test_status(self):
        client = yield self.client()
        status = (yield client.callRemote(Status))["status"]
        self.assertEqual(status["pid"], os.getpid())
        self.assertEqual(status["workers"], self.pool.status())
        self.assertFalse(status["restarting"])
        self.assertGreaterEqual(status["uptime"], 0)

    @defer.inlineCallbacks
    def test_statusCarriesTheTrackersSummary(self):
        """For the monitors outside the master: no second source of truth."""
        client = yield self.client()
        status = (yield client.callRemote(Status))["status"]
        self.assertNotIn("monitor", status, "no tracker, nothing to carry")

        class FakeTracker:
            def summary(self):
                return {"totals": {"handled": 3}, "queue": None}

        self.service.tracker = FakeTracker()
        status = (yield client.callRemote(Status))["status"]
        self.assertEqual(status["monitor"], {"totals": {"handled": 3},
                                             "queue": None})

    @defer.inlineCallbacks
    def test_restartAnswersWhenOver(self):
        client = yield self.client()
        answer = client.callRemote(Restart)
        yield waitFor(lambda: self.pool.restarts, timeout=10, interval=0.01,
                      what="the restart request")
        self.assertEqual(len(self.pool.restarts), 1)
        self.assertNoResult(answer)
        self.pool.restarts[0].callback([{"id": "generic.0", "old": 1, "new": 2}])
        self.assertEqual((yield answer)["restarted"],
                         [{"id": "generic.0", "old": 1, "new": 2}])

    @defer.inlineCallbacks
    def test_restartRefusalReachesTheClient(self):
        client = yield self.client()
        answer = client.callRemote(Restart)
        yield waitFor(lambda: self.pool.restarts, timeout=10, interval=0.01,
                      what="the restart request")
        self.pool.restarts[0].errback(ControlError("a rolling restart is in progress"))
        e = yield self.assertFailure(answer, ControlError)
        self.assertEqual(str(e), "a rolling restart is in progress")

    @defer.inlineCallbacks
    def test_sigusr1RestartsAndIsRestoredOnStop(self):
        os.kill(os.getpid(), signal.SIGUSR1)
        yield waitFor(lambda: self.pool.restarts, timeout=10, interval=0.01,
                      what="the restart SIGUSR1 asks for")
        self.assertEqual(len(self.pool.restarts), 1)
        self.pool.restarts[0].errback(ControlError("snq is stopping"))
        yield self.service.stopService()
        self.assertNotEqual(signal.getsignal(signal.SIGUSR1),
                            self.service._sigusr1._handle)

    @defer.inlineCallbacks
    def test_stopAnswersThenStopsTheDaemon(self):
        client = yield self.client()
        yield client.callRemote(Stop)
        yield deferLater(reactor, 0, lambda: None)
        self.assertEqual(self.stops, [1])

    @defer.inlineCallbacks
    def test_stopServiceClosesConnections(self):
        client = yield self.client()
        yield client.callRemote(Status)
        yield self.service.stopService()
        yield client.lost
        self.assertFalse(os.path.exists(self.path))

    def test_secondMasterRefused(self):
        other = ControlService(FakePool(), self.path, reactor)
        e = self.assertRaises(ControlError, other.startService)
        self.assertEqual(str(e), f"cannot listen on the control socket {self.path}: "
                         "Cannot acquire lock; is another snq daemon running "
                         "with the same [daemon] control_socket?")

    @defer.inlineCallbacks
    def test_socketOfADeadMasterReplaced(self):
        yield self.service.stopService()
        # What a master killed with -9 leaves: the socket and a lock naming
        # a process that is gone.
        with socket.socket(socket.AF_UNIX) as dead:
            dead.bind(self.path)
        os.symlink("999999999", self.path + ".lock")
        self.service = ControlService(self.pool, self.path, reactor)
        self.service.startService()
        client = yield self.client()
        yield client.callRemote(Status)


class SnqctlTests(ControlTestCase):
    def command(self, *argv):
        out = io.StringIO()
        args = snqctl.parser().parse_args([*argv, "--socket", self.path])
        d = snqctl.run(reactor, args, out=out)
        return d.addCallback(lambda _: out.getvalue())

    @defer.inlineCallbacks
    def test_statusTable(self):
        out = yield self.command("status")
        lines = out.splitlines()
        self.assertTrue(lines[0].startswith(f"snq master pid {os.getpid()}, up 0:00:0"))
        loaded = datetime.datetime.fromtimestamp(1764340000.0)
        older = datetime.datetime.fromtimestamp(1764339000.0).strftime("%H:%M:%S")
        self.assertEqual(lines[1], f"config generation 2, loaded "
                         f"{loaded.isoformat(' ', 'seconds')} from /etc/snq.toml")
        self.assertEqual(lines[2:], [
            "worker     pid   state            uptime   handled  errors  rss      "
            "restarts  config",
            "generic.0  4242  running          1:02:05  1234     5       31.0 MB  "
            f"2         1 {older} (old)",
            "generic.1  -     waiting (4.0 s)  -        -        -       -        "
            "7         -",
        ])

    @defer.inlineCallbacks
    def test_statusJSON(self):
        out = yield self.command("status", "--json")
        status = json.loads(out)
        self.assertEqual(status["workers"], self.pool.status())

    @defer.inlineCallbacks
    def test_restart(self):
        d = self.command("restart")
        yield waitFor(lambda: self.pool.restarts, timeout=10, interval=0.01,
                      what="the restart request")
        self.pool.restarts[0].callback([{"id": "generic.0", "old": 1, "new": 2}])
        self.assertEqual((yield d), "generic.0: pid 1 -> 2\n")

    @defer.inlineCallbacks
    def test_restartRefused(self):
        d = self.command("restart")
        yield waitFor(lambda: self.pool.restarts, timeout=10, interval=0.01,
                      what="the restart request")
        self.pool.restarts[0].errback(ControlError("snq is stopping"))
        e = yield self.assertFailure(d, snqctl.CommandError)
        self.assertEqual(str(e), "restart: snq is stopping")

    @defer.inlineCallbacks
    def test_stopWaitsForTheDaemon(self):
        self.service.stopDaemon = self.service.stopService
        out = yield self.command("stop")
        self.assertEqual(out, "snq is stopping: workers finish what they hold\n"
                              "snq stopped\n")
        self.assertFalse(self.service.running)

    @defer.inlineCallbacks
    def test_noDaemon(self):
        yield self.service.stopService()
        e = yield self.assertFailure(self.command("status"), snqctl.CommandError)
        self.assertIn(f"no snq daemon answers on {self.path}", str(e))
        self.assertIn("give --socket", str(e))

    def test_socketFromConfig(self):
        args = argparse.Namespace(socket=None, command="status", json=False)
        config = snqconfig.parse({"daemon": {"control_socket": self.path}})
        out = io.StringIO()
        d = snqctl._control(config, args, out, reactor)
        return d.addCallback(lambda _: self.assertIn("generic.0", out.getvalue()))
