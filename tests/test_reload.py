# -*- test-case-name: tests.test_reload -*-
"""
Reloading on the master: the L{Reloader} with a real L{WorkerPool} on a
fake process reactor (no real process, no real time); the workers' side
of AMP is played by the test, which reads the L{Reconfigure} requests a
worker got on its fd 3 and answers on its fd 4.  Then the master's other
parts: C{snqctl reload} on the control socket, SIGHUP, the socket
moving, the monitors, C{--site}, C{--inline}.
"""

import io
import json
import os
import signal
import sys

from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs
from twisted.protocols import amp
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from snq import config as snqconfig
from snq.amp import ControlError, Reconfigure, Status
from snq.control import ControlService, connect
from snq.iomaster import IoMaster
from snq.monitor.service import MonitorService
from snq.pool import WorkerPool
from snq.queues.memory import MemoryQueue
from snq.reconfig import stamped
from snq.reload import Reloader, ReloadError
from snq.routing import groupsOf
from snq.scripts import snqctl
from snq.service import AsyncMultiService
from snq.spawner import ExecSpawner
from snq.tap import Options, makeService
from tests.daemon import socketPath, waitFor
from tests.test_pool import FakeProcessReactor

BASE = """
[daemon]
workers = {workers}
kill_time = 10
start_timeout = 30
{daemon}

[queue]
{queue}

[handlers]
{handlers}

[sites.default]
record_file = "handled.txt"
{sites}
"""


def reconfigureRequests(process) -> list[tuple[bytes, dict]]:
    """Every L{Reconfigure} a fake worker process was sent: (tag, config)."""
    boxes = amp.parseString(process.written.get(3, b""))
    return [(box[b"_ask"], Reconfigure.parseArguments(box, None)["config"])
            for box in boxes if box.get(b"_command") == b"Reconfigure"]


def wid(process) -> str:
    return process.args[process.args.index("--id") + 1]


def answer(process, tag, applied=None, error=None):
    """The worker's answer to request C{tag}."""
    if error is None:
        box = {b"_answer": tag, b"applied": json.dumps(applied or []).encode()}
    else:
        box = {b"_error": tag, b"_error_code": b"CONTROL_ERROR",
               b"_error_description": error.encode()}
    process.proto.childDataReceived(4, amp.AmpBox(box).serialize())


class ReloadTestCase(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "snq.toml")
        self.reactor = FakeProcessReactor()
        self.problems = []
        self.checks = []
        #: pid → requests answered
        self.answered = {}
        self.write()
        config = stamped(snqconfig.parseText(snqconfig.read(self.path), self.path),
                         1, 0.0)
        self.pool = WorkerPool(config, reactor=self.reactor)
        self.pool.startService()
        self.reactor.advance(1)
        for process in self.reactor.processes:
            process.ready()
        self.reloader = Reloader(self.pool, config, reactor=self.reactor,
                                 check=self.check)

    def write(self, workers=2, daemon="", queue="", handlers="", sites=""):
        with open(self.path, "w") as f:
            f.write(BASE.format(workers=workers, daemon=daemon, queue=queue,
                                handlers=handlers, sites=sites))

    def check(self, text, source, reactor):
        self.checks.append(text)
        return defer.succeed(self.problems)

    def live(self):
        return [p for p in self.reactor.processes if not p.ended]

    def answerAll(self, applied=("nothing",)):
        """Every worker applies what it was sent; → how many answered."""
        n = 0
        for process in self.live():
            answered = self.answered.setdefault(process.pid, 0)
            for tag, _ in reconfigureRequests(process)[answered:]:
                answer(process, tag, list(applied))
                self.answered[process.pid] += 1
                n += 1
        return n

    def reload(self):
        return self.reloader.reload("test")


