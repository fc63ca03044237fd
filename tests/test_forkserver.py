# -*- test-case-name: tests.test_forkserver -*-
"""
Starting workers: the pool's use of a spawner, L{snq.spawner.ForkSpawner}
on a fake process reactor, and the fork server (L{snq.forkserver}) under
a real C{twistd -n snq}: workers forked from the template, kill -9 of
workers in a loop with nothing lost, kill -9 of the template and of the
master.
"""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

from twisted.internet import defer, reactor, threads
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from snq.client import Producer
from snq.forkserver import TEMPLATE_FD, prepare
from snq.pool import JOURNAL, WorkerPool
from snq.spawner import ExecSpawner, ForkSpawner
from tests.daemon import Daemon, children, handledIds, waitFor
from tests.test_pool import FakeProcessReactor, makeConfig
from tests.test_pool_integration import CONFIG, PoolTestCase, alive
from tests.test_redis import REDIS_URL, RedisFixture

#: Above any pid_max: signalling it finds no process.
NO_SUCH_PID = 2**30


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:  # gone meanwhile
        return ""


class RecordingSpawner:
    """What the pool asks of its spawner, in order; spawns on the fake."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.calls = []
        self.started = defer.Deferred()

    def start(self, config):
        self.calls.append("start")
        return self.started

    def renew(self, config):
        self.calls.append("renew")
        return defer.succeed(None)

    def stop(self):
        self.calls.append("stop")
        return defer.succeed(None)

    def spawn(self, proto, command, childFDs):
        self.calls.append(("spawn", command[-1], sorted(childFDs)))
        return self.reactor.spawnProcess(proto, command[0], command,
                                         childFDs=childFDs)


class PoolSpawnerTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = FakeProcessReactor()
        self.spawner = RecordingSpawner(self.reactor)
        self.pool = WorkerPool(makeConfig(), 2, reactor=self.reactor,
                               spawner=self.spawner)

    def test_workersWaitForTheSpawner(self):
        """No worker before the template is ready (or known not to be)."""
        self.pool.startService()
        self.reactor.advance(10)
        self.assertEqual(self.spawner.calls, ["start"])
        self.spawner.started.callback(None)
        self.reactor.advance(10)
        self.assertEqual(self.spawner.calls, [
            "start", ("spawn", "generic.0", [0, 1, 2, 3, 4, JOURNAL]),
            ("spawn", "generic.1", [0, 1, 2, 3, 4, JOURNAL])])

    def test_stopAfterTheWorkers(self):
        self.spawner.started.callback(None)
        self.pool.startService()
        self.reactor.advance(10)
        d = self.pool.stopService()
        self.assertNotIn("stop", self.spawner.calls)
        for process in self.reactor.processes:
            process.exit(0)
        self.successResultOf(d)
        self.assertEqual(self.spawner.calls[-1], "stop")

    def test_rollingRestartRenewsFirst(self):
        """New processes run the code as it is now, not the template's."""
        self.spawner.started.callback(None)
        self.pool.startService()
        self.reactor.advance(10)
        for process in self.reactor.processes:
            process.ready()
        self.pool.restart()
        self.assertEqual(self.spawner.calls[3:5],
                         ["renew", ("spawn", "generic.0", [0, 1, 2, 3, 4, JOURNAL])])


    def test_forkServerFollowsAReload(self):
        """[daemon] fork_server reloaded: the next processes start the new way."""
        pool = WorkerPool(makeConfig(daemon={"fork_server": False}), 1,
                          reactor=self.reactor)
        d = pool._replaceSpawner(makeConfig(daemon={"fork_server": True}))
        template = self.reactor.processes[-1]
        self.addCleanup(template.proto.socket.close)
        self.assertEqual(template.args[1:3], ["-m", "snq.forkserver"])
        template.proto.outReceived(b"ready\n")
        self.assertEqual(self.successResultOf(d), "daemon.fork_server: new "
                         "workers are forked from a template")
        self.assertIsInstance(pool.spawner, ForkSpawner)
        d = pool._replaceSpawner(makeConfig(daemon={"fork_server": False}))
        self.assertEqual(self.successResultOf(d),
                         "daemon.fork_server: new workers are spawned")
        self.assertIsInstance(pool.spawner, ExecSpawner)
        self.assertFalse(template.proto.serving, "the template is retired")


