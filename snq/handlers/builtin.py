# -*- test-case-name: tests.test_dispatch -*-
"""The small built-in handlers: log, noop, fanout."""

import json

from twisted.logger import Logger

from snq.handlers import QueueHandler, Reject


class LogHandler(QueueHandler):
    """Writes the item to the log: a first handler to see items flow."""

    transport = "log"
    log = Logger()

    def handle(self, item):
        self.log.info("{transport} item {id} for {site}: {payload}",
                      transport=item.transport, id=item.id, site=item.site,
                      payload=json.dumps(item.payload, ensure_ascii=False))


class NoopHandler(QueueHandler):
    """Does nothing; for benchmarks and smoke tests."""

    transport = "noop"

    def handle(self, item):
        return True


class FanoutHandler(QueueHandler):
    """
    StatusNet's C{distrib}: one item in, one item per listed transport out,
    each carrying the same payload for the same site.

    Payload: C{{"transports": ["webhook", "xmppout"], "payload": ...}}.  The
    new items are stored together (one transaction on SQL), so a retry after
    a failure does not leave some transports with a copy and others without.
    """

    transport = "fanout"

    def handle(self, item):
        payload = item.payload
        if not isinstance(payload, dict) or "payload" not in payload:
            raise Reject('fanout needs {"transports": [...], "payload": ...}')
        transports = payload.get("transports")
        if (not isinstance(transports, list) or not transports
                or not all(isinstance(t, str) and t for t in transports)):
            raise Reject("fanout 'transports' must be a non-empty list of names")
        items = [self.context.item(t, payload["payload"], site=item.site)
                 for t in transports]
        return self.context.enqueueItems(items).addCallback(lambda _: True)
