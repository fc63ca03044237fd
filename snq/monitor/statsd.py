# -*- test-case-name: tests.test_monitor -*-
"""
statsd (C{[monitor] statsd = "HOST:PORT"}), once a second, with the names
under C{statsd_prefix} (default C{snq}):

* counters C{snq.COUNTER}, C{snq.COUNTER.transport.T}, C{snq.COUNTER.site.S}
  (COUNTER: handled, error, enqueued, … as in StatusNet); an IoManager's
  events as C{snq.iomanager.NAME.EVENT}, C{….key.K} and C{….site.S};
* a timer C{snq.handle_time.T} in milliseconds: per transport and second,
  the mean of the items finished in that second, with a sample rate of
  1/items so that statsd counts every item;
* gauges C{snq.queue.ready|delayed|held|dead}, C{snq.queue.oldest_age}
  (seconds), C{snq.inflight}, C{snq.workers.alive}, C{snq.rss} (bytes, all
  workers) and C{snq.worker.ID.rss|inflight}.

Names are made of letters, digits, C{_} and C{-}: anything else in a
transport, site or worker id (C{generic.1}) becomes C{_}.
"""

import collections
import re

from snq.config import parseHostPort
from snq.monitor.udp import UdpSender

#: Bytes per datagram: within an Ethernet MTU, as statsd advises.
PACKET = 1400

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def _part(name: str) -> str:
    return _UNSAFE.sub("_", name) or "_"


class StatsdSender(UdpSender):
    def __init__(self, host, port, prefix="snq", reactor=None):
        super().__init__(host, port, reactor)
        self.prefix = prefix
        #: metric name → increment since the last flush.
        self._counts: collections.Counter = collections.Counter()
        #: transport → [items, seconds] since the last flush.
        self._times: dict = collections.defaultdict(lambda: [0, 0.0])

    @classmethod
    def fromConfig(cls, monitor, reactor=None):
        return cls(*parseHostPort(monitor.statsd), prefix=monitor.statsd_prefix,
                   reactor=reactor)

    def counted(self, counter, transport, site, worker, n):
        manager, dot, event = counter.partition(".")
        if dot:
            # An IoManager's event, of a key (a feed, a schedule …).
            name = f"{self.prefix}.iomanager.{_part(manager)}.{_part(event)}"
            byKey = f"{name}.key.{_part(transport)}"
        else:
            name = f"{self.prefix}.{_part(counter)}"
            byKey = f"{name}.transport.{_part(transport)}"
        self._counts[name] += n
        if transport:
            self._counts[byKey] += n
        if site:
            self._counts[f"{name}.site.{_part(site)}"] += n

    def timed(self, transport, n, seconds):
        entry = self._times[transport]
        entry[0] += n
        entry[1] += seconds

    def sampled(self, sample, workers):
        p = self.prefix
        lines = [f"{name}:{n}|c" for name, n in self._counts.items()]
        for transport, (n, seconds) in self._times.items():
            rate = f"|@{1 / n:.6g}" if n > 1 else ""
            lines.append(f"{p}.handle_time.{_part(transport)}:"
                         f"{seconds / n * 1000:.3f}|ms{rate}")
        self._counts.clear()
        self._times.clear()
        gauges = {"inflight": sample["inflight"], "workers.alive": sample["workers"],
                  "rss": sample["rss"]}
        if sample["ready"] is not None:
            for state in ("ready", "delayed", "held", "dead"):
                gauges[f"queue.{state}"] = sample[state]
            gauges["queue.oldest_age"] = round(sample["oldest"] or 0.0, 3)
        for w in workers:
            if w["role"] == "current" and w["pid"] is not None:
                gauges[f"worker.{_part(w['id'])}.rss"] = w["rss"] or 0
                gauges[f"worker.{_part(w['id'])}.inflight"] = w["inflight"]
        lines += [f"{p}.{name}:{value}|g" for name, value in gauges.items()]
        self._sendLines(lines)

    def _sendLines(self, lines):
        """Several metrics a datagram, newline-separated, as statsd reads them."""
        packet = []
        size = 0
        for line in lines:
            if packet and size + len(line) + 1 > PACKET:
                self.send("\n".join(packet).encode())
                packet, size = [], 0
            packet.append(line)
            size += len(line) + 1
        if packet:
            self.send("\n".join(packet).encode())