class RefusedTests(ReloadTestCase):
    def test_invalidFileChangesNothing(self):
        """Every problem is reported; no worker hears of it."""
        with open(self.path, "a") as f:
            f.write("\n[monitor]\nhttp = 8750\ncolour = 'red'\n")
        with capturedLogs() as events:
            e = self.failureResultOf(self.reload(), ReloadError).value
        self.assertEqual(e.problems, [
            f"{self.path}: monitor.colour: unknown key (known: udp, statsd, "
            "statsd_prefix, http, token, hosts, depth_interval, snmp_base_oid)",
            f"{self.path}: monitor.http: expected a string, got integer 8750"])
        self.assertTrue(str(e).startswith(
            "invalid configuration, nothing changed:\n"))
        self.assertEqual(self.pool.config.generation, 1)
        self.assertEqual(self.checks, [])
        self.assertEqual([reconfigureRequests(p) for p in self.live()], [[], []])
        logged = [e["log_format"].format(**e) for e in events]
        self.assertIn("reload refused, the daemon runs on as it was: "
                      + "; ".join(e.problems), logged)

    def test_notTOML(self):
        with open(self.path, "a") as f:
            f.write("\n[sites.x\n")
        e = self.failureResultOf(self.reload(), ReloadError).value
        [problem] = e.problems
        self.assertIn(f"{self.path}: not valid TOML:", problem)

    def test_workersCheckRefuses(self):
        """What only a worker can see (a handler that does not load)."""
        self.write(handlers='x = "nowhere:X"')
        self.problems = [f"{self.path}: handlers.x: cannot load nowhere:X"]
        e = self.failureResultOf(self.reload(), ReloadError).value
        self.assertEqual(e.problems, self.problems)
        self.assertEqual(self.checks, [snqconfig.read(self.path)])
        self.assertEqual(self.pool.config.generation, 1)
        self.assertEqual(self.pool.config.handlers, {})

    def test_siteDaemonsSiteMustStay(self):
        self.write(sites="[sites.a]\n[sites.b]")
        self.reloader.site = "a"
        d = self.reload()
        self.answerAll()
        self.successResultOf(d)
        self.write(sites="[sites.b]")
        e = self.failureResultOf(self.reload(), ReloadError).value
        self.assertEqual(e.problems, [f"{self.path}: sites.a: missing, but this "
                                      "daemon runs --site a"])

    def test_embeddedDefaultHasNoFile(self):
        pool = WorkerPool(snqconfig.Config(), 1, reactor=self.reactor)
        reloader = Reloader(pool, pool.config, reactor=self.reactor,
                            check=self.check)
        e = self.failureResultOf(reloader.reload("test"), ControlError).value
        self.assertIn("there is no file to reload", str(e))

    def test_unchangedFileDoesNothing(self):
        result = self.successResultOf(self.reload())
        self.assertEqual((result["generation"], result["changes"]), (1, []))
        self.assertEqual(self.checks, [], "nothing to check")
        self.assertEqual(self.pool.config.generation, 1)


