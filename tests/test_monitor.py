# -*- test-case-name: tests.test_monitor -*-
"""
The master's monitoring piece by piece: the tracker on made-up worker
reports (on a Clock), StatusNet's datagrams and statsd's lines as a
listener on 127.0.0.1 receives them, /metrics read back with
prometheus_client's parser, and the HTTP side on a loopback port.
"""

import io
import json
import sys
from urllib.parse import parse_qs

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, endpoints, error, protocol, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.logger import Logger, eventFromJSON, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import http

from snq import config as snqconfig
from snq.logs import jsonLines
from snq.monitor.metrics import registry
from snq.monitor.service import MonitorService
from snq.monitor.statsd import StatsdSender
from snq.monitor.tracker import HISTORY, QueueWatch, Sink, Tracker
from snq.monitor.udp import StatusNetMonitor, UdpSender
from snq.monitor.web import HttpService, makeSite
from snq.queues.interface import Depth, TransportDepth
from snq.queues.memory import MemoryQueue
from snq.stats import DURATION_BUCKETS, Stats


class FakeWorker:
    def __init__(self, wid):
        self.wid = wid


class FakeProcess:
    def __init__(self, wid):
        self.worker = FakeWorker(wid)


class FakePool:
    def __init__(self):
        self.observers = []
        self.rows = []

    def status(self):
        return self.rows


def report(counts=(), timings=None, activity=("idle", ""), inflight=0, rss=0):
    stats = Stats()
    for counter, transport, site, n in counts:
        stats.count(counter, transport, site, n)
    for transport, seconds in timings or ():
        stats.timing(transport, seconds)
    return {"state": "running", "activity": list(activity), "inflight": inflight,
            "held": inflight, "rss": rss,
            "counts": [[*key, n] for key, n in stats.counts.items()],
            "timings": json.loads(json.dumps(stats.timings)),
            "buckets": json.loads(json.dumps(stats.buckets))}


def row(wid, pid, state="running", role="current", restarts=0, **kw):
    return {"id": wid, "role": role, "pid": pid, "state": state,
            "restarts": restarts, "last_exit": None, "uptime": 5.0,
            "report": report(**kw) if pid else {}}


class Recorder(Sink):
    def __init__(self):
        self.calls = []

    def counted(self, *args):
        self.calls.append(("counted", *args))

    def timed(self, *args):
        self.calls.append(("timed", *args))

    def stateChanged(self, *args):
        self.calls.append(("stateChanged", *args))

    def sampled(self, sample, workers):
        self.calls.append(("sampled", sample["handled"]))

    def named(self, name):
        return [c[1:] for c in self.calls if c[0] == name]


class StatsTests(SynchronousTestCase):
    def test_durationBuckets(self):
        """Bucket i holds times up to DURATION_BUCKETS[i], inclusive."""
        stats = Stats()
        for seconds in (0.001, 0.005, 0.0051, 61.0):
            stats.timing("t", seconds)
        buckets = stats.buckets["t"]
        self.assertEqual(len(buckets), len(DURATION_BUCKETS) + 1)
        self.assertEqual((buckets[0], buckets[1], buckets[-1], sum(buckets)),
                         (2, 1, 1, 4))


class TrackerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.pool = FakePool()
        self.sink = Recorder()
        self.tracker = Tracker(self.pool, self.clock, [self.sink], "memory")
        self.tracker.startService()
        self.addCleanup(self.tracker.stopService)

    def test_totalsOutliveProcesses(self):
        """A new process of a slot starts at 0 again; the totals do not."""
        first, second = FakeProcess("generic.0"), FakeProcess("generic.0")
        t = self.tracker
        t.workerReported(first, report([("handled", "t", "s", 3)]))
        t.workerReported(first, report([("handled", "t", "s", 5),
                                        ("error", "t", "s", 1)]))
        t.workerEnded(first)
        t.workerReported(second, report([("handled", "t", "s", 2)]))
        self.assertEqual(t.counts["handled", "t", "s", "generic.0"], 7)
        self.assertEqual(t.totals(), {"handled": 7, "error": 1})
        self.assertEqual(self.sink.named("counted"), [
            ("handled", "t", "s", "generic.0", 3),
            ("handled", "t", "s", "generic.0", 2),
            ("error", "t", "s", "generic.0", 1),
            ("handled", "t", "s", "generic.0", 2)])

    def test_timings(self):
        process = FakeProcess("generic.0")
        self.tracker.workerReported(process, report(timings=[("t", 0.004)]))
        self.tracker.workerReported(process, report(
            timings=[("t", 0.004), ("t", 0.2), ("t", 100)]))
        n, seconds, buckets = self.tracker.durations["t"]
        self.assertEqual(n, 3)
        self.assertAlmostEqual(seconds, 100.204)
        self.assertEqual((buckets[0], buckets[5], buckets[-1]), (1, 1, 1))
        [(t1, n1, _), (t2, n2, s2)] = self.sink.named("timed")
        self.assertEqual((t1, n1, t2, n2), ("t", 1, "t", 2))
        self.assertAlmostEqual(s2, 100.2)

    def test_stateChanges(self):
        """Each change once; an end without a goodbye is a shutdown."""
        process = FakeProcess("generic.1")
        t = self.tracker
        t.workerReported(process, report(activity=("init", "")))
        t.workerReported(process, report(activity=("queue", "t")))
        self.clock.advance(0.5)
        t.workerReported(process, report(activity=("queue", "t")))
        t.workerReported(process, report(activity=("idle", "")))
        t.workerEnded(process)
        polite = FakeProcess("generic.2")
        t.workerReported(polite, report(activity=("shutdown", "")))
        t.workerEnded(polite)
        self.assertEqual(self.sink.named("stateChanged"), [
            ("generic.1", "init", "", 1000.0), ("generic.1", "queue", "t", 1000.0),
            ("generic.1", "idle", "", 1000.5), ("generic.1", "shutdown", "", 1000.5),
            ("generic.2", "shutdown", "", 1000.5)])

    def test_sampleEverySecond(self):
        self.pool.rows = [row("generic.0", 11, inflight=2, rss=100),
                          row("generic.1", None, state="waiting")]
        process = FakeProcess("generic.0")
        self.tracker.workerReported(process, report([("handled", "t", "s", 4)]))
        self.tracker.depth = Depth(ready=3, delayed=1, held=2, dead=5, oldest=7.5)
        self.clock.advance(1)
        self.tracker.workerReported(process, report([("handled", "t", "s", 6)]))
        self.clock.advance(1)
        first, second = self.tracker.history
        self.assertEqual(first, {
            "t": 1001.0, "dt": 1.0, "handled": 4, "errors": 0, "deadletters": 0,
            "inflight": 2, "workers": 1, "rss": 100, "ready": 3, "delayed": 1,
            "held": 2, "dead": 5, "oldest": 7.5})
        self.assertEqual(second["handled"], 2)
        self.assertEqual(self.sink.named("sampled"), [(4,), (2,)])
        self.clock.pump([1] * (HISTORY + 5))
        self.assertEqual(len(self.tracker.history), HISTORY, "a ring buffer")

    def test_status(self):
        self.pool.rows = [row("generic.0", 11, inflight=1, rss=2**20,
                              activity=("queue", "t"))]
        self.tracker.workerReported(FakeProcess("generic.0"), report(
            [("handled", "t", "s", 4), ("error", "t", "s", 1)],
            timings=[("t", 0.1)]))
        self.clock.pump([1, 1, 1])
        status = self.tracker.status(since=1001.5)
        self.assertEqual([s["t"] for s in status["history"]], [1002.0, 1003.0])
        self.assertEqual(status["totals"], {"handled": 4, "error": 1})
        [worker] = status["workers"]
        self.assertEqual((worker["id"], worker["pid"], worker["activity"],
                          worker["substate"], worker["handled"], worker["errors"]),
                         ("generic.0", 11, "queue", "t", 4, 1))
        self.assertEqual(status["transports"]["t"]["handled"], 4)
        self.assertEqual(status["master"]["uptime"], 3.0)
        self.assertIsNone(status["queue"])
        json.dumps(status)

    def test_aFailingSinkFailsNothingElse(self):
        class Broken(Sink):
            def counted(self, *args):
                raise RuntimeError("broken")

        self.tracker.sinks.insert(0, Broken())
        self.tracker.workerReported(FakeProcess("generic.0"),
                                    report([("handled", "t", "s", 1)]))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(self.sink.named("counted")), 1)


class Listener(DatagramProtocol):
    """A UDP server on 127.0.0.1 that keeps what it receives."""

    def __init__(self):
        self.datagrams = []
        self._waiting = []

    def datagramReceived(self, data, address):
        self.datagrams.append(data)
        for n, d in list(self._waiting):
            if len(self.datagrams) >= n:
                self._waiting.remove((n, d))
                d.callback(None)

    def receive(self, n):
        """Fires once C{n} datagrams came (or fails after a few seconds)."""
        d = defer.Deferred()
        if len(self.datagrams) >= n:
            d.callback(None)
        else:
            self._waiting.append((n, d))
        return d.addTimeout(5, reactor)


