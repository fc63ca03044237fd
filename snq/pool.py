# -*- test-case-name: tests.test_pool -*-
"""
The master's worker pool: N worker processes (L{snq.child}, started by a
spawner, L{snq.spawner}: forked from a template or spawned), each a
competing consumer on the queues.  The pool hands out no work; it starts
the children, respawns them by their exit status (with procmon's backoff
for children that die young), replaces them one at a time on request,
keeps what they report, and on stop waits until every one is gone.

When the "xmpp" group is active, one more worker, C{<daemon id>.xmpp},
consumes that group alone and the others the rest: an XMPP account logged
in twice throws one session out, so its connection must live in exactly
one process.  An IoManager configured with C{worker = "dedicated"} gets a
worker of its own the same way, C{<daemon id>.<name>}.

Each child gets two extra pipes for AMP (fd 3 master → child, fd 4 child →
master); its stdout and stderr carry log lines, which the master logs again
tagged with the worker's id and pid.  Its stdin carries the config's text,
as the master validated it, so every worker runs the same config whatever
the file says by then; a reload (L{snq.reload}) sends running workers the
new text over AMP, and the pool's slots follow C{workers} and the groups.

Each process also gets its claimant name (what its leases say) and, as fd
5, its journal (L{snq.journal}): when it dies, the master's
L{snq.reaper.Reaper} gives back what it held at once.
"""

import contextlib
import dataclasses
import os
import re
import socket
import sys
import uuid

from twisted.application.service import Service
from twisted.internet import defer, error, protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogLevel

from snq.amp import (
    EXIT_RECYCLE,
    EXIT_SHUTDOWN,
    Channel,
    ControlError,
    Deaths,
    Reconfigure,
    Report,
    RequestReload,
)
from snq.journal import Journal
from snq.reconfig import diff, needsRollingRestart
from snq.routing import dedicatedRoles, groupsOf
from snq.service import PartlyApplied, defaultReactor
from snq.spawner import ExecSpawner, ForkSpawner

TO_CHILD, FROM_CHILD, JOURNAL = 3, 4, 5
CHILD_FDS = {0: "w", 1: "r", 2: "r", TO_CHILD: "w", FROM_CHILD: "r"}
_LEVELS = {level.name: level for level in LogLevel.iterconstants()}


def childCommand(config) -> list[str]:
    """How to start a worker for C{config} (its id is appended)."""
    command = [sys.executable, "-m", "snq.child"]
    if config.source is not None:
        # Absolute: twistd moves to its run directory after this.
        command += ["--config", os.path.abspath(config.source)]
    return command


class _ChildPipe:
    """The master end of the AMP channel: writes go to the child's fd 3."""

    def __init__(self, process):
        self.process = process

    def write(self, data):
        self.process.writeToChild(TO_CHILD, data)

    def writeSequence(self, data):
        self.write(b"".join(data))

    def loseConnection(self):
        self.process.closeChildFD(TO_CHILD)


def claimantName(wid: str) -> str:
    """
    A worker process's name in its leases: unique per process (a respawned
    worker never renews its predecessor's leases), and saying which host
    and worker it was, within the 80 characters SQL keeps.
    """
    host = socket.gethostname().split(".")[0][:24]
    return re.sub(r"[^\w.-]", "_", f"{host}-{wid[:40]}-{uuid.uuid4().hex[:8]}")


def _slots(config, count: int) -> list[tuple[object, str, str]]:
    """
    C{(key, id, role)} of each worker slot: C{count} numbered ones for the
    queues (the first of them also runs the IoManagers that want one
    worker), while there are groups or IoManagers for them; then one per
    dedicated role, the "xmpp" group's and each dedicated IoManager's (see
    the module's doc), with the role as its key and id.
    """
    daemon = config.daemon.id
    numbered = groupsOf(config, "queues") or any(
        m.worker in ("every", "one") for m in config.managers().values())
    slots = [(n, f"{daemon}.{n}", "first" if n == 0 else "queues")
             for n in range(count)] if numbered else []
    return slots + [(role, f"{daemon}.{role}", role)
                    for role in dedicatedRoles(config)]


