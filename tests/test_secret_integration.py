# -*- test-case-name: tests.test_secret_integration -*-
"""
No secret is ever printed: distinct secrets planted in every secret-bearing
key (database, Redis, STOMP and XMPP passwords, the control secret, the
monitor's token, site secrets, tokens in URLs' queries), then every path
that prints driven (a daemon with JSON logs on PostgreSQL, its XMPP worker
failing to log in, webhooks that fail and dead-letter, snqctl status,
check, dead list and show, a reload changing every secret, a reload and a
start with an invalid config, connection failures on each backend,
/status.json and /metrics, the dead-letter files), and everything they
wrote grepped for the secrets.
"""

import json
import os
import subprocess
import time
import urllib.request
import uuid

from twisted.internet import defer, endpoints, reactor, threads
from twisted.logger import eventFromJSON, formatEvent
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from snq.item import Item
from tests import rabbitmq
from tests.daemon import TWISTD, environ, freePort, snqctl, socketPath, waitFor
from tests.sqlservers import Postgres


def secret(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:12]}"


CONFIG = """
[daemon]
workers = 1
kill_time = 5
threshold = 0.1
control_socket = "{sock}"

[queue]
max_retries = 1
retry_delay = 0.1
retry_max_delay = 0.2
dead_letter_dir = "{dir}/dead"

[db]
url = "postgresql://postgres:{pg}@127.0.0.1:5432/{database}?sslpassword={sslpw}"

[redis]
url = "redis://snq:{redis}@127.0.0.1:6379/0"

[stomp]
passcode = "{passcode}"
control_secret = "{control}"

[xmpp]
jid = "snq@localhost"
password = "{xmpp}"
host = "127.0.0.1"
tls = "off"
connect_timeout = 5

[monitor]
http = "127.0.0.1:{http}"
token = "{token}"
depth_interval = 0.5

[sites.ex]
webhook_url = "{hook}/404?token={query}&x={generation}"
webhook_secret = "{webhook}"
api_token = "{api}"

[sites.busy]
webhook_url = "{hook}/503?access_token={query2}"

[sites.ex.xmpp]
jid = "alice@localhost"
password = "{sitexmpp}"
host = "127.0.0.1"
tls = "off"
connect_timeout = 5
"""

#: Secret-bearing keys, each planted with a value no other key has.
KEYS = ("pg", "sslpw", "redis", "passcode", "control", "xmpp", "token",
        "query", "query2", "webhook", "api", "sitexmpp")

INVALID = """
[daemon]
control_socket = "{sock}"
[db]
url = "postgres://snq:{pg}@127.0.0.1/db"
[redis]
url = "http://:{redis}@127.0.0.1/"
[stomp]
passcode = {number}
control_secret = ["{control}"]
[monitor]
token = {{ value = "{token}" }}
[xmpp]
jid = "snq@localhost"
password = 12.5
"""


