"""
A daemon on any backend whose handler stamps what it handled
(L{tests.recorder.Stamp}), for the tests of producers outside it: Python's
L{snq.client}, PHP's, and the web applications.  Its queues, lists and
topics are named for the test (a L{tests.rabbitmq.uniqueName}).
"""

import os

import redis

from tests.daemon import Daemon, waitFor
from tests.rabbitmq import uniqueName
from tests.recorder import recorded

REDIS_URL = "redis://127.0.0.1:6379/1"

CONFIG = """
[daemon]
workers = 1
kill_time = 5

[queue]
backend = "{backend}"
poll_interval = 0.2
basename = "/queue/{name}/"
breakout = [{breakouts}]

[db]
url = "{dbUrl}"

[redis]
url = "{redisUrl}"
prefix = "{name}:"

[stomp]
control_channel = "/topic/{name}/control"
control_secret = "{secret}"

[handlers]
{transport} = "tests.recorder:Stamp"

[sites.default]
record_file = "{dir}/handled.txt"
"""


class StampDaemon:
    """
    The config (C{self.config}, a path in C{directory}) of a daemon on
    C{backend} whose handler for C{transport} stamps each item it handles.
    """

    def __init__(self, testCase, directory, backend, name, transport="stamp",
                 dbUrl=None, breakouts=(), secret=""):
        self.testCase = testCase
        self.dir = directory
        self.config = os.path.join(directory, "snq.toml")
        self.record = os.path.join(directory, "handled.txt")
        with open(self.config, "w") as f:
            f.write(CONFIG.format(
                backend=backend, name=name, transport=transport, dir=directory,
                dbUrl=dbUrl or f"sqlite:///{directory}/unused.sqlite",
                redisUrl=REDIS_URL, secret=secret,
                breakouts=", ".join(f'"{b}"' for b in breakouts)))

    def start(self):
        """A Deferred firing with the running L{Daemon} (--inline)."""
        daemon = Daemon(self.testCase, self.dir, "-c", self.config, "--inline")
        d = waitFor(lambda: "consuming groups" in daemon.output(),
                    what="the daemon to start")
        return d.addCallback(lambda _: daemon)

    def handled(self) -> dict:
        """Item id → (attempts, started) of what the daemon handled."""
        return {itemId: (int(attempts), float(started))
                for itemId, _, attempts, started in recorded(self.record)}

    def handledIds(self) -> list:
        """The ids, in the order handled, each as often as it was."""
        return [line[0] for line in recorded(self.record)]

    def waitHandled(self, ids, timeout=60):
        return waitFor(lambda: set(ids) <= self.handled().keys(),
                       timeout=timeout, what=f"{len(ids)} items handled")


class OnServer:
    """
    Mixin for a TestCase per backend: C{self.name} and C{self.dir} of the
    test's own, then C{setUpServer()} (which sets C{self.dbUrl} for SQL),
    then C{self.stamps}, a L{StampDaemon} on C{backend} stamping C{transport}
    with the class's C{breakouts} and C{secret}.
    """

    backend = ""
    transport = "stamp"
    breakouts = ()
    secret = ""
    timeout = 120

    def setUp(self):
        self.name = uniqueName()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.dbUrl = None
        self.setUpServer()
        self.stamps = StampDaemon(self, self.dir, self.backend, self.name,
                                  transport=self.transport, dbUrl=self.dbUrl,
                                  breakouts=self.breakouts, secret=self.secret)

    def setUpServer(self):
        pass

    def handled(self):
        return self.stamps.handled()


def deleteRedisKeys(prefix):
    """Delete every key under C{prefix} in the tests' Redis database."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
