# -*- test-case-name: tests.test_snmp_integration -*-
"""
C{snqctl snmp} as network operators run it: a private C{snmpd} from
Debian (its own config, its own loopback port, not the system's) with the
C{pass_persist} line, a real C{twistd -n snq} with items flowing, and
net-snmp's own C{snmpget} and C{snmpwalk}, whose answers must match the
daemon's C{/metrics}; then the daemon stops and comes back.  And
C{smilint -l 3} on C{contrib/SNQ-MIB.txt}.

The IETF modules the MIB imports (SNMPv2-SMI, …) are not in Debian's
snmp packages; erlang-snmp ships them (scripts/setup-services installs
it), so all of this runs offline.
"""

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.daemon import ROOT, environ, snqctl, socketPath, startMonitored, waitFor
from tests.test_monitor import deferLater

MIB = os.path.join(ROOT, "contrib", "SNQ-MIB.txt")
BASE = ".1.3.6.1.4.1.8072.9999.9999.767"
COMMUNITY = "snq-test"

CONFIG = """
[daemon]
workers = 2
kill_time = 5
control_socket = "{sock}"

[queue]
concurrency = 10
prefetch = 10

[transports.fail]
max_retries = 0

[handlers]
record = "tests.recorder:Record"
fail = "tests.recorder:Fail"

[sites.default]
record_file = "{dir}/handled.txt"

[monitor]
http = "127.0.0.1:0"
depth_interval = 0.5
"""

SNMPD_CONF = """
agentaddress udp:127.0.0.1:{port}
rocommunity {community} 127.0.0.1
pass_persist {base} {command}
"""


def baseMibDirectories() -> list[str]:
    """Where the imported modules are: erlang-snmp's, then net-snmp's."""
    erlang = sorted(glob.glob("/usr/lib/erlang/lib/snmp-*/mibs"))[-1:]
    return [*erlang, "/usr/share/snmp/mibs"]


def freeUdpPort() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def need(*programs):
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        raise AssertionError(f"{', '.join(missing)} not installed: run "
                             "scripts/setup-services")


def parseWalk(text: str) -> dict[str, tuple[str, str]]:
    """
    C{snmpwalk -On -Oe} lines → {OID: (type, value)}; a string without its
    quotes, time ticks as their number (C{"(253) 0:00:02.53"} → C{"253"}).
    """
    found = {}
    for line in text.splitlines():
        oid, _, rest = line.partition(" = ")
        kind, _, value = rest.partition(": ")
        if kind == "Timeticks":
            value = value.split(")")[0].lstrip("(")
        found[oid] = (kind, value.strip('"'))
    return found


def index(name: str) -> str:
    octets = name.encode()
    return ".".join(map(str, (len(octets), *octets)))


def samples(metrics, family, **labels):
    """The sum of a family's samples whose labels match."""
    name = f"{family}_total" if metrics[family].type == "counter" else family
    return sum(s.value for s in metrics[family].samples
               if s.name == name
               and all(s.labels.get(k) == v for k, v in labels.items()))