class LiveTests(ReloadTestCase):
    def test_workersApplyTheSameTextInPlace(self):
        self.write(sites="[sites.new]\nrecord_file = 'new.txt'")
        d = self.reload()
        self.assertNoResult(d)
        self.assertEqual(self.pool.config.generation, 2)
        self.assertIn("new", self.pool.config.sites)
        text = snqconfig.read(self.path)
        first, second = self.reactor.processes
        for process in (first, second):
            [(_, spec)] = reconfigureRequests(process)
            self.assertEqual(spec["text"], text.decode())
            self.assertEqual((spec["source"], spec["generation"]), (self.path, 2))
            self.assertEqual(spec["loaded"], self.pool.config.loaded)
        self.assertEqual(self.answerAll(["handler x added"]), 2)
        result = self.successResultOf(d)
        self.assertEqual(result["changes"], [
            {"key": "sites.new", "kind": "added", "how": "live",
             "text": "sites.new added (applied in place)"}])
        self.assertEqual(result["applied"], [
            f"generic.0 (pid {first.pid}): applied in place: handler x added",
            f"generic.1 (pid {second.pid}): applied in place: handler x added"])
        self.assertEqual(result["failed"], [])
        self.assertEqual(len(self.reactor.processes), 2, "no worker restarted")
        self.assertEqual([p.signals for p in self.reactor.processes], [[], []])
        self.assertEqual([w["generation"] for w in self.pool.status()], [2, 2])

    def test_newWorkersStartOnTheNewText(self):
        """A respawn after a reload reads the new text on its stdin."""
        self.write(sites="[sites.new]")
        d = self.reload()
        self.answerAll()
        self.successResultOf(d)
        self.reactor.advance(5)
        self.reactor.processes[0].exit(1)
        self.reactor.advance(0)
        newcomer = self.reactor.processes[-1]
        self.assertEqual(newcomer.written[0], snqconfig.read(self.path))
        self.assertIn(0, newcomer.closed)
        args = newcomer.args
        self.assertEqual(args[args.index("--generation") + 1], "2")
        self.assertIn("--stdin-config", args)
        self.assertEqual(args[args.index("--config") + 1], self.path)

    def test_aWorkerThatFailsIsReported(self):
        self.write(sites="[sites.new]")
        d = self.reload()
        first, second = self.reactor.processes
        [(tag, _)] = reconfigureRequests(first)
        answer(first, tag, ["fine"])
        [(tag, _)] = reconfigureRequests(second)
        with capturedLogs():
            answer(second, tag, error="ValueError: boom (the worker exits, and "
                                      "its replacement starts on the new config)")
        result = self.successResultOf(d)
        self.assertEqual(result["applied"], [
            f"generic.0 (pid {first.pid}): applied in place: fine"])
        self.assertEqual(result["failed"], [
            f"generic.1 (pid {second.pid}): ValueError: boom (the worker exits, "
            "and its replacement starts on the new config)"])
        self.assertEqual(first.proto.generation, 2)
        self.assertEqual(second.proto.generation, 1)

    def test_aWorkerThatNeverAnswers(self):
        self.write(sites="[sites.new]")
        d = self.reload()
        with capturedLogs():
            self.reactor.advance(40)
        self.assertEqual(self.successResultOf(d)["failed"],
                         [f"generic.{n} (pid {1000 + n}): no answer within 40 s"
                          for n in range(2)])

    def test_overOnceEveryWorkerRunsIt(self):
        """A worker respawning meanwhile is waited for, and named if late."""
        self.write(sites="[sites.new]")
        second = self.reactor.processes[1]
        with capturedLogs():
            second.exit(1)
        d = self.reload()
        self.answerAll()
        self.assertNoResult(d)
        self.reactor.advance(1)
        respawned = self.reactor.processes[2]
        self.assertEqual(respawned.proto.generation, 2)
        self.reactor.advance(28.9)
        self.assertNoResult(d)
        with capturedLogs():
            self.reactor.advance(0.2)
        result = self.successResultOf(d)
        self.assertEqual(result["failed"], [
            f"generic.1 (pid {respawned.pid}): not ready on config generation 2 "
            "within 30 s"])

    def test_timingKeysForTheNextDecision(self):
        self.write(daemon="min_restart_delay = 3.0\nthreshold = 9")
        d = self.reload()
        self.answerAll()
        self.successResultOf(d)
        self.reactor.processes[0].exit(1)
        self.assertEqual(self.pool.workers[0].respawnCall.getTime()
                         - self.reactor.seconds(), 1.0,
                         "the delay doubled from the old minimum")
        self.assertEqual(self.pool.config.daemon.threshold, 9)


class OneAtATimeTests(ReloadTestCase):
    def test_requestsMeanwhileShareOneMoreReload(self):
        held = defer.Deferred()
        self.check = lambda text, source, reactor: (self.checks.append(text),
                                                    held)[1]
        self.reloader.check = self.check
        self.write(sites="[sites.a]")
        first = self.reload()
        self.write(sites="[sites.a]\n[sites.b]")
        second, third = self.reload(), self.reload()
        self.assertEqual(len(self.checks), 1, "the second waits")
        held.callback([])
        self.assertEqual(self.answerAll(), 2)
        self.assertEqual(self.successResultOf(first)["generation"], 2)
        self.assertEqual(len(self.checks), 2, "one more reload, for both")
        self.assertEqual(self.answerAll(), 2)
        self.assertEqual(self.successResultOf(second)["generation"], 3)
        self.assertEqual(self.successResultOf(third)["generation"], 3)
        self.assertEqual(sorted(self.pool.config.sites), ["a", "b", "default"])

    def test_waitsForARollingRestartInProgress(self):
        restarted = self.pool.restart()
        self.write(sites="[sites.a]")
        d = self.reload()
        self.assertEqual(self.pool.config.generation, 1,
                         "the restart finishes on the config it began with")
        for process in self.reactor.processes[2:]:
            process.ready()
        self.reactor.processes[3].ready()
        for process in self.reactor.processes[:2]:
            process.exit(0)
        self.successResultOf(restarted)
        self.assertEqual(len(self.checks), 1)
        self.answerAll()
        self.assertEqual(self.successResultOf(d)["generation"], 2)


