"""
Handlers for tests that run a real daemon: they record what they handled in
a file named by the site config, one item id a line, so the test process
can check at-least-once delivery from outside.
"""

import os

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from snq.handlers import QueueHandler


class Record(QueueHandler):
    """Appends the item id to C{record_file}; C{payload.sleep} slows it."""

    def handle(self, item):
        pause = item.payload.get("sleep") if isinstance(item.payload, dict) else None
        if pause:
            return deferLater(reactor, pause, self._record, item)
        self._record(item)
        return None

    def _record(self, item):
        path = self.context.siteConfig(item.site)["record_file"]
        with open(path, "a") as f:
            f.write(f"{item.id}\n")


class Leak(QueueHandler):
    """Keeps C{payload.kb} KiB per item alive: a handler that leaks."""

    kept: list = []

    def handle(self, item):
        self.kept.append(os.urandom(item.payload["kb"] * 1024))
        return defer.succeed(True)
