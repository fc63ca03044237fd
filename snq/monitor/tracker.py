# -*- test-case-name: tests.test_monitor -*-
"""
The master's picture of the pool, built from what the workers report.

A worker's counters start again at 0 in each new process; the totals here
only grow, which is what Prometheus counters and statsd increments need.
Each report's increments, handle times and state changes are passed on to
the senders (L{Sink}s) as they arrive, and once a second a sample is kept
for a few minutes, so a dashboard opened now shows the recent past.
"""

import collections
import dataclasses
import os

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from snq.stats import emptyBuckets, residentMemory

#: Samples kept: ten minutes at one a second.
HISTORY = 600
#: Seconds between samples; the workers report as often.
INTERVAL = 1.0
#: Dead letters kept for the dashboard.
DEAD_SHOWN = 10


class Sink:
    """Receives what the tracker learns; a sender overrides what it uses."""

    def counted(self, counter: str, transport: str, site: str, worker: str,
                n: int):
        """C{counter} went up by C{n} in C{worker}."""

    def timed(self, transport: str, n: int, seconds: float):
        """C{n} more items of C{transport} took C{seconds} in all."""

    def stateChanged(self, worker: str, state: str, substate: str, when: float):
        """A worker's StatusNet thread state (see L{snq.child})."""

    def sampled(self, sample: dict, workers: list[dict]):
        """Once a second: the sample just taken and every worker's row."""


def _newDurations():
    return [0, 0.0, emptyBuckets()]