class PoolSizeTests(ReloadTestCase):
    def test_twoThreeOne(self):
        """Grow by starting, shrink by stopping the highest-numbered."""
        first, second = self.reactor.processes
        self.write(workers=3)
        d = self.reload()
        self.answerAll()
        self.reactor.advance(1)
        self.assertNoResult(d)
        third = self.reactor.processes[2]
        self.assertEqual(wid(third), "generic.2")
        self.assertEqual(third.proto.generation, 2)
        self.assertEqual(reconfigureRequests(third), [], "it starts on it")
        third.ready()
        self.reactor.advance(0.1)
        result = self.successResultOf(d)
        self.assertIn("generic.2: added", result["applied"])
        self.assertEqual(result["applied"][-1], f"generic.2 (pid {third.pid}): "
                         "started on config generation 2",
                         "over once every worker runs it")
        self.assertFalse([line for line in result["applied"] if "removed" in line])

        self.write(workers=1)
        d = self.reload()
        self.answerAll()
        result = self.successResultOf(d)
        self.assertEqual(result["applied"][:2], [
            "generic.1: removed (it finishes its items first)",
            "generic.2: removed (it finishes its items first)"])
        self.assertEqual([w.wid for w in self.pool.workers], ["generic.0"])
        self.assertEqual([p.signals for p in (first, second, third)],
                         [[], ["TERM"], ["TERM"]])
        self.assertEqual(len(reconfigureRequests(first)), 2)
        roles = [(w["id"], w["role"]) for w in self.pool.status()]
        self.assertEqual(sorted(roles), [("generic.0", "current"),
                                         ("generic.1", "retiring"),
                                         ("generic.2", "retiring")])
        with capturedLogs() as events:
            second.exit(0)
            third.exit(0)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.processes), 3, "not respawned")
        self.assertIn("worker generic.1 (pid 1001), removed, has exited "
                      "(exit status 0)",
                      [e["log_format"].format(**e) for e in events])
        self.assertEqual(self.pool.retiring, set())

    def test_commandLineWins(self):
        self.pool.override = 2
        self.write(workers=5)
        d = self.reload()
        self.answerAll()
        result = self.successResultOf(d)
        self.assertEqual(result["applied"][0], "daemon.workers: --workers 2 on "
                                               "the command line wins")
        self.assertFalse([line for line in result["applied"] if "added" in line])
        self.assertEqual(len(self.pool.workers), 2)

    def test_xmppWorkerComesAndGoes(self):
        first = self.reactor.processes[0]
        self.write(queue='groups = ["main", "xmpp"]')
        d = self.reload()
        self.assertEqual(len(reconfigureRequests(first)), 1)
        self.assertEqual(groupsOf(self.pool.config, "queues"), ["main"],
                         "they leave xmpp to it")
        self.answerAll()
        self.reactor.advance(1)
        xmpp = self.reactor.processes[2]
        self.assertEqual(xmpp.args[xmpp.args.index("--role") + 1], "xmpp")
        self.assertEqual(first.args[first.args.index("--role") + 1], "first")
        xmpp.ready()
        self.reactor.advance(0.1)
        self.assertIn("generic.xmpp: added", self.successResultOf(d)["applied"])
        self.write()
        d = self.reload()
        self.answerAll()
        self.assertIn("generic.xmpp: removed (it finishes its items first)",
                      self.successResultOf(d)["applied"])
        self.assertEqual(xmpp.signals, ["TERM"])


