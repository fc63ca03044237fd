# -*- test-case-name: tests.test_reload -*-
"""
Reloading the config file of a running daemon: on SIGHUP, C{snqctl
reload} (L{snq.amp.Reload}) and the STOMP control channel's
C{update:<site>} (a worker asks the master, L{snq.amp.RequestReload}).

The master reads the file once, validates the text, and has a fresh
interpreter load what a worker would (C{python -m snq.child --check}: the
handlers' code, the queue's settings), so that a bad edit changes nothing:
the daemon runs on, and the log (and C{snqctl reload}) says exactly why.
Otherwise L{snq.reconfig.diff} says what changed and how it can be
applied.  Each part then changes only what changed, in the manner of
buildbot's C{reconfigService}: the master's own (monitors, the control
socket, the pool's slots and timings), then the workers, which get the
same text over AMP and apply it in place
(L{snq.iomaster.IoMaster.reconfigService}).  What cannot change in a
running worker (another backend, other handler code, the daemon id) is
applied by a rolling restart instead: one worker at a time, each
replacement ready before its predecessor stops.

One reload runs at a time; requests that come meanwhile are served
together by one more reload once it is over, which reads the file again.
"""

import os
import signal
import sys

from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.logger import Logger

from snq import config as snqconfig
from snq.amp import ControlError
from snq.reconfig import ROLLING, diff, stamped
from snq.service import PartlyApplied, SignalHandler, defaultReactor

#: Seconds the check of a new config may take (a fresh interpreter that
#: imports the handlers).
CHECK_TIMEOUT = 60.0


def _absolute(source: str | None) -> str | None:
    """The file reloads read, absolute: twistd may change directory."""
    return os.path.abspath(source) if source is not None else None


class ReloadError(ControlError):
    """A reload that changed nothing; C{problems} are the lines saying why."""

    def __init__(self, problems: list[str]):
        super().__init__("invalid configuration, nothing changed:\n"
                         + "\n".join(problems))
        self.problems = problems


class _Check(protocol.ProcessProtocol):
    """C{python -m snq.child --check}: the text on stdin, problems out."""

    def __init__(self, text: bytes):
        self.text = text
        self.output = b""
        self.ended = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.text)
        self.transport.closeStdin()

    def outReceived(self, data):
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback((reason.value.exitCode, self.output))


@defer.inlineCallbacks
def checkInWorker(text: bytes, source: str, reactor) -> list[str]:
    """
    The problems a worker would have with this config, found by a fresh
    interpreter (the master imports no handler code: it could not see a
    module's new version anyway).
    """
    check = _Check(text)
    process = reactor.spawnProcess(check, sys.executable, checkArguments(source),
                                   env=None)
    timer = reactor.callLater(CHECK_TIMEOUT, process.signalProcess, "KILL")
    code, output = yield check.ended
    if timer.active():
        timer.cancel()
    return checkProblems(code, output, source)


def checkArguments(source: str) -> list[str]:
    """The command of the check (L{snq.child}'s C{--check}), text on stdin."""
    return [sys.executable, "-m", "snq.child", "--check", "--config", source]


def checkProblems(code: int | None, output: bytes, source: str) -> list[str]:
    """What the check's exit status and output say is wrong."""
    if code == 0:
        return []
    lines = [line for line in output.decode("utf-8", "replace").splitlines()
             if line.strip()]
    return lines or [f"{source}: checking it in a fresh process failed "
                     f"(exit status {code})"]


def refuse(log, problems: list[str]):
    """Nothing changes: say why, and raise L{ReloadError}."""
    if problems:
        log.error("reload refused, the daemon runs on as it was: {problems}",
                  problems="; ".join(problems))
        raise ReloadError(problems)


def readChanges(log, reason: str, path: str | None, current, now: float,
                site: str | None = None):
    """
    Read and validate the file at C{path} → its text, its config (the next
    generation after C{current}, loaded C{now}) and the changes from
    C{current} (L{snq.reconfig.diff}).  Raises L{ReloadError}
    (logged) when it is not valid, L{ControlError} when there is no file.
    """
    log.info("reloading the config ({reason})", reason=reason)
    if path is None:
        raise ControlError("snq runs on the embedded default config (no "
                           "--config, no $SNQ_CONFIG): there is no file to "
                           "reload")
    try:
        text = snqconfig.read(path)
        new = snqconfig.parseText(text, path)
    except snqconfig.ConfigError as e:
        refuse(log, e.problems)
    sites = new.knownSites()
    if site is not None and sites is not None and site not in sites:
        refuse(log, [f"{path}: sites.{site}: missing, but this daemon runs "
                     f"--site {site}"])
    new = stamped(new, current.generation + 1, now)
    changes = diff(current, new)
    if not changes:
        log.info("reload: {path} has not changed; nothing to do", path=path)
    return text, new, changes