class Tracker(Service):
    """
    Observes the pool (L{snq.pool.WorkerPool.observers}) and keeps the
    daemon's totals since the master started.
    """

    log = Logger()

    def __init__(self, pool, clock, sinks=(), describe=""):
        self.pool = pool
        self.clock = clock
        self.sinks: list[Sink] = list(sinks)
        #: Where the queue is, for the dashboard.
        self.describe = describe
        #: (counter, transport, site, worker id) → total.
        self.counts: collections.Counter = collections.Counter()
        #: transport → [items, seconds, items per L{DURATION_BUCKETS} bucket].
        self.durations: dict[str, list] = collections.defaultdict(_newDurations)
        self.history: collections.deque = collections.deque(maxlen=HISTORY)
        #: The queue's last L{snq.queues.interface.Depth} (None: not known).
        self.depth = None
        #: The newest dead letters.
        self.dead: list = []
        self.started = None
        self._lastSample = None
        #: counter → increments since the last sample.
        self._recent: collections.Counter = collections.Counter()
        #: process → its previous report, to tell what is new.
        self._previous: dict = {}
        #: process → its last (state, substate).
        self._activity: dict = {}
        self._sampler = LoopingCall(self.sample)
        self._sampler.clock = clock

    def startService(self):
        super().startService()
        self.started = self._lastSample = self.clock.seconds()
        self._sampler.start(INTERVAL, now=False)

    def stopService(self):
        super().stopService()
        if self._sampler.running:
            self._sampler.stop()

    def workerReported(self, process, report: dict):
        previous = self._previous.get(process, {})
        self._previous[process] = report
        wid = process.worker.wid
        before = {(c, t, s): n for c, t, s, n in previous.get("counts", ())}
        for counter, transport, site, n in report.get("counts", ()):
            increment = n - before.get((counter, transport, site), 0)
            if increment > 0:
                self.counts[counter, transport, site, wid] += increment
                self._recent[counter] += increment
                self._tell("counted", counter, transport, site, wid, increment)
        self._addTimings(report, previous)
        activity = tuple(report.get("activity", ()))
        if activity and activity != self._activity.get(process):
            self._activity[process] = activity
            self._stateChanged(wid, *activity)

    def _addTimings(self, report, previous):
        oldTimings = previous.get("timings", {})
        oldBuckets = previous.get("buckets", {})
        empty = emptyBuckets()
        for transport, (n, seconds) in report.get("timings", {}).items():
            oldN, oldSeconds = oldTimings.get(transport, (0, 0.0))
            if n <= oldN:
                continue
            entry = self.durations[transport]
            entry[0] += n - oldN
            entry[1] += seconds - oldSeconds
            buckets = zip(report.get("buckets", {}).get(transport, empty),
                          oldBuckets.get(transport, empty), strict=True)
            for i, (new, old) in enumerate(buckets):
                entry[2][i] += new - old
            self._tell("timed", transport, n - oldN, seconds - oldSeconds)

    def workerEnded(self, process):
        self._previous.pop(process, None)
        state, _ = self._activity.pop(process, ("init", ""))
        if state != "shutdown":
            # Killed, or it died: it never said it was going.
            self._stateChanged(process.worker.wid, "shutdown", "")

    def _stateChanged(self, wid, state, substate):
        self._tell("stateChanged", wid, state, substate, self.clock.seconds())

    def _tell(self, method: str, *args):
        """A sender's failure is its own: never the pool's or a worker's."""
        for sink in self.sinks:
            try:
                getattr(sink, method)(*args)
            except Exception:
                self.log.failure("monitor {sink} failed", sink=sink)

    def totals(self) -> collections.Counter:
        """counter → total over every transport, site and worker."""
        totals = collections.Counter()
        for (counter, _, _, _), n in self.counts.items():
            totals[counter] += n
        return totals

    def workers(self) -> list[dict]:
        """A row per worker process (and per slot without one)."""
        handled = collections.Counter()
        errors = collections.Counter()
        for (counter, _, _, wid), n in self.counts.items():
            if counter == "handled":
                handled[wid] += n
            elif counter == "error":
                errors[wid] += n
        rows = []
        now = self.clock.seconds()
        for row in self.pool.status():
            report = row.get("report") or {}
            activity = report.get("activity") or ["", ""]
            claims = report.get("claims")
            rows.append({
                "id": row["id"], "role": row["role"], "pid": row.get("pid"),
                "state": row["state"], "activity": activity[0],
                "substate": activity[1], "uptime": row.get("uptime"),
                "rss": report.get("rss"), "inflight": report.get("inflight", 0),
                "held": report.get("held", 0), "handled": handled[row["id"]],
                "errors": errors[row["id"]], "restarts": row["restarts"],
                "last_exit": row["last_exit"],
                # Seconds its claims have been failing, with the last error.
                "claims_failing": max(now - claims["since"], 0.0) if claims
                else 0.0,
                "claim_error": claims["error"] if claims else None,
                "threads": report.get("threads")})
        return rows

    def ioManagers(self) -> dict:
        """
        IoManager name → C{"events"}: key (a feed, a schedule …) → event →
        total, and C{"status"}: the rows its instances report (each with the
        worker's id), for C{/status.json} and the dashboard.
        """
        managers = collections.defaultdict(lambda: {"events": {}, "status": []})
        for (counter, key, _, _), n in self.counts.items():
            name, dot, event = counter.partition(".")
            if dot:
                events = managers[name]["events"].setdefault(key, {})
                events[event] = events.get(event, 0) + n
        for row in self.pool.status():
            if row["role"] != "current":
                continue
            report = row.get("report") or {}
            for name, rows in (report.get("iomanagers") or {}).items():
                managers[name]["status"] += [{**r, "worker": row["id"]}
                                             for r in rows]
        return dict(managers)

    def sample(self):
        now = self.clock.seconds()
        workers = self.workers()
        depth = self.depth
        sample = {
            "t": now, "dt": now - self._lastSample,
            "handled": self._recent["handled"], "errors": self._recent["error"],
            "deadletters": self._recent["deadletter"],
            "inflight": sum(w["inflight"] for w in workers),
            "workers": sum(w["state"] == "running" for w in workers),
            "rss": sum(w["rss"] or 0 for w in workers),
            "ready": None if depth is None else depth.ready,
            "delayed": None if depth is None else depth.delayed,
            "held": None if depth is None else depth.held,
            "dead": None if depth is None else depth.dead,
            "oldest": None if depth is None else depth.oldest,
        }
        self._recent.clear()
        self._lastSample = now
        self.history.append(sample)
        self._tell("sampled", sample, workers)

    def summary(self) -> dict:
        """
        The figures without the history, as JSON-ready data: what the
        control socket's C{Status} adds for the monitors outside the
        master (the SNMP agent).
        """
        depth = self.depth
        transports = collections.defaultdict(dict)
        for (counter, transport, _, _), n in self.counts.items():
            if transport and "." not in counter:
                row = transports[transport]
                row[counter] = row.get(counter, 0) + n
        for transport, (n, seconds, _) in self.durations.items():
            transports[transport].update(timed=n, seconds=seconds)
        sites = collections.defaultdict(dict)
        for (counter, _, site, _), n in self.counts.items():
            if site and "." not in counter:
                row = sites[site]
                row[counter] = row.get(counter, 0) + n
        return {
            "workers": self.workers(),
            "totals": dict(self.totals()),
            "transports": transports,
            "sites": sites,
            "iomanagers": self.ioManagers(),
            "queue": None if depth is None else dataclasses.asdict(depth),
        }

    def status(self, since: float | None = None) -> dict:
        """Everything the dashboard shows, as JSON-ready data."""
        now = self.clock.seconds()
        return {
            "time": now,
            "master": {"pid": os.getpid(), "started": self.started,
                       "uptime": now - self.started if self.started else 0,
                       "rss": residentMemory(), "queue": self.describe},
            "interval": INTERVAL,
            **self.summary(),
            "dead": [{"id": d.id, "transport": d.transport, "site": d.site,
                      "reason": d.reason, "error": d.error,
                      "attempts": d.attempts, "died": d.died}
                     for d in self.dead],
            "history": [s for s in self.history
                        if since is None or s["t"] > since],
        }