class _MasterChannel(Channel):
    def __init__(self, process):
        super().__init__()
        self.process = process

    @Report.responder
    def report(self, report):
        self.process.reported(report)
        return {}

    @RequestReload.responder
    def requestReload(self, reason):
        pool = self.process.worker.pool
        pool.requestReload(f"{reason} (worker {self.process.worker.wid})")
        return {}

    @Deaths.responder
    def deaths(self, key):
        pool = self.process.worker.pool
        if pool.reaper is None:
            return {"deaths": 0}
        d = pool.reaper.deathsOf(key, self.process)
        return d.addCallback(lambda n: {"deaths": n})


class WorkerProtocol(protocol.ProcessProtocol):
    """One child process of a slot, from spawn to exit."""

    log = Logger()

    def __init__(self, worker, clock, config):
        self.worker = worker
        self.clock = clock
        #: What its leases say (L{claimantName}).
        self.claimant = claimantName(worker.wid)
        #: Which items it runs (L{snq.journal}), for after its death; None
        #: until spawned.
        self.journal: Journal | None = None
        #: The pool's config generation it runs: spawned with, or applied.
        self.generation = config.generation
        self._configText = config.text
        self.pid = None
        self.started = clock.seconds()
        #: starting → running (it said so) → stopping → exited
        self.state = "starting"
        #: The child's last report (L{snq.child.Worker.snapshot}).
        self.report: dict = {}
        self.ready = False
        self.ended = False
        self._terminated = False
        self._killCall = None
        self._endWaiters: list[defer.Deferred] = []
        self._readyWaiters: list[defer.Deferred] = []
        self._partial = {1: b"", 2: b""}
        self.channel = _MasterChannel(self)

    @property
    def tag(self) -> str:
        return f"{self.worker.wid}:{self.pid}"

    def connectionMade(self):
        self.pid = self.transport.pid
        if self._configText is not None:
            self.transport.writeToChild(0, self._configText)
        self.transport.closeStdin()
        self.channel.makeConnection(_ChildPipe(self.transport))

    def childDataReceived(self, childFD, data):
        if childFD == FROM_CHILD:
            self.channel.dataReceived(data)
            return
        lines = (self._partial[childFD] + data).split(b"\n")
        self._partial[childFD] = lines.pop()
        for line in lines:
            self._logLine(childFD, line)

    def _logLine(self, childFD, line: bytes):
        """
        A worker writes C{"level text"}; anything else (output before its
        logging started, a crash of the interpreter) is logged as is.
        """
        text = line.decode("utf-8", "replace").rstrip("\r")
        word, _, rest = text.partition(" ")
        level = _LEVELS.get(word)
        if level is None:
            level, rest = (LogLevel.info if childFD == 1 else LogLevel.error), text
        self.log.emit(level, "{line}", line=rest,
                      log_system=f"{self.tag}#{level.name}")

    def childConnectionLost(self, childFD):
        if childFD == FROM_CHILD:
            self.channel.connectionLost(protocol.connectionDone)

    def processEnded(self, reason):
        for childFD, rest in self._partial.items():
            if rest:
                self._logLine(childFD, rest)
        self.ended = True
        self.state = "exited"
        if self._killCall is not None and self._killCall.active():
            self._killCall.cancel()
        self.worker.pool._processEnded(self, reason.value)
        if self.journal is not None:
            self.journal.close()
        self._fire(self._readyWaiters, False)
        self._fire(self._endWaiters, None)

    def reported(self, report: dict):
        self.report = report
        for observer in self.worker.pool.observers:
            observer.workerReported(self, report)
        if not self._terminated:
            self.state = report.get("state", self.state)
        if self.state == "running" and not self.ready:
            self.ready = True
            self.log.info("worker {wid} (pid {pid}) is ready",
                          wid=self.worker.wid, pid=self.pid)
            self._fire(self._readyWaiters, True)

    def whenReady(self) -> defer.Deferred:
        """Fires with True once the child is ready, False if it ends first."""
        if self.ready or self.ended:
            return defer.succeed(self.ready)
        d = defer.Deferred()
        self._readyWaiters.append(d)
        return d

    def stop(self, killTime: float) -> defer.Deferred:
        """TERM now, KILL after C{killTime}; fires once the process is gone."""
        if self.ended:
            return defer.succeed(None)
        if not self._terminated:
            self._terminated = True
            self.state = "stopping"
            self.signal("TERM")
            self._killCall = self.clock.callLater(killTime, self._kill, killTime)
        d = defer.Deferred()
        self._endWaiters.append(d)
        return d

    def _kill(self, killTime):
        self.log.warn("worker {wid} (pid {pid}) still running {t} s after TERM: "
                      "killing it", wid=self.worker.wid, pid=self.pid, t=killTime)
        self.signal("KILL")

    def signal(self, name: str):
        with contextlib.suppress(error.ProcessExitedAlready):
            self.transport.signalProcess(name)

    @staticmethod
    def _fire(waiters, result):
        while waiters:
            d = waiters.pop(0)
            if not d.called:
                d.callback(result)


