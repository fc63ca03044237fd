# -*- test-case-name: tests.test_tap -*-
"""
C{twistd snq}: command-line options and the service they build: a master
supervising a pool of worker processes (L{snq.pool}) with its control
socket (L{snq.control}) and monitors (L{snq.monitor}), or with C{--inline}
one IoMaster in this process; in both, a reloader (L{snq.reload}) that
reconfigures the whole tree.
"""

import os
import subprocess
import sys
import time

from twisted.logger import Logger
from twisted.python import usage

from snq import config as snqconfig
from snq.lean import installReactor
from snq.reconfig import stamped
from snq.reload import CHECK_TIMEOUT, checkArguments, checkProblems
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
        if not self["inline"]:
            # Before twistd does, unless --reactor did: a master starts no
            # TLS on a connection, so its reactor goes without (snq.lean).
            installReactor()


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
    The validated config, stamped as the master's first generation, or exit
    with every problem listed.
    """
    path = path or environ.get(snqconfig.ENV_VAR) or None
    try:
        config = (snqconfig.Config() if path is None
                  else snqconfig.parseText(snqconfig.read(path), path))
    except snqconfig.ConfigError as e:
        raise SystemExit(f"snq: invalid configuration, not starting:\n{e}")
    return stamped(config, generation=1, loaded=time.time())


def startCheck(config) -> subprocess.Popen | None:
    """
    Every worker would fail on a handler or IoManager plugin that does not
    load: a fresh interpreter loads them (L{snq.reload.checkArguments}),
    while the master, which imports no handler code, builds its services.
    """
    if not (config.handlers or config.managers()):
        return None  # nothing named that could fail: built-ins only log
    check = subprocess.Popen(checkArguments(config.source), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    check.stdin.write(config.text)
    check.stdin.close()
    check.stdin = None  # written: communicate() has nothing more to send
    return check


def refuseUnchecked(check, config):
    """Exit with the check's problems, if it found any."""
    if check is None:
        return
    try:
        output, _ = check.communicate(timeout=CHECK_TIMEOUT)
    except subprocess.TimeoutExpired:
        check.kill()
        check.wait()
        raise SystemExit(f"snq: checking {config.source} took over "
                         f"{CHECK_TIMEOUT:g} s")
    problems = checkProblems(check.returncode, output, config.source)
    if problems:
        raise SystemExit("snq: " + "\nsnq: ".join(problems))


def makeService(options):
    config = loadConfig(options["config"])
    if options["inline"]:
        return _inline(options, config)
    check = startCheck(config)
    try:
        daemon = _master(options, config)
    except BaseException:
        if check is not None:
            check.kill()
            check.wait()
        raise
    refuseUnchecked(check, config)
    return daemon


def _running(options, config) -> str:
    """What the daemon runs, in words; exits on an unknown site."""
    site = options["site"]
    sites = config.knownSites()
    if site is not None and sites is not None and site not in sites:
        raise SystemExit(f"snq: --site {site}: there is no [sites.{site}] in "
                         f"{_source(config)}")
    if config.queue.backend == "stomp":
        from snq.stomp.control import startWarning

        warning = startWarning(config.stomp)
        if warning:
            Daemon.log.warn("{why}", why=warning)
    return f"site {site}" if site is not None else "every site"


def _source(config) -> str:
    return config.source or "embedded default config"


def _inline(options, config):
    """One IoMaster in this process: it loads the handlers itself."""
    from twisted.internet import reactor

    from snq.handlers import HandlerError, HandlerRegistry
    from snq.iomanagers import checkPlugins
    from snq.iomaster import IoMaster
    from snq.reload import Reloader

    try:
        registry = HandlerRegistry.load(config.handlers)
    except HandlerError as e:
        raise SystemExit(f"snq: {e}")
    problems = checkPlugins(config)
    if problems:
        raise SystemExit("snq: " + "\nsnq: ".join(problems))
    running = _running(options, config)
    daemon = Daemon()
    # It owns SIGHUP, and reloads the whole tree below the daemon.
    reloader = Reloader(daemon, config, site=options["site"], rolling=False)
    # No pool to ask: a shutdown from the control channel stops it all.
    master = IoMaster(config, workerId=f"{config.daemon.id}.0",
                      registry=registry, site=options["site"],
                      shutdown=lambda reason: reactor.stop(),
                      reload=reloader.requested)
    print(f"snq: {_source(config)}, queue {master.queue.describe()}, inline, "
          f"{running}", file=sys.stderr)
    master.setServiceParent(daemon)
    reloader.setServiceParent(daemon)
    return daemon


def _master(options, config):
    """The master: control socket, monitors, reaper, the pool, the reloader."""
    from snq.cluster.registry import RegistryService
    from snq.control import ControlService
    from snq.monitor.service import MonitorService
    from snq.pool import WorkerPool
    from snq.reaper import Reaper
    from snq.reload import Reloader
    from snq.spawner import ForkSpawner

    running = _running(options, config)
    site = options["site"]
    daemon = Daemon()
    reloader = Reloader(daemon, config, site=site, rolling=True)
    spawner = (ForkSpawner(startTimeout=config.daemon.start_timeout)
               if config.daemon.fork_server else None)
    pool = WorkerPool(config, options["workers"], site=site,
                      requestReload=reloader.requested, spawner=spawner)
    print(f"snq: {_source(config)}, {len(pool.workers)} workers, {running}",
          file=sys.stderr)
    monitor = MonitorService(config, pool)
    # The control socket first: a second master refuses to start before it
    # has spawned anything; and on stop it answers until the pool is down.
    ControlService(pool, config.daemon.control_socket, reloader=reloader,
                   tracker=monitor.tracker).setServiceParent(daemon)
    # Before the pool, so it stops after it: the last counts and states of
    # the stopping workers still reach the monitors.
    monitor.setServiceParent(daemon)
    # Before the pool, so its last heartbeat, "stopped", comes after it.
    monitor.registry = RegistryService(config, monitor.tracker, reloader)
    monitor.registry.setServiceParent(daemon)
    # Before the pool, so it stops after it: claims left by the workers'
    # last deaths go back.
    Reaper(config, pool).setServiceParent(daemon)
    pool.setServiceParent(daemon)
    reloader.setServiceParent(daemon)
    return daemon