class Hook(resource.Resource):
    """Answers with the status named in the path; remembers what came."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def render_POST(self, request):
        self.seen.append((request.uri, request.getHeader("x-snq-signature")))
        request.setResponseCode(int(request.path.decode().strip("/")))
        return b"no thanks"


class NoSecretPrintedTests(TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def setUp(self):
        rabbitmq.requireRabbitMQ()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.sock = socketPath(self)
        self.pg = Postgres("snq_secret")
        self.pg.create()
        self.addCleanup(self.pg.drop)
        self.hook = Hook()
        site = server.Site(self.hook)
        site.noisy = False
        port = yield endpoints.TCP4ServerEndpoint(
            reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        self.hookBase = f"http://127.0.0.1:{port.getHost().port}"
        self.http = freePort()
        self.config = os.path.join(self.dir, "snq.toml")
        #: Every secret planted, generation by generation.
        self.secrets = []
        #: (what, text) of everything snq printed or wrote.
        self.outputs = []
        #: (what, process) of every twistd started: their output too.
        self.processes = []

    def plant(self, generation):
        values = {key: secret(f"{key.upper()}{generation}") for key in KEYS}
        self.secrets += values.values()
        with open(self.config, "w") as f:
            f.write(CONFIG.format(
                sock=self.sock, dir=self.dir, database=self.pg.database,
                http=self.http, hook=self.hookBase, generation=generation,
                **values))
        return values

    def ctl(self, *args, config=None):
        """Run snqctl (in a thread): fires with its result."""
        def run():
            return snqctl("-c", config or self.config, *args, cwd=self.dir,
                          check=False)

        def ran(result):
            self.outputs.append((f"snqctl {' '.join(args)}",
                                 result.stdout + result.stderr))
            return result

        return threads.deferToThread(run).addCallback(ran)

    def ctls(self, *calls):
        """Several snqctl runs at once: each call C{(args, config)}."""
        return defer.gatherResults([self.ctl(*args, config=config)
                                    for args, config in calls])

    def fetch(self, path, token):
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http}/{path}",
            headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            text = answer.read().decode()
        self.outputs.append((f"GET /{path}", text))
        return text

    def start(self, *args, config=None, logger=True):
        """A twistd process; its output is one of the outputs grepped."""
        log = os.path.join(self.dir, f"twistd-{len(self.processes)}.log")
        with open(log, "w") as out:
            process = subprocess.Popen(
                [*TWISTD, "-n", "--pidfile=",
                 *(["--logger=snq.logs.jsonLines"] if logger else []),
                 "snq", "-c", config or self.config, *args],
                cwd=self.dir, stdout=out, stderr=subprocess.STDOUT, env=environ())

        def stop():
            if process.poll() is None:
                process.kill()
                process.wait(30)

        self.addCleanup(stop)
        process.output = lambda: _read(log)
        process.stop = stop
        self.processes.append((f"twistd -c {os.path.basename(config or self.config)}",
                               process))
        return process

    def otherConfig(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(f'[daemon]\ncontrol_socket = "{self.sock}.{name}"\n' + text)
        return path

    @defer.inlineCallbacks
    def test_plantedSecretsNeverPrinted(self):
        first = self.plant(1)
        daemon = self.start()
        yield waitFor(lambda: "is ready" in said(daemon), timeout=60,
                      what="the daemon ready")
        # Work that fails: a dead letter at once (404) and one after a
        # retry (503), both with the site's URL (and its token) in the error.
        # Enqueued as a producer would (snqctl's turn comes below).
        self.pg.insertMany([
            (Item(transport="webhook", payload={"event": 1}, site=site).toJSON()
             .decode(), "webhook", site, time.time(), time.time())
            for site in ("ex", "busy")])
        yield waitFor(lambda: len(json.loads(self.fetch(
            "status.json", first["token"]))["dead"]) == 2, what="two dead letters")
        # Each secret is live: the site's token reached the hook, signed.
        [(uri, signed)] = [s for s in self.hook.seen if b"/404" in s[0]]
        self.assertIn(first["query"].encode(), uri)
        self.assertTrue(signed.startswith("sha256="))
        listed, *_ = yield self.ctls((("dead", "list", "--json"), None),
                                     (("status", "--json"), None),
                                     (("check",), None))
        letters = {json.loads(line)["site"]: json.loads(line)["id"]
                   for line in listed.stdout.splitlines()}
        shown = yield self.ctl("dead", "show", str(letters["ex"]))
        self.assertIn("?token=***&x=1 answered HTTP 404", shown.stdout)
        self.fetch("metrics", first["token"])
        # The XMPP worker fails to log in with the planted passwords.
        yield waitFor(lambda: "snq@localhost" in said(daemon)
                      and "alice@localhost" in said(daemon), timeout=30,
                      what="the XMPP accounts tried")

        # A reload that changes every secret (and so rolls the workers).
        second = self.plant(2)
        reloaded = yield self.ctl("reload")
        self.assertEqual(reloaded.returncode, 0, reloaded.stderr)
        for line in ("xmpp.password: '***' → '***' (applied in place)",
                     "monitor.token: '***' → '***' (applied in place)",
                     "stomp.control_secret: '***' → '***' (rolling restart)",
                     "sites.ex.webhook_secret: '***' → '***' (applied in place)",
                     "sites.ex.api_token: '***' → '***' (applied in place)"):
            self.assertIn(line, reloaded.stdout)
        self.assertIn("db.url: 'postgresql://postgres:***@127.0.0.1:5432/",
                      reloaded.stdout)
        self.assertIn(f"{self.pg.database}?sslpassword=*** every", reloaded.stdout)
        yield waitFor(lambda: "config generation 2 applied" in said(daemon),
                      timeout=60, what="generation 2 applied")
        yield waitFor(lambda: self.answers(second["token"]), timeout=30,
                      what="the monitor on the new token")
        self.fetch("status.json", second["token"])
        self.fetch("metrics", second["token"])
        yield self.ctl("status", "--json")

        # An invalid config: a reload refused, a start refused, snqctl too.
        invalid = {key: secret(f"{key.upper()}3") for key in ("pg", "redis",
                                                              "control", "token")}
        number = str(int(uuid.uuid4().int % 10**15))
        self.secrets += [*invalid.values(), number]
        good = _read(self.config)
        with open(self.config, "w") as f:
            f.write(INVALID.format(sock=self.sock, number=number, **invalid))
        refused = yield self.ctl("reload")
        self.assertEqual(refused.returncode, 1)
        self.assertIn("stomp.passcode: expected a string, got integer (not "
                      "shown: a secret)", refused.stderr)
        self.assertIn("db.url: expected sqlite:///PATH", refused.stderr)
        starting = self.start(config=self.config, logger=False)
        yield self.ctl("dead", "list")
        yield threads.deferToThread(starting.wait, 60)
        self.assertIn("invalid configuration, not starting", starting.output())
        with open(self.config, "w") as f:
            f.write(good)

        # Connection failures, each backend with its password.
        failing = {key: secret(f"{key.upper()}4") for key in
                   ("redis", "passcode", "mysql", "pg", "control")}
        self.secrets += failing.values()
        redis = self.otherConfig("redis.toml", f"""
