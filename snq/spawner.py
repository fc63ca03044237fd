# -*- test-case-name: tests.test_forkserver -*-
"""
How the pool (L{snq.pool}) starts a worker process: L{ExecSpawner} runs a
fresh C{python -m snq.child}; L{ForkSpawner} asks a template process that
has imported everything already (L{snq.forkserver}) to fork one, and
spawns while no template is ready.  Either way the pool gets a process
transport with the same pipes, signals and end (C{processEnded} with the
exit status), so its logic (backoff, exit statuses, rolling restarts) is
the same for both.
"""

import contextlib
import json
import os
import signal
import socket
import sys

from twisted.internet import defer, error, process, protocol
from twisted.logger import Logger

from snq.forkserver import TEMPLATE_FD
from snq.service import defaultReactor

#: Seconds the master waits for the template's answer to one fork.
FORK_TIMEOUT = 5.0


class ExecSpawner:
    """Each worker a fresh interpreter: C{reactor.spawnProcess}."""

    def __init__(self, reactor=None):
        self.reactor = defaultReactor(reactor)

    def start(self, config) -> defer.Deferred:
        return defer.succeed(None)

    def renew(self, config) -> defer.Deferred:
        return defer.succeed(None)

    def stop(self) -> defer.Deferred:
        return defer.succeed(None)

    def spawn(self, proto, command, childFDs):
        return self.reactor.spawnProcess(proto, command[0], command, env=None,
                                         childFDs=childFDs)


class ForkedProcess(process.Process):
    """
    Twisted's process transport for a worker the template forked: the same
    pipes, but the fork is the template's, and so is the wait for its end
    (L{_Template.outReceived}).
    """

    def __init__(self, reactor, template, command, childFDs, proto):
        self._template = template
        self._command = command
        super().__init__(reactor, command[0], command, None, None, proto,
                         childFDs=childFDs)

    def _fork(self, path, uid, gid, executable, args, environment, fdmap):
        self.pid = self._template.fork(self._command, fdmap)
        self._template.forked[self.pid] = self

    def reapProcess(self):
        """Not our child: the template reports its end."""


def _notReaped(pid, process_):
    """Instead of Twisted's: a forked worker is no child of ours to wait for."""


class _Template(protocol.ProcessProtocol):
    """The master's side of one template process."""

    log = Logger()

    def __init__(self):
        #: Its workers, by pid, until their ends are reported.
        self.forked: dict = {}
        #: Fires with True once it serves, False if it could not load.
        self.ready = defer.Deferred()
        self.gone = defer.Deferred()
        self.socket, self.theirs = socket.socketpair(socket.AF_UNIX,
                                                     socket.SOCK_SEQPACKET)
        self.socket.settimeout(FORK_TIMEOUT)
        self.serving = False
        self._partial = b""
        self._requests = 0

    def connectionMade(self):
        self.theirs.close()

    def outReceived(self, data):
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            word, *rest = line.decode("utf-8", "replace").split() or [""]
            if word in ("ready", "failed") and not self.ready.called:
                self.serving = word == "ready"
                self.ready.callback(self.serving)
            elif word == "exit":
                self._ended(int(rest[0]), int(rest[1]))

    def errReceived(self, data):
        for line in data.decode("utf-8", "replace").splitlines():
            self.log.warn("fork server: {line}", line=line)

    def _ended(self, pid, status):
        forked = self.forked.pop(pid, None)
        if forked is not None:
            forked.processEnded(status)

    def fork(self, command, fdmap) -> int:
        """
        A worker running C{command}'s arguments (after C{python -m
        snq.child}) on these descriptors → its pid.  Blocks for the answer
        (at most L{FORK_TIMEOUT}): a fork takes milliseconds.
        """
        if not self.serving:
            raise error.ProcessExitedAlready("the fork server is not serving")
        self._requests += 1
        targets = sorted(fdmap)
        request = {"id": self._requests, "args": command[3:], "fds": targets}
        socket.send_fds(self.socket, [json.dumps(request).encode()],
                        [fdmap[t] for t in targets])
        answer = {"id": None}
        while answer.get("id") not in (self._requests, "gone"):
            # An answer to a request that timed out is passed over.
            answer = json.loads(self.socket.recv(65536) or b'{"id": "gone"}')
        if "pid" not in answer:
            raise OSError("the fork server could not fork: "
                          + answer.get("error", "it has gone"))
        return answer["pid"]

    def retire(self):
        """No more forks: it exits once its workers are gone."""
        self.serving = False
        self.socket.close()

    def processEnded(self, reason):
        self.serving = False
        if not self.ready.called:
            self.ready.callback(False)
        # Its workers die with it (their parent death signal); their ends
        # will not be reported: they end here.
        for pid in list(self.forked):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._ended(pid, signal.SIGKILL)
        self.socket.close()
        self.gone.callback(None)


