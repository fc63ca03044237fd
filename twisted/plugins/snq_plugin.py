"""twistd plugin: C{twistd snq}.  Only wiring here; see L{snq.tap}."""

from twisted.application.service import ServiceMaker

snq = ServiceMaker(
    "snq", "snq.tap", "snq queue daemon: runs handlers for queued work items",
    "snq")
