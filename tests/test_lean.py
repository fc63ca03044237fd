# -*- test-case-name: tests.test_lean -*-
"""
L{snq.lean}, and what a master and a worker import for a plain config:
each case runs in a fresh interpreter, so an eager import coming back
anywhere in the chain fails here.
"""

import json
import os
import subprocess
import sys
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from snq import config as snqconfig
from snq.lean import TLS_MODULES, needsStartTLS

#: Modules neither process imports unless its config uses them.
OPTIONAL = ["OpenSSL", "cryptography", "service_identity", "twisted.internet.ssl",
            "twisted.internet.endpoints", "twisted.web.client",
            "twisted.web.server", "treq", "wokkel",
            "prometheus_client", "psycopg", "pymysql", "txredisapi",
            "stompest.protocol", "feedparser", "cronsim", "redis"]
#: What only a worker runs: the master imports none of it.
WORKER_ONLY = ["snq.child", "snq.iomaster", "snq.dispatch", "snq.queues.manager",
               "snq.handlers.builtin", "snq.handlers.webhook",
               "snq.iomanagers.schedule", "snq.iomanagers.feedpoll", "snq.ledger",
               "snq.xmpp.accounts"]

PLAIN = """\
[queue]
groups = {groups}
backend = "db"

[db]
url = "sqlite:///{dir}/q.sqlite"

[daemon]
control_socket = "{dir}/control.sock"

[monitor]
http = "{http}"
"""

MASTER = """
import json, sys
from snq import tap
options = tap.Options()
options.parseOptions(["--config", sys.argv[1], "--workers", "2"])
tap.makeService(options)
print(json.dumps(sorted(sys.modules)))
"""

WORKER = """
import json, sys
from twisted.internet.task import LoopingCall
from snq import child, config as snqconfig
from snq.lean import installReactor, needsStartTLS
config = snqconfig.load(sys.argv[1])
role = sys.argv[2]
# As child.main does: the config decides how the reactor is imported.
reactor = installReactor(needsStartTLS(config, role))
worker = child.Worker(config, "lean.0", reactor, role=role)
modules = []
def look():
    if worker.state == "running":
        modules.extend(sorted(sys.modules))
        worker.exit(0, "probed")
    elif worker.state == "stopping":
        reactor.stop()
LoopingCall(look).start(0.05)
reactor.addSystemEventTrigger("before", "shutdown", worker.stop)
reactor.callWhenRunning(worker.start)
reactor.run()
print(json.dumps({"modules": modules,
                  "startTLS": hasattr(__import__("twisted.internet.tcp").internet.tcp
                                      .Connection, "startTLS")}))
"""


def probe(testCase, script: str, *args: str):
    """Run C{script} in a fresh interpreter → what it prints, as JSON."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True, text=True, timeout=120, cwd=testCase.dir)
    if result.returncode != 0:
        testCase.fail(f"probe failed ({result.returncode}):\n{result.stderr}")
    return json.loads(result.stdout.splitlines()[-1])


class ImportTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def write(self, http="", groups=("main",)):
        path = os.path.join(self.dir, "snq.toml")
        with open(path, "w") as f:
            f.write(PLAIN.format(dir=self.dir, http=http, groups=json.dumps(groups)))
        return path

    def assertAbsent(self, modules, names):
        self.assertEqual([n for n in names if n in modules], [])

    def test_masterOfAPlainConfig(self):
        """No TLS, no web or Prometheus without HTTP, no worker code."""
        modules = probe(self, MASTER, self.write())
        self.assertIn("snq.pool", modules)
        self.assertAbsent(modules, OPTIONAL + WORKER_ONLY)

    def test_masterWithHTTP(self):
        """The HTTP side imports Twisted's web and Prometheus, still no TLS."""
        modules = probe(self, MASTER, self.write(http="127.0.0.1:0"))
        self.assertIn("twisted.web.server", modules)
        self.assertIn("prometheus_client", modules)
        self.assertAbsent(modules, ["OpenSSL", "cryptography",
                                    "twisted.internet.ssl", *WORKER_ONLY])

    def test_workerOfAPlainConfig(self):
        """A running SQLite worker: its backend and handlers, no TLS."""
        result = probe(self, WORKER, self.write(), "queues")
        modules = result["modules"]
        self.assertIn("snq.queues.db", modules)
        self.assertIn("snq.handlers.webhook", modules)
        self.assertAbsent(modules, OPTIONAL)
        self.assertFalse(result["startTLS"])

    def test_xmppWorkerStartsTLS(self):
        """An XMPP worker's reactor can start TLS on its stream."""
        result = probe(self, WORKER, self.write(groups=["main", "xmpp"]), "xmpp")
        self.assertTrue(result["startTLS"])
        self.assertIn("OpenSSL", result["modules"])


class LeanTests(SynchronousTestCase):
    def test_withoutTLSThenTLSAgain(self):
        """Blocked inside, importable after (endpoints that wrap TLS)."""
        result = subprocess.run([sys.executable, "-c", textwrap.dedent("""
            import sys
            from snq.lean import withoutTLS
            with withoutTLS():
                try:
                    import OpenSSL
                except ImportError:
                    print("blocked")
            from twisted.internet.endpoints import wrapClientTLS
            from twisted.internet.ssl import optionsForClientTLS
            wrapClientTLS(optionsForClientTLS("example.org"), object())
            print("OpenSSL" in sys.modules)
            """)], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.stdout.split(), ["blocked", "True"], result.stderr)

    def test_blockedNamesAreKnownModules(self):
        self.assertIn("OpenSSL", TLS_MODULES)
        self.assertIn("twisted.internet._newtls", TLS_MODULES)

    def test_needsStartTLS(self):
        plain = snqconfig.Config()
        self.assertFalse(needsStartTLS(plain, "all"))
        xmpp = snqconfig.parseText(b'[queue]\ngroups = ["main", "xmpp"]\n', "x.toml")
        self.assertTrue(needsStartTLS(xmpp, "xmpp"))
        self.assertTrue(needsStartTLS(xmpp, "all"))
        self.assertFalse(needsStartTLS(xmpp, "queues"))
