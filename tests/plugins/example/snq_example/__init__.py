"""
An IoManager plugin for snq: a heartbeat.  Every C{interval} seconds it
enqueues one item for C{transport} on each site its worker serves, so a
web application can see that its queue daemon is alive.

Enable it with::

    [iomanagers.heartbeat]
    interval = 30
    transport = "heartbeat"
    worker = "one"          # every | one | dedicated
"""

from dataclasses import dataclass, field

from snq.config import NAME, check
from snq.iomanager import PollingManager


@dataclass(frozen=True)
class HeartbeatSettings:
    """The keys of C{[iomanagers.heartbeat]} (besides snq's own)."""

    interval: float = field(default=60.0, metadata=check(
        lambda v: v > 0, "seconds above 0"))
    transport: str = field(default="heartbeat", metadata=NAME)


class Heartbeat(PollingManager):
    """A PollingManager whose C{poll} answers with the seconds to wait."""

    Settings = HeartbeatSettings

    def __init__(self, context):
        super().__init__(context.settings.interval, context.clock)
        self.context = context
        self.beats = 0

    @classmethod
    def check(cls, config, settings):
        if settings.transport in ("heartbeat", "log", "noop"):
            return []
        if settings.transport not in config.handlers:
            return [f"transport {settings.transport!r} has no handler in "
                    "[handlers]"]
        return []

    def poll(self):
        context = self.context
        items = [context.item(context.settings.transport,
                              {"beat": self.beats + 1, "worker": context.workerId},
                              site)
                 for site in context.sites()]
        return context.enqueueItems(items).addCallback(self._beaten)

    def _beaten(self, _):
        self.beats += 1
        # Counted under the key its status row has: one row on the dashboard.
        self.context.count("beats", "heartbeat")
        return float(self.context.settings.interval)

    def reconfigService(self, config):
        """A new interval counts from the next beat on; nothing restarts."""
        interval = self.context.settings.interval
        if interval == self.pollInterval:
            return []
        self.pollInterval = interval
        return [f"heartbeat every {interval:g} s"]

    def status(self):
        return [{"key": "heartbeat", "state": "ok",
                 "detail": f"{self.beats} beats, every {self.pollInterval:g} s"}]
