# -*- test-case-name: tests.test_child -*-
"""
A worker process, started by the master's L{snq.pool.WorkerPool} as
C{python -m snq.child [--config PATH [--stdin-config]] --id ID [--role
ROLE] [--site NICK] [--generation N --loaded T] [--claimant NAME
--journal-fd FD]}; not meant to be run by hand.  With C{--stdin-config}
the config's text comes on stdin (the master read and validated it;
C{--config} only names it).

It runs one L{IoMaster}, reports to the master over AMP on fds 3 (in) and
4 (out) once a second, writes its log to stderr as C{"level text"} lines
(the master logs them again, tagged), and tells the master what to do next
by its exit status: 0 after an ordinary stop, 1 if it could not start,
101 to be replaced at once (it recycled itself, the control channel said
restart, or a reloaded config could not be applied in place), 100 to stay
down (the control channel said shutdown).  It stops gracefully on SIGTERM
or SIGINT, and when the pipe from the master closes (the master died).

C{python -m snq.child --check [--config PATH]} with a config's text on
stdin loads what a worker would (handlers, the queue's settings) without
running anything, and prints what is wrong: the master's test of a
reloaded config, in a fresh interpreter that sees the handlers' new code.
"""

import argparse
import dataclasses
import os
import signal
import sys

from twisted.internet import defer, stdio
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel, eventAsText, globalLogBeginner

from snq import config as snqconfig
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
from snq.handlers import HandlerError, HandlerRegistry
from snq.iomanager import PollingManager
from snq.iomanagers import checkPlugins
from snq.iomaster import IoMaster, residentMemory
from snq.journal import Journal
from snq.lean import installReactor, needsStartTLS
from snq.queues import makeQueue
from snq.routing import ROLES

FROM_MASTER, TO_MASTER = 3, 4
REPORT_INTERVAL = 1.0
#: How long a stopping worker waits for its last report to be written.
LAST_REPORT_TIMEOUT = 5.0


class _WorkerChannel(Channel):
    def __init__(self, worker):
        super().__init__()
        self.worker = worker
        self.closed = defer.Deferred()

    def connectionLost(self, reason):
        super().connectionLost(reason)
        if not self.closed.called:  # L{Worker} may have stopped waiting.
            self.closed.callback(None)
        self.worker.masterGone()

    @Reconfigure.responder
    def reconfigure(self, config):
        d = self.worker.reconfigure(config)
        return d.addCallback(lambda applied: {"applied": applied})