class RollingTests(ReloadTestCase):
    def handlerModule(self, source):
        directory = os.path.join(self.dir, "code")
        os.makedirs(directory, exist_ok=True)
        if directory not in sys.path:
            sys.path.insert(0, directory)
            self.addCleanup(sys.path.remove, directory)
        with open(os.path.join(directory, "reloadhandlers.py"), "w") as f:
            f.write(source)

    def test_handlerCodeChangeRollsNeverBelowCapacity(self):
        self.handlerModule("A = 1\n")
        self.write(handlers='mine = "reloadhandlers:Mine"')
        d = self.reload()
        self.answerAll()
        self.successResultOf(d)
        self.handlerModule("A = 2\n")
        d = self.reload()
        old0, old1 = self.reactor.processes[:2]
        self.assertEqual([reconfigureRequests(p)[1:] for p in (old0, old1)],
                         [[], []], "no change in place: it rolls")
        new0 = self.reactor.processes[2]
        self.assertEqual(new0.proto.generation, 3)
        self.assertEqual(len(self.live()), 3)
        new0.ready()
        self.assertEqual(old0.signals, ["TERM"])
        old0.exit(0)
        new1 = self.reactor.processes[3]
        self.assertEqual(old1.signals, [])
        new1.ready()
        old1.exit(0)
        result = self.successResultOf(d)
        self.assertEqual([c["text"] for c in result["changes"]],
                         ["code reloadhandlers: " + result["changes"][0]["text"]
                          .split(": ", 1)[1]])
        self.assertEqual(result["changes"][0]["how"], "rolling")
        self.assertEqual(result["applied"], [
            f"generic.0: restarted on the new config, pid {old0.pid} -> {new0.pid}",
            f"generic.1: restarted on the new config, pid {old1.pid} -> {new1.pid}"],
            "restarted, none applied in place")

    def test_onlyOutdatedWorkersRoll(self):
        """Workers a reload added start on the new config: not replaced."""
        self.write(workers=3, queue='backend = "redis"')
        d = self.reload()
        self.reactor.advance(1)
        self.assertEqual([wid(p) for p in self.reactor.processes[2:]],
                         ["generic.0", "generic.2"])
        added = self.reactor.processes[3]
        added.ready()
        self.reactor.processes[2].ready()
        self.assertEqual(wid(self.reactor.processes[4]), "generic.1")
        self.reactor.processes[4].ready()
        self.reactor.advance(0.1)
        result = self.successResultOf(d)
        self.assertEqual([line.split(":")[0] for line in result["applied"]],
                         ["generic.2", "generic.0", "generic.1",
                          f"generic.2 (pid {added.pid})"])
        self.assertIn("restarted", result["applied"][1])
        self.assertIn("started on config generation 2", result["applied"][3])
        self.assertEqual(added.signals, [])
        self.assertEqual(len(self.reactor.processes), 5)

    def test_daemonIdRenamesAndRolls(self):
        self.write(daemon='id = "web"')
        d = self.reload()
        self.assertEqual([w.wid for w in self.pool.workers], ["web.0", "web.1"])
        replacement = self.reactor.processes[2]
        self.assertEqual(wid(replacement),
                         "web.0")
        replacement.ready()
        self.reactor.processes[3].ready()
        self.assertEqual(len([line for line in self.successResultOf(d)["applied"]
                              if "restarted" in line]), 2)

    def test_failedRestartIsReported(self):
        self.write(queue='backend = "redis"')
        d = self.reload()
        with capturedLogs():
            self.reactor.processes[2].exit(1)
        result = self.successResultOf(d)
        failed, *behind = result["failed"]
        self.assertIn("the rolling restart stopped: the replacement for "
                      "generic.0 exited before it was ready", failed)
        self.assertEqual(behind, [
            "generic.0 (pid 1000): runs config generation 1",
            "generic.1 (pid 1001): runs config generation 1"])
        self.assertEqual(self.pool.config.generation, 2)


class FakeReloader:
    def __init__(self):
        self.requests = []
        self.answers = []

    def reload(self, reason):
        self.requests.append(reason)
        d = defer.Deferred()
        self.answers.append(d)
        return d

    def requested(self, reason):
        self.requests.append(reason)


