# -*- test-case-name: tests.test_pool -*-
"""
The worker pool's rules on a fake process reactor: no real process, no
real time.  Fake children exit when a test says so (TERM alone does not
end them; KILL does, on the next turn), as in Twisted's test_procmon.
"""

import dataclasses
import os
import sys

from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from snq import config as snqconfig
from snq.amp import Channel, ControlError, Deaths, Report
from snq.pool import CHILD_FDS, WorkerPool


@implementer(IProcessTransport)
class FakeProcess:
    def __init__(self, reactor, proto, executable, args, env, childFDs, pid):
        self.reactor = reactor
        self.proto = proto
        self.executable = executable
        self.args = args
        self.env = env
        self.childFDs = childFDs
        self.pid = pid
        self.signals = []
        self.written = {}
        self.closed = set()
        self.ended = False

    def signalProcess(self, name):
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(name)
        if name == "KILL":
            self.reactor.callLater(0, self.exit, signal=9)

    def closeStdin(self):
        self.closed.add(0)

    def writeToChild(self, childFD, data):
        self.written[childFD] = self.written.get(childFD, b"") + data

    def closeChildFD(self, childFD):
        self.closed.add(childFD)

    def exit(self, code=0, signal=None):
        self.ended = True
        if code == 0 and signal is None:
            status = ProcessDone(0)
        else:
            status = ProcessTerminated(None if signal else code, signal)
        self.proto.processEnded(Failure(status))

    def report(self, **report):
        """The child's AMP Report, as bytes on its fd 4."""
        child = Channel()
        transport = StringTransport()
        child.makeConnection(transport)
        child.callRemote(Report, report=report)
        self.proto.childDataReceived(4, transport.value())

    def ready(self):
        self.report(state="running", handled=0)


class FakeProcessReactor(MemoryReactorClock):
    def __init__(self):
        super().__init__()
        self.processes = []
        self.spawnError = None

    def spawnProcess(self, processProtocol, executable, args=(), env=None,
                     path=None, uid=None, gid=None, usePTY=False, childFDs=None):
        if self.spawnError is not None:
            raise self.spawnError
        process = FakeProcess(self, processProtocol, executable, args, env,
                              childFDs, pid=1000 + len(self.processes))
        self.processes.append(process)
        processProtocol.makeConnection(process)
        return process


def makeConfig(daemon=None, queue=None, source=None):
    daemon = {"threshold": 1.0, "min_restart_delay": 1.0,
              "max_restart_delay": 5.0, "kill_time": 10.0, "start_timeout": 30.0,
              **(daemon or {})}
    config = snqconfig.parse({"daemon": daemon, "queue": queue or {}})
    return dataclasses.replace(config, source=source)


class PoolTestCase(SynchronousTestCase):
    def makePool(self, count=2, **kw):
        self.reactor = FakeProcessReactor()
        self.pool = WorkerPool(makeConfig(**kw), count, reactor=self.reactor)
        self.pool.startService()
        self.reactor.advance(10)  # past every spawndelay
        return self.pool

    def youngDeath(self, worker, code=1):
        """Current process of C{worker} exits at once; → the delay it waits."""
        process = worker.process.transport
        before = len(self.reactor.processes)
        process.exit(code)
        call = worker.respawnCall
        delay = call.getTime() - self.reactor.seconds()
        self.reactor.advance(delay)
        self.assertEqual(len(self.reactor.processes), before + 1)
        return delay