class QueueWatch(Service):
    """
    Looks at the queue's depth and newest dead letters every C{interval}
    seconds, on a queue of the master's own (read-only use).  A queue that
    cannot be opened or asked is tried again at the next look; the daemon
    runs on without the numbers.  A backend that cannot count (its depth is
    None) is not asked again.
    """

    log = Logger()

    def __init__(self, queue, tracker: Tracker, interval: float, clock):
        self.queue = queue
        self.tracker = tracker
        self.opened = False
        self._failing = False
        self._looker = LoopingCall(self.look)
        self._looker.clock = clock
        self.interval = interval

    def startService(self):
        super().startService()
        self._looking = self._looker.start(self.interval)

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self._looker.running:
            self._looker.stop()
        # The look in progress, if any, ends before the queue is closed.
        yield self._looking
        if self.opened:
            self.opened = False
            yield self.queue.close()

    @defer.inlineCallbacks
    def look(self):
        try:
            if not self.opened:
                yield self.queue.open()
                self.opened = True
            depth = yield self.queue.depth()
            if depth is None:
                yield self._cannotCount()
                return
            self.tracker.depth = depth
            self.tracker.dead = yield self.queue.deadList(DEAD_SHOWN)
        except Exception:
            if not self._failing:
                self.log.failure("cannot look at the queue {queue}; trying again "
                                 "every {interval:g} s", queue=self.queue.describe(),
                                 interval=self.interval)
            self._failing = True
        else:
            if self._failing:
                self.log.info("the queue {queue} answers again",
                              queue=self.queue.describe())
            self._failing = False

    def _cannotCount(self):
        """
        Looking again would only cost: listing a broker's dead letters, for
        one, means taking every one of them and giving it back.
        """
        self.log.info("the {queue} backend does not tell how much it holds: "
                      "the dashboard and /metrics leave the queue out",
                      queue=self.queue.describe())
        self._looker.stop()
        self.opened = False
        return self.queue.close()