class WorkerSlot:
    """
    A slot of the pool: an id (C{<daemon id>.<n>}) and the process holding it
    now, with the history that outlives processes: the backoff delay,
    restarts, the last exit.
    """

    def __init__(self, pool, index: int, wid: str, delay: float,
                 role: str = "queues", key=None):
        self.pool = pool
        self.index = index
        #: What it is across reloads: its number, or "xmpp".
        self.key = index if key is None else key
        self.wid = wid
        #: What it consumes (L{snq.routing.ROLES}).
        self.role = role
        self.process: WorkerProtocol | None = None
        #: Started by a rolling restart, not ready yet; takes over from
        #: C{process} once it is.
        self.replacement: WorkerProtocol | None = None
        #: What the next death within C{threshold} of a start waits.
        self.delay = delay
        self.respawnCall = None
        #: Times this slot's process exited and was started again.
        self.restarts = 0
        self.lastExit: str | None = None
        #: It exited with EXIT_SHUTDOWN and stays down.
        self.done = False

    @property
    def waiting(self) -> bool:
        """A respawn is scheduled."""
        return self.respawnCall is not None and self.respawnCall.active()

    @property
    def state(self) -> str:
        if self.process is not None:
            return self.process.state
        if self.waiting:
            return "waiting"
        return "exited" if self.done else "stopped"


def _describe(status) -> tuple[int | None, str]:
    """A process end → (exit code or None for a signal, words for logs)."""
    if status.signal is not None:
        return None, f"killed by signal {status.signal}"
    return status.exitCode, f"exit status {status.exitCode}"