class SnmpdTests(TestCase):
    timeout = 120

    def setUp(self):
        need("snmpd", "snmpget", "snmpwalk")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.sock = socketPath(self)
        self.config = os.path.join(self.dir, "snq.toml")
        with open(self.config, "w") as f:
            f.write(CONFIG.format(dir=self.dir, sock=self.sock))

    def startSnmpd(self):
        """A private snmpd whose pass_persist runs this checkout's snqctl."""
        self.port = freeUdpPort()
        conf = os.path.join(self.dir, "snmpd.conf")
        command = (f"{sys.executable} -m snq.scripts.snqctl -c {self.config} "
                   f"snmp --log {self.dir}/agent.log")
        with open(conf, "w") as f:
            f.write(SNMPD_CONF.format(port=self.port, community=COMMUNITY,
                                      base=BASE, command=command))
        persistent = os.path.join(self.dir, "snmp-persistent")
        os.makedirs(persistent)
        self.snmpdLog = os.path.join(self.dir, "snmpd.log")
        log = open(self.snmpdLog, "w")  # noqa: SIM115 (closed in the cleanup)
        # MIBS="": snmpd needs no MIB to serve numbers, and Debian ships
        # none of the IETF ones it would look for.
        process = subprocess.Popen(
            ["snmpd", "-f", "-Lo", "-C", "-c", conf, "-p",
             os.path.join(self.dir, "snmpd.pid")], stdout=log,
            stderr=subprocess.STDOUT, cwd=self.dir,
            env=environ(MIBS="", SNMP_PERSISTENT_DIR=persistent))

        def stop():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
            log.close()

        self.addCleanup(stop)
        return waitFor(lambda: self.snmp("snmpget", f"{BASE}.1.1.2.0",
                                         check=False).returncode == 0,
                       timeout=20, interval=0.2, what="snmpd answering")

    def snmp(self, tool, *args, check=True, mib=False):
        """A net-snmp client against the private snmpd (numbers unless C{mib})."""
        options = ["-v2c", "-c", COMMUNITY, "-t", "5", "-r", "0"]
        if mib:
            dirs = ":".join([*baseMibDirectories(), os.path.dirname(MIB)])
            options += ["-M", dirs, "-m", "SNQ-MIB"]
        else:
            options += ["-m", "", "-On", "-Oe"]
        result = subprocess.run([tool, *options, f"127.0.0.1:{self.port}", *args],
                                capture_output=True, text=True, timeout=30)
        if check and (result.returncode or result.stderr):
            raise AssertionError(f"{tool} {args}: {result.stderr or result.stdout}")
        return result

    def walk(self):
        return threads.deferToThread(
            lambda: parseWalk(self.snmp("snmpwalk", BASE).stdout))

    def get(self, *oids):
        return threads.deferToThread(
            lambda: parseWalk(self.snmp("snmpget", *oids).stdout))

    @defer.inlineCallbacks
    def startDaemon(self):
        self.daemon, base = yield startMonitored(self, self.dir, self.config)
        self.metricsURL = base + "metrics"

    @defer.inlineCallbacks
    def metrics(self):
        text = yield threads.deferToThread(
            lambda: urllib.request.urlopen(self.metricsURL, timeout=10).read())
        return {f.name: f for f in text_string_to_metric_families(text.decode())}

    def enqueue(self, transport, n, *options):
        snqctl("-c", self.config, "enqueue", transport, "-", *options,
               cwd=self.dir, stdin="{}\n" * n)

    @defer.inlineCallbacks
    def test_walkMatchesMetricsThenDownAndBack(self):
        yield self.startSnmpd()
        yield self.startDaemon()
        self.enqueue("record", 30)
        self.enqueue("fail", 5)
        self.enqueue("nohandler", 3)
        self.enqueue("later", 4, "--delay", "3600")

        @defer.inlineCallbacks
        def settled():
            # What the workers reported and the queue watch saw since.
            for _ in range(200):
                metrics = yield self.metrics()
                if (samples(metrics, "snq_handled") == 30
                        and samples(metrics, "snq_deadletter") == 8
                        and samples(metrics, "snq_dead_letters") == 8
                        and samples(metrics, "snq_queue_items") == 4):
                    return metrics
                yield deferLater(0.1)
            self.fail("the items never settled in /metrics")

        yield settled()
        walked = yield self.walk()
        metrics = yield self.metrics()
        status = {oid: value for oid, (_, value) in walked.items()}

        def scalar(suffix):
            return walked[f"{BASE}.{suffix}"]

        self.assertEqual(scalar("1.1.1.0"), ("INTEGER", "1"))
        self.assertEqual(scalar("1.1.3.0"), ("INTEGER", str(self.daemon.process.pid)))
        started = samples(metrics, "process_start_time_seconds")
        kind, ticks = scalar("1.1.2.0")
        self.assertEqual(kind, "Timeticks")
        self.assertLess(abs(int(ticks) / 100 - (time.time() - started)), 3)
        self.assertEqual(scalar("1.1.4.0"), ("Gauge32", "1"))
        self.assertEqual(scalar("1.1.5.0"), ("Gauge32", "2"))
        self.assertEqual(scalar("1.1.6.0"),
                         ("Gauge32", str(int(samples(metrics, "snq_worker_up")))))

        for n, state in enumerate(("ready", "delayed", "held"), 1):
            self.assertEqual(scalar(f"1.2.{n}.0"), ("Gauge32", str(int(samples(
                metrics, "snq_queue_items", state=state)))), state)
        self.assertEqual(scalar("1.2.4.0"),
                         ("Gauge32", str(int(samples(metrics, "snq_dead_letters")))))
        self.assertEqual(scalar("1.2.3.0"), ("Gauge32", "0"))
        self.assertEqual(scalar("1.2.2.0"), ("Gauge32", "4"))

        for wid in ("generic.0", "generic.1"):
            row = index(wid)

            def column(n, row=row):
                return walked[f"{BASE}.1.3.1.{n}.{row}"]

            self.assertEqual(column(3), ("STRING", "running"))
            self.assertEqual(column(5), ("Counter64", str(int(samples(
                metrics, "snq_handled", worker=wid)))))
            self.assertEqual(column(6), ("Counter64", str(int(samples(
                metrics, "snq_error", worker=wid)))))
            self.assertEqual(column(8), ("Counter64", str(int(samples(
                metrics, "snq_worker_restarts", worker=wid)))))
            kind, kb = column(7)
            self.assertEqual(kind, "Gauge32")
            rss = samples(metrics, "snq_worker_rss_bytes", worker=wid)
            self.assertLess(abs(int(kb) - rss / 1024), rss / 1024 * 0.1)
            self.assertEqual(column(4)[0], "Timeticks")
            self.assertGreater(int(column(2)[1]), 0)
        self.assertEqual(
            sum(int(status[f"{BASE}.1.3.1.5.{index(w)}"])
                for w in ("generic.0", "generic.1")), 30)

        for transport, handled, errors, dead, waiting in (
                ("record", 30, 0, 0, 0), ("fail", 0, 5, 5, 0),
                ("nohandler", 0, 0, 3, 0), ("later", 0, 0, 0, 4)):
            row = index(transport)

            def column(n, row=row):
                return walked[f"{BASE}.1.4.1.{n}.{row}"]

            self.assertEqual(column(2), ("Counter64", str(int(samples(
                metrics, "snq_handled", transport=transport)))))
            self.assertEqual(column(3), ("Counter64", str(int(samples(
                metrics, "snq_error", transport=transport)))))
            self.assertEqual(column(4), ("Counter64", str(int(samples(
                metrics, "snq_deadletter", transport=transport)))))
            self.assertEqual(column(5), ("Gauge32", str(int(samples(
                metrics, "snq_transport_items", transport=transport)))))
            self.assertEqual(column(6), ("Gauge32", str(int(samples(
                metrics, "snq_transport_oldest_age_seconds",
                transport=transport)))))
            self.assertEqual((int(column(2)[1]), int(column(3)[1]),
                              int(column(4)[1]), int(column(5)[1])),
                             (handled, errors, dead, waiting), transport)

        # The same walk by name through the MIB: every object is known to
        # it, with the type the MIB gives it.
        named = yield threads.deferToThread(
            lambda: self.snmp("snmpwalk", "SNQ-MIB::snqMIB", mib=True).stdout)
        self.assertNotIn("Wrong Type", named)
        self.assertNotIn(".1.3.6.1.4.1", named)
        self.assertIn('SNQ-MIB::snqWorkerHandled."generic.0" = Counter64: ', named)
        self.assertIn("SNQ-MIB::snqStatus.0 = INTEGER: up(1)", named)
        self.assertIn('SNQ-MIB::snqTransportWaiting."later" = Gauge32: 4', named)
        self.assertEqual(len(named.splitlines()), len(walked))

        # snmpget: one object, and one that is not there.
        got = yield self.get(f"{BASE}.1.1.1.0", f"{BASE}.1.1.9.0")
        self.assertEqual(got[f"{BASE}.1.1.1.0"], ("INTEGER", "1"))
        self.assertEqual(got[f"{BASE}.1.1.9.0"][0],
                         "No Such Instance currently exists at this OID")

        # Stopped, the daemon is down within a few seconds; the agent is
        # still there.
        self.daemon.process.send_signal(signal.SIGTERM)
        yield threads.deferToThread(self.daemon.process.wait, 30)
        stopped = time.monotonic()
        down = {}

        @defer.inlineCallbacks
        def isDown():
            got = yield self.get(f"{BASE}.1.1.1.0", f"{BASE}.1.1.2.0")
            down.update(got)
            return got[f"{BASE}.1.1.1.0"] == ("INTEGER", "2")

        yield _until(isDown, seconds=5)
        self.assertLess(time.monotonic() - stopped, 5)
        self.assertEqual(down[f"{BASE}.1.1.2.0"], ("Timeticks", "0"))
        walked = yield self.walk()
        self.assertEqual(sorted(walked), [f"{BASE}.1.1.{n}.0" for n in (1, 2, 6)])

        # And back.
        yield self.startDaemon()

        @defer.inlineCallbacks
        def isUp():
            got = yield self.get(f"{BASE}.1.1.1.0")
            return got[f"{BASE}.1.1.1.0"] == ("INTEGER", "1")

        yield _until(isUp, seconds=5)
        with open(os.path.join(self.dir, "agent.log")) as f:
            log = f.read()
        self.assertIn("snqStatus down: no snq daemon answers on", log)
        self.assertEqual(log.count("snqStatus up"), 2, log)


