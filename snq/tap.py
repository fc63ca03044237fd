# -*- test-case-name: tests.test_tap -*-
"""
C{twistd snq}: command-line options and the service they build.
"""

import os
import sys

from twisted.logger import Logger
from twisted.python import usage

from snq import config as snqconfig
from snq.handlers import HandlerError
from snq.service import AsyncMultiService


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the snq queue daemon.  Without --config (or $SNQ_CONFIG) it runs "
        "on the embedded default: an SQLite queue in ./snq.sqlite."
    )
    optParameters = [
        ["config", "c", None,
         "TOML configuration file (default: $SNQ_CONFIG, else built-in defaults)"],
    ]
    optFlags = [
        ["inline", None,
         "Run the handlers in this process (one worker, for debugging)."],
    ]

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
        reactor.stop()


def loadConfig(path):
    """The validated config, or exit with every problem listed."""
    try:
        return snqconfig.load(path)
    except snqconfig.ConfigError as e:
        raise SystemExit(f"snq: invalid configuration, not starting:\n{e}")


def makeService(options):
    from snq.iomaster import IoMaster

    config = loadConfig(options["config"])
    try:
        master = IoMaster(config, workerId=f"{config.daemon.id}.0")
    except HandlerError as e:
        raise SystemExit(f"snq: {e}")
    print(f"snq: {config.source or 'embedded default config'}, "
          f"queue {master.queue.describe()}", file=sys.stderr)
    daemon = Daemon()
    master.setServiceParent(daemon)
    return daemon