[queue]
backend = "redis"
[redis]
url = "redis://:{failing['redis']}@127.0.0.1:6379/0"
timeout = 2
""")
        stomp = self.otherConfig("stomp.toml", f"""
[queue]
backend = "stomp"
[stomp]
passcode = "{failing['passcode']}"
control_secret = "{failing['control']}"
connect_timeout = 2
""")
        mysql = self.otherConfig("mysql.toml", f"""
[db]
url = "mysql://root:{failing['mysql']}@127.0.0.1:3306/snq_nonexistent"
""")
        pgdown = self.otherConfig("pgdown.toml", f"""
[db]
url = "postgresql://postgres:{failing['pg']}@127.0.0.1:{freePort()}/x"
""")
        starting = [self.start("--inline", config=config)
                    for config in (redis, stomp)]
        *failed, control = yield self.ctls(
            *[(("dead", "list"), config) for config in (redis, mysql, pgdown)],
            (("control", "restart"), stomp))
        for result in failed:
            self.assertEqual(result.returncode, 1, result.stdout)
            self.assertIn("cannot open the queue", result.stderr)
        self.assertIn("redis://:***@127.0.0.1:6379/0", failed[0].stderr)
        self.assertEqual(control.returncode, 1)
        for process in starting:
            yield waitFor(lambda p=process: p.poll() is not None
                          or "refused" in said(p), timeout=30,
                          what="the connection refused")
            process.stop()

        daemon.terminate()
        yield threads.deferToThread(daemon.wait, 30)
        self.grep()

    def answers(self, token):
        try:
            self.fetch("status.json", token)
        except OSError:
            return False
        return True

    def grep(self):
        outputs = list(self.outputs)
        outputs += [(name, p.output()) for name, p in self.processes]
        dead = os.path.join(self.dir, "dead")
        for name in sorted(os.listdir(dead)):
            with open(os.path.join(dead, name)) as f:
                outputs.append((f"dead letter file {name}", f.read()))
        self.assertGreater(len(outputs), 25)
        self.assertTrue(any("***" in text for _, text in outputs))
        leaks = [(what, planted) for what, text in outputs
                 for planted in self.secrets if planted in text]
        self.assertEqual(leaks, [], "secrets printed")



def _read(path) -> str:
    with open(path) as f:
        return f.read()


def said(process) -> str:
    """What a daemon with JSON logs said, formatted."""
    lines = []
    for line in process.output().splitlines():
        try:
            lines.append(formatEvent(eventFromJSON(line)))
        except ValueError:
            lines.append(line)
    return "\n".join(lines)