RESULT = {
    "generation": 3, "source": "/etc/snq.toml",
    "changes": [{"key": "sites.new", "kind": "added", "how": "live",
                 "text": "sites.new added (applied in place)"},
                {"key": "daemon.workers", "kind": "changed", "how": "live",
                 "text": "daemon.workers: 2 → 3 (applied in place)"}],
    "applied": ["monitor: HTTP off", "generic.2: added",
                "generic.0 (pid 10): applied in place: handler x added",
                "generic.1 (pid 11): applied in place: nothing to change there"],
    "failed": []}


class ControlTestCase(TestCase):
    """C{snqctl reload}, through a real control socket."""

    def setUp(self):
        self.path = socketPath(self)
        self.dir = os.path.dirname(self.path)
        self.reloader = FakeReloader()
        self.service = ControlService(FakeControlPool(), self.path, reactor,
                                      reloader=self.reloader)
        self.service.startService()
        self.addCleanup(lambda: self.service.running and self.service.stopService())

    def snqctl(self, *argv):
        out = io.StringIO()
        args = snqctl.parser().parse_args([*argv, "--socket", self.service.path])
        d = snqctl.run(reactor, args, out=out)
        return d.addCallback(lambda _: out.getvalue())

    @defer.inlineCallbacks
    def answered(self, d, result):
        """The reloader answers C{result} (or fails with it)."""
        yield waitFor(lambda: self.reloader.answers, timeout=10, interval=0.01,
                      what="the reload request")
        if isinstance(result, Exception):
            self.reloader.answers[-1].errback(result)
        else:
            self.reloader.answers[-1].callback(result)
        return (yield d)



class ControlTests(ControlTestCase):
    @defer.inlineCallbacks
    def test_reloadPrintsWhatChangedAndHow(self):
        out = yield self.answered(self.snqctl("reload"), RESULT)
        self.assertEqual(self.reloader.requests, ["snqctl reload"])
        self.assertEqual(out.splitlines(), [
            "config generation 3 from /etc/snq.toml, 2 changes:",
            "  sites.new added (applied in place)",
            "  daemon.workers: 2 → 3 (applied in place)",
            "monitor: HTTP off",
            "generic.2: added",
            "generic.0 (pid 10): applied in place: handler x added",
            "generic.1 (pid 11): applied in place: nothing to change there"])

    @defer.inlineCallbacks
    def test_invalidSaysWhy(self):
        d = self.snqctl("reload")
        e = yield self.assertFailure(self.answered(d, ReloadError(
            ["f.toml: daemon.workers: expected a number not below 0, got -1",
             "f.toml: monitor.colour: unknown key"])), snqctl.CommandError)
        self.assertEqual(str(e).splitlines(), [
            "reload: invalid configuration, nothing changed:",
            "f.toml: daemon.workers: expected a number not below 0, got -1",
            "f.toml: monitor.colour: unknown key"])

    @defer.inlineCallbacks
    def test_partlyFailedIsAnError(self):
        result = dict(RESULT, failed=[
            "generic.0 (pid 10): no answer within 40 s",
            "the rolling restart stopped: the replacement for generic.1 exited"])
        e = yield self.assertFailure(self.answered(self.snqctl("reload"), result),
                                     snqctl.CommandError)
        self.assertEqual(str(e).splitlines(), [
            "reload: config generation 3 is the daemon's, but:",
            "generic.0 (pid 10): no answer within 40 s",
            "the rolling restart stopped: the replacement for generic.1 exited"])

    @defer.inlineCallbacks
    def test_nothingChanged(self):
        out = yield self.answered(self.snqctl("reload"), dict(RESULT, changes=[]))
        self.assertEqual(out, "/etc/snq.toml has not changed: nothing to do "
                              "(config generation 3)\n")

    @defer.inlineCallbacks
    def test_controlSocketMoves(self):
        client = yield connect(self.path, reactor)
        yield client.callRemote(Status)  # accepted: it stays
        other = os.path.join(self.dir, "other.sock")
        notes = self.service.reconfigService(snqconfig.parse(
            {"daemon": {"control_socket": other}}))
        self.assertEqual(notes, [f"control socket now {other}"])
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(os.path.exists(self.path))
        yield client.callRemote(Status)
        client.transport.loseConnection()
        out = yield self.snqctl("status")
        self.assertIn("config generation 1", out)

    def test_controlSocketTakenStays(self):
        other = ControlService(FakeControlPool(), os.path.join(self.dir, "b.sock"),
                               reactor)
        other.startService()
        self.addCleanup(other.stopService)
        with capturedLogs():
            notes = self.service.reconfigService(snqconfig.parse(
                {"daemon": {"control_socket": other.path}}))
        self.assertIn("is another snq daemon running", notes[0])
        self.assertIn(f"still on {self.path}", notes[0])
        self.assertEqual(self.service.path, self.path)