class Worker:
    """This process's life: start, report, stop, and the exit status."""

    log = Logger()

    def __init__(self, config, workerId: str, reactor, iomasterFactory=IoMaster,
                 role="queues", site=None, claimant=None, journal=None):
        #: Its C{generation} and C{loaded} say which of the master's configs
        #: it runs, and when that was loaded.
        self.config = config
        self.workerId = workerId
        #: Which groups it consumes (L{snq.routing.ROLES}).
        self.role = role
        #: Only this site's items (C{twistd snq --site}); None: every site.
        self.site = site
        #: What its leases say, and where it notes what it runs, both given
        #: by the master (L{snq.pool}), which reads them after its death.
        self.claimant = claimant
        self.journal = journal
        self.reactor = reactor
        self.iomasterFactory = iomasterFactory
        self.exitCode = 0
        #: starting → running → stopping
        self.state = "starting"
        self.started = reactor.seconds()
        self.iomaster = None
        self.channel = _WorkerChannel(self)
        self._starting = defer.succeed(None)
        self._reporter = LoopingCall(self.report)
        self._reporter.clock = reactor

    def start(self):
        """Called once the reactor runs: start reporting, then the IoMaster."""
        self._reporter.start(REPORT_INTERVAL)
        self._starting = defer.maybeDeferred(self._build)
        self._starting.addCallback(lambda _: self.iomaster.startService())
        self._starting.addCallbacks(self._running, self._cannotStart)

    def _build(self):
        self.iomaster = self.iomasterFactory(
            self.config, workerId=self.workerId, clock=self.reactor,
            recycle=lambda reason: self.exit(EXIT_RECYCLE, reason),
            shutdown=lambda reason: self.exit(EXIT_SHUTDOWN, reason),
            reload=self.requestReload, role=self.role, site=self.site,
            claimant=self.claimant, journal=self.journal,
            deaths=self.deaths if self.journal is not None else None)

    def _running(self, _):
        if self.state == "starting":
            self.state = "running"
            self.report()

    def _cannotStart(self, failure):
        self.log.failure("worker {wid} cannot start", failure, wid=self.workerId)
        self.exit(1, "it could not start")

    def exit(self, code: int, reason: str):
        """Stop gracefully, then exit with C{code}; the first call decides."""
        if self.state == "stopping":
            return
        self.log.info("worker {wid} stopping, exit status {code}: {reason}",
                      wid=self.workerId, code=code, reason=reason)
        self.exitCode = code
        self.state = "stopping"
        self.reactor.stop()

    def signalled(self, signum, frame):
        """SIGTERM, SIGINT: a graceful stop, asked for once however often."""
        self.reactor.callFromThread(self.exit, 0, signal.Signals(signum).name)

    def masterGone(self):
        if self.state != "stopping":
            self.exit(0, "the master has gone")

    def deaths(self, key: bytes) -> defer.Deferred:
        """How often a redelivered message killed a worker (L{Deaths})."""
        if self.channel.transport is None:
            return defer.succeed(0)
        d = self.channel.callRemote(Deaths, key=key)
        return d.addCallback(lambda answer: answer["deaths"])

    def requestReload(self, reason: str):
        """Ask the master to reload the config file (and so every worker)."""
        if self.channel.transport is not None:
            self.channel.callRemote(RequestReload, reason=reason)

    @defer.inlineCallbacks
    def reconfigure(self, spec: dict):
        """
        Run the master's new config (L{Reconfigure}) in place, once started.
        A worker that fails half-way does not carry on half configured: it
        exits to be replaced, and its successor starts on the new config.
        """
        yield self._starting
        if self.state != "running":
            raise ControlError(f"worker {self.workerId} is {self.state}")
        generation = spec["generation"]
        try:
            config = dataclasses.replace(
                snqconfig.parseText(spec["text"].encode("utf-8"), spec["source"]),
                generation=generation, loaded=spec["loaded"])
            applied = yield self.iomaster.reconfigService(config)
        except Exception as e:
            self.log.failure("worker {wid} cannot apply config generation {g} in "
                             "place; it exits to be replaced", wid=self.workerId,
                             g=generation)
            self.exit(EXIT_RECYCLE, f"config generation {generation} could not "
                                    "be applied in place")
            raise ControlError(f"{type(e).__name__}: {e} (the worker exits, and "
                               "its replacement starts on the new config)")
        self.config = config
        self.log.info("worker {wid} runs config generation {g}: {applied}",
                      wid=self.workerId, g=generation,
                      applied="; ".join(applied) or "nothing to change here")
        self.report()
        return applied

    @defer.inlineCallbacks
    def stop(self):
        """
        The reactor's before-shutdown trigger: stop claiming, finish what is
        held, acknowledge, close the queue; waits for a start in progress.
        """
        self.state = "stopping"
        self.report()
        yield self._starting
        if self.iomaster is not None and self.iomaster.running:
            yield self.iomaster.stopService()
        if self._reporter.running:
            self._reporter.stop()
        yield self._lastReport()

    def _lastReport(self):
        """
        The final counts, so the master's totals keep the items finished
        while stopping.  The reactor drops unwritten data as it stops, so
        the channel is closed, which writes out what is buffered first.
        """
        if self.channel.transport is None:
            return None
        self.report()
        self.channel.transport.loseConnection()
        closed = self.channel.closed
        closed.addTimeout(LAST_REPORT_TIMEOUT, self.reactor)
        closed.addErrback(lambda f: f.trap(defer.TimeoutError))
        return closed

    def report(self):
        if self.channel.transport is not None:
            self.channel.callRemote(Report, report=self.snapshot())

    def snapshot(self) -> dict:
        """What the master keeps of this worker (see L{snq.pool})."""
        snapshot = {"state": self.state, "pid": os.getpid(),
                    "started": self.started, "rss": residentMemory(),
                    "activity": self.activity(),
                    "config": {"generation": self.config.generation,
                               "loaded": self.config.loaded}}
        master = self.iomaster
        if master is not None:
            stats, dispatcher = master.stats, master.dispatcher
            snapshot.update(
                handled=stats.total("handled"), errors=stats.total("error"),
                items=master.watch.items,
                inflight=dispatcher.running, held=len(dispatcher.held),
                threads=dispatcher.threadStats(),
                claims=master.manager.claimTrouble,
                counts=[[*key, n] for key, n in stats.counts.items()],
                timings=stats.timings, buckets=stats.buckets,
                iomanagers=master.status())
        return snapshot

    def activity(self) -> list[str]:
        """
        C{[state, substate]} in StatusNet's words, for the UDP monitor:
        init, queue (substate: the transports running), listening, poll or
        idle (waiting for work), shutdown.
        """
        if self.state == "stopping":
            return ["shutdown", ""]
        if self.state == "starting":
            return ["init", ""]
        running = self.iomaster.dispatcher.runningTransports()
        if running:
            return ["queue", ",".join(running)]
        manager = self.iomaster.manager
        if isinstance(manager, PollingManager):
            return ["idle" if manager.idle else "poll", ""]
        return ["listening", ""]