class SpawnTests(PoolTestCase):
    def test_workersStartSpawnDelayApart(self):
        reactor = FakeProcessReactor()
        pool = WorkerPool(makeConfig(queue={"spawndelay": 0.5}), 3, reactor=reactor)
        pool.startService()
        reactor.advance(0)
        self.assertEqual(len(reactor.processes), 1)
        reactor.advance(0.5)
        self.assertEqual(len(reactor.processes), 2)
        reactor.advance(0.5)
        self.assertEqual([p.args[-1] for p in reactor.processes],
                         ["generic.0", "generic.1", "generic.2"])
        self.assertEqual([w.process.pid for w in pool.workers], [1000, 1001, 1002])

    def test_childCommandAndPipes(self):
        self.makePool(1, daemon={"id": "web"})
        process = self.reactor.processes[0]
        self.assertEqual(process.executable, sys.executable)
        claimant = self.pool.workers[0].process.claimant
        self.assertEqual(process.args,
                         [sys.executable, "-m", "snq.child", "--generation", "1",
                          "--loaded", "0.0", "--claimant", claimant,
                          "--journal-fd", "5", "--role", "first", "--id", "web.0"])
        self.assertRegex(claimant, r"^[\w.-]+-web\.0-[0-9a-f]{8}$")
        journal = self.pool.workers[0].process.journal
        self.assertEqual(process.childFDs, {**CHILD_FDS, 5: journal.fd})
        self.assertEqual(CHILD_FDS, {0: "w", 1: "r", 2: "r", 3: "w", 4: "r"})
        self.assertIsNone(process.env, "inherits the master's environment")
        self.assertIn(0, process.closed, "stdin is closed at once")

    def test_configPathPassedAbsolute(self):
        reactor = FakeProcessReactor()
        config = makeConfig(source="conf/snq.toml")
        pool = WorkerPool(config, 1, reactor=reactor)
        pool.startService()
        reactor.advance(0)
        args = reactor.processes[0].args
        self.assertEqual(args[3:9],
                         ["--config", os.path.abspath("conf/snq.toml"),
                          "--generation", "1", "--loaded", "0.0"])
        self.assertEqual(args[-4:], ["--role", "first", "--id", "generic.0"])


class RespawnTests(PoolTestCase):
    def test_longLivedFailureRespawnsAtOnce(self):
        pool = self.makePool(1)
        self.reactor.advance(5)
        self.reactor.processes[0].exit(1)
        self.assertEqual(pool.workers[0].state, "waiting")
        self.reactor.advance(0)
        self.assertEqual(len(self.reactor.processes), 2)
        self.assertEqual(pool.workers[0].restarts, 1)
        self.assertEqual(pool.workers[0].lastExit, "exit status 1")

    def test_youngDeathsDoubleTheDelayUpToTheMaximum(self):
        pool = self.makePool(1)
        with capturedLogs() as events:
            delays = [self.youngDeath(pool.workers[0]) for _ in range(5)]
        self.assertEqual(delays, [1.0, 2.0, 4.0, 5.0, 5.0])
        said = [e["log_format"].format(**e) for e in events
                if "threshold" in e["log_format"]]
        self.assertEqual(len(said), 5)
        self.assertIn("exited with exit status 1 after 0.0 s, under the 1 s "
                      "threshold: restarting in 4 s", said[2])

    def test_waitsTheWholeDelay(self):
        pool = self.makePool(1)
        self.youngDeath(pool.workers[0])
        self.reactor.processes[-1].exit(1)
        self.reactor.advance(1.99)
        self.assertEqual(len(self.reactor.processes), 2)
        self.reactor.advance(0.01)
        self.assertEqual(len(self.reactor.processes), 3)

    def test_longLifeResetsTheDelay(self):
        pool = self.makePool(1)
        for _ in range(3):
            self.youngDeath(pool.workers[0])
        self.reactor.advance(1.0)  # lived the threshold
        self.reactor.processes[-1].exit(0)
        self.reactor.advance(0)
        self.assertEqual(len(self.reactor.processes), 5, "restarted at once")
        self.assertEqual(self.youngDeath(pool.workers[0]), 1.0)

    def test_deathBySignalIsAFailure(self):
        pool = self.makePool(1)
        self.reactor.processes[0].exit(signal=9)
        self.assertEqual(pool.workers[0].lastExit, "killed by signal 9")
        self.assertEqual(pool.workers[0].respawnCall.getTime(), 11.0)

    def test_recycleRespawnsAtOnceAndKeepsTheDelay(self):
        pool = self.makePool(1)
        self.youngDeath(pool.workers[0])          # delay is now 2
        self.reactor.processes[-1].exit(101)      # young, but recycled
        self.reactor.advance(0)
        self.assertEqual(len(self.reactor.processes), 3)
        self.assertEqual(self.youngDeath(pool.workers[0]), 2.0)

    def test_shutdownIsNotRespawned(self):
        pool = self.makePool(2)
        self.reactor.processes[0].exit(100)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.processes), 2)
        self.assertEqual(pool.workers[0].state, "exited")
        self.assertEqual(pool.workers[1].state, "starting")
        self.assertFalse(self.reactor.hasStopped)

    def test_everyWorkerShutDownStopsTheDaemon(self):
        self.makePool(2)
        self.reactor.processes[0].exit(100)
        self.reactor.processes[1].exit(100)
        self.assertTrue(self.reactor.hasStopped)

    def test_oneBadWorkerNeverStopsTheOthers(self):
        pool = self.makePool(2)
        good = pool.workers[1].process
        self.reactor.processes[1].ready()
        for _ in range(6):
            self.youngDeath(pool.workers[0])
        self.assertIs(pool.workers[1].process, good)
        self.assertEqual(self.reactor.processes[1].signals, [])
        self.assertEqual(good.state, "running")
        self.assertEqual(pool.workers[1].restarts, 0)
        self.assertEqual(pool.workers[0].restarts, 6)

    def test_spawnFailureBacksOff(self):
        reactor = self.reactor = FakeProcessReactor()
        pool = WorkerPool(makeConfig(), 1, reactor=reactor)
        reactor.spawnError = OSError(11, "Resource temporarily unavailable")
        pool.startService()
        reactor.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(pool.workers[0].state, "waiting")
        reactor.advance(1.0)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        reactor.spawnError = None
        reactor.advance(2.0)
        self.assertEqual(len(reactor.processes), 1)