def unanswered(log, failure):
    """The end of a reload nobody waits for (SIGHUP, a worker's request)."""
    if failure.check(ReloadError):
        return  # Logged with its reasons already.
    if failure.check(ControlError):
        log.error("reload failed: {why}", why=failure.getErrorMessage())
    else:
        log.failure("reload failed", failure)


def logChanges(log, what: str, path: str, changes):
    log.info("reload: {what} from {path}, {n} changes:", what=what, path=path,
             n=len(changes))
    for change in changes:
        log.info("  {change}", change=change.describe())


class Reloader(Service):
    """
    Reloads C{tree}, the daemon's service tree, from the file C{config}
    came from, on SIGHUP (it owns that signal), L{reload} (C{snqctl
    reload}) or L{requested} (a worker asks, for the control channel's
    C{update:<site>}).  Every part of the tree that can follow changes in
    place (L{snq.service.AsyncMultiService.reconfigService}); C{rolling}
    says whether the tree can start new processes for what only they can
    apply (the pool can; C{--inline} cannot, and refuses such changes).

    C{site} is C{twistd snq --site}.  C{check(text, source, reactor)} finds
    what a worker would make of the text (L{checkInWorker}).
    """

    log = Logger()

    def __init__(self, tree, config, site=None, rolling=True, reactor=None,
                 check=checkInWorker):
        self.tree = tree
        #: The config the tree runs.
        self.config = config
        self.site = site
        self.rolling = rolling
        self.reactor = defaultReactor(reactor)
        self.check = check
        self.path = _absolute(config.source)
        self._requests: list[tuple[str, defer.Deferred]] = []
        self._busy = False
        self._sighup = SignalHandler(signal.SIGHUP,
                                     lambda: self.requested("SIGHUP"),
                                     self.reactor)

    def startService(self):
        super().startService()
        self._sighup.install()

    def stopService(self):
        super().stopService()
        self._sighup.uninstall()

    def reload(self, reason: str) -> defer.Deferred:
        """
        Reload the file; fires with what changed and how it was applied (see
        L{_reload}), or fails with L{ReloadError} (nothing changed) or
        L{ControlError}.  One reload runs at a time; requests that come
        meanwhile are served together by one more, which reads the file
        again.
        """
        d = defer.Deferred()
        self._requests.append((reason, d))
        if not self._busy:
            self._next()
        return d

    def requested(self, reason: str):
        """A reload nobody waits for (SIGHUP, a worker): the log says it all."""
        self.reload(reason).addErrback(lambda f: unanswered(self.log, f))

    def _next(self):
        if not self._requests:
            self._busy = False
            return
        self._busy = True
        batch, self._requests = self._requests, []
        reasons = list(dict.fromkeys(reason for reason, _ in batch))
        d = defer.maybeDeferred(self._reload, "; ".join(reasons))

        def done(result):
            for _, waiter in batch:
                waiter.callback(result)
            self._next()

        def failed(failure):
            for _, waiter in batch:
                waiter.errback(failure)
            self._next()

        d.addCallbacks(done, failed)

    @defer.inlineCallbacks
    def _reload(self, reason: str):
        """
        → C{{"generation", "source", "changes": [{"key", "kind", "how",
        "text"}], "applied": [...], "failed": [...]}}: the changes in the
        file, then what the parts did about them and what they could not,
        in words.
        """
        text, new, changes = readChanges(self.log, reason, self.path,
                                         self.config, self.reactor.seconds(),
                                         self.site)
        result = {"generation": self.config.generation, "source": self.path,
                  "changes": [{"key": c.key, "kind": c.kind, "how": c.how,
                               "text": c.describe()} for c in changes],
                  "applied": [], "failed": []}
        if not changes:
            return result
        rolling = [c.describe() for c in changes if c.how == ROLLING]
        if rolling and not self.rolling:
            refuse(self.log, [f"{self.path}: needs new processes, which "
                              f"--inline has not: {'; '.join(rolling)}; "
                              "restart snq"])
        refuse(self.log, (yield self.check(text, self.path, self.reactor)))
        logChanges(self.log, f"config generation {new.generation}", self.path,
                   changes)
        try:
            applied, failed = (yield self.tree.reconfigService(new)), []
        except PartlyApplied as e:
            applied, failed = e.applied, e.failed
        self.config = new
        for line in applied:
            self.log.info("reload: {line}", line=line)
        for line in failed:
            self.log.error("reload: not applied: {line}", line=line)
        self.log.info("reload: config generation {g} applied ({n} changes "
                      "made, {f} failed)", g=new.generation, n=len(applied),
                      f=len(failed))
        result.update(generation=new.generation, applied=applied, failed=failed)
        return result