class SmilintTests(TestCase):
    def smilint(self, path):
        need("smilint")
        result = subprocess.run(
            ["smilint", "-l", "3", path], capture_output=True, text=True,
            timeout=60, env={**os.environ,
                             "SMIPATH": ":".join(baseMibDirectories())})
        return result.stdout + result.stderr

    def test_mibAccepted(self):
        """smilint says nothing at all: no error, no warning up to level 3."""
        self.assertEqual(self.smilint(MIB), "")

    def test_smilintWouldSay(self):
        """The silence above is smilint's verdict, not a missing import."""
        broken = os.path.join(self.mktemp(), "SNQ-MIB.txt")
        os.makedirs(os.path.dirname(broken))
        with open(MIB) as f:
            text = f.read()
        with open(broken, "w") as f:
            f.write(text.replace("snqWorkerInflight   Gauge32",
                                 "snqWorkerInflight   Counter64"))
        self.assertIn("type of `snqWorkerInflight' in sequence and object type "
                      "definition do not match", self.smilint(broken))


@defer.inlineCallbacks
def _until(condition, seconds):
    """Ask C{condition} (→ Deferred bool) until true, for C{seconds} at most."""
    deadline = time.monotonic() + seconds
    while not (yield condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s")
        yield deferLater(0.2)
