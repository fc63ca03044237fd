# -*- test-case-name: tests.test_monitor_integration -*-
"""
What an operator's tools see of a real C{twistd -n snq} (two workers, an
SQLite file): StatusNet's UDP monitor and statsd datagrams caught by
listeners on 127.0.0.1, /metrics read with prometheus_client's parser,
C{snqctl check} as Nagios runs it, and the dashboard in headless Chromium.
"""

import json
import os
import re
import shutil
import subprocess
import tempfile
import urllib.request
from urllib.parse import parse_qs

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, threads
from twisted.logger import formatEvent
from twisted.trial.unittest import TestCase

from tests.daemon import TWISTD, environ, handledIds, snqctl, startMonitored, waitFor
from tests.test_monitor import Listener, deferLater

CONFIG = """
[daemon]
workers = 2
kill_time = 5

[queue]
concurrency = 10
prefetch = 10
{queue}

[handlers]
record = "tests.recorder:Record"

[sites.default]
record_file = "{dir}/handled.txt"

[monitor]
http = "127.0.0.1:0"
depth_interval = 0.5
{extra}
"""

STATES = {"init", "listening", "queue", "poll", "idle", "shutdown"}
CHROMIUM = "/usr/bin/chromium"


class MonitoredDaemonTests(TestCase):
    timeout = 120

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "snq.toml")
        self.record = os.path.join(self.dir, "handled.txt")

    def listen(self):
        listener = Listener()
        port = reactor.listenUDP(0, listener, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return listener, port.getHost().port

    @defer.inlineCallbacks
    def start(self, extra="", queue=""):
        """A daemon on this test's config; → the base URL of its HTTP side."""
        with open(self.config, "w") as f:
            f.write(CONFIG.format(dir=self.dir, extra=extra, queue=queue))
        self.daemon, base = yield startMonitored(self, self.dir, self.config)
        return base

    def enqueue(self, n, payload='{"sleep": 0.2}', transport="record"):
        snqctl("-c", self.config, "enqueue", transport, "-", cwd=self.dir,
               stdin=(payload + "\n") * n)

    def get(self, url):
        return threads.deferToThread(
            lambda: urllib.request.urlopen(url, timeout=10).read().decode())

    @defer.inlineCallbacks
    def metrics(self, base):
        text = yield self.get(base + "metrics")
        return {f.name: f for f in text_string_to_metric_families(text)}

    @defer.inlineCallbacks
    def test_udpStatsdAndMetricsWhileItemsFlow(self):
        udp, udpPort = self.listen()
        statsd, statsdPort = self.listen()
        base = yield self.start(f'udp = "udp://127.0.0.1:{udpPort}"\n'
                                f'statsd = "127.0.0.1:{statsdPort}"')
        # Two waves of 20 (two workers, ten at a time), a second each: the
        # workers report while the items run.
        self.enqueue(40, '{"sleep": 1.0}')
        yield waitFor(lambda: len(handledIds(self.record)) == 40,
                      what="40 items handled")

        def counterDatagrams():
            fields = [parse_qs(d.decode()) for d in udp.datagrams]
            return [f for f in fields if f.get("counter") == ["handled"]]

        yield waitFor(lambda: len(counterDatagrams()) == 40, timeout=10,
                      what="a UDP counter datagram per item handled")
        threads_ = set()
        for fields in counterDatagrams():
            queue, site, thread = fields["owners[]"]
            self.assertEqual((queue, site), ("queue:record", "site:default"))
            threads_.add(thread)
        self.assertEqual(threads_, {"thread:generic.0", "thread:generic.1"},
                         "both workers took items")
        states = [parse_qs(d.decode(), keep_blank_values=True)
                  for d in udp.datagrams if d.startswith(b"thread_id=")]
        seen = {(s["thread_id"][0], s["state"][0], s["substate"][0]) for s in states}
        self.assertLessEqual({state for _, state, _ in seen}, STATES)
        for wid in ("generic.0", "generic.1"):
            self.assertIn((wid, "queue", "record"), seen)
            self.assertIn((wid, "idle", ""), seen, "the polls found nothing")
        self.assertTrue(all(float(s["ts"][0]) > 1e9 for s in states))

        def statsdLines():
            return [line for d in statsd.datagrams
                    for line in d.decode().split("\n")]

        def handledInStatsd():
            return sum(int(line.split(":")[1].split("|")[0])
                       for line in statsdLines()
                       if line.startswith("snq.handled:"))

        yield waitFor(lambda: handledInStatsd() == 40, timeout=10,
                      what="statsd's handled counter at 40")
        lines = statsdLines()
        timer = [line for line in lines if line.startswith("snq.handle_time.record:")]
        self.assertTrue(timer, "a handle-time timer")
        self.assertTrue(all(re.match(r"^snq\.handle_time\.record:\d+\.\d+\|ms"
                                     r"(\|@[\d.e-]+)?$", line) for line in timer))
        self.assertGreaterEqual(float(timer[0].split(":")[1].split("|")[0]), 1000)
        self.assertIn("snq.workers.alive:2|g", lines)
        self.assertTrue(any(line.startswith("snq.queue.ready:") for line in lines))
        self.assertTrue(any(re.match(r"^snq\.worker\.generic_0\.rss:\d+\|g$", line)
                            for line in lines))

        metrics = yield self.metrics(base)
        handled = metrics["snq_handled"].samples
        self.assertEqual(sum(s.value for s in handled
                             if s.name == "snq_handled_total"), 40)
        self.assertEqual({s.labels["worker"] for s in handled
                          if s.name == "snq_handled_total"},
                         {"generic.0", "generic.1"})
        [count] = [s.value for s in metrics["snq_handle_duration_seconds"].samples
                   if s.name == "snq_handle_duration_seconds_count"]
        self.assertEqual(count, 40)
        up = {s.labels["worker"]: s.value for s in metrics["snq_worker_up"].samples}
        self.assertEqual(up, {"generic.0": 1, "generic.1": 1})
        self.assertTrue(all(s.value > 10 * 2**20
                            for s in metrics["snq_worker_rss_bytes"].samples))
        yield self.waitForMetrics(
            base, lambda m: all(s.value == 0 for s in m["snq_queue_items"].samples),
            "snq_queue_items back at 0")

    @defer.inlineCallbacks
    def waitForMetrics(self, base, condition, what):
        """The /metrics for which C{condition} holds (within five seconds)."""
        for _ in range(50):
            metrics = yield self.metrics(base)
            if condition(metrics):
                return metrics
            yield deferLater(0.1)
        self.fail(f"/metrics never showed {what}")

    @defer.inlineCallbacks
    def test_countersOutliveRecycledWorkers(self):
        """
        Workers that recycle themselves after 25 items: their successors
        start at 0, /metrics does not, and what they finished while
        stopping counts too.
        """
        base = yield self.start(queue="max_items = 25")
        self.enqueue(80, '{"sleep": 0.05}')
        yield waitFor(lambda: len(handledIds(self.record)) == 80,
                      what="80 items handled")

        def total(metrics, family):
            return sum(s.value for s in metrics[family].samples
                       if s.name == f"{family}_total")

        def recycledAndBack(metrics):
            up = [s.value for s in metrics["snq_worker_up"].samples]
            return total(metrics, "snq_worker_restarts") >= 1 and up == [1, 1]

        # The last items' counts come with their workers' next report (once
        # a second, and a stopping worker's last one): wait for it, and for
        # the count to stay at 80, neither lost nor counted twice.
        metrics = yield self.waitForMetrics(
            base, lambda m: recycledAndBack(m) and total(m, "snq_handled") == 80,
            "a recycled worker replaced and 80 handled")
        yield deferLater(1.5)
        metrics = yield self.metrics(base)
        self.assertEqual(total(metrics, "snq_handled"), 80)

    @defer.inlineCallbacks
    def test_nagiosCheck(self):
        """OK, WARNING and CRITICAL as Nagios would see them run."""
        base = yield self.start()

        def check(*argv):
            return snqctl("-c", self.config, "check", *argv, cwd=self.dir,
                          check=False)

        result = check("--min-workers", "2", "--dead-warn", "0")
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertRegex(result.stdout, r"^SNQ OK - .*2/2 workers running \| ")
        self.enqueue(1, "{}", transport="nosuch")
        yield self.waitForMetrics(
            base, lambda m: [s.value for s in m["snq_dead_letters"].samples] == [1],
            "a dead letter")
        result = check("--dead-warn", "0", "--dead-crit", "5")
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertTrue(result.stdout.startswith("SNQ WARNING - 1 dead"),
                        result.stdout)
        snqctl("-c", self.config, "stop", cwd=self.dir)
        result = check()
        self.assertEqual(result.returncode, 2, result.stdout)
        self.assertIn("no snq daemon answers on", result.stdout)

    @defer.inlineCallbacks
    def test_jsonLogs(self):
        """twistd --logger=snq.logs.jsonLines: every line JSON, workers' too."""
        with open(self.config, "w") as f:
            f.write(CONFIG.format(dir=self.dir, extra="", queue=""))
        out = os.path.join(self.dir, "log.jsonl")
        with open(out, "w") as stdout:
            process = subprocess.Popen(
                [*TWISTD, "-n", "--pidfile=", "--logger=snq.logs.jsonLines",
                 "snq", "-c", self.config], cwd=self.dir, stdout=stdout,
                stderr=subprocess.DEVNULL, env=environ())

        def kill():
            if process.poll() is None:
                process.kill()
                process.wait()

        self.addCleanup(kill)

        def events():
            with open(out) as f:
                return [json.loads(line) for line in f if line.endswith("\n")]

        yield waitFor(lambda: sum("is ready" in formatEvent(e) for e in events())
                      == 2, what="two workers ready, in JSON")
        process.terminate()
        yield threads.deferToThread(process.wait, 30)
        systems = {e.get("log_system", "") for e in events()}
        self.assertTrue(any(s.startswith("generic.0:") for s in systems),
                        "worker lines, tagged")
        self.assertIn("all workers stopped", [formatEvent(e) for e in events()])

    @defer.inlineCallbacks
    def test_dashboardInChromium(self):
        if not os.access(CHROMIUM, os.X_OK):
            self.fail(f"{CHROMIUM} is missing: run scripts/setup-services")
        base = yield self.start()
        for _ in range(3):
            self.enqueue(30)
            yield deferLater(1.0)
        yield waitFor(lambda: len(handledIds(self.record)) == 90,
                      what="90 items handled")
        yield deferLater(1.5)  # a sample with the last items in it
        screenshot = os.path.join(self.dir, "dashboard.png")
        dom = yield threads.deferToThread(self.chromium, base, screenshot)
        self.assertTrue(os.path.getsize(screenshot) > 10_000, "a screenshot")
        rows = re.findall(r'<tr>(.*?)</tr>', dom.split('id="workers"')[1]
                          .split("</table>")[0], re.S)
        cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in rows]
        workers = {c[0]: c for c in cells if c}
        self.assertEqual(set(workers), {"generic.0", "generic.1"})
        for cell in workers.values():
            self.assertEqual(cell[2], "running")
            self.assertRegex(cell[1], r"^\d+$", "a pid")
            self.assertRegex(cell[5], r"^\d+\.\d MB$", "RSS")
        self.assertEqual(sum(int(c[7]) for c in workers.values()), 90,
                         "handled, per worker")
        chart = re.search(r'<svg id="chart-throughput"[^>]*>(.*?)</svg>', dom, re.S)
        self.assertIsNotNone(chart, "the throughput chart")
        self.assertGreater(float(re.search(r'data-max="([\d.]+)"',
                                           chart.group(0)).group(1)), 0)
        points = re.findall(r'data-series="handled" points="([^"]+)"', chart.group(1))
        heights = {float(p.split(",")[1]) for run in points for p in run.split()}
        self.assertGreater(len(heights), 1, "a line that goes up somewhere")
        self.assertIn('class="ok">live<', dom)

    def chromium(self, url, screenshot):
        """The page after its script ran for a few (virtual) seconds."""
        profile = tempfile.mkdtemp(prefix="snq-chromium-")
        try:
            common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                      "--disable-background-networking",
                      "--disable-component-update", "--disable-sync",
                      "--no-first-run", f"--user-data-dir={profile}",
                      "--window-size=1280,1000", "--virtual-time-budget=3000"]
            subprocess.run([*common, f"--screenshot={screenshot}", url],
                           capture_output=True, timeout=60, check=True)
            return subprocess.run([*common, "--dump-dom", url], capture_output=True,
                                  text=True, timeout=60, check=True).stdout
        finally:
            shutil.rmtree(profile, ignore_errors=True)