class _Forked:
    """Stands for a ForkedProcess: what ended it."""

    def __init__(self):
        self.status = None

    def processEnded(self, status):
        self.status = status


class ForkSpawnerTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = FakeProcessReactor()
        self.spawner = ForkSpawner(self.reactor, startTimeout=5, restartDelay=1)
        self.config = dataclasses.replace(makeConfig(source="/etc/snq.toml"),
                                          text=b"[daemon]\n")

    def start(self):
        d = self.spawner.start(self.config)
        template = self.reactor.processes[-1]
        return d, template

    def tearDown(self):
        for template in [self.spawner.template, *self.spawner.retired]:
            if template is not None:
                template.socket.close()

    def test_templateCommand(self):
        d, template = self.start()
        self.assertEqual(template.args, [sys.executable, "-m", "snq.forkserver",
                                         "--config", "/etc/snq.toml"])
        self.assertEqual(template.written, {0: b"[daemon]\n"})
        self.assertIn(0, template.closed)
        self.assertIsInstance(template.childFDs[TEMPLATE_FD], int)
        self.assertNoResult(d)
        template.proto.outReceived(b"rea")
        template.proto.outReceived(b"dy\n")
        self.successResultOf(d)
        self.assertIs(self.spawner.template, template.proto)
        self.assertTrue(template.proto.serving)

    def test_spawnsUntilReady(self):
        """Before the template serves, or when it could not load: spawned."""
        d, template = self.start()
        proto = ProcessProtocol()
        self.spawner.spawn(proto, [sys.executable, "-m", "snq.child", "--id", "x"],
                           {0: "w"})
        self.assertEqual(self.reactor.processes[-1].args[-1], "x")
        with capturedLogs() as events:
            template.proto.outReceived(b"failed\n")
        self.successResultOf(d)
        self.assertIn("could not load the config", formatEvent(events[-1]))
        self.spawner.spawn(proto, [sys.executable, "-m", "snq.child", "--id", "y"],
                           {0: "w"})
        self.assertEqual(self.reactor.processes[-1].args[-1], "y")

    def test_startTimeout(self):
        d, template = self.start()
        with capturedLogs() as events:
            self.reactor.advance(5)
        self.assertIn("not ready within 5 s", formatEvent(events[-1]))
        self.successResultOf(d)
        self.assertEqual(template.signals, ["KILL"])
        self.assertIsNone(self.spawner.template)

    def test_templateExitLinesEndWorkers(self):
        _d, template = self.start()
        template.proto.outReceived(b"ready\n")
        forked = template.proto.forked[1234] = _Forked()
        template.proto.outReceived(b"exit 1234 25600\n")  # exit status 100
        self.assertEqual(forked.status, 25600)
        self.assertEqual(template.proto.forked, {})

    def test_deadTemplateEndsItsWorkersAndComesBack(self):
        _d, template = self.start()
        template.proto.outReceived(b"ready\n")
        forked = template.proto.forked[NO_SUCH_PID] = _Forked()
        with capturedLogs() as events:
            template.exit(signal=9)
        self.assertEqual(forked.status, signal.SIGKILL)
        self.assertIsNone(self.spawner.template)
        self.assertIn("the fork server has exited",
                      " ".join(formatEvent(e) for e in events))
        self.reactor.advance(1)
        self.assertEqual(len(self.reactor.processes), 2)
        self.assertEqual(self.reactor.processes[-1].args[2], "snq.forkserver")

    def test_renewRetiresTheOldOne(self):
        """The old template serves no more forks; stop waits for both."""
        _, old = self.start()
        old.proto.outReceived(b"ready\n")
        _d, new = self.start()
        self.assertIs(self.spawner.template, old.proto, "until the new one is ready")
        new.proto.outReceived(b"ready\n")
        self.assertIs(self.spawner.template, new.proto)
        self.assertFalse(old.proto.serving)
        self.assertEqual(old.proto.socket.fileno(), -1)
        stopped = self.spawner.stop()
        old.exit(0)
        self.assertNoResult(stopped)
        new.exit(0)
        self.successResultOf(stopped)
        self.assertEqual(len(self.reactor.processes), 2, "no restart after stop")
        self.reactor.advance(5)
        self.assertEqual(len(self.reactor.processes), 2)