class ForkSpawner:
    """
    Workers forked from a template that imported what the config's workers
    import; spawned (L{ExecSpawner}) while no template serves.  A rolling
    restart (L{renew}) starts a new template first, so that new handler
    code is what the new workers run; the old one exits with its last
    worker.  A template that dies is started again after C{restartDelay}.
    """

    log = Logger()

    def __init__(self, reactor=None, startTimeout: float = 30.0,
                 restartDelay: float = 1.0):
        self.reactor = defaultReactor(reactor)
        self.startTimeout = startTimeout
        self.restartDelay = restartDelay
        self.fallback = ExecSpawner(self.reactor)
        self.template: _Template | None = None
        self.retired: list[_Template] = []
        self.config = None
        self._restartCall = None

    def start(self, config) -> defer.Deferred:
        """Fires once a template serves, or could not (then workers spawn)."""
        self.config = config
        template = _Template()
        command = [sys.executable, "-m", "snq.forkserver"]
        if config.source is not None:
            command += ["--config", os.path.abspath(config.source)]
        try:
            transport = self.reactor.spawnProcess(
                template, sys.executable, command, env=None,
                childFDs={0: "w", 1: "r", 2: "r",
                          TEMPLATE_FD: template.theirs.fileno()})
        except Exception:
            self.log.failure("cannot start the fork server; workers are spawned")
            template.socket.close()
            template.theirs.close()
            return defer.succeed(None)
        transport.writeToChild(0, config.text or b"")
        transport.closeStdin()
        d = template.ready
        d.addTimeout(self.startTimeout, self.reactor)

        def started(ready):
            old, self.template = self.template, template
            if old is not None:
                self._retire(old)
            if ready:
                template.gone.addCallback(self._died, template)
            self.log.info("fork server (pid {pid}) {how}", pid=transport.pid,
                          how="ready" if ready else
                          "could not load the config; workers are spawned")

        def failed(failure):
            failure.trap(defer.TimeoutError)
            self.log.error("the fork server was not ready within {t:g} s; "
                           "workers are spawned", t=self.startTimeout)
            with contextlib.suppress(error.ProcessExitedAlready):
                transport.signalProcess("KILL")

        return d.addCallbacks(started, failed)

    def _died(self, _, template):
        if template is not self.template:
            return
        self.template = None
        self.log.warn("the fork server has exited; workers are spawned until "
                      "it is back, in {delay:g} s", delay=self.restartDelay)
        self._restartCall = self.reactor.callLater(
            self.restartDelay, self.start, self.config)

    def renew(self, config) -> defer.Deferred:
        """A template that has imported the code as it is now."""
        return self.start(config)

    def _retire(self, template):
        template.retire()
        if not template.gone.called:
            self.retired.append(template)
            template.gone.addCallback(lambda _: self.retired.remove(template))

    def stop(self) -> defer.Deferred:
        """Retire every template and wait until they are gone."""
        if self._restartCall is not None and self._restartCall.active():
            self._restartCall.cancel()
        if self.template is not None:
            self._retire(self.template)
            self.template = None
        return defer.gatherResults([t.gone for t in self.retired])

    def spawn(self, proto, command, childFDs):
        template = self.template
        if template is None or not template.serving:
            return self.fallback.spawn(proto, command, childFDs)
        # Process.__init__ would wait for it as for a child of ours.
        registered = process.registerReapProcessHandler
        process.registerReapProcessHandler = _notReaped
        try:
            return ForkedProcess(self.reactor, template, command, childFDs, proto)
        finally:
            process.registerReapProcessHandler = registered
