# -*- test-case-name: tests.test_dispatch -*-
"""
What a handler may use of the daemon (its C{self.context}): the config,
enqueueing, the clock, and in the XMPP worker the connections.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from snq.item import DEFAULT_SITE, Item
from snq.queues.interface import takenOf

if TYPE_CHECKING:
    from snq.queues.interface import Queue
    from snq.stats import Stats


class HandlerContext:
    """What a handler may use of the daemon: config, enqueueing, the clock."""

    def __init__(self, config, queue: Queue, stats: Stats, clock):
        self.config = config
        self.queue = queue
        self.stats = stats
        self.clock = clock
        #: Site → its XmppManager, in a worker that runs the "xmpp" group.
        self.xmppManagers: dict = {}
        #: Name → the IoManager plugins this worker runs (L{snq.iomanagers}),
        #: for the handlers that go with them.
        self.iomanagers: dict = {}
        #: Callables C{(site, payload)} → (a Deferred of) True for an inbound
        #: XMPP message they took: it then becomes no C{xmppin} item.
        self.xmppInbound: list = []

    def siteConfig(self, site: str) -> dict:
        return self.config.siteConfig(site)

    def xmpp(self, site: str):
        """The XmppManager that serves C{site} in this worker, or None."""
        return self.xmppManagers.get(self.config.xmppSite(site))

    def item(self, transport: str, payload, site: str = DEFAULT_SITE,
             priority: int | None = None, run_at: float | None = None) -> Item:
        if priority is None:
            priority = self.config.transport(transport).priority
        return Item(transport=transport, payload=payload, site=site,
                    priority=priority, created=self.clock.seconds(),
                    run_at=run_at)

    def enqueue(self, transport: str, payload, site: str = DEFAULT_SITE,
                priority: int | None = None, delay: float = 0.0,
                run_at: float | None = None):
        """
        Put a new item on the queue, due in C{delay} seconds or at
        C{run_at} (UNIX seconds); fires when it is stored.
        """
        return self.enqueueItems(
            [self.item(transport, payload, site, priority, run_at)], delay)

    def enqueueItems(self, items: list[Item], delay: float = 0.0):
        """
        Store several items at once (in one transaction where there is one);
        fires with None (what a handler may return) once stored.  A keyed
        item a unique transport did not take is not counted as enqueued.
        """

        def counted(result):
            for item, stored in zip(items, takenOf(result, items), strict=True):
                if stored:
                    self.stats.count("enqueued", item.transport, item.site)

        return self.queue.enqueue(items, delay).addCallback(counted)