class FakeControlPool:
    restarting = False
    config = snqconfig.Config(loaded=0.0)

    def status(self):
        return []


class MonitorTests(SynchronousTestCase):
    def test_targetsReplacedTotalsKept(self):
        from tests.test_monitor import FakePool, FakeSocket, FakeUdpReactor

        clock = FakeUdpReactor(FakeSocket(None), [])
        config = snqconfig.parse({"monitor": {"http": "", "udp": "udp://127.0.0.1:9"}})
        service = MonitorService(config, FakePool(), MemoryQueue(clock), clock)
        self.successResultOf(service.startService())
        [udp] = service.senders
        tracker = service.tracker
        tracker.counts["handled", "t", "s", "w"] = 5
        new = snqconfig.parse({"monitor": {"http": "", "statsd": "127.0.0.1:8125",
                                           "depth_interval": 5}})
        applied = self.successResultOf(service.reconfigService(new))
        self.assertEqual(applied, [
            "monitor: sending to StatsdSender 127.0.0.1:8125",
            "monitor: watching memory every 5 s"])
        [statsd] = service.senders
        self.assertFalse(udp.running)
        self.assertTrue(statsd.running)
        self.assertEqual(tracker.sinks, [statsd])
        self.assertIs(next(iter(service)), statsd, "senders first: they stop last")
        self.assertIs(service.tracker, tracker)
        self.assertEqual(tracker.counts["handled", "t", "s", "w"], 5)
        self.assertEqual(self.successResultOf(service.reconfigService(new)), [])
        self.successResultOf(service.stopService())
        self.assertEqual(clock.getDelayedCalls(), [])


class SiteOptionTests(SynchronousTestCase):
    def setUp(self):
        self.config = os.path.abspath(self.mktemp())
        with open(self.config, "w") as f:
            f.write("[sites.a]\n[sites.b]\n")
        self.patch(sys, "stderr", io.StringIO())

    def make(self, *argv):
        options = Options()
        options.parseOptions(["-c", self.config, *argv])
        return makeService(options)

    def test_siteDaemon(self):
        pool = list(self.make("--site", "a", "--workers", "1"))[-2]
        self.assertEqual(pool.site, "a")
        self.assertIn("1 workers, site a", sys.stderr.getvalue())
        pool.reactor = FakeProcessReactor()
        pool.spawner = ExecSpawner(pool.reactor)
        pool.startService()
        pool.reactor.advance(0)
        args = pool.reactor.processes[0].args
        self.assertEqual(args[args.index("--site") + 1], "a")
        self.assertEqual(pool.reactor.processes[0].written[0],
                         snqconfig.read(self.config))

    def test_allIsTheDefault(self):
        self.assertIsNone(list(self.make("--all"))[-2].site)
        self.assertIsNone(list(self.make())[-2].site)

    def test_unknownSiteRefused(self):
        e = self.assertRaises(SystemExit, self.make, "--site", "c")
        self.assertEqual(str(e), f"snq: --site c: there is no [sites.c] in "
                                 f"{self.config}")

    def test_siteAndAllExcludeEachOther(self):
        self.assertRaises(usage.UsageError, Options().parseOptions,
                          ["--site", "a", "--all"])

    def test_reloadWired(self):
        daemon = self.make("--site", "a")
        control, _, _, _, pool, reloader = list(daemon)
        self.assertIs(control.reloader, reloader)
        self.assertIs(reloader.tree, daemon)
        self.assertEqual(reloader.site, "a")
        self.assertEqual(pool._requestReload, reloader.requested)