class WorkerPool(Service):
    """
    C{[daemon] workers} worker slots (C{workers}, when given, wins: it is
    C{--workers}), started C{spawndelay} apart.  A worker exiting
    with 100 stays down (and when all have, the daemon stops); with 101 it
    is replaced at once; any other end (status 0 or 1, a signal) is a
    failure: replaced at once if it lived at least C{threshold} seconds,
    else after a delay that doubles from C{min_restart_delay} up to
    C{max_restart_delay} and goes back to the minimum after a long life.
    """

    log = Logger()

    def __init__(self, config, workers: int | None = None, reactor=None,
                 command=None, site: str | None = None, requestReload=None,
                 spawner=None):
        reactor = defaultReactor(reactor)
        #: How a worker process starts (L{snq.spawner}).
        self.spawner = spawner or ExecSpawner(reactor)
        if config.loaded is None:
            config = dataclasses.replace(config, loaded=reactor.seconds())
        #: What new workers start on: its C{text}, as the master validated
        #: it, on their stdin (None: they load C{source} themselves), and its
        #: C{generation}.
        self.config = config
        #: C{--workers}, which wins over C{[daemon] workers}.
        self.override = workers
        #: Every worker handles this site's items only (C{--site}).
        self.site = site
        self.reactor = reactor
        self.command = command or childCommand(config)
        self.workers = [
            WorkerSlot(self, n, wid, config.daemon.min_restart_delay, role, key)
            for n, (key, wid, role) in enumerate(_slots(config, self.count()))]
        #: Replaced by a rolling restart or removed by a reload, stopping.
        self.retiring: set[WorkerProtocol] = set()
        self.restarting = False
        self._restarted: list[defer.Deferred] = []
        #: Told of every report (C{workerReported(process, report)}) and
        #: every end (C{workerEnded(process)}) as they come: the monitors,
        #: which must not miss a process's last counts.
        self.observers: list = []
        #: Called with a reason when a worker asks for a reload (the STOMP
        #: control channel's C{update:<site>}).
        self._requestReload = requestReload
        #: Answers a worker's L{Deaths} (L{snq.reaper.Reaper}); None: no
        #: message is charged for its deaths.
        self.reaper = None

    def count(self) -> int:
        """How many numbered workers the config (or C{--workers}) wants."""
        count = self.override
        if count is None:
            count = self.config.daemon.workers
        return count or os.cpu_count() or 1

    def startService(self):
        super().startService()
        d = self.spawner.start(self.config)
        d.addCallback(lambda _: self._startWorkers())
        return d

    def _startWorkers(self):
        if not self.running:
            return
        self.log.info("starting {n} workers", n=len(self.workers))
        for worker in self.workers:
            worker.respawnCall = self.reactor.callLater(
                worker.index * self.config.queue.spawndelay, self._respawn, worker)

    def stopService(self):
        super().stopService()
        for worker in self.workers:
            if worker.waiting:
                worker.respawnCall.cancel()
        processes = self.processes()
        if processes:
            self.log.info("stopping {n} workers", n=len(processes))
        killTime = self.config.daemon.kill_time
        d = defer.gatherResults([p.stop(killTime) for p in processes])
        d.addCallback(lambda _: self.log.info("all workers stopped"))
        d.addCallback(lambda _: self.spawner.stop())
        return d

    def processes(self) -> list[WorkerProtocol]:
        """Every worker process there is: current, replacements, retiring."""
        return [p for w in self.workers for p in (w.process, w.replacement)
                if p is not None] + list(self.retiring)

    def _spawn(self, worker) -> WorkerProtocol | None:
        config = self.config
        process = WorkerProtocol(worker, self.reactor, config)
        # Generation and load time even without a file (the embedded
        # default), so snqctl status shows what every worker runs.
        args = ["--generation", str(config.generation),
                "--loaded", repr(config.loaded),
                "--claimant", process.claimant, "--journal-fd", str(JOURNAL),
                "--role", worker.role, "--id", worker.wid]
        if self.site is not None:
            args += ["--site", self.site]
        if config.text is not None:
            args.append("--stdin-config")
        try:
            process.journal = Journal.create(config.queue.concurrency)
            self.spawner.spawn(process, [*self.command, *args],
                               {**CHILD_FDS, JOURNAL: process.journal.fd})
        except Exception:
            self.log.failure("cannot start a process for worker {wid}",
                             wid=worker.wid)
            if process.journal is not None:
                process.journal.close()
            return None
        self.log.info("worker {wid} started as pid {pid}", wid=worker.wid,
                      pid=process.pid)
        return process

    def _respawn(self, worker):
        worker.respawnCall = None
        worker.process = self._spawn(worker)
        if worker.process is None:
            self._scheduleRespawn(worker, self._backoff(worker))

    def _scheduleRespawn(self, worker, delay: float):
        worker.respawnCall = self.reactor.callLater(delay, self._respawn, worker)

    def _backoff(self, worker) -> float:
        delay = worker.delay
        worker.delay = min(delay * 2, self.config.daemon.max_restart_delay)
        return delay

    def _processEnded(self, process, status):
        for observer in self.observers:
            observer.workerEnded(process)
        worker = process.worker
        code, how = _describe(status)
        if process in self.retiring:
            self.retiring.discard(process)
            why = "replaced" if worker in self.workers else "removed"
            self.log.info("worker {wid} (pid {pid}), {why}, has exited ({how})",
                          wid=worker.wid, pid=process.pid, why=why, how=how)
            return
        if process is worker.replacement:
            worker.replacement = None
            self.log.error("the replacement for worker {wid} (pid {pid}) exited "
                           "({how}) before it was ready", wid=worker.wid,
                           pid=process.pid, how=how)
            return
        worker.lastExit = how
        # A rolling restart's replacement, if any, takes over the slot.
        worker.process, worker.replacement = worker.replacement, None
        if not self.running:
            self.log.info("worker {wid} (pid {pid}) stopped ({how})",
                          wid=worker.wid, pid=process.pid, how=how)
            return
        if worker.process is not None:
            self.log.warn("worker {wid} (pid {pid}) exited ({how}); its "
                          "replacement (pid {new}) takes over", wid=worker.wid,
                          pid=process.pid, how=how, new=worker.process.pid)
            return
        self._afterExit(worker, process, code, how)

    def _afterExit(self, worker, process, code, how):
        lived = self.reactor.seconds() - process.started
        fields = dict(wid=worker.wid, pid=process.pid, how=how, lived=lived)
        if code == EXIT_SHUTDOWN:
            worker.done = True
            self.log.info("worker {wid} (pid {pid}) exited with {how} after "
                          "{lived:.1f} s: shut down, not restarting", **fields)
            if all(w.done for w in self.workers):
                self.log.info("every worker has shut down; stopping")
                self.reactor.stop()
            return
        worker.restarts += 1
        threshold = self.config.daemon.threshold
        if code == EXIT_RECYCLE:
            delay = 0.0
            self.log.info("worker {wid} (pid {pid}) recycled itself ({how}) "
                          "after {lived:.1f} s: restarting now", **fields)
        elif lived < threshold:
            delay = self._backoff(worker)
            self.log.warn("worker {wid} (pid {pid}) exited with {how} after "
                          "{lived:.1f} s, under the {threshold:g} s threshold: "
                          "restarting in {delay:g} s", threshold=threshold,
                          delay=delay, **fields)
        else:
            delay = 0.0
            worker.delay = self.config.daemon.min_restart_delay
            self.log.warn("worker {wid} (pid {pid}) exited with {how} after "
                          "{lived:.1f} s: restarting now", **fields)
        self._scheduleRespawn(worker, delay)

    def restart(self, outdated: bool = False) -> defer.Deferred:
        """
        Replace every running worker (with C{outdated}, every one running an
        older config than the pool's), one at a time.  Each replacement
        starts first; the old process is stopped only once its replacement
        reports ready, and the next slot waits for that, so capacity never
        drops.  Fires with C{[{"id", "old", "new"}]}, or fails with
        L{ControlError} (a replacement that fails keeps the old process and
        ends the restart there).
        """
        if not self.running:
            return defer.fail(ControlError("snq is stopping"))
        if self.restarting:
            return defer.fail(ControlError("a rolling restart is in progress"))
        self.restarting = True
        d = self._restartAll(outdated)

        def over(result):
            self.restarting = False
            waiting, self._restarted = self._restarted, []
            for waiter in waiting:
                waiter.callback(None)
            return result

        return d.addBoth(over)

    def whenRestarted(self) -> defer.Deferred:
        """Fires once no rolling restart is in progress."""
        if not self.restarting:
            return defer.succeed(None)
        d = defer.Deferred()
        self._restarted.append(d)
        return d

    @defer.inlineCallbacks
    def _restartAll(self, outdated):
        # New processes run the code as it is now, not as a template had it.
        yield self.spawner.renew(self.config)
        replaced = []
        timeout = self.config.daemon.start_timeout
        for worker in list(self.workers):
            old = worker.process
            # An empty slot gets a fresh process when it respawns anyway; a
            # slot a reload removed meanwhile is gone.
            if old is None or not self.running or worker not in self.workers:
                continue
            if outdated and old.generation >= self.config.generation:
                continue
            new = worker.replacement = self._spawn(worker)
            if new is None:
                raise ControlError(f"cannot start a replacement for {worker.wid}")
            try:
                ready = yield new.whenReady().addTimeout(timeout, self.reactor)
                why = "exited before it was ready"
            except defer.TimeoutError:
                new.stop(self.config.daemon.kill_time)
                ready, why = False, f"was not ready within {timeout:g} s"
            if not ready:
                raise ControlError(
                    f"the replacement for {worker.wid} {why}; it keeps pid "
                    f"{old.pid}, and the restart stops there (see the log)")
            if worker.replacement is new:
                worker.process, worker.replacement = new, None
            if not old.ended:
                self.retiring.add(old)
                old.stop(self.config.daemon.kill_time)
            replaced.append({"id": worker.wid, "old": old.pid, "new": new.pid})
            self.log.info("worker {wid} replaced: pid {old} → {new}",
                          wid=worker.wid, old=old.pid, new=new.pid)
        return replaced

    def requestReload(self, reason: str):
        if self._requestReload is None:
            self.log.warn("reload asked for ({reason}) but nothing reloads "
                          "here", reason=reason)
        else:
            self._requestReload(reason)

    @defer.inlineCallbacks
    def reconfigService(self, new):
        """
        Run C{new}, the next generation: new workers start on it, the
        timing keys (respawn backoff, kill_time, …) apply from the next
        decision on, the slots follow C{workers} and the groups, and the
        workers follow: in place (they get the same text over AMP), or, where
        only new processes can (another backend, other handler code), by a
        rolling restart.  A rolling restart in progress finishes first, on
        the config it began with.  It is over once every slot runs a ready
        process on C{new} (at most C{start_timeout} for the new ones).
        → what changed, in words; what did not comes as L{PartlyApplied},
        naming each worker that does not run C{new}.
        """
        yield self.whenRestarted()
        old, self.config = self.config, new
        changes = diff(old, new)
        applied, failed = [], []
        #: Processes already named, by pid.
        named = set()
        if self.override is not None and any(
                c.key == "daemon.workers" for c in changes):
            applied.append(f"daemon.workers: --workers {self.override} on the "
                           "command line wins")
        if old.daemon.fork_server != new.daemon.fork_server:
            applied.append((yield self._replaceSpawner(new)))
        applied += self.resize()
        if needsRollingRestart(changes):
            try:
                restarted = yield self.restart(outdated=True)
            except ControlError as e:
                failed.append(f"the rolling restart stopped: {e}")
            else:
                applied += [f"{r['id']}: restarted on the new config, pid "
                            f"{r['old']} -> {r['new']}" for r in restarted]
                named.update(r["new"] for r in restarted)
        else:
            for row in (yield self._reconfigureChildren()):
                worker = f"{row['id']} (pid {row['pid']})"
                named.add(row["pid"])
                if "error" in row:
                    failed.append(f"{worker}: {row['error']}")
                else:
                    applied.append(f"{worker}: applied in place: "
                                   + ("; ".join(row["applied"])
                                      or "nothing to change there"))
        started, behind = yield self._onGeneration(new.generation, named)
        applied += started
        failed += behind
        if failed:
            raise PartlyApplied(applied, failed)
        return applied

    @defer.inlineCallbacks
    def _onGeneration(self, generation: int, named: set):
        """
        Wait until no slot is still starting a process on C{generation}, at
        most C{start_timeout} → lines for the processes that started on it,
        and for the slots that do not run it; a process named already (by
        pid: it applied the config, or said why not) is not named twice.
        """
        deadline = self.reactor.seconds() + self.config.daemon.start_timeout

        def starting(worker):
            process = worker.process
            if worker.waiting:
                return worker.respawnCall.getTime() < deadline
            return not worker.done and (process is None or (
                not process.ready and process.generation >= generation))

        while (self.running and self.reactor.seconds() < deadline
               and any(starting(w) for w in self.workers)):
            yield deferLater(self.reactor, 0.1, lambda: None)
        started, failed = [], []
        for worker in self.workers:
            process = worker.process
            if worker.done or (process is not None and process.pid in named):
                continue
            if process is None:
                why = "not running"
                if worker.waiting:
                    wait = worker.respawnCall.getTime() - self.reactor.seconds()
                    why += (f" (it died young; it starts on config generation "
                            f"{generation} in {wait:.1f} s)")
                failed.append(f"{worker.wid}: {why}")
            elif process.generation < generation:
                failed.append(f"{worker.wid} (pid {process.pid}): runs config "
                              f"generation {process.generation}")
            elif not process.ready:
                failed.append(f"{worker.wid} (pid {process.pid}): not ready on "
                              f"config generation {generation} within "
                              f"{self.config.daemon.start_timeout:g} s")
            else:
                started.append(f"{worker.wid} (pid {process.pid}): started on "
                               f"config generation {generation}")
        return started, failed

    @defer.inlineCallbacks
    def _replaceSpawner(self, config):
        """
        C{[daemon] fork_server} reloaded: the next processes start the new
        way; the running ones stay (a template retired exits with them).
        """
        old = self.spawner
        if config.daemon.fork_server:
            self.spawner = ForkSpawner(self.reactor,
                                       startTimeout=config.daemon.start_timeout)
            yield self.spawner.start(config)
            how = "new workers are forked from a template"
        else:
            self.spawner = ExecSpawner(self.reactor)
            how = "new workers are spawned"
        old.stop()
        return f"daemon.fork_server: {how}"

    def resize(self) -> list[str]:
        """
        Follow the slots that L{count} and the config's groups give (see
        L{_slots}): a new slot is started, one that is gone is stopped
        gracefully (its running items finish) and not started again; a
        slot that stays keeps its process, under the config's daemon id.
        → what changed, in words.
        """
        kept = {w.key: w for w in self.workers}
        workers, added = [], []
        for index, (key, wid, role) in enumerate(_slots(self.config, self.count())):
            worker = kept.pop(key, None)
            if worker is None:
                worker = WorkerSlot(self, index, wid,
                                    self.config.daemon.min_restart_delay, role, key)
                added.append(worker)
            worker.index, worker.wid, worker.role = index, wid, role
            workers.append(worker)
        self.workers = workers
        for worker in kept.values():
            self._remove(worker)
        if self.running:
            for n, worker in enumerate(added):
                self._scheduleRespawn(worker, n * self.config.queue.spawndelay)
        return ([f"{w.wid}: added" for w in added] +
                [f"{w.wid}: removed (it finishes its items first)"
                 for w in kept.values()])

    def _remove(self, worker):
        if worker.waiting:
            worker.respawnCall.cancel()
        for process in (worker.process, worker.replacement):
            if process is not None and not process.ended:
                self.retiring.add(process)
                process.stop(self.config.daemon.kill_time)
        self.log.info("worker {wid} removed from the pool", wid=worker.wid)

    def _reconfigureChildren(self) -> defer.Deferred:
        """
        Send each live worker process running an older generation the
        current config (L{Reconfigure}).  Fires with a row per process:
        C{{"id", "pid", "applied": [...]}}, or C{"error"} instead of
        C{"applied"} (such a worker exits and starts again on the new
        config).
        """
        generation = self.config.generation
        processes = [p for w in self.workers for p in (w.process, w.replacement)
                     if p is not None and not p.ended and p.generation < generation]
        return defer.gatherResults([self._reconfigure(p) for p in processes])

    def _reconfigure(self, process):
        config = self.config
        generation = config.generation
        spec = {"text": config.text.decode("utf-8"), "source": config.source,
                "generation": generation, "loaded": config.loaded}
        row = {"id": process.worker.wid, "pid": process.pid}
        # A worker may first have to let a dropped subscription's items
        # finish (at most kill_time), or finish starting.
        timeout = self.config.daemon.kill_time + self.config.daemon.start_timeout
        d = process.channel.callRemote(Reconfigure, config=spec)
        d.addTimeout(timeout, self.reactor)

        def applied(answer):
            process.generation = max(process.generation, generation)
            return {**row, "applied": answer["applied"]}

        def failed(failure):
            why = failure.getErrorMessage()
            if failure.check(defer.TimeoutError):
                why = f"no answer within {timeout:g} s"
            elif process.ended or not failure.check(ControlError):
                why = f"it exited ({why}); its successor starts on the new config"
            self.log.error("worker {wid} (pid {pid}) did not apply config "
                           "generation {g}: {why}", wid=process.worker.wid,
                           pid=process.pid, g=generation, why=why)
            return {**row, "error": why}

        return d.addCallbacks(applied, failed)

    def status(self) -> list[dict]:
        """Every slot and process, for snqctl and monitors."""
        now = self.reactor.seconds()
        rows = []

        def row(worker, process, role):
            entry = {"id": worker.wid, "role": role, "restarts": worker.restarts,
                     "last_exit": worker.lastExit}
            if process is None:
                entry["state"] = worker.state
                if worker.waiting:
                    entry["respawn_in"] = worker.respawnCall.getTime() - now
            else:
                entry.update(pid=process.pid, state=process.state,
                             started=process.started,
                             uptime=now - process.started, report=process.report,
                             generation=process.generation)
            rows.append(entry)

        for worker in self.workers:
            row(worker, worker.process, "current")
            if worker.replacement is not None:
                row(worker, worker.replacement, "replacement")
        for process in self.retiring:
            row(process.worker, process, "retiring")
        return rows
