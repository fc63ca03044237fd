# -*- test-case-name: tests.test_tap -*-
"""
C{twistd snq}: command-line options and the service they build: a master
supervising a pool of worker processes (L{snq.pool}) with its control
socket (L{snq.control}), or with C{--inline} one IoMaster in this process.
"""

import os
import sys

from twisted.logger import Logger
from twisted.python import usage

from snq import config as snqconfig
from snq.handlers import HandlerError, HandlerRegistry
from snq.service import AsyncMultiService


def _workerCount(value: str) -> int:
    count = int(value)
    if count < 0:
        raise ValueError(f"{value} is below 0")
    return count


_workerCount.coerceDoc = "0 = one per CPU."


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the snq queue daemon: a master process supervising worker "
        "processes.  Without --config (or $SNQ_CONFIG) it runs on the embedded "
        "default: an SQLite queue in ./snq.sqlite, one worker per CPU.  "
        "twistd's own --pidfile, -u and -g set the pid file and the user and "
        "group the daemon runs as."
    )
    optParameters = [
        ["config", "c", None,
         "TOML configuration file (default: $SNQ_CONFIG, else built-in defaults)"],
        ["workers", "t", None,
         "Worker processes (default: [daemon] workers)", _workerCount],
    ]
    optFlags = [
        ["inline", None,
         "Run the handlers in this process: one worker, no respawning, no "
         "memory recycling, no control socket (for debugging)."],
    ]

    def opt_threads(self, value):
        """Same as --workers (queuedaemon.php's name)."""
        usage.CoerceParameter(self, _workerCount).dispatch("workers", value)

    def postOptions(self):
        path = self["config"]
        if path is not None and not os.path.exists(path):
            raise usage.UsageError(f"config file {path} does not exist")


class Daemon(AsyncMultiService):
    """
    The top of the tree: if any part cannot start (no database, say), the
    daemon stops with exit status 1 instead of sitting there doing nothing.
    """

    log = Logger()

    def startService(self):
        d = super().startService()
        d.addErrback(self._cannotStart)
        return d

    def _cannotStart(self, failure):
        from twisted.internet import reactor

        self.log.failure("snq cannot start", failure)
        reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        # A part can fail before the reactor runs (the control socket taken).
        reactor.callWhenRunning(reactor.stop)


def loadConfig(path):
    """The validated config, or exit with every problem listed."""
    try:
        return snqconfig.load(path)
    except snqconfig.ConfigError as e:
        raise SystemExit(f"snq: invalid configuration, not starting:\n{e}")


def makeService(options):
    config = loadConfig(options["config"])
    # Every worker would fail on a handler that does not load: refuse now.
    try:
        registry = HandlerRegistry.load(config.handlers)
    except HandlerError as e:
        raise SystemExit(f"snq: {e}")
    source = config.source or "embedded default config"
    daemon = Daemon()
    if options["inline"]:
        from twisted.internet import reactor

        from snq.iomaster import IoMaster

        # No pool to ask: a shutdown from the control channel stops it all.
        master = IoMaster(config, workerId=f"{config.daemon.id}.0",
                          registry=registry,
                          shutdown=lambda reason: reactor.stop())
        print(f"snq: {source}, queue {master.queue.describe()}, inline",
              file=sys.stderr)
        master.setServiceParent(daemon)
        return daemon

    from snq.control import ControlService
    from snq.monitor.service import MonitorService
    from snq.pool import WorkerPool

    count = options["workers"]
    if count is None:
        count = config.daemon.workers
    pool = WorkerPool(config, count or os.cpu_count() or 1)
    print(f"snq: {source}, {len(pool.workers)} workers", file=sys.stderr)
    # The control socket first: a second master refuses to start before it
    # has spawned anything; and on stop it answers until the pool is down.
    ControlService(pool, config.daemon.control_socket).setServiceParent(daemon)
    # Before the pool, so it stops after it: the last counts and states of
    # the stopping workers still reach the monitors.
    MonitorService(config, pool).setServiceParent(daemon)
    pool.setServiceParent(daemon)
    return daemon