class StopTests(PoolTestCase):
    def test_stopWaitsForEveryChild(self):
        pool = self.makePool(2)
        d = pool.stopService()
        self.assertEqual([p.signals for p in self.reactor.processes],
                         [["TERM"], ["TERM"]])
        self.assertEqual(pool.workers[0].state, "stopping")
        self.reactor.processes[0].exit(0)
        self.assertNoResult(d)
        self.reactor.processes[1].exit(0)
        self.successResultOf(d)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.processes), 2, "nothing respawned")
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_killAfterKillTime(self):
        pool = self.makePool(2)
        d = pool.stopService()
        self.reactor.processes[0].exit(0)
        self.reactor.advance(9.9)
        self.assertEqual(self.reactor.processes[1].signals, ["TERM"])
        with capturedLogs() as events:
            self.reactor.advance(0.1)
        self.assertEqual(self.reactor.processes[1].signals, ["TERM", "KILL"])
        self.assertIn("still running 10.0 s after TERM", events[0]["log_format"]
                      .format(**events[0]))
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stopCancelsPendingRespawns(self):
        pool = self.makePool(2)
        self.reactor.processes[0].exit(1)            # waits 1 s
        d = pool.stopService()
        self.reactor.processes[1].exit(0)
        self.successResultOf(d)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.processes), 2)
        self.assertEqual(pool.workers[0].state, "stopped")

    def test_stopBeforeEveryWorkerStarted(self):
        reactor = FakeProcessReactor()
        pool = WorkerPool(makeConfig(queue={"spawndelay": 1}), 3, reactor=reactor)
        pool.startService()
        reactor.advance(0)
        d = pool.stopService()
        reactor.processes[0].exit(0)
        self.successResultOf(d)
        reactor.advance(60)
        self.assertEqual(len(reactor.processes), 1)


