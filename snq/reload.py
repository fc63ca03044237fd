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
from snq.handlers import handlerPaths
from snq.reconfig import ROLLING, codeFingerprints, diff, needsRollingRestart
from snq.service import defaultReactor

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
    process = reactor.spawnProcess(
        check, sys.executable,
        [sys.executable, "-m", "snq.child", "--check", "--config", source],
        env=None)
    timer = reactor.callLater(CHECK_TIMEOUT, process.signalProcess, "KILL")
    code, output = yield check.ended
    if timer.active():
        timer.cancel()
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


def readChanges(log, reason: str, path: str | None, current, code: dict,
                site: str | None = None):
    """
    Read and validate the file at C{path} → its text, its config, the
    fingerprints of its handlers' code and the changes from C{current}
    (whose handlers' code had the fingerprints C{code}).  Raises
    L{ReloadError} (logged) when it is not valid, L{ControlError} when
    there is no file.
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
    newCode = codeFingerprints(handlerPaths(new.handlers))
    changes = diff(current, new, code, newCode)
    if not changes:
        log.info("reload: {path} has not changed; nothing to do", path=path)
    return text, new, newCode, changes


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


class Reloader:
    """
    The master's reload.  C{pool} holds the running config
    (L{snq.pool.WorkerPool.config}, its text and generation); C{parts}
    are the master's own services with a C{reconfigService(config)}
    returning (a Deferred of) what they changed, in words.

    C{site} is C{twistd snq --site}; C{workers} is C{--workers}, which
    wins over C{[daemon] workers}.  C{check(text, source, reactor)} finds
    what a worker would make of the text (L{checkInWorker}).
    """

    log = Logger()

    def __init__(self, pool, parts=(), site=None, workers=None, reactor=None,
                 check=checkInWorker):
        reactor = defaultReactor(reactor)
        self.pool = pool
        self.parts = list(parts)
        self.site = site
        self.workers = workers
        self.reactor = reactor
        self.check = check
        self.path = _absolute(pool.config.source)
        #: Module → fingerprint of the handler code the workers run.
        self.code = codeFingerprints(handlerPaths(pool.config.handlers))
        self._requests: list[tuple[str, defer.Deferred]] = []
        self._busy = False

    def reload(self, reason: str) -> defer.Deferred:
        """
        Reload the file; fires with what changed and how it was applied (see
        L{_reload}), or fails with L{ReloadError} (nothing changed) or
        L{ControlError}.
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
        "text"}], "notes": [...], "added": [...], "removed": [...],
        "workers": [...], "restarted": [...], "restart_error"}}.
        """
        pool = self.pool
        # A rolling restart in progress finishes on the config it began with.
        yield pool.whenRestarted()
        text, new, code, changes = readChanges(self.log, reason, self.path,
                                               pool.config, self.code, self.site)
        result = {"generation": pool.generation, "source": self.path,
                  "changes": [{"key": c.key, "kind": c.kind, "how": c.how,
                               "text": c.describe()} for c in changes],
                  "notes": [], "added": [], "removed": [], "workers": [],
                  "restarted": [], "restart_error": None}
        if not changes:
            return result
        refuse(self.log, (yield self.check(text, self.path, self.reactor)))

        pool.setConfig(new, text, self.reactor.seconds())
        self.code = code
        result["generation"] = pool.generation
        logChanges(self.log, f"config generation {pool.generation}", self.path,
                   changes)
        for part in self.parts:
            result["notes"] += yield part.reconfigService(new)
        if self.workers is not None and any(
                c.key == "daemon.workers" for c in changes):
            result["notes"].append(f"daemon.workers: --workers {self.workers} "
                                   "on the command line wins")
        count = self.workers if self.workers is not None else new.daemon.workers
        resized = pool.resize(count or os.cpu_count() or 1)
        result.update(resized)
        if needsRollingRestart(changes):
            try:
                result["restarted"] = yield pool.restart(outdated=True)
            except ControlError as e:
                result["restart_error"] = str(e)
        else:
            result["workers"] = yield pool.reconfigureChildren()
        self._logResult(result)
        return result

    def _logResult(self, result):
        for note in result["notes"]:
            self.log.info("reload: {note}", note=note)
        for wid in result["added"]:
            self.log.info("reload: worker {wid} added", wid=wid)
        for wid in result["removed"]:
            self.log.info("reload: worker {wid} removed (it finishes its items "
                          "first)", wid=wid)
        for r in result["restarted"]:
            self.log.info("reload: worker {wid} restarted on the new config: "
                          "pid {old} → {new}", wid=r["id"], old=r["old"],
                          new=r["new"])
        if result["restart_error"]:
            self.log.error("reload: the rolling restart stopped: {why}",
                           why=result["restart_error"])
        applied = [w for w in result["workers"] if "applied" in w]
        self.log.info("reload: config generation {g} applied ({n} workers in "
                      "place, {m} restarted, {f} failed)", g=result["generation"],
                      n=len(applied), m=len(result["restarted"]),
                      f=len(result["workers"]) - len(applied))


class InlineReloader(Service):
    """
    C{--inline}: SIGHUP (or the control channel) reloads the file into the
    one IoMaster in this process.  What only new processes can apply (a
    rolling restart's changes) is refused: restart snq for those.
    """

    log = Logger()

    def __init__(self, master, reactor=None):
        reactor = defaultReactor(reactor)
        self.master = master
        self.reactor = reactor
        self.path = _absolute(master.config.source)
        self.code = codeFingerprints(handlerPaths(master.config.handlers))
        self._reloading = None
        self._previous = None

    def startService(self):
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._sighup)

    def stopService(self):
        super().stopService()
        signal.signal(signal.SIGHUP, self._previous)

    def _sighup(self, signum, frame):
        self.reactor.callFromThread(self.requested, "SIGHUP")

    def requested(self, reason: str):
        if self._reloading is not None:
            # One at a time: the one running reads the file anew anyway.
            self.log.info("reload ({reason}) joins the one in progress",
                          reason=reason)
            return
        self._reloading = defer.maybeDeferred(self._reload, reason)
        self._reloading.addErrback(lambda f: unanswered(self.log, f))
        self._reloading.addBoth(lambda _: setattr(self, "_reloading", None))

    @defer.inlineCallbacks
    def _reload(self, reason):
        master = self.master
        _, new, code, changes = readChanges(self.log, reason, self.path,
                                            master.config, self.code, master.site)
        rolling = [c.describe() for c in changes if c.how == ROLLING]
        if rolling:
            refuse(self.log, [f"{self.path}: needs new processes, which "
                              f"--inline has not: {'; '.join(rolling)}; "
                              "restart snq"])
        if not changes:
            return
        applied = yield master.reconfigService(new)
        self.code = code
        logChanges(self.log, "applied", self.path, changes)
        self.log.info("reload: {applied}", applied="; ".join(applied)
                      or "nothing to change in the worker")