class InlineTests(SynchronousTestCase):
    """C{--inline}: the one IoMaster in the process reloads in place."""

    def setUp(self):
        self.path = os.path.abspath(self.mktemp())
        self.write("[sites.a]\n")
        self.clock = Clock()
        config = stamped(snqconfig.load(self.path), 1, 0.0)
        self.master = IoMaster(config, clock=self.clock,
                               queue=MemoryQueue(self.clock))
        self.tree = AsyncMultiService()
        self.master.setServiceParent(self.tree)
        self.successResultOf(self.tree.startService())
        self.addCleanup(self.tree.stopService)
        self.checked = []
        self.reloader = Reloader(self.tree, config, rolling=False,
                                 reactor=self.clock, check=self.check)

    def check(self, text, source, reactor):
        self.checked.append(source)
        return defer.succeed([])

    def write(self, text):
        with open(self.path, "w") as f:
            f.write(text)

    def test_appliedInPlace(self):
        self.write("[sites.a]\n[sites.b]\n[queue]\nconcurrency = 3\n")
        with capturedLogs() as events:
            self.reloader.requested("SIGHUP")
        self.assertEqual(sorted(self.master.config.sites), ["a", "b"])
        self.assertEqual(self.master.dispatcher.config.queue.concurrency, 3)
        logged = [e["log_format"].format(**e) for e in events]
        self.assertIn("  sites.b added (applied in place)", logged)
        self.assertEqual(self.checked, [self.path], "checked in a fresh process")
        self.assertEqual(self.reloader.config.generation, 2)

    def test_whatWouldRollIsRefused(self):
        self.write('[sites.a]\n[sites.b]\n[queue]\nbackend = "redis"\n')
        with capturedLogs() as events:
            self.reloader.requested("SIGHUP")
        self.assertEqual(sorted(self.master.config.sites), ["a"], "nothing changed")
        [refused] = [e["log_format"].format(**e) for e in events
                     if "refused" in e["log_format"]]
        self.assertIn("needs new processes, which --inline has not: "
                      "queue.backend: 'db' → 'redis' (rolling restart)", refused)

    def test_sighup(self):
        """The reloader owns SIGHUP while it runs, in both modes."""
        clock = self.clock
        clock.callFromThread = lambda f, *a: f(*a)
        self.write("[sites.a]\n[sites.c]\n")
        before = signal.getsignal(signal.SIGHUP)
        self.reloader.startService()
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual(sorted(self.master.config.sites), ["a", "c"])
        self.reloader.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)


class SnqctlInvalidFileTests(ControlTestCase):
    @defer.inlineCallbacks
    def test_brokenFileStillNamesTheSocket(self):
        """snqctl reload reaches the daemon, which says what is wrong."""
        path = os.path.join(self.dir, "snq.toml")
        with open(path, "w") as f:
            f.write(f'[daemon]\ncontrol_socket = "{self.path}"\nworkers = -1\n')
        args = snqctl.parser().parse_args(["-c", path, "reload"])
        d = snqctl.run(reactor, args, out=io.StringIO())
        e = yield self.assertFailure(self.answered(d, ReloadError(
            [f"{path}: daemon.workers: expected a number not below 0, got -1"])),
            snqctl.CommandError)
        self.assertIn("daemon.workers: expected a number not below 0", str(e))
        self.assertEqual(self.reloader.requests, ["snqctl reload"])

    def test_otherCommandsStillRefuseIt(self):
        path = os.path.join(self.dir, "snq.toml")
        with open(path, "w") as f:
            f.write("[daemon]\nworkers = -1\n")
        args = snqctl.parser().parse_args(["-c", path, "status"])
        self.failureResultOf(snqctl.run(reactor, args, out=io.StringIO()),
                             snqconfig.ConfigError)


class UnansweredTests(SynchronousTestCase):
    def test_sighupWithoutAFileIsLogged(self):
        pool = WorkerPool(snqconfig.Config(), 1, reactor=FakeProcessReactor())
        reloader = Reloader(pool, pool.config, reactor=pool.reactor)
        with capturedLogs() as events:
            reloader.requested("SIGHUP")
        logged = [e["log_format"].format(**e) for e in events]
        self.assertIn("reload failed: snq runs on the embedded default config "
                      "(no --config, no $SNQ_CONFIG): there is no file to reload",
                      logged)
