# -*- test-case-name: tests.test_monitor -*-
"""
/metrics in Prometheus' text format, through prometheus_client.

The numbers live in the L{Tracker} already (the workers report totals, not
events), so a collector reads them at each scrape instead of keeping a
second copy in prometheus_client's own counters.
"""

import itertools

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.utils import floatToGoString

from snq.stats import COUNTERS, DURATION_BUCKETS

_HELP = {
    "enqueued": "Items put on the queue by handlers",
    "handled": "Items handled successfully",
    "error": "Handler failures (each is retried or dead-lettered)",
    "requeued": "Items put back for a retry after a failure",
    "deadletter": "Items moved to the dead letters",
    "baditem": "Frames that were not a valid envelope",
    "badhandler": "Items for a transport without a handler",
    "badsite": "Items for a site not under [sites]",
    "switch": "Site switches (StatusNet's counter)",
    "siteupdate": "Site config updates received on the control channel",
    "xmpp_process": "Incoming XMPP stanzas processed",
    "claim_failed": "Claims that failed (the queue could not be asked)",
    "settle_failed": "Outcomes the queue refused (the item comes back when "
                     "its lease expires)",
    "deferred": "Items put back uncharged by their handler (a remote host "
                "at its limit, or its circuit open)",
    "circuit_open": "Times a remote host's circuit opened (failures in a "
                    "row): its items wait until a probe passes",
}
_DEPTH_STATES = ("ready", "delayed", "held")


class SnqCollector:
    """Reads a L{Tracker} (and the senders' drop counts) at each scrape."""

    def __init__(self, tracker, backend: str, senders=()):
        self.tracker = tracker
        self.backend = backend
        self.senders = senders

    def collect(self):
        tracker = self.tracker
        labels = ["transport", "site", "worker"]
        counters = {name: CounterMetricFamily(
            f"snq_{name}", _HELP[name], labels=labels)
            for name in COUNTERS}
        events = CounterMetricFamily(
            "snq_iomanager_events", "Events counted by IoManager plugins "
            "(feeds polled, schedule ticks fired …)",
            labels=["iomanager", "event", "key", "site", "worker"])
        for (counter, transport, site, wid), n in sorted(tracker.counts.items()):
            if counter in counters:
                counters[counter].add_metric([transport, site, wid], n)
            elif "." in counter:
                events.add_metric([*counter.split(".", 1), transport, site, wid], n)
        yield from counters.values()
        yield events
        yield self._ioManagerStates()

        histogram = HistogramMetricFamily(
            "snq_handle_duration_seconds", "Seconds a handler took per item",
            labels=["transport"])
        bounds = [floatToGoString(b) for b in DURATION_BUCKETS] + ["+Inf"]
        for transport, (_, seconds, buckets) in sorted(tracker.durations.items()):
            cumulative = zip(bounds, itertools.accumulate(buckets), strict=True)
            histogram.add_metric([transport], list(cumulative), seconds)
        yield histogram

        yield from self._queue()
        yield from self._workers()

        dropped = CounterMetricFamily(
            "snq_monitor_dropped_datagrams",
            "UDP monitor and statsd datagrams that could not be sent",
            labels=["sender"])
        for sender in self.senders:
            dropped.add_metric([type(sender).__name__], sender.dropped)
        yield dropped

    def _ioManagerStates(self):
        ok = GaugeMetricFamily(
            "snq_iomanager_ok", "1 while what an IoManager reports on (a "
            "feed, a schedule …) is fine, 0 while it is failing",
            labels=["iomanager", "key", "worker"])
        for name, manager in sorted(self.tracker.ioManagers().items()):
            for row in manager["status"]:
                ok.add_metric([name, row.get("key", ""), row["worker"]],
                              int(row.get("state") == "ok"))
        return ok

    def _queue(self):
        depth = self.tracker.depth
        if depth is None:
            return
        items = GaugeMetricFamily("snq_queue_items", "Items in the queue by state",
                                  labels=["backend", "state"])
        for state in _DEPTH_STATES:
            items.add_metric([self.backend, state], getattr(depth, state))
        yield items
        yield self._gauge("snq_dead_letters", "Dead letters kept by the backend",
                          "backend", [(self.backend, depth.dead)])
        yield self._gauge(
            "snq_queue_oldest_age_seconds",
            "Seconds the oldest due item has been waiting (0: none waits)",
            "backend", [(self.backend, depth.oldest or 0.0)])
        if depth.transports is None:
            return
        byTransport = GaugeMetricFamily(
            "snq_transport_items", "Items of a transport in the queue by state",
            labels=["backend", "transport", "state"])
        oldest = GaugeMetricFamily(
            "snq_transport_oldest_age_seconds", "Seconds the transport's oldest "
            "due item has been waiting (0: none waits)",
            labels=["backend", "transport"])
        for transport, part in sorted(depth.transports.items()):
            for state in _DEPTH_STATES:
                byTransport.add_metric([self.backend, transport, state],
                                       getattr(part, state))
            oldest.add_metric([self.backend, transport], part.oldest or 0.0)
        yield byTransport
        yield oldest

    def _workers(self):
        rows = [w for w in self.tracker.workers() if w["role"] == "current"]
        running = [w for w in rows if w["pid"] is not None]
        yield self._gauge("snq_worker_up", "1 while the worker's process runs",
                          "worker", [(w["id"], int(w["state"] == "running"))
                                     for w in rows])
        yield self._gauge("snq_worker_inflight", "Items running in the worker",
                          "worker", [(w["id"], w["inflight"]) for w in running])
        yield self._gauge("snq_worker_held", "Items the worker has claimed",
                          "worker", [(w["id"], w["held"]) for w in running])
        yield self._gauge("snq_worker_rss_bytes", "The worker's resident memory",
                          "worker", [(w["id"], w["rss"]) for w in running
                                     if w["rss"] is not None])
        yield self._gauge("snq_worker_uptime_seconds", "Seconds since the worker "
                          "process started", "worker",
                          [(w["id"], w["uptime"]) for w in running])
        yield self._gauge(
            "snq_worker_claim_failing_seconds", "Seconds the worker's claims "
            "have been failing (0: they work)", "worker",
            [(w["id"], w["claims_failing"]) for w in running])
        for what, documentation in (
                ("busy", "Blocking handler calls running in threads"),
                ("queued", "Blocking handler calls waiting for a thread"),
                ("max", "Threads for blocking handlers ([queue] threads)")):
            yield self._gauge(f"snq_worker_threads_{what}", documentation,
                              "worker", [(w["id"], w["threads"][what])
                                         for w in running if w["threads"]])
        restarts = CounterMetricFamily(
            "snq_worker_restarts", "Times the worker's process ended and was "
            "started again", labels=["worker"])
        for w in rows:
            restarts.add_metric([w["id"]], w["restarts"])
        yield restarts

    @staticmethod
    def _gauge(name, documentation, label, values):
        family = GaugeMetricFamily(name, documentation, labels=[label])
        for key, value in values:
            family.add_metric([key], value)
        return family


def registry(tracker, backend: str, senders=()) -> CollectorRegistry:
    """snq's metrics and the master process' own (memory, CPU, open files)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnqCollector(tracker, backend, senders))
    ProcessCollector(registry=registry)
    return registry