class TemplateTests(SynchronousTestCase):
    """C{python -m snq.forkserver} alone, its socket and pipes driven here."""

    def setUp(self):
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.addCleanup(self.sock.close)
        self.template = subprocess.Popen(
            [sys.executable, "-m", "snq.forkserver"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, close_fds=False,  # else fd 3 is closed again
            preexec_fn=lambda: os.dup2(theirs.fileno(), TEMPLATE_FD))
        theirs.close()
        self.addCleanup(self.template.kill)
        self.template.stdin.write(b"[daemon]\nworkers = 1\n")
        self.template.stdin.close()
        self.assertEqual(self.template.stdout.readline(), b"ready\n")

    def fork(self, n, args, fds):
        targets = sorted(fds)
        socket.send_fds(self.sock, [json.dumps(
            {"id": n, "args": args, "fds": targets}).encode()],
            [fds[t] for t in targets])
        return json.loads(self.sock.recv(65536))

    def test_forkOnPipesReportEndExitWithTheLast(self):
        """The worker runs on the descriptors sent; its end is reported."""
        stdinR, stdinW = os.pipe()
        stdoutR, stdoutW = os.pipe()
        os.write(stdinW, b'[handlers]\nx = "no_such_module:H"\n')
        os.close(stdinW)
        answer = self.fork(1, ["--check", "--config", "x.toml"],
                           {0: stdinR, 1: stdoutW})
        os.close(stdinR)
        os.close(stdoutW)
        self.assertEqual(answer["id"], 1)
        with os.fdopen(stdoutR) as out:
            self.assertIn("handlers.x: cannot load no_such_module:H", out.read())
        # Exit status 1 (problems found): the raw wait status is 256.
        self.assertEqual(self.template.stdout.readline(),
                         f"exit {answer['pid']} 256\n".encode())
        self.sock.close()
        self.assertEqual(self.template.wait(30), 0)

    def test_badRequestAnswered(self):
        answer = self.fork(7, ["--check"], {})
        self.assertEqual(answer["id"], 7)
        self.assertIn("ValueError", answer["error"])


class PrepareTests(SynchronousTestCase):
    def test_everyBackend(self):
        """
        What a worker imports loads, whichever the backend (no server
        needed), in a fresh interpreter as in the template: TLS not loaded
        yet.
        """
        for backend in ("redis", "stomp", "db"):
            result = subprocess.run(
                [sys.executable, "-c", "import sys; from snq.forkserver import "
                 "prepare; print(prepare(sys.stdin.buffer.read(), 'x.toml'))"],
                input=f'[queue]\nbackend = "{backend}"\n'.encode(),
                capture_output=True, timeout=120)
            self.assertEqual(result.stdout, b"[]\n", (backend, result.stderr))

    def test_problemsOfTheConfig(self):
        problems = prepare(b'[handlers]\nx = "no_such_module:H"\n', "x.toml")
        self.assertEqual(len(problems), 1)
        self.assertIn("handlers.x: cannot load no_such_module:H", problems[0])


class ForkServerMixin:
    """A real master with its fork server (on by default)."""

    def family(self, daemon):
        """→ (the master's fork server children, all its children)."""
        below = children(daemon.process.pid)
        templates = [p for p in below
                     if "snq.forkserver" in read(f"/proc/{p}/cmdline")]
        return templates, below

    @defer.inlineCallbacks
    def test_workersAreForkedFromTheTemplate(self):
        daemon = self.daemon()
        workers = yield self.allRunning()
        templates, below = self.family(daemon)
        self.assertEqual(len(templates), 1)
        self.assertEqual(below, templates, "the workers are not the master's")
        for worker in workers:
            with open(f"/proc/{worker['pid']}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            self.assertEqual(parent, templates[0])

    @defer.inlineCallbacks
    def test_killDashNineInALoopLosesNothing(self):
        daemon = self.daemon()
        yield self.allRunning()
        ids = set()
        feeder = LoopingCall(lambda: threads.deferToThread(
            self.enqueue, "record", 5, {"sleep": 0.01}).addCallback(ids.update))
        feeder.start(0.05)
        self.addCleanup(lambda: feeder.running and feeder.stop())
        took = []
        for n in range(5):
            workers = yield self.allRunning()
            yield deferLater(reactor, 1.2, lambda: None)  # past the threshold
            victim = workers[n % 2]["pid"]
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            yield self.waitForWorkers(
                lambda ws, victim=victim: len(ws) == 2 and victim not in
                [w["pid"] for w in ws] and all(w["state"] == "running" for w in ws),
                what="a replacement running")
            took.append(time.monotonic() - killed)
        feeder.stop()
        yield deferLater(reactor, 0.2, lambda: None)
        yield waitFor(lambda: ids <= set(handledIds(self.record)), timeout=60,
                      what="every item handled")
        templates, below = self.family(daemon)
        self.assertEqual(below, templates, "every replacement was forked too")
        self.assertGreater(len(ids), 100)
        print(f"\nkill -9 → replacement running: {sorted(took)}")

    @defer.inlineCallbacks
    def test_killDashNineOfTheTemplate(self):
        """Its workers go with it, and come back; the items are handled."""
        daemon = self.daemon()
        before = yield self.allRunning()
        ids = self.enqueue("record", 40, {"sleep": 0.05})
        templates, _ = self.family(daemon)
        os.kill(templates[0], signal.SIGKILL)
        yield waitFor(lambda: not any(alive(w["pid"]) for w in before), timeout=10,
                      what="the template's workers to die with it")
        yield waitFor(lambda: ids <= set(handledIds(self.record)), timeout=60,
                      what="every item handled")
        yield self.allRunning()
        yield waitFor(lambda: len(self.family(daemon)[0]) == 1
                      and self.family(daemon)[0] != templates, timeout=30,
                      what="a new template")



class ForkServerIntegrationTests(ForkServerMixin, PoolTestCase):
    """On SQLite."""

    @defer.inlineCallbacks
    def test_killDashNineOfTheMaster(self):
        master = self.daemon()
        workers = yield self.allRunning()
        templates, _ = self.family(master)
        self.enqueue("record", 100, {"sleep": 0.1})
        yield waitFor(lambda: handledIds(self.record), what="work under way")
        master.kill(signal.SIGKILL)
        pids = [w["pid"] for w in workers] + templates
        yield waitFor(lambda: not any(alive(pid) for pid in pids), timeout=10,
                      interval=0.02, what="workers and template to exit")

    @defer.inlineCallbacks
    def test_withoutForkServer(self):
        """fork_server = false: every worker a fresh child of the master."""
        path = os.path.join(self.dir, "snq.toml")
        with open(path, "w") as f:
            f.write(CONFIG.format(dir=self.dir, sock=self.sock, queue="").replace(
                "[daemon]\n", "[daemon]\nfork_server = false\n"))
        daemon = Daemon(self, self.dir, "-c", path)
        workers = yield self.allRunning()
        templates, below = self.family(daemon)
        self.assertEqual(templates, [])
        self.assertEqual(sorted(below), sorted(w["pid"] for w in workers))


REDIS_CONFIG = """
[daemon]
workers = 2
threshold = 1
control_socket = "{sock}"

[queue]
backend = "redis"

[redis]
url = "{url}"
prefix = "{prefix}"

[monitor]
http = ""

[handlers]
record = "tests.recorder:Record"

[sites.default]
record_file = "{dir}/handled.txt"
"""


class RedisForkServerTests(RedisFixture, ForkServerMixin, PoolTestCase):
    """On Redis, whose client library installs the reactor as it loads."""

    @defer.inlineCallbacks
    def setUp(self):
        yield self.setUpRedis()
        PoolTestCase.setUp(self)

    def daemon(self, queue="", *args):
        path = os.path.join(self.dir, "snq.toml")
        with open(path, "w") as f:
            f.write(REDIS_CONFIG.format(sock=self.sock, url=REDIS_URL,
                                        prefix=self.prefix, dir=self.dir))
        self.config = path
        return Daemon(self, self.dir, "-c", path, *args)

    def enqueue(self, transport, n, payload=None, site="default"):
        producer = Producer.from_config(self.config)
        try:
            return set(producer.enqueue_many(transport, [payload or {}] * n,
                                             site=site))
        finally:
            producer.close()
