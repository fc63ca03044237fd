# -*- test-case-name: tests.test_tap -*-
"""
C{twistd snq}: command-line options and the service they build: a master
supervising a pool of worker processes (L{snq.pool}) with its control
socket (L{snq.control}) and reloads (L{snq.reload}), or with C{--inline}
one IoMaster in this process.
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
        ["site", None, None,
         "Run one site: handle only the items of site NICK (on Redis and "
         "STOMP: consume only its breakouts)."],
    ]
    optFlags = [
        ["inline", None,
         "Run the handlers in this process: one worker, no respawning, no "
         "memory recycling, no control socket (for debugging)."],
        ["all", None, "Run every site in this daemon (the default)."],
    ]

    def opt_threads(self, value):
        """Same as --workers (queuedaemon.php's name)."""
        usage.CoerceParameter(self, _workerCount).dispatch("workers", value)

    def postOptions(self):
        path = self["config"]
        if path is not None and not os.path.exists(path):
            raise usage.UsageError(f"config file {path} does not exist")
        if self["site"] is not None and self["all"]:
            raise usage.UsageError("--site runs one site, --all every site: "
                                   "give one of them")


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


def loadConfig(path, environ=os.environ):
    """
    The validated config and the text it was read from (None for the
    embedded default), or exit with every problem listed.
    """
    path = path or environ.get(snqconfig.ENV_VAR) or None
    try:
        if path is None:
            return snqconfig.Config(), None
        text = snqconfig.read(path)
        return snqconfig.parseText(text, path), text
    except snqconfig.ConfigError as e:
        raise SystemExit(f"snq: invalid configuration, not starting:\n{e}")


def makeService(options):
    config, text = loadConfig(options["config"])
    # Every worker would fail on a handler that does not load: refuse now.
    try:
        registry = HandlerRegistry.load(config.handlers)
    except HandlerError as e:
        raise SystemExit(f"snq: {e}")
    source = config.source or "embedded default config"
    site = options["site"]
    sites = config.knownSites()
    if site is not None and sites is not None and site not in sites:
        raise SystemExit(f"snq: --site {site}: there is no [sites.{site}] in "
                         f"{source}")
    running = f"site {site}" if site is not None else "every site"
    daemon = Daemon()
    if options["inline"]:
        from twisted.internet import reactor

        from snq.iomaster import IoMaster
        from snq.reload import InlineReloader

        # No pool to ask: a shutdown from the control channel stops it all.
        master = IoMaster(config, workerId=f"{config.daemon.id}.0",
                          registry=registry, site=site,
                          shutdown=lambda reason: reactor.stop(),
                          reload=lambda reason: reloader.requested(reason))
        reloader = InlineReloader(master)
        print(f"snq: {source}, queue {master.queue.describe()}, inline, "
              f"{running}", file=sys.stderr)
        master.setServiceParent(daemon)
        reloader.setServiceParent(daemon)
        return daemon

    from snq.control import ControlService
    from snq.monitor.service import MonitorService
    from snq.pool import WorkerPool
    from snq.reload import Reloader

    count = options["workers"]
    if count is None:
        count = config.daemon.workers
    pool = WorkerPool(config, count or os.cpu_count() or 1, text=text, site=site)
    print(f"snq: {source}, {len(pool.workers)} workers, {running}",
          file=sys.stderr)
    monitor = MonitorService(config, pool)
    control = ControlService(pool, config.daemon.control_socket)
    reloader = Reloader(pool, [control, monitor], site=site,
                        workers=options["workers"])
    control.reloader = reloader
    pool.onReloadRequest = reloader.requested
    # The control socket first: a second master refuses to start before it
    # has spawned anything; and on stop it answers until the pool is down.
    control.setServiceParent(daemon)
    # Before the pool, so it stops after it: the last counts and states of
    # the stopping workers still reach the monitors.
    monitor.setServiceParent(daemon)
    pool.setServiceParent(daemon)
    return daemon
