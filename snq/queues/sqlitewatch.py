# -*- test-case-name: tests.test_db -*-
"""
SQLite has no notifications, but every commit appends to the database's
write-ahead log; Linux's inotify tells us when it does.  An idle worker
then polls at once instead of at its next poll.  A commit that changes
nothing (an empty claim) writes nothing, so our own polls do not wake us.
"""

import os

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import filepath


class WalWatcher:
    """Calls C{wake()} when the SQLite file at C{path} gets a commit."""

    log = Logger()

    def __init__(self, path, wake, reactor):
        self.path = os.path.abspath(path)
        self.wake = wake
        self.reactor = reactor
        self._notifier = None

    def start(self):
        from twisted.internet import inotify

        self._notifier = inotify.INotify(self.reactor)
        self._notifier.startReading()
        # The directory, not the file: the WAL is created and truncated as
        # SQLite likes, and a watch on a file that goes away goes with it.
        # inotify reports paths as bytes.
        wal = os.fsencode(os.path.basename(self.path) + "-wal")
        self._notifier.watch(
            filepath.FilePath(os.fsencode(os.path.dirname(self.path))),
            mask=inotify.IN_MODIFY | inotify.IN_CREATE,
            callbacks=[lambda _, changed, mask: changed.basename() == wal
                       and self.wake()])

    def stopListening(self):
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
        return defer.succeed(None)


def walWatcher(path, wake, reactor):
    """A L{WalWatcher}, or None where inotify is missing (polling remains)."""
    try:
        from twisted.internet import inotify  # noqa: F401
    except ImportError:
        return None
    return WalWatcher(path, wake, reactor)
