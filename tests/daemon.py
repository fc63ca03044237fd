"""
Running a real C{twistd -n snq} in a test: start it, wait for a log line,
signal it, and make sure it never outlives the test.
"""

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def environ(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env.pop("SNQ_CONFIG", None)
    env.update(extra)
    return env


def snqctl(*args, cwd, stdin=None, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "snq.scripts.snqctl", *args], cwd=cwd,
        input=stdin, capture_output=True, text=True, env=environ(), timeout=120)
    if check and result.returncode:
        raise AssertionError(f"snqctl {args} failed: {result.stderr}")
    return result


class Daemon:
    """
    One twistd process; C{testCase.addCleanup} kills it whatever happens.
    C{env}: more environment variables (as L{environ} takes them);
    C{wrap}: what runs it (L{tests.netns.Host.command}, say).
    """

    def __init__(self, testCase, cwd, *args, env=None, wrap=lambda c: c):
        self.cwd = cwd
        self.logPath = os.path.join(cwd, f"twistd-{time.monotonic_ns()}.log")
        self.log = open(self.logPath, "w")  # noqa: SIM115 (closed in kill)
        self.process = subprocess.Popen(
            wrap([*TWISTD, "-n", "--pidfile=", "snq", *args]), cwd=cwd,
            stdout=self.log, stderr=subprocess.STDOUT, env=environ(**(env or {})))
        testCase.addCleanup(self.kill)

    def output(self):
        with open(self.logPath) as f:
            return f.read()

    def kill(self, sig=signal.SIGKILL):
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(30)
        self.log.close()

    def alive(self):
        return self.process.poll() is None

    def crash(self):
        """
        SIGKILL the master and every process under it at once, as a power
        cut would: killed alone, the master's workers would see it gone and
        stop gracefully, putting back what they held.
        """
        os.kill(self.process.pid, signal.SIGSTOP)
        for pid in descendants(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.kill()


def children(pid: int) -> list[int]:
    """C{pid}'s child processes, from C{/proc} (none once it is gone)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def descendants(pid: int) -> list[int]:
    """The processes under C{pid}, children first."""
    below = children(pid)
    return below + [d for child in below for d in descendants(child)]


@defer.inlineCallbacks
def waitFor(condition, timeout=60.0, interval=0.05, what="condition"):
    """Poll C{condition} on the real reactor until true, or fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        yield deferLater(reactor, interval, lambda: None)


@defer.inlineCallbacks
def startMonitored(testCase, cwd, config, workers=2):
    """
    A daemon on C{config}, whose C{[monitor] http} is on port 0; → it and
    the base URL of its HTTP side, once its workers are ready.
    """
    daemon = Daemon(testCase, cwd, "-c", config)
    found = []

    def listening():
        found[:] = re.findall(r"http://127\.0\.0\.1:(\d+)/", daemon.output())
        return bool(found)

    yield waitFor(listening, what="the monitor's HTTP port in the log")
    yield waitFor(lambda: daemon.output().count("is ready") == workers,
                  what=f"{workers} workers ready")
    return daemon, f"http://127.0.0.1:{found[0]}/"


def _ephemeralLow() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_given = set()


def freePort() -> int:
    """
    A port on 127.0.0.1 that nothing listens on (for the moment), below the
    kernel's ephemeral range: a server that binds it seconds later (a broker
    booting) must not find it taken as the source port of some outgoing
    connection, which a port the kernel handed out for bind(0) can be.
    """
    low = _ephemeralLow()
    while True:
        port = random.randrange(max(1024, low - 12000), low)
        if port in _given:
            continue
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            s.close()
        _given.add(port)
        return port


@defer.inlineCallbacks
def daemonStatus(sock):
    """What C{snqctl status --json} shows, asked over the control socket."""
    from snq.amp import Status
    from snq.control import connect

    client = yield connect(sock, reactor)
    try:
        return (yield client.callRemote(Status))["status"]
    finally:
        client.transport.loseConnection()
        yield client.lost


def socketPath(testCase):
    """
    A control socket path for a test.  Not under trial's temp directory: a
    UNIX socket path must stay under about 100 bytes.
    """
    directory = tempfile.mkdtemp(prefix="snq-test-")
    testCase.addCleanup(shutil.rmtree, directory, True)
    return os.path.join(directory, "snq.sock")


def handledIds(path):
    """The ids in a L{tests.recorder.Record} file, in the order handled."""
    from tests.recorder import recorded

    return [itemId for itemId, *_ in recorded(path)]