def lineObserver(stream):
    """
    Log events as C{"level text"} lines, one per line of text, for the
    master to read; once the master is gone nobody reads, and that is fine.
    """

    def observe(event):
        level = event.get("log_level", LogLevel.info).name
        text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        try:
            stream.write("".join(f"{level} {line}\n" for line in text.splitlines()))
            stream.flush()
        except OSError:
            pass

    return observe


def check(text: bytes, source: str, queue: bool = True) -> list[str]:
    """
    What would keep a worker from starting on this config's text; without
    C{queue}, the queue is not made (that needs the global reactor).
    """
    try:
        config = snqconfig.parseText(text, source)
    except snqconfig.ConfigError as e:
        return e.problems
    problems = []
    try:
        HandlerRegistry.load(config.handlers)
    except HandlerError as e:
        problems.append(f"{source}: {e}")
    if queue:
        try:
            makeQueue(config)
        except Exception as e:
            problems.append(f"{source}: [queue] backend {config.queue.backend}: {e}")
    problems += [f"{source}: {why}" for why in checkPlugins(config)]
    return problems


def _role(value: str) -> str:
    if value in ROLES or snqconfig.isName(value):
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is not a role")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m snq.child",
                                     description="An snq worker process.")
    parser.add_argument("--config", help="TOML config file (default: built-in)")
    parser.add_argument("--stdin-config", action="store_true",
                        help="read the config's text from stdin; --config names it")
    parser.add_argument("--check", action="store_true",
                        help="check the config on stdin and exit")
    parser.add_argument("--id", help="the worker id")
    parser.add_argument("--role", type=_role, default="queues",
                        help="what to run: all, first or queues (every group "
                        "but xmpp; first also the IoManagers wanting one "
                        "worker), xmpp, or a dedicated IoManager's name")
    parser.add_argument("--site", help="handle only this site's items")
    parser.add_argument("--generation", type=int, default=0,
                        help="the master's number for this config")
    parser.add_argument("--loaded", type=float, default=None,
                        help="when the master loaded this config")
    parser.add_argument("--claimant", help="the name in this worker's leases")
    parser.add_argument("--journal-fd", type=int, default=None,
                        help="the descriptor of the journal the master reads "
                        "after a death")
    args = parser.parse_args(argv)
    stdin = sys.stdin.buffer
    if args.check:
        problems = check(stdin.read(), args.config or "<stdin>")
        print("\n".join(problems))
        return 1 if problems else 0
    if not args.id:
        parser.error("--id is required")
    globalLogBeginner.beginLoggingTo([lineObserver(sys.stderr)])
    log = Logger(namespace="snq.child")
    try:
        if args.stdin_config:
            config = snqconfig.parseText(stdin.read(), args.config or "<stdin>")
        else:
            config = snqconfig.load(args.config)
    except snqconfig.ConfigError as e:
        log.critical("worker {wid}: invalid configuration:\n{e}", wid=args.id, e=e)
        return 1

    reactor = installReactor(needsStartTLS(config, args.role))
    config = dataclasses.replace(config, generation=args.generation,
                                 loaded=args.loaded)
    journal = None if args.journal_fd is None else Journal.attach(args.journal_fd)
    worker = Worker(config, args.id, reactor, role=args.role, site=args.site,
                    claimant=args.claimant, journal=journal)
    stdio.StandardIO(worker.channel, stdin=FROM_MASTER, stdout=TO_MASTER,
                     reactor=reactor)
    reactor.addSystemEventTrigger("before", "shutdown", worker.stop)

    def started():
        # Instead of the reactor's handlers, which stop it again on a second
        # signal (Ctrl-C reaches master and workers, then the master's TERM).
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, worker.signalled)
        worker.start()

    reactor.callWhenRunning(started)
    reactor.run()
    return worker.exitCode


if __name__ == "__main__":
    sys.exit(main())