class RollingRestartTests(PoolTestCase):
    def live(self):
        """Processes able to take work: ready and not told to stop."""
        return [p for p in self.reactor.processes
                if not p.ended and not p.signals and p.proto.ready]

    def test_oneAtATimeNeverBelowCapacity(self):
        pool = self.makePool(2)
        old0, old1 = self.reactor.processes
        old0.ready()
        old1.ready()
        d = pool.restart()
        self.assertTrue(pool.restarting)
        self.assertEqual(len(self.reactor.processes), 3)
        new0 = self.reactor.processes[2]
        self.assertEqual(new0.args[-1], "generic.0")
        self.assertEqual(old0.signals, [], "the old one runs until its "
                                           "replacement is ready")
        self.assertEqual(len(self.live()), 2)
        new0.ready()
        self.assertEqual(old0.signals, ["TERM"])
        self.assertEqual(len(self.reactor.processes), 4, "next slot started")
        new1 = self.reactor.processes[3]
        self.assertEqual(old1.signals, [])
        self.assertEqual(len(self.live()), 2)
        old0.exit(0)
        self.assertEqual(len(self.reactor.processes), 4, "a replaced worker "
                                                         "is not respawned")
        new1.ready()
        self.assertEqual(old1.signals, ["TERM"])
        old1.exit(0)
        self.assertEqual(self.successResultOf(d), [
            {"id": "generic.0", "old": old0.pid, "new": new0.pid},
            {"id": "generic.1", "old": old1.pid, "new": new1.pid}])
        self.assertEqual([w.process.transport for w in pool.workers], [new0, new1])
        self.assertFalse(pool.restarting)
        self.assertEqual([w.restarts for w in pool.workers], [0, 0])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_singleWorkerNeverDropsToZero(self):
        pool = self.makePool(1)
        old = self.reactor.processes[0]
        old.ready()
        d = pool.restart()
        self.assertEqual(len(self.live()), 1)
        self.reactor.processes[1].ready()
        self.assertEqual(len(self.live()), 1)
        old.exit(0)
        self.assertEqual(len(self.successResultOf(d)), 1)

    def test_failedReplacementKeepsTheOldWorker(self):
        pool = self.makePool(2)
        old0, old1 = self.reactor.processes
        old0.ready()
        d = pool.restart()
        self.reactor.processes[2].exit(1)
        failure = self.failureResultOf(d, ControlError)
        self.assertIn("the replacement for generic.0 exited before it was ready; "
                      f"it keeps pid {old0.pid}", str(failure.value))
        self.assertIs(pool.workers[0].process.transport, old0)
        self.assertEqual(old0.signals + old1.signals, [])
        self.assertEqual(len(self.reactor.processes), 3, "generic.1 untouched, "
                         "the failed replacement not respawned")
        self.assertFalse(pool.restarting)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.processes), 3)

    def test_replacementNotReadyInTime(self):
        pool = self.makePool(1)
        self.reactor.processes[0].ready()
        d = pool.restart()
        new = self.reactor.processes[1]
        self.reactor.advance(29.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.assertIn("was not ready within 30 s",
                      str(self.failureResultOf(d, ControlError).value))
        self.assertEqual(new.signals, ["TERM"])
        self.assertEqual(self.reactor.processes[0].signals, [])
        new.exit(0)
        self.assertIsNone(pool.workers[0].replacement)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_oneRestartAtATime(self):
        pool = self.makePool(1)
        pool.restart()
        self.failureResultOf(pool.restart(), ControlError)

    def test_oldWorkerDyingMidwayHandsOverToItsReplacement(self):
        pool = self.makePool(1)
        old = self.reactor.processes[0]
        d = pool.restart()
        new = self.reactor.processes[1]
        old.exit(1)
        self.assertIs(pool.workers[0].process.transport, new)
        self.reactor.advance(20)
        self.assertEqual(len(self.reactor.processes), 2, "no respawn on top")
        new.ready()
        self.assertEqual(self.successResultOf(d),
                         [{"id": "generic.0", "old": old.pid, "new": new.pid}])
        self.assertEqual(new.signals, [])

    def test_emptySlotsAreSkipped(self):
        pool = self.makePool(2)
        self.reactor.processes[0].exit(1)           # slot 0 waits to respawn
        d = pool.restart()
        self.assertEqual(self.reactor.processes[2].args[-1], "generic.1")
        self.reactor.processes[2].ready()
        self.assertEqual([r["id"] for r in self.successResultOf(d)], ["generic.1"])

    def test_stopDuringRestartStopsEverything(self):
        pool = self.makePool(1)
        d = pool.restart()
        stopped = pool.stopService()
        self.assertEqual([p.signals for p in self.reactor.processes],
                         [["TERM"], ["TERM"]])
        for process in self.reactor.processes:
            process.exit(0)
        self.successResultOf(stopped)
        self.failureResultOf(d, ControlError)
        self.failureResultOf(pool.restart(), ControlError)


class StatusTests(PoolTestCase):
    def test_rows(self):
        pool = self.makePool(2)
        self.reactor.advance(5)
        self.reactor.processes[0].report(state="running", handled=7, rss=1 << 20)
        self.reactor.processes[1].exit(signal=9)
        rows = pool.status()
        self.assertEqual(rows[0]["id"], "generic.0")
        self.assertEqual(rows[0]["pid"], 1000)
        self.assertEqual(rows[0]["state"], "running")
        self.assertEqual(rows[0]["uptime"], 5.0)
        self.assertEqual(rows[0]["report"], {"state": "running", "handled": 7,
                                             "rss": 1 << 20})
        self.assertEqual(rows[1], {"id": "generic.1", "role": "current",
                                   "state": "waiting", "restarts": 1,
                                   "last_exit": "killed by signal 9",
                                   "respawn_in": 0.0})

    def test_childReportsStopping(self):
        pool = self.makePool(1)
        self.reactor.processes[0].ready()
        self.reactor.processes[0].report(state="stopping")
        self.assertEqual(pool.workers[0].state, "stopping")

    def test_terminatedStaysStopping(self):
        pool = self.makePool(1)
        pool.stopService()
        self.reactor.processes[0].ready()
        self.assertEqual(pool.workers[0].state, "stopping")


class ChildOutputTests(PoolTestCase):
    def test_linesLoggedTaggedAtTheirLevel(self):
        self.makePool(1)
        proto = self.reactor.processes[0].proto
        with capturedLogs() as events:
            proto.childDataReceived(2, b"warn slow {remote}\ninfo one")
            proto.childDataReceived(2, b" line\nTraceback (most recent")
            proto.childDataReceived(1, b"printed\n")
            self.reactor.processes[0].exit(0)
        lines = [(e["log_level"], e["log_system"], e["line"]) for e in events
                 if "line" in e]
        self.assertEqual(lines, [
            (LogLevel.warn, "generic.0:1000#warn", "slow {remote}"),
            (LogLevel.info, "generic.0:1000#info", "one line"),
            (LogLevel.info, "generic.0:1000#info", "printed"),
            (LogLevel.error, "generic.0:1000#error", "Traceback (most recent"),
        ])

    def test_channelWritesToFd3(self):
        self.makePool(1)
        process = self.reactor.processes[0]
        process.proto.channel.callRemote(Report, report={})
        self.assertIn(b"Report", process.written[3])
        process.proto.channel.transport.loseConnection()
        self.assertIn(3, process.closed)

    def test_deathsAnsweredByTheReaper(self):
        """A worker's question about a redelivered message (STOMP)."""
        pool = self.makePool(2)
        asked = []

        class Reaper:
            def deathsOf(self, key, asker):
                asked.append((key, asker))
                return defer.succeed(3)

        child = Channel()
        transport = StringTransport()
        child.makeConnection(transport)
        process = self.reactor.processes[1]

        def ask():
            answers = []
            child.callRemote(Deaths, key=b"5f2a").addCallback(answers.append)
            process.proto.childDataReceived(4, transport.value())
            transport.clear()
            child.dataReceived(process.written.pop(3))
            return answers

        self.assertEqual(ask(), [{"deaths": 0}], "no reaper: nothing counted")
        pool.reaper = Reaper()
        self.assertEqual(ask(), [{"deaths": 3}])
        self.assertEqual(asked, [(b"5f2a", process.proto)])

    def test_reportArrivesInPieces(self):
        pool = self.makePool(1)
        child = Channel()
        transport = StringTransport()
        child.makeConnection(transport)
        child.callRemote(Report, report={"state": "running", "counts": [
            ["handled", "webhook", f"site{n}", n] for n in range(5000)]})
        data = transport.value()
        self.assertGreater(len(data), 0xFFFF, "more than one AMP value")
        proto = self.reactor.processes[0].proto
        for start in range(0, len(data), 1000):
            proto.childDataReceived(4, data[start:start + 1000])
        self.assertEqual(len(pool.workers[0].process.report["counts"]), 5000)
        self.assertTrue(pool.workers[0].process.ready)
