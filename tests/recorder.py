"""
Handlers for tests that run a real daemon.  C{Record} appends
C{"ITEM_ID PID ATTEMPTS"} to the file named by the site config's
C{record_file}, so a test can check from outside who handled what, and how
often; C{Stamp} adds when it started, C{Created} when the item was made.
"""

import os
import time

from twisted.internet import defer
from twisted.internet.task import deferLater

from snq.handlers import QueueHandler


def record(path, item, *extra):
    line = " ".join([item.id, str(os.getpid()), str(item.attempts), *extra])
    line = (line + "\n").encode()
    # One write with O_APPEND: lines from several processes never mix.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def recorded(path):
    """
    [(item id, pid, attempts[, started])] from a record file, in the order
    written.
    """
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [tuple(line.split()) for line in f if line.strip()]


class Record(QueueHandler):
    """Records the item; C{payload.sleep} seconds later if it says so."""

    def handle(self, item):
        path = self.context.siteConfig(item.site)["record_file"]
        pause = item.payload.get("sleep") if isinstance(item.payload, dict) else None
        if pause:
            return deferLater(self.context.clock, pause, record, path, item)
        record(path, item)
        return None


class Stamp(QueueHandler):
    """
    Records the item and the time it started (UNIX seconds); C{payload.sleep}
    seconds later if it says so.
    """

    def handle(self, item):
        path = self.context.siteConfig(item.site)["record_file"]
        started = f"{time.time():.6f}"
        pause = item.payload.get("sleep") if isinstance(item.payload, dict) else None
        if pause:
            return deferLater(self.context.clock, pause, record, path, item, started)
        record(path, item, started)
        return None


class Created(QueueHandler):
    """Records the item and when it was created (a schedule's tick)."""

    def handle(self, item):
        record(self.context.siteConfig(item.site)["record_file"], item,
               f"{item.created:.3f}")


class Leak(QueueHandler):
    """Keeps C{payload.kb} KiB per item alive: a handler that leaks."""

    kept: list = []

    def handle(self, item):
        self.kept.append(os.urandom(item.payload["kb"] * 1024))
        return defer.succeed(True)


class Fail(QueueHandler):
    """Fails every item (returns False): an error, then a retry or a dead letter."""

    def handle(self, item):
        return False