class UdpTests(TestCase):
    def listen(self):
        listener = Listener()
        port = reactor.listenUDP(0, listener, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return listener, port.getHost().port

    def start(self, sender):
        sender.startService()
        self.addCleanup(sender.stopService)
        return sender

    @defer.inlineCallbacks
    def test_statusNetDatagrams(self):
        listener, port = self.listen()
        monitor = self.start(StatusNetMonitor.fromConfig(f"udp://127.0.0.1:{port}",
                                                         reactor))
        monitor.stateChanged("generic.1", "queue", "webhook", 1764340000.25)
        monitor.counted("handled", "webhook", "default", "generic.1", 2)
        monitor.counted("baditem", "", "", "generic.1", 1)
        yield listener.receive(4)
        state, handled, again, bad = [parse_qs(d.decode(), strict_parsing=True)
                                      for d in listener.datagrams]
        self.assertEqual(state, {"thread_id": ["generic.1"], "state": ["queue"],
                                 "substate": ["webhook"],
                                 "ts": ["1764340000.250000"]})
        self.assertEqual(handled, {"counter": ["handled"], "owners[]": [
            "queue:webhook", "site:default", "thread:generic.1"]})
        self.assertEqual(again, handled, "one datagram per event")
        self.assertEqual(bad, {"counter": ["baditem"],
                               "owners[]": ["thread:generic.1"]})
        self.assertIn(b"owners%5B%5D=queue%3Awebhook", listener.datagrams[1],
                      "form-encoded as PHP's http_build_query does")
        self.assertEqual(monitor.dropped, 0)

    @defer.inlineCallbacks
    def test_hostNameResolved(self):
        listener, port = self.listen()
        monitor = self.start(StatusNetMonitor("localhost", port, reactor))
        yield defer.Deferred.fromCoroutine(self._resolved(monitor))
        monitor.stateChanged("generic.0", "init", "", 1.0)
        yield listener.receive(1)

    async def _resolved(self, monitor):
        for _ in range(100):
            if monitor.address is not None:
                return
            await deferLater(0.01)
        self.fail("localhost did not resolve")

    @defer.inlineCallbacks
    def test_statsdLines(self):
        listener, port = self.listen()
        statsd = self.start(StatsdSender("127.0.0.1", port, "app.snq", reactor))
        statsd.counted("handled", "web hook", "default", "generic.1", 3)
        statsd.counted("handled", "web hook", "other", "generic.2", 2)
        statsd.timed("web hook", 4, 0.2)
        statsd.timed("log", 1, 0.001)
        sample = {"inflight": 2, "workers": 3, "rss": 300, "ready": 7,
                  "delayed": 1, "held": 2, "dead": 4, "oldest": 1.23456}
        statsd.sampled(sample, [
            {"id": "generic.1", "role": "current", "pid": 5, "rss": 100,
             "inflight": 2},
            {"id": "generic.2", "role": "current", "pid": None, "rss": None,
             "inflight": 0}])
        yield listener.receive(1)
        lines = listener.datagrams[0].decode().split("\n")
        self.assertEqual(sorted(lines), sorted([
            "app.snq.handled:5|c", "app.snq.handled.transport.web_hook:5|c",
            "app.snq.handled.site.default:3|c", "app.snq.handled.site.other:2|c",
            "app.snq.handle_time.web_hook:50.000|ms|@0.25",
            "app.snq.handle_time.log:1.000|ms",
            "app.snq.inflight:2|g", "app.snq.workers.alive:3|g",
            "app.snq.rss:300|g", "app.snq.queue.ready:7|g",
            "app.snq.queue.delayed:1|g", "app.snq.queue.held:2|g",
            "app.snq.queue.dead:4|g", "app.snq.queue.oldest_age:1.235|g",
            "app.snq.worker.generic_1.rss:100|g",
            "app.snq.worker.generic_1.inflight:2|g"]))
        statsd.sampled(dict(sample, ready=None), [])
        yield listener.receive(2)
        self.assertNotIn(b"|c", listener.datagrams[1], "counters were sent once")
        self.assertNotIn(b"queue.", listener.datagrams[1], "no depth, no gauges")

    @defer.inlineCallbacks
    def test_statsdSplitsDatagrams(self):
        listener, port = self.listen()
        statsd = self.start(StatsdSender("127.0.0.1", port, "snq", reactor))
        for n in range(200):
            statsd.counted("handled", f"transport{n}", "", "generic.0", 1)
        statsd.sampled({"inflight": 0, "workers": 1, "rss": 0, "ready": None}, [])
        yield listener.receive(2)
        yield deferLater(0.1)
        lines = [line for d in listener.datagrams for line in d.split(b"\n")]
        self.assertTrue(all(len(d) <= 1400 for d in listener.datagrams))
        self.assertEqual(len(lines), 201 + 3)


def deferLater(seconds):
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


class FakeSocket:
    def __init__(self, exception=None):
        self.exception = exception
        self.written = []

    def write(self, data, address):
        if self.exception is not None:
            raise self.exception
        self.written.append((data, address))

    def stopListening(self):
        return None


class FakeUdpReactor(Clock):
    def __init__(self, socket, lookups):
        super().__init__()
        self.socket = socket
        self.lookups = lookups

    def listenUDP(self, port, protocol, interface=""):
        return self.socket

    def resolve(self, name):
        return self.lookups.pop(0)


class UdpSenderTests(SynchronousTestCase):
    def test_neverFailsTheCaller(self):
        """A full buffer, a datagram too long: counted and let go."""
        fake = FakeUdpReactor(FakeSocket(BlockingIOError(11, "EAGAIN")), [])
        sender = UdpSender("127.0.0.1", 9, fake)
        sender.startService()
        sender.send(b"x")
        fake.socket.exception = error.MessageLengthError()
        sender.send(b"y")
        self.assertEqual(sender.dropped, 2)
        sender.stopService()

    def test_unresolvedNameRetried(self):
        lookups = [defer.fail(error.DNSLookupError("no such name")),
                   defer.succeed("192.0.2.1")]
        fake = FakeUdpReactor(FakeSocket(), lookups)
        sender = UdpSender("snqmon.example", 9, fake)
        sender.startService()
        sender.send(b"early")
        self.assertEqual((sender.dropped, fake.socket.written), (1, []))
        fake.advance(UdpSender.retryDelay)
        sender.send(b"later")
        self.assertEqual(fake.socket.written, [(b"later", ("192.0.2.1", 9))])
        sender.stopService()
        self.assertEqual(fake.getDelayedCalls(), [])

    def test_stopCancelsTheRetry(self):
        fake = FakeUdpReactor(FakeSocket(), [defer.fail(error.DNSLookupError("x"))])
        sender = UdpSender("snqmon.example", 9, fake)
        sender.startService()
        sender.stopService()
        self.assertEqual(fake.getDelayedCalls(), [])


class MetricsTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.pool = FakePool()
        self.tracker = Tracker(self.pool, self.clock)

    def metrics(self, senders=()):
        from prometheus_client import generate_latest

        text = generate_latest(registry(self.tracker, "db", senders)).decode()
        return {f.name: f for f in text_string_to_metric_families(text)}

    def samples(self, family, name=None):
        return {tuple(sorted(s.labels.items())): s.value
                for s in family.samples if name is None or s.name == name}

    def test_counters(self):
        self.tracker.workerReported(FakeProcess("generic.0"), report(
            [("handled", "t", "s", 4), ("handled", "u", "s", 1)]))
        self.tracker.workerReported(FakeProcess("generic.1"), report(
            [("handled", "t", "s", 2), ("deadletter", "t", "s", 1)]))
        metrics = self.metrics()
        self.assertEqual(self.samples(metrics["snq_handled"], "snq_handled_total"), {
            (("site", "s"), ("transport", "t"), ("worker", "generic.0")): 4,
            (("site", "s"), ("transport", "u"), ("worker", "generic.0")): 1,
            (("site", "s"), ("transport", "t"), ("worker", "generic.1")): 2})
        self.assertEqual(metrics["snq_handled"].type, "counter")
        self.assertEqual(sum(self.samples(metrics["snq_deadletter"]).values()), 1)
        self.assertIn("snq_xmpp_process", metrics, "every StatusNet counter")

    def test_remoteHostCounters(self):
        """Webhook items deferred by a remote host, and its circuits opened."""
        self.tracker.workerReported(FakeProcess("generic.0"), report(
            [("deferred", "webhook", "s", 7), ("circuit_open", "webhook", "s", 1)]))
        metrics = self.metrics()
        worker = (("site", "s"), ("transport", "webhook"), ("worker", "generic.0"))
        self.assertEqual(self.samples(metrics["snq_circuit_open"],
                                      "snq_circuit_open_total"), {worker: 1})
        self.assertEqual(self.samples(metrics["snq_deferred"],
                                      "snq_deferred_total"), {worker: 7})

    def test_histogram(self):
        self.tracker.workerReported(FakeProcess("generic.0"), report(
            timings=[("t", 0.003), ("t", 0.2), ("t", 0.2), ("t", 90)]))
        family = self.metrics()["snq_handle_duration_seconds"]
        self.assertEqual(family.type, "histogram")
        buckets = {s.labels["le"]: s.value for s in family.samples
                   if s.name.endswith("_bucket")}
        self.assertEqual((buckets["0.005"], buckets["0.1"], buckets["0.25"],
                          buckets["60.0"], buckets["+Inf"]), (1, 1, 3, 3, 4))
        [count] = [s.value for s in family.samples if s.name.endswith("_count")]
        [total] = [s.value for s in family.samples if s.name.endswith("_sum")]
        self.assertEqual(count, 4)
        self.assertAlmostEqual(total, 90.403)

    def test_queueAndWorkers(self):
        self.assertNotIn("snq_queue_items", self.metrics(), "depth not known yet")
        self.tracker.depth = Depth(ready=3, delayed=1, held=2, dead=5, oldest=None)
        self.pool.rows = [
            row("generic.0", 11, inflight=2, rss=1000, restarts=1),
            row("generic.0", 12, state="starting", role="replacement"),
            row("generic.1", None, state="waiting", restarts=4)]
        sender = StatsdSender("127.0.0.1", 9)
        sender.dropped = 7
        metrics = self.metrics([sender])
        self.assertEqual(self.samples(metrics["snq_queue_items"]), {
            (("backend", "db"), ("state", "ready")): 3,
            (("backend", "db"), ("state", "delayed")): 1,
            (("backend", "db"), ("state", "held")): 2})
        self.assertEqual(self.samples(metrics["snq_dead_letters"]),
                         {(("backend", "db"),): 5})
        self.assertEqual(self.samples(metrics["snq_queue_oldest_age_seconds"]),
                         {(("backend", "db"),): 0})
        self.assertEqual(self.samples(metrics["snq_worker_up"]), {
            (("worker", "generic.0"),): 1, (("worker", "generic.1"),): 0})
        self.assertEqual(self.samples(metrics["snq_worker_inflight"]),
                         {(("worker", "generic.0"),): 2})
        self.assertEqual(self.samples(metrics["snq_worker_rss_bytes"]),
                         {(("worker", "generic.0"),): 1000})
        self.assertEqual(self.samples(metrics["snq_worker_restarts"],
                                      "snq_worker_restarts_total"),
                         {(("worker", "generic.0"),): 1,
                          (("worker", "generic.1"),): 4})
        self.assertEqual(self.samples(metrics["snq_monitor_dropped_datagrams"],
                                      "snq_monitor_dropped_datagrams_total"),
                         {(("sender", "StatsdSender"),): 7})
        self.assertIn("process_resident_memory_bytes", metrics, "the master's own")
        self.assertNotIn("snq_transport_items", metrics,
                         "this backend cannot count by transport")

    def test_queueByTransport(self):
        self.tracker.depth = Depth.byTransport({
            "t": TransportDepth(ready=3, delayed=0, held=2, oldest=7.5),
            "u": TransportDepth(ready=0, delayed=1, held=0, oldest=None)}, dead=0)
        metrics = self.metrics()
        self.assertEqual(self.samples(metrics["snq_transport_items"]), {
            (("backend", "db"), ("state", "ready"), ("transport", "t")): 3,
            (("backend", "db"), ("state", "delayed"), ("transport", "t")): 0,
            (("backend", "db"), ("state", "held"), ("transport", "t")): 2,
            (("backend", "db"), ("state", "ready"), ("transport", "u")): 0,
            (("backend", "db"), ("state", "delayed"), ("transport", "u")): 1,
            (("backend", "db"), ("state", "held"), ("transport", "u")): 0})
        self.assertEqual(
            self.samples(metrics["snq_transport_oldest_age_seconds"]),
            {(("backend", "db"), ("transport", "t")): 7.5,
             (("backend", "db"), ("transport", "u")): 0})
        self.assertEqual(self.samples(metrics["snq_queue_oldest_age_seconds"]),
                         {(("backend", "db"),): 7.5})

    def test_stallsAreVisible(self):
        """Failing claims and settlements, and the blocking handlers' threads."""
        self.tracker.workerReported(FakeProcess("generic.0"), report(counts=[
            ("claim_failed", "", "", 7), ("settle_failed", "t", "s", 2)]))
        failing = row("generic.0", 11)
        failing["report"].update(
            claims={"since": self.clock.seconds() - 12.5, "failures": 7,
                    "error": "boom"},
            threads={"max": 10, "busy": 4, "queued": 2})
        self.pool.rows = [failing, row("generic.1", 12)]
        metrics = self.metrics()
        self.assertEqual(self.samples(metrics["snq_claim_failed"],
                                      "snq_claim_failed_total"),
                         {(("site", ""), ("transport", ""),
                           ("worker", "generic.0")): 7})
        self.assertEqual(self.samples(metrics["snq_settle_failed"],
                                      "snq_settle_failed_total"),
                         {(("site", "s"), ("transport", "t"),
                           ("worker", "generic.0")): 2})
        self.assertEqual(self.samples(metrics["snq_worker_claim_failing_seconds"]),
                         {(("worker", "generic.0"),): 12.5,
                          (("worker", "generic.1"),): 0})
        self.assertEqual(self.samples(metrics["snq_worker_threads_busy"]),
                         {(("worker", "generic.0"),): 4})
        self.assertEqual(self.samples(metrics["snq_worker_threads_queued"]),
                         {(("worker", "generic.0"),): 2})
        [status] = [w for w in self.tracker.status()["workers"]
                    if w["id"] == "generic.0"]
        self.assertEqual((status["claims_failing"], status["claim_error"],
                          status["threads"]["busy"]), (12.5, "boom", 4))


class HttpTests(TestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.pool = FakePool()
        self.tracker = Tracker(self.pool, self.clock)
        self.tracker.startService()
        self.addCleanup(self.tracker.stopService)

    @defer.inlineCallbacks
    def serve(self, token=""):
        site = makeSite(self.tracker, registry(self.tracker, "db"), token)
        service = HttpService("127.0.0.1:0", site, reactor)
        yield service.startService()
        self.addCleanup(service.stopService)
        return f"http://127.0.0.1:{service.port.getHost().port}/"

    @defer.inlineCallbacks
    def get(self, url, token=None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = yield treq.get(url, headers=headers, persistent=False)
        body = yield response.content()
        return response, body

    @defer.inlineCallbacks
    def test_dashboardFiles(self):
        base = yield self.serve()
        response, body = yield self.get(base)
        self.assertEqual(response.code, 200)
        self.assertIn(b'<script src="dashboard.js"></script>', body)
        policy = response.headers.getRawHeaders("content-security-policy")[0]
        self.assertIn("default-src 'self'", policy)
        self.assertNotIn(b"http://", body.replace(b"http://www.w3.org", b""),
                         "nothing from elsewhere")
        response, body = yield self.get(base + "dashboard.js")
        self.assertEqual(response.headers.getRawHeaders("content-type"),
                         ["text/javascript; charset=utf-8"])
        self.assertIn(b"status.json", body)
        self.assertNotIn(b"https://", body)

    @defer.inlineCallbacks
    def test_statusSince(self):
        base = yield self.serve()
        self.clock.pump([1, 1, 1])
        response, body = yield self.get(base + "status.json?since=1001")
        self.assertEqual(response.code, 200)
        status = json.loads(body)
        self.assertEqual([s["t"] for s in status["history"]], [1002, 1003])
        response, body = yield self.get(base + "status.json?since=x")
        self.assertEqual(len(json.loads(body)["history"]), 3)

    @defer.inlineCallbacks
    def test_token(self):
        base = yield self.serve(token="s3cret")
        for path in ("metrics", "status.json"):
            response, _ = yield self.get(base + path)
            self.assertEqual(response.code, 401, path)
            self.assertEqual(response.headers.getRawHeaders("www-authenticate"),
                             ['Bearer realm="snq"'])
            response, _ = yield self.get(base + path, token="wrong")
            self.assertEqual(response.code, 401, path)
            response, _ = yield self.get(base + path, token="s3cret")
            self.assertEqual(response.code, 200, path)
        response, _ = yield self.get(base)
        self.assertEqual(response.code, 200, "the page itself holds no data")

    @defer.inlineCallbacks
    def rawExchange(self, base, head, body=b"", wait=1.0):
        """Send C{head} (and C{body}) on a socket; what came back in C{wait} s."""
        port = int(base.rsplit(":", 1)[1].strip("/"))
        answer = []
        done = defer.Deferred()

        class Client(protocol.Protocol):
            def connectionMade(self):
                self.transport.write(head + body)

            def dataReceived(self, data):
                answer.append(data)

            def connectionLost(self, reason):
                done.callback(None)

        client = yield endpoints.TCP4ClientEndpoint(
            reactor, "127.0.0.1", port).connect(protocol.Factory.forProtocol(Client))
        timer = reactor.callLater(wait, client.transport.abortConnection)
        yield done
        if timer.active():
            timer.cancel()
        return b"".join(answer)

    @defer.inlineCallbacks
    def test_bodyRefusedBeforeItIsRead(self):
        """
        A POST announcing 300 MB: answered 413 at once and hung up on,
        before a byte of the body is read or spooled to a temporary file.
        """
        base = yield self.serve(token="s3cret")
        opened = []
        self.patch(http, "_getContentFile",
                   lambda length: opened.append(length) or io.BytesIO())
        for path, extra in ((b"/status.json", b"Content-Length: 300000000\r\n"),
                            (b"/metrics", b"Transfer-Encoding: chunked\r\n"),
                            (b"/", b"Content-Length: 1\r\n")):
            answer = yield self.rawExchange(
                base, b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                + extra + b"\r\n", b"x" * 65536)
            self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:80])
            self.assertIn(b"takes no request body", answer)
        self.assertEqual(opened, [], "no body was spooled anywhere")
        response, _ = yield self.get(base + "status.json", token="s3cret")
        self.assertEqual(response.code, 200, "a GET is as before")

    @defer.inlineCallbacks
    def test_unknownHostRefused(self):
        """A name the monitor does not have (DNS rebinding) gets nothing."""
        base = yield self.serve()
        for host, code in ((b"127.0.0.1:8750", b"200"), (b"localhost", b"200"),
                           (b"[::1]:1", b"200"), (b"LOCALHOST.", b"421"),
                           (b"evil.example:8750", b"421"), (b"", b"421")):
            header = b"Host: " + host + b"\r\n" if host else b""
            answer = yield self.rawExchange(
                base, b"GET /status.json HTTP/1.1\r\n" + header
                + b"Connection: close\r\n\r\n")
            self.assertTrue(answer.startswith(b"HTTP/1.1 " + code), (host, answer[:80]))
            if code == b"421":
                self.assertNotIn(b'"workers"', answer)

    @defer.inlineCallbacks
    def test_busyPortIsNotFatal(self):
        base = yield self.serve()
        port = int(base.rsplit(":", 1)[1].strip("/"))
        site = makeSite(self.tracker, registry(self.tracker, "db"))
        second = HttpService(f"127.0.0.1:{port}", site, reactor)
        yield second.startService()
        self.assertIsNone(second.port)
        yield second.stopService()


class FlakyQueue(MemoryQueue):
    """Cannot be opened the first C{failures} times."""

    def __init__(self, clock, failures):
        super().__init__(clock)
        self.failures = failures

    def open(self):
        if self.failures:
            self.failures -= 1
            return defer.fail(ConnectionRefusedError("down"))
        return super().open()


class QueueWatchTests(SynchronousTestCase):
    def test_looksAndRetries(self):
        clock = Clock()
        queue = FlakyQueue(clock, failures=2)
        queue.put(b"{}", "t")
        tracker = Tracker(FakePool(), clock)
        watch = QueueWatch(queue, tracker, 5.0, clock)
        watch.startService()
        clock.advance(5)
        self.assertEqual(len(self.flushLoggedErrors(ConnectionRefusedError)), 1,
                         "logged once, not at every try")
        self.assertIsNone(tracker.depth)
        clock.advance(5)
        self.assertEqual(tracker.depth.ready, 1)
        self.assertTrue(queue.opened)
        self.successResultOf(defer.maybeDeferred(watch.stopService))
        self.assertFalse(queue.opened, "closed on stop")
        self.assertEqual(clock.getDelayedCalls(), [])


    def test_aBackendThatCannotCountIsLeftAlone(self):
        clock = Clock()

        class Uncounted(MemoryQueue):
            def depth(self):
                return defer.succeed(None)

            def deadList(self, limit=50):
                raise AssertionError("a broker's dead letters are costly to list")

        queue = Uncounted(clock)
        watch = QueueWatch(queue, Tracker(FakePool(), clock), 5.0, clock)
        watch.startService()
        self.assertFalse(queue.opened, "closed again")
        self.assertEqual(clock.getDelayedCalls(), [], "not asked again")
        self.successResultOf(defer.maybeDeferred(watch.stopService))


class MonitorConfigTests(SynchronousTestCase):
    def test_offLoopbackNeedsToken(self):
        for address in ("0.0.0.0:8750", "192.0.2.1:8750", "[::]:8750",
                        "mon.example:1"):
            e = self.assertRaises(snqconfig.ConfigError, snqconfig.parse,
                                  {"monitor": {"http": address, "hosts": ["m"]}})
            self.assertEqual(e.problems, [
                f"<config>: monitor.token: needed when monitor.http ({address}) is "
                "not a loopback address: anyone who reaches it would read the "
                "queue's state"])
        for address in ("127.0.0.1:8750", "127.0.0.2:1", "[::1]:8750",
                        "localhost:8750", ""):
            snqconfig.parse({"monitor": {"http": address}})
        snqconfig.parse({"monitor": {"http": "192.0.2.1:8750", "token": "t"}})

    def test_everyAddressNeedsHosts(self):
        e = self.assertRaises(snqconfig.ConfigError, snqconfig.parse,
                              {"monitor": {"http": "0.0.0.0:8750", "token": "t"}})
        self.assertIn("monitor.hosts: needed when monitor.http (0.0.0.0:8750) "
                      "listens on every address", str(e))
        monitor = snqconfig.parse({"monitor": {
            "http": "0.0.0.0:8750", "token": "t",
            "hosts": ["Mon.Example", "[2001:db8::1]"]}}).monitor
        self.assertEqual(monitor.hostNames(), {"mon.example", "2001:db8::1"})
        self.assertEqual(snqconfig.Config().monitor.hostNames(),
                         {"127.0.0.1", "localhost", "::1"})


    def test_defaults(self):
        monitor = snqconfig.Config().monitor
        self.assertEqual((monitor.udp, monitor.statsd, monitor.statsd_prefix,
                          monitor.http, monitor.token.reveal(),
                          monitor.depth_interval),
                         ("", "", "snq", "127.0.0.1:8750", "", 2.0))

    def test_addresses(self):
        monitor = snqconfig.parse({"monitor": {
            "udp": "udp://mon.example:9999", "statsd": "[::1]:8125",
            "http": "", "token": "t0ken"}}).monitor
        self.assertEqual(snqconfig.parseHostPort(monitor.udp, "udp://"),
                         ("mon.example", 9999))
        self.assertEqual(snqconfig.parseHostPort(monitor.statsd), ("::1", 8125))
        self.assertNotIn("t0ken", repr(monitor))

    def test_invalid(self):
        e = self.assertRaises(snqconfig.ConfigError, snqconfig.parse, {"monitor": {
            "udp": "mon.example:9999", "statsd": "localhost", "http": "h:70000",
            "statsd_prefix": "a b"}}, "snq.toml")
        self.assertEqual(sorted(e.problems), [
            'snq.toml: monitor.http: expected "HOST:PORT" or "" (off), got '
            "'h:70000'",
            'snq.toml: monitor.statsd: expected "HOST:PORT" or "" (off), got '
            "'localhost'",
            "snq.toml: monitor.statsd_prefix: expected a name of letters, digits, "
            "_ . -, got 'a b'",
            'snq.toml: monitor.udp: expected "udp://HOST:PORT" or "" (off), got '
            "'mon.example:9999'"])


class JsonLinesTests(SynchronousTestCase):
    def test_oneEventALine(self):
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        log = Logger(observer=jsonLines(), namespace="snq.test")
        log.info("worker {wid} is ready", wid="generic.0")
        log.warn("two\nlines")
        first, second = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual((first["wid"], first["log_namespace"],
                          first["log_level"]["name"]),
                         ("generic.0", "snq.test", "info"))
        self.assertEqual(formatEvent(eventFromJSON(json.dumps(second))),
                         "two\nlines")


class MonitorServiceTests(SynchronousTestCase):
    def test_wiring(self):
        clock = Clock()
        pool = FakePool()
        queue = MemoryQueue(clock)
        queue.put(b"{}", "t")
        config = snqconfig.parse({"monitor": {"http": "", "depth_interval": 2}})
        service = MonitorService(config, pool, queue, clock)
        self.assertEqual(pool.observers, [service.tracker])
        self.assertEqual(service.senders, [])
        self.assertIsNone(service.http)
        self.successResultOf(service.startService())
        self.assertEqual(service.tracker.depth.ready, 1, "a look at once")
        clock.advance(1)
        self.assertEqual(len(service.tracker.history), 1)
        self.successResultOf(service.stopService())
        self.assertFalse(queue.opened)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_senders(self):
        config = snqconfig.parse({"monitor": {
            "udp": "udp://127.0.0.1:9999", "statsd": "[::1]:8125",
            "statsd_prefix": "app"}})
        service = MonitorService(config, FakePool(), MemoryQueue(Clock()), Clock())
        monitor, statsd = service.senders
        self.assertIsInstance(monitor, StatusNetMonitor)
        self.assertEqual((monitor.host, monitor.port), ("127.0.0.1", 9999))
        self.assertEqual((statsd.host, statsd.port, statsd.prefix),
                         ("::1", 8125, "app"))
        self.assertEqual(service.tracker.sinks, [monitor, statsd])
        self.assertEqual(list(service)[:2], [monitor, statsd],
                         "senders start first and stop last")
